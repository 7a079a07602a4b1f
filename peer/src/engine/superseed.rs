//! Super-seeding (BEP 16, adapted): how a seed hands a flash crowd each piece about once.
//!
//! A seed that advertises everything lets every leecher fetch the same popular pieces from it,
//! and the seed ends up uploading the package many times. Instead, the seed advertises to each
//! leecher only a few pieces at a time (with `have` messages), and only pieces that no peer
//! holds and none has been offered, so leechers receive disjoint pieces from the seed and trade
//! them among themselves. When a leecher has asked for every block of its offered pieces, it is
//! offered more; how many are kept in hand scales with how fast that leecher downloads, so a
//! lone fast leecher is not starved.
//!
//! Which of those pieces go first: the lowest index, while this seed knows of no other seed
//! ([`Order::Sequential`]). Every host then receives the package roughly from front to back,
//! and hashes the archive's SHA-256 over it as it arrives
//! ([`ArchivePrefix`](super::hashing::ArchivePrefix)) instead of reading it back after its
//! last piece. Handed out at random, the first piece a host was missing stayed near the start
//! until the end: in B1 (`swarm_bench`, 8 hosts) 13–18% of the archive was hashed when the
//! last piece came, and the check after it took 0.7 s per host, all eight hashing at once; in
//! order, 99–100% and 0.00 s. Leechers still pick rarest first among what their peers hold,
//! so the crowd keeps trading disjoint pieces. With another seed about, offers are drawn at
//! random ([`Order::Random`]): two seeds that cannot see each other's offers would hand out
//! the same pieces in the same order.
//!
//! A piece is offered twice only when its first offer went stale: at 48 leechers, offering the
//! least copied piece once every piece was out (a piece already held, or on its way to someone
//! else) made the seed upload a third of the package twice before the last first copies left,
//! and the whole crowd waited for those. Instead, an offer nobody has started on goes back to
//! the pool when its leecher is choked or leaves ([`SeedPlanner::release`]), and leechers still
//! unchoked are topped up from it.
//!
//! Once every piece has a copy, the seed hands out second copies the same way, one leecher
//! each (with none free, any piece the leecher lacks that is not on its way to another, so
//! the seed's uplink does not idle), and advertises everything only once every piece has
//! [`SPREAD`] copies ([`SeedPlanner::spread`]). Advertising everything at the first copy let
//! every leecher fetch the pieces handed out last, each then held by one leecher, from the
//! seed: in the flash-crowd test the seed's upload beyond one package all came after that
//! moment.
//!
//! An offer its leecher started but has not finished after [`SeedPlanner::stale_after`] may go
//! to one more leecher that has nothing else to take. Without that, one slow leecher holds the
//! crowd back: a prefetch capped at 16 KiB/s spent its budget on pieces from other leechers and
//! left the seed's offers for 48 s, while every other host waited for those pieces, the only
//! ones it could not get elsewhere; a peer that asks for one block of each offer and never more
//! would hold them for ever.
//!
//! Only fbpkg-rs agents are rationed (peer id `-FB…`): they request an advertised piece the
//! moment its `have` arrives. Stock clients get everything advertised, because some (librqbit 9)
//! look for new pieces only every few seconds and would crawl.
//! Pure state, no I/O: the peer tasks call it under the torrent lock.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use fbpkg_common::bitfield::Bitfield;
use fbpkg_common::metainfo::BLOCK_SIZE;
use rand::RngExt;

use super::picker::ConnId;

/// The order in which a seed hands out pieces that no peer holds and none has been offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Lowest index first, for a seed that knows of no other: every host then receives the
    /// package roughly from front to back, and hashes the archive while it downloads
    /// ([`ArchivePrefix`](super::hashing::ArchivePrefix)) instead of after its last piece.
    /// Pieces a choked peer gave back come after every other, while that peer is connected:
    /// it still has them advertised and asks for them once unchoked, so a piece offered to
    /// another at once is often uploaded twice. Offered again first, `b1-48` at half the rates
    /// took 67.3 and 67.4 s against 62.9 and 63.1 at random, the origin uploading 1.21–1.23
    /// copies of the package against 1.12 (at random, a piece given back waits among all
    /// those not handed out yet, and its peer mostly takes it up again first). That holds for
    /// the greeting offers a peer refused a slot gives back too: left in order for the others,
    /// `b1-48`'s origin sent 1.13–1.14 copies against 1.11 (three pairs), and no host finished
    /// sooner (`benches/FINDINGS.md`, "What held the front of the archive back").
    Sequential,
    /// At random, when another seed may be handing out pieces too: two seeds that know
    /// nothing of each other's offers would both hand out the same pieces in sequence.
    Random,
}

