//! A replica's copy of the Redis swarms it serves, so it answers announces from memory.
//!
//! Redis stays the record: every announce still writes there, in one round trip, under the
//! swarm's limits. What changes is where the answer comes from. Drawing `numwant` peers in the
//! script cost Redis ~60% of its time per announce (`tracker_bench --replicas`); here each
//! replica keeps the peers of the swarms announced to it in its own [`Swarms`], and answers
//! with the same sampling, zones included, as the embedded store.
//!
//! How the copy stays right:
//! - every change (a peer recorded or leaving) is published on one channel, a message per
//!   script call or plain write (`redis_store.rs`, `Batcher::send_plain`) holding its changes
//!   one per line, in the order Redis made them: each is one script or one `MULTI`, which
//!   Redis runs whole. A replica subscribes at start and applies every change in that order,
//!   its own included (not from the replies: they come on other connections, in another
//!   order). The script numbers its changes per swarm (`seq`); plain writes number theirs 0;
//! - a swarm is *cold* until its first announce here, which asks the script for every live
//!   peer along with its write (`Want::All`): the swarm is loaded as of that announce's own
//!   change, numbered `seq`, and what comes before that change's line on the channel,
//!   buffered meanwhile or arriving after the load, is in what was loaded already. A copy
//!   also drops a numbered change at or below the last it holds;
//! - announces to a swarm that is cold or loading are answered by a draw in Redis, as before;
//! - a warm copy also decides how an announce is written ([`Mirror::route`]): most are plain
//!   writes, and the replica records them in its copy at once, before their line comes back
//!   (applied again, a line changes nothing); one goes through the script when a sweep or the
//!   keys' TTLs may be due in Redis;
//! - expiry needs no message: every copy forgets a peer two intervals after its last announce,
//!   by the same clock the script uses;
//! - when the subscription drops, whatever was published meanwhile is lost, so every swarm
//!   turns cold (a generation count voids loads in flight) until its next announce loads it
//!   again; until the subscription is back, answers are drawn in Redis. The subscription is
//!   pinged every [`PING_EVERY`]: one cut silently (a NAT's idle timeout) counts as lost.
//!
//! A change reaches the other replicas a few milliseconds after it is made: an announce may
//! miss a peer that joined through another replica within that time, as it would had it come
//! a little earlier; the next one finds it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use fbpkg_common::InfoHash;
use fbpkg_common::tracker_proto::{Event, Zone};
use futures_util::StreamExt as _;
use redis::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::redis_store::{Record, ms, parse_full};
use super::{RedisStore, wall_ms};
use crate::swarm::{Limits, PeerRecord, Swarms};

/// Longest wait between two tries to subscribe.
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(5);
/// How often the subscription is checked with a `PING` (answered within the store's deadline).
pub const PING_EVERY: Duration = Duration::from_secs(5);
/// Most changes one loading copy buffers; past it the load is given up (the swarm stays cold
/// and the next announce tries again): a load that never completes must not grow without end.
const MOST_PENDING: usize = 100_000;

/// One change to a swarm, as the script made it.
#[derive(Debug, Clone)]
pub struct Change {
    /// Its number in the swarm.
    pub seq: u64,
    /// Recorded (`false`: the peer left).
    pub present: bool,
    /// The script's clock at the change, ms since the Unix epoch.
    pub at_ms: u64,
    /// The peer.
    pub record: Record,
}

#[derive(Debug)]
enum Copy {
    /// Its peers are on the way, as of the generation that asked; changes wait here, in the
    /// order they came.
    Loading {
        generation: u64,
        pending: Vec<Change>,
    },
    /// Its peers are in [`Swarms`] and kept up to date.
    Warm(Warm),
}

/// A copy kept up to date.
#[derive(Debug)]
struct Warm {
    /// The last numbered change applied (or the load's own).
    seq: u64,
    /// When the latest change was made (for a load, this replica's clock when it loaded).
    at_ms: u64,
    /// The load's own change (numbered `seq`) has not come by yet: what comes before it on
    /// the channel is in the loaded peers already, and is dropped.
    awaiting: bool,
    /// When this replica last sent an announce to the swarm through the script.
    scripted_ms: u64,
    /// A bound at or below the score of every peer in Redis's sets: the script's answer
    /// ([`Answer::oldest_ms`](super::Answer::oldest_ms)), lowered by older changes.
    oldest_ms: u64,
    /// This replica's clock when the copy was loaded: its own plain writes from after it are
    /// in the copy already ([`Mirror::holds_own`]).
    loaded_ms: u64,
}

