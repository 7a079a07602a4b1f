//! The swarm engine: BitTorrent v1 (BEP 3, with the fast extension BEP 6) for package archives.
//!
//! One listener for all torrents; per torrent an announcer, a dialler and one task per peer
//! connection; per completed piece a verification task; per completed download a hand-off to
//! the launcher cache. Piece choice is in [`picker`], super-seeding in [`superseed`]; the
//! states and the lock discipline are in `STATE.md` next to this file.

mod announce;
mod hashing;
mod peer;
pub mod picker;
pub mod ratelimit;
pub mod superseed;
mod torrent;
mod writer;
pub mod zstream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::BytesMut;
use fbpkg_common::bitfield::Bitfield;
use fbpkg_common::metainfo::{Format, Metainfo};
use fbpkg_common::pkgref::PackageName;
use fbpkg_common::tracker_proto::Zone;
use fbpkg_common::wire::Handshake;
use fbpkg_common::{InfoHash, PeerId, Sha256Hash};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use torrent::{Phase, Torrent, TorrentStatus};

use crate::archive::ExtractLimits;
use crate::cache::Cache;
use crate::error::{PeerError, Result};
use crate::storage::{self, PackageData};
use crate::tracker_client::TrackerClient;
use torrent::{Cmd, TorrentInit};

/// Engine settings; defaults are what `fbpkg-rs agent` uses.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EngineConfig {
    /// Where peers connect (default 127.0.0.1:6881; port 0 picks one).
    pub listen: SocketAddr,
    /// This host's zone, for locality-aware peer lists.
    pub zone: Option<Zone>,
    /// Connections per package (default 50).
    pub max_peers: usize,
    /// Connections per package from one IP address (default 16: one host runs one agent,
    /// and loopback test fleets run a few).
    pub max_peers_per_address: usize,
    /// Peer connections open at once across all packages, handshakes included (default
    /// 1024); past it the listener stops accepting until one closes.
    pub max_connections: usize,
    /// A new connection cannot be evicted for this long (default 10 s): time to handshake,
    /// trade bitfields and start delivering.
    pub eviction_grace: Duration,
    /// A connection that moved no piece data either way for this long may be evicted when the
    /// package is at `max_peers` and someone else wants in (default 15 s).
    pub useless_after: Duration,
    /// A connection whose queued output has not moved for this long is dropped (default
    /// 30 s): the peer stopped reading.
    pub write_stall: Duration,
    /// Most peers uploaded to at once (default 32): the host's, shared by the packages busy
    /// uploading at once (see `upload_slot_rate`).
    pub upload_slots: usize,
    /// Upload rate each slot should get (default 64 KiB/s): while a package uploads, it keeps
    /// one slot per this much of its measured upload rate, between `min_upload_slots` and
    /// its share of `upload_slots` (their number over the packages busy uploading at once,
    /// never under `min_upload_slots`). `None` keeps `upload_slots` open per package,
    /// whatever the rate.
    pub upload_slot_rate: Option<u64>,
    /// Fewest upload slots a package sized by its rate keeps, and its least share of
    /// `upload_slots` (default [`MIN_UPLOAD_SLOTS`]; `upload_slots` if that is fewer).
    pub min_upload_slots: usize,
    /// While peers wait for an upload slot, a slot held this long goes to one of them
    /// (default 5 s).
    pub slot_rotation: Duration,
    /// Peers asked for per announce (default 50).
    pub numwant: u32,
    /// A request unanswered this long is given to someone else (default 20 s).
    pub request_timeout: Duration,
    /// Dial timeout (default 5 s).
    pub connect_timeout: Duration,
    /// Handshake timeout (default 10 s).
    pub handshake_timeout: Duration,
    /// Longest wait between announce retries while the tracker is down (default 60 s).
    pub max_announce_backoff: Duration,
    /// Requests in flight per peer cover this much time at its measured rate (default 0.5 s),
    /// or twice the time the peer takes to answer a request that is next in line, if longer.
    pub request_window: Duration,
    /// ... but never more than this much time (default 2 s): a peer that pauses for long
    /// gets a deep queue, not requests that wait until they time out.
    pub max_request_window: Duration,
    /// Fewest requests in flight per peer (default 4).
    pub min_queue_depth: usize,
    /// Most requests in flight per peer (default 512: what an agent accepts queued; 50 MB/s
    /// over 500 ms batches would need 1,500). A stock client gets at most 250, BEP 10's
    /// default `reqq`, since we do not read the one in its extended handshake.
    pub max_queue_depth: usize,
    /// Ration pieces when seeding from the cache to a crowd (default on).
    pub superseed: bool,
    /// Cap on upload bytes per second across all packages (default none).
    pub max_upload_rate: Option<u64>,
    /// An origin stops serving a package once it has sent this many copies of it and every
    /// piece can be had from another connected peer (default none: it keeps helping, which
    /// is fastest when leechers' uplinks are the bottleneck).
    pub origin_budget: Option<f64>,
    /// Where partial downloads live.
    pub work_dir: PathBuf,
    /// Bounds on directory packages' extraction.
    #[serde(skip)]
    pub extract_limits: ExtractLimits,
}

