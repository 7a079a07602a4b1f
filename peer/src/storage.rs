//! The bytes of one package on disk, addressed by piece and block.
//!
//! Blocks are written at their offsets as they arrive (`pwrite`), so memory does not grow with
//! the package: nothing is buffered beyond the socket buffers. A piece is verified by reading
//! it back from the file in 64 KiB chunks through SHA-1 — the bytes checked are the bytes that
//! will be served and handed to the cache, not a copy in memory.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha1::{Digest, Sha1};

/// One package file, being downloaded (read-write) or seeded from the cache (read-only).
#[derive(Debug)]
pub struct PieceFile {
    file: File,
    path: PathBuf,
    len: u64,
}

impl PieceFile {
    /// Open or create a partial download of `len` bytes (sparse; existing bytes are kept so a
    /// restart can verify and keep them).
    pub fn open_partial(path: &Path, len: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        if file.metadata()?.len() != len {
            file.set_len(len)?;
        }
        Ok(Self {
            file,
            path: path.to_owned(),
            len,
        })
    }

    /// Open a complete file read-only (a cache entry being seeded).
    pub fn open_complete(path: &Path, len: u64) -> io::Result<Self> {
        let file = File::open(path)?;
        let actual = file.metadata()?.len();
        if actual != len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is {actual} bytes, the package is {len}", path.display()),
            ));
        }
        Ok(Self {
            file,
            path: path.to_owned(),
            len,
        })
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Zero length (never, for a valid package).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: u64, n: usize) -> io::Result<()> {
        match offset.checked_add(n as u64) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "block outside the package",
            )),
        }
    }

    /// Write a block at `offset`.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check(offset, data.len())?;
        self.file.write_all_at(data, offset)
    }

    /// Read exactly `buf.len()` bytes at `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len())?;
        self.file.read_exact_at(buf, offset)
    }

    /// SHA-1 of `len` bytes at `offset`, read back from the file.
    pub fn sha1_of(&self, offset: u64, len: u64) -> io::Result<[u8; 20]> {
        let mut hasher = Sha1::new();
        let mut buf = vec![0u8; 64 << 10];
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from((len - done).min(buf.len() as u64)).unwrap_or(buf.len());
            self.read_at(offset + done, &mut buf[..n])?;
            hasher.update(&buf[..n]);
            done += n as u64;
        }
        Ok(hasher.finalize().into())
    }

    /// Flush data and metadata to stable storage.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_land_at_offsets_and_hash_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.part");
        let f = PieceFile::open_partial(&p, 100).unwrap();
        f.write_at(10, b"hello").unwrap();
        assert!(f.write_at(98, b"xyz").is_err(), "past the end");
        let mut b = [0u8; 5];
        f.read_at(10, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        let mut expect = vec![0u8; 100];
        expect[10..15].copy_from_slice(b"hello");
        assert_eq!(
            f.sha1_of(0, 100).unwrap(),
            <[u8; 20]>::from(Sha1::digest(&expect))
        );
        drop(f);
        // Reopening keeps what was written (resume).
        let f = PieceFile::open_partial(&p, 100).unwrap();
        f.read_at(10, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        assert!(PieceFile::open_complete(&p, 99).is_err());
    }
}
