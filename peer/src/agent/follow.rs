//! Following tags: `fbpkg-rs agent --follow NAME:TAG`.
//!
//! One task per followed tag. Every `--follow-interval` (and once right at start) it:
//!
//! ```text
//! resolve NAME:TAG as this host (host id + zone)
//!   -> while the tracker counts this host's reports for a rollout, say again where it
//!      stands on the version it runs (see [`restate`])
//!   -> send the reports still pending (the tracker counts a report only from the address
//!      the host id last resolved from, so reports go after a resolve)
//!   -> if a rollout is under way and this host's phase has not come (the answer names a
//!      `prefetch` version): start fetching it under `--prefetch-rate`, without waiting;
//!      once it is in the cache, report `fetched` for it. When the phase comes, the cap is
//!      lifted (a download someone needs goes at full speed) and activation is a local switch
//!   -> fetch the version into the cache through the agent's engine (as a `fetch` does;
//!      waiting at most an interval, at least 5 s: the download goes on in the engine)
//!      -> report `fetched` (once per version, and not for the version already active)
//!   -> if it differs from the last activated version:
//!        run --on-change  -> `activated`, or `unhealthy` (exit status + last output)
//!        record the activation durably (follows.json), before the health check
//!        run --health-cmd -> `healthy` or `unhealthy`
//!   -> send the new reports
//! ```
//!
//! A version is activated once: a failed `--on-change` or health check is reported and not
//! retried until the resolution changes (an abort sends the host back to the old version,
//! which runs `--on-change` again). An agent killed between an activation and its health check
//! runs the health check (not `--on-change`) once when it comes back. Report failures stay pending for the next interval
//! (latest last, at most [`MAX_PENDING`]); nothing here is fatal to the agent.
//!
//! Each command runs as `sh -c CMD` in its own process group, with its stdout and stderr in
//! `<state dir>/follow-logs/NAME/TAG.{on-change,health}.log` (its last 4 MiB at most), killed
//! (the whole group) when it outlives `--health-timeout`, which bounds both commands, or when
//! the agent stops.

use std::collections::{BTreeMap, VecDeque};
use std::fs;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fbpkg_common::Sha256Hash;
use fbpkg_common::api::{HostState, Report, ReportSource};
use fbpkg_common::pkgref::{PackageName, PackageRef, Selector, Tag};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::Agent;
use super::follow_state::{Activation, FollowState, key};
use crate::cache::CachedPackage;
use crate::engine::Phase;
use crate::error::{ErrorKind, PeerError, Result};
use crate::tracker_client::{Asker, TrackerClient};

/// Reports kept while the tracker does not take them; older ones are dropped first (the
/// tracker only keeps a host's latest state anyway).
pub const MAX_PENDING: usize = 8;
/// Shortest wait for a download within one pass (longer intervals wait an interval).
const FETCH_WAIT: Duration = Duration::from_secs(5);
/// Passes in a row a fetch fails on a local I/O error before it counts as lasting.
const LASTING_IO_FAILURES: u32 = 3;
/// How often a running command is checked for exit.
const COMMAND_POLL: Duration = Duration::from_millis(20);
/// Most bytes a command's log keeps: past it, the earlier output is dropped (checked every
/// [`COMMAND_POLL`]), so a health check that prints without end cannot fill the disk before
/// its timeout.
const MAX_LOG: u64 = 4 << 20;

/// What to follow and what to run.
#[derive(Debug, Clone)]
pub struct FollowConfig {
    /// The followed tags.
    pub follows: Vec<(PackageName, Tag)>,
    /// Who this host is to the tracker.
    pub asker: Asker,
    /// Run through `sh -c` when a tag's resolution changes.
    pub on_change: Option<String>,
    /// Run through `sh -c` after a successful activation.
    pub health_cmd: Option<String>,
    /// Bounds each command's run.
    pub health_timeout: Duration,
    /// How often each tag is resolved again.
    pub interval: Duration,
    /// Whether and how fast to fetch a rollout's next version before this host's phase.
    pub prefetch: Prefetch,
}

/// Fetching a rollout's next version ahead of this host's phase (`--prefetch-rate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefetch {
    /// Fetch only when the tag resolves to it.
    Off,
    /// At most this many bytes per second, until the host needs it.
    Capped(u64),
    /// As fast as the swarm goes.
    Unlimited,
}

impl Prefetch {
    /// `off`, `unlimited`, or bytes per second (`32M`, `1G`).
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "off" | "0" => Ok(Prefetch::Off),
            "unlimited" => Ok(Prefetch::Unlimited),
            other => fbpkg_common::size::parse_bytes(other)
                .map(Prefetch::Capped)
                .map_err(|e| format!("{e}, or off, or unlimited")),
        }
    }
}

