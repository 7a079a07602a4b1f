use std::collections::HashSet;
use std::time::Duration;

use fbpkg_common::tracker_proto::PeerEntry;
use proptest::prelude::*;

use super::sample::floyd_sample;
use super::*;

#[test]
fn floyd_sample_is_distinct_and_in_range() {
    let mut rng = rand::rng();
    for (n, k) in [(10, 3), (10, 10), (5, 9), (1000, 51)] {
        let mut v = floyd_sample(&mut rng, n, k);
        assert_eq!(v.len(), k.min(n));
        assert!(v.iter().all(|&i| i < n));
        v.sort_unstable();
        v.dedup();
        assert_eq!(v.len(), k.min(n));
    }
    // Every index gets picked eventually (not a fixed window).
    let mut seen = [false; 20];
    for _ in 0..500 {
        for i in floyd_sample(&mut rng, 20, 2) {
            seen[i] = true;
        }
    }
    assert!(seen.iter().all(|&s| s));
}

/// Peer `id` on 127.0.0.`id`.
fn rec(id: u8, left: u64, zone: Option<&str>) -> PeerRecord {
    rec_at(id, [127, 0, 0, id], 6881, left, zone)
}

fn rec_at(id: u8, ip: [u8; 4], port: u16, left: u64, zone: Option<&str>) -> PeerRecord {
    PeerRecord {
        peer_id: PeerId([id; 20]),
        addr: SocketAddr::from((ip, port)),
        uploaded: 0,
        downloaded: 0,
        left,
        zone: zone.map(|z| Zone::new(z).unwrap()),
        last_seen: Instant::now(),
    }
}

fn key(id: u8) -> PeerKey {
    rec(id, 0, None).key()
}

fn ids(got: &[PeerEntry]) -> Vec<u8> {
    got.iter().map(|p| p.peer_id.unwrap().0[0]).collect()
}

const NO_LIMITS: &Limits = &Limits::NONE;

#[test]
fn seeders_get_only_leechers_and_never_themselves() {
    let mut s = Swarm::default();
    for i in 1..=5 {
        s.record(
            rec(i, if i <= 2 { 0 } else { 10 }, None),
            Event::Started,
            NO_LIMITS,
        );
    }
    for _ in 0..50 {
        let got = s.sample(&key(1), true, None, 50);
        assert_eq!(got.len(), 3);
        assert!(ids(&got).iter().all(|&i| i >= 3));
        let got = s.sample(&key(3), false, None, 50);
        assert_eq!(got.len(), 4);
        assert!(!ids(&got).contains(&3));
        assert_eq!(s.sample(&key(3), false, None, 2).len(), 2);
    }
}

#[test]
fn left_zero_makes_a_seeder_and_counts_a_completion() {
    let mut s = Swarm::default();
    s.record(rec(1, 10, None), Event::Started, NO_LIMITS);
    let counts = |s: &Swarm| (s.seeders().len(), s.leechers().len(), s.completed);
    assert_eq!(counts(&s), (0, 1, 0));
    s.record(rec(1, 0, None), Event::None, NO_LIMITS);
    assert_eq!(counts(&s), (1, 0, 1));
    s.record(rec(1, 0, None), Event::None, NO_LIMITS);
    assert_eq!(
        s.completed, 1,
        "re-announcing as a seeder is not another completion"
    );
    s.record(rec(1, 0, None), Event::Completed, NO_LIMITS);
    assert_eq!(
        s.completed, 1,
        "a seeder repeating `completed` is not another completion"
    );
    // A seeder new to the swarm that says it completed counts (its download was elsewhere,
    // or before this tracker started).
    s.record(rec(2, 0, None), Event::Completed, NO_LIMITS);
    assert_eq!(s.completed, 2);
    for id in [1, 2] {
        assert_eq!(
            s.record(rec(id, 0, None), Event::Stopped, NO_LIMITS),
            Recorded::Removed
        );
    }
    assert!(s.is_empty());
    s.assert_consistent();
}

#[test]
fn full_swarm_refuses_newcomers_but_keeps_members() {
    let mut s = Swarm::default();
    let one = &Limits {
        max_peers: 1,
        ..Limits::NONE
    };
    assert_eq!(
        s.record(rec(1, 1, None), Event::Started, one),
        Recorded::Present
    );
    assert_eq!(
        s.record(rec(2, 1, None), Event::Started, one),
        Recorded::Full
    );
    assert_eq!(
        s.record(rec(1, 0, None), Event::None, one),
        Recorded::Present
    );
}

