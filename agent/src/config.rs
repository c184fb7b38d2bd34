//! `ferryd`'s configuration file (TOML). A bad file is refused at start with the key and the
//! reason.
//!
//! ```toml
//! name = "host-a"
//! listen = "198.18.0.1:7700"          # peer API and migrations arrive here
//! api_socket = "/run/ferry/ferryd.sock"
//! state_dir = "/var/lib/ferry"
//! key_file = "/etc/ferry/key"         # the same key on every host: 32+ random bytes, hex or base64, mode 0600
//! # tls_dir = "/etc/ferry/tls"        # instead of key_file: host certificates (ca.pem, cert.pem, key.pem 0600[, crl.pem])
//! max_live_migrations = 2             # outgoing and incoming together (default 2)
//! max_storage_migrations = 2          # storage moves (ferry vm move-storage) at once (default 2)
//! performance_option = "tcp"          # tcp | compression | smb (default tcp)
//! use_any_network = false             # default: true while no network is listed
//! shared_storage = "/srv/ferry-shared" # quick moves: a directory both hosts mount at this path
//! disk_dir = "/var/lib/ferry/disks"    # VM disks, one directory per VM (default: STATE_DIR/disks)
//! memory_reserve_bytes = 4294967296   # guest memory kept faulted in for the next incoming VM (default 0: off)
//! max_vm_memory_bytes = 68719476736   # guest memory given to VMs in all (default: what the kernel has available)
//! encryption = "aead"                 # aead | integrity | off (default aead; see below)
//! [[networks]]
//! subnet = "198.18.0.0/24"
//! priority = 1
//! trusted = false                     # integrity/off may be used here (default false)
//! ```
//!
//! `encryption` is how the frames of outgoing live moves are protected
//! ([`ferry_transport::Encryption`]). `aead` (AES-256-GCM, the default) everywhere;
//! `integrity` (authenticated, not encrypted) and `off` (a header CRC only) apply only where the
//! path is trusted on both sides: the destination's address is on a network this host marks
//! `trusted`, and the destination's own address the same there ([`Settings::protection_for`],
//! [`Settings::accepts`]); everywhere else the move uses `aead`. A config asking for `integrity`
//! or `off` without any trusted network is refused at start.
//!
//! Exactly one of `key_file` and `tls_dir` says how hosts prove who they are
//! ([`HostCredentials`]). With `key_file` peer requests are signed with the key
//! ([`crate::peer`]) and migration channels authenticated by it; with `tls_dir` the peer API
//! runs over mutual TLS with the host certificates (a peer whose certificate does not chain to
//! `ca.pem` is refused in the TLS handshake, both ways) and the migration channels use the same
//! certificates ([`ferry_transport::tls`]). The source checks that the destination's
//! certificate names the host it was asked to move to (the host part of the move's `to`); the
//! destination checks that the source's certificate names the host the request comes from
//! (the source's `name`), on the peer API and on the migration channels. The files are read
//! again when they change (checked at each new connection), so a new `crl.pem` or a renewed
//! certificate counts without a restart.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use ferry_transport::handshake::Psk;
use ferry_transport::tls::TlsCredentials;
use ferry_transport::Credentials;
use ferry_transport::Encryption;
use serde::{Deserialize, Serialize};

/// A configuration that cannot be used: which key, and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// Path.
        path: PathBuf,
        /// Error.
        #[source]
        source: std::io::Error,
    },
    /// Not TOML, an unknown key, or a value of the wrong type.
    #[error("{0}")]
    Syntax(String),
    /// A key with a value that cannot be used.
    #[error("{key}: {reason}")]
    Invalid {
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), reason: reason.into() }
}

/// A migration network.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetworkEntry {
    /// `address/prefix`, IPv4 or IPv6.
    pub subnet: String,
    /// Lower is preferred (default 0).
    #[serde(default)]
    pub priority: u32,
    /// The operator trusts this network: moves over it may use `integrity` or `off` (default
    /// false: `aead` only).
    #[serde(default)]
    pub trusted: bool,
}

