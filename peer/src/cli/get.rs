//! `fbpkg-rs get REF`: print a package's path in the launcher cache, fetching it if needed.
//!
//! The launch path — `name:<full hash>` already in the cache — is a few `stat`s and one line
//! of output: no runtime, no logging setup, no tracker, no agent.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use fbpkg_common::Sha256Hash;
use fbpkg_common::api::{HostState, Report, ReportSource};
use fbpkg_common::pkgref::{HashPrefix, PackageName, PackageRef, Selector};
use fbpkg_common::rollout::HostId;
use fbpkg_common::tracker_proto::Zone;
use serde::Serialize;
use tokio::time::Instant;

use super::progress::Progress;
use super::{HostArgs, exit};
use crate::agent::control::{AgentClient, Event, Request};
use crate::agent::follow_state::FollowState;
use crate::cache::{Cache, CachedPackage};
use crate::engine::{Engine, EngineConfig, Phase, TorrentStatus};
use crate::error::{PeerError, Result};
use crate::tracker_client::{Asker, TrackerClient};

/// `fbpkg-rs get` flags.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
REF is one of:
  name:<64 hex digits>   an exact version; answered from the cache without any network
  name:<8+ hex digits>   a unique prefix of a version's hash
  name:<tag>             a tag, e.g. myapp:prod (tags are never all-hex)
  <8+ hex digits>        a hash or prefix of any package

Exit codes: 0 ok, 1 other error, 2 bad reference (or ambiguous prefix), 3 not found,
4 verification failed, 5 no peers within the timeout, 6 tracker unreachable (after retrying
for the stall timeout), 7 not authorized, 8 no space (the package does not fit the agent's
--cache-max-size even after evicting what may go, or the disk filled up; the cache is left as
it was).

During a rollout of a tag, the tracker answers the version this host should run now: it
sends this host's id (kept in STATE_DIR/host-id, created on first use; --host-id overrides
it) and its --zone, and once the version is here tells the rollout this host has it (one
attempt, after printing the path). Exact hashes never ask the tracker.

When the tracker cannot be reached, prefixes and tags fall back to what this host's cache
knows (with a warning); a tag this host's agent follows answers the version the agent last
activated, if it is still in the cache. With no agent running, get downloads by itself and does not seed
afterwards.")]
pub(crate) struct GetArgs {
    /// The package to get.
    reference: String,

    #[command(flatten)]
    fetch: FetchArgs,

    /// Print one JSON object instead of the path.
    #[arg(long)]
    json: bool,
}

/// How a package is resolved and fetched when the cache cannot answer: shared by `get` and
/// `run`, so both find the same version the same way.
#[derive(Debug, clap::Args)]
pub(crate) struct FetchArgs {
    #[command(flatten)]
    pub host: HostArgs,

    /// Give up (exit 5) when no data has arrived for this long.
    #[arg(long, env = "FBPKG_STALL_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    stall_timeout: Duration,

    /// Where to listen for peers when downloading without an agent.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,

    /// This host's id for rollouts, instead of the one kept in STATE_DIR/host-id (for fleets
    /// that already name their hosts): 1 to 64 of `[A-Za-z0-9._-]`.
    #[arg(long, env = "FBPKG_HOST_ID", value_parser = parse_host_id)]
    host_id: Option<HostId>,

    /// This host's place in the fleet (e.g. dc1/rack7), as given to the agent: rollout phases
    /// may name zones.
    #[arg(long, env = "FBPKG_ZONE")]
    zone: Option<Zone>,
}

fn parse_host_id(s: &str) -> std::result::Result<HostId, String> {
    HostId::new(s).map_err(|e| e.to_string())
}

impl FetchArgs {
    /// Who this host is to the tracker: the --host-id given, or the one in the state dir.
    fn asker(&self) -> Result<Asker> {
        let host = match &self.host_id {
            Some(h) => h.clone(),
            None => crate::host_id::load_or_create(&self.host.state_dir())?,
        };
        Ok(Asker {
            host,
            zone: self.zone.clone(),
        })
    }
}

