//! The long-running agent: seeds what the cache holds, resumes partial downloads, fetches on
//! request, and answers its control socket.

pub mod budget;
pub mod control;
pub mod follow;
pub mod follow_state;

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fbpkg_common::metainfo::Metainfo;
use fbpkg_common::pkgref::PackageName;
use fbpkg_common::{InfoHash, Sha256Hash};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::cache::{Cache, CachedPackage, Handoff};
use crate::engine::{Engine, EngineConfig, Phase, Torrent};
use crate::error::{PeerError, Result};
use crate::tracker_client::TrackerClient;
use control::{Event, Request};

/// How often `fetch` clients get a progress event.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// Control connections served at once; more wait in the socket's backlog.
const MAX_CONTROL_CONNECTIONS: usize = 256;
/// A client must send its whole request line within this time.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// A client must take each answer line within this time, or it is taken for gone (a client
/// that stops reading would otherwise hold its connection, and a slot, for ever).
const ANSWER_DEADLINE: Duration = Duration::from_secs(10);

/// Write one event line; false when the client has gone (or stopped reading).
async fn send<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, e: Event) -> bool {
    let mut line = serde_json::to_vec(&e).unwrap_or_default();
    line.push(b'\n');
    matches!(
        tokio::time::timeout(ANSWER_DEADLINE, w.write_all(&line)).await,
        Ok(Ok(()))
    )
}

/// Create a private directory (0700) and its parents.
pub fn private_dir(path: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(PeerError::io("creating", path))
}

/// Hold the state directory's lock for the life of the agent: one agent per state directory.
fn lock_state_dir(state_dir: &Path) -> Result<fs::File> {
    let path = state_dir.join("agent.lock");
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(PeerError::io("opening", &path))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(fs::TryLockError::WouldBlock) => Err(PeerError::Agent(format!(
            "another agent is already running with state directory {}",
            state_dir.display()
        ))),
        Err(fs::TryLockError::Error(e)) => Err(PeerError::io("locking", &path)(e)),
    }
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    /// Its engine.
    pub engine: Arc<Engine>,
    state_dir: PathBuf,
    follows: follow::Follows,
    cache_life: budget::CacheLife,
    /// Permits to read request lines past [`control::SMALL_CONTROL_LINE`].
    large_requests: Semaphore,
}

