//! What one contender's run measured, the figures BENCHMARKS.md asks for, and the tables.

use std::fmt::Write as _;

use serde::Serialize;

use super::scenario::{MIB, Scenario};

/// One leecher's outcome.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LeecherOutcome {
    /// Host label (`l001`, ...).
    pub host: String,
    /// Seconds from the common start to the moment the contender said it was done (`get`
    /// exited 0, the download completed), whether or not the bytes then verified.
    pub done_secs: Option<f64>,
    /// Whether the file it produced has the package's SHA-256.
    pub verified: bool,
    /// Still not done at the deadline.
    pub timed_out: bool,
    /// Exit status of its client process, when it exited.
    pub exit_code: Option<i32>,
    /// What went wrong, if anything.
    pub error: Option<String>,
}

impl LeecherOutcome {
    /// Seconds to a verified package, or `None`.
    pub fn verified_secs(&self) -> Option<f64> {
        self.done_secs.filter(|_| self.verified)
    }
}

/// The figures of one contender in one scenario.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Leechers.
    pub n: usize,
    /// Leechers with a verified package.
    pub verified: usize,
    /// Leechers still not done at the deadline.
    pub timeouts: usize,
    /// Time of the last leecher; `None` unless every leecher got a verified package.
    pub t_last_secs: Option<f64>,
    /// Mean time; `None` unless every leecher got a verified package.
    pub t_mean_secs: Option<f64>,
    /// T_KR / T_last.
    pub eta_last: Option<f64>,
    /// T_KR / T_mean.
    pub eta_mean: Option<f64>,
    /// Seed egress on the wire (frames, headers included) / F.
    pub seed_amplification_wire: f64,
    /// Piece bytes the seed says it uploaded / F, where the contender tells.
    pub seed_amplification_payload: Option<f64>,
}

/// Compute the BENCHMARKS.md figures.
pub fn summarize(
    leechers: &[LeecherOutcome],
    t_kr_secs: f64,
    package_bytes: u64,
    seed_wire_tx_bytes: u64,
    seed_payload_bytes: Option<u64>,
) -> Summary {
    let times: Vec<f64> = leechers
        .iter()
        .filter_map(LeecherOutcome::verified_secs)
        .collect();
    let complete = times.len() == leechers.len();
    let (t_last, t_mean) = match last_and_mean(&times).filter(|_| complete) {
        Some((last, mean)) => (Some(last), Some(mean)),
        None => (None, None),
    };
    let f = package_bytes as f64;
    Summary {
        n: leechers.len(),
        verified: times.len(),
        timeouts: leechers.iter().filter(|l| l.timed_out).count(),
        t_last_secs: t_last,
        t_mean_secs: t_mean,
        eta_last: t_last.map(|t| t_kr_secs / t),
        eta_mean: t_mean.map(|t| t_kr_secs / t),
        seed_amplification_wire: seed_wire_tx_bytes as f64 / f,
        seed_amplification_payload: seed_payload_bytes.map(|b| b as f64 / f),
    }
}

/// The latest and the mean of `times`; `None` when there are none.
fn last_and_mean(times: &[f64]) -> Option<(f64, f64)> {
    (!times.is_empty()).then(|| {
        let last = times.iter().copied().fold(0.0, f64::max);
        (last, times.iter().sum::<f64>() / times.len() as f64)
    })
}

/// A contender's row in a scenario's table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row<'a> {
    /// Contender name.
    pub contender: &'a str,
    /// Its figures.
    pub summary: &'a Summary,
    /// Per-leecher outcomes, in host order.
    pub leechers: &'a [LeecherOutcome],
    /// CPU seconds of all its processes, if measured.
    pub cpu_secs: Option<f64>,
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "-".to_owned())
}

/// `26.8 s`, or what went wrong when not every leecher made it.
fn t_cell(s: &Summary, t: Option<f64>) -> String {
    match t {
        Some(t) => format!("{t:.1} s"),
        None if s.timeouts > 0 => format!("timeout ({}/{} done)", s.verified, s.n),
        None => format!("failed ({}/{} ok)", s.verified, s.n),
    }
}

