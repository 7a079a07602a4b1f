//! Super-seeding (BEP 16, adapted): how a seed hands a flash crowd each piece about once.
//!
//! A seed that advertises everything lets every leecher fetch the same popular pieces from it,
//! and the seed ends up uploading the package many times. Instead, the seed advertises to each
//! leecher only a few pieces at a time (with `have` messages), always the pieces with the
//! fewest copies in the swarm — counting copies it has already handed out — so leechers receive
//! disjoint pieces from the seed and trade them among themselves. When a leecher has asked for
//! every block of its offered pieces, it is offered more; how many are kept in hand scales with
//! how fast that leecher downloads, so a lone fast leecher is not starved.
//!
//! Only fbpkg-rs agents are rationed (peer id `-FB…`): they request an advertised piece the
//! moment its `have` arrives. Stock clients get everything advertised, because some (librqbit 9)
//! look for new pieces only every few seconds and would crawl.
//! Pure state, no I/O: the peer tasks call it under the torrent lock.

use std::collections::HashMap;

use fbpkg_common::bitfield::Bitfield;
use fbpkg_common::metainfo::BLOCK_SIZE;
use rand::RngExt;

use super::picker::ConnId;

#[derive(Debug, Clone)]
struct Leecher {
    has: Bitfield,
    /// Advertised to this peer so far (pieces it may request).
    advertised: Bitfield,
    /// Offered pieces not yet fully requested: piece -> blocks requested so far.
    open: HashMap<u32, u32>,
}

/// Offer bookkeeping of one seeding torrent.
#[derive(Debug, Clone)]
pub struct SeedPlanner {
    blocks: Vec<u32>,
    /// Copies of each piece known in the swarm (peers' bitfields and haves).
    copies: Vec<u32>,
    /// Offers made and not yet turned into a copy.
    pending: Vec<u32>,
    peers: HashMap<ConnId, Leecher>,
}

impl SeedPlanner {
    /// A planner for `num_pieces` pieces of `piece_length` bytes (the last one `length` rest).
    pub fn new(length: u64, piece_length: u64) -> Self {
        let n = length.div_ceil(piece_length);
        let blocks = (0..n)
            .map(|i| {
                let size = length.saturating_sub(i * piece_length).min(piece_length);
                u32::try_from(size.div_ceil(u64::from(BLOCK_SIZE))).unwrap_or(u32::MAX)
            })
            .collect::<Vec<_>>();
        let n = blocks.len();
        Self {
            blocks,
            copies: vec![0; n],
            pending: vec![0; n],
            peers: HashMap::new(),
        }
    }

    fn n(&self) -> u32 {
        u32::try_from(self.blocks.len()).unwrap_or(u32::MAX)
    }

    /// A peer connected, holding `has`.
    pub fn add_peer(&mut self, conn: ConnId, has: &Bitfield) {
        for i in has.ones() {
            self.copies[i as usize] += 1;
        }
        let advertised = Bitfield::new(self.n());
        self.peers.insert(
            conn,
            Leecher {
                has: has.clone(),
                advertised,
                open: HashMap::new(),
            },
        );
    }

    /// A peer left: its copies and outstanding offers no longer count.
    pub fn remove_peer(&mut self, conn: ConnId) {
        if let Some(p) = self.peers.remove(&conn) {
            for i in p.has.ones() {
                self.copies[i as usize] = self.copies[i as usize].saturating_sub(1);
            }
            for i in p.advertised.ones() {
                if !p.has.get(i) {
                    self.pending[i as usize] = self.pending[i as usize].saturating_sub(1);
                }
            }
        }
    }

    /// A peer now has piece `i` (its `have`, or its bitfield at connect time via `add_peer`).
    pub fn peer_has(&mut self, conn: ConnId, i: u32) {
        let Some(p) = self.peers.get_mut(&conn) else {
            return;
        };
        if i >= p.has.len() || !p.has.set(i) {
            return;
        }
        self.copies[i as usize] += 1;
        if p.advertised.get(i) {
            self.pending[i as usize] = self.pending[i as usize].saturating_sub(1);
        }
        p.open.remove(&i);
    }

