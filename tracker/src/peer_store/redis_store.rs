//! Peers kept in Redis, shared by tracker replicas.
//!
//! Layout, per swarm (hex info-hash `H`; the `{H}` hash tag puts a swarm's keys in one cluster
//! slot; a batch spans swarms, so Redis Cluster would need one batch per slot):
//!
//! - `fbpkg:v5:{H}:seeders`, `...:leechers`: sorted sets, member `peer-id-hex@ip` (a peer is
//!   who *and* where it is, as in memory), score = last announce in ms since the Unix epoch
//!   (the tracker's wall clock, passed in: replicas share it, tests control it);
//! - `...:swarm`: hash, everything one announce reads and writes but its role's set, so it
//!   reads it with one `HMGET` and writes it with one `HSET`: `p:<member>` -> the record
//!   `role|zone|addr|peer-id-hex|uploaded|downloaded|left`; `a:<ip>` -> peers recorded under
//!   that address (the per-address limit); and `st`, the swarm's state in one field, `##`
//!   then four little-endian doubles (Lua's `struct.pack('<BBdddd')`: exact for these
//!   integers), `touched swept seq oldest`: `touched`, when the keys' TTLs were last
//!   refreshed (once every quarter of a peer's TTL, to a TTL that much longer than a peer's);
//!   `swept`, the last sweep; `seq`, the swarm's change number (from the time in ms when its
//!   state was made, so a swarm made again numbers on above any copy); `oldest`, a bound at
//!   or below every score in its sets (a sweep runs only once it falls behind the cutoff);
//! - `...:meta`: hash, `completed` (made by the first download completed; kept a week);
//! - `...:z:<role>:<zone prefix>`: sets, the zone buckets (`zones.rs`) of each role.
//!
//! `v5` since the role counts are the sets' own (`ZCARD`), as replicas write without the
//! script (below); `v4` since the state is packed rather than written in digits (parsing it
//! and writing it back made eleven Lua strings per announce; Redis spends about 15% less time
//! per announce without them, `tracker_bench --replicas 1`); `v3` since the state went into
//! one field (`v2` kept six: `touched`, `swept`, `seq`, `S`, `L`, `oldest`) and a call's
//! changes into one message; `v2` since the hash took in what were four keys of their own
//! (`fbpkg:swarm:{H}:*`, with changes on `fbpkg:peers`). Replicas of different layouts do not
//! see each other's peers, and the old keys expire by themselves.
//!
//! Announces go to Redis in batches, one `EVALSHA` of `announce.lua` per batch (loaded again
//! on `NOSCRIPT`; see [`Batcher`]). For each announce the script expires the swarm's silent
//! peers (score older than two intervals; at most once a second per swarm, and only when one
//! may be due), applies the limits, records or removes, numbers the change (`seq`), then
//! answers with what the caller wants ([`Want`]): nothing (its copy answers), every live peer
//! (to load the copy), or a draw (all of them, read with one `HVALS`, when they fit in
//! `numwant`). The changes of one call go out together, one message on `fbpkg:v5:peers`, for
//! the replicas' copies (`mirror.rs`).
//!
//! Most announces to a swarm a replica holds a copy of need none of that: a peer announcing
//! again with its role and zone unchanged, or joining while its address and the swarm are
//! under half their limits as the copy counts them, is written without the script, by plain
//! commands in one `MULTI` per batch ([`Batcher::send_plain`]), and answered from the copy.
//! The script's own work was most of Redis's time per announce. Half the limits: the copy is
//! a few milliseconds behind the other replicas, so joins it admits could overrun a limit
//! only if more than half of it arrived elsewhere within those milliseconds; above half,
//! joins go through the script, which counts in Redis. The bound is not strict: R replicas
//! whose copies have not yet seen each other's joins could admit up to half the limit each
//! (R/2 times it), were that many joins from one address, or to one swarm, to reach them all
//! within the same few milliseconds. The replica still sends an announce through the script
//! once a sweep may be due (the `oldest` the script answers with is a TTL old), and every
//! eighth of a TTL for the keys' TTLs (`mirror.rs`, `Mirror::route`).
//!
//! Keys get a TTL of two and a half intervals, refreshed every half interval by an announce
//! (zone buckets by each of their announces), so a swarm nobody announces to disappears by
//! itself: there is no sweeper and never a scan of the keyspace.
//! Scrape, `/metrics` and the dashboard ask about the swarms this replica knows (see
//! `mod.rs`), in bounded pipelines: `ZCOUNT`s for counts, `list.lua` for peer listings.
//!
//! Replicas stamp peers with their own wall clocks, so clock skew between them shortens or
//! lengthens a peer's life by as much, and they must share `--announce-interval` (which sets
//! the TTL); NTP-synchronised hosts with one configuration are assumed.
//!
//! Zones, compared with memory (`sample.rs`): the same levels in the same order (same rack,
//! same datacenter, anyone) per role, drawn with `SRANDMEMBER`/`ZRANDMEMBER`, which Redis
//! documents as close to but not exactly uniform for small counts. `completed` lives as long
//! as the swarm is announced to (plus a week), not for the tracker's lifetime.
//!
//! Faults: every call has a deadline ([`RedisStore::timeout`]); a failure is an error at once,
//! never a wait. Each serving thread has its own [`ConnectionManager`] (driven on that
//! thread's runtime, so an announce never wakes another thread); it reconnects by itself
//! after Redis comes back.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::thread::ThreadId;
use std::time::Duration;

use dashmap::DashMap;
use fbpkg_common::tracker_proto::{Event, PeerEntry, Zone};
use fbpkg_common::{InfoHash, PeerId};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::mirror::Mirror;
use crate::swarm::{Limits, Recorded};

/// Most silent peers one announce expires per role (the next announces take the rest).
const EXPIRE_BATCH: u32 = 1000;
/// The dashboard's listing of a swarm's peers.
const LIST_SCRIPT: &str = include_str!("list.lua");
/// Swarms counted per round trip (three commands each).
const COUNTS_PER_TRIP: usize = 1000;
/// How long `completed` outlives the last announce to a swarm.
const META_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// At most one warning per this period when Redis fails (the others are counted).
const WARN_EVERY: Duration = Duration::from_secs(10);
/// The channel changes to swarms are published on (see `mirror.rs`).
const CHANNEL: &str = "fbpkg:v5:peers";
/// Every key starts so (`announce.lua` builds the same names). `v5`: the role counts are the
/// sets' own, not kept in the swarm's state, since replicas write peers without the script;
/// the layouts before it (`fbpkg:v4:`, `fbpkg:v3:`, `fbpkg:v2:`, `fbpkg:swarm:`) are left
/// alone, and their keys expire by themselves.
const KEY_PREFIX: &str = "fbpkg:v5:";

