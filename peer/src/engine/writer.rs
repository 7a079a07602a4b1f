//! One writer per download: received blocks reach its file one batch at a time, in the order
//! the connections handed them over.
//!
//! Each connection used to write its own batches on the blocking pool, so a download from
//! seven peers had up to four blocking threads writing to one file at once. A buffered write
//! holds the file's inode lock for its whole copy (tmpfs, ext4 and XFS alike), so the others
//! waited on it, spinning first: 7% of the agents' CPU in `swarm_bench --scenario none --cpu`
//! (`perf`: `rwsem_down_write_slowpath`, `rwsem_spin_on_owner` under `pwrite64`), for no
//! more bytes written. Here one blocking task at a time drains the download's queue; batches
//! queued meanwhile go out together in its next round, so there is one task per burst rather
//! than one per batch, and a connection's batches reach the disk in order (which keeps their
//! pieces' running hashes going, see `hashing`).
//!
//! A drain gives its thread back after [`ROUNDS`] rounds and queues itself again behind the
//! other blocking work (upload reads, verifications), which a busy download would otherwise
//! hold up. If a drain panics, or the runtime drops it unrun, what it had queued is dropped:
//! each connection then sees its batch fail, the blocks it had claimed can never be stored,
//! and so the download fails (`Conn::on_written`); the next batch starts a new drain.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};

use fbpkg_common::wire::BlockRef;
use tokio::sync::oneshot;

use super::torrent::Torrent;
use crate::storage::PackageData;

/// Rounds of one drain before it gives its blocking thread back.
const ROUNDS: usize = 8;

/// What became of each block of a batch.
pub(crate) type Written = Vec<(BlockRef, io::Result<()>)>;

/// Blocks to write: where each goes in the file, and its bytes.
pub(crate) type Blocks = Vec<(BlockRef, u64, bytes::Bytes)>;

struct Batch {
    storage: Arc<PackageData>,
    blocks: Blocks,
    done: oneshot::Sender<Written>,
}

/// A download's queue of batches to write.
#[derive(Default)]
pub(crate) struct Writer {
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    batches: VecDeque<Batch>,
    /// A drain is queued or running: the batches pushed now are its.
    draining: bool,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let q = self.lock();
        f.debug_struct("Writer")
            .field("queued", &q.batches.len())
            .field("draining", &q.draining)
            .finish()
    }
}

impl Writer {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue `blocks` for `t`'s file; the answer says what became of each. Must be called
    /// on a tokio runtime (the drain runs on its blocking pool).
    pub(crate) fn submit(
        t: &Arc<Torrent>,
        storage: Arc<PackageData>,
        blocks: Blocks,
    ) -> oneshot::Receiver<Written> {
        let (done, answer) = oneshot::channel();
        let start = {
            let mut q = t.writer.lock();
            q.batches.push_back(Batch {
                storage,
                blocks,
                done,
            });
            !std::mem::replace(&mut q.draining, true)
        };
        if start {
            Turn(Some(t.clone())).spawn();
        }
        answer
    }
}

/// The right to drain a download's queue. Dropped while still held (a panic, or a runtime
/// that drops the task unrun), it empties the queue, so waiting connections hear of it, and
/// lets the next batch start a new drain.
struct Turn(Option<Arc<Torrent>>);

impl Turn {
    fn spawn(self) {
        tokio::task::spawn_blocking(move || self.drain());
    }

    fn drain(mut self) {
        let Some(t) = self.0.clone() else {
            return;
        };
        for round in 0..=ROUNDS {
            let batches: Vec<Batch> = {
                let mut q = t.writer.lock();
                if q.batches.is_empty() {
                    q.draining = false;
                    self.0 = None;
                    return;
                }
                if round == ROUNDS {
                    break;
                }
                q.batches.drain(..).collect()
            };
            for b in batches {
                let written = write(&t, &b.storage, b.blocks);
                // The connection may have gone; what it claimed is settled by the picker.
                let _ = b.done.send(written);
            }
        }
        // More is queued: after the blocking work queued meanwhile.
        self.spawn();
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            let dropped = {
                let mut q = t.writer.lock();
                q.draining = false;
                std::mem::take(&mut q.batches)
            };
            drop(dropped);
        }
    }
}