impl Agent {
    /// Start: lock the state directory, start the engine, seed the cache, resume downloads,
    /// follow the tags `follow` names (if any), keep the cache within `cache_life`'s budget,
    /// and serve the control socket until `shutdown`.
    pub async fn run(
        state_dir: PathBuf,
        cache: Cache,
        tracker: TrackerClient,
        engine_config: EngineConfig,
        follow: Option<follow::FollowConfig>,
        cache_life: budget::CacheLife,
        shutdown: CancellationToken,
    ) -> Result<()> {
        private_dir(&state_dir)?;
        let _lock = lock_state_dir(&state_dir)?;
        cache.clean_staging();
        let engine = Engine::start(
            engine_config,
            tracker,
            cache.clone(),
            shutdown.child_token(),
        )
        .await?;
        let follows = match &follow {
            Some(f) => follow::prepare(&state_dir, f),
            None => {
                follow::forget_unfollowed(&state_dir, &[]);
                follow::Follows::default()
            }
        };
        let agent = Arc::new(Agent {
            engine: engine.clone(),
            state_dir: state_dir.clone(),
            follows,
            cache_life,
            large_requests: Semaphore::new(control::LARGE_CONTROL_LINES),
        });
        // The control socket comes first: a `get` that arrives while partial downloads are
        // still being re-hashed must reach this agent (and wait for the one owner of its
        // download), not start a second, standalone download beside it.
        let sock = control::socket_path(&state_dir);
        let _ = fs::remove_file(&sock); // stale: we hold the lock, so no agent owns it
        let listener =
            UnixListener::bind(&sock).map_err(PeerError::io("binding control socket", &sock))?;
        fs::set_permissions(&sock, fs::Permissions::from_mode(0o600))
            .map_err(PeerError::io("chmod", &sock))?;
        let tasks = TaskTracker::new();
        let e = engine.clone();
        let c = cache.clone();
        tasks
            .spawn(async move { restore(&e, &c).await }.instrument(tracing::info_span!("restore")));
        tasks.spawn(
            budget::sweep_loop(agent.clone(), shutdown.child_token())
                .instrument(tracing::info_span!("cache_budget")),
        );
        if let Some(f) = follow {
            let f = Arc::new(f);
            for (name, tag) in f.follows.clone() {
                let span = tracing::info_span!("follow", package = %name, tag = %tag);
                tasks.spawn(
                    follow::follow(agent.clone(), f.clone(), name, tag, shutdown.child_token())
                        .instrument(span),
                );
            }
        }
        tracing::info!(
            socket = %sock.display(),
            cache = %cache.root().display(),
            tracker = engine.tracker().base(),
            peers = %engine.listen_addr(),
            zone = ?engine.config().zone,
            superseed = engine.config().superseed,
            max_upload_rate = ?engine.config().max_upload_rate,
            origin_budget = ?engine.config().origin_budget,
            cache_max_size = ?agent.cache_life.budget.map(|b| b.max_bytes),
            "agent ready"
        );
        let slots = Arc::new(Semaphore::new(MAX_CONTROL_CONNECTIONS));
        loop {
            // At the cap, stop accepting: clients wait in the backlog instead of each
            // costing a task and buffers.
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let a = agent.clone();
                        let stop = shutdown.clone();
                        tasks.spawn(async move {
                            a.serve(stream, stop).await;
                            drop(permit);
                        }.instrument(tracing::debug_span!("control")));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "control socket accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        tracing::info!("agent stopping");
        tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), tasks.wait()).await;
        engine.shutdown().await;
        let _ = fs::remove_file(&sock);
        tracing::info!("agent stopped");
        Ok(())
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    async fn serve(&self, stream: UnixStream, shutdown: CancellationToken) {
        let (r, mut w) = stream.into_split();
        let (req, _large) =
            match control::read_request(r, &self.large_requests, REQUEST_DEADLINE).await {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => {
                    send(&mut w, Event::from_error(&e)).await;
                    return;
                }
            };
        match req {
            Request::Ping => {
                let pong = Event::Pong {
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    listen: self.engine.listen_addr().to_string(),
                };
                send(&mut w, pong).await;
            }
            Request::Announce { info_hash } => {
                let e = match InfoHash::from_hex(&info_hash)
                    .ok()
                    .and_then(|ih| self.engine.torrent(&ih))
                {
                    Some(t) => {
                        t.announce_now.notify_one();
                        Event::Status {
                            torrents: vec![t.status()],
                        }
                    }
                    None => Event::from_error(&PeerError::NotFound(format!(
                        "no package with info-hash {info_hash}"
                    ))),
                };
                send(&mut w, e).await;
            }
            Request::Follows => {
                send(
                    &mut w,
                    Event::Follows {
                        follows: self.follows.status(),
                    },
                )
                .await;
            }
            Request::Gc { dry_run, max_size } => {
                let e = match self.gc(dry_run, max_size).await {
                    Ok(report) => Event::Gc { report },
                    Err(e) => Event::from_error(&e),
                };
                send(&mut w, e).await;
            }
            Request::Metrics => {
                let text = self.cache_metrics().await;
                send(&mut w, Event::Metrics { text }).await;
            }
            Request::Status => {
                send(
                    &mut w,
                    Event::Status {
                        torrents: self.engine.status(),
                    },
                )
                .await;
            }
            Request::Add {
                name,
                metainfo_hex,
                path,
                take,
            } => {
                let r = self.add(&name, &metainfo_hex, &path, take).await;
                let e = match r {
                    Ok((path, dir)) => Event::Done { path, dir },
                    Err(e) => Event::from_error(&e),
                };
                send(&mut w, e).await;
            }
            Request::Publish {
                name,
                path,
                file_name,
                announce,
                format,
            } => {
                let r = self
                    .publish(&name, &path, (&file_name, &announce, &format))
                    .await;
                let e = match r {
                    Ok((entry, meta, fresh)) => Event::Published {
                        path: entry.launch_path,
                        dir: entry.dir,
                        metainfo_hex: hex::encode(meta.as_bytes()),
                        fresh,
                    },
                    Err(e) => Event::from_error(&e),
                };
                send(&mut w, e).await;
            }
            Request::Forget { name, sha256 } => {
                let e = match self.forget(&name, &sha256).await {
                    Ok(()) => Event::Status {
                        torrents: self.engine.status(),
                    },
                    Err(e) => Event::from_error(&e),
                };
                send(&mut w, e).await;
            }
            Request::Fetch {
                name,
                sha256,
                tracker_retry_secs,
            } => {
                let retry = tracker_retry_secs
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .map(|s| Duration::from_secs_f64(s.min(3600.0)));
                let t = match self.start_fetch(&name, &sha256, retry).await {
                    Ok(t) => t,
                    Err(e) => {
                        send(&mut w, Event::from_error(&e)).await;
                        return;
                    }
                };
                let finished = t.finished();
                tokio::pin!(finished);
                let mut tick = tokio::time::interval(PROGRESS_EVERY);
                loop {
                    tokio::select! {
                        p = &mut finished => {
                            let e = match p {
                                Phase::Seeding(entry) => Event::Done { path: entry.launch_path, dir: entry.dir },
                                Phase::Failed { kind, message } => Event::Error { kind, message },
                                other => Event::from_error(&PeerError::Agent(format!("download ended as {other:?}"))),
                            };
                            send(&mut w, e).await;
                            return;
                        }
                        _ = shutdown.cancelled() => {
                            send(&mut w, Event::from_error(&PeerError::Agent("the agent is shutting down".into()))).await;
                            return;
                        }
                        _ = tick.tick() => {
                            // A client that went away stops the stream, not the download.
                            if !send(&mut w, Event::Progress { status: Box::new(t.status()) }).await {
                                return;
                            }
                        }
                    }
                }
            }
        }
    }

