//! The benchmark's output: a JSON document and a short table (one kind for the opentracker
//! comparison, one for `--replicas`).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use fbpkg_benches::latency::LatencySummary;
use serde::Serialize;

use crate::contenders::Setup;
use crate::cpu::CpuUse;
use crate::load::{Counts, Mode};
use crate::redis::RedisSetup;
use crate::replicas::{TARGET_RESOLVES_PER_REPLICA, TARGET_SHARE_OF_EMBEDDED, per_replica_cell};
use crate::wrk::WrkResult;

/// BENCHMARKS.md targets.
pub const TARGET_CONN: f64 = 1.2;
/// Keep-alive throughput target.
pub const TARGET_KEEP_ALIVE: f64 = 2.0;

/// Everything one run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// What this is.
    pub benchmark: &'static str,
    /// Unix time at the start.
    pub started_unix: u64,
    /// The machine.
    pub machine: Machine,
    /// The load.
    pub load: LoadConfig,
    /// The trackers and how they were run.
    pub contenders: BTreeMap<String, Setup>,
    /// Closed-loop announces per second.
    pub throughput: Vec<Throughput>,
    /// Open-loop latency at half of opentracker's peak.
    pub latency: Vec<Latency>,
    /// fbpkg-rs / opentracker.
    pub ratios: Ratios,
    /// Optional wrk cross-check (bodies unchecked; not counted).
    pub wrk: Vec<WrkResult>,
}

/// The machine.
#[derive(Debug, Serialize)]
pub struct Machine {
    /// Cores.
    pub cores: usize,
    /// /proc/loadavg before the run.
    pub loadavg_before: String,
    /// /proc/loadavg after the run.
    pub loadavg_after: String,
}

/// The load.
#[derive(Debug, Serialize)]
pub struct LoadConfig {
    /// Registered info-hashes (each tracker knows exactly these).
    pub swarms: usize,
    /// Announce shape.
    pub announce: &'static str,
    /// Share of announces with a zone.
    pub zoned_fraction: f64,
    /// The zones.
    pub zones: String,
    /// Announces per swarm sent before any measurement.
    pub prefill_per_swarm: u64,
    /// Counted window of each measurement, seconds.
    pub duration_s: f64,
    /// Uncounted warm-up before each, seconds.
    pub warmup_s: f64,
    /// Generator threads for the closed loop.
    pub generator_threads: usize,
    /// Concurrent connections, connection-per-request mode.
    pub conn_per_request_concurrency: usize,
    /// Concurrent connections, keep-alive mode.
    pub keep_alive_connections: usize,
    /// Sender threads of the open loop.
    pub latency_threads: usize,
    /// Per-request timeout, seconds.
    pub op_timeout_s: f64,
}

/// One closed-loop measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    /// Tracker.
    pub contender: String,
    /// Connection use.
    pub mode: Mode,
    /// Concurrent connections.
    pub connections: usize,
    /// Counted announces per second.
    pub requests_per_sec: f64,
    /// Mean peers per counted response.
    pub mean_peers: f64,
    /// What happened to the requests of the window.
    pub counts: Counts,
    /// CPU over the window.
    pub cpu: Option<CpuUse>,
}

/// One open-loop measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Tracker.
    pub contender: String,
    /// Connection use.
    pub mode: Mode,
    /// Requests per second asked for.
    pub target_rate: f64,
    /// Counted responses per second obtained.
    pub achieved_rate: f64,
    /// Percentiles of counted responses.
    pub summary: Option<LatencySummary>,
    /// Requests sent more than 1 ms late because every sender was busy.
    pub behind_schedule: u64,
    /// Responses slower than 5 ms: how many.
    pub stalls_over_5ms: usize,
    /// The slowest of them (at most 40), in time order: seconds since the tracker started, and
    /// milliseconds taken. Stalls at a fixed period point at periodic work in the tracker.
    pub slowest: Vec<Stall>,
    /// What happened to the requests of the window.
    pub counts: Counts,
    /// CPU over the window.
    pub cpu: Option<CpuUse>,
}

/// One slow response.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stall {
    /// Sent this many seconds after the tracker process started.
    pub at_s: f64,
    /// Took this many milliseconds.
    pub ms: f64,
}