#[test]
fn peers_are_keyed_by_id_and_address() {
    let mut s = Swarm::default();
    let (a, b) = ([10, 0, 0, 1], [10, 0, 0, 2]);
    s.record(rec_at(1, a, 6881, 5, None), Event::Started, NO_LIMITS);
    // Someone who learned the id announces it from elsewhere: a separate entry.
    s.record(rec_at(1, b, 7000, 0, None), Event::Started, NO_LIMITS);
    assert_eq!(s.len(), 2);
    assert_eq!(s.leechers()[0].addr, SocketAddr::from((a, 6881)));
    // ... and cannot stop the original.
    s.record(rec_at(1, b, 7000, 0, None), Event::Stopped, NO_LIMITS);
    assert_eq!(s.len(), 1);
    assert_eq!(s.leechers()[0].addr, SocketAddr::from((a, 6881)));
    // The peer itself moving to another port from its address updates its entry.
    s.record(rec_at(1, a, 6999, 5, None), Event::None, NO_LIMITS);
    assert_eq!(s.len(), 1);
    assert_eq!(s.leechers()[0].addr, SocketAddr::from((a, 6999)));
    s.record(rec_at(1, a, 6999, 5, None), Event::Stopped, NO_LIMITS);
    assert!(s.is_empty());
    s.assert_consistent();
}

#[test]
fn address_limit_refuses_newcomers_and_keeps_members() {
    let mut s = Swarm::default();
    let limits = &Limits {
        max_per_address: 3,
        ..Limits::NONE
    };
    let host = [10, 0, 0, 1];
    for id in 1..=3 {
        let r = s.record(rec_at(id, host, 6881, 5, None), Event::Started, limits);
        assert_eq!(r, Recorded::Present);
    }
    let r = s.record(rec_at(4, host, 6881, 5, None), Event::Started, limits);
    assert_eq!(r, Recorded::AddressFull);
    assert_eq!(s.from_address(host.into()), 3);
    // The peers already there keep announcing (and may finish); no churn.
    let r = s.record(rec_at(2, host, 6881, 0, None), Event::None, limits);
    assert_eq!(r, Recorded::Present);
    assert_eq!((s.seeders().len(), s.leechers().len()), (1, 2));
    // Other addresses are not affected.
    let r = s.record(
        rec_at(4, [10, 0, 0, 2], 6881, 5, None),
        Event::Started,
        limits,
    );
    assert_eq!(r, Recorded::Present);
    // A peer leaving makes room.
    s.record(rec_at(1, host, 6881, 5, None), Event::Stopped, limits);
    let r = s.record(rec_at(4, host, 6881, 5, None), Event::Started, limits);
    assert_eq!(r, Recorded::Present);
    s.assert_consistent();
}

#[test]
fn a_leechers_answer_starts_with_the_seeders_when_few() {
    let mut s = Swarm::default();
    s.record(rec_at(0, [10, 9, 9, 9], 1, 0, None), Event::None, NO_LIMITS);
    for i in 0..2000u32 {
        let mut r = rec_at(1, [10, 1, (i >> 8) as u8, i as u8], 2, 5, None);
        r.peer_id.0[1..5].copy_from_slice(&i.to_be_bytes());
        s.record(r, Event::Started, NO_LIMITS);
    }
    let asker = s.leechers()[7].key();
    for _ in 0..100 {
        let got = s.sample(&asker, false, None, 50);
        assert_eq!(got.len(), 50);
        assert_eq!(got[0].peer_id, Some(PeerId([0; 20])), "the seed, first");
        assert!(got.iter().all(|p| p.peer_id != Some(asker.peer_id)));
    }
    // Many seeders: half the answer.
    for i in 1..=40 {
        s.record(rec_at(i, [10, 8, 0, i], 1, 0, None), Event::None, NO_LIMITS);
    }
    let got = s.sample(&asker, false, None, 50);
    let seeders = got.iter().filter(|p| p.addr.port() == 1).count();
    assert_eq!(seeders, 25);
    assert!(got[..25].iter().all(|p| p.addr.port() == 1));
    // A seeder still gets only leechers.
    let got = s.sample(&s.seeders()[0].key(), true, None, 50);
    assert!(got.iter().all(|p| p.addr.port() == 2));
}