/// Mbit/s as people write it.
pub fn mbit(bps: u64) -> String {
    // Up to kbit/s: a quarter of B3's 5 Mbit/s is 1.25, not 1.2.
    let m = format!("{:.3}", bps as f64 / 1e6);
    m.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// `256 MiB`, `1 GiB`, `1.5 MiB`, `4096 B`.
pub fn size(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{} GiB", bytes >> 30)
    } else if bytes >= MIB {
        let m = bytes as f64 / MIB as f64;
        if m.fract() == 0.0 {
            format!("{m:.0} MiB")
        } else {
            format!("{m:.1} MiB")
        }
    } else {
        format!("{bytes} B")
    }
}

/// One scenario's header line.
pub fn scenario_header(s: &Scenario, t_kr_secs: f64, deadline_secs: f64) -> String {
    let slow = match s.slow_uplinks {
        Some(u) => format!(
            " ({} of them at {})",
            (1..=s.leechers).filter(|&i| s.is_slow(i)).count(),
            mbit(u.up_bps)
        ),
        None => String::new(),
    };
    let straggling = match s.stragglers {
        Some(d) => format!(
            " ({} of them at {})",
            (1..=s.leechers).filter(|&i| s.is_straggler(i)).count(),
            mbit(d.down_bps)
        ),
        None => String::new(),
    };
    let f = match s.packages {
        0 | 1 => size(s.package_bytes),
        p => format!("{p} x {} from {p} origins", size(s.package_bytes)),
    };
    let scaled = if s.rate_scale == 1.0 {
        String::new()
    } else {
        format!(" (rates x{})", s.rate_scale)
    };
    format!(
        "{}{scaled}: N={} F={f} seed up {} Mbit/s, leecher up {}{slow} Mbit/s, leecher down {}{straggling} Mbit/s; \
         T_KR {:.1} s; deadline {:.0} s",
        s.name,
        s.leechers,
        mbit(s.caps.seed_up_bps),
        mbit(s.caps.leecher_up_bps),
        mbit(s.caps.leecher_down_bps),
        t_kr_secs,
        deadline_secs
    )
}

/// Issue 12's straggler figures, for a scenario with stragglers: the other hosts' eta_last
/// against T_KR (target 0.90: the stragglers do not hold them back), and each straggler's own
/// bound over its time (target 1 / 1.1: it finishes within 1.1x of what its downlink allows).
/// `leechers` in host order; `None` without stragglers.
pub fn stragglers_line(
    s: &Scenario,
    leechers: &[LeecherOutcome],
    t_kr_secs: f64,
) -> Option<String> {
    s.stragglers?;
    let mut others = Some(0.0f64);
    let mut cells = Vec::new();
    for (k, l) in leechers.iter().enumerate() {
        let i = k + 1;
        let t = l.verified_secs();
        if s.is_straggler(i) {
            let own = s.own_bound_secs(i);
            cells.push(match t {
                Some(t) => format!("{} {t:.1} s of {own:.1} s (eta {:.2})", l.host, own / t),
                None => format!("{} not verified", l.host),
            });
        } else {
            others = others.zip(t).map(|(a, b)| a.max(b));
        }
    }
    let others = match others {
        Some(t) if t > 0.0 => format!("T_last {t:.1} s, eta_last {:.2}", t_kr_secs / t),
        _ => "not all verified".to_owned(),
    };
    Some(format!(
        "stragglers: {} (target eta >= 0.91); the others: {others} (target >= 0.90)",
        cells.join(", ")
    ))
}

