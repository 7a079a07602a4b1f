//! The measured window of one contender: the common start instant, the wait for every
//! leecher against the deadline, wire counters, CPU, and verifying what the leechers got.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use fbpkg_benches::swarm::logscan::Notable;
use fbpkg_benches::swarm::procfs;
use fbpkg_benches::swarm::report::{LeecherOutcome, Restarted, Summary};
use fbpkg_benches::swarm::timeline::{Stall, Timeline};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::contenders::Package;
use crate::procs::{self, POLL, Proc};
use crate::topology::Topology;

/// Stalls: at least this long...
const STALL_SECS: f64 = 3.0;
/// ...with less than this much downloaded per sample interval.
const STALL_BYTES: u64 = 64 << 10;

/// One process's resource use.
#[derive(Debug, Clone, Serialize)]
pub struct ProcRecord {
    /// `tracker`, `seed`, `leecher`, `client`, `publish`.
    pub role: String,
    /// Host label.
    pub host: String,
    /// User + system CPU seconds over its life.
    pub cpu_secs: f64,
    /// The system (kernel: TCP, copies, tbf) part of it.
    pub sys_secs: f64,
    /// Peak RSS (VmHWM) as last sampled, where sampled.
    pub peak_rss_bytes: Option<u64>,
    /// How it ended.
    pub exit: Option<String>,
}

/// Resource records of a contender's processes.
#[derive(Debug, Default)]
pub struct Accounting {
    /// One per process.
    pub records: Vec<ProcRecord>,
}

impl Accounting {
    /// Record a finished (or about to be dropped) process.
    pub fn record(&mut self, role: &str, host: &str, p: &mut Proc) {
        let exit = p.poll().map(|s| s.to_string());
        self.records.push(ProcRecord {
            role: role.to_owned(),
            host: host.to_owned(),
            cpu_secs: p.cpu_secs(),
            sys_secs: p.sys_secs(),
            peak_rss_bytes: p.hwm_bytes(),
            exit,
        });
    }

    /// Take the peak RSS of the last recorded process from its own `exit` event (our nodes
    /// report `usage.vm_hwm_bytes` as they exit).
    pub fn set_reported_rss(&mut self, exit_event: Option<&serde_json::Value>) {
        let reported = exit_event.and_then(|v| v["usage"]["vm_hwm_bytes"].as_u64());
        if let (Some(r), Some(hwm)) = (self.records.last_mut(), reported) {
            r.peak_rss_bytes = Some(r.peak_rss_bytes.unwrap_or(0).max(hwm));
        }
    }

    /// CPU seconds by role, and in all (the tracker left out: it serves every contender).
    pub fn cpu(&self) -> CpuUse {
        let mut by_role: BTreeMap<String, f64> = BTreeMap::new();
        for r in &self.records {
            *by_role.entry(r.role.clone()).or_default() += r.cpu_secs;
        }
        let counted = || self.records.iter().filter(|r| r.role != "tracker");
        CpuUse {
            total_secs_without_tracker: counted().map(|r| r.cpu_secs).sum(),
            sys_secs_without_tracker: counted().map(|r| r.sys_secs).sum(),
            by_role,
            machine_busy_cores: None,
        }
    }
}

/// CPU of a contender.
#[derive(Debug, Clone, Serialize)]
pub struct CpuUse {
    /// All its processes but the tracker.
    pub total_secs_without_tracker: f64,
    /// The system (kernel) part of it.
    pub sys_secs_without_tracker: f64,
    /// By role.
    pub by_role: BTreeMap<String, f64>,
    /// The whole machine's busy cores on average over the window (noise from neighbours).
    pub machine_busy_cores: Option<f64>,
}

/// Wire bytes of one host over the window.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct HostWire {
    /// Uploaded.
    pub up: u64,
    /// Downloaded.
    pub down: u64,
}