    async fn start_fetch(
        &self,
        name: &str,
        sha256: &str,
        tracker_retry: Option<Duration>,
    ) -> Result<Arc<Torrent>> {
        let name = PackageName::new(name).map_err(|e| PeerError::BadInput(e.to_string()))?;
        let sha = Sha256Hash::from_hex(sha256).map_err(|e| PeerError::BadInput(e.to_string()))?;
        let (c, n) = (self.engine.cache().clone(), name.clone());
        let cached = tokio::task::spawn_blocking(move || c.lookup_checked(&n, &sha))
            .await
            .map_err(|e| PeerError::Agent(format!("cache lookup task: {e}")))??;
        if let Some(entry) = cached {
            let path = entry.dir.join(crate::cache::METAINFO_FILE);
            let meta = crate::cache::read_own(&path, crate::cache::METAINFO_CAP)
                .ok()
                .and_then(|b| Metainfo::parse(&b).ok());
            if let Some(m) = meta {
                return self.engine.seed(name, Arc::new(m), &entry.dir);
            }
        }
        if let Some(t) = self.engine.find(&name, &sha) {
            match t.current_phase() {
                Phase::Failed { .. } => {}
                // Seeding an entry the cache no longer holds: a `get` found it changed on disk
                // and quarantined it (or it was removed behind the agent's back). Answering
                // with it would hand out a path that is gone: stop seeding it, fetch again.
                Phase::Seeding(_) => {
                    tracing::warn!(package = %name, sha256 = %sha, "the cached copy this agent seeded is gone; fetching it again");
                    self.engine.remove(&t.meta.info_hash);
                }
                _ => {
                    // Someone needs it now: a prefetch's cap no longer applies.
                    t.set_download_limit(None);
                    return Ok(t);
                }
            }
        }
        // A partial download from a previous run (perhaps being re-hashed right now): its
        // metainfo is on disk, and the tracker may be away.
        if let Some(m) = self.engine.partial_metainfo(&name, &sha) {
            self.make_room(&name, &m).await?;
            return self.engine.download(name, Arc::new(m)).await;
        }
        let tracker = match tracker_retry {
            Some(d) => self.engine.tracker().clone().with_retry(d),
            None => self.engine.tracker().clone(),
        };
        let meta = tracker.metainfo(&name, &sha).await?;
        // The size is known now, before a byte is downloaded: a package that cannot fit fails
        // here and leaves the cache as it was.
        self.make_room(&name, &meta).await?;
        self.engine.download(name, Arc::new(meta)).await
    }

    /// Stop seeding `name:sha256` and take it out of the cache: renamed out first, so no
    /// reader ever sees a half-removed entry, then removed.
    async fn forget(&self, name: &str, sha256: &str) -> Result<()> {
        let name = PackageName::new(name).map_err(|e| PeerError::BadInput(e.to_string()))?;
        let sha = Sha256Hash::from_hex(sha256).map_err(|e| PeerError::BadInput(e.to_string()))?;
        if let Some(t) = self.engine.find(&name, &sha) {
            self.engine.remove(&t.meta.info_hash);
        }
        let cache = self.engine.cache().clone();
        tokio::task::spawn_blocking(move || forget_cached(&cache, &name, &sha))
            .await
            .map_err(|e| PeerError::Agent(format!("forget task: {e}")))?
    }

    async fn add(
        &self,
        name: &str,
        metainfo_hex: &str,
        path: &Path,
        take: bool,
    ) -> Result<(PathBuf, PathBuf)> {
        let name = PackageName::new(name).map_err(|e| PeerError::BadInput(e.to_string()))?;
        let bytes = hex::decode(metainfo_hex)
            .map_err(|e| PeerError::BadInput(format!("metainfo hex: {e}")))?;
        let meta = Arc::new(Metainfo::parse(&bytes)?);
        if !path.is_absolute() {
            return Err(PeerError::BadInput("add needs an absolute path".into()));
        }
        let cache = self.engine.cache().clone();
        let (n, m, p) = (name.clone(), meta.clone(), path.to_owned());
        let handoff = if take { Handoff::Move } else { Handoff::Copy };
        let entry = tokio::task::spawn_blocking(move || {
            cache.install(&n, &m, &p, handoff, &Default::default())
        })
        .await
        .map_err(|e| PeerError::Agent(format!("install task: {e}")))??;
        self.engine.seed(name.clone(), meta.clone(), &entry.dir)?;
        self.engine.note_installed(name, meta.sha256);
        Ok((entry.launch_path, entry.dir))
    }

