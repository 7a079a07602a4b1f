//! One package being downloaded or seeded: shared state of all its peer connections.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use fbpkg_common::bitfield::Bitfield;
use fbpkg_common::metainfo::Metainfo;
use fbpkg_common::pkgref::PackageName;
use fbpkg_common::wire::BlockRef;
use fbpkg_common::{InfoHash, PeerId};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::EngineCtx;
use super::hashing::{ArchivePrefix, PieceHashes};
use super::picker::{ConnId, Picker};
use super::ratelimit::RateLimiter;
use super::superseed::{Order, SeedPlanner};
use super::zstream::Dictionary;
use crate::cache::CachedPackage;
use crate::error::ErrorKind;
use crate::storage::PackageData;

/// Where a torrent is in its life. See STATE.md.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Fetching pieces.
    Downloading,
    /// All pieces verified; checking the whole archive and installing it.
    Verifying,
    /// In the cache and serving it.
    Seeding(CachedPackage),
    /// Gave up.
    Failed {
        /// Error kind.
        kind: ErrorKind,
        /// What happened.
        message: String,
    },
}

/// A message from the torrent (or another connection) to one peer connection's task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cmd {
    /// We verified a piece: tell the peer.
    Have(u32),
    /// We verified the last piece: tell the peer of every piece it has not heard of.
    HaveAll,
    /// Super-seeding is over: advertise everything not yet advertised.
    AdvertiseAll,
    /// Another connection delivered this block first.
    Cancel(BlockRef),
    /// An upload slot opened for this peer.
    Unchoke,
    /// Its upload slot goes to a peer that waited (rotation); it waits in line again.
    Choke,
    /// Look for more blocks to request (pieces were released elsewhere).
    Refill,
    /// Drop the connection (banned, duplicate, shutting down).
    Disconnect(&'static str),
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Peer limit reached.
    Full,
    /// Too many connections from that address.
    AddressFull,
    /// That peer is banned from this torrent.
    Banned,
    /// Already connected, and the existing connection wins the tie-break.
    Duplicate,
    /// The torrent is shutting down or failed.
    Closed,
}

pub(crate) struct PeerSlot {
    pub tx: mpsc::UnboundedSender<Cmd>,
    pub peer_id: PeerId,
    pub addr: SocketAddr,
    pub outgoing: bool,
    pub bitfield: Bitfield,
    pub interested_in_us: bool,
    pub unchoked: bool,
    /// When it got its upload slot (for rotation).
    pub unchoked_at: Option<Instant>,
    /// When it last joined the line for an upload slot ([`grant_next_slot`]).
    pub waiting_since: Option<Instant>,
    pub down_rate: f64,
    pub up_rate: f64,
    /// Admitted at.
    pub since: Instant,
    /// The last second in which piece data moved either way (admission counts).
    pub last_useful: Instant,
}

impl PeerSlot {
    /// Whether it still wants an upload slot it does not have: its place in the line counts.
    fn wants_slot(&self) -> bool {
        self.interested_in_us && !self.unchoked
    }
}

/// Most peer addresses a package remembers ([`Torrent::add_candidates`]). Connections are
/// capped far lower (`max_peers`); the cap bounds what a tracker's answers can make the agent
/// keep and scan at every dial: one answer of a megabyte lists ~175k addresses.
pub(crate) const MAX_CANDIDATES: usize = 2048;

/// A dialled connection that ends this soon after its handshake, having moved no piece data,
/// counts as a failed dial (see [`Torrent::session_ended`]).
pub(crate) const HANG_UP_WITHIN: Duration = Duration::from_secs(5);

/// A known peer address from the tracker.
#[derive(Debug, Clone)]
pub(crate) struct Candidate {
    pub peer_id: Option<PeerId>,
    pub failures: u32,
    pub retry_at: Instant,
    pub connecting: bool,
}

impl Candidate {
    /// Not before 2, 4, 8 ... 256 s from now, doubling with each failure in a row.
    fn back_off(&mut self) {
        self.failures += 1;
        self.retry_at =
            Instant::now() + Duration::from_secs(2u64.saturating_pow(self.failures.min(8)));
    }
}

/// Bookkeeping under the torrent lock.
pub(crate) struct State {
    pub picker: Picker,
    pub peers: HashMap<ConnId, PeerSlot>,
    pub planner: Option<SeedPlanner>,
    pub waiting_for_slot: VecDeque<ConnId>,
    /// Upload slots open now ([`Torrent::size_slots`]).
    pub slots: usize,
    /// Where the upload rate that sizes `slots` was last measured from: when, and
    /// `uploaded_wire` then.
    pub slot_meter: (Instant, u64),
    pub candidates: HashMap<SocketAddr, Candidate>,
    pub banned: HashSet<PeerId>,
    pub banned_addrs: HashSet<SocketAddr>,
    pub strikes: HashMap<PeerId, u32>,
    /// Pieces read back and found good since this torrent started serving from a cache entry
    /// it did not download itself (`None`: everything it serves was verified on arrival).
    /// Each piece is checked the first time it is uploaded, so a file altered at rest (bit
    /// rot, a stray write) is caught before a peer gets a byte of it.
    pub served_ok: Option<Bitfield>,
    /// When a connection to a peer holding the whole package last ended. Two seeds part
    /// ("both ends are seeds") though both go on seeding, so its copies leave our view of the
    /// swarm, not the swarm: see [`State::seed_elsewhere`].
    pub seed_left_at: Option<Instant>,
    /// Seeds besides us in the tracker's last answer, and when it was asked.
    pub tracker_seeds: Option<(u32, Instant)>,
    next_conn: ConnId,
}

impl State {
    /// Whether some other host most likely holds the whole package, connected to us or not:
    /// a seed we parted from counts until the tracker answers a later announce; then the tracker's
    /// count of seeds besides us decides. A seed that died stays in that count until the
    /// tracker expires it (two announce intervals).
    pub(crate) fn seed_elsewhere(&self) -> bool {
        let asked_at = self.tracker_seeds.map(|(_, at)| at);
        let parted_since_answer = match (self.seed_left_at, asked_at) {
            (Some(left), Some(asked)) => left >= asked,
            (Some(_), None) => true,
            (None, _) => false,
        };
        parted_since_answer || self.tracker_seeds.is_some_and(|(n, _)| n > 0)
    }

    /// The order in which a super-seeding origin hands out new pieces: in sequence while it
    /// knows of no other seed, so that every host can hash the archive as it arrives.
    pub(crate) fn offer_order(&self) -> Order {
        if self.seed_elsewhere() {
            Order::Random
        } else {
            Order::Sequential
        }
    }
}

/// How long after its last busy measure a package still counts as uploading, for the share
/// of the host's upload slots (a little over two measures of [`Torrent::size_slots`]).
pub(crate) const SHARE_WINDOW: Duration = Duration::from_secs(5);

/// A peer waiting this long for an upload slot gets the next one, however many pieces it has
/// ([`grant_next_slot`]): three rotations, so that peers behind the others go first but none
/// waits for ever, not even behind peers that claim to have nothing.
pub(crate) const MAX_SLOT_WAIT: Duration = Duration::from_secs(15);

/// The packages of one host that were busy uploading lately, by info-hash, and when each last
/// was: they share the host's upload slots ([`Torrent::size_slots`]).
#[derive(Debug, Default)]
pub(crate) struct Uploading(Mutex<HashMap<InfoHash, Instant>>);

impl Uploading {
    /// Whether `who` is busy uploading (measured at `now`): how many packages were in the last
    /// [`SHARE_WINDOW`], `who` counted either way (at least 1).
    pub(crate) fn note(&self, who: InfoHash, busy: bool, now: Instant) -> usize {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if busy {
            m.insert(who, now);
        } else {
            m.remove(&who);
        }
        m.retain(|_, at| now.saturating_duration_since(*at) <= SHARE_WINDOW);
        m.len() + usize::from(!busy)
    }
}

