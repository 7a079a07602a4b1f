//! Every host's wire counters sampled during a run, and what they show: stalls.
//!
//! Samples come from the switch-side veth ends (one read of one `/proc/PID/net/dev`): what a
//! switch-side end transmits is what its host downloads, what it receives is what the host
//! uploaded.

use std::collections::BTreeMap;

use serde::Serialize;

use super::procfs::DevBytes;

/// One host's cumulative bytes since the run's start, one entry per sample.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct HostSeries {
    /// Downloaded (wire bytes).
    pub down: Vec<u64>,
    /// Uploaded (wire bytes).
    pub up: Vec<u64>,
}

/// Counters of every host over one run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Timeline {
    /// Seconds since the start, one per sample.
    pub t: Vec<f64>,
    /// By host label.
    pub hosts: BTreeMap<String, HostSeries>,
    /// What all the switch's interfaces sent from the start to the last sample.
    pub switch_tx: Option<SwitchTx>,
    #[serde(skip)]
    base: BTreeMap<String, DevBytes>,
}

/// What the switch's interfaces sent over a run, all hosts together: each byte between two
/// hosts is counted once, on the way out of the switch to its receiver.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SwitchTx {
    /// Packets (a GSO super-packet counts once: the emulation's per-packet work is per
    /// super-packet, so fewer, larger packets cost the kernel less for the same bytes).
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

impl SwitchTx {
    /// The report's line.
    pub fn line(&self) -> String {
        format!(
            "the switch forwarded {:.0}k packets, {:.2} GB, {} bytes per packet",
            self.packets as f64 / 1e3,
            self.bytes as f64 / 1e9,
            self.bytes.checked_div(self.packets).unwrap_or(0)
        )
    }
}

/// A time a leecher received (almost) nothing while it still lacked bytes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stall {
    /// Start, seconds since the run's start.
    pub from_secs: f64,
    /// End.
    pub to_secs: f64,
}

impl Timeline {
    /// A timeline whose zero is `base` (switch-side counters by interface).
    pub fn new(base: BTreeMap<String, DevBytes>) -> Self {
        Self {
            base,
            ..Self::default()
        }
    }

    /// Add one sample taken `t` seconds after the start. `labels` maps host label to
    /// switch-side interface.
    pub fn push(&mut self, t: f64, labels: &[(String, String)], now: &BTreeMap<String, DevBytes>) {
        self.t.push(t);
        for (label, dev) in labels {
            let zero = self.base.get(dev).copied().unwrap_or_default();
            let cur = now.get(dev).copied().unwrap_or(zero);
            let series = self.hosts.entry(label.clone()).or_default();
            // The switch end transmits what the host receives.
            series.down.push(cur.tx.saturating_sub(zero.tx));
            series.up.push(cur.rx.saturating_sub(zero.rx));
        }
        let mut sent = SwitchTx::default();
        for (dev, cur) in now {
            let zero = self.base.get(dev).copied().unwrap_or_default();
            sent.packets += cur.tx_packets.saturating_sub(zero.tx_packets);
            sent.bytes += cur.tx.saturating_sub(zero.tx);
        }
        self.switch_tx = Some(sent);
    }

    /// Stalls of `label` before `until` seconds: at least `min_secs` of sample intervals in
    /// each of which it downloaded fewer than `min_bytes`.
    pub fn stalls(&self, label: &str, until: f64, min_secs: f64, min_bytes: u64) -> Vec<Stall> {
        let Some(series) = self.hosts.get(label) else {
            return Vec::new();
        };
        stalls(&self.t, &series.down, until, min_secs, min_bytes)
    }
}

/// Runs of consecutive sample intervals (before `until`) in each of which the cumulative
/// count `cum` grew by fewer than `min_bytes`, lasting at least `min_secs` in all.
pub fn stalls(t: &[f64], cum: &[u64], until: f64, min_secs: f64, min_bytes: u64) -> Vec<Stall> {
    let n = t.len().min(cum.len());
    let mut out = Vec::new();
    let mut run_start: Option<usize> = None;
    let close = |from: usize, to: usize, out: &mut Vec<Stall>| {
        if t[to] - t[from] >= min_secs {
            out.push(Stall {
                from_secs: t[from],
                to_secs: t[to],
            });
        }
    };
    for i in 1..n {
        if t[i] > until {
            break;
        }
        let quiet = cum[i].saturating_sub(cum[i - 1]) < min_bytes;
        match (quiet, run_start) {
            (true, None) => run_start = Some(i - 1),
            (false, Some(from)) => {
                close(from, i - 1, &mut out);
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(from) = run_start {
        let last = (1..n).take_while(|&i| t[i] <= until).last().unwrap_or(from);
        close(from, last, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_and_merges_stalls() {
        let t: Vec<f64> = (0..10).map(f64::from).collect();
        // Grows 0..2, flat from 2 to 6, grows again.
        let cum = [0, 100, 200, 200, 201, 201, 202, 400, 600, 800];
        let s = stalls(&t, &cum, 100.0, 3.0, 50);
        assert_eq!(
            s,
            vec![Stall {
                from_secs: 2.0,
                to_secs: 6.0
            }]
        );
        // Short flat spells are not stalls; nothing counts after `until`.
        assert!(stalls(&t, &cum, 100.0, 5.0, 50).is_empty());
        assert!(stalls(&t, &cum, 4.0, 3.0, 50).is_empty());
        // A leecher that never starts stalls from the beginning.
        let flat = [0; 10];
        assert_eq!(
            stalls(&t, &flat, 100.0, 3.0, 50),
            vec![Stall {
                from_secs: 0.0,
                to_secs: 9.0
            }]
        );
    }

    #[test]
    fn timeline_is_relative_to_its_start() {
        let dev = |rx, tx, tx_packets| DevBytes { rx, tx, tx_packets };
        let base = BTreeMap::from([("s-l001".to_owned(), dev(10, 1000, 3))]);
        let labels = [("l001".to_owned(), "s-l001".to_owned())];
        let mut tl = Timeline::new(base);
        assert_eq!(tl.switch_tx, None, "no sample yet");
        tl.push(
            1.0,
            &labels,
            &BTreeMap::from([
                ("s-l001".to_owned(), dev(15, 5000, 7)),
                // An interface made after the start counts from zero.
                ("s-l002".to_owned(), dev(0, 600, 2)),
            ]),
        );
        assert_eq!(tl.hosts["l001"].down, vec![4000]);
        assert_eq!(tl.hosts["l001"].up, vec![5]);
        assert_eq!(
            tl.switch_tx,
            Some(SwitchTx {
                packets: 6,
                bytes: 4600
            })
        );
        assert!(tl.stalls("l001", 10.0, 0.5, 1).is_empty());
        assert!(tl.stalls("nobody", 10.0, 0.5, 1).is_empty());
    }
}