    /// `publish`: the user's file into the cache in one read, its metainfo built on the way,
    /// then seeded.
    async fn publish(
        &self,
        name: &str,
        path: &Path,
        (file_name, announce, format): (&str, &str, &str),
    ) -> Result<(CachedPackage, Arc<Metainfo>, bool)> {
        let name = PackageName::new(name).map_err(|e| PeerError::BadInput(e.to_string()))?;
        if !path.is_absolute() {
            return Err(PeerError::BadInput("publish needs an absolute path".into()));
        }
        let format = control::parse_format(format)?;
        let cache = self.engine.cache().clone();
        let (n, p) = (name.clone(), path.to_owned());
        let (file_name, announce) = (file_name.to_owned(), announce.to_owned());
        let (entry, meta, fresh) = tokio::task::spawn_blocking(move || {
            cache.install_file(&n, &p, (&file_name, &announce, format))
        })
        .await
        .map_err(|e| PeerError::Agent(format!("publish task: {e}")))??;
        let meta = Arc::new(meta);
        self.engine.seed(name.clone(), meta.clone(), &entry.dir)?;
        self.engine.note_installed(name, meta.sha256);
        Ok((entry, meta, fresh))
    }
}

/// Seed what the cache holds and resume partial downloads, after the control socket is up.
///
/// Every entry's seal is checked first (a stat and a small read each); one whose seal is
/// broken is read in full, and seeded only if intact, else quarantined. Entries are also
/// checked piece by piece the first time each piece is served (see the engine), which catches
/// what a seal cannot: bit rot under an unchanged size and mtime.
async fn restore(engine: &Engine, cache: &Cache) {
    let c = cache.clone();
    let entries = tokio::task::spawn_blocking(move || {
        c.entries()
            .into_iter()
            .filter(|(name, meta, _)| match c.lookup_checked(name, &meta.sha256) {
                Ok(Some(_)) => true,
                Ok(None) => {
                    tracing::error!(package = %name, sha256 = %meta.sha256, "cache entry changed on disk: quarantined, not seeded");
                    false
                }
                Err(e) => {
                    tracing::error!(package = %name, sha256 = %meta.sha256, error = %e, "cannot check cache entry; not seeded");
                    false
                }
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    let mut seeded = 0;
    for (name, meta, dir) in entries {
        match engine.seed(name.clone(), Arc::new(meta), &dir) {
            Ok(_) => seeded += 1,
            Err(e) => tracing::warn!(package = %name, error = %e, "cannot seed cache entry"),
        }
    }
    let mut resumed = 0;
    for (name, r) in engine.resume_all().await {
        match r {
            Ok(_) => resumed += 1,
            Err(e) => tracing::warn!(package = %name, error = %e, "cannot resume download"),
        }
    }
    tracing::info!(
        seeding = seeded,
        resumed,
        "cache seeded and partial downloads resumed"
    );
}

/// Take `name:sha256` out of the cache unless a running program holds it or it is pinned
/// (an eviction's claim and check): a refused publish, or a `Forget`, must not remove a tree
/// under a program that runs from it. Absent already (quarantined) is done.
pub(crate) fn forget_cached(cache: &Cache, name: &PackageName, sha: &Sha256Hash) -> Result<()> {
    if cache.lookup(name, sha).is_none() {
        return Ok(());
    }
    if cache.evict(name, sha, || {})? {
        Ok(())
    } else {
        Err(PeerError::Agent(format!(
            "{name}:{sha} stays in the cache: a running program holds it, or it is pinned"
        )))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A client that stops reading is taken for gone at the answer deadline, instead of
    /// holding its connection (and a slot of the 256) for as long as it likes.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_is_given_up() {
        let (mut ours, mut theirs) = tokio::io::duplex(64);
        let event = || Event::Metrics {
            text: "x".repeat(1000),
        };
        let reader = tokio::spawn(async move {
            let mut first = vec![0; 1010];
            tokio::io::AsyncReadExt::read_exact(&mut theirs, &mut first)
                .await
                .unwrap();
            theirs // kept open, never read again
        });
        assert!(
            send(&mut ours, event()).await,
            "read while the client reads"
        );
        let _theirs = reader.await.unwrap();
        let start = tokio::time::Instant::now();
        let sent = tokio::time::timeout(ANSWER_DEADLINE * 2, send(&mut ours, event())).await;
        assert_eq!(sent, Ok(false), "given up, not waiting on");
        assert_eq!(start.elapsed(), ANSWER_DEADLINE);
    }
}