/// Ratios and targets.
#[derive(Debug, Default, Serialize)]
pub struct Ratios {
    /// Throughput ratio, connection per request (target >= 1.2).
    pub conn_per_request: Option<f64>,
    /// Throughput ratio, keep-alive (target >= 2).
    pub keep_alive: Option<f64>,
    /// p99 ratio per latency mode (target <= 1).
    pub p99: BTreeMap<String, f64>,
    /// opentracker's peak announces per second (best of its modes).
    pub opentracker_peak: Option<f64>,
    /// The open-loop rate: half of that peak.
    pub latency_rate: Option<f64>,
    /// Which targets were met.
    pub targets_met: BTreeMap<String, bool>,
}

impl Ratios {
    /// Compute ratios from the measurements.
    pub fn compute(throughput: &[Throughput], latency: &[Latency]) -> Self {
        let rps = |c: &str, m: Mode| {
            throughput
                .iter()
                .find(|t| t.contender == c && t.mode == m)
                .map(|t| t.requests_per_sec)
        };
        let ratio = |m: Mode| match (rps("fbpkg-rs", m), rps("opentracker", m)) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        let mut r = Ratios {
            conn_per_request: ratio(Mode::ConnPerRequest),
            keep_alive: ratio(Mode::KeepAlive),
            ..Self::default()
        };
        if let Some(x) = r.conn_per_request {
            r.targets_met
                .insert("conn_per_request >= 1.2x".into(), x >= TARGET_CONN);
        }
        if let Some(x) = r.keep_alive {
            r.targets_met
                .insert("keep_alive >= 2x".into(), x >= TARGET_KEEP_ALIVE);
        }
        for mode in [Mode::ConnPerRequest, Mode::KeepAlive] {
            let p99 = |c: &str| {
                latency
                    .iter()
                    .find(|l| l.contender == c && l.mode == mode)
                    .and_then(|l| l.summary)
                    .map(|s| s.p99_us)
            };
            if let (Some(a), Some(b)) = (p99("fbpkg-rs"), p99("opentracker"))
                && b > 0.0
            {
                r.p99.insert(mode.label().into(), a / b);
                r.targets_met
                    .insert(format!("p99 {} <= opentracker", mode.label()), a <= b);
            }
        }
        r
    }
}

/// The human table.
pub fn table(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nTracker announces per second: {} swarms, compact=1&numwant=50, 1/4 seeders, {:.0}% \
         with a zone, {} s per measurement",
        report.load.swarms,
        report.load.zoned_fraction * 100.0,
        report.load.duration_s
    );
    let _ = writeln!(
        out,
        "{:<12} {:<17} {:>5} {:>12} {:>9} {:>7} {:>6} {:>20}",
        "tracker", "mode", "conns", "announces/s", "not ok", "peers", "ratio", "cpu trk/gen/other"
    );
    for t in &report.throughput {
        let ratio = match t.mode {
            Mode::ConnPerRequest => report.ratios.conn_per_request,
            Mode::KeepAlive => report.ratios.keep_alive,
        }
        .filter(|_| t.contender == "fbpkg-rs")
        .map_or(String::new(), |r| format!("{r:.2}x"));
        let _ = writeln!(
            out,
            "{:<12} {:<17} {:>5} {:>12.0} {:>9} {:>7.1} {:>6} {:>20}",
            t.contender,
            t.mode.label(),
            t.connections,
            t.requests_per_sec,
            t.counts.not_ok(),
            t.mean_peers,
            ratio,
            cpu_cell(t.cpu)
        );
    }
    if let Some(rate) = report.ratios.latency_rate {
        let _ = writeln!(
            out,
            "\nLatency, open loop at {rate:.0} announces/s (half of opentracker's peak):"
        );
        let _ = writeln!(
            out,
            "{:<12} {:<17} {:>10} {:>9} {:>9} {:>9} {:>9} {:>7}",
            "tracker", "mode", "achieved/s", "p50 us", "p99 us", "p99.9 us", "max us", "not ok"
        );
        for l in &report.latency {
            let [p50, p99, p999, max] = latency_cells(l.summary);
            let _ = writeln!(
                out,
                "{:<12} {:<17} {:>10.0} {p50:>9} {p99:>9} {p999:>9} {max:>9} {:>7}",
                l.contender,
                l.mode.label(),
                l.achieved_rate,
                l.counts.not_ok()
            );
        }
    }
    if !report.wrk.is_empty() {
        let _ = writeln!(out, "\nwrk cross-check (bodies not checked, not counted):");
        for w in &report.wrk {
            let _ = writeln!(
                out,
                "{:<12} {:<17} {:>12.0} req/s  non-2xx {}  {}",
                w.contender,
                w.mode.label(),
                w.requests_per_sec,
                w.non_2xx,
                w.socket_errors.as_deref().unwrap_or("")
            );
        }
    }
    let _ = writeln!(out, "\nTargets (BENCHMARKS.md):");
    for (name, met) in &report.ratios.targets_met {
        let _ = writeln!(
            out,
            "  {:<40} {}",
            name,
            if *met { "met" } else { "MISSED" }
        );
    }
    for (name, setup) in &report.contenders {
        for note in &setup.notes {
            let _ = writeln!(out, "  note ({name}): {note}");
        }
    }
    out
}

