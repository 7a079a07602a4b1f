//! Which blocks to ask which peer for. Pure: no I/O, no clocks of its own, so every rule is
//! unit-tested. See `STATE.md` for the piece and block states.
//!
//! Rules, in order, for a peer that can take more requests:
//! 1. finish pieces already in progress (fewer partial pieces: a piece can only be shared once
//!    it is whole and verified);
//! 2. while at least [`Picker::IN_ORDER_LAG`] of the package is verified past the run of
//!    pieces verified in a row from the start, start the first missing pieces in order:
//!    those in the [`Picker::IN_ORDER_SHARE`] of the package that follows the run, held by
//!    at least [`Picker::IN_ORDER_HOLDERS`] connected peers. The archive's SHA-256 is taken over
//!    the pieces verified in a row while the rest downloads (`hashing::ArchivePrefix`), and
//!    what it has not reached when the last piece comes is read back and hashed before the
//!    package can launch. Rarest first alone leaves the most widely held pieces for last,
//!    early ones among them, and the hash stopped at the first of those: 12–27% of the
//!    archive hashed at the last piece in `b3` and `b5`, 77–88% with this. A piece that no
//!    other connected peer holds still goes first: taken in order before those, the pieces a
//!    super-seed had just handed to one host stayed rare, every other host then fetched them
//!    from the seed, and in `agent_flash_crowd` the seed uploaded more than 1.25 copies in 6
//!    of 383 runs (0 of 215 before this rule, 1 of 260 with lone pieces first);
//! 3. start the rarest piece this peer has (availability counted over connected peers), ties
//!    broken at random — never in order, so a flash crowd spreads over the package: a piece
//!    only one peer holds (at first, every piece of a seed that hands out everything) is
//!    never taken in order by rule 2;
//! 4. endgame: when every missing piece is in progress and at most [`Picker::ENDGAME_BLOCKS`]
//!    blocks are still to come, ask for blocks already requested from someone else (at most
//!    [`Picker::MAX_DUPLICATES`] copies, oldest requests first), so a slow peer cannot hold up
//!    the last piece. The duplicates are cancelled when the block arrives. A connection keeps
//!    at most [`Picker::ENDGAME_DEPTH`] requests in flight with them, and asks again only once
//!    half have come back: every missing block is already on its way, so a full queue of
//!    duplicates mostly races copies that were about to arrive, and each copy that loses is a
//!    block sent, received and dropped.

use fbpkg_common::bitfield::Bitfield;
use fbpkg_common::metainfo::BLOCK_SIZE;
use fbpkg_common::wire::BlockRef;
use rand::RngExt;
use tokio::time::Instant;

/// Identifies one peer connection within a torrent.
pub type ConnId = u64;

#[derive(Debug, Clone, PartialEq)]
enum Block {
    Free,
    Requested {
        by: Requesters,
        at: Instant,
    },
    /// Claimed by the connection whose copy arrived first, being written to storage.
    Writing,
    Received,
}

/// The connections a block is requested from, in the order they asked: one, or up to
/// [`Picker::MAX_DUPLICATES`] in endgame. Inline: a block is requested far more often than it
/// is duplicated, and a `Vec` each was an allocation per request and a pointer to chase on
/// every scan of the blocks.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Requesters {
    ids: [ConnId; Picker::MAX_DUPLICATES],
    n: u8,
}

impl Requesters {
    fn one(conn: ConnId) -> Self {
        let mut ids = [0; Picker::MAX_DUPLICATES];
        ids[0] = conn;
        Self { ids, n: 1 }
    }

    fn as_slice(&self) -> &[ConnId] {
        &self.ids[..usize::from(self.n)]
    }

    fn len(&self) -> usize {
        usize::from(self.n)
    }

    fn is_empty(&self) -> bool {
        self.n == 0
    }

    fn contains(&self, conn: ConnId) -> bool {
        self.as_slice().contains(&conn)
    }

    /// Add `conn`; false when the block already has as many requesters as it may.
    fn add(&mut self, conn: ConnId) -> bool {
        let Some(slot) = self.ids.get_mut(usize::from(self.n)) else {
            return false;
        };
        *slot = conn;
        self.n += 1;
        true
    }

    /// Take `conn` out, keeping the others' order.
    fn remove(&mut self, conn: ConnId) {
        let n = usize::from(self.n);
        if let Some(k) = self.ids[..n].iter().position(|&c| c == conn) {
            self.ids.copy_within(k + 1..n, k);
            // Unused slots stay 0, so equal sets compare equal.
            self.ids[n - 1] = 0;
            self.n -= 1;
        }
    }
}

#[derive(Debug, Clone)]
struct Partial {
    blocks: Vec<Block>,
    /// Blocks in `Block::Free`: a piece with none is passed over without a look at its blocks.
    free: u32,
    received: u32,
    /// Who sent which block, for blame when the piece fails verification.
    sources: Vec<ConnId>,
}

