//! The operator's say over migration networks: which subnets or interfaces, in what order.
//!
//! A policy string lists entries separated by commas, each a subnet or an interface name with an
//! optional priority after the last colon (lower goes first; without one, an entry's position):
//!
//! ```
//! use ferry_multichannel::NetworkPolicy;
//! let p: NetworkPolicy = "198.18.1.0/24:1, 198.18.2.0/24:2, nic3:3, fd00:1::/64".parse().unwrap();
//! assert_eq!(p.networks.len(), 4);
//! assert!("198.18.1.7/24".parse::<NetworkPolicy>().is_err()); // host bits set
//! ```

use std::net::IpAddr;

use crate::error::{McError, Result};
use crate::iface::{same_prefix, IfAddr};

/// A network an operator names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// Every local address inside this subnet (host bits zero).
    Subnet(IfAddr),
    /// The addresses of one local interface.
    Interface(String),
}

impl Network {
    /// Whether a local address on interface `ifname` belongs to this network.
    pub fn matches(&self, ifname: &str, ip: IpAddr) -> bool {
        match self {
            Network::Subnet(s) => same_prefix(s.ip, ip, s.prefix),
            Network::Interface(n) => n == ifname,
        }
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Network::Subnet(s) => write!(f, "{s}"),
            Network::Interface(n) => write!(f, "interface {n}"),
        }
    }
}

/// One configured network with its priority (lower is preferred).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyEntry {
    /// The network.
    pub network: Network,
    /// Priority: lower goes first.
    pub priority: u32,
}

/// Most entries a policy may have.
pub const MAX_ENTRIES: usize = 64;
/// Most channels per path.
pub const MAX_CHANNELS_PER_PATH: u16 = 16;

/// How a session may use the networks the two hosts share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkPolicy {
    /// Configured networks. Empty: pair every interface pair that reaches each other, using only
    /// the fastest speed class found (loopback and down interfaces are skipped).
    pub networks: Vec<PolicyEntry>,
    /// Channels per path (1 by default; more for links one TCP stream cannot fill).
    pub channels_per_path: u16,
    /// Unusable configured networks are an error instead of a list in the plan.
    pub strict: bool,
    /// Bind channels to their interface (`SO_BINDTODEVICE`, needs CAP_NET_RAW) as well as to
    /// their local address.
    pub bind_device: bool,
}

impl Default for NetworkPolicy {
    fn default() -> Self {
        Self { networks: Vec::new(), channels_per_path: 1, strict: false, bind_device: false }
    }
}

fn bad(input: &str, reason: impl Into<String>) -> McError {
    McError::Policy { input: input.to_string(), reason: reason.into() }
}

fn parse_entry(part: &str, position: usize) -> Result<PolicyEntry> {
    // The priority follows the last colon when what follows it is a number; an IPv6 subnet has
    // colons too, but its last part is `/len` (or hex digits before the slash).
    let (net, prio) = match part.rsplit_once(':') {
        Some((n, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !n.ends_with(':') => {
            let prio = p.parse::<u32>().map_err(|_| bad(part, "priority is not a number below 2^32"))?;
            (n.trim(), Some(prio))
        }
        _ => (part, None),
    };
    let network = if let Some((ip, len)) = net.split_once('/') {
        let ip: IpAddr = ip.trim().parse().map_err(|_| bad(part, format!("{ip:?} is not an IP address")))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = len
            .trim()
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| bad(part, format!("prefix length {len:?} is not 0..={max}")))?;
        let s = IfAddr { ip, prefix };
        let network_addr = mask(ip, prefix);
        if network_addr != ip {
            return Err(bad(part, format!("host bits set (did you mean {network_addr}/{prefix}?)")));
        }
        Network::Subnet(s)
    } else {
        if net.parse::<IpAddr>().is_ok() {
            return Err(bad(part, "an address needs a prefix length (like 198.18.1.0/24)"));
        }
        let ok = !net.is_empty()
            && net.len() <= 15
            && net.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b));
        if !ok {
            return Err(bad(part, "neither a subnet (a.b.c.d/len) nor an interface name (1-15 of a-z 0-9 . _ - @)"));
        }
        Network::Interface(net.to_string())
    };
    Ok(PolicyEntry { network, priority: prio.unwrap_or(position as u32 + 1) })
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let m = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix.min(32))) };
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = if prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(prefix.min(128))) };
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

impl std::str::FromStr for NetworkPolicy {
    type Err = McError;

    /// Parse the networks list (see the module docs); the other fields keep their defaults.
    fn from_str(s: &str) -> Result<Self> {
        let mut networks: Vec<PolicyEntry> = Vec::new();
        let s = s.trim();
        if !s.is_empty() {
            for (i, part) in s.split(',').enumerate() {
                let part = part.trim();
                if part.is_empty() {
                    return Err(bad(s, format!("empty entry at position {}", i + 1)));
                }
                if i >= MAX_ENTRIES {
                    return Err(bad(s, format!("more than {MAX_ENTRIES} entries")));
                }
                let e = parse_entry(part, i)?;
                if networks.iter().any(|o| o.network == e.network) {
                    return Err(bad(part, "listed twice"));
                }
                networks.push(e);
            }
        }
        Ok(Self { networks, ..Self::default() })
    }
}