/// One followed tag as `fbpkg-rs status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowStatus {
    /// `name:tag`.
    pub reference: String,
    /// What the tag last resolved to for this host.
    pub resolved: Option<Sha256Hash>,
    /// The version last activated.
    pub activated: Option<Sha256Hash>,
    /// The version activated before it, while a rollout may still send this host back there
    /// (until the tracker says a report on the active version counts for no rollout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Sha256Hash>,
    /// A rollout's next version, fetched ahead while this host's phase has not come.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<Sha256Hash>,
    /// The last state recorded for the activated version.
    pub state: Option<HostState>,
    /// Its detail (exit status, last output lines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Successful resolves since the agent started.
    pub resolves: u64,
    /// Reports not yet taken by the tracker.
    pub pending_reports: usize,
    /// The last error (resolve, fetch or report), cleared by the next full pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The follows' shared state: live status for the control socket, durable activations.
#[derive(Debug, Default)]
pub struct Follows {
    status: Mutex<BTreeMap<String, FollowStatus>>,
    durable: tokio::sync::Mutex<FollowState>,
}

impl Follows {
    /// Every followed tag's status, in `name:tag` order.
    pub fn status(&self) -> Vec<FollowStatus> {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn update(&self, k: &str, f: impl FnOnce(&mut FollowStatus)) {
        let mut all = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = all.get_mut(k) {
            f(s);
        }
    }
}

/// Load the durable state, less the tags no longer followed, and set up one status row per
/// followed tag.
pub fn prepare(state_dir: &Path, config: &FollowConfig) -> Follows {
    let durable = forget_unfollowed(state_dir, &config.follows);
    let status = config
        .follows
        .iter()
        .map(|(n, t)| {
            let k = key(n, t);
            let a = durable.follows.get(&k);
            let s = FollowStatus {
                reference: k.clone(),
                resolved: None,
                activated: a.map(|a| a.sha256),
                previous: a.and_then(|a| a.previous),
                next: None,
                state: a.map(|a| a.state),
                detail: a.and_then(|a| a.detail.clone()),
                resolves: 0,
                pending_reports: 0,
                error: None,
            };
            (k, s)
        })
        .collect();
    Follows {
        status: Mutex::new(status),
        durable: tokio::sync::Mutex::new(durable),
    }
}

/// Drop from the durable state every tag not in `follows` (an agent started without
/// `--follow` passes none), saving it when that changed it, and return what is left. A tag
/// this host stopped following kept its last activation for ever: `get NAME:TAG` with the
/// tracker away answered with it over the newer version `get` itself had resolved since, and
/// the budget kept it.
pub fn forget_unfollowed(state_dir: &Path, follows: &[(PackageName, Tag)]) -> FollowState {
    let mut state = FollowState::load(state_dir);
    let before = state.follows.len();
    state
        .follows
        .retain(|k, _| follows.iter().any(|(n, t)| key(n, t) == *k));
    if state.follows.len() != before
        && let Err(e) = state.save(state_dir)
    {
        tracing::warn!(error = %e, "cannot forget the tags no longer followed");
    }
    state
}

/// One followed tag's loop; returns at shutdown.
pub async fn follow(
    agent: Arc<Agent>,
    config: Arc<FollowConfig>,
    name: PackageName,
    tag: Tag,
    shutdown: CancellationToken,
) {
    let k = key(&name, &tag);
    // One attempt per interval: the interval is the retry.
    let tracker = agent.engine.tracker().clone().with_retry(Duration::ZERO);
    let r = PackageRef {
        name: Some(name.clone()),
        selector: Selector::Tag(tag.clone()),
    };
    let mut active = agent.follows.durable.lock().await.follows.get(&k).cloned();
    let mut pending = VecDeque::new();
    // After a restart the tracker may have lost what this host said (its reports are soft
    // state): say it again.
    if let Some(a) = &active {
        pending.push_back(report(&config, &name, a.sha256, a.state, a.detail.clone()));
    }
    // Killed between activation and its health check: check health again once.
    let mut recheck = config.health_cmd.is_some()
        && active
            .as_ref()
            .is_some_and(|a| a.state == HostState::Activated);
    let mut fetched_reported: Option<Sha256Hash> = None;
    // The version whose fetch failed for good, reported unhealthy.
    let mut fetch_failed: Option<Sha256Hash> = None;
    let mut failures = Failures::default();
    // The tracker counted the last report sent: a rollout is listening to this host.
    let mut counted = false;
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let pass = async {
            let v = tracker
                .resolve_as(&r, Some(&config.asker))
                .await
                .map_err(|e| format!("resolve: {e}"))?;
            let sha = v.sha256;
            let next = v.prefetch.filter(|p| *p != sha);
            agent.follows.update(&k, |s| {
                s.resolved = Some(sha);
                s.next = next;
                s.resolves += 1;
            });
            if let Some(again) = restate(&config, &name, active.as_ref(), sha, counted, &pending) {
                push(&mut pending, again);
            }
            // A version this host reported on that no rollout counted.
            let mut uncounted = None;
            let mut err = flush(&tracker, &mut pending, &mut counted, &mut uncounted).await;
            if let Some(next) = next
                && fetched_reported != Some(next)
                && agent.prefetch(&name, &next, config.prefetch).await
            {
                push(
                    &mut pending,
                    report(&config, &name, next, HostState::Fetched, None),
                );
                fetched_reported = Some(next);
            }
            let entry = match agent
                .cached(&name, &sha, config.interval.max(FETCH_WAIT))
                .await
            {
                Ok(entry) => entry,
                Err(e) => {
                    let why = format!("fetch {name}:{sha}: {e}");
                    let lasting = failures.lasting(sha, &e);
                    // A failure no retry mends is this host's answer to the rollout: said
                    // (again each pass while a rollout counts it), or the gate waits for ever
                    // on a host that only ever resolves.
                    if lasting && (fetch_failed != Some(sha) || counted) {
                        let detail = Some(why.clone());
                        push(
                            &mut pending,
                            report(&config, &name, sha, HostState::Unhealthy, detail),
                        );
                        fetch_failed = Some(sha);
                        flush(&tracker, &mut pending, &mut counted, &mut uncounted).await;
                    }
                    return Err(why);
                }
            };
            fetch_failed = None;
            failures = Failures::default();
            let is_active = active.as_ref().is_some_and(|a| a.sha256 == sha);
            if !is_active && fetched_reported != Some(sha) {
                push(
                    &mut pending,
                    report(&config, &name, sha, HostState::Fetched, None),
                );
                fetched_reported = Some(sha);
            }
            if !is_active {
                let previous = active.as_ref().map(|a| a.sha256);
                let step = (sha, previous);
                active =
                    Some(activate(&agent, &config, &name, &tag, step, &entry, &mut pending).await);
            } else if recheck && let Some(a) = active.as_mut() {
                check_health(&agent, &config, &name, &tag, &entry, a, &mut pending).await;
            }
            recheck = false;
            if let Some(e) = flush(&tracker, &mut pending, &mut counted, &mut uncounted).await {
                err = Some(e);
            }
            if let Some(a) = active.as_mut()
                && a.previous.is_some()
                && uncounted == Some(a.sha256)
            {
                // No rollout counts the version this host runs: none will send it back, and
                // the version before may go (the budget kept it until now).
                a.previous = None;
                record(&agent, &k, a).await;
            }
            match err {
                Some(e) => Err(e),
                None => Ok(()),
            }
        };
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return,
            o = pass => o,
        };
        if let Err(e) = &outcome {
            tracing::warn!(package = %name, tag = %tag, error = %e, "follow: will try again at the next interval");
        }
        let n = pending.len();
        agent.follows.update(&k, |s| {
            s.pending_reports = n;
            s.error = outcome.err();
        });
    }
}