/// What a received block meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arrival {
    /// Claimed: write it, then call [`Picker::stored`]. `cancel` lists other peers the same
    /// block was requested from (endgame) whose requests should now be cancelled.
    Accepted {
        /// Connections to send a `cancel` for this block.
        cancel: Vec<ConnId>,
    },
    /// Not requested, already received, or malformed: drop it.
    Unexpected,
}

/// Block-level download state of one torrent.
#[derive(Debug, Clone)]
pub struct Picker {
    piece_length: u64,
    length: u64,
    have: Bitfield,
    verifying: Bitfield,
    /// Pieces with a `Partial` (in progress or verifying).
    started: Bitfield,
    /// Pieces not to start: verified or started. Kept so that finding a piece to start, and
    /// telling whether any is left, take a pass over bytes, not a lookup per piece.
    busy: Bitfield,
    /// Started pieces with a free block (`Partial::free` above 0): a pick looks only at these
    /// among the pieces in progress. Reading each started piece's count instead cost a cache
    /// miss per piece on every pick, a tenth of the agents' CPU in B5 (perf).
    open: Bitfield,
    availability: Vec<u32>,
    /// Indexed by piece; `Some` exactly where `started` is set.
    partial: Vec<Option<Box<Partial>>>,
    /// The first piece not verified (`have.len()` once all are): where rule 2's window starts.
    front: u32,
}

impl Picker {
    /// Most copies of one block requested at once in endgame.
    pub const MAX_DUPLICATES: usize = 2;

    /// Most requests a connection keeps in flight in endgame, duplicates included; it asks for
    /// more once it has half or fewer. 16 blocks (256 KiB) keep a fast peer busy for a round
    /// trip of tens of milliseconds. When each connection filled its whole queue (up to 2 s of
    /// its rate) with duplicates, B5's leechers dropped 5.8–8.8% of the block bytes they
    /// received as duplicates (`wasted` in the completion log), and 4.4–4.9% with this; B1's
    /// seed sent 1.04–1.07 copies, and 1.02–1.03 with this (`swarm_bench --scenario b1,b5`).
    pub const ENDGAME_DEPTH: usize = 16;

    /// Endgame duplicates wait until at most this many blocks (512 KiB) are still to come.
    /// They used to start as soon as every missing piece was in progress: with 48 peers each
    /// holding a few requests, that is megabytes still on their way, and nearly all of it was
    /// asked for twice. In `b3` the leechers dropped 4.9–5.0% of the block bytes they received
    /// (`wasted`), a cancel reaching a copy that was already sent; with this, 0.6%
    /// (`swarm_bench --scenario b3,b5,b1,stragglers`, see the README).
    pub const ENDGAME_BLOCKS: usize = 32;

    /// Rule 2 starts pieces in order within this fraction of the package (one over it) from
    /// the first piece not yet verified. Alternating runs of builds without the two-holder
    /// rule (`swarm_bench --scenario b5`, then `b3`): the next 128 of 2,048 pieces had 47% of
    /// the archive hashed at the last piece in `b5`; 512, 86–87%, and the check after it took
    /// 0.3 s median against 1.8 s; all 2,048 (every piece in order), as much in `b5` but
    /// 41.2 and 42.2 s in `b3` against 39.3 and 39.7 s, where hosts trade more when each
    /// holds different pieces.
    pub const IN_ORDER_SHARE: u32 = 4;

    /// Rule 2 applies only while at least this fraction of the package (one over it) is
    /// verified beyond the run from the start: what the archive's hash would have left to
    /// read after the last piece. Where pieces come in order anyway (a lone origin setting
    /// the pace, `b4` at a quarter of the rates), taking them in order among the leechers
    /// cost time: never-killed hosts in 66.6 and 67.9 s against 63.7 and 65.0 s, joiners
    /// 3 s slower.
    pub const IN_ORDER_LAG: u32 = 16;

    /// Rule 2 takes a piece in order only when at least this many connected peers hold it:
    /// a piece that one peer alone has is the rarest kind, and every host asking that peer
    /// for the same first pieces is what rarest first is for.
    pub const IN_ORDER_HOLDERS: u32 = 2;

    /// A picker for a package of `length` bytes in `piece_length` pieces, starting from `have`.
    pub fn new(length: u64, piece_length: u64, have: Bitfield) -> Self {
        let n = have.len() as usize;
        let mut p = Self {
            piece_length,
            length,
            verifying: Bitfield::new(have.len()),
            started: Bitfield::new(have.len()),
            open: Bitfield::new(have.len()),
            busy: have.clone(),
            have,
            availability: vec![0; n],
            partial: (0..n).map(|_| None).collect(),
            front: 0,
        };
        p.advance_front();
        p
    }

