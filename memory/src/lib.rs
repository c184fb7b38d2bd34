//! ferry-memory: guest memory, everything Ferry does with it, and the rules for touching it.
//!
//! - [`map`]: a guest's memory as guest-physical regions ([`MemoryMap`]) and the traits a channel
//!   reads pages from ([`MemorySource`]) and writes pages into ([`MemorySink`]).
//! - [`anon`]: anonymous host memory ([`AnonMemory`]), what the synthetic and KVM guests run on.
//! - [`volatile`]: [`VolatileSlice`], a borrowed view of guest memory, and the raw helpers the
//!   hot paths use (zero check, volatile copy).
//! - [`reserve`]: destination memory faulted in before migrations arrive.
//! - [`scan`]: one pass over a page: zero or not, and its hash.
//! - [`digest`]: the image digest over every page's hash, kept up to date as pages change.
//!
//! # Ownership: a map cannot outlive its memory
//!
//! Every [`MemoryMap`] built by safe code holds a counted handle (an `Arc`) to the mappings its
//! regions point into; a mapping is unmapped when its last handle drops. A VM hands out maps
//! that share its mappings, so a map kept after its VM is gone still reads valid memory (the
//! memory stays mapped until the map drops too), and no safe call sequence reaches unmapped
//! memory. This is rust-vmm's `GuestMemoryMmap`/`Arc<GuestRegionMmap>` design; a map that borrowed
//! the VM would fight the engine, which shares one map between its sender and receiver threads.
//! Clone a map per thread or per batch, never per page (a clone is one `Arc` increment per
//! region).
//!
//! Foreign memory (a VMM's own mappings) enters through one door: [`MemoryMap::new`] and
//! [`MemoryMap::with_owner`] are `unsafe fn`s whose callers promise the regions stay mapped.
//!
//! ```
//! use std::sync::Arc;
//! use ferry_memory::{AnonMemory, PAGE_SIZE};
//!
//! let mem = Arc::new(AnonMemory::new(4 * PAGE_SIZE, false)?);
//! mem.write_from(PAGE_SIZE, &[7u8; 8]);
//! let map = mem.map_at(0x10_0000)?;
//! drop(mem); // the map still holds the mapping
//! let page = map.lookup(0x10_0000 + PAGE_SIZE as u64, PAGE_SIZE).expect("inside the map");
//! assert_eq!(page.read_u8(0), 7);
//! # Ok::<(), ferry_memory::MemoryError>(())
//! ```
//!
//! A map's pointers are only reachable through borrows of it: [`MemoryMap::lookup`] returns a
//! [`VolatileSlice`] that borrows the map, so it cannot be kept past the map:
//!
//! ```compile_fail
//! use std::sync::Arc;
//! use ferry_memory::{AnonMemory, PAGE_SIZE};
//!
//! let map = Arc::new(AnonMemory::new(PAGE_SIZE, false).unwrap()).map_at(0).unwrap();
//! let page = map.lookup(0, PAGE_SIZE).unwrap();
//! drop(map); // error[E0505]: cannot move out of `map` because it is borrowed
//! page.read_u8(0);
//! ```
//!
//! # Access: volatile, never a reference
//!
//! Guest memory is shared with agents Rust does not see: the source's guest writes it while its
//! pages are sent, the kernel fills it from a socket (`readv`), an RDMA device writes it. So
//! Ferry never forms a `&[u8]` or `&mut [u8]` over guest memory. It is read and written only
//! through raw pointers, the way rust-vmm's `VolatileSlice` does:
//!
//! - volatile loads and stores (word by word where aligned), or bulk copies through raw pointers
//!   into and out of Ferry's own buffers;
//! - or the pointer handed to the kernel (`readv`/`writev`, `madvise`) or registered with a
//!   device (RDMA), for no longer than the map or slice it came from lives.
//!
//! A read that races a write returns some mix of old and new bytes; that is never undefined
//! behaviour for Ferry because no reference exists to be invalidated, and the engine handles it:
//! a page the guest wrote during a send is dirty again and is re-sent and re-hashed in a later
//! round. On the destination the guest is not running and, within a round, every page arrives in
//! at most one batch, so receivers never race one another (the engine's `ferry_migrate::target`
//! says why its image check can rely on that, and how it seals memory before the check).
//!
//! One exception, on the destination only: a sealed channel (`ferry_transport::crypto`) reads a
//! batch's encrypted pages straight into the guest pages they belong to and decrypts (or
//! authenticates) them there, in place, which the AES-GCM implementation does through a
//! `&mut [u8]` over those pages for the length of the call. That is sound for the reason above:
//! the destination's guest is not running and no other receiver writes the pages of a batch
//! while it is being received, so nothing else reads or writes them while the slice exists.
//!
//! Every `unsafe` function and block in this crate and in the transport's send/receive paths
//! refers to this contract instead of restating it.

pub mod anon;
pub mod digest;
pub mod map;
pub mod reserve;
pub mod scan;
pub mod size;
pub mod volatile;

pub use anon::AnonMemory;
pub use map::{MemoryError, MemoryMap, MemorySink, MemorySource, NoSink, Region};
pub use volatile::VolatileSlice;

/// Size of a guest page (the unit of dirty tracking, transfer and hashing).
pub const PAGE_SIZE: usize = 4096;