fn report(
    config: &FollowConfig,
    name: &PackageName,
    sha: Sha256Hash,
    state: HostState,
    detail: Option<String>,
) -> Report {
    Report {
        name: name.clone(),
        hash: sha,
        host: config.asker.host.clone(),
        zone: config.asker.zone.clone(),
        state,
        detail,
        source: ReportSource::Follow,
        health_check: config.health_cmd.is_some(),
    }
}

fn push(pending: &mut VecDeque<Report>, r: Report) {
    if pending.len() >= MAX_PENDING {
        pending.pop_front();
    }
    pending.push_back(r);
}

/// The report to send again this pass, if any: this host's state on `resolved`, when that
/// is the version it runs, nothing else is pending, and the tracker `counted` the last report.
///
/// The tracker keeps what hosts report in memory only. A tracker restarted mid-rollout knows
/// the rollout and its phase but not that the phase's hosts are healthy; hosts that already
/// switched had nothing new to say, so its gate waited for ever. Saying it again each pass
/// while a rollout counts it (a repeat is one vote) costs one small request per interval for
/// the rollout's length only: once the rollout ends, the answer counts for nothing and the
/// host stops.
fn restate(
    config: &FollowConfig,
    name: &PackageName,
    active: Option<&Activation>,
    resolved: Sha256Hash,
    counted: bool,
    pending: &VecDeque<Report>,
) -> Option<Report> {
    let a = active.filter(|a| a.sha256 == resolved)?;
    (counted && pending.is_empty())
        .then(|| report(config, name, a.sha256, a.state, a.detail.clone()))
}