/// Redis could not be used; the announce is answered with a failure reason.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No answer within the deadline.
    #[error("peer store did not answer within {0:?}")]
    Timeout(Duration),
    /// Connection or command failed.
    #[error("peer store: {0}")]
    Redis(#[from] redis::RedisError),
    /// An answer this tracker does not understand (another version's script?).
    #[error("peer store answered something unexpected: {0}")]
    Protocol(String),
}

/// One announce, as the store needs it.
#[derive(Debug, Clone)]
pub struct Announce {
    /// The swarm.
    pub info_hash: InfoHash,
    /// Its id.
    pub peer_id: PeerId,
    /// Where others connect to it; its IP is the one it is recorded under.
    pub addr: SocketAddr,
    /// What it said happened.
    pub event: Event,
    /// Bytes uploaded, downloaded and missing, as reported.
    pub uploaded: u64,
    /// See `uploaded`.
    pub downloaded: u64,
    /// See `uploaded`; 0 = seeder.
    pub left: u64,
    /// Its zone.
    pub zone: Option<Zone>,
    /// Peers wanted back.
    pub numwant: usize,
}

/// What the store did and the peers it drew.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Recorded, removed, or refused.
    pub recorded: Recorded,
    /// Seeders after the announce.
    pub complete: u32,
    /// Leechers after the announce.
    pub incomplete: u32,
    /// The sample ([`Want::Draw`]).
    pub peers: Vec<PeerEntry>,
    /// The swarm's change number after the announce (0: it changed nothing).
    pub seq: u64,
    /// A bound (ms since the Unix epoch) at or below the last announce of every peer left in
    /// the swarm's sets after the announce: a sweep is due once it is a TTL ago.
    pub oldest_ms: u64,
    /// Every live peer with its last announce in ms ([`Want::All`]).
    pub all: Vec<(u64, Record)>,
}

/// What an announce asks the store to answer with, besides the counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// `numwant` peers drawn in Redis.
    Draw,
    /// No peers (the replica's mirror answers, or none were asked for).
    Nothing,
    /// Every live peer, to load the swarm into the replica's mirror.
    All,
}

impl Want {
    fn arg(self) -> &'static str {
        match self {
            Want::Draw => "draw",
            Want::Nothing => "none",
            Want::All => "all",
        }
    }
}

/// One peer as Redis records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its id.
    pub peer_id: PeerId,
    /// The rest, as the dashboard shows it.
    pub listed: Listed,
}

/// One peer as the dashboard shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Where others connect to it.
    pub addr: SocketAddr,
    /// Its zone, if it gave one.
    pub zone: Option<String>,
    /// Bytes uploaded, as reported.
    pub uploaded: u64,
    /// Bytes downloaded, as reported.
    pub downloaded: u64,
    /// Bytes missing; 0 = seeder.
    pub left: u64,
}

/// A swarm's counts, for scrape, metrics and the dashboard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Seeders seen within two intervals.
    pub seeders: u64,
    /// Leechers seen within two intervals.
    pub leechers: u64,
    /// Downloads completed.
    pub completed: u64,
}

/// The Redis peer store.
pub struct RedisStore {
    client: redis::Client,
    /// Where it points, without credentials (for logs and `/readyz`).
    shown: String,
    /// Each thread's connection, numbered (see [`RedisStore::failed`]).
    conns: DashMap<ThreadId, (ConnectionManager, u64)>,
    /// Each thread's batcher, with the number of the connection it uses.
    batchers: DashMap<ThreadId, (mpsc::Sender<Job>, u64)>,
    /// The number of the next connection made.
    made: std::sync::atomic::AtomicU64,
    script: Script,
    /// Where changes are published for the replicas' mirrors, and this replica's id there.
    channel: String,
    publisher: String,
    mirror: std::sync::Arc<Mirror>,
    timeout: Duration,
    peer_ttl: Duration,
    limits: Limits,
    warned: Mutex<(Option<Instant>, u64)>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("at", &self.shown)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

fn key(h: &InfoHash, what: &str) -> String {
    format!("{KEY_PREFIX}{{{h}}}:{what}")
}

impl RedisStore {
    /// A store at `url` (no connection yet: one opens per thread on first use). `peer_ttl` is
    /// how long a silent peer stays (two announce intervals); `timeout` bounds every call.
    pub fn open(
        url: &str,
        timeout: Duration,
        peer_ttl: Duration,
        limits: Limits,
    ) -> Result<Self, redis::RedisError> {
        Self::open_with_tls(
            url,
            crate::tls::TlsFiles::default(),
            timeout,
            peer_ttl,
            limits,
        )
    }