#[derive(Debug, Clone)]
struct Leecher {
    has: Bitfield,
    /// Advertised to this peer so far (pieces it may request).
    advertised: Bitfield,
    /// Offered pieces not yet fully requested: piece -> blocks requested so far.
    open: HashMap<u32, u32>,
    /// Offered pieces this peer does not hold yet: each counts once in `SeedPlanner::pending`.
    pending: Bitfield,
    /// Offers it gave back unstarted (choked) and may take up again once unchoked: each counts
    /// once in `SeedPlanner::returned`.
    gave_back: Bitfield,
}

/// Where the hand-out stands ([`SeedPlanner::spread`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spread {
    /// Offers go on as before.
    Rationing,
    /// Every piece has as many copies as offers aimed for: they now aim for one more, so a
    /// leecher with nothing left to take may have new offers.
    Raised,
    /// Every piece has [`SPREAD`] copies: the seed may advertise everything.
    Done,
}

/// Offer bookkeeping of one seeding torrent.
#[derive(Debug, Clone)]
pub struct SeedPlanner {
    blocks: Vec<u32>,
    /// Copies of each piece known in the swarm (peers' bitfields and haves).
    copies: Vec<u32>,
    /// Offers made and not yet turned into a copy.
    pending: Vec<u32>,
    /// When each piece was last offered.
    offered_at: Vec<Option<Instant>>,
    /// Connected peers that gave each piece back and may take it up again.
    returned: Vec<u32>,
    /// Copies of every piece offers aim for now: 1 until every piece has one, then
    /// [`SPREAD`].
    level: u32,
    stale_after: Duration,
    peers: HashMap<ConnId, Leecher>,
}

/// Copies of every piece the seed hands out, rationed, before it advertises everything. At
/// one (every piece out once), the pieces handed out last were each held by one leecher when
/// the seed advertised them all, and every other leecher fetched them from the seed, its
/// fastest holder: in the flash-crowd test (`tests/tests/agent_flash_crowd.rs`, 6 leechers)
/// all of the seed's upload beyond one package came after that moment, 1.10 copies in all
/// on average over 250 runs, and up to 1.29. At two, 1.03 on average and 1.13 the most
/// over 100 runs alternating with those.
pub const SPREAD: u32 = 2;