/// Send pending reports in order; the first failure stops and is returned. `counted` says
/// whether the tracker counted the last one sent for a rollout; `uncounted` is set to the
/// version of one it counted for none.
async fn flush(
    tracker: &TrackerClient,
    pending: &mut VecDeque<Report>,
    counted: &mut bool,
    uncounted: &mut Option<Sha256Hash>,
) -> Option<String> {
    while let Some(r) = pending.front() {
        match tracker.report(r).await {
            Ok(ack) => {
                *counted = !ack.counted_for.is_empty();
                if !*counted {
                    *uncounted = Some(r.hash);
                }
                pending.pop_front();
            }
            Err(e) => return Some(format!("report {:?}: {e}", r.state)),
        }
    }
    None
}

/// Switch to `sha` from `previous`: run `--on-change`, record the activation, run
/// `--health-cmd`.
async fn activate(
    agent: &Agent,
    config: &FollowConfig,
    name: &PackageName,
    tag: &Tag,
    (sha, previous): (Sha256Hash, Option<Sha256Hash>),
    entry: &CachedPackage,
    pending: &mut VecDeque<Report>,
) -> Activation {
    let k = key(name, tag);
    let env = command_env(name, tag, sha, entry);
    let (state, detail) = match &config.on_change {
        None => (HostState::Activated, None),
        Some(cmd) => {
            let log = log_path(agent.state_dir(), name, tag, "on-change");
            match run_command(cmd, &env, config.health_timeout, &log).await {
                Ok(()) => (HostState::Activated, None),
                Err(d) => (HostState::Unhealthy, Some(format!("on-change {d}"))),
            }
        }
    };
    tracing::info!(package = %name, tag = %tag, sha256 = %sha, state = ?state, "follow: activated");
    let mut a = Activation {
        sha256: sha,
        state,
        detail,
        previous,
    };
    push(
        pending,
        report(config, name, sha, a.state, a.detail.clone()),
    );
    record(agent, &k, &a).await;
    check_health(agent, config, name, tag, entry, &mut a, pending).await;
    a
}

/// After an activation: run `--health-cmd` (if any) and record and report what it says.
async fn check_health(
    agent: &Agent,
    config: &FollowConfig,
    name: &PackageName,
    tag: &Tag,
    entry: &CachedPackage,
    a: &mut Activation,
    pending: &mut VecDeque<Report>,
) {
    let (HostState::Activated, Some(cmd)) = (a.state, &config.health_cmd) else {
        return;
    };
    let env = command_env(name, tag, a.sha256, entry);
    let log = log_path(agent.state_dir(), name, tag, "health");
    (a.state, a.detail) = match run_command(cmd, &env, config.health_timeout, &log).await {
        Ok(()) => (HostState::Healthy, None),
        Err(d) => (HostState::Unhealthy, Some(format!("health {d}"))),
    };
    tracing::info!(package = %name, tag = %tag, sha256 = %a.sha256, state = ?a.state, "follow: health checked");
    push(
        pending,
        report(config, name, a.sha256, a.state, a.detail.clone()),
    );
    record(agent, &key(name, tag), a).await;
}

/// The variables `--on-change` and `--health-cmd` see.
fn command_env(
    name: &PackageName,
    tag: &Tag,
    sha: Sha256Hash,
    entry: &CachedPackage,
) -> [(&'static str, String); 4] {
    [
        (
            "FBPKG_PACKAGE_PATH",
            entry.launch_path.to_string_lossy().into_owned(),
        ),
        ("FBPKG_PACKAGE_NAME", name.to_string()),
        ("FBPKG_PACKAGE_HASH", sha.to_hex()),
        ("FBPKG_PACKAGE_REF", key(name, tag)),
    ]
}

/// Write the activation to the durable state and the live status.
async fn record(agent: &Agent, k: &str, a: &Activation) {
    let mut durable = agent.follows.durable.lock().await;
    durable.follows.insert(k.to_owned(), a.clone());
    let snapshot = durable.clone();
    let dir = agent.state_dir().to_owned();
    let saved = tokio::task::spawn_blocking(move || snapshot.save(&dir)).await;
    drop(durable);
    match saved {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "cannot save follow state"),
        Err(e) => tracing::error!(error = %e, "follow state task"),
    }
    agent.follows.update(k, |s| {
        s.activated = Some(a.sha256);
        s.previous = a.previous;
        s.state = Some(a.state);
        s.detail.clone_from(&a.detail);
    });
}

