//! The Redis peer store (`--peer-store redis://...`) against a real redis-server:
//!
//! - the store itself, with a clock the test controls: expiry after two intervals, the
//!   per-address and per-swarm limits, `stopped`, roles and zones in answers;
//! - role counts kept in the swarm's meta stay right through sweeps, refusals and sets
//!   changed behind the script's back;
//! - two tracker processes on one Redis: a peer announced to one is returned by the other,
//!   `stopped` on one removes it from both, the per-address limit counts across replicas;
//! - each replica's copy of a swarm follows the other's changes (published, not expired) and
//!   is loaded again after a Redis restart;
//! - `rediss://`: TLS with the CA given, refused without it;
//! - Redis killed: announces get a failure reason promptly and `/readyz` says the store is not
//!   ready; Redis back: the same tracker processes serve again, without a restart;
//! - end to end: a seed agent announcing to replica A, a leecher agent on replica B, and A
//!   killed before the leecher starts, so the seed can only be found through Redis: the
//!   leecher downloads the exact bytes. The catalog is per replica (files under --data-dir),
//!   so the version is published to A by the seed and its metainfo PUT to B by the test.
//!
//! Every test skips, saying so, when redis-server is not installed.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use std::ffi::OsString;

use fbpkg_common::tracker_proto::{
    AnnounceRequest, AnnounceResponse, Event, PeerEntry, ScrapeRequest, ScrapeResponse,
    TrackerReply, Zone,
};
use fbpkg_common::{InfoHash, PeerId};
use fbpkg_tests::{
    AgentProcess, RedisServer, TrackerProcess, fbpkg_rs, http_client, poll, wait_for,
};
use fbpkg_tracker::peer_store::{Announce, RedisStore, Want};
use fbpkg_tracker::swarm::{Limits, Recorded};

/// Two announce intervals of the store under test, in ms.
const TTL_MS: u64 = 2_000;
/// Long enough for any answer on a loaded machine; an answer, not a hang, is what is tested.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

fn store(redis: &RedisServer, limits: Limits) -> RedisStore {
    store_living(redis, limits, TTL_MS)
}

/// A store whose peers live `ttl_ms`.
fn store_living(redis: &RedisServer, limits: Limits, ttl_ms: u64) -> RedisStore {
    RedisStore::open(
        &redis.url(),
        Duration::from_secs(2),
        Duration::from_millis(ttl_ms),
        limits,
    )
    .expect("a valid Redis URL")
}

/// A store that takes one peer per address (and ten per swarm).
fn one_per_address(redis: &RedisServer) -> RedisStore {
    store(
        redis,
        Limits {
            max_peers: 10,
            max_per_address: 1,
        },
    )
}

/// The Redis key `what` of swarm `h` (`redis_store.rs` has the layout).
fn swarm_key(h: &InfoHash, what: &str) -> String {
    format!("fbpkg:v5:{{{h}}}:{what}")
}

/// Replace key `what` of swarm `h` by a string: a key of the wrong type, as an operator's
/// mistake would leave.
fn plant_string(redis: &RedisServer, h: &InfoHash, what: &str) {
    let key = swarm_key(h, what);
    assert_eq!(redis.command(&format!("SET {key} x")).expect("SET"), "+OK");
}

/// Seeders and leechers an answer counts.
fn counts(r: &fbpkg_tracker::peer_store::Answer) -> (u32, u32) {
    (r.complete, r.incomplete)
}

fn peer(n: u8, ip: [u8; 4], left: u64) -> Announce {
    Announce {
        info_hash: InfoHash([0; 20]),
        peer_id: PeerId([n; 20]),
        addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), 6000 + u16::from(n)),
        event: Event::Started,
        uploaded: 0,
        downloaded: 0,
        left,
        zone: None,
        numwant: 50,
    }
}

fn ids(peers: &[PeerEntry]) -> HashSet<u8> {
    peers
        .iter()
        .filter_map(|p| p.peer_id.map(|id| id.0[0]))
        .collect()
}

macro_rules! redis_or_skip {
    () => {
        match RedisServer::start().expect("starting redis-server") {
            Some(r) => r,
            None => return,
        }
    };
}

#[tokio::test]
async fn silent_peers_expire_after_two_intervals() {
    let redis = redis_or_skip!();
    let s = store(&redis, Limits::NONE);
    let t0 = 1_000_000;
    let a = peer(1, [127, 0, 0, 2], 0);
    let b = peer(2, [127, 0, 0, 3], 10);
    s.announce(&a, t0).await.expect("a announces");
    let seen = s.announce(&b, t0 + TTL_MS - 1).await.expect("b announces");
    assert_eq!(ids(&seen.peers), HashSet::from([1]), "a is still fresh");
    // Sweeps run at most once per quarter TTL (or second) per swarm: b's announce just swept.
    let sweep_every = (TTL_MS / 4).min(1_000);
    let seen = s
        .announce(&b, t0 + TTL_MS - 1 + sweep_every)
        .await
        .expect("b again");
    assert!(seen.peers.is_empty(), "a expired: {:?}", seen.peers);
    assert_eq!((seen.complete, seen.incomplete), (0, 1));
    // Its address count went with it: the address may add a peer again under a limit of 1.
    let one = one_per_address(&redis);
    let again = one
        .announce(&a, t0 + TTL_MS + sweep_every)
        .await
        .expect("a is back");
    assert_eq!(again.recorded, Recorded::Present);
}

/// Keys carry TTLs however announces fall between the refreshes (at most one a second per
/// swarm): a swarm left alone disappears from Redis by itself, but for its `meta` (downloads
/// completed, kept a week; made by the first).
#[tokio::test]
async fn an_abandoned_swarm_leaves_nothing_but_its_counts() {
    let redis = redis_or_skip!();
    let s = store(&redis, Limits::NONE);
    let now = fbpkg_tracker::peer_store::wall_ms();
    let mut a = peer(1, [127, 0, 0, 2], 10);
    a.zone = Some(Zone::new("dc1/rack1").expect("zone"));
    s.announce(&a, now).await.expect("a");
    // Within the same second: new keys (a seeders set, another zone's buckets) and new
    // members of old ones, none of which refreshes TTLs.
    let mut b = peer(2, [127, 0, 0, 3], 10);
    b.zone = Some(Zone::new("dc2/rack9").expect("zone"));
    s.announce(&b, now + 10).await.expect("b");
    // b completes: the download counted is what stays.
    b.left = 0;
    s.announce(&b, now + 15).await.expect("b completes");
    s.announce(&peer(3, [127, 0, 0, 4], 10), now + 20)
        .await
        .expect("c");
    assert!(redis.dbsize().expect("DBSIZE") > 1);
    wait_for(
        "the swarm's keys to expire",
        Duration::from_secs(20),
        || {
            let left = redis.dbsize().map_err(|e| e.to_string());
            async move {
                match left? {
                    1 => Ok(()),
                    n => Err(format!("{n} keys")),
                }
            }
        },
    )
    .await;
    let meta = swarm_key(&a.info_hash, "meta");
    assert_eq!(
        redis
            .command(&format!("HINCRBY {meta} completed 0"))
            .expect("HINCRBY"),
        ":1",
        "the completed count outlives the swarm"
    );
}

#[tokio::test]
async fn limits_refuse_new_peers_and_keep_known_ones() {
    let redis = redis_or_skip!();
    let s = store(
        &redis,
        Limits {
            max_peers: 3,
            max_per_address: 2,
        },
    );
    let now = 5_000_000;
    let ip = [127, 0, 0, 9];
    for n in 1..=2 {
        let r = s.announce(&peer(n, ip, 10), now).await.expect("announce");
        assert_eq!(r.recorded, Recorded::Present);
    }
    let third = s.announce(&peer(3, ip, 10), now).await.expect("announce");
    assert_eq!(third.recorded, Recorded::AddressFull);
    // A known peer from that address is still served.
    let known = s.announce(&peer(1, ip, 10), now).await.expect("announce");
    assert_eq!(known.recorded, Recorded::Present);
    // The same id from another address is another peer.
    let other = s
        .announce(&peer(1, [127, 0, 0, 10], 10), now)
        .await
        .expect("announce");
    assert_eq!(other.recorded, Recorded::Present);
    let full = s
        .announce(&peer(4, [127, 0, 0, 11], 10), now)
        .await
        .expect("announce");
    assert_eq!(full.recorded, Recorded::Full);
    // Stopped frees a place at once, and for the address too.
    let mut stop = peer(2, ip, 10);
    stop.event = Event::Stopped;
    assert_eq!(
        s.announce(&stop, now).await.expect("stop").recorded,
        Recorded::Removed
    );
    let fourth = s.announce(&peer(4, ip, 10), now).await.expect("announce");
    assert_eq!(fourth.recorded, Recorded::Present);
    assert_eq!((fourth.complete, fourth.incomplete), (0, 3));
}