/// An [`Encryption`] as its name in JSON (`"aead"`, `"integrity"`, `"off"`).
pub mod encryption_name {
    use ferry_transport::Encryption;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialize as the name.
    pub fn serialize<S: Serializer>(m: &Encryption, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(m.as_str())
    }

    /// Parse the name.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Encryption, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// Parse a mode given by a person (config, API), naming the key when it is not one.
pub fn parse_encryption(key: &str, v: &str) -> Result<Encryption, ConfigError> {
    v.parse().map_err(|e: ferry_transport::crypto::UnknownEncryption| invalid(key, e.to_string()))
}

/// The protection a move uses, and why (what preflight and the journal report).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protection {
    /// The mode.
    pub mode: Encryption,
    /// Why this mode, in a sentence.
    pub why: String,
    /// The move asked for it itself (not the host's setting): the destination must accept it
    /// or refuse the move, never fall back to `aead`.
    pub asked: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    name: String,
    listen: String,
    api_socket: PathBuf,
    state_dir: PathBuf,
    key_file: Option<PathBuf>,
    tls_dir: Option<PathBuf>,
    #[serde(default = "two")]
    max_live_migrations: i64,
    #[serde(default = "two")]
    max_storage_migrations: i64,
    #[serde(default)]
    networks: Vec<NetworkEntry>,
    use_any_network: Option<bool>,
    #[serde(default = "tcp")]
    performance_option: String,
    shared_storage: Option<PathBuf>,
    disk_dir: Option<PathBuf>,
    #[serde(default)]
    memory_reserve_bytes: i64,
    max_vm_memory_bytes: Option<i64>,
    encryption: Option<String>,
}

/// Largest `memory_reserve_bytes` (1 TiB).
const MAX_RESERVE_BYTES: i64 = 1 << 40;

fn two() -> i64 {
    2
}

fn tcp() -> String {
    "tcp".into()
}

/// A parsed subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl Subnet {
    /// Parse `a.b.c.d/n` or `x::y/n`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (a, p) = s.split_once('/').ok_or_else(|| format!("{s:?} is not a subnet (like 198.18.0.0/24)"))?;
        let addr: IpAddr = a.parse().map_err(|_| format!("{a:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 =
            p.parse().ok().filter(|n| *n <= max).ok_or_else(|| format!("prefix {p:?} is not 0 ..= {max}"))?;
        Ok(Self { addr, prefix })
    }

    /// Is `ip` inside?
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => {
                let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(self.prefix)) };
                u32::from(n) & mask == u32::from(i) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(i)) => {
                let mask = if self.prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(self.prefix)) };
                u128::from(n) & mask == u128::from(i) & mask
            }
            _ => false,
        }
    }
}

impl Subnet {
    /// The subnet with its host bits cleared.
    pub fn network(&self) -> Subnet {
        let addr = match self.addr {
            IpAddr::V4(a) => {
                let m = if self.prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(self.prefix)) };
                IpAddr::V4((u32::from(a) & m).into())
            }
            IpAddr::V6(a) => {
                let m = if self.prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(self.prefix)) };
                IpAddr::V6((u128::from(a) & m).into())
            }
        };
        Subnet { addr, prefix: self.prefix }
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The host settings an operator may change at run time (`PATCH /v1/host`,
/// `/v1/host/networks`). They start as the config file says; once changed at run time the agent
/// keeps them in its state database, and they win over the file at the next start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Settings {
    /// Live migrations at once, outgoing and incoming together (1 ..= 64).
    pub max_live_migrations: usize,
    /// `tcp`, `compression` or `smb`.
    pub performance_option: String,
    /// Any network may carry migrations; `None`: true while no network is listed.
    pub use_any_network: Option<bool>,
    /// Migration networks (kept sorted by priority).
    pub networks: Vec<NetworkEntry>,
    /// Protection of outgoing live moves' frames (`integrity` and `off` only over trusted
    /// networks; settings kept before this key existed read as `aead`).
    #[serde(default, with = "encryption_name")]
    pub encryption: Encryption,
}