fn cpu_cell(cpu: Option<CpuUse>) -> String {
    cpu.map_or("-".into(), |c| {
        format!(
            "{:.2}/{:.2}/{:.2}",
            c.tracker_cores, c.generator_cores, c.other_cores
        )
    })
}

/// Everything a `--replicas` run measured.
#[derive(Debug, Serialize)]
pub struct ReplicaReport {
    /// What this is.
    pub benchmark: &'static str,
    /// Unix time at the start.
    pub started_unix: u64,
    /// The machine.
    pub machine: Machine,
    /// The load (announces as in the opentracker comparison).
    pub load: LoadConfig,
    /// The one Redis every Redis-backed replica shares.
    pub redis: RedisSetup,
    /// The embedded store, then each replica count.
    pub configs: Vec<ConfigResult>,
    /// Which of the targets were met.
    pub targets_met: BTreeMap<String, bool>,
    /// What a reader of the figures should know.
    pub notes: Vec<String>,
}

/// One configuration: the embedded store (one tracker) or N replicas sharing Redis.
#[derive(Debug, Serialize)]
pub struct ConfigResult {
    /// `embedded` or `redis xN`.
    pub store: String,
    /// `--peer-store`.
    pub peer_store: String,
    /// Tracker processes.
    pub replicas: usize,
    /// The first replica's arguments (the others differ only in --listen and --data-dir).
    pub tracker_args: Vec<String>,
    /// Closed-loop announces, one per connection mode and connection count.
    pub announces: Vec<Served>,
    /// Open-loop announce latency, one per connection mode.
    pub latency: Vec<Latency>,
    /// Closed-loop resolves (keep-alive).
    pub resolves: Served,
}

/// One closed-loop measurement over every replica of a configuration.
#[derive(Debug, Serialize)]
pub struct Served {
    /// Connection use.
    pub mode: Mode,
    /// Concurrent connections, spread over the replicas round-robin.
    pub connections: usize,
    /// Counted responses per second, all replicas.
    pub per_sec: f64,
    /// Counted responses per second of each replica.
    pub per_replica: Vec<f64>,
    /// Commands clients sent Redis (EVALSHA and the like; one round trip each) over the
    /// window, per request of the window. `None` without Redis.
    pub redis_round_trips_per_request: Option<f64>,
    /// Every command Redis ran over the window, those inside scripts included, per request.
    pub redis_commands_per_request: Option<f64>,
    /// Where Redis's time went (INFO commandstats), busiest first: a script's time includes
    /// that of the commands it ran, which are listed as well.
    pub redis_usec_per_request: Vec<RedisTime>,
    /// What happened to the requests of the window.
    pub counts: Counts,
    /// CPU over the window.
    pub cpu: Option<ReplicaCpu>,
}

/// One Redis command's share of a window.
#[derive(Debug, Clone, Serialize)]
pub struct RedisTime {
    /// As `INFO commandstats` names it.
    pub command: String,
    /// Calls per request of the window.
    pub calls_per_request: f64,
    /// Microseconds Redis spent in it per request of the window.
    pub usec_per_request: f64,
}

