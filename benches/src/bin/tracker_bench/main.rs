//! `tracker_bench`: announces per second, fbpkg-rs tracker against Debian's opentracker, side
//! by side on loopback in one run (BENCHMARKS.md, "Tracker: announces per second").
//!
//! ```text
//! apt-get install -y opentracker        # once
//! cargo run --release -p fbpkg-benches --bin tracker_bench -- --json tracker-bench.json
//! ```
//!
//! The run: build `fbpkg-rs` (release) unless `--fbpkg-bin` is given; start it with
//! `FBPKG_LOG=warn` and publish one tiny package per swarm; start opentracker on 127.0.0.1 with
//! a whitelist of the same info-hashes; check both refuse an unknown swarm; fill every swarm
//! with the same number of peers; then, for each mode (a new connection per request, and
//! keep-alive) and each tracker, a closed-loop load for a fixed time after a warm-up; then an
//! open-loop load at half of opentracker's peak (best of its two modes) for p50/p99 latency, in
//! both modes unless `--latency-modes` says one. Only 200 responses whose body decodes as an
//! announce response without `failure reason` are counted.
//!
//! Each measurement also reports the CPU used by the tracker, by this generator and by the rest
//! of the machine over its window: on a shared 2-core machine that says whether a figure was
//! set by the tracker, by the generator, or by a neighbour's build. On loopback the kernel's
//! TCP work for both ends is mostly charged to whichever side sends, so a connection per
//! request costs the generator about as much CPU as it costs the tracker.
//!
//! With `--replicas 1,2,4` the run is another one (`replicas.rs`): no opentracker, but the
//! embedded peer store against 1, 2 and 4 replicas sharing one Redis, announces and resolves.
//!
//! ```text
//! cargo run --release -p fbpkg-benches --bin tracker_bench -- --replicas 1,2,4 --json r.json
//! ```

mod conn;
mod contenders;
mod cpu;
mod load;
mod redis;
mod replicas;
mod report;
mod wrk;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, ensure};
use clap::Parser;
use fbpkg_benches::fbpkg_binary;
use fbpkg_benches::latency::LatencySummary;
use fbpkg_benches::workload::{Workload, ZoneMix};

use crate::contenders::Contender;
use crate::load::{ClosedLoop, Counts, Mode, OpenLoop, Source};
use crate::report::{Latency, ReplicaReport, Report, Throughput};

/// Tracker announces per second: fbpkg-rs against opentracker, side by side on loopback.
#[derive(Debug, Parser)]
#[command(max_term_width = 100)]
struct Args {
    /// Counted window of each measurement, in seconds (1 to 120).
    #[arg(long, env = "FBPKG_BENCH_DURATION", default_value_t = 10.0)]
    duration: f64,

    /// Uncounted warm-up before each measurement, in seconds (0 to 30).
    #[arg(long, env = "FBPKG_BENCH_WARMUP", default_value_t = 2.0)]
    warmup: f64,

    /// Registered info-hashes (swarms).
    #[arg(long, default_value_t = 4096)]
    swarms: usize,

    /// Announces per swarm before any measurement, so swarms hold peers as in a steady state.
    #[arg(long, default_value_t = 16)]
    prefill_per_swarm: u64,

    /// Concurrent connections in connection-per-request mode.
    #[arg(long, default_value_t = 64)]
    conn_concurrency: usize,

    /// Concurrent connections in keep-alive mode.
    #[arg(long, default_value_t = 128)]
    keepalive_connections: usize,

    /// Generator threads for the closed loop (each a single-threaded tokio runtime).
    #[arg(long, default_value_t = 2)]
    threads: usize,

    /// Sender threads of the open loop (requests in flight at most).
    #[arg(long, default_value_t = 32)]
    latency_threads: usize,

    /// Connection modes of the latency measurement.
    #[arg(long, value_enum, default_value_t = LatencyModes::Both)]
    latency_modes: LatencyModes,

    /// Longest one request may take, in seconds.
    #[arg(long, default_value_t = 5.0)]
    op_timeout: f64,

    /// A release build of fbpkg-rs; without it the bench runs
    /// `cargo build --release -p fbpkg-peer --bin fbpkg-rs` first.
    #[arg(long, env = "FBPKG_BENCH_FBPKG_BIN")]
    fbpkg_bin: Option<PathBuf>,

