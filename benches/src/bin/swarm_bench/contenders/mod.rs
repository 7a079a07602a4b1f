//! The contenders: fbpkg-rs, librqbit, aria2 and an HTTP fan-out, each run the same way — set up,
//! wait until the seed is ready (and listed by the tracker), start every leecher at one
//! instant, wait for all of them against the deadline, collect, verify, stop everything.

pub mod aria2;
pub mod churn;
pub mod fbpkg;
pub mod http;
pub mod rollout;
pub mod rqbit;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use fbpkg_benches::swarm::logscan::{self, Notable};
use serde::Serialize;

use fbpkg_benches::swarm::report::{LeecherOutcome, summarize};

use crate::measure::{
    Accounting, Closed, ContenderRun, PackageFinish, PackageTimes, combine_verified,
    package_finish, verify_each,
};
use crate::procs::{self, Proc, Spec, Stdout};
use crate::topology::{Endpoint, Hosts, Topology};

/// Port of the tracker.
pub const TRACKER_PORT: u16 = 6969;
/// Base port of fbpkg-rs agents.
pub const AGENT_PORT: u16 = 6881;
/// Base port of librqbit sessions.
pub const RQBIT_PORT: u16 = 7881;
/// Base port of aria2.
pub const ARIA2_PORT: u16 = 8881;
/// Port of the HTTP server.
pub const HTTP_PORT: u16 = 8080;
/// The package's name in fbpkg-rs.
pub const PACKAGE_NAME: &str = "pkg";

/// The JSON of an event line named `name` (the nodes' and hooks' stdout), or `None`.
fn event(line: &str, name: &str) -> Option<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    (v["event"] == name).then_some(v)
}

/// A contender by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
pub enum Which {
    /// fbpkg-rs agents and tracker.
    #[value(name = "fbpkg-rs")]
    #[serde(rename = "fbpkg-rs")]
    Fbpkg,
    /// librqbit 9.1.0 sessions.
    #[value(name = "librqbit")]
    #[serde(rename = "librqbit")]
    Rqbit,
    /// Debian's aria2c (1.36), DHT, LPD and PEX off.
    #[value(name = "aria2")]
    #[serde(rename = "aria2")]
    Aria2,
    /// Every leecher fetches the file from the seed over HTTP.
    #[value(name = "http")]
    #[serde(rename = "http")]
    Http,
}

impl Which {
    /// Its name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Self::Fbpkg => "fbpkg-rs",
            Self::Rqbit => "librqbit",
            Self::Aria2 => "aria2",
            Self::Http => "http",
        }
    }
}

/// The package every contender distributes.
#[derive(Debug)]
pub struct Package {
    /// Its name in fbpkg-rs (`pkg`; `pkg2` to `pkg4` for B5's other packages).
    pub name: String,
    /// The file.
    pub path: PathBuf,
    /// Its file name (also the name inside the metainfo).
    pub file_name: String,
    /// Bytes.
    pub size: u64,
    /// SHA-256, hex.
    pub sha256: String,
    /// The metainfo `fbpkg-rs publish` makes for it (same bytes; checked when fbpkg-rs runs).
    pub metainfo: Vec<u8>,
    /// Its info-hash, hex.
    pub info_hash: String,
    /// A directory package (the `delta` scenario): each regular file's SHA-256 (hex) by its
    /// path under the root, what a copy is checked against. `None` for a file.
    pub tree: Option<BTreeMap<PathBuf, String>>,
}

/// What a contender run needs.
#[derive(Debug)]
pub struct Ctx<'a> {
    /// Where its processes run.
    pub hosts: &'a Hosts,
    /// The shaped network, absent in the loopback CPU mode.
    pub topo: Option<&'a Topology>,
    /// The package.
    pub pkg: &'a Package,
    /// The other packages of a many-package scenario (B5), each held by
    /// `hosts.origins[i]` and asked for with `pkg` by every leecher; empty otherwise.
    pub more: &'a [Package],
    /// fbpkg-rs release binary.
    pub fbpkg_bin: &'a Path,
    /// This binary (for the nodes).
    pub self_exe: &'a Path,
    /// This contender's tmpfs directory (removed afterwards).
    pub dir: PathBuf,
    /// Logs directory.
    pub logs: PathBuf,
    /// Prefix of its log files (`b1-fbpkg-rs`).
    pub log_prefix: String,
    /// How long the leechers may take.
    pub deadline: Duration,
    /// The scenario's Kumar-Ross bound (0 in the CPU mode).
    pub t_kr_secs: f64,
    /// Counter sampling interval.
    pub sample_every: Duration,
    /// librqbit leechers keep serving after completion until every leecher is done.
    pub rqbit_linger: bool,
    /// Extra flags for every `fbpkg-rs agent` (e.g. `--origin-budget=1.1`).
    pub agent_args: &'a [String],
    /// B4: which leechers die and come back, which join late.
    pub churn: Option<&'a churn::Plan>,
    /// The `delta` scenario's version N: every leecher fetches it (not timed) before the
    /// measured fetch of `pkg` (fbpkg-rs only).
    pub hold: Option<&'a Package>,
}