    /// [`RedisStore::open`], for a `rediss://` URL trusting `tls.ca` (PEM) rather than the
    /// system's certificate authorities, and showing `tls.identity` to a server that asks for
    /// a client certificate.
    pub fn open_with_tls(
        url: &str,
        tls_files: crate::tls::TlsFiles,
        timeout: Duration,
        peer_ttl: Duration,
        limits: Limits,
    ) -> Result<Self, redis::RedisError> {
        let tls = url.starts_with("rediss://");
        if tls {
            crate::tls::install_provider();
        }
        let client = if tls && !tls_files.is_empty() {
            redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: tls_files.identity.map(|(client_cert, client_key)| {
                        redis::ClientTlsConfig {
                            client_cert,
                            client_key,
                        }
                    }),
                    root_cert: tls_files.ca,
                },
            )?
        } else {
            redis::Client::open(url)?
        };
        let info = client.get_connection_info();
        let scheme = if tls { "rediss" } else { "redis" };
        let shown = format!("{scheme}://{}/{}", info.addr(), info.redis_settings().db());
        Ok(Self {
            client,
            shown,
            conns: DashMap::default(),
            batchers: DashMap::default(),
            made: std::sync::atomic::AtomicU64::new(0),
            script: Script::new(include_str!("announce.lua")),
            channel: CHANNEL.to_owned(),
            publisher: format!("{:016x}", rand::random::<u64>()),
            mirror: std::sync::Arc::default(),
            timeout,
            peer_ttl,
            limits,
            warned: Mutex::new((None, 0)),
        })
    }

    /// Where the store is, without credentials.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// The deadline of every call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The channel every change is published on.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// This replica's id on the channel (each line's first field).
    pub fn publisher(&self) -> &str {
        &self.publisher
    }

    /// The copy of the swarms this replica answers from.
    pub fn mirror(&self) -> &Mirror {
        &self.mirror
    }

    /// How long a silent peer stays.
    pub fn peer_ttl(&self) -> Duration {
        self.peer_ttl
    }

    /// A connection for a subscription of its own (not shared: a subscribed connection can
    /// do nothing else).
    pub async fn pubsub(&self) -> Result<redis::aio::PubSub, StoreError> {
        match tokio::time::timeout(self.timeout, self.client.get_async_pubsub()).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }

    /// This thread's connection and its number (created lazily: it connects on first use,
    /// and again by itself after a failure).
    fn conn(&self) -> Result<(ConnectionManager, u64), StoreError> {
        let id = std::thread::current().id();
        if let Some(c) = self.conns.get(&id) {
            return Ok(c.clone());
        }
        // Short connect timeout and few retries: a request waits for a reconnect in flight,
        // and the whole call has `timeout` anyway.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let c = ConnectionManager::new_lazy_with_config(self.client.clone(), config)?;
        let number = self.made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.conns.insert(id, (c.clone(), number));
        Ok((c, number))
    }

    /// Run `f` on this thread's connection within the deadline, [`retried`] once on a broken
    /// connection.
    async fn call<T, Fut>(&self, f: impl Fn(ConnectionManager) -> Fut) -> Result<T, StoreError>
    where
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        // This thread's connection: the task may resume on another worker.
        let thread = std::thread::current().id();
        let (conn, number) = self.conn()?;
        let attempts = async { Ok(retried(conn, &f).await?) };
        let r = match tokio::time::timeout(self.timeout, attempts).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        };
        if let Err(e) = &r {
            self.failed(e, (thread, number));
        }
        r
    }

    /// A call on `thread`'s connection `number` failed with `e`: warn, and after a deadline
    /// passed forget that connection and its batcher, so that the next call connects anew
    /// (one another call made since stays). A connection that answers nothing may lead to a
    /// Redis gone without a word (a failover moved the address; its node was lost), which
    /// the connection manager never notices, since nothing failed: announces would time out
    /// until the kernel gave up on the connection, minutes later.
    fn failed(&self, e: &StoreError, (thread, number): (ThreadId, u64)) {
        self.warn(e);
        if matches!(e, StoreError::Timeout(_)) {
            self.conns.remove_if(&thread, |_, (_, n)| *n == number);
            self.batchers.remove_if(&thread, |_, (_, n)| *n == number);
        }
    }

    /// Warn at most once per [`WARN_EVERY`]: an outage must not flood the logs.
    fn warn(&self, e: &StoreError) {
        let now = Instant::now();
        let Ok(mut w) = self.warned.lock() else {
            return;
        };
        if w.0.is_some_and(|t| now.duration_since(t) < WARN_EVERY) {
            w.1 += 1;
            return;
        }
        let suppressed = std::mem::take(&mut w.1);
        w.0 = Some(now);
        drop(w);
        tracing::warn!(store = %self.shown, error = %e, suppressed, "peer store unavailable");
    }

    /// Record one announce and draw its answer, in one round trip. `now_ms` is the wall clock
    /// in ms since the Unix epoch.
    pub async fn announce(&self, a: &Announce, now_ms: u64) -> Result<Answer, StoreError> {
        self.announce_wanting(a, now_ms, Want::Draw).await
    }

    /// Record one announce and answer with what `want` says. Announces made on one thread
    /// meanwhile go to Redis together, in one script call (see `Batcher`).
    pub async fn announce_wanting(
        &self,
        a: &Announce,
        now_ms: u64,
        want: Want,
    ) -> Result<Answer, StoreError> {
        let args = Args::new(a, now_ms, want);
        let (done, answer) = oneshot::channel();
        let on = self.queue(Job {
            args,
            kind: Kind::Script { want, done },
        })?;
        self.wait(answer, on).await
    }

    /// Write an announce without the script (see [`Batcher::send_plain`]): the peer is in
    /// this replica's copy of the swarm already (`join` false, same role and zone), or joins
    /// it under half the limits, as the copy counts (`join` true). Nothing is answered but
    /// whether it was written; the caller answers from its copy.
    pub async fn write_plain(
        &self,
        a: &Announce,
        now_ms: u64,
        join: bool,
    ) -> Result<(), StoreError> {
        let args = Args::new(a, now_ms, Want::Nothing);
        let (done, answer) = oneshot::channel();
        let on = self.queue(Job {
            args,
            kind: Kind::Plain {
                join,
                h: a.info_hash,
                deadline: Instant::now() + self.timeout,
                done,
            },
        })?;
        self.wait(answer, on).await
    }

    /// Hand `job` to this thread's batcher. A batcher whose runtime has gone (a test's) is
    /// replaced once. A full queue (Redis far behind) refuses at once: the client retries at
    /// its next interval. Returns this thread and the number of the batcher's connection.
    fn queue(&self, mut job: Job) -> Result<(ThreadId, u64), StoreError> {
        for _ in 0..2 {
            let (batcher, number) = self.batcher()?;
            match batcher.try_send(job) {
                Ok(()) => return Ok((std::thread::current().id(), number)),
                Err(mpsc::error::TrySendError::Full(_)) => {
                    let e = StoreError::Protocol("peer store queue full".into());
                    self.warn(&e);
                    return Err(e);
                }
                Err(mpsc::error::TrySendError::Closed(back)) => {
                    self.batchers.remove(&std::thread::current().id());
                    job = back;
                }
            }
        }
        Err(StoreError::Protocol("peer store batcher gone".into()))
    }

    /// The answer of a job queued on `thread`'s batcher (its connection `number`), within
    /// the deadline.
    async fn wait<T>(
        &self,
        answer: oneshot::Receiver<Result<T, StoreError>>,
        on: (ThreadId, u64),
    ) -> Result<T, StoreError> {
        let r = match tokio::time::timeout(self.timeout, answer).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(StoreError::Protocol("announce dropped by its batch".into())),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        };
        if let Err(e) = &r {
            self.failed(e, on);
        }
        r
    }

    /// This thread's batcher and the number of its connection (started on this thread's
    /// runtime on first use).
    fn batcher(&self) -> Result<(mpsc::Sender<Job>, u64), StoreError> {
        let id = std::thread::current().id();
        if let Some(b) = self.batchers.get(&id) {
            return Ok(b.clone());
        }
        let (tx, rx) = mpsc::channel(MOST_QUEUED);
        let (conn, number) = self.conn()?;
        let batcher = Batcher {
            conn,
            script: self.script.clone(),
            common: self.common_args(),
            channel: self.channel.clone(),
            publisher: self.publisher.clone(),
            mirror: self.mirror.clone(),
            keep_ms: ms(self.peer_ttl + self.peer_ttl / 4),
            timeout: self.timeout,
        };
        tokio::spawn(batcher.run(rx));
        self.batchers.insert(id, (tx.clone(), number));
        Ok((tx, number))
    }

    /// The arguments every announce of a call shares (`announce.lua`'s ARGV 1 to 7).
    fn common_args(&self) -> Vec<String> {
        vec![
            ms(self.peer_ttl).to_string(),
            self.limits.max_peers.to_string(),
            self.limits.max_per_address.to_string(),
            EXPIRE_BATCH.to_string(),
            ms(META_TTL).to_string(),
            self.channel.clone(),
            self.publisher.clone(),
        ]
    }

    /// Counts of each swarm, in one pipelined round trip.
    pub async fn counts(
        &self,
        hashes: &[InfoHash],
        now_ms: u64,
    ) -> Result<Vec<Counts>, StoreError> {
        let cutoff = now_ms.saturating_sub(ms(self.peer_ttl));
        let mut out = Vec::with_capacity(hashes.len());
        // A bounded pipeline per round trip, each under its own deadline: `/metrics` over
        // 100,000 registered swarms must not be one 300,000-command request.
        for chunk in hashes.chunks(COUNTS_PER_TRIP) {
            let mut pipe = redis::pipe();
            for h in chunk {
                // Peers silent past the cutoff and not expired yet (nobody announced since)
                // are not counted.
                pipe.zcount(key(h, "seeders"), cutoff, "+inf")
                    .zcount(key(h, "leechers"), cutoff, "+inf")
                    .hget(key(h, "meta"), "completed");
            }
            let flat: Vec<Value> = self
                .call(|mut c: ConnectionManager| {
                    let pipe = &pipe;
                    async move { pipe.query_async(&mut c).await }
                })
                .await?;
            if flat.len() != 3 * chunk.len() {
                return Err(StoreError::Protocol("short pipeline answer".into()));
            }
            for c in flat.chunks(3) {
                if let [s, l, d] = c {
                    out.push(Counts {
                        seeders: int(s)?,
                        leechers: int(l)?,
                        completed: opt_int(d)?.unwrap_or(0),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Up to `max` live peers of each swarm, seeders first (the dashboard's view), in one
    /// pipelined round trip per [`COUNTS_PER_TRIP`] swarms. `EVAL` rather than `EVALSHA`:
    /// a page view is rare, and a pipeline cannot reload a script on `NOSCRIPT`.
    pub async fn list(
        &self,
        hashes: &[InfoHash],
        max: usize,
        now_ms: u64,
    ) -> Result<Vec<Vec<Listed>>, StoreError> {
        let cutoff = now_ms.saturating_sub(ms(self.peer_ttl));
        let mut out = Vec::with_capacity(hashes.len());
        for chunk in hashes.chunks(COUNTS_PER_TRIP) {
            let mut pipe = redis::pipe();
            for h in chunk {
                pipe.cmd("EVAL")
                    .arg(LIST_SCRIPT)
                    .arg(3)
                    .arg(key(h, "seeders"))
                    .arg(key(h, "leechers"))
                    .arg(key(h, "swarm"))
                    .arg(cutoff)
                    .arg(max);
            }
            let swarms: Vec<Vec<Vec<u8>>> = self
                .call(|mut c: ConnectionManager| {
                    let pipe = &pipe;
                    async move { pipe.query_async(&mut c).await }
                })
                .await?;
            out.extend(swarms.into_iter().map(|recs| {
                recs.iter()
                    .filter_map(|r| parse_listed(r))
                    .collect::<Vec<_>>()
            }));
        }
        Ok(out)
    }

    /// Ready: Redis answers a `PING` within the deadline.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let _: String =
            self.call(|mut c: ConnectionManager| async move {
                redis::cmd("PING").query_async(&mut c).await
            })
            .await?;
        Ok(())
    }
}

/// One announce's ten arguments to `announce.lua`, written into one buffer: the batch's
/// command copies them from there. (Ten strings per announce, then ten more buffers in the
/// script invocation, were a quarter of the replica's allocations.)
struct Args {
    buf: Vec<u8>,
    /// Where each argument ends in `buf`.
    ends: [usize; 10],
}

impl Args {
    /// info-hash (hex), member (`peer-id-hex@ip`), ip, event, role, zone, record, now (ms),
    /// numwant, answer: see `announce.lua`.
    fn new(a: &Announce, now_ms: u64, want: Want) -> Self {
        use std::io::Write as _;
        let mut buf = Vec::with_capacity(320);
        let mut ends = [0; 10];
        let ip = a.addr.ip();
        let role: &[u8] = if a.left == 0 { b"S" } else { b"L" };
        let zone = a.zone.as_ref().map_or("", Zone::as_str).as_bytes();
        let event: &[u8] = match a.event {
            Event::Stopped => b"stopped",
            Event::Completed => b"completed",
            _ => b"",
        };
        // Writing into a Vec cannot fail.
        let mut end = |buf: &mut Vec<u8>, i: usize| ends[i] = buf.len();
        hex_into(&mut buf, &a.info_hash.0);
        end(&mut buf, 0);
        hex_into(&mut buf, &a.peer_id.0);
        buf.push(b'@');
        // The address is written once and copied where it is needed again.
        let ip_from = buf.len();
        let _ = write!(buf, "{ip}");
        let ip_to = buf.len();
        end(&mut buf, 1);
        buf.extend_from_within(ip_from..ip_to);
        end(&mut buf, 2);
        buf.extend_from_slice(event);
        end(&mut buf, 3);
        buf.extend_from_slice(role);
        end(&mut buf, 4);
        buf.extend_from_slice(zone);
        end(&mut buf, 5);
        // The record: role|zone|addr|peer-id-hex|uploaded|downloaded|left.
        buf.extend_from_slice(role);
        buf.push(b'|');
        buf.extend_from_slice(zone);
        match a.addr {
            SocketAddr::V4(v4) => {
                buf.push(b'|');
                buf.extend_from_within(ip_from..ip_to);
                let _ = write!(buf, ":{}|", v4.port());
            }
            SocketAddr::V6(_) => {
                let _ = write!(buf, "|{}|", a.addr);
            }
        }
        hex_into(&mut buf, &a.peer_id.0);
        let _ = write!(buf, "|{}|{}|{}", a.uploaded, a.downloaded, a.left);
        end(&mut buf, 6);
        let _ = write!(buf, "{now_ms}");
        end(&mut buf, 7);
        let _ = write!(buf, "{}", a.numwant);
        end(&mut buf, 8);
        buf.extend_from_slice(want.arg().as_bytes());
        end(&mut buf, 9);
        Self { buf, ends }
    }

    fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends);
        starts.zip(self.ends).map(|(from, to)| &self.buf[from..to])
    }

    /// Argument `i` (0 to 9, in `new`'s order).
    fn get(&self, i: usize) -> &[u8] {
        let from = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.buf[from..self.ends[i]]
    }
}

/// Lowercase hex of `bytes`, appended to `buf`.
fn hex_into(buf: &mut Vec<u8>, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        buf.push(DIGITS[usize::from(b >> 4)]);
        buf.push(DIGITS[usize::from(b & 15)]);
    }
}

/// One announce waiting for its batch.
struct Job {
    args: Args,
    kind: Kind,
}

/// How a job is written, and where its answer goes.
enum Kind {
    /// By `announce.lua`, answering with what `want` says.
    Script {
        want: Want,
        done: oneshot::Sender<Result<Answer, StoreError>>,
    },
    /// Without it ([`Batcher::send_plain`]); `join`: the peer is new to the swarm `h`.
    Plain {
        join: bool,
        h: InfoHash,
        /// When its caller's wait ends.
        deadline: Instant,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
}

impl Job {
    /// Commands a plain write of it takes: `HSET`, `HINCRBY` when it joins, `ZADD`,
    /// `PEXPIRE` of the set when it joins, and `SADD` and `PEXPIRE` per zone bucket.
    fn plain_commands(&self) -> usize {
        let join = matches!(self.kind, Kind::Plain { join: true, .. });
        2 + 2 * usize::from(join) + 2 * zone_prefixes(self.args.get(5)).count()
    }

    /// Not worth sending: its caller gave up (its deadline, or its client went). A plain
    /// write is sent whether or not its caller still waits, until its deadline: the copy
    /// of the swarm already holds what it writes, and not sending it leaves the copy ahead of
    /// Redis (loaded again, a read of the whole swarm for a request of a few hundred bytes).
    /// Past its deadline it is dropped as the script's are (a Redis that far behind is not
    /// sent more; the client's retry may have been written since), and its copy with it.
    fn abandoned(&self) -> bool {
        match &self.kind {
            Kind::Script { done, .. } => done.is_closed(),
            Kind::Plain { deadline, .. } => Instant::now() >= *deadline,
        }
    }
}

/// Sends the announces of one serving thread to Redis, many per script call.
///
/// One `EVALSHA` per announce cost Redis a parse, a Lua call and a reply each, and the replica
/// a command, a request and a reply each. Here announces queue while the thread's calls in
/// flight ([`BATCHES_IN_FLIGHT`]) are out, and the next call takes all that queued (up to
/// [`MAX_BATCH`]): alone, an announce goes at once; under load, calls grow instead of queues.
struct Batcher {
    conn: ConnectionManager,
    script: Script,
    common: Vec<String>,
    /// Where plain writes publish their lines, and as whom.
    channel: String,
    publisher: String,
    /// The copies plain writes were recorded in first: one whose write failed is dropped
    /// here, whether or not its caller still waits ([`Batcher::send_plain`]).
    mirror: std::sync::Arc<Mirror>,
    /// The TTL zone buckets get (`announce.lua`'s `keep`).
    keep_ms: u64,
    timeout: Duration,
}

/// Most announces in one script call.
const MAX_BATCH: usize = 64;
/// Most announces one serving thread queues for Redis.
const MOST_QUEUED: usize = 4096;
/// Script calls one serving thread has out at once.
const BATCHES_IN_FLIGHT: usize = 4;

impl Batcher {
    async fn run(self, mut jobs: mpsc::Receiver<Job>) {
        let this = std::sync::Arc::new(self);
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
        while let Some(first) = jobs.recv().await {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            // Announces whose callers gave up meanwhile (their deadline) are not sent.
            let keep = |j: &Job| {
                let abandoned = j.abandoned();
                if let (true, Kind::Plain { h, .. }) = (abandoned, &j.kind) {
                    this.mirror.forget(h);
                }
                !abandoned
            };
            let mut batch: Vec<Job> = Some(first).into_iter().filter(keep).collect();
            while batch.len() < MAX_BATCH {
                match jobs.try_recv() {
                    Ok(j) if !keep(&j) => {}
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                continue;
            }
            let (plain, script): (Vec<Job>, Vec<Job>) = batch
                .into_iter()
                .partition(|j| matches!(j.kind, Kind::Plain { .. }));
            let this = this.clone();
            tokio::spawn(async move {
                tokio::join!(this.send(script), this.send_plain(plain));
                drop(slot);
            });
        }
    }

    /// One script call for `batch` (tried again on a broken connection, as [`retried`] says);
    /// every job gets its answer or the call's error.
    async fn send(&self, batch: Vec<Job>) {
        if batch.is_empty() {
            return;
        }
        // EVALSHA written here rather than through `Script::prepare_invoke`, which holds each
        // argument in a buffer of its own before copying it into the command.
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash()).arg(0);
        for a in &self.common {
            cmd.arg(a);
        }
        cmd.arg(batch.len());
        for j in &batch {
            for a in j.args.iter() {
                cmd.arg(a);
            }
        }
        let call = retried(self.conn.clone(), |mut c: ConnectionManager| {
            let (cmd, script) = (&cmd, &self.script);
            async move {
                match cmd.query_async::<Vec<Value>>(&mut c).await {
                    // Redis restarted or flushed its scripts: load it, and call again.
                    Err(e)
                        if e.kind()
                            == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                    {
                        script.prepare_invoke().load_async(&mut c).await?;
                        cmd.query_async(&mut c).await
                    }
                    r => r,
                }
            }
        });
        let replies = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(r)) if r.len() == batch.len() => r,
            Ok(Ok(_)) => return fail(batch, || StoreError::Protocol("short batch answer".into())),
            Ok(Err(e)) => return fail(batch, || StoreError::Redis(e.clone())),
            Err(_) => return fail(batch, || StoreError::Timeout(self.timeout)),
        };
        for (j, v) in batch.into_iter().zip(replies) {
            let Kind::Script { want, done } = j.kind else {
                continue;
            };
            let answer = match v {
                Value::Array(items) => parse_answer(&items, want),
                other => Err(StoreError::Protocol(format!("{other:?}"))),
            };
            // The caller may have given up (its deadline): nothing to do then.
            let _ = done.send(answer);
        }
    }

    /// Write `batch` without the script, in one `MULTI`: for each announce the record
    /// (`HSET p:<member>`), the address count when it joins (`HINCRBY a:<ip> 1`), its score
    /// (`ZADD`, and its set's TTL when it joins) and its zone buckets (`SADD`, `PEXPIRE`);
    /// then one `PUBLISH` of the lines, numbered 0. A transaction runs whole between two
    /// scripts, so its lines are on the channel exactly where its writes are in Redis's order,
    /// which is what a copy loading the swarm needs (`mirror.rs`). Redis spends about half the
    /// time on these commands that it spends on the script doing the same (the script's own
    /// work is most of its cost; tracker_bench --replicas).
    ///
    /// The caller's copy said whether the peer is new; `ZADD`'s reply says whether it was, in
    /// Redis. When they differ (the copy a few milliseconds behind another replica, or a peer
    /// that the copy has expired and Redis not yet), the address count is put right by as
    /// much, in a second call.
    async fn send_plain(&self, batch: Vec<Job>) {
        if batch.is_empty() {
            return;
        }
        let pipe = self.plain_pipeline(&batch);
        let call = retried(self.conn.clone(), |mut c: ConnectionManager| {
            let pipe = &pipe;
            async move {
                pipe.query_async::<Vec<redis::RedisResult<Value>>>(&mut c)
                    .await
            }
        });
        let expected = batch.iter().map(Job::plain_commands).sum::<usize>() + 1;
        let replies = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(r)) if r.len() == expected => r,
            Ok(Ok(_)) => {
                self.forget_copies(&batch);
                return fail(batch, || StoreError::Protocol("short batch answer".into()));
            }
            Ok(Err(e)) => {
                self.forget_copies(&batch);
                return fail(batch, || StoreError::Redis(e.clone()));
            }
            Err(_) => {
                self.forget_copies(&batch);
                return fail(batch, || StoreError::Timeout(self.timeout));
            }
        };
        let mut fixes = redis::pipe();
        let mut at = 0;
        for j in batch {
            // HSET's reply and ZADD's (after HINCRBY's for a join); the zone buckets' are not
            // looked at (the script, too, lets a bucket of the wrong type be).
            let n = j.plain_commands();
            let Kind::Plain { join, h, done, .. } = j.kind else {
                continue;
            };
            let (hset, zadd) = (&replies[at], &replies[at + 1 + usize::from(join)]);
            let counted = join && replies[at + 1].is_ok();
            at += n;
            // What the address count is off by: the copy took the peer for new and Redis did
            // not (or the other way round), or the peer's score was not written at all.
            let (written, off) = match (hset, zadd) {
                (Ok(_), Ok(Value::Int(added @ (0 | 1)))) => (Ok(()), added - i64::from(join)),
                (Err(e), _) | (_, Err(e)) => {
                    (Err(StoreError::Redis(e.clone())), -i64::from(counted))
                }
                other => (
                    Err(StoreError::Protocol(format!("{other:?}"))),
                    -i64::from(counted),
                ),
            };
            if written.is_err() {
                self.mirror.forget(&h);
            }
            if off != 0 {
                let mut field = b"a:".to_vec();
                field.extend_from_slice(j.args.get(2));
                fixes
                    .cmd("HINCRBY")
                    .arg(swarm_key(j.args.get(0), b"swarm"))
                    .arg(field)
                    .arg(off)
                    .ignore();
            }
            let _ = done.send(written);
        }
        if !fixes.is_empty() {
            let call = retried(self.conn.clone(), |mut c: ConnectionManager| {
                let fixes = &fixes;
                async move { fixes.query_async::<()>(&mut c).await }
            });
            if let Ok(Err(e)) | Err(e) = tokio::time::timeout(self.timeout, call)
                .await
                .map_err(|_| StoreError::Timeout(self.timeout))
                .map(|r| r.map_err(StoreError::Redis))
            {
                // Rare (Redis failing between two calls): the count stays off by one or two
                // until the swarm's keys expire, tightening or loosening that address's limit.
                tracing::warn!(error = %e, "peer store: an address count was not put right");
            }
        }
    }

    /// Drop the copies of the swarms `batch` wrote to: what Redis holds of them is not known.
    fn forget_copies(&self, batch: &[Job]) {
        for j in batch {
            if let Kind::Plain { h, .. } = &j.kind {
                self.mirror.forget(h);
            }
        }
    }

    /// The `MULTI` of [`Batcher::send_plain`]: [`Job::plain_commands`] commands per job, in
    /// this order, then the `PUBLISH`. No command is `ignore`d: redis-rs keeps those in a
    /// hash set it looks every reply up in. Keys are built in buffers reused across the batch,
    /// and each command is sized for its arguments up front ([`sized`]).
    fn plain_pipeline(&self, batch: &[Job]) -> redis::Pipeline {
        let mut pipe = redis::Pipeline::with_capacity(4 * batch.len() + 1);
        pipe.atomic().ignore_errors();
        let keep = self.keep_ms.to_string();
        let keep = keep.as_bytes();
        let mut lines = Vec::with_capacity(batch.len() * 160);
        let (mut hkey, mut skey, mut zkey) = (Vec::new(), Vec::new(), Vec::new());
        let (mut field, mut what) = (Vec::with_capacity(80), Vec::with_capacity(80));
        for j in batch {
            let Kind::Plain { join, .. } = j.kind else {
                continue;
            };
            let (hash, member, ip) = (j.args.get(0), j.args.get(1), j.args.get(2));
            let (role, zone, rec, now) =
                (j.args.get(4), j.args.get(5), j.args.get(6), j.args.get(7));
            swarm_key_into(&mut hkey, hash, b"swarm");
            field.clear();
            field.extend_from_slice(b"p:");
            field.extend_from_slice(member);
            pipe.add_command(sized("HSET", &[&hkey, &field, rec]));
            if join {
                field.clear();
                field.extend_from_slice(b"a:");
                field.extend_from_slice(ip);
                pipe.add_command(sized("HINCRBY", &[&hkey, &field, b"1"]));
            }
            let set: &[u8] = if role == b"S" {
                b"seeders"
            } else {
                b"leechers"
            };
            swarm_key_into(&mut skey, hash, set);
            pipe.add_command(sized("ZADD", &[&skey, now, member]));
            // A join may make the set (its last peer swept or gone a moment ago, the copy
            // not knowing yet): it must not be left without a TTL.
            if join {
                pipe.add_command(sized("PEXPIRE", &[&skey, keep]));
            }
            for prefix in zone_prefixes(zone) {
                what.clear();
                what.extend_from_slice(b"z:");
                what.extend_from_slice(role);
                what.push(b':');
                what.extend_from_slice(prefix);
                swarm_key_into(&mut zkey, hash, &what);
                pipe.add_command(sized("SADD", &[&zkey, member]));
                pipe.add_command(sized("PEXPIRE", &[&zkey, keep]));
            }
            if !lines.is_empty() {
                lines.push(b'\n');
            }
            for part in [self.publisher.as_bytes(), hash, b"0", b"U", now] {
                lines.extend_from_slice(part);
                lines.push(b'|');
            }
            lines.extend_from_slice(rec);
        }
        pipe.add_command(sized("PUBLISH", &[self.channel.as_bytes(), &lines]));
        pipe
    }
}

