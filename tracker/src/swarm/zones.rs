//! Zone buckets: for every zone prefix seen in a swarm (`dc1`, `dc1/rack7`), the peers whose
//! zone starts with it.
//!
//! Why: a zone announce wants same-rack peers first, then same-datacenter, then anyone. Sorting
//! the swarm by closeness costs O(swarm) per announce (100k peers at fleet scale); with a bucket
//! per prefix, "peers sharing at least `d` segments with me" is one hash lookup and a slice, and
//! sampling from it is O(numwant).
//!
//! Layout: a bucket is a vector of positions in the role's peer vector (see `peers.rs`), and
//! every zoned peer keeps its position inside each of its buckets (one per prefix, shortest
//! first), so removal is a `swap_remove` in each bucket plus a fix-up of the one peer that moved.
//! Empty buckets are dropped: the index never holds more than `peers x depth` entries.

use std::collections::HashMap;

use fbpkg_common::tracker_proto::Zone;

/// The prefixes of a zone, shortest first: `dc1`, `dc1/rack7`. A peer's `d`-th prefix
/// (0-based) is the bucket of peers sharing at least `d + 1` segments with it.
pub(super) fn prefixes(zone: &Zone) -> impl Iterator<Item = &str> {
    let s = zone.as_str();
    s.match_indices('/')
        .map(move |(i, _)| &s[..i])
        .chain(std::iter::once(s))
}

/// The prefixes of a zone, longest first: the closest bucket first.
pub(super) fn prefixes_longest_first(zone: &Zone) -> impl Iterator<Item = &str> {
    let s = zone.as_str();
    std::iter::once(s).chain(s.rmatch_indices('/').map(move |(i, _)| &s[..i]))
}

/// Buckets of one role's peers, by zone prefix.
#[derive(Debug, Default)]
pub(super) struct ZoneIndex {
    buckets: HashMap<Box<str>, Vec<usize>, foldhash::fast::RandomState>,
}

impl ZoneIndex {
    /// Add the peer at position `idx` to its buckets; returns its position in each of them,
    /// shortest prefix first.
    pub(super) fn insert(&mut self, zone: &Zone, idx: usize) -> Vec<usize> {
        prefixes(zone)
            .map(|p| {
                if let Some(b) = self.buckets.get_mut(p) {
                    b.push(idx);
                    b.len() - 1
                } else {
                    self.buckets.insert(p.into(), vec![idx]);
                    0
                }
            })
            .collect()
    }

    /// Take a peer out of its buckets (`slots` as [`ZoneIndex::insert`] returned them). For
    /// every peer moved inside a bucket by the `swap_remove`, `moved(depth, peer, new_slot)`
    /// is called so the caller can update that peer's slots.
    pub(super) fn remove(
        &mut self,
        zone: &Zone,
        slots: &[usize],
        mut moved: impl FnMut(usize, usize, usize),
    ) {
        for (depth, (p, &slot)) in prefixes(zone).zip(slots).enumerate() {
            let Some(b) = self.buckets.get_mut(p) else {
                continue;
            };
            if slot >= b.len() {
                continue;
            }
            b.swap_remove(slot);
            if let Some(&peer) = b.get(slot) {
                moved(depth, peer, slot);
            }
            if b.is_empty() {
                self.buckets.remove(p);
            }
        }
    }

    /// The peer at `slots` moved to position `to` of the role's vector: point its bucket
    /// entries there.
    pub(super) fn relocate(&mut self, zone: &Zone, slots: &[usize], to: usize) {
        for (p, &slot) in prefixes(zone).zip(slots) {
            if let Some(entry) = self.buckets.get_mut(p).and_then(|b| b.get_mut(slot)) {
                *entry = to;
            }
        }
    }

    /// Positions of the peers whose zone starts with `prefix` (whole segments).
    pub(super) fn bucket(&self, prefix: &str) -> &[usize] {
        self.buckets.get(prefix).map_or(&[], Vec::as_slice)
    }

    /// Every bucket, for consistency checks.
    #[cfg(test)]
    pub(super) fn buckets(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.buckets.iter().map(|(k, v)| (&**k, v.as_slice()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_whole_segments() {
        let z = Zone::new("dc1/rack7/host3").unwrap();
        assert_eq!(
            prefixes(&z).collect::<Vec<_>>(),
            ["dc1", "dc1/rack7", "dc1/rack7/host3"]
        );
        assert_eq!(
            prefixes_longest_first(&z).collect::<Vec<_>>(),
            ["dc1/rack7/host3", "dc1/rack7", "dc1"]
        );
        let z = Zone::new("dc1").unwrap();
        assert_eq!(prefixes(&z).collect::<Vec<_>>(), ["dc1"]);
        assert_eq!(prefixes_longest_first(&z).collect::<Vec<_>>(), ["dc1"]);
    }

    #[test]
    fn removal_reports_the_moved_peer_and_drops_empty_buckets() {
        let mut ix = ZoneIndex::default();
        let a = Zone::new("dc1/r1").unwrap();
        let b = Zone::new("dc1/r2").unwrap();
        let sa = ix.insert(&a, 0);
        let sb = ix.insert(&b, 1);
        assert_eq!((sa.as_slice(), sb.as_slice()), (&[0, 0][..], &[1, 0][..]));
        assert_eq!(ix.bucket("dc1"), &[0, 1]);
        let mut moves = Vec::new();
        ix.remove(&a, &sa, |d, peer, slot| moves.push((d, peer, slot)));
        assert_eq!(moves, [(0, 1, 0)], "b moved to slot 0 of dc1");
        assert_eq!(ix.bucket("dc1"), &[1]);
        assert!(ix.bucket("dc1/r1").is_empty());
        assert_eq!(ix.buckets().count(), 2);
        ix.relocate(&b, &[0, 0], 0);
        assert_eq!(ix.bucket("dc1/r2"), &[0]);
    }
}