/// One package in the engine.
pub struct Torrent {
    /// Seeding since it was added (published here, or in the cache at start): an origin for
    /// this swarm, as opposed to a host that downloaded it.
    pub origin: bool,
    /// Package name.
    pub name: PackageName,
    /// Its metainfo.
    pub meta: Arc<Metainfo>,
    pub(crate) ctx: Arc<EngineCtx>,
    /// `None` once the torrent failed: its file is closed, so the space of the removed
    /// partial download is given back at once.
    storage: RwLock<Option<Arc<PackageData>>>,
    state: Mutex<State>,
    phase: watch::Sender<Phase>,
    /// Cancelled when the torrent is removed or the engine stops.
    pub cancel: CancellationToken,
    /// Where the partial download lives while downloading.
    pub(crate) work_dir: Option<PathBuf>,
    /// Files of a tree download reused from cached versions and whole when it started, with how
    /// each was then: its install does not read again those still so
    /// (`Cache::install_reusing`).
    pub(crate) known: Vec<(usize, crate::cache::Unchanged)>,
    /// Woken when the torrent wants more connections (new candidates, a peer left).
    pub(crate) want_peers: Notify,
    /// Woken to announce now (completion, too few peers).
    pub(crate) announce_now: Notify,
    uploaded: AtomicU64,
    downloaded: AtomicU64,
    /// Piece bytes as they crossed the wire (compressed blocks at their compressed size).
    uploaded_wire: AtomicU64,
    /// Seconds the archive's final check and install took (`f64` bits; 0: not done here).
    check_secs: AtomicU64,
    prehashed: AtomicU64,
    downloaded_wire: AtomicU64,
    /// Whether this package's blocks compress: see [`Torrent::try_compress`].
    zstats: Compressibility,
    /// The metainfo's compression dictionary, while connections hold it ([`Torrent::zdict`]).
    zdict: Mutex<Zdict>,
    reported_corrupt: std::sync::atomic::AtomicBool,
    wasted: AtomicU64,
    /// SHA-1s of pieces being downloaded, fed as their blocks are written.
    pub(crate) hashes: PieceHashes,
    /// The archive's SHA-256 over the pieces verified in a row from the first.
    pub(crate) prefix: ArchivePrefix,
    /// Writes received blocks to the file, one batch at a time.
    pub(crate) writer: super::writer::Writer,
    pub(crate) started: Instant,
    /// Caps this download's request rate (a prefetch); lifted when someone needs it now.
    download_limit: RwLock<Option<Arc<RateLimiter>>>,
}

/// Where a torrent stands with its metainfo's compression dictionary.
enum Zdict {
    /// Not looked at yet.
    Unread,
    /// None, or one that cannot be used.
    Absent,
    /// Made, and alive while a connection holds it.
    Held(std::sync::Weak<Dictionary>),
}

impl std::fmt::Debug for Torrent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Torrent")
            .field("name", &self.name)
            .field("info_hash", &self.meta.info_hash)
            .finish()
    }
}

/// A torrent as `fbpkg-rs status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TorrentStatus {
    /// Package name.
    pub name: String,
    /// Archive SHA-256.
    pub sha256: String,
    /// Swarm info-hash.
    pub info_hash: String,
    /// Archive size.
    pub size: u64,
    /// downloading, verifying, seeding or failed.
    pub phase: String,
    /// Verified pieces.
    pub pieces_have: u32,
    /// All pieces.
    pub pieces_total: u32,
    /// Bytes in verified pieces.
    pub bytes_have: u64,
    /// Connected peers.
    pub peers: usize,
    /// Connected peers that have every piece.
    pub seeds: usize,
    /// Bytes per second received (recent).
    pub download_rate: f64,
    /// Bytes per second sent (recent).
    pub upload_rate: f64,
    /// Piece bytes received in total.
    pub downloaded: u64,
    /// Piece bytes sent in total.
    pub uploaded: u64,
    /// What `downloaded` took on the wire: less when peers sent blocks compressed, more by
    /// the blocks in `wasted`.
    #[serde(default)]
    pub downloaded_wire: u64,
    /// Block bytes received but not needed (asked of two peers in the endgame, or cancelled
    /// too late): on the wire, not in `downloaded`.
    #[serde(default)]
    pub wasted: u64,
    /// What `uploaded` took on the wire.
    #[serde(default)]
    pub uploaded_wire: u64,
    /// Seconds since the torrent was added.
    pub age_secs: f64,
    /// Seconds between the last piece verified and the package in the cache: the archive
    /// read back and its SHA-256 checked, then installed. Absent until a download here ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_secs: Option<f64>,
    /// Bytes of the archive whose SHA-256 was taken before its last piece was verified, that
    /// the final check did not wait for. Absent until a download here ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prehashed: Option<u64>,
    /// The cache path once seeding.
    pub path: Option<PathBuf>,
    /// The error once failed.
    pub error: Option<String>,
}

/// Blocks compressed so far for peers, and what they came to.
#[derive(Debug, Default)]
struct Compressibility {
    raw: AtomicU64,
    wire: AtomicU64,
    skipped: AtomicU64,
}

/// What a new torrent starts from.
pub(crate) struct TorrentInit {
    pub name: PackageName,
    pub meta: Arc<Metainfo>,
    pub storage: PackageData,
    /// Pieces already verified.
    pub have: Bitfield,
    pub phase: Phase,
    /// The partial download's directory (none when seeding from the cache).
    pub work_dir: Option<PathBuf>,
    /// Files reused from cached versions and whole at the start, with how each was then (see
    /// `Cache::install_reusing`).
    pub known: Vec<(usize, crate::cache::Unchanged)>,
}

impl Torrent {
    pub(crate) fn new(
        ctx: Arc<EngineCtx>,
        init: TorrentInit,
        cancel: CancellationToken,
    ) -> Arc<Self> {
        let TorrentInit {
            name,
            meta,
            storage,
            have,
            phase,
            work_dir,
            known,
        } = init;
        let num_pieces = meta.num_pieces();
        let picker = Picker::new(meta.length, meta.piece_length, have);
        let seeding = matches!(phase, Phase::Seeding(_));
        let origin = seeding;
        let planner = (seeding && ctx.config.superseed)
            .then(|| SeedPlanner::new(meta.length, meta.piece_length));
        let (phase, _) = watch::channel(phase);
        let slots = ctx.config.upload_slots;
        Arc::new(Self {
            origin,
            name,
            meta,
            ctx,
            storage: RwLock::new(Some(Arc::new(storage))),
            state: Mutex::new(State {
                picker,
                peers: HashMap::new(),
                planner,
                waiting_for_slot: VecDeque::new(),
                slots,
                slot_meter: (Instant::now(), 0),
                candidates: HashMap::new(),
                banned: HashSet::new(),
                banned_addrs: HashSet::new(),
                strikes: HashMap::new(),
                served_ok: origin.then(|| Bitfield::new(num_pieces)),
                seed_left_at: None,
                tracker_seeds: None,
                next_conn: 1,
            }),
            phase,
            cancel,
            work_dir,
            known,
            want_peers: Notify::new(),
            announce_now: Notify::new(),
            uploaded: AtomicU64::new(0),
            downloaded: AtomicU64::new(0),
            uploaded_wire: AtomicU64::new(0),
            check_secs: AtomicU64::new(0),
            prehashed: AtomicU64::new(0),
            downloaded_wire: AtomicU64::new(0),
            zstats: Compressibility::default(),
            zdict: Mutex::new(Zdict::Unread),
            reported_corrupt: std::sync::atomic::AtomicBool::new(false),
            wasted: AtomicU64::new(0),
            hashes: PieceHashes::default(),
            prefix: ArchivePrefix::default(),
            writer: super::writer::Writer::default(),
            started: Instant::now(),
            download_limit: RwLock::new(None),
        })
    }

    /// Lock the bookkeeping. Poisoning is survived: the state is plain data, and a panicking
    /// peer task must not take the whole torrent down.
    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file pieces are read from and written to; `None` after the torrent failed.
    pub(crate) fn storage(&self) -> Option<Arc<PackageData>> {
        self.storage
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn replace_storage(&self, f: PackageData) {
        *self.storage.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(f));
    }