/// Everything measured about one contender in one scenario.
#[derive(Debug, Serialize)]
pub struct ContenderRun {
    /// `fbpkg-rs`, `librqbit`, `http`.
    pub contender: String,
    /// How it was run (versions, flags).
    pub setup: serde_json::Value,
    /// The BENCHMARKS.md figures (`None` in the CPU mode).
    pub summary: Option<Summary>,
    /// Each leecher.
    pub leechers: Vec<LeecherOutcome>,
    /// Seed egress over the window, from its veth's `tx_bytes` (wire bytes).
    pub seed_wire_tx_bytes: Option<u64>,
    /// Seed egress as its upload `tbf` counted it (every segment's headers included).
    pub seed_tbf_bytes: Option<u64>,
    /// Piece bytes the seed says it sent, where the contender tells.
    pub seed_payload_bytes: Option<u64>,
    /// Other counters the contender exposes.
    pub payload: serde_json::Value,
    /// From the start instant to the last leecher or the deadline.
    pub window_secs: f64,
    /// Seconds between the end of setup (the seed is listed by the tracker) and the start.
    pub setup_notes: BTreeMap<String, f64>,
    /// CPU.
    pub cpu: CpuUse,
    /// Every process.
    pub processes: Vec<ProcRecord>,
    /// Wire bytes per host over the window.
    pub hosts_wire: BTreeMap<String, HostWire>,
    /// Leechers that got (almost) nothing for a while before finishing.
    pub stalls: BTreeMap<String, Vec<Stall>>,
    /// Warnings and errors in its logs.
    pub log_notes: Vec<Notable>,
    /// Anything else worth knowing.
    pub notes: Vec<String>,
    /// Wire counters every sample interval.
    pub timeline: Option<Timeline>,
    /// Many-package scenarios (B5): when each package finished on each host.
    pub packages: Option<PackageFinish>,
    /// Churn (B4): the hosts killed and restarted.
    pub restarted: Option<Vec<Restarted>>,
}

/// When each package finished on each host, in a many-package scenario (B5), and how fair
/// that was: a package that finishes well after a host's other packages lost the share of
/// upload slots and bandwidth it should have had.
#[derive(Debug, Clone, Serialize)]
pub struct PackageFinish {
    /// Package names, in order.
    pub packages: Vec<String>,
    /// Per host, the seconds at which each package finished (`None`: it did not).
    pub hosts: BTreeMap<String, Vec<Option<f64>>>,
    /// Mean finish of each package over the hosts that finished it.
    pub mean_secs: Vec<Option<f64>>,
    /// Over the hosts that finished every package: the largest ratio of a package's finish
    /// to the mean finish of that host's packages (the target is at most 1.2).
    pub worst_ratio: Option<f64>,
    /// The host and package of `worst_ratio`.
    pub worst_at: Option<(String, String)>,
}

