//! The run: scenarios one after the other, every contender in each, then the report.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, ensure};
use fbpkg_benches::swarm::netplan::{Plan, Queue, Tbf};
use fbpkg_benches::swarm::report::{self, Row, Summary};
use fbpkg_benches::swarm::rollout::{self as rollout_report, PHASES, PickedHost, RolloutRun};
use fbpkg_benches::swarm::scenario::{DELTA_CHANGED_SHARE, KumarRoss, Scenario};
use fbpkg_benches::{delta_tree, fbpkg_binary};
use fbpkg_common::metainfo::{Format, Metainfo};
use rand::Rng as _;
use serde::Serialize;

use crate::calibrate::{self, Calibration};
use crate::cleanup::{self, WorkDir};
use crate::contenders::{self, Ctx, PACKAGE_NAME, Package, TRACKER_PORT, Which, churn};
use crate::cpu::{self, CpuReport, CpuSettings};
use crate::measure::{ContenderRun, tree_digests};
use crate::procs;
use crate::topology::{Topology, sysctl_in};
use crate::warm;
use crate::{Args, is_root};

/// One contender's slot in a scenario.
#[derive(Debug, Serialize)]
pub struct Entry {
    /// Contender.
    pub contender: String,
    /// What it measured.
    pub run: Option<ContenderRun>,
    /// Why it has no result.
    pub error: Option<String>,
}

/// One scenario.
#[derive(Debug, Serialize)]
pub struct ScenarioReport {
    /// N, F, caps.
    pub scenario: Scenario,
    /// The bound.
    pub kumar_ross: KumarRoss,
    /// Leechers not done by then timed out.
    pub deadline_secs: f64,
    /// Shaping of every cap in this scenario.
    pub tbf: Tbf,
    /// TCP congestion control in the host namespaces.
    pub tcp_congestion_control: String,
    /// Single-flow calibration of the caps.
    pub calibration: Vec<Calibration>,
    /// Contenders in the order run.
    pub contenders: Vec<Entry>,
    /// The `rollout` scenario's rollouts (prefetch on and off), after the flash crowds.
    pub rollout: Option<RolloutReport>,
    /// The `delta` scenario's run of fbpkg-rs hosts holding version N, after the flash crowds.
    pub delta: Option<DeltaReport>,
    /// The tables.
    pub table: String,
}

/// The rollouts of the `rollout` scenario.
#[derive(Debug, Serialize)]
pub struct RolloutReport {
    /// What was run.
    pub how: String,
    /// The leechers' host ids, in host order (`l001` first), each with its bucket and phase.
    pub host_ids: Vec<PickedHost>,
    /// Prefetch unlimited, then off.
    pub runs: Vec<RolloutRun>,
    /// Runs that failed, and why.
    pub errors: Vec<String>,
}

/// The `delta` scenario's versions, and fbpkg-rs's run from N to N+1.
#[derive(Debug, Serialize)]
pub struct DeltaReport {
    /// What was run.
    pub how: String,
    /// Files in version N+1.
    pub files: usize,
    /// Bytes of the files N+1 changed or added.
    pub changed_bytes: u64,
    /// N+1's metainfo.
    pub metainfo_bytes: u64,
    /// Most bytes a host may receive, and the origin send per copy (issue 13: 1.2 x the
    /// changed bytes, plus the metainfo).
    pub target_bytes: u64,
    /// The run, when it ran.
    pub run: Option<ContenderRun>,
    /// Why it did not.
    pub error: Option<String>,
}

/// Versions N and N+1 of the `delta` scenario's tree, as made.
struct DeltaMade {
    /// Version N.
    old: Package,
    /// Bytes of the files N+1 changed or added.
    changed_bytes: u64,
    /// Files in N+1.
    files: usize,
}

/// The machine.
#[derive(Debug, Serialize)]
pub struct Machine {
    /// Cores.
    pub cores: usize,
    /// `uname -r`.
    pub kernel: String,
    /// /proc/loadavg before.
    pub loadavg_before: String,
    /// /proc/loadavg after.
    pub loadavg_after: String,
}