/// B3's two kinds of host side by side, for a scenario with thin uplinks: when each kind was
/// done, on average and last. Their downlinks are the same, so a schedule that serves every
/// host alike finishes them together; the thin-uplink hosts coming last says their downloads
/// were starved. `leechers` in host order; `None` without thin uplinks.
pub fn uplink_classes_line(s: &Scenario, leechers: &[LeecherOutcome]) -> Option<String> {
    let thin = s.slow_uplinks?;
    let class = |want_thin: bool| {
        let times: Option<Vec<f64>> = leechers
            .iter()
            .enumerate()
            .filter(|(k, _)| s.is_slow(k + 1) == want_thin)
            .map(|(_, l)| l.verified_secs())
            .collect();
        match times {
            Some(t) => match last_and_mean(&t) {
                Some((last, mean)) => {
                    format!("{} hosts T_mean {mean:.1} s, T_last {last:.1} s", t.len())
                }
                None => "no hosts".to_owned(),
            },
            None => "not all verified".to_owned(),
        }
    };
    Some(format!(
        "uplink {} Mbit/s: {}; the others: {}",
        mbit(thin.up_bps),
        class(true),
        class(false)
    ))
}

/// A host B4 killed: what it held when it was killed and what it fetched once back.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Restarted {
    /// Host label.
    pub host: String,
    /// Seconds from the start to the kill.
    pub killed_at_secs: f64,
    /// Bytes of the package it held when killed: fbpkg-rs's verified pieces (its agent's last
    /// word), the bytes in a stock client's file (aria2, librqbit, the fan-out's client).
    pub had_bytes: u64,
    /// Seconds from the start to the restart (its new agent answering).
    pub restarted_at_secs: Option<f64>,
    /// Payload bytes it downloaded once restarted, by its own count (aria2: the pieces its log
    /// says it completed).
    pub downloaded_after_bytes: Option<u64>,
}

impl Restarted {
    /// Bytes it fetched again: what its restarted agent downloaded beyond what it lacked.
    pub fn refetched_bytes(&self, package_bytes: u64) -> Option<u64> {
        let lacked = package_bytes.saturating_sub(self.had_bytes);
        self.downloaded_after_bytes
            .map(|d| d.saturating_sub(lacked))
    }
}

/// Issue 12's churn figures (B4): eta_last over the hosts that were there from the start and
/// never killed (target 0.85), the late joiners' time from when they joined, and for the
/// hosts killed at half their progress, whether they ended verified and how much of what they
/// had they fetched again (target under 10%). `leechers` in host order; `None` without churn.
pub fn churn_line(
    s: &Scenario,
    leechers: &[LeecherOutcome],
    t_kr_secs: f64,
    join_at_secs: f64,
    restarted: &[Restarted],
) -> Option<String> {
    s.churn?;
    let mut steady = Some(0.0f64);
    let mut steady_n = 0;
    let mut joined = Some(0.0f64);
    for (k, l) in leechers.iter().enumerate() {
        let i = k + 1;
        let t = l.verified_secs();
        if s.is_joiner(i) {
            joined = joined.zip(t).map(|(a, b)| a.max(b - join_at_secs));
        } else if !s.is_killed(i) {
            steady_n += 1;
            steady = steady.zip(t).map(|(a, b)| a.max(b));
        }
    }
    let steady = match steady {
        Some(t) if t > 0.0 => format!("T_last {t:.1} s, eta_last {:.2}", t_kr_secs / t),
        _ => "not all verified".to_owned(),
    };
    let joined = match joined {
        Some(t) => format!("done {t:.1} s after joining at {join_at_secs:.1} s at the latest"),
        None => "not all verified".to_owned(),
    };
    let verified = restarted
        .iter()
        .filter(|r| {
            leechers
                .iter()
                .any(|l| l.host == r.host && l.verified_secs().is_some())
        })
        .count();
    let shares: Vec<f64> = restarted
        .iter()
        .filter_map(|r| {
            let again = r.refetched_bytes(s.package_bytes)?;
            Some(again as f64 / r.had_bytes.max(1) as f64)
        })
        .collect();
    let worst = match shares.iter().copied().reduce(f64::max) {
        Some(w) if shares.len() == restarted.len() => format!("{:.1}%", w * 100.0),
        Some(w) => format!(
            "{:.1}% ({} of {} known)",
            w * 100.0,
            shares.len(),
            restarted.len()
        ),
        None => "unknown".to_owned(),
    };
    Some(format!(
        "churn: never killed ({steady_n}): {steady} (target >= 0.85); joiners: {joined}; \
         killed and restarted: {verified}/{} verified, fetched again at most {worst} of what \
         they had (target < 10%)",
        restarted.len()
    ))
}