impl PackageFinish {
    /// From `times[h][k]`: host h's finish of package k.
    pub fn new(labels: &[String], packages: &[String], times: Vec<Vec<Option<f64>>>) -> Self {
        let mut worst: Option<(f64, String, String)> = None;
        for (host, t) in labels.iter().zip(&times) {
            let done: Vec<f64> = t.iter().flatten().copied().collect();
            if done.len() != t.len() || done.is_empty() {
                continue;
            }
            let mean = done.iter().sum::<f64>() / done.len() as f64;
            for (k, v) in done.iter().enumerate() {
                let r = v / mean;
                if worst.as_ref().is_none_or(|w| r > w.0) {
                    worst = Some((r, host.clone(), packages[k].clone()));
                }
            }
        }
        let mean_secs = (0..packages.len())
            .map(|k| {
                let v: Vec<f64> = times
                    .iter()
                    .filter_map(|t| t.get(k).copied().flatten())
                    .collect();
                (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
            })
            .collect();
        Self {
            packages: packages.to_vec(),
            hosts: labels.iter().cloned().zip(times).collect(),
            mean_secs,
            worst_ratio: worst.as_ref().map(|w| w.0),
            worst_at: worst.map(|w| (w.1, w.2)),
        }
    }

    /// One line for the scenario's table.
    pub fn line(&self) -> String {
        let means: Vec<String> = self
            .packages
            .iter()
            .zip(&self.mean_secs)
            .map(|(p, m)| match m {
                Some(m) => format!("{p} {m:.1} s"),
                None => format!("{p} -"),
            })
            .collect();
        let worst = match (&self.worst_ratio, &self.worst_at) {
            (Some(r), Some((h, p))) => format!("{r:.2} ({p} on {h})"),
            _ => "-".into(),
        };
        format!(
            "packages: latest finish / the host's mean of its {} packages, worst {worst}; mean finish {}",
            self.packages.len(),
            means.join(", ")
        )
    }
}

/// A host's end from the ends of its `per_host` downloads (one per package): timed out if
/// any did, else the first that failed `ok`, else the latest.
pub fn combine_ended(ended: &[Ended], per_host: usize, ok: impl Fn(&Done) -> bool) -> Vec<Ended> {
    ended
        .chunks(per_host.max(1))
        .map(|c| {
            if c.iter().any(Option::is_none) {
                return None;
            }
            let all: Vec<&(f64, Done)> = c.iter().flatten().collect();
            if let Some(bad) = all.iter().find(|(_, d)| !ok(d)) {
                return Some((*bad).clone());
            }
            all.into_iter().max_by(|a, b| a.0.total_cmp(&b.0)).cloned()
        })
        .collect()
}

/// Every host's copy of every package checked: host-major, `[h * pkgs.len() + k]` is host h's
/// copy of package k, found at `copy(h, k)`.
pub fn verify_each(
    hosts: usize,
    pkgs: &[&Package],
    copy: impl Fn(usize, &Package) -> PathBuf,
) -> Vec<Result<(), String>> {
    let per_host = pkgs.len();
    let mut verified = vec![Ok(()); hosts * per_host];
    for (k, p) in pkgs.iter().enumerate() {
        let files: Vec<_> = (0..hosts).map(|h| Some(copy(h, p))).collect();
        for (h, r) in verify_all(&files, p).into_iter().enumerate() {
            verified[h * per_host + k] = r;
        }
    }
    verified
}

/// Each client's (by pid) finish of each of its packages, in seconds from the start.
pub type PackageTimes = std::collections::HashMap<u32, Vec<Option<f64>>>;

/// B5's finishes: each host's (by its client's `pid`, in host order) time for each package
/// from `finished`, kept only where its copy verified (`verified` as [`verify_each`] makes
/// it). `None` with a single package.
pub fn package_finish(
    labels: &[String],
    pkgs: &[&Package],
    pids: &[u32],
    finished: &PackageTimes,
    verified: &[Result<(), String>],
) -> Option<PackageFinish> {
    let per_host = pkgs.len();
    (per_host > 1).then(|| {
        let times = pids
            .iter()
            .zip(verified.chunks(per_host))
            .map(|(pid, v)| {
                let t = finished.get(pid).cloned().unwrap_or_default();
                (0..per_host)
                    .map(|k| t.get(k).copied().flatten().filter(|_| v[k].is_ok()))
                    .collect()
            })
            .collect();
        let names: Vec<String> = pkgs.iter().map(|p| p.name.clone()).collect();
        PackageFinish::new(labels, &names, times)
    })
}

/// A host's verification from its `per_host` files' (the first error, if any).
pub fn combine_verified(
    verified: &[Result<(), String>],
    per_host: usize,
) -> Vec<Result<(), String>> {
    verified
        .chunks(per_host.max(1))
        .map(|c| c.iter().find(|r| r.is_err()).cloned().unwrap_or(Ok(())))
        .collect()
}

/// How a leecher's client said it was done.
#[derive(Debug, Clone)]
pub enum Done {
    /// It exited.
    Exited(ExitStatus),
    /// It printed this line.
    Line(String),
}

/// One leecher's end: when, and how.
pub type Ended = Option<(f64, Done)>;

/// The measured window.
#[derive(Debug)]
pub struct Window<'a> {
    topo: Option<&'a Topology>,
    seed_ns: String,
    /// The common start instant.
    pub t0: Instant,
    seed_tx0: Option<u64>,
    seed_tbf0: Option<u64>,
    machine0: Option<(u64, u64)>,
    timeline: Option<Timeline>,
    labels: Vec<(String, String)>,
    every: Duration,
    next: Instant,
}

