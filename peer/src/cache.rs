//! The launcher cache: verified packages, read-only, where launchers find them.
//!
//! ```text
//! <cache>/<name>/<sha256>/               one entry, r-x: appears whole or not at all
//!     <file name>                        the archive or file as published (r-- or r-x)
//!     tree/                              directory packages: the tree, extracted safely
//!     .fbpkg.torrent                     its metainfo, so any agent can seed the entry
//!     .fbpkg.stamp                       its seal: the archive's size and mtime at install
//! <cache>/.staging/                      entries being assembled (removed at start)
//! <cache>/.tags/<name>/<tag>             last hash each tag resolved to (offline fallback)
//! <cache>/.quarantine/<name>-<sha>-<ns>  entries found corrupt, kept for an operator
//! <cache>/.use/<name>/<sha256>           launches and in-use locks (the `inuse` module)
//! <cache>/.pins/<name>/<sha256>          pinned versions, never evicted (the `pins` module)
//! ```
//!
//! An entry is assembled in `.staging`, fsynced, and renamed into place in one step, after the
//! bytes in staging matched the hash asked for. So a launcher never sees a partial or
//! unverified package, whatever is killed when. [`Cache::lookup`] is the launch path: a few
//! `stat`s, no parsing, no network; [`Cache::lookup_checked`] adds the seal, still without
//! hashing. What can change an entry after install, and how [`Cache::verify`] finds it, is in
//! the `verify` module; what leaves the cache under a size budget, and what never does, in
//! `budget`.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fbpkg_common::Sha256Hash;
use fbpkg_common::metainfo::{Format, Metainfo};
use fbpkg_common::pkgref::{HashPrefix, PackageName, Tag};
use sha2::{Digest, Sha256};

use crate::archive::{self, ExtractLimits};
use crate::error::{PeerError, Result};

pub mod budget;
mod check;
mod inuse;
mod pins;
mod reuse;
mod tree;
mod verify;

pub use budget::{Budget, KeepReason, Protected, SweepReport, Version};
pub use inuse::{Claim, InUse, USE_DIR};
pub use pins::PINS_DIR;
pub use reuse::Reused;
pub use tree::Unchanged;
pub use verify::{QUARANTINE, QUARANTINE_KEEP, SEAL_FILE, Seal, VerifyReport};

/// Metainfo kept in each entry.
pub const METAINFO_FILE: &str = ".fbpkg.torrent";
/// Where a directory package's tree lives inside its entry.
pub use crate::storage::TREE_DIR;

/// What a download checked already, that its install need not read again.
#[derive(Debug, Default)]
struct Checked<'a> {
    /// Tree files unchanged from a cached version ([`Cache::install_reusing`]).
    known: &'a [(usize, Unchanged)],
    /// The SHA-256 of the first bytes of a single file ([`Cache::install_reusing`]).
    prefix: Option<(Sha256, u64)>,
}
const STAGING: &str = ".staging";

/// Staging directories younger than this are never taken for leftovers: a new one is created
/// a moment before it is locked ([`Cache::new_staging`]).
const STAGING_GRACE: Duration = Duration::from_secs(60);
const TAGS: &str = ".tags";

/// Whether [`Cache::install`] may take the data file or must leave it where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handoff {
    /// The file is ours (a finished download, a fresh archive): rename it into the entry.
    Move,
    /// The file is the user's (`publish ./app.bin`): copy it.
    Copy,
}

/// A package present in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedPackage {
    /// `<cache>/<name>/<sha256>`.
    pub dir: PathBuf,
    /// What a launcher uses: the file, or the extracted tree of a directory package.
    pub launch_path: PathBuf,
}

/// The launcher cache rooted at one directory.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
    quarantine_keep: usize,
}

/// SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> io::Result<Sha256Hash> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Sha256Hash(h.finalize().into()))
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(PeerError::io("chmod", path))
}

/// Most bytes of an entry's metainfo file ([`read_own`]): what the metainfo parser accepts.
pub(crate) const METAINFO_CAP: u64 = fbpkg_common::bencode::Limits::METAINFO.max_len as u64;

/// A small file the cache wrote itself (an entry's metainfo or seal, a tag), read as it was
/// written: a regular file, not followed through a link, not waited on, at most `cap` bytes.
/// Anything else there (a FIFO, a link to `/dev/zero`, a file grown past the cap) is an
/// error like an unreadable file, never a hang or an unbounded read.
pub(crate) fn read_own(path: &Path, cap: u64) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(invalid("not a regular file".into()));
    }
    if meta.len() > cap {
        return Err(invalid(format!(
            "{} bytes, over the {cap} allowed",
            meta.len()
        )));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(cap + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(invalid(format!("over the {cap} bytes allowed")));
    }
    Ok(bytes)
}

/// Everything under `dir` read-only ([`make_read_only`]), `dir` itself left as it is: a
/// directory that moves to another parent must stay writable by its owner until it has moved
/// (its `..` changes, and for anyone but root that takes write permission on it), so an entry
/// is staged this way and made read-only itself once in place ([`Cache::commit`]).
fn make_children_read_only(dir: &Path) -> Result<()> {
    for e in fs::read_dir(dir).map_err(PeerError::io("reading directory", dir))? {
        let e = e.map_err(PeerError::io("reading directory", dir))?;
        make_read_only(&e.path())?;
    }
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(PeerError::io("fsync", dir))
}

/// Rename the entry directory `dir` to `dest`, out of the cache or into quarantine. The move
/// needs the directory's owner write bit for anyone but root (see
/// [`make_children_read_only`]): it gets it back first, and its mode is put back if the
/// rename fails. A `dir` that is not there is the rename's `NotFound`.
fn move_entry(dir: &Path, dest: &Path) -> io::Result<()> {
    let was = match fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() && m.permissions().mode() & 0o200 == 0 => {
            let mode = m.permissions().mode() & 0o7777;
            fs::set_permissions(dir, fs::Permissions::from_mode(mode | 0o200))?;
            Some(mode)
        }
        _ => None,
    };
    fs::rename(dir, dest).inspect_err(|_| {
        if let Some(mode) = was {
            let _ = fs::set_permissions(dir, fs::Permissions::from_mode(mode));
        }
    })
}

/// Make a tree read-only: files lose their write bits, directories too (children first).
fn make_read_only(path: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(path).map_err(PeerError::io("reading metadata", path))?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    if meta.is_dir() {
        for e in fs::read_dir(path).map_err(PeerError::io("reading directory", path))? {
            let e = e.map_err(PeerError::io("reading directory", path))?;
            make_read_only(&e.path())?;
        }
    } else {
        // Data first: a power cut after the rename must not expose empty files.
        File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(PeerError::io("fsync", path))?;
    }
    // Unchanged modes are left alone: a chmod costs a syscall per file on a reseal.
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o555 != mode {
        set_mode(path, mode & 0o555)?;
    }
    if meta.is_dir() {
        File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(PeerError::io("fsync", path))?;
    }
    Ok(())
}

/// Give a moved file back to the caller of a failed install, as it was.
fn put_back(file: &Path, data: &Path, mode: u32) {
    let r = fs::set_permissions(file, fs::Permissions::from_mode(mode))
        .and_then(|_| fs::rename(file, data));
    if let Err(e) = r {
        tracing::warn!(from = %file.display(), to = %data.display(), error = %e, "cannot give the file back after a failed install; it is removed with the staging directory");
    }
}

/// The package names among `dir`'s entries (dot-directories and strays are not names).
fn names_in(dir: &Path) -> Vec<PackageName> {
    entries_named(dir, |s| PackageName::new(s).ok())
}

