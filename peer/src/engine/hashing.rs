//! Pieces hashed as their blocks are written, so that verifying a piece seldom reads it back.
//!
//! A piece's SHA-1 takes its bytes in order. Blocks of one piece mostly come from one peer, in
//! order, and the download's writer (`writer.rs`) writes them in the order they came. After
//! each successful write, a block that starts where its piece's running hash has got to is fed
//! to it, from the buffer just written. Verification then reads back from disk only the rest
//! of the piece: blocks written out of order (from another peer, or after a failed attempt).
//! Reading every piece back was about 5% of a downloading agent's CPU (`swarm_bench --scenario
//! none --cpu`, `perf`).
//!
//! Why the verdict is on the bytes on disk either way:
//! - the picker lets a block be written once per attempt at its piece (its claim: a second
//!   copy from another peer, or one that comes after its request was given up, is dropped
//!   unwritten), and a write that fails fails the whole download;
//! - the writer reports a block here after its write succeeded, with padding as the zeros
//!   it reads back as ([`PackageData::as_stored`](crate::storage::PackageData::as_stored));
//! - the piece is verified only once every block is stored (its write answered), and the
//!   hash is taken before a failed piece's blocks can be fetched again, so a new attempt
//!   starts a new hash.
//!
//! So a running hash covers exactly the bytes on disk at `[0, next)`. As a guard, a block
//! reported inside `[0, next)` again (which the picker does not do) empties the hash, and the
//! whole piece is read back.
//!
//! The archive's SHA-256 ([`ArchivePrefix`]) is taken over its verified pieces in order while
//! the rest downloads, so that the check after the last piece reads only what follows the
//! first piece that was still missing. Verified pieces are never written again, so the bytes
//! it hashed are the bytes the install finds.

use std::collections::HashMap;
use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};

use sha1::{Digest, Sha1};
use sha2::Sha256;

/// Locks the running hashes are spread over, so the writer and the verification of other
/// pieces seldom wait for each other.
const SHARDS: usize = 16;

/// The running hashes of the pieces being downloaded.
#[derive(Debug)]
pub(crate) struct PieceHashes {
    shards: Box<[Mutex<HashMap<u32, Running>>]>,
}

/// A piece's SHA-1 over its first `next` bytes.
#[derive(Debug, Clone)]
pub(crate) struct Running {
    pub(crate) sha: Sha1,
    pub(crate) next: u32,
}

impl Running {
    fn empty() -> Self {
        Self {
            sha: Sha1::new(),
            next: 0,
        }
    }
}

