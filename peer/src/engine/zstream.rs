//! Blocks sent compressed between agents (the `fbpkg_zblock` extension, `common::wire::ext`).
//!
//! Each batch of blocks read for one peer is one zstd frame: every block is compressed with
//! what came before it in the batch as history and flushed at its end, so its message carries
//! just the bytes that inflate to it, and the receiver inflates each message as it arrives.
//! A batch is mostly consecutive blocks of a few pieces, which share a lot; compressing each
//! 16 KiB block alone, as a first version did, lost a fifth of the gain to the lack of
//! history (`/usr/bin`: 0.45 of the raw bytes alone, 0.40 in a stream, 0.36 as one tar.zst).
//!
//! The frame ends with the batch, so neither side keeps a context between batches: memory
//! follows the transfers in flight, not the connections. The receiver refuses frames that ask
//! for a window over [`MAX_WINDOW_LOG`], and a message that inflates past its block.
//!
//! A batch alone still lacks what a tar.zst has: the files before it. A tree of small files
//! is sent piece by piece in the swarm's order, not the tree's, so similar files are rarely in
//! one batch (`/usr/lib/python3`: 1.26x its tar.zst between agents). So [`train`] builds a
//! dictionary from samples of the package when it is published, and the metainfo carries it
//! (`x-fbpkg-zdict`, outside the info-hash); two agents that both hold it (the extension
//! handshake names it) compress every batch with it, at [`DICT_LEVEL`]. Measured on
//! `/usr/lib/python3`'s 32 KiB pieces, each compressed alone against its tar.zst: 1.33x at
//! level 3 without one, 1.15x with a 512 KiB dictionary at level 4, 1.06x at level 6, 1.05x
//! at level 9; 1.11x at level 6 with 256 KiB. A frame names the dictionary it needs: one
//! we do not hold ends the connection, like any message we cannot read.

use std::io;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::BytesMut;
use fbpkg_common::metainfo::{FileKind, MAX_ZDICT_LEN, Metainfo};
use fbpkg_common::wire::BlockRef;
use fbpkg_common::wire::ext;
use sha2::{Digest, Sha256};
use zstd::dict::EncoderDictionary;

use crate::storage::file_starts;
use zstd::stream::raw::{CParameter, DParameter, Decoder, Encoder, InBuffer, Operation, OutBuffer};

/// zstd level: 3 compresses a stream at ~130 MB/s per core (measured on 16 KiB flushes), so a
/// seeder uploading at 1 Gbit/s spends most of a core; level 1 gains a tenth less.
const LEVEL: i32 = 3;
/// zstd level with a dictionary: below 6 most of the dictionary's gain is lost (see above).
pub const DICT_LEVEL: i32 = 6;
/// History kept while compressing: 256 KiB, a piece or so of a typical package.
const WINDOW_LOG: u32 = 18;
/// Largest window a peer's frame may ask of us: what we ask of peers. A decoder lives while a
/// frame is open, so this bounds what a connection can make us hold (~300 KiB; ~900 KiB with
/// a dictionary, which each decoder holds a copy of).
pub(crate) const MAX_WINDOW_LOG: u32 = WINDOW_LOG;
/// Largest dictionary trained, and accepted from a metainfo once inflated.
pub const MAX_DICT_LEN: usize = 512 << 10;
/// Bytes of one training sample: about a batch.
const SAMPLE_LEN: usize = 32 << 10;
/// Most bytes sampled from a package to train on (~3 s of one core at 32 MiB).
const MOST_SAMPLED: u64 = 32 << 20;
/// Zeros in a row left out of training samples ([`without_zero_runs`]).
const ZERO_RUN: usize = 32;
/// Packages smaller than this get no dictionary: it would cost about what it saves.
const LEAST_TRAINED: u64 = 1 << 20;
/// Decoders with the dictionary loaded (each a copy of it) kept for the next frames.
const POOLED_DECODERS: usize = 2;

