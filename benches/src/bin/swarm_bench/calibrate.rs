//! Does one TCP flow reach a `tbf` cap? One bulk flow through each kind of cap, before the
//! contenders run, reported as the fraction of the cap achieved on the wire and in payload.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use serde_json::Value;

use crate::procs::{Proc, Spec, Stdout};
use crate::topology::Topology;
use fbpkg_benches::swarm::netplan::Host;

/// Port of the calibration receiver.
const FLOW_PORT: u16 = 5201;
/// Slow start left out of the measurement.
const SKIP: Duration = Duration::from_secs(1);

/// One flow's result.
#[derive(Debug, Clone, Serialize)]
pub struct Calibration {
    /// `seed -> l001`.
    pub path: String,
    /// Which cap binds.
    pub cap: String,
    /// Its rate, bit/s.
    pub cap_bps: u64,
    /// Bytes on the wire (Ethernet frames) per second, times 8, over the steady part.
    pub wire_bps: f64,
    /// TCP payload per second, times 8, over the steady part.
    pub payload_bps: f64,
    /// wire_bps / cap_bps.
    pub wire_fraction: f64,
    /// payload_bps / cap_bps (at most ~0.96 with 1500-byte frames and TCP timestamps).
    pub payload_fraction: f64,
}

fn flow(
    topo: &Topology,
    self_exe: &std::path::Path,
    logs: &std::path::Path,
    from: &Host,
    to: &Host,
    secs: f64,
) -> anyhow::Result<Calibration> {
    let (cap, cap_bps) = match (from.up_bps, to.down_bps) {
        (Some(u), Some(d)) if u <= d => (format!("{} upload", from.label), u),
        (_, Some(d)) => (format!("{} download", to.label), d),
        (Some(u), None) => (format!("{} upload", from.label), u),
        (None, None) => anyhow::bail!("no cap between {} and {}", from.label, to.label),
    };
    let dst = format!("{}:{FLOW_PORT}", to.ip);
    let log = logs.join(format!("calibrate-{}-{}.log", from.label, to.label));
    let mut recv = Spec::new(
        "flow-recv",
        Some(&to.ns),
        [
            self_exe.as_os_str(),
            "flow-recv".as_ref(),
            "--listen".as_ref(),
            dst.as_ref(),
        ],
    );
    recv.stdout = Stdout::Lines;
    recv.stderr = Some(log.clone());
    let mut recv = Proc::spawn(recv)?;
    recv.wait_for_line("ready", Instant::now() + Duration::from_secs(10), |l| {
        l.contains("ready")
    })?;
    let secs_s = secs.to_string();
    let mut send = Spec::new(
        "flow-send",
        Some(&from.ns),
        [
            self_exe.as_os_str(),
            "flow-send".as_ref(),
            "--to".as_ref(),
            dst.as_ref(),
            "--secs".as_ref(),
            secs_s.as_ref(),
        ],
    );
    send.stderr = Some(log);
    let mut send = Proc::spawn(send)?;
    std::thread::sleep(SKIP);
    let dev = &to.switch_dev;
    let c0 = topo
        .switch_counters()?
        .get(dev)
        .copied()
        .unwrap_or_default();
    let t0 = Instant::now();
    let limit = Instant::now() + Duration::from_secs_f64(secs + 20.0);
    send.wait_until(limit)?
        .context("flow-send did not finish")?;
    let c1 = topo
        .switch_counters()?
        .get(dev)
        .copied()
        .unwrap_or_default();
    let wire_secs = t0.elapsed().as_secs_f64();
    let done = recv.wait_for_line("done", limit, |l| l.contains("\"done\""))?;
    let v: Value = serde_json::from_str(&done)?;
    let payload_bps = v["steady_payload_bps"].as_f64().unwrap_or(0.0);
    // The switch-side end transmits what the receiver downloads.
    let wire_bps = (c1.tx - c0.tx) as f64 * 8.0 / wire_secs;
    Ok(Calibration {
        path: format!("{} -> {}", from.label, to.label),
        cap,
        cap_bps,
        wire_bps,
        payload_bps,
        wire_fraction: wire_bps / cap_bps as f64,
        payload_fraction: payload_bps / cap_bps as f64,
    })
}

/// A flow through the seed's upload cap, a leecher's upload cap (and a slow leecher's, where
/// some are slower) and a leecher's download cap.
pub fn run(
    topo: &Topology,
    self_exe: &std::path::Path,
    logs: &std::path::Path,
    secs: f64,
) -> anyhow::Result<Vec<Calibration>> {
    let plan = &topo.plan;
    let l = plan.leechers();
    let mut pairs = vec![(plan.seed(), &l[0]), (plan.tracker(), &l[0])];
    if l.len() >= 2 {
        pairs.insert(1, (&l[0], &l[1]));
    }
    // Uneven uplinks (B3): one flow through the first leecher cap unlike l001's too.
    if let Some(other) = l.iter().find(|h| h.up_bps < l[0].up_bps) {
        pairs.insert(2, (other, &l[0]));
    }
    // Stragglers: one flow into the first leecher whose downlink is thinner than l001's.
    if let Some(straggler) = l.iter().find(|h| h.down_bps < l[0].down_bps) {
        pairs.push((plan.seed(), straggler));
    }
    pairs
        .into_iter()
        .map(|(from, to)| flow(topo, self_exe, logs, from, to, secs))
        .collect()
}

/// One line per flow.
pub fn table(cals: &[Calibration]) -> String {
    let mut out = String::from(
        "| single TCP flow | binding cap | cap Mbit/s | wire Mbit/s | wire/cap | payload Mbit/s | payload/cap |\n|---|---|---|---|---|---|---|\n",
    );
    for c in cals {
        out.push_str(&format!(
            "| {} | {} | {:.0} | {:.1} | {:.3} | {:.1} | {:.3} |\n",
            c.path,
            c.cap,
            c.cap_bps as f64 / 1e6,
            c.wire_bps / 1e6,
            c.wire_fraction,
            c.payload_bps / 1e6,
            c.payload_fraction
        ));
    }
    out
}
