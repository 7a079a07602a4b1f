//! The bytes of one package on disk, addressed by piece and block.
//!
//! Blocks are written at their offsets as they arrive (`pwrite`), so memory does not grow with
//! the package: nothing is buffered beyond the socket buffers. A piece is verified against the
//! bytes written: those its blocks' writes hashed in order as they succeeded
//! (`engine/hashing.rs`), and the rest read back from disk in 64 KiB chunks.
//!
//! A package is one file (an archive, or a file as published) or, for a tree package, the
//! tree's regular files at their offsets in the torrent. Padding between them is never on
//! disk: it reads as zeros, and what a peer sends for it is dropped (a piece is checked with
//! zeros there, read back or hashed through [`PackageData::as_stored`]). Links and empty
//! directories take no bytes; the cache makes them at install.
//!
//! A tree's files are opened relative to a handle on its root directory, not by path: a
//! finished download's tree is renamed into the cache while peers are still served from it,
//! and the handle follows the directory where a path would not (or would meet files made
//! read-only by then, so reads open read-only).
//!
//! A download's tree may start with files hard-linked from a cached version of the package
//! (`cache/reuse.rs`): they are found at open (a file already there, at its length, with more
//! than one link), and are **copy on write**. A block for such a file that holds the bytes
//! already there is not written (the file's piece shares bytes with a neighbour that
//! changed, say); one that differs (a corrupt cached copy, or a peer's bad block) first gives
//! the file an inode of its own, a copy, so the cached version keeps its bytes whatever comes.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use fbpkg_common::metainfo::{FileKind, Format, Metainfo};
use sha1::{Digest, Sha1};

/// Where a tree package's files live in a download's work directory and in a cache entry.
pub const TREE_DIR: &str = "tree";
/// A single-file download's partial file in its work directory.
pub const PART_FILE: &str = "data.part";
/// Files of a tree kept open between reads; the others are opened for each block. Bounds the
/// descriptors one seeded package holds (a tree may have tens of thousands of small files).
const OPEN_FILES: usize = 64;

#[derive(Debug)]
struct Segment {
    /// Offset in the torrent.
    start: u64,
    len: u64,
    /// `None` for padding; a tree's files from its root.
    path: Option<PathBuf>,
    /// Kept open once used, for the largest files (never for a shared one, whose inode may
    /// change).
    keep: bool,
    file: OnceLock<File>,
    /// Found with other links at open (a file reused from a cached version): written copy on
    /// write ([`PackageData::write_shared`]).
    shared: bool,
}

/// One package's bytes, being downloaded (read-write) or seeded from the cache (read-only).
#[derive(Debug)]
pub struct PackageData {
    /// The file, or the tree's root directory.
    path: PathBuf,
    len: u64,
    writable: bool,
    /// A tree's root directory, which its files are opened from.
    root: Option<OwnedFd>,
    /// Byte ranges with bytes, in torrent order (zero-length entries left out).
    segments: Vec<Segment>,
    /// Held while a shared file is compared, copied or written: two writers of one file must
    /// not both copy it (rare: only blocks for shared files take it).
    unsharing: std::sync::Mutex<()>,
    /// Its files are on a filesystem in memory (tmpfs, ramfs): a read never waits on a
    /// device. Found from the first file read with [`PackageData::read_cached`].
    in_memory: OnceLock<bool>,
    /// `RWF_NOWAIT` reads work on its files (until one says they are not supported).
    nowait: AtomicBool,
}