/// Role counts live in the swarm's meta, kept in step with every change the script makes: a
/// sweep that comes before a refusal is counted too, and a set changed behind the script's
/// back (evicted, deleted by an operator) is counted again within a quarter of a TTL.
#[tokio::test]
async fn counts_stay_right_through_sweeps_refusals_and_edits() {
    let redis = redis_or_skip!();
    // An 8 s TTL: the script sweeps at most once a second, and does its chores every 2 s.
    let ttl = 8_000;
    let s = store_living(
        &redis,
        Limits {
            max_peers: 10,
            max_per_address: 2,
        },
        ttl,
    );
    let t0 = 30_000_000;
    for n in 1..=3 {
        s.announce(&peer(n, [127, 0, 0, n], 10), t0)
            .await
            .expect("announce");
    }
    let x = [127, 0, 0, 50];
    for n in 5..=6 {
        s.announce(&peer(n, x, 10), t0 + 1_000)
            .await
            .expect("announce");
    }
    // 1.5 s before the first three expire.
    let recounted = s
        .announce(&peer(5, x, 10), t0 + ttl - 1_500)
        .await
        .expect("announce");
    assert_eq!(counts(&recounted), (0, 5));
    // Past the first three's TTL: the sweep drops them, then a third peer from x is refused;
    // the refusal keeps what the sweep did.
    let t2 = t0 + ttl + 1;
    let refused = s.announce(&peer(7, x, 10), t2).await.expect("announce");
    assert_eq!(refused.recorded, Recorded::AddressFull);
    let known = s.announce(&peer(5, x, 10), t2).await.expect("announce");
    assert_eq!(
        (known.recorded, counts(&known)),
        (Recorded::Present, (0, 2))
    );
    // The leechers' set goes behind the script's back: the counts are the sets' own (plain
    // writes add to them without the script), so the next announce counts peer 5 alone, just
    // added to a new set.
    let key = swarm_key(&InfoHash([0; 20]), "leechers");
    assert_eq!(redis.command(&format!("DEL {key}")).expect("DEL"), ":1");
    let later = s.announce(&peer(5, x, 10), t2 + 1).await.expect("announce");
    assert_eq!(counts(&later), (0, 1), "peer 5, just re-added");
    // A state field the script cannot read (an operator's edit, another layout's) is read as
    // none, and the announce is answered. Its changes are numbered on above the ones before:
    // a replica's copy ignores a change numbered at or below the last it applied.
    let mended = over_state(&redis, &s, "not-a-state", peer(5, x, 10), t0 + ttl + 600).await;
    assert_eq!(
        (mended.recorded, counts(&mended)),
        (Recorded::Present, (0, 1))
    );
    assert!(mended.seq > later.seq, "{} after {}", mended.seq, later.seq);
    // So is a field of the packed state's shape holding numbers no state has ('z' bytes
    // unpack to ~1e282: a change number there would stop growing).
    let garbage = format!("##{}", "z".repeat(32));
    let mended_again = over_state(&redis, &s, &garbage, peer(5, x, 10), t0 + ttl + 700).await;
    assert_eq!(
        (mended_again.recorded, counts(&mended_again)),
        (Recorded::Present, (0, 1))
    );
    assert!(
        mended_again.seq > mended.seq && mended_again.seq < 1 << 53,
        "{} after {}",
        mended_again.seq,
        mended.seq
    );
}

/// The answer to `a` at `at` after swarm 0's state field is set to `state` behind the
/// script's back.
async fn over_state(
    redis: &RedisServer,
    s: &RedisStore,
    state: &str,
    a: Announce,
    at: u64,
) -> fbpkg_tracker::peer_store::Answer {
    let hash = swarm_key(&InfoHash([0; 20]), "swarm");
    assert_eq!(
        redis
            .command(&format!("HSET {hash} st {state}"))
            .expect("HSET"),
        ":0",
        "the field was there"
    );
    s.announce(&a, at).await.expect("announce")
}

/// A count the script kept goes wrong when an announce fails between its writes (here a zone
/// bucket of the wrong type, after the peer's score is in): it never goes below zero, and the
/// swarm's changes are numbered on, so replicas' copies keep following them.
#[tokio::test]
async fn a_count_gone_wrong_keeps_the_change_numbers() {
    let redis = redis_or_skip!();
    let s = store(&redis, Limits::NONE);
    let t0 = 50_000_000;
    let y = s
        .announce(&peer(1, [10, 0, 0, 1], 10), t0)
        .await
        .expect("y");
    plant_string(&redis, &InfoHash([0; 20]), "z:S:dc1");
    let mut x = peer(2, [10, 0, 0, 2], 0);
    x.zone = Some(Zone::new("dc1").expect("zone"));
    s.announce(&x, t0 + 1)
        .await
        .expect_err("the zone bucket is not a set");
    x.zone = None;
    s.announce(&x, t0 + 2).await.expect("x again");
    x.event = Event::Stopped;
    let stopped = s.announce(&x, t0 + 3).await.expect("x stops");
    assert_eq!(counts(&stopped), (0, 1), "the seeders' count stays at 0");
    let again = s
        .announce(&peer(1, [10, 0, 0, 1], 10), t0 + 4)
        .await
        .expect("y again");
    assert!(
        again.seq > stopped.seq && stopped.seq > y.seq,
        "change numbers {} {} {}",
        y.seq,
        stopped.seq,
        again.seq
    );
}

/// A peer silent past its TTL that then says `stopped`: the sweep in the same call takes its
/// entry first, and the stop is answered, not failed (nor the announces batched with it).
#[tokio::test]
async fn a_stop_from_a_peer_already_expired_is_answered() {
    let redis = redis_or_skip!();
    let s = store(&redis, Limits::NONE);
    let t0 = 40_000_000;
    let sleeper = peer(1, [127, 0, 0, 2], 10);
    s.announce(&sleeper, t0).await.expect("announce");
    let mut stop = sleeper.clone();
    stop.event = Event::Stopped;
    let r = s.announce(&stop, t0 + TTL_MS + 1).await.expect("an answer");
    assert_eq!(
        (r.recorded, r.complete, r.incomplete),
        (Recorded::Removed, 0, 0)
    );
    // A bad announce fails alone: a key of the wrong type under one swarm's name.
    let mut other = peer(2, [127, 0, 0, 3], 10);
    other.info_hash = InfoHash([5; 20]);
    plant_string(&redis, &other.info_hash, "swarm");
    let good = peer(3, [127, 0, 0, 4], 10);
    let (bad, fine) = tokio::join!(s.announce(&other, t0 + 1), s.announce(&good, t0 + 1));
    let err = bad.expect_err("an announce to a swarm whose hash is not a hash");
    assert!(err.to_string().contains("announce script"), "{err}");
    assert_eq!(
        fine.expect("the other announce").recorded,
        Recorded::Present
    );
}

/// An announce that fails after its sweep (a zone bucket of the wrong type) leaves the sweep
/// whole: the expired peers' records and address counts go with them, so an address they
/// held takes a new peer at once.
#[tokio::test]
async fn a_failed_announce_keeps_what_its_sweep_did() {
    let redis = redis_or_skip!();
    let s = one_per_address(&redis);
    let t0 = 50_000_000;
    let x = [10, 0, 0, 1];
    s.announce(&peer(1, x, 10), t0).await.expect("announce");
    s.announce(&peer(2, [10, 0, 0, 2], 10), t0)
        .await
        .expect("announce");
    plant_string(&redis, &InfoHash([0; 20]), "z:L:dcx");
    let mut zoned = peer(3, [10, 0, 0, 3], 10);
    zoned.zone = Some(Zone::new("dcx").expect("zone"));
    let later = t0 + TTL_MS + 1_000;
    let err = s
        .announce(&zoned, later)
        .await
        .expect_err("a bucket that is not a set");
    assert!(err.to_string().contains("announce script"), "{err}");
    // 1 expired with that sweep: x is free.
    let from_x = s.announce(&peer(4, x, 10), later).await.expect("announce");
    assert_eq!(from_x.recorded, Recorded::Present);
    // And the all-fit answer holds no expired record: 4 only (3 failed before its record
    // was written; its entry in the leechers' set expires with it).
    let got: HashSet<u8> = s
        .announce(&peer(5, [10, 0, 0, 5], 10), later)
        .await
        .expect("announce")
        .peers
        .iter()
        .filter_map(|p| p.peer_id.map(|id| id.0[0]))
        .collect();
    assert_eq!(got, HashSet::from([4]));
}

