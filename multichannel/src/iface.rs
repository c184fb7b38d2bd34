//! Interface discovery: what networks this host (or network namespace) has.
//!
//! Addresses and flags come from `getifaddrs` (netlink, so they follow the calling thread's
//! network namespace). Link speed, MTU and RDMA capability come from sysfs, which shows the
//! namespace of whoever mounted it: a value is only taken from `/sys/class/net/<if>` when that
//! directory's `ifindex` matches the interface's index in the caller's namespace (a thread that
//! `setns`-ed into another namespace gets `None` rather than another interface's numbers).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use nix::net::if_::InterfaceFlags;

use crate::error::{McError, Result};

/// One address of an interface, with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IfAddr {
    /// The address.
    pub ip: IpAddr,
    /// Prefix length (0..=32 for IPv4, 0..=128 for IPv6).
    pub prefix: u8,
}

impl IfAddr {
    /// Whether `ip` lies in this address's subnet (same family, same first `prefix` bits).
    pub fn contains(&self, ip: IpAddr) -> bool {
        same_prefix(self.ip, ip, self.prefix)
    }
}

impl std::fmt::Display for IfAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix)
    }
}

/// Whether `a` and `b` share their first `prefix` bits (false across families).
pub fn same_prefix(a: IpAddr, b: IpAddr, prefix: u8) -> bool {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let p = u32::from(prefix.min(32));
            let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let p = u32::from(prefix.min(128));
            let mask = if p == 0 { 0 } else { u128::MAX << (128 - p) };
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

/// A network interface as Ferry sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Interface name (`eth0`, `nic1`).
    pub name: String,
    /// IPv4 and IPv6 addresses with prefix lengths.
    pub addrs: Vec<IfAddr>,
    /// Link speed in Mbit/s, where the driver reports one.
    pub speed_mbps: Option<u32>,
    /// MTU in bytes, where known.
    pub mtu: Option<u32>,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// Operationally running, i.e. has carrier (`IFF_RUNNING`).
    pub running: bool,
    /// Loopback interface.
    pub loopback: bool,
    /// An RDMA device sits on this interface (best effort).
    pub rdma: bool,
}

impl Interface {
    /// Up and running: can carry traffic now.
    pub fn usable(&self) -> bool {
        self.up && self.running
    }
}

/// List this host's interfaces (in the calling thread's network namespace), sorted by name.
pub fn discover() -> Result<Vec<Interface>> {
    let mut by_name: BTreeMap<String, Interface> = BTreeMap::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(McError::Discover)? {
        let e = by_name.entry(ifa.interface_name.clone()).or_insert_with(|| Interface {
            name: ifa.interface_name.clone(),
            addrs: Vec::new(),
            speed_mbps: None,
            mtu: None,
            up: false,
            running: false,
            loopback: false,
            rdma: false,
        });
        e.up |= ifa.flags.contains(InterfaceFlags::IFF_UP);
        e.running |= ifa.flags.contains(InterfaceFlags::IFF_RUNNING);
        e.loopback |= ifa.flags.contains(InterfaceFlags::IFF_LOOPBACK);
        let Some(addr) = ifa.address.as_ref() else { continue };
        let mask = ifa.netmask.as_ref();
        let a = if let Some(v4) = addr.as_sockaddr_in() {
            let prefix = mask.and_then(|m| m.as_sockaddr_in()).map_or(32, |m| u32::from(m.ip()).count_ones() as u8);
            IfAddr { ip: IpAddr::V4(v4.ip()), prefix }
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            let prefix = mask.and_then(|m| m.as_sockaddr_in6()).map_or(128, |m| u128::from(m.ip()).count_ones() as u8);
            IfAddr { ip: IpAddr::V6(v6.ip()), prefix }
        } else {
            continue; // link-layer (AF_PACKET) entries only contribute flags
        };
        if !e.addrs.contains(&a) {
            e.addrs.push(a);
        }
    }
    let rdma_netdevs = rdma_netdevs(Path::new("/sys/class/infiniband"));
    let mut out: Vec<Interface> = by_name.into_values().collect();
    for i in &mut out {
        let dir = Path::new("/sys/class/net").join(&i.name);
        if !sysfs_matches(&dir, &i.name) {
            continue;
        }
        i.mtu = read_u64(&dir.join("mtu")).and_then(|v| u32::try_from(v).ok());
        i.speed_mbps = read_speed(&dir.join("speed"));
        i.rdma = rdma_netdevs.contains(&i.name) || dir.join("device/infiniband").is_dir();
    }
    Ok(out)
}

