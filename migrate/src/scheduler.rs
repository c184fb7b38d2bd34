//! Host-wide concurrency limit: at most K migrations at once (default 2, like Hyper-V), the rest
//! queued in the order they asked.

use std::sync::{Condvar, Mutex};

/// The host's migration scheduler.
#[derive(Debug)]
pub struct HostScheduler {
    limit: usize,
    state: Mutex<(u64, u64, usize)>, // next ticket, now serving (lowest waiting), active
    cv: Condvar,
}

/// A running slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot<'a> {
    s: &'a HostScheduler,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut g = self.s.state.lock().unwrap_or_else(|e| e.into_inner());
        g.2 -= 1;
        self.s.cv.notify_all();
    }
}

impl Default for HostScheduler {
    fn default() -> Self {
        Self::new(2)
    }
}

impl HostScheduler {
    /// A scheduler allowing `limit` concurrent migrations (at least 1).
    pub fn new(limit: usize) -> Self {
        Self { limit: limit.max(1), state: Mutex::new((0, 0, 0)), cv: Condvar::new() }
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Migrations running now.
    pub fn active(&self) -> usize {
        self.state.lock().map(|g| g.2).unwrap_or(0)
    }

    /// Take a ticket now (fixes the queue position), then wait for a slot in ticket order.
    pub fn ticket(&self) -> u64 {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let t = g.0;
        g.0 += 1;
        t
    }

    /// Wait until `ticket` is first in line and a slot is free.
    pub fn acquire(&self, ticket: u64) -> Slot<'_> {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while !(g.1 == ticket && g.2 < self.limit) {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.1 += 1;
        g.2 += 1;
        self.cv.notify_all();
        Slot { s: self }
    }

    /// Run `f` in a slot (queued in call order).
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        let t = self.ticket();
        let _slot = self.acquire(t);
        f()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Runs 8 holders through a scheduler of `limit`; returns (max concurrent, acquisition order).
    fn run(limit: usize) -> (usize, Vec<u64>) {
        let s = Arc::new(HostScheduler::new(limit));
        let active = Arc::new(AtomicUsize::new(0));
        let max = Arc::new(AtomicUsize::new(0));
        let order = Arc::new(Mutex::new(Vec::new()));
        let tickets: Vec<u64> = (0..8).map(|_| s.ticket()).collect();
        // Threads start in reverse order: only the tickets can put them back in line.
        let hs: Vec<_> = tickets
            .into_iter()
            .rev()
            .map(|t| {
                let (s, a, m, o) = (s.clone(), active.clone(), max.clone(), order.clone());
                std::thread::spawn(move || {
                    let _slot = s.acquire(t);
                    let n = a.fetch_add(1, Ordering::SeqCst) + 1;
                    m.fetch_max(n, Ordering::SeqCst);
                    o.lock().unwrap().push(t);
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    a.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        let o = order.lock().unwrap().clone();
        (max.load(Ordering::SeqCst), o)
    }

    #[test]
    fn one_slot_serves_in_ticket_order() {
        let (max, order) = run(1);
        assert_eq!(max, 1);
        assert_eq!(order, (0..8).collect::<Vec<_>>(), "served out of order");
    }

    #[test]
    fn two_slots_never_exceed_the_limit() {
        let (max, mut order) = run(2);
        assert!(max <= 2, "{max} ran at once");
        order.sort_unstable();
        assert_eq!(order, (0..8).collect::<Vec<_>>(), "not all served");
    }
}