/// Write one batch, feeding each block written to its piece's running hash.
fn write(t: &Torrent, storage: &PackageData, blocks: Blocks) -> Written {
    blocks
        .into_iter()
        .map(|(b, offset, data)| {
            let r = storage.write_at(offset, &data).map_err(|e| {
                io::Error::new(e.kind(), format!("{}: {e}", storage.path().display()))
            });
            if r.is_ok() {
                t.hashes
                    .written(b.index, b.begin, &storage.as_stored(offset, &data));
            }
            (b, r)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::torrent::tests::torrent;
    use fbpkg_common::bitfield::Bitfield;
    use fbpkg_common::metainfo::BLOCK_SIZE;
    use sha1::{Digest, Sha1};

    /// Piece `index`'s blocks, each filled with a byte of its own.
    fn piece(t: &Torrent, index: u32) -> Vec<(BlockRef, u64, bytes::Bytes)> {
        let len = t.meta.piece_size(index);
        (0..len.div_ceil(BLOCK_SIZE))
            .map(|k| {
                let begin = k * BLOCK_SIZE;
                let length = BLOCK_SIZE.min(len - begin);
                let fill = (index * 31 + k) as u8;
                let b = BlockRef {
                    index,
                    begin,
                    length,
                };
                let at = t.meta.block_offset(index, begin);
                (b, at, bytes::Bytes::from(vec![fill; length as usize]))
            })
            .collect()
    }

    /// Several connections at once, each handing over its piece a block at a time while
    /// the writer is busy (a drain held back until all are queued): every block reaches the
    /// file, and each connection's batches reach it in order, so every piece's running hash
    /// covers it whole (a batch overtaken by the next would leave a gap there, and the piece
    /// to be read back).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_reach_the_file_whole_and_in_the_order_each_connection_gave_them() {
        let dir = tempfile::tempdir().unwrap();
        let t = torrent(dir.path(), Bitfield::new);
        let pieces = t.meta.num_pieces();
        assert!(pieces >= 3, "the test wants several pieces, got {pieces}");
        t.writer.lock().draining = true;
        let mut conns = Vec::new();
        for index in 0..pieces {
            let t = t.clone();
            conns.push(tokio::spawn(async move {
                let storage = t.storage().unwrap();
                let mut answers = Vec::new();
                for batch in piece(&t, index).chunks(1) {
                    answers.push(Writer::submit(&t, storage.clone(), batch.to_vec()));
                    tokio::task::yield_now().await;
                }
                answers
            }));
        }
        let mut answers = Vec::new();
        for c in conns {
            answers.push(c.await.unwrap());
        }
        Turn(Some(t.clone())).spawn();
        let conns: Vec<_> = answers
            .into_iter()
            .map(|answers| {
                tokio::spawn(async move {
                    let mut blocks = 0;
                    for a in answers {
                        for (_, r) in a.await.expect("answered") {
                            r.expect("written");
                            blocks += 1;
                        }
                    }
                    blocks
                })
            })
            .collect();
        let mut blocks = 0;
        for c in conns {
            blocks += c.await.unwrap();
        }
        assert_eq!(
            blocks,
            (0..pieces).map(|i| piece(&t, i).len()).sum::<usize>()
        );

        let storage = t.storage().unwrap();
        for index in 0..pieces {
            let expected: Vec<u8> = piece(&t, index)
                .iter()
                .flat_map(|(_, _, d)| d.to_vec())
                .collect();
            let mut on_disk = vec![0; expected.len()];
            storage
                .read_at(t.meta.piece_offset(index), &mut on_disk)
                .unwrap();
            assert_eq!(on_disk, expected, "piece {index} on disk");
            let running = t.hashes.take(index).expect("a running hash");
            assert_eq!(
                running.next as usize,
                expected.len(),
                "piece {index} hashed whole"
            );
            assert_eq!(
                <[u8; 20]>::from(running.sha.finalize()),
                <[u8; 20]>::from(Sha1::digest(&expected)),
                "piece {index}'s running hash"
            );
        }
    }

    /// A block that cannot be written fails alone, and the batches after it are written.
    #[tokio::test]
    async fn a_failed_write_is_that_blocks_answer_and_the_queue_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let t = torrent(dir.path(), Bitfield::new);
        let storage = t.storage().unwrap();
        let mut blocks = piece(&t, 0);
        let beyond = BlockRef {
            index: 0,
            begin: 0,
            length: 16,
        };
        blocks.insert(1, (beyond, t.meta.length, bytes::Bytes::from(vec![1; 16])));
        let first = Writer::submit(&t, storage.clone(), blocks);
        let second = Writer::submit(&t, storage.clone(), piece(&t, 1));
        let first = first.await.unwrap();
        assert!(first[0].1.is_ok());
        assert!(first[1].1.is_err(), "a block past the end is refused");
        assert!(first[2..].iter().all(|(_, r)| r.is_ok()));
        assert!(second.await.unwrap().iter().all(|(_, r)| r.is_ok()));
    }

    /// A drain that never runs (its runtime dropped it, or it panicked) answers its queued
    /// batches with an error rather than never, and the next batch starts a new drain.
    #[tokio::test]
    async fn a_drain_lost_unrun_fails_its_batches_and_the_next_one_starts_another() {
        let dir = tempfile::tempdir().unwrap();
        let t = torrent(dir.path(), Bitfield::new);
        let storage = t.storage().unwrap();
        let (done, lost) = oneshot::channel();
        {
            let mut q = t.writer.lock();
            q.batches.push_back(Batch {
                storage: storage.clone(),
                blocks: piece(&t, 0),
                done,
            });
            q.draining = true;
        }
        drop(Turn(Some(t.clone())));
        assert!(
            lost.await.is_err(),
            "the lost batch is answered, with an error"
        );
        let next = Writer::submit(&t, storage, piece(&t, 0));
        assert!(next.await.unwrap().iter().all(|(_, r)| r.is_ok()));
    }
}
