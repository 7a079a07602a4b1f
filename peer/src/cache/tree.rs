//! Tree packages in the cache: one copy of the tree, seeded where it lies.
//!
//! A tree package's torrent is its files (see `fbpkg_common::metainfo` and its `tree`
//! module), so the entry holds only the tree, its metainfo and seal: the package costs its
//! tree on disk, where an archive package costs archive plus tree. Install places the regular
//! files (renamed from a download's work directory, or copied from a publisher's directory),
//! checks each against its SHA-256, then makes what takes no bytes: symlinks, empty files,
//! empty directories, and the modes: the package's, without write bits, and readable (and
//! searchable) by their owner, the agent, which seeds them.
//!
//! A link is stored from the package root, without `..` (BEP 47's `symlink path`), and made as
//! the relative path from its directory (`bin/tool -> lib/tool` becomes `../lib/tool`). No
//! entry lies beneath a link or a file (the metainfo's order check refuses it), so every
//! directory on the way is a real one and a link can only lead inside the tree.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use fbpkg_common::Sha256Hash;
use fbpkg_common::metainfo::{FileKind, Metainfo, TreeFile};
use sha2::{Digest, Sha256};

use super::Handoff;
use crate::archive::TreeCheck;
use crate::error::{PeerError, Result};
use crate::storage::join;

/// Problems listed one by one in a [`TreeCheck`]; beyond this, counted.
const MAX_LISTED: usize = 20;
const CHUNK: usize = 1 << 20;

/// What a link at `path` holds for a target given from the root: the shortest relative path,
/// so a link published as `tool -> real-tool` reads the same in the cache.
pub(crate) fn link_text(path: &[String], target: &[String]) -> PathBuf {
    let dir = &path[..path.len().saturating_sub(1)];
    let common = dir.iter().zip(target).take_while(|(a, b)| a == b).count();
    let mut text = PathBuf::new();
    for _ in common..dir.len() {
        text.push("..");
    }
    text.extend(&target[common..]);
    if text.as_os_str().is_empty() {
        text.push(".");
    }
    text
}

/// A file's mode in the cache.
fn file_mode(mode: u32) -> u32 {
    (mode & 0o555) | 0o400
}

/// A directory's mode in the cache, once the entry is read-only.
fn dir_mode(mode: u32) -> u32 {
    (mode & 0o555) | 0o500
}

/// Put `meta`'s regular files at `tree` (which must not exist): `data` is a download's tree
/// (moved, then checked where it lies, but for its files at `known` that are unchanged: see
/// [`Cache::install_reusing`](super::Cache::install_reusing)) or a publisher's directory
/// (copied, checked as it is copied). `moved` is set as soon as `data` is at `tree`, before
/// its check, so a failed install gives back a tree that failed its check too
/// ([`give_back`]).
pub(super) fn place(
    meta: &Metainfo,
    data: &Path,
    (handoff, known): (Handoff, &[(usize, Unchanged)]),
    tree: &Path,
    moved: &mut bool,
) -> Result<()> {
    if handoff == Handoff::Move && fs::rename(data, tree).is_ok() {
        *moved = true;
        return check_files(meta, tree, known);
    }
    fs::create_dir(tree).map_err(PeerError::io("creating", tree))?;
    for f in meta.files.iter().filter(|f| f.is_regular()) {
        copy_file(f, &join(data, &f.path), &join(tree, &f.path), data)?;
    }
    Ok(())
}

/// Give a moved tree back to the caller of a failed install, writable by its owner again:
/// [`finish`] (and the entry's sealing) may have taken write bits away, and the caller (a
/// download's work directory) must be able to remove it, or write into it on resume.
pub(super) fn give_back(tree: &Path, data: &Path) {
    if let Err(e) = owner_writable(tree) {
        tracing::warn!(path = %tree.display(), error = %e, "cannot make a moved tree writable again after a failed install");
    }
    if let Err(e) = fs::rename(tree, data) {
        tracing::warn!(from = %tree.display(), to = %data.display(), error = %e, "cannot give the tree back after a failed install; it is removed with the staging directory");
    }
}