impl PackageData {
    /// Open or create the partial download of `meta` in the work directory `dir`: sparse,
    /// and what is there is kept so a restart can verify and keep it.
    pub fn open_partial(dir: &Path, meta: &Metainfo) -> io::Result<Self> {
        if meta.format != Format::Tree {
            let path = dir.join(PART_FILE);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)?;
            if file.metadata()?.len() != meta.length {
                file.set_len(meta.length)?;
            }
            return Ok(Self::single(path, meta.length, file, true));
        }
        let root = dir.join(TREE_DIR);
        fs::create_dir_all(&root)?;
        let mut at = 0u64;
        let mut shared = Vec::new();
        for (i, f) in meta.files.iter().enumerate() {
            if let FileKind::Regular { .. } = f.kind {
                let path = join(&root, &f.path);
                // Already there at its length (a restart, or a file reused from a cached
                // version, which may be a read-only hard link): opened only if written to,
                // and copy on write if linked elsewhere.
                let there = fs::symlink_metadata(&path);
                if let Ok(m) = there.as_ref()
                    && m.is_file()
                    && m.len() == f.length
                {
                    if m.nlink() > 1 {
                        shared.push(i);
                    }
                    at += f.length;
                    continue;
                }
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent)?;
                }
                let file = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)?;
                if file.metadata()?.len() != f.length {
                    file.set_len(f.length)?;
                }
            }
            at += f.length;
        }
        debug_assert_eq!(at, meta.length);
        Self::tree(root, meta, true, &shared)
    }

    /// Open the tree at `root` read-only, as `meta` lays it out (a tree package being
    /// published, before it is in the cache).
    pub fn open_tree_at(root: &Path, meta: &Metainfo) -> io::Result<Self> {
        Self::tree(root.to_path_buf(), meta, false, &[])
    }

    /// Open a complete package read-only for seeding: `entry`'s file named in the metainfo,
    /// or its tree. Every file must have its length.
    pub fn open_complete(entry: &Path, meta: &Metainfo) -> io::Result<Self> {
        if meta.format != Format::Tree {
            let path = entry.join(&meta.name);
            let file = File::open(&path)?;
            check_len(&path, file.metadata()?.len(), meta.length)?;
            return Ok(Self::single(path, meta.length, file, false));
        }
        let data = Self::open_tree_at(&entry.join(TREE_DIR), meta)?;
        for s in &data.segments {
            if let Some(rel) = &s.path {
                let path = data.path.join(rel);
                check_len(&path, fs::symlink_metadata(&path)?.len(), s.len)?;
            }
        }
        Ok(data)
    }

    fn single(path: PathBuf, len: u64, file: File, writable: bool) -> Self {
        let segment = Segment {
            start: 0,
            len,
            path: Some(path.clone()),
            keep: true,
            file: OnceLock::from(file),
            shared: false,
        };
        Self {
            path,
            len,
            writable,
            root: None,
            segments: vec![segment],
            unsharing: std::sync::Mutex::new(()),
            in_memory: OnceLock::new(),
            nowait: AtomicBool::new(true),
        }
    }

    /// A tree at `root`; `shared` are the indices in `meta.files` of files linked elsewhere.
    fn tree(root: PathBuf, meta: &Metainfo, writable: bool, shared: &[usize]) -> io::Result<Self> {
        use rustix::fs::{Mode, OFlags};
        let dir = rustix::fs::open(
            &root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let mut segments = Vec::with_capacity(meta.files.len());
        let mut at = 0u64;
        for (i, f) in meta.files.iter().enumerate() {
            if f.length > 0 {
                segments.push(Segment {
                    start: at,
                    len: f.length,
                    path: f.is_regular().then(|| f.path.iter().collect()),
                    keep: false,
                    file: OnceLock::new(),
                    shared: shared.binary_search(&i).is_ok(),
                });
            }
            at += f.length;
        }
        let mut by_size: Vec<usize> = (0..segments.len())
            .filter(|&i| segments[i].path.is_some() && !segments[i].shared)
            .collect();
        by_size.sort_by_key(|&i| std::cmp::Reverse(segments[i].len));
        for &i in by_size.iter().take(OPEN_FILES) {
            segments[i].keep = true;
        }
        Ok(Self {
            path: root,
            len: at,
            writable,
            root: Some(dir),
            segments,
            unsharing: std::sync::Mutex::new(()),
            in_memory: OnceLock::new(),
            nowait: AtomicBool::new(true),
        })
    }

    /// Where the package is: the file, or the tree's root.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes in the torrent.
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

    /// The pieces of `[offset, offset + n)` in each segment: (segment, offset in it, range in
    /// the buffer).
    fn spans(
        &self,
        offset: u64,
        n: usize,
    ) -> impl Iterator<Item = (&Segment, u64, std::ops::Range<usize>)> {
        let first = self.segments.partition_point(|s| s.start + s.len <= offset);
        let end = offset + n as u64;
        self.segments[first..]
            .iter()
            .take_while(move |s| s.start < end)
            .map(move |s| {
                let from = offset.max(s.start);
                let to = end.min(s.start + s.len);
                let buf = usize::try_from(from - offset).unwrap_or(0)
                    ..usize::try_from(to - offset).unwrap_or(0);
                (s, from - s.start, buf)
            })
    }

    /// Run `f` on `s`'s file: kept open (read-write while downloading), or opened for this
    /// call, read-write only to `write`.
    fn with_file<T>(
        &self,
        s: &Segment,
        write: bool,
        f: impl FnOnce(&File) -> io::Result<T>,
    ) -> io::Result<T> {
        let Some(path) = &s.path else {
            return Err(io::Error::other("padding has no file"));
        };
        if let Some(file) = s.file.get() {
            return f(file);
        }
        let open = |rw: bool| self.open(path, rw);
        // A kept handle of a download is opened for writing up front, except where the file is
        // read-only: one reused from a cached version whose other links were gone at open (a
        // file still linked elsewhere is written copy on write, and never kept).
        let file = match open(self.writable && (write || s.keep)) {
            Err(e) if !write && s.keep && e.kind() == io::ErrorKind::PermissionDenied => {
                open(false)?
            }
            other => other?,
        };
        if s.keep {
            let file = s.file.get_or_init(|| file);
            f(file)
        } else {
            f(&file)
        }
    }

    /// Open `path` (a tree's file from its root, or the single file), read-write or read-only.
    fn open(&self, path: &Path, rw: bool) -> io::Result<File> {
        match &self.root {
            Some(root) => {
                use rustix::fs::{Mode, OFlags};
                let mode = if rw { OFlags::RDWR } else { OFlags::RDONLY };
                let fd = rustix::fs::openat(
                    root,
                    path,
                    mode | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| self.error(path, e.into()))?;
                Ok(File::from(fd))
            }
            None => OpenOptions::new().read(true).write(rw).open(path),
        }
    }

    /// `e` about the tree file `path`, named in full.
    fn error(&self, path: &Path, e: io::Error) -> io::Error {
        io::Error::new(e.kind(), format!("{}: {e}", self.path.join(path).display()))
    }

    /// `data`, to be written at `offset`, as it will read back: what falls in padding as zeros.
    /// A running hash of written blocks (`engine/hashing.rs`) takes these bytes, not the
    /// peer's, so a peer's garbage in padding makes no piece fail.
    pub fn as_stored<'a>(&self, offset: u64, data: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
        let mut out = std::borrow::Cow::Borrowed(data);
        for (s, _, range) in self.spans(offset, data.len()) {
            if s.path.is_none() && data[range.clone()].iter().any(|&b| b != 0) {
                out.to_mut()[range].fill(0);
            }
        }
        out
    }

    /// Write a block at `offset` (what falls in padding is dropped).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check(offset, data.len())?;
        for (s, at, range) in self.spans(offset, data.len()) {
            if s.shared {
                self.write_shared(s, at, &data[range])?;
            } else if s.path.is_some() {
                self.with_file(s, true, |file| file.write_all_at(&data[range], at))?;
            }
        }
        Ok(())
    }

    /// Write `data` at `at` in a file that was linked elsewhere at open: nothing when it holds
    /// those bytes already; otherwise, while it still has other links, the file first becomes
    /// a copy of its own. (One whose other links are gone, a cached version evicted, may keep
    /// that version's read-only mode: it is copied too rather than fail the write.)
    fn write_shared(&self, s: &Segment, at: u64, data: &[u8]) -> io::Result<()> {
        let Some(path) = &s.path else {
            return Ok(());
        };
        let _one = self
            .unsharing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let file = self.open(path, false)?;
        if file.metadata()?.nlink() > 1 {
            let mut there = vec![0u8; data.len()];
            if file.read_exact_at(&mut there, at).is_ok() && there == data {
                return Ok(());
            }
        } else {
            match self.open(path, true) {
                Ok(own) => return own.write_all_at(data, at),
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {}
                Err(e) => return Err(e),
            }
        }
        self.unshare(path, &file)?;
        self.open(path, true)?.write_all_at(data, at)
    }

    /// Replace the tree file `path` (open as `file`) by a copy of it: a new inode with the
    /// same bytes, writable, renamed over it. The copy is made beside the tree, in the
    /// download's work directory (removed with it), so a crash midway leaves nothing in the
    /// tree and no name in it is taken.
    fn unshare(&self, path: &Path, file: &File) -> io::Result<()> {
        let Some(root) = &self.root else {
            return Err(io::Error::other("only a tree's files are shared"));
        };
        let work = self.path.parent().unwrap_or(&self.path);
        let tmp = work.join(format!(".unshare-{:016x}", rand::random::<u64>()));
        let copied = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
            .and_then(|mut copy| io::copy(&mut &*file, &mut copy))
            .and_then(|_| {
                rustix::fs::renameat(rustix::fs::CWD, &tmp, root, path).map_err(io::Error::from)
            });
        if let Err(e) = copied {
            let _ = fs::remove_file(&tmp);
            return Err(self.error(path, e));
        }
        Ok(())
    }

    /// Read exactly `buf.len()` bytes at `offset` (padding reads as zeros).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len())?;
        // Zero-length entries aside, segments cover the torrent without gaps.
        for (s, at, range) in self.spans(offset, buf.len()) {
            if s.path.is_some() {
                self.with_file(s, false, |file| file.read_exact_at(&mut buf[range], at))?;
            } else {
                buf[range].fill(0);
            }
        }
        Ok(())
    }

    /// Read `buf.len()` bytes at `offset` only if that cannot wait on a device, for a caller
    /// that must not block (an upload on the async runtime): their files are open already, and
    /// they live in memory (tmpfs, ramfs) or the bytes are in the page cache (`preadv2` with
    /// `RWF_NOWAIT`). `false`: reading would have waited (or opened a file, or failed), and
    /// `buf` holds nothing promised; [`read_at`](Self::read_at), off the runtime, reads it
    /// and says what failed.
    pub fn read_cached(&self, offset: u64, buf: &mut [u8]) -> bool {
        if self.check(offset, buf.len()).is_err() {
            return false;
        }
        for (s, at, range) in self.spans(offset, buf.len()) {
            if s.path.is_none() {
                buf[range].fill(0);
                continue;
            }
            let Some(file) = s.file.get() else {
                return false;
            };
            if !self.read_without_waiting(file, &mut buf[range], at) {
                return false;
            }
        }
        true
    }

    fn read_without_waiting(&self, file: &File, buf: &mut [u8], at: u64) -> bool {
        use rustix::io::{Errno, ReadWriteFlags, preadv2};
        if *self.in_memory.get_or_init(|| in_memory(file)) {
            return file.read_exact_at(buf, at).is_ok();
        }
        if !self.nowait.load(Relaxed) {
            return false;
        }
        let mut done = 0;
        while done < buf.len() {
            let at = at + done as u64;
            let mut to = [io::IoSliceMut::new(&mut buf[done..])];
            match preadv2(file, &mut to, at, ReadWriteFlags::NOWAIT) {
                Ok(0) => return false,
                Ok(n) => done += n,
                Err(Errno::INTR) => {}
                Err(Errno::OPNOTSUPP) => {
                    self.nowait.store(false, Relaxed);
                    return false;
                }
                // EAGAIN: not all in the page cache.
                Err(_) => return false,
            }
        }
        true
    }

    /// SHA-1 of `len` bytes at `offset`, read back from disk.
    pub fn sha1_of(&self, offset: u64, len: u64) -> io::Result<[u8; 20]> {
        self.sha1_from(Sha1::new(), offset, len)
    }

    /// `hasher`, which has taken the bytes before `offset`, finished with the `len` bytes at
    /// `offset` read back from disk.
    pub fn sha1_from(&self, mut hasher: Sha1, offset: u64, len: u64) -> io::Result<[u8; 20]> {
        self.hash_into(&mut hasher, offset, len)?;
        Ok(hasher.finalize().into())
    }

    /// Feed `hasher` the `len` bytes at `offset`, read back from disk. On error it may have
    /// taken part of them.
    pub fn hash_into(&self, hasher: &mut impl Digest, offset: u64, len: u64) -> io::Result<()> {
        let mut buf = vec![0u8; usize::try_from(len.min(64 << 10)).unwrap_or(64 << 10)];
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from((len - done).min(buf.len() as u64)).unwrap_or(buf.len());
            self.read_at(offset + done, &mut buf[..n])?;
            hasher.update(&buf[..n]);
            done += n as u64;
        }
        Ok(())
    }

    /// Flush data and metadata to stable storage: every file. (A tree's directories are
    /// synced by the cache as it seals the entry.)
    pub fn sync(&self) -> io::Result<()> {
        for s in &self.segments {
            if s.path.is_some() {
                self.with_file(s, false, File::sync_all)?;
            }
        }
        Ok(())
    }
}