/// Sweeps run only once the swarm's bound on its oldest score is past the cutoff. A replica
/// whose clock is behind adds a score under that bound, and lowers it first: even when its
/// announce then fails (a zone bucket of the wrong type), its entry expires on time.
#[tokio::test]
async fn a_score_from_a_clock_behind_still_expires_on_time() {
    let redis = redis_or_skip!();
    let s = store(&redis, Limits::NONE);
    let t0 = 70_000_000;
    let mut h = peer(1, [10, 0, 1, 1], 10);
    h.info_hash = InfoHash([7; 20]);
    s.announce(&h, t0).await.expect("announce");
    plant_string(&redis, &h.info_hash, "z:L:dcy");
    let mut behind = peer(2, [10, 0, 1, 2], 10);
    behind.info_hash = h.info_hash;
    behind.zone = Some(Zone::new("dcy").expect("zone"));
    s.announce(&behind, t0 - 1_000)
        .await
        .expect_err("a bucket that is not a set");
    // 2's score (t0 - 1 s) is past its TTL here, 1's (t0) is not.
    let mut third = peer(3, [10, 0, 1, 3], 10);
    third.info_hash = h.info_hash;
    let r = s
        .announce(&third, t0 - 1_000 + TTL_MS + 500)
        .await
        .expect("announce");
    assert_eq!(counts(&r), (0, 2), "1 and 3; 2 expired");
}

/// An expired peer whose zone bucket was replaced by a key of another type (an operator's
/// doing) is still swept: its address takes a new peer.
#[tokio::test]
async fn a_broken_zone_bucket_does_not_stop_a_sweep() {
    let redis = redis_or_skip!();
    let s = one_per_address(&redis);
    let t0 = 80_000_000;
    let x = [10, 0, 2, 1];
    let mut a = peer(1, x, 10);
    a.info_hash = InfoHash([8; 20]);
    a.zone = Some(Zone::new("dcz").expect("zone"));
    s.announce(&a, t0).await.expect("announce");
    plant_string(&redis, &a.info_hash, "z:L:dcz");
    let mut b = peer(2, x, 10);
    b.info_hash = a.info_hash;
    let r = s.announce(&b, t0 + TTL_MS + 1_000).await.expect("announce");
    assert_eq!(
        r.recorded,
        Recorded::Present,
        "1 expired, its address is free"
    );
}

/// Loading a swarm of more peers than Lua's `unpack` takes at once (8000) still answers them
/// all.
#[tokio::test]
async fn a_swarm_of_ten_thousand_peers_loads_whole() {
    let redis = redis_or_skip!();
    // Peers that live an hour: the keys' TTLs run on Redis's clock, and the script's clock
    // stands still here, so nothing refreshes them while 10,000 announces go in (with
    // `store`'s 2 s, a loaded machine saw the swarm's keys expire halfway).
    let s = store_living(&redis, Limits::NONE, 3_600_000);
    let now = 60_000_000;
    let n: u32 = 10_000;
    let mut calls = Vec::new();
    for i in 0..n {
        let mut a = peer(0, [10, 1, 0, 0], 10);
        a.peer_id = PeerId([0; 20]);
        a.peer_id.0[..4].copy_from_slice(&i.to_be_bytes());
        a.addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), 6881);
        a.numwant = 0;
        calls.push(a);
    }
    for a in &calls {
        let r = s.announce_wanting(a, now, Want::Nothing).await;
        assert_eq!(r.expect("announce").recorded, Recorded::Present);
    }
    let last = peer(1, [10, 2, 0, 0], 10);
    let loaded = s
        .announce_wanting(&last, now, Want::All)
        .await
        .expect("the load answers");
    assert_eq!(loaded.all.len(), n as usize + 1);
}

#[tokio::test]
async fn answers_follow_roles_and_zones() {
    let redis = redis_or_skip!();
    let s = store(&redis, Limits::NONE);
    let now = 9_000_000;
    let zoned = |n: u8, left: u64, zone: &str| Announce {
        zone: Some(Zone::new(zone).expect("zone")),
        ..peer(n, [127, 0, 1, n], left)
    };
    // Seeders 1-4, leechers 10-13; 1 and 10 share the asker's rack, 2 and 11 its datacenter.
    for (n, left, z) in [
        (1, 0, "dc1/r1"),
        (2, 0, "dc1/r2"),
        (3, 0, "dc2/r1"),
        (4, 0, "dc2/r2"),
        (10, 5, "dc1/r1"),
        (11, 5, "dc1/r2"),
        (12, 5, "dc2/r1"),
        (13, 5, "dc2/r2"),
    ] {
        s.announce(&zoned(n, left, z), now).await.expect("announce");
    }
    for _ in 0..20 {
        let mut seeder = zoned(1, 0, "dc1/r1");
        seeder.numwant = 2;
        let got = ids(&s.announce(&seeder, now).await.expect("announce").peers);
        assert_eq!(
            got,
            HashSet::from([10, 11]),
            "a seeder gets the closest leechers only"
        );
        let mut leecher = zoned(10, 5, "dc1/r1");
        leecher.numwant = 4;
        let got = ids(&leecher_answer(&s, &leecher, now).await);
        // Seeders up to half: 1 (same rack), 2 (same datacenter); then leechers: 11 (same
        // datacenter; 10 is the asker itself), then one of the rest.
        assert!(!got.contains(&10), "never itself: {got:?}");
        assert!(
            got.contains(&1) && got.contains(&2),
            "seeders first, closest first: {got:?}"
        );
        assert!(got.contains(&11), "then leechers, closest first: {got:?}");
        assert!(got.contains(&12) != got.contains(&13), "{got:?}");
        assert_eq!(got.len(), 4, "{got:?}");
    }
    // When everyone fits in numwant, the answer is everyone the asker may get.
    let seeder = zoned(1, 0, "dc1/r1");
    let got = ids(&s.announce(&seeder, now).await.expect("announce").peers);
    assert_eq!(
        got,
        HashSet::from([10, 11, 12, 13]),
        "a seeder: every leecher"
    );
    let leecher = zoned(10, 5, "dc1/r1");
    let got = ids(&leecher_answer(&s, &leecher, now).await);
    assert_eq!(
        got,
        HashSet::from([1, 2, 3, 4, 11, 12, 13]),
        "a leecher: everyone but itself"
    );
}

