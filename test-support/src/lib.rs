//! ferry-test-support: what Ferry's tests (and its benchmarks, which are test tooling) share, in
//! one place, the way rust-vmm keeps generic test helpers reused across backends.
//!
//! - [`certs`]: a CA and host certificates in a temporary directory (mutual TLS tests).
//! - [`conformance`]: the suite every channel backend passes (`tcp`, `zstd`, `rdma`).
//! - [`guest`]: synthetic guests for migration tests, and checks that two images match.
//! - [`fault`]: the source's channels wrapped to fail on cue at a protocol step (a cut, a
//!   cancel, a corrupt message, a hung path, pages lost on the way, a lost confirmation).
//! - [`journal`]: reading an agent's migration journal (most migrations open at once).
//! - [`flood`]: a flood of idle connections against a listener (reopening what it closes).
//! - [`mitm`]: a man in the middle relaying Ferry's frames that flips, drops, injects or replays
//!   one in a chosen phase of a migration.
//! - [`server`]: a [`MigrationServer`](ferry_migrate::server::MigrationServer) on its own thread
//!   whose outcomes arrive on a channel.
//! - [`sessions`]: multichannel sessions without the engine (a destination answering the
//!   interface exchange; discovery inside a namespace).
//! - [`testbed`]: network namespaces joined by rate-limited veth pairs (`scripts/testbed.sh`).
//! - [`tmpfs`]: a small tmpfs mounted for one test (a destination whose file system fills up).
//! - [`kvm_or_skip`]: `SKIP: <test>: <reason>` where /dev/kvm cannot run Ferry's guest.
//! - [`pagemix`]: the synthetic guest's page contents (owned by `ferry-vmm-glue`, re-exported).
//!
//! Product crates take this crate as a dev-dependency only; `ferry-perf` (the benchmarks, never
//! shipped) uses it as a normal dependency for the testbed and the loopback server.

pub mod certs;
pub mod conformance;
pub mod fault;
pub mod flood;
pub mod guest;
pub mod journal;
pub mod mitm;
pub mod server;
pub mod sessions;
pub mod testbed;
pub mod tmpfs;

pub use ferry_vmm_glue::pagemix;

/// Write `SKIP: <test>: <why>` to the process's stderr in one write (not through `eprintln!`,
/// which the test harness captures, so the line is visible without `--nocapture`, and parallel
/// tests' lines do not interleave).
pub fn skip(test: &str, why: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("SKIP: {test}: {why}\n").as_bytes());
}

/// `true` if KVM can run Ferry's guest here; otherwise prints `SKIP: <test>: <reason>` (see
/// [`skip`]) and returns `false`.
pub fn kvm_or_skip(test: &str) -> bool {
    match ferry_vmm_glue::kvm::kvm_usable() {
        Ok(_) => true,
        Err(why) => {
            skip(test, &why);
            false
        }
    }
}