/// Each of `meta`'s files' offset in the torrent, in order.
pub(crate) fn file_starts(meta: &Metainfo) -> Vec<u64> {
    let mut at = 0u64;
    meta.files
        .iter()
        .map(|f| {
            let start = at;
            at += f.length;
            start
        })
        .collect()
}

/// `root` with a tree file's path components under it.
pub(crate) fn join(root: &Path, components: &[String]) -> PathBuf {
    let mut p = root.to_path_buf();
    p.extend(components);
    p
}

/// Whether `file` is on a filesystem kept in memory, where a read waits on no device (short of
/// swap).
fn in_memory(file: &File) -> bool {
    const TMPFS_MAGIC: u64 = 0x0102_1994;
    const RAMFS_MAGIC: u64 = 0x8584_58f6;
    rustix::fs::fstatfs(file).is_ok_and(|st| {
        let kind = st.f_type as u64;
        kind == TMPFS_MAGIC || kind == RAMFS_MAGIC
    })
}

fn check_len(path: &Path, actual: u64, expected: u64) -> io::Result<()> {
    if actual == expected {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "{} is {actual} bytes, the package says {expected}",
            path.display()
        ),
    ))
}

/// The tree metainfo of files named `contents` at the root, for tests: mode 0644, read from
/// the bytes given.
#[cfg(test)]
pub(crate) fn flat_tree(contents: &[(&str, &[u8])]) -> Metainfo {
    use fbpkg_common::metainfo::TreeItem;
    let items = contents
        .iter()
        .map(|(n, d)| TreeItem::File {
            path: vec![(*n).to_owned()],
            length: d.len() as u64,
            mode: 0o644,
        })
        .collect();
    Metainfo::build_tree(
        items,
        |p| {
            let d = contents
                .iter()
                .find(|(n, _)| *n == p[0])
                .map(|(_, d)| d.to_vec())
                .ok_or_else(|| io::Error::other("no such test file"))?;
            Ok(io::Cursor::new(d))
        },
        "app",
        "http://127.0.0.1:1/announce",
    )
    .expect("tree metainfo")
}