    /// Subscribe to phase changes.
    pub fn phase(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// Wait until the download has ended, in `Seeding` or `Failed` (at once if it has).
    pub async fn finished(&self) -> Phase {
        let mut rx = self.phase.subscribe();
        loop {
            let p = rx.borrow_and_update().clone();
            if matches!(p, Phase::Seeding(_) | Phase::Failed { .. }) {
                return p;
            }
            // The sender lives in `self`, so `changed` cannot fail while we borrow it.
            if rx.changed().await.is_err() {
                return self.current_phase();
            }
        }
    }

    /// The current phase.
    pub fn current_phase(&self) -> Phase {
        self.phase.borrow().clone()
    }

    pub(crate) fn set_phase(&self, p: Phase) {
        self.phase.send_replace(p);
    }

    /// Time since the torrent was added.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }

    /// Bytes still missing (for announces).
    pub fn left(&self) -> u64 {
        self.meta.length - self.state().picker.bytes_have()
    }

    /// Is the package complete and in the cache?
    pub fn is_seeding(&self) -> bool {
        matches!(*self.phase.borrow(), Phase::Seeding(_))
    }

    pub(crate) fn count_up(&self, n: u64) {
        self.uploaded.fetch_add(n, Relaxed);
    }

    pub(crate) fn count_down(&self, n: u64) {
        self.downloaded.fetch_add(n, Relaxed);
    }

    /// Bytes of block payload that crossed the wire, in and out.
    pub(crate) fn count_wire(&self, down: u64, up: u64) {
        self.downloaded_wire.fetch_add(down, Relaxed);
        self.uploaded_wire.fetch_add(up, Relaxed);
    }

    /// The compression dictionary the metainfo carries (`zstream`), ready for use; `None`
    /// when it has none, or one that cannot be used (said once in the log: blocks then travel
    /// compressed without it). Connections to our agents hold it; once none does, it is
    /// dropped (a seeding agent keeps many packages, each dictionary a few MiB once prepared)
    /// and made again from the metainfo by the next one.
    pub(crate) fn zdict(&self) -> Option<Arc<Dictionary>> {
        let mut slot = self
            .zdict
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &*slot {
            Zdict::Absent => return None,
            Zdict::Held(held) => {
                if let Some(d) = held.upgrade() {
                    return Some(d);
                }
            }
            Zdict::Unread => {}
        }
        match Dictionary::of(&self.meta) {
            Ok(Some(d)) => {
                let d = Arc::new(d);
                *slot = Zdict::Held(Arc::downgrade(&d));
                Some(d)
            }
            Ok(None) => {
                *slot = Zdict::Absent;
                None
            }
            Err(e) => {
                tracing::warn!(package = %self.name, "{e}; sending blocks without it");
                *slot = Zdict::Absent;
                None
            }
        }
    }

    /// Whether to compress the next batch of blocks for a peer that takes them compressed.
    /// Always for the first MiB, then while compression saves at least 5%, and one batch in 64
    /// otherwise (a package of compressed or random bytes costs its seeders almost no CPU, and
    /// a package whose later files compress is still noticed).
    pub(crate) fn try_compress(&self) -> bool {
        let z = &self.zstats;
        let (raw, wire) = (z.raw.load(Relaxed), z.wire.load(Relaxed));
        raw < (1 << 20)
            || wire.saturating_mul(100) <= raw.saturating_mul(95)
            || z.skipped.fetch_add(1, Relaxed).is_multiple_of(64)
    }

    /// `raw` bytes of blocks were compressed into `wire` (or sent as they were, when that was
    /// not smaller).
    pub(crate) fn note_compressed(&self, raw: u64, wire: u64) {
        self.zstats.raw.fetch_add(raw, Relaxed);
        self.zstats.wire.fetch_add(wire, Relaxed);
    }

    pub(crate) fn count_wasted(&self, n: u64) {
        self.wasted.fetch_add(n, Relaxed);
    }

    /// Block bytes received but not needed (see [`TorrentStatus::wasted`]).
    pub(crate) fn wasted(&self) -> u64 {
        self.wasted.load(Relaxed)
    }

    /// Piece bytes sent.
    pub fn uploaded(&self) -> u64 {
        self.uploaded.load(Relaxed)
    }

    /// Piece bytes received.
    pub fn downloaded(&self) -> u64 {
        self.downloaded.load(Relaxed)
    }

    /// Admit a connection. The same peer twice: keep the connection opened by the peer with
    /// the lower id, a rule both ends compute alike, so exactly one survives.
    pub(crate) fn register(
        &self,
        peer_id: PeerId,
        addr: SocketAddr,
        outgoing: bool,
        tx: mpsc::UnboundedSender<Cmd>,
    ) -> Result<ConnId, Refusal> {
        if self.cancel.is_cancelled() || matches!(*self.phase.borrow(), Phase::Failed { .. }) {
            return Err(Refusal::Closed);
        }
        let mut st = self.state();
        if st.banned.contains(&peer_id) || st.banned_addrs.contains(&addr) {
            return Err(Refusal::Banned);
        }
        if let Some((&old, slot)) = st.peers.iter().find(|(_, s)| s.peer_id == peer_id) {
            let ours = self.ctx.peer_id;
            let new_wins = if outgoing {
                ours < peer_id
            } else {
                peer_id < ours
            };
            if !new_wins || slot.outgoing == outgoing {
                // Dialled a peer we already had (compact peer lists carry no ids): the
                // address is now known to be that peer, and is not dialled again while it
                // stays connected.
                if outgoing && let Some(c) = st.candidates.get_mut(&addr) {
                    c.peer_id = Some(peer_id);
                }
                return Err(Refusal::Duplicate);
            }
            let _ = slot.tx.send(Cmd::Disconnect("duplicate connection"));
            drop_slot(&mut st, old);
        }
        let from_addr = st
            .peers
            .values()
            .filter(|s| s.addr.ip() == addr.ip())
            .count();
        if from_addr >= self.ctx.config.max_peers_per_address {
            return Err(Refusal::AddressFull);
        }
        if st.peers.len() >= self.ctx.config.max_peers {
            // Slots go to peers that deliver: make room by dropping the connection idle the
            // longest, if one is past its grace and has moved nothing for a while. Without
            // this, a few dozen connections that handshake and stall hold every slot.
            let now = Instant::now();
            let (grace, useless) = (
                self.ctx.config.eviction_grace,
                self.ctx.config.useless_after,
            );
            let victim = st
                .peers
                .iter()
                .filter(|(_, s)| {
                    now.duration_since(s.since) >= grace
                        && now.duration_since(s.last_useful) >= useless
                })
                .min_by_key(|(_, s)| s.last_useful)
                .map(|(&c, _)| c);
            let Some(victim) = victim else {
                return Err(Refusal::Full);
            };
            if let Some(slot) = st.peers.get(&victim) {
                tracing::debug!(package = %self.name, peer = %slot.addr, "evicting a peer that moved no data, for a newcomer");
                let _ = slot.tx.send(Cmd::Disconnect(
                    "evicted: moved no data while slots were short",
                ));
            }
            drop_slot(&mut st, victim);
        }
        let conn = st.next_conn;
        st.next_conn += 1;
        let n = self.meta.num_pieces();
        st.peers.insert(
            conn,
            PeerSlot {
                tx,
                peer_id,
                addr,
                outgoing,
                bitfield: Bitfield::new(n),
                interested_in_us: false,
                unchoked: false,
                unchoked_at: None,
                waiting_since: None,
                down_rate: 0.0,
                up_rate: 0.0,
                since: Instant::now(),
                last_useful: Instant::now(),
            },
        );
        if let Some(planner) = st.planner.as_mut() {
            planner.add_peer(conn, &Bitfield::new(n));
        }
        // Its failures are forgiven only when the connection proves worth it (`session_ended`).
        if outgoing && let Some(c) = st.candidates.get_mut(&addr) {
            c.peer_id = Some(peer_id);
        }
        Ok(conn)
    }

    /// A connection ended.
    pub(crate) fn unregister(&self, conn: ConnId) {
        let mut st = self.state();
        drop_slot(&mut st, conn);
        drop(st);
        self.want_peers.notify_one();
    }

    /// Forget or punish the senders of a piece that failed verification.
    pub(crate) fn blame(&self, sources: &[ConnId]) {
        let mut st = self.state();
        let sole = sources.len() == 1;
        for conn in sources {
            let Some(slot) = st.peers.get(conn) else {
                continue;
            };
            let (peer_id, addr, outgoing, tx) =
                (slot.peer_id, slot.addr, slot.outgoing, slot.tx.clone());
            let strikes = {
                let s = st.strikes.entry(peer_id).or_insert(0);
                *s += 1;
                *s
            };
            if sole || strikes >= 2 {
                tracing::warn!(package = %self.name, peer = %addr, "peer sent data that failed verification; banned");
                st.banned.insert(peer_id);
                // Only a dialled address is where the peer listens; an incoming one is ephemeral.
                if outgoing {
                    st.banned_addrs.insert(addr);
                }
                let _ = tx.send(Cmd::Disconnect("sent corrupt data"));
            }
        }
    }

    /// Open one upload slot per `upload_slot_rate` of the upload rate this package has
    /// reached, between `min_upload_slots` (the floor) and its share of `upload_slots`.
    ///
    /// A fixed number of slots splits a thin uplink into flows too slow to move a piece: at
    /// 5 Mbit/s, 32 slots give each peer 20 KB/s, and the blocks it asked for wait seconds in
    /// a queue at the end of the download, when a few blocks hold a host back. Past the
    /// fewer slots, peers wait their turn ([`Torrent::rotate_slots`]).
    ///
    /// The rate is measured over at least 2 s. Slots follow it down as well as up: sizing by
    /// the highest rate measured instead kept the fleet's mean finish but left the last host
    /// 1-5 s later in `b3` (three runs each), as late in a download fewer, faster flows
    /// get the last blocks out sooner.
    ///
    /// The slots are the host's: packages busy uploading (their rate asks for more than the
    /// floor) in the last [`SHARE_WINDOW`] split `upload_slots` between them (8 each for
    /// four); a package that only trickles keeps its floor and takes no share, so old versions
    /// served now and then do not halve the slots of the one being rolled out. Each with all
    /// 32, a host of `b5` kept ~100 thin flows, and the last host finished 2.5 s later.
    pub(crate) fn size_slots(&self) {
        let cfg = &self.ctx.config;
        let Some(per_slot) = cfg.upload_slot_rate.filter(|&r| r > 0) else {
            return;
        };
        let mut st = self.state();
        let now = Instant::now();
        let (since, from) = st.slot_meter;
        let secs = now.duration_since(since).as_secs_f64();
        if secs < 2.0 {
            return;
        }
        let sent = self.uploaded_wire.load(Relaxed);
        st.slot_meter = (now, sent);
        let rate = sent.saturating_sub(from) as f64 / secs;
        if rate <= 0.0 {
            // Nothing asked of us: no measure, and nothing to share.
            return;
        }
        let floor = cfg.min_upload_slots.min(cfg.upload_slots).max(1);
        let want = (rate / per_slot as f64).ceil() as usize;
        // Busy: it would fill more than the floor. A trickle does not take a share.
        let sharing = self
            .ctx
            .uploading
            .note(self.meta.info_hash, want > floor, now);
        let cap = (cfg.upload_slots / sharing).max(floor);
        st.slots = want.clamp(floor, cap);
        // Fewer slots: the longest held go back to waiting. More: the longest waiting get one.
        let held = st.held_longest(Duration::ZERO, now);
        for &conn in held.iter().take(held.len().saturating_sub(st.slots)) {
            take_back_slot(&mut st, conn);
        }
        while grant_next_slot(&mut st) {}
    }

    /// Give upload slots held for `after` or longer to peers waiting for one, one for one.
    ///
    /// Slots go to those waiting ([`grant_next_slot`]); without rotation, when more peers are
    /// interested than there are slots (a crowd larger than `upload_slots`), the last ones
    /// would wait until the first ones finished, at every host alike: at 48 hosts with 32
    /// slots, a third of the fleet finished at twice the others' time.
    pub(crate) fn rotate_slots(&self, after: Duration) {
        let mut st = self.state();
        let now = Instant::now();
        let waiting = st
            .waiting_for_slot
            .iter()
            .filter(|c| st.peers.get(c).is_some_and(PeerSlot::wants_slot))
            .count();
        if waiting == 0 {
            return;
        }
        for conn in st.held_longest(after, now).into_iter().take(waiting) {
            take_back_slot(&mut st, conn);
            grant_next_slot(&mut st);
        }
    }

    /// Add peers learned from the tracker, up to [`MAX_CANDIDATES`] known addresses: past
    /// that, an address that has failed makes room (the most failures first), and while none
    /// has, new ones are left out.
    pub(crate) fn add_candidates(
        &self,
        peers: impl IntoIterator<Item = (SocketAddr, Option<PeerId>)>,
    ) {
        let mut st = self.state();
        let now = Instant::now();
        // Addresses that may make room, the most failures last; sorted once, when needed.
        let mut evictable: Option<Vec<(u32, SocketAddr)>> = None;
        for (addr, peer_id) in peers.into_iter().take(MAX_CANDIDATES) {
            if addr == self.ctx.listen_addr && peer_id.is_none_or(|p| p == self.ctx.peer_id) {
                continue;
            }
            if peer_id == Some(self.ctx.peer_id) {
                continue;
            }
            if st.candidates.len() >= MAX_CANDIDATES && !st.candidates.contains_key(&addr) {
                let room = evictable.get_or_insert_with(|| {
                    let mut v: Vec<(u32, SocketAddr)> = st
                        .candidates
                        .iter()
                        .filter(|(_, c)| c.failures > 0 && !c.connecting)
                        .map(|(a, c)| (c.failures, *a))
                        .collect();
                    v.sort_unstable();
                    v
                });
                let Some((_, gone)) = room.pop() else {
                    break;
                };
                st.candidates.remove(&gone);
            }
            st.candidates
                .entry(addr)
                .and_modify(|c| {
                    if peer_id.is_some() {
                        c.peer_id = peer_id;
                    }
                })
                .or_insert(Candidate {
                    peer_id,
                    failures: 0,
                    retry_at: now,
                    connecting: false,
                });
        }
        drop(st);
        self.want_peers.notify_one();
    }

    /// Candidates to dial now, marked as connecting.
    pub(crate) fn dial_list(&self) -> Vec<SocketAddr> {
        let mut st = self.state();
        let connected: HashSet<PeerId> = st.peers.values().map(|s| s.peer_id).collect();
        let connecting = st.candidates.values().filter(|c| c.connecting).count();
        let room = self
            .ctx
            .config
            .max_peers
            .saturating_sub(st.peers.len() + connecting);
        if room == 0 || self.is_seeding() || st.picker.is_complete() {
            // A seed waits to be dialled: leechers know where it is. That holds from the last
            // piece on, not from the end of the SHA-256 pass: the peers we know then are
            // mostly seeds, which close on a seed at once (qBittorrent, with a new peer id
            // each time, so the loop never saw it was the same peer).
            return Vec::new();
        }
        let now = Instant::now();
        let State {
            candidates,
            banned,
            banned_addrs,
            ..
        } = &mut *st;
        let mut out: Vec<SocketAddr> = candidates
            .iter()
            .filter(|(a, c)| {
                !c.connecting
                    && c.retry_at <= now
                    && !banned_addrs.contains(a)
                    && c.peer_id
                        .is_none_or(|p| !connected.contains(&p) && !banned.contains(&p))
            })
            .map(|(a, _)| *a)
            .collect();
        out.truncate(room);
        for a in &out {
            if let Some(c) = candidates.get_mut(a) {
                c.connecting = true;
            }
        }
        out
    }

    /// A dial finished (successfully or not).
    pub(crate) fn dial_done(&self, addr: SocketAddr, ok: bool) {
        let mut st = self.state();
        if let Some(c) = st.candidates.get_mut(&addr) {
            c.connecting = false;
            if !ok {
                c.back_off();
            }
        }
    }

    /// A dialled connection ended. One that moved piece data, or lasted past
    /// [`HANG_UP_WITHIN`], clears the address's failures; one that the peer (or we) closed
    /// at once backs off like a failed dial. Without this, a peer that hangs up right after
    /// the handshake (full, or a seed meeting a seed) was redialled as fast as it closed. One
    /// dropped as faulty always backs off: a peer that answers no request was dialled again
    /// at once, and held its blocks again for another request timeout. (Once only, if it
    /// moved data first: a useful peer that stalled once is not kept away longer each time.)
    pub(crate) fn session_ended(&self, addr: SocketAddr, s: super::peer::Session) {
        let mut st = self.state();
        if let Some(c) = st.candidates.get_mut(&addr) {
            if s.moved_data || (!s.faulty && s.lasted >= HANG_UP_WITHIN) {
                c.failures = 0;
            }
            if s.faulty || !(s.moved_data || s.lasted >= HANG_UP_WITHIN) {
                c.back_off();
            }
        }
    }

    /// Give up on the download: report `kind`, drop the partial data, stop every connection.
    pub(crate) fn fail(&self, kind: ErrorKind, message: String) {
        if matches!(*self.phase.borrow(), Phase::Failed { .. }) {
            return;
        }
        tracing::error!(package = %self.name, %message, "download failed");
        // Partial data goes first, so whoever sees `Failed` can start over cleanly.
        self.cancel.cancel();
        // Close our handle (tasks still holding one drop it as they end), then remove the
        // file: an open handle to a removed file keeps its space used.
        self.storage
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.remove_work_dir();
        self.set_phase(Phase::Failed { kind, message });
    }

    /// Our cache copy failed its check while being served: hand it to the engine's repair
    /// (quarantine and refetch), once.
    pub(crate) fn corrupt_at_rest(&self, piece: u32) {
        if self.reported_corrupt.swap(true, Relaxed) {
            return;
        }
        tracing::error!(package = %self.name, sha256 = %self.meta.sha256, piece, "piece of a cached package fails its SHA-1: the file changed on disk");
        let _ = self
            .ctx
            .corrupt
            .send((self.name.clone(), self.meta.clone()));
    }

    /// Remove the torrent's partial download (after it failed).
    pub(crate) fn remove_work_dir(&self) {
        if let Some(dir) = &self.work_dir
            && let Err(e) = std::fs::remove_dir_all(dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove partial download");
        }
    }

    /// A download's final check and install took `secs` ([`TorrentStatus::check_secs`]).
    /// `prehashed` bytes of it were hashed while downloading ([`TorrentStatus::prehashed`]).
    pub(crate) fn set_check(&self, secs: f64, prehashed: u64) {
        self.prehashed.store(prehashed, Relaxed);
        self.check_secs.store(secs.to_bits(), Relaxed);
    }

    fn check_secs(&self) -> Option<f64> {
        Some(f64::from_bits(self.check_secs.load(Relaxed))).filter(|&s| s > 0.0)
    }

    /// Snapshot for status output.
    pub fn status(&self) -> TorrentStatus {
        let phase = self.current_phase();
        let st = self.state();
        let n = self.meta.num_pieces();
        let (phase_name, path, error) = match &phase {
            Phase::Downloading => ("downloading", None, None),
            Phase::Verifying => ("verifying", None, None),
            Phase::Seeding(c) => ("seeding", Some(c.launch_path.clone()), None),
            Phase::Failed { message, .. } => ("failed", None, Some(message.clone())),
        };
        TorrentStatus {
            name: self.name.to_string(),
            sha256: self.meta.sha256.to_hex(),
            info_hash: self.meta.info_hash.to_hex(),
            size: self.meta.length,
            phase: phase_name.to_owned(),
            pieces_have: st.picker.have().count(),
            pieces_total: n,
            bytes_have: st.picker.bytes_have(),
            peers: st.peers.len(),
            seeds: st
                .peers
                .values()
                .filter(|p| p.bitfield.is_complete())
                .count(),
            download_rate: st.peers.values().map(|p| p.down_rate).sum(),
            upload_rate: st.peers.values().map(|p| p.up_rate).sum(),
            downloaded: self.downloaded(),
            uploaded: self.uploaded(),
            downloaded_wire: self.downloaded_wire.load(Relaxed),
            wasted: self.wasted(),
            uploaded_wire: self.uploaded_wire.load(Relaxed),
            age_secs: self.started.elapsed().as_secs_f64(),
            check_secs: self.check_secs(),
            prehashed: self.check_secs().map(|_| self.prehashed.load(Relaxed)),
            path,
            error,
        }
    }

    /// Send a command to every connection.
    /// Cap this download at `bytes_per_sec` (`None`: no cap). Lifting or raising a cap wakes
    /// every connection to request at once.
    pub fn set_download_limit(&self, bytes_per_sec: Option<u64>) {
        let limit = bytes_per_sec.map(|r| Arc::new(RateLimiter::new(r)));
        let mut slot = self
            .download_limit
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let lifted = slot.is_some() && limit.is_none();
        *slot = limit;
        drop(slot);
        if lifted {
            self.broadcast(Cmd::Refill);
        }
    }

    /// The current download cap, if any.
    pub(crate) fn download_limit(&self) -> Option<Arc<RateLimiter>> {
        self.download_limit
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether a cap holds this download back (`fbpkg-rs status`, prefetch accounting).
    pub fn is_rate_limited(&self) -> bool {
        self.download_limit().is_some()
    }

    pub(crate) fn broadcast(&self, cmd: Cmd) {
        for slot in self.state().peers.values() {
            let _ = slot.tx.send(cmd.clone());
        }
    }

    /// Tell the peers that we verified piece `i`, the last one if `complete`.
    ///
    /// Not one of our own agents that holds `i` already and is downloading from us: it cannot
    /// want the piece, and its picker counts copies only of the pieces it lacks. In a crowd
    /// that is about half of all `have`s, each a wake-up of the connection here, 9 bytes of
    /// upload, and a message to decode and take through the picker on the other side. That
    /// is a piece times every peer: 0.9 MB of each host's upload in `b3`, where a 5 Mbit/s
    /// host uploads 24 MB in all. Once we hold every piece, a `have-all` tells the peers
    /// that missed some that we are a seed (two seeds part; the dashboard counts seeds).
    ///
    /// Never withheld from a peer that is not interested in us: a seed, and above all an
    /// origin that counts the copies of the pieces it hands out by the `have`s of the peers
    /// it handed them to (`superseed`). Nor from a stock client, which may count on them.
    pub(crate) fn broadcast_have(&self, i: u32, complete: bool) {
        let st = self.state();
        for slot in st.peers.values() {
            let useless =
                slot.interested_in_us && slot.bitfield.get(i) && super::is_ours(&slot.peer_id);
            if !useless {
                let _ = slot.tx.send(Cmd::Have(i));
            }
            if complete {
                let _ = slot.tx.send(Cmd::HaveAll);
            }
        }
    }
}

impl State {
    /// Whether an upload slot is free.
    pub(crate) fn slot_free(&self) -> bool {
        self.peers.values().filter(|p| p.unchoked).count() < self.slots
    }

    /// The connections that have held their upload slot for `held_for` or longer at `now`,
    /// longest first.
    fn held_longest(&self, held_for: Duration, now: Instant) -> Vec<ConnId> {
        let mut held: Vec<(Instant, ConnId)> = self
            .peers
            .iter()
            .filter_map(|(&c, s)| {
                let at = s.unchoked_at.filter(|_| s.unchoked)?;
                (now.duration_since(at) >= held_for).then_some((at, c))
            })
            .collect();
        held.sort_unstable();
        held.into_iter().map(|(_, c)| c).collect()
    }
}

/// Remove a connection's slot and everything that refers to it.
fn drop_slot(st: &mut State, conn: ConnId) {
    let Some(slot) = st.peers.remove(&conn) else {
        return;
    };
    if slot.bitfield.is_complete() {
        st.seed_left_at = Some(Instant::now());
    }
    st.picker.remove_availability(&slot.bitfield);
    st.picker.release_conn(conn);
    if let Some(p) = st.planner.as_mut() {
        p.remove_peer(conn);
    }
    st.waiting_for_slot.retain(|&c| c != conn);
    if slot.unchoked {
        grant_next_slot(st);
    }
    // Blocks it held are free again: other connections may want them.
    for s in st.peers.values() {
        let _ = s.tx.send(Cmd::Refill);
    }
}

/// Choke a peer that holds an upload slot and put it at the back of the line for one.
fn take_back_slot(st: &mut State, conn: ConnId) {
    if let Some(s) = st.peers.get_mut(&conn) {
        s.unchoked = false;
        s.unchoked_at = None;
        s.waiting_since = Some(Instant::now());
        let _ = s.tx.send(Cmd::Choke);
    }
    // At the back, and only there: a place it left earlier (the line is pruned lazily) would
    // put it ahead of the peers that waited while it held the slot.
    st.waiting_for_slot.retain(|&c| c != conn);
    st.waiting_for_slot.push_back(conn);
}

/// `conn`, interested in us, asks for an upload slot: it takes a free one now, or else waits
/// in line (once) for [`grant_next_slot`]. Whether it took one.
pub(crate) fn ask_for_slot(st: &mut State, conn: ConnId) -> bool {
    let grant = st.slot_free();
    let queued = st.waiting_for_slot.contains(&conn);
    if let Some(s) = st.peers.get_mut(&conn) {
        s.interested_in_us = true;
        if grant {
            s.unchoked = true;
            s.unchoked_at = Some(Instant::now());
            s.waiting_since = None;
        } else if !queued {
            s.waiting_since = Some(Instant::now());
        }
    }
    if grant && queued {
        // A place kept from before (it lost interest while waiting, and is back): served now.
        st.waiting_for_slot.retain(|&c| c != conn);
    } else if !grant && !queued {
        st.waiting_for_slot.push_back(conn);
    }
    grant
}

/// Give a free upload slot to a peer waiting for one: the longest waiting, unless some are
/// far behind this package's other peers ([`far_behind`]): then the one of those with the
/// fewest pieces (the longest waiting of equals). One that has waited [`MAX_SLOT_WAIT`] goes
/// first whatever it holds. Returns whether it gave one (not when the slots are full, or
/// nobody waits).
///
/// With fewer slots than peers, who is served is partly luck, and first come, first served
/// let a few hosts fall behind for good: in `b3` the last host was one of the least complete
/// at 30 s in seven runs of nine, and finished 0.6-4.6 s after the crowd. Fewest pieces first
/// for every grant evened `b3` out but slowed an even crowd: every uploader picked the same
/// few peers, a piece or two behind, whose downlinks filled while uplinks idled (`b5`: the
/// leechers' uplinks 78-81% busy against 85-86%). Only a peer far behind goes ahead, and in an
/// even crowd there is none: `b3` 38.3-38.9 s over six runs against 38.6-40.2 s alternating,
/// `b5` and `b1-48` level (`benches/FINDINGS.md`, `b3`). In `b4` the far behind are mostly
/// the joiners, late rather than slow; judged by pace instead (what a peer should hold at the
/// median peer's pieces per second since it was admitted), the never-killed hosts came later
/// in four pairs of five (`benches/FINDINGS.md`, "Far behind by its pace, not by its count").
pub(crate) fn grant_next_slot(st: &mut State) -> bool {
    if !st.slot_free() {
        return false;
    }
    let now = Instant::now();
    let State {
        peers,
        waiting_for_slot: line,
        ..
    } = st;
    // Those gone, not interested any more, or served meanwhile leave the line.
    line.retain(|c| peers.get(c).is_some_and(PeerSlot::wants_slot));
    let waited = |c: &ConnId| {
        peers
            .get(c)
            .and_then(|s| s.waiting_since)
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
    };
    let pieces = |c: &ConnId| peers.get(c).map_or(u32::MAX, |s| s.bitfield.count());
    let pick = match line.front() {
        None => None,
        Some(first) if waited(first) >= MAX_SLOT_WAIT => Some(0),
        Some(_) => Some(
            far_behind(peers)
                .and_then(|most| {
                    line.iter()
                        .enumerate()
                        .filter(|(_, c)| pieces(c) <= most)
                        .min_by_key(|&(i, c)| (pieces(c), i))
                })
                .map_or(0, |(i, _)| i),
        ),
    };
    let Some(conn) = pick.and_then(|i| line.remove(i)) else {
        return false;
    };
    let Some(s) = peers.get_mut(&conn) else {
        return false;
    };
    s.unchoked = true;
    s.unchoked_at = Some(now);
    s.waiting_since = None;
    let _ = s.tx.send(Cmd::Unchoke);
    true
}

/// The most pieces a peer may hold and still count as far behind this package's peers:
/// fewer than their median less a sixteenth of the package. Only such peers go ahead of the
/// line ([`grant_next_slot`]); in an even crowd there are none.
fn far_behind(peers: &HashMap<ConnId, PeerSlot>) -> Option<u32> {
    let len = peers.values().next()?.bitfield.len();
    let mut counts: Vec<u32> = peers.values().map(|s| s.bitfield.count()).collect();
    let mid = counts.len() / 2;
    let (_, &mut median, _) = counts.select_nth_unstable(mid);
    median.checked_sub((len / 16).max(1) + 1)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cache::Cache;
    use crate::engine::{EngineConfig, MIN_UPLOAD_SLOTS};
    use crate::tracker_client::TrackerClient;
    use fbpkg_common::metainfo::Format;

    /// A torrent of a 1 MiB package in `Downloading`, holding the pieces in `have`.
    pub(crate) fn torrent(
        dir: &std::path::Path,
        have: impl FnOnce(u32) -> Bitfield,
    ) -> Arc<Torrent> {
        torrent_with(dir, have, EngineConfig::new(dir.join("work")))
    }

    fn torrent_with(
        dir: &std::path::Path,
        have: impl FnOnce(u32) -> Bitfield,
        config: EngineConfig,
    ) -> Arc<Torrent> {
        let len = 1u64 << 20;
        let bytes = vec![7u8; len as usize];
        let meta =
            Metainfo::build(&bytes[..], len, "t.bin", "http://127.0.0.1:1", Format::File).unwrap();
        let (corrupt, _) = mpsc::unbounded_channel();
        let ctx = Arc::new(EngineCtx {
            config,
            peer_id: PeerId([1; 20]),
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 6881)),
            tracker: TrackerClient::new("http://127.0.0.1:1", None, Duration::from_secs(1))
                .unwrap(),
            cache: Cache::new(dir.join("cache")),
            tasks: tokio_util::task::TaskTracker::new(),
            upload_limit: None,
            conn_slots: Arc::new(tokio::sync::Semaphore::new(8)),
            corrupt,
            installed: tokio::sync::broadcast::channel(1).0,
            uploading: Uploading::default(),
        });
        let init = TorrentInit {
            name: PackageName::new("t").unwrap(),
            have: have(meta.num_pieces()),
            storage: PackageData::open_partial(dir, &meta).unwrap(),
            meta: Arc::new(meta),
            phase: Phase::Downloading,
            work_dir: None,
            known: Vec::new(),
        };
        Torrent::new(ctx, init, CancellationToken::new())
    }

