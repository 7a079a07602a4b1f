//! `--cpu` / `--rss`: CPU seconds per GiB delivered and the agent's peak RSS, unshaped, with
//! every host on 127.0.0.1 inside one namespace (`fbsb-cpu`), so only CPU can be the limit.
//!
//! CPU is the sum of user + system time of every process of the contender (agents, `get`,
//! `publish` for fbpkg-rs; every session for librqbit), read from /proc/PID/stat while the
//! process exists (a zombie still has it), tracker excluded; divided by N x F in GiB. Peak RSS
//! is VmHWM of each fbpkg-rs agent, sampled every 200 ms and just before it is stopped; for
//! librqbit each node reports its own VmHWM as it exits.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::contenders::{self, Ctx, Package, Which};
use crate::measure::ContenderRun;
use crate::topology::LoopbackNs;

/// One contender's figures.
#[derive(Debug, Serialize)]
pub struct CpuFigures {
    /// Contender.
    pub contender: String,
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
    /// Per contender.
    pub contenders: Vec<CpuFigures>,
}

fn figures(which: Which, run: anyhow::Result<ContenderRun>, n: usize, size: u64) -> CpuFigures {
    let mut f = CpuFigures {
        contender: which.name().to_owned(),
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
}

/// Run the CPU mode.
pub fn run(s: &CpuSettings<'_>) -> anyhow::Result<CpuReport> {
    let ns = LoopbackNs::create()?;
    let hosts = ns.hosts(s.leechers);
    let mut out = Vec::new();
    for &which in &s.which {
        if which == Which::Http {
            continue;
        }
        eprintln!("swarm_bench: {} mode: {}", s.label, which.name());
        let ctx = Ctx {
            hosts: &hosts,
            topo: None,
            pkg: s.pkg,
            more: &[],
            fbpkg_bin: s.fbpkg_bin,
            self_exe: s.self_exe,
            dir: s.work.join(format!("{}-{}", s.label, which.name())),
            logs: s.logs.to_owned(),
            log_prefix: format!("{}-{}", s.label, which.name()),
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
        out.push(figures(which, result, s.leechers, s.pkg.size));
    }
    Ok(CpuReport {
        leechers: s.leechers,
        package_bytes: s.pkg.size,
        contenders: out,
    })
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
        if let Some(e) = &f.error {
            t.push_str(&format!("| {} | error: {e} |\n", f.contender));
            continue;
        }
        t.push_str(&format!(
            "| {} | {:.1} ({:.1}) | {:.2} | {} | {} | {} | {} | {} |\n",
            f.contender,
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
    t
}