/// Run `sh -c cmd` in its own process group with `env`, output to `log` (at most
/// [`MAX_LOG`] bytes of it kept), for at most `timeout`. `Err` says how it failed: exit
/// status or timeout, then the output's last lines.
async fn run_command(
    cmd: &str,
    env: &[(&str, String)],
    timeout: Duration,
    log: &Path,
) -> std::result::Result<(), String> {
    run_command_within(cmd, env, timeout, log, MAX_LOG).await
}

/// [`run_command`], keeping at most `max_log` bytes of output (and a line that says so).
async fn run_command_within(
    cmd: &str,
    env: &[(&str, String)],
    timeout: Duration,
    log: &Path,
    max_log: u64,
) -> std::result::Result<(), String> {
    let out = open_log(log).map_err(|e| e.to_string())?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let watched = out.try_clone().map_err(|e| e.to_string())?;
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start sh: {e}"))?;
    let mut group = Group {
        child,
        exited: false,
    };
    // A timeout too long to add to now (`--health-timeout 1000000y`) never comes.
    let deadline = tokio::time::Instant::now().checked_add(timeout);
    let status = loop {
        keep_within(&watched, max_log);
        match group.child.try_wait() {
            Ok(Some(s)) => {
                group.exited = true;
                keep_within(&watched, max_log);
                break Ok(s);
            }
            Ok(None) if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) => {
                drop(group);
                break Err(format!("timed out after {timeout:?} (killed)"));
            }
            Ok(None) => tokio::time::sleep(COMMAND_POLL).await,
            Err(e) => break Err(format!("waiting: {e}")),
        }
    };
    let what = match status {
        Ok(s) if s.success() => return Ok(()),
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exited with status {c}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => format!("{s}"),
        },
        Err(e) => e,
    };
    // The detail, status line included, fits a report.
    let room = Report::MAX_DETAIL.saturating_sub(what.len() + 64);
    let tail = log_tail(log, room);
    Err(if tail.is_empty() {
        what
    } else {
        format!("{what}; last output:\n{tail}")
    })
}

/// A command's process group, killed (the whole group: `sh -c` may have started children
/// that hold on) when dropped before it exits: at its timeout, and when the agent stops in
/// the middle of it, instead of leaving it running with no deadline.
struct Group {
    child: std::process::Child,
    /// It exited and was reaped: nothing to kill.
    exited: bool,
}