    /// A peer asked for a block of piece `i`. Returns whether the piece was advertised to it.
    pub fn requested(&mut self, conn: ConnId, i: u32) -> bool {
        let Some(p) = self.peers.get_mut(&conn) else {
            return false;
        };
        if !p.advertised.get(i) {
            return false;
        }
        if let Some(n) = p.open.get_mut(&i) {
            *n += 1;
            if *n >= self.blocks[i as usize] {
                p.open.remove(&i);
            }
        }
        true
    }

    /// Pieces to advertise to `conn` now so it keeps `keep_open` offered pieces it has not
    /// fully requested yet. Fewest copies (held or pending) first, random among equals.
    pub fn offers(&mut self, conn: ConnId, keep_open: usize) -> Vec<u32> {
        let mut out = Vec::new();
        let mut rng = rand::rng();
        loop {
            let Some(p) = self.peers.get(&conn) else {
                return out;
            };
            if p.open.len() >= keep_open {
                return out;
            }
            let mut best: Option<(u32, u32)> = None;
            let mut ties = 0u32;
            for i in 0..self.n() {
                if p.has.get(i) || p.advertised.get(i) {
                    continue;
                }
                let score = self.copies[i as usize] + self.pending[i as usize];
                match best {
                    Some((b, _)) if score > b => {}
                    Some((b, _)) if score == b => {
                        ties += 1;
                        if rng.random_range(0..ties) == 0 {
                            best = Some((score, i));
                        }
                    }
                    _ => {
                        best = Some((score, i));
                        ties = 1;
                    }
                }
            }
            let Some((_, i)) = best else { return out };
            self.pending[i as usize] += 1;
            if let Some(p) = self.peers.get_mut(&conn) {
                p.advertised.set(i);
                p.open.insert(i, 0);
            }
            out.push(i);
        }
    }

    /// Every piece has at least one copy among connected peers: the package has been handed
    /// out once.
    pub fn distributed(&self) -> bool {
        self.copies.iter().all(|&c| c > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PL: u64 = 4 * BLOCK_SIZE as u64;

    #[test]
    fn leechers_get_disjoint_pieces_until_all_are_out() {
        let n = 32u32;
        let mut s = SeedPlanner::new(PL * u64::from(n), PL);
        for c in 0..4 {
            s.add_peer(c, &Bitfield::new(n));
        }
        let mut seen = Bitfield::new(n);
        let mut offered_to_1 = Vec::new();
        // Round robin: each leecher takes 2 offers, requests all their blocks, gets more.
        for _round in 0..4 {
            for c in 0..4 {
                for i in s.offers(c, 2) {
                    assert!(seen.set(i), "piece {i} offered twice before all were out");
                    for _ in 0..4 {
                        assert!(s.requested(c, i));
                    }
                    if c == 1 {
                        offered_to_1.push(i);
                    }
                }
            }
        }
        assert!(seen.is_complete());
        // Everything is offered once (one pending copy each). A piece leecher 1 received and
        // passed on to 2 and 3 has three copies: leecher 0 is offered any piece but that one.
        let spread = offered_to_1[0];
        for c in 1..4 {
            s.peer_has(c, spread);
        }
        let next = s.offers(0, 23);
        assert_eq!(next.len(), 23);
        assert!(!next.contains(&spread), "{next:?}");
        assert_eq!(s.offers(0, 24), vec![spread], "the most copied piece comes last");
    }

    #[test]
    fn keeps_the_requested_number_open_and_counts_copies() {
        let mut s = SeedPlanner::new(PL * 8, PL);
        let mut has = Bitfield::new(8);
        has.set(0);
        s.add_peer(1, &has);
        s.add_peer(2, &Bitfield::new(8));
        let first = s.offers(2, 3);
        assert_eq!(first.len(), 3);
        assert!(!first.contains(&0), "the piece peer 1 holds is not rarest");
        assert!(s.offers(2, 3).is_empty(), "still three open");
        for _ in 0..4 {
            s.requested(2, first[0]);
        }
        assert_eq!(
            s.offers(2, 3).len(),
            1,
            "one fully requested, one more offered"
        );
        let unoffered = (0..8).find(|i| !s.peers[&2].advertised.get(*i)).unwrap();
        assert!(!s.requested(2, unoffered), "not advertised to this peer");
        assert!(!s.distributed());
        for i in 0..8 {
            s.peer_has(2, i);
        }
        assert!(s.distributed());
        s.remove_peer(2);
        assert!(!s.distributed());
    }
}
