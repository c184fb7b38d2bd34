//! Pairing: which local interface talks to which remote interface, in what order.
//!
//! Two interfaces pair when they have addresses in the same subnet (each address inside the
//! other's prefix). Each local and each remote interface carries at most one path.
//!
//! - Without configuration (SMB3's rule): interfaces that are up and running and not loopback
//!   pair; paths are grouped by link speed class (the slower end's speed; unknown is the lowest
//!   class) and only the fastest class is used. The rest are listed in [`Plan::slower`].
//! - With configuration: only the configured networks, in priority order, whatever their
//!   speed (loopback allowed when named). A configured network that cannot be used is listed
//!   in [`Plan::unusable`] (or, with a strict policy, is an error); it is never replaced by
//!   another network.

use std::net::{IpAddr, SocketAddr};

use crate::error::{McError, Result};
use crate::iface::{IfAddr, Interface};
use crate::policy::{Network, NetworkPolicy, Unusable, UnusableReason};

/// One pair of interfaces that reach each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedPath {
    /// Local interface.
    pub local_if: String,
    /// Local address (bound by the path's channels).
    pub local: IpAddr,
    /// Remote interface.
    pub remote_if: String,
    /// Remote address (the channels connect to it).
    pub remote: IpAddr,
    /// Link speed of the path (the slower end), Mbit/s, where known.
    pub speed_mbps: Option<u32>,
    /// Both ends RDMA-capable.
    pub rdma: bool,
    /// Priority (lower first; 0 without configuration).
    pub priority: u32,
    /// Channels to open on this path (channel 0 included when it runs here).
    pub channels: u16,
}

/// One channel of a session: where it goes and what it binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelSpec {
    /// Channel index in the session.
    pub index: u16,
    /// Index into [`Plan::paths`]; `None` for channel 0 when the first address is on no path.
    pub path: Option<usize>,
    /// Destination address.
    pub remote: SocketAddr,
    /// Local address bound (port 0), if any.
    pub local: Option<SocketAddr>,
    /// Interface bound (`SO_BINDTODEVICE`), if any.
    pub device: Option<String>,
}

/// The outcome of pairing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Paths to use, best first.
    pub paths: Vec<PlannedPath>,
    /// Configured networks that cannot be used. The caller must report them.
    pub unusable: Vec<Unusable>,
    /// Paths that reach the peer but were left out as slower than the fastest class.
    pub slower: Vec<PlannedPath>,
    /// The session's channels, filled in by [`crate::open_session`] (empty from [`plan`]).
    pub channels: Vec<ChannelSpec>,
    /// Channels also bind their interface.
    pub bind_device: bool,
    /// Channels per path (from the policy); with no path at all, channel 0's route gets this many.
    pub channels_per_path: u16,
}

struct Candidate<'a> {
    l: &'a Interface,
    la: IfAddr,
    r: &'a Interface,
    ra: IfAddr,
}

fn link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_link_local() || a.is_unspecified(),
        IpAddr::V6(a) => (a.segments()[0] & 0xffc0) == 0xfe80 || a.is_unspecified(),
    }
}

/// All address pairs of `l` x `remote` that reach each other, IPv4 first.
fn candidates<'a>(l: &'a Interface, remote: &'a [Interface]) -> Vec<Candidate<'a>> {
    let mut out = Vec::new();
    for v4 in [true, false] {
        for la in l.addrs.iter().filter(|a| a.ip.is_ipv4() == v4 && !link_local(a.ip)) {
            for r in remote {
                for ra in &r.addrs {
                    if ra.ip != la.ip && la.contains(ra.ip) && ra.contains(la.ip) {
                        out.push(Candidate { l, la: *la, r, ra: *ra });
                    }
                }
            }
        }
    }
    out
}

fn path_speed(a: Option<u32>, b: Option<u32>) -> Option<u32> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

fn path_of(c: &Candidate<'_>, priority: u32, channels: u16) -> PlannedPath {
    PlannedPath {
        local_if: c.l.name.clone(),
        local: c.la.ip,
        remote_if: c.r.name.clone(),
        remote: c.ra.ip,
        speed_mbps: path_speed(c.l.speed_mbps, c.r.speed_mbps),
        rdma: c.l.rdma && c.r.rdma,
        priority,
        channels,
    }
}

