//! CPU time of the tracker, of the generator and of the whole machine over a window, from
//! /proc: it tells whether the generator or a neighbour's build, rather than the tracker, set
//! the pace of a measurement.

use std::time::Instant;

use serde::Serialize;

/// Kernel clock ticks per second (`USER_HZ`): 100 on every Linux architecture in use.
pub const TICKS_PER_SEC: f64 = 100.0;

/// Counters at one instant.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    at: Instant,
    tracker: u64,
    generator: u64,
    machine_busy: u64,
}

/// Cores busy on average over a window.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CpuUse {
    /// The tracker processes (all their threads; several when replicas are measured).
    pub tracker_cores: f64,
    /// This benchmark process (the load generator).
    pub generator_cores: f64,
    /// Everything else on the machine (other engineers' builds, the other tracker).
    pub other_cores: f64,
    /// Cores the machine has.
    pub machine_cores: usize,
}

/// User plus system ticks of process `pid` (all threads).
pub fn process_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces: state is
    // field 3, utime 14 and stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Busy ticks of all CPUs (everything but idle and iowait).
fn machine_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = v.iter().take(8).sum();
    Some(total - v.get(3)? - v.get(4)?)
}

/// Read the counters now, the trackers' added up; `None` where /proc is not available.
pub fn snapshot(tracker_pids: &[u32]) -> Option<Snapshot> {
    let tracker = tracker_pids
        .iter()
        .map(|pid| process_ticks(&pid.to_string()))
        .sum::<Option<u64>>()?;
    Some(Snapshot {
        at: Instant::now(),
        tracker,
        generator: process_ticks("self")?,
        machine_busy: machine_busy_ticks()?,
    })
}

/// Average use between two snapshots.
pub fn between(a: Option<Snapshot>, b: Option<Snapshot>) -> Option<CpuUse> {
    let (a, b) = (a?, b?);
    let secs = b.at.duration_since(a.at).as_secs_f64();
    if secs <= 0.0 {
        return None;
    }
    let cores = |t0: u64, t1: u64| t1.saturating_sub(t0) as f64 / TICKS_PER_SEC / secs;
    let tracker = cores(a.tracker, b.tracker);
    let generator = cores(a.generator, b.generator);
    let busy = cores(a.machine_busy, b.machine_busy);
    Some(CpuUse {
        tracker_cores: round2(tracker),
        generator_cores: round2(generator),
        other_cores: round2((busy - tracker - generator).max(0.0)),
        machine_cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
    })
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
