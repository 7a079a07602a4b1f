//! `delta_bench`: what a new version of a directory package costs hosts that hold the previous
//! one (issue 13, item 1), against hosts that hold nothing, on loopback.
//!
//! ```text
//! cargo run --release -p fbpkg-benches --bin delta_bench              # 512 MiB, 4 hosts
//! cargo run --release -p fbpkg-benches --bin delta_bench -- --size-mib 64 --hosts 2
//! ```
//!
//! The package is made up by `fbpkg_benches::delta_tree`, deterministically: four large files of
//! random bytes and thousands of small text files; version N+1 replaces the smallest large
//! file, edits ten small files and adds one: about `--changed-percent` of the bytes, in a
//! handful of files, as a rebuild of one library and a few configs would.
//!
//! One tracker and an origin agent that publishes both versions; `--hosts` agents fetch N (not
//! timed), then all fetch N+1 at once (the delta run). Then as many fresh agents, holding
//! nothing, fetch N+1 at once (the full run). Per host: piece bytes received, what they took on
//! the wire (agents send each other blocks zstd-compressed), and the time of its `get`; for the
//! origin, what it sent of N+1, per copy delivered. Everything shares one machine and loopback:
//! times compare the two runs with each other, not with a network. The swarm bench's `delta`
//! scenario runs the same trees on shaped links, 16 hosts, beside aria2.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use fbpkg_benches::delta_tree;
use fbpkg_benches::fbpkg_binary::{self, KillOnDrop};
use fbpkg_peer::cache::METAINFO_FILE;
use serde::Serialize;
use serde_json::Value;

/// Network cost of a new version of a directory package, delta against full.
#[derive(Debug, Parser)]
#[command(max_term_width = 100)]
struct Args {
    /// The fbpkg-rs binary (default: a release build of this workspace).
    #[arg(long, env = "FBPKG_BENCH_FBPKG_BIN")]
    fbpkg_bin: Option<PathBuf>,

    /// The package's size in MiB (16 to 8192).
    #[arg(long, default_value_t = 512)]
    size_mib: u64,

    /// Hosts fetching each version (1 to 16).
    #[arg(long, default_value_t = 4)]
    hosts: usize,

    /// Share of the bytes version N+1 changes, in percent (1 to 40).
    #[arg(long, default_value_t = 5.0)]
    changed_percent: f64,

    /// Where the packages and the hosts' caches go (about 2 + 2 x hosts times the size; made
    /// if missing). On a disk, each host's install waits for its fsync and the times follow
    /// the disk's writeback; a tmpfs (`/dev/shm/...`) leaves the agents' own work.
    #[arg(long, env = "FBPKG_BENCH_WORK_DIR")]
    work_dir: Option<PathBuf>,

    /// Longest one `get` may take, in seconds.
    #[arg(long, default_value_t = 600)]
    get_timeout: u64,

    /// Keep the work directory (trees, caches, agents' logs) instead of removing it at the
    /// end; its path is printed.
    #[arg(long)]
    keep_work_dir: bool,

    /// Also write the results as JSON here.
    #[arg(long, env = "FBPKG_BENCH_JSON")]
    json: Option<PathBuf>,
}

/// The processes of one run: a tracker and agents on loopback.
struct Net {
    bin: PathBuf,
    base: PathBuf,
    tracker_url: String,
    _tracker: KillOnDrop,
    agents: Vec<(String, KillOnDrop)>,
}

impl Net {
    fn start(bin: &Path, base: &Path) -> anyhow::Result<Self> {
        let (tracker, tracker_url) = fbpkg_binary::start_tracker(bin, &base.join("tracker"))?;
        Ok(Self {
            bin: bin.to_owned(),
            base: base.to_owned(),
            tracker_url,
            _tracker: tracker,
            agents: Vec::new(),
        })
    }

    /// `--state-dir`, `--cache-dir` and `--tracker` of host `name`.
    fn host_args(&self, name: &str) -> Vec<String> {
        let dir = self.base.join(name);
        vec![
            "--state-dir".into(),
            dir.join("state").display().to_string(),
            "--cache-dir".into(),
            dir.join("cache").display().to_string(),
            "--tracker".into(),
            self.tracker_url.clone(),
        ]
    }

