//! `--cpu` / `--rss`: CPU seconds per GiB delivered and the agent's peak RSS, unshaped, with
//! every host on 127.0.0.1 inside one namespace (`fbsb-cpu`), so only CPU can be the limit.
//!
//! CPU is the sum of user + system time of every process of the contender (agents, `get`,
//! `publish` for fbpkg-rs; every session for librqbit), read from /proc/PID/stat while the
//! process exists (a zombie still has it), tracker excluded; divided by N x F in GiB. Peak RSS
//! is VmHWM of each fbpkg-rs agent, sampled every 200 ms and just before it is stopped; for
//! librqbit each node reports its own VmHWM as it exits.
//!
//! With `--cpu-rounds` above 1 every contender runs once per round, the order reversed every
//! other round, and the report adds each one's mean: what a contender pays to write its
//! downloads into memory depends on what ran before it on a VM whose host backs memory lazily.
//! Before the first run the mode writes and frees as much memory as a run writes, so that the
//! first contender does not start on memory idle for longer than the others'
//! ([`crate::warm`]).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::contenders::{self, Ctx, Package, Which};
use crate::measure::ContenderRun;
use crate::topology::{Hosts, LoopbackNs};

/// One contender's figures.
#[derive(Debug, Serialize)]
pub struct CpuFigures {
    /// Contender.
    pub contender: String,
    /// Round, from 1.
    pub round: usize,
    /// Place in its round's order, from 1.
    pub position: usize,
    /// CPU seconds of all its processes (tracker excluded).
    pub cpu_secs: f64,
    /// cpu_secs / (N F in GiB).
    pub cpu_secs_per_gib: f64,
    /// The system (kernel) part of cpu_secs.
    pub sys_secs: f64,
    /// CPU seconds by role.
    pub cpu_by_role: BTreeMap<String, f64>,
    /// Tracker CPU seconds (not in the total).
    pub tracker_cpu_secs: f64,
    /// Time of the last leecher (unshaped: how fast CPU lets it go).
    pub t_last_secs: Option<f64>,
    /// Peak RSS of the seed process.
    pub seed_peak_rss_bytes: Option<u64>,
    /// Largest peak RSS among leecher processes (the agent for fbpkg-rs, the session for
    /// librqbit).
    pub leecher_peak_rss_bytes_max: Option<u64>,
    /// Each leecher's peak RSS.
    pub leecher_peak_rss_bytes: Vec<Option<u64>>,
    /// Every leecher's bytes verified.
    pub all_verified: bool,
    /// Whole machine busy cores over the window (others' load included).
    pub machine_busy_cores: Option<f64>,
    /// The full run.
    pub run: Option<ContenderRun>,
    /// What went wrong.
    pub error: Option<String>,
}

/// The CPU-mode report.
#[derive(Debug, Serialize)]
pub struct CpuReport {
    /// Leechers.
    pub leechers: usize,
    /// Package bytes.
    pub package_bytes: u64,
    /// Rounds.
    pub rounds: usize,
    /// Per contender and round, in the order they ran.
    pub contenders: Vec<CpuFigures>,
    /// Each contender's CPU s/GiB over the rounds it completed.
    pub means: Vec<CpuMean>,
}

/// A contender's CPU seconds per GiB over the rounds.
#[derive(Debug, Serialize, PartialEq)]
pub struct CpuMean {
    /// Contender.
    pub contender: String,
    /// Rounds with every leecher verified (the others are left out).
    pub rounds: usize,
    /// Mean CPU s/GiB.
    pub mean: f64,
    /// Lowest.
    pub min: f64,
    /// Highest.
    pub max: f64,
}

/// The contenders of round `round` (from 0): as given, reversed in every odd round.
fn round_order(which: &[Which], round: usize) -> Vec<Which> {
    let mut order: Vec<Which> = which
        .iter()
        .copied()
        .filter(|&w| w != Which::Http)
        .collect();
    if round % 2 == 1 {
        order.reverse();
    }
    order
}

/// Each contender's mean over its verified rounds, in the order of `which`.
fn means(which: &[Which], figs: &[CpuFigures]) -> Vec<CpuMean> {
    which
        .iter()
        .filter_map(|w| {
            let v: Vec<f64> = figs
                .iter()
                .filter(|f| f.contender == w.name() && f.all_verified && f.error.is_none())
                .map(|f| f.cpu_secs_per_gib)
                .collect();
            (!v.is_empty()).then(|| CpuMean {
                contender: w.name().to_owned(),
                rounds: v.len(),
                mean: v.iter().sum::<f64>() / v.len() as f64,
                min: v.iter().copied().fold(f64::INFINITY, f64::min),
                max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            })
        })
        .collect()
}