impl Ctx<'_> {
    /// A log file of this contender.
    pub fn log(&self, what: &str) -> PathBuf {
        self.logs.join(format!("{}-{what}.log", self.log_prefix))
    }

    /// The tracker's base URL.
    pub fn tracker_url(&self) -> String {
        format!("http://{}", self.hosts.tracker.addr(TRACKER_PORT))
    }

    /// A per-host directory under this contender's.
    pub fn host_dir(&self, host: &Endpoint, sub: &str) -> anyhow::Result<PathBuf> {
        let d = self.dir.join(&host.label).join(sub);
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        Ok(d)
    }

    /// A node subcommand of this binary in `host`'s namespace.
    pub fn node(&self, label: &str, host: &Endpoint, args: &[&str]) -> Spec {
        let mut argv = vec![self.self_exe.as_os_str().to_owned()];
        argv.extend(args.iter().map(Into::into));
        let mut spec = Spec::new(label, Some(&host.ns), argv);
        spec.stdin = true;
        spec.stdout = Stdout::Lines;
        spec.stderr = Some(self.log(label));
        spec
    }

    /// GET a tracker URL path from inside the seed's namespace.
    pub fn tracker_get(&self, path: &str, retry: Duration) -> anyhow::Result<Vec<u8>> {
        let url = format!("{}{path}", self.tracker_url());
        let out = self.dir.join(format!("probe-{}.out", std::process::id()));
        let retry_ms = retry.as_millis().to_string();
        let args = [
            "http-probe",
            "--url",
            url.as_str(),
            "--out",
            out.to_str().context("non-UTF-8 path")?,
            "--retry-ms",
            retry_ms.as_str(),
        ];
        let mut argv = vec![self.self_exe.as_os_str().to_owned()];
        argv.extend(args.iter().map(Into::into));
        let mut spec = Spec::new("http-probe", Some(&self.hosts.seed.ns), argv);
        spec.stderr = Some(self.log("probe"));
        let timeout = retry + Duration::from_secs(15);
        let status = procs::run(spec, timeout)?.status;
        if !status.success() {
            bail!(
                "GET {url} failed ({status}; see {})",
                self.log("probe").display()
            );
        }
        let body = std::fs::read(&out)?;
        let _ = std::fs::remove_file(&out);
        Ok(body)
    }

    /// `pkg`, then a many-package scenario's others (each held by its origin), in order.
    pub fn packages(&self) -> anyhow::Result<Vec<&Package>> {
        anyhow::ensure!(
            self.more.len() == self.hosts.origins.len(),
            "{} packages for {} origins",
            self.more.len(),
            self.hosts.origins.len()
        );
        Ok(std::iter::once(self.pkg).chain(self.more).collect())
    }

    /// Check every leecher's copy of every package in `pkgs`, each at
    /// `<dir>/<host>/<client_dir>/<file name>`, for a client whose processes are `pids` (one
    /// per leecher) and reported `finished`. Returns the leechers' labels, each package's
    /// finish per host (a many-package run), and each host's verdict over its packages.
    pub fn verify_leechers(
        &self,
        client_dir: &str,
        pkgs: &[&Package],
        pids: &[u32],
        finished: &PackageTimes,
    ) -> (Vec<String>, Option<PackageFinish>, Vec<Result<(), String>>) {
        let leechers = &self.hosts.leechers;
        let verified = verify_each(leechers.len(), pkgs, |h, p| {
            self.dir
                .join(&leechers[h].label)
                .join(client_dir)
                .join(&p.file_name)
        });
        let labels: Vec<String> = leechers.iter().map(|h| h.label.clone()).collect();
        let packages = package_finish(&labels, pkgs, pids, finished, &verified);
        let verified = combine_verified(&verified, pkgs.len());
        (labels, packages, verified)
    }

    /// The same run with another package (the rollout scenario distributes two versions).
    pub fn with_pkg<'b>(&'b self, pkg: &'b Package) -> Ctx<'b> {
        Ctx {
            hosts: self.hosts,
            topo: self.topo,
            pkg,
            more: self.more,
            fbpkg_bin: self.fbpkg_bin,
            self_exe: self.self_exe,
            dir: self.dir.clone(),
            logs: self.logs.clone(),
            log_prefix: self.log_prefix.clone(),
            deadline: self.deadline,
            t_kr_secs: self.t_kr_secs,
            sample_every: self.sample_every,
            rqbit_linger: self.rqbit_linger,
            agent_args: self.agent_args,
            churn: self.churn,
            hold: self.hold,
        }
    }

    /// What every contender reports of its run: the figures from `leechers` and the closed
    /// window, the CPU and processes from `acct`, the logs' notes. How it was set up, its own
    /// counters, notes and per-scenario parts are left empty for the contender to fill in.
    pub fn report(
        &self,
        contender: &str,
        closed: Closed,
        acct: Accounting,
        leechers: Vec<LeecherOutcome>,
        seed_payload_bytes: Option<u64>,
    ) -> ContenderRun {
        let summary = self.topo.map(|_| {
            summarize(
                &leechers,
                self.t_kr_secs,
                self.pkg.size,
                closed.seed_tx_bytes.unwrap_or(0),
                seed_payload_bytes,
            )
        });
        let mut cpu = acct.cpu();
        cpu.machine_busy_cores = closed.machine_busy_cores;
        ContenderRun {
            contender: contender.into(),
            setup: serde_json::json!({}),
            summary,
            stalls: closed.stalls(&leechers),
            hosts_wire: closed.hosts_wire(),
            leechers,
            seed_wire_tx_bytes: closed.seed_tx_bytes,
            seed_tbf_bytes: closed.seed_tbf_bytes,
            seed_payload_bytes,
            payload: serde_json::json!({}),
            window_secs: closed.secs,
            setup_notes: BTreeMap::new(),
            cpu,
            processes: acct.records,
            log_notes: self.log_notes(),
            notes: Vec::new(),
            timeline: closed.timeline,
            packages: None,
            restarted: None,
        }
    }

    /// Start the fbpkg-rs tracker on the tracker host, with `extra` flags, and wait until it
    /// answers `/readyz`.
    pub fn start_tracker(&self, allow_unregistered: bool, extra: &[&str]) -> anyhow::Result<Proc> {
        let data = self.host_dir(&self.hosts.tracker, "tracker")?;
        let listen = self.hosts.tracker.addr(TRACKER_PORT);
        let mut argv: Vec<std::ffi::OsString> = vec![
            self.fbpkg_bin.into(),
            "tracker".into(),
            "--listen".into(),
            listen.into(),
            "--data-dir".into(),
            data.into(),
        ];
        if !self.hosts.tracker.ip.is_loopback() {
            argv.push("--allow-unauthenticated-publish".into());
        }
        if allow_unregistered {
            argv.push("--allow-unregistered".into());
        }
        argv.extend(extra.iter().map(Into::into));
        let mut spec = Spec::new("tracker", Some(&self.hosts.tracker.ns), argv);
        spec.stderr = Some(self.log("tracker"));
        let mut p = Proc::spawn(spec)?;
        if let Err(e) = self.tracker_get("/readyz", Duration::from_secs(20)) {
            if let Some(s) = p.poll() {
                bail!(
                    "the tracker exited ({s}); see {}",
                    self.log("tracker").display()
                );
            }
            return Err(e);
        }
        Ok(p)
    }

    /// Wait until the tracker lists `seed_addr` as a seeder of the package's swarm; returns
    /// how long that took.
    pub fn wait_seed_listed(&self, seed_addr: &str, timeout: Duration) -> anyhow::Result<f64> {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            procs::check_cancelled()?;
            let body = self.tracker_get("/api/v1/swarms", Duration::ZERO)?;
            let swarms: serde_json::Value = serde_json::from_slice(&body)?;
            let listed = swarms.as_array().into_iter().flatten().any(|s| {
                s["info_hash"] == self.pkg.info_hash.as_str()
                    && s["peers"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|p| p["addr"] == seed_addr && p["left"].as_u64() == Some(0))
            });
            if listed {
                return Ok(start.elapsed().as_secs_f64());
            }
            last = String::from_utf8_lossy(&body).chars().take(300).collect();
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("the tracker did not list the seed {seed_addr} within {timeout:?}; last: {last}")
    }

    /// Warnings and errors of this contender's logs, merged.
    pub fn log_notes(&self) -> Vec<Notable> {
        let mut all = Vec::new();
        let prefix = format!("{}-", self.log_prefix);
        for entry in std::fs::read_dir(&self.logs)
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix)
                && let Ok(text) = std::fs::read_to_string(entry.path())
            {
                all.extend(logscan::notable(&text));
            }
        }
        logscan::merge(all)
    }
}

