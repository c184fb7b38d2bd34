//! Pure functions of measured rates: the per-channel rate meter, the expected downtime,
//! convergence with auto-converge, and the stall detector. Time is always passed in.
//!
//! ## The expected downtime
//!
//! The pause lasts about as long as the final round takes to drain: the dirty bytes left over
//! divided by the rate at which guest bytes are delivered *now*. The rate is measured per channel
//! as guest data bytes acknowledged per second over the most recent window (the end of the round
//! just finished, at most [`RATE_WINDOW`]), which is the channel's wire rate times the guest bytes
//! per wire byte its batches actually achieved (compressed or not) over that same window; only
//! channels still alive count. A channel that carried too little in the window to be measured
//! keeps its previous rate. So a link that slows, dies, or a working set that compresses worse
//! than round 0's text pages lowers the estimate at once, where an average over all rounds kept
//! the rate of links and pages that were no longer there (a busy guest with `zstd` on a 3-NIC
//! testbed with one link cut paused 324 ms under a 300 ms limit that way).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Longest window the rate is measured over (the end of the last round).
pub const RATE_WINDOW: Duration = Duration::from_secs(1);
/// Fewer guest data bytes than this in a channel's window: too little to measure, keep the old rate.
pub const MIN_SAMPLE_BYTES: u64 = 1 << 20;
/// How long acknowledgement samples are kept.
const HORIZON: Duration = Duration::from_secs(3);

/// Acknowledgements of one channel: when, how many guest data bytes and wire bytes each batch
/// carried; the last acknowledgement and the smoothed gap between them (for the stall detector);
/// the wire rate and the compression last measured.
#[derive(Debug, Clone)]
pub struct ChannelMeter {
    samples: VecDeque<(Instant, u64, u64)>,
    /// When the last acknowledgement arrived (or the channel started).
    pub last_ack: Instant,
    /// Smoothed gap between acknowledgements, seconds (`None` before the first one).
    pub gap_s: Option<f64>,
    /// Wire bytes per second delivered, as last measured (`None`: not yet).
    pub wire_bytes_per_s: Option<f64>,
    /// Guest data bytes per wire byte achieved on pages the guest had dirtied (measured in a
    /// round after the first, whose pages are of the kind the final round sends; `None`: not
    /// yet, counted as 1, uncompressed: round 0's text pages compress better than a working set).
    pub guest_per_wire: Option<f64>,
}

impl ChannelMeter {
    /// A channel started (or came back) at `now`.
    pub fn new(now: Instant) -> Self {
        Self { samples: VecDeque::new(), last_ack: now, gap_s: None, wire_bytes_per_s: None, guest_per_wire: None }
    }

    /// An acknowledgement of a batch that carried `data_bytes` of guest data in `wire_bytes`.
    pub fn ack(&mut self, now: Instant, data_bytes: u64, wire_bytes: u64) {
        let gap = now.saturating_duration_since(self.last_ack).as_secs_f64();
        // The first gap (from the channel's start) seeds the average instead of pulling it up
        // from zero, so a slow path's usual gap is known from its first acknowledgement.
        self.gap_s = Some(self.gap_s.map_or(gap, |g| g + 0.125 * (gap - g)));
        self.last_ack = self.last_ack.max(now);
        self.samples.push_back((now, data_bytes, wire_bytes));
        while self.samples.front().is_some_and(|s| now.saturating_duration_since(s.0) > HORIZON) {
            self.samples.pop_front();
        }
    }

    /// Guest data bytes and wire bytes acknowledged in `(end - window, end]`.
    pub fn bytes_in(&self, end: Instant, window: Duration) -> (u64, u64) {
        let start = end.checked_sub(window);
        self.samples
            .iter()
            .filter(|s| s.0 <= end && start.is_none_or(|st| s.0 > st))
            .fold((0, 0), |a, s| (a.0 + s.1, a.1 + s.2))
    }

