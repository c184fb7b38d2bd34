//! ferry-agent: the host agent (`ferryd`), its CLI (`ferry`) and the per-VM process
//! (`ferry-vmm`).
//!
//! - [`config`]: the TOML configuration, refused at start with the key and the reason.
//! - [`api`]: the HTTP/JSON API's types and routes (local on a unix socket, peer on TCP).
//! - [`daemon`]: the agent: VMs, moves, the host-wide limit, adoption after a restart.
//! - [`limit`]: host-wide slots, FIFO, cancel, admission of incoming migrations.
//! - [`metrics`]: `/metrics` in the Prometheus text format, from the slots and the journal.
//! - [`store`]: SQLite: owned VMs with their epoch, the migration journal.
//! - [`peer`]: signing of peer requests with the hosts' key.
//! - [`vmmctl`]: the agent's protocol with its VMM processes; [`vmm`]: the VMM process.
//! - [`client`]: the HTTP client `ferry` and `ferryd` use.
//!
//! What runs where: the agent decides when a migration may start, asks the destination agent
//! to admit it, and watches it; the engine (`ferry_migrate`) runs in the VMM processes, where
//! the guest memory is. Killing `ferryd` leaves every VMM process running; the next `ferryd`
//! adopts them from the journal.

pub mod api;
pub mod client;
pub mod config;
pub mod daemon;
pub mod limit;
pub mod metrics;
pub mod peer;
pub mod store;
pub mod vmm;
pub mod vmmctl;