    /// Verified pieces.
    pub fn have(&self) -> &Bitfield {
        &self.have
    }

    /// Every piece verified.
    pub fn is_complete(&self) -> bool {
        self.have.is_complete()
    }

    /// Bytes in verified pieces.
    pub fn bytes_have(&self) -> u64 {
        self.have
            .ones()
            .map(|i| u64::from(self.piece_size(i)))
            .sum()
    }

    /// Length of piece `i`.
    pub fn piece_size(&self, i: u32) -> u32 {
        let start = u64::from(i) * self.piece_length;
        u32::try_from(self.length.saturating_sub(start).min(self.piece_length)).unwrap_or(0)
    }

    fn blocks_in(&self, i: u32) -> u32 {
        self.piece_size(i).div_ceil(BLOCK_SIZE)
    }

    fn block_ref(&self, index: u32, b: u32) -> BlockRef {
        let begin = b * BLOCK_SIZE;
        BlockRef {
            index,
            begin,
            length: (self.piece_size(index) - begin).min(BLOCK_SIZE),
        }
    }

    /// A peer joined with `bits`.
    pub fn add_availability(&mut self, bits: &Bitfield) {
        for i in bits.ones() {
            self.availability[i as usize] += 1;
        }
    }

    /// A peer left, or its bitfield is being replaced.
    pub fn remove_availability(&mut self, bits: &Bitfield) {
        for i in bits.ones() {
            let a = &mut self.availability[i as usize];
            *a = a.saturating_sub(1);
        }
    }

    /// A peer announced piece `i`.
    pub fn add_one(&mut self, i: u32) {
        if let Some(a) = self.availability.get_mut(i as usize) {
            *a += 1;
        }
    }

    /// How many connected peers have piece `i`.
    pub fn availability(&self, i: u32) -> u32 {
        self.availability.get(i as usize).copied().unwrap_or(0)
    }

    fn partial(&self, i: u32) -> Option<&Partial> {
        self.partial.get(i as usize)?.as_deref()
    }

    fn partial_mut(&mut self, i: u32) -> Option<&mut Partial> {
        self.partial.get_mut(i as usize)?.as_deref_mut()
    }

    fn remove_partial(&mut self, i: u32) -> Option<Partial> {
        self.started.clear(i);
        self.open.clear(i);
        self.partial.get_mut(i as usize)?.take().map(|p| *p)
    }

    /// Does `peer_has` hold any piece we still need?
    pub fn interesting(&self, peer_has: &Bitfield) -> bool {
        peer_has.has_any_not_in(&self.have)
    }

    /// Up to `max` new requests for connection `conn`, whose pieces are `peer_has` and which
    /// has `in_flight` requests outstanding.
    pub fn pick(
        &mut self,
        conn: ConnId,
        peer_has: &Bitfield,
        (max, in_flight): (usize, usize),
        now: Instant,
    ) -> Vec<BlockRef> {
        let mut out = Vec::new();
        if max == 0 {
            return out;
        }
        // 1. Free blocks of pieces in progress that this peer has.
        let in_progress: Vec<u32> = self.open.intersection(peer_has).collect();
        for i in in_progress {
            self.take_free(conn, i, max, now, &mut out);
            if out.len() >= max {
                return out;
            }
        }
        // 2. The first missing pieces, in order, where more than one peer holds them, while
        // the hash lags; a piece this peer alone holds before them.
        let n = self.have.len();
        let window = (n / Self::IN_ORDER_SHARE).max(1);
        let lagging = self.have.count() - self.front >= n / Self::IN_ORDER_LAG;
        let end = if lagging {
            self.front.saturating_add(window).min(n)
        } else {
            self.front
        };
        // 3. Else the rarest, random among equals. Starting an in-order piece changes no
        // availability, so the rarest found stays the rarest until it is started itself: one
        // scan of the peer's pieces per piece taken from it, not per piece taken in order.
        let mut from = self.front;
        let mut rarest = None;
        while out.len() < max {
            if rarest.is_none_or(|r| self.busy.get(r)) {
                rarest = self.rarest(peer_has);
            }
            let lone = rarest.filter(|&i| self.availability(i) < Self::IN_ORDER_HOLDERS);
            let in_order = match lone {
                Some(_) => None,
                None => self.next_in_order(peer_has, from, end),
            };
            let Some(i) = lone.or(in_order).or(rarest) else {
                break;
            };
            if in_order.is_some() {
                from = i + 1;
            }
            self.start(i);
            self.take_free(conn, i, max, now, &mut out);
        }
        // 4. Endgame: nothing left to start anywhere.
        let queued = in_flight + out.len();
        if out.len() < max
            && queued <= Self::ENDGAME_DEPTH / 2
            && self.endgame()
            && self.to_come_at_most(Self::ENDGAME_BLOCKS)
        {
            let upto = max.min(out.len() + Self::ENDGAME_DEPTH - queued);
            self.take_duplicates(conn, peer_has, upto, &mut out);
        }
        out
    }