/// Owner write (and, on directories, search) bits back on everything under `path`; links
/// are not followed.
fn owner_writable(path: &Path) -> io::Result<()> {
    let md = fs::symlink_metadata(path)?;
    let mode = md.permissions().mode() & 0o7777;
    if md.is_dir() {
        if mode & 0o700 != 0o700 {
            fs::set_permissions(path, fs::Permissions::from_mode(mode | 0o700))?;
        }
        for e in fs::read_dir(path)? {
            owner_writable(&e?.path())?;
        }
    } else if md.is_file() && mode & 0o200 == 0 && md.nlink() == 1 {
        // A file linked from a cached version keeps that version's modes: the download
        // writes it copy on write (`storage.rs`), so it needs no write bit.
        fs::set_permissions(path, fs::Permissions::from_mode(mode | 0o200))?;
    }
    Ok(())
}

/// A file as it was when it was last read and found right: the same inode, and not changed
/// since. Every write moves a file's change time (so does a new link to it, or a `chmod`), so a
/// file whose length, modification and change times are the same is the file that was read,
/// up to the clock's granularity: a write in the same tick as the look after the read could go
/// unseen (git's "racy" case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Unchanged {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Unchanged {
    /// How the regular file at `path` is now (links are not followed).
    pub fn of(path: &Path) -> io::Result<Self> {
        let md = fs::symlink_metadata(path)?;
        if !md.is_file() {
            return Err(io::Error::other("not a regular file"));
        }
        Ok(Self {
            dev: md.dev(),
            ino: md.ino(),
            len: md.len(),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
        })
    }

    /// The same file with the same bytes, change time aside: what a seal's stamp can vouch
    /// for across the cache's life. A write moves the modification time; the change time
    /// also moves on a new link to the file, or one removed (a version evicted), which leave
    /// its bytes alone.
    pub fn same_bytes_as(&self, other: &Self) -> bool {
        (self.dev, self.ino, self.len, self.mtime) == (other.dev, other.ino, other.len, other.mtime)
    }
}

/// Each regular file's length and SHA-256, read where it lies; the files at `known` (indices
/// in `meta.files`, in order) that are still as they were then are not read again.
fn check_files(meta: &Metainfo, tree: &Path, known: &[(usize, Unchanged)]) -> Result<()> {
    for (at, f) in meta
        .files
        .iter()
        .enumerate()
        .filter(|(_, f)| f.is_regular())
    {
        let path = join(tree, &f.path);
        if let Ok(k) = known.binary_search_by_key(&at, |&(i, _)| i)
            && Unchanged::of(&path).is_ok_and(|now| now == known[k].1 && now.len == f.length)
        {
            continue;
        }
        let file = File::open(&path).map_err(PeerError::io("opening", &path))?;
        hash_into(file, &mut io::sink(), f).map_err(|e| e.into_error(&path, &path, None))?;
    }
    Ok(())
}

fn copy_file(f: &TreeFile, src: &Path, dst: &Path, root: &Path) -> Result<()> {
    if let Some(parent) = dst.parent() {
        fs::create_dir_all(parent).map_err(PeerError::io("creating", parent))?;
    }
    let from = OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(src)
        .map_err(PeerError::io("opening", src))?;
    let mut to = super::check::create_copy(dst)?;
    hash_into(from, &mut to, f)
        .map(drop)
        .map_err(|e| e.into_error(src, dst, Some(root)))
}

enum HashError {
    Read(io::Error),
    Write(io::Error),
    Mismatch(String),
}

impl HashError {
    /// `published`: the publisher's directory `src` was copied from; `None` for a download.
    fn into_error(self, src: &Path, dst: &Path, published: Option<&Path>) -> PeerError {
        match (self, published) {
            (HashError::Read(e), _) => PeerError::io("reading", src)(e),
            (HashError::Write(e), _) => PeerError::io("copying into the cache", dst)(e),
            (HashError::Mismatch(why), Some(root)) => PeerError::Verification(format!(
                "{} is not the file the package's metainfo was built from (did {} change \
                 while it was published?): {why}",
                src.display(),
                root.display()
            )),
            (HashError::Mismatch(why), None) => PeerError::Verification(format!(
                "{} is not the file the package holds: {why}",
                src.display()
            )),
        }
    }
}