/// The whole report.
#[derive(Debug, Serialize)]
pub struct Report {
    /// What this is.
    pub benchmark: &'static str,
    /// The command line.
    pub command: Vec<String>,
    /// Unix time at the start.
    pub started_unix: u64,
    /// The machine.
    pub machine: Machine,
    /// Shaping of scenarios of up to 16 leechers (each scenario reports what it ran with).
    pub tbf: Tbf,
    /// fbpkg-rs binary used.
    pub fbpkg_bin: PathBuf,
    /// Scenarios.
    pub scenarios: Vec<ScenarioReport>,
    /// `--cpu`.
    pub cpu: Option<CpuReport>,
    /// `--rss`.
    pub rss: Option<CpuReport>,
    /// BENCHMARKS.md-shaped summary over the scenarios.
    pub summary_table: String,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Random bytes on tmpfs and the metainfo `fbpkg-rs publish` makes for them with this
/// tracker (same name, announce URL and format, so the same bytes).
fn make_package(dir: &Path, name: &str, size: u64, tracker: &str) -> anyhow::Result<Package> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir)?;
    let file_name = format!("{name}.bin");
    let path = dir.join(&file_name);
    {
        let mut f = std::io::BufWriter::with_capacity(
            4 << 20,
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?,
        );
        let mut rng = rand::rng();
        let mut buf = vec![0u8; 4 << 20];
        let mut left = size;
        while left > 0 {
            let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
            rng.fill_bytes(&mut buf[..n]);
            f.write_all(&buf[..n])?;
            left -= n as u64;
        }
        f.flush()?;
    }
    // Not executable: `publish` would record the execute bit in the metainfo.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
    let announce = format!("{tracker}/announce");
    let reader = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(&path)?);
    let meta = Metainfo::build(reader, size, &file_name, &announce, Format::File)?;
    Ok(Package {
        name: name.to_owned(),
        path,
        file_name,
        size,
        sha256: meta.sha256.to_hex(),
        metainfo: meta.as_bytes().to_vec(),
        info_hash: meta.info_hash.to_hex(),
        tree: None,
    })
}

/// The `delta` scenario's two versions of a tree of `size` bytes (`fbpkg_benches::delta_tree`)
/// under `dir`: N+1 (returned first, what the flash crowds distribute) shares the blocks of
/// every file it does not change with N.
fn make_delta(dir: &Path, size: u64, tracker: &str) -> anyhow::Result<(Package, DeltaMade)> {
    let old_root = dir.join("n").join(PACKAGE_NAME);
    let new_root = dir.join("n+1").join(PACKAGE_NAME);
    let tree = delta_tree::make_tree(&old_root, size, DELTA_CHANGED_SHARE)?;
    delta_tree::link_copy(&old_root, &new_root)?;
    let changed_bytes = delta_tree::make_next(&new_root, &tree)?;
    let new = tree_package(&new_root, PACKAGE_NAME, tracker)?;
    let made = DeltaMade {
        old: tree_package(&old_root, PACKAGE_NAME, tracker)?,
        changed_bytes,
        files: new.tree.as_ref().map_or(0, BTreeMap::len),
    };
    Ok((new, made))
}

/// The directory `root` as the tree package `fbpkg-rs publish NAME ROOT` makes of it with this
/// tracker (the same metainfo), and each file's SHA-256 to check copies against.
fn tree_package(root: &Path, name: &str, tracker: &str) -> anyhow::Result<Package> {
    let items = fbpkg_peer::archive::tree_items(root)
        .with_context(|| format!("walking {}", root.display()))?;
    let open = |path: &[String]| {
        let mut p = root.to_owned();
        p.extend(path);
        std::fs::File::open(&p).map(|f| std::io::BufReader::with_capacity(1 << 20, f))
    };
    let announce = format!("{tracker}/announce");
    let meta = Metainfo::build_tree(items, open, name, &announce)?;
    Ok(Package {
        name: name.to_owned(),
        path: root.to_owned(),
        file_name: name.to_owned(),
        size: delta_tree::tree_bytes(root)?,
        sha256: meta.sha256.to_hex(),
        metainfo: meta.as_bytes().to_vec(),
        info_hash: meta.info_hash.to_hex(),
        tree: Some(tree_digests(root, false)?),
    })
}

/// The `delta` scenario after its flash crowds: fbpkg-rs from fresh agents that first fetch
/// version N (not timed), then N+1 at one instant.
fn run_delta(ctx: &Ctx<'_>, s: &Scenario, made: &DeltaMade) -> anyhow::Result<DeltaReport> {
    procs::check_cancelled()?;
    log_progress(&format!("{}: fbpkg-rs, hosts holding N fetch N+1", s.name));
    let metainfo_bytes = ctx.pkg.metainfo.len() as u64;
    let target_bytes = (1.2 * made.changed_bytes as f64) as u64 + metainfo_bytes;
    let result = contenders::run(Which::Fbpkg, ctx);
    procs::check_cancelled()?;
    let (run, error) = match result {
        Ok(run) => {
            let received = received_per_host(&run);
            log_progress(&format!(
                "{}: fbpkg-rs from N: T_last {} received per host {} (target {})",
                s.name,
                run.summary
                    .as_ref()
                    .and_then(|sm| sm.t_last_secs)
                    .map_or_else(|| "-".into(), |t| format!("{t:.1} s")),
                span_mib(&received),
                report::size(target_bytes)
            ));
            (Some(run), None)
        }
        Err(e) => {
            log_progress(&format!("{}: fbpkg-rs from N failed: {e:#}", s.name));
            (None, Some(format!("{e:#}")))
        }
    };
    Ok(DeltaReport {
        how: format!(
            "{} fresh fbpkg-rs hosts fetch version N ({} files; not timed), then N+1 at one \
             instant; N+1 changes {} of {} ({:.1}%): one large file replaced, ten small ones \
             edited, one added",
            s.leechers,
            made.files.saturating_sub(1),
            report::size(made.changed_bytes),
            report::size(ctx.pkg.size),
            100.0 * made.changed_bytes as f64 / ctx.pkg.size.max(1) as f64
        ),
        files: made.files,
        changed_bytes: made.changed_bytes,
        metainfo_bytes,
        target_bytes,
        run,
        error,
    })
}

