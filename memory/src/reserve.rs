//! Destination memory made ready before migrations arrive.
//!
//! Receiving into fresh anonymous memory makes the kernel allocate and zero every page on the
//! receive path. On the hosts we measured this costs more than the transfer itself: 0.15-1.5 s per
//! GiB, because freed memory goes back to the hypervisor (free page reporting) and each first
//! touch faults there too (see `docs/performance.md`). A host agent that expects
//! incoming VMs keeps a [`MemoryReserve`]: memory mapped and faulted in ahead of time (zero, with
//! huge pages where the kernel gives them), from which a new target's regions are carved. That is
//! what QEMU's `-incoming` with `-mem-prealloc` does for one VM, kept for the next ones.
//!
//! Carved memory is never handed out twice: a taken range belongs to the VM and is unmapped with
//! it, so everything in the reserve is zero and the destination-zeroed round 0 stays valid. A
//! refill thread (nice 19, 2 MiB at a time, so a running migration keeps the CPU) tops the
//! reserve back up.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::anon::AnonMemory;
use crate::map::MemoryError;
use crate::PAGE_SIZE;

/// Huge page size: takes are rounded to it so every carved region starts 2 MiB aligned.
const HUGE: usize = 2 << 20;
/// Largest slab one refill step maps (smaller slabs give back the CPU sooner).
const SLAB: usize = 256 << 20;

/// Counters of a reserve.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReserveStats {
    /// Bytes ready now.
    pub ready_bytes: u64,
    /// Takes served from the reserve.
    pub hits: u64,
    /// Takes that found too little ready memory (the caller maps cold memory instead).
    pub misses: u64,
    /// Bytes faulted in by fills so far.
    pub filled_bytes: u64,
}

struct Inner {
    slabs: Mutex<VecDeque<AnonMemory>>,
    target: usize,
    wake: Condvar,
    stop: AtomicBool,
    hits: AtomicU64,
    misses: AtomicU64,
    filled: AtomicU64,
}

/// Faulted-in, zero memory kept ready for incoming guests.
pub struct MemoryReserve {
    inner: Arc<Inner>,
    refill: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for MemoryReserve {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryReserve").field("target", &self.inner.target).field("stats", &self.stats()).finish()
    }
}

fn round_huge(len: usize) -> usize {
    len.div_ceil(HUGE) * HUGE
}

impl Inner {
    fn ready(&self) -> usize {
        self.slabs.lock().map(|s| s.iter().map(AnonMemory::len).sum()).unwrap_or(0)
    }

    /// Map and fault in one slab if below target; false when at target (or stopping).
    fn fill_step(&self) -> Result<bool, MemoryError> {
        let ready = self.ready();
        if ready >= self.target || self.stop.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let len = round_huge((self.target - ready).min(SLAB));
        let m = AnonMemory::new(len, false)?;
        m.prefault();
        self.filled.fetch_add(len as u64, Ordering::Relaxed);
        if let Ok(mut s) = self.slabs.lock() {
            s.push_back(m);
        }
        Ok(true)
    }
}

/// Move `pieces` (adjacent in the result, in order, `total` bytes) into one fresh range. On
/// failure the pieces are unmapped (the memory is lost to the reserve, never handed out twice).
fn join(pieces: Vec<AnonMemory>, total: usize) -> Option<AnonMemory> {
    let dest = AnonMemory::reserve_range(total).ok()?;
    let base = dest.raw().as_ptr();
    let mut off = 0;
    for p in pieces {
        let n = p.len();
        // SAFETY: `p` is a whole mapping this process owns; the target range lies inside `dest`,
        // which this function owns; MREMAP_FIXED replaces that part of `dest` with `p`'s pages
        // and unmaps `p`'s old range. The result is checked.
        let r = unsafe {
            libc::mremap(
                p.raw().as_ptr() as *mut libc::c_void,
                n,
                n,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                base.add(off) as *mut libc::c_void,
            )
        };
        if r == libc::MAP_FAILED {
            // The kernel may already have unmapped the target slice, leaving a hole in `dest`
            // that another thread could map into: never unmap `dest` then (its pages leak; the
            // remaining pieces, still ours, are unmapped on drop).
            std::mem::forget(dest);
            return None;
        }
        // The pages now live inside dest: p's old range is gone, so p must not unmap it.
        std::mem::forget(p);
        off += n;
    }
    Some(dest)
}

