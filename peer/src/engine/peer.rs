//! One peer connection: a single task that reads, writes and keeps time for its socket.
//!
//! The task owns the socket and a write buffer; `select!` interleaves reading messages,
//! writing queued bytes, commands from the torrent, and a one-second housekeeping tick.
//! Uploads are read from storage only as the write buffer drains, so a peer asking for many
//! blocks costs a queue of 12-byte requests, not memory for the data.
//!
//! Disk I/O that can wait on a device never runs on the reactor: the blocks of one socket read
//! go together, as one batch, to the download's writer (`writer.rs`: one blocking task at a time
//! per file; at most [`MAX_PENDING_WRITES`] batches queued per connection, past that the socket
//! is not read; a task per block cost 60% more CPU per GiB), and uploads are read one batch at
//! a time: here when that cannot wait (the files are open and in memory or in the page cache,
//! `PackageData::read_cached`), otherwise on the blocking pool, as are batches whose pieces
//! must be checked first or that are compressed. A connection that ends waits for its writes,
//! so a block is never left half-claimed.
//!
//! Bounded by construction: the write buffer past [`READ_PAUSE`] stops reading (a peer that
//! requests and never reads cannot make us queue answers without bound), and a write buffer
//! that no byte leaves for `write_stall` (engine settings) ends the connection.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use fbpkg_common::bitfield::Bitfield;
use fbpkg_common::metainfo::BLOCK_SIZE;
use fbpkg_common::wire::{
    BlockRef, DEFAULT_MAX_MESSAGE, Handshake, Message, PIECE_HEADER_LEN, ext,
};
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinError, JoinHandle};
use tokio::time::Instant;

use super::EngineConfig;
use super::picker::{Arrival, ConnId};
use super::superseed::{SPREAD, Spread};
use super::torrent::{Cmd, Phase, Refusal, Torrent, ask_for_slot, grant_next_slot};
use super::writer::{Blocks, Writer, Written};
use super::zstream::{BatchEncoder, Dictionary, StreamDecoder};

/// Stop filling the write buffer from storage beyond this many bytes.
const WRITE_HIGH_WATER: usize = 96 << 10;
/// Stop reading from the peer while this much waits to be written to it.
pub(crate) const READ_PAUSE: usize = 256 << 10;
/// Batches of received blocks being written to disk at once, per connection.
const MAX_PENDING_WRITES: usize = 4;
/// Most requests a peer may queue with us; more are rejected (fast) or dropped. Also the most
/// we keep queued at another agent.
const MAX_QUEUED_UPLOADS: usize = 512;
/// Super-seeding: pieces offered to a peer before it is unchoked.
const GREETING_OFFERS: usize = 2;
/// `v` of our extension handshake.
const EXT_VERSION: &str = concat!("fbpkg-rs ", env!("CARGO_PKG_VERSION"));
/// Most requests we keep queued at a stock client until its extension handshake says its own
/// `reqq` (and for good, when it sends none): the default BEP 10 gives, libtorrent's. Requests
/// past a client's queue may be dropped and wait for `request_timeout`.
const STOCK_REQUEST_QUEUE: usize = 250;
/// Largest block a peer may ask for.
const MAX_REQUEST: u32 = 128 << 10;
/// Disconnect a peer that sends nothing for this long (keep-alives count).
const IDLE_TIMEOUT: Duration = Duration::from_secs(180);
/// Request timeouts in a row, with no block asked for arriving between them, after which a
/// peer is let go: it says it has pieces and answers no request for them.
const MOST_TIMEOUTS: u32 = 3;
/// Send a keep-alive when we have written nothing for this long.
const KEEPALIVE: Duration = Duration::from_secs(60);
/// Least time between two writes of `have`s alone to one peer: a `have` for a piece we
/// verified goes at once, unless one went less than this ago; then it waits for the rest of
/// it, or goes with any other message sent meanwhile. Sent alone, each was a write and a
/// packet of its own: in B5 (24 hosts, 4 packages) nine in ten of an agent's `sendto`s were 9
/// to 18 bytes, about 78,000 a second on the machine, and the network's per-packet work was
/// most of the agents' CPU. Holding every `have` for 25 ms instead cost B1 half a second
/// (30.1 s against 29.4 s over three alternating runs): a piece's news reaches the crowd later.
const HAVE_SPACING: Duration = Duration::from_millis(25);
/// Pending `have`s that go out at once, without waiting for [`HAVE_SPACING`].
const HAVES_AT_ONCE: usize = 64;
/// Commands handled in one turn of a connection's loop: a burst of `have`s (every piece we
/// verify is one for every connection) goes in one turn rather than one turn each.
const CMDS_AT_ONCE: usize = 64;

/// Why a connection ended.
#[derive(Debug)]
enum End {
    Closed,
    Io(io::Error),
    Protocol(String),
    Told(&'static str),
    /// It said it had pieces and answered none of [`MOST_TIMEOUTS`] requests in a row.
    Unanswered,
    Cancelled,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Closed => f.write_str("closed by peer"),
            End::Io(e) => write!(f, "I/O error: {e}"),
            End::Protocol(why) => write!(f, "protocol violation: {why}"),
            End::Told(why) => f.write_str(why),
            End::Unanswered => f.write_str("answered no request"),
            End::Cancelled => f.write_str("shutting down"),
        }
    }
}

/// What a connection came to (for the dial backoff).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Session {
    /// Piece data moved either way.
    pub moved_data: bool,
    /// The peer broke the protocol or answered no request: dialled again only after a
    /// backoff, however long it lasted or whatever it sent first.
    pub faulty: bool,
    /// From the handshake to the end.
    pub lasted: Duration,
}