/// A package's compression dictionary, ready for both directions. A torrent keeps it only
/// while connections use it (`Torrent::zdict`): prepared for compressing, it holds level 6's
/// tables (a few MiB) besides its pooled decoders.
pub struct Dictionary {
    /// zstd's id for it, which frames compressed with it carry.
    id: u32,
    /// What peers compare in their extension handshakes: the first bytes of its SHA-256, so
    /// two dictionaries with one zstd id (which hashes only their content part) never pass
    /// for each other.
    fingerprint: u32,
    raw: Vec<u8>,
    /// Prepared for compressing when a batch first needs it (most of its memory).
    enc: OnceLock<Result<EncoderDictionary<'static>, String>>,
    /// Decoders with `raw` loaded, between frames.
    pool: Mutex<Vec<Decoder<'static>>>,
}

impl std::fmt::Debug for Dictionary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dictionary")
            .field("id", &self.id)
            .field("len", &self.raw.len())
            .finish_non_exhaustive()
    }
}

impl Dictionary {
    /// The dictionary `meta` carries, if any: `Err` says why it cannot be used (the package
    /// still downloads, without it).
    pub fn of(meta: &Metainfo) -> Result<Option<Self>, String> {
        let Some(packed) = &meta.zdict else {
            return Ok(None);
        };
        let raw = inflate_bounded(packed, MAX_DICT_LEN)
            .map_err(|e| format!("compression dictionary: {e}"))?;
        Self::from_raw(raw).map(Some)
    }

    /// A dictionary from its bytes, as zstd's trainer wrote them (they carry its id).
    pub fn from_raw(raw: Vec<u8>) -> Result<Self, String> {
        let id = zstd::zstd_safe::get_dict_id(&raw)
            .ok_or("compression dictionary without an id")?
            .get();
        let digest = Sha256::digest(&raw);
        let fingerprint = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
        // Loading it checks its tables: one that cannot be loaded is never offered to peers.
        // The decoder is the pool's first.
        let first = frame_decoder(&raw).map_err(|e| format!("compression dictionary: {e}"))?;
        Ok(Self {
            id,
            fingerprint: fingerprint.max(1),
            raw,
            enc: OnceLock::new(),
            pool: Mutex::new(vec![first]),
        })
    }

    /// What the extension handshake names it by (never 0).
    pub fn fingerprint(&self) -> u32 {
        self.fingerprint
    }

    fn for_encoding(&self) -> io::Result<&EncoderDictionary<'static>> {
        self.enc
            .get_or_init(|| {
                EncoderDictionary::try_copy(&self.raw, DICT_LEVEL)
                    .map_err(|e| format!("compression dictionary: {e}"))
            })
            .as_ref()
            .map_err(|e| io::Error::other(e.clone()))
    }

    fn decoder(&self) -> io::Result<Decoder<'static>> {
        let pooled = self.pool.lock().ok().and_then(|mut p| p.pop());
        if let Some(d) = pooled {
            return Ok(d);
        }
        frame_decoder(&self.raw)
    }

    /// A decoder whose frame ended: reset (its dictionary and window limit stay) for the next.
    fn give_back(&self, mut d: Decoder<'static>) {
        if d.reinit().is_ok()
            && let Ok(mut pool) = self.pool.lock()
            && pool.len() < POOLED_DECODERS
        {
            pool.push(d);
        }
    }
}

/// A decoder for peers' frames with `dict` loaded (none when empty), refusing windows over
/// [`MAX_WINDOW_LOG`].
fn frame_decoder(dict: &[u8]) -> io::Result<Decoder<'static>> {
    let mut d = Decoder::with_dictionary(dict)?;
    d.set_parameter(DParameter::WindowLogMax(MAX_WINDOW_LOG))?;
    Ok(d)
}

