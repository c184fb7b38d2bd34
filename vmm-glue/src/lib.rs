//! ferry-vmm-glue: guests that Ferry migrates, implementing `ferry-migrate`'s VM traits.
//!
//! - [`synthetic`]: memory filled with a page mixture or a raw image, and a writer thread that
//!   dirties a working set at a set rate.

pub mod synthetic;