    /// Start piece `i`: all its blocks free.
    fn start(&mut self, i: u32) {
        let blocks = vec![Block::Free; self.blocks_in(i) as usize];
        self.partial[i as usize] = Some(Box::new(Partial {
            free: blocks.len() as u32,
            blocks,
            received: 0,
            sources: Vec::new(),
        }));
        self.started.set(i);
        self.open.set(i);
        self.busy.set(i);
    }

    /// Move `front` past the pieces verified in a row.
    fn advance_front(&mut self) {
        while self.front < self.have.len() && self.have.get(self.front) {
            self.front += 1;
        }
    }

    fn take_free(
        &mut self,
        conn: ConnId,
        i: u32,
        max: usize,
        now: Instant,
        out: &mut Vec<BlockRef>,
    ) {
        let size = self.piece_size(i);
        let Some(p) = self
            .partial
            .get_mut(i as usize)
            .and_then(|p| p.as_deref_mut())
        else {
            return;
        };
        if p.free == 0 {
            self.open.clear(i);
            return;
        }
        for (b, block) in p.blocks.iter_mut().enumerate() {
            if out.len() >= max || p.free == 0 {
                break;
            }
            if *block == Block::Free {
                p.free -= 1;
                *block = Block::Requested {
                    by: Requesters::one(conn),
                    at: now,
                };
                let begin = b as u32 * BLOCK_SIZE;
                out.push(BlockRef {
                    index: i,
                    begin,
                    length: (size - begin).min(BLOCK_SIZE),
                });
            }
        }
        if p.free == 0 {
            self.open.clear(i);
        }
    }

    /// Rule 2's next piece: the first in `from..end` that this peer has, not started nor
    /// verified, held by at least [`Self::IN_ORDER_HOLDERS`] peers. A byte at a time, as
    /// [`rarest`](Self::rarest) looks.
    fn next_in_order(&self, peer_has: &Bitfield, from: u32, end: u32) -> Option<u32> {
        peer_has
            .difference(&self.busy)
            .skip_while(|&i| i < from)
            .take_while(|&i| i < end)
            .find(|&i| self.availability(i) >= Self::IN_ORDER_HOLDERS)
    }

    fn rarest(&self, peer_has: &Bitfield) -> Option<u32> {
        let mut rng = rand::rng();
        let mut best: Option<(u32, u32)> = None; // (availability, piece)
        let mut ties = 0u32;
        for i in peer_has.difference(&self.busy) {
            let a = self.availability(i);
            match best {
                Some((ba, _)) if a > ba => {}
                Some((ba, _)) if a == ba => {
                    ties += 1;
                    if rng.random_range(0..ties) == 0 {
                        best = Some((a, i));
                    }
                }
                _ => {
                    best = Some((a, i));
                    ties = 1;
                }
            }
        }
        best.map(|(_, i)| i)
    }

    /// Every missing piece is in progress or being verified.
    pub fn endgame(&self) -> bool {
        self.busy.is_complete()
    }

    /// At most `n` blocks are requested and still to come.
    fn to_come_at_most(&self, n: usize) -> bool {
        let mut left = n;
        for i in self.started.ones() {
            let Some(p) = self.partial(i) else { continue };
            let requested = p
                .blocks
                .iter()
                .filter(|b| matches!(b, Block::Requested { .. }))
                .count();
            match left.checked_sub(requested) {
                Some(l) => left = l,
                None => return false,
            }
        }
        true
    }

    fn take_duplicates(
        &mut self,
        conn: ConnId,
        peer_has: &Bitfield,
        max: usize,
        out: &mut Vec<BlockRef>,
    ) {
        // Oldest requests first: they are the ones most likely stuck behind a slow peer.
        let mut candidates: Vec<(Instant, u32, u32)> = Vec::new();
        for i in self.started.intersection(peer_has) {
            let Some(p) = self.partial(i) else { continue };
            for (b, block) in p.blocks.iter().enumerate() {
                if let Block::Requested { by, at } = block
                    && by.len() < Self::MAX_DUPLICATES
                    && !by.contains(conn)
                {
                    candidates.push((*at, i, b as u32));
                }
            }
        }
        let take = max - out.len();
        if candidates.len() > take {
            candidates.select_nth_unstable(take);
            candidates.truncate(take);
        }
        candidates.sort_unstable();
        for (_, i, b) in candidates {
            if let Some(Block::Requested { by, .. }) =
                self.partial_mut(i).map(|p| &mut p.blocks[b as usize])
                && by.add(conn)
            {
                out.push(self.block_ref(i, b));
            }
        }
    }