/// `dir`'s entries whose names `parse` accepts, parsed, in no order; none if `dir` cannot be
/// read.
fn entries_named<T>(dir: &Path, parse: impl Fn(&str) -> Option<T>) -> Vec<T> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(&parse))
        .collect()
}

/// Every `<name>/<sha256>` under `dir`, by name then hash: the cache's entries, its pins.
fn versions_in(dir: &Path) -> Vec<(PackageName, Sha256Hash)> {
    let mut out = Vec::new();
    for name in names_in(dir) {
        for h in hashes_in(&dir.join(name.as_str())) {
            out.push((name.clone(), h));
        }
    }
    out.sort();
    out
}

/// The hashes named by `dir`'s entries (one package's directory), in no order; strays are
/// not hashes.
fn hashes_in(dir: &Path) -> Vec<Sha256Hash> {
    entries_named(dir, |s| Sha256Hash::from_hex(s).ok())
}

/// Remove a tree that may be read-only (a failed staging entry, an evicted package).
pub fn remove_tree(path: &Path) -> io::Result<()> {
    fn writable(p: &Path) -> io::Result<()> {
        let meta = fs::symlink_metadata(p)?;
        if meta.is_dir() {
            fs::set_permissions(p, fs::Permissions::from_mode(0o700))?;
            for e in fs::read_dir(p)? {
                writable(&e?.path())?;
            }
        }
        Ok(())
    }
    match writable(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        other => other?,
    }
    fs::remove_dir_all(path)
}

