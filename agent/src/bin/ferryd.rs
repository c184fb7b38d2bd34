//! `ferryd --config FILE [--log-format text|json]`: the host agent (`ferry_agent::daemon`).
//! A bad configuration is refused at start (exit code 2) with the key and the reason.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use ferry_agent::config::Config;
use ferry_agent::daemon::{serve, Agent};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Parser)]
#[command(name = "ferryd", version, about = "Ferry's host agent: VMs, moves, host-wide limits, journal")]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long)]
    config: PathBuf,
    /// Log lines as text or as JSON objects (on standard error).
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let c = Cli::parse();
    // FERRY_LOG=debug for more.
    let level = match std::env::var("FERRY_LOG").as_deref() {
        Ok("debug") => tracing::Level::DEBUG,
        Ok("trace") => tracing::Level::TRACE,
        Ok("warn") => tracing::Level::WARN,
        _ => tracing::Level::INFO,
    };
    let sub = tracing_subscriber::fmt().with_max_level(level).with_writer(std::io::stderr);
    match c.log_format {
        LogFormat::Json => sub.json().init(),
        LogFormat::Text => sub.init(),
    }
    let cfg = match Config::load(&c.config) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("ferryd: config {}: {e}", c.config.display());
            return ExitCode::from(2);
        }
    };
    // The VMM processes are the `ferry-vmm` beside this binary (FERRY_VMM overrides).
    let vmm = std::env::var_os("FERRY_VMM").map(PathBuf::from).unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("ferry-vmm")))
            .unwrap_or_else(|| "ferry-vmm".into())
    });
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferryd: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = rt.block_on(async move {
        let a = Agent::start(cfg, vmm).await?;
        serve(a).await
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferryd: {e}");
            ExitCode::FAILURE
        }
    }
}
