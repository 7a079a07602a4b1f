//! Bytes checked against their metainfo as they stream past: the length, every piece's SHA-1
//! and the SHA-256 of the whole, in one pass.
//!
//! One pass matters twice. A copy into the cache is checked as it is written, so the bytes
//! checked are the bytes kept: hashing a user's file and then copying it would let a change in
//! between into the cache under a name its bytes do not match. And a verify reads each byte of
//! an entry once.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use fbpkg_common::Sha256Hash;
use fbpkg_common::metainfo::Metainfo;
use sha1::Sha1;
use sha2::{Digest, Sha256};

use crate::error::{PeerError, Result};

/// Read size. 1 MiB keeps the syscall count low; the measured hashing rate does not improve
/// beyond it.
const CHUNK: usize = 1 << 20;

/// Checks bytes against a metainfo as they are fed in, in order.
#[derive(Debug)]
pub(crate) struct ArchiveCheck<'a> {
    meta: &'a Metainfo,
    pieces: bool,
    whole: Sha256,
    piece: Sha1,
    in_piece: u64,
    index: usize,
    total: u64,
}

impl<'a> ArchiveCheck<'a> {
    /// With `pieces`, every piece's SHA-1 is checked too (what a seeder serves must match the
    /// metainfo it announces); without, only the length and the SHA-256.
    pub(crate) fn new(meta: &'a Metainfo, pieces: bool) -> Self {
        Self {
            meta,
            pieces,
            whole: Sha256::new(),
            piece: Sha1::new(),
            in_piece: 0,
            index: 0,
            total: 0,
        }
    }

    /// Checks the length and the SHA-256 (not the pieces) of bytes whose first `offset` were
    /// fed to `whole` already. Fails if `offset` is past the package's length.
    pub(crate) fn resume(meta: &'a Metainfo, whole: Sha256, offset: u64) -> Result<Self, String> {
        if offset > meta.length {
            return Err(format!(
                "{offset} bytes hashed of a package of {}",
                meta.length
            ));
        }
        Ok(Self {
            whole,
            total: offset,
            ..Self::new(meta, false)
        })
    }

    /// Feed the next bytes. Fails at the first piece that differs, or past the length.
    pub(crate) fn update(&mut self, mut chunk: &[u8]) -> Result<(), String> {
        self.total += chunk.len() as u64;
        if self.total > self.meta.length {
            return Err(format!("longer than {} bytes", self.meta.length));
        }
        self.whole.update(chunk);
        if !self.pieces {
            return Ok(());
        }
        let piece_length = self.meta.piece_length;
        while !chunk.is_empty() {
            let take = usize::try_from((piece_length - self.in_piece).min(chunk.len() as u64))
                .unwrap_or(chunk.len());
            self.piece.update(&chunk[..take]);
            self.in_piece += take as u64;
            chunk = &chunk[take..];
            if self.in_piece == piece_length {
                self.end_piece()?;
            }
        }
        Ok(())
    }

    fn end_piece(&mut self) -> Result<(), String> {
        let got: [u8; 20] = self.piece.finalize_reset().into();
        self.in_piece = 0;
        let index = self.index;
        self.index += 1;
        match self.meta.pieces.get(index) {
            Some(want) if *want == got => Ok(()),
            Some(_) => Err(format!("piece {index} does not match its SHA-1")),
            None => Err(format!(
                "more pieces than the {} listed",
                self.meta.pieces.len()
            )),
        }
    }

    /// Bytes fed so far.
    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    /// All bytes fed: check the length, the last piece and the SHA-256.
    pub(crate) fn finish(mut self) -> Result<(), String> {
        if self.total != self.meta.length {
            return Err(wrong_length(self.total, self.meta));
        }
        if self.pieces && self.in_piece > 0 {
            self.end_piece()?;
        }
        let actual = Sha256Hash(self.whole.finalize().into());
        if actual != self.meta.sha256 {
            return Err(format!("its SHA-256 is {actual}, not {}", self.meta.sha256));
        }
        Ok(())
    }
}

/// What stopped a [`stream`].
#[derive(Debug)]
pub(crate) enum StreamError {
    /// Reading the source failed.
    Read(io::Error),
    /// Writing the copy failed.
    Write(io::Error),
    /// The bytes are not the ones the metainfo describes.
    Mismatch(String),
}

/// Read `src` through a check into `sink`, never reading more than one byte past the package's
/// length (a file growing while it is copied cannot fill the disk). Returns the bytes read.
pub(crate) fn stream(
    src: impl Read,
    sink: &mut impl Write,
    meta: &Metainfo,
    pieces: bool,
) -> Result<u64, StreamError> {
    stream_into(src, sink, ArchiveCheck::new(meta, pieces))
}

