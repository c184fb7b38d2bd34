//! ferry-migrate: the migration engine.
//!
//! [`vm`] holds the traits the engine consumes (source VM, target VM, dirty log); `vmm-glue`
//! implements them.

pub mod quick;
pub mod vm;