/// How long a setup step may take for a package of `size` bytes: `base` plus a second per
/// 50 MiB (hashing, copying on a busy 2-core machine).
pub fn scaled(base: Duration, size: u64) -> Duration {
    base + Duration::from_secs(size / (50 << 20))
}

/// Run one contender.
pub fn run(which: Which, ctx: &Ctx<'_>) -> anyhow::Result<ContenderRun> {
    if ctx.pkg.tree.is_some() && !matches!(which, Which::Fbpkg | Which::Aria2) {
        bail!(
            "{} does not run directory packages yet (fbpkg-rs and aria2 do)",
            which.name()
        );
    }
    if ctx.hold.is_some() && !matches!(which, Which::Fbpkg) {
        bail!(
            "{} does not run hosts holding a previous version (fbpkg-rs does)",
            which.name()
        );
    }
    std::fs::create_dir_all(&ctx.dir)?;
    let result = match which {
        Which::Fbpkg => fbpkg::run(ctx),
        Which::Rqbit => rqbit::run(ctx),
        Which::Aria2 => aria2::run(ctx),
        Which::Http => http::run(ctx),
    };
    // Free the tmpfs before the next contender: up to N+2 copies of the package.
    let _ = std::fs::remove_dir_all(&ctx.dir);
    result
}