/// The shortest time an offer is left with one leecher. Long enough for a piece of up to
/// 256 KiB at the rates a crowd shares a seed's uplink at (a 32 KiB piece of B3's 64 MiB
/// package takes 0.3 s at 1 Mbit/s; larger pieces get more, see [`STALE_RATE`]), and short
/// enough that the crowd does not wait long for a slow host's last offers: only leechers with
/// nothing else to take get a stale piece, which is the end of a push. At 5 s, the six fast
/// hosts of `swarm_bench --scenario stragglers` sat idle for 3.5 s at the end waiting for
/// pieces the two slow ones held, and finished at 31.4–34.4 s (eta_last 0.78–0.86); at 1 s,
/// 29.2–30.1 s (0.89–0.92), with the seed's upload the same (A 1.10–1.13 against 1.05–1.15)
/// and B1 unchanged (29.2–30.0 s against 29.3–29.5 s). In crowds of 36 and 48 hosts whose
/// bound is the seed's uplink the re-offers are 5–9% of the package (32 flows of ~78 KB/s: a
/// piece takes 1–3 s to become a copy). A threshold of 1.5 times the 90th percentile of
/// those times cut them to almost none and left the seed's uplink idle at the end of its
/// first pass instead: no host came sooner (`benches/FINDINGS.md`, "Where the origin's
/// extra copies come from at 48 hosts").
const MIN_STALE: Duration = Duration::from_secs(1);
/// Larger pieces are given the time they take at this rate (2 Mbit/s) before they count as
/// stale: 64 s for 16 MiB.
const STALE_RATE: u64 = 256 << 10;

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
            offered_at: vec![None; n],
            returned: vec![0; n],
            level: 1,
            stale_after: MIN_STALE.max(Duration::from_secs(piece_length / STALE_RATE)),
            peers: HashMap::new(),
        }
    }

    /// How long an offer stays its leecher's alone: after that, if no peer holds the piece
    /// yet, it may be offered to one more leecher.
    pub fn stale_after(&self) -> Duration {
        self.stale_after
    }

    fn n(&self) -> u32 {
        u32::try_from(self.blocks.len()).unwrap_or(u32::MAX)
    }

    /// A peer connected, holding `has`.
    pub fn add_peer(&mut self, conn: ConnId, has: &Bitfield) {
        for i in has.ones() {
            self.copies[i as usize] += 1;
        }
        self.peers.insert(
            conn,
            Leecher {
                has: has.clone(),
                advertised: Bitfield::new(self.n()),
                open: HashMap::new(),
                pending: Bitfield::new(self.n()),
                gave_back: Bitfield::new(self.n()),
            },
        );
    }

    /// A peer left: its copies and outstanding offers no longer count.
    pub fn remove_peer(&mut self, conn: ConnId) {
        if let Some(p) = self.peers.remove(&conn) {
            for i in p.has.ones() {
                self.copies[i as usize] = self.copies[i as usize].saturating_sub(1);
            }
            for i in p.pending.ones() {
                self.pending[i as usize] = self.pending[i as usize].saturating_sub(1);
            }
            for i in p.gave_back.ones() {
                self.returned[i as usize] = self.returned[i as usize].saturating_sub(1);
            }
        }
    }

    /// `conn` was choked: its offers that it has not requested a block of go back to the
    /// pool (the ones it started stay its own: taking them back would upload their first
    /// blocks twice). Returns whether any piece was released.
    pub fn release(&mut self, conn: ConnId) -> bool {
        let Some(p) = self.peers.get_mut(&conn) else {
            return false;
        };
        let unstarted: Vec<u32> = p
            .open
            .iter()
            .filter(|&(_, &requested)| requested == 0)
            .map(|(&i, _)| i)
            .collect();
        for &i in &unstarted {
            p.open.remove(&i);
            if p.pending.clear(i) {
                self.pending[i as usize] = self.pending[i as usize].saturating_sub(1);
            }
            if p.gave_back.set(i) {
                self.returned[i as usize] += 1;
            }
        }
        !unstarted.is_empty()
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
        if p.pending.clear(i) {
            self.pending[i as usize] = self.pending[i as usize].saturating_sub(1);
        }
        if p.gave_back.clear(i) {
            self.returned[i as usize] = self.returned[i as usize].saturating_sub(1);
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
        if !p.has.get(i) && !p.open.contains_key(&i) && p.pending.set(i) {
            // An offer given back (choke) and taken up again: it is this peer's once more.
            self.pending[i as usize] += 1;
            p.open.insert(i, 0);
        }
        if p.gave_back.clear(i) {
            self.returned[i as usize] = self.returned[i as usize].saturating_sub(1);
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
    /// fully requested yet: pieces no peer holds and none has been offered, in `order`; when
    /// those run short, pieces no peer holds whose last offer is [stale](Self::stale_after)
    /// at `now`, oldest first. Empty when there are none (the peer trades with the others
    /// until some come back).
    pub fn offers(
        &mut self,
        conn: ConnId,
        keep_open: usize,
        now: Instant,
        order: Order,
    ) -> Vec<u32> {
        let Some(p) = self.peers.get(&conn) else {
            return Vec::new();
        };
        let room = keep_open.saturating_sub(p.open.len());
        if room == 0 {
            return Vec::new();
        }
        // Pieces offered before and given back stay advertised to this peer: it may ask for
        // them again, so they are offered to it again too. A piece on its way to someone
        // (pending) is not offered again until that offer goes stale (below). Once every
        // piece is out, any piece this peer lacks may go to it, the fewest copies first: a
        // seed left with only second copies on their way would otherwise idle while the
        // crowd still downloads, and its uplink is part of what the crowd has.
        let free: Vec<u32> = (0..self.n())
            .filter(|&i| {
                (self.copies[i as usize] < self.level || self.level >= SPREAD)
                    && self.pending[i as usize] == 0
                    && !p.has.get(i)
                    && !p.open.contains_key(&i)
            })
            .collect();
        // The fewest copies first (a first copy of a piece before a second of any), each group
        // in index order (`free`'s): one pass per copy count, from the lowest, until there is
        // no room left. This runs for every request a seed answers, and once every piece is
        // out `free` is every piece the peer lacks; sorting it each time did not need to.
        let count = |i: &u32| self.copies[*i as usize];
        let mut least = free.iter().map(count).min();
        let mut out = Vec::with_capacity(room.min(free.len()));
        while let Some(c) = least {
            let group = free.iter().copied().filter(|i| count(i) == c);
            match order {
                // Pieces this peer gave back come first, and those another peer gave back (and
                // may take up again) last (see `Order::Sequential`).
                Order::Sequential => {
                    let rank = |i: u32| match (p.gave_back.get(i), self.returned[i as usize]) {
                        (true, _) => 0,
                        (false, 0) => 1,
                        (false, _) => 2,
                    };
                    // One pass per rank, each stopping once there is no room left.
                    for r in 0..3 {
                        let left = room - out.len();
                        out.extend(group.clone().filter(|&i| rank(i) == r).take(left));
                    }
                }
                Order::Random => {
                    let mut group: Vec<u32> = group.collect();
                    let mut rng = rand::rng();
                    while out.len() < room && !group.is_empty() {
                        let i = group.swap_remove(rng.random_range(0..group.len()));
                        out.push(i);
                    }
                }
            }
            if out.len() == room {
                break;
            }
            least = free.iter().map(count).filter(|&k| k > c).min();
        }
        if out.len() < room {
            let mut stale: Vec<(Instant, u32)> = (0..self.n())
                .filter(|&i| {
                    // Offered to another leecher and not held by any: a piece given back
                    // (pending 0) is among the free ones already.
                    self.copies[i as usize] == 0
                        && self.pending[i as usize] > 0
                        && !p.has.get(i)
                        && !p.pending.get(i)
                })
                .filter_map(|i| {
                    let at = self.offered_at[i as usize]?;
                    (now.saturating_duration_since(at) >= self.stale_after).then_some((at, i))
                })
                .collect();
            stale.sort_unstable();
            out.extend(stale.iter().map(|&(_, i)| i).take(room - out.len()));
        }
        if let Some(p) = self.peers.get_mut(&conn) {
            for &i in &out {
                self.offered_at[i as usize] = Some(now);
                self.pending[i as usize] += 1;
                p.pending.set(i);
                p.advertised.set(i);
                p.open.insert(i, 0);
            }
        }
        out
    }

    /// Every piece has had a copy among the connected peers: what the seed hands out now are
    /// second copies, which an origin over its `--origin-budget` leaves to the crowd.
    pub fn first_pass_done(&self) -> bool {
        self.level > 1
    }

    /// Where the hand-out stands, after copies grew. Once every piece has one copy among the
    /// connected peers, offers aim for a second copy of the pieces that have one (a first copy
    /// of a piece that lost its holder still comes first); once every piece has [`SPREAD`],
    /// the seed may stop rationing.
    pub fn spread(&mut self) -> Spread {
        let least = self.copies.iter().copied().min().unwrap_or(SPREAD);
        if least >= SPREAD {
            return Spread::Done;
        }
        if least >= self.level {
            self.level = least + 1;
            return Spread::Raised;
        }
        Spread::Rationing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PL: u64 = 4 * BLOCK_SIZE as u64;

    fn request_all(s: &mut SeedPlanner, c: ConnId, i: u32) {
        for _ in 0..4 {
            assert!(s.requested(c, i));
        }
    }

    /// A planner for `n` pieces with leechers 1 to `leechers`, holding nothing.
    fn with_leechers(n: u32, leechers: ConnId) -> SeedPlanner {
        let mut s = SeedPlanner::new(PL * u64::from(n), PL);
        for c in 1..=leechers {
            s.add_peer(c, &Bitfield::new(n));
        }
        s
    }

    /// A lone seed hands pieces out from the front, each once.
    #[test]
    fn a_lone_seed_hands_out_pieces_in_order() {
        let t0 = Instant::now();
        let mut s = with_leechers(16, 3);
        assert_eq!(s.offers(1, 2, t0, Order::Sequential), [0, 1]);
        request_all(&mut s, 1, 0);
        assert_eq!(s.offers(2, 3, t0, Order::Sequential), [2, 3, 4]);
        assert_eq!(
            s.offers(1, 2, t0, Order::Sequential),
            [5],
            "0 is requested, 1 not"
        );
        // A piece some peer already holds (leecher 3 got piece 6 from elsewhere) is skipped.
        s.peer_has(3, 6);
        assert_eq!(s.offers(3, 2, t0, Order::Sequential), [7, 8]);
    }

    /// Pieces a choked peer gave back wait for it while it is connected: it still has them
    /// advertised and asks for them once unchoked, so offering them to another at once would
    /// have the seed upload them twice. They go to others when nothing else is left, or once
    /// it has left.
    #[test]
    fn pieces_given_back_wait_for_the_peer_that_gave_them_back() {
        let t0 = Instant::now();
        let mut s = with_leechers(8, 3);
        assert_eq!(s.offers(1, 3, t0, Order::Sequential), [0, 1, 2]);
        assert!(s.release(1), "leecher 1 was choked");
        assert_eq!(s.offers(2, 2, t0, Order::Sequential), [3, 4], "not 0 and 1");
        // Unchoked again, leecher 1 gets its own back first.
        assert_eq!(s.offers(1, 2, t0, Order::Sequential), [0, 1]);
        // Leecher 1 takes up piece 2 again by asking for it, without an offer.
        assert!(s.requested(1, 2));
        assert_eq!(s.offers(3, 2, t0, Order::Sequential), [5, 6]);
        // Choked once more: only the last piece that nobody else was offered is left for
        // others, then what leecher 1 gave back.
        assert!(s.release(1));
        assert_eq!(s.offers(3, 4, t0, Order::Sequential), [7, 0]);
        // Leecher 1 leaves: what it gave back is anybody's.
        s.remove_peer(1);
        assert_eq!(s.offers(2, 3, t0, Order::Sequential), [1]);
        assert_eq!(
            s.offers(3, 8, t0, Order::Sequential),
            [2],
            "the piece it had taken up when it left"
        );
    }

    /// With another seed about, offers are drawn at random: two seeds handing out the front
    /// of the package together would upload the same pieces.
    #[test]
    fn offers_with_another_seed_about_are_not_in_order() {
        let t0 = Instant::now();
        let n = 1024u32;
        let mut s = SeedPlanner::new(PL * u64::from(n), PL);
        s.add_peer(1, &Bitfield::new(n));
        let offers = s.offers(1, 8, t0, Order::Random);
        assert_eq!(offers.len(), 8);
        // 8 random picks of 1,024 come out as 0..8 once in about 10^24 runs.
        assert_ne!(offers, (0..8).collect::<Vec<u32>>());
    }

    #[test]
    fn leechers_get_disjoint_pieces_and_none_twice() {
        let t0 = Instant::now();
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
                for i in s.offers(c, 2, t0, Order::Random) {
                    assert!(seen.set(i), "piece {i} offered twice");
                    request_all(&mut s, c, i);
                    if c == 1 {
                        offered_to_1.push(i);
                    }
                }
            }
        }
        assert!(seen.is_complete());
        // Every piece is on its way to someone: nothing is offered again, even a piece that
        // three leechers already hold.
        let spread = offered_to_1[0];
        for c in 1..4 {
            s.peer_has(c, spread);
        }
        assert!(s.offers(0, 8, t0, Order::Random).is_empty());
        // A leecher that leaves gives back what it did not receive; those go out once more.
        s.remove_peer(1);
        let again = s.offers(0, 8, t0, Order::Random);
        let expected: Vec<u32> = offered_to_1
            .iter()
            .copied()
            .filter(|&i| i != spread)
            .collect();
        assert_eq!(again.len(), expected.len());
        assert!(again.iter().all(|i| expected.contains(i)), "{again:?}");
        assert!(
            s.offers(2, 8, t0, Order::Random).is_empty(),
            "each given-back piece went out once"
        );
    }

    #[test]
    fn a_choked_leecher_gives_back_only_what_it_has_not_started() {
        let t0 = Instant::now();
        let mut s = SeedPlanner::new(PL * 4, PL);
        s.add_peer(1, &Bitfield::new(4));
        s.add_peer(2, &Bitfield::new(4));
        let first = s.offers(1, 4, t0, Order::Random);
        assert_eq!(first.len(), 4);
        assert!(s.requested(1, first[0]), "one block of one piece");
        assert!(
            s.offers(2, 4, t0, Order::Random).is_empty(),
            "all four are leecher 1's"
        );
        assert!(s.release(1));
        let moved = s.offers(2, 4, t0, Order::Random);
        assert_eq!(moved.len(), 3);
        assert!(
            !moved.contains(&first[0]),
            "the started piece stays with leecher 1"
        );
        assert!(!s.release(1), "nothing unstarted is left to give back");
        // Leecher 1, unchoked again, asks for a piece it was offered before: it is its own again
        // and not offered elsewhere.
        s.remove_peer(2);
        assert!(s.requested(1, moved[0]));
        s.add_peer(3, &Bitfield::new(4));
        let to_3 = s.offers(3, 4, t0, Order::Random);
        assert!(
            !to_3.contains(&moved[0]) && !to_3.contains(&first[0]),
            "{to_3:?}"
        );
        assert_eq!(to_3.len(), 2);
    }

    #[test]
    fn keeps_the_requested_number_open_and_counts_copies() {
        let t0 = Instant::now();
        let mut s = SeedPlanner::new(PL * 8, PL);
        let mut has = Bitfield::new(8);
        has.set(0);
        s.add_peer(1, &has);
        s.add_peer(2, &Bitfield::new(8));
        let first = s.offers(2, 3, t0, Order::Random);
        assert_eq!(first.len(), 3);
        assert!(!first.contains(&0), "the piece peer 1 holds is not offered");
        assert!(
            s.offers(2, 3, t0, Order::Random).is_empty(),
            "still three open"
        );
        request_all(&mut s, 2, first[0]);
        assert_eq!(
            s.offers(2, 3, t0, Order::Random).len(),
            1,
            "one fully requested, one more offered"
        );
        let unoffered = (0..8).find(|i| !s.peers[&2].advertised.get(*i)).unwrap();
        assert!(!s.requested(2, unoffered), "not advertised to this peer");
        assert_eq!(s.spread(), Spread::Rationing);
        assert!(!s.first_pass_done());
        for i in 0..8 {
            s.peer_has(2, i);
        }
        assert_eq!(s.spread(), Spread::Raised, "every piece out once");
        assert!(s.first_pass_done());
        assert_eq!(s.spread(), Spread::Rationing, "raised once");
        for i in 1..8 {
            s.peer_has(1, i);
        }
        assert_eq!(s.spread(), Spread::Done);
        s.remove_peer(2);
        assert_eq!(s.spread(), Spread::Rationing, "a holder left");
    }

    /// Once every piece is out once, the seed hands out second copies, one leecher each, a
    /// first copy of a piece whose holder left before any second, and pieces with more
    /// copies when no fewer-copied piece is free; it stops rationing only when every piece
    /// has two.
    #[test]
    fn second_copies_go_out_before_the_seed_stops_rationing() {
        let t0 = Instant::now();
        let mut s = with_leechers(4, 3);
        for (c, pieces) in [(1, [0, 1]), (2, [2, 3])] {
            assert_eq!(s.offers(c, 2, t0, Order::Sequential), pieces);
            for i in pieces {
                request_all(&mut s, c, i);
                s.peer_has(c, i);
            }
        }
        // Leecher 1 traded piece 2 from leecher 2.
        s.peer_has(1, 2);
        assert!(
            s.offers(3, 4, t0, Order::Sequential).is_empty(),
            "every piece is out; second copies wait for `spread`"
        );
        assert_eq!(s.spread(), Spread::Raised);
        // Leecher 2 leaves: piece 3 has no copy left, 2 has one again.
        s.remove_peer(2);
        assert_eq!(s.offers(3, 2, t0, Order::Sequential), [3, 0]);
        assert!(
            s.offers(1, 4, t0, Order::Sequential).is_empty(),
            "leecher 1 lacks only 3, on its way to leecher 3"
        );
        assert_eq!(s.offers(3, 4, t0, Order::Sequential), [1, 2]);
        for i in 0..4 {
            s.peer_has(3, i);
        }
        assert_eq!(s.spread(), Spread::Rationing, "piece 3 has one copy");
        assert_eq!(s.offers(1, 4, t0, Order::Sequential), [3]);
        // A newcomer gets pieces that have two copies: none with fewer is free.
        s.add_peer(4, &Bitfield::new(4));
        assert_eq!(s.offers(4, 4, t0, Order::Sequential), [0, 1, 2]);
        s.peer_has(1, 3);
        assert_eq!(s.spread(), Spread::Done);
    }

    #[test]
    fn an_offer_left_unfinished_goes_to_one_more_leecher_once_stale() {
        let t0 = Instant::now();
        let mut s = SeedPlanner::new(PL * 4, PL);
        let stale = s.stale_after();
        assert_eq!(stale, MIN_STALE);
        for c in 1..=3 {
            s.add_peer(c, &Bitfield::new(4));
        }
        // A slow leecher takes two offers and starts them; a fast one takes and finishes the
        // other two.
        let slow = s.offers(1, 2, t0, Order::Random);
        for &i in &slow {
            assert!(s.requested(1, i));
        }
        for i in s.offers(2, 2, t0, Order::Random) {
            request_all(&mut s, 2, i);
            s.peer_has(2, i);
        }
        let just_before = t0 + stale - Duration::from_millis(1);
        assert!(
            s.offers(2, 2, just_before, Order::Random).is_empty(),
            "not stale yet"
        );
        // Stale: the fast leecher gets them, oldest first; nobody gets them a third time until
        // they go stale again.
        let mut again = s.offers(2, 2, t0 + stale, Order::Random);
        again.sort_unstable();
        let mut expected = slow.clone();
        expected.sort_unstable();
        assert_eq!(again, expected);
        assert!(
            s.offers(3, 2, t0 + stale, Order::Random).is_empty(),
            "offered twice at most"
        );
        assert!(
            s.offers(1, 4, t0 + stale * 3, Order::Random).is_empty(),
            "its own offers are not offered back to it"
        );
        assert_eq!(s.offers(3, 2, t0 + stale * 2, Order::Random).len(), 2);
        // A stale offer given back (its leecher choked before starting it) is a free piece
        // again: offered once, not also as stale.
        let mut t = SeedPlanner::new(PL * 2, PL);
        t.add_peer(1, &Bitfield::new(2));
        t.add_peer(2, &Bitfield::new(2));
        assert_eq!(t.offers(1, 2, t0, Order::Random).len(), 2);
        assert!(t.release(1));
        let mut given_back = t.offers(2, 4, t0 + stale * 2, Order::Random);
        given_back.sort_unstable();
        assert_eq!(given_back, vec![0, 1]);
        assert_eq!(t.pending, vec![1, 1], "each counted once");
        // Once a copy exists, the piece is not offered again as stale, however old its offer.
        for &i in &slow {
            s.peer_has(2, i);
        }
        s.add_peer(4, &Bitfield::new(4));
        assert!(s.offers(4, 4, t0 + stale * 10, Order::Random).is_empty());
        // Second copies go only to pieces no other leecher is on its way to receiving.
        assert_eq!(s.spread(), Spread::Raised);
        let mut second = s.offers(4, 4, t0 + stale * 10, Order::Random);
        second.sort_unstable();
        let mut expected: Vec<u32> = (0..4).filter(|i| !slow.contains(i)).collect();
        expected.sort_unstable();
        assert_eq!(second, expected);
    }
}