/// Cores busy on average over a window.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ReplicaCpu {
    /// The tracker replicas together.
    pub trackers_cores: f64,
    /// redis-server.
    pub redis_cores: f64,
    /// The load generator.
    pub generator_cores: f64,
    /// Everything else on the machine.
    pub other_cores: f64,
    /// Cores the machine has.
    pub machine_cores: usize,
}

impl ReplicaCpu {
    /// From the machine's figures and Redis's CPU ticks at both ends of `window`.
    pub fn of(
        cpu: Option<CpuUse>,
        redis_before: Option<u64>,
        redis_after: Option<u64>,
        window: std::time::Duration,
    ) -> Option<Self> {
        let cpu = cpu?;
        let secs = window.as_secs_f64().max(1e-3);
        let redis = match (redis_before, redis_after) {
            (Some(a), Some(b)) => b.saturating_sub(a) as f64 / crate::cpu::TICKS_PER_SEC / secs,
            _ => 0.0,
        };
        let round2 = |x: f64| (x * 100.0).round() / 100.0;
        Some(Self {
            trackers_cores: cpu.tracker_cores,
            redis_cores: round2(redis),
            generator_cores: cpu.generator_cores,
            other_cores: round2((cpu.other_cores - redis).max(0.0)),
            machine_cores: cpu.machine_cores,
        })
    }
}

/// A configuration's best closed-loop measurement in `mode`, over the connection counts it was
/// measured at: a store is compared with another at its own peak, as each needs a different
/// number of announces in flight to keep the machine busy.
pub fn peak(c: &ConfigResult, mode: Mode) -> Option<&Served> {
    c.announces
        .iter()
        .filter(|a| a.mode == mode)
        .max_by(|a, b| a.per_sec.total_cmp(&b.per_sec))
}

/// The targets: a single Redis-backed replica at half the embedded store's
/// announces/s or more (each connection mode, each at its peak), and every replica resolving
/// 20k/s or more.
pub fn replica_targets(configs: &[ConfigResult]) -> BTreeMap<String, bool> {
    let mut met = BTreeMap::new();
    let embedded = configs.iter().find(|c| c.store == "embedded");
    for c in configs.iter().filter(|c| c.store != "embedded") {
        if c.replicas == 1
            && let Some(e) = embedded
        {
            for mode in [Mode::KeepAlive, Mode::ConnPerRequest] {
                if let (Some(a), Some(base)) = (peak(c, mode), peak(e, mode)) {
                    met.insert(
                        format!(
                            "{} {} peak >= {:.1}x embedded's",
                            c.store,
                            mode.label(),
                            TARGET_SHARE_OF_EMBEDDED
                        ),
                        a.per_sec >= TARGET_SHARE_OF_EMBEDDED * base.per_sec,
                    );
                }
            }
        }
    }
    for c in configs {
        let slowest = c
            .resolves
            .per_replica
            .iter()
            .copied()
            .fold(f64::MAX, f64::min);
        met.insert(
            format!(
                "{}: resolves >= {:.0}k/s per replica",
                c.store,
                TARGET_RESOLVES_PER_REPLICA / 1000.0
            ),
            slowest >= TARGET_RESOLVES_PER_REPLICA,
        );
    }
    met
}