impl EngineConfig {
    /// Defaults with partial downloads under `work_dir`.
    pub fn new(work_dir: PathBuf) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 6881)),
            zone: None,
            max_peers: 50,
            max_peers_per_address: 16,
            max_connections: 1024,
            eviction_grace: Duration::from_secs(10),
            useless_after: Duration::from_secs(15),
            write_stall: Duration::from_secs(30),
            upload_slots: 32,
            upload_slot_rate: Some(64 << 10),
            min_upload_slots: MIN_UPLOAD_SLOTS,
            slot_rotation: Duration::from_secs(5),
            numwant: 50,
            request_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            max_announce_backoff: Duration::from_secs(60),
            request_window: Duration::from_millis(500),
            max_request_window: Duration::from_secs(2),
            min_queue_depth: 4,
            max_queue_depth: 512,
            superseed: true,
            max_upload_rate: None,
            origin_budget: None,
            work_dir,
            extract_limits: ExtractLimits::default(),
        }
    }
}

/// What every torrent shares.
#[derive(Debug)]
pub(crate) struct EngineCtx {
    pub config: EngineConfig,
    pub peer_id: PeerId,
    pub listen_addr: SocketAddr,
    pub tracker: TrackerClient,
    pub cache: Cache,
    pub tasks: TaskTracker,
    pub upload_limit: Option<ratelimit::RateLimiter>,
    /// One permit per open peer connection (incoming or dialled), handshakes included.
    pub conn_slots: Arc<tokio::sync::Semaphore>,
    /// Cache entries found corrupt while serving them: the engine quarantines and refetches.
    pub corrupt: tokio::sync::mpsc::UnboundedSender<(PackageName, Arc<Metainfo>)>,
    /// Versions just installed in the cache, for the agent's budget sweep.
    pub installed: tokio::sync::broadcast::Sender<(PackageName, Sha256Hash)>,
    /// Packages busy uploading now, which share the host's upload slots.
    pub uploading: torrent::Uploading,
}

/// The engine: all torrents of one agent (or of one `get` without an agent).
#[derive(Debug)]
pub struct Engine {
    ctx: Arc<EngineCtx>,
    torrents: RwLock<HashMap<InfoHash, Arc<Torrent>>>,
    /// Incoming connections whose handshake has not come yet, per address.
    half_open: HalfOpen,
    /// One gate per info-hash whose download is being set up: whoever takes it first creates
    /// the torrent; everyone else waits on it and then subscribes to that torrent.
    setting_up: std::sync::Mutex<HashMap<InfoHash, Arc<tokio::sync::Mutex<()>>>>,
    cancel: CancellationToken,
}

/// Incoming connections from one address that may wait for their handshake at once. Each
/// holds one of `max_connections` until its handshake or `handshake_timeout`: without a cap,
/// one host that opened connections and sent nothing (again at every timeout) held them all,
/// and the agent neither accepted nor dialled anyone for any package. An agent's handshake
/// follows its connect at once, so a few per address are plenty even for many packages.
pub const HALF_OPEN_PER_ADDRESS: u32 = 8;

/// Counts of incoming connections waiting for their handshake, per address.
#[derive(Debug, Default)]
struct HalfOpen(std::sync::Mutex<HashMap<std::net::IpAddr, u32>>);

impl HalfOpen {
    /// Count one more from `ip`, unless it has [`HALF_OPEN_PER_ADDRESS`] already.
    fn enter(&self, ip: std::net::IpAddr) -> Option<HalfOpenGuard<'_>> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_default();
        if *n >= HALF_OPEN_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(HalfOpenGuard { of: self, ip })
    }
}

/// One connection counted in [`HalfOpen`] until dropped.
struct HalfOpenGuard<'a> {
    of: &'a HalfOpen,
    ip: std::net::IpAddr,
}

