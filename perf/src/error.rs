//! Errors of the benchmarks.

use ferry_memory::MemoryError;
use ferry_transport::TransportError;

/// Why a benchmark could not run or finish.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Invalid input (command line or a child's arguments).
    #[error("{0}")]
    Usage(String),
    /// A command the benchmark needs is missing and could not be installed.
    #[error("{tool} is not available: {why}")]
    MissingTool {
        /// Command name.
        tool: &'static str,
        /// What went wrong.
        why: String,
    },
    /// A helper command (ip, tc, iperf3, the testbed script) failed.
    #[error("{what} failed: {detail}")]
    Command {
        /// What was run.
        what: String,
        /// Exit status and the last lines it printed.
        detail: String,
    },
    /// A child process of the benchmark failed or broke the protocol.
    #[error("{role} process: {detail}")]
    Child {
        /// `source` or `destination`.
        role: &'static str,
        /// What happened.
        detail: String,
    },
    /// The run took longer than allowed.
    #[error("timed out after {0} s")]
    Timeout(u64),
    /// Output that could not be parsed (iperf3's JSON, a child's result line).
    #[error("cannot parse {what}: {detail}")]
    Parse {
        /// What was parsed.
        what: &'static str,
        /// Why not.
        detail: String,
    },
    /// The namespace testbed could not be made or changed.
    #[error("testbed: {0}")]
    Testbed(#[from] ferry_test_support::testbed::TestbedError),
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// Memory could not be mapped.
    #[error("memory: {0}")]
    Memory(#[from] MemoryError),
    /// Operating system error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl BenchError {
    /// An I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io { context: context.into(), source }
    }
}

/// Result of the benchmarks.
pub type Result<T, E = BenchError> = std::result::Result<T, E>;