#[derive(Debug, Serialize)]
struct Output<'a> {
    name: &'a str,
    sha256: String,
    path: &'a Path,
    dir: &'a Path,
    /// cache, agent or standalone.
    source: &'a str,
}

fn print(name: &PackageName, sha: &Sha256Hash, entry: &CachedPackage, source: &str, json: bool) {
    if json {
        let out = Output {
            name: name.as_str(),
            sha256: sha.to_hex(),
            path: &entry.launch_path,
            dir: &entry.dir,
            source,
        };
        println!("{}", serde_json::to_string(&out).unwrap_or_default());
    } else {
        println!("{}", entry.launch_path.display());
    }
}

/// The cache-only answer, when the reference pins a version that is already here.
pub(super) fn from_cache(
    r: &PackageRef,
    cache: &Cache,
) -> Option<(PackageName, Sha256Hash, CachedPackage)> {
    let (name, sha) = match (&r.name, &r.selector) {
        (Some(n), Selector::Hash(h)) => (n.clone(), *h),
        (None, Selector::Hash(h)) => {
            let prefix = HashPrefix::new(&h.to_hex()).ok()?;
            match cache.find_prefix(None, &prefix).as_slice() {
                [(n, h)] => (n.clone(), *h),
                _ => return None,
            }
        }
        _ => return None,
    };
    // The seal costs a stat and a small read; a broken one means a full verify before this
    // path is printed, and a corrupt entry is quarantined and fetched again.
    cache
        .lookup_checked(&name, &sha)
        .ok()
        .flatten()
        .map(|e| (name, sha, e))
}