/// Command `name` with `args`, its buffers sized for them at once: `Pipeline::cmd` grows
/// them an argument at a time, and the reallocations showed in the replica's profile.
fn sized(name: &str, args: &[&[u8]]) -> redis::Cmd {
    let bytes = name.len() + args.iter().map(|a| a.len()).sum::<usize>();
    let mut c = redis::Cmd::with_capacity(args.len() + 1, bytes);
    c.arg(name);
    for a in args {
        c.arg(*a);
    }
    c
}

/// [`swarm_key`], written over `k`.
fn swarm_key_into(k: &mut Vec<u8>, hash_hex: &[u8], what: &[u8]) {
    k.clear();
    k.extend_from_slice(KEY_PREFIX.as_bytes());
    k.push(b'{');
    k.extend_from_slice(hash_hex);
    k.extend_from_slice(b"}:");
    k.extend_from_slice(what);
}

/// `fbpkg:v5:{<hash hex>}:<what>`, as `announce.lua` names keys.
fn swarm_key(hash_hex: &[u8], what: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(KEY_PREFIX.len() + hash_hex.len() + 3 + what.len());
    swarm_key_into(&mut k, hash_hex, what);
    k
}

/// `dc1/rack7` -> `dc1`, `dc1/rack7`: the zone buckets a peer is in (`announce.lua`'s
/// `prefixes`); none without a zone.
fn zone_prefixes(zone: &[u8]) -> impl Iterator<Item = &[u8]> {
    let cuts = zone
        .iter()
        .enumerate()
        .filter(|&(_, &b)| b == b'/')
        .map(|(i, _)| i);
    let whole = (!zone.is_empty()).then_some(zone.len());
    cuts.chain(whole).map(move |i| &zone[..i])
}