impl Drop for HalfOpenGuard<'_> {
    fn drop(&mut self) {
        let mut m = self.of.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Installs kept for a slow [`Engine::installs`] subscriber.
const INSTALLED_BACKLOG: usize = 64;

/// Fewest upload slots a package sized by its rate keeps (or `upload_slots`, if fewer): the
/// default of `min_upload_slots`.
///
/// Why not fewer: a floor of 4 let a thin uplink's slots follow its rate further down (4
/// flows at ~39 KB/s rather than 8 at ~19 KB/s on a 1.25 Mbit/s uplink), and in `b3` at a
/// quarter of the rates the thin-uplink hosts finished 4-6 s sooner on average but the others
/// 8-9 s later, and at full rates `b3` was ~2% slower (`benches/FINDINGS.md`, `b3`). With
/// 128 KiB/s per slot, a floor of 4 met B4's target at a quarter of the rates but made
/// `b1-48` 0.5 s slower in three pairs of three; with today's slot order and origin it no
/// longer moves `b4` (five pairs at `6110999`'s agent).
pub const MIN_UPLOAD_SLOTS: usize = 8;

/// Azureus-style client tag at the start of our peer ids.
pub(crate) const PEER_ID_PREFIX: &[u8] = b"-FB";

/// Whether `id` is one of our own agents' (they start with [`PEER_ID_PREFIX`]). Such a peer
/// shares our compression dictionary, keeps 512 of our requests queued, is rationed by a
/// super-seeding origin, takes a late `have-all`, and is not told of pieces it holds.
pub(crate) fn is_ours(id: &PeerId) -> bool {
    id.0.starts_with(PEER_ID_PREFIX)
}

fn new_peer_id() -> PeerId {
    let mut id = [0u8; 20];
    id[..8].copy_from_slice(b"-FB0100-");
    for b in &mut id[8..] {
        *b = rand::random();
    }
    PeerId(id)
}

impl Engine {
    /// Bind the listener and start accepting peers.
    pub async fn start(
        config: EngineConfig,
        tracker: TrackerClient,
        cache: Cache,
        cancel: CancellationToken,
    ) -> Result<Arc<Self>> {
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(PeerError::io(
                "cannot listen for peers on",
                config.listen.to_string(),
            ))?;
        let listen_addr = listener
            .local_addr()
            .map_err(PeerError::io("listener address", ""))?;
        std::fs::create_dir_all(&config.work_dir)
            .map_err(PeerError::io("creating", &config.work_dir))?;
        let upload_limit = config.max_upload_rate.map(ratelimit::RateLimiter::new);
        let conn_slots = Arc::new(tokio::sync::Semaphore::new(config.max_connections.max(1)));
        let (corrupt, corrupt_rx) = tokio::sync::mpsc::unbounded_channel();
        let ctx = Arc::new(EngineCtx {
            conn_slots,
            corrupt,
            installed: tokio::sync::broadcast::channel(INSTALLED_BACKLOG).0,
            uploading: torrent::Uploading::default(),
            config,
            peer_id: new_peer_id(),
            listen_addr,
            tracker,
            cache,
            tasks: TaskTracker::new(),
            upload_limit,
        });
        let engine = Arc::new(Self {
            ctx: ctx.clone(),
            torrents: RwLock::new(HashMap::new()),
            half_open: HalfOpen::default(),
            setting_up: std::sync::Mutex::new(HashMap::new()),
            cancel: cancel.clone(),
        });
        let e = engine.clone();
        ctx.tasks.spawn(
            async move { e.accept_loop(listener).await }
                .instrument(tracing::info_span!("listener", addr = %listen_addr)),
        );
        let e = engine.clone();
        ctx.tasks.spawn(
            async move { e.repair_loop(corrupt_rx).await }
                .instrument(tracing::info_span!("repair")),
        );
        tracing::info!(addr = %listen_addr, peer_id = %String::from_utf8_lossy(&ctx.peer_id.0[..8]), "engine listening for peers");
        Ok(engine)
    }

    /// Where peers connect.
    pub fn listen_addr(&self) -> SocketAddr {
        self.ctx.listen_addr
    }

    /// The settings it runs with.
    pub fn config(&self) -> &EngineConfig {
        &self.ctx.config
    }

    /// The launcher cache.
    pub fn cache(&self) -> &Cache {
        &self.ctx.cache
    }

    /// Every version installed in the cache from now on (downloads, and those the agent adds
    /// through [`Engine::note_installed`]). A receiver that lags loses the oldest, which is
    /// fine for a sweep: it looks at the whole cache anyway.
    pub fn installs(&self) -> tokio::sync::broadcast::Receiver<(PackageName, Sha256Hash)> {
        self.ctx.installed.subscribe()
    }

    /// Tell [`Engine::installs`] subscribers that `name:sha256` was installed by someone else
    /// (e.g. the agent's `add`).
    pub fn note_installed(&self, name: PackageName, sha256: Sha256Hash) {
        let _ = self.ctx.installed.send((name, sha256));
    }

    /// The tracker client.
    pub fn tracker(&self) -> &TrackerClient {
        &self.ctx.tracker
    }

    /// A torrent by info-hash.
    pub fn torrent(&self, ih: &InfoHash) -> Option<Arc<Torrent>> {
        self.torrents
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(ih)
            .cloned()
    }

    /// The torrent of `name:sha256`, whatever its phase, if the engine has one.
    pub fn find(&self, name: &PackageName, sha256: &Sha256Hash) -> Option<Arc<Torrent>> {
        self.torrents
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .find(|t| t.name == *name && t.meta.sha256 == *sha256)
            .cloned()
    }

    /// The metainfo of a partial download of `name:sha256` a previous run left on disk, so
    /// it can be resumed without asking the tracker.
    pub fn partial_metainfo(&self, name: &PackageName, sha256: &Sha256Hash) -> Option<Metainfo> {
        std::fs::read_dir(&self.ctx.config.work_dir)
            .ok()?
            .flatten()
            .find_map(|e| {
                let dir = e.path();
                let package = std::fs::read_to_string(dir.join("package")).ok()?;
                if package.trim() != name.as_str() {
                    return None;
                }
                let m = Metainfo::parse(&std::fs::read(dir.join("metainfo.torrent")).ok()?).ok()?;
                (m.sha256 == *sha256 && e.file_name().to_str() == Some(&m.info_hash.to_hex()))
                    .then_some(m)
            })
    }

    /// Status of every torrent.
    pub fn status(&self) -> Vec<TorrentStatus> {
        let mut v: Vec<TorrentStatus> = self
            .torrents
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|t| t.status())
            .collect();
        v.sort_by(|a, b| (&a.name, &a.sha256).cmp(&(&b.name, &b.sha256)));
        v
    }

    fn work_dir_for(&self, ih: &InfoHash) -> PathBuf {
        self.ctx.config.work_dir.join(ih.to_hex())
    }

    /// Seed a package that is already in the cache, in the entry directory `entry`.
    pub fn seed(
        &self,
        name: PackageName,
        meta: Arc<Metainfo>,
        entry: &Path,
    ) -> Result<Arc<Torrent>> {
        if let Some(t) = self.torrent(&meta.info_hash) {
            return Ok(t);
        }
        let storage = PackageData::open_complete(entry, &meta)
            .map_err(PeerError::io("opening for seeding", entry))?;
        let entry = self.ctx.cache.lookup(&name, &meta.sha256).ok_or_else(|| {
            PeerError::NotFound(format!("{name}:{} is not in the cache", meta.sha256))
        })?;
        let have = Bitfield::full(meta.num_pieces());
        Ok(self.insert(TorrentInit {
            name,
            meta,
            storage,
            have,
            phase: Phase::Seeding(entry),
            work_dir: None,
            known: Vec::new(),
        }))
    }

    /// Download a package (resuming what a previous run left on disk), then seed it.
    ///
    /// Concurrent calls for one info-hash get the same torrent: the first creates it, under a
    /// gate taken before its first `await`; the others wait for the gate and find it. (Two
    /// owners would write one partial download, and the loser would keep writing into the file
    /// after the winner renamed it into the cache.)
    pub async fn download(&self, name: PackageName, meta: Arc<Metainfo>) -> Result<Arc<Torrent>> {
        let ih = meta.info_hash;
        let gate = self
            .setting_up
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(ih)
            .or_default()
            .clone();
        let result = {
            let _owner = gate.lock().await;
            self.download_gated(name, meta).await
        };
        let mut setting_up = self.setting_up.lock().unwrap_or_else(|p| p.into_inner());
        // Ours and the map's: nobody else waits on this gate, so it can go.
        if Arc::strong_count(&gate) == 2 {
            setting_up.remove(&ih);
        }
        result
    }

    async fn download_gated(&self, name: PackageName, meta: Arc<Metainfo>) -> Result<Arc<Torrent>> {
        if let Some(t) = self.torrent(&meta.info_hash) {
            if !matches!(t.current_phase(), Phase::Failed { .. }) {
                return Ok(t);
            }
            self.remove(&meta.info_hash);
        }
        let (cache, n, sha) = (self.ctx.cache.clone(), name.clone(), meta.sha256);
        let cached = tokio::task::spawn_blocking(move || cache.lookup_checked(&n, &sha))
            .await
            .map_err(|e| PeerError::Agent(format!("cache lookup task: {e}")))??;
        if let Some(entry) = cached {
            return self.seed(name, meta, &entry.dir);
        }
        let dir = self.work_dir_for(&meta.info_hash);
        let (m, d, n) = (meta.clone(), dir.clone(), name.clone());
        let cache = self.ctx.cache.clone();
        // Disk work off the reactor: re-hashing a large partial file takes seconds.
        let (storage, have, known) = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&d).map_err(PeerError::io("creating", &d))?;
            let meta_path = d.join("metainfo.torrent");
            std::fs::write(&meta_path, m.as_bytes())
                .map_err(PeerError::io("writing", &meta_path))?;
            std::fs::write(d.join("package"), n.as_str()).map_err(PeerError::io("writing", &d))?;
            let tree = d.join(storage::TREE_DIR);
            let mut r = crate::cache::Reused::default();
            if m.format == Format::Tree && !tree.exists() {
                r = cache.reuse_into(&n, &m, &tree);
                if r.files() > 0 {
                    tracing::info!(package = %n, files = r.files(), linked = r.linked, bytes = r.bytes, trusted_pieces = r.trusted.len(), "starting from files of cached versions");
                }
            }
            let (storage, have) = resume(&d, &m, &r.trusted)?;
            // How each file reused whole is now that its pieces were read (or trusted): install
            // reads again any that changed after this, and a trusted one whose bytes moved
            // since its seal's stamp (written between the link and now).
            let known: Vec<_> = whole_files(&m, &have, r.files_at)
                .into_iter()
                .filter_map(|at| {
                    let f = m.files.get(at)?;
                    let now = crate::cache::Unchanged::of(&storage::join(&tree, &f.path)).ok()?;
                    let moved = r
                        .trusted_files
                        .binary_search_by_key(&at, |&(i, _)| i)
                        .is_ok_and(|k| !now.same_bytes_as(&r.trusted_files[k].1));
                    (!moved).then_some((at, now))
                })
                .collect();
            Ok::<_, PeerError>((storage, have, known))
        })
        .await
        .map_err(|e| PeerError::Agent(format!("resume task: {e}")))??;
        if have.count() > 0 {
            tracing::info!(package = %name, pieces = have.count(), of = have.len(), "resuming: pieces on disk verified");
        }
        let complete = have.is_complete();
        let t = self.insert(TorrentInit {
            name,
            meta,
            storage,
            have,
            phase: Phase::Downloading,
            work_dir: Some(dir),
            known,
        });
        if complete {
            spawn_finish(t.clone());
        }
        Ok(t)
    }

    fn insert(&self, init: TorrentInit) -> Arc<Torrent> {
        let ih = init.meta.info_hash;
        let t = Torrent::new(self.ctx.clone(), init, self.cancel.child_token());
        self.torrents
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ih, t.clone());
        let span = tracing::info_span!("torrent", package = %t.name, info_hash = %ih);
        self.ctx
            .tasks
            .spawn(announce::run(t.clone(), announce::Tier::Ours).instrument(span.clone()));
        for tier in announce::listed_tiers(&t) {
            self.ctx
                .tasks
                .spawn(announce::run(t.clone(), tier).instrument(span.clone()));
        }
        self.ctx.tasks.spawn(dial_loop(t.clone()).instrument(span));
        t
    }

    /// Stop and forget a torrent (its cache entry, if any, stays).
    pub fn remove(&self, ih: &InfoHash) {
        if let Some(t) = self
            .torrents
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(ih)
        {
            t.cancel.cancel();
        }
    }

    /// Resume every partial download left under the work directory by a previous run.
    pub async fn resume_all(&self) -> Vec<(PackageName, Result<Arc<Torrent>>)> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(&self.ctx.config.work_dir) else {
            return out;
        };
        for e in rd.flatten() {
            let dir = e.path();
            let meta = std::fs::read(dir.join("metainfo.torrent"))
                .ok()
                .and_then(|b| Metainfo::parse(&b).ok());
            let name = std::fs::read_to_string(dir.join("package"))
                .ok()
                .and_then(|n| PackageName::new(n.trim()).ok());
            match (meta, name) {
                (Some(m), Some(n)) if e.file_name().to_str() == Some(&m.info_hash.to_hex()) => {
                    let r = self.download(n.clone(), Arc::new(m)).await;
                    out.push((n, r));
                }
                _ => {
                    tracing::warn!(dir = %dir.display(), "unreadable partial download; removed");
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
        }
        out
    }

    /// Stop everything: announce `stopped`, close connections, wait for tasks (bounded).
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        self.ctx.tasks.close();
        if tokio::time::timeout(Duration::from_secs(5), self.ctx.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("engine tasks did not stop within 5 s");
        }
    }

    /// Take cache entries found corrupt out of service: stop seeding, move the entry out of
    /// the cache (so `get` never prints its path again), and fetch the package anew.
    async fn repair_loop(
        self: Arc<Self>,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<(PackageName, Arc<Metainfo>)>,
    ) {
        loop {
            let (name, meta) = tokio::select! {
                _ = self.cancel.cancelled() => return,
                m = rx.recv() => match m {
                    Some(m) => m,
                    None => return,
                },
            };
            self.remove(&meta.info_hash);
            let cache = self.ctx.cache.clone();
            let (n, sha) = (name.clone(), meta.sha256);
            let moved = tokio::task::spawn_blocking(move || cache.quarantine(&n, &sha))
                .await
                .unwrap_or_else(|e| Err(PeerError::Agent(format!("quarantine task: {e}"))));
            match moved {
                Ok(to) => {
                    tracing::error!(package = %name, sha256 = %meta.sha256, quarantined = %to.display(), "cache entry is corrupt: quarantined; fetching it again");
                }
                Err(e) => {
                    tracing::error!(package = %name, sha256 = %meta.sha256, error = %e, "cache entry is corrupt and cannot be moved out of the cache; not serving it");
                    continue;
                }
            }
            if let Err(e) = self.download(name.clone(), meta).await {
                tracing::warn!(package = %name, error = %e, "cannot fetch a quarantined package again");
            }
        }
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        loop {
            // At the connection cap, stop accepting: newcomers wait in the backlog.
            let permit = tokio::select! {
                _ = self.cancel.cancelled() => return,
                p = self.ctx.conn_slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let accepted = tokio::select! {
                _ = self.cancel.cancelled() => return,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, addr)) => {
                    let e = self.clone();
                    self.ctx.tasks.spawn(
                        async move {
                            e.incoming(stream, addr).await;
                            drop(permit);
                        }
                        .instrument(tracing::debug_span!("incoming", peer = %addr)),
                    );
                }
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn incoming(&self, mut stream: TcpStream, addr: SocketAddr) {
        let Some(waiting) = self.half_open.enter(addr.ip().to_canonical()) else {
            tracing::debug!(peer = %addr, "too many connections from one address waiting for their handshake");
            return;
        };
        let timeout = self.ctx.config.handshake_timeout;
        let mut buf = BytesMut::with_capacity(1024);
        let theirs =
            match tokio::time::timeout(timeout, read_handshake(&mut stream, &mut buf)).await {
                Ok(Ok(h)) => h,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %addr, error = %e, "bad incoming handshake");
                    return;
                }
                Err(_) => return,
            };
        drop(waiting);
        let Some(t) = self.torrent(&theirs.info_hash) else {
            tracing::debug!(peer = %addr, info_hash = %theirs.info_hash, "handshake for a package we do not have");
            return;
        };
        if theirs.peer_id == self.ctx.peer_id {
            return;
        }
        let mut out = BytesMut::new();
        Handshake::new(t.meta.info_hash, self.ctx.peer_id).encode(&mut out);
        if stream.write_all(&out).await.is_err() {
            return;
        }
        peer::run(t, stream, theirs, addr, false, buf).await;
    }
}