pub(super) fn run(args: GetArgs, log: Option<&str>) -> ExitCode {
    let r: PackageRef = match args.reference.parse() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fbpkg-rs: error: {e}");
            return ExitCode::from(exit::BAD_REFERENCE);
        }
    };
    let cache = args.fetch.host.cache();
    if let Some((name, sha, entry)) = from_cache(&r, &cache) {
        print(&name, &sha, &entry, "cache", args.json);
        return ExitCode::SUCCESS;
    }
    super::init_logging(log, "warn");
    let result = super::runtime()
        .map_err(|e| PeerError::Agent(e.to_string()))
        .and_then(|rt| {
            rt.block_on(async {
                let f = fetch(&args.fetch, &r, &cache).await?;
                print(&f.name, &f.sha256, &f.entry, f.source, args.json);
                f.handover.report().await;
                Ok(())
            })
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fbpkg-rs: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// How long a tag or prefix is retried against an unreachable tracker when this host's cache
/// can answer it: a launch must not wait a whole stall timeout for a tracker that is gone.
const RESOLVE_RETRY_WITH_FALLBACK: Duration = Duration::from_secs(3);

/// A resolution, and who to report it for when the tracker answered a tag for this host.
#[derive(Debug)]
struct Resolved {
    name: PackageName,
    sha256: Sha256Hash,
    report_as: Option<Asker>,
}

/// Resolve through the tracker; when it is unreachable, fall back to what the cache knows.
async fn resolve(
    r: &PackageRef,
    asker: impl FnOnce() -> Result<Asker>,
    tracker: &TrackerClient,
    cache: &Cache,
    state_dir: &Path,
) -> Result<Resolved> {
    if let Some((n, h)) = r.exact() {
        return Ok(Resolved {
            name: n.clone(),
            sha256: *h,
            report_as: None,
        });
    }
    let asker = asker()?;
    let fallback = local_answer(r, cache, state_dir);
    let short;
    let tracker = if fallback.is_some() {
        short = tracker.clone().with_retry(RESOLVE_RETRY_WITH_FALLBACK);
        &short
    } else {
        tracker
    };
    match tracker.resolve_as(r, Some(&asker)).await {
        Ok(v) => {
            let is_tag = matches!(r.selector, Selector::Tag(_));
            if let (Some(name), Selector::Tag(tag)) = (&r.name, &r.selector) {
                cache.remember_tag(name, tag, &v.sha256);
            }
            Ok(Resolved {
                name: v.name,
                sha256: v.sha256,
                report_as: is_tag.then_some(asker),
            })
        }
        Err(PeerError::Tracker(msg)) => match fallback {
            Some((n, h, why)) => {
                eprintln!("fbpkg-rs: warning: tracker unreachable ({msg}); using {n}:{h} ({why})");
                Ok(Resolved {
                    name: n,
                    sha256: h,
                    report_as: None,
                })
            }
            None => Err(PeerError::Tracker(msg)),
        },
        Err(e) => Err(e),
    }
}

/// The one cached version a tag or prefix stands for on this host, if there is one, and why.
///
/// For a tag this host's agent follows, the version it last activated comes first: that is
/// this host's last resolution. Only a version still in the cache is ever answered.
fn local_answer(
    r: &PackageRef,
    cache: &Cache,
    state_dir: &Path,
) -> Option<(PackageName, Sha256Hash, &'static str)> {
    if let (Some(n), Selector::Tag(tag)) = (&r.name, &r.selector)
        && let Some(a) = FollowState::load(state_dir).get(n, tag)
        && cache.lookup(n, &a.sha256).is_some()
    {
        return Some((
            n.clone(),
            a.sha256,
            "the version this host's agent last activated",
        ));
    }
    let local = match &r.selector {
        Selector::Tag(tag) => r
            .name
            .as_ref()
            .and_then(|n| cache.recall_tag(n, tag).map(|h| vec![(n.clone(), h)]))
            .unwrap_or_default(),
        Selector::Prefix(p) => cache.find_prefix(r.name.as_ref(), p),
        Selector::Hash(h) => HashPrefix::new(&h.to_hex())
            .map(|p| cache.find_prefix(r.name.as_ref(), &p))
            .unwrap_or_default(),
    };
    match local.as_slice() {
        [(n, h)] if cache.lookup(n, h).is_some() => Some((n.clone(), *h, "from this host's cache")),
        _ => None,
    }
}

/// A version found in the cache, or fetched into it.
#[derive(Debug)]
pub(super) struct Fetched {
    pub name: PackageName,
    pub sha256: Sha256Hash,
    pub entry: CachedPackage,
    /// cache, agent or standalone.
    pub source: &'static str,
    /// What to tell a rollout once the version is handed over ([`Handover::report`]).
    pub handover: Handover,
}

/// A resolution to report to the tracker, once the caller has the version.
#[derive(Debug)]
pub(super) struct Handover {
    tracker: TrackerClient,
    resolved: Resolved,
}

/// Resolve `r` for this host and make sure its version is in the cache: through the agent
/// when one runs, by downloading here otherwise.
pub(super) async fn fetch(args: &FetchArgs, r: &PackageRef, cache: &Cache) -> Result<Fetched> {
    // A fleet asks at once: a dropped SYN or a 503 is retried for as long as a stall would be
    // tolerated, so a get fails for the tracker only when it stays away.
    let tracker = args.host.tracker_client(None, args.stall_timeout)?;
    let resolved = resolve(r, || args.asker(), &tracker, cache, &args.host.state_dir()).await?;
    let (name, sha) = (resolved.name.clone(), resolved.sha256);
    if let Some(entry) = cache.lookup_checked(&name, &sha)? {
        return Ok(Fetched {
            name,
            sha256: sha,
            entry,
            source: "cache",
            handover: Handover { tracker, resolved },
        });
    }
    let state_dir = args.host.state_dir();
    let label = format!("{name}:{}", &sha.to_hex()[..12]);
    let progress = Progress::new(&label);
    let result = match AgentClient::connect(&state_dir).await? {
        Some(agent) => via_agent(agent, &name, &sha, args.stall_timeout, &progress)
            .await
            .map(|e| (e, "agent")),
        None => standalone(args, &tracker, cache, &name, &sha, &progress)
            .await
            .map(|e| (e, "standalone")),
    };
    progress.finish();
    let (entry, source) = result?;
    Ok(Fetched {
        name,
        sha256: sha,
        entry,
        source,
        handover: Handover { tracker, resolved },
    })
}

/// Longest a `get` spends telling the tracker what it got, after printing the path.
const REPORT_WAIT: Duration = Duration::from_secs(2);

impl Handover {
    /// Tell a rollout that this host now has the version its tag resolved to: for a host
    /// that only `get`s, handing the path to its caller is the activation (the tracker never
    /// lets it override what this host's agent reported from a health check). Best effort,
    /// one attempt: the path is already printed, and a launch does not wait for the tracker.
    pub async fn report(&self) {
        let resolved = &self.resolved;
        let Some(asker) = &resolved.report_as else {
            return;
        };
        let rep = Report {
            name: resolved.name.clone(),
            hash: resolved.sha256,
            host: asker.host.clone(),
            zone: asker.zone.clone(),
            state: HostState::Activated,
            detail: None,
            source: ReportSource::Get,
            health_check: false,
        };
        let once = self.tracker.clone().with_retry(Duration::ZERO);
        match tokio::time::timeout(REPORT_WAIT, once.report(&rep)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot report the resolution"),
            Err(_) => tracing::debug!("the tracker took too long to take the report"),
        }
    }
}

/// Watches progress and decides when a download has stalled.
struct Stall {
    limit: Duration,
    last_bytes: u64,
    since: Instant,
}

impl Stall {
    fn new(limit: Duration) -> Self {
        Self {
            limit,
            last_bytes: 0,
            since: Instant::now(),
        }
    }

    fn check(&mut self, s: &TorrentStatus) -> Result<()> {
        if s.bytes_have > self.last_bytes || s.phase == "verifying" {
            self.last_bytes = s.bytes_have;
            self.since = Instant::now();
            return Ok(());
        }
        if self.since.elapsed() < self.limit {
            return Ok(());
        }
        let secs = self.limit.as_secs();
        Err(PeerError::NoPeers(if s.peers == 0 {
            format!("no peer with {} found within {secs} s", s.name)
        } else {
            format!("{} connected peers sent nothing for {secs} s", s.peers)
        }))
    }
}

async fn via_agent(
    mut agent: AgentClient,
    name: &PackageName,
    sha: &Sha256Hash,
    stall: Duration,
    progress: &Progress,
) -> Result<CachedPackage> {
    agent
        .send(&Request::Fetch {
            name: name.to_string(),
            sha256: sha.to_hex(),
            tracker_retry_secs: Some(stall.as_secs_f64()),
        })
        .await?;
    // The agent sends progress every 250 ms once the download exists; before that it may
    // retry the tracker for up to `stall`. Silence past both means it is stuck.
    let silence = stall + Duration::from_secs(30);
    let mut stall = Stall::new(stall);
    loop {
        let next = tokio::time::timeout(silence, agent.next()).await;
        match next {
            Err(_) => return Err(PeerError::Agent("the agent stopped answering".into())),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(None)) => return Err(PeerError::Agent("the agent closed the connection".into())),
            Ok(Ok(Some(event))) => match event {
                Event::Progress { status } => {
                    progress.update(&status);
                    stall.check(&status).map_err(|e| match e {
                        PeerError::NoPeers(why) => PeerError::NoPeers(format!(
                            "{why}; the agent keeps trying in the background"
                        )),
                        other => other,
                    })?;
                }
                Event::Done { path, dir } => {
                    return Ok(CachedPackage {
                        dir,
                        launch_path: path,
                    });
                }
                Event::Error { kind, message } => return Err(PeerError::Remote { kind, message }),
                other => return Err(PeerError::Agent(format!("unexpected answer {other:?}"))),
            },
        }
    }
}

/// Hold an exclusive `flock` on `work` until the returned handle drops.
fn claim_work_dir(work: &Path) -> Result<std::fs::File> {
    let dir = std::fs::File::open(work).map_err(PeerError::io("opening", work))?;
    dir.lock().map_err(PeerError::io("locking", work))?;
    Ok(dir)
}

/// Remove the work directories of standalone `get`s that ended without cleaning up (killed,
/// the host rebooted): each held a partial download, up to the package's size, that no later
/// `get` resumed (the name has the pid) and nothing else removed. One still locked is in use,
/// and so is one whose process still runs (a `get` from before the lock).
fn clean_abandoned_work(state_dir: &Path, ours: &Path) {
    let Ok(rd) = std::fs::read_dir(state_dir) else {
        return;
    };
    for e in rd.flatten() {
        let path = e.path();
        let Some(pid) = e
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("get-"))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // Gone only when the kernel says there is no such process.
        let running = rustix::process::Pid::from_raw(pid)
            .is_none_or(|p| rustix::process::test_kill_process(p) != Err(rustix::io::Errno::SRCH));
        if running || path == ours || !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Ok(dir) = std::fs::File::open(&path) else {
            continue;
        };
        if dir.try_lock().is_err() {
            continue;
        }
        if let Err(err) = crate::cache::remove_tree(&path) {
            tracing::warn!(path = %path.display(), error = %err, "cannot remove an abandoned download");
        }
    }
}

