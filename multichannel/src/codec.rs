//! The interface exchange on channel 0: wire encoding (pure, every length capped).
//!
//! Right after channel 0's handshake, before the migration protocol's `Prepare`, the two hosts
//! trade their interface lists in transport `Control` frames:
//!
//! ```text
//!  source                                             destination
//!    | handshake (channel 0: session S, index 0)           |
//!    |<===================================================>|
//!    | Offer(version, source interfaces)                   |
//!    |---------------------------------------------------->|
//!    |        Answer(version, listen port, dst interfaces) |
//!    |        | Refuse(reason)                             |
//!    |<----------------------------------------------------|
//!    | plan paths; open channels 1.. (session S, bound to  |
//!    | the planned local addresses, to <dst addr>:port)    |
//!    |====================================================>|
//!    | Prepare ... (migration protocol)                    |
//! ```
//!
//! Every message starts with a tag in `0x40..=0x4f` (the migration protocol uses small tags
//! from 1 up, so neither side can mistake one for the other), then the magic `FMCX` and the
//! version byte. Integers are little-endian.
//!
//! ```text
//!  message   = tag:u8 "FMCX" version:u8 body
//!  Offer     (0x41) body = list
//!  Answer    (0x42) body = port:u16 list
//!  Refuse    (0x43) body = len:u16 utf8[len]                 (len <= MAX_REASON)
//!  list      = count:u16 interface[count]                    (count <= MAX_INTERFACES)
//!  interface = len:u8 utf8[len] flags:u8 [speed_mbps:u32] [mtu:u32] naddr:u8 addr[naddr]
//!              (1 <= len <= MAX_NAME, naddr <= MAX_ADDRS; speed present iff flags & HAS_SPEED,
//!               mtu iff flags & HAS_MTU; unknown flag bits are an error)
//!  addr      = 4 a:[u8;4] prefix:u8 (<= 32) | 6 a:[u8;16] prefix:u8 (<= 128)
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::error::CodecError;
use crate::iface::{IfAddr, Interface};

/// Version of the exchange this build speaks.
pub const EXCHANGE_VERSION: u8 = 1;
/// Magic after the tag.
pub const MAGIC: [u8; 4] = *b"FMCX";
/// Tag of the source's offer.
pub const TAG_OFFER: u8 = 0x41;
/// Tag of the destination's answer.
pub const TAG_ANSWER: u8 = 0x42;
/// Tag of a refusal.
pub const TAG_REFUSE: u8 = 0x43;
/// Most interfaces in a list.
pub const MAX_INTERFACES: usize = 1024;
/// Most addresses per interface.
pub const MAX_ADDRS: usize = 64;
/// Longest interface name in bytes.
pub const MAX_NAME: usize = 64;
/// Longest refusal reason in bytes.
pub const MAX_REASON: usize = 1024;

const F_UP: u8 = 1;
const F_RUNNING: u8 = 2;
const F_LOOPBACK: u8 = 4;
const F_RDMA: u8 = 8;
const F_HAS_SPEED: u8 = 16;
const F_HAS_MTU: u8 = 32;
const F_ALL: u8 = 63;

/// A message of the interface exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExchangeMsg {
    /// Source: its interfaces.
    Offer {
        /// The source's interfaces.
        interfaces: Vec<Interface>,
    },
    /// Destination: its interfaces and the port it accepts further channels on.
    Answer {
        /// Port of the destination's listener (on every address).
        port: u16,
        /// The destination's interfaces.
        interfaces: Vec<Interface>,
    },
    /// Either side: no exchange, with a reason.
    Refuse(String),
}

/// Whether `msg` is (claims to be) an exchange message rather than a migration message.
pub fn is_exchange(msg: &[u8]) -> bool {
    msg.first().is_some_and(|t| (0x40..=0x4f).contains(t)) && msg.get(1..5) == Some(&MAGIC[..])
}