fn figures(
    which: Which,
    (round, position): (usize, usize),
    run: anyhow::Result<ContenderRun>,
    n: usize,
    size: u64,
) -> CpuFigures {
    let mut f = CpuFigures {
        contender: which.name().to_owned(),
        round,
        position,
        cpu_secs: 0.0,
        cpu_secs_per_gib: 0.0,
        sys_secs: 0.0,
        cpu_by_role: BTreeMap::new(),
        tracker_cpu_secs: 0.0,
        t_last_secs: None,
        seed_peak_rss_bytes: None,
        leecher_peak_rss_bytes_max: None,
        leecher_peak_rss_bytes: Vec::new(),
        all_verified: false,
        machine_busy_cores: None,
        run: None,
        error: None,
    };
    let run = match run {
        Ok(r) => r,
        Err(e) => {
            f.error = Some(format!("{e:#}"));
            return f;
        }
    };
    let gib = n as f64 * size as f64 / f64::from(1u32 << 30);
    f.cpu_secs = run.cpu.total_secs_without_tracker;
    f.cpu_secs_per_gib = f.cpu_secs / gib;
    f.sys_secs = run.cpu.sys_secs_without_tracker;
    f.cpu_by_role = run.cpu.by_role.clone();
    f.tracker_cpu_secs = run.cpu.by_role.get("tracker").copied().unwrap_or(0.0);
    f.machine_busy_cores = run.cpu.machine_busy_cores;
    f.all_verified = run.leechers.iter().all(|l| l.verified);
    if f.all_verified {
        f.t_last_secs = run
            .leechers
            .iter()
            .filter_map(|l| l.done_secs)
            .reduce(f64::max);
    }
    f.seed_peak_rss_bytes = run
        .processes
        .iter()
        .find(|p| p.role == "seed")
        .and_then(|p| p.peak_rss_bytes);
    f.leecher_peak_rss_bytes = run
        .processes
        .iter()
        .filter(|p| p.role == "leecher")
        .map(|p| p.peak_rss_bytes)
        .collect();
    f.leecher_peak_rss_bytes_max = f.leecher_peak_rss_bytes.iter().flatten().copied().max();
    f.run = Some(run);
    f
}

/// Settings of the CPU mode.
#[derive(Debug)]
pub struct CpuSettings<'a> {
    /// Contenders (HTTP is left out: it does no hashing or piece work to compare).
    pub which: Vec<Which>,
    /// Leechers.
    pub leechers: usize,
    /// The package (announce URL on 127.0.0.1).
    pub pkg: &'a Package,
    /// fbpkg-rs binary.
    pub fbpkg_bin: &'a std::path::Path,
    /// This binary.
    pub self_exe: &'a std::path::Path,
    /// Work directory.
    pub work: &'a std::path::Path,
    /// Logs.
    pub logs: &'a std::path::Path,
    /// Label for log files (`cpu` or `rss`).
    pub label: &'a str,
    /// Runs of each contender (see the module's doc).
    pub rounds: usize,
    /// Warm memory before the first run ([`crate::warm`]).
    pub warm: bool,
}

/// Run the CPU mode.
pub fn run(s: &CpuSettings<'_>) -> anyhow::Result<CpuReport> {
    let ns = LoopbackNs::create()?;
    let hosts = ns.hosts(s.leechers);
    if s.warm {
        let footprint = (s.leechers as u64 + 1).saturating_mul(s.pkg.size);
        crate::warm::before_first(s.work, footprint, &format!("{} mode", s.label));
    }
    let mut out = Vec::new();
    for round in 0..s.rounds {
        for (i, which) in round_order(&s.which, round).into_iter().enumerate() {
            out.push(run_one(s, &hosts, which, (round + 1, i + 1))?);
        }
    }
    Ok(CpuReport {
        leechers: s.leechers,
        package_bytes: s.pkg.size,
        rounds: s.rounds,
        means: means(&s.which, &out),
        contenders: out,
    })
}

/// One contender's run in one round.
fn run_one(
    s: &CpuSettings<'_>,
    hosts: &Hosts,
    which: Which,
    (round, position): (usize, usize),
) -> anyhow::Result<CpuFigures> {
    let tag = if s.rounds > 1 {
        format!("{}-r{round}", which.name())
    } else {
        which.name().to_owned()
    };
    eprintln!("swarm_bench: {} mode: {tag}", s.label);
    let ctx = Ctx {
        hosts,
        topo: None,
        pkg: s.pkg,
        more: &[],
        fbpkg_bin: s.fbpkg_bin,
        self_exe: s.self_exe,
        dir: s.work.join(format!("{}-{tag}", s.label)),
        logs: s.logs.to_owned(),
        log_prefix: format!("{}-{tag}", s.label),
        deadline: Duration::from_secs(600),
        t_kr_secs: 0.0,
        sample_every: Duration::from_secs(1),
        rqbit_linger: false,
        agent_args: &[],
        churn: None,
        hold: None,
    };
    let result = contenders::run(which, &ctx);
    crate::procs::check_cancelled()?;
    Ok(figures(
        which,
        (round, position),
        result,
        s.leechers,
        s.pkg.size,
    ))
}