/// The script keeps the role counts in step with what it changes rather than counting again.
#[tokio::test]
async fn counts_follow_completions_stops_and_expiry() {
    let redis = redis_or_skip!();
    let s = store(&redis, Limits::NONE);
    let t0 = 20_000_000;
    let seed = peer(1, [127, 0, 0, 2], 0);
    let mut b = peer(2, [127, 0, 0, 3], 10);
    assert_eq!(counts(&s.announce(&seed, t0).await.expect("seed")), (1, 0));
    assert_eq!(counts(&s.announce(&b, t0).await.expect("b")), (1, 1));
    // b completes: a leecher fewer, a seeder more; its answer now holds leechers only (none).
    b.left = 0;
    b.event = Event::Completed;
    let done = s.announce(&b, t0 + 1).await.expect("b completes");
    assert_eq!(counts(&done), (2, 0));
    assert!(
        done.peers.is_empty(),
        "a seeder gets no seeders: {:?}",
        done.peers
    );
    // b says so again (a client's retry): one download, counted once. A seeder new to the
    // swarm that says it completed counts.
    s.announce(&b, t0 + 1).await.expect("b again");
    let completed = |at: u64| {
        let s = &s;
        async move { s.counts(&[InfoHash([0; 20])], at).await.expect("counts")[0].completed }
    };
    assert_eq!(completed(t0 + 1).await, 1);
    let mut elsewhere = peer(5, [127, 0, 0, 6], 0);
    elsewhere.event = Event::Completed;
    s.announce(&elsewhere, t0 + 1)
        .await
        .expect("a seeder done elsewhere");
    assert_eq!(completed(t0 + 1).await, 2);
    let mut gone = elsewhere.clone();
    gone.event = Event::Stopped;
    s.announce(&gone, t0 + 1).await.expect("it stops");
    // A stop of a peer the swarm never had changes nothing.
    let mut stranger = peer(3, [127, 0, 0, 4], 10);
    stranger.event = Event::Stopped;
    let r = s.announce(&stranger, t0 + 2).await.expect("stranger");
    assert_eq!((r.recorded, counts(&r)), (Recorded::Removed, (2, 0)));
    // The seed stops: one seeder left.
    let mut stop = seed.clone();
    stop.event = Event::Stopped;
    assert_eq!(
        counts(&s.announce(&stop, t0 + 3).await.expect("stop")),
        (1, 0)
    );
    // b falls silent; a newcomer after its TTL finds the swarm empty but for itself.
    let c = peer(4, [127, 0, 0, 5], 10);
    let late = s.announce(&c, t0 + 1 + 2 * TTL_MS).await.expect("c");
    assert_eq!(counts(&late), (0, 1));
    assert!(late.peers.is_empty(), "{:?}", late.peers);
}

async fn leecher_answer(s: &RedisStore, a: &Announce, now: u64) -> Vec<PeerEntry> {
    s.announce(a, now).await.expect("announce").peers
}

/// Peer `id`'s announce to swarm `hash` (port 7000 + `id`, 50 peers wanted), claiming `ip`
/// in `ip=` when given.
fn request(
    hash: InfoHash,
    id: u8,
    left: u64,
    event: Event,
    ip: Option<[u8; 4]>,
) -> AnnounceRequest {
    AnnounceRequest {
        info_hash: hash,
        peer_id: PeerId([id; 20]),
        port: 7000 + u16::from(id),
        uploaded: 0,
        downloaded: 0,
        left,
        event,
        compact: false,
        numwant: Some(50),
        no_peer_id: false,
        key: None,
        ip: ip.map(|ip| IpAddr::V4(Ipv4Addr::from(ip))),
        zone: None,
    }
}

/// One announce over HTTP; `ip` goes in `ip=` (the trackers trust loopback).
async fn announce(
    base: &str,
    hash: InfoHash,
    id: u8,
    ip: [u8; 4],
    left: u64,
    event: Event,
) -> Result<TrackerReply<AnnounceResponse>, String> {
    let req = request(hash, id, left, event, Some(ip));
    let url = format!("{base}/announce?{}", req.to_query());
    let resp = reqwest::Client::new()
        .get(&url)
        .timeout(ANSWER_WITHIN)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let body = resp.bytes().await.map_err(|e| format!("body: {e}"))?;
    AnnounceResponse::decode(&body).map_err(|e| format!("decode: {e}"))
}

/// A leecher's announce as a one-request `Connection: close` exchange, from a blocking thread.
async fn announce_closing(
    addr: SocketAddr,
    hash: InfoHash,
    id: u8,
    ip: [u8; 4],
) -> TrackerReply<AnnounceResponse> {
    use std::io::{Read, Write};
    let req = request(hash, id, 9, Event::None, Some(ip));
    let head = format!(
        "GET /announce?{} HTTP/1.1\r\nHost: tracker\r\nConnection: close\r\n\r\n",
        req.to_query()
    );
    let raw = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(ANSWER_WITHIN)).expect("timeout");
        s.write_all(head.as_bytes()).expect("write");
        let mut out = Vec::new();
        s.read_to_end(&mut out).expect("read the whole answer");
        out
    })
    .await
    .expect("the exchange");
    let body = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| &raw[i + 4..])
        .expect("a response head");
    AnnounceResponse::decode(body).expect("a bencoded answer")
}

async fn text(url: &str) -> String {
    reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .text()
        .await
        .expect("a text body")
}

fn peers_of(r: TrackerReply<AnnounceResponse>) -> Result<HashSet<u8>, String> {
    match r {
        TrackerReply::Ok(a) => Ok(ids(&a.peers)),
        TrackerReply::Failure(f) => Err(format!("failure: {f}")),
    }
}

/// `announce`, which must be answered with a peer list; panics saying `what` otherwise.
async fn peers(
    base: &str,
    hash: InfoHash,
    id: u8,
    ip: [u8; 4],
    left: u64,
    event: Event,
    what: &str,
) -> HashSet<u8> {
    let r = announce(base, hash, id, ip, left, event)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    peers_of(r).unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn replicas(redis: &RedisServer, dirs: &[tempfile::TempDir; 2]) -> [TrackerProcess; 2] {
    replicas_every(redis, dirs, "1s")
}

/// Two replicas on `redis` whose peers live two `interval`s.
fn replicas_every(
    redis: &RedisServer,
    dirs: &[tempfile::TempDir; 2],
    interval: &str,
) -> [TrackerProcess; 2] {
    let url = redis.url();
    let args = [
        "--max-peers-per-address",
        "2",
        "--announce-interval",
        interval,
        "--min-announce-interval",
        "1s",
        "--peer-store",
        &url,
    ];
    dirs.each_ref().map(|d| replica(d, &args))
}

/// A tracker in `dir` serving any swarm, trusting loopback's `ip=`, with `extra` arguments.
fn replica(dir: &tempfile::TempDir, extra: &[&str]) -> TrackerProcess {
    let args = [
        &["--allow-unregistered", "--trusted-networks", "127.0.0.0/8"][..],
        extra,
    ]
    .concat();
    TrackerProcess::start_with_args(dir.path(), &args).expect("tracker starts")
}

#[tokio::test]
async fn replicas_share_peers_limits_and_expiry() {
    let redis = redis_or_skip!();
    let dirs = [(); 2].map(|()| tempfile::tempdir().expect("tempdir"));
    let [one, two] = replicas(&redis, &dirs);
    let (b1, b2) = (one.base_url(), two.base_url());
    let hash = InfoHash([7; 20]);
    let seed = [127, 0, 0, 21];
    peers(
        &b1,
        hash,
        1,
        seed,
        0,
        Event::Started,
        "the seed is recorded",
    )
    .await;
    let got = peers(
        &b2,
        hash,
        2,
        [127, 0, 0, 22],
        9,
        Event::Started,
        "the leecher is recorded",
    )
    .await;
    assert_eq!(
        got,
        HashSet::from([1]),
        "replica two returns the seed announced to one"
    );
    // Connection-per-request (`Connection: close`, the front's on-the-spot path with the
    // memory store) is served too, on the connection's task.
    let got = peers_of(announce_closing(one.addr(), hash, 2, [127, 0, 0, 22]).await)
        .expect("a closing announce is served");
    assert_eq!(got, HashSet::from([1]), "over Connection: close");
    // Replica one's swarm view lists, from Redis, the leecher announced to two.
    let listed = fbpkg_tests::swarm_peers(&http_client(), &b1, &hash.to_hex())
        .await
        .expect("swarm view");
    assert_eq!(
        listed.into_iter().collect::<HashSet<_>>(),
        HashSet::from([
            ("127.0.0.21:7001".to_owned(), 0),
            ("127.0.0.22:7002".to_owned(), 9)
        ]),
        "replica one's /api/v1/swarms"
    );
    // Replica one counts, from Redis, the leecher announced to two.
    let metrics = text(&format!("{b1}/metrics")).await;
    for line in [
        "fbpkg_tracker_peers{role=\"seeder\"} 1",
        "fbpkg_tracker_peers{role=\"leecher\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in:\n{metrics}"
        );
    }

    // Stopped on two removes it for one (published to one's copy within milliseconds).
    peers(&b2, hash, 1, seed, 0, Event::Stopped, "stopped is served").await;
    answers_settle(
        &b1,
        hash,
        2,
        [127, 0, 0, 22],
        "the stopped seed to leave",
        |got| got.is_empty(),
    )
    .await;

    // The per-address limit (2) counts peers from both replicas.
    let many = [127, 0, 0, 23];
    peers(&b1, hash, 3, many, 9, Event::Started, "first").await;
    peers(&b2, hash, 4, many, 9, Event::Started, "second").await;
    match announce(&b1, hash, 5, many, 9, Event::Started)
        .await
        .expect("answer")
    {
        TrackerReply::Failure(f) => assert!(f.contains("too many peers from 127.0.0.23"), "{f}"),
        TrackerReply::Ok(a) => panic!("a third peer from one address was accepted: {a:?}"),
    }

    // Expiry: peer 3 goes silent; within two intervals (2 s) it leaves everyone's answers.
    wait_for(
        "the silent peers to expire",
        Duration::from_secs(30),
        || {
            let b = b2.clone();
            async move {
                let got = peers_of(announce(&b, hash, 6, [127, 0, 0, 24], 9, Event::None).await?)?;
                if got.contains(&3) || got.contains(&4) {
                    Err(format!("still listed: {got:?}"))
                } else {
                    Ok(())
                }
            }
        },
    )
    .await;
}