#[test]
fn zone_orders_rack_then_datacenter_then_anywhere() {
    let mut s = Swarm::default();
    s.record(rec(1, 5, Some("dc2/rack1")), Event::Started, NO_LIMITS);
    s.record(rec(2, 5, Some("dc1/rack9")), Event::Started, NO_LIMITS);
    s.record(rec(3, 5, Some("dc1/rack7")), Event::Started, NO_LIMITS);
    s.record(rec(4, 5, None), Event::Started, NO_LIMITS);
    let me = Zone::new("dc1/rack7").unwrap();
    for _ in 0..20 {
        let got = ids(&s.sample(&key(9), false, Some(&me), 3));
        assert_eq!(&got[..2], &[3, 2]);
        assert!(got[2] == 1 || got[2] == 4);
    }
}

#[test]
fn expiry_drops_silent_peers_and_keeps_index_consistent() {
    let mut s = Swarm::default();
    let old = Instant::now();
    for i in 1..=6 {
        let mut r = rec(i, u64::from(i % 2), Some("dc1/r1"));
        if i % 3 == 0 {
            r.last_seen = old;
        }
        s.record(r, Event::Started, NO_LIMITS);
    }
    let cutoff = old + Duration::from_nanos(1);
    for i in [1, 2, 4, 5] {
        let mut r = rec(i, u64::from(i % 2), Some("dc1/r1"));
        r.last_seen = cutoff;
        s.record(r, Event::None, NO_LIMITS);
    }
    assert_eq!(s.expire(cutoff), 2);
    assert_eq!(s.len(), 4);
    s.assert_consistent();
    for i in [1, 2, 4, 5] {
        assert_eq!(
            s.record(rec(i, 0, None), Event::Stopped, NO_LIMITS),
            Recorded::Removed
        );
    }
    assert!(s.is_empty() && s.seeders().is_empty() && s.leechers().is_empty());
    s.assert_consistent();
}

const ZONES: [Option<&str>; 6] = [
    None,
    Some("dc1"),
    Some("dc1/r1"),
    Some("dc1/r2"),
    Some("dc2/r1"),
    Some("dc1/r1/h1"),
];

#[derive(Debug, Clone)]
enum Op {
    Announce {
        id: u8,
        ip: u8,
        port: u16,
        seeder: bool,
        zone: usize,
        completed: bool,
    },
    Stop {
        id: u8,
        ip: u8,
    },
    /// Expire peers silent for more than this many steps.
    Expire(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..12u8, 0..3u8, 1..4u16, any::<bool>(), 0..ZONES.len(), any::<bool>()).prop_map(
            |(id, ip, port, seeder, zone, completed)| Op::Announce { id, ip, port, seeder, zone, completed }
        ),
        2 => (0..12u8, 0..3u8).prop_map(|(id, ip)| Op::Stop { id, ip }),
        1 => (0..20u8).prop_map(Op::Expire),
    ]
}

#[derive(Debug, Clone)]
struct Ask {
    id: u8,
    ip: u8,
    seeds: bool,
    zone: usize,
    n: usize,
}

fn ask() -> impl Strategy<Value = Ask> {
    (0..12u8, 0..3u8, any::<bool>(), 0..ZONES.len(), 0..16usize).prop_map(
        |(id, ip, seeds, zone, n)| Ask {
            id,
            ip,
            seeds,
            zone,
            n,
        },
    )
}

fn zone(i: usize) -> Option<Zone> {
    ZONES[i].map(|z| Zone::new(z).unwrap())
}

