//! The `rollout` scenario's fbpkg-rs runs (issue 9, "Bench"): every leecher host runs an
//! agent that follows `pkg:prod`; the seed publishes v1 (tagged prod) and v2; once every host
//! has activated v1, `fbpkg-rs rollout start pkg:<v2> --tag prod --phases 25,50,75,100
//! --bake 0s --max-failures 0`, and the clock runs until every host has activated v2.
//!
//! A host's activation time is what its `--on-change` wrote: `$FBPKG_PACKAGE_HASH` and
//! `date +%s%N` appended to a file of its own, read against the wall clock taken just before
//! `rollout start` (same clock, same machine). Each run gets a fresh tracker, fresh agent
//! state and caches: v1 is fetched by following the tag (setup, not timed), v2 is nowhere but
//! on the seed when the rollout starts.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use fbpkg_benches::swarm::rollout::{
    HostActivation, PHASES, PickedHost, RolloutRun, phase_entries, phase_times,
};
use serde_json::Value;

use super::fbpkg::{Agent, fbpkg, publish_with, start_agent_with, stop_agents, wait_ready};
use super::{AGENT_PORT, Ctx, PACKAGE_NAME, Package};
use crate::measure::{Accounting, Window};
use crate::procs::{self, POLL, Spec};

/// The tag the hosts follow.
pub const TAG: &str = "prod";
/// The tracker's publish token in this run (the rollout API needs one).
const TOKEN: &str = "swarm-bench-rollout";
/// How often followers resolve the tag (`--follow-interval`): a phase change reaches a host
/// within one interval.
const FOLLOW_INTERVAL: &str = "250ms";
/// How often the tracker checks the phase gates (`--rollout-tick`); it also checks on every
/// report.
const ROLLOUT_TICK: &str = "50ms";
/// How often the activation files are read.
const READ_EVERY: Duration = Duration::from_millis(20);

/// One rollout run's settings.
#[derive(Debug)]
pub struct Settings<'a> {
    /// v1, published and tagged before the followers start.
    pub old: &'a Package,
    /// v2, published untagged; the rollout moves the tag to it.
    pub new: &'a Package,
    /// `--prefetch-rate` of every follower (`unlimited`, `off`).
    pub prefetch_rate: &'a str,
    /// Host ids of the leechers, in host order.
    pub picked: &'a [PickedHost],
}

/// Seconds since the Unix epoch, in ns, now.
fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// When the activation file says `sha256` was activated (Unix ns), if it does.
fn activated_at(file: &Path, sha256: &str) -> Option<u128> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|l| {
        let (hash, ns) = l.trim().split_once(' ')?;
        (hash == sha256).then(|| ns.trim().parse().ok())?
    })
}

fn secs_since(t0_ns: u128, at_ns: u128) -> f64 {
    // A host cannot activate before the rollout exists; clamp clock jitter at zero.
    at_ns.saturating_sub(t0_ns) as f64 / 1e9
}

/// Wait until every file names `sha256` (or `deadline`, or an agent exits); returns each
/// host's activation time in Unix ns.
fn wait_activations(
    ctx: &Ctx<'_>,
    agents: &mut [Agent],
    files: &[PathBuf],
    sha256: &str,
    deadline: Instant,
    mut win: Option<&mut Window<'_>>,
) -> anyhow::Result<Vec<Option<u128>>> {
    let mut at: Vec<Option<u128>> = vec![None; files.len()];
    let mut next_read = Instant::now();
    loop {
        if Instant::now() >= next_read {
            next_read = Instant::now() + READ_EVERY;
            for (slot, f) in at.iter_mut().zip(files) {
                if slot.is_none() {
                    *slot = activated_at(f, sha256);
                }
            }
        }
        if let Some(w) = win.as_deref_mut() {
            w.tick();
        }
        if at.iter().all(Option::is_some) || Instant::now() >= deadline {
            return Ok(at);
        }
        for a in agents.iter_mut() {
            if let Some(s) = a.proc.poll() {
                bail!(
                    "agent {} exited ({s}); see {}",
                    a.host.label,
                    ctx.log(&format!("{}-agent", a.host.label)).display()
                );
            }
        }
        procs::check_cancelled()?;
        std::thread::sleep(POLL);
    }
}

