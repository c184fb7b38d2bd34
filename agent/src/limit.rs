//! The host-wide limit of live migrations, outgoing and incoming together: at most `limit`
//! hold a slot, outgoing moves wait in the order they were asked (FIFO), a waiting move can be
//! cancelled, and an incoming migration is admitted only if a slot is free now and nobody here
//! waits (the destination never queues a peer: it says it is busy and the source asks again).
//! The limit can change at run time; a lower limit takes effect as slots free up.
//!
//! `ferry_migrate::scheduler::HostScheduler` has the same rule for threads; the agent is async
//! and needs cancel and a changing limit, so it keeps this small queue instead.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Debug)]
struct Inner {
    limit: usize,
    active: usize,
    queue: VecDeque<String>,
}

/// The host's slots.
#[derive(Debug)]
pub struct Limit {
    inner: Mutex<Inner>,
    changed: Notify,
}

/// A held slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    limit: Arc<Limit>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limit.lock().active -= 1;
        self.limit.changed.notify_waiters();
    }
}

/// A cancel switch a waiter watches.
#[derive(Debug, Default)]
pub struct Cancel {
    flag: std::sync::atomic::AtomicBool,
    notify: Notify,
}

impl Cancel {
    /// Cancel.
    pub fn cancel(&self) {
        self.flag.store(true, std::sync::atomic::Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// Was it cancelled?
    pub fn is_cancelled(&self) -> bool {
        self.flag.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Wait until cancelled (or `max`, whichever first).
    pub async fn wait(&self, max: Duration) {
        if self.is_cancelled() {
            return;
        }
        let _ = tokio::time::timeout(max, self.notify.notified()).await;
    }
}

impl Limit {
    /// `limit` slots (at least 1).
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner { limit: limit.max(1), active: 0, queue: VecDeque::new() }),
            changed: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// (limit, active, queued).
    pub fn snapshot(&self) -> (usize, usize, usize) {
        let g = self.lock();
        (g.limit, g.active, g.queue.len())
    }

    /// Change the limit.
    pub fn set_limit(&self, limit: usize) {
        self.lock().limit = limit.max(1);
        self.changed.notify_waiters();
    }

    /// Wait in line for a slot; `None` if cancelled while waiting (the place in line is given up).
    pub async fn acquire(self: &Arc<Self>, id: &str, cancel: &Cancel) -> Option<Slot> {
        self.lock().queue.push_back(id.to_string());
        loop {
            {
                let mut g = self.lock();
                if cancel.is_cancelled() {
                    g.queue.retain(|q| q != id);
                    drop(g);
                    self.changed.notify_waiters();
                    return None;
                }
                if g.queue.front().is_some_and(|f| f == id) && g.active < g.limit {
                    g.queue.pop_front();
                    g.active += 1;
                    drop(g);
                    self.changed.notify_waiters();
                    return Some(Slot { limit: self.clone() });
                }
            }
            // A short poll as well as the notification: a wake-up missed between the check and
            // the wait costs at most this.
            tokio::select! {
                _ = self.changed.notified() => {}
                _ = cancel.wait(Duration::from_millis(50)) => {}
            }
        }
    }

    /// An incoming migration: a slot now, or why not.
    pub fn try_admit(self: &Arc<Self>) -> Result<Slot, String> {
        let mut g = self.lock();
        if g.active < g.limit && g.queue.is_empty() {
            g.active += 1;
            Ok(Slot { limit: self.clone() })
        } else {
            Err(format!(
                "this host runs {} of at most {} live migrations and {} more wait here",
                g.active,
                g.limit,
                g.queue.len()
            ))
        }
    }

    /// A slot taken without waiting (a migration found in flight after a restart).
    pub fn force(self: &Arc<Self>) -> Slot {
        self.lock().active += 1;
        Slot { limit: self.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fifo_never_over_the_limit_and_cancel_leaves_the_line() {
        let l = Limit::new(2);
        let active = Arc::new(AtomicUsize::new(0));
        let max = Arc::new(AtomicUsize::new(0));
        let order = Arc::new(Mutex::new(Vec::new()));
        let cancels: Vec<Arc<Cancel>> = (0..8).map(|_| Arc::new(Cancel::default())).collect();
        let done = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for (i, c) in cancels.iter().enumerate() {
            let (l2, a, m, o, c, d) = (l.clone(), active.clone(), max.clone(), order.clone(), c.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                if let Some(slot) = l2.acquire(&format!("m{i}"), &c).await {
                    let n = a.fetch_add(1, Ordering::SeqCst) + 1;
                    m.fetch_max(n, Ordering::SeqCst);
                    o.lock().unwrap().push(i);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    a.fetch_sub(1, Ordering::SeqCst);
                    drop(slot);
                }
                d.fetch_add(1, Ordering::SeqCst);
            }));
            // Queue in order: wait until task i is in line (or through it).
            loop {
                let (_, act, queued) = l.snapshot();
                if act + queued + done.load(Ordering::SeqCst) > i {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
        // m5 gives up its place while it waits.
        cancels[5].cancel();
        // An incoming migration is refused while moves wait here.
        assert!(l.try_admit().unwrap_err().contains("at most 2"));
        for t in tasks {
            t.await.unwrap();
        }
        assert!(max.load(Ordering::SeqCst) <= 2, "over the limit");
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4, 6, 7], "not first come, first served");
        assert_eq!(l.snapshot(), (2, 0, 0));
        let s = l.try_admit().unwrap();
        let _t = l.try_admit().unwrap();
        assert!(l.try_admit().is_err());
        drop(s);
        assert!(l.try_admit().is_ok());
    }
}