/// `f` on `conn`, and once more when the connection was found broken (Redis restarted, say):
/// its manager is reconnecting already, and the first request on each thread after an outage
/// should not fail for that. (Should the lost answer have been of a script that ran, the
/// retry records the same peers again; at worst `completed` counts a download twice.) The
/// caller bounds both tries with its deadline.
async fn retried<T, Fut>(
    conn: ConnectionManager,
    f: impl Fn(ConnectionManager) -> Fut,
) -> redis::RedisResult<T>
where
    Fut: Future<Output = redis::RedisResult<T>>,
{
    match f(conn.clone()).await {
        Err(e) if e.is_connection_dropped() || e.is_io_error() => f(conn).await,
        r => r,
    }
}

/// Every job of `batch` is answered with the error `e` makes.
fn fail(batch: Vec<Job>, e: impl Fn() -> StoreError) {
    for j in batch {
        // The two senders carry different answers, so each arm sends its own.
        match j.kind {
            Kind::Script { done, .. } => {
                let _ = done.send(Err(e()));
            }
            Kind::Plain { done, .. } => {
                let _ = done.send(Err(e()));
            }
        }
    }
}

pub(super) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn int(v: &Value) -> Result<u64, StoreError> {
    match v {
        Value::Int(i) => u64::try_from(*i).map_err(|_| StoreError::Protocol(format!("{i}"))),
        other => opt_int(other)?.ok_or_else(|| StoreError::Protocol("nil count".into())),
    }
}

