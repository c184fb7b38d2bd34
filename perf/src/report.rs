//! Output: a readable table, or one JSON object per line (`--json`).
//!
//! Every rate says its unit in its name: `*_bytes_per_s` (payload bytes for
//! `throughput_bytes_per_s`, TCP payload bytes for `reference_bytes_per_s`, so `ratio` compares
//! like with like) or `*_bits_per_s` (link rates, as tc and iperf3 state them). The table shows
//! throughputs in Gbit/s. README.md lists every field.

use std::io::Write;

use serde::{Deserialize, Serialize};

use crate::units::{format_size, gbit};

/// One result of `migration-bench stream`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StreamRecord {
    /// Always `"stream"`.
    pub bench: String,
    /// Transport option: `"tcp"` or `"zstd"`.
    pub option: String,
    /// zstd level (zstd only).
    pub zstd_level: Option<i32>,
    /// Protection of the frames: `aead`, `integrity` or `off` (quic: `aead`, by TLS 1.3).
    pub encryption: String,
    /// Page mixture, `zero=40,text=30,random=30`.
    pub mix: String,
    /// Seed of the page contents.
    pub seed: u64,
    /// Index of the repetition (`--repeat`), from 0.
    pub run: u32,
    /// Where it ran: `"loopback"` or `"netns"` (a rate-limited veth between two namespaces).
    pub testbed: String,
    /// Rate limit of the link in bits per second (netns only).
    pub link_rate_bits_per_s: Option<u64>,
    /// Payload: guest bytes covered (zero pages included).
    pub bytes: u64,
    /// Bytes on the channel (frame headers included; zero pages cost a bit each).
    pub wire_bytes: u64,
    /// Seconds from the first batch sent to the last acknowledgement received.
    pub seconds: f64,
    /// Payload bytes per second.
    pub throughput_bytes_per_s: f64,
    /// Source process CPU seconds (user + system) during the timed phase.
    pub src_cpu_s: f64,
    /// Destination process CPU seconds (user + system) during the timed phase.
    pub dst_cpu_s: f64,
    /// Peak RSS of the source process, bytes.
    pub src_peak_rss_bytes: u64,
    /// Peak RSS of the destination process, bytes.
    pub dst_peak_rss_bytes: u64,
    /// The reference: `"iperf3"` (one TCP stream between the same endpoints), or `"none"`.
    pub reference: String,
    /// Reference throughput in bytes per second (`None` without a reference).
    pub reference_bytes_per_s: Option<f64>,
    /// The iperf3 client's arguments that measured the reference (`-l` is Ferry's write size).
    pub reference_args: Option<String>,
    /// `throughput_bytes_per_s / reference_bytes_per_s`.
    pub ratio: Option<f64>,
    /// The destination compared every page with the expected content and all matched.
    pub verified: bool,
    /// Batches sent.
    pub batches: u64,
    /// Batches that went compressed.
    pub compressed_batches: u64,
    /// Pages sent as data.
    pub data_pages: u64,
    /// Pages sent as a zero bit.
    pub zero_pages: u64,
    /// Pages per batch.
    pub batch_pages: u32,
    /// Most batches outstanding (sent, not acknowledged).
    pub window: u32,
}

impl StreamRecord {
    /// The JSON line.
    pub fn to_json(&self) -> String {
        // A struct of plain numbers and strings always serializes; a non-finite float becomes null.
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"bench\":\"stream\",\"error\":\"{e}\"}}"))
    }
}

/// A plain text table, columns right-aligned except the first.
#[derive(Debug, Default)]
pub struct Table {
    head: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new(head: &[&str]) -> Self {
        Self { head: head.iter().map(|s| s.to_string()).collect(), rows: Vec::new() }
    }

