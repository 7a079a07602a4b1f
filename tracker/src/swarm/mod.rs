//! Soft state: which peers are in which swarm.
//!
//! One [`Swarm`] per info-hash in a sharded map, so announces for different packages never
//! contend. Inside a swarm:
//!
//! - a peer is who *and* where it is: a [`PeerKey`] of peer id and IP address. Peer ids are
//!   public (dictionary answers list them), so an announce with a known id from another
//!   address is another peer: it can neither stop nor move the original. A new port from the
//!   same address updates the entry.
//! - seeders and leechers are two dense vectors (`peers.rs`) with an index by key: an
//!   announce is O(1) to record and O(numwant) to answer (random sampling by position, no scan),
//!   and "a seeder gets only leechers" is a choice of vector, not a filter.
//! - each vector has zone buckets (`zones.rs`), so a zone announce takes same-rack, then
//!   same-datacenter, then any peers without sorting the swarm.
//! - at most [`Limits::max_per_address`] peers per source address: one host making up peer ids
//!   cannot fill a swarm and push the real peers out of everyone's answers. Announces over the
//!   limit are refused; the peers already there from that address stay (no churn).
//!
//! Answers (`sample.rs`): a leecher gets seeders first, up to half of what it asked for (all of
//! them when there are that few), then leechers, then more seeders if leechers run short; a
//! seeder gets only leechers; nobody gets itself; with a zone, closest first within each role.
//!
//! Peers are forgotten on `stopped`, or when silent for two announce intervals (the sweeper in
//! `server.rs`). Nothing here is persisted: a restarted tracker learns the swarm again within
//! one interval.
//!
//! This is the in-memory peer store; with `--peer-store redis://...` the peers live in Redis
//! (`peer_store/`) and these maps keep only which swarms exist here.

mod peers;
mod sample;
mod zones;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use dashmap::DashMap;
use fbpkg_common::metainfo::Metainfo;
use fbpkg_common::pkgref::PackageName;
use fbpkg_common::tracker_proto::{Event, Zone};
use fbpkg_common::{InfoHash, PeerId, Sha256Hash};
use tokio::time::Instant;

use self::peers::Peers;

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

/// Who and where a peer is: the swarm's key for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerKey {
    /// The id it announced.
    pub peer_id: PeerId,
    /// The address it is recorded under (the connection's, or a trusted `ip=`).
    pub ip: IpAddr,
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

impl PeerRecord {
    /// The swarm's key for this peer.
    pub fn key(&self) -> PeerKey {
        PeerKey {
            peer_id: self.peer_id,
            ip: self.addr.ip(),
        }
    }
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
    /// Its address already has the most peers allowed in this swarm; the peer was not added.
    AddressFull,
}

/// Caps applied when a new peer joins a swarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Peers in one swarm.
    pub max_peers: usize,
    /// Peers in one swarm recorded under one IP address.
    pub max_per_address: usize,
}

impl Limits {
    /// No cap at all (tests, tools).
    pub const NONE: Limits = Limits {
        max_peers: usize::MAX,
        max_per_address: usize::MAX,
    };
}

/// Seeder or leecher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Seeder,
    Leecher,
}