    /// opentracker binary [default: opentracker on PATH].
    #[arg(long)]
    opentracker_bin: Option<PathBuf>,

    /// Write the JSON report here (`-` for stdout; the table then goes to stderr).
    #[arg(long)]
    json: Option<PathBuf>,

    /// Also run wrk (Debian's) against both trackers as a cross-check of the generator.
    #[arg(long)]
    wrk: bool,

    /// Concurrent PUTs when publishing the packages.
    #[arg(long, default_value_t = 16)]
    publish_concurrency: usize,

    /// Share of announces (0 to 1) that carry a zone, `zone=dcN/rackM`, so the tracker's
    /// closest-peers-first path is measured too (opentracker ignores the parameter).
    #[arg(long, default_value_t = 0.25)]
    zoned_fraction: f64,

    /// Datacenters the zones are spread over.
    #[arg(long, default_value_t = 4)]
    datacenters: u32,

    /// Racks in each datacenter.
    #[arg(long, default_value_t = 16)]
    racks_per_datacenter: u32,

    /// Instead of the opentracker comparison: the embedded peer store, then this many tracker
    /// replicas (comma-separated counts) sharing one redis-server (`--peer-store redis://`),
    /// each loaded round-robin: announces/s, p50/p99, Redis round trips per announce, and
    /// resolves/s per replica. Needs redis-server (`apt-get install -y redis-server`).
    #[arg(long, env = "FBPKG_BENCH_REPLICAS", value_delimiter = ',')]
    replicas: Vec<usize>,

    /// Connection modes of the `--replicas` announce measurements.
    #[arg(long, value_enum, default_value_t = LatencyModes::KeepAlive)]
    replica_modes: LatencyModes,

    /// Keep-alive connections of the `--replicas` announce measurements, comma-separated: each
    /// store is measured at each count and compared at its own peak. A replica adds a round
    /// trip to Redis to every announce, so it needs more announces in flight than the
    /// embedded store to keep both cores busy; one count would measure the load, not the
    /// store.
    #[arg(long, value_delimiter = ',', default_values_t = [128, 256, 512])]
    replica_connections: Vec<usize>,