impl Settings {
    /// Check every value; `Err` names the setting and the reason.
    pub fn check(&self) -> Result<(), ConfigError> {
        if !(1..=64).contains(&self.max_live_migrations) {
            return Err(invalid("max_live_migrations", format!("{} is not in 1 ..= 64", self.max_live_migrations)));
        }
        check_option(&self.performance_option)?;
        let mut seen: Vec<Subnet> = Vec::new();
        for (i, n) in self.networks.iter().enumerate() {
            let s = Subnet::parse(&n.subnet).map_err(|r| invalid(&format!("networks[{i}].subnet"), r))?;
            if seen.contains(&s) {
                return Err(invalid(&format!("networks[{i}].subnet"), format!("{s} is listed twice")));
            }
            seen.push(s);
        }
        if self.networks.is_empty() && self.use_any_network == Some(false) {
            return Err(invalid("use_any_network", "is false but no network is listed: no move could ever leave"));
        }
        check_encryption(self.encryption, &self.networks)
    }

    /// The trusted network `ip` is on, if any.
    pub fn trusted_network(&self, ip: IpAddr) -> Option<Subnet> {
        self.networks
            .iter()
            .filter(|n| n.trusted)
            .filter_map(|n| Subnet::parse(&n.subnet).ok())
            .find(|s| s.contains(ip))
    }

    /// Where a move's channels may go, is every network trusted? `multichannel`: channels
    /// open on every network both hosts share, so every listed network must be trusted and
    /// no other allowed; otherwise the network of `ip` (the one address channels go to).
    /// `Ok`: the trusted network(s); `Err`: why not.
    pub fn trusted_path(&self, ip: IpAddr, multichannel: bool) -> Result<String, String> {
        if multichannel {
            if self.any_network() {
                return Err("multichannel moves may take any network here (use_any_network)".into());
            }
            return match self.networks.iter().find(|n| !n.trusted) {
                Some(n) => Err(format!("multichannel moves take every listed network and {} is not trusted", n.subnet)),
                None => Ok(self.networks.iter().map(|n| n.subnet.as_str()).collect::<Vec<_>>().join(", ")),
            };
        }
        self.trusted_network(ip)
            .map(|s| s.to_string())
            .ok_or_else(|| format!("{ip} is on no migration network marked trusted"))
    }

    /// Source side: the protection of a move to `to`. `asked`: the move's own `encryption`
    /// (`None`: this host's setting). A mode other than `aead` needs a trusted path here
    /// ([`Self::trusted_path`]); the move's own request over an untrusted path is an error (the
    /// move is refused), the host's setting falls back to `aead` there. The destination
    /// decides its side ([`Self::accepts`]).
    pub fn protection_for(
        &self,
        asked: Option<Encryption>,
        to: IpAddr,
        multichannel: bool,
        host: &str,
    ) -> Result<Protection, String> {
        let by_move = asked.is_some();
        let mode = asked.unwrap_or(self.encryption);
        let source = if by_move { "asked by the move" } else { "the host's encryption setting" };
        if mode == Encryption::Aead {
            return Ok(Protection { mode, why: format!("aead: {source}"), asked: by_move });
        }
        match self.trusted_path(to, multichannel) {
            Ok(nets) => Ok(Protection {
                mode,
                why: format!("{mode}: {source}; {nets} trusted on host {host} (the destination must trust its side)"),
                asked: by_move,
            }),
            Err(why) if by_move => Err(format!(
                "the move asks for encryption {mode}, but on host {host} {why}: integrity and off are only for \
                 networks the operator marks trusted (network add --trusted)"
            )),
            Err(why) => Ok(Protection {
                mode: Encryption::Aead,
                why: format!("aead: the host's encryption setting is {mode}, but on host {host} {why}"),
                asked: false,
            }),
        }
    }

    /// Destination side: may channels of a move protected with `mode` arrive on `local` (the
    /// address the source reached; `multichannel`: any of this host's networks)? `Err` says why
    /// not. `aead` is always accepted.
    pub fn accepts(&self, mode: Encryption, local: IpAddr, multichannel: bool, host: &str) -> Result<(), String> {
        if mode == Encryption::Aead {
            return Ok(());
        }
        self.trusted_path(local, multichannel).map(|_| ()).map_err(|why| {
            format!("the source asks for encryption {mode}, but on host {host} {why}: only aead is accepted")
        })
    }

