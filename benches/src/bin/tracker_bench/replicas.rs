//! `--replicas 1,2,4`: fbpkg-rs tracker replicas sharing one Redis (`--peer-store redis://`),
//! against the embedded store, in one run (the tracker's issue 11).
//!
//! One redis-server on loopback (free port, scratch directory, no persistence) serves the whole
//! run. Then, for the embedded store and for each replica count N in turn, every measurement
//! starts from the same state (`fresh`): `FLUSHALL`; start N trackers (one for the embedded
//! store), each with a data directory of its own, and publish every package to each (a
//! replica's catalog is its own: `--data-dir` holds a lock-free in-process index, not
//! something two processes may share); fill the swarms through the replicas round-robin; then
//! measure, with every connection of the load going to the replicas round-robin:
//!
//! - announces/s, closed loop, at each of `--replica-connections` keep-alive connections (a
//!   configuration is compared at its own peak: see `report::peak`), per replica and in total,
//!   with the Redis round trips per announce (`INFO commandstats` around the counted window:
//!   calls of the commands a client sends itself, `EVALSHA` and the like, divided by the
//!   announces of the window) and the commands Redis ran per announce, those inside
//!   `announce.lua` included;
//! - p50/p99, open loop at half the configuration's own peak (or `--replica-latency-rate`);
//! - resolves/s (`GET /api/v1/packages/NAME/SHA256`, answered from the catalog in memory),
//!   per replica and in total.
//!
//! All of it shares the machine: on 2 cores, N replicas, Redis and the generator divide the
//! same CPU, so per-replica figures fall as N grows; the report gives each one's CPU share.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use fbpkg_benches::workload::Workload;
use fbpkg_common::metainfo::Metainfo;

use crate::contenders::{self, Contender};
use crate::load::{self, ClosedLoop, Counts, Mode, OpenLoop, Source, Target};
use crate::redis::{CommandCalls, RedisServer, RedisSetup};
use crate::report::{ConfigResult, RedisTime, ReplicaCpu, Served};
use crate::{Args, cpu};

/// Resolves per second each replica should serve (the target).
pub const TARGET_RESOLVES_PER_REPLICA: f64 = 20_000.0;
/// A Redis-backed replica should reach this share of the embedded store's announces/s.
pub const TARGET_SHARE_OF_EMBEDDED: f64 = 0.5;

/// Where a configuration keeps peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    /// `--peer-store memory`, one tracker.
    Embedded,
    /// `--peer-store redis://...`, this many replicas.
    Redis(usize),
}

impl Store {
    fn label(self) -> String {
        match self {
            Store::Embedded => "embedded".into(),
            Store::Redis(n) => format!("redis x{n}"),
        }
    }

    fn replicas(self) -> usize {
        match self {
            Store::Embedded => 1,
            Store::Redis(n) => n,
        }
    }
}

/// Counted windows and limits, validated by `main`.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Uncounted warm-up before each measurement.
    pub warmup: Duration,
    /// Counted window.
    pub duration: Duration,
    /// Longest one request may take.
    pub op_timeout: Duration,
}

/// Everything a configuration needs.
struct Run<'a> {
    args: &'a Args,
    timing: Timing,
    binary: &'a Path,
    packages: &'a [(String, Metainfo)],
    workload: &'a Arc<Workload>,
    resolve_paths: Arc<Vec<String>>,
    stop: &'a Arc<AtomicBool>,
}