/// Everything `sample` promises, checked against the swarm's contents.
fn check_answer(s: &Swarm, a: &Ask) -> Result<(), TestCaseError> {
    let asker = PeerKey {
        peer_id: PeerId([a.id; 20]),
        ip: IpAddr::from([10, 0, 0, a.ip]),
    };
    let my_zone = zone(a.zone);
    let got = s.sample(&asker, a.seeds, my_zone.as_ref(), a.n);
    let depth = |p: &PeerRecord| match (&p.zone, &my_zone) {
        (Some(z), Some(m)) => z.shared_depth(m),
        _ => 0,
    };
    let find = |e: &PeerEntry| {
        let key = PeerKey {
            peer_id: e.peer_id.unwrap_or(PeerId([0xff; 20])),
            ip: e.addr.ip(),
        };
        s.seeders()
            .iter()
            .chain(s.leechers())
            .find(|p| p.key() == key && p.addr == e.addr)
    };
    let mut seen = HashSet::new();
    let mut recs = Vec::new();
    for e in &got {
        let p = find(e);
        prop_assert!(p.is_some(), "{e:?} is not in the swarm");
        let p = p.unwrap();
        prop_assert!(p.key() != asker, "the asker got itself");
        prop_assert!(seen.insert(p.key()), "{e:?} twice");
        recs.push(p);
    }
    let eligible = |v: &[PeerRecord]| v.iter().filter(|p| p.key() != asker).count();
    let (es, el) = (eligible(s.seeders()), eligible(s.leechers()));
    if a.seeds {
        prop_assert!(recs.iter().all(|p| p.left > 0), "a seeder got a seeder");
        prop_assert_eq!(got.len(), a.n.min(el));
        return Ok(());
    }
    prop_assert_eq!(got.len(), a.n.min(es + el));
    let first = es.min(a.n.div_ceil(2));
    prop_assert!(recs[..first].iter().all(|p| p.left == 0), "seeders first");
    // Closest first, and nobody closer left out: within the first seeders, and the leechers.
    let leechers: Vec<&PeerRecord> = recs[first..]
        .iter()
        .copied()
        .filter(|p| p.left > 0)
        .collect();
    for (part, pool) in [(&recs[..first], s.seeders()), (&leechers[..], s.leechers())] {
        let depths: Vec<usize> = part.iter().map(|p| depth(p)).collect();
        prop_assert!(depths.windows(2).all(|w| w[0] >= w[1]), "order {depths:?}");
        let left_out = pool
            .iter()
            .filter(|p| p.key() != asker && !part.iter().any(|q| q.key() == p.key()))
            .map(depth)
            .max();
        if let (Some(&worst), Some(best_left)) = (depths.last(), left_out) {
            prop_assert!(worst >= best_left, "a closer peer was left out");
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn random_histories_keep_the_indexes_consistent(
        steps in proptest::collection::vec((op(), ask()), 1..120)
    ) {
        let limits = Limits { max_peers: 20, max_per_address: 6 };
        let base = Instant::now();
        let at = |step: usize| base + Duration::from_millis(step as u64 + 100);
        let mut s = Swarm::default();
        for (step, (op, a)) in steps.iter().enumerate() {
            match *op {
                Op::Announce { id, ip, port, seeder, zone: z, completed } => {
                    let mut r = rec_at(id, [10, 0, 0, ip], port, u64::from(!seeder), None);
                    r.zone = zone(z);
                    r.last_seen = at(step);
                    let event = if completed { Event::Completed } else { Event::None };
                    let (known, from, len) = (s.index.contains_key(&r.key()), s.from_address(r.addr.ip()), s.len());
                    let got = s.record(r.clone(), event, &limits);
                    let want = if known {
                        Recorded::Present
                    } else if from >= limits.max_per_address {
                        Recorded::AddressFull
                    } else if len >= limits.max_peers {
                        Recorded::Full
                    } else {
                        Recorded::Present
                    };
                    prop_assert_eq!(got, want);
                    if got == Recorded::Present {
                        let (role, i) = s.index[&r.key()];
                        let now = s.group(role).get(i).unwrap();
                        prop_assert_eq!((now.addr, now.left, &now.zone), (r.addr, r.left, &r.zone));
                    }
                }
                Op::Stop { id, ip } => {
                    let r = rec_at(id, [10, 0, 0, ip], 1, 0, None);
                    prop_assert_eq!(s.record(r.clone(), Event::Stopped, &limits), Recorded::Removed);
                    prop_assert!(!s.index.contains_key(&r.key()));
                }
                Op::Expire(age) => {
                    let before = s.len();
                    let cutoff = at(step.saturating_sub(usize::from(age)));
                    let dropped = s.expire(cutoff);
                    prop_assert_eq!(s.len(), before - dropped);
                    prop_assert!(s.seeders().iter().chain(s.leechers()).all(|p| p.last_seen >= cutoff));
                }
            }
            s.assert_consistent();
            check_answer(&s, a)?;
        }
        s.expire(at(steps.len() + 1));
        prop_assert!(s.is_empty() && s.per_address.is_empty());
        s.assert_consistent();
    }
}