struct Conn {
    t: Arc<Torrent>,
    id: ConnId,
    addr: SocketAddr,
    fast: bool,
    /// The id under which the peer takes compressed blocks (its extension handshake offered
    /// `fbpkg_zblock`): fbpkg-rs agents do, stock clients do not.
    zblock: Option<u8>,
    /// The compressed batch this peer is sending us, if one is open.
    zin: StreamDecoder,
    /// The package's compression dictionary, offered to a peer that is one of our agents
    /// (its frames may then need it), and whether that peer said it holds the same one
    /// (batches for it are then compressed with it).
    zdict: Option<Arc<Dictionary>>,
    zdict_shared: bool,
    /// The peer speaks BEP 10: it gets our extension handshake and may send its `reqq`. Our
    /// own agents exchange it too, for compressed blocks and the dictionary (`zblock`,
    /// `zdict`); they skipped it once, when it carried only the queue length they already
    /// know of each other, and B1 measured a second slower with it (eta 0.87–0.90 against
    /// 0.90–0.92, before compressed blocks).
    extended: bool,
    /// The peer is an fbpkg-rs agent ([`super::is_ours`]).
    ours: bool,
    wbuf: BytesMut,
    /// `have`s of pieces we verified, not yet in `wbuf`.
    haves: PendingHaves,
    peer_choking: bool,
    am_interested: bool,
    am_choking: bool,
    peer_interested: bool,
    /// Our requests not yet answered, and when each was sent.
    in_flight: HashMap<(u32, u32), Instant>,
    /// Request timeouts in a row with no block asked for arriving since: while above zero,
    /// the peer is asked for one block at a time (the blocks that timed out are for others).
    timeouts: u32,
    /// When the last of them was counted: one per `request_timeout` at most, however many
    /// requests (sent a tick apart) went stale since.
    last_timeout: Option<Instant>,
    /// Most requests this peer takes queued.
    peer_queue: usize,
    /// Smoothed seconds the peer takes to answer a request that is next in line: from the
    /// later of its sending and the previous block's arrival, to its block's arrival. See
    /// [`Conn::depth`].
    latency: f64,
    /// The longest such wait in this second.
    latency_peak: f64,
    /// When the last block we asked for arrived.
    last_block_at: Instant,
    uploads: VecDeque<BlockRef>,
    /// Pieces advertised to this peer: offered, while super-seeding; downloading, those it
    /// heard of, which a `have-all` completes once we hold every piece (`Cmd::HaveAll`).
    advertised: Bitfield,
    super_seeding: bool,
    down_tick: u64,
    up_tick: u64,
    /// Piece data moved in a past second.
    moved_data: bool,
    down_rate: f64,
    /// Bytes received in the last full second.
    down_last: f64,
    up_rate: f64,
    last_recv: Instant,
    last_send: Instant,
    /// Upload budget exhausted until then.
    throttled_until: Option<Instant>,
    /// A capped download waits for budget to request more.
    requests_throttled_until: Option<Instant>,
    /// Batches of received blocks queued for the download's writer.
    writes: FuturesUnordered<oneshot::Receiver<Written>>,
    /// Blocks received in this read, written together once it is decoded.
    to_write: Blocks,
    /// The batch of uploads being read from disk, if any.
    reading: Option<JoinHandle<UploadBatch>>,
    /// The last time the write buffer was empty or a byte of it was sent.
    write_progress: Instant,
}

/// `have`s of pieces we verified, waiting to go out together: at once when none went out in
/// the last [`HAVE_SPACING`], else with the next other message, once [`HAVES_AT_ONCE`] wait,
/// or when that spacing is over.
#[derive(Debug, Default)]
struct PendingHaves {
    buf: BytesMut,
    count: usize,
    /// When they go out at the latest.
    due: Option<Instant>,
    /// When `have`s last went out.
    sent: Option<Instant>,
}

impl PendingHaves {
    fn push(&mut self, i: u32, now: Instant) {
        Message::Have(i).encode(&mut self.buf);
        self.count += 1;
        if self.due.is_none() {
            let next = self.sent.map_or(now, |s| s + HAVE_SPACING);
            self.due = Some(next.max(now));
        }
    }

    /// Whether they go out now, `other` bytes being about to be written or not (later, the
    /// connection's timer sends them when due).
    fn go_with(&self, other: bool, now: Instant) -> bool {
        self.count > 0
            && (other || self.count >= HAVES_AT_ONCE || self.due.is_some_and(|d| d <= now))
    }

    fn drain_into(&mut self, wbuf: &mut BytesMut, now: Instant) {
        if self.count == 0 {
            return;
        }
        wbuf.extend_from_slice(&self.buf);
        self.buf.clear();
        self.count = 0;
        self.due = None;
        self.sent = Some(now);
    }

    /// Drop those waiting: a `have-all` says them all.
    fn discard(&mut self) {
        self.buf.clear();
        self.count = 0;
        self.due = None;
    }
}

/// Blocks read for upload: the encoded `piece` messages, or the read error.
struct UploadBatch {
    blocks: Vec<BlockRef>,
    encoded: io::Result<BytesMut>,
    /// Block bytes in `encoded` (compressed blocks at their compressed size).
    wire: u64,
    /// Pieces checked against their SHA-1 first, and found good.
    checked: Vec<u32>,
    /// A piece whose bytes on disk do not match its SHA-1.
    corrupt: Option<u32>,
}

/// Append the header of `b`'s `piece` message to `out`, and room for its bytes (zeros): where
/// they start.
fn append_piece(out: &mut BytesMut, b: &BlockRef) -> usize {
    Message::encode_piece_header(b.index, b.begin, b.length as usize, out);
    let at = out.len();
    out.resize(at + b.length as usize, 0);
    at
}

/// Run a connection whose handshakes are done. `leftover` holds bytes read past the handshake.
pub(crate) async fn run(
    t: Arc<Torrent>,
    mut stream: TcpStream,
    theirs: Handshake,
    addr: SocketAddr,
    outgoing: bool,
    leftover: BytesMut,
) -> Session {
    let started = Instant::now();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let id = match t.register(theirs.peer_id, addr, outgoing, tx) {
        Ok(id) => id,
        Err(r) => {
            if r != Refusal::Duplicate {
                tracing::debug!(package = %t.name, peer = %addr, refusal = ?r, "connection refused");
            }
            return Session {
                moved_data: false,
                faulty: false,
                lasted: started.elapsed(),
            };
        }
    };
    let _ = stream.set_nodelay(true);
    let n = t.meta.num_pieces();
    let now = started;
    let ours = super::is_ours(&theirs.peer_id);
    let mut c = Conn {
        t: t.clone(),
        id,
        addr,
        fast: theirs.supports_fast(),
        extended: theirs.supports_extended(),
        zblock: None,
        zin: StreamDecoder::default(),
        // Stock clients have no use for it, and need not make us prepare it.
        zdict: if ours { t.zdict() } else { None },
        zdict_shared: false,
        ours,
        wbuf: BytesMut::with_capacity(WRITE_HIGH_WATER + (32 << 10)),
        haves: PendingHaves::default(),
        peer_choking: true,
        am_interested: false,
        am_choking: true,
        peer_interested: false,
        in_flight: HashMap::new(),
        timeouts: 0,
        last_timeout: None,
        peer_queue: if ours {
            MAX_QUEUED_UPLOADS
        } else {
            STOCK_REQUEST_QUEUE
        },
        latency: 0.0,
        latency_peak: 0.0,
        last_block_at: now,
        uploads: VecDeque::new(),
        advertised: Bitfield::new(n),
        super_seeding: false,
        down_tick: 0,
        up_tick: 0,
        moved_data: false,
        down_rate: 0.0,
        down_last: 0.0,
        up_rate: 0.0,
        last_recv: now,
        last_send: now,
        throttled_until: None,
        requests_throttled_until: None,
        writes: FuturesUnordered::new(),
        to_write: Vec::new(),
        reading: None,
        write_progress: now,
    };
    tracing::debug!(package = %t.name, peer = %addr, outgoing, "peer connected");
    let end = c.drive(&mut stream, &mut rx, leftover).await;
    // Blocks claimed by this connection are written before it lets go of them.
    let _ = c.write_blocks();
    while let Some(done) = c.writes.next().await {
        let _ = c.on_written(done);
    }
    match &end {
        End::Closed | End::Cancelled | End::Told(_) => {
            tracing::debug!(package = %t.name, peer = %addr, reason = %end, "peer disconnected")
        }
        End::Io(_) | End::Protocol(_) | End::Unanswered => {
            tracing::debug!(package = %t.name, peer = %addr, reason = %end, "peer dropped")
        }
    }
    t.unregister(id);
    Session {
        moved_data: c.moved_data || c.down_tick > 0 || c.up_tick > 0,
        faulty: matches!(end, End::Protocol(_) | End::Unanswered),
        lasted: started.elapsed(),
    }
}

