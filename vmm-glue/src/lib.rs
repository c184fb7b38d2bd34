//! ferry-vmm-glue: guests that Ferry migrates, implementing `ferry-migrate`'s VM traits.
//!
//! - [`pagemix`]: deterministic page contents (zero, text-like, random pages in given
//!   proportions) that the synthetic guest is filled with and that benchmarks and tests check against.
//! - [`synthetic`]: memory filled with a page mixture or a raw image, and a writer thread that
//!   dirties a working set at a set rate; its disks (raw sparse images through `ferry-disk`) and
//!   a disk writer at a set rate over a working set.
//! - [`guestdisk`]: the synthetic guest's disk images (a known, half-sparse initial pattern of
//!   any size), the stamped-sector writer and the check of every sector after a move.
//! - [`kvm`]: a small VMM on KVM running Ferry's own guest program (long mode, CPL 3), with
//!   dirty logging, pause/resume and versioned vCPU state.
//!
//! The `ferry-harness` test binary (`src/bin/ferry-harness.rs`) runs that guest and migrates it between host
//! processes without an agent: `receive`, `run-and-migrate`, `pingpong` (live) and `quick` (shared
//! directory). The product path is `ferryd` (crate `ferry-agent`).

pub mod guestdisk;
pub mod kvm;
pub mod pagemix;
pub mod synthetic;
