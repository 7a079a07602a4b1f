//! One role's peers (a swarm's seeders, or its leechers): a dense vector, so a random pick is
//! an index, plus the zone buckets over that vector.
//!
//! Invariant kept by every method: for the peer at position `i` with a zone, `slots[i][d]` is
//! its position in the bucket of its `d`-th prefix, and that bucket entry is `i`. A
//! `swap_remove` moves the last peer into the hole, so its bucket entries are re-pointed
//! (`ZoneIndex::relocate`), and the peers moved inside buckets get their slots fixed.

use super::PeerRecord;
use super::zones::ZoneIndex;

/// Seeders or leechers of one swarm.
#[derive(Debug, Default)]
pub(super) struct Peers {
    recs: Vec<PeerRecord>,
    /// Parallel to `recs`: each peer's position in each of its zone buckets (empty when it
    /// gave no zone).
    slots: Vec<Vec<usize>>,
    zones: ZoneIndex,
}

impl Peers {
    pub(super) fn as_slice(&self) -> &[PeerRecord] {
        &self.recs
    }

    pub(super) fn len(&self) -> usize {
        self.recs.len()
    }

    pub(super) fn get(&self, i: usize) -> Option<&PeerRecord> {
        self.recs.get(i)
    }

    /// Positions of the peers whose zone starts with `prefix`.
    pub(super) fn bucket(&self, prefix: &str) -> &[usize] {
        self.zones.bucket(prefix)
    }

    /// Add a peer; returns its position.
    pub(super) fn push(&mut self, rec: PeerRecord) -> usize {
        let i = self.recs.len();
        let slots = rec
            .zone
            .as_ref()
            .map_or_else(Vec::new, |z| self.zones.insert(z, i));
        self.recs.push(rec);
        self.slots.push(slots);
        i
    }

    /// Overwrite the peer at `i` with a newer announce of the same peer, in place, when that
    /// leaves its buckets as they are (same zone); otherwise hand the record back.
    pub(super) fn refresh(&mut self, i: usize, rec: PeerRecord) -> Result<(), PeerRecord> {
        match self.recs.get_mut(i) {
            Some(old) if old.zone == rec.zone => {
                *old = rec;
                Ok(())
            }
            _ => Err(rec),
        }
    }

    /// Remove the peer at `i`. Returns it, and the peer moved into position `i` (if any), whose
    /// position the caller must update in its own index.
    pub(super) fn swap_remove(&mut self, i: usize) -> Option<(PeerRecord, Option<&PeerRecord>)> {
        if i >= self.recs.len() {
            return None;
        }
        let Self { recs, slots, zones } = self;
        let mine = std::mem::take(&mut slots[i]);
        if let Some(zone) = &recs[i].zone {
            zones.remove(zone, &mine, |depth, peer, slot| {
                if let Some(s) = slots.get_mut(peer).and_then(|s| s.get_mut(depth)) {
                    *s = slot;
                }
            });
        }
        let rec = recs.swap_remove(i);
        slots.swap_remove(i);
        let moved = recs.get(i);
        if let (Some(m), Some(s)) = (moved, slots.get(i))
            && let Some(zone) = &m.zone
        {
            zones.relocate(zone, s, i);
        }
        Some((rec, moved))
    }

    /// Panics when the vector, the slots and the buckets disagree (tests only).
    #[cfg(test)]
    pub(super) fn assert_consistent(&self) {
        use super::zones::prefixes;
        assert_eq!(self.recs.len(), self.slots.len());
        let mut entries = 0;
        for (i, (rec, slots)) in self.recs.iter().zip(&self.slots).enumerate() {
            let Some(zone) = &rec.zone else {
                assert!(slots.is_empty(), "zoneless peer {i} has slots");
                continue;
            };
            let ps: Vec<&str> = prefixes(zone).collect();
            assert_eq!(ps.len(), slots.len(), "peer {i}: one slot per prefix");
            for (p, &s) in ps.iter().zip(slots) {
                assert_eq!(self.zones.bucket(p).get(s), Some(&i), "peer {i} in {p}");
            }
            entries += slots.len();
        }
        let mut in_buckets = 0;
        for (prefix, b) in self.zones.buckets() {
            assert!(!b.is_empty(), "empty bucket {prefix} kept");
            for &i in b {
                let zone = self.recs[i].zone.as_ref().map(|z| z.as_str());
                assert!(
                    zone.is_some_and(|z| z == prefix
                        || z.strip_prefix(prefix).is_some_and(|r| r.starts_with('/'))),
                    "peer {i} ({zone:?}) in bucket {prefix}"
                );
            }
            in_buckets += b.len();
        }
        assert_eq!(entries, in_buckets, "stray bucket entries");
    }
}