/// A markdown table of one scenario, every contender side by side, then each leecher's time.
pub fn scenario_table(rows: &[Row<'_>]) -> String {
    let mut out = String::from(
        "| contender | T_last | T_mean | eta_last | eta_mean | seed ampl. (wire) | seed ampl. (payload) | verified | timeouts | CPU s |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let s = r.summary;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:.2} | {} | {}/{} | {} | {} |",
            r.contender,
            t_cell(s, s.t_last_secs),
            t_cell(s, s.t_mean_secs),
            opt(s.eta_last, |v| format!("{v:.2}")),
            opt(s.eta_mean, |v| format!("{v:.2}")),
            s.seed_amplification_wire,
            opt(s.seed_amplification_payload, |v| format!("{v:.2}")),
            s.verified,
            s.n,
            s.timeouts,
            opt(r.cpu_secs, |v| format!("{v:.1}")),
        );
    }
    for r in rows {
        let times: Vec<String> = r
            .leechers
            .iter()
            .map(|l| match (l.done_secs, l.verified, l.timed_out) {
                (Some(t), true, _) => format!("{} {t:.1}", l.host),
                (Some(t), false, _) => format!("{} {t:.1}(BAD)", l.host),
                (None, _, true) => format!("{} timeout", l.host),
                (None, _, false) => format!("{} failed", l.host),
            })
            .collect();
        let _ = writeln!(out, "{}: {}", r.contender, times.join(", "));
    }
    out
}

