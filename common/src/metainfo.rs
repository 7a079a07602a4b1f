//! Metainfo (`.torrent`) for one package archive: built from bytes, parsed from untrusted input.
//!
//! fbpkg metainfo is BitTorrent v1, single-file, private:
//!
//! ```text
//! d
//!   8:announce  <tracker announce URL>
//!   4:info d
//!     6:length        <archive bytes>
//!     4:name          <file name: one safe path component>
//!     12:piece length <power of two, see piece_length_for>
//!     6:pieces        <20-byte SHA-1 per piece>
//!     7:private       1
//!     6:sha256        <SHA-256 of the archive, 64 lowercase hex characters>
//!     [14:x-fbpkg-format 7:tar.zst]      a package made from a directory
//!     [14:x-fbpkg-format 10:executable]  a file published with its execute bit
//!   e
//! e
//! ```
//!
//! Stock clients ignore unknown info keys, so `sha256` and `x-fbpkg-format` do not hurt interop,
//! and both are covered by the info-hash. The info-hash is always the SHA-1 of the info
//! dictionary's bytes exactly as they appear in the file.

use std::io::{self, Read};

use sha1::{Digest, Sha1};
use sha2::Sha256;

use crate::bencode::{self, Limits, Value, Writer};
use crate::error::{Error, clip};
use crate::ids::{InfoHash, Sha256Hash};

/// Smallest accepted piece: one 16 KiB block.
pub const MIN_PIECE_LENGTH: u64 = 16 << 10;
/// Largest accepted piece.
pub const MAX_PIECE_LENGTH: u64 = 64 << 20;
/// The wire protocol's request size; a piece is fetched in blocks of this size.
pub const BLOCK_SIZE: u32 = 16 << 10;
/// Info key that marks an archive made from a directory (a deterministic `tar.zst`).
pub const FORMAT_KEY: &str = "x-fbpkg-format";

/// What the archive holds, which decides how the launcher cache presents it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// A single file, placed in the cache as it is (read-only).
    File,
    /// A single file with its execute bit: placed in the cache `r-xr-xr-x`.
    Executable,
    /// A zstd-compressed tar of a directory, extracted into the cache.
    TarZst,
}

impl Format {
    /// Value of the `x-fbpkg-format` info key, if any.
    fn key_value(self) -> Option<&'static str> {
        match self {
            Format::File => None,
            Format::Executable => Some("executable"),
            Format::TarZst => Some("tar.zst"),
        }
    }
}

/// The rule for choosing a piece length from the archive size.
///
/// The smallest power of two, at least 32 KiB and at most 16 MiB, that keeps the package within
/// 2,048 pieces. Small pieces let a flash crowd start swapping early (a leecher can serve a
/// piece once it has verified it) and keep the endgame short; the 2,048 cap keeps the metainfo
/// at most 40 KiB of hashes and the per-peer bitfields at 256 bytes. Packages above 32 GiB get
/// more pieces rather than pieces beyond 16 MiB, so a corrupt piece never costs more than that.
///
/// | archive | piece | pieces |
/// |---|---|---|
/// | 1 MiB | 32 KiB | 32 |
/// | 256 MiB | 128 KiB | 2,048 |
/// | 1 GiB | 512 KiB | 2,048 |
/// | 10 GiB | 8 MiB | 1,280 |
pub fn piece_length_for(size: u64) -> u64 {
    const TARGET_PIECES: u64 = 2048;
    let mut len: u64 = 32 << 10;
    while len < (16 << 20) && size.div_ceil(len) > TARGET_PIECES {
        len *= 2;
    }
    len
}

/// A parsed or freshly built package metainfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metainfo {
    /// Top-level `announce`, if present.
    pub announce: Option<String>,
    /// BEP 12 `announce-list`: tiers of tracker URLs, tried in order within a tier. Entries
    /// that cannot be URLs (not UTF-8, not strings, past [`MAX_TIERS`] x [`MAX_TIER_URLS`])
    /// are left out: the list is a hint, and a package stays usable without it.
    pub announce_list: Vec<Vec<String>>,
    /// SHA-1 of the raw info dictionary.
    pub info_hash: InfoHash,
    /// The file name (a single safe path component).
    pub name: String,
    /// Archive length in bytes (at least 1).
    pub length: u64,
    /// Piece length in bytes (a power of two).
    pub piece_length: u64,
    /// SHA-1 of every piece.
    pub pieces: Vec<[u8; 20]>,
    /// Whether `private` is set (always, for metainfo we build).
    pub private: bool,
    /// SHA-256 of the whole archive.
    pub sha256: Sha256Hash,
    /// File or directory archive.
    pub format: Format,
    raw: Vec<u8>,
}