impl ExchangeMsg {
    /// Encode. Fails only if a list is beyond the caps (a reason is cut to fit instead).
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        let mut v = Vec::with_capacity(64);
        let tag = match self {
            ExchangeMsg::Offer { .. } => TAG_OFFER,
            ExchangeMsg::Answer { .. } => TAG_ANSWER,
            ExchangeMsg::Refuse(_) => TAG_REFUSE,
        };
        v.push(tag);
        v.extend_from_slice(&MAGIC);
        v.push(EXCHANGE_VERSION);
        match self {
            ExchangeMsg::Offer { interfaces } => put_list(&mut v, interfaces)?,
            ExchangeMsg::Answer { port, interfaces } => {
                v.extend_from_slice(&port.to_le_bytes());
                put_list(&mut v, interfaces)?;
            }
            ExchangeMsg::Refuse(r) => {
                let mut cut = r.len().min(MAX_REASON);
                while !r.is_char_boundary(cut) {
                    cut -= 1;
                }
                v.extend_from_slice(&(cut as u16).to_le_bytes());
                v.extend_from_slice(&r.as_bytes()[..cut]);
            }
        }
        Ok(v)
    }

    /// Decode, checking every field and cap; never panics.
    pub fn decode(b: &[u8]) -> Result<Self, CodecError> {
        let mut r = Reader(b);
        let tag = r.u8()?;
        if !(0x40..=0x4f).contains(&tag) {
            return Err(CodecError::NotExchange(tag));
        }
        if r.take(4)? != MAGIC {
            return Err(CodecError::BadMagic);
        }
        let version = r.u8()?;
        if version != EXCHANGE_VERSION {
            return Err(CodecError::UnsupportedVersion(version));
        }
        let m = match tag {
            TAG_OFFER => ExchangeMsg::Offer { interfaces: get_list(&mut r)? },
            TAG_ANSWER => {
                let port = r.u16()?;
                if port == 0 {
                    return Err(CodecError::Invalid("port 0"));
                }
                ExchangeMsg::Answer { port, interfaces: get_list(&mut r)? }
            }
            TAG_REFUSE => {
                let n = usize::from(r.u16()?);
                cap("refusal reason", n, MAX_REASON)?;
                let s = std::str::from_utf8(r.take(n)?).map_err(|_| CodecError::Invalid("reason is not UTF-8"))?;
                ExchangeMsg::Refuse(s.to_string())
            }
            t => return Err(CodecError::UnknownTag(t)),
        };
        if !r.0.is_empty() {
            return Err(CodecError::Trailing(r.0.len()));
        }
        Ok(m)
    }
}

/// Encode an interface list alone (`count` then the interfaces; for tools and tests).
pub fn encode_list(list: &[Interface]) -> Result<Vec<u8>, CodecError> {
    let mut v = Vec::new();
    put_list(&mut v, list)?;
    Ok(v)
}

/// Decode an interface list alone (the whole of `b`).
pub fn decode_list(b: &[u8]) -> Result<Vec<Interface>, CodecError> {
    let mut r = Reader(b);
    let l = get_list(&mut r)?;
    if !r.0.is_empty() {
        return Err(CodecError::Trailing(r.0.len()));
    }
    Ok(l)
}

fn cap(what: &'static str, len: usize, cap: usize) -> Result<(), CodecError> {
    if len > cap {
        return Err(CodecError::TooLong { what, len, cap });
    }
    Ok(())
}

fn put_list(v: &mut Vec<u8>, list: &[Interface]) -> Result<(), CodecError> {
    cap("interfaces", list.len(), MAX_INTERFACES)?;
    v.extend_from_slice(&(list.len() as u16).to_le_bytes());
    for i in list {
        let name = i.name.as_bytes();
        if name.is_empty() {
            return Err(CodecError::Invalid("empty interface name"));
        }
        cap("interface name", name.len(), MAX_NAME)?;
        cap("addresses of an interface", i.addrs.len(), MAX_ADDRS)?;
        v.push(name.len() as u8);
        v.extend_from_slice(name);
        let mut f = 0u8;
        for (on, bit) in [
            (i.up, F_UP),
            (i.running, F_RUNNING),
            (i.loopback, F_LOOPBACK),
            (i.rdma, F_RDMA),
            (i.speed_mbps.is_some(), F_HAS_SPEED),
            (i.mtu.is_some(), F_HAS_MTU),
        ] {
            if on {
                f |= bit;
            }
        }
        v.push(f);
        if let Some(s) = i.speed_mbps {
            v.extend_from_slice(&s.to_le_bytes());
        }
        if let Some(m) = i.mtu {
            v.extend_from_slice(&m.to_le_bytes());
        }
        v.push(i.addrs.len() as u8);
        for a in &i.addrs {
            match a.ip {
                IpAddr::V4(ip) => {
                    if a.prefix > 32 {
                        return Err(CodecError::Invalid("IPv4 prefix beyond 32"));
                    }
                    v.push(4);
                    v.extend_from_slice(&ip.octets());
                }
                IpAddr::V6(ip) => {
                    if a.prefix > 128 {
                        return Err(CodecError::Invalid("IPv6 prefix beyond 128"));
                    }
                    v.push(6);
                    v.extend_from_slice(&ip.octets());
                }
            }
            v.push(a.prefix);
        }
    }
    Ok(())
}