/// How an announce to a swarm is written ([`Mirror::route`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// No copy yet (or one loading): the script answers (and may load it).
    Cold,
    /// A copy answers, and the script writes this one: a sweep or chores may be due.
    Script,
    /// A copy answers, and the write may be plain (`RedisStore::write_plain`).
    Plain,
}

/// Which swarms this replica holds a copy of (their peers are in the [`Swarms`] passed in).
#[derive(Debug, Default)]
pub struct Mirror {
    copies: DashMap<InfoHash, Copy, foldhash::fast::RandomState>,
    /// Bumped whenever the subscription is made or lost: loads asked for before are void.
    generation: AtomicU64,
    subscribed: AtomicBool,
}

impl Mirror {
    /// The swarm's copy is complete: answer from it.
    pub fn is_warm(&self, h: &InfoHash) -> bool {
        self.copies
            .get(h)
            .is_some_and(|c| matches!(*c, Copy::Warm(_)))
    }

    /// How an announce to `h` at `now_ms` is written. With a warm copy, through the script
    /// when this replica has sent none there for an eighth of a peer's TTL (`ttl`: the keys'
    /// TTLs are refreshed by the script's chores), or when a peer in Redis may be past its
    /// TTL and none was sent for a second (the script's own sweep period, for its sweep):
    /// one announce takes that turn, the others stay plain.
    pub fn route(&self, h: &InfoHash, now_ms: u64, ttl: Duration) -> Route {
        let ttl_ms = ms(ttl);
        let due = |w: &Warm| {
            let since = now_ms.checked_sub(w.scripted_ms);
            since.is_none_or(|d| d >= (ttl_ms / 8).max(1))
                || (w.oldest_ms.saturating_add(ttl_ms) < now_ms
                    && since.is_none_or(|d| d >= (ttl_ms / 4).clamp(1, 1000)))
        };
        match self.copies.get(h).as_deref() {
            Some(Copy::Warm(w)) if !due(w) => return Route::Plain,
            Some(Copy::Warm(_)) => {}
            _ => return Route::Cold,
        }
        match self.copies.get_mut(h).as_deref_mut() {
            Some(Copy::Warm(w)) if due(w) => {
                w.scripted_ms = now_ms;
                Route::Script
            }
            Some(Copy::Warm(_)) => Route::Plain,
            _ => Route::Cold,
        }
    }

    /// An announce to `h` went through the script at `now_ms`; it answered `oldest_ms` (0: a
    /// refusal, which does not say).
    pub fn scripted(&self, h: &InfoHash, now_ms: u64, oldest_ms: u64) {
        if let Some(Copy::Warm(w)) = self.copies.get_mut(h).as_deref_mut() {
            w.scripted_ms = w.scripted_ms.max(now_ms);
            if oldest_ms > 0 {
                w.oldest_ms = oldest_ms;
            }
        }
    }

    /// Whether this replica's own plain write to `h`, made at `at_ms` (its clock), is in the
    /// copy already: it records one in the copy as it sends it, so a copy loaded before then
    /// holds it. One loaded since (the copy dropped and loaded again while the write was on
    /// its way) may not, and applies it as it comes.
    pub fn holds_own(&self, h: &InfoHash, at_ms: u64) -> bool {
        matches!(self.copies.get(h).as_deref(), Some(Copy::Warm(w)) if at_ms > w.loaded_ms)
    }

    /// Drop the copy of `h` (a plain write to it failed: what Redis holds is not known); the
    /// next announce loads it again.
    pub fn forget(&self, h: &InfoHash) {
        self.copies.remove(h);
    }