/// BENCHMARKS.md's summary shape: one row per contender, T_last / eta_last / seed
/// amplification per scenario.
pub fn cross_table(scenarios: &[&str], contenders: &[(&str, Vec<Option<&Summary>>)]) -> String {
    let mut out = String::from("| contender |");
    let mut rule = String::from("|---|");
    for s in scenarios {
        let _ = write!(out, " {s} T_last | {s} eta_last | {s} seed ampl. |");
        rule.push_str("---|---|---|");
    }
    out.push('\n');
    out.push_str(&rule);
    out.push('\n');
    for (name, cells) in contenders {
        let _ = write!(out, "| {name} |");
        for cell in cells {
            match cell {
                Some(s) => {
                    let _ = write!(
                        out,
                        " {} | {} | {:.2} |",
                        t_cell(s, s.t_last_secs),
                        opt(s.eta_last, |v| format!("{v:.2}")),
                        s.seed_amplification_wire
                    );
                }
                None => out.push_str(" | | |"),
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(host: &str, t: f64) -> LeecherOutcome {
        LeecherOutcome {
            host: host.into(),
            done_secs: Some(t),
            verified: true,
            timed_out: false,
            exit_code: Some(0),
            error: None,
        }
    }

    #[test]
    fn churn_judges_the_steady_hosts_the_joiners_and_what_the_restarted_fetched_again() {
        let mut s = Scenario::preset("b4").unwrap();
        // Killed: 4 (one in four of the first 4); joiners: 5 to 8.
        s.leechers = 8;
        assert!(s.is_killed(4) && s.is_joiner(5));
        let times = [14.0, 15.0, 14.5, 30.0, 20.0, 21.0, 22.0, 19.0];
        let ls: Vec<LeecherOutcome> = times
            .iter()
            .enumerate()
            .map(|(k, &t)| ok(&format!("l{:03}", k + 1), t))
            .collect();
        let r = Restarted {
            host: "l004".into(),
            killed_at_secs: 7.0,
            had_bytes: 64 * MIB,
            restarted_at_secs: Some(12.0),
            downloaded_after_bytes: Some(64 * MIB + 3 * MIB),
        };
        assert_eq!(r.refetched_bytes(128 * MIB), Some(3 * MIB));
        let line = churn_line(&s, &ls, 13.4, 6.7, std::slice::from_ref(&r)).unwrap();
        assert!(
            line.contains("never killed (3): T_last 15.0 s, eta_last 0.89"),
            "{line}"
        );
        assert!(
            line.contains("done 15.3 s after joining at 6.7 s"),
            "{line}"
        );
        assert!(
            line.contains("1/1 verified, fetched again at most 4.7%"),
            "{line}"
        );
        let unknown = Restarted {
            downloaded_after_bytes: None,
            ..r
        };
        assert!(
            churn_line(&s, &ls, 13.4, 6.7, &[unknown])
                .unwrap()
                .contains("at most unknown")
        );
        assert!(churn_line(&Scenario::preset("b1").unwrap(), &ls, 26.8, 0.0, &[]).is_none());
    }

    #[test]
    fn stragglers_are_judged_by_their_own_bound_and_the_others_by_t_kr() {
        let s = Scenario::preset("stragglers").unwrap();
        let kr = s.kumar_ross().t_kr_secs;
        let times = [28.0, 27.0, 29.0, 57.0, 28.5, 27.5, 28.2, 60.0];
        let ls: Vec<LeecherOutcome> = times
            .iter()
            .enumerate()
            .map(|(k, &t)| ok(&format!("l{:03}", k + 1), t))
            .collect();
        let line = stragglers_line(&s, &ls, kr).unwrap();
        assert!(line.contains("l004 57.0 s of 53.7 s (eta 0.94)"), "{line}");
        assert!(line.contains("l008 60.0 s of 53.7 s (eta 0.89)"), "{line}");
        assert!(
            line.contains(&format!("T_last 29.0 s, eta_last {:.2}", kr / 29.0)),
            "{line}"
        );
        let mut lost = ls.clone();
        lost[0].verified = false;
        assert!(
            stragglers_line(&s, &lost, kr)
                .unwrap()
                .contains("the others: not all verified")
        );
        assert!(stragglers_line(&Scenario::preset("b1").unwrap(), &ls, kr).is_none());
    }

    #[test]
    fn thin_uplink_hosts_are_timed_apart_from_the_others() {
        let s = Scenario::preset("b3").unwrap();
        let ls: Vec<LeecherOutcome> = (1..=s.leechers)
            .map(|i| {
                ok(
                    &format!("l{i:03}"),
                    if s.is_slow(i) { 50.0 + i as f64 } else { 40.0 },
                )
            })
            .collect();
        let thin: Vec<f64> = (1..=s.leechers)
            .filter(|&i| s.is_slow(i))
            .map(|i| 50.0 + i as f64)
            .collect();
        let mean = thin.iter().sum::<f64>() / thin.len() as f64;
        let last = thin.iter().copied().fold(0.0, f64::max);
        let line = uplink_classes_line(&s, &ls).unwrap();
        assert_eq!(
            line,
            format!(
                "uplink 5 Mbit/s: {} hosts T_mean {mean:.1} s, T_last {last:.1} s; \
                 the others: {} hosts T_mean 40.0 s, T_last 40.0 s",
                thin.len(),
                s.leechers - thin.len()
            )
        );
        let mut lost = ls.clone();
        let k = (1..=s.leechers).find(|&i| !s.is_slow(i)).unwrap() - 1;
        lost[k].verified = false;
        assert!(
            uplink_classes_line(&s, &lost)
                .unwrap()
                .ends_with("the others: not all verified"),
        );
        assert!(uplink_classes_line(&Scenario::preset("b1").unwrap(), &ls).is_none());
    }

    #[test]
    fn figures_when_everyone_finishes() {
        let ls = [ok("l001", 20.0), ok("l002", 30.0)];
        let s = summarize(&ls, 26.8, 256 * MIB, 300 * MIB, Some(260 * MIB));
        assert_eq!(s.t_last_secs, Some(30.0));
        assert_eq!(s.t_mean_secs, Some(25.0));
        assert!((s.eta_last.unwrap() - 26.8 / 30.0).abs() < 1e-9);
        assert!((s.eta_mean.unwrap() - 26.8 / 25.0).abs() < 1e-9);
        assert!((s.seed_amplification_wire - 300.0 / 256.0).abs() < 1e-9);
        assert!((s.seed_amplification_payload.unwrap() - 260.0 / 256.0).abs() < 1e-9);
        assert_eq!((s.verified, s.timeouts, s.n), (2, 0, 2));
    }

    #[test]
    fn a_timeout_or_a_bad_copy_leaves_no_t_last() {
        let mut late = ok("l002", 0.0);
        late.done_secs = None;
        late.timed_out = true;
        let s = summarize(&[ok("l001", 20.0), late], 26.8, MIB, MIB, None);
        assert_eq!((s.t_last_secs, s.eta_last, s.timeouts), (None, None, 1));
        let mut bad = ok("l002", 21.0);
        bad.verified = false;
        let s = summarize(&[ok("l001", 20.0), bad.clone()], 26.8, MIB, MIB, None);
        assert_eq!((s.t_last_secs, s.verified, s.timeouts), (None, 1, 0));
        let table = scenario_table(&[Row {
            contender: "x",
            summary: &s,
            leechers: &[ok("l001", 20.0), bad],
            cpu_secs: None,
        }]);
        assert!(table.contains("| x | failed (1/2 ok) |"), "{table}");
        assert!(table.contains("x: l001 20.0, l002 21.0(BAD)"), "{table}");
    }

    #[test]
    fn table_shape() {
        let ls = [ok("l001", 27.5), ok("l002", 28.0)];
        let s = summarize(&ls, 26.8, 256 * MIB, 276 * MIB, Some(257 * MIB));
        let table = scenario_table(&[Row {
            contender: "fbpkg-rs",
            summary: &s,
            leechers: &ls,
            cpu_secs: Some(12.25),
        }]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[2],
            "| fbpkg-rs | 28.0 s | 27.8 s | 0.96 | 0.97 | 1.08 | 1.00 | 2/2 | 0 | 12.2 |"
        );
        assert_eq!(lines[3], "fbpkg-rs: l001 27.5, l002 28.0");
        let cross = cross_table(&["B1", "B2"], &[("fbpkg-rs", vec![Some(&s), None])]);
        assert!(cross.starts_with("| contender | B1 T_last | B1 eta_last | B1 seed ampl. |"));
        assert!(
            cross.contains("| fbpkg-rs | 28.0 s | 0.96 | 1.08 | | | |"),
            "{cross}"
        );
    }

    #[test]
    fn units() {
        assert_eq!(size(256 * MIB), "256 MiB");
        assert_eq!(size(1 << 30), "1 GiB");
        assert_eq!(size(MIB + MIB / 2), "1.5 MiB");
        assert_eq!(size(4096), "4096 B");
        assert_eq!(mbit(80_000_000), "80");
        assert_eq!(mbit(1_500_000), "1.5");
        assert_eq!(mbit(1_250_000), "1.25");
        assert_eq!(mbit(100_000), "0.1");
        let h = scenario_header(&Scenario::preset("b1").unwrap(), 26.84, 268.4);
        assert_eq!(
            h,
            "b1: N=8 F=256 MiB seed up 80 Mbit/s, leecher up 80 Mbit/s, leecher down 160 Mbit/s; T_KR 26.8 s; deadline 268 s"
        );
        let mut quarter = Scenario::preset("b1").unwrap();
        quarter.scale_rates(0.25);
        let h = scenario_header(&quarter, 107.4, 1074.0);
        assert_eq!(
            h,
            "b1 (rates x0.25): N=8 F=256 MiB seed up 20 Mbit/s, leecher up 20 Mbit/s, leecher down 40 Mbit/s; T_KR 107.4 s; deadline 1074 s"
        );
    }
}