fn machine_ticks() -> Option<(u64, u64)> {
    procfs::parse_machine_ticks(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// What the window measured.
#[derive(Debug)]
pub struct Closed {
    /// Seed egress (wire), when there is a topology.
    pub seed_tx_bytes: Option<u64>,
    /// Seed egress as its upload tbf counted it.
    pub seed_tbf_bytes: Option<u64>,
    /// Machine busy cores on average.
    pub machine_busy_cores: Option<f64>,
    /// Counters over time.
    pub timeline: Option<Timeline>,
    /// Window length.
    pub secs: f64,
}

impl<'a> Window<'a> {
    /// Read the seed's counter and every switch counter, then start the clock.
    pub fn open(
        topo: Option<&'a Topology>,
        seed_ns: &str,
        every: Duration,
    ) -> anyhow::Result<Self> {
        let seed_tx0 = topo.map(|t| t.host_tx_bytes(seed_ns)).transpose()?;
        let seed_tbf0 = topo.map(|t| t.host_tbf_bytes(seed_ns)).transpose()?;
        let timeline = topo
            .map(|t| t.switch_counters().map(Timeline::new))
            .transpose()?;
        let labels = topo.map(Topology::labels).unwrap_or_default();
        let t0 = Instant::now();
        Ok(Self {
            topo,
            seed_ns: seed_ns.to_owned(),
            t0,
            seed_tx0,
            seed_tbf0,
            machine0: machine_ticks(),
            timeline,
            labels,
            every,
            next: t0,
        })
    }

    /// Seconds since the start.
    pub fn secs(&self, at: Instant) -> f64 {
        at.duration_since(self.t0).as_secs_f64()
    }

    /// Take a counter sample if one is due.
    pub fn tick(&mut self) {
        let now = Instant::now();
        if now < self.next {
            return;
        }
        self.next += self.every;
        let secs = self.secs(now);
        if let (Some(topo), Some(tl)) = (self.topo, self.timeline.as_mut())
            && let Ok(counters) = topo.switch_counters()
        {
            tl.push(secs, &self.labels, &counters);
        }
    }

    /// Wait until every process in `procs` is done (as `done` decides) or `deadline` passes.
    /// `done` is polled every few milliseconds; the time recorded is when it first says so.
    pub fn wait_all(
        &mut self,
        procs: &mut [Proc],
        deadline: Instant,
        mut done: impl FnMut(&mut Proc) -> Option<Done>,
    ) -> anyhow::Result<Vec<Ended>> {
        let mut ended: Vec<Ended> = vec![None; procs.len()];
        loop {
            for (p, e) in procs.iter_mut().zip(ended.iter_mut()) {
                if e.is_none()
                    && let Some(d) = done(p)
                {
                    *e = Some((self.secs(Instant::now()), d));
                }
            }
            self.tick();
            if ended.iter().all(Option::is_some) || Instant::now() >= deadline {
                return Ok(ended);
            }
            procs::check_cancelled()?;
            std::thread::sleep(POLL);
        }
    }

    /// [`Window::wait_all`] for nodes that print a `done` line with a package's index as each
    /// package completes and `complete` once all have (`rqbit-node`, `http-get`). Also returns
    /// each one's finish of each of its `per_host` packages (by pid), in seconds from `t0`.
    /// `step` runs first for each process in each turn; when it says `false` (a host the churn
    /// plan has down), the process is not read that turn.
    pub fn wait_all_packages(
        &mut self,
        procs: &mut [Proc],
        deadline: Instant,
        per_host: usize,
        mut step: impl FnMut(&mut Proc) -> bool,
    ) -> anyhow::Result<(Vec<Ended>, PackageTimes)> {
        let t0 = self.t0;
        let mut finished = PackageTimes::new();
        let ended = self.wait_all(procs, deadline, |p| {
            if !step(p) {
                return None;
            }
            let times = finished
                .entry(p.pid)
                .or_insert_with(|| vec![None; per_host]);
            while let Some(line) = p.try_line() {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if v["event"] == "done" {
                    let k = v["index"].as_u64().and_then(|k| usize::try_from(k).ok());
                    if let Some(t) = k.and_then(|k| times.get_mut(k)) {
                        t.get_or_insert(t0.elapsed().as_secs_f64());
                    }
                }
                if v["event"] == "complete" {
                    return Some(Done::Line(line));
                }
            }
            p.poll().map(Done::Exited)
        })?;
        Ok((ended, finished))
    }

    /// Stop the clock: read the seed's counter again and take a last sample.
    pub fn close(mut self) -> anyhow::Result<Closed> {
        let end = Instant::now();
        self.next = end;
        self.tick();
        let seed_tx_bytes = match (self.topo, self.seed_tx0) {
            (Some(t), Some(before)) => Some(t.host_tx_bytes(&self.seed_ns)? - before),
            _ => None,
        };
        let seed_tbf_bytes = match (self.topo, self.seed_tbf0) {
            (Some(t), Some(before)) => Some(t.host_tbf_bytes(&self.seed_ns)? - before),
            _ => None,
        };
        let machine_busy_cores = match (self.machine0, machine_ticks()) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                Some((b1 - b0) as f64 / (t1 - t0) as f64 * cores as f64)
            }
            _ => None,
        };
        Ok(Closed {
            seed_tx_bytes,
            seed_tbf_bytes,
            machine_busy_cores,
            secs: self.secs(end),
            timeline: self.timeline,
        })
    }
}