/// Piece bytes each leecher's agent says it received of the package (fbpkg-rs runs only).
fn received_per_host(run: &ContenderRun) -> Vec<u64> {
    run.leechers
        .iter()
        .filter_map(|l| received(run, &l.host))
        .collect()
}

/// Piece bytes host `label`'s agent says it received of the package (fbpkg-rs runs only).
fn received(run: &ContenderRun, label: &str) -> Option<u64> {
    run.payload["per_agent"][label]["downloaded"].as_u64()
}

/// `lo–hi MiB` of `bytes`, or `-` when empty.
fn span_mib(bytes: &[u64]) -> String {
    let (Some(lo), Some(hi)) = (bytes.iter().min(), bytes.iter().max()) else {
        return "-".into();
    };
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    format!("{:.1}–{:.1} MiB", mib(*lo), mib(*hi))
}

/// The `delta` scenario's table: fbpkg-rs from N beside every contender's full fetch of N+1.
fn delta_table(d: &DeltaReport, entries: &[Entry], n: usize) -> String {
    let mut t = format!(
        "\ndelta: {}\n{:<28} {:>9} {:>9} {:>22} {:>22} {:>24}\n",
        d.how,
        "run",
        "T_last",
        "verified",
        "received/host",
        "on the wire/host",
        "origin sent/copy (wire)"
    );
    let rows = std::iter::once(("fbpkg-rs, hosts hold N".to_owned(), d.run.as_ref())).chain(
        entries
            .iter()
            .map(|e| (format!("{}, full", e.contender), e.run.as_ref())),
    );
    let per_copy = |b: Option<u64>| {
        b.map_or_else(
            || "-".into(),
            |b| format!("{:.1} MiB", b as f64 / n.max(1) as f64 / f64::from(1 << 20)),
        )
    };
    for (name, run) in rows {
        let Some(run) = run else { continue };
        let received = received_per_host(run);
        let wire: Vec<u64> = run
            .leechers
            .iter()
            .filter_map(|l| run.hosts_wire.get(&l.host).map(|w| w.down))
            .collect();
        let sm = run.summary.as_ref();
        t.push_str(&format!(
            "{:<28} {:>9} {:>9} {:>22} {:>22} {:>24}\n",
            name,
            sm.and_then(|s| s.t_last_secs)
                .map_or_else(|| "-".into(), |v| format!("{v:.1} s")),
            sm.map_or_else(|| "-".into(), |s| format!("{}/{}", s.verified, s.n)),
            span_mib(&received),
            span_mib(&wire),
            format!(
                "{} ({})",
                per_copy(run.seed_payload_bytes),
                per_copy(run.seed_wire_tx_bytes)
            ),
        ));
    }
    let verdict = match &d.run {
        Some(run) => {
            let hosts_ok = run
                .leechers
                .iter()
                .all(|l| received(run, &l.host).is_some_and(|r| r <= d.target_bytes));
            let origin_ok = run
                .seed_payload_bytes
                .is_some_and(|b| b / n.max(1) as u64 <= d.target_bytes);
            let all_verified = run.summary.as_ref().is_some_and(|s| s.verified == s.n);
            if hosts_ok && origin_ok && all_verified {
                "met"
            } else {
                "MISSED"
            }
        }
        None => "not run",
    };
    t.push_str(&format!(
        "target (issue 13): every host verified, received per host and origin sent per copy <= \
         1.2 x changed + metainfo ({}): {verdict}\n",
        report::size(d.target_bytes)
    ));
    if let Some(e) = &d.error {
        t.push_str(&format!("fbpkg-rs, hosts hold N: error: {e}\n"));
    }
    t
}

fn log_progress(msg: &str) {
    eprintln!("swarm_bench: {msg}");
}

struct Common<'a> {
    args: &'a Args,
    work: &'a WorkDir,
    fbpkg_bin: &'a Path,
    self_exe: &'a Path,
}

