//! ferry-perf: Ferry's benchmarks, as commands that print tables and JSON (never assertions).
//!
//! The binary is `migration-bench`; its subcommands share the helpers here:
//! - [`live`]: `migration-bench` / `migration-bench live`, live migration of a synthetic guest
//!   between two processes with the real engine, per workload and transport option.
//! - [`agent`]: `migration-bench agent`, moves through two host agents (`ferryd` on loopback)
//!   beside the library path, and N VMs under each `max_live_migrations`.
//! - [`stream`]: `migration-bench stream`, a page set streamed from a source process to a
//!   destination process over one channel (`tcp` or `zstd`), compared with iperf3.
//! - [`storage`]: `migration-bench storage`, storage live migration of a synthetic guest's disks
//!   (kind `local`), compared with `cp --sparse=always` in the same run.
//! - [`driver`]: the child-process driver both benchmarks share (spawn the destination and the
//!   source, talk to them in lines, watchdog, reap).
//! - [`iperf`]: the iperf3 reference, measured between the same endpoints in the same run.
//! - [`testbed`]: network namespaces joined by rate-limited veth pairs (`scripts/testbed.sh`),
//!   removed again on drop and on Ctrl-C.
//! - [`report`]: the readable table and the JSON lines.
//! - [`procstat`]: CPU time and peak RSS of a process.
//! - [`units`]: sizes (`1GiB`) and rates (`1gbit`) on the command line.
//!
//! Convention: every rate in the JSON output and the tables says its unit (`*_bytes_per_s`,
//! `*_bits_per_s`, `Gbit/s`); README.md lists each bench's JSON fields.

pub mod agent;
pub mod driver;
pub mod error;
pub mod iperf;
pub mod live;
pub mod procstat;
pub mod report;
pub mod storage;
pub mod stream;
pub mod units;

pub use error::{BenchError, Result};
/// The namespace testbed (one wrapper for tests and benchmarks, in `ferry-test-support`).
pub use ferry_test_support::testbed;
