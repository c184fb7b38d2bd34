//! The dirty-block log of one disk: one bit per block, set by every guest write while logging is
//! on, read and cleared by whoever copies the disk (the local mirror, the shared-nothing
//! sender), as the memory dirty log is.
//!
//! Reading is a transaction ([`DirtyBlocks::take`] returns a [`DirtyTake`]): the blocks taken
//! are the taker's until it calls [`DirtyTake::commit`] once the peer has them; a take that is
//! dropped uncommitted (an error, a cancel, a lost channel) puts its blocks back, so a block can
//! never be lost between two passes. Ordering: the guest writes the data first and marks the
//! block after; a taker clears the bit before it reads the data. A write that races a copy is
//! therefore either in the bytes read or marked again for the next pass.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A set of blocks (one bit per block), as taken from a log or built by hand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockSet {
    blocks: u64,
    bits: Vec<u64>,
}

impl BlockSet {
    /// An empty set over `blocks` blocks.
    pub fn new(blocks: u64) -> Self {
        Self { blocks, bits: vec![0; blocks.div_ceil(64) as usize] }
    }

    /// Blocks the set ranges over.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Add block `b` (ignored past the end).
    pub fn insert(&mut self, b: u64) {
        if b < self.blocks {
            self.bits[(b / 64) as usize] |= 1 << (b % 64);
        }
    }

    /// Is block `b` in the set?
    pub fn contains(&self, b: u64) -> bool {
        b < self.blocks && self.bits[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    /// Blocks in the set.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// No block in the set.
    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|&w| w == 0)
    }

    /// Runs of consecutive blocks as (first, count), in order.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (wi, &w) in self.bits.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let b = wi as u64 * 64 + u64::from(w.trailing_zeros());
                w &= w - 1;
                match out.last_mut() {
                    Some((s, n)) if *s + *n == b => *n += 1,
                    _ => out.push((b, 1)),
                }
            }
        }
        out
    }

    /// The words (bit `i` of word `i / 64`); bits past `blocks` are zero.
    pub fn words(&self) -> &[u64] {
        &self.bits
    }
}

/// The dirty-block log of one disk.
#[derive(Debug)]
pub struct DirtyBlocks {
    blocks: u64,
    bits: Vec<AtomicU64>,
    logging: AtomicBool,
}

impl DirtyBlocks {
    /// A log over `blocks` blocks, not logging.
    pub fn new(blocks: u64) -> Self {
        Self {
            blocks,
            bits: (0..blocks.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            logging: AtomicBool::new(false),
        }
    }

    /// Blocks covered.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Clear every bit and start logging.
    pub fn start(&self) {
        for w in &self.bits {
            w.store(0, Ordering::Relaxed);
        }
        self.logging.store(true, Ordering::SeqCst);
    }

    /// Stop logging (the bits stay until the next start).
    pub fn stop(&self) {
        self.logging.store(false, Ordering::SeqCst);
    }

    /// Is the log on?
    pub fn is_logging(&self) -> bool {
        self.logging.load(Ordering::SeqCst)
    }

    /// Mark blocks `first..first + count` (only while logging; call after the data is written).
    pub fn mark(&self, first: u64, count: u64) {
        if !self.logging.load(Ordering::SeqCst) {
            return;
        }
        self.mark_always(first, count);
    }

    fn mark_always(&self, first: u64, count: u64) {
        let end = (first + count).min(self.blocks);
        for b in first..end {
            self.bits[(b / 64) as usize].fetch_or(1 << (b % 64), Ordering::AcqRel);
        }
    }

    /// Blocks marked now (a snapshot; nothing is cleared).
    pub fn pending(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.load(Ordering::Acquire).count_ones())).sum()
    }

    /// Read and clear every marked block. The blocks return to the log when the take is dropped
    /// without [`DirtyTake::commit`].
    pub fn take(&self) -> DirtyTake<'_> {
        let mut set = BlockSet::new(self.blocks);
        for (d, w) in set.bits.iter_mut().zip(&self.bits) {
            *d = w.swap(0, Ordering::AcqRel);
        }
        DirtyTake { log: self, set: Some(set) }
    }

    /// Read and clear the marked blocks among `first..first + count` (a chunk of a pass).
    pub fn take_range(&self, first: u64, count: u64) -> DirtyTake<'_> {
        let mut set = BlockSet::new(self.blocks);
        let end = (first + count).min(self.blocks);
        let mut b = first;
        while b < end {
            let wi = (b / 64) as usize;
            let lo = b % 64;
            let hi = (end - wi as u64 * 64).min(64);
            let mask = if hi - lo == 64 { u64::MAX } else { ((1u64 << (hi - lo)) - 1) << lo };
            set.bits[wi] |= self.bits[wi].fetch_and(!mask, Ordering::AcqRel) & mask;
            b = wi as u64 * 64 + hi;
        }
        DirtyTake { log: self, set: Some(set) }
    }

    /// Put blocks back (a take's blocks the peer did not get).
    pub fn give_back(&self, set: &BlockSet) {
        for (w, v) in self.bits.iter().zip(&set.bits) {
            if *v != 0 {
                w.fetch_or(*v, Ordering::AcqRel);
            }
        }
    }
}