/// Pair `local` with `remote` under `policy`.
///
/// Errors: with a configured policy, when no configured network is usable (or, if the policy is
/// strict, when any is not). Without configuration an empty plan is not an error: the session
/// then runs on channel 0 alone.
pub fn plan(local: &[Interface], remote: &[Interface], policy: &NetworkPolicy) -> Result<Plan> {
    let cpp = policy.channels_per_path.max(1);
    let mut used_local: Vec<&str> = Vec::new();
    let mut used_remote: Vec<&str> = Vec::new();
    let mut out = Plan { bind_device: policy.bind_device, channels_per_path: cpp, ..Plan::default() };
    if !policy.configured() {
        let mut all = Vec::new();
        for l in local.iter().filter(|l| l.usable() && !l.loopback) {
            let pick = candidates(l, remote)
                .into_iter()
                .find(|c| c.r.usable() && !c.r.loopback && !used_remote.contains(&c.r.name.as_str()));
            if let Some(c) = pick {
                used_remote.push(&c.r.name);
                all.push(path_of(&c, 0, cpp));
            }
        }
        // Fastest class first (unknown speed is the lowest class); stable, so local order stays.
        all.sort_by_key(|p| std::cmp::Reverse(p.speed_mbps));
        let best = all.first().map(|p| p.speed_mbps);
        let (fast, slow): (Vec<_>, Vec<_>) = all.into_iter().partition(|p| Some(p.speed_mbps) == best);
        out.paths = fast;
        out.slower = slow;
        return Ok(out);
    }
    let mut entries: Vec<_> = policy.networks.iter().collect();
    entries.sort_by_key(|e| e.priority); // stable: equal priorities keep their written order
    for e in entries {
        let net = &e.network;
        let mine: Vec<&Interface> =
            local.iter().filter(|l| l.addrs.iter().any(|a| net.matches(&l.name, a.ip))).collect();
        let mine = if mine.is_empty() {
            // An interface named by the policy but without addresses is "down" if it exists.
            match net {
                Network::Interface(n) => match local.iter().find(|l| &l.name == n) {
                    Some(l) if !l.usable() => {
                        out.unusable.push(Unusable {
                            network: net.clone(),
                            reason: UnusableReason::InterfaceDown(vec![l.name.clone()]),
                        });
                        continue;
                    }
                    _ => Vec::new(),
                },
                Network::Subnet(_) => Vec::new(),
            }
        } else {
            mine
        };
        if mine.is_empty() {
            out.unusable.push(Unusable { network: net.clone(), reason: UnusableReason::NoLocalAddress });
            continue;
        }
        let up: Vec<&Interface> = mine.iter().copied().filter(|l| l.usable()).collect();
        if up.is_empty() {
            let names = mine.iter().map(|l| l.name.clone()).collect();
            out.unusable.push(Unusable { network: net.clone(), reason: UnusableReason::InterfaceDown(names) });
            continue;
        }
        let mut found_any = false;
        let mut peer_down: Vec<String> = Vec::new();
        let mut added = 0;
        for l in up {
            let cands: Vec<Candidate<'_>> =
                candidates(l, remote).into_iter().filter(|c| net.matches(&l.name, c.la.ip)).collect();
            found_any |= !cands.is_empty();
            for c in cands.iter().filter(|c| !c.r.usable()) {
                if !peer_down.contains(&c.r.name) {
                    peer_down.push(c.r.name.clone());
                }
            }
            if used_local.contains(&l.name.as_str()) {
                continue; // an earlier (higher-priority) entry already uses this interface
            }
            if let Some(c) = cands.iter().find(|c| c.r.usable() && !used_remote.contains(&c.r.name.as_str())) {
                used_local.push(&l.name);
                used_remote.push(&c.r.name);
                out.paths.push(path_of(c, e.priority, cpp));
                added += 1;
            }
        }
        if added == 0 && !out.paths.iter().any(|p| net.matches(&p.local_if, p.local)) {
            let reason = if found_any && !peer_down.is_empty() {
                UnusableReason::PeerInterfaceDown(peer_down)
            } else {
                UnusableReason::NoPeerAddress
            };
            out.unusable.push(Unusable { network: net.clone(), reason });
        }
    }
    if out.paths.is_empty() || (policy.strict && !out.unusable.is_empty()) {
        return Err(McError::Unusable(out.unusable));
    }
    Ok(out)
}