/// `packed`, one zstd frame, inflated to at most `most` bytes.
fn inflate_bounded(packed: &[u8], most: usize) -> Result<Vec<u8>, String> {
    let mut d = Decoder::new().map_err(|e| e.to_string())?;
    d.set_parameter(DParameter::WindowLogMax(20))
        .map_err(|e| e.to_string())?;
    let mut out = vec![0u8; most + 1];
    let mut input = InBuffer::around(packed);
    let mut output = OutBuffer::around(&mut out[..]);
    loop {
        let before = (input.pos, output.pos());
        let hint = d
            .run(&mut input, &mut output)
            .map_err(|e| format!("corrupt: {e}"))?;
        if output.pos() > most {
            return Err(format!("larger than {most} bytes"));
        }
        if hint == 0 {
            break;
        }
        if (input.pos, output.pos()) == before {
            return Err("truncated".into());
        }
    }
    if input.pos < packed.len() {
        return Err("data after its frame".into());
    }
    let n = output.pos();
    out.truncate(n);
    Ok(out)
}

/// `s` without its runs of [`ZERO_RUN`] zeros or more: binaries hold many (sections'
/// alignment), and the trainer, given them, returns a dictionary of a few KiB, as it does
/// for padding. Zeros cost next to nothing compressed, with or without a dictionary.
fn without_zero_runs(s: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut zeros = 0;
    for &b in &s {
        if b == 0 {
            zeros += 1;
            continue;
        }
        if zeros > 0 && zeros < ZERO_RUN {
            out.resize(out.len() + zeros, 0);
        }
        zeros = 0;
        out.push(b);
    }
    if zeros > 0 && zeros < ZERO_RUN {
        out.resize(out.len() + zeros, 0);
    }
    out
}

/// Where `meta`'s torrent holds file bytes, not padding: (offset, length), in order.
fn content(meta: &Metainfo) -> Vec<(u64, u64)> {
    if meta.files.is_empty() {
        return vec![(0, meta.length)];
    }
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (f, at) in meta.files.iter().zip(file_starts(meta)) {
        if f.length > 0 && f.kind != FileKind::Pad {
            match out.last_mut() {
                Some(last) if last.0 + last.1 == at => last.1 += f.length,
                _ => out.push((at, f.length)),
            }
        }
    }
    out
}

/// A dictionary trained for a package, and what it was measured to save.
#[derive(Debug, Clone)]
pub struct Trained {
    /// The dictionary, zstd-compressed, as `x-fbpkg-zdict` carries it.
    pub zdict: Vec<u8>,
    /// Its size inflated.
    pub dict_len: usize,
    /// Held-out samples' bytes: raw, compressed as batches are without a dictionary, and with.
    pub probe: [u64; 3],
    /// The saving estimated over the whole package, bytes per copy.
    pub saves: u64,
}