async fn standalone(
    args: &FetchArgs,
    tracker: &TrackerClient,
    cache: &Cache,
    name: &PackageName,
    sha: &Sha256Hash,
    progress: &Progress,
) -> Result<CachedPackage> {
    let meta = Arc::new(tracker.metainfo(name, sha).await?);
    let state_dir = args.host.state_dir();
    crate::agent::private_dir(&state_dir)?;
    let work = state_dir.join(format!("get-{}", std::process::id()));
    // Ours while this lives: a `get` that starts meanwhile leaves it alone. Where locks are
    // not to be had (some network file systems), nothing is cleaned up rather than risk
    // another's work.
    std::fs::create_dir_all(&work).map_err(PeerError::io("creating", &work))?;
    let _in_use = match claim_work_dir(&work) {
        Ok(lock) => {
            clean_abandoned_work(&state_dir, &work);
            cache.clean_staging();
            Some(lock)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot lock this download's directory; leaving others' leftovers");
            None
        }
    };
    let mut config = EngineConfig::new(work.clone());
    config.listen = args.listen;
    let cancel = super::shutdown_on_signals();
    let engine = Engine::start(config, tracker.clone(), cache.clone(), cancel.clone()).await?;
    let result = async {
        let t = engine.download(name.clone(), meta).await?;
        let finished = t.finished();
        tokio::pin!(finished);
        let mut stall = Stall::new(args.stall_timeout);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                p = &mut finished => return match p {
                    Phase::Seeding(entry) => Ok(entry),
                    Phase::Failed { kind, message } => Err(PeerError::Remote { kind, message }),
                    other => Err(PeerError::Agent(format!("download ended as {other:?}"))),
                },
                _ = cancel.cancelled() => return Err(PeerError::Cancelled),
                _ = tick.tick() => {
                    let s = t.status();
                    progress.update(&s);
                    stall.check(&s)?;
                }
            }
        }
    }
    .await;
    engine.shutdown().await;
    let _ = std::fs::remove_dir_all(&work);
    if result.is_ok() {
        eprintln!(
            "fbpkg-rs: note: no agent is running, so this host will not seed {name}; start `fbpkg-rs agent` to share it"
        );
    }
    result
}
