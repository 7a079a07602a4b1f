//! Soft state: which peers are in which swarm.
//!
//! One [`Swarm`] per info-hash in a sharded map, so announces for different packages never
//! contend. Inside a swarm, seeders and leechers are kept in two vectors with an index by peer
//! id: an announce is O(1) to record and O(numwant) to answer (random sampling by index, no
//! scan), and "a seeder gets only leechers" is a choice of vector, not a filter.
//!
//! Peers are forgotten on `stopped`, or when silent for two announce intervals (the sweeper in
//! `server.rs`). Nothing here is persisted: a restarted tracker learns the swarm again within
//! one interval.

use std::collections::HashMap;
use std::net::SocketAddr;

use dashmap::DashMap;
use fbpkg_common::pkgref::PackageName;
use fbpkg_common::tracker_proto::{Event, PeerEntry, Zone};
use fbpkg_common::{InfoHash, PeerId, Sha256Hash};
use tokio::time::Instant;

/// The package a registered swarm serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageLabel {
    /// Package name.
    pub name: PackageName,
    /// Archive SHA-256.
    pub sha256: Sha256Hash,
    /// Archive size.
    pub size: u64,
}

/// One peer as last announced.
#[derive(Debug, Clone)]
pub struct PeerRecord {
    /// Its id.
    pub peer_id: PeerId,
    /// Where others connect to it.
    pub addr: SocketAddr,
    /// Bytes uploaded, as reported.
    pub uploaded: u64,
    /// Bytes downloaded, as reported.
    pub downloaded: u64,
    /// Bytes missing; 0 = seeder.
    pub left: u64,
    /// Its zone, if it said.
    pub zone: Option<Zone>,
    /// Last announce.
    pub last_seen: Instant,
}

/// What an announce did to the swarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// The peer is in the swarm.
    Present,
    /// The peer left (`stopped`).
    Removed,
    /// The swarm is full; the peer was not added.
    Full,
}

/// Peers of one info-hash.
#[derive(Debug, Default)]
pub struct Swarm {
    /// The package, when published (registered swarms exist from publish on, even empty).
    pub package: Option<PackageLabel>,
    seeders: Vec<PeerRecord>,
    leechers: Vec<PeerRecord>,
    index: HashMap<PeerId, (bool, usize), foldhash::fast::RandomState>,
    /// Downloads completed (a leecher turning into a seeder, or `completed`).
    pub completed: u64,
}

impl Swarm {
    /// A swarm for a published package.
    pub fn registered(label: PackageLabel) -> Self {
        Self {
            package: Some(label),
            ..Self::default()
        }
    }

    /// Seeders.
    pub fn seeders(&self) -> &[PeerRecord] {
        &self.seeders
    }

    /// Leechers.
    pub fn leechers(&self) -> &[PeerRecord] {
        &self.leechers
    }

