//! The `rollout` scenario (issue 9, "Bench"): a phased rollout of a new version to hosts
//! that follow a tag, with and without prefetch, beside a bare flash crowd of the same
//! version. The pure parts: which host ids make every phase the same size, when each phase
//! was all activated, and the table.
//!
//! A host's phase is its first phase whose percentage covers its bucket
//! ([`fbpkg_common::rollout::bucket`]: a hash of name, tag and host id). Buckets of a handful
//! of hosts are lumpy, so the bench does not take `host-0..host-15` as they come: it walks
//! `host-0, host-1, ...` and keeps the first `per_phase` ids that fall in each phase, so each
//! phase adds exactly `per_phase` hosts and the per-phase increments compare like with like.

use std::fmt::Write as _;

use fbpkg_common::pkgref::{PackageName, Tag};
use fbpkg_common::rollout::{HostId, Phase, bucket, first_phase};
use serde::Serialize;

/// The phases of the scenario, in percent (`--phases 25,50,75,100`).
pub const PHASES: [u8; 4] = [25, 50, 75, 100];

/// Ids tried before giving up on filling every phase (a uniform hash fills four quarters of
/// 64 hosts within a few hundred).
const MAX_TRIED_IDS: usize = 100_000;

/// A host id chosen for the scenario.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PickedHost {
    /// `host-N`.
    pub host_id: String,
    /// Its bucket for the tag, `0..10_000`.
    pub bucket: u16,
    /// Index of its first phase in [`PHASES`].
    pub phase: usize,
}

/// `per_phase` host ids for each of `phases` (percentages ascending to 100), phase by phase:
/// the first ids of `host-0, host-1, ...` whose bucket for `name:tag` falls in that phase.
pub fn pick_host_ids(
    name: &str,
    tag: &str,
    phases: &[u8],
    per_phase: usize,
) -> Result<Vec<PickedHost>, String> {
    let name = PackageName::new(name).map_err(|e| e.to_string())?;
    let tag = Tag::new(tag).map_err(|e| e.to_string())?;
    let phases: Vec<Phase> = phases.iter().map(|&p| Phase::Percent(p)).collect();
    let mut by_phase: Vec<Vec<PickedHost>> = vec![Vec::new(); phases.len()];
    for i in 0..MAX_TRIED_IDS {
        if by_phase.iter().all(|v| v.len() >= per_phase) {
            break;
        }
        let id = format!("host-{i}");
        let host = HostId::new(&id).map_err(|e| e.to_string())?;
        let b = bucket(&name, &tag, &host);
        let Some(phase) = first_phase(&phases, b, None) else {
            continue;
        };
        if by_phase[phase].len() < per_phase {
            by_phase[phase].push(PickedHost {
                host_id: id,
                bucket: b,
                phase,
            });
        }
    }
    if by_phase.iter().any(|v| v.len() < per_phase) {
        return Err(format!(
            "no {per_phase} host ids per phase among host-0..host-{MAX_TRIED_IDS}"
        ));
    }
    Ok(by_phase.into_iter().flatten().collect())
}

/// When one phase's hosts were all activated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseTime {
    /// The phase, in percent.
    pub percent: u8,
    /// Hosts this phase adds.
    pub new_hosts: usize,
    /// Seconds from `rollout start` until every host of this phase and the earlier ones ran
    /// `--on-change` for the new version; `None` if one never did.
    pub all_activated_secs: Option<f64>,
    /// What this phase added: its `all_activated_secs` minus the previous phase's (the first
    /// phase's is its own time).
    pub increment_secs: Option<f64>,
}

/// Phase by phase, when every host of it (and of the phases before: they are cumulative) was
/// activated. `host_phase[i]` is host i's phase index, `activated[i]` when it activated.
pub fn phase_times(
    phases: &[u8],
    host_phase: &[usize],
    activated: &[Option<f64>],
) -> Vec<PhaseTime> {
    let mut out: Vec<PhaseTime> = Vec::with_capacity(phases.len());
    let mut done_so_far = Some(0.0_f64);
    for (k, &percent) in phases.iter().enumerate() {
        let mine: Vec<Option<f64>> = host_phase
            .iter()
            .zip(activated)
            .filter(|(p, _)| **p == k)
            .map(|(_, t)| *t)
            .collect();
        let latest = mine
            .iter()
            .try_fold(0.0_f64, |acc, t| t.map(|t| acc.max(t)));
        let previous = done_so_far;
        done_so_far = match (done_so_far, latest) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
        out.push(PhaseTime {
            percent,
            new_hosts: mine.len(),
            all_activated_secs: done_so_far,
            increment_secs: match (done_so_far, previous) {
                (Some(now), Some(before)) => Some(now - before),
                _ => None,
            },
        });
    }
    out
}