    /// Measure over a round's window, from `start` (the round's start, or [`RATE_WINDOW`] before
    /// its end if longer ago) to this channel's last acknowledgement in it: a channel that ran
    /// out of work before the round ended is measured while it had work. The result is kept,
    /// unless the window carried too little to tell; `dirtied`: the round carried pages the
    /// guest had dirtied (any round after the first), so its compression counts.
    pub fn measure(&mut self, start: Instant, dirtied: bool) -> Option<f64> {
        let end = self.last_ack;
        let in_window: Vec<&(Instant, u64, u64)> = self.samples.iter().filter(|s| s.0 > start && s.0 <= end).collect();
        // Between acknowledgements: the bytes of all but the first over the time from the first
        // to the last (an acknowledgement closes work that began before it). A lone one counts
        // from the window's start.
        let (span, data, wire) = match in_window.as_slice() {
            [] => return self.rate_bytes_per_s(),
            [one] => (one.0.saturating_duration_since(start), one.1, one.2),
            [first, rest @ ..] => {
                let last = rest.last().map_or(first.0, |l| l.0);
                (
                    last.saturating_duration_since(first.0),
                    rest.iter().map(|s| s.1).sum(),
                    rest.iter().map(|s| s.2).sum(),
                )
            }
        };
        let w = span.max(Duration::from_millis(1));
        // Too little to tell keeps the previous rate; with none yet, anything measured beats none.
        if wire >= MIN_SAMPLE_BYTES || (self.wire_bytes_per_s.is_none() && wire > 0) {
            self.wire_bytes_per_s = Some(wire as f64 / w.as_secs_f64());
            if dirtied && data > 0 {
                self.guest_per_wire = Some(data as f64 / wire as f64);
            }
        }
        self.rate_bytes_per_s()
    }

    /// Guest data bytes per second this channel delivers: its wire rate times the guest bytes
    /// per wire byte achieved on dirtied pages.
    pub fn rate_bytes_per_s(&self) -> Option<f64> {
        self.wire_bytes_per_s.map(|w| w * self.guest_per_wire.unwrap_or(1.0))
    }
}

/// Guest data bytes per second the live channels deliver now: the sum of their last measured
/// rates (`live` yields the meters of the channels still alive). `None` if none was measured.
pub fn live_rate<'a>(live: impl IntoIterator<Item = &'a ChannelMeter>) -> Option<f64> {
    let rates: Vec<f64> = live.into_iter().filter_map(ChannelMeter::rate_bytes_per_s).collect();
    (!rates.is_empty()).then(|| rates.iter().sum())
}

/// How long draining `bytes` at `rate_bytes_per_s` takes (a rate under 1 B/s counts as 1).
pub fn expected_downtime(bytes: u64, rate_bytes_per_s: f64) -> Duration {
    Duration::from_secs_f64(bytes as f64 / rate_bytes_per_s.max(1.0))
}

/// How long the final round takes over channels of these rates (guest data bytes per second)
/// when its batches are shared in proportion to them ([`share_by_rate`]): all bytes at the sum
/// of the rates, plus the last batch on the slowest channel (shares come in whole batches).
pub fn final_round_time(bytes: u64, batch_bytes: u64, rates: &[f64]) -> Duration {
    let total: f64 = rates.iter().sum();
    let slowest = rates.iter().copied().fold(f64::INFINITY, f64::min);
    if rates.is_empty() || total < 1.0 {
        return expected_downtime(bytes, 1.0);
    }
    expected_downtime(bytes, total) + expected_downtime(batch_bytes.min(bytes), slowest)
}

/// Share `sizes` (bytes of each batch, in order) over channels of these rates so that all end
/// together: each batch goes to the channel that would finish it first. Returns the channel
/// position (index into `rates`) for each batch.
pub fn share_by_rate(sizes: &[u64], rates: &[f64]) -> Vec<usize> {
    let mut load = vec![0.0f64; rates.len()];
    sizes
        .iter()
        .map(|&b| {
            let mut best = 0;
            let mut best_t = f64::INFINITY;
            for (i, &r) in rates.iter().enumerate() {
                let t = (load[i] + b as f64) / r.max(1.0);
                if t < best_t {
                    best_t = t;
                    best = i;
                }
            }
            if let Some(l) = load.get_mut(best) {
                *l += b as f64;
            }
            best
        })
        .collect()
}

/// What to do when the guest does not converge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvergePolicy {
    /// Give up; the VM keeps running on the source.
    Abort,
    /// Switch over anyway (longer downtime).
    ForceSwitchover,
}