fn mib(b: Option<u64>) -> String {
    b.map(|b| format!("{:.1}", b as f64 / f64::from(1u32 << 20)))
        .unwrap_or_else(|| "-".into())
}

/// A short table.
pub fn table(r: &CpuReport) -> String {
    let mut t = format!(
        "CPU mode: N={} F={} on loopback, unshaped\n\
         | contender | CPU s (of which kernel) | CPU s/GiB delivered | T_last | seed peak RSS MiB | leecher peak RSS MiB (max) | verified | machine busy cores |\n\
         |---|---|---|---|---|---|---|---|\n",
        r.leechers,
        fbpkg_benches::swarm::report::size(r.package_bytes)
    );
    for f in &r.contenders {
        let name = if r.rounds > 1 {
            format!("{} (round {}, #{})", f.contender, f.round, f.position)
        } else {
            f.contender.clone()
        };
        if let Some(e) = &f.error {
            t.push_str(&format!("| {name} | error: {e} |\n"));
            continue;
        }
        t.push_str(&format!(
            "| {} | {:.1} ({:.1}) | {:.2} | {} | {} | {} | {} | {} |\n",
            name,
            f.cpu_secs,
            f.sys_secs,
            f.cpu_secs_per_gib,
            f.t_last_secs
                .map(|t| format!("{t:.1} s"))
                .unwrap_or_else(|| "-".into()),
            mib(f.seed_peak_rss_bytes),
            mib(f.leecher_peak_rss_bytes_max),
            f.all_verified,
            f.machine_busy_cores
                .map(|c| format!("{c:.2}"))
                .unwrap_or_else(|| "-".into()),
        ));
    }
    if r.rounds > 1 {
        t.push_str(&format!(
            "CPU s/GiB over {} rounds, the order reversed every other round: ",
            r.rounds
        ));
        let each: Vec<String> = r
            .means
            .iter()
            .map(|m| {
                format!(
                    "{} {:.2} ({:.2}-{:.2}, {} verified)",
                    m.contender, m.mean, m.min, m.max, m.rounds
                )
            })
            .collect();
        t.push_str(&each.join(", "));
        t.push('\n');
    } else if r.contenders.len() > 1 {
        t.push_str(
            "One round, in this order (--cpu-rounds 2 runs each contender again, the order \
             reversed, and prints each one's mean).\n",
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fig(which: Which, round: usize, per_gib: f64, verified: bool) -> CpuFigures {
        let mut f = figures(which, (round, 1), Err(anyhow::anyhow!("x")), 8, 1 << 30);
        f.error = None;
        f.cpu_secs_per_gib = per_gib;
        f.all_verified = verified;
        f
    }

    #[test]
    fn every_other_round_runs_the_contenders_in_reverse() {
        let which = [Which::Fbpkg, Which::Http, Which::Rqbit, Which::Aria2];
        let first = [Which::Fbpkg, Which::Rqbit, Which::Aria2];
        assert_eq!(round_order(&which, 0), first);
        let mut back = first.to_vec();
        back.reverse();
        assert_eq!(round_order(&which, 1), back);
        assert_eq!(round_order(&which, 2), first);
    }

    #[test]
    fn means_leave_out_rounds_not_verified() {
        let figs = [
            fig(Which::Fbpkg, 1, 16.0, true),
            fig(Which::Rqbit, 1, 13.0, true),
            fig(Which::Rqbit, 2, 15.0, true),
            fig(Which::Fbpkg, 2, 9.0, true),
            fig(Which::Fbpkg, 3, 1.0, false),
        ];
        let m = means(&[Which::Fbpkg, Which::Rqbit, Which::Aria2], &figs);
        assert_eq!(
            m,
            [
                CpuMean {
                    contender: "fbpkg-rs".into(),
                    rounds: 2,
                    mean: 12.5,
                    min: 9.0,
                    max: 16.0
                },
                CpuMean {
                    contender: "librqbit".into(),
                    rounds: 2,
                    mean: 14.0,
                    min: 13.0,
                    max: 15.0
                },
            ]
        );
    }
}