impl Cache {
    /// A cache rooted at `root` (created on first install).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            quarantine_keep: QUARANTINE_KEEP,
        }
    }

    /// Keep at most `n` quarantined entries (default [`QUARANTINE_KEEP`]); older ones are
    /// deleted when another entry is quarantined.
    pub fn with_quarantine_keep(mut self, n: usize) -> Self {
        self.quarantine_keep = n;
        self
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The cache's owner, when this process is root and the cache is another user's: a `get`
    /// or `run` as root beside an agent that is not (the DaemonSet's uid 65532) must give
    /// that owner what it makes, or the agent can neither write beside it nor evict it.
    /// `None` for everyone else, who makes files as themselves (and pays no `stat` for it).
    fn foreign_owner(&self) -> Option<(u32, u32)> {
        use std::os::unix::fs::MetadataExt;
        if !rustix::process::geteuid().is_root() {
            return None;
        }
        let m = fs::metadata(&self.root).ok()?;
        (m.uid() != 0).then(|| (m.uid(), m.gid()))
    }

    /// Give `paths` (links themselves, not what they point at; with `deep`, everything under
    /// them too) to the cache's owner, when [`Cache::foreign_owner`] says to. A failure is
    /// logged: what it costs is the agent's later write or eviction, not this operation.
    pub(crate) fn give_to_owner(&self, paths: &[&Path], deep: bool) {
        if let Some(owner) = self.foreign_owner() {
            for p in paths {
                give(owner, p, deep);
            }
        }
    }

    /// Take `name:sha256` out of the cache: renamed into staging first (one atomic step, so
    /// `lookup` sees the whole entry or nothing), then removed. Absent is not an error.
    pub fn remove(&self, name: &PackageName, sha256: &Sha256Hash) -> Result<()> {
        let dir = self.entry_dir(name, sha256);
        let staging_root = self.root.join(STAGING);
        fs::create_dir_all(&staging_root).map_err(PeerError::io("creating", &staging_root))?;
        self.give_to_owner(&[&staging_root], false);
        let doomed = staging_root.join(format!("removed-{sha256}-{}", rand::random::<u32>()));
        // Locked before it moves, so that it is never in staging unlocked while removed.
        let busy = match File::open(&dir) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(PeerError::io("opening", &dir)(e)),
        };
        busy.lock().map_err(PeerError::io("locking", &dir))?;
        match move_entry(&dir, &doomed) {
            Ok(()) => remove_tree(&doomed).map_err(PeerError::io("removing", &doomed)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(PeerError::io("moving out of the cache", &dir)(e)),
        }
    }

    /// Where the entry for `name:sha256` lives (whether or not it exists).
    pub fn entry_dir(&self, name: &PackageName, sha256: &Sha256Hash) -> PathBuf {
        self.root.join(name.as_str()).join(sha256.to_hex())
    }

    /// The launch path, if `name:sha256` is in the cache. No network, no parsing: stats only.
    pub fn lookup(&self, name: &PackageName, sha256: &Sha256Hash) -> Option<CachedPackage> {
        let dir = self.entry_dir(name, sha256);
        let tree = dir.join(TREE_DIR);
        if fs::metadata(&tree).is_ok_and(|m| m.is_dir()) {
            return Some(CachedPackage {
                dir,
                launch_path: tree,
            });
        }
        let mut files = fs::read_dir(&dir)
            .ok()?
            .flatten()
            .filter(|e| !e.file_name().as_encoded_bytes().starts_with(b"."));
        let file = files.next()?;
        Some(CachedPackage {
            launch_path: file.path(),
            dir,
        })
    }

    /// Entries whose hash starts with `prefix`, in one package or in all.
    pub fn find_prefix(
        &self,
        name: Option<&PackageName>,
        prefix: &HashPrefix,
    ) -> Vec<(PackageName, Sha256Hash)> {
        let names: Vec<PackageName> = match name {
            Some(n) => vec![n.clone()],
            None => self.names(),
        };
        let mut out = Vec::new();
        for n in names {
            for h in hashes_in(&self.root.join(n.as_str())) {
                if prefix.matches(&h) {
                    out.push((n.clone(), h));
                }
            }
        }
        out
    }

    fn names(&self) -> Vec<PackageName> {
        names_in(&self.root)
    }

    /// Every entry with its metainfo and directory, for an agent to seed at start. Unreadable
    /// entries are reported and skipped.
    pub fn entries(&self) -> Vec<(PackageName, Metainfo, PathBuf)> {
        let mut out = Vec::new();
        for name in self.names() {
            for sha in hashes_in(&self.root.join(name.as_str())) {
                let dir = self.entry_dir(&name, &sha);
                let parsed = read_own(&dir.join(METAINFO_FILE), METAINFO_CAP)
                    .map_err(|err| err.to_string())
                    .and_then(|b| Metainfo::parse(&b).map_err(|err| err.to_string()));
                match parsed {
                    Ok(m) if m.sha256 == sha => out.push((name.clone(), m, dir)),
                    Ok(_) => {
                        tracing::warn!(dir = %dir.display(), "cache entry's metainfo is for another hash; not seeded")
                    }
                    Err(err) => {
                        tracing::warn!(dir = %dir.display(), error = %err, "cache entry has no readable metainfo; not seeded")
                    }
                }
            }
        }
        out
    }

    /// Remove staging leftovers of a crashed install: directories no process holds (see
    /// [`Cache::new_staging`]) and older than [`STAGING_GRACE`]. An install in progress, in a
    /// CLI while the agent starts, is left alone.
    pub fn clean_staging(&self) {
        let staging = self.root.join(STAGING);
        let Ok(rd) = fs::read_dir(&staging) else {
            return;
        };
        for e in rd.flatten() {
            let path = e.path();
            let young = e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age < STAGING_GRACE));
            if young {
                continue;
            }
            // In use (locked), or gone meanwhile: left alone.
            let Ok(lock) = File::open(&path) else {
                continue;
            };
            if lock.try_lock().is_err() {
                continue;
            }
            if let Err(err) = remove_tree(&path) {
                tracing::warn!(path = %path.display(), error = %err, "cannot remove staging leftover");
            }
        }
    }

    /// A new directory in staging for `what`, and the exclusive `flock` on it that says it is
    /// in use ([`Cache::clean_staging`] leaves it alone) for as long as the handle lives. The
    /// lock follows the directory when it is renamed into the cache.
    fn new_staging(&self, what: &str) -> Result<(PathBuf, File)> {
        let staging_root = self.root.join(STAGING);
        fs::create_dir_all(&staging_root).map_err(PeerError::io("creating", &staging_root))?;
        let staging = staging_root.join(format!(
            "{what}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        fs::create_dir(&staging).map_err(PeerError::io("creating", &staging))?;
        self.give_to_owner(&[&staging_root, &staging], false);
        let busy = File::open(&staging).map_err(PeerError::io("opening", &staging))?;
        busy.lock().map_err(PeerError::io("locking", &staging))?;
        Ok((staging, busy))
    }

    /// Install `data`, the complete archive `metainfo` describes, as the entry `name:sha256`.
    /// Returns the entry; if another process installed it first, theirs.
    ///
    /// - [`Handoff::Move`]: `data` is ours (a finished download, whose pieces were checked as
    ///   they arrived, or a fresh archive). Its length and SHA-256 are checked where it is, then
    ///   it is renamed into the entry (copied, and checked again as it is copied, across file
    ///   systems).
    /// - [`Handoff::Copy`]: `data` is the user's and may change at any time. It is copied into
    ///   staging with its length, pieces and SHA-256 checked on the way: the bytes checked are
    ///   the bytes kept.
    ///
    /// A tree package ([`Format::Tree`]) is the same with `data` a directory holding its
    /// regular files: a download's tree (moved, then each file checked against its SHA-256), or
    /// the publisher's directory (each file copied and checked on the way). Links, empty files
    /// and directories are made from the metainfo. A copy takes nothing else from `data`; a
    /// move takes the directory whole (a download's tree holds only the package's files, and
    /// `verify` reports anything else as not in the package).
    ///
    /// On error nothing is left in the cache or its staging directory, every handle opened is
    /// closed, and `data` is where it was (moved back if it had been moved), so the caller can
    /// retry or clean up as it sees fit.
    pub fn install(
        &self,
        name: &PackageName,
        metainfo: &Metainfo,
        data: &Path,
        handoff: Handoff,
        limits: &ExtractLimits,
    ) -> Result<CachedPackage> {
        self.install_inner(name, metainfo, data, handoff, limits, Checked::default())
    }

    /// [`Cache::install`] of a download ([`Handoff::Move`]) with what it checked already.
    ///
    /// A tree's files at `known` (indices in the metainfo's files, in order, each with how it
    /// was then) are not read again when they are still as they were: files a cached version
    /// held (its install checked their SHA-256, the one the new metainfo names) whose every
    /// piece matched the new version's SHA-1 when the download started
    /// ([`Cache::reuse_into`]). A hard-linked one shares its inode with the cached version's
    /// file, so a write there since (as root: the entry is read-only) changes it here too:
    /// such a file is read as any other.
    ///
    /// A single file's `prefix` is the SHA-256 state after its first `prefix.1` bytes, read
    /// from `data` itself (never written since): only the rest is read to check it. A tree
    /// ignores it (each file has its own SHA-256). With neither, this is `install` with
    /// [`Handoff::Move`].
    pub fn install_reusing(
        &self,
        name: &PackageName,
        metainfo: &Metainfo,
        data: &Path,
        limits: &ExtractLimits,
        known: &[(usize, Unchanged)],
        prefix: Option<(Sha256, u64)>,
    ) -> Result<CachedPackage> {
        let checked = Checked { known, prefix };
        self.install_inner(name, metainfo, data, Handoff::Move, limits, checked)
    }

    fn install_inner(
        &self,
        name: &PackageName,
        metainfo: &Metainfo,
        data: &Path,
        handoff: Handoff,
        limits: &ExtractLimits,
        Checked { known, prefix }: Checked<'_>,
    ) -> Result<CachedPackage> {
        check_name_free(metainfo)?;
        if handoff == Handoff::Move && metainfo.format != Format::Tree {
            match prefix {
                Some(prefix) => check::rest_matches(data, metainfo, prefix)?,
                None => check::file_matches(data, metainfo, false)?,
            }
        }
        if let Some(existing) = self.lookup(name, &metainfo.sha256) {
            return Ok(existing);
        }
        let (staging, _busy) = self.new_staging(&metainfo.sha256.to_hex())?;
        let mut moved = None;
        let result = self.assemble(
            &staging,
            (name, metainfo),
            data,
            (handoff, known),
            limits,
            &mut moved,
        );
        if result.is_err() {
            if metainfo.format == Format::Tree {
                if moved.is_some() {
                    tree::give_back(&staging.join(TREE_DIR), data);
                }
            } else if let Some(mode) = moved {
                put_back(&staging.join(&metainfo.name), data, mode);
            }
            if let Err(e) = remove_tree(&staging) {
                tracing::warn!(path = %staging.display(), error = %e, "cannot remove a failed install's staging directory");
            }
        }
        result
    }

    /// Build the entry in `staging` and rename it into place. `moved` is set to `data`'s mode
    /// once `data` has been renamed into `staging`.
    fn assemble(
        &self,
        staging: &Path,
        (name, metainfo): (&PackageName, &Metainfo),
        data: &Path,
        (handoff, known): (Handoff, &[(usize, Unchanged)]),
        limits: &ExtractLimits,
        moved: &mut Option<u32>,
    ) -> Result<CachedPackage> {
        if metainfo.format == Format::Tree {
            let tree = staging.join(TREE_DIR);
            let mut tree_moved = false;
            let placed = tree::place(metainfo, data, (handoff, known), &tree, &mut tree_moved);
            if tree_moved {
                *moved = Some(0);
            }
            placed?;
            tree::finish(metainfo, &tree)?;
        } else {
            self.place_file(staging, metainfo, data, handoff, limits, moved)?;
        }
        self.commit(staging, name, metainfo).map(|(entry, _)| entry)
    }

    /// Write the metainfo and the seal into `staging`, which holds the package, and rename it
    /// into place. Also says whether this rename made the entry (false: a concurrent install
    /// of the same version got there first, and `staging` is gone).
    fn commit(
        &self,
        staging: &Path,
        name: &PackageName,
        metainfo: &Metainfo,
    ) -> Result<(CachedPackage, bool)> {
        let meta_path = staging.join(METAINFO_FILE);
        fs::write(&meta_path, metainfo.as_bytes()).map_err(PeerError::io("writing", &meta_path))?;
        verify::write_seal(staging, metainfo)?;
        make_children_read_only(staging)?;
        let parent = self.root.join(name.as_str());
        fs::create_dir_all(&parent).map_err(PeerError::io("creating", &parent))?;
        self.give_to_owner(&[&parent], false);
        self.give_to_owner(&[staging], true);
        let dest = parent.join(metainfo.sha256.to_hex());
        if let Err(e) = fs::rename(staging, &dest) {
            if let Some(existing) = self.lookup(name, &metainfo.sha256) {
                let _ = remove_tree(staging);
                return Ok((existing, false));
            }
            return Err(PeerError::io("moving into the cache", &dest)(e));
        }
        // The entry is in place and complete: from here on, failing would leave it there while
        // telling the caller it is not. Its directory goes read-only now that it has moved.
        let sealed = fs::symlink_metadata(&dest).and_then(|m| {
            let mode = m.permissions().mode() & 0o7777;
            fs::set_permissions(&dest, fs::Permissions::from_mode(mode & 0o555))?;
            File::open(&dest)?.sync_all()
        });
        if let Err(e) = sealed {
            tracing::warn!(path = %dest.display(), error = %e, "cannot make the new entry's directory read-only");
        }
        if let Err(e) = File::open(&parent).and_then(|f| f.sync_all()) {
            tracing::warn!(path = %parent.display(), error = %e, "cannot fsync the cache directory; the new entry may not survive a power cut");
        }
        self.lookup(name, &metainfo.sha256)
            .map(|entry| (entry, true))
            .ok_or_else(|| PeerError::Io {
                context: "reading back the new entry",
                path: dest,
                source: io::Error::from(io::ErrorKind::NotFound),
            })
    }

    /// A single-file package's file (and an archive's extracted tree) in `staging`.
    fn place_file(
        &self,
        staging: &Path,
        metainfo: &Metainfo,
        data: &Path,
        handoff: Handoff,
        limits: &ExtractLimits,
        moved: &mut Option<u32>,
    ) -> Result<()> {
        let file = staging.join(&metainfo.name);
        let mode_before = match handoff {
            Handoff::Move => fs::metadata(data).ok().map(|m| m.permissions().mode()),
            Handoff::Copy => None,
        };
        #[cfg(test)]
        tests::before_copy(data);
        match mode_before {
            Some(mode) if fs::rename(data, &file).is_ok() => *moved = Some(mode),
            // The user's file, or another file system: copy, checking what is written.
            _ => check::copy_checked(data, &file, metainfo)?,
        }
        finish_file(staging, metainfo, limits)
    }

    /// Publish the user's single file `data` as `file_name` in `format` (never a tree), its
    /// metainfo naming `announce`: [`Cache::install_built`] with [`Metainfo::build`] told the
    /// size the file has now.
    pub fn install_file(
        &self,
        name: &PackageName,
        data: &Path,
        (file_name, announce, format): (&str, &str, Format),
    ) -> Result<(CachedPackage, Metainfo, bool)> {
        let size = fs::metadata(data)
            .map_err(PeerError::io("reading", data))?
            .len();
        self.install_built(name, data, &ExtractLimits::default(), |r| {
            Metainfo::build(r, size, file_name, announce, format)
        })
    }

    /// Publish the user's single file `data` (a copy, as [`Handoff::Copy`]) in one read:
    /// `build` makes its metainfo from a reader over it, and each byte it reads is written
    /// into the new entry on the way, so the bytes the metainfo describes are the bytes kept,
    /// and `data` is read once instead of twice (a metainfo built first, then a checked
    /// copy). `build` must read to the end; [`Metainfo::build`] fails when the file is not
    /// the size it was told, so a file that changes while it is read is not published.
    ///
    /// Returns the entry, its metainfo, and whether the entry is new (false: that version was
    /// in the cache already, and is left as it was). On error nothing is left in the cache or
    /// its staging directory. Tree packages go through [`Cache::install`].
    fn install_built(
        &self,
        name: &PackageName,
        data: &Path,
        limits: &ExtractLimits,
        build: impl FnOnce(&mut dyn Read) -> io::Result<Metainfo>,
    ) -> Result<(CachedPackage, Metainfo, bool)> {
        let (staging, _busy) = self.new_staging("publish")?;
        let result = self.build_into(&staging, name, data, limits, build);
        // A new entry took the staging directory with it; anything else may leave it behind.
        if staging.exists()
            && let Err(e) = remove_tree(&staging)
        {
            tracing::warn!(path = %staging.display(), error = %e, "cannot remove a publish's staging directory");
        }
        result
    }

    fn build_into(
        &self,
        staging: &Path,
        name: &PackageName,
        data: &Path,
        limits: &ExtractLimits,
        build: impl FnOnce(&mut dyn Read) -> io::Result<Metainfo>,
    ) -> Result<(CachedPackage, Metainfo, bool)> {
        // The metainfo's name is not known before the bytes are read: the copy goes under a
        // name no package may have (`check_name_free`), and is renamed once it is.
        let building = staging.join(".fbpkg-building");
        let (built, copy_failed) = {
            let from = check::open_source(data)?;
            let mut to = check::create_copy(&building)?;
            let mut tee = check::Tee::new(from, &mut to);
            let built = build(&mut tee);
            (built, tee.write_error())
        };
        let metainfo = built.map_err(|e| match e.kind() {
            io::ErrorKind::InvalidInput => PeerError::BadInput(e.to_string()),
            io::ErrorKind::InvalidData => PeerError::Verification(format!(
                "{} changed while it was published: {e}",
                data.display()
            )),
            _ => PeerError::io("reading", data)(e),
        })?;
        if metainfo.format == Format::Tree {
            return Err(PeerError::BadInput(
                "a tree package is published with `Cache::install`".into(),
            ));
        }
        check_name_free(&metainfo)?;
        // A version already here needs no copy: one that failed (a full disk) does not fail it.
        if let Some(existing) = self.lookup(name, &metainfo.sha256) {
            return Ok((existing, metainfo, false));
        }
        if let Some(e) = copy_failed {
            return Err(PeerError::io("copying into the cache", &building)(e));
        }
        let file = staging.join(&metainfo.name);
        fs::rename(&building, &file).map_err(PeerError::io("renaming", &building))?;
        finish_file(staging, &metainfo, limits)?;
        let (entry, made) = self.commit(staging, name, &metainfo)?;
        Ok((entry, metainfo, made))
    }

    /// Remember what a tag resolved to, for when the tracker cannot be reached.
    pub fn remember_tag(&self, name: &PackageName, tag: &Tag, sha: &Sha256Hash) {
        let dir = self.root.join(TAGS).join(name.as_str());
        let path = dir.join(tag.as_str());
        let tmp = dir.join(format!(".{tag}.{}", std::process::id()));
        let r = fs::create_dir_all(&dir)
            .and_then(|_| fs::write(&tmp, sha.to_hex()))
            .and_then(|_| {
                self.give_to_owner(&[&self.root.join(TAGS), &dir, &tmp], false);
                fs::rename(&tmp, &path)
            });
        if let Err(e) = r {
            tracing::debug!(error = %e, "cannot remember tag");
        }
    }

    /// The last hash `name:tag` resolved to on this host.
    pub fn recall_tag(&self, name: &PackageName, tag: &Tag) -> Option<Sha256Hash> {
        let bytes = read_own(
            &self.root.join(TAGS).join(name.as_str()).join(tag.as_str()),
            4096,
        )
        .ok()?;
        Sha256Hash::from_hex(std::str::from_utf8(&bytes).ok()?.trim()).ok()
    }
}

/// A single-file package's file in `staging` (named as in its metainfo): its tree extracted
/// beside it for an archive, and made read-only (and executable for an executable).
fn finish_file(staging: &Path, metainfo: &Metainfo, limits: &ExtractLimits) -> Result<()> {
    let file = staging.join(&metainfo.name);
    if metainfo.format == Format::TarZst {
        archive::extract(&file, &staging.join(TREE_DIR), limits)?;
    }
    let mode = if metainfo.format == Format::Executable {
        0o555
    } else {
        0o444
    };
    set_mode(&file, mode)
}

fn give((uid, gid): (u32, u32), path: &Path, deep: bool) {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = fs::symlink_metadata(path) else {
        return;
    };
    if m.uid() != uid || m.gid() != gid {
        match std::os::unix::fs::lchown(path, Some(uid), Some(gid)) {
            // A change of owner clears set-user-ID and set-group-ID bits, which a tree's
            // identity covers: put back.
            Ok(()) if !m.is_symlink() && m.mode() & 0o6000 != 0 => {
                let _ = fs::set_permissions(path, fs::Permissions::from_mode(m.mode() & 0o7777));
            }
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot give a file to the cache's owner");
            }
        }
    }
    if deep && m.is_dir() {
        for entry in fs::read_dir(path).into_iter().flatten().flatten() {
            give((uid, gid), &entry.path(), true);
        }
    }
}