/// `fbpkg-rs rollout ARGS` on the seed host, with the token; its stdout.
fn rollout_cmd(ctx: &Ctx<'_>, args: &[&str]) -> anyhow::Result<String> {
    let mut rest: Vec<OsString> = args.iter().map(Into::into).collect();
    rest.extend(["--tracker".into(), ctx.tracker_url().into()]);
    let mut spec = Spec::new(
        "rollout",
        Some(&ctx.hosts.seed.ns),
        fbpkg(ctx, "rollout", rest),
    );
    spec.env
        .push(("FBPKG_PUBLISH_TOKEN".to_owned(), TOKEN.to_owned()));
    procs::run_ok(spec, Duration::from_secs(20))
}

/// One rollout run: fresh tracker and agents, v1 everywhere, then the rollout of v2.
pub fn run(ctx: &Ctx<'_>, s: &Settings<'_>) -> anyhow::Result<RolloutRun> {
    std::fs::create_dir_all(&ctx.dir)?;
    let result = run_inner(ctx, s);
    let _ = std::fs::remove_dir_all(&ctx.dir);
    result
}

fn run_inner(ctx: &Ctx<'_>, s: &Settings<'_>) -> anyhow::Result<RolloutRun> {
    let leechers = &ctx.hosts.leechers;
    if s.picked.len() != leechers.len() {
        bail!("{} host ids for {} hosts", s.picked.len(), leechers.len());
    }
    let mut acct = Accounting::default();
    let mut notes = Vec::new();
    let mut tracker = ctx.start_tracker(
        false,
        &["--publish-token", TOKEN, "--rollout-tick", ROLLOUT_TICK],
    )?;
    let mut seed = vec![start_agent_with(ctx, &ctx.hosts.seed, Vec::new())?];
    wait_ready(ctx, &mut seed, Duration::from_secs(30))?;
    let token: Vec<OsString> = vec!["--publish-token".into(), TOKEN.into()];
    let old_ctx = ctx.with_pkg(s.old);
    let mut with_tag = token.clone();
    with_tag.extend(["--tag".into(), TAG.into()]);
    publish_with(&old_ctx, &seed[0], &mut acct, with_tag)?;
    let new_ctx = ctx.with_pkg(s.new);
    publish_with(&new_ctx, &seed[0], &mut acct, token)?;
    let seed_addr = ctx.hosts.seed.addr(AGENT_PORT);
    old_ctx.wait_seed_listed(&seed_addr, Duration::from_secs(60))?;
    new_ctx.wait_seed_listed(&seed_addr, Duration::from_secs(60))?;

    // The followers, each with its own activation file and host id.
    let follow = format!("{PACKAGE_NAME}:{TAG}");
    let mut files = Vec::new();
    let mut agents = Vec::new();
    let followers_started = Instant::now();
    for (h, p) in leechers.iter().zip(s.picked) {
        let file = ctx.host_dir(h, "activations")?.join("log");
        let on_change = format!(
            "printf '%s %s\\n' \"$FBPKG_PACKAGE_HASH\" \"$(date +%s%N)\" >> '{}'",
            file.display()
        );
        let extra: Vec<OsString> = vec![
            "--follow".into(),
            follow.clone().into(),
            "--on-change".into(),
            on_change.into(),
            "--follow-interval".into(),
            FOLLOW_INTERVAL.into(),
            "--prefetch-rate".into(),
            s.prefetch_rate.into(),
            "--host-id".into(),
            p.host_id.clone().into(),
        ];
        agents.push(start_agent_with(ctx, h, extra)?);
        files.push(file);
    }
    wait_ready(ctx, &mut agents, Duration::from_secs(30))?;
    let old_deadline = Instant::now() + ctx.deadline + Duration::from_secs(30);
    let old_at = wait_activations(ctx, &mut agents, &files, &s.old.sha256, old_deadline, None)?;
    let missing: Vec<&str> = old_at
        .iter()
        .zip(leechers)
        .filter(|(t, _)| t.is_none())
        .map(|(_, h)| h.label.as_str())
        .collect();
    if !missing.is_empty() {
        bail!(
            "v1 was not activated on {} within {:?} of starting the followers",
            missing.join(", "),
            ctx.deadline + Duration::from_secs(30)
        );
    }
    let old_all = followers_started.elapsed().as_secs_f64();

    // The measured part: from just before `rollout start` until every host runs v2.
    let mut win = Window::open(ctx.topo, &ctx.hosts.seed.ns, ctx.sample_every)?;
    let t0_ns = unix_ns();
    let version = format!("{PACKAGE_NAME}:{}", s.new.sha256);
    let phases: Vec<String> = PHASES.iter().map(u8::to_string).collect();
    let phases = phases.join(",");
    rollout_cmd(
        ctx,
        &[
            "start",
            version.as_str(),
            "--tag",
            TAG,
            "--phases",
            phases.as_str(),
            "--bake",
            "0s",
            "--max-failures",
            "0",
            "--json",
        ],
    )?;
    let start_command_secs = win.secs(Instant::now());
    let deadline = win.t0 + ctx.deadline * 2;
    let new_at = wait_activations(
        ctx,
        &mut agents,
        &files,
        &s.new.sha256,
        deadline,
        Some(&mut win),
    );
    let closed = win.close()?;
    let new_at = match new_at {
        Ok(v) => v,
        Err(e) => {
            procs::check_cancelled()?;
            notes.push(format!("{e:#}"));
            files
                .iter()
                .map(|f| activated_at(f, &s.new.sha256))
                .collect()
        }
    };
    let tracker_view = rollout_cmd(ctx, &["status", follow.as_str(), "--json"])
        .and_then(|out| serde_json::from_str::<Value>(&out).context("rollout status --json"))
        .unwrap_or_else(|e| {
            notes.push(format!("rollout status: {e:#}"));
            Value::Null
        });

    stop_agents(agents.iter_mut().chain(seed.iter_mut()));
    tracker.terminate(Duration::from_secs(10));
    // The tracker log gathers every run of the scenario; the last start is this run's.
    let tracker_phase_entered_secs = std::fs::read_to_string(ctx.log("tracker"))
        .map(|log| phase_entries(&log))
        .unwrap_or_default();

    let activated: Vec<Option<f64>> = new_at
        .iter()
        .map(|t| t.map(|ns| secs_since(t0_ns, ns)))
        .collect();
    let host_phase: Vec<usize> = s.picked.iter().map(|p| p.phase).collect();
    let phases = phase_times(&PHASES, &host_phase, &activated);
    let total_secs = phases.last().and_then(|p| p.all_activated_secs);
    if total_secs.is_none() {
        notes.push(format!(
            "not every host activated v2 within {:?}",
            ctx.deadline * 2
        ));
    }
    let hosts = leechers
        .iter()
        .zip(s.picked)
        .zip(&activated)
        .map(|((h, p), t)| HostActivation {
            host: h.label.clone(),
            host_id: p.host_id.clone(),
            bucket: p.bucket,
            phase_percent: PHASES.get(p.phase).copied().unwrap_or(100),
            activated_secs: *t,
        })
        .collect();
    Ok(RolloutRun {
        label: format!("prefetch {}", s.prefetch_rate),
        prefetch_rate: s.prefetch_rate.to_owned(),
        old_version_all_activated_secs: Some(old_all),
        start_command_secs,
        total_secs,
        phases,
        hosts,
        seed_amplification_wire: closed.seed_tx_bytes.map(|b| b as f64 / s.new.size as f64),
        tracker_phase_entered_secs,
        tracker_view,
        notes,
    })
}