/// Stream `src` into `sink`, checking the length and SHA-256 `f` records; reads at most one
/// byte past the length (a growing file cannot fill the disk).
fn hash_into(
    src: impl Read,
    sink: &mut impl Write,
    f: &TreeFile,
) -> std::result::Result<u64, HashError> {
    let FileKind::Regular { sha256, .. } = &f.kind else {
        return Ok(0);
    };
    let mut src = src.take(f.length.saturating_add(1));
    let mut h = Sha256::new();
    let mut n = 0u64;
    let mut buf = vec![0u8; CHUNK.min(usize::try_from(f.length + 1).unwrap_or(CHUNK))];
    loop {
        let got = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(HashError::Read(e)),
        };
        n += got as u64;
        if n > f.length {
            return Err(HashError::Mismatch(format!(
                "longer than {} bytes",
                f.length
            )));
        }
        h.update(&buf[..got]);
        sink.write_all(&buf[..got]).map_err(HashError::Write)?;
    }
    if n != f.length {
        return Err(HashError::Mismatch(format!("{n} bytes, not {}", f.length)));
    }
    if Sha256Hash(h.finalize().into()) != *sha256 {
        return Err(HashError::Mismatch("its SHA-256 differs".into()));
    }
    Ok(n)
}

/// Make what takes no bytes (links, empty directories, missing empty files) and give each file
/// its mode. Write bits on directories are removed later, with the rest of the entry.
pub(super) fn finish(meta: &Metainfo, tree: &Path) -> Result<()> {
    for f in &meta.files {
        let path = join(tree, &f.path);
        match &f.kind {
            FileKind::Pad => continue,
            FileKind::Symlink { target } => {
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent).map_err(PeerError::io("creating", parent))?;
                }
                std::os::unix::fs::symlink(link_text(&f.path, target), &path)
                    .map_err(PeerError::io("making link", &path))?;
            }
            FileKind::Regular { .. } => {
                if f.length == 0 && fs::symlink_metadata(&path).is_err() {
                    if let Some(parent) = path.parent() {
                        fs::create_dir_all(parent).map_err(PeerError::io("creating", parent))?;
                    }
                    File::create(&path).map_err(PeerError::io("creating", &path))?;
                }
            }
        }
    }
    for f in &meta.files {
        if let FileKind::Regular { mode, .. } = f.kind {
            let path = join(tree, &f.path);
            fs::set_permissions(&path, fs::Permissions::from_mode(file_mode(mode)))
                .map_err(PeerError::io("chmod", &path))?;
        }
    }
    // Directories last, deepest first, writable by their owner until the entry is made
    // read-only as a whole.
    for d in meta.dirs.iter().rev() {
        let path = join(tree, &d.path);
        fs::create_dir_all(&path).map_err(PeerError::io("creating", &path))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(dir_mode(d.mode) | 0o200))
            .map_err(PeerError::io("chmod", &path))?;
    }
    Ok(())
}