/// Blocks read and cleared from a [`DirtyBlocks`]: back in the log on drop unless committed.
#[derive(Debug)]
pub struct DirtyTake<'a> {
    log: &'a DirtyBlocks,
    set: Option<BlockSet>,
}

impl DirtyTake<'_> {
    /// The blocks taken.
    pub fn set(&self) -> &BlockSet {
        self.set.as_ref().unwrap_or_else(|| unreachable!("a take holds its set until it is consumed"))
    }

    /// The peer has every block taken: they leave the log for good.
    pub fn commit(mut self) {
        self.set = None;
    }

    /// Put the blocks back now (what dropping does).
    pub fn abort(self) {}
}

impl Drop for DirtyTake<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.set.take() {
            self.log.give_back(&s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_is_a_transaction() {
        let log = DirtyBlocks::new(130); // not a multiple of 64
        log.mark(3, 2);
        assert_eq!(log.pending(), 0, "nothing is marked before the log starts");
        log.start();
        log.mark(3, 2);
        log.mark(129, 5); // clipped at the end
        let t = log.take();
        assert_eq!(t.set().runs(), vec![(3, 2), (129, 1)]);
        assert_eq!(log.pending(), 0, "a take clears");
        log.mark(64, 1); // written while the take is in flight
        drop(t); // the peer did not get them
        let t = log.take();
        assert_eq!(t.set().runs(), vec![(3, 2), (64, 1), (129, 1)], "uncommitted blocks come back, new ones kept");
        t.commit();
        assert_eq!(log.pending(), 0, "committed blocks are gone");
        let t = log.take();
        assert!(t.set().is_empty());
        t.abort();
        assert_eq!(log.pending(), 0);
        log.stop();
        log.mark(1, 1);
        assert_eq!(log.pending(), 0, "no marks after stop");
    }

    #[test]
    fn take_range_takes_only_its_range() {
        let log = DirtyBlocks::new(200);
        log.start();
        for b in [0, 63, 64, 65, 127, 128, 199] {
            log.mark(b, 1);
        }
        let t = log.take_range(63, 66); // 63..129
        assert_eq!(t.set().runs(), vec![(63, 3), (127, 2)]);
        t.commit();
        let t = log.take();
        assert_eq!(t.set().runs(), vec![(0, 1), (199, 1)]);
        t.commit();
        let t = log.take_range(0, 1000);
        assert!(t.set().is_empty());
    }

    #[test]
    fn concurrent_marks_are_never_lost() {
        let log = std::sync::Arc::new(DirtyBlocks::new(1000));
        log.start();
        let w = {
            let log = log.clone();
            std::thread::spawn(move || {
                for i in 0..200_000u64 {
                    log.mark((i * 7) % 1000, 1);
                }
            })
        };
        let mut seen = BlockSet::new(1000);
        while !w.is_finished() {
            let t = log.take();
            for (a, b) in seen.bits.iter_mut().zip(t.set().words()) {
                *a |= b;
            }
            t.commit();
        }
        w.join().unwrap();
        let t = log.take();
        for (a, b) in seen.bits.iter_mut().zip(t.set().words()) {
            *a |= b;
        }
        assert_eq!(seen.count(), 1000, "every block written was seen by some take");
    }
}