impl Closed {
    /// Wire bytes per host over the window (last sample).
    pub fn hosts_wire(&self) -> BTreeMap<String, HostWire> {
        let Some(tl) = &self.timeline else {
            return BTreeMap::new();
        };
        tl.hosts
            .iter()
            .map(|(label, s)| {
                (
                    label.clone(),
                    HostWire {
                        up: s.up.last().copied().unwrap_or(0),
                        down: s.down.last().copied().unwrap_or(0),
                    },
                )
            })
            .collect()
    }

    /// Stalls of every leecher before it was done.
    pub fn stalls(&self, leechers: &[LeecherOutcome]) -> BTreeMap<String, Vec<Stall>> {
        let Some(tl) = &self.timeline else {
            return BTreeMap::new();
        };
        leechers
            .iter()
            .filter_map(|l| {
                let until = l.done_secs.unwrap_or(f64::INFINITY);
                let s = tl.stalls(&l.host, until, STALL_SECS, STALL_BYTES);
                (!s.is_empty()).then(|| (l.host.clone(), s))
            })
            .collect()
    }
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Check each leecher's file against `sha256` (two at a time: the machine has two cores).
/// `files[i]` is `None` when leecher i produced no file to check.
pub fn verify_all(files: &[Option<PathBuf>], pkg: &Package) -> Vec<Result<(), String>> {
    let mut out = Vec::with_capacity(files.len());
    for pair in files.chunks(2) {
        let results: Vec<Result<(), String>> = std::thread::scope(|s| {
            let handles: Vec<_> = pair
                .iter()
                .map(|f| s.spawn(move || verify(f.as_deref(), pkg)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("verifier panicked".into())))
                .collect()
        });
        out.extend(results);
    }
    out
}

/// Whether `copy` holds `pkg`: a file with its SHA-256, or a directory with exactly its files
/// (by content: permission bits are the client's business, and a stock client's BEP 47 padding
/// files under `.pad/` are left out).
fn verify(copy: Option<&Path>, pkg: &Package) -> Result<(), String> {
    let copy = copy.ok_or("no file")?;
    let Some(want) = &pkg.tree else {
        return match sha256_file(copy) {
            Ok(h) if h == pkg.sha256 => Ok(()),
            Ok(h) => Err(format!("SHA-256 {h} differs from the package's")),
            Err(e) => Err(format!("{e:#}")),
        };
    };
    let have = tree_digests(copy, true).map_err(|e| format!("{e:#}"))?;
    for (rel, sha) in want {
        match have.get(rel) {
            None => return Err(format!("{} is missing", rel.display())),
            Some(h) if h != sha => return Err(format!("{} differs", rel.display())),
            Some(_) => {}
        }
    }
    match have.keys().find(|rel| !want.contains_key(*rel)) {
        Some(extra) => Err(format!("{} is not in the package", extra.display())),
        None => Ok(()),
    }
}

/// Each regular file's SHA-256 (hex) under `root`, by its path from the root; a top-level
/// `.pad` directory left out when `skip_padding`. Links and other entries are errors: the
/// bench's trees have none.
pub fn tree_digests(root: &Path, skip_padding: bool) -> anyhow::Result<BTreeMap<PathBuf, String>> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel) = dirs.pop() {
        let dir = root.join(&rel);
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let e = e?;
            let (t, name) = (e.file_type()?, rel.join(e.file_name()));
            if t.is_dir() {
                if !(skip_padding && name == Path::new(".pad")) {
                    dirs.push(name);
                }
            } else if t.is_file() {
                let sha = sha256_file(&e.path())?;
                out.insert(name, sha);
            } else {
                anyhow::bail!("{} is neither a file nor a directory", e.path().display());
            }
        }
    }
    Ok(out)
}