impl MemoryReserve {
    /// A reserve that keeps `bytes` (rounded up to 2 MiB) ready. Nothing is mapped yet: call
    /// [`MemoryReserve::fill`] to fill it now, or [`MemoryReserve::start_refill`].
    pub fn new(bytes: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                slabs: Mutex::new(VecDeque::new()),
                target: round_huge(bytes),
                wake: Condvar::new(),
                stop: AtomicBool::new(false),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                filled: AtomicU64::new(0),
            }),
            refill: Mutex::new(None),
        }
    }

    /// Fill up to the target now, on this thread.
    pub fn fill(&self) -> Result<(), MemoryError> {
        while self.inner.fill_step()? {}
        Ok(())
    }

    /// Keep the reserve filled from a background thread at the lowest priority (it wakes after
    /// each take). Idempotent.
    pub fn start_refill(&self) {
        self.start_filler(false);
    }

    /// Fill up to the target once, from a background thread at the lowest priority, then stop:
    /// later takes are not made up for. Idempotent (and a no-op after [`Self::start_refill`]).
    pub fn start_fill(&self) {
        self.start_filler(true);
    }

    fn start_filler(&self, once: bool) {
        let Ok(mut g) = self.refill.lock() else { return };
        if g.is_some() {
            return;
        }
        let inner = self.inner.clone();
        *g = std::thread::Builder::new()
            .name("ferry-reserve".into())
            .spawn(move || {
                // Lowest normal priority (nice 19) for this thread only: it still gets a little CPU
                // under load, so it never sits preempted inside the kernel for long.
                // SAFETY: gettid has no preconditions; setpriority on our own thread id may fail.
                unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
                while !inner.stop.load(Ordering::SeqCst) {
                    match inner.fill_step() {
                        Ok(true) => continue,
                        Ok(false) if once => return,
                        Ok(false) => {}
                        // Out of memory for now: try again after the next take or a pause.
                        Err(_) => {}
                    }
                    let Ok(g) = inner.slabs.lock() else { return };
                    let _ = inner.wake.wait_timeout(g, std::time::Duration::from_secs(1));
                }
            })
            .ok();
    }

    /// Take `len` bytes (rounded up to pages) of ready memory as one mapping, or `None` if the
    /// reserve holds less (the caller maps cold memory then). The memory is zero and faulted in.
    /// Pieces of several slabs are joined with `mremap`, which moves page tables, not data.
    pub fn take(&self, len: usize) -> Option<AnonMemory> {
        let want = len.div_ceil(PAGE_SIZE).max(1) * PAGE_SIZE;
        let carve = round_huge(want);
        let got = self.inner.slabs.lock().ok().and_then(|mut slabs| {
            if slabs.iter().map(AnonMemory::len).sum::<usize>() < carve {
                return None;
            }
            let mut pieces = Vec::new();
            let mut need = carve;
            while need > 0 {
                let slab = slabs.pop_front()?;
                if slab.len() > need {
                    let (front, rest) = slab.split_at(need);
                    if let Some(r) = rest {
                        slabs.push_front(r);
                    }
                    pieces.push(front);
                    need = 0;
                } else {
                    need -= slab.len();
                    pieces.push(slab);
                }
            }
            let joined = if pieces.len() == 1 { pieces.pop() } else { join(pieces, carve) };
            // The tail past `want` (under 2 MiB) is unmapped here.
            joined.map(|m| m.split_at(want).0)
        });
        match &got {
            Some(_) => self.inner.hits.fetch_add(1, Ordering::Relaxed),
            None => self.inner.misses.fetch_add(1, Ordering::Relaxed),
        };
        self.inner.wake.notify_all();
        got
    }

    /// Counters.
    pub fn stats(&self) -> ReserveStats {
        ReserveStats {
            ready_bytes: self.inner.ready() as u64,
            hits: self.inner.hits.load(Ordering::Relaxed),
            misses: self.inner.misses.load(Ordering::Relaxed),
            filled_bytes: self.inner.filled.load(Ordering::Relaxed),
        }
    }
}