fn opt_int(v: &Value) -> Result<Option<u64>, StoreError> {
    match v {
        Value::Nil => Ok(None),
        Value::Int(i) => Ok(u64::try_from(*i).ok()),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Some)
            .ok_or_else(|| StoreError::Protocol("count is not a number".into())),
        other => Err(StoreError::Protocol(format!("{other:?}"))),
    }
}

fn parse_answer(v: &[Value], want: Want) -> Result<Answer, StoreError> {
    // The script's own failure for this announce alone: {-1, message}.
    if let (Some(Value::Int(-1)), Some(Value::BulkString(why))) = (v.first(), v.get(1)) {
        return Err(StoreError::Protocol(format!(
            "announce script: {}",
            String::from_utf8_lossy(why)
        )));
    }
    let status = v
        .first()
        .map(int)
        .transpose()?
        .ok_or_else(|| StoreError::Protocol("empty answer".into()))?;
    let recorded = match status {
        0 => Recorded::Present,
        1 => Recorded::Removed,
        2 => Recorded::Full,
        3 => Recorded::AddressFull,
        s => return Err(StoreError::Protocol(format!("status {s}"))),
    };
    let count = |i: usize| {
        v.get(i)
            .map(int)
            .transpose()
            .map(|n| u32::try_from(n.unwrap_or(0)).unwrap_or(u32::MAX))
    };
    let (complete, incomplete) = (count(1)?, count(2)?);
    let seq = v.get(3).map(int).transpose()?.unwrap_or(0);
    let oldest_ms = v.get(4).map(int).transpose()?.unwrap_or(0);
    let rest = v.get(5..).unwrap_or_default();
    fn bulk(r: &Value) -> Option<&[u8]> {
        match r {
            Value::BulkString(b) => Some(b),
            _ => None,
        }
    }
    let (peers, all) = if want == Want::All {
        // score, record pairs; a pair this version cannot read is left out.
        let all = rest
            .chunks_exact(2)
            .filter_map(|p| {
                // A score is a double: Redis may write it with an exponent.
                let at: f64 = std::str::from_utf8(bulk(&p[0])?).ok()?.parse().ok()?;
                let at = (at.is_finite() && at >= 0.0).then_some(at as u64)?;
                Some((at, parse_full(bulk(&p[1])?)?))
            })
            .collect();
        (Vec::new(), all)
    } else {
        let peers = rest.iter().filter_map(|r| parse_record(bulk(r)?)).collect();
        (peers, Vec::new())
    };
    Ok(Answer {
        recorded,
        complete,
        incomplete,
        peers,
        seq,
        oldest_ms,
        all,
    })
}