/// Re-announce leecher `id` at `ip` to `base` until its answer satisfies `ok` (changes made
/// through another replica reach this one's copy of the swarm within milliseconds, not at
/// once); panics after 10 s.
async fn answers_settle(
    base: &str,
    hash: InfoHash,
    id: u8,
    ip: [u8; 4],
    what: &str,
    ok: impl Fn(&HashSet<u8>) -> bool,
) {
    let ok = &ok;
    wait_for(what, Duration::from_secs(10), || async move {
        let got = peers_of(announce(base, hash, id, ip, 9, Event::None).await?)?;
        if ok(&got) {
            Ok(())
        } else {
            Err(format!("answered {got:?}"))
        }
    })
    .await;
}

/// `fbpkg_tracker_redis_answers_total{from=...}` on `base`.
async fn answered_from(base: &str, from: &str) -> u64 {
    let metrics = text(&format!("{base}/metrics")).await;
    let prefix = format!("fbpkg_tracker_redis_answers_total{{from=\"{from}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix:?} in:\n{metrics}"))
}

/// Each replica answers from its own copy of the swarm, loaded by its first announce there and
/// kept current by what the other publishes: a peer joining or leaving through one replica
/// shows up in the other's answers while every peer still has ten minutes to live (so no
/// expiry can explain it). After a Redis restart the copies are dropped and loaded again.
#[tokio::test]
async fn a_replica_answers_from_a_copy_the_other_keeps_current() {
    let mut redis = redis_or_skip!();
    let dirs = [(); 2].map(|()| tempfile::tempdir().expect("tempdir"));
    let [one, two] = replicas_every(&redis, &dirs, "300s");
    let (b1, b2) = (one.base_url(), two.base_url());
    following(&[&b1, &b2]).await;
    let hash = InfoHash([9; 20]);
    let (seed, a, b) = ([127, 0, 0, 41], [127, 0, 0, 42], [127, 0, 0, 43]);
    peers(&b1, hash, 1, seed, 0, Event::Started, "the seed").await;
    let got = peers(&b1, hash, 2, a, 9, Event::Started, "leecher 2 on one").await;
    assert_eq!(got, HashSet::from([1]));
    // Two's first announce loads its copy from Redis: everything one recorded is in it.
    let got = peers(&b2, hash, 3, b, 9, Event::Started, "leecher 3 on two").await;
    assert_eq!(got, HashSet::from([1, 2]));
    answers_settle(&b1, hash, 2, a, "one to hear of leecher 3", |got| {
        *got == HashSet::from([1, 3])
    })
    .await;
    peers(&b2, hash, 3, b, 9, Event::Stopped, "leecher 3 leaves").await;
    answers_settle(&b1, hash, 2, a, "one to hear leecher 3 left", |got| {
        *got == HashSet::from([1])
    })
    .await;
    assert_eq!(
        answered_from(&b1, "load").await,
        1,
        "one loaded its copy once"
    );
    assert!(
        answered_from(&b1, "copy").await >= 2,
        "and answered from it"
    );
    assert_eq!(
        answered_from(&b1, "draw").await,
        0,
        "nothing was drawn in Redis"
    );

    // A restart empties Redis and breaks the subscriptions: what each copy held is void.
    redis.restart().expect("restart redis-server");
    wait_for("two to serve again", Duration::from_secs(30), || async {
        peers_of(announce(&b2, hash, 1, seed, 0, Event::Started).await?).map(|_| ())
    })
    .await;
    // One answers by draws in Redis until it has subscribed again; then it loads a fresh
    // copy, holding the seed (announced again) and not leecher 2 (which has not), though the
    // old copy had ten minutes left to keep it.
    wait_for(
        "one to answer from a new copy",
        Duration::from_secs(30),
        || async {
            let got = peers_of(announce(&b1, hash, 4, b, 9, Event::None).await?)?;
            let loads = answered_from(&b1, "load").await;
            if loads >= 2 && got == HashSet::from([1]) {
                Ok(())
            } else {
                Err(format!("{loads} loads, answered {got:?}"))
            }
        },
    )
    .await;
}

/// Each replica subscribes to the changes just after it starts listening; until then it draws
/// answers in Redis and loads no copy. Waits until each of `bases` follows them.
async fn following(bases: &[&str]) {
    for base in bases {
        wait_for(
            "the replica to follow changes",
            Duration::from_secs(30),
            || async move {
                let metrics = text(&format!("{base}/metrics")).await;
                if metrics
                    .lines()
                    .any(|l| l == "fbpkg_tracker_redis_following 1")
                {
                    Ok(())
                } else {
                    Err("not following yet".to_owned())
                }
            },
        )
        .await;
    }
}

/// `fbpkg_tracker_redis_writes_total{by=...}` on `base`.
async fn written_by(base: &str, by: &str) -> u64 {
    let metrics = text(&format!("{base}/metrics")).await;
    let prefix = format!("fbpkg_tracker_redis_writes_total{{by=\"{by}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix:?} in:\n{metrics}"))
}