/// The knobs of convergence.
#[derive(Debug, Clone, Copy)]
pub struct ConvergeConfig {
    /// Switch over once the remaining dirty pages fit in this pause.
    pub downtime_limit: Duration,
    /// Rounds before the policy applies.
    pub max_rounds: u32,
    /// Time before the policy applies.
    pub timeout: Duration,
    /// What to do when not converging.
    pub policy: ConvergePolicy,
    /// Throttle the guest step by step when the dirty rate outruns the bandwidth.
    pub auto_converge: bool,
    /// Throttle step in percent points.
    pub throttle_step: u8,
    /// Lowest throttle (percent of guest speed).
    pub throttle_min: u8,
}

impl Default for ConvergeConfig {
    /// 300 ms pause, 30 rounds or 10 minutes, then abort; auto-converge in steps of 20 points
    /// down to 10 % of guest speed.
    fn default() -> Self {
        Self {
            downtime_limit: Duration::from_millis(300),
            max_rounds: 30,
            timeout: Duration::from_secs(600),
            policy: ConvergePolicy::Abort,
            auto_converge: true,
            throttle_step: 20,
            throttle_min: 10,
        }
    }
}

/// What one pre-copy round measured.
#[derive(Debug, Clone, Copy)]
pub struct RoundMeasure {
    /// The round (0 = every page).
    pub round: u32,
    /// Pages dirtied while it was sending.
    pub dirty_pages: u64,
    /// Their bytes.
    pub dirty_bytes: u64,
    /// How long the round took.
    pub took: Duration,
    /// Guest bytes per second the live channels deliver now ([`live_rate`]).
    pub rate_bytes_per_s: f64,
    /// The pause if the VM stopped now ([`final_round_time`] of the dirty bytes).
    pub expected: Duration,
    /// Time since the migration started.
    pub elapsed: Duration,
}

impl RoundMeasure {
    /// Bytes dirtied per second while the round was sending.
    pub fn dirty_rate_bytes_per_s(&self) -> f64 {
        self.dirty_bytes as f64 / self.took.as_secs_f64().max(1e-6)
    }
}

/// What to do after a round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// The rest fits in the downtime limit: pause and send it.
    Switchover {
        /// The pause expected.
        expected: Duration,
    },
    /// Over the round or time budget, and the policy says switch over anyway.
    ForcedSwitchover {
        /// The pause expected.
        expected: Duration,
    },
    /// Over the budget, and the policy says give up.
    NotConverging,
    /// Another round; `throttle`: slow the guest to this percent first.
    Continue {
        /// New throttle, if it changes.
        throttle: Option<u8>,
    },
}

/// Convergence across rounds: the previous dirty count and the throttle so far.
#[derive(Debug, Clone)]
pub struct Converge {
    prev_dirty: u64,
    stalls: u32,
    /// Current throttle (percent of guest speed).
    pub throttle_pct: u8,
}

impl Default for Converge {
    fn default() -> Self {
        Self { prev_dirty: u64::MAX, stalls: 0, throttle_pct: 100 }
    }
}

impl Converge {
    /// Decide after a round.
    pub fn decide(&mut self, cfg: &ConvergeConfig, m: &RoundMeasure) -> Decision {
        let expected = m.expected;
        if expected <= cfg.downtime_limit {
            return Decision::Switchover { expected };
        }
        if m.round + 1 >= cfg.max_rounds || m.elapsed >= cfg.timeout {
            return match cfg.policy {
                ConvergePolicy::Abort => Decision::NotConverging,
                ConvergePolicy::ForceSwitchover => Decision::ForcedSwitchover { expected },
            };
        }
        // Auto-converge: the dirty set is not shrinking enough, slow the guest a step.
        if m.dirty_pages * 10 >= self.prev_dirty.saturating_mul(9)
            || m.dirty_rate_bytes_per_s() > 0.5 * m.rate_bytes_per_s
        {
            self.stalls += 1;
        } else {
            self.stalls = 0;
        }
        self.prev_dirty = m.dirty_pages;
        if cfg.auto_converge && self.stalls >= 1 && self.throttle_pct > cfg.throttle_min {
            self.throttle_pct = self.throttle_pct.saturating_sub(cfg.throttle_step).max(cfg.throttle_min);
            return Decision::Continue { throttle: Some(self.throttle_pct) };
        }
        Decision::Continue { throttle: None }
    }
}