impl Drop for MemoryReserve {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.wake.notify_all();
        if let Some(h) = self.refill.lock().ok().and_then(|mut g| g.take()) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resident(m: &AnonMemory) -> usize {
        let pages = m.len() / PAGE_SIZE;
        let mut v = vec![0u8; pages];
        // SAFETY: the range is m's mapping; mincore writes one byte per page into v.
        let r = unsafe { libc::mincore(m.raw().as_ptr() as *mut libc::c_void, m.len(), v.as_mut_ptr()) };
        assert_eq!(r, 0);
        v.iter().filter(|&&b| b & 1 == 1).count()
    }

    #[test]
    fn takes_are_zero_resident_disjoint_and_accounted() {
        let r = MemoryReserve::new(16 << 20);
        r.fill().unwrap();
        assert_eq!(r.stats().ready_bytes, 16 << 20);
        let a = r.take(3 * PAGE_SIZE + 1).expect("hit");
        assert_eq!(a.len(), 4 * PAGE_SIZE);
        assert_eq!(a.raw().as_ptr() as usize % HUGE, 0, "carved 2 MiB aligned");
        let b = r.take(5 << 20).expect("hit");
        assert_eq!(resident(&b), b.len() / PAGE_SIZE, "taken memory is faulted in");
        let mut buf = vec![0xFFu8; PAGE_SIZE];
        for off in (0..b.len()).step_by(PAGE_SIZE) {
            b.read_into(off, &mut buf);
            assert!(buf.iter().all(|&x| x == 0), "reserve memory is zero");
        }
        a.write_from(0, &[7u8; 8]);
        assert_eq!(b.read_byte(0), 0);
        let (sa, sb) = (a.raw().as_ptr() as usize, b.raw().as_ptr() as usize);
        assert!(sa + a.len() <= sb || sb + b.len() <= sa, "takes overlap");
        // 2 MiB + 6 MiB carved out of 16: 8 MiB left; 9 MiB does not fit.
        assert_eq!(r.stats().ready_bytes, 8 << 20);
        assert!(r.take(9 << 20).is_none());
        let s = r.stats();
        assert_eq!((s.hits, s.misses), (2, 1));
        drop(a);
        drop(b);
        assert!(r.take(8 << 20).is_some());
    }

    #[test]
    fn a_take_larger_than_a_slab_joins_slabs() {
        let r = MemoryReserve::new(SLAB + (8 << 20));
        r.fill().unwrap();
        let n = SLAB + (6 << 20) + PAGE_SIZE;
        let m = r.take(n).expect("hit across slabs");
        assert_eq!(m.len(), n);
        assert_eq!(resident(&m), n / PAGE_SIZE, "joined memory is faulted in");
        // Writable and zero everywhere, across the seam between slabs.
        for off in [0, SLAB - PAGE_SIZE, SLAB, n - PAGE_SIZE] {
            assert_eq!(m.read_byte(off), 0);
            m.write_from(off, &[1u8; 8]);
            assert_eq!(m.read_byte(off), 1);
        }
        assert!(r.take(4 << 20).is_none(), "only 0 bytes should be left");
    }

    #[test]
    fn refill_tops_up_after_a_take() {
        let r = MemoryReserve::new(8 << 20);
        r.start_refill();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while r.stats().ready_bytes < 8 << 20 {
            assert!(std::time::Instant::now() < deadline, "refill never reached the target");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let _m = r.take(6 << 20).expect("hit");
        while r.stats().ready_bytes < 8 << 20 {
            assert!(std::time::Instant::now() < deadline, "refill did not top up after a take");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(r.stats().filled_bytes, 14 << 20);
    }
}