    /// Claim the load of a cold swarm: the generation to pass to [`Mirror::loaded`] when this
    /// caller should ask for every peer, `None` when the swarm is warm, being loaded, or the
    /// changes cannot be followed (no subscription).
    ///
    /// The claim is given back when dropped unless [`Claim::loaded`] was called: an announce
    /// cancelled while it waits (its client went away) leaves the swarm cold, not loading.
    pub fn claim(&self, h: &InfoHash) -> Option<Claim<'_>> {
        let generation = self.generation.load(Ordering::Acquire);
        if !self.subscribed.load(Ordering::Acquire) {
            return None;
        }
        match self.copies.entry(*h) {
            dashmap::Entry::Occupied(_) => return None,
            dashmap::Entry::Vacant(v) => {
                v.insert(Copy::Loading {
                    generation,
                    pending: Vec::new(),
                });
            }
        }
        let claim = Claim {
            mirror: self,
            h: *h,
            generation,
            armed: true,
        };
        // The subscription may have dropped (and the copies been cleared) between the check
        // and the insert: then this load is void already.
        if self.generation.load(Ordering::Acquire) != generation {
            return None;
        }
        Some(claim)
    }

    /// A claimed load failed: the swarm is cold again.
    fn abandon(&self, h: &InfoHash, generation: u64) {
        self.copies.remove_if(
            h,
            |_, c| matches!(c, Copy::Loading { generation: g, .. } if *g == generation),
        );
    }

    /// The peers of a claimed load arrived, as of its own change `seq`: replace the swarm's
    /// peers with them, apply the changes that came after that change's line, and keep the
    /// copy from now on. A load voided meanwhile (the subscription dropped) is dropped.
    fn loaded(
        &self,
        swarms: &Swarms,
        h: &InfoHash,
        generation: u64,
        at: Loaded<'_>,
        ttl: Duration,
    ) {
        let Loaded {
            seq,
            oldest_ms,
            peers,
        } = at;
        if self.generation.load(Ordering::Acquire) != generation
            || !self.subscribed.load(Ordering::Acquire)
        {
            return;
        }
        let Some(mut copy) = self.copies.get_mut(h) else {
            return;
        };
        let pending = match &mut *copy {
            Copy::Loading {
                generation: g,
                pending,
            } if *g == generation => std::mem::take(pending),
            _ => return,
        };
        let Some(mut swarm) = swarms.get(h) else {
            drop(copy);
            self.copies.remove(h);
            return;
        };
        let clock = Clock::now();
        swarm.clear_peers();
        for (at_ms, r) in peers {
            if let Some(rec) = clock.record(r, *at_ms, ttl) {
                swarm.record(rec, Event::None, &Limits::NONE);
            }
        }
        // What came after the load's own change. Should its line be missing while later
        // numbered ones came (not in one channel's order), what follows them.
        let after = match pending.iter().rposition(|c| c.seq == seq) {
            Some(i) => i + 1,
            None => pending
                .iter()
                .position(|c| c.seq > seq)
                .unwrap_or(pending.len()),
        };
        let mut warm = Warm {
            seq,
            at_ms: clock.now_ms,
            awaiting: after == pending.len() && !pending.iter().any(|c| c.seq >= seq),
            scripted_ms: clock.now_ms,
            oldest_ms,
            loaded_ms: clock.now_ms,
        };
        for c in &pending[after..] {
            warm.take(&mut swarm, c, clock, ttl);
        }
        drop(swarm);
        *copy = Copy::Warm(warm);
    }

    /// Apply one published change: to a warm copy now (unless it holds it already, or it
    /// came before the copy's load), to one loading once it has loaded; a cold swarm ignores
    /// it.
    ///
    /// A change made more than a peer's TTL after the copy's last one drops the copy: the
    /// swarm's keys may have expired in Redis meanwhile (they do a TTL after its last
    /// announce). The script numbers a swarm made again from the time it was made (ms), above
    /// anything a copy holds, so this is a second guard, for numbers from another version's
    /// script (from 1 again, as they once were). Every peer of such a copy has expired anyway;
    /// the next announce loads the swarm again.
    pub fn apply(&self, swarms: &Swarms, h: &InfoHash, change: Change, ttl: Duration) {
        let Some(mut copy) = self.copies.get_mut(h) else {
            return;
        };
        match &mut *copy {
            Copy::Loading { pending, .. } if pending.len() < MOST_PENDING => pending.push(change),
            Copy::Loading { .. } => {
                drop(copy);
                self.copies.remove(h);
            }
            Copy::Warm(w) if Duration::from_millis(change.at_ms.saturating_sub(w.at_ms)) > ttl => {
                drop(copy);
                self.copies.remove(h);
            }
            Copy::Warm(w) if w.awaiting && change.seq < w.seq => {}
            Copy::Warm(w) if w.awaiting && change.seq == w.seq => w.awaiting = false,
            Copy::Warm(w) if change.seq != 0 && change.seq <= w.seq => {}
            Copy::Warm(w) => match swarms.get(h) {
                Some(mut swarm) => {
                    w.awaiting = false;
                    w.take(&mut swarm, &change, Clock::now(), ttl);
                }
                // The sweeper dropped the swarm (unregistered, left empty): the change would
                // be lost, so the copy goes and the next announce loads it again.
                None => {
                    drop(copy);
                    self.copies.remove(h);
                }
            },
        }
    }

    /// The subscription is made (`true`) or lost (`false`): either way what was published
    /// before is not known here, so every copy is dropped and loads in flight are void.
    pub fn set_subscribed(&self, on: bool) {
        self.subscribed.store(on, Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.copies.clear();
    }

    /// Forget the copies of swarms `keep` says are gone (the sweeper dropped them).
    pub fn retain(&self, keep: impl Fn(&InfoHash) -> bool) {
        self.copies.retain(|h, _| keep(h));
    }

    /// Following the published changes now.
    pub fn is_subscribed(&self) -> bool {
        self.subscribed.load(Ordering::Acquire)
    }

    /// Swarms with a copy (warm or loading).
    pub fn len(&self) -> usize {
        self.copies.len()
    }

    /// No copies.
    pub fn is_empty(&self) -> bool {
        self.copies.is_empty()
    }
}