/// One live channel as the stall detector sees it.
#[derive(Debug, Clone, Copy)]
pub struct ChannelView {
    /// Channel index.
    pub index: u16,
    /// When its oldest unacknowledged batch was sent (`None`: it owes nothing).
    pub oldest_unacked: Option<Instant>,
    /// Its last acknowledgement (or start).
    pub last_ack: Instant,
    /// Its usual gap between acknowledgements, seconds.
    pub gap_s: Option<f64>,
}

/// The stall detector: the data channels (never channel 0) to drop at `now`, with how long each
/// has been quiet. A channel is stalled when its oldest unacknowledged batch and its last
/// acknowledgement are both older than its limit, max(`min`, 8x its usual gap between
/// acknowledgements) (before its first acknowledgement, 8x the slowest usual gap of the others:
/// a uniformly slow multipath session is not stalled), while another live channel answers
/// (acknowledged within half the limit, or owes nothing). Everything stalling at once is left to
/// the transport's timeouts (a paused destination is not a broken path). A false alarm costs a
/// failover, never the migration.
pub fn stalled_channels(now: Instant, min: Duration, live: &[ChannelView]) -> Vec<(u16, Duration)> {
    let slowest = live.iter().filter_map(|s| s.gap_s).fold(0.0, f64::max);
    let limit_of = |gap: Option<f64>| min.max(Duration::from_secs_f64(8.0 * gap.unwrap_or(slowest)));
    let quiet = |s: &ChannelView| now.saturating_duration_since(s.last_ack) >= limit_of(s.gap_s);
    let owing: Vec<_> = live.iter().filter(|s| s.oldest_unacked.is_some()).collect();
    if owing.len() > 1 && owing.iter().all(|s| quiet(s)) {
        return Vec::new();
    }
    let mut out = Vec::new();
    for s in live.iter().filter(|s| s.index != 0) {
        let limit = limit_of(s.gap_s);
        if s.oldest_unacked.is_none_or(|o| now.saturating_duration_since(o) < limit) || !quiet(s) {
            continue;
        }
        let others_answer = live
            .iter()
            .filter(|o| o.index != s.index)
            .any(|o| o.oldest_unacked.is_none() || now.saturating_duration_since(o.last_ack) < limit / 2);
        if others_answer {
            out.push((s.index, now.saturating_duration_since(s.last_ack)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn rate_is_the_recent_window_of_live_channels() {
        let t0 = Instant::now();
        let mut a = ChannelMeter::new(t0);
        let mut b = ChannelMeter::new(t0);
        // 2 s at 100 MB/s, then 1 s at 20 MB/s (the link slowed): the recent second tells.
        for i in 1..=200u64 {
            a.ack(t0 + ms(10 * i), 1_000_000, 1_000_000);
        }
        for i in 1..=100u64 {
            a.ack(t0 + ms(2000 + 10 * i), 200_000, 200_000);
        }
        let r = a.measure(t0 + ms(2000), false).unwrap();
        assert!((r - 20e6).abs() < 1e6, "{r}");
        // A channel that carried nothing has no rate; the sum is over those that have one.
        assert_eq!(b.measure(t0 + ms(2000), false), None);
        assert_eq!(live_rate([&a, &b]), Some(r));
        assert_eq!(live_rate([&b]), None);
        // With no rate yet, a little is better than nothing; then a little no longer replaces it.
        b.ack(t0 + ms(3000), 1000, 1000);
        assert_eq!(b.measure(t0 + ms(2000), false), Some(1000.0));
        b.ack(t0 + ms(3500), 10, 10);
        assert_eq!(b.measure(t0 + ms(3000), false), Some(1000.0));
        // A channel that ran out of work early is measured while it had some.
        let mut c = ChannelMeter::new(t0);
        for i in 1..=50u64 {
            c.ack(t0 + ms(10 * i), 1_000_000, 1_000_000);
        }
        let rc = c.measure(t0, false).unwrap();
        assert!((rc - 100e6).abs() < 1e6, "{rc}");
    }

    #[test]
    fn compression_counts_only_as_achieved_on_dirtied_pages() {
        let t0 = Instant::now();
        let mut m = ChannelMeter::new(t0);
        // Round 0: text pages compressed 3x over a 10 MB/s wire. Not what the final round
        // carries: the guest rate counts them uncompressed.
        for i in 1..=100u64 {
            m.ack(t0 + ms(10 * i), 300_000, 100_000);
        }
        let r0 = m.measure(t0, false).unwrap();
        assert!((r0 - 10e6).abs() < 1e3, "{r0}");
        // Round 1: dirtied pages compress 1.3x: that is what counts from now on.
        for i in 1..=100u64 {
            m.ack(t0 + ms(1000 + 10 * i), 130_000, 100_000);
        }
        let r1 = m.measure(t0 + ms(1000), true).unwrap();
        assert!((r1 - 13e6).abs() < 1e3, "{r1}");
    }

    #[test]
    fn final_round_shares_follow_the_rates() {
        // 1 Gbit, 500 Mbit, 200 Mbit (bytes per second): shares 10:5:2.
        let rates = [125e6, 62.5e6, 25e6];
        let at = share_by_rate(&[1 << 20; 170], &rates);
        let n = |i| at.iter().filter(|&&c| c == i).count();
        assert!((98..=102).contains(&n(0)) && (48..=52).contains(&n(1)) && (18..=22).contains(&n(2)), "{at:?}");
        // The time is the bytes at the sum of the rates plus one batch on the slowest link.
        let t = final_round_time(170 << 20, 1 << 20, &rates);
        let want = (170u64 << 20) as f64 / 212.5e6 + (1u64 << 20) as f64 / 25e6;
        assert!((t.as_secs_f64() - want).abs() < 1e-6, "{t:?}");
        assert_eq!(final_round_time(0, 1 << 20, &rates), Duration::ZERO);
    }

    #[test]
    fn converge_switches_over_throttles_and_gives_up() {
        let cfg = ConvergeConfig { downtime_limit: ms(300), max_rounds: 3, ..ConvergeConfig::default() };
        let m = |round, dirty_bytes: u64| RoundMeasure {
            round,
            dirty_pages: dirty_bytes / 4096,
            dirty_bytes,
            took: Duration::from_secs(1),
            rate_bytes_per_s: 100e6,
            expected: expected_downtime(dirty_bytes, 100e6),
            elapsed: Duration::from_secs(1),
        };
        let mut c = Converge::default();
        assert_eq!(c.decide(&cfg, &m(0, 10_000_000)), Decision::Switchover { expected: ms(100) });
        assert_eq!(c.decide(&cfg, &m(0, 80_000_000)), Decision::Continue { throttle: Some(80) });
        assert_eq!(c.decide(&cfg, &m(1, 80_000_000)), Decision::Continue { throttle: Some(60) });
        assert_eq!(c.decide(&cfg, &m(2, 80_000_000)), Decision::NotConverging);
        let force = ConvergeConfig { policy: ConvergePolicy::ForceSwitchover, ..cfg };
        assert!(matches!(c.decide(&force, &m(2, 80_000_000)), Decision::ForcedSwitchover { .. }));
    }

    #[test]
    fn stall_detector_drops_one_silent_channel_but_not_a_paused_destination() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(3);
        let v = |index, owes: bool, last_ms: u64| ChannelView {
            index,
            oldest_unacked: owes.then_some(t0),
            last_ack: t0 + ms(last_ms),
            gap_s: Some(0.01),
        };
        // Channel 2 silent for 2 s while 0 and 1 answer: dropped.
        let got =
            stalled_channels(now, Duration::from_secs(1), &[v(0, true, 2990), v(1, true, 2995), v(2, true, 1000)]);
        assert_eq!(got.iter().map(|s| s.0).collect::<Vec<_>>(), vec![2]);
        // Everyone silent: the destination paused, nothing dropped.
        assert!(
            stalled_channels(now, Duration::from_secs(1), &[v(0, true, 0), v(1, true, 0), v(2, true, 0)]).is_empty()
        );
        // Channel 0 is never dropped by the detector.
        assert!(stalled_channels(now, Duration::from_secs(1), &[v(0, true, 0), v(1, false, 2990)]).is_empty());
        // A slow path's own rhythm raises its limit: 0.5 s gaps, 3 s quiet is under 8x.
        let slow = ChannelView { gap_s: Some(0.5), ..v(1, true, 0) };
        assert!(stalled_channels(now, Duration::from_secs(1), &[v(0, true, 2990), slow]).is_empty());
    }
}