/// The human table of a `--replicas` run.
pub fn replica_table(report: &ReplicaReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nTracker replicas sharing one Redis: {} swarms, compact=1&numwant=50, 1/4 seeders, \
         {:.0}% with a zone, {} s per measurement, {} cores for everything",
        report.load.swarms,
        report.load.zoned_fraction * 100.0,
        report.load.duration_s,
        report.machine.cores
    );
    let embedded = |mode: Mode| {
        report
            .configs
            .iter()
            .find(|c| c.store == "embedded")
            .and_then(|c| peak(c, mode))
            .map(|a| a.per_sec)
            .filter(|r| *r > 0.0)
    };
    let _ = writeln!(
        out,
        "{:<10} {:<17} {:>5} {:>11} {:>23} {:>7} {:>7} {:>6} {:>6} {:>6} {:>24}",
        "store",
        "mode",
        "conns",
        "announces/s",
        "per replica",
        "not ok",
        "vs emb",
        "trips",
        "cmds",
        "us",
        "cpu trk/redis/gen/other"
    );
    for c in &report.configs {
        for a in &c.announces {
            let f = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
            let at_peak = peak(c, a.mode).is_some_and(|p| std::ptr::eq(p, a));
            let busiest = a
                .redis_usec_per_request
                .first()
                .map_or("-".to_owned(), |t| format!("{:.0}", t.usec_per_request));
            let _ = writeln!(
                out,
                "{:<10} {:<17} {:>5} {:>11} {:>23} {:>7} {:>7} {:>6} {:>6} {:>6} {:>24}",
                c.store,
                a.mode.label(),
                a.connections,
                format!("{:.0}{}", a.per_sec, if at_peak { "*" } else { " " }),
                per_replica_cell(&a.per_replica),
                a.counts.not_ok(),
                embedded(a.mode).map_or("-".into(), |e| format!("{:.2}x", a.per_sec / e)),
                f(a.redis_round_trips_per_request),
                f(a.redis_commands_per_request),
                busiest,
                replica_cpu_cell(a.cpu)
            );
        }
    }
    let _ = writeln!(
        out,
        "  *: the configuration's peak in that mode, which the targets compare; vs emb: against \
         the embedded store's peak in that mode\n  trips: Redis round trips per announce \
         (EVALSHA, EXEC and other commands clients send, from INFO commandstats); cmds: \
         commands Redis ran per announce, those of announce.lua and of transactions included; \
         us: Redis microseconds per announce in its busiest command (the script, or EXEC for \
         replicas' plain writes)"
    );
    let _ = writeln!(
        out,
        "\nLatency, open loop at half of each configuration's peak:"
    );
    let _ = writeln!(
        out,
        "{:<10} {:<17} {:>8} {:>10} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "store", "mode", "rate/s", "achieved/s", "p50 us", "p99 us", "p99.9 us", "max us", "not ok"
    );
    for c in &report.configs {
        for l in &c.latency {
            let [p50, p99, p999, max] = latency_cells(l.summary);
            let _ = writeln!(
                out,
                "{:<10} {:<17} {:>8.0} {:>10.0} {p50:>9} {p99:>9} {p999:>9} {max:>9} {:>7}",
                c.store,
                l.mode.label(),
                l.target_rate,
                l.achieved_rate,
                l.counts.not_ok()
            );
        }
    }
    let _ = writeln!(
        out,
        "\nResolves (GET /api/v1/packages/NAME/SHA256 of a random package, from each replica's \
         catalog in memory):"
    );
    let _ = writeln!(
        out,
        "{:<10} {:<17} {:>5} {:>11} {:>23} {:>7} {:>24}",
        "store", "mode", "conns", "resolves/s", "per replica", "not ok", "cpu trk/redis/gen/other"
    );
    for c in &report.configs {
        let r = &c.resolves;
        let _ = writeln!(
            out,
            "{:<10} {:<17} {:>5} {:>11.0} {:>23} {:>7} {:>24}",
            c.store,
            r.mode.label(),
            r.connections,
            r.per_sec,
            per_replica_cell(&r.per_replica),
            r.counts.not_ok(),
            replica_cpu_cell(r.cpu)
        );
    }
    let _ = writeln!(out, "\nTargets (tracker issue 11):");
    for (name, met) in &report.targets_met {
        let _ = writeln!(
            out,
            "  {:<48} {}",
            name,
            if *met { "met" } else { "MISSED" }
        );
    }
    for note in &report.notes {
        let _ = writeln!(out, "  note: {note}");
    }
    out
}

fn replica_cpu_cell(cpu: Option<ReplicaCpu>) -> String {
    cpu.map_or("-".into(), |c| {
        format!(
            "{:.2}/{:.2}/{:.2}/{:.2}",
            c.trackers_cores, c.redis_cores, c.generator_cores, c.other_cores
        )
    })
}

/// p50, p99, p99.9 and max in whole microseconds, or `-` each without counted responses.
fn latency_cells(s: Option<LatencySummary>) -> [String; 4] {
    let us = |f: fn(&LatencySummary) -> f64| {
        s.as_ref()
            .map_or("-".to_owned(), |s| format!("{:.0}", f(s)))
    };
    [
        us(|s| s.p50_us),
        us(|s| s.p99_us),
        us(|s| s.p999_us),
        us(|s| s.max_us),
    ]
}