/// One host in one rollout run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostActivation {
    /// Host label (`l001`, ...).
    pub host: String,
    /// Its `--host-id`.
    pub host_id: String,
    /// Its bucket.
    pub bucket: u16,
    /// Its phase, in percent.
    pub phase_percent: u8,
    /// Seconds from `rollout start` to its `--on-change` for the new version.
    pub activated_secs: Option<f64>,
}

/// One rollout run (prefetch on or off).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RolloutRun {
    /// `prefetch unlimited` or `prefetch off`.
    pub label: String,
    /// The agents' `--prefetch-rate`.
    pub prefetch_rate: String,
    /// Seconds from starting the followers until every one had activated the old version
    /// (setup, not measured against anything).
    pub old_version_all_activated_secs: Option<f64>,
    /// Seconds the `rollout start` command took (the clock starts before it).
    pub start_command_secs: f64,
    /// Seconds from `rollout start` until every host activated the new version.
    pub total_secs: Option<f64>,
    /// Per phase.
    pub phases: Vec<PhaseTime>,
    /// Per host.
    pub hosts: Vec<HostActivation>,
    /// Seed egress on the wire from `rollout start` to the end, over F.
    pub seed_amplification_wire: Option<f64>,
    /// When the tracker entered each phase after the first, (percent, seconds after it
    /// logged the start), from its log: set beside `phases` it shows whether a phase began
    /// before the previous one's hosts had all activated.
    pub tracker_phase_entered_secs: Vec<(u8, f64)>,
    /// The tracker's view of the rollout at the end (`rollout status --json`).
    pub tracker_view: serde_json::Value,
    /// Anything else worth knowing.
    pub notes: Vec<String>,
}

impl RolloutRun {
    /// The largest increment of the phases after the first (the target: under 1 s
    /// with prefetch).
    pub fn worst_later_increment(&self) -> Option<f64> {
        let later = self.phases.get(1..)?;
        if later.is_empty() {
            return None;
        }
        later
            .iter()
            .try_fold(0.0_f64, |acc, p| p.increment_secs.map(|i| acc.max(i)))
    }
}

/// Seconds of the day of a tracker log line's timestamp (`2026-11-30T20:09:12.258753Z ...`).
fn log_time_of_day(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?;
    let (_, time) = stamp.split_once('T')?;
    let mut hms = time.trim_end_matches('Z').split(':');
    let h: f64 = hms.next()?.parse().ok()?;
    let m: f64 = hms.next()?.parse().ok()?;
    let s: f64 = hms.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// From a tracker log: the phases its last rollout entered after the first, (percent,
/// seconds after it logged `rollout started`). Only time differences on the tracker's own
/// clock, so the date does not matter (a run across midnight wraps once).
pub fn phase_entries(log: &str) -> Vec<(u8, f64)> {
    let all: Vec<&str> = log.lines().collect();
    let Some(start) = all.iter().rposition(|l| l.contains("rollout started")) else {
        return Vec::new();
    };
    let lines = &all[start..];
    let Some(t0) = lines.first().and_then(|l| log_time_of_day(l)) else {
        return Vec::new();
    };
    lines
        .iter()
        .filter(|l| l.contains("rollout entered the next phase"))
        .filter_map(|l| {
            let percent = l
                .split_whitespace()
                .find_map(|w| w.strip_prefix("phase="))?
                .parse()
                .ok()?;
            let mut dt = log_time_of_day(l)? - t0;
            if dt < 0.0 {
                dt += 86_400.0;
            }
            Some((percent, dt))
        })
        .collect()
}

impl RolloutRun {
    /// Phases the tracker entered (by its log) more than [`EARLY_SLACK_SECS`] before the
    /// previous phase's hosts had all activated (by their files). The two clocks start
    /// apart by the `rollout start` command's latency, hence the slack.
    pub fn phases_entered_early(&self) -> Vec<u8> {
        self.tracker_phase_entered_secs
            .iter()
            .filter(|(percent, entered)| {
                let Some(k) = self.phases.iter().position(|p| p.percent == *percent) else {
                    return false;
                };
                let previous = k
                    .checked_sub(1)
                    .and_then(|j| self.phases.get(j))
                    .and_then(|p| p.all_activated_secs);
                previous.is_none_or(|done| *entered + EARLY_SLACK_SECS < done)
            })
            .map(|(p, _)| *p)
            .collect()
    }
}

/// See [`RolloutRun::phases_entered_early`].
pub const EARLY_SLACK_SECS: f64 = 0.1;

fn secs(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |t| format!("{t:.1} s"))
}