/// Requests to keep in flight at a peer that sends `rate` bytes a second and takes `latency`
/// seconds to answer a request that is next in line: the bandwidth-delay product, plus a refill.
///
/// The delay is `request_window`, or twice `latency` if that is longer (up to
/// `max_request_window`). A peer that answers in batches (transmission: every ~500 ms) needs a
/// batch's worth of requests waiting at each batch; with only `request_window` of the rate, the
/// rate measured is limited by the window itself and neither grows.
///
/// `latency` leaves out the time a request waits behind our own earlier requests: with that
/// counted, the mean latency of a full pipe is `in_flight / rate` (Little's law), a window of
/// twice that is twice the window, and every connection would grow to the cap (queueing
/// seconds of requests at slow peers, until they time out).
///
/// `rate` is the larger of the smoothed rate and the last second's: the smoothed one lags a
/// window that grows every second (on a seed answering every 500 ms, 16 to 250 requests took
/// 11 s on the smoothed rate alone, 6 s with the last second's).
///
/// The floor, `min_queue_depth`, is 4 blocks. It was 16 (256 KiB) at every peer however
/// slowly it sent: in `b3`, with 48 connections each, every host was in the endgame with ~12
/// MB to go, and a block asked of a 5 Mbit/s host waited seconds behind others' requests.
/// A fast peer's rate lifts its depth within a second or two.
fn request_depth(cfg: &EngineConfig, rate: f64, latency: f64, peer_queue: usize) -> usize {
    let window = cfg.request_window.as_secs_f64();
    let horizon = (2.0 * latency)
        .min(cfg.max_request_window.as_secs_f64())
        .max(window);
    let by_rate = (rate * horizon / f64::from(BLOCK_SIZE)) as usize;
    let cap = cfg.max_queue_depth.min(peer_queue);
    (by_rate + 4).min(cap).max(cfg.min_queue_depth.min(cap))
}

async fn sleep_until_some(t: Option<Instant>) {
    if let Some(t) = t {
        tokio::time::sleep_until(t).await;
    }
}

async fn join_some<T>(h: &mut Option<JoinHandle<T>>) -> Result<T, JoinError> {
    match h {
        Some(h) => h.await,
        None => std::future::pending().await,
    }
}