#[cfg(test)]
mod tests {

    use super::*;

    fn file_meta(len: usize) -> Metainfo {
        let bytes = vec![0u8; len];
        Metainfo::build(&bytes[..], len as u64, "x", "http://t/a", Format::File).unwrap()
    }

    #[test]
    fn blocks_land_at_offsets_and_hash_back() {
        let dir = tempfile::tempdir().unwrap();
        let m = file_meta(100);
        let f = PackageData::open_partial(dir.path(), &m).unwrap();
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
        let f = PackageData::open_partial(dir.path(), &m).unwrap();
        f.read_at(10, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        let entry = tempfile::tempdir().unwrap();
        fs::write(entry.path().join("x"), [0u8; 99]).unwrap();
        assert!(PackageData::open_complete(entry.path(), &m).is_err());
    }

    /// 32 KiB pieces: "a" (3 bytes) and "b" (40 KiB, aligned, then padding), "c" (5 bytes).
    fn tree_meta() -> (Metainfo, Vec<(&'static str, Vec<u8>)>) {
        let contents = vec![
            ("a", b"abc".to_vec()),
            ("b", (0..40 << 10).map(|i| (i % 251) as u8).collect()),
            ("c", b"hello".to_vec()),
            ("e", Vec::new()),
        ];
        let files: Vec<(&str, &[u8])> = contents.iter().map(|(n, d)| (*n, &d[..])).collect();
        (flat_tree(&files), contents)
    }

    /// The torrent's bytes of [`tree_meta`], as a stock client would lay them out.
    fn torrent_of(m: &Metainfo, contents: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut torrent = Vec::new();
        for f in &m.files {
            match &f.kind {
                FileKind::Pad => torrent.resize(torrent.len() + f.length as usize, 0),
                _ => torrent
                    .extend_from_slice(&contents.iter().find(|(n, _)| *n == f.path[0]).unwrap().1),
            }
        }
        assert_eq!(torrent.len() as u64, m.length);
        torrent
    }

    #[test]
    fn a_tree_is_its_files_at_their_offsets_with_padding_as_zeros() {
        let (m, contents) = tree_meta();
        let dir = tempfile::tempdir().unwrap();
        let data = PackageData::open_partial(dir.path(), &m).unwrap();
        assert_eq!(data.len(), m.length);
        let torrent = torrent_of(&m, &contents);
        // Pad bytes sent as garbage are dropped; blocks straddle files and padding.
        let mut sent = torrent.clone();
        sent[10] = 0xff; // in the padding after "a" and before "b"
        for chunk in (0..sent.len()).step_by(7000) {
            let end = (chunk + 7000).min(sent.len());
            data.write_at(chunk as u64, &sent[chunk..end]).unwrap();
        }
        for i in 0..m.num_pieces() {
            let got = data
                .sha1_of(m.piece_offset(i), u64::from(m.piece_size(i)))
                .unwrap();
            assert_eq!(got, m.pieces[i as usize], "piece {i}");
        }
        let mut back = vec![1u8; torrent.len()];
        data.read_at(0, &mut back).unwrap();
        assert_eq!(back, torrent);
        // What a running hash takes of the blocks sent: the same bytes, padding as zeros.
        for chunk in (0..sent.len()).step_by(7000) {
            let end = (chunk + 7000).min(sent.len());
            assert_eq!(
                &data.as_stored(chunk as u64, &sent[chunk..end])[..],
                &torrent[chunk..end]
            );
        }
        assert!(
            matches!(
                data.as_stored(20 << 10, &sent[20 << 10..24 << 10]),
                std::borrow::Cow::Borrowed(_)
            ),
            "no copy of a block without padding"
        );
        data.sync().unwrap();
        // On disk: the files themselves, nothing for padding; the empty file exists.
        for (n, d) in &contents {
            assert_eq!(&fs::read(dir.path().join(TREE_DIR).join(n)).unwrap(), d);
        }
        assert_eq!(fs::read_dir(dir.path().join(TREE_DIR)).unwrap().count(), 4);
        // Seeding from a complete tree.
        let entry = dir.path();
        let seeding = PackageData::open_complete(entry, &m).unwrap();
        let mut b = [0u8; 5];
        seeding.read_at(m.length - 5, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        assert!(seeding.write_at(0, b"x").is_err(), "read-only");
        fs::write(entry.join(TREE_DIR).join("c"), b"hell").unwrap();
        assert!(
            PackageData::open_complete(entry, &m).is_err(),
            "a file of the wrong size"
        );
    }

    /// An upload reads on the async runtime only what cannot wait: files open already, in
    /// memory or in the page cache. Those reads give what `read_at` gives, padding as zeros.
    #[test]
    fn reads_that_cannot_wait_give_what_read_at_gives() {
        let (m, contents) = tree_meta();
        let torrent = torrent_of(&m, &contents);
        let mut dirs = vec![tempfile::tempdir().unwrap()];
        // Where the machine has a tmpfs, there too: reads there never wait.
        if let Ok(shm) = File::open("/dev/shm")
            && in_memory(&shm)
        {
            dirs.push(tempfile::tempdir_in("/dev/shm").unwrap());
        }
        for dir in &dirs {
            let work = PackageData::open_partial(dir.path(), &m).unwrap();
            work.write_at(0, &torrent).unwrap();
            let seeding = PackageData::open_complete(dir.path(), &m).unwrap();
            let mut back = vec![1u8; torrent.len()];
            assert!(
                !seeding.read_cached(0, &mut back),
                "files not open yet: opened off the runtime"
            );
            seeding.read_at(0, &mut back).unwrap();
            assert_eq!(back, torrent);
            let mut cached = vec![1u8; torrent.len()];
            let read = seeding.read_cached(0, &mut cached);
            let memory = seeding.in_memory.get() == Some(&true);
            assert!(
                read || !(memory || seeding.nowait.load(Relaxed)),
                "just written, so in memory or the page cache ({})",
                dir.path().display()
            );
            if read {
                assert_eq!(cached, torrent);
            }
            if read && !memory {
                // Out of the page cache, the bytes would come from the disk: not here. The
                // kernel may keep a page a while longer (a CI run once saw it): evict again,
                // a few times, until a read of the files that cannot wait says they are out.
                let files: Vec<_> = contents
                    .iter()
                    .filter(|(_, d)| !d.is_empty())
                    .map(|(n, d)| (File::open(dir.path().join(TREE_DIR).join(n)).unwrap(), d))
                    .collect();
                let evicted = (0..20).any(|_| {
                    work.sync().unwrap();
                    for (f, _) in &files {
                        rustix::fs::fadvise(f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
                    }
                    files.iter().any(|(f, d)| {
                        let mut to = vec![0u8; d.len()];
                        let mut io = [io::IoSliceMut::new(&mut to)];
                        rustix::io::preadv2(f, &mut io, 0, rustix::io::ReadWriteFlags::NOWAIT)
                            .map_or(true, |n| n < d.len())
                    })
                });
                if evicted {
                    assert!(
                        !seeding.read_cached(0, &mut cached),
                        "evicted, so it would wait"
                    );
                    seeding.read_at(0, &mut cached).unwrap();
                    assert!(
                        seeding.read_cached(0, &mut cached),
                        "read back into the cache"
                    );
                } else {
                    eprintln!("the kernel kept the files' pages: eviction not checked");
                }
            }
            let mut tail = [0u8; 5];
            assert!(
                !seeding.read_cached(m.length - 2, &mut tail),
                "past the end"
            );
            assert!(seeding.read_cached(m.length - 5, &mut tail) || !read);
            if read {
                assert_eq!(&tail, b"hello");
            }
        }
    }

    /// Files hard-linked from a cached version are copy on write: the same bytes leave the
    /// link alone, other bytes never reach the cached copy.
    #[test]
    fn a_file_linked_from_a_cached_version_is_written_copy_on_write() {
        use std::os::unix::fs::MetadataExt as _;
        let (m, contents) = tree_meta();
        let cached = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join(TREE_DIR);
        fs::create_dir_all(&tree).unwrap();
        for (n, d) in &contents {
            fs::write(cached.path().join(n), d).unwrap();
        }
        for n in ["a", "b", "c"] {
            fs::hard_link(cached.path().join(n), tree.join(n)).unwrap();
        }
        let ino = |p: &Path| fs::metadata(p).unwrap().ino();
        let data = PackageData::open_partial(dir.path(), &m).unwrap();
        let c_at = m.length - 5;
        // A piece fetched again because a neighbour changed: blocks for linked files that hold
        // their bytes are not written, and the files stay shared.
        data.write_at(0, b"abc").unwrap();
        data.write_at(c_at, b"hello").unwrap();
        for n in ["a", "c"] {
            assert_eq!(ino(&tree.join(n)), ino(&cached.path().join(n)), "{n}");
        }
        // Other bytes (a bad block, or a cached copy gone bad): the download's file gets an
        // inode of its own first; the cached version keeps its bytes.
        data.write_at(c_at + 1, b"ELP").unwrap();
        assert_eq!(fs::read(cached.path().join("c")).unwrap(), b"hello");
        assert_eq!(fs::read(tree.join("c")).unwrap(), b"hELPo");
        assert_ne!(ino(&tree.join("c")), ino(&cached.path().join("c")));
        assert_eq!(fs::metadata(cached.path().join("c")).unwrap().nlink(), 1);
        // From then on it is the download's own file, written in place.
        data.write_at(c_at, b"hello").unwrap();
        let mut back = [0u8; 5];
        data.read_at(c_at, &mut back).unwrap();
        assert_eq!(&back, b"hello");
        // A large one too (a kept handle would have held the cached inode).
        let b_at = m.piece_length;
        data.write_at(b_at, b"\xff\xff").unwrap();
        assert_eq!(fs::read(cached.path().join("b")).unwrap(), contents[1].1);
        let mut two = [0u8; 2];
        data.read_at(b_at, &mut two).unwrap();
        assert_eq!(two, [0xff, 0xff]);
        // Nothing is left beside the files.
        let mut names: Vec<_> = fs::read_dir(&tree)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["a", "b", "c", "e"]);
        let work: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(work.len(), 1, "only the tree in the work directory");
    }

    /// A finished download's tree is renamed into the cache while peers are still served from
    /// the download's storage: every file, kept open or not, must still read there.
    #[test]
    fn a_tree_still_reads_after_it_is_renamed() {
        let n = OPEN_FILES + 6;
        let contents: Vec<(String, Vec<u8>)> = (0..n)
            .map(|i| (format!("f{i:03}"), vec![i as u8; 100 + i]))
            .collect();
        let files: Vec<(&str, &[u8])> =
            contents.iter().map(|(n, d)| (n.as_str(), &d[..])).collect();
        let m = flat_tree(&files);
        let work = tempfile::tempdir().unwrap();
        let data = PackageData::open_partial(work.path(), &m).unwrap();
        let torrent: Vec<u8> = contents.iter().flat_map(|(_, d)| d.clone()).collect();
        assert_eq!(
            torrent.len() as u64,
            m.length,
            "small files pack without padding"
        );
        data.write_at(0, &torrent).unwrap();
        let entry = tempfile::tempdir().unwrap();
        fs::rename(work.path().join(TREE_DIR), entry.path().join(TREE_DIR)).unwrap();
        let mut back = vec![0u8; torrent.len()];
        data.read_at(0, &mut back).unwrap();
        assert_eq!(back, torrent);
    }
}