/// The scenario's table: the flash crowd's T_last beside each rollout's total and per-phase
/// increments, then the target and the host ids.
pub fn table(
    flash: &[(String, Option<f64>)],
    runs: &[RolloutRun],
    picked: &[PickedHost],
) -> String {
    let mut out = String::from("| run | to 100% activated |");
    let mut rule = String::from("|---|---|");
    for p in PHASES {
        let _ = write!(out, " {p}% (+increment) |");
        rule.push_str("---|");
    }
    out.push_str(" seed ampl. (wire) |\n");
    rule.push_str("---|\n");
    out.push_str(&rule);
    for (who, t_last) in flash {
        let _ = write!(out, "| flash crowd, {who} (T_last) | {} |", secs(*t_last));
        for _ in PHASES {
            out.push_str(" |");
        }
        out.push_str(" |\n");
    }
    for r in runs {
        let _ = write!(out, "| rollout, {} | {} |", r.label, secs(r.total_secs));
        for p in &r.phases {
            let inc = p
                .increment_secs
                .map_or_else(|| "-".to_owned(), |i| format!("+{i:.1}"));
            let _ = write!(out, " {} ({inc}) |", secs(p.all_activated_secs));
        }
        let _ = writeln!(
            out,
            " {} |",
            r.seed_amplification_wire
                .map_or_else(|| "-".to_owned(), |a| format!("{a:.2}"))
        );
    }
    for r in runs {
        if r.tracker_phase_entered_secs.is_empty() {
            continue;
        }
        let entered: Vec<String> = r
            .tracker_phase_entered_secs
            .iter()
            .map(|(p, t)| format!("{p}% at {t:.2} s"))
            .collect();
        let _ = writeln!(
            out,
            "{}: the tracker entered {} (after it logged the start)",
            r.label,
            entered.join(", ")
        );
    }
    for r in runs {
        let early = r.phases_entered_early();
        if !early.is_empty() {
            let early: Vec<String> = early.iter().map(|p| format!("{p}%")).collect();
            let _ = writeln!(
                out,
                "{}: the tracker entered {} before every host of the phase before had activated \
                 (a host silent past --rollout-host-timeout, or a gate bug), so those \
                 increments are not a phase's own time",
                r.label,
                early.join(", ")
            );
        }
    }
    for r in runs.iter().filter(|r| r.prefetch_rate != "off") {
        let verdict = match r.worst_later_increment() {
            Some(w) if w < 1.0 => format!("met (largest {w:.2} s)"),
            Some(w) => format!("NOT met (largest {w:.2} s)"),
            None => "not measured (a phase never completed)".to_owned(),
        };
        let _ = writeln!(
            out,
            "target, {}: every phase after the first adds under 1 s: {verdict}",
            r.label
        );
    }
    let ids: Vec<String> = picked
        .iter()
        .map(|h| {
            format!(
                "{}={}%",
                h.host_id,
                PHASES.get(h.phase).copied().unwrap_or(100)
            )
        })
        .collect();
    let _ = writeln!(
        out,
        "host ids picked by bucket so each phase adds the same number of hosts: {}",
        ids.join(", ")
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_phase_gets_its_quota_in_order() {
        let picked = pick_host_ids("pkg", "prod", &PHASES, 4).unwrap();
        assert_eq!(picked.len(), 16);
        for (i, h) in picked.iter().enumerate() {
            assert_eq!(h.phase, i / 4, "{h:?}");
            let lo = if h.phase == 0 {
                0
            } else {
                u16::from(PHASES[h.phase - 1]) * 100
            };
            let hi = u16::from(PHASES[h.phase]) * 100;
            assert!((lo..hi).contains(&h.bucket), "{h:?}");
            let id = HostId::new(&h.host_id).unwrap();
            let name = PackageName::new("pkg").unwrap();
            let tag = Tag::new("prod").unwrap();
            assert_eq!(bucket(&name, &tag, &id), h.bucket);
        }
        let mut ids: Vec<&str> = picked.iter().map(|h| h.host_id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 16, "no id twice");
    }

    #[test]
    fn phases_are_cumulative_and_increments_add_up() {
        let host_phase = [0, 0, 1, 1, 2, 3];
        let t = [
            Some(5.0),
            Some(6.0),
            Some(5.5),
            Some(6.4),
            Some(7.0),
            Some(7.2),
        ];
        let p = phase_times(&[25, 50, 75, 100], &host_phase, &t);
        let done: Vec<Option<f64>> = p.iter().map(|p| p.all_activated_secs).collect();
        // Phase 2's hosts were quicker than phase 1's last: the phase ends with phase 1's.
        assert_eq!(done, [Some(6.0), Some(6.4), Some(7.0), Some(7.2)]);
        let inc: f64 = p.iter().filter_map(|p| p.increment_secs).sum();
        assert!((inc - 7.2).abs() < 1e-9);
        assert_eq!(p[0].new_hosts, 2);
        assert_eq!(p[3].new_hosts, 1);
    }

    #[test]
    fn a_host_that_never_activates_leaves_its_phase_and_later_ones_open() {
        let p = phase_times(&[50, 100], &[0, 1], &[None, Some(1.0)]);
        assert_eq!(p[0].all_activated_secs, None);
        assert_eq!(p[1].all_activated_secs, None);
        assert_eq!(p[1].increment_secs, None);
    }

    #[test]
    fn the_target_looks_at_later_phases_only() {
        let run = |incs: [f64; 4]| RolloutRun {
            label: "prefetch unlimited".into(),
            prefetch_rate: "unlimited".into(),
            old_version_all_activated_secs: None,
            start_command_secs: 0.0,
            total_secs: Some(incs.iter().sum()),
            phases: incs
                .iter()
                .map(|&i| PhaseTime {
                    percent: 25,
                    new_hosts: 4,
                    all_activated_secs: None,
                    increment_secs: Some(i),
                })
                .collect(),
            hosts: Vec::new(),
            seed_amplification_wire: None,
            tracker_phase_entered_secs: vec![(50, 9.5)],
            tracker_view: serde_json::Value::Null,
            notes: Vec::new(),
        };
        assert_eq!(
            run([9.0, 0.5, 0.25, 0.75]).worst_later_increment(),
            Some(0.75)
        );
        let t = table(&[], &[run([9.0, 0.5, 0.25, 1.5])], &[]);
        assert!(t.contains("NOT met (largest 1.50 s)"), "{t}");
        assert!(t.contains("entered 50% at 9.50 s"), "{t}");
        assert!(!t.contains("before every host"), "{t}");
    }

    #[test]
    fn a_phase_entered_before_the_previous_one_finished_is_flagged() {
        let phase = |percent, done| PhaseTime {
            percent,
            new_hosts: 4,
            all_activated_secs: Some(done),
            increment_secs: None,
        };
        let run = RolloutRun {
            label: "prefetch off".into(),
            prefetch_rate: "off".into(),
            old_version_all_activated_secs: None,
            start_command_secs: 0.0,
            total_secs: Some(20.0),
            phases: vec![phase(50, 9.7), phase(100, 20.0)],
            hosts: Vec::new(),
            seed_amplification_wire: None,
            // 100% entered while the 50% hosts were still at it (7.6 < 9.7).
            tracker_phase_entered_secs: vec![(100, 7.6)],
            tracker_view: serde_json::Value::Null,
            notes: Vec::new(),
        };
        assert_eq!(run.phases_entered_early(), [100]);
        let t = table(&[], std::slice::from_ref(&run), &[]);
        assert!(t.contains("entered 100% before every host"), "{t}");
        let on_time = RolloutRun {
            tracker_phase_entered_secs: vec![(100, 9.75)],
            ..run
        };
        assert!(on_time.phases_entered_early().is_empty());
    }

    #[test]
    fn phase_entries_of_the_last_rollout_in_a_tracker_log() {
        let log = "\
2026-11-30T20:08:54.799550Z  INFO fbpkg_tracker::http::rollouts: rollout started package=pkg tag=prod id=2
2026-11-30T20:09:12.258753Z  INFO fbpkg_tracker::rollout: rollout entered the next phase package=pkg tag=prod id=2 phase=50
2026-11-30T23:59:59.500000Z  INFO fbpkg_tracker::http::rollouts: rollout started package=pkg tag=prod id=2
2026-11-30T23:59:59.700000Z  WARN something else
2026-12-01T00:00:00.250000Z  INFO fbpkg_tracker::rollout: rollout entered the next phase package=pkg tag=prod id=2 phase=75
garbage line phase=100 rollout entered the next phase
";
        let e = phase_entries(log);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].0, 75);
        assert!((e[0].1 - 0.75).abs() < 1e-6, "{e:?}");
        assert!(phase_entries("no rollout here").is_empty());
    }
}