impl Conn {
    async fn drive(
        &mut self,
        stream: &mut TcpStream,
        rx: &mut mpsc::UnboundedReceiver<Cmd>,
        mut rbuf: BytesMut,
    ) -> End {
        let (mut rd, mut wr) = stream.split();
        self.greet();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let cancel = self.t.cancel.clone();
        // Made once: made afresh in every turn of the loop, each registered with the torrent's
        // token (or the timer) when polled and left it again when dropped.
        let cancelled = cancel.cancelled();
        tokio::pin!(cancelled);
        let haves_timer = tokio::time::sleep_until(Instant::now());
        tokio::pin!(haves_timer);
        rbuf.reserve(64 << 10);
        loop {
            // Messages already buffered (from the handshake read, or a large read).
            loop {
                match Message::decode(&mut rbuf, DEFAULT_MAX_MESSAGE) {
                    Ok(Some(m)) => {
                        if let Err(e) = self.on_message(m) {
                            return e;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return End::Protocol(e.to_string()),
                }
            }
            if let Err(e) = self.write_blocks() {
                return e;
            }
            if let Err(e) = self.pump_uploads() {
                return e;
            }
            // Pending `have`s ride with whatever else goes out now.
            if self.haves.count > 0 {
                let now = Instant::now();
                if self.haves.go_with(!self.wbuf.is_empty(), now) {
                    self.haves.drain_into(&mut self.wbuf, now);
                }
            }
            if rbuf.capacity() - rbuf.len() < 16 << 10 {
                rbuf.reserve(64 << 10);
            }
            // Re-armed when the deadline moves (each new one is later than the last).
            if let Some(due) = self.haves.due
                && haves_timer.deadline() != due
            {
                haves_timer.as_mut().reset(due);
            }
            let can_read = self.wbuf.len() < READ_PAUSE && self.writes.len() < MAX_PENDING_WRITES;
            tokio::select! {
                _ = &mut cancelled => return End::Cancelled,
                r = rd.read_buf(&mut rbuf), if can_read => match r {
                    Ok(0) => return End::Closed,
                    Ok(_) => self.last_recv = Instant::now(),
                    Err(e) => return End::Io(e),
                },
                r = wr.write(&self.wbuf), if !self.wbuf.is_empty() => match r {
                    Ok(0) => return End::Closed,
                    Ok(n) => {
                        let _ = self.wbuf.split_to(n);
                        self.last_send = Instant::now();
                        self.write_progress = self.last_send;
                    }
                    Err(e) => return End::Io(e),
                },
                Some(done) = self.writes.next(), if !self.writes.is_empty() => {
                    if let Err(e) = self.on_written(done) {
                        return e;
                    }
                }
                done = join_some(&mut self.reading), if self.reading.is_some() => {
                    self.reading = None;
                    if let Err(e) = self.on_read(done) {
                        return e;
                    }
                }
                cmd = rx.recv() => match cmd {
                    None => return End::Cancelled,
                    Some(cmd) => if let Err(e) = self.on_cmds(cmd, rx) { return e },
                },
                _ = tick.tick() => if let Err(e) = self.housekeeping() { return e },
                _ = sleep_until_some(self.throttled_until), if self.throttled_until.is_some() => {
                    self.throttled_until = None;
                }
                _ = &mut haves_timer, if self.haves.due.is_some() => {
                    self.haves.drain_into(&mut self.wbuf, Instant::now());
                }
                _ = sleep_until_some(self.requests_throttled_until), if self.requests_throttled_until.is_some() => {
                    self.requests_throttled_until = None;
                    self.fill_requests();
                }
            }
        }
    }

    fn send(&mut self, m: &Message) {
        m.encode(&mut self.wbuf);
    }

    /// Tell the peer we have piece `i`: at once, or with others ([`HAVE_SPACING`]).
    /// (Super-seeding offers are `have`s too, but they always go at once: a peer waits for
    /// them.)
    fn have_later(&mut self, i: u32) {
        if self.advertised.set(i) {
            self.haves.push(i, Instant::now());
        }
    }

    /// First messages: what we have, or (super-seeding) a first few offers.
    fn greet(&mut self) {
        let seeding = matches!(self.t.current_phase(), Phase::Seeding(_));
        let mut st = self.t.state();
        let have = st.picker.have().clone();
        let order = st.offer_order();
        let offers = match st.planner.as_mut() {
            // Only our own agents are rationed: they ask for an advertised piece at once. Some
            // stock clients (librqbit 9) only look for new pieces every few seconds when a
            // `have` arrives, and would crawl; they get everything advertised.
            Some(planner) if seeding && self.ours => {
                self.super_seeding = true;
                Some(planner.offers(self.id, GREETING_OFFERS, Instant::now(), order))
            }
            _ => None,
        };
        drop(st);
        match offers {
            Some(offers) => {
                if self.fast {
                    self.send(&Message::HaveNone);
                }
                self.advertise(&offers);
            }
            None => {
                if have.is_complete() && self.fast {
                    self.send(&Message::HaveAll);
                } else if have.count() > 0 {
                    self.send(&Message::Bitfield(bytes::Bytes::copy_from_slice(
                        have.as_bytes(),
                    )));
                } else if self.fast {
                    self.send(&Message::HaveNone);
                }
                for i in have.ones() {
                    self.advertised.set(i);
                }
            }
        }
        if self.extended {
            // After the bitfield, as libtorrent does: some clients want that first.
            self.send(&Message::Extended {
                id: ext::HANDSHAKE_ID,
                payload: ext::handshake(
                    MAX_QUEUED_UPLOADS as u32,
                    EXT_VERSION,
                    self.zdict.as_ref().map(|d| d.fingerprint()),
                )
                .into(),
            });
        }
    }

    fn advertise(&mut self, pieces: &[u32]) {
        for &i in pieces {
            if self.advertised.set(i) {
                self.send(&Message::Have(i));
            }
        }
    }

    /// `first` and the commands queued behind it, up to [`CMDS_AT_ONCE`]. Whether we are still
    /// interested in the peer is asked once for a run of `have`s, not after each.
    fn on_cmds(&mut self, first: Cmd, rx: &mut mpsc::UnboundedReceiver<Cmd>) -> Result<(), End> {
        let mut haves = false;
        let mut next = Some(first);
        let mut done = 0;
        while let Some(cmd) = next {
            if matches!(cmd, Cmd::Have(_)) {
                haves = true;
            } else if std::mem::take(&mut haves) {
                self.update_interest();
            }
            self.on_cmd(cmd)?;
            done += 1;
            next = if done < CMDS_AT_ONCE {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if haves {
            self.update_interest();
        }
        Ok(())
    }

    /// One command. A `have` leaves asking whether we are still interested to [`Self::on_cmds`].
    fn on_cmd(&mut self, cmd: Cmd) -> Result<(), End> {
        match cmd {
            Cmd::Have(i) => {
                if !self.super_seeding {
                    self.have_later(i);
                }
            }
            Cmd::HaveAll => {
                // What was withheld from the peer (`Torrent::broadcast_have`), said at once.
                // `advertised` counts `have`s still pending here, and the last piece's `Have`
                // comes before this on the channel, so a peer nothing was withheld from (every
                // stock client) is complete already and hears nothing more. Only our agents
                // get a late `have-all`: BEP 6 puts it first, and a stock client may take one
                // for a protocol error. One without the fast extension gets the `have`s.
                if !self.super_seeding && !self.advertised.is_complete() {
                    if self.ours && self.fast {
                        self.haves.discard();
                        self.send(&Message::HaveAll);
                        self.advertised = Bitfield::full(self.t.meta.num_pieces());
                    } else {
                        let have = self.t.state().picker.have().clone();
                        for i in have.ones() {
                            self.have_later(i);
                        }
                    }
                }
            }
            Cmd::AdvertiseAll => {
                self.super_seeding = false;
                let have = self.t.state().picker.have().clone();
                let missing: Vec<u32> = have.ones().filter(|&i| !self.advertised.get(i)).collect();
                self.advertise(&missing);
            }
            Cmd::Cancel(b) => {
                if self.in_flight.remove(&(b.index, b.begin)).is_some() {
                    self.send(&Message::Cancel(b));
                    // An endgame duplicate that lost its race: ask for more now rather than at
                    // the next block or tick (a queue of lost duplicates gets neither).
                    self.fill_requests();
                }
            }
            Cmd::Unchoke => {
                if self.am_choking {
                    self.am_choking = false;
                    self.send(&Message::Unchoke);
                    self.top_up_offers();
                }
            }
            Cmd::Choke => {
                if !self.am_choking {
                    self.am_choking = true;
                    self.send(&Message::Choke);
                    for b in std::mem::take(&mut self.uploads) {
                        if self.fast {
                            self.send(&Message::Reject(b));
                        }
                    }
                    self.give_back_offers();
                }
            }
            Cmd::Refill => {
                self.fill_requests();
                self.top_up_offers();
            }
            Cmd::Disconnect(why) => return Err(End::Told(why)),
        }
        Ok(())
    }

    fn on_message(&mut self, m: Message) -> Result<(), End> {
        let n = self.t.meta.num_pieces();
        let bad = |why: &str| Err(End::Protocol(why.to_owned()));
        match m {
            Message::KeepAlive => {}
            Message::Choke => {
                self.peer_choking = true;
                if !self.fast {
                    // Without the fast extension a choke discards every pending request.
                    let mut st = self.t.state();
                    st.picker.release_conn(self.id);
                    self.in_flight.clear();
                }
            }
            Message::Unchoke => {
                self.peer_choking = false;
                self.fill_requests();
            }
            Message::Interested => {
                self.peer_interested = true;
                let grant = ask_for_slot(&mut self.t.state(), self.id);
                if grant && self.am_choking {
                    self.am_choking = false;
                    self.send(&Message::Unchoke);
                    self.top_up_offers();
                } else if !grant {
                    self.give_back_offers();
                }
            }
            Message::NotInterested => {
                self.peer_interested = false;
                let mut st = self.t.state();
                let mut freed = false;
                if let Some(s) = st.peers.get_mut(&self.id) {
                    s.interested_in_us = false;
                    freed = std::mem::replace(&mut s.unchoked, false);
                }
                if freed {
                    grant_next_slot(&mut st);
                }
                drop(st);
                if freed && !self.am_choking {
                    self.am_choking = true;
                    self.uploads.clear();
                    self.send(&Message::Choke);
                }
            }
            Message::Have(i) => {
                if i >= n {
                    return bad("have for a piece past the end");
                }
                self.peer_got(&[i]);
            }
            // BEP 3 puts the bitfield first, but aria2 sends one (or have-all) later instead of
            // haves, and libtorrent and transmission accept it: merged into what the peer has
            // (it never loses a piece), so a late have-none changes nothing.
            Message::Bitfield(bytes) => {
                let bits =
                    Bitfield::from_wire(&bytes, n).map_err(|e| End::Protocol(e.to_string()))?;
                let ones: Vec<u32> = bits.ones().collect();
                self.peer_got(&ones);
            }
            Message::HaveAll | Message::HaveNone => {
                if !self.fast {
                    return bad("fast-extension message from a peer that did not offer it");
                }
                // Once the peer holds every piece, another have-all changes nothing: skip the
                // pass over every piece (a 5-byte message must not cost one each time).
                let holds_all = || {
                    let st = self.t.state();
                    st.peers
                        .get(&self.id)
                        .is_some_and(|s| s.bitfield.is_complete())
                };
                if matches!(m, Message::HaveAll) && !holds_all() {
                    let all: Vec<u32> = (0..n).collect();
                    self.peer_got(&all);
                }
            }
            Message::Request(b) => self.on_request(b)?,
            Message::Cancel(b) => self.uploads.retain(|u| *u != b),
            Message::Piece { index, begin, data } => {
                self.t.count_wire(data.len() as u64, 0);
                self.on_block(index, begin, data)?
            }
            Message::Extended { id, payload } if id == ext::ZBLOCK_ID => {
                let (index, begin, length, frame) =
                    ext::decode_zblock(&payload).map_err(|e| End::Protocol(e.to_string()))?;
                // Exactly the block we would have asked for there, never more: bytes that
                // inflate past it are refused, never allocated.
                let expected = u64::from(self.t.meta.piece_size(index))
                    .saturating_sub(u64::from(begin))
                    .min(u64::from(BLOCK_SIZE));
                if index >= n || u64::from(length) != expected || length == 0 {
                    return bad("compressed block of the wrong size");
                }
                let data = self
                    .zin
                    .block(frame, length as usize, self.zdict.as_ref())
                    .map_err(End::Protocol)?;
                self.t.count_wire(frame.len() as u64, 0);
                self.on_block(index, begin, data.into())?
            }
            Message::Reject(b) => {
                if self.in_flight.remove(&(b.index, b.begin)).is_some() {
                    self.t.state().picker.release_block(self.id, &b);
                    self.fill_requests();
                }
            }
            Message::Suggest(_) | Message::AllowedFast(_) | Message::Port(_) => {}
            Message::Extended { id, payload } if id == ext::HANDSHAKE_ID => {
                // The queue the peer keeps for us: ask for no more than that at once.
                if let Some(reqq) = ext::reqq(&payload) {
                    self.peer_queue = reqq as usize;
                }
                self.zblock = ext::zblock_id(&payload);
                self.zdict_shared = self
                    .zdict
                    .as_ref()
                    .is_some_and(|d| ext::zdict_id(&payload) == Some(d.fingerprint()));
            }
            Message::Extended { .. } | Message::Unknown { .. } => {}
        }
        Ok(())
    }

    /// The peer now has `pieces` (bitfield, have-all, or one have), besides what it had.
    fn peer_got(&mut self, pieces: &[u32]) {
        let mut st = self.t.state();
        let mut new = Vec::with_capacity(pieces.len());
        if let Some(slot) = st.peers.get_mut(&self.id) {
            for &i in pieces {
                if slot.bitfield.set(i) {
                    new.push(i);
                }
            }
        }
        for &i in &new {
            st.picker.add_one(i);
        }
        let mut spread = Spread::Rationing;
        if let Some(planner) = st.planner.as_mut() {
            for &i in &new {
                planner.peer_has(self.id, i);
            }
            spread = planner.spread();
        }
        match spread {
            Spread::Rationing => {}
            Spread::Raised => {
                // The first pass's cost: what went out beyond one package went twice (an
                // offer that went stale, a piece that died with its holder) or to a stock
                // client, which is not rationed.
                let uploaded = self.t.uploaded();
                let packages = uploaded as f64 / self.t.meta.length.max(1) as f64;
                tracing::info!(
                    package = %self.t.name,
                    secs = format_args!("{:.1}", self.t.age().as_secs_f64()),
                    uploaded,
                    packages = format_args!("{packages:.3}"),
                    "every piece has a copy among the peers; handing out second copies"
                );
                // Offers aim for one more copy of each piece: every rationed peer may take more.
                for s in st.peers.values() {
                    let _ = s.tx.send(Cmd::Refill);
                }
            }
            Spread::Done => {
                // Every piece is out in the swarm twice: stop rationing, advertise everything.
                st.planner = None;
                for s in st.peers.values() {
                    let _ = s.tx.send(Cmd::AdvertiseAll);
                }
                tracing::info!(package = %self.t.name, copies = SPREAD, "every piece handed out; super-seeding ends");
            }
        }
        drop(st);
        self.top_up_offers();
        self.update_interest();
        self.fill_requests();
    }

    fn update_interest(&mut self) {
        let st = self.t.state();
        let want = !st.picker.is_complete()
            && st
                .peers
                .get(&self.id)
                .is_some_and(|s| st.picker.interesting(&s.bitfield));
        drop(st);
        if want != self.am_interested {
            self.am_interested = want;
            self.send(if want {
                &Message::Interested
            } else {
                &Message::NotInterested
            });
        }
    }

    fn depth(&self) -> usize {
        if self.timeouts > 0 {
            return 1;
        }
        request_depth(
            &self.t.ctx.config,
            self.down_rate.max(self.down_last),
            self.latency,
            self.peer_queue,
        )
    }

    fn fill_requests(&mut self) {
        if self.peer_choking || !self.am_interested {
            return;
        }
        let mut want = self.depth().saturating_sub(self.in_flight.len());
        if want < 4 && !self.in_flight.is_empty() {
            return;
        }
        let now = Instant::now();
        // A capped download (a prefetch) requests only what its budget pays for; the reply
        // comes at the peer's pace, so the cap holds on what arrives too.
        let limit = self.t.download_limit();
        if let Some(l) = &limit {
            match l.take_units(want, u64::from(BLOCK_SIZE)) {
                Ok(n) => want = n,
                Err(wait) => {
                    self.requests_throttled_until = Some(now + wait);
                    return;
                }
            }
        }
        let picked = {
            let mut guard = self.t.state();
            let st = &mut *guard;
            let Some(slot) = st.peers.get(&self.id) else {
                return;
            };
            st.picker
                .pick(self.id, &slot.bitfield, (want, self.in_flight.len()), now)
        };
        if let Some(l) = &limit {
            l.give_back(u64::from(BLOCK_SIZE) * (want - picked.len().min(want)) as u64);
        }
        for b in picked {
            self.in_flight.insert((b.index, b.begin), now);
            self.send(&Message::Request(b));
        }
    }

    fn on_request(&mut self, b: BlockRef) -> Result<(), End> {
        let size = self.t.meta.piece_size(b.index);
        if b.length == 0
            || b.length > MAX_REQUEST
            || u64::from(b.begin) + u64::from(b.length) > u64::from(size)
        {
            return Err(End::Protocol(format!("invalid request {b:?}")));
        }
        let reject = |c: &mut Conn| {
            if c.fast {
                c.send(&Message::Reject(b));
            }
        };
        self.apply_origin_budget();
        if self.am_choking || self.uploads.len() >= MAX_QUEUED_UPLOADS {
            reject(self);
            return Ok(());
        }
        let mut st = self.t.state();
        if !st.picker.have().get(b.index) {
            drop(st);
            reject(self);
            return Ok(());
        }
        let mut offers = Vec::new();
        let order = st.offer_order();
        if self.super_seeding
            && let Some(planner) = st.planner.as_mut()
        {
            planner.requested(self.id, b.index);
            offers = planner.offers(self.id, self.keep_open(), Instant::now(), order);
        }
        drop(st);
        self.advertise(&offers);
        self.uploads.push_back(b);
        Ok(())
    }

    /// Super-seeding: offered pieces this peer should have in hand, about half a second of
    /// what it downloads from us.
    fn keep_open(&self) -> usize {
        let piece = self.t.meta.piece_length as f64;
        ((self.up_rate * 0.5 / piece).ceil() as usize).clamp(2, 32)
    }

    /// Super-seeding: offer an unchoked peer pieces given back by others, up to its share. A
    /// choked peer that has not asked for a slot keeps a greeting's worth, so that it has
    /// something to be interested in: its first offers go out before its bitfield arrives, and
    /// are dropped when it turns out to hold them already (a resumed download, files reused
    /// from a cached version); with none left it would never ask, and never be unchoked. A
    /// choked peer waiting for a slot gave its offers back and gets new ones when unchoked.
    fn top_up_offers(&mut self) {
        if !self.super_seeding {
            return;
        }
        let keep = match (self.am_choking, self.peer_interested) {
            (false, _) => self.keep_open(),
            (true, false) => GREETING_OFFERS,
            (true, true) => return,
        };
        let mut st = self.t.state();
        let order = st.offer_order();
        let offers = match st.planner.as_mut() {
            Some(planner) => planner.offers(self.id, keep, Instant::now(), order),
            None => return,
        };
        drop(st);
        self.advertise(&offers);
    }

    /// Super-seeding: this peer cannot download from us for now (choked, or waiting for a
    /// slot): offers it has not started go back to the pool for the peers that can.
    fn give_back_offers(&mut self) {
        if !self.super_seeding {
            return;
        }
        let released = self
            .t
            .state()
            .planner
            .as_mut()
            .is_some_and(|planner| planner.release(self.id));
        if released {
            self.t.broadcast(Cmd::Refill);
        }
    }

    /// Read the next batch of queued uploads from storage while the write buffer has room; one
    /// batch at a time. Here if no byte of it has to wait on a disk, else on the blocking pool.
    ///
    /// Reading here spares each batch a round trip through the blocking pool (a thread woken
    /// to read, then this task woken by it). In `b5` (CPU-bound on 2 cores, the packages on
    /// tmpfs) that was 5% of the CPU: 31.4-31.9 s against 32.6-34.3 s, alternating.
    fn pump_uploads(&mut self) -> Result<(), End> {
        if self.reading.is_some()
            || self.uploads.is_empty()
            || self.wbuf.len() >= WRITE_HIGH_WATER
            || self.throttled_until.is_some()
        {
            return Ok(());
        }
        let Some(storage) = self.t.storage() else {
            return Err(End::Told("the download failed"));
        };
        let mut blocks = Vec::new();
        let mut bytes = 0usize;
        while self.wbuf.len() + bytes < WRITE_HIGH_WATER {
            let Some(b) = self.uploads.pop_front() else {
                break;
            };
            if let Some(limit) = &self.t.ctx.upload_limit
                && let Err(wait) = limit.take(u64::from(b.length))
            {
                self.uploads.push_front(b);
                self.throttled_until = Some(Instant::now() + wait);
                break;
            }
            bytes += b.length as usize + PIECE_HEADER_LEN;
            blocks.push(b);
        }
        if blocks.is_empty() {
            return Ok(());
        }
        let mut check: Vec<u32> = match &self.t.state().served_ok {
            Some(ok) => blocks
                .iter()
                .map(|b| b.index)
                .filter(|&i| !ok.get(i))
                .collect(),
            None => Vec::new(),
        };
        check.sort_unstable();
        check.dedup();
        let zblock = self.zblock.filter(|_| self.t.try_compress());
        if check.is_empty() && zblock.is_none() {
            let mut out = BytesMut::with_capacity(bytes);
            let read = blocks.iter().all(|b| {
                let offset = self.t.meta.block_offset(b.index, b.begin);
                let at = append_piece(&mut out, b);
                storage.read_cached(offset, &mut out[at..])
            });
            if read {
                let wire = blocks.iter().map(|b| u64::from(b.length)).sum();
                return self.on_read(Ok(UploadBatch {
                    blocks,
                    encoded: Ok(out),
                    wire,
                    checked: Vec::new(),
                    corrupt: None,
                }));
            }
        }
        let meta = self.t.meta.clone();
        let zdict = self.zdict.clone().filter(|_| self.zdict_shared);
        self.reading = Some(tokio::task::spawn_blocking(move || {
            for &i in &check {
                let len = u64::from(meta.piece_size(i));
                match storage.sha1_of(meta.piece_offset(i), len) {
                    Ok(h) if h == meta.pieces[i as usize] => {}
                    Ok(_) => {
                        return UploadBatch {
                            blocks,
                            encoded: Ok(BytesMut::new()),
                            wire: 0,
                            checked: Vec::new(),
                            corrupt: Some(i),
                        };
                    }
                    Err(e) => {
                        return UploadBatch {
                            blocks,
                            encoded: Err(e),
                            wire: 0,
                            checked: Vec::new(),
                            corrupt: None,
                        };
                    }
                }
            }
            let mut out = BytesMut::with_capacity(bytes);
            let mut encoded = Ok(());
            let mut wire = 0u64;
            let mut raw = Vec::new();
            // One zstd frame for the batch (see `zstream`); plain blocks if it cannot start.
            let mut frame = zblock.and_then(|id| {
                // A dictionary that loads for decoding but not for compressing (corrupt
                // tables) costs the peer its gain, not compression altogether.
                BatchEncoder::new(zdict.as_deref())
                    .or_else(|_| BatchEncoder::new(None))
                    .ok()
                    .map(|e| (id, e))
            });
            for (k, b) in blocks.iter().enumerate() {
                let offset = meta.block_offset(b.index, b.begin);
                let last = k + 1 == blocks.len();
                let read = match &mut frame {
                    None => {
                        let at = append_piece(&mut out, b);
                        wire += u64::from(b.length);
                        storage.read_at(offset, &mut out[at..])
                    }
                    Some((id, enc)) => {
                        raw.resize(b.length as usize, 0);
                        storage
                            .read_at(offset, &mut raw)
                            .and_then(|()| enc.block(*id, b, &raw, last, &mut out))
                            .map(|n| wire += n)
                    }
                };
                if let Err(e) = read {
                    encoded = Err(io::Error::new(
                        e.kind(),
                        format!("reading {}: {e}", storage.path().display()),
                    ));
                    break;
                }
            }
            UploadBatch {
                blocks,
                encoded: encoded.map(|()| out),
                wire,
                checked: check,
                corrupt: None,
            }
        }));
        Ok(())
    }

    /// A batch of uploads was read: queue it, unless we choked the peer meanwhile.
    fn on_read(&mut self, done: Result<UploadBatch, JoinError>) -> Result<(), End> {
        let batch = done.map_err(|e| End::Io(io::Error::other(e)))?;
        if let Some(piece) = batch.corrupt {
            self.t.corrupt_at_rest(piece);
            return Err(End::Told("our copy of the package is corrupt"));
        }
        if !batch.checked.is_empty()
            && let Some(ok) = self.t.state().served_ok.as_mut()
        {
            for &i in &batch.checked {
                ok.set(i);
            }
        }
        let data = match batch.encoded {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(package = %self.t.name, error = %e, "cannot read a block to upload");
                return Err(End::Io(e));
            }
        };
        if self.am_choking {
            for b in batch.blocks {
                if self.fast {
                    self.send(&Message::Reject(b));
                }
            }
            return Ok(());
        }
        let payload: u64 = batch.blocks.iter().map(|b| u64::from(b.length)).sum();
        self.t.count_wire(0, batch.wire);
        if self.zblock.is_some() {
            self.t.note_compressed(payload, batch.wire);
        }
        if self.wbuf.is_empty() {
            self.wbuf = data;
        } else {
            self.wbuf.extend_from_slice(&data);
        }
        self.up_tick += payload;
        self.t.count_up(payload);
        self.pump_uploads()
    }

    /// Queue the blocks of this read for the download's writer.
    fn write_blocks(&mut self) -> Result<(), End> {
        if self.to_write.is_empty() {
            return Ok(());
        }
        let Some(storage) = self.t.storage() else {
            return Err(End::Told("the download failed"));
        };
        let batch = std::mem::take(&mut self.to_write);
        self.writes.push(Writer::submit(&self.t, storage, batch));
        Ok(())
    }

    /// Received blocks reached the disk (or could not).
    fn on_written(&mut self, done: Result<Written, oneshot::error::RecvError>) -> Result<(), End> {
        let Ok(batch) = done else {
            // Dropped unwritten (the writer panicked): its blocks stay `Writing`, which nothing
            // else resolves, so the download could never finish. It fails instead, and the
            // next `get` starts it again.
            let e = io::Error::other("the download's writer stopped");
            self.t.fail(
                crate::error::io_kind(&e),
                format!("cannot write a block: {e}"),
            );
            return Err(End::Io(e));
        };
        let mut verify = Vec::new();
        let mut failed = None;
        {
            let mut st = self.t.state();
            for (b, written) in batch {
                match written {
                    Ok(()) => {
                        self.t.count_down(u64::from(b.length));
                        if st.picker.stored(&b) {
                            verify.push(b.index);
                        }
                    }
                    Err(e) => failed = Some(e),
                }
            }
        }
        for index in verify {
            super::spawn_verify(self.t.clone(), index);
        }
        if let Some(e) = failed {
            // Disk full or gone: nothing downloaded from here on could be kept.
            let kind = crate::error::io_kind(&e);
            self.t.fail(kind, format!("cannot write a block: {e}"));
            return Err(End::Io(e));
        }
        Ok(())
    }

    fn on_block(&mut self, index: u32, begin: u32, data: bytes::Bytes) -> Result<(), End> {
        let Ok(length) = u32::try_from(data.len()) else {
            return Err(End::Protocol("oversized block".into()));
        };
        let b = BlockRef {
            index,
            begin,
            length,
        };
        let Some(sent) = self.in_flight.remove(&(index, begin)) else {
            self.t.count_wasted(u64::from(length));
            return Ok(());
        };
        // What was asked for, at another length, is no block any piece can take: it was
        // counted as wasted and the block stayed asked of this peer in the picker, out of the
        // request timeout's reach (no longer in flight here) and of every other peer's.
        let asked = u64::from(self.t.meta.piece_size(index))
            .saturating_sub(u64::from(begin))
            .min(u64::from(BLOCK_SIZE));
        if u64::from(length) != asked {
            self.t.state().picker.release_block(self.id, &b);
            return Err(End::Protocol(format!(
                "block {index}:{begin} of {length} bytes where {asked} were asked for"
            )));
        }
        self.timeouts = 0;
        // Arrived with the read just made (no clock read per block). The peer answers in
        // order, so a request sent before the previous block arrived waited for it first.
        let at = self.last_recv;
        let waited = at.saturating_duration_since(sent.max(self.last_block_at));
        self.latency_peak = self.latency_peak.max(waited.as_secs_f64());
        self.last_block_at = at;
        self.down_tick += u64::from(length);
        let arrival = self.t.state().picker.claim(self.id, &b);
        match arrival {
            Arrival::Unexpected => {
                self.t.count_wasted(u64::from(length));
            }
            Arrival::Accepted { cancel } => {
                if !cancel.is_empty() {
                    let st = self.t.state();
                    for c in cancel {
                        if let Some(s) = st.peers.get(&c) {
                            let _ = s.tx.send(Cmd::Cancel(b));
                        }
                    }
                }
                // Written outside the lock and off the reactor, with the other blocks of
                // this read; the claim keeps anyone else off this block and keeps the piece
                // from verifying until `stored`.
                let offset = self.t.meta.block_offset(index, begin);
                self.to_write.push((b, offset, data));
            }
        }
        self.fill_requests();
        Ok(())
    }

    /// An origin over its budget chokes leechers that can get everything elsewhere, and
    /// unchokes them again when some piece has no other copy among connected peers and no
    /// other seed is known ([`super::torrent::State::seed_elsewhere`]).
    fn apply_origin_budget(&mut self) {
        let Some(budget) = self.t.ctx.config.origin_budget else {
            return;
        };
        if !self.t.origin || !self.t.is_seeding() {
            return;
        }
        let mut st = self.t.state();
        if st.planner.as_ref().is_some_and(|p| !p.first_pass_done()) {
            return; // the first copy of every piece still has to go out
        }
        let over = self.t.uploaded() as f64 >= budget * self.t.meta.length as f64;
        // A seed we parted from, or one the tracker knows, holds every piece: without this,
        // the first leecher to finish (and leave, both ends being seeds) left pieces only it
        // had, and the origin served up to another copy while the crowd fetched them from it.
        let orphan = !st.seed_elsewhere()
            && (0..self.t.meta.num_pieces()).any(|i| st.picker.availability(i) == 0);
        let hold = over && !orphan;
        if hold && !self.am_choking {
            if let Some(slot) = st.peers.get_mut(&self.id) {
                slot.unchoked = false;
            }
            drop(st);
            self.am_choking = true;
            self.send(&Message::Choke);
            for b in std::mem::take(&mut self.uploads) {
                if self.fast {
                    self.send(&Message::Reject(b));
                }
            }
        } else if !hold
            && self.am_choking
            && self.peer_interested
            && st.peers.get(&self.id).is_some_and(|s| !s.unchoked)
        {
            // Back in line like any interested peer: the held peers taking their slots back
            // at once would hold more than the sized slots (`Torrent::size_slots`).
            let grant = ask_for_slot(&mut st, self.id);
            drop(st);
            if grant {
                self.am_choking = false;
                self.send(&Message::Unchoke);
            }
        }
    }

    fn housekeeping(&mut self) -> Result<(), End> {
        let now = Instant::now();
        if !self.peer_interested {
            let st = self.t.state();
            let both_seeds = st.picker.is_complete()
                && st
                    .peers
                    .get(&self.id)
                    .is_some_and(|s| s.bitfield.is_complete());
            drop(st);
            if both_seeds {
                // Two seeds have nothing to trade; free the slot for a leecher.
                return Err(End::Told("both ends are seeds"));
            }
        }
        self.apply_origin_budget();
        // Offers that went stale with a slow leecher come back to the ones waiting for them.
        self.top_up_offers();
        let moved = self.down_tick > 0 || self.up_tick > 0;
        self.moved_data |= moved;
        if self.down_tick > 0 {
            // The longest wait of each second: a batching peer's pause shows once per batch,
            // among hundreds of blocks that arrive back to back.
            self.latency = if self.latency > 0.0 {
                0.6 * self.latency + 0.4 * self.latency_peak
            } else {
                self.latency_peak
            };
            self.latency_peak = 0.0;
        }
        self.down_last = self.down_tick as f64;
        self.down_rate = 0.6 * self.down_rate + 0.4 * self.down_last;
        self.up_rate = 0.6 * self.up_rate + 0.4 * self.up_tick as f64;
        self.down_tick = 0;
        self.up_tick = 0;
        let timeout = self.t.ctx.config.request_timeout;
        let stale = {
            let mut st = self.t.state();
            if let Some(s) = st.peers.get_mut(&self.id) {
                s.down_rate = self.down_rate;
                s.up_rate = self.up_rate;
                if moved {
                    s.last_useful = now;
                }
            }
            let stale = now
                .checked_sub(timeout)
                .filter(|&cut| self.in_flight.values().any(|&at| at < cut))
                .map(|cut| st.picker.stale_requests(self.id, cut))
                .unwrap_or_default();
            for b in &stale {
                st.picker.release_block(self.id, b);
            }
            stale
        };
        if !stale.is_empty() {
            tracing::debug!(package = %self.t.name, peer = %self.addr, blocks = stale.len(), "requests timed out");
            for b in stale {
                self.in_flight.remove(&(b.index, b.begin));
                self.send(&Message::Cancel(b));
            }
            // Others may take the released blocks: this peer, asked for one block at a time
            // from now on, does not take them all back at its refill below (silent peers
            // holding their blocks that way kept the endgame from starting, for ever).
            if self
                .last_timeout
                .is_none_or(|at| now.saturating_duration_since(at) >= timeout)
            {
                self.timeouts += 1;
                self.last_timeout = Some(now);
            }
            self.t.broadcast(Cmd::Refill);
            if self.timeouts >= MOST_TIMEOUTS {
                return Err(End::Unanswered);
            }
        }
        if now.duration_since(self.last_recv) > IDLE_TIMEOUT {
            return Err(End::Told("idle"));
        }
        if self.wbuf.is_empty() {
            self.write_progress = now;
        } else if now.duration_since(self.write_progress) > self.t.ctx.config.write_stall {
            return Err(End::Told("stopped reading what we send"));
        }
        if self.wbuf.is_empty() && now.duration_since(self.last_send) > KEEPALIVE {
            self.send(&Message::KeepAlive);
        }
        self.fill_requests();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: f64 = 1e6;

    fn config() -> EngineConfig {
        EngineConfig::new("/nonexistent".into())
    }

    /// The first `have` goes at once; those after it within the spacing wait for other bytes,
    /// a full batch, or the end of the spacing.
    #[test]
    fn haves_go_out_together() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut h = PendingHaves::default();
        assert!(!h.go_with(true, t0), "nothing to send");
        h.push(1, t0);
        assert!(h.go_with(false, t0), "the first goes at once");
        let mut wbuf = BytesMut::new();
        h.drain_into(&mut wbuf, t0);
        h.push(3, ms(5));
        h.push(9, ms(20));
        assert!(!h.go_with(false, ms(20)), "within the spacing, they wait");
        assert_eq!(h.due, Some(t0 + HAVE_SPACING), "until the spacing is over");
        assert!(h.go_with(false, t0 + HAVE_SPACING));
        assert!(h.go_with(true, ms(20)), "other bytes take them along");
        wbuf.extend_from_slice(b"x");
        h.drain_into(&mut wbuf, ms(20));
        assert_eq!((h.count, h.due), (0, None));
        let mut got = Vec::new();
        while let Some(m) = Message::decode(&mut wbuf, 1 << 20).expect("decodes") {
            got.push(m);
            if wbuf.first() == Some(&b'x') {
                let _ = wbuf.split_to(1);
            }
        }
        assert_eq!(
            got,
            vec![Message::Have(1), Message::Have(3), Message::Have(9)],
            "in order"
        );
        h.push(0, ms(21));
        assert_eq!(
            h.due,
            Some(ms(20) + HAVE_SPACING),
            "spaced from the last write"
        );
        for i in 1..HAVES_AT_ONCE as u32 {
            assert!(!h.go_with(false, ms(21)), "{i} wait");
            h.push(i, ms(21));
        }
        assert!(h.go_with(false, ms(21)), "a full batch goes at once");
        h.push(7, ms(200));
        h.drain_into(&mut wbuf, ms(200));
        h.push(8, ms(300));
        assert!(
            h.go_with(false, ms(300)),
            "after a quiet spell, at once again"
        );
    }

    #[test]
    fn a_peer_that_answers_at_once_gets_half_a_second_of_its_rate() {
        let cfg = config();
        // The window before latency counted: 10 MB/s for 0.5 s is 305 blocks, plus 4.
        assert_eq!(request_depth(&cfg, 10.0 * MB, 0.0, MAX_QUEUED_UPLOADS), 309);
        assert_eq!(request_depth(&cfg, 10.0 * MB, 0.2, MAX_QUEUED_UPLOADS), 309);
        assert_eq!(request_depth(&cfg, 0.0, 0.0, MAX_QUEUED_UPLOADS), 4);
    }

    #[test]
    fn a_slow_peer_gets_what_its_rate_needs() {
        let cfg = config();
        // 80 KB/s over 0.5 s is 2 blocks, plus 4.
        assert_eq!(request_depth(&cfg, 80e3, 0.1, MAX_QUEUED_UPLOADS), 6);
        // Slow but far (1 s to answer): 2 s of its rate, 9 blocks, plus 4.
        assert_eq!(request_depth(&cfg, 80e3, 1.0, MAX_QUEUED_UPLOADS), 13);
        // A floor set higher holds.
        let cfg = EngineConfig {
            min_queue_depth: 16,
            ..config()
        };
        assert_eq!(request_depth(&cfg, 80e3, 0.1, MAX_QUEUED_UPLOADS), 16);
    }

    #[test]
    fn a_peer_that_answers_in_batches_gets_twice_a_batch() {
        let cfg = config();
        // 1 MB/s from batches every 0.5 s: 1 s of it, 61 blocks, plus 4.
        assert_eq!(request_depth(&cfg, MB, 0.5, STOCK_REQUEST_QUEUE), 65);
        // A 10 s pause does not queue 20 s of requests: at most 2 s.
        assert_eq!(request_depth(&cfg, MB, 10.0, STOCK_REQUEST_QUEUE), 126);
    }

    #[test]
    fn never_more_than_the_peer_takes_or_the_config_allows() {
        let mut cfg = config();
        assert_eq!(
            request_depth(&cfg, 50.0 * MB, 0.5, STOCK_REQUEST_QUEUE),
            250
        );
        assert_eq!(request_depth(&cfg, 50.0 * MB, 0.5, MAX_QUEUED_UPLOADS), 512);
        cfg.max_queue_depth = 100;
        assert_eq!(request_depth(&cfg, 50.0 * MB, 0.5, MAX_QUEUED_UPLOADS), 100);
        // A floor above the cap gives way to the cap.
        cfg.min_queue_depth = 300;
        assert_eq!(request_depth(&cfg, 0.0, 0.0, STOCK_REQUEST_QUEUE), 100);
    }
}