fn run_scenario(c: &Common<'_>, s: &Scenario) -> anyhow::Result<ScenarioReport> {
    let kr = s.kumar_ross();
    let deadline = s.deadline(c.args.deadline_factor, c.args.min_deadline());
    log_progress(&report::scenario_header(
        s,
        kr.t_kr_secs,
        deadline.as_secs_f64(),
    ));
    let tbf = c.args.tbf(s.leechers)?;
    log_progress(&format!(
        "tbf burst {} bytes, latency {} ms{}",
        tbf.burst_bytes,
        tbf.latency_ms,
        match tbf.queue {
            Queue::Fifo => "",
            Queue::SmallFirst => ", small packets first (htb; not BENCHMARKS.md's links)",
        }
    ));
    let topo = Topology::create(Plan::new(s, tbf))?;
    let cc = sysctl_in(
        &topo.plan.seed().ns,
        "/proc/sys/net/ipv4/tcp_congestion_control",
    );
    let calibration = if c.args.calibrate_secs > 0.0 {
        log_progress("calibrating: one TCP flow through each kind of cap");
        let cal = calibrate::run(&topo, c.self_exe, &c.work.logs(), c.args.calibrate_secs)?;
        eprint!("{}", calibrate::table(&cal));
        cal
    } else {
        Vec::new()
    };
    let hosts = topo.hosts();
    let tracker_url = format!("http://{}", hosts.tracker.addr(TRACKER_PORT));
    let pkg_dir = c.work.path.join(format!("{}-package", s.name));
    log_progress(&format!(
        "generating the package ({})",
        report::size(s.package_bytes)
    ));
    let (pkg, delta_made) = if s.is_delta() {
        let (new, made) = make_delta(&pkg_dir, s.package_bytes, &tracker_url)?;
        (new, Some(made))
    } else {
        let pkg = make_package(&pkg_dir, PACKAGE_NAME, s.package_bytes, &tracker_url)?;
        (pkg, None)
    };
    // B5's other packages, one per origin: `pkg2`, `pkg3`, ...
    let more = (2..=s.packages)
        .map(|k| {
            make_package(
                &pkg_dir,
                &format!("{PACKAGE_NAME}{k}"),
                s.package_bytes,
                &tracker_url,
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    // The rollout scenario's old version: same size, other bytes. The flash crowds and the
    // rollouts all distribute `pkg` (the new version).
    let old_dir = c.work.path.join(format!("{}-package-old", s.name));
    let old = if s.is_rollout() {
        Some(make_package(
            &old_dir,
            PACKAGE_NAME,
            s.package_bytes,
            &tracker_url,
        )?)
    } else {
        None
    };
    let churn = churn::Plan::new(s, kr.t_kr_secs).filter(|_| !c.args.no_churn);
    // A run of this scenario named `label` (its directory and log prefix), one package, no
    // churn, hosts holding nothing.
    let ctx_named = |label: String| Ctx {
        hosts: &hosts,
        topo: Some(&topo),
        pkg: &pkg,
        more: &[],
        fbpkg_bin: c.fbpkg_bin,
        self_exe: c.self_exe,
        dir: c.work.path.join(&label),
        logs: c.work.logs(),
        log_prefix: label,
        deadline,
        t_kr_secs: kr.t_kr_secs,
        sample_every: Duration::from_millis(c.args.sample_ms),
        rqbit_linger: c.args.rqbit_linger,
        agent_args: &c.args.fbpkg_agent_arg,
        churn: None,
        hold: None,
    };
    // The first contender starts on memory just freed, as every later one does.
    if !c.args.no_warm_memory {
        let footprint = (s.leechers as u64 + 1)
            .saturating_mul(s.packages as u64)
            .saturating_mul(s.package_bytes);
        warm::before_first(&c.work.path, footprint, &s.name);
    }
    let mut entries = Vec::new();
    for &which in &c.args.contenders {
        procs::check_cancelled()?;
        log_progress(&format!("{}: {}", s.name, which.name()));
        let ctx = Ctx {
            more: &more,
            churn: churn.as_ref(),
            ..ctx_named(format!("{}-{}", s.name, which.name()))
        };
        let entry = match contenders::run(which, &ctx) {
            Ok(run) => {
                if let Some(sm) = &run.summary {
                    log_progress(&format!(
                        "{}: {} T_last {} eta_last {} seed ampl. {:.2} ({}/{} verified)",
                        s.name,
                        which.name(),
                        sm.t_last_secs
                            .map(|t| format!("{t:.1} s"))
                            .unwrap_or_else(|| "-".into()),
                        sm.eta_last
                            .map(|e| format!("{e:.2}"))
                            .unwrap_or_else(|| "-".into()),
                        sm.seed_amplification_wire,
                        sm.verified,
                        sm.n
                    ));
                }
                Entry {
                    contender: which.name().into(),
                    run: Some(run),
                    error: None,
                }
            }
            Err(e) => {
                procs::check_cancelled()?;
                log_progress(&format!("{}: {} failed: {e:#}", s.name, which.name()));
                Entry {
                    contender: which.name().into(),
                    run: None,
                    error: Some(format!("{e:#}")),
                }
            }
        };
        entries.push(entry);
    }
    let rollout = match &old {
        Some(old) => {
            let ctx = ctx_named(format!("{}-rollout", s.name));
            Some(run_rollouts(&ctx, s, old)?)
        }
        None => None,
    };
    let delta = match &delta_made {
        Some(made) => {
            let ctx = Ctx {
                hold: Some(&made.old),
                ..ctx_named(format!("{}-held", s.name))
            };
            Some(run_delta(&ctx, s, made)?)
        }
        None => None,
    };
    let _ = std::fs::write(
        c.work.logs().join(format!("{}-tc-qdisc.txt", s.name)),
        topo.qdisc_stats(),
    );
    drop(topo);
    let _ = std::fs::remove_dir_all(&pkg_dir);
    let _ = std::fs::remove_dir_all(&old_dir);
    let mut table = scenario_table(s, &kr, deadline, &entries);
    if let Some(r) = &rollout {
        table.push_str(&rollout_table(r, &entries));
    }
    if let Some(d) = &delta {
        table.push_str(&delta_table(d, &entries, s.leechers));
    }
    Ok(ScenarioReport {
        scenario: s.clone(),
        kumar_ross: kr,
        deadline_secs: deadline.as_secs_f64(),
        tbf,
        tcp_congestion_control: cc,
        calibration,
        contenders: entries,
        rollout,
        delta,
        table,
    })
}

/// The rollout scenario after its flash crowds: the same new version rolled out to the same
/// hosts, prefetch unlimited then off, each run from fresh agents holding the old version.
fn run_rollouts(ctx: &Ctx<'_>, s: &Scenario, old: &Package) -> anyhow::Result<RolloutReport> {
    let per_phase = s.leechers / PHASES.len();
    let host_ids =
        rollout_report::pick_host_ids(PACKAGE_NAME, contenders::rollout::TAG, &PHASES, per_phase)
            .map_err(anyhow::Error::msg)?;
    let mut runs = Vec::new();
    let mut errors = Vec::new();
    for prefetch_rate in ["unlimited", "off"] {
        procs::check_cancelled()?;
        log_progress(&format!("{}: rollout, prefetch {prefetch_rate}", s.name));
        let settings = contenders::rollout::Settings {
            old,
            new: ctx.pkg,
            prefetch_rate,
            picked: &host_ids,
        };
        match contenders::rollout::run(ctx, &settings) {
            Ok(run) => {
                let incs: Vec<String> = run
                    .phases
                    .iter()
                    .map(|p| {
                        p.increment_secs
                            .map_or_else(|| "-".into(), |i| format!("+{i:.2}"))
                    })
                    .collect();
                log_progress(&format!(
                    "{}: rollout, prefetch {prefetch_rate}: 100% activated {} (phases {})",
                    s.name,
                    run.total_secs
                        .map_or_else(|| "never".into(), |t| format!("after {t:.2} s")),
                    incs.join(" ")
                ));
                runs.push(run);
            }
            Err(e) => {
                procs::check_cancelled()?;
                log_progress(&format!(
                    "{}: rollout, prefetch {prefetch_rate} failed: {e:#}",
                    s.name
                ));
                errors.push(format!("prefetch {prefetch_rate}: {e:#}"));
            }
        }
    }
    Ok(RolloutReport {
        how: format!(
            "{} hosts follow {PACKAGE_NAME}:{} (--follow-interval 250ms, tracker --rollout-tick \
             50ms); v1 tagged, v2 published; once every host activated v1: rollout start v2 \
             --phases 25,50,75,100 --bake 0s --max-failures 0; times from just before that \
             command to each host's --on-change for v2",
            s.leechers,
            contenders::rollout::TAG
        ),
        host_ids,
        runs,
        errors,
    })
}

fn rollout_table(r: &RolloutReport, entries: &[Entry]) -> String {
    let flash: Vec<(String, Option<f64>)> = entries
        .iter()
        .filter_map(|e| {
            let t = e.run.as_ref()?.summary.as_ref()?.t_last_secs;
            Some((e.contender.clone(), t))
        })
        .collect();
    let mut t = format!(
        "\nrollout: {}\n{}",
        r.how,
        rollout_report::table(&flash, &r.runs, &r.host_ids)
    );
    for e in &r.errors {
        t.push_str(&format!("rollout error: {e}\n"));
    }
    t
}

fn scenario_table(s: &Scenario, kr: &KumarRoss, deadline: Duration, entries: &[Entry]) -> String {
    let rows: Vec<Row<'_>> = entries
        .iter()
        .filter_map(|e| {
            let run = e.run.as_ref()?;
            Some(Row {
                contender: &e.contender,
                summary: run.summary.as_ref()?,
                leechers: &run.leechers,
                cpu_secs: Some(run.cpu.total_secs_without_tracker),
            })
        })
        .collect();
    let mut t = format!(
        "{}\n{}",
        report::scenario_header(s, kr.t_kr_secs, deadline.as_secs_f64()),
        report::scenario_table(&rows)
    );
    for e in entries {
        if let Some(run) = &e.run
            && let Some(line) = report::stragglers_line(s, &run.leechers, kr.t_kr_secs)
        {
            t.push_str(&format!("{}: {line}\n", e.contender));
        }
        if let Some(run) = &e.run
            && let Some(line) = report::uplink_classes_line(s, &run.leechers)
        {
            t.push_str(&format!("{}: {line}\n", e.contender));
        }
        if let Some(run) = &e.run
            && let Some(restarted) = &run.restarted
            && let Some(line) = report::churn_line(
                s,
                &run.leechers,
                kr.t_kr_secs,
                kr.t_kr_secs / 2.0,
                restarted,
            )
        {
            t.push_str(&format!("{}: {line}\n", e.contender));
        }
        if let Some(run) = &e.run
            && let Some(line) = rss_line(run)
        {
            t.push_str(&format!("{}: {line}\n", e.contender));
        }
        if let Some(line) = e.run.as_ref().and_then(check_line) {
            t.push_str(&format!("{}: {line}\n", e.contender));
        }
        if let Some(line) = e.run.as_ref().and_then(kept_line) {
            t.push_str(&format!("{}: {line}\n", e.contender));
        }
        if let Some(tx) = e.run.as_ref().and_then(|r| r.timeline.as_ref()?.switch_tx) {
            t.push_str(&format!("{}: {}\n", e.contender, tx.line()));
        }
        if let Some(p) = e.run.as_ref().and_then(|r| r.packages.as_ref()) {
            t.push_str(&format!("{}: {}\n", e.contender, p.line()));
        }
    }
    for e in entries {
        if let Some(err) = &e.error {
            t.push_str(&format!("{}: error: {err}\n", e.contender));
        }
    }
    t
}

/// Peak RSS per agent (issue 12 asks for it in B3): the leechers' median and largest, and
/// the seed's; `None` when the contender's processes were not sampled.
fn rss_line(run: &ContenderRun) -> Option<String> {
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let leechers: Vec<u64> = run
        .processes
        .iter()
        .filter(|p| p.role == "leecher")
        .filter_map(|p| p.peak_rss_bytes)
        .collect();
    let sampled = leechers.len();
    let (median, max) = middle_and_max(leechers, Ord::cmp)?;
    let seed = run
        .processes
        .iter()
        .find(|p| p.role == "seed")
        .and_then(|p| p.peak_rss_bytes)
        .map_or_else(|| "-".into(), |b| format!("{:.1} MiB", mib(b)));
    Some(format!(
        "peak RSS per agent: leechers median {:.1} MiB, max {:.1} MiB ({} sampled); seed {seed}",
        mib(median),
        mib(max),
        sampled
    ))
}

/// librqbit's leechers when the crowd's wait ended: the payload they fetched from peers
/// against what they hold verified. Its `fetched_bytes` counts every block received but those
/// it had cancelled, so blocks it throws away count too (of a piece given to another peer
/// meanwhile: its "steal"). Hosts killed and restarted are left out (a new node counts from
/// its restart and holds what it found on disk too).
fn kept_line(run: &ContenderRun) -> Option<String> {
    let restarted: Vec<&str> = run
        .restarted
        .iter()
        .flatten()
        .map(|r| r.host.as_str())
        .collect();
    kept(run.payload.get("leechers")?.as_object()?, &restarted)
}

/// [`kept_line`] from each leecher's exit stats, by host, and the hosts restarted.
fn kept(
    leechers: &serde_json::Map<String, serde_json::Value>,
    restarted: &[&str],
) -> Option<String> {
    let counted: Vec<_> = leechers
        .iter()
        .filter(|(h, _)| !restarted.contains(&h.as_str()))
        .map(|(_, s)| s)
        .collect();
    let sum = |k: &str| -> u64 { counted.iter().filter_map(|s| s.get(k)?.as_u64()).sum() };
    let (fetched, held) = (sum("fetched_bytes"), sum("progress_bytes"));
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    // What each one not done lacked.
    let lacked: Vec<u64> = counted
        .iter()
        .filter(|s| s.get("finished") == Some(&serde_json::Value::Bool(false)))
        .filter_map(|s| {
            let size = s.get("total_bytes")?.as_u64()?;
            Some(size.saturating_sub(s.get("progress_bytes")?.as_u64()?))
        })
        .collect();
    let not_done = match (lacked.iter().min(), lacked.iter().max()) {
        (Some(lo), Some(hi)) if lo == hi => {
            format!("; {} not done, lacking {} KiB each", lacked.len(), lo >> 10)
        }
        (Some(lo), Some(hi)) => format!(
            "; {} not done, lacking {}–{} KiB each",
            lacked.len(),
            lo >> 10,
            hi >> 10
        ),
        _ => String::new(),
    };
    (fetched > 0).then(|| {
        format!(
            "leechers never restarted ({}) at the end of the wait: fetched {:.0} MiB from peers, \
             hold {:.0} MiB verified ({:.0}% of what they fetched){not_done}",
            counted.len(),
            mib(fetched),
            mib(held),
            100.0 * held as f64 / fetched as f64
        )
    })
}

/// fbpkg-rs's final check (the archive read back and its SHA-256 checked, then installed: a
/// step the other contenders do not take) per download: median and longest, from the agents'
/// `check_secs`, and how much of the archive its SHA-256 took while the rest downloaded
/// (`prehashed`), which the check did not read back. Part of each host's time; on a machine
/// running every host at once it waits for a CPU like everything else.
fn check_line(run: &ContenderRun) -> Option<String> {
    /// (check_secs, prehashed / size) of each download.
    fn collect(v: &serde_json::Value, out: &mut Vec<(f64, Option<f64>)>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(s) = m.get("check_secs").and_then(serde_json::Value::as_f64) {
                    let of_size = |k: &str| m.get(k).and_then(serde_json::Value::as_f64);
                    let early = of_size("prehashed")
                        .zip(of_size("size").filter(|&z| z > 0.0))
                        .map(|(p, z)| p / z);
                    out.push((s, early));
                }
                m.values().for_each(|v| collect(v, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| collect(v, out)),
            _ => {}
        }
    }
    // Every package's download where the run had several (B5), else the one.
    let agents = ["per_agent_packages", "per_agent"]
        .iter()
        .find_map(|k| run.payload.get(k).filter(|v| !v.is_null()))?;
    let mut checks = Vec::new();
    collect(agents, &mut checks);
    let secs: Vec<f64> = checks.iter().map(|c| c.0).collect();
    let (median, max) = middle_and_max(secs, f64::total_cmp)?;
    let early: Vec<f64> = checks.iter().filter_map(|c| c.1).collect();
    let early = middle_and_max(early, f64::total_cmp)
        .map(|(m, _)| {
            format!(
                "; hashed while downloading: median {:.0}% of the archive",
                m * 100.0
            )
        })
        .unwrap_or_default();
    Some(format!(
        "archive check after the last piece (SHA-256 of the rest read back, install): median \
         {median:.2} s, max {max:.2} s over {} downloads{early}",
        checks.len()
    ))
}

/// The median (the upper of the two middles for an even count) and the largest of `v`;
/// `None` when it is empty.
fn middle_and_max<T: Copy>(
    mut v: Vec<T>,
    cmp: impl Fn(&T, &T) -> std::cmp::Ordering,
) -> Option<(T, T)> {
    v.sort_unstable_by(cmp);
    Some((*v.get(v.len() / 2)?, *v.last()?))
}

fn summary_table(scenarios: &[ScenarioReport], which: &[Which]) -> String {
    let names: Vec<String> = scenarios
        .iter()
        .map(|s| s.scenario.name.to_uppercase())
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let rows: Vec<(&str, Vec<Option<&Summary>>)> = which
        .iter()
        .map(|w| {
            let cells = scenarios
                .iter()
                .map(|s| {
                    s.contenders
                        .iter()
                        .find(|e| e.contender == w.name())
                        .and_then(|e| e.run.as_ref()?.summary.as_ref())
                })
                .collect();
            (w.name(), cells)
        })
        .collect();
    report::cross_table(&names, &rows)
}

fn cpu_mode(c: &Common<'_>, label: &str, size: u64, rounds: usize) -> anyhow::Result<CpuReport> {
    let dir = c.work.path.join(format!("{label}-package"));
    log_progress(&format!(
        "{label} mode: generating the package ({})",
        report::size(size)
    ));
    let pkg = make_package(
        &dir,
        PACKAGE_NAME,
        size,
        &format!("http://127.0.0.1:{TRACKER_PORT}"),
    )?;
    let r = cpu::run(&CpuSettings {
        which: c.args.contenders.clone(),
        leechers: c.args.cpu_leechers,
        pkg: &pkg,
        fbpkg_bin: c.fbpkg_bin,
        self_exe: c.self_exe,
        work: &c.work.path,
        logs: &c.work.logs(),
        label,
        rounds,
        warm: !c.args.no_warm_memory,
    });
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// The whole run.
pub fn bench(args: Args) -> anyhow::Result<()> {
    args.validate()?;
    let tbf = args.tbf(0)?;
    let scenarios = args.scenarios()?;
    ensure!(
        is_root(),
        "swarm_bench needs root (network namespaces, tc): run it with sudo"
    );
    cleanup::install_signal_handler()?;
    for what in cleanup::remove_leftovers()? {
        log_progress(&format!("removed leftover {what}"));
    }
    let started_unix = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let loadavg_before = loadavg();
    let fbpkg_bin = fbpkg_binary::release_binary(args.fbpkg_bin.clone())?;
    let self_exe = std::env::current_exe().context("locating this binary")?;
    let work = WorkDir::create(args.keep_logs.clone())?;
    let common = Common {
        args: &args,
        work: &work,
        fbpkg_bin: &fbpkg_bin,
        self_exe: &self_exe,
    };
    let mut reports = Vec::new();
    for s in &scenarios {
        let r = run_scenario(&common, s)?;
        eprintln!("\n{}", r.table);
        reports.push(r);
    }
    let cpu = if args.cpu {
        Some(cpu_mode(&common, "cpu", args.cpu_size, args.cpu_rounds)?)
    } else {
        None
    };
    let rss = if args.rss {
        Some(cpu_mode(&common, "rss", args.rss_size, 1)?)
    } else {
        None
    };
    let report = Report {
        benchmark: "swarm: a fleet flash crowd against the physical limit",
        command: std::env::args().collect(),
        started_unix,
        machine: Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            loadavg_before,
            loadavg_after: loadavg(),
        },
        tbf,
        fbpkg_bin,
        summary_table: summary_table(&reports, &args.contenders),
        scenarios: reports,
        cpu,
        rss,
    };
    let mut text = String::new();
    for s in &report.scenarios {
        text.push_str(&s.table);
        text.push('\n');
    }
    if report.scenarios.len() > 1 {
        text.push_str(&report.summary_table);
        text.push('\n');
    }
    for r in [&report.cpu, &report.rss].into_iter().flatten() {
        text.push_str(&cpu::table(r));
        text.push('\n');
    }
    let json = serde_json::to_string_pretty(&report)?;
    match &args.json {
        Some(p) if p.as_os_str() == "-" => {
            println!("{json}");
            eprint!("{text}");
        }
        Some(p) => {
            std::fs::write(p, json).with_context(|| format!("writing {}", p.display()))?;
            print!("{text}");
            eprintln!("swarm_bench: JSON report in {}", p.display());
        }
        None => print!("{text}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{kept, middle_and_max};
    use serde_json::json;

    #[test]
    fn kept_counts_the_hosts_never_restarted_and_what_those_not_done_lack() {
        let size = 128u64 << 20;
        let stats = |fetched: u64, progress: u64| {
            json!({"fetched_bytes": fetched, "progress_bytes": progress, "total_bytes": size,
                   "finished": progress == size})
        };
        let leechers = json!({
            "l001": stats(size + (2 << 20), size),
            "l002": stats(size, size - (64 << 10)),
            "l004": stats(1 << 20, size - (64 << 10)),
        });
        let line = kept(leechers.as_object().unwrap(), &["l004"]).unwrap();
        assert_eq!(
            line,
            "leechers never restarted (2) at the end of the wait: fetched 258 MiB from peers, \
             hold 256 MiB verified (99% of what they fetched); 1 not done, lacking 64 KiB each"
        );
        // Every one done: nothing lacked; none fetched: no line.
        let done = json!({"l001": stats(size, size)});
        assert!(
            !kept(done.as_object().unwrap(), &[])
                .unwrap()
                .contains("not done")
        );
        let idle = json!({"l001": stats(0, 0)});
        assert_eq!(kept(idle.as_object().unwrap(), &[]), None);
    }

    #[test]
    fn middle_and_max_takes_the_upper_middle() {
        assert_eq!(middle_and_max(Vec::<u64>::new(), Ord::cmp), None);
        assert_eq!(middle_and_max(vec![7u64], Ord::cmp), Some((7, 7)));
        assert_eq!(middle_and_max(vec![4u64, 1, 3, 2], Ord::cmp), Some((3, 4)));
        let secs = vec![2.5, 0.5, 9.0, 1.0, 3.0];
        assert_eq!(middle_and_max(secs, f64::total_cmp), Some((2.5, 9.0)));
    }
}