    /// A block arrived from `conn`: claim it for writing. Only the first copy is claimed; the
    /// claim must be followed by [`Picker::stored`] once the bytes are on disk.
    pub fn claim(&mut self, conn: ConnId, block: &BlockRef) -> Arrival {
        if !block.begin.is_multiple_of(BLOCK_SIZE) {
            return Arrival::Unexpected;
        }
        let b = (block.begin / BLOCK_SIZE) as usize;
        let expected = self.block_ref(block.index, b as u32);
        let Some(p) = self.partial_mut(block.index) else {
            return Arrival::Unexpected;
        };
        if expected.length != block.length || b >= p.blocks.len() {
            return Arrival::Unexpected;
        }
        let cancel = match &p.blocks[b] {
            Block::Requested { by, .. } if by.contains(conn) => by
                .as_slice()
                .iter()
                .copied()
                .filter(|&c| c != conn)
                .collect(),
            _ => return Arrival::Unexpected,
        };
        p.blocks[b] = Block::Writing;
        if !p.sources.contains(&conn) {
            p.sources.push(conn);
        }
        Arrival::Accepted { cancel }
    }

    /// A claimed block is on disk. Returns true when it was the piece's last one: the piece is
    /// now verifying. A piece is never verified while one of its blocks is still being
    /// written, whichever connection wrote last.
    pub fn stored(&mut self, block: &BlockRef) -> bool {
        let b = (block.begin / BLOCK_SIZE) as usize;
        let Some(p) = self.partial_mut(block.index) else {
            return false;
        };
        if p.blocks.get(b) != Some(&Block::Writing) {
            return false;
        }
        p.blocks[b] = Block::Received;
        p.received += 1;
        let complete = p.received as usize == p.blocks.len();
        if complete {
            self.verifying.set(block.index);
        }
        complete
    }

    /// Forget `conn`'s outstanding request for `block` (rejected, timed out, or cancelled).
    pub fn release_block(&mut self, conn: ConnId, block: &BlockRef) {
        let b = (block.begin / BLOCK_SIZE) as usize;
        if let Some(p) = self.partial_mut(block.index)
            && let Some(slot) = p.blocks.get_mut(b)
            && let Block::Requested { by, .. } = slot
        {
            by.remove(conn);
            if by.is_empty() {
                *slot = Block::Free;
                p.free += 1;
                self.open.set(block.index);
            }
        }
    }

    /// `conn` disconnected: its outstanding requests become free again.
    pub fn release_conn(&mut self, conn: ConnId) {
        for (i, p) in self.partial.iter_mut().enumerate() {
            let Some(p) = p.as_deref_mut() else { continue };
            for slot in &mut p.blocks {
                if let Block::Requested { by, .. } = slot {
                    by.remove(conn);
                    if by.is_empty() {
                        *slot = Block::Free;
                        p.free += 1;
                    }
                }
            }
            if p.free > 0 {
                self.open.set(i as u32);
            }
        }
    }

    /// Verification of piece `i` finished. On failure the piece starts over; returns the
    /// connections that sent its blocks.
    pub fn verified(&mut self, i: u32, ok: bool) -> Vec<ConnId> {
        self.verifying.clear(i);
        let sources = self
            .remove_partial(i)
            .map(|p| p.sources)
            .unwrap_or_default();
        if ok {
            self.have.set(i);
            self.advance_front();
        } else {
            self.busy.clear(i);
        }
        sources
    }

    /// Mark a piece verified without downloading it (resume found it intact on disk).
    pub fn mark_have(&mut self, i: u32) {
        self.remove_partial(i);
        self.have.set(i);
        self.busy.set(i);
        self.advance_front();
    }