    /// Open-loop rate of the `--replicas` latency measurement, announces/s over all replicas
    /// [default: half of each configuration's own closed-loop peak].
    #[arg(long)]
    replica_latency_rate: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LatencyModes {
    Both,
    KeepAlive,
    ConnPerRequest,
}

impl LatencyModes {
    fn modes(self) -> Vec<Mode> {
        match self {
            Self::Both => vec![Mode::KeepAlive, Mode::ConnPerRequest],
            Self::KeepAlive => vec![Mode::KeepAlive],
            Self::ConnPerRequest => vec![Mode::ConnPerRequest],
        }
    }
}

fn seconds(name: &str, v: f64, min: f64, max: f64) -> anyhow::Result<Duration> {
    ensure!(
        v.is_finite() && (min..=max).contains(&v),
        "--{name} must be between {min} and {max} seconds"
    );
    Ok(Duration::from_secs_f64(v))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tracker_bench: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    // Dropping `bench` (on a signal or an error) drops the contenders, which kills them.
    let result = runtime.block_on(async {
        tokio::select! {
            r = bench(args, stop.clone()) => r,
            sig = signals() => {
                stop.store(true, Ordering::Relaxed);
                Err(anyhow::anyhow!("interrupted by {sig}; trackers stopped"))
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tracker_bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn signals() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        _ => std::future::pending().await,
    }
}

async fn bench(args: Args, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let duration = seconds("duration", args.duration, 1.0, 120.0)?;
    let warmup = seconds("warmup", args.warmup, 0.0, 30.0)?;
    let op_timeout = seconds("op-timeout", args.op_timeout, 0.1, 60.0)?;
    ensure!(
        (1..=1_000_000).contains(&args.swarms),
        "--swarms must be 1 to 1,000,000"
    );
    ensure!(
        args.conn_concurrency >= 1
            && args.keepalive_connections >= 1
            && !args.replica_connections.is_empty()
            && args
                .replica_connections
                .iter()
                .all(|&n| (1..=4096).contains(&n)),
        "connection counts must be at least 1 (--replica-connections: 1 to 4096 each)"
    );
    ensure!(
        (1..=64).contains(&args.threads) && (1..=1024).contains(&args.latency_threads),
        "--threads must be 1 to 64 and --latency-threads 1 to 1024"
    );
    let zones = ZoneMix::new(
        args.zoned_fraction,
        args.datacenters,
        args.racks_per_datacenter,
    )
    .context(
        "--zoned-fraction must be 0 to 1, --datacenters and --racks-per-datacenter at least 1",
    )?;
    let started_unix = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let loadavg_before = loadavg();
    let load_config = report::LoadConfig {
        swarms: args.swarms,
        announce: "GET /announce, compact=1, numwant=50, random swarm, random peer id and \
                   port per request, left=0 for 1 in 4, zone=dcN/rackM on zoned_fraction \
                   of them",
        zoned_fraction: zones.fraction(),
        zones: format!(
            "dc0..dc{}/rack0..rack{}, uniform",
            args.datacenters - 1,
            args.racks_per_datacenter - 1
        ),
        prefill_per_swarm: args.prefill_per_swarm,
        duration_s: duration.as_secs_f64(),
        warmup_s: warmup.as_secs_f64(),
        generator_threads: args.threads,
        conn_per_request_concurrency: args.conn_concurrency,
        keep_alive_connections: args.keepalive_connections,
        latency_threads: args.latency_threads,
        op_timeout_s: op_timeout.as_secs_f64(),
    };
    if !args.replicas.is_empty() {
        if let Some(rate) = args.replica_latency_rate {
            ensure!(
                rate.is_finite() && rate > 0.0,
                "--replica-latency-rate must be more than 0"
            );
        }
        let given = args.fbpkg_bin.clone();
        let fbpkg_bin =
            tokio::task::spawn_blocking(move || fbpkg_binary::release_binary(given)).await??;
        let packages = contenders::build_packages(args.swarms, "http://127.0.0.1:6969/announce")?;
        let workload = Arc::new(
            Workload::new(packages.iter().map(|(_, m)| m.info_hash).collect())
                .context("no swarms")?
                .with_zones(zones),
        );
        let timing = replicas::Timing {
            warmup,
            duration,
            op_timeout,
        };
        let (configs, redis) =
            replicas::run(&args, timing, &fbpkg_bin, &packages, &workload, &stop).await?;
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let report = ReplicaReport {
            benchmark: "tracker replicas sharing one Redis against the embedded store \
                        (tracker issue 11)",
            started_unix,
            machine: report::Machine {
                cores,
                loadavg_before,
                loadavg_after: loadavg(),
            },
            load: load_config,
            redis,
            targets_met: report::replica_targets(&configs),
            configs,
            notes: vec![
                format!(
                    "every replica, redis-server and the load generator share this machine's \
                     {cores} cores: past one replica the figures are CPU-bound, and a \
                     replica's share falls as replicas are added (see the cpu column)"
                ),
                "each replica publishes every package into a catalog of its own \
                 (--data-dir is per process); peers are what Redis shares"
                    .into(),
            ],
        };
        let json = serde_json::to_string_pretty(&report)?;
        return emit(args.json.as_deref(), json, &report::replica_table(&report));
    }

    let opentracker_bin = contenders::find_opentracker(args.opentracker_bin.clone())?;
    let given = args.fbpkg_bin.clone();
    let fbpkg_bin =
        tokio::task::spawn_blocking(move || fbpkg_binary::release_binary(given)).await??;

    let packages = contenders::build_packages(args.swarms, "http://127.0.0.1:6969/announce")?;
    let hashes: Vec<_> = packages.iter().map(|(_, m)| m.info_hash).collect();
    let workload = Arc::new(
        Workload::new(hashes.clone())
            .context("no swarms")?
            .with_zones(zones),
    );

    let fbpkg =
        contenders::start_fbpkg(&fbpkg_bin, &packages, args.publish_concurrency, &[]).await?;
    let opentracker = contenders::start_opentracker(&opentracker_bin, &hashes).await?;
    let mut all = [opentracker, fbpkg];
    for c in &all {
        eprintln!(
            "{}: pid {} on {}, refuses unknown swarms: {}",
            c.name,
            c.process.pid(),
            c.target.addr,
            c.setup.refuses_unknown_swarms
        );
    }

    let closed = |mode: Mode| ClosedLoop {
        mode,
        connections: match mode {
            Mode::ConnPerRequest => args.conn_concurrency,
            Mode::KeepAlive => args.keepalive_connections,
        },
        threads: args.threads,
        warmup,
        duration,
        op_timeout,
    };

    // Same peers in every swarm of both trackers before the first measurement.
    let prefill_total = args.prefill_per_swarm * args.swarms as u64;
    if prefill_total > 0 {
        for c in &mut all {
            let started = Instant::now();
            let cfg = ClosedLoop {
                warmup: Duration::ZERO,
                duration: Duration::from_secs(300),
                ..closed(Mode::KeepAlive)
            };
            let source = Source::Prefill {
                total: prefill_total,
            };
            let counts = total(
                load::start_closed(
                    std::slice::from_ref(&c.target),
                    &workload,
                    &cfg,
                    source,
                    &stop,
                )?
                .join()
                .await?
                .into_iter()
                .flatten()
                .collect(),
            );
            c.process.check_alive()?;
            ensure!(
                counts.ok == prefill_total,
                "{}: prefill answered {} of {prefill_total} announces: {:?}",
                c.name,
                counts.ok,
                counts.errors
            );
            eprintln!(
                "{}: prefilled {prefill_total} announces in {:.1} s",
                c.name,
                started.elapsed().as_secs_f64()
            );
        }
    }

    // Which tracker goes first alternates, so neither always gets the quieter moment.
    let mut throughput = Vec::new();
    for (round, mode) in [Mode::ConnPerRequest, Mode::KeepAlive]
        .into_iter()
        .enumerate()
    {
        for i in 0..all.len() {
            let c = &mut all[(i + round) % 2];
            throughput.push(measure_closed(c, &workload, &closed(mode), &stop).await?);
        }
    }

    let peak = throughput
        .iter()
        .filter(|t| t.contender == "opentracker")
        .map(|t| t.requests_per_sec)
        .fold(0.0, f64::max);
    ensure!(
        peak > 0.0,
        "opentracker answered nothing; cannot set the latency rate"
    );
    let rate = peak / 2.0;
    let mut latency = Vec::new();
    for (round, mode) in args.latency_modes.modes().into_iter().enumerate() {
        for i in 0..all.len() {
            let c = &mut all[(i + round) % 2];
            let cfg = OpenLoop {
                mode,
                rate,
                threads: args.latency_threads,
                warmup,
                duration,
                op_timeout,
            };
            latency.push(measure_open(c, &workload, &cfg, &stop).await?);
        }
    }
    contenders::learn_keep_alive(&mut all);

    let mut wrk_results = Vec::new();
    if args.wrk {
        let dir = tempfile::tempdir()?;
        let script = wrk::write_script(dir.path(), &workload)?;
        for mode in [Mode::ConnPerRequest, Mode::KeepAlive] {
            for c in &mut all {
                c.process.check_alive()?;
                let conns = closed(mode).connections;
                let url = format!("http://{}", c.target.addr);
                let (name, script, threads) = (c.name, script.clone(), args.threads);
                let r = tokio::task::spawn_blocking(move || {
                    wrk::run(name, &url, mode, threads, conns, duration, &script)
                })
                .await??;
                eprintln!(
                    "wrk {} {}: {:.0} req/s",
                    r.contender,
                    mode.label(),
                    r.requests_per_sec
                );
                wrk_results.push(r);
            }
        }
    }

    let ratios = report::Ratios {
        opentracker_peak: Some(peak),
        latency_rate: Some(rate),
        ..report::Ratios::compute(&throughput, &latency)
    };
    let report = Report {
        benchmark: "tracker announces per second (BENCHMARKS.md)",
        started_unix,
        machine: report::Machine {
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            loadavg_before,
            loadavg_after: loadavg(),
        },
        load: load_config,
        contenders: all
            .iter()
            .map(|c| (c.name.to_owned(), c.setup.clone()))
            .collect(),
        throughput,
        latency,
        ratios,
        wrk: wrk_results,
    };
    let json = serde_json::to_string_pretty(&report)?;
    emit(args.json.as_deref(), json, &report::table(&report))
}

/// Print the table, and write the JSON where `--json` says (`-`: stdout, the table to stderr).
fn emit(json_to: Option<&std::path::Path>, json: String, table: &str) -> anyhow::Result<()> {
    match json_to {
        Some(p) if p.as_os_str() == "-" => {
            println!("{json}");
            eprintln!("{table}");
        }
        Some(p) => {
            std::fs::write(p, json + "\n").with_context(|| format!("writing {}", p.display()))?;
            println!("{table}");
            println!("JSON report: {}", p.display());
        }
        None => println!("{table}"),
    }
    Ok(())
}

fn total(parts: Vec<Counts>) -> Counts {
    parts.into_iter().fold(Counts::default(), |mut acc, c| {
        acc.merge(c);
        acc
    })
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

async fn measure_closed(
    c: &mut Contender,
    workload: &Arc<Workload>,
    cfg: &ClosedLoop,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<Throughput> {
    c.process.check_alive()?;
    let running = load::start_closed(
        std::slice::from_ref(&c.target),
        workload,
        cfg,
        Source::Random,
        stop,
    )?;
    let (start, end) = (running.start, running.end);
    let cpu = cpu_over(&[c.process.pid()], start, end).await;
    let counts = total(running.join().await?.into_iter().flatten().collect());
    c.process.check_alive()?;
    let rps = counts.ok as f64 / cfg.duration.as_secs_f64();
    eprintln!(
        "{:<12} {:<17} {:>9.0} announces/s  ({} not ok, {:.1} peers per response)",
        c.name,
        cfg.mode.label(),
        rps,
        counts.not_ok(),
        counts.mean_peers()
    );
    Ok(Throughput {
        contender: c.name.to_owned(),
        mode: cfg.mode,
        connections: cfg.connections,
        requests_per_sec: rps,
        mean_peers: counts.mean_peers(),
        counts,
        cpu,
    })
}

async fn measure_open(
    c: &mut Contender,
    workload: &Arc<Workload>,
    cfg: &OpenLoop,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<Latency> {
    c.process.check_alive()?;
    let latency = measure_open_on(
        c.name,
        std::slice::from_ref(&c.target),
        &[c.process.pid()],
        c.started,
        workload,
        cfg,
        stop,
    )
    .await?;
    c.process.check_alive()?;
    Ok(latency)
}

/// An open-loop measurement against `targets` (processes `pids`, started at `started`),
/// reported as `name`.
async fn measure_open_on(
    name: &str,
    targets: &[Arc<load::Target>],
    pids: &[u32],
    started: Instant,
    workload: &Arc<Workload>,
    cfg: &OpenLoop,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<Latency> {
    let running = load::start_open(targets, workload, cfg, stop)?;
    let (start, end) = (running.start, running.end);
    let cpu = cpu_over(pids, start, end).await;
    let mut counts = Counts::default();
    let mut samples = Vec::new();
    let mut behind = 0;
    let mut stalls = Vec::new();
    for part in running.join().await? {
        counts.merge(part.counts);
        samples.extend(part.samples);
        behind += part.behind_schedule;
        stalls.extend(part.stalls);
    }
    let stalls_over_5ms = stalls.len();
    stalls.sort_by_key(|s| std::cmp::Reverse(s.1));
    stalls.truncate(40);
    stalls.sort_by_key(|s| s.0);
    let slowest = stalls
        .iter()
        .map(|(at, took)| report::Stall {
            at_s: round3(at.saturating_duration_since(started).as_secs_f64()),
            ms: round3(took.as_secs_f64() * 1e3),
        })
        .collect();
    let summary = LatencySummary::of(&mut samples);
    let achieved = counts.ok as f64 / cfg.duration.as_secs_f64();
    eprintln!(
        "{:<12} {:<17} latency at {:.0}/s: p50 {} us, p99 {} us ({achieved:.0}/s achieved, {} \
         not ok)",
        name,
        cfg.mode.label(),
        cfg.rate,
        summary.map_or("-".into(), |s| format!("{:.0}", s.p50_us)),
        summary.map_or("-".into(), |s| format!("{:.0}", s.p99_us)),
        counts.not_ok()
    );
    Ok(Latency {
        contender: name.to_owned(),
        mode: cfg.mode,
        target_rate: cfg.rate,
        achieved_rate: achieved,
        summary,
        behind_schedule: behind,
        stalls_over_5ms,
        slowest,
        counts,
        cpu,
    })
}

/// CPU use of `pids` (the trackers) over the counted window `[start, end)` (waits for the
/// window to pass).
async fn cpu_over(pids: &[u32], start: Instant, end: Instant) -> Option<cpu::CpuUse> {
    tokio::time::sleep_until(start.into()).await;
    let a = cpu::snapshot(pids);
    tokio::time::sleep_until(end.into()).await;
    cpu::between(a, cpu::snapshot(pids))
}
