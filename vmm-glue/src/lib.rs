//! ferry-vmm-glue: guests that Ferry migrates.
//!
//! - [`kvm`]: a small VMM on KVM running Ferry's own guest program, implementing the engine's
//!   VM traits.

pub mod kvm;