/// [`stream`] through `check`, which may have been fed the start of the bytes already.
fn stream_into(
    src: impl Read,
    sink: &mut impl Write,
    mut check: ArchiveCheck<'_>,
) -> Result<u64, StreamError> {
    let left = check.meta.length.saturating_sub(check.total());
    let mut src = src.take(left.saturating_add(1));
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(StreamError::Read(e)),
        };
        check.update(&buf[..n]).map_err(StreamError::Mismatch)?;
        sink.write_all(&buf[..n]).map_err(StreamError::Write)?;
    }
    let total = check.total();
    check.finish().map_err(StreamError::Mismatch)?;
    Ok(total)
}

/// Copy `src` to the new file `dst` (mode 0600), checking length, pieces and SHA-256 on the
/// way. On error `dst` may hold part of the bytes; the caller removes it with its staging
/// directory. Every handle is closed on return, whatever happens.
pub(crate) fn copy_checked(src: &Path, dst: &Path, meta: &Metainfo) -> Result<()> {
    let from = open_source(src)?;
    let mut to = create_copy(dst)?;
    match stream(from, &mut to, meta, true) {
        Ok(_) => Ok(()),
        Err(StreamError::Read(e)) => Err(PeerError::io("reading", src)(e)),
        Err(StreamError::Write(e)) => Err(PeerError::io("copying into the cache", dst)(e)),
        Err(StreamError::Mismatch(why)) => Err(PeerError::Verification(format!(
            "{} is not the file its metainfo was built from (did it change while it was \
             published?): {why}",
            src.display()
        ))),
    }
}

/// A reader that writes each byte it hands out to `to` first: a copy made by whatever reads
/// through it, of exactly what it read ([`crate::cache::Cache::install_built`]). Once a write
/// fails it writes no more but goes on reading, so the reader still learns what the bytes
/// are (a version already in the cache needs no copy); the copy is then short, and
/// [`Tee::write_error`] says why.
pub(crate) struct Tee<'a, R> {
    from: R,
    to: &'a mut File,
    write_error: Option<io::Error>,
}

impl<'a, R: Read> Tee<'a, R> {
    pub(crate) fn new(from: R, to: &'a mut File) -> Self {
        Self {
            from,
            to,
            write_error: None,
        }
    }

    /// Why the copy is incomplete, if it is.
    pub(crate) fn write_error(self) -> Option<io::Error> {
        self.write_error
    }
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.from.read(buf)?;
        if self.write_error.is_none()
            && let Err(e) = self.to.write_all(&buf[..n])
        {
            self.write_error = Some(e);
        }
        Ok(n)
    }
}

/// Open `path`, a file whose bytes go into the cache, for reading: refused, saying what it
/// is, unless a regular file. The open does not block, so a FIFO named by mistake is an error
/// at once, not a reader (in the agent, a thread) waiting for a writer that never comes.
pub(crate) fn open_source(path: &Path) -> Result<File> {
    use rustix::fs::{FileType, OFlags};
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(PeerError::io("opening", path))?;
    let kind = match rustix::fs::fstat(&f).map(|st| FileType::from_raw_mode(st.st_mode)) {
        Ok(FileType::RegularFile) => None,
        Ok(FileType::Directory) => Some("a directory"),
        Ok(FileType::Fifo) => Some("a FIFO"),
        Ok(FileType::Socket) => Some("a socket"),
        Ok(FileType::CharacterDevice | FileType::BlockDevice) => Some("a device"),
        Ok(_) => Some("not a file"),
        Err(e) => return Err(PeerError::io("reading metadata", path)(e.into())),
    };
    if let Some(kind) = kind {
        return Err(PeerError::BadInput(format!(
            "{} is {kind}, not a regular file",
            path.display()
        )));
    }
    // Reads as from any other open (a regular file's reads never block anyway).
    rustix::fs::fcntl_setfl(&f, OFlags::empty())
        .map_err(|e| PeerError::io("opening", path)(e.into()))?;
    Ok(f)
}

/// A new file for a copy into staging, private until the entry is made read-only; never an
/// existing one (nor through a link).
pub(crate) fn create_copy(dst: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)
        .map_err(PeerError::io("creating", dst))
}

/// Check the file at `path` in place: length and SHA-256 (and pieces with `pieces`).
pub(crate) fn file_matches(path: &Path, meta: &Metainfo, pieces: bool) -> Result<()> {
    file_check(path, ArchiveCheck::new(meta, pieces))
}

/// Check the length and SHA-256 of the file at `path`, whose first `offset` bytes were read
/// from it and fed to `whole` already (while it downloaded): only the rest is read.
pub(crate) fn rest_matches(
    path: &Path,
    meta: &Metainfo,
    (whole, offset): (Sha256, u64),
) -> Result<()> {
    let check = ArchiveCheck::resume(meta, whole, offset).map_err(not_asked_for)?;
    file_check(path, check)
}

