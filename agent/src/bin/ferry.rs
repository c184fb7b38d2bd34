//! `ferry`: the command line of the host agent. It talks to the local `ferryd` over its API
//! socket (`--api SOCKET`, default `/run/ferry/ferryd.sock`).
//!
//! ```text
//! ferry [--api SOCKET] [--json] host show
//! ferry [--api SOCKET] [--json] host set [--max-live-migrations N] [--option tcp|compression|smb]
//!                                  [--use-any-network true|false] [--encryption aead|integrity|off]
//! ferry [--api SOCKET] [--json] network list | network add SUBNET [--priority N] [--trusted] |
//!                                  network remove SUBNET
//! ferry [--api SOCKET] [--json] vm create --name NAME --memory SIZE --guest synthetic|kvm
//!                                  [--working-set SIZE] [--dirty-rate SIZE] [--disk NAME:SIZE]...
//!                                  [--disk-working-set SIZE] [--disk-write-rate SIZE]
//! ferry [--api SOCKET] [--json] vm list | vm show|pause|resume|delete NAME
//! ferry [--api SOCKET] [--json] vm move-storage NAME --path DIR [--wait]
//! ferry [--api SOCKET] [--json] move NAME --to ADDR [--quick] [--option tcp|zstd|zstd-always] [--channels N]
//!                                  [--encryption aead|integrity|off] [--downtime-ms N]
//!                                  [--include-storage [--retain-source-disks]] [--wait]
//! ferry [--api SOCKET] [--json] preflight NAME --to ADDR [--quick] [--option ...] [--channels N]
//!                                  [--include-storage] [--encryption MODE]
//! ferry [--api SOCKET] [--json] migrations [--watch] | migration ID | cancel ID
//! ferry tls-certs --out DIR [--revoke HOST]... [HOST[=SAN,...]]...
//!                                  (a CA and host certificates; revocation lists)
//! ```
//!
//! With `--json` every command prints JSON (`move --wait`: one object with `status`,
//! `verified`, `total_ms`, `downtime_ms`, `kind`, `encryption`, `disks` (shared-nothing: per disk `verified`,
//! `source_removed`, ...); `vm move-storage --wait`: one object with `status`,
//! `total_ms`, `downtime_ms`, `transferred_bytes`, `disks`; `migrations`: an array whose items have `id`, `vm`,
//! `direction`, `status`, `started_at`, `finished_at`). On a terminal `move --wait` shows a
//! progress bar. Exit codes: 0 success, 1 the migration failed or was cancelled, 2 the request
//! was refused (bad input, unknown VM, destination refused) or the agent cannot be reached.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ferry_agent::api::*;
use ferry_agent::client::{request, Endpoint};
use ferry_memory::size::parse_bytes as parse_size;
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(name = "ferry", version, about = "Move running VMs between hosts (talks to the local ferryd)")]
struct Cli {
    /// The agent's API socket.
    #[arg(long, global = true, default_value = "/run/ferry/ferryd.sock")]
    api: PathBuf,
    /// Print JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Host settings and load.
    Host {
        #[command(subcommand)]
        cmd: HostCmd,
    },
    /// Migration networks (subnets moves may take, by priority).
    Network {
        #[command(subcommand)]
        cmd: NetworkCmd,
    },
    /// VMs on this host.
    Vm {
        #[command(subcommand)]
        cmd: VmCmd,
    },
    /// Move a VM to another host (live; --include-storage carries its disks; --quick through
    /// shared storage).
    Move(MoveArgs),
    /// Could a move of VM to HOST run now, and how? (Nothing moves.) Exit 0: compatible;
    /// 2: not, with every reason.
    Preflight(Route),
    /// The migration journal, newest first.
    Migrations {
        /// Print it again every second (text) until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// One migration, with its state changes.
    Migration {
        /// Migration id.
        id: String,
    },
    /// Cancel a queued or running move (before commit the VM keeps running here).
    Cancel {
        /// Migration id.
        id: String,
    },
    /// Make a CA and host certificates for mutual TLS, and revoke them (no agent needed).
    ///
    /// `OUT/ca.pem`, `OUT/ca-key.pem` (keep it offline), and per host `OUT/HOST/{ca,cert,key}.pem`
    /// (key mode 0600), the directory a host's `tls_dir` names. ECDSA P-256, valid until 2125.
    /// Each certificate names its host (NAME, the agent's `name`) and the given SANs. When OUT
    /// already holds a CA (`ca.pem` and `ca-key.pem`) it is used again: a host given again gets a
    /// new certificate (renewal; running agents read it at their next connection).
    ///
    /// `--revoke HOST`: add the certificate in `OUT/HOST/cert.pem` to the CA's revocation list
    /// `OUT/crl.pem` (created, or a new list with a higher number keeping what the old listed),
    /// signed by the CA, and copy it as `crl.pem` into every host directory in OUT. Copy it to
    /// each host's `tls_dir` elsewhere: running agents read it at their next connection and
    /// refuse the revoked host both as caller and as callee. Revoke and give the host again to
    /// replace a compromised key.
    TlsCerts {
        /// Where to write them.
        #[arg(long)]
        out: PathBuf,
        /// Revoke this host's current certificate (repeat for more).
        #[arg(long, value_name = "HOST")]
        revoke: Vec<String>,
        /// Hosts, each `NAME` or `NAME=SAN,SAN...` (DNS names or IP addresses the certificate
        /// names besides NAME).
        #[arg(required_unless_present = "revoke")]
        hosts: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum HostCmd {
    /// Settings and load.
    Show,
    /// Change settings at run time (kept across restarts of ferryd; used by the next move).
    Set {
        /// Live migrations at once, outgoing and incoming together.
        #[arg(long)]
        max_live_migrations: Option<usize>,
        /// Performance option: tcp, compression or smb.
        #[arg(long)]
        option: Option<String>,
        /// Whether any network may carry migrations (true or false).
        #[arg(long, action = clap::ArgAction::Set)]
        use_any_network: Option<bool>,
        /// Frame protection of outgoing moves: aead, integrity or off (the last two apply only
        /// over networks marked trusted on both hosts, and need one marked trusted here).
        #[arg(long)]
        encryption: Option<ferry_transport::Encryption>,
    },
}

#[derive(Debug, Subcommand)]
enum NetworkCmd {
    /// The migration networks, by priority.
    List,
    /// Add a migration network.
    Add {
        /// Subnet, like 198.18.0.0/24.
        subnet: String,
        /// Lower is preferred.
        #[arg(long, default_value_t = 0)]
        priority: u32,
        /// The operator trusts this network: moves over it may use integrity or off.
        #[arg(long)]
        trusted: bool,
    },
    /// Remove a migration network.
    Remove {
        /// Subnet, as listed.
        subnet: String,
    },
}

#[derive(Debug, Subcommand)]
enum VmCmd {
    /// Start a VM in its own VMM process.
    Create {
        /// Name (unique on the host).
        #[arg(long)]
        name: String,
        /// Guest memory (like 512MiB, 1GiB).
        #[arg(long, value_parser = parse_size)]
        memory: u64,
        /// Guest kind.
        #[arg(long)]
        guest: GuestKind,
        /// Working set the guest rewrites (default: a quarter of memory, at most 64 MiB).
        #[arg(long, value_parser = parse_size)]
        working_set: Option<u64>,
        /// Synthetic guest: bytes rewritten per second (default 16MiB).
        #[arg(long, value_parser = parse_size)]
        dirty_rate: Option<u64>,
        /// A disk: NAME:SIZE (like root:1GiB; any size from 64 KiB), an empty sparse image
        /// in the VM's storage directory (repeat for more disks).
        #[arg(long, value_parser = parse_disk)]
        disk: Vec<DiskRequest>,
        /// Bytes at the start of each disk the guest rewrites (default 1MiB; 0: none).
        #[arg(long, value_parser = parse_size)]
        disk_working_set: Option<u64>,
        /// Synthetic guest: disk bytes written per second (default 1MiB).
        #[arg(long, value_parser = parse_size)]
        disk_write_rate: Option<u64>,
    },
    /// Move every disk of a running VM to another directory on this host (storage live
    /// migration); the old files are removed after the switch.
    MoveStorage {
        /// Name.
        name: String,
        /// The directory (absolute) the disks move to.
        #[arg(long)]
        path: PathBuf,
        /// Wait until the move ended and print its outcome.
        #[arg(long)]
        wait: bool,
    },
    /// Every VM.
    List,
    /// One VM.
    Show {
        /// Name.
        name: String,
    },
    /// Stop the guest.
    Pause {
        /// Name.
        name: String,
    },
    /// Let the guest run again.
    Resume {
        /// Name.
        name: String,
    },
    /// Stop the VM and forget it.
    Delete {
        /// Name.
        name: String,
    },
}

fn parse_disk(s: &str) -> Result<DiskRequest, String> {
    let (name, size) = s.rsplit_once(':').ok_or_else(|| format!("{s:?}: want NAME:SIZE, like root:1GiB"))?;
    Ok(DiskRequest { name: name.to_string(), size_bytes: parse_size(size)? })
}

/// What a move (and its preflight) takes: the VM, where to, how.
#[derive(Debug, clap::Args)]
struct Route {
    /// The VM.
    vm: String,
    /// The destination agent's `listen` address.
    #[arg(long)]
    to: String,
    /// Quick migration: save to the shared storage, resume at the destination.
    #[arg(long)]
    quick: bool,
    /// Transport option: tcp, zstd, zstd-always (default: the host's performance option).
    #[arg(long)]
    option: Option<ferry_transport::option::TransportOption>,
    /// Channels.
    #[arg(long)]
    channels: Option<u16>,
    /// Frame protection: aead, integrity or off (default: the host's setting; integrity and off
    /// are refused unless the network is marked trusted on both hosts).
    #[arg(long)]
    encryption: Option<ferry_transport::Encryption>,
    /// Carry the VM's disks on the migration session (shared-nothing live migration): the
    /// destination receives copies, and the files here go once it runs the VM.
    #[arg(long, conflicts_with = "quick")]
    include_storage: bool,
}

impl Route {
    fn kind(&self) -> MoveKind {
        if self.quick {
            MoveKind::Quick
        } else {
            MoveKind::Live
        }
    }
}

#[derive(Debug, clap::Args)]
struct MoveArgs {
    #[command(flatten)]
    route: Route,
    /// Downtime limit in milliseconds.
    #[arg(long)]
    downtime_ms: Option<u64>,
    /// With --include-storage: keep the disk files here after the move (by default they are
    /// removed once the destination runs the VM).
    #[arg(long, requires = "include_storage")]
    retain_source_disks: bool,
    /// Wait until the move ended and print its outcome.
    #[arg(long)]
    wait: bool,
}

/// How the command ended.
enum Fail {
    /// Refused (exit 2): bad input, unknown resource, agent unreachable.
    Refused(String),
    /// The migration failed or was cancelled (exit 1).
    Failed(String),
    /// A preflight found incompatibilities (exit 2; the report says which).
    Incompatible,
}

struct Api {
    ep: Endpoint,
}

impl Api {
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, Fail> {
        let body = body.map(|b| b.to_string().into_bytes());
        let (status, out) = request(&self.ep, method, path, body, &[], Duration::from_secs(120))
            .await
            .map_err(|e| Fail::Refused(format!("{e} (is ferryd running? --api names its socket)")))?;
        if (200..300).contains(&status) {
            if out.is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_slice(&out).map_err(|e| Fail::Refused(format!("the agent answered badly: {e}")));
        }
        match serde_json::from_slice::<ErrorBody>(&out) {
            Ok(e) => Err(Fail::Refused(format!("{} ({})", e.error.message, e.error.code))),
            Err(_) => Err(Fail::Refused(format!("the agent answered HTTP {status}"))),
        }
    }
}

fn print(json_out: bool, v: &Value, text: impl FnOnce(&Value) -> String) {
    if json_out {
        println!("{v}");
    } else {
        println!("{}", text(v));
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

fn vm_line(v: &Value) -> String {
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
    let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    format!(
        "{:<20} {:<9} {:>8.0} MiB  {:<10} epoch {:<3} pid {:<7} counter {}",
        s("name"),
        s("guest"),
        mib(n("memory_bytes")),
        s("state"),
        n("epoch"),
        n("pid"),
        n("guest_counter")
    )
}

fn migration_line(m: &Value) -> String {
    let s = |k: &str| m.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
    let f = |k: &str| m.get(k).and_then(Value::as_f64);
    let mut l = format!(
        "{} {:<16} {:<8} {:<10} {:<9} {}",
        s("id"),
        s("vm"),
        s("direction"),
        s("status"),
        s("encryption"),
        s("peer")
    );
    if let (Some(t), Some(d)) = (f("total_ms"), f("downtime_ms")) {
        l += &format!("  total {t:.0} ms, downtime {d:.1} ms");
    }
    if let Some(e) = m.get("error").and_then(Value::as_str) {
        l += &format!("  ({e})");
    }
    l
}

/// Write `text` to `path` (mode `mode`) through a temporary file renamed over it, so that an
/// agent reading it meanwhile sees the old file or the new one, never a part.
fn write_whole(path: &std::path::Path, text: &str, mode: u32) -> Result<(), Fail> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|_| f.sync_all()))
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Fail::Refused(format!("{}: {e}", path.display()))
        })
}