/// Build each leecher's outcome from when it ended, how, and whether its file verified.
pub fn outcomes(
    labels: &[String],
    ended: &[Ended],
    verified: &[Result<(), String>],
    ok: impl Fn(&Done) -> Result<(), String>,
) -> Vec<LeecherOutcome> {
    labels
        .iter()
        .zip(ended)
        .zip(verified)
        .map(|((host, e), v)| {
            let (done_secs, exit_code, error) = match e {
                None => (None, None, Some("timed out".to_owned())),
                Some((t, d)) => {
                    let code = match d {
                        Done::Exited(s) => s.code(),
                        Done::Line(_) => None,
                    };
                    match ok(d) {
                        Ok(()) => (Some(*t), code, v.clone().err()),
                        Err(msg) => (None, code, Some(msg)),
                    }
                }
            };
            LeecherOutcome {
                host: host.clone(),
                verified: done_secs.is_some() && v.is_ok(),
                timed_out: e.is_none(),
                done_secs,
                exit_code,
                error,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt as _;

    use super::*;

    fn exited(code: i32) -> Done {
        Done::Exited(ExitStatus::from_raw(code << 8))
    }

    #[test]
    fn a_host_is_done_when_its_last_package_is() {
        let ok = |d: &Done| matches!(d, Done::Exited(s) if s.success());
        let ended = vec![
            // l001: both packages, the second later.
            Some((3.0, exited(0))),
            Some((5.0, exited(0))),
            // l002: one package failed.
            Some((2.0, exited(0))),
            Some((4.0, exited(3))),
            // l003: one package never finished.
            Some((2.0, exited(0))),
            None,
        ];
        let hosts = combine_ended(&ended, 2, ok);
        assert_eq!(hosts.len(), 3);
        assert!(matches!(&hosts[0], Some((t, d)) if *t == 5.0 && ok(d)));
        assert!(matches!(&hosts[1], Some((t, d)) if *t == 4.0 && !ok(d)));
        assert!(hosts[2].is_none());
        let verified = vec![Ok(()), Ok(()), Ok(()), Err("bad".to_owned())];
        assert_eq!(
            combine_verified(&verified, 2),
            vec![Ok(()), Err("bad".to_owned())]
        );
    }

    #[test]
    fn package_finish_finds_the_latest_package_against_its_hosts_mean() {
        let labels = vec!["l001".to_owned(), "l002".to_owned()];
        let names = vec!["pkg".to_owned(), "pkg2".to_owned()];
        let pf = PackageFinish::new(
            &labels,
            &names,
            vec![vec![Some(10.0), Some(10.0)], vec![Some(8.0), Some(12.0)]],
        );
        // l002: mean 10, pkg2 at 12 -> 1.2.
        assert!((pf.worst_ratio.unwrap() - 1.2).abs() < 1e-9);
        assert_eq!(pf.worst_at, Some(("l002".into(), "pkg2".into())));
        assert_eq!(pf.mean_secs, vec![Some(9.0), Some(11.0)]);
        assert!(
            pf.line().contains("worst 1.20 (pkg2 on l002)"),
            "{}",
            pf.line()
        );
        // A host that did not finish every package is left out of the ratio.
        let partial = PackageFinish::new(&labels[..1], &names, vec![vec![Some(1.0), None]]);
        assert_eq!(partial.worst_ratio, None);
        assert_eq!(partial.mean_secs, vec![Some(1.0), None]);
    }

    #[test]
    fn a_tree_copy_verifies_by_content_padding_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (src, copy) = (dir.path().join("src"), dir.path().join("copy"));
        for root in [&src, &copy] {
            std::fs::create_dir_all(root.join("lib")).expect("mkdir");
            std::fs::write(root.join("lib/a.so"), b"library").expect("write");
            std::fs::write(root.join("b.conf"), b"config").expect("write");
        }
        let pkg = Package {
            name: "pkg".into(),
            path: src.clone(),
            file_name: "pkg".into(),
            size: 13,
            sha256: String::new(),
            metainfo: Vec::new(),
            info_hash: String::new(),
            tree: Some(tree_digests(&src, false).expect("digests")),
        };
        // A stock client's padding files, and other permission bits, are not the package's.
        std::fs::create_dir_all(copy.join(".pad")).expect("mkdir");
        std::fs::write(copy.join(".pad/0"), [0u8; 7]).expect("write");
        std::fs::set_permissions(
            copy.join("b.conf"),
            std::os::unix::fs::PermissionsExt::from_mode(0o444),
        )
        .expect("chmod");
        assert_eq!(verify(Some(&copy), &pkg), Ok(()));
        assert_eq!(verify(None, &pkg), Err("no file".into()));
        // A changed byte, a missing file and an extra one are each found.
        std::fs::write(copy.join("lib/a.so"), b"librarz").expect("write");
        assert_eq!(verify(Some(&copy), &pkg), Err("lib/a.so differs".into()));
        std::fs::remove_file(copy.join("lib/a.so")).expect("rm");
        assert_eq!(verify(Some(&copy), &pkg), Err("lib/a.so is missing".into()));
        std::fs::write(copy.join("lib/a.so"), b"library").expect("write");
        std::fs::write(copy.join("lib/extra"), b"").expect("write");
        assert_eq!(
            verify(Some(&copy), &pkg),
            Err("lib/extra is not in the package".into())
        );
    }
}