impl Warm {
    /// Apply `c` to the copy's peers (`swarm`): a numbered change moves `seq`, one numbered 0
    /// (a plain write) does not.
    fn take(&mut self, swarm: &mut crate::swarm::Swarm, c: &Change, clock: Clock, ttl: Duration) {
        if c.seq != 0 && c.seq <= self.seq {
            return;
        }
        clock.apply(swarm, c, ttl);
        self.seq = self.seq.max(c.seq);
        self.at_ms = self.at_ms.max(c.at_ms);
        if c.present {
            self.oldest_ms = self.oldest_ms.min(c.at_ms);
        }
    }
}

/// What a load brought: the swarm as of the load's own change `seq`, every live peer with its
/// last announce (ms), and the script's `oldest`.
#[derive(Debug, Clone, Copy)]
pub struct Loaded<'a> {
    /// The load's own change.
    pub seq: u64,
    /// See [`Answer::oldest_ms`](super::Answer::oldest_ms).
    pub oldest_ms: u64,
    /// Every live peer, with its last announce in ms.
    pub peers: &'a [(u64, Record)],
}

/// The right to load one cold swarm ([`Mirror::claim`]); given back on drop unless used.
#[derive(Debug)]
pub struct Claim<'a> {
    mirror: &'a Mirror,
    h: InfoHash,
    generation: u64,
    armed: bool,
}

impl Claim<'_> {
    /// The swarm's live peers arrived, as of the load's own change: replace the copy's peers
    /// with them, apply the changes that came after that change, and keep the copy from now
    /// on. A load voided meanwhile (the subscription dropped) is dropped.
    pub fn loaded(mut self, swarms: &Swarms, at: Loaded<'_>, ttl: Duration) {
        self.armed = false;
        self.mirror
            .loaded(swarms, &self.h, self.generation, at, ttl);
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.mirror.abandon(&self.h, self.generation);
        }
    }
}

/// The wall clock and the monotonic one read together, to turn the script's ms into the
/// `Instant`s [`Swarms`] expires peers by.
#[derive(Clone, Copy)]
struct Clock {
    now: Instant,
    now_ms: u64,
}

impl Clock {
    fn now() -> Self {
        Self {
            now: Instant::now(),
            now_ms: wall_ms(),
        }
    }

    /// The peer as [`Swarms`] keeps it; `None` when already silent for `ttl` (a replica's
    /// clock ahead of the one that recorded it). A time ahead of ours counts as now.
    fn record(self, r: &Record, at_ms: u64, ttl: Duration) -> Option<PeerRecord> {
        let ago = Duration::from_millis(self.now_ms.saturating_sub(at_ms));
        if ago >= ttl {
            return None;
        }
        let zone = r.listed.zone.as_deref().and_then(|z| Zone::new(z).ok());
        Some(PeerRecord {
            peer_id: r.peer_id,
            addr: r.listed.addr,
            uploaded: r.listed.uploaded,
            downloaded: r.listed.downloaded,
            left: r.listed.left,
            zone,
            last_seen: self.now.checked_sub(ago).unwrap_or(self.now),
        })
    }

    fn apply(self, swarm: &mut crate::swarm::Swarm, c: &Change, ttl: Duration) {
        let event = if c.present {
            Event::None
        } else {
            Event::Stopped
        };
        // A leaving peer is removed whatever its age; a stale record is not added.
        let rec = match self.record(&c.record, c.at_ms, ttl) {
            Some(rec) => rec,
            None if !c.present => PeerRecord {
                peer_id: c.record.peer_id,
                addr: c.record.listed.addr,
                uploaded: 0,
                downloaded: 0,
                left: 0,
                zone: None,
                last_seen: self.now,
            },
            None => return,
        };
        swarm.record(rec, event, &Limits::NONE);
    }
}