/// Train a compression dictionary for `meta`'s torrent, reading samples with `read_at`
/// (offset, buffer). Samples of [`SAMPLE_LEN`] evenly spread over the files' bytes,
/// [`MOST_SAMPLED`] in all; a quarter is held out to measure what the dictionary saves
/// against what it costs each host to download. `Ok(None)`: the package is too small, does
/// not compress, or the dictionary would not save twice its own size.
pub fn train(
    meta: &Metainfo,
    mut read_at: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
) -> io::Result<Option<Trained>> {
    // Padding between a tree's files is zeros on every host and never worth learning: the
    // trainer given samples with long runs of it returned a dictionary of a few KiB (asked
    // for 512). Samples are cut from the files' bytes alone.
    let regions = content(meta);
    let total: u64 = regions.iter().map(|r| r.1).sum();
    if total < LEAST_TRAINED {
        return Ok(None);
    }
    let n = total.min(MOST_SAMPLED) / SAMPLE_LEN as u64;
    let stride = total / n;
    let (mut learn, mut probe) = (Vec::new(), Vec::new());
    let (mut region, mut region_start) = (0, 0u64);
    for i in 0..n {
        let mut at = i * stride;
        let mut s = vec![0u8; usize::try_from((total - at).min(SAMPLE_LEN as u64)).unwrap_or(0)];
        let mut filled = 0;
        while filled < s.len() {
            while at >= region_start + regions[region].1 {
                region_start += regions[region].1;
                region += 1;
            }
            let (start, len) = regions[region];
            let off = at - region_start;
            let take = usize::try_from(len - off)
                .unwrap_or(usize::MAX)
                .min(s.len() - filled);
            read_at(start + off, &mut s[filled..filled + take])?;
            filled += take;
            at += take as u64;
        }
        if i % 4 == 3 {
            probe.push(s);
        } else {
            let s = without_zero_runs(s);
            if !s.is_empty() {
                learn.push(s);
            }
        }
    }
    let learned: usize = learn.iter().map(Vec::len).sum();
    if probe.is_empty() || learned < 8 * SAMPLE_LEN {
        return Ok(None);
    }
    let size = (learned / 32).clamp(16 << 10, MAX_DICT_LEN);
    // The trainer fails on samples it finds nothing in (random bytes, say): no dictionary.
    let Ok(raw) = zstd::dict::from_samples(&learn, size) else {
        return Ok(None);
    };
    let Ok(dict) = Dictionary::from_raw(raw) else {
        return Ok(None);
    };
    let mut plain = zstd::bulk::Compressor::new(LEVEL)?;
    plain.set_parameter(CParameter::WindowLog(WINDOW_LOG))?;
    let mut with = zstd::bulk::Compressor::with_prepared_dictionary(dict.for_encoding()?)?;
    with.set_parameter(CParameter::WindowLog(WINDOW_LOG))?;
    let mut sums = [0u64; 3];
    for s in &probe {
        sums[0] += s.len() as u64;
        sums[1] += (plain.compress(s)?.len() as u64).min(s.len() as u64);
        sums[2] += (with.compress(s)?.len() as u64).min(s.len() as u64);
    }
    let zdict = zstd::bulk::compress(&dict.raw, 19)?;
    let saves =
        u128::from(sums[1].saturating_sub(sums[2])) * u128::from(meta.length) / u128::from(sums[0]);
    let saves = u64::try_from(saves).unwrap_or(u64::MAX);
    if saves < 2 * zdict.len() as u64 || zdict.len() > MAX_ZDICT_LEN {
        return Ok(None);
    }
    Ok(Some(Trained {
        dict_len: dict.raw.len(),
        zdict,
        probe: sums,
        saves,
    }))
}

/// One batch's frame (public for the benches, which measure what it sends).
pub struct BatchEncoder<'d> {
    enc: Encoder<'d>,
    chunk: Vec<u8>,
}

impl std::fmt::Debug for BatchEncoder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchEncoder").finish_non_exhaustive()
    }
}

impl<'d> BatchEncoder<'d> {
    /// A new frame, with `dict` if given (the peer holds the same one).
    pub fn new(dict: Option<&'d Dictionary>) -> io::Result<Self> {
        let mut enc = match dict {
            Some(d) => Encoder::with_prepared_dictionary(d.for_encoding()?)?,
            None => Encoder::new(LEVEL)?,
        };
        enc.set_parameter(CParameter::WindowLog(WINDOW_LOG))?;
        Ok(Self {
            enc,
            chunk: Vec::with_capacity(32 << 10),
        })
    }

    /// Compress `raw`, block `b`, as the next part of the frame (`last` ends it), and append
    /// its message under the peer's extension id `id`. Returns the compressed bytes.
    pub fn block(
        &mut self,
        id: u8,
        b: &BlockRef,
        raw: &[u8],
        last: bool,
        out: &mut BytesMut,
    ) -> io::Result<u64> {
        self.chunk.clear();
        let mut buf = [0u8; 16 << 10];
        let mut input = InBuffer::around(raw);
        while input.pos < raw.len() {
            let mut o = OutBuffer::around(&mut buf[..]);
            self.enc.run(&mut input, &mut o)?;
            let n = o.pos();
            self.chunk.extend_from_slice(&buf[..n]);
        }
        loop {
            let mut o = OutBuffer::around(&mut buf[..]);
            let left = if last {
                self.enc.finish(&mut o, true)?
            } else {
                self.enc.flush(&mut o)?
            };
            let n = o.pos();
            self.chunk.extend_from_slice(&buf[..n]);
            if left == 0 {
                break;
            }
        }
        ext::encode_zblock(id, b.index, b.begin, b.length, &self.chunk, out);
        Ok(self.chunk.len() as u64)
    }
}