    /// Any network allowed: as set, or true while no network is listed.
    pub fn any_network(&self) -> bool {
        self.use_any_network.unwrap_or(self.networks.is_empty())
    }

    /// The networks, parsed, by priority (entries that do not parse are skipped: [`Self::check`]
    /// refuses them before they get here).
    pub fn subnets(&self) -> Vec<(Subnet, u32)> {
        let mut v: Vec<(Subnet, u32)> =
            self.networks.iter().filter_map(|n| Subnet::parse(&n.subnet).ok().map(|s| (s, n.priority))).collect();
        v.sort_by_key(|n| n.1);
        v
    }

    /// The transport option the performance option means.
    pub fn default_transport(&self) -> &'static str {
        if self.performance_option == "compression" {
            "zstd"
        } else {
            "tcp"
        }
    }

    /// `smb`: multichannel over every NIC both hosts share.
    pub fn multichannel(&self) -> bool {
        self.performance_option == "smb"
    }

    /// The migration networks as a `ferry_multichannel::NetworkPolicy` string (`subnet:priority`,
    /// host bits cleared); empty when any network may carry migrations.
    pub fn policy_string(&self) -> String {
        if self.any_network() {
            return String::new();
        }
        let list: Vec<String> = self.subnets().iter().map(|(s, p)| format!("{}:{p}", s.network())).collect();
        list.join(",")
    }

    /// May a migration go to `ip`? `Err` says why not.
    pub fn network_allows(&self, ip: IpAddr) -> Result<(), String> {
        let nets = self.subnets();
        if self.any_network() || nets.iter().any(|(s, _)| s.contains(ip)) {
            return Ok(());
        }
        let list: Vec<String> = nets.iter().map(|(s, _)| s.to_string()).collect();
        if list.is_empty() {
            return Err(format!("{ip}: no migration network is listed and use_any_network is false"));
        }
        Err(format!("{ip} is on none of the migration networks ({}) and use_any_network is false", list.join(", ")))
    }
}

/// `integrity` and `off` need a network the operator marks trusted.
fn check_encryption(mode: Encryption, networks: &[NetworkEntry]) -> Result<(), ConfigError> {
    if mode != Encryption::Aead && !networks.iter().any(|n| n.trusted) {
        return Err(invalid(
            "encryption",
            format!(
                "is {mode} but no migration network is marked trusted: integrity and off are only for networks \
                 the operator marks trusted (networks[].trusted = true)"
            ),
        ));
    }
    Ok(())
}

fn check_option(o: &str) -> Result<(), ConfigError> {
    match o {
        "tcp" | "compression" | "smb" => Ok(()),
        o => Err(invalid("performance_option", format!("{o:?} is not tcp, compression or smb"))),
    }
}

/// How a host proves who it is to its peers: config key `key_file` or `tls_dir`.
#[derive(Debug, Clone)]
pub enum HostCredentials {
    /// The same key on every host.
    Key {
        /// The key file.
        file: PathBuf,
        /// The key (at least 32 random bytes; zeroed when dropped).
        key: Psk,
    },
    /// Host certificates signed by a CA every host trusts.
    Tls {
        /// The directory (`ca.pem`, `cert.pem`, `key.pem`).
        dir: PathBuf,
        /// The loaded certificates (checked: key matches, chained to the CA, valid now).
        creds: TlsCredentials,
    },
}

impl HostCredentials {
    /// Load exactly one of `key_file` and `tls_dir`; `Err` names the key.
    pub fn load(key_file: Option<&Path>, tls_dir: Option<&Path>) -> Result<Self, ConfigError> {
        match (key_file, tls_dir) {
            (Some(_), Some(_)) => Err(invalid(
                "key_file",
                "and tls_dir are both given: a host proves who it is by one of them (remove one)",
            )),
            (None, None) => Err(invalid(
                "key_file",
                "missing: give key_file (a key shared by the hosts) or tls_dir (host certificates)",
            )),
            (Some(file), None) => {
                let key = Psk::from_file(file).map_err(|e| invalid("key_file", e.to_string()))?;
                Ok(Self::Key { file: file.to_path_buf(), key })
            }
            (None, Some(dir)) => {
                if !dir.is_dir() {
                    return Err(invalid("tls_dir", format!("{} is not a readable directory", dir.display())));
                }
                let creds = TlsCredentials::from_dir(dir).map_err(|e| invalid("tls_dir", e.to_string()))?;
                Ok(Self::Tls { dir: dir.to_path_buf(), creds })
            }
        }
    }