impl Role {
    fn of(rec: &PeerRecord) -> Role {
        if rec.left == 0 {
            Role::Seeder
        } else {
            Role::Leecher
        }
    }
}

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Peers of one info-hash.
#[derive(Debug, Default)]
pub struct Swarm {
    /// The package, when published (registered swarms exist from publish on, even empty).
    pub package: Option<PackageLabel>,
    seeders: Peers,
    leechers: Peers,
    index: FastMap<PeerKey, (Role, usize)>,
    /// Peers per recorded address; addresses with none are removed.
    per_address: FastMap<IpAddr, usize>,
    /// Downloads completed (a leecher turning into a seeder, or a peer new to the swarm
    /// announcing `completed`).
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
        self.seeders.as_slice()
    }

    /// Leechers.
    pub fn leechers(&self) -> &[PeerRecord] {
        self.leechers.as_slice()
    }

    /// All peers.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// No peers at all.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The peer recorded under `key`.
    pub fn peer(&self, key: &PeerKey) -> Option<&PeerRecord> {
        let &(role, i) = self.index.get(key)?;
        self.group(role).as_slice().get(i)
    }

    /// Peers recorded under `ip`.
    pub fn from_address(&self, ip: IpAddr) -> usize {
        self.per_address.get(&ip).copied().unwrap_or(0)
    }

    fn group(&self, role: Role) -> &Peers {
        match role {
            Role::Seeder => &self.seeders,
            Role::Leecher => &self.leechers,
        }
    }

    fn group_mut(&mut self, role: Role) -> &mut Peers {
        match role {
            Role::Seeder => &mut self.seeders,
            Role::Leecher => &mut self.leechers,
        }
    }

    fn take(&mut self, key: &PeerKey) -> Option<PeerRecord> {
        let (role, i) = self.index.remove(key)?;
        let (rec, moved) = self.group_mut(role).swap_remove(i)?;
        if let Some(moved) = moved.map(PeerRecord::key) {
            self.index.insert(moved, (role, i));
        }
        if let Some(n) = self.per_address.get_mut(&key.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_address.remove(&key.ip);
            }
        }
        Some(rec)
    }

    fn put(&mut self, rec: PeerRecord) {
        let (key, role) = (rec.key(), Role::of(&rec));
        let i = self.group_mut(role).push(rec);
        self.index.insert(key, (role, i));
        *self.per_address.entry(key.ip).or_default() += 1;
    }

    /// Record an announce. A peer already in the swarm is always updated; a new one is refused
    /// when its address or the swarm is at its limit.
    pub fn record(&mut self, rec: PeerRecord, event: Event, limits: &Limits) -> Recorded {
        let key = rec.key();
        if event == Event::Stopped {
            self.take(&key);
            return Recorded::Removed;
        }
        let role = Role::of(&rec);
        let completes = role == Role::Seeder && event == Event::Completed;
        let Some(&(was, i)) = self.index.get(&key) else {
            if self.from_address(key.ip) >= limits.max_per_address {
                return Recorded::AddressFull;
            }
            if self.len() >= limits.max_peers {
                return Recorded::Full;
            }
            self.completed += u64::from(completes);
            self.put(rec);
            return Recorded::Present;
        };
        // A known peer completes once, turning seeder: a seeder repeating `completed` (a
        // client's retry, or anyone's loop) is not another download.
        self.completed += u64::from(was == Role::Leecher && role == Role::Seeder);
        // The steady state of a fleet is peers re-announcing unchanged: update in place.
        let rec = if was == role {
            match self.group_mut(role).refresh(i, rec) {
                Ok(()) => return Recorded::Present,
                Err(rec) => rec,
            }
        } else {
            rec
        };
        self.take(&key);
        self.put(rec);
        Recorded::Present
    }

    /// Forget every peer (the package and the completed count stay).
    pub fn clear_peers(&mut self) {
        *self = Self {
            package: self.package.take(),
            completed: self.completed,
            ..Self::default()
        };
    }

    /// Drop peers not seen since `cutoff`; returns how many.
    pub fn expire(&mut self, cutoff: Instant) -> usize {
        let stale: Vec<PeerKey> = self
            .seeders()
            .iter()
            .chain(self.leechers())
            .filter(|p| p.last_seen < cutoff)
            .map(PeerRecord::key)
            .collect();
        for key in &stale {
            self.take(key);
        }
        stale.len()
    }

    /// Panics when the index, the per-address counts, the vectors and the zone buckets
    /// disagree (tests only).
    #[cfg(test)]
    pub(crate) fn assert_consistent(&self) {
        self.seeders.assert_consistent();
        self.leechers.assert_consistent();
        assert_eq!(self.index.len(), self.seeders.len() + self.leechers.len());
        let mut per_address: FastMap<IpAddr, usize> = FastMap::default();
        for (role, peers) in [
            (Role::Seeder, &self.seeders),
            (Role::Leecher, &self.leechers),
        ] {
            for (i, p) in peers.as_slice().iter().enumerate() {
                assert_eq!(Role::of(p), role);
                assert_eq!(self.index.get(&p.key()), Some(&(role, i)), "{:?}", p.key());
                *per_address.entry(p.addr.ip()).or_default() += 1;
            }
        }
        assert_eq!(per_address, self.per_address);
    }
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

    /// [`Swarms::register`] the swarm of `name`'s version `m`.
    pub fn register_version(&self, name: &PackageName, m: &Metainfo) {
        self.register(
            m.info_hash,
            PackageLabel {
                name: name.clone(),
                sha256: m.sha256,
                size: m.length,
            },
        );
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

    /// Visit every swarm (for the dashboard, `/api/v1/swarms`, scrape-all and metrics), one
    /// at a time as [`Swarms::sweep`] does: iterating the map held each shard for the visit of
    /// all its swarms (a view of up to a thousand peers each), and every announce to a swarm
    /// in that shard waited meanwhile.
    pub fn for_each(&self, mut f: impl FnMut(&InfoHash, &Swarm)) {
        let keys: Vec<InfoHash> = self.map.iter().map(|r| *r.key()).collect();
        for k in keys {
            if let Some(s) = self.map.get(&k) {
                f(&k, s.value());
            }
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
mod tests;