/// The swarm and time of `line` when it is a plain write (numbered 0) published by
/// `publisher`: its replica recorded it in its copy when it wrote it ([`Mirror::holds_own`]).
/// Skipping it saves parsing and applying again what is there; should another replica's
/// change to the same peer come between the two (the peer announcing to both within
/// milliseconds), that copy keeps the other's until the peer's next announce.
fn own_plain(line: &[u8], publisher: &[u8]) -> Option<(InfoHash, u64)> {
    let rest = line.strip_prefix(publisher)?.strip_prefix(b"|")?;
    let mut f = rest.splitn(5, |&b| b == b'|');
    let h = std::str::from_utf8(f.next()?).ok()?.parse().ok()?;
    if f.next()? != b"0" || f.next()? != b"U" {
        return None;
    }
    let at_ms = std::str::from_utf8(f.next()?).ok()?.parse().ok()?;
    Some((h, at_ms))
}

/// A published change: `publisher|info-hash hex|seq|U or D|ms|record` (seq 0: a plain
/// write's). The publisher (the replica that made it) is for whoever watches the channel;
/// copies apply every change.
fn parse_change(payload: &[u8]) -> Option<(InfoHash, Change)> {
    let mut f = payload.splitn(6, |&b| b == b'|');
    let _publisher = f.next()?;
    let h: InfoHash = std::str::from_utf8(f.next()?).ok()?.parse().ok()?;
    let num = |b: &[u8]| std::str::from_utf8(b).ok()?.parse::<u64>().ok();
    let seq = num(f.next()?)?;
    let present = match f.next()? {
        b"U" => true,
        b"D" => false,
        _ => return None,
    };
    let at_ms = num(f.next()?)?;
    let record = parse_full(f.next()?)?;
    Some((
        h,
        Change {
            seq,
            present,
            at_ms,
            record,
        },
    ))
}