/// `ferry tls-certs`: a CA (new, or the one in `out`), revocations, and one directory per host.
fn tls_certs(out: &std::path::Path, revoke: &[String], hosts: &[String]) -> Result<(), Fail> {
    use ferry_transport::tls::{TestCa, Validity};
    let bad = |e: ferry_transport::KeyError| Fail::Refused(e.to_string());
    let read =
        |p: std::path::PathBuf| std::fs::read_to_string(&p).map_err(|e| Fail::Refused(format!("{}: {e}", p.display())));
    let host_name = |h: &str| -> Result<(), Fail> {
        if h.is_empty() || h.contains('/') || h.starts_with('.') {
            return Err(Fail::Refused(format!("{h:?}: not a host name")));
        }
        Ok(())
    };
    let (ca_pem, ca_key) = (out.join("ca.pem"), out.join("ca-key.pem"));
    let ca = if ca_pem.exists() || ca_key.exists() {
        let ca = TestCa::from_pem(&read(ca_pem.clone())?, &read(ca_key.clone())?)
            .map_err(|e| Fail::Refused(format!("the CA in {}: {e}", out.display())))?;
        eprintln!("using the CA in {} ({})", out.display(), ca_pem.display());
        ca
    } else {
        if !revoke.is_empty() {
            return Err(Fail::Refused(format!(
                "--revoke: {} holds no CA (ca.pem and ca-key.pem): give the directory the certificates were made in",
                out.display()
            )));
        }
        let ca = TestCa::new("Ferry CA").map_err(bad)?;
        std::fs::create_dir_all(out).map_err(|e| Fail::Refused(format!("{}: {e}", out.display())))?;
        write_whole(&ca_pem, ca.cert_pem(), 0o644)?;
        write_whole(&ca_key, &ca.key_pem(), 0o600)?;
        ca
    };
    if !revoke.is_empty() {
        let crl_path = out.join("crl.pem");
        let (number, mut entries) = match std::fs::read_to_string(&crl_path) {
            Ok(text) => ferry_transport::tls::read_revocation_list(&text)
                .map_err(|e| Fail::Refused(format!("{}: {e}", crl_path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, Vec::new()),
            Err(e) => return Err(Fail::Refused(format!("{}: {e}", crl_path.display()))),
        };
        let now = time::OffsetDateTime::now_utc().replace_nanosecond(0).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        for h in revoke {
            host_name(h)?;
            let cert = out.join(h).join("cert.pem");
            let serial = ferry_transport::tls::serial_of(&read(cert.clone())?)
                .map_err(|e| Fail::Refused(format!("{}: {e}", cert.display())))?;
            if entries.iter().any(|r| r.serial == serial) {
                eprintln!("{h}: its certificate is listed already");
                continue;
            }
            entries.push(ferry_transport::tls::Revoked { serial, when: now });
        }
        let crl = ca.revocation_list(&entries, number + 1, now).map_err(bad)?;
        write_whole(&crl_path, &crl, 0o644)?;
        println!("{}", crl_path.display());
        // Every host directory of this CA gets the new list.
        let dirs = std::fs::read_dir(out).map_err(|e| Fail::Refused(format!("{}: {e}", out.display())))?;
        for d in dirs.flatten() {
            let p = d.path();
            if p.is_dir() && p.join("cert.pem").is_file() {
                write_whole(&p.join("crl.pem"), &crl, 0o644)?;
                println!("{}", p.join("crl.pem").display());
            }
        }
        eprintln!(
            "revocation list {} (number {}) lists {} certificate(s); copy it as crl.pem into the tls_dir of \
             hosts set up from elsewhere: running agents read it at their next connection",
            crl_path.display(),
            number + 1,
            entries.len()
        );
    }
    for h in hosts {
        let (name, mut sans) = match h.split_once('=') {
            Some((n, s)) => (n, s.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect()),
            None => (h.as_str(), Vec::new()),
        };
        host_name(name)?;
        // The certificate names its host: peers check that a request from host NAME comes
        // with a certificate naming NAME.
        if !sans.iter().any(|s| s == name) {
            sans.insert(0, name.to_string());
        }
        let dir = out.join(name);
        let pem = ca.issue(name, &sans, Validity::Long).map_err(bad)?;
        std::fs::create_dir_all(&dir).map_err(|e| Fail::Refused(format!("{}: {e}", dir.display())))?;
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        }
        // The key first, the certificate last: an agent reading in between sees a key that is
        // not its certificate's, refuses that state and keeps what it had until the next look.
        write_whole(&dir.join("ca.pem"), &pem.ca, 0o644)?;
        write_whole(&dir.join("key.pem"), &pem.key, 0o600)?;
        write_whole(&dir.join("cert.pem"), &pem.cert, 0o644)?;
        if out.join("crl.pem").is_file() {
            write_whole(&dir.join("crl.pem"), &read(out.join("crl.pem"))?, 0o644)?;
        }
        println!("{}", dir.display());
    }
    Ok(())
}

async fn run(c: Cli) -> Result<(), Fail> {
    let api = Api { ep: Endpoint::Unix(c.api.clone()) };
    let j = c.json;
    match c.cmd {
        Cmd::TlsCerts { out, revoke, hosts } => tls_certs(&out, &revoke, &hosts)?,
        Cmd::Host { cmd: HostCmd::Show } => {
            let v = api.call("GET", "/v1/host", None).await?;
            print(j, &v, |v| serde_json::to_string_pretty(v).unwrap_or_default());
        }
        Cmd::Host { cmd: HostCmd::Set { max_live_migrations, option, use_any_network, encryption } } => {
            let patch = HostPatch {
                max_live_migrations,
                performance_option: option,
                use_any_network,
                encryption: encryption.map(|m| m.to_string()),
            };
            let body = serde_json::to_value(&patch).map_err(|e| Fail::Refused(e.to_string()))?;
            let v = api.call("PATCH", "/v1/host", Some(body)).await?;
            print(j, &v, |v| serde_json::to_string_pretty(v).unwrap_or_default());
        }
        Cmd::Network { cmd } => {
            let v = match cmd {
                NetworkCmd::List => api.call("GET", "/v1/host/networks", None).await?,
                NetworkCmd::Add { subnet, priority, trusted } => {
                    let n = json!({"subnet": subnet, "priority": priority, "trusted": trusted});
                    api.call("POST", "/v1/host/networks", Some(n)).await?
                }
                NetworkCmd::Remove { subnet } => {
                    api.call("DELETE", "/v1/host/networks", Some(json!({"subnet": subnet}))).await?
                }
            };
            print(j, &v, |v| {
                let lines: Vec<String> = v
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|n| {
                                format!(
                                    "{} priority {}{}",
                                    n["subnet"].as_str().unwrap_or("-"),
                                    n["priority"].as_u64().unwrap_or(0),
                                    if n["trusted"] == true { " trusted" } else { "" }
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                if lines.is_empty() {
                    "no migration networks (any network is allowed unless use_any_network is false)".into()
                } else {
                    lines.join("\n")
                }
            });
        }
        Cmd::Vm { cmd } => match cmd {
            VmCmd::Create { name, memory, guest, working_set, dirty_rate, disk, disk_working_set, disk_write_rate } => {
                let body = serde_json::to_value(CreateVm {
                    name,
                    memory_bytes: memory,
                    guest,
                    working_set_bytes: working_set,
                    dirty_rate_bytes_per_s: dirty_rate,
                    disks: disk,
                    disk_working_set_bytes: disk_working_set,
                    disk_write_rate_bytes_per_s: disk_write_rate,
                })
                .map_err(|e| Fail::Refused(e.to_string()))?;
                let v = api.call("POST", "/v1/vms", Some(body)).await?;
                print(j, &v, vm_line);
            }
            VmCmd::List => {
                let v = api.call("GET", "/v1/vms", None).await?;
                print(j, &v, |v| {
                    v.as_array().map(|a| a.iter().map(vm_line).collect::<Vec<_>>().join("\n")).unwrap_or_default()
                });
            }
            VmCmd::Show { name } => {
                let v = api.call("GET", &format!("/v1/vms/{name}"), None).await?;
                print(j, &v, |v| serde_json::to_string_pretty(v).unwrap_or_default());
            }
            VmCmd::Pause { name } => {
                let v = api.call("POST", &format!("/v1/vms/{name}/pause"), None).await?;
                print(j, &v, vm_line);
            }
            VmCmd::Resume { name } => {
                let v = api.call("POST", &format!("/v1/vms/{name}/resume"), None).await?;
                print(j, &v, vm_line);
            }
            VmCmd::Delete { name } => {
                api.call("DELETE", &format!("/v1/vms/{name}"), None).await?;
                print(j, &json!({"deleted": name}), |_| format!("deleted {name}"));
            }
            VmCmd::MoveStorage { name, path, wait } => return do_move_storage(&api, j, &name, &path, wait).await,
        },
        Cmd::Move(m) => return do_move(&api, j, m).await,
        Cmd::Preflight(r) => {
            let req = PreflightRequest {
                kind: r.kind(),
                option: r.option.map(|o| o.to_string()),
                channels: r.channels,
                include_storage: r.include_storage,
                encryption: r.encryption.map(|m| m.to_string()),
                vm: r.vm,
                to: r.to,
            };
            let body = serde_json::to_value(&req).map_err(|e| Fail::Refused(e.to_string()))?;
            let v = api.call("POST", "/v1/preflight", Some(body)).await?;
            let r: PreflightReport =
                serde_json::from_value(v.clone()).map_err(|e| Fail::Refused(format!("bad answer: {e}")))?;
            print(j, &v, |_| {
                let mut out = format!(
                    "{} {} move of {} to {}: {}",
                    if r.compatible { "compatible:" } else { "NOT compatible:" },
                    r.kind.name(),
                    r.vm,
                    r.to,
                    match &r.network {
                        Some(n) => format!("network {n}, option {}, {} channels", r.option, r.channels),
                        None => "no network pairs".into(),
                    }
                );
                out += &format!("\n  encryption {} ({})", r.encryption.as_deref().unwrap_or("-"), r.encryption_reason);
                if !r.credentials.is_empty() {
                    out += &format!("\n  credentials {}", r.credentials);
                }
                if let Some(d) = &r.destination {
                    out += &format!(
                        "\n  destination {}: {}/{} migrations active, {} queued, {} MiB to give, kvm {}, shared storage {}",
                        d.name,
                        d.active_migrations,
                        d.max_live_migrations,
                        d.queued_migrations,
                        d.memory_available_bytes >> 20,
                        d.kvm,
                        d.shared_storage
                    );
                    if let Some(dir) = &d.disk_dir {
                        out += &format!(
                            "\n  disks arrive in {dir}: {} KiB free, the disks occupy {} KiB",
                            d.disk_available_bytes >> 10,
                            d.disk_needed_bytes >> 10
                        );
                    }
                }
                if r.would_queue {
                    out += "\n  it would wait for a slot of the host-wide limit";
                }
                for i in &r.incompatibilities {
                    out += &format!("\n  {}: {}", i.code, i.message);
                }
                out
            });
            if !r.compatible {
                // The report is printed; exit 2 says "refused" without more words.
                return Err(Fail::Incompatible);
            }
        }
        Cmd::Migrations { watch } => loop {
            let v = api.call("GET", "/v1/migrations", None).await?;
            print(j, &v, |v| {
                v.as_array().map(|a| a.iter().map(migration_line).collect::<Vec<_>>().join("\n")).unwrap_or_default()
            });
            if !watch {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            if !j {
                println!();
            }
        },
        Cmd::Migration { id } => {
            let v = api.call("GET", &format!("/v1/migrations/{id}"), None).await?;
            print(j, &v, |v| serde_json::to_string_pretty(v).unwrap_or_default());
        }
        Cmd::Cancel { id } => {
            let v = api.call("POST", &format!("/v1/migrations/{id}/cancel"), None).await?;
            print(j, &v, migration_line);
        }
    }
    Ok(())
}

async fn do_move(api: &Api, j: bool, m: MoveArgs) -> Result<(), Fail> {
    let req = MoveRequest {
        vm: m.route.vm.clone(),
        to: m.route.to.clone(),
        kind: m.route.kind(),
        option: m.route.option.map(|o| o.to_string()),
        channels: m.route.channels,
        downtime_ms: m.downtime_ms,
        include_storage: m.route.include_storage,
        retain_source_disks: m.retain_source_disks,
        encryption: m.route.encryption.map(|e| e.to_string()),
    };
    let body = serde_json::to_value(&req).map_err(|e| Fail::Refused(e.to_string()))?;
    let acc = api.call("POST", "/v1/moves", Some(body)).await?;
    let id = acc.get("id").and_then(Value::as_str).unwrap_or_default().to_string();
    if !m.wait {
        print(j, &acc, |_| format!("moving {} to {}: migration {id}", m.route.vm, m.route.to));
        return Ok(());
    }
    let bar = (!j && std::io::stdout().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:>24} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {elapsed}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let m_info: MigrationInfo = loop {
        let v = api.call("GET", &format!("/v1/migrations/{id}"), None).await?;
        let info: MigrationInfo = serde_json::from_value(v).map_err(|e| Fail::Refused(format!("bad answer: {e}")))?;
        if let Some(b) = &bar {
            b.set_length(info.guest_bytes.max(1));
            b.set_position(info.transferred_bytes.min(info.guest_bytes));
            b.set_message(format!("{} round {} exp. {:.0} ms", info.status, info.round, info.expected_downtime_ms));
        }
        if info.is_final() {
            break info;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let out = json!({
        "id": m_info.id,
        "vm": m_info.vm,
        "to": m.route.to,
        "status": m_info.status,
        "verified": m_info.verified,
        "total_ms": m_info.total_ms,
        "downtime_ms": m_info.downtime_ms,
        "transferred_bytes": m_info.transferred_bytes,
        "encryption": m_info.encryption,
        "error": m_info.error,
        "kind": m_info.kind,
        "disks": m_info.stats.as_ref().and_then(|s| s.get("disks")).cloned().unwrap_or_else(|| json!([])),
    });
    print(j, &out, |_| match m_info.status.as_str() {
        "completed" => format!(
            "moved {} to {}: total {:.0} ms, downtime {:.1} ms, verified {}, encryption {}",
            m_info.vm,
            m.route.to,
            m_info.total_ms.unwrap_or(0.0),
            m_info.downtime_ms.unwrap_or(0.0),
            m_info.verified,
            m_info.encryption.as_deref().unwrap_or("-")
        ),
        s => format!(
            "{} not moved ({s}): {}; it keeps running here",
            m_info.vm,
            m_info.error.clone().unwrap_or_default()
        ),
    });
    if m_info.status == "completed" {
        Ok(())
    } else {
        Err(Fail::Failed(String::new()))
    }
}

async fn do_move_storage(api: &Api, j: bool, vm: &str, path: &std::path::Path, wait: bool) -> Result<(), Fail> {
    // A relative path means the caller's directory, not the agent's.
    let dir = std::path::absolute(path).map_err(|e| Fail::Refused(format!("{}: {e}", path.display())))?;
    let body = serde_json::to_value(MoveStorageRequest { path: dir.display().to_string() })
        .map_err(|e| Fail::Refused(e.to_string()))?;
    let acc = api.call("POST", &format!("/v1/vms/{vm}/move-storage"), Some(body)).await?;
    let id = acc.get("id").and_then(Value::as_str).unwrap_or_default().to_string();
    if !wait {
        print(j, &acc, |_| format!("moving the disks of {vm} to {}: migration {id}", dir.display()));
        return Ok(());
    }
    let info: MigrationInfo = loop {
        let v = api.call("GET", &format!("/v1/migrations/{id}"), None).await?;
        let info: MigrationInfo = serde_json::from_value(v).map_err(|e| Fail::Refused(format!("bad answer: {e}")))?;
        if info.is_final() {
            break info;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let disks = info.stats.as_ref().and_then(|s| s.get("disks")).cloned().unwrap_or(Value::Null);
    let out = json!({
        "id": info.id, "vm": info.vm, "path": dir, "status": info.status, "total_ms": info.total_ms,
        "downtime_ms": info.downtime_ms, "transferred_bytes": info.transferred_bytes, "disks": disks,
        "error": info.error,
    });
    print(j, &out, |_| match info.status.as_str() {
        "completed" => format!(
            "moved the disks of {vm} to {}: total {:.0} ms, pause {:.2} ms, {:.1} MiB copied",
            dir.display(),
            info.total_ms.unwrap_or(0.0),
            info.downtime_ms.unwrap_or(0.0),
            mib(info.transferred_bytes)
        ),
        s => format!(
            "disks of {vm} not moved ({s}): {}; it keeps its original files",
            info.error.clone().unwrap_or_default()
        ),
    });
    if info.status == "completed" {
        Ok(())
    } else {
        Err(Fail::Failed(String::new()))
    }
}

fn main() -> ExitCode {
    let c = Cli::parse();
    let j = c.json;
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(c)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail::Failed(why)) => {
            if !why.is_empty() {
                eprintln!("ferry: {why}");
            }
            ExitCode::from(1)
        }
        Err(Fail::Incompatible) => ExitCode::from(2),
        Err(Fail::Refused(why)) => {
            if j {
                println!("{}", json!({"error": why}));
            }
            eprintln!("ferry: {why}");
            ExitCode::from(2)
        }
    }
}