    /// Requests of `conn` older than `cutoff`: to be cancelled and released.
    pub fn stale_requests(&self, conn: ConnId, cutoff: Instant) -> Vec<BlockRef> {
        let mut out = Vec::new();
        for i in self.started.ones() {
            let Some(p) = self.partial(i) else { continue };
            for (b, block) in p.blocks.iter().enumerate() {
                if let Block::Requested { by, at } = block
                    && *at < cutoff
                    && by.contains(conn)
                {
                    out.push(self.block_ref(i, b as u32));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const PL: u64 = 4 * BLOCK_SIZE as u64;

    fn full(n: u32) -> Bitfield {
        Bitfield::full(n)
    }

    #[test]
    fn finishes_started_pieces_before_starting_new_ones() {
        let mut p = Picker::new(PL * 10, PL, Bitfield::new(10));
        let now = Instant::now();
        let a = p.pick(1, &full(10), (2, 0), now);
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].index, a[1].index);
        let b = p.pick(2, &full(10), (2, 0), now);
        assert_eq!(
            b[0].index, a[0].index,
            "second peer continues the same piece"
        );
        assert_eq!(
            b.iter().map(|r| r.begin).collect::<Vec<_>>(),
            vec![2 * BLOCK_SIZE, 3 * BLOCK_SIZE]
        );
    }

    #[test]
    fn picks_rarest_first_and_not_in_order() {
        let n = 64;
        let mut firsts = HashSet::new();
        for _ in 0..50 {
            let mut p = Picker::new(PL * n as u64, PL, Bitfield::new(n));
            p.add_availability(&full(n));
            p.add_availability(&full(n));
            // Every piece but 40 has a third holder: 40 is the rarest.
            let mut common = full(n);
            common.clear(40);
            p.add_availability(&common);
            let picked = p.pick(1, &full(n), (4, 0), Instant::now());
            assert_eq!(picked[0].index, 40, "rarest first");
            let mut p = Picker::new(PL * n as u64, PL, Bitfield::new(n));
            p.add_availability(&full(n));
            firsts.insert(p.pick(1, &full(n), (1, 0), Instant::now())[0].index);
        }
        assert!(
            firsts.len() > 10,
            "ties are broken at random, not in order: {firsts:?}"
        );
    }

    /// While a sixteenth of the package is verified beyond the run from the start, pieces more
    /// than one peer holds start in order from the first one not verified, within a quarter
    /// of the package; otherwise, beyond it, and where one peer alone holds them, the rarest
    /// first.
    #[test]
    fn starts_the_first_missing_pieces_in_order_where_shared_while_the_hash_lags() {
        let n = 64;
        let window = n / Picker::IN_ORDER_SHARE;
        let lag = n / Picker::IN_ORDER_LAG;
        let now = Instant::now();
        let with = |pieces: &mut dyn Iterator<Item = u32>| {
            let mut have = Bitfield::new(n);
            pieces.for_each(|i| _ = have.set(i));
            let mut p = Picker::new(PL * u64::from(n), PL, have);
            p.add_availability(&full(n));
            p.add_availability(&full(n));
            p
        };
        // Nothing verified beyond the run: rarest first, at random among equals.
        let firsts: HashSet<u32> = (0..20)
            .map(|_| with(&mut (0..0)).pick(1, &full(n), (4, 0), now)[0].index)
            .collect();
        assert!(firsts.len() > 5, "not in order: {firsts:?}");

        // The last pieces verified: the hash waits for the first ones, taken in order. Piece 2
        // has a single holder, this peer: it goes first, and is not taken again in order.
        let mut p = with(&mut (n - lag..n));
        let mut second = Bitfield::new(n);
        second.set(2);
        p.remove_availability(&second);
        let picked: Vec<u32> = (1..=4)
            .map(|c| p.pick(c, &full(n), (4, 0), now)[0].index)
            .collect();
        assert_eq!(picked, [2, 0, 1, 3]);

        // Verified pieces move the window: from 5 on once 0-4 are in, whatever came first.
        let mut p = with(&mut (0..5).chain(n - lag..n));
        assert_eq!(p.pick(1, &full(n), (4, 0), now)[0].index, 5);
        for i in 5..5 + window {
            p.mark_have(i);
        }
        assert_eq!(p.pick(2, &full(n), (4, 0), now)[0].index, 5 + window);

        // Through downloads: a piece verified fills the hole in front, a failed one does not.
        let mut p = with(&mut (n - lag..n));
        let complete = |p: &mut Picker, conn: ConnId, ok: bool| {
            let blocks = p.pick(conn, &full(n), (4, 0), now);
            for b in &blocks {
                p.claim(conn, b);
                p.stored(b);
            }
            p.verified(blocks[0].index, ok);
            blocks[0].index
        };
        assert_eq!(complete(&mut p, 1, false), 0);
        assert_eq!(complete(&mut p, 2, true), 0, "failed: still first");
        assert_eq!(complete(&mut p, 3, true), 1);
        // A peer with nothing in the window is asked for what it has, rarest first.
        let mut far = Bitfield::new(n);
        far.set(n - lag - 1);
        assert_eq!(p.pick(4, &far, (4, 0), now)[0].index, n - lag - 1);
    }

    #[test]
    fn only_asks_for_what_the_peer_has() {
        let mut p = Picker::new(PL * 4, PL, Bitfield::new(4));
        let mut has = Bitfield::new(4);
        has.set(2);
        let r = p.pick(1, &has, (100, 0), Instant::now());
        assert_eq!(r.len(), 4);
        assert!(r.iter().all(|b| b.index == 2));
        assert!(
            p.pick(1, &Bitfield::new(4), (100, 0), Instant::now())
                .is_empty()
        );
    }

    #[test]
    fn last_piece_and_block_are_short() {
        let len = PL * 2 + BLOCK_SIZE as u64 + 100;
        let mut p = Picker::new(len, PL, Bitfield::new(3));
        let mut has = Bitfield::new(3);
        has.set(2);
        let r = p.pick(1, &has, (10, 0), Instant::now());
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[1],
            BlockRef {
                index: 2,
                begin: BLOCK_SIZE,
                length: 100
            }
        );
    }

    fn ok(cancel: Vec<ConnId>) -> Arrival {
        Arrival::Accepted { cancel }
    }

    #[test]
    fn completion_verification_and_blame() {
        let mut p = Picker::new(PL, PL, Bitfield::new(1));
        let now = Instant::now();
        let r1 = p.pick(1, &full(1), (2, 0), now);
        let r2 = p.pick(2, &full(1), (2, 0), now);
        for b in &r1 {
            assert_eq!(p.claim(1, b), ok(vec![]));
            assert!(!p.stored(b));
        }
        assert_eq!(
            p.claim(1, &r2[0]),
            Arrival::Unexpected,
            "not requested from 1"
        );
        assert_eq!(p.claim(2, &r2[0]), ok(vec![]));
        assert!(!p.stored(&r2[0]));
        assert_eq!(p.claim(2, &r2[1]), ok(vec![]));
        assert_eq!(p.claim(2, &r2[1]), Arrival::Unexpected, "no double claim");
        assert!(
            p.stored(&r2[1]),
            "the last block stored completes the piece"
        );
        assert!(!p.stored(&r2[1]), "no double counting");
        let mut blamed = p.verified(0, false);
        blamed.sort_unstable();
        assert_eq!(blamed, vec![1, 2]);
        assert!(!p.is_complete());
        // Starts over.
        let again = p.pick(3, &full(1), (10, 0), now);
        assert_eq!(again.len(), 4);
        for b in &again {
            p.claim(3, b);
            p.stored(b);
        }
        assert_eq!(p.verified(0, true), vec![3]);
        assert!(p.is_complete());
        assert_eq!(p.bytes_have(), PL);
    }

    #[test]
    fn a_piece_is_not_complete_while_a_block_is_being_written() {
        // Two connections deliver the last two blocks at once: the one that claimed first is
        // still writing when the other stores. The piece must wait for both.
        let mut p = Picker::new(PL, PL, Bitfield::new(1));
        let now = Instant::now();
        let a = p.pick(1, &full(1), (2, 0), now);
        let b = p.pick(2, &full(1), (2, 0), now);
        for blk in &b {
            p.claim(2, blk);
            p.stored(blk);
        }
        assert_eq!(p.claim(1, &a[0]), ok(vec![]));
        assert_eq!(p.claim(1, &a[1]), ok(vec![]));
        assert!(!p.stored(&a[1]), "a[0] is still being written");
        assert!(
            p.pick(3, &full(1), (4, 0), now).is_empty(),
            "writing blocks are not handed out"
        );
        p.release_conn(1);
        assert!(p.stored(&a[0]), "a disconnect does not undo a claim");
    }

    #[test]
    fn endgame_duplicates_then_cancels() {
        let mut p = Picker::new(PL, PL, Bitfield::new(1));
        let now = Instant::now();
        let slow = p.pick(1, &full(1), (4, 0), now);
        assert_eq!(slow.len(), 4);
        assert!(p.endgame());
        let dup = p.pick(2, &full(1), (4, 0), now);
        assert_eq!(dup.len(), 4, "endgame asks a second peer");
        assert!(
            p.pick(3, &full(1), (4, 0), now).is_empty(),
            "at most two copies"
        );
        assert_eq!(p.claim(2, &dup[0]), ok(vec![1]));
        assert_eq!(
            p.claim(1, &slow[0]),
            Arrival::Unexpected,
            "the slower copy is dropped"
        );
    }

    #[test]
    fn endgame_keeps_a_short_queue_of_the_oldest_requests() {
        let n = 6;
        let mut p = Picker::new(PL * 6, PL, Bitfield::new(n));
        let t0 = Instant::now();
        let t1 = t0 + std::time::Duration::from_secs(1);
        let old = p.pick(1, &full(n), (12, 0), t0);
        let young = p.pick(1, &full(n), (12, 12), t1);
        assert_eq!((old.len(), young.len()), (12, 12));
        assert!(p.endgame());

        let dup = p.pick(2, &full(n), (100, 0), t1);
        assert_eq!(dup.len(), Picker::ENDGAME_DEPTH, "a short queue, not `max`");
        assert!(
            old.iter().all(|b| dup.contains(b)),
            "the oldest requests first"
        );
        assert!(
            p.pick(2, &full(n), (100, Picker::ENDGAME_DEPTH / 2 + 1), t1)
                .is_empty(),
            "nothing more until half have come back"
        );
        let more = p.pick(2, &full(n), (100, Picker::ENDGAME_DEPTH / 2), t1);
        assert_eq!(
            more.len(),
            Picker::ENDGAME_DEPTH / 2,
            "topped up to the depth"
        );
        assert!(
            more.iter().all(|b| young.contains(b)),
            "the rest of the young ones"
        );
        assert!(
            more.iter().all(|b| !dup.contains(b)),
            "never its own request twice"
        );
    }

    /// Duplicates wait until few blocks are still to come: before that, each copy mostly
    /// races one already on its way.
    #[test]
    fn endgame_duplicates_wait_for_the_last_blocks() {
        let n = 10;
        let mut p = Picker::new(PL * 10, PL, Bitfield::new(n));
        let t0 = Instant::now();
        let asked = p.pick(1, &full(n), (40, 0), t0);
        assert_eq!(asked.len(), 40);
        assert!(p.endgame(), "every piece is in progress");
        assert!(
            p.pick(2, &full(n), (16, 0), t0).is_empty(),
            "40 blocks still to come: no copies yet"
        );
        for b in &asked[..40 - Picker::ENDGAME_BLOCKS] {
            assert_eq!(p.claim(1, b), ok(vec![]));
            p.stored(b);
        }
        let dup = p.pick(2, &full(n), (16, 0), t0);
        assert_eq!(
            dup.len(),
            Picker::ENDGAME_DEPTH,
            "32 to come: copies of them"
        );
        assert!(dup.iter().all(|b| asked[8..].contains(b)));
    }

    #[test]
    fn disconnect_and_timeouts_free_blocks() {
        let mut p = Picker::new(PL * 2, PL, Bitfield::new(2));
        let t0 = Instant::now();
        let r = p.pick(1, &full(2), (8, 0), t0);
        assert_eq!(r.len(), 8);
        assert_eq!(
            p.stale_requests(1, t0 + std::time::Duration::from_secs(1))
                .len(),
            8
        );
        p.release_block(1, &r[0]);
        assert_eq!(
            p.pick(2, &full(2), (1, 0), t0),
            vec![r[0]],
            "the released block is free first"
        );
        p.release_conn(1);
        let freed = p.pick(3, &full(2), (7, 0), t0);
        assert_eq!(freed.len(), 7);
        assert!(!freed.contains(&r[0]), "still held by connection 2");
    }

    #[test]
    fn availability_tracks_peers() {
        let mut p = Picker::new(PL * 3, PL, Bitfield::new(3));
        let mut b = Bitfield::new(3);
        b.set(1);
        p.add_availability(&b);
        p.add_one(2);
        assert_eq!(
            (p.availability(0), p.availability(1), p.availability(2)),
            (0, 1, 1)
        );
        p.remove_availability(&b);
        assert_eq!(p.availability(1), 0);
        assert!(p.interesting(&b));
    }

    proptest::proptest! {
        /// Whatever peers do, the bookkeeping that lets `pick` skip work matches the blocks:
        /// `free` counts the free blocks, `started` and `busy` match the pieces' states, and
        /// every block ends up received exactly once.
        #[test]
        fn counters_match_the_blocks(ops in proptest::collection::vec((0u8..5, 1u64..4, 0usize..64), 1..200)) {
            let n = 6u32;
            let mut p = Picker::new(PL * u64::from(n) - 100, PL, Bitfield::new(n));
            let now = Instant::now();
            let mut held: Vec<(ConnId, BlockRef)> = Vec::new();
            for (op, conn, k) in ops {
                match op {
                    0 | 1 => {
                        let mine = held.iter().filter(|(c, _)| *c == conn).count();
                        held.extend(p.pick(conn, &full(n), (1 + k % 5, mine), now).into_iter().map(|b| (conn, b)));
                    }
                    2 if !held.is_empty() => {
                        let (c, b) = held.swap_remove(k % held.len());
                        if let Arrival::Accepted { .. } = p.claim(c, &b)
                            && p.stored(&b)
                        {
                            p.verified(b.index, k % 7 != 0);
                        }
                    }
                    3 if !held.is_empty() => {
                        let (c, b) = held.swap_remove(k % held.len());
                        p.release_block(c, &b);
                    }
                    4 => {
                        p.release_conn(conn);
                        held.retain(|(c, _)| *c != conn);
                    }
                    _ => {}
                }
                proptest::prop_assert_eq!(p.front, (0..n).find(|&i| !p.have.get(i)).unwrap_or(n));
                for i in 0..n {
                    let part = p.partial(i);
                    proptest::prop_assert_eq!(part.is_some(), p.started.get(i));
                    proptest::prop_assert_eq!(p.busy.get(i), p.started.get(i) || p.have.get(i));
                    if let Some(part) = part {
                        let free = part.blocks.iter().filter(|b| **b == Block::Free).count();
                        proptest::prop_assert_eq!(part.free as usize, free);
                        proptest::prop_assert_eq!(p.open.get(i), free > 0);
                    } else {
                        proptest::prop_assert!(!p.open.get(i));
                    }
                }
            }
        }
    }
}