impl std::fmt::Display for Plan {
    /// One line per path, then the unusable networks and the paths left out as slower.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, p) in self.paths.iter().enumerate() {
            let speed = p.speed_mbps.map_or("speed unknown".to_string(), |s| format!("{s} Mbit/s"));
            writeln!(
                f,
                "path {i}: {} {} -> {} {} ({speed}, priority {}, {} channel(s){})",
                p.local_if,
                p.local,
                p.remote_if,
                p.remote,
                p.priority,
                p.channels,
                if p.rdma { ", rdma" } else { "" }
            )?;
        }
        for u in &self.unusable {
            writeln!(f, "unusable: {u}")?;
        }
        for p in &self.slower {
            writeln!(f, "slower, not used: {} {} -> {} {}", p.local_if, p.local, p.remote_if, p.remote)?;
        }
        Ok(())
    }
}

impl Plan {
    /// Lay out the session's channels: channel 0 is the one already open from `ch0_local` to
    /// `first` (it counts as one of its path's channels when `first` is on a path); the others
    /// go to each path's remote address at `port`, bound to the path's local address, path by
    /// path in plan order. An unspecified `ch0_local` (a wildcard-bound UDP socket: `quic`) says
    /// nothing about the path, as `None`.
    pub fn channel_specs(&self, first: SocketAddr, ch0_local: Option<SocketAddr>, port: u16) -> Vec<ChannelSpec> {
        let p0 = self.paths.iter().position(|p| {
            p.remote == first.ip() && !matches!(ch0_local, Some(a) if !a.ip().is_unspecified() && a.ip() != p.local)
        });
        let mut out = vec![ChannelSpec { index: 0, path: p0, remote: first, local: ch0_local, device: None }];
        for (i, p) in self.paths.iter().enumerate() {
            let n = p.channels.max(1) - u16::from(p0 == Some(i));
            for _ in 0..n {
                out.push(ChannelSpec {
                    index: out.len() as u16,
                    path: Some(i),
                    remote: SocketAddr::new(p.remote, port),
                    local: Some(SocketAddr::new(p.local, 0)),
                    device: self.bind_device.then(|| p.local_if.clone()),
                });
            }
        }
        if self.paths.is_empty() {
            for _ in 1..self.channels_per_path.max(1) {
                let local = ch0_local.map(|a| SocketAddr::new(a.ip(), 0));
                out.push(ChannelSpec { index: out.len() as u16, path: None, remote: first, local, device: None });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic(name: &str, addr: &str, speed: Option<u32>) -> Interface {
        let (ip, prefix) = addr.split_once('/').unwrap();
        Interface {
            name: name.into(),
            addrs: vec![IfAddr { ip: ip.parse().unwrap(), prefix: prefix.parse().unwrap() }],
            speed_mbps: speed,
            mtu: Some(1500),
            up: true,
            running: true,
            loopback: false,
            rdma: false,
        }
    }

    fn lo() -> Interface {
        Interface { loopback: true, ..nic("lo", "127.0.0.1/8", None) }
    }

    fn hosts(n: usize, speeds: &[Option<u32>]) -> (Vec<Interface>, Vec<Interface>) {
        let mut s = vec![lo()];
        let mut d = vec![lo()];
        for i in 0..n {
            let sp = speeds.get(i).copied().flatten();
            s.push(nic(&format!("nic{i}"), &format!("198.18.{i}.1/24"), sp));
            d.push(nic(&format!("nic{i}"), &format!("198.18.{i}.2/24"), sp));
        }
        (s, d)
    }

    fn pairs(p: &Plan) -> Vec<(String, String, String)> {
        p.paths.iter().map(|p| (p.local_if.clone(), p.remote.to_string(), p.remote_if.clone())).collect()
    }

    fn pol(s: &str) -> NetworkPolicy {
        s.parse().unwrap()
    }

    #[test]
    fn unconfigured_pairs_same_subnets_and_skips_loopback() {
        let (s, d) = hosts(3, &[Some(10000); 3]);
        let p = plan(&s, &d, &NetworkPolicy::default()).unwrap();
        assert_eq!(
            pairs(&p),
            (0..3).map(|i| (format!("nic{i}"), format!("198.18.{i}.2"), format!("nic{i}"))).collect::<Vec<_>>()
        );
        assert!(p.unusable.is_empty() && p.slower.is_empty());
        assert!(p.paths.iter().all(|x| x.speed_mbps == Some(10000) && x.channels == 1));
        assert!(p
            .to_string()
            .starts_with("path 0: nic0 198.18.0.1 -> nic0 198.18.0.2 (10000 Mbit/s, priority 0, 1 channel(s))\n"));
    }

    #[test]
    fn unconfigured_uses_only_the_fastest_class() {
        let (s, mut d) = hosts(3, &[Some(1000), Some(25000), None]);
        d[2].speed_mbps = Some(10000); // nic1 on the peer is slower: the path runs at 10 G
        let p = plan(&s, &d, &NetworkPolicy::default()).unwrap();
        assert_eq!(p.paths.len(), 1);
        assert_eq!(p.paths[0].local_if, "nic1");
        assert_eq!(p.paths[0].speed_mbps, Some(10000));
        let slower: Vec<_> = p.slower.iter().map(|x| (x.local_if.as_str(), x.speed_mbps)).collect();
        assert_eq!(slower, vec![("nic0", Some(1000)), ("nic2", None)]);
    }

    #[test]
    fn down_interfaces_do_not_pair_and_nothing_shared_is_an_empty_plan() {
        let (mut s, d) = hosts(2, &[]);
        s[1].running = false;
        let p = plan(&s, &d, &NetworkPolicy::default()).unwrap();
        assert_eq!(pairs(&p), vec![("nic1".into(), "198.18.1.2".into(), "nic1".into())]);
        let other = vec![nic("eth0", "10.0.0.1/24", None)];
        assert!(plan(&other, &d, &NetworkPolicy::default()).unwrap().paths.is_empty());
    }

    #[test]
    fn policy_restricts_and_orders() {
        let (s, d) = hosts(3, &[]);
        let p = plan(&s, &d, &pol("198.18.2.0/24:1,198.18.0.0/24:2")).unwrap();
        assert_eq!(
            pairs(&p),
            vec![
                ("nic2".into(), "198.18.2.2".into(), "nic2".into()),
                ("nic0".into(), "198.18.0.2".into(), "nic0".into())
            ]
        );
        assert_eq!(p.paths.iter().map(|x| x.priority).collect::<Vec<_>>(), vec![1, 2]);
        // By interface name, and loopback when named.
        let p = plan(&s, &d, &pol("nic1")).unwrap();
        assert_eq!(pairs(&p), vec![("nic1".into(), "198.18.1.2".into(), "nic1".into())]);
        let mut d2 = d.clone();
        d2[0] = Interface { addrs: vec![IfAddr { ip: "127.0.0.2".parse().unwrap(), prefix: 8 }], ..lo() };
        let p = plan(&s, &d2, &pol("lo")).unwrap();
        assert_eq!(pairs(&p), vec![("lo".into(), "127.0.0.2".into(), "lo".into())]);
    }

    #[test]
    fn unusable_networks_are_reported_never_replaced() {
        let (mut s, mut d) = hosts(3, &[]);
        let p = plan(&s, &d, &pol("198.18.1.0/24:1,198.19.9.0/24:2")).unwrap();
        assert_eq!(pairs(&p).len(), 1);
        assert_eq!(p.unusable.len(), 1);
        assert_eq!(p.unusable[0].reason, UnusableReason::NoLocalAddress);
        assert!(p.unusable[0].to_string().starts_with("198.19.9.0/24: no local address"));
        // Local interface down.
        s[1].up = false;
        let e = plan(&s, &d, &pol("198.18.0.0/24")).unwrap_err();
        assert!(
            matches!(&e, McError::Unusable(u) if u[0].reason == UnusableReason::InterfaceDown(vec!["nic0".into()]))
        );
        assert!(e.to_string().contains("local interface down (nic0)"), "{e}");
        s[1].up = true;
        // Peer has no address there / its interface is down.
        d.retain(|i| i.name != "nic2");
        d[2].running = false; // nic1
        let p = plan(&s, &d, &pol("nic0,nic1,nic2,nic9")).unwrap();
        assert_eq!(pairs(&p).len(), 1);
        let r: Vec<_> = p.unusable.iter().map(|u| u.reason.clone()).collect();
        assert_eq!(
            r,
            vec![
                UnusableReason::PeerInterfaceDown(vec!["nic1".into()]),
                UnusableReason::NoPeerAddress,
                UnusableReason::NoLocalAddress
            ]
        );
        // Strict: any unusable network is an error.
        let strict = NetworkPolicy { strict: true, ..pol("nic0,nic9") };
        assert!(matches!(plan(&s, &d, &strict), Err(McError::Unusable(u)) if u.len() == 1));
    }

    #[test]
    fn channel_specs_keep_channel_zero_on_the_first_address() {
        let (s, d) = hosts(3, &[]);
        let p = plan(&s, &d, &NetworkPolicy::default().with_channels_per_path(2).unwrap()).unwrap();
        let first: SocketAddr = "198.18.1.2:7000".parse().unwrap();
        let specs = p.channel_specs(first, Some("198.18.1.1:40000".parse().unwrap()), 7000);
        assert_eq!(specs.len(), 6);
        assert_eq!(specs[0].path, Some(1));
        let per: Vec<_> = specs.iter().map(|c| (c.index, c.path, c.remote.to_string())).collect();
        assert_eq!(per[1], (1, Some(0), "198.18.0.2:7000".into()));
        assert_eq!(per[3], (3, Some(1), "198.18.1.2:7000".into()));
        assert_eq!(specs[5].local, Some("198.18.2.1:0".parse().unwrap()));
        // Channel 0 on a wildcard-bound socket (quic) still counts as its path's channel, as tcp's
        // does: the session opens as many connections over either backend.
        let specs = p.channel_specs(first, Some("0.0.0.0:40000".parse().unwrap()), 7000);
        assert_eq!(specs.len(), 6);
        assert_eq!(specs[0].path, Some(1));
        // Channel 0 bound to another local address is not the path's.
        let specs = p.channel_specs(first, Some("10.9.9.9:40000".parse().unwrap()), 7000);
        assert_eq!(specs.len(), 7);
        assert_eq!(specs[0].path, None);
        // A first address on no path: channel 0 is extra.
        let specs = p.channel_specs("10.1.1.1:7000".parse().unwrap(), None, 7001);
        assert_eq!(specs.len(), 7);
        assert_eq!(specs[0].path, None);
        assert!(specs[1..].iter().all(|c| c.remote.port() == 7001 && c.device.is_none()));
        // No path at all: channel 0's route carries channels_per_path channels.
        let none = Plan { channels_per_path: 3, ..Plan::default() };
        let specs = none.channel_specs("10.1.1.1:7000".parse().unwrap(), Some("10.1.1.9:5555".parse().unwrap()), 1);
        let got: Vec<_> =
            specs.iter().map(|c| (c.index, c.remote.to_string(), c.local.map(|a| a.to_string()))).collect();
        assert_eq!(
            got,
            vec![
                (0, "10.1.1.1:7000".into(), Some("10.1.1.9:5555".into())),
                (1, "10.1.1.1:7000".into(), Some("10.1.1.9:0".into())),
                (2, "10.1.1.1:7000".into(), Some("10.1.1.9:0".into())),
            ]
        );
    }
}