    fn peer(n: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, n], 6881))
    }

    /// A seed that leaves our connections counts as holding everything until the tracker
    /// answers an announce made after it left; then the tracker's seed count decides.
    #[tokio::test(start_paused = true)]
    async fn a_seed_that_left_counts_until_the_tracker_answers() {
        let dir = tempfile::tempdir().unwrap();
        let t = torrent(dir.path(), Bitfield::new);
        let (tx, _rx) = mpsc::unbounded_channel();
        let leecher = t
            .register(PeerId([2; 20]), peer(2), true, tx.clone())
            .unwrap();
        let seed = t.register(PeerId([3; 20]), peer(3), true, tx).unwrap();
        t.state().peers.get_mut(&seed).unwrap().bitfield = Bitfield::full(t.meta.num_pieces());
        assert!(!t.state().seed_elsewhere(), "nobody has left yet");

        t.unregister(leecher);
        assert!(
            !t.state().seed_elsewhere(),
            "a leecher leaving says nothing"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        t.unregister(seed);
        assert!(t.state().seed_elsewhere(), "the seed that left still seeds");

        let before = Instant::now() - Duration::from_millis(500);
        t.state().tracker_seeds = Some((0, before));
        assert!(
            t.state().seed_elsewhere(),
            "an answer to an announce made before the seed left is stale"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        t.state().tracker_seeds = Some((0, Instant::now()));
        assert!(
            !t.state().seed_elsewhere(),
            "the tracker knows no other seed"
        );
        assert_eq!(t.state().offer_order(), Order::Sequential);
        t.state().tracker_seeds = Some((1, Instant::now()));
        assert!(t.state().seed_elsewhere(), "the tracker knows one");
        assert_eq!(
            t.state().offer_order(),
            Order::Random,
            "a seed that may be handing out pieces too: offers at random"
        );
    }

    /// Between the last piece and the end of the SHA-256 pass the torrent is not `Seeding`
    /// yet, but it has nothing left to fetch: it dials nobody (the peers it knows then are
    /// mostly seeds, which close on a seed at once).
    #[tokio::test]
    async fn a_torrent_holding_every_piece_dials_nobody() {
        let dir = tempfile::tempdir().unwrap();
        let missing_one = torrent(dir.path(), |n| {
            let mut b = Bitfield::full(n);
            b.clear(n - 1);
            b
        });
        missing_one.add_candidates([(peer(2), None)]);
        assert_eq!(missing_one.dial_list(), [peer(2)], "a leecher dials");

        let dir = tempfile::tempdir().unwrap();
        let complete = torrent(dir.path(), Bitfield::full);
        assert_eq!(complete.current_phase(), Phase::Downloading);
        complete.add_candidates([(peer(2), None), (peer(3), Some(PeerId([3; 20])))]);
        assert!(complete.dial_list().is_empty());
    }

    /// Three sessions with `a` that each end as `session`: the seconds waited before each
    /// dial.
    async fn redials(
        t: &Torrent,
        a: SocketAddr,
        session: crate::engine::peer::Session,
    ) -> Vec<u64> {
        let mut waits = Vec::new();
        for _ in 0..3 {
            let started = Instant::now();
            while t.dial_list().is_empty() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            waits.push(started.elapsed().as_secs());
            t.dial_done(a, true);
            t.session_ended(a, session);
        }
        waits
    }

    /// A peer that closes right after the handshake without sending a block is backed off
    /// like one that cannot be reached: 2 s, then 4 s. One that delivers clears the slate.
    #[tokio::test(start_paused = true)]
    async fn a_peer_that_hangs_up_at_once_is_dialled_less_and_less() {
        let dir = tempfile::tempdir().unwrap();
        let t = torrent(dir.path(), Bitfield::new);
        let a = peer(2);
        t.add_candidates([(a, None)]);
        let at_once = Duration::from_millis(50);
        let ended = |moved_data: bool, lasted: Duration| crate::engine::peer::Session {
            moved_data,
            faulty: false,
            lasted,
        };
        assert_eq!(redials(&t, a, ended(false, at_once)).await, [0, 2, 4]);
        assert!(t.dial_list().is_empty());

        // A connection that moved data, however short, resets the backoff.
        tokio::time::sleep(Duration::from_secs(8)).await;
        assert_eq!(t.dial_list(), [a]);
        t.dial_done(a, true);
        t.session_ended(a, ended(true, at_once));
        assert_eq!(t.dial_list(), [a]);
        // So does one that lasted.
        t.dial_done(a, true);
        t.session_ended(a, ended(false, HANG_UP_WITHIN));
        assert_eq!(t.dial_list(), [a]);
        // Not one dropped as faulty (it answered no request, or broke the protocol), however
        // long it lasted: it backs off, further each time it moved nothing.
        let faulty = |moved_data| crate::engine::peer::Session {
            faulty: true,
            ..ended(moved_data, HANG_UP_WITHIN)
        };
        t.dial_done(a, true);
        assert_eq!(redials(&t, a, faulty(false)).await, [0, 2, 4]);
        // One that moved data first waits the first step only.
        tokio::time::sleep(Duration::from_secs(8)).await;
        t.dial_done(a, true);
        t.session_ended(a, faulty(true));
        assert!(t.dial_list().is_empty());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(t.dial_list(), [a]);
    }

    /// A tracker's answers cannot make a package keep more than [`MAX_CANDIDATES`] addresses;
    /// past that, addresses that failed make room, the most failures first.
    #[tokio::test(start_paused = true)]
    async fn known_addresses_are_capped_and_failed_ones_make_room() {
        let dir = tempfile::tempdir().unwrap();
        let t = torrent(dir.path(), Bitfield::new);
        let addr = |i: usize| SocketAddr::from(([127, 1, (i >> 8) as u8, i as u8], 6881));
        let known = |i: usize| t.state().candidates.contains_key(&addr(i));
        t.add_candidates((0..MAX_CANDIDATES + 500).map(|i| (addr(i), None)));
        assert_eq!(t.state().candidates.len(), MAX_CANDIDATES);
        assert!(known(0) && known(MAX_CANDIDATES - 1) && !known(MAX_CANDIDATES));

        // Full and nobody failed: a new address is left out.
        t.add_candidates([(addr(5000), None)]);
        assert!(!known(5000));

        // Two failed, one of them twice: it makes room first.
        t.dial_done(addr(1), false);
        t.dial_done(addr(1), false);
        t.dial_done(addr(2), false);
        t.add_candidates([(addr(5001), None)]);
        assert!(known(5001) && !known(1) && known(2));
        t.add_candidates([(addr(5002), None), (addr(5003), None)]);
        assert!(known(5002) && !known(2) && !known(5003));
        assert_eq!(t.state().candidates.len(), MAX_CANDIDATES);

        // An address already known is still updated when full.
        t.add_candidates([(addr(3), Some(PeerId([9; 20])))]);
        assert_eq!(
            t.state().candidates[&addr(3)].peer_id,
            Some(PeerId([9; 20]))
        );
    }

    /// `n` peers connected to `t` (outgoing, none holding anything), and their command
    /// queues.
    fn connect(t: &Torrent, n: u8) -> (Vec<ConnId>, Vec<mpsc::UnboundedReceiver<Cmd>>) {
        (0..n)
            .map(|i| {
                let (tx, rx) = mpsc::unbounded_channel();
                let id = t
                    .register(PeerId([i + 2; 20]), peer(i + 2), true, tx)
                    .unwrap();
                (id, rx)
            })
            .unzip()
    }

    /// An interested peer takes a free upload slot at once, or else waits in line, once, for
    /// the next one freed. The `Interested` handler asks so, and so does a peer an origin held
    /// back for its budget when the budget lifts (it used to take its slot back at once).
    #[tokio::test]
    async fn a_peer_asking_for_a_slot_takes_a_free_one_or_waits_in_line() {
        let dir = tempfile::tempdir().unwrap();
        let t = torrent(dir.path(), Bitfield::new);
        let (ids, mut rxs) = connect(&t, 3);
        let mut st = t.state();
        st.slots = 1;
        assert!(ask_for_slot(&mut st, ids[0]));
        assert!(!ask_for_slot(&mut st, ids[1]), "the one slot is taken");
        assert!(!ask_for_slot(&mut st, ids[1]), "asking again");
        assert!(!ask_for_slot(&mut st, ids[2]));
        assert_eq!(
            st.waiting_for_slot.iter().copied().collect::<Vec<_>>(),
            [ids[1], ids[2]],
            "in line once each, in order"
        );
        assert_eq!(st.peers.values().filter(|p| p.unchoked).count(), 1);
        assert!(st.peers.values().all(|p| p.interested_in_us));
        // The slot freed goes to the longest waiting, who hears of it.
        take_back_slot(&mut st, ids[0]);
        assert!(grant_next_slot(&mut st));
        assert!(st.peers[&ids[1]].unchoked && !st.peers[&ids[2]].unchoked);
        assert!(matches!(rxs[1].try_recv(), Ok(Cmd::Unchoke)));
        assert!(!grant_next_slot(&mut st), "no slot free");
    }

    /// A peer that left the line (no longer interested) and asks again when a slot is free
    /// takes it, and its old place goes: when its slot is taken back it waits behind those
    /// who waited meanwhile, once. Its old place used to stay, so it went first again, and
    /// counted twice among the waiting when slots rotated.
    #[tokio::test]
    async fn a_slot_taken_back_goes_to_the_back_of_the_line_once() {
        let dir = tempfile::tempdir().unwrap();
        let t = torrent(dir.path(), Bitfield::new);
        let (ids, _rxs) = connect(&t, 3);
        let (a, b, c) = (ids[0], ids[1], ids[2]);
        let mut st = t.state();
        st.slots = 1;
        assert!(ask_for_slot(&mut st, a));
        assert!(!ask_for_slot(&mut st, b));
        // B loses interest while waiting (the `NotInterested` handler), and a slot opens.
        st.peers.get_mut(&b).unwrap().interested_in_us = false;
        st.slots = 2;
        assert!(
            ask_for_slot(&mut st, b),
            "B is back and takes the free slot"
        );
        assert_eq!(st.peers[&b].waiting_since, None);
        assert!(!ask_for_slot(&mut st, c));
        assert_eq!(st.waiting_for_slot.iter().copied().collect::<Vec<_>>(), [c]);
        take_back_slot(&mut st, b);
        assert_eq!(
            st.waiting_for_slot.iter().copied().collect::<Vec<_>>(),
            [c, b],
            "B behind C, once"
        );
        assert!(grant_next_slot(&mut st));
        assert!(st.peers[&c].unchoked && !st.peers[&b].unchoked);
        // However often it is taken back, it has one place.
        take_back_slot(&mut st, a);
        take_back_slot(&mut st, a);
        assert_eq!(
            st.waiting_for_slot.iter().copied().collect::<Vec<_>>(),
            [b, a]
        );
    }

    /// A freed slot goes to the longest waiting, unless some waiting peer is far behind the
    /// others (a sixteenth of the package under their median): then to the one with the
    /// fewest pieces, the longest waiting of equals. One that waited [`MAX_SLOT_WAIT`] goes
    /// first whatever it has, so peers that claim nothing cannot keep the others out.
    #[tokio::test(start_paused = true)]
    async fn a_free_slot_goes_to_a_peer_far_behind() {
        let dir = tempfile::tempdir().unwrap();
        let t = torrent(dir.path(), Bitfield::new);
        let pieces = t.meta.num_pieces();
        assert_eq!(pieces, 32, "a sixteenth is 2 pieces");
        let hold = |t: &Torrent, id: ConnId, n: u32| {
            let mut have = Bitfield::new(pieces);
            (0..n).for_each(|i| _ = have.set(i));
            t.state().peers.get_mut(&id).unwrap().bitfield = have;
        };
        // Seven peers; 0 holds the one slot, 1-5 wait in that order, 6 comes later.
        let (ids, mut rxs) = connect(&t, 7);
        for (&id, held) in ids.iter().zip([20u32, 20, 12, 16, 12, 20, 0]) {
            hold(&t, id, held);
        }
        {
            let mut st = t.state();
            st.slots = 1;
            assert!(ask_for_slot(&mut st, ids[0]));
            for &id in &ids[1..6] {
                assert!(!ask_for_slot(&mut st, id));
            }
        }
        // `from`'s slot taken back and given again: who holds it now.
        let rotate = |from: ConnId| -> Vec<ConnId> {
            let mut st = t.state();
            take_back_slot(&mut st, from);
            assert!(grant_next_slot(&mut st));
            st.peers
                .iter()
                .filter(|p| p.1.unchoked)
                .map(|p| *p.0)
                .collect()
        };
        // The median of the seven holds 16: 2 and 4, with 12 each, are far behind (3, with
        // 16, is not), and 2 waited longer.
        assert_eq!(rotate(ids[0]), [ids[2]]);
        assert!(matches!(rxs[2].try_recv(), Ok(Cmd::Unchoke)));
        // Its slot taken back, 2 is behind 4 in line.
        assert_eq!(rotate(ids[2]), [ids[4]]);
        // An even crowd: first come, first served.
        for &id in &ids[2..5] {
            hold(&t, id, 20);
        }
        assert_eq!(rotate(ids[4]), [ids[1]]);
        // One with nothing joins the line and goes ahead of everyone, turn after turn...
        assert!(!ask_for_slot(&mut t.state(), ids[6]));
        assert_eq!(rotate(ids[1]), [ids[6]]);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(rotate(ids[6]), [ids[6]], "still far behind");
        // ...until the longest waiting (3, in line since the start) has waited its limit.
        tokio::time::advance(MAX_SLOT_WAIT - Duration::from_secs(5)).await;
        assert_eq!(rotate(ids[6]), [ids[3]]);
        let mut st = t.state();
        assert_eq!(st.peers[&ids[3]].waiting_since, None);
        // Peers no longer interested leave the line; nobody waiting, nothing granted.
        for p in st.peers.values_mut() {
            p.interested_in_us = false;
        }
        take_back_slot(&mut st, ids[3]);
        assert!(!grant_next_slot(&mut st));
        assert!(st.waiting_for_slot.is_empty());
    }

    /// Upload slots follow the rate uploaded, one per `upload_slot_rate`, between
    /// [`MIN_UPLOAD_SLOTS`] and `upload_slots`: the longest held close first, the longest
    /// waiting open first, and a measure needs 2 s.
    #[tokio::test(start_paused = true)]
    async fn upload_slots_follow_the_upload_rate() {
        let dir = tempfile::tempdir().unwrap();
        let t = torrent(dir.path(), Bitfield::new);
        let per_slot = t.ctx.config.upload_slot_rate.unwrap();
        assert_eq!(t.ctx.config.upload_slots, 32);
        // 40 interested peers: the first 32 hold slots, got one after another; 8 wait.
        let (ids, rxs) = connect(&t, 40);
        for (n, &id) in ids.iter().enumerate() {
            {
                let mut st = t.state();
                let s = st.peers.get_mut(&id).unwrap();
                s.interested_in_us = true;
                if n < 32 {
                    s.unchoked = true;
                    s.unchoked_at = Some(Instant::now());
                } else {
                    st.waiting_for_slot.push_back(id);
                }
            }
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        let mut peers: Vec<_> = ids.into_iter().zip(rxs).collect();
        let unchoked = |t: &Torrent| -> Vec<ConnId> {
            let st = t.state();
            let mut v: Vec<ConnId> = st
                .peers
                .iter()
                .filter(|p| p.1.unchoked)
                .map(|p| *p.0)
                .collect();
            v.sort_unstable();
            v
        };
        let told = |peers: &mut Vec<(ConnId, mpsc::UnboundedReceiver<Cmd>)>| {
            let (mut choked, mut unchoked) = (Vec::new(), Vec::new());
            for (id, rx) in peers.iter_mut() {
                while let Ok(cmd) = rx.try_recv() {
                    match cmd {
                        Cmd::Choke => choked.push(*id),
                        Cmd::Unchoke => unchoked.push(*id),
                        _ => {}
                    }
                }
            }
            (choked, unchoked)
        };
        let ids: Vec<ConnId> = peers.iter().map(|p| p.0).collect();

        // Under 2 s since the torrent started: no measure yet.
        t.count_wire(0, per_slot);
        t.size_slots();
        assert_eq!(unchoked(&t).len(), 32);

        // Under one slot's worth over the window: down to the floor, the longest held close.
        let floor = MIN_UPLOAD_SLOTS;
        tokio::time::advance(Duration::from_secs(2)).await;
        t.size_slots();
        assert_eq!(t.state().slots, floor);
        assert_eq!(unchoked(&t), ids[32 - floor..32]);
        let (choked, opened) = told(&mut peers);
        assert_eq!(choked, ids[..32 - floor]);
        assert!(opened.is_empty());

        // Nothing uploaded since: no measure, no change.
        tokio::time::advance(Duration::from_secs(3)).await;
        t.size_slots();
        assert_eq!(t.state().slots, floor);

        // 20 slots' worth over 2 s: more open, to those who waited longest (the 8 that never
        // had one, then the first closed).
        t.count_wire(0, 40 * per_slot);
        tokio::time::advance(Duration::from_secs(2)).await;
        t.size_slots();
        assert_eq!(t.state().slots, 20);
        let (choked, opened) = told(&mut peers);
        assert!(choked.is_empty());
        let reopened = 20 - floor - 8;
        let mut want: Vec<ConnId> = ids[..reopened]
            .iter()
            .chain(&ids[32..40])
            .copied()
            .collect();
        assert_eq!(opened, want);
        want.extend(&ids[32 - floor..32]);
        want.sort_unstable();
        assert_eq!(unchoked(&t), want);

        // A slot freed while at the limit goes to the next in line; past it, to nobody.
        {
            let mut st = t.state();
            assert!(!grant_next_slot(&mut st), "every slot is taken");
            st.peers.get_mut(&ids[32 - floor]).unwrap().unchoked = false;
            assert!(grant_next_slot(&mut st));
        }
        assert_eq!(told(&mut peers).1, [ids[reopened]]);

        // Far more than 32 slots' worth: capped at `upload_slots`.
        t.count_wire(0, 1000 * per_slot);
        tokio::time::advance(Duration::from_secs(2)).await;
        t.size_slots();
        assert_eq!(t.state().slots, 32);
        assert_eq!(unchoked(&t).len(), 32);
    }

    /// Packages busy uploading at once share the host's slots: two get 16 each, four 8, and
    /// never fewer than [`MIN_UPLOAD_SLOTS`]; one that trickles takes no share, and one that
    /// stopped leaves its share after [`SHARE_WINDOW`].
    #[tokio::test(start_paused = true)]
    async fn packages_busy_at_once_share_the_slots() {
        let dir = tempfile::tempdir().unwrap();
        let t = torrent(dir.path(), Bitfield::new);
        let per_slot = t.ctx.config.upload_slot_rate.unwrap();
        let other = |n: u8| InfoHash([n; 20]);
        // The others' measures, busy or not, then ours of `slots_worth` over 2 s.
        let measure = |others: &[(u8, bool)], slots_worth: u64| {
            for &(n, busy) in others {
                t.ctx.uploading.note(other(n), busy, Instant::now());
            }
            t.count_wire(0, 2 * slots_worth * per_slot);
            t.size_slots();
            t.state().slots
        };
        let busy = |ns: &[u8]| ns.iter().map(|&n| (n, true)).collect::<Vec<_>>();
        let step = || tokio::time::advance(Duration::from_secs(2));
        step().await;
        assert_eq!(measure(&[], 1000), 32, "alone: every slot");
        step().await;
        assert_eq!(measure(&busy(&[1]), 1000), 16, "two packages busy");
        step().await;
        assert_eq!(measure(&busy(&[1, 2, 3]), 1000), 8, "four");
        step().await;
        let eight = busy(&[1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(measure(&eight, 1000), MIN_UPLOAD_SLOTS, "eight: the floor");
        // The others trickle now: they give their shares back at once.
        step().await;
        let trickles: Vec<(u8, bool)> = (1..=7).map(|n| (n, false)).collect();
        assert_eq!(measure(&trickles, 1000), 32);
        // One busy again, then silent: its share comes back once the window is over.
        step().await;
        assert_eq!(measure(&busy(&[1]), 1000), 16);
        tokio::time::advance(SHARE_WINDOW + Duration::from_secs(1)).await;
        assert_eq!(measure(&[], 1000), 32);
        // We trickle (2 slots' worth): the floor, and no share taken from another package.
        step().await;
        assert_eq!(measure(&[], 2), MIN_UPLOAD_SLOTS);
        assert_eq!(t.ctx.uploading.note(other(1), true, Instant::now()), 1);
    }

    /// `min_upload_slots` is the floor: set to 6, a package uploading 3 slots' worth keeps 6,
    /// one uploading 9 keeps 9, two busy at once get 16 each, and eight get 6 each, not 32 / 8.
    #[tokio::test(start_paused = true)]
    async fn the_floor_is_min_upload_slots() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = EngineConfig::new(dir.path().join("work"));
        assert_ne!(
            config.min_upload_slots, 6,
            "the test sets a floor of its own"
        );
        config.min_upload_slots = 6;
        let t = torrent_with(dir.path(), Bitfield::new, config);
        let per_slot = t.ctx.config.upload_slot_rate.unwrap();
        let measure = |slots_worth: u64, busy: &[u8]| {
            for &n in busy {
                t.ctx
                    .uploading
                    .note(InfoHash([n; 20]), true, Instant::now());
            }
            t.count_wire(0, 2 * slots_worth * per_slot);
            t.size_slots();
            t.state().slots
        };
        let step = || tokio::time::advance(Duration::from_secs(2));
        step().await;
        assert_eq!(measure(3, &[]), 6, "the floor");
        step().await;
        assert_eq!(measure(9, &[]), 9, "above the floor");
        step().await;
        assert_eq!(measure(1000, &[1]), 16, "two busy: 32 / 2");
        step().await;
        assert_eq!(
            measure(1000, &[1, 2, 3, 4, 5, 6, 7]),
            6,
            "eight busy: the floor"
        );
    }
}