/// A connection's inflating side: the frame being received, if one is open, and the
/// dictionary its decoder came from (it goes back there when the frame ends).
#[derive(Default)]
pub(crate) struct StreamDecoder {
    dec: Option<(Decoder<'static>, Option<Arc<Dictionary>>)>,
}

impl StreamDecoder {
    /// Inflate the next message's bytes into exactly `length` bytes. A frame's first message
    /// names the dictionary it needs, if any: `dict` must be that one.
    pub(crate) fn block(
        &mut self,
        chunk: &[u8],
        length: usize,
        dict: Option<&Arc<Dictionary>>,
    ) -> Result<Vec<u8>, String> {
        let (dec, _) = match &mut self.dec {
            Some(d) => d,
            None => {
                let wanted = zstd::zstd_safe::get_dict_id_from_frame(chunk).map(|id| id.get());
                let opened = match (wanted, dict) {
                    (None, _) => (frame_decoder(&[]).map_err(|e| e.to_string())?, None),
                    (Some(id), Some(dict)) if dict.id == id => (
                        dict.decoder().map_err(|e| e.to_string())?,
                        Some(dict.clone()),
                    ),
                    (Some(id), _) => {
                        return Err(format!(
                            "compressed block needs dictionary {id}, which this package's metainfo does not carry"
                        ));
                    }
                };
                self.dec.insert(opened)
            }
        };
        let mut data = vec![0u8; length];
        let mut input = InBuffer::around(chunk);
        let mut output = OutBuffer::around(&mut data[..]);
        let mut frame_done;
        loop {
            let (in_before, out_before) = (input.pos, output.pos());
            let hint = dec
                .run(&mut input, &mut output)
                .map_err(|e| format!("corrupt compressed block: {e}"))?;
            frame_done = hint == 0;
            let progressed = input.pos != in_before || output.pos() != out_before;
            if frame_done || (input.pos == chunk.len() && !progressed) {
                break;
            }
            if output.pos() == length && input.pos < chunk.len() {
                return Err("compressed block inflates past its length".into());
            }
            if !progressed {
                break;
            }
        }
        let got = output.pos();
        if frame_done {
            if let Some((d, Some(dict))) = self.dec.take() {
                dict.give_back(d);
            }
            if input.pos < chunk.len() {
                return Err("data after the end of a compressed batch".into());
            }
        }
        if got != length {
            return Err(format!(
                "compressed block inflates to {got} bytes, not {length}"
            ));
        }
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use fbpkg_common::wire::Message;

    use super::*;

    fn text(n: usize, seed: u32) -> Vec<u8> {
        (0..n as u32)
            .map(|i| b"config = value; other = 17\n"[((i ^ seed) % 27) as usize])
            .collect()
    }

    fn blocks(out: &mut BytesMut) -> Vec<(u32, u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while let Some(m) = Message::decode(out, 1 << 20).unwrap() {
            let Message::Extended { id: 9, payload } = m else {
                panic!("{m:?}")
            };
            let (i, b, l, c) = ext::decode_zblock(&payload).unwrap();
            v.push((i, b, l, c.to_vec()));
        }
        v
    }

    #[test]
    fn a_batch_inflates_block_by_block_and_two_batches_in_a_row() {
        let mut dec = StreamDecoder::default();
        for batch in 0..2u32 {
            let raws: Vec<Vec<u8>> = (0..5).map(|i| text(16384, i * 7 + batch)).collect();
            let mut enc = BatchEncoder::new(None).unwrap();
            let mut out = BytesMut::new();
            let mut wire = 0;
            for (i, raw) in raws.iter().enumerate() {
                let b = BlockRef {
                    index: batch,
                    begin: i as u32 * 16384,
                    length: 16384,
                };
                wire += enc
                    .block(9, &b, raw, i == raws.len() - 1, &mut out)
                    .unwrap();
            }
            assert!(wire < 5 * 16384 / 10, "{wire} bytes on the wire");
            for (k, (index, begin, length, chunk)) in blocks(&mut out).into_iter().enumerate() {
                assert_eq!((index, begin), (batch, k as u32 * 16384));
                assert_eq!(dec.block(&chunk, length as usize, None).unwrap(), raws[k]);
            }
            assert!(dec.dec.is_none(), "the batch's frame is closed");
        }
    }

    #[test]
    fn a_block_that_inflates_past_its_length_is_refused() {
        let raw = text(16384, 1);
        let mut enc = BatchEncoder::new(None).unwrap();
        let mut out = BytesMut::new();
        let b = BlockRef {
            index: 0,
            begin: 0,
            length: 16384,
        };
        enc.block(9, &b, &raw, true, &mut out).unwrap();
        let (_, _, _, chunk) = blocks(&mut out).remove(0);
        assert!(StreamDecoder::default().block(&chunk, 16383, None).is_err());
        assert!(StreamDecoder::default().block(&chunk, 16385, None).is_err());
        assert!(
            StreamDecoder::default()
                .block(b"not zstd at all", 16384, None)
                .is_err()
        );
    }

    /// Text made of lines drawn from a vocabulary larger than a batch's history: what a tree of
    /// small source files looks like to one batch.
    fn corpus(len: usize, seed: u64) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let vocab: Vec<Vec<u8>> = (0..3000)
            .map(|_| {
                let n = 20 + next() % 60;
                (0..n)
                    .map(|_| b"abcdefghijklmnop_(). =\""[(next() % 23) as usize])
                    .collect()
            })
            .collect();
        let mut y = seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
        let mut out = Vec::with_capacity(len + 100);
        while out.len() < len {
            y ^= y << 13;
            y ^= y >> 7;
            y ^= y << 17;
            out.extend_from_slice(&vocab[(y % 3000) as usize]);
            out.push(b'\n');
        }
        out.truncate(len);
        out
    }