/// `role|zone|addr|peer-id-hex|...` -> the peer's entry; a record this version cannot read is
/// left out of the answer rather than failing it.
fn parse_record(b: &[u8]) -> Option<PeerEntry> {
    let s = std::str::from_utf8(b).ok()?;
    let mut f = s.split('|');
    let (_role, _zone) = (f.next()?, f.next()?);
    let addr: SocketAddr = f.next()?.parse().ok()?;
    let peer_id = PeerId::from_hex(f.next()?).ok()?;
    Some(PeerEntry {
        addr,
        peer_id: Some(peer_id),
    })
}

/// A whole record (`role|zone|addr|peer-id-hex|uploaded|downloaded|left`) for the dashboard.
fn parse_listed(b: &[u8]) -> Option<Listed> {
    parse_full(b).map(|r| r.listed)
}

/// A whole record, id included; `None` for one this version cannot read.
pub(crate) fn parse_full(b: &[u8]) -> Option<Record> {
    let s = std::str::from_utf8(b).ok()?;
    let mut f = s.split('|');
    let (_role, zone, addr, id) = (f.next()?, f.next()?, f.next()?, f.next()?);
    let (up, down, left) = (f.next()?, f.next()?, f.next()?);
    if f.next().is_some() {
        return None;
    }
    Some(Record {
        peer_id: PeerId::from_hex(id).ok()?,
        listed: Listed {
            addr: addr.parse().ok()?,
            zone: (!zone.is_empty()).then(|| zone.to_owned()),
            uploaded: up.parse().ok()?,
            downloaded: down.parse().ok()?,
            left: left.parse().ok()?,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A seeder completing, at `[::1]:6881` in zone `dc1/r2`.
    fn completing() -> Announce {
        Announce {
            info_hash: InfoHash([0xab; 20]),
            peer_id: PeerId([0x01; 20]),
            addr: "[::1]:6881".parse().expect("addr"),
            event: Event::Completed,
            uploaded: 10,
            downloaded: 20,
            left: 0,
            zone: Some(Zone::new("dc1/r2").expect("zone")),
            numwant: 50,
        }
    }

    /// The arguments as `announce.lua` reads them, and a record `parse_listed` reads back.
    #[test]
    fn an_announce_is_written_as_the_script_reads_it() {
        let a = completing();
        let args = Args::new(&a, 1_700_000_000_123, Want::Nothing);
        let got: Vec<String> = args
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect();
        let id = "01".repeat(20);
        let record = format!("S|dc1/r2|[::1]:6881|{id}|10|20|0");
        assert_eq!(
            got,
            [
                "ab".repeat(20).as_str(),
                &format!("{id}@::1"),
                "::1",
                "completed",
                "S",
                "dc1/r2",
                &record,
                "1700000000123",
                "50",
                "none",
            ]
        );
        let listed = parse_listed(record.as_bytes()).expect("the record reads back");
        assert_eq!((listed.zone.as_deref(), listed.left), (Some("dc1/r2"), 0));
        // No zone, no event: empty arguments, not missing ones. An IPv4 address is written
        // once and copied into the ip and the record.
        let plain = Announce {
            zone: None,
            event: Event::None,
            left: 5,
            addr: "198.18.0.7:7000".parse().expect("addr"),
            ..a
        };
        let args = Args::new(&plain, 1, Want::Draw);
        let got: Vec<&[u8]> = args.iter().collect();
        assert_eq!(got.len(), 10);
        assert_eq!(
            (got[3], got[4], got[5], got[9]),
            (&b""[..], &b"L"[..], &b""[..], &b"draw"[..])
        );
        let record = format!("L||198.18.0.7:7000|{id}|10|20|5");
        assert_eq!(
            (got[1], got[2], got[6]),
            (
                format!("{id}@198.18.0.7").as_bytes(),
                &b"198.18.0.7"[..],
                record.as_bytes()
            )
        );
    }

    #[test]
    fn records_round_trip_and_bad_ones_are_skipped() {
        let id = PeerId([7; 20]);
        let rec = format!("L|dc1/r1|[::1]:6881|{}|0|0|5", id.to_hex());
        let e = parse_record(rec.as_bytes()).expect("a valid record");
        assert_eq!(e.addr, "[::1]:6881".parse().expect("addr"));
        assert_eq!(e.peer_id, Some(id));
        assert!(parse_record(b"L||nonsense|00|0|0|0").is_none());
        let l = parse_listed(rec.as_bytes()).expect("a whole record");
        assert_eq!((l.zone.as_deref(), l.left), (Some("dc1/r1"), 5));
        assert!(
            parse_listed(b"L||127.0.0.1:1|00|0|0").is_none(),
            "a field short"
        );
        let a = parse_answer(
            &[
                Value::Int(0),
                Value::Int(1),
                Value::Int(2),
                Value::Int(7),
                Value::Int(1_700_000_000_000),
                Value::BulkString(rec.clone().into_bytes()),
                Value::BulkString(b"junk".to_vec()),
            ],
            Want::Draw,
        )
        .expect("answer");
        assert_eq!(
            (a.recorded, a.complete, a.incomplete, a.seq, a.oldest_ms),
            (Recorded::Present, 1, 2, 7, 1_700_000_000_000)
        );
        assert_eq!(a.peers.len(), 1);
        let all = parse_answer(
            &[
                Value::Int(0),
                Value::Int(1),
                Value::Int(2),
                Value::Int(7),
                Value::Int(1_700_000_000_000),
                Value::BulkString(b"1700000000123".to_vec()),
                Value::BulkString(rec.into_bytes()),
                Value::BulkString(b"not a time".to_vec()),
                Value::BulkString(b"junk".to_vec()),
            ],
            Want::All,
        )
        .expect("answer");
        assert_eq!(all.all.len(), 1, "the unreadable pair is left out");
        assert_eq!(all.all[0].0, 1_700_000_000_123);
        assert_eq!(all.all[0].1.peer_id, id);
        assert!(parse_answer(&[Value::Int(9)], Want::Draw).is_err());
    }

    /// Plain writes name keys and zone buckets as `announce.lua` does.
    #[test]
    fn plain_writes_name_keys_as_the_script_does() {
        let h = "ab".repeat(20);
        assert_eq!(
            swarm_key(h.as_bytes(), b"z:L:dc1"),
            format!("fbpkg:v5:{{{h}}}:z:L:dc1").into_bytes()
        );
        assert_eq!(
            swarm_key(h.as_bytes(), b"seeders"),
            key(&InfoHash([0xab; 20]), "seeders").into_bytes()
        );
        let got: Vec<&[u8]> = zone_prefixes(b"dc1/r2/h3").collect();
        assert_eq!(got, [&b"dc1"[..], b"dc1/r2", b"dc1/r2/h3"]);
        assert_eq!(zone_prefixes(b"dc1").collect::<Vec<_>>(), [&b"dc1"[..]]);
        assert_eq!(zone_prefixes(b"").count(), 0);
        let args = Args::new(&completing(), 5, Want::Nothing);
        let all: Vec<&[u8]> = args.iter().collect();
        assert_eq!((0..10).map(|i| args.get(i)).collect::<Vec<_>>(), all);
    }
}