    /// Add a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Render.
    pub fn render(&self) -> String {
        let n = self.head.len();
        let mut w = vec![0usize; n];
        for r in std::iter::once(&self.head).chain(&self.rows) {
            for (i, c) in r.iter().enumerate().take(n) {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, r: &[String]| {
            for (i, c) in r.iter().enumerate().take(n) {
                if i == 0 {
                    out.push_str(&format!("{c:<width$}", width = w[i]));
                } else {
                    out.push_str(&format!("  {c:>width$}", width = w[i]));
                }
            }
            out.push('\n');
        };
        line(&mut out, &self.head);
        let rule: Vec<String> = w.iter().map(|&k| "-".repeat(k)).collect();
        line(&mut out, &rule);
        for r in &self.rows {
            line(&mut out, r);
        }
        out
    }
}

/// The table of stream results.
pub fn stream_table(records: &[StreamRecord]) -> String {
    let mut t = Table::new(&[
        "option",
        "enc",
        "size",
        "wire",
        "seconds",
        "Gbit/s",
        "iperf3 Gbit/s",
        "ratio",
        "src cpu s",
        "dst cpu s",
        "verified",
    ]);
    for r in records {
        let opt = match r.zstd_level {
            Some(l) => format!("{} (level {l})", r.option),
            None => r.option.clone(),
        };
        t.row(vec![
            opt,
            r.encryption.clone(),
            format_size(r.bytes),
            format_size(r.wire_bytes),
            format!("{:.3}", r.seconds),
            format!("{:.2}", gbit(r.throughput_bytes_per_s)),
            r.reference_bytes_per_s.map_or("-".into(), |b| format!("{:.2}", gbit(b))),
            r.ratio.map_or("-".into(), |x| format!("{x:.2}")),
            format!("{:.2}", r.src_cpu_s),
            format!("{:.2}", r.dst_cpu_s),
            if r.verified { "yes".into() } else { "NO".into() },
        ]);
    }
    let mut options: Vec<(&str, Option<i32>, &str)> = Vec::new();
    for r in records {
        let k = (r.option.as_str(), r.zstd_level, r.encryption.as_str());
        if !options.contains(&k) {
            options.push(k);
        }
    }
    let runs = records.iter().map(|r| r.run).max().map_or(0, |m| m + 1);
    if runs > 1 {
        for (o, l, e) in options {
            let of: Vec<&StreamRecord> =
                records.iter().filter(|r| r.option == o && r.zstd_level == l && r.encryption == e).collect();
            let med = |f: &dyn Fn(&StreamRecord) -> Option<f64>| median(of.iter().filter_map(|r| f(r)).collect());
            t.row(vec![
                format!("{o} median of {}", of.len()),
                e.to_string(),
                String::new(),
                String::new(),
                med(&|r| Some(r.seconds)).map_or("-".into(), |x| format!("{x:.3}")),
                med(&|r| Some(gbit(r.throughput_bytes_per_s))).map_or("-".into(), |x| format!("{x:.2}")),
                med(&|r| r.reference_bytes_per_s.map(gbit)).map_or("-".into(), |x| format!("{x:.2}")),
                med(&|r| r.ratio).map_or("-".into(), |x| format!("{x:.2}")),
                med(&|r| Some(r.src_cpu_s)).map_or("-".into(), |x| format!("{x:.2}")),
                med(&|r| Some(r.dst_cpu_s)).map_or("-".into(), |x| format!("{x:.2}")),
                if of.iter().all(|r| r.verified) { "all".into() } else { "NOT ALL".into() },
            ]);
        }
    }
    let mut out = String::new();
    if let Some(r) = records.first() {
        let link = match r.link_rate_bits_per_s {
            Some(b) => format!("{} link of {:.3} Gbit/s", r.testbed, b as f64 / 1e9),
            None => r.testbed.clone(),
        };
        out.push_str(&format!("stream: {} of {} (seed {}), {link}\n", format_size(r.bytes), r.mix, r.seed));
        if let Some(args) = &r.reference_args {
            out.push_str(&format!("reference: iperf3 {args}\n"));
        }
    }
    out.push_str(&t.render());
    let mut cost =
        Table::new(&["option", "run", "enc", "Gbit/s", "off Gbit/s", "enc / off time", "cpu s", "off cpu s"]);
    let mut any = false;
    for r in records.iter().filter(|r| r.encryption != "off") {
        let Some(off) = records
            .iter()
            .find(|o| o.encryption == "off" && (o.run, &o.option, o.zstd_level) == (r.run, &r.option, r.zstd_level))
        else {
            continue;
        };
        any = true;
        cost.row(vec![
            r.option.clone(),
            r.run.to_string(),
            r.encryption.clone(),
            format!("{:.2}", gbit(r.throughput_bytes_per_s)),
            format!("{:.2}", gbit(off.throughput_bytes_per_s)),
            if off.seconds > 0.0 { format!("{:.2}x", r.seconds / off.seconds) } else { "-".into() },
            format!("{:.2}", r.src_cpu_s + r.dst_cpu_s),
            format!("{:.2}", off.src_cpu_s + off.dst_cpu_s),
        ]);
    }
    if any {
        out.push_str("\nwhat protection costs (time over the same run with encryption off, same command):\n");
        out.push_str(&cost.render());
    }
    out
}

/// Median (mean of the middle two for an even count); `None` for no values.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

/// Print a line and flush (JSON lines reach a pipe promptly).
pub fn emit(line: &str) {
    let mut o = std::io::stdout().lock();
    // stdout closed (a pipe to `head`): nothing useful to do about it.
    let _ = writeln!(o, "{line}");
    let _ = o.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns() {
        let mut t = Table::new(&["a", "bb"]);
        t.row(vec!["xyz".into(), "1".into()]);
        assert_eq!(t.render(), "a    bb\n---  --\nxyz   1\n");
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