impl NetworkPolicy {
    /// Same policy with `n` channels per path (1..=[`MAX_CHANNELS_PER_PATH`]).
    pub fn with_channels_per_path(mut self, n: u16) -> Result<Self> {
        if n == 0 || n > MAX_CHANNELS_PER_PATH {
            return Err(bad(&n.to_string(), format!("channels per path must be 1..={MAX_CHANNELS_PER_PATH}")));
        }
        self.channels_per_path = n;
        Ok(self)
    }

    /// Whether the operator configured networks.
    pub fn configured(&self) -> bool {
        !self.networks.is_empty()
    }
}

/// Why a configured network cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnusableReason {
    /// No local interface has an address in it (or no interface has that name).
    NoLocalAddress,
    /// Local interfaces in it are all down (names listed).
    InterfaceDown(Vec<String>),
    /// The peer has no usable address in it that a local address reaches.
    NoPeerAddress,
    /// The peer's interfaces in it are all down (names listed).
    PeerInterfaceDown(Vec<String>),
    /// Channels on it could not be opened.
    ConnectFailed(String),
}

/// A configured network that the plan could not use, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unusable {
    /// The network as configured.
    pub network: Network,
    /// Why.
    pub reason: UnusableReason,
}

impl std::fmt::Display for Unusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: ", self.network)?;
        match &self.reason {
            UnusableReason::NoLocalAddress => write!(f, "no local address in it"),
            UnusableReason::InterfaceDown(n) => write!(f, "local interface down ({})", n.join(", ")),
            UnusableReason::NoPeerAddress => write!(f, "the peer has no reachable address in it"),
            UnusableReason::PeerInterfaceDown(n) => write!(f, "the peer's interface is down ({})", n.join(", ")),
            UnusableReason::ConnectFailed(e) => write!(f, "connecting failed: {e}"),
        }
    }
}

impl Unusable {
    /// All of them on one line.
    pub fn list(u: &[Unusable]) -> String {
        if u.is_empty() {
            return "no usable network".into();
        }
        u.iter().map(|x| x.to_string()).collect::<Vec<_>>().join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<NetworkPolicy> {
        s.parse()
    }

    #[test]
    fn parses_subnets_interfaces_and_priorities() {
        let x = p("198.18.2.0/24:2, 198.18.1.0/24:1,nic3, fd00:1::/64:7, fd00:2::/64").unwrap();
        let n: Vec<(String, u32)> = x.networks.iter().map(|e| (e.network.to_string(), e.priority)).collect();
        assert_eq!(
            n,
            vec![
                ("198.18.2.0/24".into(), 2),
                ("198.18.1.0/24".into(), 1),
                ("interface nic3".into(), 3),
                ("fd00:1::/64".into(), 7),
                ("fd00:2::/64".into(), 5),
            ]
        );
        assert_eq!(x.channels_per_path, 1);
        assert!(!p("").unwrap().configured());
        assert!(p("  ").unwrap().networks.is_empty());
        assert!(Network::Subnet(IfAddr { ip: "198.18.1.0".parse().unwrap(), prefix: 24 })
            .matches("any", "198.18.1.9".parse().unwrap()));
    }

    #[test]
    fn bad_input_gets_clear_errors() {
        let msg = |s: &str| p(s).unwrap_err().to_string();
        assert!(msg("198.18.1.5/24").contains("did you mean 198.18.1.0/24"), "{}", msg("198.18.1.5/24"));
        assert!(msg("198.18.1.0/33").contains("prefix length"));
        assert!(msg("198.18.1.0/24:x").contains("prefix length"), "{}", msg("198.18.1.0/24:x"));
        assert!(msg("198.18.1.0/24:99999999999").contains("priority"));
        assert!(msg("198.18.1.0").contains("needs a prefix"));
        assert!(msg("300.1.1.0/24").contains("not an IP address"));
        assert!(msg("a,,b").contains("empty entry"));
        assert!(msg("nic1,nic1").contains("twice"));
        assert!(msg("this-name-is-far-too-long").contains("interface name"));
        assert!(msg("eth 0").contains("interface name"));
        let many = (0..=MAX_ENTRIES).map(|i| format!("n{i}")).collect::<Vec<_>>().join(",");
        assert!(msg(&many).contains("entries"));
        assert!(NetworkPolicy::default().with_channels_per_path(0).is_err());
        assert_eq!(NetworkPolicy::default().with_channels_per_path(4).unwrap().channels_per_path, 4);
    }
}
