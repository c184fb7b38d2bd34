//! `ferry-vmm`: one VM in its own process, supervised by `ferryd` over a unix socket
//! (`ferry_agent::vmm`). Started by the agent, not by hand:
//!
//! ```text
//! ferry-vmm --socket S --name NAME --guest synthetic|kvm --memory-bytes N (--key-file F | --tls-dir D)
//!           [--working-set-bytes N] [--dirty-rate-bytes-per-s N] [--receive-on IP [--encryption MODE]]
//!           [--quick-dir DIR --quick-host NAME --quick-id ID]
//!           [--disk PATH]... [--disk-working-set-bytes N] [--disk-write-rate-bytes-per-s N]
//!           [--receive-disk-dir DIR --receive-disk NAME...] [--expect-peer NAME]
//! ferry-vmm --socket S --key-file F --standby --reserve-bytes N
//! ```
//!
//! `--standby`: no VM yet; the process faults in `--reserve-bytes` of guest memory and waits for
//! the agent to assign it one incoming live migration (`ferry_agent::vmmctl::AssignOrder`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ferry_agent::api::GuestKind;
use ferry_agent::vmm::{run, QuickLoad, VmmArgs};
use ferry_transport::handshake::Psk;
use ferry_transport::{Credentials, TlsCredentials};

#[derive(Debug, Parser)]
#[command(name = "ferry-vmm", version, about = "One VM in its own process, supervised by ferryd")]
struct Cli {
    /// Control socket (created, mode 0600).
    #[arg(long)]
    socket: PathBuf,
    /// VM name.
    #[arg(long, required_unless_present = "standby")]
    name: Option<String>,
    /// synthetic or kvm.
    #[arg(long, required_unless_present = "standby")]
    guest: Option<GuestKind>,
    /// Guest memory in bytes.
    #[arg(long, required_unless_present = "standby")]
    memory_bytes: Option<u64>,
    /// A standby VMM: no VM until the agent assigns it an incoming migration.
    #[arg(long, requires = "reserve_bytes", conflicts_with_all = ["name", "receive_on", "quick_dir"])]
    standby: bool,
    /// Standby: guest memory to fault in ahead of the migration.
    #[arg(long, requires = "standby")]
    reserve_bytes: Option<u64>,
    /// The key file (migration channels are authenticated with it).
    #[arg(long, required_unless_present = "tls_dir", conflicts_with = "tls_dir")]
    key_file: Option<PathBuf>,
    /// Instead of a key: the host certificates (ca.pem, cert.pem, key.pem) channels use.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Working set the guest rewrites.
    #[arg(long, default_value_t = 0)]
    working_set_bytes: u64,
    /// Synthetic guest: rewrite rate (0: as fast as it can).
    #[arg(long, default_value_t = 0)]
    dirty_rate_bytes_per_s: u64,
    /// Receive the VM: listen for one migration on this IP (a free port) instead of booting.
    #[arg(long)]
    receive_on: Option<std::net::IpAddr>,
    /// Receiving: the only frame protection accepted (aead, integrity, off).
    #[arg(long, default_value_t = ferry_transport::Encryption::Aead)]
    encryption: ferry_transport::Encryption,
    /// Receive the VM by quick migration: load it from this shared directory once its
    /// ownership record names `--quick-host` (with `--quick-host` and `--quick-id`).
    #[arg(long, requires_all = ["quick_host", "quick_id"])]
    quick_dir: Option<PathBuf>,
    /// This host's name in the ownership record.
    #[arg(long)]
    quick_host: Option<String>,
    /// The quick migration's id.
    #[arg(long)]
    quick_id: Option<String>,
    /// A disk image (repeat for more disks).
    #[arg(long)]
    disk: Vec<PathBuf>,
    /// Bytes at the start of each disk the guest rewrites (0: none).
    #[arg(long, default_value_t = 0)]
    disk_working_set_bytes: u64,
    /// Synthetic guest: disk bytes written per second (0: flat out).
    #[arg(long, default_value_t = 0)]
    disk_write_rate_bytes_per_s: u64,
    /// Receiving a shared-nothing move: the directory its disks arrive in (with `--receive-on`).
    #[arg(long, requires_all = ["receive_on", "receive_disk"])]
    receive_disk_dir: Option<PathBuf>,
    /// Receiving a shared-nothing move: a disk's file name, in the source's order (repeat).
    #[arg(long, requires = "receive_disk_dir")]
    receive_disk: Vec<String>,
    /// Receiving with `--encryption integrity|off`: a network this host trusts (repeat). Every
    /// channel must come from and arrive at addresses on these networks, or it is refused.
    #[arg(long, requires = "receive_on", value_parser = parse_subnet)]
    trusted_network: Vec<ferry_agent::config::Subnet>,
    /// Receiving with `--tls-dir`: the name (DNS name or IP address) the source's certificate
    /// must carry on every channel; another host of the CA is refused in the TLS handshake.
    #[arg(long, requires_all = ["receive_on", "tls_dir"])]
    expect_peer: Option<String>,
}

fn parse_subnet(s: &str) -> Result<ferry_agent::config::Subnet, String> {
    ferry_agent::config::Subnet::parse(s)
}

fn main() -> ExitCode {
    let c = Cli::parse();
    // Its own process group: a signal to the agent's group (Ctrl-C) does not reach the VM, and
    // the VM outlives the agent that started it. Not its own session: with the kernel's
    // autogroup scheduling a session is one scheduling entity, and measured here a VMM in a
    // session of its own moved a cold 2 GiB guest 1.3-7.7x slower than the library path in the
    // same run (1.0x and 0.7x in its agent's session).
    let _ = nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0));
    let creds: Result<Credentials, _> = match (&c.key_file, &c.tls_dir) {
        (Some(f), _) => Psk::from_file(f).map(Credentials::from),
        (None, Some(d)) => TlsCredentials::from_dir(d).map(Credentials::from),
        (None, None) => unreachable!("clap requires --key-file or --tls-dir"),
    };
    let creds = match creds {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ferry-vmm: {e}");
            return ExitCode::from(2);
        }
    };
    let args = VmmArgs {
        socket: c.socket,
        name: c.name.unwrap_or_default(),
        guest: c.guest.unwrap_or(GuestKind::Synthetic),
        memory_bytes: c.memory_bytes.unwrap_or(0),
        working_set_bytes: c.working_set_bytes,
        dirty_rate_bytes_per_s: c.dirty_rate_bytes_per_s,
        creds,
        receive_on: c.receive_on,
        encryption: c.encryption,
        quick_load: match (c.quick_dir, c.quick_host, c.quick_id) {
            (Some(dir), Some(host), Some(id)) => Some(QuickLoad { dir, host, id }),
            _ => None,
        },
        disks: c.disk,
        disk_working_set_bytes: c.disk_working_set_bytes,
        disk_write_rate_bytes_per_s: c.disk_write_rate_bytes_per_s,
        standby_reserve_bytes: c.standby.then(|| c.reserve_bytes.unwrap_or(0)),
        receive_disks: c.receive_disk_dir.map(|dir| ferry_agent::vmmctl::ReceiveDisks { dir, names: c.receive_disk }),
        trusted_networks: c.trusted_network,
        expect_peer: c.expect_peer,
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-vmm: {e}");
            ExitCode::FAILURE
        }
    }
}
