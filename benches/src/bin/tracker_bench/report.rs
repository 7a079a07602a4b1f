//! The benchmark's output: a JSON document and a short table.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use fbpkg_benches::latency::LatencySummary;
use serde::Serialize;

use crate::contenders::Setup;
use crate::cpu::CpuUse;
use crate::load::{Counts, Mode};
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
            let s = l.summary;
            let f = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0}"));
            let _ = writeln!(
                out,
                "{:<12} {:<17} {:>10.0} {:>9} {:>9} {:>9} {:>9} {:>7}",
                l.contender,
                l.mode.label(),
                l.achieved_rate,
                f(s.map(|s| s.p50_us)),
                f(s.map(|s| s.p99_us)),
                f(s.map(|s| s.p999_us)),
                f(s.map(|s| s.max_us)),
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