    fn package(bytes: &[u8]) -> Metainfo {
        Metainfo::build(
            bytes,
            bytes.len() as u64,
            "p",
            "http://127.0.0.1:1/announce",
            fbpkg_common::metainfo::Format::File,
        )
        .unwrap()
    }

    fn trained(bytes: &[u8]) -> Option<Trained> {
        train(&package(bytes), |at, buf| {
            let at = at as usize;
            buf.copy_from_slice(&bytes[at..at + buf.len()]);
            Ok(())
        })
        .unwrap()
    }

    /// The wire bytes of `raw` sent as one batch of 16 KiB blocks, and the blocks decoded by
    /// `dec` with `theirs` as the receiver's dictionary.
    fn round_trip(
        raw: &[u8],
        ours: Option<&Dictionary>,
        dec: &mut StreamDecoder,
        theirs: Option<&Arc<Dictionary>>,
    ) -> Result<u64, String> {
        let mut enc = BatchEncoder::new(ours).unwrap();
        let mut out = BytesMut::new();
        let mut wire = 0;
        let n = raw.len() / 16384;
        for k in 0..n {
            let b = BlockRef {
                index: 0,
                begin: (k * 16384) as u32,
                length: 16384,
            };
            let block = &raw[k * 16384..(k + 1) * 16384];
            wire += enc.block(9, &b, block, k + 1 == n, &mut out).unwrap();
        }
        for (k, (_, _, length, chunk)) in blocks(&mut out).into_iter().enumerate() {
            let got = dec.block(&chunk, length as usize, theirs)?;
            assert_eq!(got, &raw[k * 16384..(k + 1) * 16384]);
        }
        Ok(wire)
    }