/// Follow the changes every replica publishes, this one's included, until `shutdown`:
/// subscribe (again after any failure, backing off up to `RESUBSCRIBE_MAX`), apply each
/// message to the mirror.
pub async fn follow(store: &RedisStore, swarms: &Swarms, shutdown: CancellationToken) {
    let mirror = store.mirror();
    let mut backoff = Duration::from_millis(100);
    loop {
        let subscribed = async {
            let mut ps = store.pubsub().await?;
            ps.subscribe(store.channel()).await?;
            Ok::<_, super::StoreError>(ps)
        };
        let pubsub = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = subscribed => match r {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(error = %e, "mirror: cannot subscribe; answers are drawn in Redis");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(RESUBSCRIBE_MAX);
                    continue;
                }
            },
        };
        backoff = Duration::from_millis(100);
        mirror.set_subscribed(true);
        tracing::debug!(channel = store.channel(), "mirror: following changes");
        let (mut sink, mut messages) = pubsub.split();
        let mut ping = tokio::time::interval(PING_EVERY);
        let mut warned = false;
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => {
                    mirror.set_subscribed(false);
                    return;
                }
                _ = ping.tick() => {
                    let pong = tokio::time::timeout(store.timeout(), sink.ping::<Value>()).await;
                    if matches!(pong, Ok(Ok(_))) {
                        continue;
                    }
                    break;
                }
                m = messages.next() => m,
            };
            let Some(msg) = msg else { break };
            let payload = msg.get_payload_bytes();
            // This replica's own plain writes are in its copies already (see `Mirror::route`).
            let theirs = payload.split(|&b| b == b'\n').filter(|line| {
                own_plain(line, store.publisher().as_bytes())
                    .is_none_or(|(h, at_ms)| !mirror.holds_own(&h, at_ms))
            });
            for change in theirs.map(parse_change) {
                match change {
                    Some((h, change)) => mirror.apply(swarms, &h, change, store.peer_ttl()),
                    // Another version's message: what it changed cannot be followed, so the
                    // copies go (answers are drawn until each swarm's next announce loads
                    // it), and what follows it in the message with them.
                    None => {
                        if !std::mem::replace(&mut warned, true) {
                            tracing::warn!(
                                "mirror: a message this version cannot read (another \
                                 version publishing?); its copies are dropped on each one"
                            );
                        }
                        mirror.set_subscribed(true);
                        break;
                    }
                }
            }
        }
        mirror.set_subscribed(false);
        tracing::warn!(
            store = store.shown(),
            "mirror: subscription lost; answers are drawn in Redis until it is back"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::swarm::PackageLabel;
    use fbpkg_common::{PeerId, Sha256Hash};

    fn record(n: u8, left: u64) -> Record {
        let line = format!(
            "L||127.0.0.{n}:6881|{}|0|0|{left}",
            PeerId([n; 20]).to_hex()
        );
        parse_full(line.as_bytes()).expect("record")
    }

    fn change(seq: u64, n: u8, present: bool) -> Change {
        Change {
            seq,
            present,
            at_ms: wall_ms(),
            record: record(n, 5),
        }
    }

    fn setup() -> (Mirror, Swarms, InfoHash) {
        let swarms = Swarms::default();
        let h = InfoHash([3; 20]);
        swarms.register(
            h,
            PackageLabel {
                name: "app".parse().expect("name"),
                sha256: Sha256Hash([0; 32]),
                size: 1,
            },
        );
        let m = Mirror::default();
        m.set_subscribed(true);
        (m, swarms, h)
    }

    fn ids(swarms: &Swarms, h: &InfoHash) -> Vec<u8> {
        let s = swarms.get(h).expect("swarm");
        let mut v: Vec<u8> = s
            .seeders()
            .iter()
            .chain(s.leechers())
            .map(|p| p.peer_id.0[0])
            .collect();
        v.sort_unstable();
        v
    }

    const TTL: Duration = Duration::from_secs(60);

    fn at(seq: u64, peers: &[(u64, Record)]) -> Loaded<'_> {
        Loaded {
            seq,
            oldest_ms: peers.iter().map(|p| p.0).min().unwrap_or_else(wall_ms),
            peers,
        }
    }

    /// The swarm's keys expired in Redis after a TTL without announces, and its changes are
    /// numbered from 1 again (as an earlier script did): the first of them drops the copy,
    /// which would have ignored every one numbered at or below what it held.
    #[tokio::test]
    async fn a_change_after_a_silence_longer_than_a_ttl_drops_the_copy() {
        let (m, swarms, h) = setup();
        let claim = m.claim(&h).expect("cold");
        claim.loaded(&swarms, at(40, &[(wall_ms(), record(1, 5))]), TTL);
        let mut soon = change(41, 2, true);
        soon.at_ms = wall_ms() + 1_000;
        m.apply(&swarms, &h, soon, TTL);
        assert!(m.is_warm(&h), "a change within a TTL is applied");
        assert_eq!(ids(&swarms, &h), vec![1, 2]);
        let mut again = change(1, 3, true);
        again.at_ms = wall_ms() + 1_000 + 60_001;
        m.apply(&swarms, &h, again, TTL);
        assert!(!m.is_warm(&h), "the copy is dropped");
        assert!(
            m.claim(&h).is_some(),
            "and the next announce loads the swarm again"
        );
    }

    /// What came before the load's own change (numbered 5) on the channel is in the load,
    /// numbered or not (0: a plain write); what came after it is not.
    #[tokio::test]
    async fn a_load_keeps_only_the_changes_after_its_own() {
        let (m, swarms, h) = setup();
        assert!(!m.is_warm(&h));
        let claim = m.claim(&h).expect("cold: this caller loads it");
        assert!(m.claim(&h).is_none(), "one load at a time");
        // Published while the load was on its way. 7 joined and 8 left before it: applied,
        // the first would add 7, the second take 9 (which the load holds) out.
        m.apply(&swarms, &h, change(3, 7, true), TTL);
        m.apply(&swarms, &h, change(0, 9, false), TTL);
        m.apply(&swarms, &h, change(5, 1, true), TTL);
        // After it: 2 joins by a plain write, 3 through the script; 4 joins and leaves.
        m.apply(&swarms, &h, change(0, 2, true), TTL);
        m.apply(&swarms, &h, change(6, 3, true), TTL);
        m.apply(&swarms, &h, change(0, 4, true), TTL);
        m.apply(&swarms, &h, change(7, 4, false), TTL);
        assert!(!m.is_warm(&h));
        let now = wall_ms();
        claim.loaded(
            &swarms,
            at(5, &[(now, record(1, 5)), (now, record(9, 0))]),
            TTL,
        );
        assert!(m.is_warm(&h));
        assert_eq!(ids(&swarms, &h), vec![1, 2, 3, 9]);
        m.apply(&swarms, &h, change(8, 4, true), TTL);
        assert_eq!(ids(&swarms, &h), vec![1, 2, 3, 4, 9]);
        // A numbered change the copy holds already, arriving late, is dropped: applied, this
        // one would take 9 out.
        m.apply(&swarms, &h, change(4, 9, false), TTL);
        m.apply(&swarms, &h, change(8, 9, false), TTL);
        assert_eq!(ids(&swarms, &h), vec![1, 2, 3, 4, 9]);
        m.apply(&swarms, &h, change(0, 1, false), TTL);
        m.apply(&swarms, &h, change(9, 2, false), TTL);
        assert_eq!(ids(&swarms, &h), vec![3, 4, 9]);
    }

    /// The load's answer can come before its own change's line: until that line comes, what
    /// comes is from before the load, and is dropped.
    #[tokio::test]
    async fn a_load_answered_before_its_own_line_drops_what_precedes_it() {
        let (m, swarms, h) = setup();
        let claim = m.claim(&h).expect("cold");
        claim.loaded(&swarms, at(10, &[(wall_ms(), record(1, 5))]), TTL);
        assert!(m.is_warm(&h), "answers come from the load at once");
        m.apply(&swarms, &h, change(0, 2, true), TTL);
        m.apply(&swarms, &h, change(9, 1, false), TTL);
        assert_eq!(ids(&swarms, &h), vec![1], "both are in the load");
        m.apply(&swarms, &h, change(10, 1, true), TTL);
        m.apply(&swarms, &h, change(0, 4, true), TTL);
        m.apply(&swarms, &h, change(11, 5, true), TTL);
        assert_eq!(ids(&swarms, &h), vec![1, 4, 5]);
    }

    /// A warm copy sends an announce through the script every eighth of a TTL, and once a
    /// second while a peer in Redis may be past its TTL: one announce takes the turn.
    #[tokio::test]
    async fn a_warm_copy_sends_sweeps_and_chores_through_the_script() {
        let (m, swarms, h) = setup();
        let now = wall_ms();
        assert_eq!(m.route(&h, now, TTL), Route::Cold);
        let claim = m.claim(&h).expect("cold");
        assert_eq!(m.route(&h, now, TTL), Route::Cold, "loading");
        claim.loaded(&swarms, at(1, &[(now, record(1, 5))]), TTL);
        assert_eq!(m.route(&h, now + 1, TTL), Route::Plain);
        // Chores: an eighth of 60 s after the load.
        let later = now + 7_600;
        assert_eq!(m.route(&h, later, TTL), Route::Script);
        assert_eq!(m.route(&h, later, TTL), Route::Plain, "one takes the turn");
        m.scripted(&h, later, now);
        assert_eq!(m.route(&h, later + 1_500, TTL), Route::Plain);
        // A peer in Redis a TTL old: a sweep may be due, once a second.
        let stale = now + 60_100;
        assert_eq!(m.route(&h, stale, TTL), Route::Script);
        assert_eq!(m.route(&h, stale + 500, TTL), Route::Plain);
        assert_eq!(m.route(&h, stale + 1_000, TTL), Route::Script);
        // Swept: the oldest left is younger.
        m.scripted(&h, stale + 1_000, stale);
        assert_eq!(m.route(&h, stale + 2_500, TTL), Route::Plain);
        // A change older than the bound lowers it (numbered: the load's own line has not come
        // by in this test, so one numbered 0 would be taken for one from before the load).
        let mut old = change(2, 6, true);
        old.at_ms = now - 1_000;
        m.apply(&swarms, &h, old, TTL);
        assert_eq!(m.route(&h, stale + 2_500, TTL), Route::Script);
        // A failed plain write drops the copy.
        m.forget(&h);
        assert_eq!(m.route(&h, stale + 2_500, TTL), Route::Cold);
    }

    /// This replica's own plain writes are in its copy, unless the copy was loaded again after
    /// one was made: that one may not be in the new load, and is applied as it comes.
    #[tokio::test]
    async fn own_writes_from_before_a_load_are_applied() {
        let (m, swarms, h) = setup();
        assert!(!m.holds_own(&h, wall_ms()), "no copy");
        let before = wall_ms() - 1;
        let claim = m.claim(&h).expect("cold");
        claim.loaded(&swarms, at(1, &[(wall_ms(), record(1, 5))]), TTL);
        assert!(!m.holds_own(&h, before), "made before the load");
        assert!(m.holds_own(&h, wall_ms() + 1), "made since");
    }

    #[tokio::test]
    async fn a_lost_subscription_voids_copies_and_loads_in_flight() {
        let (m, swarms, h) = setup();
        let claim = m.claim(&h).expect("claim");
        m.set_subscribed(false);
        assert!(m.claim(&h).is_none(), "no subscription, no copy");
        claim.loaded(&swarms, at(1, &[(wall_ms(), record(1, 5))]), TTL);
        assert!(!m.is_warm(&h), "a load from before the drop is void");
        m.set_subscribed(true);
        let stale = m.claim(&h).expect("cold again");
        m.set_subscribed(true);
        let fresh = m.claim(&h).expect("cold again, after another resubscribe");
        stale.loaded(&swarms, at(1, &[(wall_ms(), record(1, 5))]), TTL);
        assert!(!m.is_warm(&h), "an old generation's load is void");
        fresh.loaded(&swarms, at(1, &[(wall_ms(), record(2, 5))]), TTL);
        assert!(m.is_warm(&h));
        assert_eq!(ids(&swarms, &h), vec![2], "a load replaces what was there");
    }

    #[tokio::test]
    async fn a_claim_dropped_unused_leaves_the_swarm_cold() {
        let (m, swarms, h) = setup();
        let claim = m.claim(&h).expect("claim");
        // The announce that claimed it is cancelled (its client went away) mid-load.
        drop(claim);
        let claim = m.claim(&h).expect("cold, not loading for ever");
        claim.loaded(&swarms, at(3, &[(wall_ms(), record(1, 5))]), TTL);
        assert!(m.is_warm(&h));
        // Swarms the sweeper dropped lose their copies.
        m.retain(|_| false);
        assert!(!m.is_warm(&h));
    }

    #[tokio::test]
    async fn stale_records_are_not_loaded_and_times_carry_over() {
        let (m, swarms, h) = setup();
        let claim = m.claim(&h).expect("claim");
        let now = wall_ms();
        claim.loaded(
            &swarms,
            at(
                1,
                &[(now - 61_000, record(1, 5)), (now - 30_000, record(2, 5))],
            ),
            TTL,
        );
        assert_eq!(ids(&swarms, &h), vec![2]);
        let s = swarms.get(&h).expect("swarm");
        let age = s.leechers()[0].last_seen.elapsed();
        assert!((29..=31).contains(&age.as_secs()), "{age:?}");
    }

    #[test]
    fn only_this_replicas_own_plain_lines_are_skipped() {
        let h = InfoHash([3; 20]);
        let rec = format!("S|dc1|10.0.0.1:6881|{}|1|2|0", PeerId([4; 20]).to_hex());
        assert_eq!(
            own_plain(format!("abc|{h}|0|U|17|{rec}").as_bytes(), b"abc"),
            Some((h, 17))
        );
        for theirs in [
            format!("abc|{h}|12|U|1|{rec}"),
            format!("abd|{h}|0|U|1|{rec}"),
            format!("abcd|{h}|0|U|1|{rec}"),
            format!("abc|{h}|01|U|1|{rec}"),
            "abc".to_owned(),
        ] {
            assert!(own_plain(theirs.as_bytes(), b"abc").is_none(), "{theirs}");
        }
    }

    #[test]
    fn messages_parse_and_bad_ones_do_not() {
        let h = InfoHash([3; 20]);
        let rec = format!("S|dc1|10.0.0.1:6881|{}|1|2|0", PeerId([4; 20]).to_hex());
        let msg = format!("abc|{h}|12|U|1700000000000|{rec}\nabc|{h}|13|D|1700000000001|{rec}");
        // A message is one change per line.
        let parse = |m: &str| {
            m.as_bytes()
                .split(|&b| b == b'\n')
                .map(parse_change)
                .collect::<Vec<_>>()
        };
        let got: Vec<_> = parse(&msg)
            .into_iter()
            .map(|c| c.map(|(h, c)| (h, c.seq, c.present, c.record.listed.addr)))
            .collect();
        let addr = "10.0.0.1:6881".parse().expect("addr");
        assert_eq!(
            got,
            vec![Some((h, 12, true, addr)), Some((h, 13, false, addr))]
        );
        for bad in [
            format!("abc|{h}|12|X|1|{rec}"),
            format!("abc|nothex|12|U|1|{rec}"),
            format!("abc|{h}|-1|U|1|{rec}"),
            format!("abc|{h}|12|U|1|S|dc1|nonsense"),
            "abc".to_owned(),
            format!("abc|{h}|12|U|1|{rec}\n"),
        ] {
            let last = parse(&bad).pop().expect("a line");
            assert!(last.is_none(), "{bad}");
        }
    }
}