/// A file that is not the package's archive.
fn not_asked_for(why: String) -> PeerError {
    PeerError::Verification(format!("the archive is not the one asked for: {why}"))
}

/// `got` bytes where the package has its length.
fn wrong_length(got: u64, meta: &Metainfo) -> String {
    format!("{got} bytes, not the {} of the package", meta.length)
}

fn file_check(path: &Path, check: ArchiveCheck<'_>) -> Result<()> {
    let mut f = open_source(path)?;
    let offset = check.total();
    if offset > 0 {
        // Bytes hashed already must still be there: reading from past the end finds none.
        let len = f.metadata().map_err(PeerError::io("hashing", path))?.len();
        if len < offset {
            return Err(not_asked_for(wrong_length(len, check.meta)));
        }
        f.seek(SeekFrom::Start(offset))
            .map_err(PeerError::io("hashing", path))?;
    }
    match stream_into(f, &mut io::sink(), check) {
        Ok(_) => Ok(()),
        Err(StreamError::Read(e) | StreamError::Write(e)) => Err(PeerError::io("hashing", path)(e)),
        Err(StreamError::Mismatch(why)) => Err(not_asked_for(why)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fbpkg_common::metainfo::Format;

    fn meta(bytes: &[u8]) -> Metainfo {
        Metainfo::build(
            bytes,
            bytes.len() as u64,
            "f",
            "http://x/announce",
            Format::File,
        )
        .unwrap()
    }

    fn check(bytes: &[u8], m: &Metainfo) -> Result<(), String> {
        let mut c = ArchiveCheck::new(m, true);
        // Odd chunk sizes cross piece boundaries.
        for chunk in bytes.chunks(7777) {
            c.update(chunk)?;
        }
        c.finish()
    }

    #[test]
    fn same_bytes_pass_and_any_change_is_named() {
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let m = meta(&bytes);
        assert!(m.pieces.len() > 4, "several pieces");
        assert_eq!(check(&bytes, &m), Ok(()));

        let mut flipped = bytes.clone();
        flipped[m.piece_length as usize * 2 + 5] ^= 1;
        assert_eq!(
            check(&flipped, &m),
            Err("piece 2 does not match its SHA-1".into())
        );

        let err = check(&bytes[..bytes.len() - 1], &m).unwrap_err();
        assert!(err.contains("bytes, not the"), "{err}");
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(check(&longer, &m).unwrap_err().contains("longer than"));

        // Without pieces, the SHA-256 still catches it at the end.
        let mut c = ArchiveCheck::new(&m, false);
        c.update(&flipped).unwrap();
        assert!(c.finish().unwrap_err().contains("SHA-256"));
    }

    #[test]
    fn copy_keeps_only_what_matches() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = vec![7u8; 100_000];
        let m = meta(&bytes);
        let src = dir.path().join("src");
        std::fs::write(&src, b"other bytes entirely").unwrap();
        let err = copy_checked(&src, &dir.path().join("dst"), &m).unwrap_err();
        assert!(matches!(err, PeerError::Verification(_)), "{err}");
        std::fs::write(&src, &bytes).unwrap();
        copy_checked(&src, &dir.path().join("dst2"), &m).unwrap();
        assert_eq!(std::fs::read(dir.path().join("dst2")).unwrap(), bytes);
    }

    #[test]
    fn a_file_hashed_in_part_already_is_read_only_from_there() {
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let m = meta(&bytes);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, &bytes).unwrap();
        let at = m.piece_length * 2;
        let prefix = |upto: u64| Sha256::new().chain_update(&bytes[..upto as usize]);
        rest_matches(&path, &m, (prefix(at), at)).expect("prefix and rest make the archive");
        rest_matches(&path, &m, (prefix(m.length), m.length)).expect("all hashed already");
        file_matches(&path, &m, false).expect("and from the start");

        // The prefix is trusted as the file's first bytes; a wrong one fails the SHA-256.
        let mut other = Sha256::new();
        other.update(&bytes[1..at as usize + 1]);
        let err = rest_matches(&path, &m, (other, at))
            .unwrap_err()
            .to_string();
        assert!(err.contains("SHA-256"), "{err}");
        // Past the end, or a file longer than the package.
        let err = rest_matches(&path, &m, (prefix(0), m.length + 1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bytes hashed of a package of"), "{err}");
        std::fs::write(&path, [&bytes[..], b"x"].concat()).unwrap();
        let err = rest_matches(&path, &m, (prefix(at), at))
            .unwrap_err()
            .to_string();
        assert!(err.contains("longer than"), "{err}");
        // Shorter than what was hashed of it: not taken on the prefix's word.
        std::fs::write(&path, &bytes[..at as usize]).unwrap();
        let err = rest_matches(&path, &m, (prefix(m.length), m.length))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bytes, not the"), "{err}");
    }
}