/// Compare the tree at `tree` with `meta`: every file's kind, mode, length and SHA-256, every
/// link's target, every empty directory, and nothing else in the tree. I/O errors are
/// problems (they say the tree cannot be trusted), except on listing the tree's root.
pub(crate) fn compare(meta: &Metainfo, tree: &Path) -> TreeCheck {
    let mut out = TreeCheck::default();
    let mut extra = 0u64;
    let mut problem = |out: &mut TreeCheck, msg: String| {
        if out.problems.len() < MAX_LISTED {
            out.problems.push(msg);
        } else {
            extra += 1;
        }
    };
    let mut known: HashSet<PathBuf> = HashSet::new();
    for f in meta.files.iter().filter(|f| f.kind != FileKind::Pad) {
        let path = join(tree, &f.path);
        let shown = f.display_path();
        known.insert(path.clone());
        let md = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) => {
                problem(&mut out, format!("{shown}: {e}"));
                continue;
            }
        };
        match &f.kind {
            FileKind::Symlink { target } => match fs::read_link(&path) {
                Ok(got) if got == link_text(&f.path, target) => {}
                Ok(got) => problem(
                    &mut out,
                    format!(
                        "{shown} leads to {}, not {}",
                        got.display(),
                        target.join("/")
                    ),
                ),
                Err(_) => problem(&mut out, format!("{shown} is no longer a symlink")),
            },
            FileKind::Regular { mode, .. } => {
                if !md.is_file() {
                    problem(&mut out, format!("{shown} is no longer a regular file"));
                    continue;
                }
                let (got, want) = (md.permissions().mode() & 0o7777, file_mode(*mode));
                if got & !0o222 != want {
                    problem(&mut out, format!("{shown} has mode {got:o}, not {want:o}"));
                } else if got != want {
                    out.drift.push(format!("{shown} is writable ({got:o})"));
                }
                match File::open(&path) {
                    Err(e) => problem(&mut out, format!("{shown} cannot be read: {e}")),
                    Ok(file) => match hash_into(file, &mut io::sink(), f) {
                        Ok(n) => out.bytes_read += n,
                        Err(HashError::Mismatch(why)) => {
                            problem(&mut out, format!("{shown}: contents changed ({why})"))
                        }
                        Err(HashError::Read(e) | HashError::Write(e)) => {
                            problem(&mut out, format!("{shown} cannot be read: {e}"))
                        }
                    },
                }
            }
            FileKind::Pad => {}
        }
    }
    for d in &meta.dirs {
        let path = join(tree, &d.path);
        let shown = d.path.join("/");
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => {
                let (got, want) = (m.permissions().mode() & 0o7777, dir_mode(d.mode));
                if got & !0o222 != want {
                    problem(&mut out, format!("{shown}/ has mode {got:o}, not {want:o}"));
                }
            }
            _ => problem(&mut out, format!("{shown} is no longer a directory")),
        }
        known.insert(path);
    }
    // Every directory on the way to something known is known too. Each walk up stops at the
    // first directory already known: its own walk goes (or went) on from there, so the
    // ancestors are held once each, not once per entry beneath them (a deep tree of many
    // files would otherwise hold depth x entries paths at once).
    let entries: Vec<PathBuf> = known.iter().cloned().collect();
    for entry in &entries {
        for dir in entry.ancestors().skip(1) {
            if !known.insert(dir.to_path_buf()) {
                break;
            }
        }
    }
    let mut stack = vec![tree.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) => {
                problem(&mut out, format!("cannot list {}: {e}", dir.display()));
                continue;
            }
        };
        let md = fs::symlink_metadata(&dir);
        if let Ok(m) = md
            && m.permissions().mode() & 0o222 != 0
        {
            let rel = dir.strip_prefix(tree).unwrap_or(&dir);
            out.drift.push(format!("{}/ is writable", rel.display()));
        }
        for e in rd.flatten() {
            let path = e.path();
            if !known.contains(&path) {
                let rel = path.strip_prefix(tree).unwrap_or(&path);
                problem(&mut out, format!("{} is not in the package", rel.display()));
            } else if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            }
        }
    }
    if extra > 0 {
        out.problems.push(format!("and {extra} more"));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use fbpkg_common::metainfo::TreeItem;
    use fbpkg_common::pkgref::PackageName;

    use super::super::{Cache, STAGING, TREE_DIR};
    use super::*;
    use crate::archive::ExtractLimits;

    fn p(s: &str) -> Vec<String> {
        s.split('/').map(str::to_owned).collect()
    }

    /// A finished download's tree at `<tmp>/tree`: `f` (40 KiB, its own pieces) and `g`, and
    /// its metainfo, which also lists the empty directory `d`.
    fn download() -> (tempfile::TempDir, Metainfo, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("tree");
        fs::create_dir(&data).expect("tree dir");
        let f: Vec<u8> = (0..40u32 << 10).map(|i| (i % 251) as u8).collect();
        fs::write(data.join("f"), &f).expect("write f");
        fs::write(data.join("g"), b"abc").expect("write g");
        let items = vec![
            TreeItem::File {
                path: p("f"),
                length: f.len() as u64,
                mode: 0o644,
            },
            TreeItem::File {
                path: p("g"),
                length: 3,
                mode: 0o644,
            },
            TreeItem::Dir {
                path: p("d"),
                mode: 0o755,
            },
        ];
        let meta = Metainfo::build_tree(
            items,
            |path| File::open(join(&data, path)),
            "app",
            "http://127.0.0.1:1/announce",
        )
        .expect("tree metainfo");
        (dir, meta, data)
    }

    fn install_moved(dir: &Path, meta: &Metainfo, data: &Path) -> (Cache, PeerError) {
        let cache = Cache::new(dir.join("cache"));
        let name = PackageName::new("app").expect("name");
        let err = cache
            .install(&name, meta, data, Handoff::Move, &ExtractLimits::default())
            .expect_err("the install must fail");
        assert!(cache.lookup(&name, &meta.sha256).is_none());
        let staging = fs::read_dir(cache.root().join(STAGING)).map_or(0, |rd| rd.count());
        assert_eq!(staging, 0, "a failed install leaves nothing in staging");
        (cache, err)
    }

    /// A moved tree whose file fails its SHA-256 is given back where it was, not removed with
    /// the staging directory: `install` promises `data` back on every error.
    #[test]
    fn a_moved_tree_that_fails_its_check_is_given_back() {
        let (dir, meta, data) = download();
        let mut f = fs::read(data.join("f")).expect("read f");
        f[100] ^= 0xff;
        fs::write(data.join("f"), &f).expect("corrupt f");
        let (_, err) = install_moved(dir.path(), &meta, &data);
        assert!(matches!(err, PeerError::Verification(_)), "{err}");
        assert_eq!(fs::read(data.join("f")).expect("f given back"), f);
        assert_eq!(fs::read(data.join("g")).expect("g given back"), b"abc");
    }

    /// A moved tree refused after `finish` took its write bits (here: a stray file where the
    /// metainfo has a directory) comes back writable by its owner, so a download's work
    /// directory can still be removed, or resumed into.
    #[test]
    fn a_tree_given_back_after_finish_is_writable_again() {
        let (dir, meta, data) = download();
        fs::write(data.join("d"), b"stray").expect("stray file");
        let (_, err) = install_moved(dir.path(), &meta, &data);
        assert!(matches!(err, PeerError::Io { .. }), "{err}");
        for name in ["f", "g"] {
            let mode = fs::metadata(data.join(name)).expect("given back").mode();
            assert_eq!(mode & 0o200, 0o200, "{name} has mode {mode:o}");
        }
        assert_eq!(
            fs::metadata(&data).expect("tree").mode() & 0o700,
            0o700,
            "the tree's root"
        );
    }

    /// Files a download reused whole are not read again at install while they are as they
    /// were when their pieces were checked. Here `f` is changed before its stamp is taken and
    /// installed as it is: it was not read. Written again after its stamp (as a write through
    /// the cached version's hard link would), it is read, and refused; so is `g`, not known.
    #[test]
    fn files_reused_whole_are_read_again_only_when_changed_since() {
        let (dir, meta, data) = download();
        let at = |name: &str| meta.files.iter().position(|x| x.path == p(name));
        let f_at = at("f").expect("f");
        let name = PackageName::new("app").expect("name");
        let limits = ExtractLimits::default();
        let cache = Cache::new(dir.path().join("cache"));
        let mut f = fs::read(data.join("f")).expect("read f");
        f[100] ^= 0xff;
        fs::write(data.join("f"), &f).expect("change f");
        let stamp = Unchanged::of(&data.join("f")).expect("stamp");

        // The same bytes written again: its change time moves (the clock's tick may need a
        // few tries to pass).
        let mut moved = false;
        for _ in 0..1000 {
            fs::write(data.join("f"), &f).expect("write f again");
            if Unchanged::of(&data.join("f")).expect("stamp") != stamp {
                moved = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(moved, "a write never moved f's change time");
        let err = cache
            .install_reusing(&name, &meta, &data, &limits, &[(f_at, stamp)], None)
            .expect_err("f changed after its stamp");
        assert!(matches!(err, PeerError::Verification(_)), "{err}");

        // g changed, and not known: read and refused.
        let stamp = Unchanged::of(&data.join("f")).expect("stamp");
        fs::write(data.join("g"), b"abd").expect("change g");
        let err = cache
            .install_reusing(&name, &meta, &data, &limits, &[(f_at, stamp)], None)
            .expect_err("g is read");
        assert!(matches!(err, PeerError::Verification(_)), "{err}");
        fs::write(data.join("g"), b"abc").expect("g as published");

        let entry = cache
            .install_reusing(&name, &meta, &data, &limits, &[(f_at, stamp)], None)
            .expect("installed");
        assert_eq!(fs::read(entry.dir.join(TREE_DIR).join("f")).expect("f"), f);
    }

    #[test]
    fn links_are_made_relative_to_their_directory() {
        assert_eq!(link_text(&p("tool"), &p("bin/tool")), Path::new("bin/tool"));
        assert_eq!(
            link_text(&p("bin/tool"), &p("lib/tool")),
            Path::new("../lib/tool")
        );
        assert_eq!(link_text(&p("bin/tool"), &p("bin/real")), Path::new("real"));
        assert_eq!(link_text(&p("a/b/up"), &p("a")), Path::new(".."));
        assert_eq!(link_text(&p("a/b/here"), &p("a/b")), Path::new("."));
        assert_eq!(link_text(&p("a/b/root"), &[]), Path::new("../.."));
        assert_eq!(link_text(&p("here"), &[]), Path::new("."));
    }
}
