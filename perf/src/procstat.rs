//! CPU time and peak resident memory of a process, from `getrusage`.
//!
//! The benchmark's source and destination are child processes; each measures itself with
//! [`Usage::current`] around its timed phase (so filling and prefaulting memory, which happen
//! before the clock starts, are not counted) and reports the difference and its peak RSS to the
//! parent. [`Usage::children`] gives the totals of all waited-for children.

use nix::sys::resource::{getrusage, UsageWho};
use nix::sys::time::TimeVal;

use crate::error::{BenchError, Result};

/// CPU time and peak RSS.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Usage {
    /// User CPU seconds (all threads).
    pub user_s: f64,
    /// System CPU seconds (all threads).
    pub sys_s: f64,
    /// Peak resident set size in bytes.
    pub peak_rss_bytes: u64,
}

fn secs(t: TimeVal) -> f64 {
    t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6
}

fn usage(who: UsageWho) -> Result<Usage> {
    let u = getrusage(who).map_err(|e| BenchError::io("getrusage", e.into()))?;
    Ok(Usage {
        user_s: secs(u.user_time()),
        sys_s: secs(u.system_time()),
        // Linux reports ru_maxrss in KiB.
        peak_rss_bytes: u64::try_from(u.max_rss()).unwrap_or(0) * 1024,
    })
}

impl Usage {
    /// This process so far (all its threads, live and finished).
    pub fn current() -> Result<Usage> {
        usage(UsageWho::RUSAGE_SELF)
    }

    /// All children this process has waited for (peak RSS: the largest of them).
    pub fn children() -> Result<Usage> {
        usage(UsageWho::RUSAGE_CHILDREN)
    }

    /// User + system seconds.
    pub fn cpu_s(&self) -> f64 {
        self.user_s + self.sys_s
    }

    /// CPU used since `earlier`; the peak RSS is this one's.
    pub fn since(&self, earlier: &Usage) -> Usage {
        Usage {
            user_s: (self.user_s - earlier.user_s).max(0.0),
            sys_s: (self.sys_s - earlier.sys_s).max(0.0),
            peak_rss_bytes: self.peak_rss_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burning_cpu_shows() {
        let a = Usage::current().unwrap();
        let t = std::time::Instant::now();
        let mut x = 1u64;
        while t.elapsed().as_millis() < 50 {
            x = std::hint::black_box(x.wrapping_mul(3).wrapping_add(1));
        }
        let d = Usage::current().unwrap().since(&a);
        assert!(d.cpu_s() > 0.01, "{d:?}");
        assert!(d.peak_rss_bytes > 1 << 20);
    }
}