    /// All peers.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// No peers at all.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    fn take(&mut self, id: &PeerId) -> Option<PeerRecord> {
        let (seeder, i) = self.index.remove(id)?;
        let v = if seeder {
            &mut self.seeders
        } else {
            &mut self.leechers
        };
        let rec = v.swap_remove(i);
        if let Some(moved) = v.get(i) {
            self.index.insert(moved.peer_id, (seeder, i));
        }
        Some(rec)
    }

    fn put(&mut self, rec: PeerRecord) {
        let seeder = rec.left == 0;
        let v = if seeder {
            &mut self.seeders
        } else {
            &mut self.leechers
        };
        self.index.insert(rec.peer_id, (seeder, v.len()));
        v.push(rec);
    }

    /// Record an announce.
    pub fn record(&mut self, rec: PeerRecord, event: Event, max_peers: usize) -> Recorded {
        let previous = self.take(&rec.peer_id);
        if event == Event::Stopped {
            return Recorded::Removed;
        }
        if previous.is_none() && self.len() >= max_peers {
            return Recorded::Full;
        }
        let was_leecher = previous.as_ref().is_some_and(|p| p.left > 0);
        if rec.left == 0 && (was_leecher || event == Event::Completed) {
            self.completed += 1;
        }
        self.put(rec);
        Recorded::Present
    }

    /// Drop peers not seen since `cutoff`; returns how many.
    pub fn expire(&mut self, cutoff: Instant) -> usize {
        let stale: Vec<PeerId> = self
            .seeders
            .iter()
            .chain(&self.leechers)
            .filter(|p| p.last_seen < cutoff)
            .map(|p| p.peer_id)
            .collect();
        for id in &stale {
            self.take(id);
        }
        stale.len()
    }

    /// Up to `n` peers for `asker`: never the asker, only leechers when the asker seeds, and,
    /// when the asker gave a zone, the closest peers first (same rack, then same datacenter,
    /// then anywhere; random within each).
    pub fn sample(
        &self,
        asker: &PeerId,
        asker_seeds: bool,
        zone: Option<&Zone>,
        n: usize,
    ) -> Vec<PeerEntry> {
        let pool: [&[PeerRecord]; 2] = if asker_seeds {
            [&self.leechers, &[]]
        } else {
            [&self.leechers, &self.seeders]
        };
        let total = pool[0].len() + pool[1].len();
        let at = |i: usize| {
            if i < pool[0].len() {
                &pool[0][i]
            } else {
                &pool[1][i - pool[0].len()]
            }
        };
        let entry = |p: &PeerRecord| PeerEntry {
            addr: p.addr,
            peer_id: Some(p.peer_id),
        };
        let mut rng = rand::rng();
        if let Some(zone) = zone {
            // Bucket by closeness, shuffle within a bucket by sorting on a random key.
            let mut ranked: Vec<(usize, u32, &PeerRecord)> = (0..total)
                .map(at)
                .filter(|p| p.peer_id != *asker)
                .map(|p| {
                    let depth = p.zone.as_ref().map_or(0, |z| z.shared_depth(zone));
                    (depth, rand::RngExt::random::<u32>(&mut rng), p)
                })
                .collect();
            ranked.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            return ranked
                .into_iter()
                .take(n)
                .map(|(_, _, p)| entry(p))
                .collect();
        }
        // The asker may be in the pool: sample one extra and drop it.
        let want = (n + 1).min(total);
        floyd_sample(&mut rng, total, want)
            .into_iter()
            .map(at)
            .filter(|p| p.peer_id != *asker)
            .take(n)
            .map(entry)
            .collect()
    }
}

/// `k` distinct indices below `n`, uniformly (Floyd's algorithm): O(k^2) comparisons and one
/// k-sized allocation, never O(n) — `numwant` is small and swarms can be large.
fn floyd_sample(rng: &mut impl rand::Rng, n: usize, k: usize) -> Vec<usize> {
    if k >= n {
        return (0..n).collect();
    }
    let mut out: Vec<usize> = Vec::with_capacity(k);
    for j in n - k..n {
        let t = rand::RngExt::random_range(rng, 0..=j);
        if out.contains(&t) {
            out.push(j);
        } else {
            out.push(t);
        }
    }
    out
}

/// All swarms.
#[derive(Debug, Default)]
pub struct Swarms {
    map: DashMap<InfoHash, Swarm, foldhash::fast::RandomState>,
}

impl Swarms {
    /// Make sure a published package has a swarm (idempotent).
    pub fn register(&self, info_hash: InfoHash, label: PackageLabel) {
        self.map
            .entry(info_hash)
            .and_modify(|s| s.package = Some(label.clone()))
            .or_insert_with(|| Swarm::registered(label));
    }