/// A replica holding a copy of the swarm writes announces without the script: Redis then
/// holds what the script would have written (score, record, address count), and the other
/// replica loads it. When the copy and Redis disagree on whether a peer is new (a peer
/// written or removed behind the replicas' backs stands for a copy a few milliseconds
/// behind), the address count is put right.
#[tokio::test]
async fn plain_writes_leave_redis_as_the_script_would() {
    let redis = redis_or_skip!();
    let dirs = [(); 2].map(|()| tempfile::tempdir().expect("tempdir"));
    let [one, two] = replicas_every(&redis, &dirs, "300s");
    let (b1, b2) = (one.base_url(), two.base_url());
    following(&[&b1, &b2]).await;
    let hash = InfoHash([11; 20]);
    let (swarm, leechers) = (swarm_key(&hash, "swarm"), swarm_key(&hash, "leechers"));
    let member = |n: u8| format!("{}@127.0.0.{}", PeerId([n; 20]).to_hex(), 50 + n);
    let hget = |field: String| redis.bulk(&format!("HGET {swarm} {field}")).expect("HGET");
    // The seed's announce loads one's copy (through the script); leecher 2 joins (the first
    // leecher: through the script too, which gives the leechers' set its TTL) and announces
    // again, written plain.
    peers(&b1, hash, 1, [127, 0, 0, 51], 0, Event::Started, "the seed").await;
    let got = peers(&b1, hash, 2, [127, 0, 0, 52], 9, Event::Started, "2 joins").await;
    assert_eq!(got, HashSet::from([1]));
    // 2's join reaches one's copy as published, a moment after its answer: until then the
    // copy holds no leecher and a second announce from 2 would rightly take the script. The
    // seed, known to the copy, asks (plain) until the copy answers it with 2.
    wait_for("one's copy to hold 2", Duration::from_secs(10), || async {
        let got = peers_of(announce(&b1, hash, 1, [127, 0, 0, 51], 0, Event::None).await?)?;
        if got.contains(&2) {
            Ok(())
        } else {
            Err(format!("answered {got:?}"))
        }
    })
    .await;
    let plain = written_by(&b1, "plain").await;
    assert!(plain >= 1, "the seed's asks were written plain");
    peers(&b1, hash, 2, [127, 0, 0, 52], 9, Event::None, "2 again").await;
    assert_eq!(
        (
            written_by(&b1, "script").await,
            written_by(&b1, "plain").await
        ),
        (2, plain + 1)
    );
    assert!(
        redis
            .bulk(&format!("ZSCORE {leechers} {}", member(2)))
            .expect("ZSCORE")
            .is_some(),
        "2 has a score"
    );
    let record = hget(format!("p:{}", member(2))).expect("2's record");
    assert!(record.starts_with("L||127.0.0.52:7002|"), "{record}");
    assert_eq!(hget("a:127.0.0.52".into()).as_deref(), Some("1"));
    // Two's first announce loads its copy from what the plain writes left.
    let got = peers(&b2, hash, 3, [127, 0, 0, 53], 9, Event::Started, "3 on two").await;
    assert_eq!(got, HashSet::from([1, 2]));

    // Peer 4 is in Redis and not in one's copy: one writes it as a join, and the address
    // count, added to, is taken back.
    let at = fbpkg_tracker::peer_store::wall_ms();
    for cmd in [
        format!("ZADD {leechers} {at} {}", member(4)),
        format!(
            "HSET {swarm} p:{} L||127.0.0.54:7004|{}|0|0|9 a:127.0.0.54 1",
            member(4),
            PeerId([4; 20]).to_hex()
        ),
    ] {
        assert!(redis.command(&cmd).expect(&cmd).starts_with(':'), "{cmd}");
    }
    peers(&b1, hash, 4, [127, 0, 0, 54], 9, Event::None, "4 on one").await;
    // Peer 2 is in one's copy and gone from Redis: one writes it as known, and its address
    // is counted again.
    for cmd in [
        format!("ZREM {leechers} {}", member(2)),
        format!("HDEL {swarm} p:{} a:127.0.0.52", member(2)),
    ] {
        assert!(redis.command(&cmd).expect(&cmd).starts_with(':'), "{cmd}");
    }
    peers(&b1, hash, 2, [127, 0, 0, 52], 9, Event::None, "2 on one").await;
    assert_eq!(
        written_by(&b1, "plain").await,
        plain + 3,
        "both written plain"
    );
    // The leechers' set went behind one's back (its last peer swept a moment ago, say): a
    // plain join makes it again, with a TTL, so an abandoned swarm still disappears.
    assert_eq!(
        redis.command(&format!("DEL {leechers}")).expect("DEL"),
        ":1"
    );
    peers(&b1, hash, 5, [127, 0, 0, 55], 9, Event::None, "5 on one").await;
    assert_eq!(written_by(&b1, "plain").await, plain + 4, "written plain");
    let ttl = redis.command(&format!("PTTL {leechers}")).expect("PTTL");
    assert!(
        ttl.strip_prefix(':')
            .and_then(|t| t.parse::<i64>().ok())
            .is_some_and(|t| t > 0),
        "PTTL {ttl}"
    );
    wait_for(
        "the counts to be put right",
        Duration::from_secs(10),
        || {
            let counts = (hget("a:127.0.0.54".into()), hget("a:127.0.0.52".into()));
            async move {
                match counts {
                    (Some(a), Some(b)) if a == "1" && b == "1" => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await;
    assert!(
        hget(format!("p:{}", member(2))).is_some(),
        "2's record again"
    );
}

/// A seed announced to `one` (peer 1 at 127.0.0.`octet`) is what a leecher on `two` is
/// answered with: the two share Redis `how`.
async fn seed_found_across(
    one: &TrackerProcess,
    two: &TrackerProcess,
    hash: InfoHash,
    octet: u8,
    how: &str,
) {
    if let Err(e) = announce(
        &one.base_url(),
        hash,
        1,
        [127, 0, 0, octet],
        0,
        Event::Started,
    )
    .await
    .and_then(peers_of)
    {
        panic!("the seed: {e}; tracker log:\n{}", one.log_tail());
    }
    let got = peers(
        &two.base_url(),
        hash,
        2,
        [127, 0, 0, octet + 1],
        9,
        Event::Started,
        "a leecher on the other replica",
    )
    .await;
    assert_eq!(got, HashSet::from([1]), "the seed, through Redis {how}");
}

/// `fbpkg-rs tracker --data-dir DIR ARGS...` does not start, and its error says `says`.
async fn refused_start(dir: &tempfile::TempDir, args: &[&str], says: &str) {
    let data = dir.path().to_str().expect("a UTF-8 path");
    let all = ["tracker", "--data-dir", data]
        .into_iter()
        .chain(args.iter().copied());
    let refused = fbpkg_rs(all, Duration::from_secs(30)).await;
    assert!(!refused.success(), "{refused:?}");
    assert!(refused.stderr.contains(says), "{}", refused.stderr);
}

/// A replica that cannot use its Redis answers an announce "unavailable" and is not ready;
/// returns what `/readyz` says.
async fn unusable(r: &TrackerProcess, hash: InfoHash, octet: u8) -> String {
    match announce(
        &r.base_url(),
        hash,
        3,
        [127, 0, 0, octet],
        9,
        Event::Started,
    )
    .await
    {
        Ok(TrackerReply::Failure(f)) => assert_eq!(f, "peer store unavailable, try again"),
        other => panic!("a replica that cannot use Redis answered {other:?}"),
    }
    let ready = reqwest::get(format!("{}/readyz", r.base_url()))
        .await
        .expect("readyz");
    assert_eq!(ready.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    ready.text().await.expect("body")
}

/// `rediss://`: replicas reach Redis over TLS, trusting the CA given with `--peer-store-ca`,
/// and find each other's peers there. A replica that does not trust that CA (the system's
/// roots do not know it) gets no connection: its announces get the store's failure reason and
/// `/readyz` says why. `--peer-store-ca` with a plain `redis://` is refused at start.
#[tokio::test]
async fn replicas_reach_redis_over_tls_with_the_ca_they_are_given() {
    let Some(redis) = RedisServer::start_tls().expect("starting redis-server with TLS") else {
        return;
    };
    let Some(url) = redis.tls_url() else {
        return;
    };
    let ca = redis.ca_file();
    let ca = ca.to_str().expect("a UTF-8 path");
    let dirs = [(); 3].map(|()| tempfile::tempdir().expect("tempdir"));
    let trusting = |d| replica(d, &["--peer-store", &url, "--peer-store-ca", ca]);
    let (one, two) = (trusting(&dirs[0]), trusting(&dirs[1]));
    let hash = InfoHash([10; 20]);
    seed_found_across(&one, &two, hash, 61, "over TLS").await;
    let ready = reqwest::get(format!("{}/readyz", one.base_url()))
        .await
        .expect("readyz");
    let body = ready.text().await.expect("body");
    assert!(body.contains("peer store: rediss://127.0.0.1:"), "{body}");

    let blind = replica(&dirs[2], &["--peer-store", &url]);
    let body = unusable(&blind, hash, 63).await;
    assert!(body.to_lowercase().contains("certificate"), "{body}");

    let plain = redis.url();
    refused_start(
        &dirs[2],
        &["--peer-store", &plain, "--peer-store-ca", ca],
        "--peer-store-ca is for a rediss://",
    )
    .await;
}

/// A Redis that asks clients for a certificate (`tls-auth-clients yes`): replicas showing
/// theirs (`--peer-store-cert`, `--peer-store-key`) share peers; one without is answered
/// "unavailable" and not ready; a certificate without its key is refused at start.
#[tokio::test]
async fn replicas_show_redis_their_client_certificate_when_it_asks() {
    let Some(redis) = RedisServer::start_mtls().expect("starting redis-server with TLS") else {
        return;
    };
    let Some(url) = redis.tls_url() else {
        return;
    };
    let ca = redis.ca_file();
    let (cert, key) = redis.client_cert_file();
    let [ca, cert, key] = [&ca, &cert, &key].map(|p| p.to_str().expect("a UTF-8 path"));
    let dirs = [(); 3].map(|()| tempfile::tempdir().expect("tempdir"));
    let showing = |d| {
        replica(
            d,
            &[
                "--peer-store",
                &url,
                "--peer-store-ca",
                ca,
                "--peer-store-cert",
                cert,
                "--peer-store-key",
                key,
            ],
        )
    };
    let (one, two) = (showing(&dirs[0]), showing(&dirs[1]));
    let hash = InfoHash([11; 20]);
    seed_found_across(&one, &two, hash, 71, "over mutual TLS").await;

    let anonymous = replica(&dirs[2], &["--peer-store", &url, "--peer-store-ca", ca]);
    unusable(&anonymous, hash, 73).await;

    refused_start(
        &dirs[2],
        &["--peer-store", &url, "--peer-store-cert", cert],
        "--peer-store-cert and --peer-store-key go together",
    )
    .await;
    // The key file named as the certificate: refused at start, naming the flag.
    refused_start(
        &dirs[2],
        &[
            "--peer-store",
            &url,
            "--peer-store-cert",
            key,
            "--peer-store-key",
            key,
        ],
        "--peer-store-cert: no certificate in it",
    )
    .await;
}

/// `--no-peer-copies`: the way back to drawing every answer in Redis. The replica follows no
/// changes, keeps no copy, and still finds the peers another replica recorded.
#[tokio::test]
async fn without_copies_every_answer_is_drawn_in_redis() {
    let redis = redis_or_skip!();
    let dirs = [(); 2].map(|()| tempfile::tempdir().expect("tempdir"));
    let url = redis.url();
    let with = replica(&dirs[0], &["--peer-store", &url]);
    let without = replica(&dirs[1], &["--peer-store", &url, "--no-peer-copies"]);
    let hash = InfoHash([11; 20]);
    let b = without.base_url();
    peers(
        &with.base_url(),
        hash,
        1,
        [127, 0, 0, 71],
        0,
        Event::Started,
        "the seed",
    )
    .await;
    for _ in 0..3 {
        let got = peers(&b, hash, 2, [127, 0, 0, 72], 9, Event::Started, "a leecher").await;
        assert_eq!(got, HashSet::from([1]));
    }
    assert_eq!(answered_from(&b, "draw").await, 3);
    assert_eq!(
        answered_from(&b, "load").await + answered_from(&b, "copy").await,
        0
    );
    let metrics = text(&format!("{b}/metrics")).await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "fbpkg_tracker_redis_following 0"),
        "{metrics}"
    );
}

#[tokio::test]
async fn redis_outage_fails_fast_and_heals_by_itself() {
    let mut redis = redis_or_skip!();
    let dirs = [(); 2].map(|()| tempfile::tempdir().expect("tempdir"));
    let [one, two] = replicas(&redis, &dirs);
    let (b1, b2) = (one.base_url(), two.base_url());
    let hash = InfoHash([8; 20]);
    peers(
        &b1,
        hash,
        1,
        [127, 0, 0, 31],
        0,
        Event::Started,
        "served while Redis is up",
    )
    .await;
    let ready = reqwest::get(format!("{b1}/readyz")).await.expect("readyz");
    assert_eq!(ready.status(), reqwest::StatusCode::OK);
    let body = ready.text().await.expect("body");
    assert!(body.contains("peer store: redis://127.0.0.1:"), "{body}");

    redis.kill().expect("kill redis-server");
    // An answer (bounded by ANSWER_WITHIN in `announce`), and it is the failure reason.
    for base in [&b1, &b2] {
        match announce(base, hash, 2, [127, 0, 0, 32], 9, Event::Started).await {
            Ok(TrackerReply::Failure(f)) => {
                assert_eq!(f, "peer store unavailable, try again", "from {base}")
            }
            other => panic!("{base} with Redis down answered {other:?}"),
        }
    }
    let ready = reqwest::get(format!("{b1}/readyz")).await.expect("readyz");
    assert_eq!(ready.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    let body = ready.text().await.expect("body");
    assert!(body.contains("peer store redis://127.0.0.1:"), "{body}");
    let metrics = text(&format!("{b1}/metrics")).await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "fbpkg_tracker_announces_total{outcome=\"store_unavailable\"} 1"),
        "{metrics}"
    );
    // Other requests are still served.
    let health = reqwest::get(format!("{b1}/healthz"))
        .await
        .expect("healthz");
    assert_eq!(health.status(), reqwest::StatusCode::OK);

    redis.restart().expect("restart redis-server");
    // Same tracker processes: the connection managers reconnect by themselves. Redis kept
    // nothing, so peers come back with their next announces. Once one announce is served,
    // all are: every serving thread has its own connection, and the first request on a
    // broken one is retried within its deadline rather than failed.
    for base in [&b1, &b2] {
        wait_for("announces to work again", Duration::from_secs(30), || {
            let b = base.clone();
            async move {
                peers_of(announce(&b, hash, 3, [127, 0, 0, 33], 9, Event::Started).await?)
                    .map(|_| ())
            }
        })
        .await;
        for id in 10..20 {
            let r = announce(base, hash, id, [127, 0, 1, id], 9, Event::Started).await;
            peers_of(r.expect("an answer"))
                .unwrap_or_else(|e| panic!("{base} after recovery: {e}"));
        }
        let ready = poll("readyz", Duration::from_secs(30), || {
            let b = base.clone();
            async move {
                let r = reqwest::get(format!("{b}/readyz"))
                    .await
                    .map_err(|e| e.to_string())?;
                if r.status().is_success() {
                    Ok(())
                } else {
                    Err(r.status().to_string())
                }
            }
        })
        .await;
        assert!(ready.is_ok(), "{ready:?}");
    }
    let got = peers(&b2, hash, 4, [127, 0, 0, 34], 0, Event::Started, "served").await;
    assert_eq!(
        got,
        (10..20).chain([3]).collect::<HashSet<u8>>(),
        "the leechers announced after the restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_on_two_replicas_find_each_other_through_redis() {
    const NAME: &str = "replicated";
    let redis = redis_or_skip!();
    let dirs = tempfile::tempdir().expect("tempdir");
    let base = dirs.path();
    let url = redis.url();
    let start = |name: &str| {
        TrackerProcess::start_with_args(&base.join(name), &["--peer-store", &url])
            .expect("tracker starts")
    };
    let (mut a, b) = (start("tracker-a"), start("tracker-b"));
    let seed = AgentProcess::start(
        &base.join("seed/state"),
        &base.join("seed/cache"),
        &a.base_url(),
        &[],
    )
    .await
    .expect("seed agent starts");
    let bytes: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let file = base.join("payload.bin");
    std::fs::write(&file, &bytes).expect("write the payload");
    let mut args: Vec<OsString> = vec!["publish".into(), NAME.into(), file.into()];
    args.extend(seed.host_args());
    let out = fbpkg_rs(args, Duration::from_secs(60)).await;
    assert!(out.success(), "publish: {out}");
    let sha = out
        .line()
        .strip_prefix(&format!("{NAME}:"))
        .expect("publish prints name:sha256")
        .to_owned();

    // B's catalog gets the same version: A's metainfo, as published.
    let client = http_client();
    let meta = client
        .get(format!(
            "{}/api/v1/packages/{NAME}/{sha}/metainfo",
            a.base_url()
        ))
        .send()
        .await
        .expect("metainfo from A")
        .bytes()
        .await
        .expect("metainfo body");
    let put = client
        .put(format!("{}/api/v1/packages/{NAME}/{sha}", b.base_url()))
        .body(meta.clone())
        .send()
        .await
        .expect("publish to B");
    assert!(put.status().is_success(), "publish to B: {}", put.status());
    let info_hash = fbpkg_common::metainfo::Metainfo::parse(&meta)
        .expect("A's metainfo parses")
        .info_hash;

    // The seed announced to A only; B counts it from Redis.
    let scrape_url = format!(
        "{}/scrape?{}",
        b.base_url(),
        ScrapeRequest {
            info_hashes: vec![info_hash]
        }
        .to_query()
    );
    let (c, u) = (&client, &scrape_url);
    wait_for(
        "replica B to count the seed",
        Duration::from_secs(30),
        || async move {
            let body = c.get(u).send().await.map_err(|e| e.to_string())?;
            let body = body.bytes().await.map_err(|e| e.to_string())?;
            match ScrapeResponse::decode(&body).map_err(|e| e.to_string())? {
                TrackerReply::Ok(s) if s.files.get(&info_hash).is_some_and(|f| f.complete >= 1) => {
                    Ok(())
                }
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;

    // Without A, the leecher can learn of the seed only through B, hence Redis.
    a.kill().expect("kill replica A");
    let leecher = AgentProcess::start(
        &base.join("leecher/state"),
        &base.join("leecher/cache"),
        &b.base_url(),
        &[],
    )
    .await
    .expect("leecher agent starts");
    let mut args: Vec<OsString> = vec!["get".into(), format!("{NAME}:{sha}").into()];
    args.extend(leecher.host_args());
    let out = fbpkg_rs(args, Duration::from_secs(90)).await;
    assert!(
        out.success(),
        "get through replica B: {out}\nleecher log:\n{}\nseed log:\n{}",
        leecher.log_tail(),
        seed.log_tail()
    );
    assert!(
        std::fs::read(out.line()).expect("the fetched file") == bytes,
        "the leecher holds other bytes than the seed published"
    );
}

#[tokio::test]
async fn a_redis_that_never_answers_costs_one_deadline_not_a_hang() {
    if fbpkg_tests::redis_server_binary().is_none() {
        eprintln!("SKIPPED: redis-server is not installed (the other tests of this file need it)");
        return;
    }
    // The kernel completes connections to a listener nobody accepts from: Redis "up" but mute.
    let mute = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let url = format!("redis://{}/0", mute.local_addr().expect("addr"));
    let dir = tempfile::tempdir().expect("tempdir");
    let tracker = TrackerProcess::start_with_args(
        dir.path(),
        &[
            "--allow-unregistered",
            "--peer-store",
            &url,
            "--peer-store-timeout",
            "300ms",
        ],
    )
    .expect("tracker starts");
    let b = tracker.base_url();
    for id in 1..=3 {
        match announce(
            &b,
            InfoHash([9; 20]),
            id,
            [127, 0, 0, 41],
            9,
            Event::Started,
        )
        .await
        {
            Ok(TrackerReply::Failure(f)) => assert_eq!(f, "peer store unavailable, try again"),
            other => panic!("with a mute Redis the announce answered {other:?}"),
        }
    }
    let ready = reqwest::get(format!("{b}/readyz")).await.expect("readyz");
    assert_eq!(ready.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    let body = ready.text().await.expect("body");
    assert!(body.contains("not ready"), "{body}");
    drop(mute);
}

/// A TCP relay to `to` that can go silent: once `freeze` is set, the connections it relays
/// stop passing bytes but stay open, as when Redis's node is lost without a reset; new
/// connections are relayed as before (the address now reaches a live Redis).
async fn relay(to: SocketAddr) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let freeze = std::sync::Arc::new(AtomicBool::new(false));
    let frozen = freeze.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(to).await else {
                continue;
            };
            // Whatever was frozen stays frozen; a new connection is live.
            let born_frozen = frozen.load(Ordering::SeqCst);
            let stop = frozen.clone();
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            let pump = move |mut from: tokio::net::tcp::OwnedReadHalf,
                             mut to: tokio::net::tcp::OwnedWriteHalf,
                             stop: std::sync::Arc<AtomicBool>| async move {
                let mut buf = vec![0; 64 << 10];
                while let Ok(n) = from.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    if stop.load(Ordering::SeqCst) && !born_frozen {
                        // Swallow everything, answer nothing, close nothing.
                        std::future::pending::<()>().await;
                    }
                    if to.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                drop((from, to));
            };
            tokio::spawn(pump(cr, sw, stop.clone()));
            tokio::spawn(pump(sr, cw, stop));
        }
    });
    (addr, freeze)
}

/// A Redis that goes silent without closing its connections (a failover moved the address to
/// a live one; the old one hangs) costs announces a deadline, not the minutes until the
/// kernel gives up on the connection: a call past its deadline drops the connection it used,
/// and the next one connects anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_gone_silent_is_left_for_a_live_one_within_seconds() {
    let redis = redis_or_skip!();
    let url = redis.url();
    let real: SocketAddr = url
        .trim_start_matches("redis://")
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .expect("host:port in the URL");
    let (addr, freeze) = relay(real).await;
    let s = RedisStore::open(
        &format!("redis://{addr}/"),
        Duration::from_secs(1),
        Duration::from_millis(TTL_MS),
        Limits::NONE,
    )
    .expect("a valid Redis URL");
    let a = peer(1, [127, 0, 0, 2], 0);
    s.announce(&a, 1_000_000)
        .await
        .expect("announce through the relay");
    freeze.store(true, std::sync::atomic::Ordering::SeqCst);
    let failed = s.announce(&a, 1_000_100).await;
    assert!(failed.is_err(), "the frozen connection answers nothing");
    wait_for(
        "announces to succeed again",
        Duration::from_secs(60),
        || async {
            s.announce(&a, 1_000_200)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        },
    )
    .await;
}

/// An announce answered from the replica's copy is written to Redis plainly, after the copy
/// recorded it. A client that goes away while that write is out (its connection reset, the
/// request's future dropped) must leave neither the copy ahead of Redis nor the copy thrown
/// away: the write is sent all the same, and the copy stays (it was dropped, and the write
/// skipped, so the next announce read the whole swarm from Redis again).
#[tokio::test]
async fn a_client_gone_mid_write_leaves_the_copy_and_redis_agreeing() {
    let redis = redis_or_skip!();
    let dir = tempfile::tempdir().expect("tempdir");
    let state = fbpkg_tracker::AppState::open(fbpkg_tracker::Config {
        data_dir: dir.path().to_path_buf(),
        peer_store: fbpkg_tracker::PeerStoreKind::Redis(redis.url()),
        allow_unregistered: true,
        ..fbpkg_tracker::Config::default()
    })
    .expect("a tracker's state on Redis");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let following = {
        let (state, shutdown) = (state.clone(), shutdown.clone());
        tokio::spawn(async move {
            let store = state.peers.redis().expect("a Redis peer store");
            fbpkg_tracker::peer_store::mirror::follow(store, &state.swarms, shutdown).await;
        })
    };
    let hash = InfoHash([12; 20]);
    let query = |n: u8, left: u64, event: Event| request(hash, n, left, event, None).to_query();
    let from = |n: u8| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 50 + n));
    // Peer `n`'s announce served in process (from 127.0.0.(50 + n)): the peers it is told of.
    let ask = |n: u8, left: u64, event: Event| {
        let (state, q) = (&state, query(n, left, event));
        async move {
            let (body, _) =
                fbpkg_tracker::serve_announce_any(state, from(n), &q, tokio::time::Instant::now())
                    .await;
            peers_of(AnnounceResponse::decode(&body).map_err(|e| format!("decode: {e}"))?)
        }
    };
    let store = state.peers.redis().expect("a Redis peer store");
    // The seed's announces load the copy once the subscription is up; leecher 2 joins (the
    // script, the copy holding no leecher), and the seed asks until the copy answers with 2.
    wait_for("the copy to be loaded", ANSWER_WITHIN, || async {
        ask(1, 0, Event::Started).await?;
        if store.mirror().is_warm(&hash) {
            Ok(())
        } else {
            Err("not warm".into())
        }
    })
    .await;
    assert_eq!(ask(2, 9, Event::Started).await, Ok(HashSet::from([1])));
    wait_for("the copy to hold 2", ANSWER_WITHIN, || async {
        let got = ask(1, 0, Event::None).await?;
        if got.contains(&2) {
            Ok(())
        } else {
            Err(format!("answered {got:?}"))
        }
    })
    .await;

    // Leecher 3 joins, written plain; its client is gone as soon as the write is queued.
    let q3 = query(3, 9, Event::Started);
    let mut join = Box::pin(fbpkg_tracker::serve_announce_any(
        &state,
        from(3),
        &q3,
        tokio::time::Instant::now(),
    ));
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(join.as_mut().poll(cx))).await;
    assert!(first.is_pending(), "the write waits for Redis");
    drop(join);

    let leechers = swarm_key(&hash, "leechers");
    let member = format!("{}@127.0.0.53", PeerId([3; 20]).to_hex());
    wait_for("Redis to hold 3", ANSWER_WITHIN, || async {
        match redis.bulk(&format!("ZSCORE {leechers} {member}")) {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err("no score".into()),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    assert!(
        store.mirror().is_warm(&hash),
        "the copy is kept: it holds what Redis holds"
    );
    shutdown.cancel();
    following.await.expect("the mirror's task");
}