/// Run the embedded store and every replica count of `args.replicas` against one Redis.
pub async fn run(
    args: &Args,
    timing: Timing,
    binary: &Path,
    packages: &[(String, Metainfo)],
    workload: &Arc<Workload>,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<(Vec<ConfigResult>, RedisSetup)> {
    ensure!(
        args.replicas.iter().all(|n| (1..=16).contains(n)),
        "--replicas: each count must be 1 to 16"
    );
    let mut redis = RedisServer::start().await?;
    eprintln!(
        "redis-server: pid {} on {} ({})",
        redis.process.pid(),
        redis.addr,
        redis.setup.version.as_deref().unwrap_or("version unknown")
    );
    let run = Run {
        args,
        timing,
        binary,
        packages,
        workload,
        resolve_paths: Arc::new(
            packages
                .iter()
                .map(|(name, m)| format!("/api/v1/packages/{name}/{}", m.sha256))
                .collect(),
        ),
        stop,
    };
    let stores =
        std::iter::once(Store::Embedded).chain(args.replicas.iter().map(|&n| Store::Redis(n)));
    let mut configs = Vec::new();
    for store in stores {
        configs.push(measure(&run, store, &mut redis).await?);
    }
    redis.process.check_alive()?;
    Ok((configs, redis.setup.clone()))
}

/// A configuration's closed loop in `mode` (keep-alive at `args.keepalive_connections` unless
/// said otherwise).
fn closed_loop(run: &Run<'_>, mode: Mode) -> ClosedLoop {
    ClosedLoop {
        mode,
        connections: match mode {
            Mode::ConnPerRequest => run.args.conn_concurrency,
            Mode::KeepAlive => run.args.keepalive_connections,
        },
        threads: run.args.threads,
        warmup: run.timing.warmup,
        duration: run.timing.duration,
        op_timeout: run.timing.op_timeout,
    }
}

/// A configuration started from nothing: Redis flushed, its trackers started (those of an
/// earlier start stopped first), the packages published and the swarms prefilled. Every
/// measurement starts so: every announce of the load is a new peer, so swarms grow through a
/// measurement, and one measured after another would serve bigger swarms (in one run with 128,
/// 256 and 512 connections measured in turn on the same trackers, both stores lost 10-15%
/// from the first to the last, whatever the order of the counts).
async fn fresh(
    run: &Run<'_>,
    store: Store,
    redis: &mut RedisServer,
    replicas: &mut Vec<Contender>,
) -> anyhow::Result<()> {
    let label = store.label();
    replicas.clear();
    redis.flushall().await?;
    let extra = match store {
        Store::Embedded => Vec::new(),
        Store::Redis(_) => vec!["--peer-store".to_owned(), redis.url()],
    };
    for _ in 0..store.replicas() {
        replicas.push(
            contenders::start_fbpkg(
                run.binary,
                run.packages,
                run.args.publish_concurrency,
                &extra,
            )
            .await
            .with_context(|| format!("{label}: starting a tracker"))?,
        );
    }
    for c in replicas.iter() {
        eprintln!(
            "{label}: tracker pid {} on {}, refuses unknown swarms: {}",
            c.process.pid(),
            c.target.addr,
            c.setup.refuses_unknown_swarms
        );
    }
    let targets: Vec<Arc<Target>> = replicas.iter().map(|c| c.target.clone()).collect();
    let prefill = run.args.prefill_per_swarm * run.packages.len() as u64;
    if prefill > 0 {
        let started = Instant::now();
        let cfg = ClosedLoop {
            warmup: Duration::ZERO,
            duration: Duration::from_secs(300),
            ..closed_loop(run, Mode::KeepAlive)
        };
        let counts = sum(load::per_target(
            load::start_closed(
                &targets,
                run.workload,
                &cfg,
                Source::Prefill { total: prefill },
                run.stop,
            )?
            .join()
            .await?,
            targets.len(),
        ));
        alive(replicas, redis)?;
        ensure!(
            counts.ok == prefill,
            "{label}: prefill answered {} of {prefill} announces: {:?}",
            counts.ok,
            counts.errors
        );
        eprintln!(
            "{label}: prefilled {prefill} announces in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// One configuration: each closed-loop announce measurement, then the latency and the
/// resolves, each from a fresh start ([`fresh`]).
async fn measure(
    run: &Run<'_>,
    store: Store,
    redis: &mut RedisServer,
) -> anyhow::Result<ConfigResult> {
    let label = store.label();
    let mut replicas = Vec::with_capacity(store.replicas());
    let redis_backed = matches!(store, Store::Redis(_));
    let mut announces = Vec::new();
    for mode in run.args.replica_modes.modes() {
        let counts = match mode {
            Mode::ConnPerRequest => vec![run.args.conn_concurrency],
            Mode::KeepAlive => run.args.replica_connections.clone(),
        };
        for connections in counts {
            fresh(run, store, redis, &mut replicas).await?;
            let cfg = ClosedLoop {
                connections,
                ..closed_loop(run, mode)
            };
            let served = closed(
                run,
                &mut replicas,
                redis,
                redis_backed,
                &cfg,
                Source::Random,
            )
            .await?;
            eprintln!(
                "{label:<12} {:<17} {connections:>5} conns {:>9.0} announces/s  per replica {}  \
                 ({} not ok, {} Redis round trips per announce)",
                mode.label(),
                served.per_sec,
                per_replica_cell(&served.per_replica),
                served.counts.not_ok(),
                served
                    .redis_round_trips_per_request
                    .map_or("-".into(), |r| format!("{r:.2}")),
            );
            announces.push(served);
        }
    }

    let peak = announces.iter().map(|a| a.per_sec).fold(0.0, f64::max);
    let rate = run.args.replica_latency_rate.unwrap_or(peak / 2.0);
    ensure!(
        rate > 0.0,
        "{label}: no announce was answered; cannot set the latency rate"
    );
    fresh(run, store, redis, &mut replicas).await?;
    let targets: Vec<Arc<Target>> = replicas.iter().map(|c| c.target.clone()).collect();
    let pids: Vec<u32> = replicas.iter().map(|c| c.process.pid()).collect();
    let mut latency = Vec::new();
    for mode in run.args.replica_modes.modes() {
        let cfg = OpenLoop {
            mode,
            rate,
            threads: run.args.latency_threads,
            warmup: run.timing.warmup,
            duration: run.timing.duration,
            op_timeout: run.timing.op_timeout,
        };
        latency.push(
            crate::measure_open_on(
                &label,
                &targets,
                &pids,
                replicas[0].started,
                run.workload,
                &cfg,
                run.stop,
            )
            .await?,
        );
        alive(&mut replicas, redis)?;
    }

    let resolves = closed(
        run,
        &mut replicas,
        redis,
        false,
        &closed_loop(run, Mode::KeepAlive),
        Source::Resolve {
            paths: run.resolve_paths.clone(),
        },
    )
    .await?;
    eprintln!(
        "{label:<12} {:<17} {:>9.0} resolves/s   per replica {}  ({} not ok)",
        Mode::KeepAlive.label(),
        resolves.per_sec,
        per_replica_cell(&resolves.per_replica),
        resolves.counts.not_ok()
    );

    Ok(ConfigResult {
        store: label,
        peer_store: if redis_backed {
            redis.url()
        } else {
            "memory".into()
        },
        replicas: replicas.len(),
        tracker_args: replicas
            .first()
            .map(|c| c.setup.args.clone())
            .unwrap_or_default(),
        announces,
        latency,
        resolves,
    })
}

/// A closed-loop measurement over every replica, with CPU shares and, when `count_redis`, the
/// Redis commands of the window.
async fn closed(
    run: &Run<'_>,
    replicas: &mut [Contender],
    redis: &mut RedisServer,
    count_redis: bool,
    cfg: &ClosedLoop,
    source: Source,
) -> anyhow::Result<Served> {
    alive(replicas, redis)?;
    let targets: Vec<Arc<Target>> = replicas.iter().map(|c| c.target.clone()).collect();
    let pids: Vec<u32> = replicas.iter().map(|c| c.process.pid()).collect();
    let redis_pid = redis.process.pid().to_string();
    let running = load::start_closed(&targets, run.workload, cfg, source, run.stop)?;
    let (start, end) = (running.start, running.end);

    tokio::time::sleep_until(start.into()).await;
    let calls_before = if count_redis {
        Some(redis.command_calls().await?)
    } else {
        None
    };
    let (cpu_before, redis_before) = (cpu::snapshot(&pids), cpu::process_ticks(&redis_pid));
    tokio::time::sleep_until(end.into()).await;
    let (cpu_after, redis_after) = (cpu::snapshot(&pids), cpu::process_ticks(&redis_pid));
    let calls_after = if count_redis {
        Some(redis.command_calls().await?)
    } else {
        None
    };

    let per_target = load::per_target(running.join().await?, targets.len());
    alive(replicas, redis)?;
    let secs = cfg.duration.as_secs_f64();
    let per_replica: Vec<f64> = per_target.iter().map(|c| c.ok as f64 / secs).collect();
    let counts = sum(per_target);
    // Every request of the window, answered or not, may have cost Redis its commands.
    let requests = (counts.ok + counts.not_ok()).max(1) as f64;
    let per_request =
        |f: fn(&CommandCalls, &CommandCalls) -> u64| match (&calls_before, &calls_after) {
            (Some(a), Some(b)) => Some(round2(f(b, a) as f64 / requests)),
            _ => None,
        };
    Ok(Served {
        mode: cfg.mode,
        connections: cfg.connections,
        per_sec: counts.ok as f64 / secs,
        per_replica,
        redis_round_trips_per_request: per_request(CommandCalls::round_trips_since),
        redis_commands_per_request: per_request(CommandCalls::commands_since),
        redis_usec_per_request: match (&calls_before, &calls_after) {
            (Some(a), Some(b)) => b
                .busiest_since(a)
                .into_iter()
                .map(|(name, calls, usec)| RedisTime {
                    command: name,
                    calls_per_request: round2(calls as f64 / requests),
                    usec_per_request: round2(usec as f64 / requests),
                })
                .collect(),
            _ => Vec::new(),
        },
        counts,
        cpu: ReplicaCpu::of(
            cpu::between(cpu_before, cpu_after),
            redis_before,
            redis_after,
            cfg.duration,
        ),
    })
}

/// An error if a tracker or Redis has exited.
fn alive(replicas: &mut [Contender], redis: &mut RedisServer) -> anyhow::Result<()> {
    for c in replicas {
        c.process.check_alive()?;
    }
    redis.process.check_alive()
}

fn sum(parts: Vec<Counts>) -> Counts {
    parts.into_iter().fold(Counts::default(), |mut acc, c| {
        acc.merge(c);
        acc
    })
}

/// `12345/12001/...`, for the progress lines and the table.
pub fn per_replica_cell(per_replica: &[f64]) -> String {
    per_replica
        .iter()
        .map(|r| format!("{r:.0}"))
        .collect::<Vec<_>>()
        .join("/")
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