    /// `psk` or `tls`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Key { .. } => "psk",
            Self::Tls { .. } => "tls",
        }
    }

    /// What a person reads: `key file PATH` or `host certificates in DIR`.
    pub fn describe(&self) -> String {
        match self {
            Self::Key { file, .. } => format!("key file {}", file.display()),
            Self::Tls { dir, .. } => format!("host certificates in {}", dir.display()),
        }
    }

    /// The arguments that give a VMM process the same credentials (`--key-file F` or
    /// `--tls-dir D`).
    pub fn vmm_args(&self) -> [std::ffi::OsString; 2] {
        match self {
            Self::Key { file, .. } => ["--key-file".into(), file.into()],
            Self::Tls { dir, .. } => ["--tls-dir".into(), dir.into()],
        }
    }

    /// The transport's credentials.
    pub fn transport(&self) -> Credentials {
        match self {
            Self::Key { key, .. } => Credentials::Psk(key.clone()),
            Self::Tls { creds, .. } => Credentials::Tls(creds.clone()),
        }
    }
}

/// A usable configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Host name.
    pub name: String,
    /// Peer API and migration address.
    pub listen: SocketAddr,
    /// Local API socket.
    pub api_socket: PathBuf,
    /// Where the journal, VM sockets and VMM logs live.
    pub state_dir: PathBuf,
    /// How this host proves who it is: the key file or the host certificates.
    pub credentials: HostCredentials,
    /// Live migrations at once, outgoing and incoming together.
    pub max_live_migrations: usize,
    /// Storage migrations at once.
    pub max_storage_migrations: usize,
    /// Migration networks, by priority.
    pub networks: Vec<(Subnet, u32)>,
    /// Of them, the ones marked trusted.
    pub trusted_networks: Vec<Subnet>,
    /// Protection of outgoing live moves (`integrity`/`off` only over trusted networks).
    pub encryption: Encryption,
    /// Any network may carry migrations.
    pub use_any_network: bool,
    /// `use_any_network` as the file says (`None`: not given).
    pub use_any_network_key: Option<bool>,
    /// `tcp` or `compression`.
    pub performance_option: String,
    /// The directory quick moves save VMs to (the same path on every host); `None`: quick moves
    /// are refused.
    pub shared_storage: Option<PathBuf>,
    /// Where VM disks live, one directory per VM (`disk_dir/VM/NAME.img`): created disks, and
    /// the disks of VMs arriving by shared-nothing moves (admitted only with room for them).
    pub disk_dir: PathBuf,
    /// Guest memory a standby VMM process keeps faulted in for the next incoming live migration
    /// (0: none; every incoming VM then maps cold memory and takes its page faults while
    /// receiving).
    pub memory_reserve_bytes: u64,
    /// Guest memory this host gives its VMs in all (running and arriving); an incoming VM that
    /// does not fit is refused (`no_memory`). `None`: only what the kernel has available counts.
    pub max_vm_memory_bytes: Option<u64>,
}

