//! ferry-vmm-glue: guests that Ferry migrates, implementing `ferry-migrate`'s VM traits.
//!
//! - [`pagemix`]: deterministic page contents (zero, text-like, random pages in given
//!   proportions) that the synthetic guest is filled with and that benchmarks and tests check against.
//! - [`synthetic`]: memory filled with a page mixture or a raw image, and a writer thread that
//!   dirties a working set at a set rate.
//! - [`kvm`]: a small VMM on KVM running Ferry's own guest program (long mode, CPL 3), with
//!   dirty logging, pause/resume and versioned vCPU state.
//!
//! The `ferry-harness` test binary (`src/bin/ferry-harness.rs`) runs that guest and migrates it between host
//! processes without an agent: `receive`, `run-and-migrate`, `pingpong` (live) and `quick` (shared
//! directory). The product path is `ferryd` (crate `ferry-agent`).

pub mod kvm;
pub mod pagemix;
pub mod synthetic;