/// Whether sysfs's `dir` describes the interface `name` of the caller's network namespace.
fn sysfs_matches(dir: &Path, name: &str) -> bool {
    let Ok(index) = nix::net::if_::if_nametoindex(name) else { return false };
    read_u64(&dir.join("ifindex")) == Some(u64::from(index))
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// `speed` holds Mbit/s, `-1` (or an error on read) when unknown.
fn read_speed(p: &Path) -> Option<u32> {
    parse_speed(&std::fs::read_to_string(p).ok()?)
}

fn parse_speed(s: &str) -> Option<u32> {
    match s.trim().parse::<i64>() {
        Ok(v) if v > 0 => u32::try_from(v).ok(),
        _ => None,
    }
}

/// Netdev names that an RDMA device's ports name in `gid_attrs/ndevs/*` (RoCE, soft-RoCE).
fn rdma_netdevs(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(devs) = std::fs::read_dir(root) else { return out };
    for dev in devs.flatten() {
        let Ok(ports) = std::fs::read_dir(dev.path().join("ports")) else { continue };
        for port in ports.flatten() {
            let Ok(ndevs) = std::fs::read_dir(port.path().join("gid_attrs/ndevs")) else { continue };
            // Reading a few entries is enough: every GID of a port names the same netdev.
            for nd in ndevs.flatten().take(4) {
                if let Ok(s) = std::fs::read_to_string(nd.path()) {
                    let s = s.trim();
                    if !s.is_empty() && !out.iter().any(|o| o == s) {
                        out.push(s.to_string());
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn loopback_is_found() {
        let l = discover().unwrap();
        let lo = l.iter().find(|i| i.name == "lo").expect("lo is listed");
        assert!(lo.loopback && lo.up);
        assert!(lo.addrs.contains(&IfAddr { ip: IpAddr::V4(Ipv4Addr::LOCALHOST), prefix: 8 }), "{lo:?}");
        assert_eq!(lo.speed_mbps, None); // lo has no speed
        assert_eq!(lo.mtu, Some(65536));
        assert!(!lo.rdma);
        let names: Vec<_> = l.iter().map(|i| i.name.clone()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
    }

    #[test]
    fn speed_parsing() {
        assert_eq!(parse_speed("10000\n"), Some(10000));
        assert_eq!(parse_speed("-1\n"), None);
        assert_eq!(parse_speed("0"), None);
        assert_eq!(parse_speed("garbage"), None);
        assert_eq!(parse_speed("99999999999"), None);
    }

    #[test]
    fn prefixes() {
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(same_prefix(a("198.18.1.1"), a("198.18.1.2"), 24));
        assert!(!same_prefix(a("198.18.1.1"), a("198.18.2.1"), 24));
        assert!(same_prefix(a("10.0.0.1"), a("11.0.0.1"), 0));
        assert!(!same_prefix(a("10.0.0.1"), a("fd00::1"), 0));
        assert!(same_prefix(a("fd00::1"), a("fd00::2"), 64));
        assert!(!same_prefix(a("fd00::1"), a("fd01::2"), 64));
        assert!(same_prefix(a("1.2.3.4"), a("1.2.3.4"), 200)); // clamped
        assert!(IfAddr { ip: a("198.18.0.1"), prefix: 15 }.contains(a("198.19.255.1")));
    }

    #[test]
    fn rdma_scan_of_missing_dir_is_empty() {
        assert!(rdma_netdevs(Path::new("/nonexistent/ferry")).is_empty());
    }
}