impl Drop for Group {
    fn drop(&mut self) {
        if !self.exited {
            let pid = rustix::process::Pid::from_child(&self.child);
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The failed fetches of one followed tag, pass after pass.
#[derive(Debug, Default)]
struct Failures {
    /// The version, and how many passes in a row its fetch failed on a local I/O error.
    io: Option<(Sha256Hash, u32)>,
}

impl Failures {
    /// Is this pass's failure to fetch `sha` one no retry mends? The package cannot fit the
    /// cache (or the disk), or what arrives is not the package (an archive that fails its
    /// hash or is unsafe to unpack). Peers away, the tracker away, a download still under
    /// way: not lasting. A local I/O error may pass (a moment out of file descriptors); one
    /// that comes back [`LASTING_IO_FAILURES`] passes in a row for the same version (a
    /// read-only cache) is.
    fn lasting(&mut self, sha: Sha256Hash, e: &PeerError) -> bool {
        self.io = match (e.kind(), self.io) {
            (ErrorKind::Io, Some((v, n))) if v == sha => Some((v, n + 1)),
            (ErrorKind::Io, _) => Some((sha, 1)),
            _ => None,
        };
        matches!(
            e.kind(),
            ErrorKind::NoSpace | ErrorKind::Verification | ErrorKind::UnsafeArchive
        ) || self.io.is_some_and(|(_, n)| n >= LASTING_IO_FAILURES)
    }
}

/// `log`, emptied, for appending: every write of the command lands at the end, wherever
/// [`keep_within`] has cut it meanwhile.
fn open_log(log: &Path) -> std::io::Result<fs::File> {
    if let Some(dir) = log.parent() {
        fs::create_dir_all(dir)?;
    }
    let f = fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(log)?;
    f.set_len(0)?;
    Ok(f)
}

/// What a cut log starts with.
const LOG_CUT: &[u8] = b"[fbpkg-rs: earlier output dropped: the log keeps its last bytes]\n";

/// When `log` (opened by [`open_log`]) holds more than `max` bytes, keep its last `max / 2`
/// (from a line's start) after [`LOG_CUT`]. What the command writes while this runs may be
/// lost: a log, not a record. Failures are left be: the log may grow until the next try.
fn keep_within(log: &fs::File, max: u64) {
    use std::io::Write as _;
    use std::os::unix::fs::FileExt as _;
    let Ok(len) = log.metadata().map(|m| m.len()) else {
        return;
    };
    if len <= max {
        return;
    }
    let keep = usize::try_from(max / 2).unwrap_or(usize::MAX);
    let mut tail = vec![0; keep];
    let Ok(n) = log.read_at(&mut tail, len - keep as u64) else {
        return;
    };
    tail.truncate(n);
    let from = tail.iter().position(|&b| b == b'\n').map_or(0, |nl| nl + 1);
    if log.set_len(0).is_ok() {
        let mut w = log;
        let _ = w
            .write_all(LOG_CUT)
            .and_then(|()| w.write_all(&tail[from..]));
    }
}

/// The last whole lines of `log` within `max` bytes.
fn log_tail(log: &Path, max: usize) -> String {
    let Ok(mut f) = fs::File::open(log) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max as u64);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(max as u64).read_to_end(&mut buf);
    let mut text = String::from_utf8_lossy(&buf).into_owned();
    if start > 0
        && let Some(nl) = text.find('\n')
    {
        text.drain(..=nl);
    }
    // Lossy decoding may have grown it (a replacement character is 3 bytes).
    while text.len() > max {
        text.remove(0);
    }
    text.trim_end().to_owned()
}

impl Agent {
    /// Prefetch `name:sha` as `how` says, without waiting for it: `true` once it is in the
    /// cache. A failure is logged and tried again at the next pass.
    async fn prefetch(&self, name: &PackageName, sha: &Sha256Hash, how: Prefetch) -> bool {
        if how == Prefetch::Off {
            return false;
        }
        if let Some(t) = self.engine.find(name, sha) {
            match t.current_phase() {
                Phase::Seeding(_) => return true,
                Phase::Failed { .. } => {}
                // Under way (a prefetch, or someone's fetch): leave its pace alone.
                _ => return false,
            }
        }
        match self.start_fetch(name.as_str(), &sha.to_hex(), None).await {
            Ok(t) => {
                if matches!(t.current_phase(), Phase::Seeding(_)) {
                    return true;
                }
                if let Prefetch::Capped(rate) = how {
                    t.set_download_limit(Some(rate));
                }
                tracing::info!(package = %name, sha256 = %sha, ?how, "follow: prefetching the rollout's next version");
                false
            }
            Err(e) => {
                tracing::warn!(package = %name, sha256 = %sha, error = %e, "follow: cannot prefetch; will try again");
                false
            }
        }
    }

    /// `name:sha` in the cache, verified: fetched through the engine when it is not there.
    ///
    /// Waits at most `wait` for a download: it goes on in the engine, and the follow comes
    /// back to it after resolving again (the tag may have moved on meanwhile, e.g. an abort).
    async fn cached(
        &self,
        name: &PackageName,
        sha: &Sha256Hash,
        wait: Duration,
    ) -> Result<CachedPackage> {
        if let Some(t) = self.engine.find(name, sha)
            && let Phase::Seeding(entry) = t.current_phase()
        {
            return Ok(entry);
        }
        let t = self.start_fetch(name.as_str(), &sha.to_hex(), None).await?;
        match tokio::time::timeout(wait, t.finished()).await {
            Ok(Phase::Seeding(entry)) => Ok(entry),
            Ok(Phase::Failed { kind, message }) => Err(PeerError::Remote { kind, message }),
            Ok(other) => Err(PeerError::Agent(format!("download ended as {other:?}"))),
            Err(_) => Err(PeerError::Agent(format!(
                "still downloading ({}); checking again at the next interval",
                t.status().phase
            ))),
        }
    }
}

/// Where a command's log goes (for docs and tests): a directory per package, so that no
/// two tags share a file (`a-b:c` and `a:b-c`) and no name is too long for the file system.
pub fn log_path(state_dir: &Path, name: &PackageName, tag: &Tag, what: &str) -> PathBuf {
    state_dir
        .join("follow-logs")
        .join(name.as_str())
        .join(format!("{tag}.{what}.log"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_command_gets_its_env_and_a_failure_says_status_and_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("logs/x.log");
        let env = [("FBPKG_PACKAGE_HASH", "abc".to_owned())];
        run_command(
            "test \"$FBPKG_PACKAGE_HASH\" = abc",
            &env,
            Duration::from_secs(10),
            &log,
        )
        .await
        .unwrap();
        let err = run_command(
            "for i in $(seq 1 2000); do echo line $i; done; echo oops >&2; exit 3",
            &env,
            Duration::from_secs(10),
            &log,
        )
        .await
        .unwrap_err();
        assert!(err.starts_with("exited with status 3"), "{err}");
        assert!(err.ends_with("line 2000\noops"), "{err}");
        assert!(err.len() <= Report::MAX_DETAIL, "{}", err.len());
        assert!(!err.contains("line 1\n"), "whole lines only: {err}");
    }

    #[test]
    fn a_counted_state_is_said_again_only_for_the_version_running_with_nothing_pending() {
        let name = PackageName::new("app").unwrap();
        let (v1, v2) = (
            Sha256Hash::from_hex(&"01".repeat(32)).unwrap(),
            Sha256Hash::from_hex(&"02".repeat(32)).unwrap(),
        );
        let config = FollowConfig {
            follows: vec![(name.clone(), Tag::new("prod").unwrap())],
            asker: Asker {
                host: fbpkg_common::rollout::HostId::new("h-1").unwrap(),
                zone: None,
            },
            on_change: None,
            health_cmd: Some("true".into()),
            health_timeout: Duration::from_secs(1),
            interval: Duration::from_secs(1),
            prefetch: Prefetch::Off,
        };
        let unhealthy = Activation {
            sha256: v2,
            state: HostState::Unhealthy,
            detail: Some("health exited with status 1".into()),
            previous: None,
        };
        let none = VecDeque::new();
        let again = restate(&config, &name, Some(&unhealthy), v2, true, &none).unwrap();
        assert_eq!(
            (again.hash, again.state, again.detail.as_deref()),
            (
                v2,
                HostState::Unhealthy,
                Some("health exited with status 1")
            )
        );
        assert_eq!(again.host.as_str(), "h-1");
        // Not counted (no rollout listens), something newer to send, or about to switch.
        assert!(restate(&config, &name, Some(&unhealthy), v2, false, &none).is_none());
        let pending = VecDeque::from([again]);
        assert!(restate(&config, &name, Some(&unhealthy), v2, true, &pending).is_none());
        assert!(restate(&config, &name, Some(&unhealthy), v1, true, &none).is_none());
        assert!(restate(&config, &name, None, v2, true, &none).is_none());
    }

    #[test]
    fn prefetch_rates_parse_with_their_words() {
        assert_eq!(Prefetch::parse("off"), Ok(Prefetch::Off));
        assert_eq!(Prefetch::parse("unlimited"), Ok(Prefetch::Unlimited));
        assert_eq!(Prefetch::parse("32MiB"), Ok(Prefetch::Capped(32 << 20)));
        assert_eq!(Prefetch::parse("16K"), Ok(Prefetch::Capped(16 << 10)));
        let e = Prefetch::parse("fast").unwrap_err();
        assert!(e.contains("off") && e.contains("unlimited"), "{e}");
    }

    #[tokio::test]
    async fn a_command_past_its_timeout_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("x.log");
        let started = std::time::Instant::now();
        let err = run_command(
            "echo started; sleep 30 & sleep 30",
            &[],
            Duration::from_millis(300),
            &log,
        )
        .await
        .unwrap_err();
        assert!(err.starts_with("timed out"), "{err}");
        assert!(err.contains("started"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    /// Whether process `pid` still runs (a zombie waiting for its reaper does not).
    fn running(pid: u32) -> bool {
        fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
    }

    /// A command still running when the agent stops (its run is dropped) is killed with its
    /// whole group, instead of living on past the agent with no deadline.
    #[tokio::test]
    async fn a_command_dropped_midway_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let (log, pid_file) = (dir.path().join("x.log"), dir.path().join("pid"));
        let cmd = format!("sleep 300 & echo $! > {}; wait", pid_file.display());
        let run =
            tokio::spawn(
                async move { run_command(&cmd, &[], Duration::from_secs(600), &log).await },
            );
        let mut pid = None;
        for _ in 0..600 {
            pid = fs::read_to_string(&pid_file)
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok());
            if pid.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let pid = pid.expect("the command started its child");
        assert!(running(pid));
        run.abort();
        assert!(run.await.unwrap_err().is_cancelled());
        let mut gone = false;
        for _ in 0..600 {
            gone = !running(pid);
            if gone {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(gone, "the command's child outlived the agent's stop");
    }

    /// A command that prints without end keeps only its last output on disk, while it runs
    /// and when it is done: a health check in a loop filled the state directory's disk until
    /// its timeout.
    #[tokio::test]
    async fn a_command_that_prints_without_end_keeps_its_log_small() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("x.log");
        let err = run_command_within(
            "for i in $(seq 1 2000); do echo line $i; done; exit 1",
            &[],
            Duration::from_secs(10),
            &log,
            4096,
        )
        .await
        .unwrap_err();
        assert!(err.ends_with("line 2000"), "{err}");
        let kept = fs::read(&log).unwrap();
        assert!(kept.len() <= 4096, "{}", kept.len());
        assert!(kept.starts_with(LOG_CUT), "says what it dropped");
        assert!(kept.ends_with(b"line 1999\nline 2000\n"));
        assert!(
            kept[LOG_CUT.len()..].starts_with(b"line "),
            "whole lines after the cut"
        );

        // 1 MiB in one go, then a long wait: cut while the command still runs.
        let running = {
            let log = log.clone();
            tokio::spawn(async move {
                run_command_within(
                    "head -c 1048576 /dev/zero | tr '\\0' x; echo; echo done; sleep 600",
                    &[],
                    Duration::from_secs(600),
                    &log,
                    65536,
                )
                .await
            })
        };
        let mut small = false;
        for _ in 0..600 {
            let now = fs::read(&log).unwrap_or_default();
            small = now.ends_with(b"done\n") && now.len() <= 65536;
            if small {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        running.abort();
        assert!(small, "{} bytes on disk", fs::metadata(&log).unwrap().len());
    }

    /// An agent started with fewer `--follow`s forgets the others' activations (the offline
    /// answer for a tag and the budget's protection come from them); one without any forgets
    /// them all.
    #[test]
    fn tags_no_longer_followed_are_forgotten_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let app = PackageName::new("app").unwrap();
        let (prod, old) = (Tag::new("prod").unwrap(), Tag::new("old").unwrap());
        let activation = Activation {
            sha256: Sha256Hash::from_hex(&"01".repeat(32)).unwrap(),
            state: HostState::Healthy,
            detail: None,
            previous: None,
        };
        let mut state = FollowState::default();
        for t in [&prod, &old] {
            state.follows.insert(key(&app, t), activation.clone());
        }
        state.save(dir.path()).unwrap();
        let left = forget_unfollowed(dir.path(), &[(app.clone(), prod.clone())]);
        assert!(left.get(&app, &prod).is_some() && left.get(&app, &old).is_none());
        assert_eq!(FollowState::load(dir.path()), left, "saved");
        assert!(forget_unfollowed(dir.path(), &[]).follows.is_empty());
        assert!(FollowState::load(dir.path()).follows.is_empty());
    }

    /// Which failed fetches a rollout hears of at once, which after three passes, and which
    /// never (they mend by themselves).
    #[test]
    fn a_fetch_failure_is_lasting_when_no_retry_mends_it() {
        let (v1, v2) = (
            Sha256Hash::from_hex(&"01".repeat(32)).unwrap(),
            Sha256Hash::from_hex(&"02".repeat(32)).unwrap(),
        );
        let io = || PeerError::io("writing a piece", "/cache/x")(std::io::Error::other("EIO"));
        let no_peers = PeerError::NoPeers("none within 60s".into());
        let mut f = Failures::default();
        assert!(f.lasting(v1, &PeerError::NoSpace("budget".into())));
        assert!(f.lasting(v1, &PeerError::Verification("sha256".into())));
        assert!(!f.lasting(v1, &no_peers));
        // Three passes in a row on I/O errors; anything else between starts the count again.
        assert!(!f.lasting(v1, &io()));
        assert!(!f.lasting(v1, &io()));
        assert!(!f.lasting(v1, &no_peers));
        assert!(!f.lasting(v1, &io()));
        assert!(!f.lasting(v1, &io()));
        assert!(f.lasting(v1, &io()));
        // The tag moved on: the next version's first I/O error is its first.
        assert!(!f.lasting(v2, &io()));
        assert!(!f.lasting(v2, &io()));
        assert!(f.lasting(v2, &io()));
    }

    /// A timeout too long to add to the clock waits for the command, without a panic.
    #[tokio::test]
    async fn a_timeout_past_the_end_of_time_is_no_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("x.log");
        run_command("true", &[], Duration::MAX, &log).await.unwrap();
    }

    #[test]
    fn no_two_followed_tags_share_a_log() {
        let dir = Path::new("/state");
        let at = |n: &str, t: &str| {
            log_path(
                dir,
                &PackageName::new(n).unwrap(),
                &Tag::new(t).unwrap(),
                "health",
            )
        };
        assert_ne!(at("a-b", "x"), at("a", "b-x"));
        let long = "x".repeat(128);
        let path = at(&long, &long);
        assert!(path.iter().all(|c| c.len() < 255), "{}", path.display());
    }
}