/// A single-file package may not take a name the entry's own files use.
fn check_name_free(metainfo: &Metainfo) -> Result<()> {
    let file_name = metainfo.name.as_str();
    if metainfo.format == Format::Tree {
        return Ok(());
    }
    if file_name.starts_with('.') {
        // The entry's own files are dot files, and a lookup takes the one name that is not:
        // a package file named so would be installed and then never found.
        return Err(PeerError::BadInput(format!(
            "file name {file_name:?}: a single-file package's name cannot start with '.' in \
             the launcher cache; publish it under another name, or in a directory"
        )));
    }
    if file_name == TREE_DIR && metainfo.format == Format::TarZst {
        return Err(PeerError::BadInput(format!(
            "file name {file_name:?} is reserved in the launcher cache"
        )));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::os::unix::fs::MetadataExt;

    type Hook = Box<dyn Fn(&Path)>;

    thread_local! {
        /// Run by `assemble` just before it takes the data: stands for whatever else writes the
        /// user's file while it is being published.
        static BEFORE_COPY: RefCell<Option<Hook>> = RefCell::new(None);
    }

    pub(super) fn before_copy(data: &Path) {
        BEFORE_COPY.with(|h| {
            if let Some(hook) = h.borrow().as_ref() {
                hook(data)
            }
        });
    }

    fn staging_is_empty(cache: &Cache) -> bool {
        fs::read_dir(cache.root().join(STAGING))
            .map(|mut rd| rd.next().is_none())
            .unwrap_or(true)
    }

    /// The user's file changes after the metainfo was built from it (and after any check of it
    /// in place): the copy must be refused, not cached under a name its bytes do not match.
    #[test]
    fn a_file_changed_while_published_never_reaches_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().join("cache"));
        let name = PackageName::new("app").unwrap();
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        let m = meta(&bytes, "app.bin", Format::File);
        let user = dir.path().join("app.bin");
        fs::write(&user, &bytes).unwrap();

        // Same length, one byte different: only hashing what was copied can tell.
        BEFORE_COPY.with(|h| {
            *h.borrow_mut() = Some(Box::new(|p: &Path| {
                let mut b = fs::read(p).unwrap();
                b[150_000] ^= 0xff;
                fs::write(p, b).unwrap();
            }))
        });
        let err = cache
            .install(&name, &m, &user, Handoff::Copy, &ExtractLimits::default())
            .unwrap_err();
        BEFORE_COPY.with(|h| *h.borrow_mut() = None);
        assert!(matches!(err, PeerError::Verification(_)), "{err}");
        assert!(
            err.to_string().contains("change while it was published"),
            "{err}"
        );
        assert!(cache.lookup(&name, &m.sha256).is_none());
        assert!(!cache.entry_dir(&name, &m.sha256).exists());
        assert!(staging_is_empty(&cache));
        assert!(user.exists(), "the user's file is left alone");

        // Unchanged, it goes in; installing it again is a no-op.
        fs::write(&user, &bytes).unwrap();
        let entry = cache
            .install(&name, &m, &user, Handoff::Copy, &ExtractLimits::default())
            .unwrap();
        assert_eq!(fs::read(&entry.launch_path).unwrap(), bytes);
        assert_eq!(fs::read(&user).unwrap(), bytes);
    }

    /// A download handed over with `Move` and refused after it was moved (here: an unsafe
    /// archive) is given back where it was, as it was.
    #[test]
    fn a_failed_move_gives_the_file_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut tar_bytes = Vec::new();
        {
            let mut b = tar::Builder::new(&mut tar_bytes);
            let mut h = tar::Header::new_old();
            h.as_old_mut().name[..1].copy_from_slice(b"l");
            h.as_old_mut().linkname[..5].copy_from_slice(b"/etc/");
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            h.set_cksum();
            b.append(&h, &b""[..]).unwrap();
            b.finish().unwrap();
        }
        let bytes = zstd::encode_all(&tar_bytes[..], 3).unwrap();
        let m = meta(&bytes, "x.tar.zst", Format::TarZst);
        let part = dir.path().join("data.part");
        fs::write(&part, &bytes).unwrap();
        fs::set_permissions(&part, fs::Permissions::from_mode(0o640)).unwrap();
        let cache = Cache::new(dir.path().join("cache"));
        let name = PackageName::new("x").unwrap();
        let err = cache
            .install(&name, &m, &part, Handoff::Move, &ExtractLimits::default())
            .unwrap_err();
        assert!(matches!(err, PeerError::UnsafeArchive(_)), "{err}");
        assert_eq!(fs::read(&part).unwrap(), bytes);
        assert_eq!(fs::metadata(&part).unwrap().mode() & 0o777, 0o640);
        assert!(staging_is_empty(&cache));
        assert!(!cache.entry_dir(&name, &m.sha256).exists());
    }

    /// Metainfo for `bytes`, as the tests of the cache's modules make it.
    pub(crate) fn meta(bytes: &[u8], name: &str, format: Format) -> Metainfo {
        Metainfo::build(
            bytes,
            bytes.len() as u64,
            name,
            "http://127.0.0.1:1/announce",
            format,
        )
        .unwrap()
    }

    /// A tmpfs of a given size on a fresh directory, unmounted on drop: a disk that fills up
    /// without filling anyone else's.
    struct Tmpfs {
        dir: tempfile::TempDir,
    }

    impl Tmpfs {
        /// `None`, with a note, where this process may not mount (not root).
        fn mount(size: &str) -> Option<Self> {
            let dir = tempfile::tempdir().unwrap();
            let mounted = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !mounted {
                eprintln!("skipped: cannot mount a tmpfs here (this test needs root)");
                return None;
            }
            Some(Self { dir })
        }

        fn path(&self) -> &Path {
            self.dir.path()
        }

        /// Bytes available, as `statvfs` counts them.
        fn available(&self) -> u64 {
            let out = std::process::Command::new("stat")
                .args(["-f", "-c", "%a %S"])
                .arg(self.path())
                .output()
                .unwrap();
            let text = String::from_utf8(out.stdout).unwrap();
            let (blocks, size) = text.trim().split_once(' ').unwrap();
            blocks.parse::<u64>().unwrap() * size.parse::<u64>().unwrap()
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg(self.dir.path())
                .status();
        }
    }

    fn is_enospc(e: &PeerError) -> bool {
        matches!(e, PeerError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC))
    }

    /// Bytes no compressor can shrink (xorshift), so they take their size on disk.
    fn noise(len: usize) -> Vec<u8> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Running out of space while copying or extracting leaves no staging, no entry and no open
    /// handle behind: the space is free again and the next, smaller install succeeds.
    #[test]
    fn a_full_disk_leaves_nothing_behind() {
        let Some(disk) = Tmpfs::mount("1m") else {
            return;
        };
        let cache = Cache::new(disk.path().join("cache"));
        fs::create_dir_all(cache.root().join(STAGING)).unwrap();
        let elsewhere = tempfile::tempdir().unwrap();

        // A directory package whose archive fits but whose tree does not, moved in from the
        // same file system as a finished download is: extraction fails.
        let src = elsewhere.path().join("src");
        fs::create_dir(&src).unwrap();
        fs::write(src.join("zeros"), vec![0u8; 4 << 20]).unwrap();
        let mut arc = Vec::new();
        archive::create(&src, &mut arc).unwrap();
        let m = meta(&arc, "big.tar.zst", Format::TarZst);
        let part = disk.path().join("data.part");
        fs::write(&part, &arc).unwrap();
        let name = PackageName::new("big").unwrap();
        let free = disk.available();
        let err = cache
            .install(&name, &m, &part, Handoff::Move, &ExtractLimits::default())
            .unwrap_err();
        assert!(is_enospc(&err), "{err}");
        assert_eq!(
            disk.available(),
            free,
            "space held after a failed extraction"
        );
        assert!(staging_is_empty(&cache));
        assert!(!cache.entry_dir(&name, &m.sha256).exists());
        assert_eq!(fs::read(&part).unwrap(), arc, "the download is given back");
        fs::remove_file(&part).unwrap();

        // A file bigger than the disk, copied in from elsewhere: the copy fails.
        let bytes = noise(2 << 20);
        let m = meta(&bytes, "big.bin", Format::File);
        let user = elsewhere.path().join("big.bin");
        fs::write(&user, &bytes).unwrap();
        let free = disk.available();
        let err = cache
            .install(&name, &m, &user, Handoff::Copy, &ExtractLimits::default())
            .unwrap_err();
        assert!(is_enospc(&err), "{err}");
        assert_eq!(disk.available(), free, "space held after a failed copy");
        assert!(staging_is_empty(&cache));

        // The same, published in one pass (the metainfo built as it is copied).
        let bytes = noise(2 << 20);
        fs::write(&user, &bytes).unwrap();
        let err = cache
            .install_built(&name, &user, &ExtractLimits::default(), |r| {
                Metainfo::build(r, 2 << 20, "big.bin", "http://127.0.0.1:1/a", Format::File)
            })
            .unwrap_err();
        assert!(is_enospc(&err), "{err}");
        assert_eq!(disk.available(), free, "space held after a failed publish");
        assert!(staging_is_empty(&cache));

        // Nearly all of the disk: fits only if nothing of the failures is left.
        let bytes = noise(900 << 10);
        let m = meta(&bytes, "fits.bin", Format::File);
        fs::write(&user, &bytes).unwrap();
        let entry = cache
            .install(&name, &m, &user, Handoff::Copy, &ExtractLimits::default())
            .unwrap();
        assert_eq!(fs::read(&entry.launch_path).unwrap(), bytes);

        // Published again: no room for a second copy, and none needed.
        let free = disk.available();
        let (again, m2, fresh) = cache
            .install_built(&name, &user, &ExtractLimits::default(), |r| {
                Metainfo::build(
                    r,
                    900 << 10,
                    "fits.bin",
                    "http://127.0.0.1:1/announce",
                    Format::File,
                )
            })
            .unwrap();
        assert_eq!((again, m2, fresh), (entry, m, false));
        assert_eq!(disk.available(), free);
        assert!(staging_is_empty(&cache));
    }

    #[test]
    fn a_publish_builds_the_metainfo_from_the_bytes_it_copies() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().join("cache"));
        let name = PackageName::new("tool").unwrap();
        let bytes = noise(300 << 10);
        let user = dir.path().join("tool.bin");
        fs::write(&user, &bytes).unwrap();
        let len = bytes.len() as u64;
        let build = |size: u64, file_name: &'static str| {
            move |r: &mut dyn Read| {
                Metainfo::build(
                    r,
                    size,
                    file_name,
                    "http://127.0.0.1:1/announce",
                    Format::Executable,
                )
            }
        };

        let (entry, m, fresh) = cache
            .install_built(&name, &user, &ExtractLimits::default(), build(len, "tool"))
            .unwrap();
        assert!(fresh);
        assert_eq!(
            m,
            meta(&bytes, "tool", Format::Executable),
            "the metainfo of the bytes"
        );
        assert_eq!(
            fs::read(&entry.launch_path).unwrap(),
            bytes,
            "the bytes kept"
        );
        assert_eq!(
            fs::metadata(&entry.launch_path).unwrap().mode() & 0o777,
            0o555
        );
        assert_eq!(
            cache.lookup_checked(&name, &m.sha256).unwrap(),
            Some(entry.clone())
        );
        assert!(staging_is_empty(&cache));
        assert_eq!(
            fs::read(&user).unwrap(),
            bytes,
            "the user's file is left alone"
        );

        let (again, m2, fresh) = cache
            .install_built(&name, &user, &ExtractLimits::default(), build(len, "tool"))
            .unwrap();
        assert_eq!(
            (again, m2, fresh),
            (entry, m, false),
            "published before: left as it was"
        );
        assert!(staging_is_empty(&cache));

        // The file is not the size it had when the publish began (it changed meanwhile).
        let err = cache
            .install_built(
                &name,
                &user,
                &ExtractLimits::default(),
                build(len - 1, "tool"),
            )
            .unwrap_err();
        assert!(err.to_string().contains("grew while it was read"), "{err}");
        assert!(matches!(err, PeerError::Verification(_)), "{err}");
        assert!(staging_is_empty(&cache));
        let err = cache
            .install_built(&name, &user, &ExtractLimits::default(), build(len, "a/b"))
            .unwrap_err();
        assert!(
            matches!(err, PeerError::BadInput(_)),
            "an unsafe file name: {err}"
        );
        let err = cache
            .install_built(
                &name,
                &user,
                &ExtractLimits::default(),
                build(len, ".fbpkg-x"),
            )
            .unwrap_err();
        assert!(matches!(err, PeerError::BadInput(_)), "{err}");
        assert!(staging_is_empty(&cache));
        assert_eq!(cache.entries().len(), 1, "nothing else went into the cache");
    }

    #[test]
    fn install_verifies_then_appears_whole_and_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().join("cache"));
        let name = PackageName::new("tool").unwrap();
        let bytes = b"#!/bin/sh\necho ok\n".repeat(100);
        let m = meta(&bytes, "tool.sh", Format::Executable);

        // Wrong bytes: refused, nothing in the cache, the download left for the caller.
        let bad = dir.path().join("bad");
        fs::write(&bad, b"something else").unwrap();
        let err = cache
            .install(&name, &m, &bad, Handoff::Move, &ExtractLimits::default())
            .unwrap_err();
        assert!(matches!(err, PeerError::Verification(_)), "{err}");
        assert!(cache.lookup(&name, &m.sha256).is_none());
        assert!(!cache.entry_dir(&name, &m.sha256).exists());

        let good = dir.path().join("good");
        fs::write(&good, &bytes).unwrap();
        let entry = cache
            .install(&name, &m, &good, Handoff::Move, &ExtractLimits::default())
            .unwrap();
        assert_eq!(
            entry.launch_path,
            cache.entry_dir(&name, &m.sha256).join("tool.sh")
        );
        assert_eq!(fs::read(&entry.launch_path).unwrap(), bytes);
        assert_eq!(
            fs::metadata(&entry.launch_path).unwrap().mode() & 0o777,
            0o555
        );
        assert_eq!(
            fs::metadata(&entry.dir).unwrap().mode() & 0o222,
            0,
            "entry dir read-only"
        );
        assert_eq!(cache.lookup(&name, &m.sha256), Some(entry.clone()));
        let listed = cache.entries();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].1.info_hash, m.info_hash);
        assert!(
            fs::read_dir(dir.path().join("cache/.staging"))
                .unwrap()
                .next()
                .is_none()
        );

        // Installing again is a no-op that returns the same entry.
        let again = dir.path().join("again");
        fs::write(&again, &bytes).unwrap();
        assert_eq!(
            cache
                .install(&name, &m, &again, Handoff::Move, &ExtractLimits::default())
                .unwrap(),
            entry
        );
        remove_tree(&entry.dir).unwrap();
        assert!(cache.lookup(&name, &m.sha256).is_none());
    }

    /// An agent starting up removes what a crashed install left in staging, but not an
    /// install in progress in another process (a CLI's), nor a directory just made.
    #[test]
    fn an_agent_starting_removes_leftovers_not_installs_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().join("cache"));
        let staging = cache.root().join(STAGING);
        let old = std::time::SystemTime::now() - STAGING_GRACE * 2;
        let make = |name: &str| {
            let d = staging.join(name);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("part"), b"bytes").unwrap();
            d
        };
        let age = |d: &Path| File::open(d).unwrap().set_modified(old).unwrap();

        let crashed = make("crashed");
        age(&crashed);
        let (in_progress, busy) = cache.new_staging("install").unwrap();
        fs::write(in_progress.join("part"), b"bytes").unwrap();
        age(&in_progress);
        let just_made = make("just-made");

        cache.clean_staging();
        assert!(!crashed.exists(), "a leftover nobody holds is removed");
        assert!(
            in_progress.join("part").exists(),
            "an install in progress is left alone"
        );
        assert!(just_made.exists(), "a directory just made is left alone");

        drop(busy);
        cache.clean_staging();
        assert!(
            !in_progress.exists(),
            "once its install is gone, it is a leftover"
        );
        assert!(just_made.exists());
    }

    /// The cache's own small files replaced by what no install writes (a FIFO, a link to
    /// `/dev/zero`): reading them is an error, handled as an unreadable file, never a hang or
    /// an endless read. Each call runs on a thread the test waits for, so a regression fails
    /// rather than hangs.
    #[test]
    fn odd_files_in_an_entry_are_unreadable_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().join("cache"));
        let name = PackageName::new("tool").unwrap();
        let bytes = b"#!/bin/sh\necho ok\n".repeat(10);
        let m = meta(&bytes, "tool.sh", Format::Executable);
        let download = dir.path().join("download");
        fs::write(&download, &bytes).unwrap();
        let entry = cache
            .install(
                &name,
                &m,
                &download,
                Handoff::Move,
                &ExtractLimits::default(),
            )
            .unwrap();
        set_mode(&entry.dir, 0o755).unwrap();
        let torrent = entry.dir.join(METAINFO_FILE);
        fs::remove_file(&torrent).unwrap();
        let made = std::process::Command::new("mkfifo").arg(&torrent).status();
        assert!(made.unwrap().success(), "mkfifo");
        let seal = entry.dir.join(SEAL_FILE);
        fs::remove_file(&seal).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &seal).unwrap();
        let tag = Tag::new("stable").unwrap();
        cache.remember_tag(&name, &tag, &m.sha256);
        let tag_file = cache.root().join(TAGS).join("tool").join("stable");
        fs::remove_file(&tag_file).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &tag_file).unwrap();

        assert!(within(move || read_own(&torrent, METAINFO_CAP)).is_err());
        let c = cache.clone();
        assert!(
            within(move || c.entries()).is_empty(),
            "not seeded, not hung"
        );
        let (c, n) = (cache.clone(), name.clone());
        assert_eq!(within(move || c.recall_tag(&n, &tag)), None);
        let (c, n, sha) = (cache.clone(), name.clone(), m.sha256);
        let checked = within(move || c.lookup_checked(&n, &sha));
        assert!(!matches!(checked, Ok(Some(_))), "not served: {checked:?}");
        let grown = dir.path().join("grown");
        fs::write(&grown, vec![b'x'; 5000]).unwrap();
        assert!(read_own(&grown, 4096).is_err());
        assert_eq!(read_own(&grown, 5000).unwrap().len(), 5000);
    }

    /// `f()` on a thread of its own: a regression that hangs fails the test instead.
    fn within<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(f()));
        rx.recv_timeout(Duration::from_secs(60))
            .expect("returned instead of hanging")
    }

    /// A FIFO (or any file that is not a regular one) named as what to publish or install is
    /// refused at once, saying what it is: opening it for reading waited for a writer forever
    /// (in the agent, a blocking thread and a control connection with it).
    #[test]
    fn a_fifo_to_publish_or_install_is_refused_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().join("cache"));
        let name = PackageName::new("tool").unwrap();
        let bytes = b"#!/bin/sh\necho ok\n".repeat(10);
        let m = meta(&bytes, "tool.sh", Format::Executable);
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.unwrap().success(), "mkfifo");
        let (c, n, f) = (cache.clone(), name.clone(), fifo.clone());
        let published = within(move || {
            c.install_file(
                &n,
                &f,
                ("tool.sh", "http://127.0.0.1:1/announce", Format::File),
            )
        });
        match published {
            Err(PeerError::BadInput(why)) => assert!(why.contains("a FIFO"), "{why}"),
            other => panic!("publish: {other:?}"),
        }
        for handoff in [Handoff::Copy, Handoff::Move] {
            let (c, n, f, m) = (cache.clone(), name.clone(), fifo.clone(), m.clone());
            let installed =
                within(move || c.install(&n, &m, &f, handoff, &ExtractLimits::default()));
            match installed {
                Err(PeerError::BadInput(why)) => assert!(why.contains("a FIFO"), "{why}"),
                other => panic!("install ({handoff:?}): {other:?}"),
            }
        }
        assert!(fifo.exists(), "left where it was");
        assert!(cache.entries().is_empty());
        let staging = fs::read_dir(cache.root().join(STAGING)).map_or(0, |d| d.count());
        assert_eq!(staging, 0, "nothing left in staging");
    }

    /// A single file named with a leading dot would be installed and never found (the
    /// entry's own files are dot files, which a lookup passes over): refused, before anything
    /// reaches the cache.
    #[test]
    fn a_file_named_with_a_leading_dot_is_refused_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().join("cache"));
        let name = PackageName::new("cfg").unwrap();
        for file in [".env", ".fbpkg.torrent"] {
            let bytes = b"KEY=value\n".to_vec();
            let m = meta(&bytes, file, Format::File);
            let data = dir.path().join("data");
            fs::write(&data, &bytes).unwrap();
            let err = cache
                .install(&name, &m, &data, Handoff::Move, &ExtractLimits::default())
                .unwrap_err();
            assert!(matches!(err, PeerError::BadInput(_)), "{err}");
            assert!(err.to_string().contains("cannot start with '.'"), "{err}");
            assert!(!cache.entry_dir(&name, &m.sha256).exists());
            assert_eq!(
                fs::read(&data).unwrap(),
                bytes,
                "the data is left where it was"
            );
        }
    }

    /// Whether this test process runs as root (its effective uid, as the cache asks).
    pub(crate) fn running_as_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    /// Set in the environment of this test binary run again as another user.
    const AS_NOBODY: &str = "FBPKG_TEST_AS_NOBODY";

    /// An agent that is not root (the DaemonSet's runs as uid 65532) installs, removes and
    /// quarantines. For anyone but root a directory must be writable to move to another parent
    /// (its `..` changes): an entry made read-only in staging could not move into the cache,
    /// nor out of it. As root, the test runs again as `nobody` to see that.
    #[test]
    fn an_agent_that_is_not_root_installs_removes_and_quarantines() {
        if running_as_root() && std::env::var_os(AS_NOBODY).is_none() {
            let me = std::env::current_exe().unwrap();
            let run = std::process::Command::new("runuser")
                .args(["-u", "nobody", "--"])
                .arg(me)
                .args([
                    "cache::tests::an_agent_that_is_not_root_installs_removes_and_quarantines",
                    "--exact",
                    "--test-threads=1",
                ])
                .env(AS_NOBODY, "1")
                .output();
            match run {
                Ok(out) => {
                    let text = String::from_utf8_lossy(&out.stdout);
                    assert!(
                        out.status.success() && text.contains("1 passed"),
                        "as nobody: {text}{}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    return;
                }
                Err(e) => eprintln!("runuser: {e}; running as root, where any move works"),
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().join("cache"));
        let name = PackageName::new("tool").unwrap();
        let bytes = b"#!/bin/sh\necho ok\n".repeat(100);
        let m = meta(&bytes, "tool.sh", Format::Executable);
        let install = || {
            let download = dir.path().join("download");
            fs::write(&download, &bytes).unwrap();
            cache
                .install(
                    &name,
                    &m,
                    &download,
                    Handoff::Move,
                    &ExtractLimits::default(),
                )
                .unwrap()
        };

        let entry = install();
        assert_eq!(fs::read(&entry.launch_path).unwrap(), bytes);
        let mode = fs::metadata(&entry.dir).unwrap().mode();
        assert_eq!(mode & 0o222, 0, "entry dir read-only once in place");
        cache.remove(&name, &m.sha256).unwrap();
        assert!(cache.lookup(&name, &m.sha256).is_none());
        assert!(!entry.dir.exists());
        assert!(staging_is_empty(&cache));

        let entry = install();
        let moved = cache.quarantine(&name, &m.sha256).unwrap();
        assert!(cache.lookup(&name, &m.sha256).is_none());
        assert_eq!(fs::read(moved.join("tool.sh")).unwrap(), bytes);
        assert!(!entry.dir.exists());
        remove_tree(&moved).unwrap();
    }

    /// What root makes in a cache another user owns (a `get` or `run` as root beside the
    /// DaemonSet's uid-65532 agent) is that user's: entries, their directories, staging,
    /// tags, pins, launches, quarantine. The agent could otherwise neither evict those
    /// versions nor write beside them (a tag directory root made refused its tags).
    #[test]
    fn what_root_makes_in_a_cache_another_user_owns_is_theirs() {
        if !running_as_root() {
            eprintln!("skipped: only root makes files another user owns");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().join("cache"));
        fs::create_dir_all(cache.root()).unwrap();
        let nobody = 65534;
        std::os::unix::fs::chown(cache.root(), Some(nobody), Some(nobody)).unwrap();
        let src = dir.path().join("src");
        fs::create_dir_all(src.join("bin")).unwrap();
        fs::write(src.join("bin/run"), b"run").unwrap();
        let arc = dir.path().join("app.tar.zst");
        archive::create(&src, File::create(&arc).unwrap()).unwrap();
        let m = meta(&fs::read(&arc).unwrap(), "app.tar.zst", Format::TarZst);
        let name = PackageName::new("app").unwrap();
        cache
            .install(&name, &m, &arc, Handoff::Copy, &ExtractLimits::default())
            .unwrap();
        cache.remember_tag(&name, &Tag::new("prod").unwrap(), &m.sha256);
        cache.pin(&name, &m.sha256).unwrap();
        drop(cache.hold(&name, &m.sha256).unwrap().expect("cached"));
        let bytes = b"#!/bin/sh\necho ok\n".repeat(10);
        let other = meta(&bytes, "tool.sh", Format::Executable);
        let file = dir.path().join("tool.sh");
        fs::write(&file, &bytes).unwrap();
        cache
            .install(
                &name,
                &other,
                &file,
                Handoff::Move,
                &ExtractLimits::default(),
            )
            .unwrap();
        cache.quarantine(&name, &other.sha256).unwrap();

        fn walk(p: &Path, out: &mut Vec<(PathBuf, u32)>) {
            let m = fs::symlink_metadata(p).unwrap();
            out.push((p.to_owned(), m.uid()));
            if m.is_dir() {
                for e in fs::read_dir(p).unwrap() {
                    walk(&e.unwrap().path(), out);
                }
            }
        }
        let mut all = Vec::new();
        walk(cache.root(), &mut all);
        assert!(all.len() > 15, "{all:?}");
        let root_owned: Vec<_> = all.iter().filter(|(_, uid)| *uid != nobody).collect();
        assert!(
            root_owned.is_empty(),
            "not the cache owner's: {root_owned:?}"
        );
    }

    #[test]
    fn directory_packages_are_extracted_beside_the_archive() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir_all(src.join("bin")).unwrap();
        fs::write(src.join("bin/run"), b"run").unwrap();
        let arc = dir.path().join("app.tar.zst");
        archive::create(&src, File::create(&arc).unwrap()).unwrap();
        let bytes = fs::read(&arc).unwrap();
        let m = meta(&bytes, "app.tar.zst", Format::TarZst);
        let cache = Cache::new(dir.path().join("cache"));
        let name = PackageName::new("app").unwrap();
        let entry = cache
            .install(&name, &m, &arc, Handoff::Move, &ExtractLimits::default())
            .unwrap();
        assert_eq!(entry.launch_path, entry.dir.join("tree"));
        assert_eq!(fs::read(entry.launch_path.join("bin/run")).unwrap(), b"run");
        assert!(entry.dir.join("app.tar.zst").exists());
        assert_eq!(
            fs::metadata(entry.launch_path.join("bin/run"))
                .unwrap()
                .mode()
                & 0o222,
            0
        );
    }

    #[test]
    fn a_hostile_archive_never_reaches_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let mut tar_bytes = Vec::new();
        {
            let mut b = tar::Builder::new(&mut tar_bytes);
            let mut h = tar::Header::new_old();
            h.as_old_mut().name[..9].copy_from_slice(b"../escape");
            h.set_size(1);
            h.set_cksum();
            b.append(&h, &b"x"[..]).unwrap();
            b.finish().unwrap();
        }
        let bytes = zstd::encode_all(&tar_bytes[..], 3).unwrap();
        let arc = dir.path().join("evil.tar.zst");
        fs::write(&arc, &bytes).unwrap();
        let m = meta(&bytes, "evil.tar.zst", Format::TarZst);
        let cache = Cache::new(dir.path().join("cache"));
        let name = PackageName::new("evil").unwrap();
        let err = cache
            .install(&name, &m, &arc, Handoff::Move, &ExtractLimits::default())
            .unwrap_err();
        assert!(matches!(err, PeerError::UnsafeArchive(_)), "{err}");
        assert!(!cache.entry_dir(&name, &m.sha256).exists());
        assert!(!dir.path().join("escape").exists());
        assert!(
            fs::read_dir(dir.path().join("cache/.staging"))
                .unwrap()
                .next()
                .is_none()
        );
    }

    #[test]
    fn prefixes_and_tags() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        let name = PackageName::new("svc").unwrap();
        let bytes = vec![1u8; 1000];
        let m = meta(&bytes, "svc.bin", Format::File);
        let f = dir.path().join("f");
        fs::write(&f, &bytes).unwrap();
        cache
            .install(&name, &m, &f, Handoff::Move, &ExtractLimits::default())
            .unwrap();
        let p = HashPrefix::new(&m.sha256.to_hex()[..8]).unwrap();
        assert_eq!(
            cache.find_prefix(Some(&name), &p),
            vec![(name.clone(), m.sha256)]
        );
        assert_eq!(cache.find_prefix(None, &p), vec![(name.clone(), m.sha256)]);
        let tag = Tag::new("prod").unwrap();
        assert_eq!(cache.recall_tag(&name, &tag), None);
        cache.remember_tag(&name, &tag, &m.sha256);
        assert_eq!(cache.recall_tag(&name, &tag), Some(m.sha256));
    }
}