    #[test]
    fn a_trained_dictionary_shrinks_batches_and_travels_in_the_metainfo() {
        let bytes = corpus(4 << 20, 1);
        let t = trained(&bytes).expect("a corpus of repeated lines gets a dictionary");
        assert!(t.saves >= 2 * t.zdict.len() as u64, "{t:?}");
        assert!(t.probe[2] < t.probe[1] && t.probe[1] < t.probe[0], "{t:?}");
        let meta = package(&bytes).with_zdict(t.zdict.clone()).unwrap();
        let meta = Metainfo::parse(meta.as_bytes()).unwrap();
        let dict = Arc::new(Dictionary::of(&meta).unwrap().unwrap());
        assert_eq!(dict.raw.len(), t.dict_len);
        assert!(t.dict_len <= MAX_DICT_LEN);

        // A batch the dictionary never saw, with and without it; decoders go back to the
        // pool and serve the next frames.
        let batch = corpus(64 << 10, 99);
        let mut dec = StreamDecoder::default();
        let plain = round_trip(&batch, None, &mut dec, Some(&dict)).unwrap();
        for _ in 0..3 {
            let with = round_trip(&batch, Some(&dict), &mut dec, Some(&dict)).unwrap();
            assert!(
                with * 10 < plain * 9,
                "{with} bytes with it, {plain} without"
            );
            assert!(dec.dec.is_none());
        }
        assert_eq!(dict.pool.lock().unwrap().len(), 1);

        // A receiver without that dictionary refuses the frame, saying why.
        let other = Arc::new(
            Dictionary::from_raw(
                zstd::dict::from_samples(
                    &bytes
                        .chunks(32 << 10)
                        .map(|c| c.to_vec())
                        .collect::<Vec<_>>(),
                    32 << 10,
                )
                .unwrap(),
            )
            .unwrap(),
        );
        for theirs in [None, Some(&other)] {
            let e =
                round_trip(&batch, Some(&dict), &mut StreamDecoder::default(), theirs).unwrap_err();
            assert!(e.contains("dictionary"), "{e}");
        }
    }

    #[test]
    fn no_dictionary_for_random_bytes_or_a_small_package() {
        let mut x = 88172645463325252u64;
        let random: Vec<u8> = (0..4 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(trained(&random).is_none());
        assert!(trained(&corpus(LEAST_TRAINED as usize - 1, 3)).is_none());
        assert!(trained(&vec![0; 4 << 20]).is_none(), "padding only");
    }

    #[test]
    fn a_metainfo_dictionary_that_cannot_be_used_is_an_error() {
        let bytes = corpus(2 << 20, 5);
        for junk in [
            b"not zstd".to_vec(),
            zstd::bulk::compress(b"no dictionary magic", 3).unwrap(),
            zstd::bulk::compress(&vec![0; MAX_DICT_LEN + 1], 3).unwrap(),
        ] {
            let meta = package(&bytes).with_zdict(junk).unwrap();
            assert!(Dictionary::of(&meta).is_err());
        }
        assert!(Dictionary::of(&package(&bytes)).unwrap().is_none());
        // Magic and id intact, tables broken: refused before it is ever offered to peers.
        let good = zstd::dict::from_samples(
            &bytes
                .chunks(32 << 10)
                .map(<[u8]>::to_vec)
                .collect::<Vec<_>>(),
            32 << 10,
        )
        .unwrap();
        assert!(Dictionary::from_raw(good.clone()).is_ok());
        let mut broken = good;
        broken[8..40].fill(0xff);
        let meta = package(&bytes)
            .with_zdict(zstd::bulk::compress(&broken, 3).unwrap())
            .unwrap();
        assert!(Dictionary::of(&meta).is_err());
    }

    #[test]
    fn long_runs_of_zeros_are_left_out_of_training_samples() {
        let mut s = b"ab".to_vec();
        s.extend([0; ZERO_RUN - 1]);
        s.extend(b"cd");
        s.extend([0; ZERO_RUN]);
        s.extend(b"e");
        s.extend([0; 100]);
        let mut want = b"ab".to_vec();
        want.extend([0; ZERO_RUN - 1]);
        want.extend(b"cde");
        assert_eq!(without_zero_runs(s), want);
        assert_eq!(without_zero_runs(vec![0; 5]), vec![0; 5]);
        assert!(without_zero_runs(vec![0; 5000]).is_empty());
    }
}