    fn command(&self, name: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args).args(self.host_args(name));
        cmd
    }

    /// Start host `name`'s agent and wait until it answers `status`.
    fn agent(&mut self, name: &str) -> anyhow::Result<()> {
        let port = fbpkg_binary::free_loopback_port()?.port();
        let log = std::fs::File::create(self.base.join(format!("{name}.log")))?;
        let mut cmd = Command::new(&self.bin);
        let level = std::env::var("FBPKG_BENCH_AGENT_LOG").unwrap_or_else(|_| "warn".into());
        cmd.args(["--log", level.as_str(), "agent", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .args(self.host_args(name))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = KillOnDrop(
            cmd.spawn()
                .with_context(|| format!("starting agent {name}"))?,
        );
        self.agents.push((name.to_owned(), child));
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.status(name).is_err() {
            ensure!(
                Instant::now() < deadline,
                "agent {name} did not answer within 30 s (see {name}.log)"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The last lines of host `name`'s agent log.
    fn log_tail(&self, name: &str) -> String {
        let log =
            std::fs::read_to_string(self.base.join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn stop(&mut self, name: &str) {
        self.agents.retain(|(n, _)| n != name);
    }

    fn status(&self, name: &str) -> anyhow::Result<Vec<Value>> {
        let out = self.command(name, &["status", "--json"]).output()?;
        ensure!(out.status.success(), "status of {name}");
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// This host's status entry for `reference`'s version.
    fn torrent(&self, name: &str, reference: &str) -> anyhow::Result<Value> {
        let sha = reference.split_once(':').map_or("", |(_, s)| s);
        self.status(name)?
            .into_iter()
            .find(|t| t["sha256"] == sha)
            .with_context(|| format!("{name} does not list {reference}"))
    }

    fn publish(&self, name: &str, dir: &Path) -> anyhow::Result<String> {
        let mut cmd = self.command(name, &["publish", "app"]);
        let out = cmd.arg(dir).args(["--retry-for", "30s"]).output()?;
        ensure!(
            out.status.success(),
            "publish: {}\n{name}'s agent log ends:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail(name)
        );
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    }

    /// `get reference` on every host at once; each one's seconds.
    fn get_all(&self, hosts: &[String], reference: &str, timeout: u64) -> anyhow::Result<Vec<f64>> {
        let start = Instant::now();
        let mut running = Vec::new();
        for h in hosts {
            let child = self
                .command(
                    h,
                    &["get", reference, "--stall-timeout", &format!("{timeout}s")],
                )
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()?;
            running.push((h, child));
        }
        let mut times = vec![None; running.len()];
        let deadline = start + Duration::from_secs(timeout + 60);
        while times.iter().any(Option::is_none) {
            ensure!(Instant::now() < deadline, "get {reference} did not end");
            for (i, (h, child)) in running.iter_mut().enumerate() {
                if times[i].is_some() {
                    continue;
                }
                let Some(status) = child.try_wait()? else {
                    continue;
                };
                times[i] = Some(start.elapsed().as_secs_f64());
                if !status.success() {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = std::io::Read::read_to_string(&mut e, &mut err);
                    }
                    bail!(
                        "get {reference} on {h}: {err}\n{h}'s agent log ends:\n{}",
                        self.log_tail(h)
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let times = times.into_iter().flatten().collect();
        Ok(times)
    }
}

#[derive(Debug, Serialize)]
struct HostRun {
    host: String,
    seconds: f64,
    received: u64,
    received_wire: u64,
}

#[derive(Debug, Serialize)]
struct Run {
    kind: &'static str,
    hosts: Vec<HostRun>,
    origin_sent: u64,
    origin_sent_wire: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    size: u64,
    files: usize,
    changed_bytes: u64,
    metainfo_bytes: u64,
    /// Disk a delta host's cache takes holding both versions (each inode counted once, as
    /// `du` counts), per host.
    cache_disk_bytes: Vec<u64>,
    runs: Vec<Run>,
}

fn measure(
    net: &Net,
    hosts: &[String],
    next: &str,
    timeout: u64,
    kind: &'static str,
) -> anyhow::Result<Run> {
    let before = net.torrent("origin", next)?;
    let times = net.get_all(hosts, next, timeout)?;
    let mut out = Vec::new();
    for (h, seconds) in hosts.iter().zip(times) {
        let t = net.torrent(h, next)?;
        out.push(HostRun {
            host: h.clone(),
            seconds,
            received: t["downloaded"].as_u64().unwrap_or(0),
            received_wire: t["downloaded_wire"].as_u64().unwrap_or(0),
        });
    }
    let after = net.torrent("origin", next)?;
    let sent = |t: &Value, k: &str| t[k].as_u64().unwrap_or(0);
    Ok(Run {
        kind,
        hosts: out,
        origin_sent: sent(&after, "uploaded") - sent(&before, "uploaded"),
        origin_sent_wire: sent(&after, "uploaded_wire") - sent(&before, "uploaded_wire"),
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        (16..=8192).contains(&args.size_mib),
        "--size-mib must be 16 to 8192"
    );
    ensure!((1..=16).contains(&args.hosts), "--hosts must be 1 to 16");
    ensure!(
        (1.0..=40.0).contains(&args.changed_percent),
        "--changed-percent must be 1 to 40"
    );
    let bin = fbpkg_binary::release_binary(args.fbpkg_bin.clone())?;
    let work = match &args.work_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            tempfile::tempdir_in(dir)?
        }
        None => tempfile::tempdir()?,
    };
    if args.keep_work_dir {
        let kept = work.keep();
        eprintln!("work directory kept: {}", kept.display());
        return run(&args, &bin, &kept);
    }
    run(&args, &bin, work.path())
}

fn run(args: &Args, bin: &Path, base: &Path) -> anyhow::Result<()> {
    let size = args.size_mib << 20;
    let src = base.join("src");
    eprintln!("making a {} MiB tree", args.size_mib);
    let tree = delta_tree::make_tree(&src, size, args.changed_percent / 100.0)?;

    let mut net = Net::start(bin, base)?;
    net.agent("origin")?;
    let v1 = net.publish("origin", &src)?;
    let holders: Vec<String> = (0..args.hosts).map(|i| format!("holder{i}")).collect();
    for h in &holders {
        net.agent(h)?;
    }
    eprintln!("{} hosts fetch {v1}", args.hosts);
    net.get_all(&holders, &v1, args.get_timeout)?;

    let changed_bytes = delta_tree::make_next(&src, &tree)?;
    let v2 = net.publish("origin", &src)?;
    let metainfo_bytes = {
        let sha = v2.split_once(':').map_or("", |(_, s)| s);
        delta_tree::file_len(&base.join("origin/cache/app").join(sha).join(METAINFO_FILE))
    };
    eprintln!("delta: {} hosts holding {v1} fetch {v2}", args.hosts);
    let delta = measure(&net, &holders, &v2, args.get_timeout, "delta")?;
    let cache_disk_bytes = holders
        .iter()
        .map(|h| disk_bytes(&base.join(h).join("cache")))
        .collect::<anyhow::Result<_>>()?;
    for h in &holders {
        net.stop(h);
    }
    let fresh: Vec<String> = (0..args.hosts).map(|i| format!("fresh{i}")).collect();
    for h in &fresh {
        net.agent(h)?;
    }
    eprintln!("full: {} fresh hosts fetch {v2}", args.hosts);
    let full = measure(&net, &fresh, &v2, args.get_timeout, "full")?;

    let report = Report {
        size: delta_tree::tree_bytes(&src)?,
        files: tree.files + 1,
        changed_bytes,
        metainfo_bytes,
        cache_disk_bytes,
        runs: vec![delta, full],
    };
    print(&report, args.hosts);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}

fn print(r: &Report, hosts: usize) {
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    println!(
        "package: {:.1} MiB in {} files; N+1 changes {:.2} MiB ({:.1}%); metainfo {:.1} KiB",
        mib(r.size),
        r.files,
        mib(r.changed_bytes),
        100.0 * r.changed_bytes as f64 / r.size as f64,
        r.metainfo_bytes as f64 / 1024.0
    );
    println!(
        "{:<6} {:>20} {:>20} {:>16} {:>22}",
        "run", "received/host MiB", "on the wire MiB", "time s", "origin sent/copy MiB"
    );
    let (lo, hi) = (
        r.cache_disk_bytes.iter().min().copied().unwrap_or(0),
        r.cache_disk_bytes.iter().max().copied().unwrap_or(0),
    );
    println!(
        "cache on disk per delta host, N and N+1: {:.1}–{:.1} MiB ({:.2}–{:.2}x one version's files)",
        mib(lo),
        mib(hi),
        lo as f64 / r.size as f64,
        hi as f64 / r.size as f64
    );
    let limit = 1.2 * r.changed_bytes as f64 + r.metainfo_bytes as f64;
    let mut met = true;
    for run in &r.runs {
        let span = |f: &dyn Fn(&HostRun) -> f64| {
            let v: Vec<f64> = run.hosts.iter().map(f).collect();
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(0.0, f64::max);
            (lo, hi)
        };
        let (r_lo, r_hi) = span(&|h| mib(h.received));
        let (w_lo, w_hi) = span(&|h| mib(h.received_wire));
        let (t_lo, t_hi) = span(&|h| h.seconds);
        let per_copy = run.origin_sent as f64 / hosts as f64;
        println!(
            "{:<6} {:>20} {:>20} {:>16} {:>22}",
            run.kind,
            format!("{r_lo:.1}–{r_hi:.1}"),
            format!("{w_lo:.1}–{w_hi:.1}"),
            format!("{t_lo:.2}–{t_hi:.2}"),
            format!(
                "{:.1} (wire {:.1})",
                per_copy / f64::from(1 << 20),
                run.origin_sent_wire as f64 / hosts as f64 / f64::from(1 << 20)
            ),
        );
        if run.kind == "delta" {
            met = run.hosts.iter().all(|h| h.received as f64 <= limit) && per_copy <= limit;
        }
    }
    println!(
        "target (issue 13): received per host and origin sent per copy <= 1.2 x changed + metainfo \
         ({:.2} MiB): {}",
        limit / f64::from(1 << 20),
        if met { "met" } else { "MISSED" }
    );
}

/// Bytes of disk the files under `root` take, each inode once (as `du` counts hard links).
fn disk_bytes(root: &Path) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let e = e?;
            let meta = e.path().symlink_metadata()?;
            if meta.is_dir() {
                dirs.push(e.path());
            }
            if seen.insert((meta.dev(), meta.ino())) {
                total += meta.blocks() * 512;
            }
        }
    }
    Ok(total)
}