async fn read_handshake(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<Handshake> {
    loop {
        if let Some(h) = Handshake::decode(buf)? {
            return Ok(h);
        }
        let n = stream
            .read_buf(buf)
            .await
            .map_err(PeerError::io("reading handshake", ""))?;
        if n == 0 {
            return Err(PeerError::Agent(
                "connection closed during handshake".into(),
            ));
        }
    }
}

/// Dial known peers while there is room, and rotate upload slots, until the torrent stops.
async fn dial_loop(t: Arc<Torrent>) {
    loop {
        for addr in t.dial_list() {
            let t2 = t.clone();
            let Ok(permit) = t.ctx.conn_slots.clone().try_acquire_owned() else {
                // At the connection cap: try again when a connection ends.
                t.dial_done(addr, true);
                continue;
            };
            t.ctx.tasks.spawn(
                async move {
                    let _permit = permit;
                    let dialled = dial(&t2, addr).await;
                    t2.dial_done(addr, dialled.is_some());
                    if let Some((stream, theirs, buf)) = dialled {
                        let s = peer::run(t2.clone(), stream, theirs, addr, true, buf).await;
                        t2.session_ended(addr, s);
                    }
                }
                .instrument(tracing::debug_span!("dial", peer = %addr)),
            );
        }
        t.size_slots();
        t.rotate_slots(t.ctx.config.slot_rotation);
        tokio::select! {
            _ = t.cancel.cancelled() => return,
            _ = t.want_peers.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// Connect and exchange handshakes; `None` when the peer cannot be reached or is not who the
/// tracker said.
async fn dial(t: &Torrent, addr: SocketAddr) -> Option<(TcpStream, Handshake, BytesMut)> {
    let cfg = &t.ctx.config;
    let connect = tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(addr)).await;
    let Ok(Ok(mut stream)) = connect else {
        tracing::debug!(peer = %addr, "dial failed");
        return None;
    };
    let mut out = BytesMut::new();
    Handshake::new(t.meta.info_hash, t.ctx.peer_id).encode(&mut out);
    let mut buf = BytesMut::with_capacity(1024);
    let hs = async {
        stream
            .write_all(&out)
            .await
            .map_err(PeerError::io("writing handshake", ""))?;
        read_handshake(&mut stream, &mut buf).await
    };
    let theirs = match tokio::time::timeout(cfg.handshake_timeout, hs).await {
        Ok(Ok(h)) => h,
        _ => return None,
    };
    if theirs.info_hash != t.meta.info_hash || theirs.peer_id == t.ctx.peer_id {
        return None;
    }
    Some((stream, theirs, buf))
}

/// Verify every piece already in a partial download in the work directory `dir`, but the
/// `trusted` ones (in order: pieces of files reused from a cached version that verified them,
/// see `cache/reuse.rs`), which count as verified unread; missing or corrupt ones are fetched
/// again.
fn resume(dir: &Path, meta: &Metainfo, trusted: &[u32]) -> Result<(PackageData, Bitfield)> {
    let existed = dir.join(storage::PART_FILE).exists() || dir.join(storage::TREE_DIR).exists();
    let storage = PackageData::open_partial(dir, meta)
        .map_err(PeerError::io("opening a download in", dir))?;
    let part = storage.path().to_owned();
    let mut have = Bitfield::new(meta.num_pieces());
    if existed {
        for i in 0..meta.num_pieces() {
            if trusted.binary_search(&i).is_ok() {
                have.set(i);
                continue;
            }
            let h = storage
                .sha1_of(meta.piece_offset(i), u64::from(meta.piece_size(i)))
                .map_err(PeerError::io("verifying", &part))?;
            if h == meta.pieces[i as usize] {
                have.set(i);
            }
        }
    }
    Ok((storage, have))
}

/// Of the files at `candidates` (indices in `meta.files`, in order), those whose every piece
/// is in `have`: no byte of them is written again by this download.
fn whole_files(meta: &Metainfo, have: &Bitfield, candidates: Vec<usize>) -> Vec<usize> {
    if candidates.is_empty() {
        return candidates;
    }
    let starts = storage::file_starts(meta);
    candidates
        .into_iter()
        .filter(|&at| {
            let (Some(&start), Some(f)) = (starts.get(at), meta.files.get(at)) else {
                return false;
            };
            if f.length == 0 {
                return true;
            }
            let first = start / meta.piece_length;
            let last = (start + f.length - 1) / meta.piece_length;
            (first..=last).all(|i| u32::try_from(i).is_ok_and(|i| have.get(i)))
        })
        .collect()
}

/// What reading a piece back says about it.
#[derive(Debug)]
enum PieceVerdict {
    /// Its SHA-1 matches.
    Good,
    /// The bytes do not match: whoever sent them is to blame.
    Corrupt,
    /// It could not be read back: our disk's fault, nobody else's.
    LocalError(std::io::Error),
}

fn piece_verdict(hashed: std::io::Result<[u8; 20]>, expected: &[u8; 20]) -> PieceVerdict {
    match hashed {
        Ok(h) if h == *expected => PieceVerdict::Good,
        Ok(_) => PieceVerdict::Corrupt,
        Err(e) => PieceVerdict::LocalError(e),
    }
}

/// Check a completed piece against its SHA-1, then tell everyone or start it over.
pub(crate) fn spawn_verify(t: Arc<Torrent>, index: u32) {
    let tasks = t.ctx.tasks.clone();
    tasks.spawn(async move {
        let Some(storage) = t.storage() else {
            return; // failed meanwhile
        };
        let (offset, len) = (t.meta.piece_offset(index), u64::from(t.meta.piece_size(index)));
        let expected = t.meta.pieces[index as usize];
        let path = storage.path().to_owned();
        // What the blocks' writes hashed already is not read back (`hashing.rs`).
        let running = t.hashes.take(index);
        let hashed = tokio::task::spawn_blocking(move || match running {
            Some(r) if u64::from(r.next) <= len => {
                let done = u64::from(r.next);
                storage.sha1_from(r.sha, offset + done, len - done)
            }
            _ => storage.sha1_of(offset, len),
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        let ok = match piece_verdict(hashed, &expected) {
            PieceVerdict::Good => true,
            PieceVerdict::Corrupt => false,
            // Our disk, not the peer: fail the download with that error, ban nobody.
            PieceVerdict::LocalError(e) => {
                t.fail(
                    crate::ErrorKind::Io,
                    format!("cannot read back piece {index} from {}: {e}", path.display()),
                );
                return;
            }
        };
        let (sources, complete) = {
            let mut st = t.state();
            let sources = st.picker.verified(index, ok);
            (sources, st.picker.is_complete())
        };
        if ok {
            t.broadcast_have(index, complete);
            if complete {
                spawn_finish(t);
            } else {
                spawn_prefix(&t);
            }
        } else {
            tracing::warn!(package = %t.name, piece = index, "piece failed verification; fetching it again");
            t.blame(&sources);
            t.broadcast(Cmd::Refill);
        }
    });
}

/// Hash the archive on from the first piece it has not hashed, if that one is verified now:
/// one blocking task at a time (`hashing::ArchivePrefix`). Not for tree packages, whose files
/// are checked one by one at the install.
fn spawn_prefix(t: &Arc<Torrent>) {
    if t.meta.format == Format::Tree {
        return;
    }
    // Not once the torrent failed or went: its file handle (held here) would keep the
    // removed partial file's space in use until the task ended.
    let have = |t: &Torrent, i: u32| !t.cancel.is_cancelled() && t.state().picker.have().get(i);
    if !have(t, t.prefix.next()) || !t.prefix.claim() {
        return;
    }
    let Some(storage) = t.storage() else {
        return;
    };
    let t = t.clone();
    t.ctx.tasks.clone().spawn(async move {
        let pieces = t.meta.pieces.len() as u32;
        let advancing = tokio::task::spawn_blocking(move || {
            t.prefix.advance(
                pieces,
                |i| have(&t, i),
                |i, sha| {
                    let len = u64::from(t.meta.piece_size(i));
                    storage.hash_into(sha, t.meta.piece_offset(i), len)
                },
            );
        });
        let _ = advancing.await;
    });
}

/// Bytes of `meta`'s archive in its first `pieces` pieces.
fn prefix_bytes(meta: &Metainfo, pieces: u32) -> u64 {
    (u64::from(pieces) * meta.piece_length).min(meta.length)
}

/// Every piece verified: check the archive's SHA-256 and install it in the cache.
fn spawn_finish(t: Arc<Torrent>) {
    let tasks = t.ctx.tasks.clone();
    tasks.spawn(async move {
        t.set_phase(Phase::Verifying);
        let Some(storage) = t.storage() else {
            return; // failed meanwhile
        };
        let (cache, name, meta) = (t.ctx.cache.clone(), t.name.clone(), t.meta.clone());
        let limits = t.ctx.config.extract_limits;
        let part = storage.path().to_owned();
        let known = t.known.clone();
        let reused_whole = known.len();
        // How long the archive's SHA-256 check and the install took, apart from the download:
        // the bytes after the prefix hashed while downloading (`spawn_prefix`) read back and
        // hashed, on a host still serving its peers.
        let checking = tokio::time::Instant::now();
        let prefix_of = t.clone();
        // Hashed before the last piece: what the check does not wait for.
        let prehashed = prefix_bytes(&meta, t.prefix.next());
        let installed = tokio::task::spawn_blocking(move || {
            storage.sync().map_err(PeerError::io("fsync", storage.path()))?;
            // What was hashed while the rest downloaded (waits for a read under way).
            let (sha, pieces) = prefix_of.prefix.take();
            let prefix = Some((sha, prefix_bytes(&meta, pieces)));
            let entry = cache.install_reusing(&name, &meta, &part, &limits, &known, prefix)?;
            let seeding = PackageData::open_complete(&entry.dir, &meta).map_err(PeerError::io("reopening", &entry.dir))?;
            Ok::<_, PeerError>((entry, seeding))
        })
        .await
        .unwrap_or_else(|e| Err(PeerError::Agent(format!("install task: {e}"))));
        match installed {
            Ok((entry, seeding)) => {
                let check_secs = checking.elapsed().as_secs_f64();
                t.set_check(check_secs, prehashed);
                t.replace_storage(seeding);
                t.remove_work_dir();
                tracing::info!(package = %t.name, sha256 = %t.meta.sha256, path = %entry.launch_path.display(), reused_whole, downloaded = t.downloaded(), wasted = t.wasted(), secs = t.started.elapsed().as_secs_f64(), check_secs, prehashed, "verified and in the cache; seeding");
                t.set_phase(Phase::Seeding(entry));
                let _ = t.ctx.installed.send((t.name.clone(), t.meta.sha256));
            }
            Err(e) => {
                t.fail(e.kind(), e.to_string());
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tree download cut short keeps its verified pieces across a restart, padding
    /// included (it reads as the zeros it was hashed as), and nothing is taken on trust.
    #[test]
    fn a_tree_download_resumes_with_the_pieces_on_disk() {
        let contents: Vec<(&str, Vec<u8>)> = vec![
            ("a", b"small".to_vec()),
            ("big", (0..100_000u32).map(|i| (i % 249) as u8).collect()),
            ("z", b"tail".to_vec()),
        ];
        let files: Vec<(&str, &[u8])> = contents.iter().map(|(n, d)| (*n, &d[..])).collect();
        let meta = storage::flat_tree(&files);
        let dir = tempfile::tempdir().expect("temp dir");
        let (storage, have) = resume(dir.path(), &meta, &[]).expect("fresh download");
        assert_eq!(have.count(), 0);
        // The torrent's bytes: files at their offsets, zeros between.
        let mut torrent = Vec::new();
        for f in &meta.files {
            match contents.iter().find(|(n, _)| f.path == [*n]) {
                Some((_, d)) => torrent.extend_from_slice(d),
                None => torrent.resize(torrent.len() + f.length as usize, 0),
            }
        }
        let skipped = 2;
        for i in (0..meta.num_pieces()).filter(|&i| i != skipped) {
            let at = meta.piece_offset(i) as usize;
            let end = at + meta.piece_size(i) as usize;
            storage
                .write_at(at as u64, &torrent[at..end])
                .expect("write");
        }
        drop(storage);
        let (_, have) = resume(dir.path(), &meta, &[]).expect("resumed download");
        for i in 0..meta.num_pieces() {
            assert_eq!(have.get(i), i != skipped, "piece {i}");
        }
        // A trusted piece (of a file reused from a cached version) counts unread, whatever
        // is on disk: the missing one here.
        let (_, have) = resume(dir.path(), &meta, &[skipped]).expect("resumed download");
        assert!(have.is_complete());
    }

    /// Only reused files whose every piece verified skip the install's read: a piece that
    /// failed is fetched and written again, over any file it overlaps.
    #[test]
    fn reused_files_are_known_whole_only_when_all_their_pieces_verified() {
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 249) as u8).collect();
        let meta = storage::flat_tree(&[("a", b"small"), ("big", &big), ("z", b"tail")]);
        let at = |name: &str| {
            meta.files
                .iter()
                .position(|f| f.path == [name])
                .expect("file")
        };
        let (a, b, z) = (at("a"), at("big"), at("z"));
        let mut start = 0;
        let mut pieces_of = Vec::new();
        for f in &meta.files {
            if f.is_regular() {
                let first = start / meta.piece_length;
                pieces_of.push((first, (start + f.length - 1) / meta.piece_length));
            }
            start += f.length;
        }
        assert_eq!(
            pieces_of,
            vec![(0, 0), (1, 4), (5, 5)],
            "the layout this test assumes"
        );
        let all_but = |missing: Option<u32>| {
            let mut have = Bitfield::new(meta.num_pieces());
            for i in (0..meta.num_pieces()).filter(|&i| Some(i) != missing) {
                have.set(i);
            }
            have
        };
        let whole = |have: &Bitfield, candidates: Vec<usize>| whole_files(&meta, have, candidates);
        assert_eq!(whole(&all_but(None), vec![a, b, z]), vec![a, b, z]);
        assert_eq!(whole(&all_but(Some(3)), vec![a, b, z]), vec![a, z]);
        assert_eq!(whole(&all_but(Some(0)), vec![a, b, z]), vec![b, z]);
        assert_eq!(whole(&all_but(Some(5)), vec![b]), vec![b]);
        assert_eq!(whole(&all_but(None), vec![]), Vec::<usize>::new());
    }

    #[test]
    fn a_piece_we_cannot_read_back_is_our_fault_not_the_senders() {
        let expected = [7u8; 20];
        assert!(matches!(
            piece_verdict(Ok([7; 20]), &expected),
            PieceVerdict::Good
        ));
        assert!(matches!(
            piece_verdict(Ok([8; 20]), &expected),
            PieceVerdict::Corrupt
        ));
        let eio = std::io::Error::from_raw_os_error(5);
        assert!(matches!(
            piece_verdict(Err(eio), &expected),
            PieceVerdict::LocalError(_)
        ));
    }

    /// The 1 MiB test package (every byte 7) on disk, all but piece `hole` verified, with
    /// `flip` changed on disk after the pieces were verified.
    fn prefix_torrent(dir: &Path, hole: Option<u32>, flip: Option<u64>) -> Arc<Torrent> {
        let t = torrent::tests::torrent(dir, |n| {
            let mut have = Bitfield::full(n);
            if let Some(h) = hole {
                have.clear(h);
            }
            have
        });
        let storage = t.storage().expect("storage");
        let mut bytes = vec![7u8; t.meta.length as usize];
        if let Some(at) = flip {
            bytes[at as usize] = 8;
        }
        storage.write_at(0, &bytes).expect("write");
        t
    }

    /// Every task the torrent spawned has ended.
    async fn settle(t: &Torrent) {
        t.ctx.tasks.close();
        t.ctx.tasks.wait().await;
        t.ctx.tasks.reopen();
    }

    #[tokio::test]
    async fn the_archive_is_hashed_over_the_pieces_verified_in_a_row_and_the_install_reads_the_rest()
     {
        let dir = tempfile::tempdir().expect("temp dir");
        let t = prefix_torrent(dir.path(), Some(3), None);
        assert!(t.meta.pieces.len() > 4, "several pieces");
        spawn_prefix(&t);
        settle(&t).await;
        assert_eq!(t.prefix.next(), 3, "up to the missing piece");

        // Every piece verified (as `spawn_verify` would say): the task reads on, and the
        // install checks the rest of the file against the SHA-256.
        let dir = tempfile::tempdir().expect("temp dir");
        let t = prefix_torrent(dir.path(), None, None);
        spawn_prefix(&t);
        settle(&t).await;
        spawn_finish(t.clone());
        settle(&t).await;
        assert!(
            matches!(t.current_phase(), Phase::Seeding(_)),
            "{:?}",
            t.current_phase()
        );
        assert_eq!(t.status().prehashed, Some(t.meta.length));
    }

    #[tokio::test]
    async fn a_byte_changed_behind_the_prefix_fails_the_install() {
        let dir = tempfile::tempdir().expect("temp dir");
        // Pieces 0 and 1 hashed; the last byte is not what the metainfo says.
        let t = prefix_torrent(dir.path(), Some(2), Some((1 << 20) - 1));
        spawn_prefix(&t);
        settle(&t).await;
        assert_eq!(t.prefix.next(), 2);
        spawn_finish(t.clone());
        settle(&t).await;
        match t.current_phase() {
            Phase::Failed { message, .. } => assert!(message.contains("SHA-256"), "{message}"),
            other => panic!("installed a changed archive: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_cancelled_download_hashes_nothing_more() {
        let dir = tempfile::tempdir().expect("temp dir");
        let t = prefix_torrent(dir.path(), None, None);
        t.cancel.cancel();
        spawn_prefix(&t);
        settle(&t).await;
        assert_eq!(t.prefix.next(), 0);
    }
}