impl Config {
    /// Read and check a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::parse(&text)
    }

    /// Check a configuration (the key file is read too).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text)
            .map_err(|e| ConfigError::Syntax(e.message().to_string() + &span_hint(text, e.span())))?;
        let name = raw.name.trim().to_string();
        if name.is_empty() || name.len() > 64 {
            return Err(invalid("name", "must be 1 ..= 64 characters"));
        }
        let listen: SocketAddr = raw
            .listen
            .parse()
            .map_err(|_| invalid("listen", format!("{:?} is not an address like 198.18.0.1:7700", raw.listen)))?;
        if raw.api_socket.as_os_str().is_empty() {
            return Err(invalid("api_socket", "is empty"));
        }
        if raw.state_dir.as_os_str().is_empty() {
            return Err(invalid("state_dir", "is empty"));
        }
        let credentials = HostCredentials::load(raw.key_file.as_deref(), raw.tls_dir.as_deref())?;
        let limit = |k: &str, v: i64| -> Result<usize, ConfigError> {
            if (1..=64).contains(&v) {
                Ok(v as usize)
            } else {
                Err(invalid(k, format!("{v} is not in 1 ..= 64")))
            }
        };
        let max_live_migrations = limit("max_live_migrations", raw.max_live_migrations)?;
        let max_storage_migrations = limit("max_storage_migrations", raw.max_storage_migrations)?;
        let mut networks = Vec::new();
        let mut trusted_networks = Vec::new();
        for (i, n) in raw.networks.iter().enumerate() {
            let s = Subnet::parse(&n.subnet).map_err(|r| invalid(&format!("networks[{i}].subnet"), r))?;
            networks.push((s, n.priority));
            if n.trusted {
                trusted_networks.push(s);
            }
        }
        let encryption = match &raw.encryption {
            Some(v) => parse_encryption("encryption", v)?,
            None => Encryption::Aead,
        };
        check_encryption(encryption, &raw.networks)?;
        networks.sort_by_key(|n| n.1);
        let use_any_network = raw.use_any_network.unwrap_or(networks.is_empty());
        if networks.is_empty() && !use_any_network {
            return Err(invalid("use_any_network", "is false but no network is listed: no move could ever leave"));
        }
        check_option(&raw.performance_option)?;
        if let Some(d) = &raw.shared_storage {
            if !d.is_absolute() {
                return Err(invalid("shared_storage", format!("{} is not an absolute path", d.display())));
            }
            if !d.is_dir() {
                return Err(invalid("shared_storage", format!("{} is not a directory", d.display())));
            }
        }
        if let Some(d) = &raw.disk_dir {
            if !d.is_absolute() {
                return Err(invalid("disk_dir", format!("{} is not an absolute path", d.display())));
            }
            if !d.is_dir() {
                return Err(invalid("disk_dir", format!("{} is not a directory", d.display())));
            }
        }
        if !(0..=MAX_RESERVE_BYTES).contains(&raw.memory_reserve_bytes) {
            return Err(invalid(
                "memory_reserve_bytes",
                format!("{} is not in 0 ..= {MAX_RESERVE_BYTES} (1 TiB)", raw.memory_reserve_bytes),
            ));
        }
        if let Some(m) = raw.max_vm_memory_bytes.filter(|m| *m < 0) {
            return Err(invalid("max_vm_memory_bytes", format!("{m} is negative")));
        }
        Ok(Self {
            name,
            listen,
            api_socket: raw.api_socket,
            disk_dir: raw.disk_dir.unwrap_or_else(|| raw.state_dir.join("disks")),
            state_dir: raw.state_dir,
            credentials,
            max_live_migrations,
            max_storage_migrations,
            networks,
            trusted_networks,
            encryption,
            use_any_network,
            use_any_network_key: raw.use_any_network,
            performance_option: raw.performance_option,
            shared_storage: raw.shared_storage,
            memory_reserve_bytes: raw.memory_reserve_bytes as u64,
            max_vm_memory_bytes: raw.max_vm_memory_bytes.map(|m| m as u64),
        })
    }

    /// The settings as the file gives them.
    pub fn settings(&self) -> Settings {
        Settings {
            max_live_migrations: self.max_live_migrations,
            performance_option: self.performance_option.clone(),
            use_any_network: self.use_any_network_key,
            networks: self
                .networks
                .iter()
                .map(|(s, p)| NetworkEntry {
                    subnet: s.to_string(),
                    priority: *p,
                    trusted: self.trusted_networks.contains(s),
                })
                .collect(),
            encryption: self.encryption,
        }
    }

    /// The transport option the performance option means.
    pub fn default_transport(&self) -> &'static str {
        if self.performance_option == "compression" {
            "zstd"
        } else {
            "tcp"
        }
    }

    /// May a migration go to `ip`? `Err` says why not.
    pub fn network_allows(&self, ip: IpAddr) -> Result<(), String> {
        self.settings().network_allows(ip)
    }
}