impl Default for PieceHashes {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl PieceHashes {
    fn shard(&self, index: u32) -> std::sync::MutexGuard<'_, HashMap<u32, Running>> {
        self.shards[index as usize % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// `data` has just been written at `begin` in piece `index`.
    pub(crate) fn written(&self, index: u32, begin: u32, data: &[u8]) {
        let Ok(len) = u32::try_from(data.len()) else {
            return;
        };
        let mut shard = self.shard(index);
        let r = shard.entry(index).or_insert_with(Running::empty);
        if begin == r.next {
            r.sha.update(data);
            r.next = r.next.saturating_add(len);
        } else if begin < r.next {
            // Bytes already hashed were written again: the disk may hold others now.
            *r = Running::empty();
        }
        // Past `next`: a gap, read back from disk at verification.
    }

    /// The running hash of piece `index`, taken out to verify the piece (its blocks, should
    /// it fail, are fetched again into a new one).
    pub(crate) fn take(&self, index: u32) -> Option<Running> {
        self.shard(index).remove(&index)
    }

    /// Pieces with a running hash.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

/// The archive's SHA-256 over its first pieces, those verified in a row from piece 0.
///
/// Every piece verified with the one before it hashed lets one blocking task
/// ([`ArchivePrefix::advance`]) read on: a piece arrives in any order, and the SHA-256 takes
/// the bytes in order. The install then hashes only the rest
/// ([`crate::cache::Cache::install_reusing`]'s `prefix`), and a task still reading on when
/// the last piece comes does the rest of its part first. What it saves is the part behind
/// the first piece still missing when the last one arrives. A lone origin hands pieces out
/// from the front ([`Order::Sequential`](super::superseed::Order)), so that part is most of
/// the archive: in `b4` at a quarter of the rates (2,048 pieces), a median 91–97% hashed
/// when the last piece was verified, against 14–18% when the origin handed them out at
/// random. Where the pieces are out before the crowd has them (the leechers' uplinks, not the
/// origin's, set the pace), rarest first alone fetched the most widely held pieces last and
/// left 73–89% to hash after the last piece (`b3`, `b5`); while that much lags, the picker
/// now starts the first missing pieces that others hold in order
/// ([`Picker`](super::picker::Picker)'s rule 2).
#[derive(Debug, Default)]
pub(crate) struct ArchivePrefix {
    hashed: Mutex<Prefix>,
    /// `hashed.pieces`, read without the lock.
    next: AtomicU32,
    /// A task is advancing (or about to).
    running: AtomicBool,
}

#[derive(Debug, Default)]
struct Prefix {
    sha: Sha256,
    pieces: u32,
    /// Taken by the install: nothing more to hash.
    taken: bool,
}

impl ArchivePrefix {
    /// The first piece not hashed yet.
    pub(crate) fn next(&self) -> u32 {
        self.next.load(SeqCst)
    }

    /// Piece `next()` is verified: true if the caller is to run [`ArchivePrefix::advance`]
    /// (off the runtime), false if a task doing so will see it. Call it after the piece is
    /// marked verified where `advance`'s `have` looks.
    pub(crate) fn claim(&self) -> bool {
        !self.running.swap(true, SeqCst)
    }

    /// Hash pieces in order from `next()` while `have` says they are verified; `read` feeds
    /// piece `i`'s bytes to the hash. Ends when the next piece is missing, on the first read
    /// error (the install reads the rest anyway, and reports it), or past `pieces`. For the
    /// task that [`claim`](Self::claim)ed; a piece verified meanwhile is not left behind.
    pub(crate) fn advance(
        &self,
        pieces: u32,
        have: impl Fn(u32) -> bool,
        mut read: impl FnMut(u32, &mut Sha256) -> io::Result<()>,
    ) {
        loop {
            {
                let mut p = self.hashed.lock().unwrap_or_else(|e| e.into_inner());
                if p.taken {
                    self.running.store(false, SeqCst);
                    return;
                }
                while p.pieces < pieces && have(p.pieces) {
                    // A failed read may have fed part of the piece: hash a copy, keep it
                    // only whole.
                    let mut sha = p.sha.clone();
                    if let Err(e) = read(p.pieces, &mut sha) {
                        tracing::debug!(piece = p.pieces, error = %e, "the archive's SHA-256 stops here until the install");
                        self.running.store(false, SeqCst);
                        return;
                    }
                    p.sha = sha;
                    p.pieces += 1;
                    self.next.store(p.pieces, SeqCst);
                }
            }
            self.running.store(false, SeqCst);
            // A piece verified after the last look, whose `claim` saw this task running.
            let next = self.next();
            if next >= pieces || !have(next) || !self.claim() {
                return;
            }
        }
    }

    /// The SHA-256 so far and how many pieces it covers. Waits for a task advancing it.
    /// Once taken, it hashes nothing more.
    pub(crate) fn take(&self) -> (Sha256, u32) {
        let mut p = self.hashed.lock().unwrap_or_else(|e| e.into_inner());
        p.taken = true;
        (std::mem::take(&mut p.sha), p.pieces)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn digest(r: Running) -> [u8; 20] {
        r.sha.finalize().into()
    }

    #[test]
    fn blocks_in_order_hash_the_whole_piece() {
        let piece = bytes(48 << 10, 1);
        let h = PieceHashes::default();
        for (i, block) in piece.chunks(16 << 10).enumerate() {
            h.written(7, (i as u32) * (16 << 10), block);
        }
        let r = h.take(7).expect("running");
        assert_eq!(r.next, 48 << 10);
        assert_eq!(digest(r), <[u8; 20]>::from(Sha1::digest(&piece)));
        assert!(h.take(7).is_none(), "taken once");
        assert_eq!(h.len(), 0);
    }

    #[test]
    fn a_gap_stops_the_hash_where_the_bytes_are_no_longer_in_order() {
        let piece = bytes(64 << 10, 2);
        let block = |i: usize| &piece[i * (16 << 10)..(i + 1) * (16 << 10)];
        let h = PieceHashes::default();
        h.written(0, 0, block(0));
        h.written(0, 2 << 14, block(2)); // ahead of the one before it
        h.written(0, 1 << 14, block(1));
        h.written(0, 3 << 14, block(3)); // not where the hash is (block 2 was skipped)
        let r = h.take(0).expect("running");
        assert_eq!(r.next, 2 << 14, "covers blocks 0 and 1 only");
        let mut rest = r.sha.clone();
        rest.update(&piece[2 << 14..]);
        assert_eq!(
            <[u8; 20]>::from(rest.finalize()),
            <[u8; 20]>::from(Sha1::digest(&piece))
        );
    }

    #[test]
    fn bytes_written_again_empty_the_hash() {
        let piece = bytes(32 << 10, 3);
        let h = PieceHashes::default();
        h.written(3, 0, &piece[..16 << 10]);
        h.written(3, 16 << 10, &piece[16 << 10..]);
        // The first block again, with other bytes: what was hashed is not on disk any more.
        h.written(3, 0, &bytes(16 << 10, 9));
        let r = h.take(3).expect("running");
        assert_eq!(r.next, 0, "verification reads the whole piece back");
        assert_eq!(digest(r), <[u8; 20]>::from(Sha1::digest(b"")));
    }

    #[test]
    fn pieces_do_not_mix() {
        let (a, b) = (bytes(16 << 10, 4), bytes(16 << 10, 5));
        let h = PieceHashes::default();
        // 1 and 17 share a shard.
        h.written(1, 0, &a);
        h.written(17, 0, &b);
        assert_eq!(
            digest(h.take(1).expect("1")),
            <[u8; 20]>::from(Sha1::digest(&a))
        );
        assert_eq!(
            digest(h.take(17).expect("17")),
            <[u8; 20]>::from(Sha1::digest(&b))
        );
    }

    /// Pieces of 4 bytes; `read` feeds piece `i` of `data`.
    fn feed(data: &[u8]) -> impl FnMut(u32, &mut Sha256) -> io::Result<()> + '_ {
        |i, sha| {
            sha.update(&data[i as usize * 4..(i as usize + 1) * 4]);
            Ok(())
        }
    }

    #[test]
    fn the_archive_hash_takes_verified_pieces_in_order_and_stops_at_a_missing_one() {
        let data = bytes(24, 6); // 6 pieces
        let p = ArchivePrefix::default();
        let have = [true, true, false, true, true, true];
        assert!(p.claim());
        p.advance(6, |i| have[i as usize], feed(&data));
        assert_eq!(p.next(), 2, "stops at the first missing piece");
        assert!(p.claim(), "the task let go when it stopped");

        // Piece 2 verified: the next task reads on to the end.
        p.advance(6, |_| true, feed(&data));
        assert_eq!(p.next(), 6);
        let (sha, pieces) = p.take();
        assert_eq!(pieces, 6);
        assert_eq!(sha.finalize(), Sha256::digest(&data));
    }

    #[test]
    fn a_failed_read_keeps_the_hash_of_the_whole_pieces_before_it() {
        let data = bytes(16, 7);
        let p = ArchivePrefix::default();
        let mut read = feed(&data);
        assert!(p.claim());
        p.advance(
            4,
            |_| true,
            |i, sha| {
                if i == 2 {
                    sha.update(b"half a piece");
                    return Err(io::Error::other("disk"));
                }
                read(i, sha)
            },
        );
        assert_eq!(p.next(), 2);
        let (sha, pieces) = p.take();
        assert_eq!(pieces, 2);
        assert_eq!(
            sha.finalize(),
            Sha256::digest(&data[..8]),
            "nothing of piece 2"
        );
    }

    #[test]
    fn a_piece_verified_while_a_task_advances_is_not_left_behind() {
        use std::cell::Cell;
        let data = bytes(12, 8);
        let p = ArchivePrefix::default();
        let verified = Cell::new(1u32); // pieces [0, verified) are verified
        let mut read = feed(&data);
        assert!(p.claim());
        p.advance(
            3,
            |i| i < verified.get(),
            |i, sha| {
                read(i, sha)?;
                if i == 0 {
                    // Piece 1 is verified now; its verifier finds the task running.
                    verified.set(2);
                    assert!(!p.claim(), "a task is running");
                }
                Ok(())
            },
        );
        assert_eq!(p.next(), 2, "the running task hashed piece 1 too");
        let (sha, _) = p.take();
        assert_eq!(sha.finalize(), Sha256::digest(&data[..8]));
    }

    #[test]
    fn once_taken_nothing_more_is_hashed() {
        let data = bytes(8, 9);
        let p = ArchivePrefix::default();
        let (_, pieces) = p.take();
        assert_eq!(pieces, 0);
        assert!(p.claim());
        p.advance(2, |_| true, feed(&data));
        assert_eq!(p.next(), 0);
    }
}