fn get_list(r: &mut Reader<'_>) -> Result<Vec<Interface>, CodecError> {
    let n = usize::from(r.u16()?);
    cap("interfaces", n, MAX_INTERFACES)?;
    // Each interface takes at least 4 bytes: never reserve more than the input can hold.
    let mut out = Vec::with_capacity(n.min(r.0.len() / 4));
    for _ in 0..n {
        let len = usize::from(r.u8()?);
        if len == 0 {
            return Err(CodecError::Invalid("empty interface name"));
        }
        cap("interface name", len, MAX_NAME)?;
        let name = std::str::from_utf8(r.take(len)?).map_err(|_| CodecError::Invalid("interface name is not UTF-8"))?;
        let f = r.u8()?;
        if f & !F_ALL != 0 {
            return Err(CodecError::Invalid("unknown interface flags"));
        }
        let speed_mbps = if f & F_HAS_SPEED != 0 { Some(r.u32()?) } else { None };
        let mtu = if f & F_HAS_MTU != 0 { Some(r.u32()?) } else { None };
        let na = usize::from(r.u8()?);
        cap("addresses of an interface", na, MAX_ADDRS)?;
        let mut addrs = Vec::with_capacity(na.min(r.0.len() / 6));
        for _ in 0..na {
            let (ip, max) = match r.u8()? {
                4 => {
                    let b = r.take(4)?;
                    (IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])), 32)
                }
                6 => {
                    let mut o = [0u8; 16];
                    o.copy_from_slice(r.take(16)?);
                    (IpAddr::V6(Ipv6Addr::from(o)), 128)
                }
                _ => return Err(CodecError::Invalid("address family")),
            };
            let prefix = r.u8()?;
            if prefix > max {
                return Err(CodecError::Invalid("prefix longer than the address"));
            }
            addrs.push(IfAddr { ip, prefix });
        }
        out.push(Interface {
            name: name.to_string(),
            addrs,
            speed_mbps,
            mtu,
            up: f & F_UP != 0,
            running: f & F_RUNNING != 0,
            loopback: f & F_LOOPBACK != 0,
            rdma: f & F_RDMA != 0,
        });
    }
    Ok(out)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if self.0.len() < n {
            return Err(CodecError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, CodecError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, CodecError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_addr() -> impl Strategy<Value = IfAddr> {
        prop_oneof![
            (any::<u32>(), 0u8..=32).prop_map(|(a, p)| IfAddr { ip: IpAddr::V4(Ipv4Addr::from(a)), prefix: p }),
            (any::<u128>(), 0u8..=128).prop_map(|(a, p)| IfAddr { ip: IpAddr::V6(Ipv6Addr::from(a)), prefix: p }),
        ]
    }

    fn arb_iface() -> impl Strategy<Value = Interface> {
        (
            "[a-z][a-z0-9.@-]{0,14}",
            proptest::collection::vec(arb_addr(), 0..5),
            proptest::option::of(any::<u32>()),
            proptest::option::of(any::<u32>()),
            any::<[bool; 4]>(),
        )
            .prop_map(|(name, addrs, speed_mbps, mtu, f)| Interface {
                name,
                addrs,
                speed_mbps,
                mtu,
                up: f[0],
                running: f[1],
                loopback: f[2],
                rdma: f[3],
            })
    }

    fn arb_msg() -> impl Strategy<Value = ExchangeMsg> {
        let list = || proptest::collection::vec(arb_iface(), 0..8);
        prop_oneof![
            list().prop_map(|interfaces| ExchangeMsg::Offer { interfaces }),
            (1u16.., list()).prop_map(|(port, interfaces)| ExchangeMsg::Answer { port, interfaces }),
            "\\PC{0,40}".prop_map(ExchangeMsg::Refuse),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(m in arb_msg()) {
            let b = m.encode().unwrap();
            prop_assert!(is_exchange(&b));
            prop_assert_eq!(ExchangeMsg::decode(&b).unwrap(), m);
        }

        #[test]
        fn garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = ExchangeMsg::decode(&b);
            let _ = decode_list(&b);
        }

        #[test]
        fn every_truncation_is_an_error(m in arb_msg()) {
            let b = m.encode().unwrap();
            for cut in 0..b.len() {
                prop_assert!(ExchangeMsg::decode(&b[..cut]).is_err());
            }
        }

        #[test]
        fn bit_flips_never_panic(m in arb_msg(), at in any::<usize>(), bit in 0u8..8) {
            let mut b = m.encode().unwrap();
            let i = at % b.len();
            b[i] ^= 1 << bit;
            let _ = ExchangeMsg::decode(&b);
        }
    }

    fn lo() -> Interface {
        Interface {
            name: "lo".into(),
            addrs: vec![IfAddr { ip: IpAddr::V4(Ipv4Addr::LOCALHOST), prefix: 8 }],
            speed_mbps: None,
            mtu: Some(65536),
            up: true,
            running: true,
            loopback: true,
            rdma: false,
        }
    }

    #[test]
    fn layout_is_stable() {
        let b = ExchangeMsg::Offer { interfaces: vec![lo()] }.encode().unwrap();
        let want: &[u8] = &[
            0x41,
            b'F',
            b'M',
            b'C',
            b'X',
            1, // tag, magic, version
            1,
            0, // one interface
            2,
            b'l',
            b'o', // name
            F_UP | F_RUNNING | F_LOOPBACK | F_HAS_MTU,
            0,
            0,
            1,
            0, // mtu 65536
            1,
            4,
            127,
            0,
            0,
            1,
            8, // 127.0.0.1/8
        ];
        assert_eq!(b, want);
        assert_eq!(decode_list(&encode_list(&[lo()]).unwrap()).unwrap(), vec![lo()]);
    }

    #[test]
    fn bad_input_gets_clear_errors() {
        // Migration protocol messages (tags 1..=11) are recognised as not ours.
        assert_eq!(ExchangeMsg::decode(&[1, 1, 0]), Err(CodecError::NotExchange(1)));
        assert!(!is_exchange(&[1, 1, 0]));
        assert_eq!(ExchangeMsg::decode(&[]), Err(CodecError::Truncated));
        assert_eq!(ExchangeMsg::decode(b"\x41FMCY\x01\0\0"), Err(CodecError::BadMagic));
        assert_eq!(ExchangeMsg::decode(b"\x41FMCX\x02\0\0"), Err(CodecError::UnsupportedVersion(2)));
        assert_eq!(ExchangeMsg::decode(b"\x4fFMCX\x01"), Err(CodecError::UnknownTag(0x4f)));
        assert_eq!(ExchangeMsg::decode(b"\x41FMCX\x01\0\0\0"), Err(CodecError::Trailing(1)));
        assert_eq!(
            ExchangeMsg::decode(b"\x41FMCX\x01\xff\xff"),
            Err(CodecError::TooLong { what: "interfaces", len: 0xffff, cap: MAX_INTERFACES })
        );
        assert_eq!(ExchangeMsg::decode(b"\x42FMCX\x01\0\0\0\0"), Err(CodecError::Invalid("port 0")));
        // A prefix beyond the address length.
        let mut b = ExchangeMsg::Offer { interfaces: vec![lo()] }.encode().unwrap();
        *b.last_mut().unwrap() = 33;
        assert_eq!(ExchangeMsg::decode(&b), Err(CodecError::Invalid("prefix longer than the address")));
        // Unknown flags.
        let mut b = ExchangeMsg::Offer { interfaces: vec![lo()] }.encode().unwrap();
        b[11] |= 0x80;
        assert_eq!(ExchangeMsg::decode(&b), Err(CodecError::Invalid("unknown interface flags")));
    }

    #[test]
    fn encoder_enforces_caps() {
        let many = vec![lo(); MAX_INTERFACES + 1];
        assert!(matches!(ExchangeMsg::Offer { interfaces: many }.encode(), Err(CodecError::TooLong { .. })));
        let long = Interface { name: "x".repeat(MAX_NAME + 1), ..lo() };
        assert!(ExchangeMsg::Offer { interfaces: vec![long] }.encode().is_err());
        let r = ExchangeMsg::Refuse("é".repeat(MAX_REASON)).encode().unwrap();
        let ExchangeMsg::Refuse(back) = ExchangeMsg::decode(&r).unwrap() else { panic!() };
        assert!(back.len() <= MAX_REASON && back.chars().all(|c| c == 'é'));
    }
}