fn span_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(r) => {
            let line = text[..r.start.min(text.len())].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_key(body: &str) -> (tempdir::Dir, String) {
        let d = tempdir::Dir::new();
        let key = d.0.join("key");
        std::fs::write(&key, "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n").unwrap();
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let text = format!(
            "name = \"a\"\nlisten = \"127.0.0.1:7700\"\napi_socket = \"{0}/api.sock\"\nstate_dir = \"{0}\"\nkey_file = \"{1}\"\n{body}",
            d.0.display(),
            key.display()
        );
        (d, text)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "ferry-agent-cfg-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::SeqCst)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Self(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn defaults_follow_the_issue() {
        let (_d, t) = with_key("");
        let c = Config::parse(&t).unwrap();
        assert_eq!(c.max_live_migrations, 2);
        assert_eq!(c.max_storage_migrations, 2);
        assert_eq!(c.default_transport(), "tcp");
        assert!(c.use_any_network, "no network listed: any allowed");
        match &c.credentials {
            HostCredentials::Key { key, .. } => assert_eq!(key.bytes(), (0..32u8).collect::<Vec<u8>>()),
            HostCredentials::Tls { .. } => panic!("key_file gives a key"),
        }
    }

    #[test]
    fn a_listed_network_closes_the_others() {
        let (_d, t) = with_key("[[networks]]\nsubnet = \"198.18.0.0/24\"\npriority = 1\n");
        let c = Config::parse(&t).unwrap();
        assert!(!c.use_any_network);
        assert!(c.network_allows("198.18.0.7".parse().unwrap()).is_ok());
        let e = c.network_allows("10.0.0.1".parse().unwrap()).unwrap_err();
        assert!(e.contains("198.18.0.0/24"), "{e}");
    }

    #[test]
    fn settings_follow_the_file_and_check_changes() {
        let (_d, t) = with_key("[[networks]]\nsubnet = \"198.18.0.0/24\"\npriority = 1\n");
        let c = Config::parse(&t).unwrap();
        let mut s = c.settings();
        s.check().unwrap();
        assert!(!s.any_network() && s.network_allows("198.18.0.9".parse().unwrap()).is_ok());
        assert!(s.network_allows("198.19.0.9".parse().unwrap()).unwrap_err().contains("198.18.0.0/24"));
        s.networks.push(NetworkEntry { subnet: "198.18.0.0/24".into(), priority: 2, trusted: false });
        assert!(s.check().unwrap_err().to_string().contains("listed twice"));
        s.networks.pop();
        s.networks.push(NetworkEntry { subnet: "198.19.0.0/33".into(), priority: 2, trusted: false });
        assert!(s.check().unwrap_err().to_string().starts_with("networks[1].subnet: prefix \"33\""));
        s.networks.clear();
        assert!(s.any_network(), "no network listed and use_any_network not given: any");
        s.use_any_network = Some(false);
        assert!(s.check().unwrap_err().to_string().starts_with("use_any_network"));
    }

    #[test]
    fn bad_values_name_the_key_and_the_reason() {
        let cases = [
            ("max_live_migrations = 0\n", "max_live_migrations: 0 is not in 1 ..= 64"),
            ("[[networks]]\nsubnet = \"198.18.0.0/33\"\n", "networks[0].subnet: prefix \"33\""),
            ("[[networks]]\nsubnet = \"10.0.0.300/8\"\n", "networks[0].subnet: \"10.0.0.300\" is not an IP"),
            ("performance_option = \"fast\"\n", "performance_option: \"fast\" is not"),
            ("colour = \"blue\"\n", "unknown field `colour`"),
            ("shared_storage = \"relative/dir\"\n", "shared_storage: relative/dir is not an absolute path"),
            ("shared_storage = \"/nonexistent/ferry\"\n", "shared_storage: /nonexistent/ferry is not a directory"),
            ("disk_dir = \"disks\"\n", "disk_dir: disks is not an absolute path"),
            ("disk_dir = \"/nonexistent/ferry\"\n", "disk_dir: /nonexistent/ferry is not a directory"),
            ("memory_reserve_bytes = 2199023255552\n", "memory_reserve_bytes: 2199023255552 is not in 0 ..= "),
            ("memory_reserve_bytes = -1\n", "memory_reserve_bytes: -1 is not in 0 ..= "),
            ("max_vm_memory_bytes = -5\n", "max_vm_memory_bytes: -5 is negative"),
            ("encryption = \"rot13\"\n", "encryption: unknown encryption mode \"rot13\""),
            ("encryption = \"off\"\n", "encryption: is off but no migration network is marked trusted"),
            (
                "encryption = \"integrity\"\n[[networks]]\nsubnet = \"198.18.0.0/24\"\n",
                "encryption: is integrity but no migration network is marked trusted",
            ),
        ];
        for (body, want) in cases {
            let (_d, t) = with_key(body);
            let e = Config::parse(&t).unwrap_err().to_string();
            assert!(e.contains(want), "{body:?}: got {e:?}, want {want:?}");
        }
        let e = Config::parse("name = \"a\"\nlisten = \"nowhere\"\napi_socket = \"/x\"\nstate_dir = \"/y\"\nkey_file = \"/nonexistent/key\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("listen: \"nowhere\" is not an address"), "{e}");
    }

    #[test]
    fn integrity_and_off_only_where_both_sides_trust_the_network() {
        let (_d, t) = with_key("");
        assert_eq!(Config::parse(&t).unwrap().settings().encryption, Encryption::Aead, "default");
        let (_d, t) = with_key(
            "encryption = \"off\"\n[[networks]]\nsubnet = \"198.18.0.0/24\"\ntrusted = true\n\
             [[networks]]\nsubnet = \"198.18.1.0/24\"\npriority = 1\n",
        );
        let s = Config::parse(&t).unwrap().settings();
        s.check().unwrap();
        assert_eq!(s.encryption, Encryption::Off);
        let (trusted, untrusted): (IpAddr, IpAddr) = ("198.18.0.2".parse().unwrap(), "198.18.1.2".parse().unwrap());
        // The host's setting: off where trusted, aead elsewhere (with the reason).
        assert_eq!(s.protection_for(None, trusted, false, "a").unwrap().mode, Encryption::Off);
        let p = s.protection_for(None, untrusted, false, "a").unwrap();
        assert_eq!(p.mode, Encryption::Aead);
        assert!(p.why.contains("198.18.1.2 is on no migration network marked trusted") && !p.asked, "{p:?}");
        // The move's own request over an untrusted network is refused, never weakened or widened.
        let e = s.protection_for(Some(Encryption::Integrity), untrusted, false, "a").unwrap_err();
        assert!(e.contains("asks for encryption integrity") && e.contains("198.18.1.2"), "{e}");
        let p = s.protection_for(Some(Encryption::Integrity), trusted, false, "a").unwrap();
        assert!(p.asked && p.mode == Encryption::Integrity, "{p:?}");
        assert_eq!(s.protection_for(Some(Encryption::Aead), untrusted, false, "a").unwrap().mode, Encryption::Aead);
        // Multichannel takes every network: one untrusted network is enough to refuse.
        let e = s.protection_for(Some(Encryption::Off), trusted, true, "a").unwrap_err();
        assert!(e.contains("198.18.1.0/24 is not trusted"), "{e}");
        // The destination: aead always, the others only on a trusted address of its own.
        s.accepts(Encryption::Aead, untrusted, false, "b").unwrap();
        s.accepts(Encryption::Off, trusted, false, "b").unwrap();
        let e = s.accepts(Encryption::Off, untrusted, false, "b").unwrap_err();
        assert!(e.contains("only aead is accepted") && e.contains("host b"), "{e}");
        // Settings kept before the key existed read as aead, networks as untrusted.
        let old: Settings = serde_json::from_str(
            r#"{"max_live_migrations":2,"performance_option":"tcp","use_any_network":null,
                "networks":[{"subnet":"198.18.0.0/24","priority":0}]}"#,
        )
        .unwrap();
        assert_eq!(old.encryption, Encryption::Aead);
        assert!(!old.networks[0].trusted);
        // Removing the last trusted network while the setting is off is refused.
        let mut s2 = s.clone();
        s2.networks.retain(|n| !n.trusted);
        assert!(s2.check().unwrap_err().to_string().starts_with("encryption: is off"), "{s2:?}");
    }
}
