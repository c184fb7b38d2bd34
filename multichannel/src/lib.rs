//! ferry-multichannel: sessions of many channels over many NICs (SMB3-multichannel style).
//!
//! - [`iface`]: interface discovery ([`discover`]): names, addresses with prefixes, link speed,
//!   MTU, up/running, loopback, RDMA capability.
//! - [`codec`]: the versioned wire encoding of interface lists and the exchange messages that
//!   run on channel 0 right after its handshake, before the migration protocol (pure, capped,
//!   fuzzed by proptest; its module docs hold the sequence diagram and the layout).
//! - [`policy`]: the operator's [`NetworkPolicy`] (subnets or interfaces with priorities).
//! - [`plan`](mod@plan): pairing of interfaces that reach each other into a [`Plan`] of paths.
//! - [`session`]: [`open_session`] (source), [`answer_session`] / [`server_exchange`] and
//!   [`Admission`] (destination).
//!
//! Not here yet: scheduling batches over the channels and failover (the engine, `ferry-migrate`,
//! does these with the channels and plan this crate hands it).

pub mod codec;
pub mod error;
pub mod iface;
pub mod plan;
pub mod policy;
pub mod session;

pub use codec::{is_exchange, ExchangeMsg};
pub use error::{CodecError, McError, Result};
pub use iface::{discover, IfAddr, Interface};
pub use plan::{plan, ChannelSpec, Plan, PlannedPath};
pub use policy::{Network, NetworkPolicy, PolicyEntry, Unusable, UnusableReason};
pub use session::{
    answer_session, client_exchange, client_exchange_within, open_session, open_session_with, server_exchange,
    server_exchange_within, Admission, PeerAnswer,
};
