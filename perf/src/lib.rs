//! ferry-perf: Ferry's benchmarks, as commands that print tables and JSON (never assertions).
//!
//! The binary is `migration-bench`; its subcommands share the helpers here:
//! - [`stream`]: `migration-bench stream`, a page set streamed from a source process to a
//!   destination process over one channel (`tcp` or `zstd`), compared with iperf3.
//! - [`iperf`]: the iperf3 reference, measured between the same endpoints in the same run.
//! - [`testbed`]: network namespaces joined by rate-limited veth pairs (`scripts/testbed.sh`),
//!   removed again on drop and on Ctrl-C.
//! - [`report`]: the readable table and the JSON lines.
//! - [`procstat`]: CPU time and peak RSS of a process.
//! - [`units`]: sizes (`1GiB`) and rates (`1gbit`) on the command line.
//!
//! Convention: every `*_bps` field of the JSON output is in **bytes** per second.

pub mod error;
pub mod iperf;
pub mod procstat;
pub mod report;
pub mod stream;
pub mod testbed;
pub mod units;

pub use error::{BenchError, Result};