impl Metainfo {
    /// Build metainfo by reading exactly `size` bytes of an archive.
    ///
    /// One pass: SHA-1 per piece and SHA-256 of the whole, with a fixed 256 KiB buffer. Fails
    /// with `InvalidData` when the reader yields more or fewer than `size` bytes (the file
    /// changed while it was being published).
    pub fn build(
        mut reader: impl Read,
        size: u64,
        name: &str,
        announce: &str,
        format: Format,
    ) -> io::Result<Self> {
        let invalid = |e: Error| io::Error::new(io::ErrorKind::InvalidInput, e);
        check_file_name(name.as_bytes()).map_err(invalid)?;
        if size == 0 {
            return Err(invalid(Error::Metainfo("a package cannot be empty".into())));
        }
        let piece_length = piece_length_for(size);
        let mut pieces =
            Vec::with_capacity(usize::try_from(size.div_ceil(piece_length)).unwrap_or(0));
        let mut whole = Sha256::new();
        let mut piece = Sha1::new();
        let mut in_piece: u64 = 0;
        let mut total: u64 = 0;
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            total += n as u64;
            if total > size {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "archive grew while it was read",
                ));
            }
            let mut chunk = &buf[..n];
            whole.update(chunk);
            while !chunk.is_empty() {
                let take = usize::try_from((piece_length - in_piece).min(chunk.len() as u64))
                    .unwrap_or(chunk.len());
                piece.update(&chunk[..take]);
                in_piece += take as u64;
                chunk = &chunk[take..];
                if in_piece == piece_length {
                    pieces.push(piece.finalize_reset().into());
                    in_piece = 0;
                }
            }
        }
        if total != size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("archive is {total} bytes, expected {size}"),
            ));
        }
        if in_piece > 0 {
            pieces.push(piece.finalize().into());
        }
        let sha256 = Sha256Hash(whole.finalize().into());
        Ok(Self::assemble(
            announce,
            name,
            size,
            piece_length,
            pieces,
            sha256,
            format,
        ))
    }

    fn assemble(
        announce: &str,
        name: &str,
        length: u64,
        piece_length: u64,
        pieces: Vec<[u8; 20]>,
        sha256: Sha256Hash,
        format: Format,
    ) -> Self {
        // Keys in sorted order, as bencode requires.
        let mut info = Writer::with_capacity(pieces.len() * 20 + 256);
        info.dict()
            .key_int("length", to_i64(length))
            .key_bytes("name", name.as_bytes());
        info.key_int("piece length", to_i64(piece_length));
        info.bytes(b"pieces");
        info.buf
            .extend_from_slice(format!("{}:", pieces.len() * 20).as_bytes());
        for p in &pieces {
            info.buf.extend_from_slice(p);
        }
        info.key_int("private", 1)
            .key_bytes("sha256", sha256.to_hex().as_bytes());
        if let Some(v) = format.key_value() {
            info.key_bytes(FORMAT_KEY, v.as_bytes());
        }
        info.end();
        let info = info.finish();
        let info_hash = InfoHash(Sha1::digest(&info).into());
        let mut top = Writer::with_capacity(info.len() + announce.len() + 64);
        top.dict()
            .key_bytes("announce", announce.as_bytes())
            .bytes(b"info")
            .raw(&info)
            .end();
        Self {
            announce: Some(announce.to_owned()),
            announce_list: Vec::new(),
            info_hash,
            name: name.to_owned(),
            length,
            piece_length,
            pieces,
            private: true,
            sha256,
            format,
            raw: top.finish(),
        }
    }

    /// Parse untrusted metainfo bytes under [`Limits::METAINFO`].
    pub fn parse(bytes: &[u8]) -> Result<Self, Error> {
        let top = bencode::decode(bytes, &Limits::METAINFO)?;
        let top = top.as_dict("metainfo")?;
        let announce = match bencode::get(top, "announce") {
            None => None,
            Some(v) => Some(
                v.as_bytes()
                    .and_then(|b| std::str::from_utf8(b).ok())
                    .ok_or_else(|| Error::Metainfo("announce is not a UTF-8 string".into()))?
                    .to_owned(),
            ),
        };
        let announce_list = announce_list(bencode::get(top, "announce-list"));
        let (info, span) = top
            .get(&b"info"[..])
            .ok_or_else(|| Error::Metainfo("no info dictionary".into()))?;
        let info_hash = InfoHash(Sha1::digest(&bytes[span.clone()]).into());
        let info = info.as_dict("info")?;
        if info.contains_key(&b"files"[..]) {
            return Err(Error::MultiFile);
        }
        let int = |key: &str| -> Result<i64, Error> {
            bencode::get(info, key)
                .ok_or_else(|| Error::Metainfo(format!("info.{key} is missing")))?
                .as_int()
                .ok_or_else(|| Error::Metainfo(format!("info.{key} is not an integer")))
        };
        let raw_bytes = |key: &str| -> Result<&[u8], Error> {
            bencode::get(info, key)
                .ok_or_else(|| Error::Metainfo(format!("info.{key} is missing")))?
                .as_bytes()
                .ok_or_else(|| Error::Metainfo(format!("info.{key} is not a byte string")))
        };

        let name_bytes = raw_bytes("name")?;
        check_file_name(name_bytes)?;
        let name = String::from_utf8_lossy(name_bytes).into_owned();

        let length = u64::try_from(int("length")?)
            .ok()
            .filter(|&l| l > 0)
            .ok_or_else(|| Error::Metainfo("info.length must be a positive integer".into()))?;
        let piece_length_raw = int("piece length")?;
        let piece_length = u64::try_from(piece_length_raw).unwrap_or(0);
        if !piece_length.is_power_of_two()
            || !(MIN_PIECE_LENGTH..=MAX_PIECE_LENGTH).contains(&piece_length)
        {
            return Err(Error::PieceLength(piece_length_raw.unsigned_abs()));
        }
        let hashes = raw_bytes("pieces")?;
        let expected = length.div_ceil(piece_length);
        if hashes.len() % 20 != 0 || (hashes.len() / 20) as u64 != expected {
            return Err(Error::PieceCount {
                got: (hashes.len() / 20) as u64,
                expected,
                length,
                piece_length,
            });
        }
        let pieces = hashes
            .chunks_exact(20)
            .map(|c| <[u8; 20]>::try_from(c).unwrap_or([0; 20]))
            .collect();
        let private = match bencode::get(info, "private") {
            None => false,
            Some(v) => v.as_int() == Some(1),
        };
        let sha256_hex = raw_bytes("sha256")?;
        let sha256 = std::str::from_utf8(sha256_hex)
            .ok()
            .and_then(|s| Sha256Hash::from_hex(s).ok())
            .ok_or_else(|| {
                Error::Metainfo("info.sha256 is not 64 lowercase hex characters".into())
            })?;
        let format = match bencode::get(info, FORMAT_KEY) {
            None => Format::File,
            Some(v) if v.as_bytes() == Some(b"tar.zst") => Format::TarZst,
            Some(v) if v.as_bytes() == Some(b"executable") => Format::Executable,
            Some(_) => {
                return Err(Error::Metainfo(format!(
                    "info.{FORMAT_KEY} has an unknown value"
                )));
            }
        };
        Ok(Self {
            announce,
            announce_list,
            info_hash,
            name,
            length,
            piece_length,
            pieces,
            private,
            sha256,
            format,
            raw: bytes.to_vec(),
        })
    }

    /// The metainfo file's bytes (exactly as parsed, or as built).
    pub fn as_bytes(&self) -> &[u8] {
        &self.raw
    }

    /// Number of pieces.
    pub fn num_pieces(&self) -> u32 {
        u32::try_from(self.pieces.len()).unwrap_or(u32::MAX)
    }

    /// Byte offset of piece `index` in the archive.
    pub fn piece_offset(&self, index: u32) -> u64 {
        u64::from(index) * self.piece_length
    }

    /// Length of piece `index` (the last one may be short); 0 past the end.
    pub fn piece_size(&self, index: u32) -> u32 {
        let start = self.piece_offset(index);
        if start >= self.length {
            return 0;
        }
        // piece_length <= 64 MiB, so this fits in u32.
        u32::try_from((self.length - start).min(self.piece_length)).unwrap_or(u32::MAX)
    }

    /// Same info-hash, and so the same content, pieces and name.
    pub fn same_version(&self, other: &Metainfo) -> bool {
        self.info_hash == other.info_hash
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A file name must be one path component that is safe on every host that unpacks it.
pub fn check_file_name(name: &[u8]) -> Result<(), Error> {
    let shown = String::from_utf8_lossy(name);
    let bad = |why| {
        Err(Error::UnsafeName {
            name: clip(&shown),
            why,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > 255 {
        return bad("it is longer than 255 bytes");
    }
    if std::str::from_utf8(name).is_err() {
        return bad("it is not UTF-8");
    }
    if name == b"." || name == b".." {
        return bad("it is a relative directory reference");
    }
    if name.windows(2).any(|w| w == b"..") {
        return bad("it contains '..'");
    }
    if name.iter().any(|&b| b == b'/' || b == b'\\') {
        return bad("it contains a path separator");
    }
    if name.contains(&0) {
        return bad("it contains NUL");
    }
    if name.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return bad("it contains a control character");
    }
    Ok(())
}

/// Most `announce-list` tiers read, and URLs per tier.
pub const MAX_TIERS: usize = 16;
/// See [`MAX_TIERS`].
pub const MAX_TIER_URLS: usize = 16;
/// Longest tracker URL read from `announce-list`.
const MAX_URL_LEN: usize = 1024;

/// The usable part of a BEP 12 `announce-list`: lists of UTF-8 strings, empty tiers dropped.
fn announce_list(v: Option<&Value<'_>>) -> Vec<Vec<String>> {
    let Some(Value::List(tiers)) = v else {
        return Vec::new();
    };
    tiers
        .iter()
        .filter_map(|tier| match tier {
            Value::List(urls) => Some(
                urls.iter()
                    .filter_map(|u| u.as_bytes())
                    .filter(|b| b.len() <= MAX_URL_LEN)
                    .filter_map(|b| std::str::from_utf8(b).ok())
                    .take(MAX_TIER_URLS)
                    .map(str::to_owned)
                    .collect::<Vec<_>>(),
            ),
            _ => None,
        })
        .filter(|tier| !tier.is_empty())
        .take(MAX_TIERS)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn piece_length_rule() {
        assert_eq!(piece_length_for(1), 32 << 10);
        assert_eq!(piece_length_for(1 << 20), 32 << 10);
        assert_eq!(piece_length_for(256 << 20), 128 << 10);
        assert_eq!(piece_length_for(1 << 30), 512 << 10);
        assert_eq!(piece_length_for(10 << 30), 8 << 20);
        assert_eq!(piece_length_for(1 << 40), 16 << 20);
    }

    #[test]
    fn build_then_parse_round_trips() {
        let bytes = data(100_000);
        let m = Metainfo::build(
            &bytes[..],
            bytes.len() as u64,
            "pkg.bin",
            "http://127.0.0.1:6969/announce",
            Format::File,
        )
        .unwrap();
        assert_eq!(m.num_pieces(), 4);
        assert_eq!(m.piece_size(3), 100_000 - 3 * 32768);
        assert_eq!(m.piece_size(4), 0);
        assert_eq!(m.sha256.0, <[u8; 32]>::from(Sha256::digest(&bytes)));
        assert_eq!(
            m.pieces[1],
            <[u8; 20]>::from(Sha1::digest(&bytes[32768..65536]))
        );
        let p = Metainfo::parse(m.as_bytes()).unwrap();
        assert_eq!(p, m);
    }

    #[test]
    fn announce_list_tiers_keep_usable_urls() {
        let info = format!(
            "d6:sha25664:{}4:name1:x6:lengthi5e12:piece lengthi16384e6:pieces20:{}e",
            "a".repeat(64),
            "p".repeat(20)
        );
        // Tier 1: two URLs; tier 2: a non-UTF-8 entry and an integer (left out) and one URL;
        // tier 3: nothing usable (dropped); then a tier that is not a list (dropped).
        let list =
            b"ll17:http://a/announce17:http://b/announceel2:\xff\xfei3e9:http://c/el1:\xfeei7ee";
        let mut file = b"d8:announce10:http://t/a13:announce-list".to_vec();
        file.extend_from_slice(list);
        file.extend_from_slice(format!("4:info{info}e").as_bytes());
        let m = Metainfo::parse(&file).unwrap();
        assert_eq!(m.announce.as_deref(), Some("http://t/a"));
        assert_eq!(
            m.announce_list,
            vec![
                vec![
                    "http://a/announce".to_owned(),
                    "http://b/announce".to_owned()
                ],
                vec!["http://c/".to_owned()],
            ]
        );
    }

    #[test]
    fn info_hash_is_over_raw_bytes_not_a_reencoding() {
        // Unsorted keys in the info dict: re-encoding would sort them and change the hash.
        let info = format!(
            "d6:sha25664:{}4:name1:x6:lengthi5e12:piece lengthi16384e6:pieces20:{}e",
            "a".repeat(64),
            "p".repeat(20)
        );
        let file = format!("d4:info{info}e");
        let m = Metainfo::parse(file.as_bytes()).unwrap();
        assert_eq!(
            m.info_hash.0,
            <[u8; 20]>::from(Sha1::digest(info.as_bytes()))
        );
        assert!(!m.private);
    }

    #[test]
    fn rejects_hostile_metainfo() {
        let good_info = |name: &str, len: i64, pl: i64, n: usize| {
            format!(
                "d4:infod6:lengthi{len}e4:name{}:{name}12:piece lengthi{pl}e6:pieces{}:{}6:sha25664:{}ee",
                name.len(),
                n * 20,
                "p".repeat(n * 20),
                "a".repeat(64)
            )
        };
        let cases: Vec<(String, &str)> = vec![
            (good_info("../x", 5, 16384, 1), "'..'"),
            (good_info("a/b", 5, 16384, 1), "separator"),
            (good_info("a\u{1}", 5, 16384, 1), "control"),
            (good_info("", 5, 16384, 1), "empty"),
            (good_info("x", 5, 16384, 2), "expected 1"),
            (good_info("x", 5, 20000, 1), "power of two"),
            (good_info("x", 0, 16384, 0), "positive"),
            (good_info("x", -5, 16384, 0), "positive"),
            ("d4:infod5:filesle4:name1:xee".into(), "multi-file"),
            ("d4:infoi1ee".into(), "not a dictionary"),
            ("d8:announce1:xe".into(), "no info"),
            (format!("{}{}", "l".repeat(100), "e".repeat(100)), "nesting"),
        ];
        for (input, needle) in cases {
            let err = Metainfo::parse(input.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(needle), "{input:?}: {err}");
        }
        let nul = good_info("a\0b", 5, 16384, 1);
        assert!(
            Metainfo::parse(nul.as_bytes())
                .unwrap_err()
                .to_string()
                .contains("NUL")
        );
    }

    #[test]
    fn build_detects_size_mismatch() {
        let bytes = data(1000);
        assert!(Metainfo::build(&bytes[..], 999, "x", "a", Format::File).is_err());
        assert!(Metainfo::build(&bytes[..], 1001, "x", "a", Format::File).is_err());
        assert!(Metainfo::build(&b""[..], 0, "x", "a", Format::File).is_err());
        assert!(Metainfo::build(&bytes[..], 1000, "a/b", "a", Format::File).is_err());
    }

    proptest! {
        #[test]
        fn round_trip_any_size(len in 1usize..200_000, f in 0..3usize) {
            let bytes = data(len);
            let format = [Format::File, Format::Executable, Format::TarZst][f];
            let m = Metainfo::build(&bytes[..], len as u64, "p", "http://t/announce", format).unwrap();
            prop_assert_eq!(Metainfo::parse(m.as_bytes()).unwrap(), m);
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Metainfo::parse(&bytes);
        }
    }
}