    /// The swarm of `info_hash`, if known.
    pub fn get(
        &self,
        info_hash: &InfoHash,
    ) -> Option<dashmap::mapref::one::RefMut<'_, InfoHash, Swarm>> {
        self.map.get_mut(info_hash)
    }

    /// The swarm of `info_hash`, created when there is room for another.
    pub fn get_or_create(
        &self,
        info_hash: InfoHash,
        max_swarms: usize,
    ) -> Option<dashmap::mapref::one::RefMut<'_, InfoHash, Swarm>> {
        if let Some(s) = self.map.get_mut(&info_hash) {
            return Some(s);
        }
        if self.map.len() >= max_swarms {
            return None;
        }
        Some(self.map.entry(info_hash).or_default())
    }

    /// Expire silent peers everywhere; drop unregistered swarms left empty. Returns peers dropped.
    ///
    /// One swarm is locked at a time: a sweep of millions of peers never holds a whole shard
    /// while announces wait on it.
    pub fn sweep(&self, cutoff: Instant) -> usize {
        let keys: Vec<InfoHash> = self.map.iter().map(|r| *r.key()).collect();
        let mut dropped = 0;
        for k in keys {
            if let Some(mut s) = self.map.get_mut(&k) {
                dropped += s.expire(cutoff);
            }
            self.map
                .remove_if(&k, |_, s| s.package.is_none() && s.is_empty());
        }
        dropped
    }

    /// Visit every swarm (for the dashboard, scrape-all and metrics).
    pub fn for_each(&self, mut f: impl FnMut(&InfoHash, &Swarm)) {
        for r in self.map.iter() {
            f(r.key(), r.value());
        }
    }

    /// Number of swarms.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// No swarms.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
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

    fn rec(id: u8, left: u64, zone: Option<&str>) -> PeerRecord {
        PeerRecord {
            peer_id: PeerId([id; 20]),
            addr: SocketAddr::from(([127, 0, 0, id], 6881)),
            uploaded: 0,
            downloaded: 0,
            left,
            zone: zone.map(|z| Zone::new(z).unwrap()),
            last_seen: Instant::now(),
        }
    }

    #[test]
    fn seeders_get_only_leechers_and_never_themselves() {
        let mut s = Swarm::default();
        for i in 1..=5 {
            s.record(
                rec(i, if i <= 2 { 0 } else { 10 }, None),
                Event::Started,
                100,
            );
        }
        for _ in 0..50 {
            let got = s.sample(&PeerId([1; 20]), true, None, 50);
            assert_eq!(got.len(), 3);
            assert!(got.iter().all(|p| p.peer_id.unwrap().0[0] >= 3));
            let got = s.sample(&PeerId([3; 20]), false, None, 50);
            assert_eq!(got.len(), 4);
            assert!(got.iter().all(|p| p.peer_id != Some(PeerId([3; 20]))));
            assert_eq!(s.sample(&PeerId([3; 20]), false, None, 2).len(), 2);
        }
    }

    #[test]
    fn left_zero_makes_a_seeder_and_counts_a_completion() {
        let mut s = Swarm::default();
        s.record(rec(1, 10, None), Event::Started, 100);
        assert_eq!(
            (s.seeders().len(), s.leechers().len(), s.completed),
            (0, 1, 0)
        );
        s.record(rec(1, 0, None), Event::None, 100);
        assert_eq!(
            (s.seeders().len(), s.leechers().len(), s.completed),
            (1, 0, 1)
        );
        s.record(rec(1, 0, None), Event::None, 100);
        assert_eq!(
            s.completed, 1,
            "re-announcing as a seeder is not another completion"
        );
        assert_eq!(
            s.record(rec(1, 0, None), Event::Stopped, 100),
            Recorded::Removed
        );
        assert!(s.is_empty());
    }

    #[test]
    fn full_swarm_refuses_newcomers_but_keeps_members() {
        let mut s = Swarm::default();
        assert_eq!(
            s.record(rec(1, 1, None), Event::Started, 1),
            Recorded::Present
        );
        assert_eq!(s.record(rec(2, 1, None), Event::Started, 1), Recorded::Full);
        assert_eq!(s.record(rec(1, 0, None), Event::None, 1), Recorded::Present);
    }

    #[test]
    fn zone_orders_rack_then_datacenter_then_anywhere() {
        let mut s = Swarm::default();
        s.record(rec(1, 5, Some("dc2/rack1")), Event::Started, 100);
        s.record(rec(2, 5, Some("dc1/rack9")), Event::Started, 100);
        s.record(rec(3, 5, Some("dc1/rack7")), Event::Started, 100);
        s.record(rec(4, 5, None), Event::Started, 100);
        let me = Zone::new("dc1/rack7").unwrap();
        for _ in 0..20 {
            let got: Vec<u8> = s
                .sample(&PeerId([9; 20]), false, Some(&me), 3)
                .iter()
                .map(|p| p.peer_id.unwrap().0[0])
                .collect();
            assert_eq!(&got[..2], &[3, 2]);
            assert!(got[2] == 1 || got[2] == 4);
        }
    }

    #[test]
    fn expiry_drops_silent_peers_and_keeps_index_consistent() {
        let mut s = Swarm::default();
        let old = Instant::now();
        for i in 1..=6 {
            let mut r = rec(i, u64::from(i % 2), None);
            if i % 3 == 0 {
                r.last_seen = old;
            }
            s.record(r, Event::Started, 100);
        }
        let cutoff = old + std::time::Duration::from_nanos(1);
        std::thread::sleep(std::time::Duration::from_millis(1));
        for i in [1, 2, 4, 5] {
            s.record(rec(i, u64::from(i % 2), None), Event::None, 100);
        }
        assert_eq!(s.expire(cutoff), 2);
        assert_eq!(s.len(), 4);
        for i in [1, 2, 4, 5] {
            assert_eq!(
                s.record(rec(i, 0, None), Event::Stopped, 100),
                Recorded::Removed
            );
        }
        assert!(s.is_empty() && s.seeders().is_empty() && s.leechers().is_empty());
    }
}
