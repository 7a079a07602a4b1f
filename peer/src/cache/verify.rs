//! Cache entries checked after install: bit rot, or a stray `chmod u+w` and an edit.
//!
//! Install checks the bytes once, on the way in; after that launchers trust the cache, so an
//! entry changed on disk would be launched, and seeded, for ever. Two checks:
//!
//! - **The seal** ([`Cache::check_seal`]): install records the archive's size and mtime in
//!   [`SEAL_FILE`] (a tree package's: its `tree/` directory's); it must still be read-only,
//!   with that size and mtime. One small
//!   read and one `stat`, cheap enough for `get`'s cache hit. It catches edits made through the
//!   file system; not bit rot, which changes no metadata, nor edits inside a directory
//!   package's tree (checking those would mean walking the tree on every launch).
//! - **Verify** ([`Cache::verify`]): everything read again. The archive's length and SHA-256
//!   (the entry's name); its pieces, since what this host seeds must match the metainfo it
//!   announces (through the info-hash the seal recorded, or by hashing every piece when there
//!   is no seal, which doubles the cost); for a directory package, the tree compared with the
//!   archive entry by entry (a tree package: each file against its SHA-256 in the metainfo,
//!   each link, mode and empty directory); and nothing in the entry that install did not put there (`lookup`
//!   would launch a stray file). Costs a full read of the entry: ~1.5 GiB/s of CPU for the
//!   SHA-256 where the CPU has SHA extensions, so usually the disk's read rate.
//!
//! A corrupt entry is [`Cache::quarantine`]d: renamed in one step into [`QUARANTINE`], so
//! `lookup` stops finding it at once while its bytes stay for an operator to look at. Only the
//! newest [`QUARANTINE_KEEP`] quarantined entries are kept.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fbpkg_common::Sha256Hash;
use fbpkg_common::metainfo::{Format, Metainfo};
use fbpkg_common::pkgref::PackageName;
use serde::{Deserialize, Serialize};

use super::check::{self, StreamError};
use super::{
    Cache, CachedPackage, METAINFO_CAP, METAINFO_FILE, TREE_DIR, Unchanged, make_read_only,
    read_own, remove_tree, set_mode,
};
use crate::archive::{self, ExtractLimits};
use crate::error::{PeerError, Result};
use crate::storage::join;

/// The seal in each entry: the archive's size and mtime at install.
pub const SEAL_FILE: &str = ".fbpkg.stamp";
const SEAL_TMP: &str = ".fbpkg.stamp.tmp";
/// Most bytes of a seal: a few hundred are written.
const SEAL_CAP: u64 = 64 << 10;
/// Where corrupt entries go, under the cache root.
pub const QUARANTINE: &str = ".quarantine";
/// Quarantined entries kept by default: enough to compare a few incidents, bounded because
/// each may be as large as a package.
pub const QUARANTINE_KEEP: usize = 4;

#[derive(Debug, Serialize, Deserialize)]
struct SealData {
    /// The archive's file name in the entry (a tree package's: its tree).
    file: String,
    /// `file` is a tree package's tree, a directory. Recorded, not inferred from the name: a
    /// file package may be a file named `tree`. Absent (false) in seals of files, as before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    dir: bool,
    len: u64,
    mtime_s: i64,
    mtime_ns: i64,
    /// The metainfo's info-hash. Pieces were checked against the bytes at install, so with
    /// the metainfo unchanged (this) and the bytes unchanged (the SHA-256), they still match:
    /// verify need not hash every piece again, which halves its cost.
    info_hash: String,
    /// A tree package's files of a piece or more (so each owns its pieces) as they were when
    /// sealed, by index in the metainfo's files: a new version of the package that reuses
    /// one still as it was trusts the pieces the file owns there without reading them
    /// (`reuse.rs`). Absent in seals of files, and of trees sealed before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    files: Vec<(usize, Unchanged)>,
}

/// What [`Cache::check_seal`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seal {
    /// Read-only, with the size and mtime recorded at install.
    Intact,
    /// No seal: installed by an fbpkg-rs from before seals. Only [`Cache::verify`] can tell.
    Unsealed,
    /// Changed since install (how): verify before trusting it.
    Broken(String),
}

/// What [`Cache::verify`] found in one entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// The package.
    pub name: PackageName,
    /// The version.
    pub sha256: Sha256Hash,
    /// The entry's directory.
    pub dir: PathBuf,
    /// Bytes read: the archive, and the tree's files for a directory package.
    pub bytes_read: u64,
    /// Why the entry cannot be trusted; empty when its contents are intact.
    pub problems: Vec<String>,
    /// Metadata changed with contents intact (write bits, mtime, no seal):
    /// [`Cache::reseal`] puts it right.
    pub drift: Vec<String>,
}

impl VerifyReport {
    /// No problem found: the contents are the package's.
    pub fn is_intact(&self) -> bool {
        self.problems.is_empty()
    }
}

fn mtime(meta: &fs::Metadata) -> (i64, i64) {
    (meta.mtime(), meta.mtime_nsec())
}

/// What the seal covers in an entry: the file as published, or a tree package's tree.
fn sealed(metainfo: &Metainfo) -> &str {
    if metainfo.format == Format::Tree {
        TREE_DIR
    } else {
        metainfo.name.as_str()
    }
}

/// Record `dir/<file>`'s size and mtime, and the metainfo's info-hash, in `dir`'s seal (at
/// install, or a reseal).
pub(super) fn write_seal(dir: &Path, metainfo: &Metainfo) -> Result<()> {
    let file = sealed(metainfo);
    let path = dir.join(file);
    let meta = fs::symlink_metadata(&path).map_err(PeerError::io("reading metadata", &path))?;
    let (mtime_s, mtime_ns) = mtime(&meta);
    let mut files = Vec::new();
    if metainfo.format == Format::Tree {
        for (at, f) in metainfo.files.iter().enumerate() {
            if f.is_regular() && f.length >= metainfo.piece_length {
                let file = join(&path, &f.path);
                files.push((
                    at,
                    Unchanged::of(&file).map_err(PeerError::io("reading metadata", &file))?,
                ));
            }
        }
    }
    let seal = SealData {
        file: file.to_owned(),
        dir: metainfo.format == Format::Tree,
        len: meta.len(),
        mtime_s,
        mtime_ns,
        info_hash: metainfo.info_hash.to_hex(),
        files,
    };
    let bytes = serde_json::to_vec(&seal).map_err(|e| PeerError::BadInput(e.to_string()))?;
    let tmp = dir.join(SEAL_TMP);
    let dest = dir.join(SEAL_FILE);
    fs::write(&tmp, bytes).map_err(PeerError::io("writing", &tmp))?;
    fs::rename(&tmp, &dest).map_err(PeerError::io("writing", &dest))
}

/// The files of the tree package in entry `dir` as its seal recorded them (see
/// [`SealData::files`]); none when there is no seal, or it cannot be read.
pub(super) fn sealed_files(dir: &Path) -> Vec<(usize, Unchanged)> {
    match read_seal(dir) {
        Ok(Some(seal)) if seal.dir => seal.files,
        _ => Vec::new(),
    }
}

fn read_seal(dir: &Path) -> io::Result<Option<SealData>> {
    match read_own(&dir.join(SEAL_FILE), SEAL_CAP) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn seal_state(dir: &Path) -> Seal {
    let seal = match read_seal(dir) {
        Ok(Some(s)) => s,
        Ok(None) => return Seal::Unsealed,
        Err(e) => return Seal::Broken(format!("the seal cannot be read: {e}")),
    };
    let meta = match fs::symlink_metadata(dir.join(&seal.file)) {
        Ok(m) => m,
        Err(e) => return Seal::Broken(format!("{}: {e}", seal.file)),
    };
    if seal.dir && !meta.is_dir() {
        Seal::Broken(format!("{} is not a directory", seal.file))
    } else if !seal.dir && !meta.is_file() {
        Seal::Broken(format!("{} is not a regular file", seal.file))
    } else if meta.mode() & 0o222 != 0 {
        Seal::Broken(format!("{} is writable", seal.file))
    } else if meta.len() != seal.len {
        Seal::Broken(format!(
            "{} is {} bytes, not {}",
            seal.file,
            meta.len(),
            seal.len
        ))
    } else if mtime(&meta) != (seal.mtime_s, seal.mtime_ns) {
        Seal::Broken(format!("{} was modified after install", seal.file))
    } else {
        Seal::Intact
    }
}

/// What the seal says of an entry whose contents are intact.
fn drift(dir: &Path, report: &mut VerifyReport) {
    match seal_state(dir) {
        Seal::Intact => {}
        Seal::Unsealed => report.drift.push("no seal".into()),
        Seal::Broken(why) => report.drift.push(why),
    }
}

fn read_metainfo(dir: &Path) -> std::result::Result<Metainfo, String> {
    let path = dir.join(METAINFO_FILE);
    let bytes = read_own(&path, METAINFO_CAP)
        .map_err(|e| format!("{METAINFO_FILE} cannot be read: {e}"))?;
    Metainfo::parse(&bytes).map_err(|e| format!("{METAINFO_FILE} is not valid metainfo: {e}"))
}

impl Cache {
    /// Every entry in the cache, by name then hash.
    pub fn versions(&self) -> Vec<(PackageName, Sha256Hash)> {
        super::versions_in(&self.root)
    }

    /// The cheap check of an entry, for the cache hit of `get`: no hashing (see the module
    /// doc for what it catches and what it cannot).
    pub fn check_seal(&self, name: &PackageName, sha256: &Sha256Hash) -> Seal {
        seal_state(&self.entry_dir(name, sha256))
    }

    /// [`Cache::lookup`], plus the seal. When the seal is broken the entry is verified (a full
    /// read, blocking): intact, it is resealed and returned; corrupt, it is quarantined and
    /// `None` returned, so the caller fetches the package again.
    pub fn lookup_checked(
        &self,
        name: &PackageName,
        sha256: &Sha256Hash,
    ) -> Result<Option<CachedPackage>> {
        let Some(entry) = self.lookup(name, sha256) else {
            return Ok(None);
        };
        let why = match self.check_seal(name, sha256) {
            Seal::Intact => return Ok(Some(entry)),
            // No seal: an entry from before seals, or one another caller moved out (to
            // quarantine, or evicted) since the lookup above.
            Seal::Unsealed => {
                return Ok(self.lookup(name, sha256));
            }
            Seal::Broken(why) => why,
        };
        tracing::warn!(package = %name, sha256 = %sha256, reason = %why, "cache entry changed since install; verifying it");
        // Another caller may verify the same entry at the same time, and quarantine it (or
        // evict it) first: the entry gone is the answer this caller would have come to, not
        // an error (every `get` but one failed where a fetch would have mended it).
        let gone = |e: PeerError| {
            let absent = fs::symlink_metadata(self.entry_dir(name, sha256))
                .is_err_and(|m| m.kind() == io::ErrorKind::NotFound);
            if absent || e.kind() == crate::error::ErrorKind::NotFound {
                Ok(None)
            } else {
                Err(e)
            }
        };
        let report = match self.verify(name, sha256) {
            Ok(r) => r,
            Err(e) => return gone(e),
        };
        if report.is_intact() {
            if let Err(e) = self.reseal(name, sha256) {
                tracing::warn!(package = %name, sha256 = %sha256, error = %e, "cannot reseal an intact cache entry");
            }
            return Ok(Some(entry));
        }
        let to = match self.quarantine(name, sha256) {
            Ok(to) => to,
            Err(e) => return gone(e),
        };
        tracing::error!(package = %name, sha256 = %sha256, problems = ?report.problems, quarantine = %to.display(), "cache entry is corrupt; quarantined");
        Ok(None)
    }

    /// Read the entry `name:sha256` again and say whether its contents are the package's.
    /// Blocking: reads the whole archive (and tree). `Err` only when the entry does not exist
    /// or cannot be read for a reason that says nothing about its contents (permissions).
    pub fn verify(&self, name: &PackageName, sha256: &Sha256Hash) -> Result<VerifyReport> {
        let dir = self.entry_dir(name, sha256);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(PeerError::io("reading metadata", &dir)(e));
            }
            // Absent, or not a directory, which `lookup` does not find either.
            _ => {
                return Err(PeerError::NotFound(format!(
                    "{name}:{sha256} is not in the cache"
                )));
            }
        }
        let mut report = VerifyReport {
            name: name.clone(),
            sha256: *sha256,
            dir: dir.clone(),
            bytes_read: 0,
            problems: Vec::new(),
            drift: Vec::new(),
        };
        let meta = match read_metainfo(&dir) {
            Ok(m) if m.sha256 == *sha256 => m,
            Ok(m) => {
                report
                    .problems
                    .push(format!("{METAINFO_FILE} is for {}", m.sha256));
                return Ok(report);
            }
            Err(why) => {
                report.problems.push(why);
                return Ok(report);
            }
        };
        self.check_listing(&dir, &meta, &mut report)?;
        let pieces = match read_seal(&dir) {
            Ok(Some(seal)) if seal.info_hash == meta.info_hash.to_hex() => false,
            Ok(Some(seal)) => {
                report.problems.push(format!(
                    "{METAINFO_FILE} changed since install: its info-hash is {}, the seal says {}",
                    meta.info_hash, seal.info_hash
                ));
                true
            }
            _ => true,
        };
        if meta.format == Format::Tree {
            let tree = super::tree::compare(&meta, &dir.join(TREE_DIR));
            report.bytes_read += tree.bytes_read;
            report.problems.extend(tree.problems);
            if report.is_intact() {
                drift(&dir, &mut report);
                report.drift.extend(tree.drift);
            }
            return Ok(report);
        }
        let file = dir.join(&meta.name);
        match File::open(&file) {
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Err(PeerError::io("opening", &file)(e));
            }
            Err(e) => report.problems.push(format!("{}: {e}", meta.name)),
            Ok(f) => match check::stream(f, &mut io::sink(), &meta, pieces) {
                Ok(n) => report.bytes_read += n,
                Err(StreamError::Mismatch(why)) => {
                    report.problems.push(format!("{}: {why}", meta.name))
                }
                Err(StreamError::Read(e) | StreamError::Write(e)) => report
                    .problems
                    .push(format!("{} cannot be read: {e}", meta.name)),
            },
        }
        if !report.is_intact() {
            return Ok(report);
        }
        drift(&dir, &mut report);
        if meta.format == Format::TarZst {
            let tree =
                archive::compare_tree(&file, &dir.join(TREE_DIR), &ExtractLimits::default())?;
            report.bytes_read += tree.bytes_read;
            report.problems.extend(tree.problems);
            report.drift.extend(tree.drift);
        }
        Ok(report)
    }

    /// Only what install puts in an entry: anything else could be what `lookup` launches.
    fn check_listing(&self, dir: &Path, meta: &Metainfo, report: &mut VerifyReport) -> Result<()> {
        let rd = fs::read_dir(dir).map_err(PeerError::io("reading directory", dir))?;
        for e in rd {
            let e = e.map_err(PeerError::io("reading directory", dir))?;
            let name = e.file_name();
            // A seal's temporary file is what a reseal cut short leaves: harmless.
            let expected = name == sealed(meta)
                || name == METAINFO_FILE
                || name == SEAL_FILE
                || name == SEAL_TMP
                || (name == TREE_DIR && meta.format.is_directory());
            if !expected {
                report.problems.push(format!(
                    "{} does not belong in the entry",
                    name.to_string_lossy()
                ));
            }
        }
        if meta.format.is_directory() && !dir.join(TREE_DIR).is_dir() {
            report.problems.push(format!("{TREE_DIR}/ is missing"));
        }
        Ok(())
    }

    /// Put an entry whose contents [`Cache::verify`] found intact back under seal: the
    /// archive's mode and recorded mtime restored (a seal written if there was none), write
    /// bits removed from the whole entry.
    pub fn reseal(&self, name: &PackageName, sha256: &Sha256Hash) -> Result<()> {
        let dir = self.entry_dir(name, sha256);
        let meta = read_metainfo(&dir).map_err(PeerError::Verification)?;
        let file = dir.join(sealed(&meta));
        set_mode(
            &file,
            match meta.format {
                Format::Executable | Format::Tree => 0o555,
                Format::File | Format::TarZst => 0o444,
            },
        )?;
        match read_seal(&dir) {
            Ok(Some(seal)) if seal.file == sealed(&meta) => {
                let secs = Duration::from_secs(seal.mtime_s.unsigned_abs());
                let at = if seal.mtime_s >= 0 {
                    UNIX_EPOCH.checked_add(secs)
                } else {
                    UNIX_EPOCH.checked_sub(secs)
                }
                .and_then(|t| t.checked_add(Duration::from_nanos(seal.mtime_ns.unsigned_abs())))
                .ok_or_else(|| {
                    PeerError::Verification(format!("the seal in {} is not a time", dir.display()))
                })?;
                File::open(&file)
                    .and_then(|f| f.set_modified(at))
                    .map_err(PeerError::io("restoring the modified time", &file))?;
            }
            _ => {
                // The entry directory is read-only: open it for the one write.
                set_mode(&dir, 0o755)?;
                let written = write_seal(&dir, &meta);
                set_mode(&dir, 0o555)?;
                written?;
            }
        }
        make_read_only(&dir)
    }

    /// Move the entry out of the cache in one rename, into [`QUARANTINE`], so `lookup` stops
    /// finding it at once while its bytes stay for an operator; then delete the oldest
    /// quarantined entries beyond the bound. Returns where it went.
    ///
    /// An agent seeding the entry still holds it open: peers check every piece, so they refuse
    /// what it serves, but the agent should stop seeding it.
    pub fn quarantine(&self, name: &PackageName, sha256: &Sha256Hash) -> Result<PathBuf> {
        let dir = self.entry_dir(name, sha256);
        let qroot = self.root.join(QUARANTINE);
        fs::create_dir_all(&qroot).map_err(PeerError::io("creating", &qroot))?;
        self.give_to_owner(&[&qroot], false);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let dest = qroot.join(format!("{name}-{sha256}-{now}"));
        super::move_entry(&dir, &dest).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                PeerError::NotFound(format!("{name}:{sha256} is not in the cache"))
            } else {
                PeerError::io("quarantining", &dir)(e)
            }
        })?;
        for d in [&qroot, &self.root.join(name.as_str())] {
            if let Err(e) = File::open(d).and_then(|f| f.sync_all()) {
                tracing::warn!(path = %d.display(), error = %e, "cannot fsync after quarantining");
            }
        }
        self.prune_quarantine();
        Ok(dest)
    }

    /// Keep the newest `quarantine_keep` quarantined entries; the time is the name's suffix.
    fn prune_quarantine(&self) {
        let qroot = self.root.join(QUARANTINE);
        let Ok(rd) = fs::read_dir(&qroot) else {
            return;
        };
        let mut all: Vec<(u128, PathBuf)> = rd
            .flatten()
            .map(|e| {
                let at = e
                    .file_name()
                    .to_str()
                    .and_then(|s| s.rsplit_once('-'))
                    .and_then(|(_, t)| t.parse().ok())
                    .unwrap_or(0);
                (at, e.path())
            })
            .collect();
        all.sort_by_key(|e| std::cmp::Reverse(e.0));
        for (_, old) in all.into_iter().skip(self.quarantine_keep) {
            if let Err(e) = remove_tree(&old) {
                tracing::warn!(path = %old.display(), error = %e, "cannot remove old quarantined entry");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Handoff;
    use crate::cache::tests::meta;
    use std::os::unix::fs::PermissionsExt;

    fn install_file(
        cache: &Cache,
        work: &Path,
        name: &str,
        bytes: &[u8],
    ) -> (PackageName, Metainfo) {
        let n = PackageName::new(name).unwrap();
        let m = meta(bytes, &format!("{name}.bin"), Format::File);
        let f = work.join(format!("{name}.in"));
        fs::write(&f, bytes).unwrap();
        cache
            .install(&n, &m, &f, Handoff::Move, &ExtractLimits::default())
            .unwrap();
        (n, m)
    }

    fn chmod(p: &Path, mode: u32) {
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    }

    /// Flip one byte in place, as an editor after `chmod u+w` would.
    fn flip(p: &Path, at: usize) {
        chmod(p, 0o644);
        let mut b = fs::read(p).unwrap();
        b[at] ^= 0x01;
        fs::write(p, b).unwrap();
    }

    /// A file package may be a file named `tree` (the `tree` utility): its seal is a file's,
    /// not a tree package's, so it stays intact (a broken seal costs a full verify per `get`).
    #[test]
    fn a_file_named_tree_keeps_an_intact_seal() {
        let work = tempfile::tempdir().unwrap();
        let cache = Cache::new(work.path().join("cache"));
        let bytes = vec![7u8; 50_000];
        let n = PackageName::new("tree").unwrap();
        let m = meta(&bytes, TREE_DIR, Format::Executable);
        let f = work.path().join("tree.in");
        fs::write(&f, &bytes).unwrap();
        let entry = cache
            .install(&n, &m, &f, Handoff::Move, &ExtractLimits::default())
            .unwrap();
        assert_eq!(entry.launch_path, entry.dir.join(TREE_DIR));
        assert_eq!(cache.check_seal(&n, &m.sha256), Seal::Intact);
        let report = cache.verify(&n, &m.sha256).unwrap();
        assert!(report.is_intact() && report.drift.is_empty(), "{report:?}");
    }

    #[test]
    fn an_edited_file_breaks_the_seal_fails_verify_and_is_quarantined() {
        let work = tempfile::tempdir().unwrap();
        let cache = Cache::new(work.path().join("cache"));
        let bytes = vec![42u8; 300_000];
        let (n, m) = install_file(&cache, work.path(), "app", &bytes);
        assert_eq!(cache.check_seal(&n, &m.sha256), Seal::Intact);
        let report = cache.verify(&n, &m.sha256).unwrap();
        assert!(report.is_intact() && report.drift.is_empty(), "{report:?}");
        assert_eq!(report.bytes_read, bytes.len() as u64);

        let file = cache.lookup(&n, &m.sha256).unwrap().launch_path;
        flip(&file, 1000);
        assert!(matches!(cache.check_seal(&n, &m.sha256), Seal::Broken(_)));
        let report = cache.verify(&n, &m.sha256).unwrap();
        assert!(!report.is_intact());
        assert!(report.problems[0].contains("SHA-256"), "{report:?}");

        let to = cache.quarantine(&n, &m.sha256).unwrap();
        assert!(to.starts_with(cache.root().join(QUARANTINE)));
        assert!(cache.lookup(&n, &m.sha256).is_none());
        assert!(cache.versions().is_empty());
        // The evidence is kept as it was found.
        let kept = fs::read(to.join("app.bin")).unwrap();
        assert_eq!(kept.len(), bytes.len());
        assert_ne!(kept, bytes);
        let err = cache.verify(&n, &m.sha256).unwrap_err();
        assert!(matches!(err, PeerError::NotFound(_)), "{err}");
    }

    /// Bit rot changes no metadata: the seal cannot see it, verify does, and `lookup_checked`
    /// trusts the seal (that is its point: no hashing on the launch path).
    #[test]
    fn bit_rot_is_found_by_verify_only() {
        let work = tempfile::tempdir().unwrap();
        let cache = Cache::new(work.path().join("cache"));
        let (n, m) = install_file(&cache, work.path(), "rot", &[7u8; 100_000]);
        let file = cache.lookup(&n, &m.sha256).unwrap().launch_path;
        let mtime = fs::metadata(&file).unwrap().modified().unwrap();
        flip(&file, 99_999);
        File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        chmod(&file, 0o444);
        assert_eq!(cache.check_seal(&n, &m.sha256), Seal::Intact);
        let report = cache.verify(&n, &m.sha256).unwrap();
        assert!(report.problems[0].contains("SHA-1") || report.problems[0].contains("SHA-256"));
    }

    #[test]
    fn lookup_checked_quarantines_the_corrupt_and_reseals_the_touched() {
        let work = tempfile::tempdir().unwrap();
        let cache = Cache::new(work.path().join("cache"));
        let (n, m) = install_file(&cache, work.path(), "touched", &[1u8; 50_000]);
        let file = cache.lookup(&n, &m.sha256).unwrap().launch_path;
        // Made writable and touched, contents unchanged: kept, and sealed again.
        chmod(&file, 0o644);
        File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(SystemTime::now() + Duration::from_secs(5))
            .unwrap();
        assert!(matches!(cache.check_seal(&n, &m.sha256), Seal::Broken(_)));
        assert!(cache.lookup_checked(&n, &m.sha256).unwrap().is_some());
        assert_eq!(cache.check_seal(&n, &m.sha256), Seal::Intact);
        assert_eq!(fs::metadata(&file).unwrap().mode() & 0o777, 0o444);

        let (n, m) = install_file(&cache, work.path(), "edited", &[2u8; 50_000]);
        flip(&cache.lookup(&n, &m.sha256).unwrap().launch_path, 0);
        assert_eq!(cache.lookup_checked(&n, &m.sha256).unwrap(), None);
        assert!(cache.lookup(&n, &m.sha256).is_none(), "quarantined");
        assert_eq!(
            fs::read_dir(cache.root().join(QUARANTINE)).unwrap().count(),
            1
        );
    }

    /// Several callers find the same entry's seal broken at once (workers all running `get`):
    /// each verifies it, one quarantines it, and every one of them is told it is not in the
    /// cache (to fetch it again), none an error.
    #[test]
    fn callers_that_check_a_corrupt_entry_at_once_are_all_told_it_is_gone() {
        let work = tempfile::tempdir().unwrap();
        let cache = Cache::new(work.path().join("cache"));
        let (n, m) = install_file(&cache, work.path(), "busy", &vec![3u8; 16 << 20]);
        flip(&cache.lookup(&n, &m.sha256).unwrap().launch_path, 16 << 19);
        let barrier = std::sync::Barrier::new(4);
        let answers: Vec<_> = std::thread::scope(|s| {
            let checks: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        cache.lookup_checked(&n, &m.sha256).map(|e| e.is_some())
                    })
                })
                .collect();
            checks.into_iter().map(|c| c.join().unwrap()).collect()
        });
        for a in &answers {
            assert!(matches!(a, Ok(false)), "{answers:?}");
        }
        assert!(cache.lookup(&n, &m.sha256).is_none(), "quarantined");
    }

    #[test]
    fn entries_from_before_seals_get_one_on_reseal() {
        let work = tempfile::tempdir().unwrap();
        let cache = Cache::new(work.path().join("cache"));
        let (n, m) = install_file(&cache, work.path(), "old", &[3u8; 10_000]);
        let dir = cache.entry_dir(&n, &m.sha256);
        chmod(&dir, 0o755);
        fs::remove_file(dir.join(SEAL_FILE)).unwrap();
        chmod(&dir, 0o555);
        assert_eq!(cache.check_seal(&n, &m.sha256), Seal::Unsealed);
        assert_eq!(
            cache.lookup_checked(&n, &m.sha256).unwrap(),
            cache.lookup(&n, &m.sha256)
        );
        let report = cache.verify(&n, &m.sha256).unwrap();
        assert!(report.is_intact());
        assert_eq!(report.drift, ["no seal"]);
        cache.reseal(&n, &m.sha256).unwrap();
        assert_eq!(cache.check_seal(&n, &m.sha256), Seal::Intact);
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o555);
    }

    #[test]
    fn a_stray_file_or_a_bad_metainfo_is_corrupt() {
        let work = tempfile::tempdir().unwrap();
        let cache = Cache::new(work.path().join("cache"));
        let (n, m) = install_file(&cache, work.path(), "stray", &[4u8; 10_000]);
        let dir = cache.entry_dir(&n, &m.sha256);
        chmod(&dir, 0o755);
        fs::write(dir.join("a-stray-file"), b"x").unwrap();
        let report = cache.verify(&n, &m.sha256).unwrap();
        assert!(report.problems[0].contains("does not belong"), "{report:?}");
        fs::remove_file(dir.join("a-stray-file")).unwrap();

        // Metainfo whose pieces no longer match the file: this host would seed garbage. The
        // seal's info-hash tells, without hashing the pieces.
        let other = meta(&[5u8; 10_000], "stray.bin", Format::File);
        let mut raw = other.as_bytes().to_vec();
        let sha_hex = other.sha256.to_hex();
        let at = raw
            .windows(64)
            .position(|w| w == sha_hex.as_bytes())
            .unwrap();
        raw[at..at + 64].copy_from_slice(m.sha256.to_hex().as_bytes());
        chmod(&dir.join(METAINFO_FILE), 0o644);
        fs::write(dir.join(METAINFO_FILE), &raw).unwrap();
        let report = cache.verify(&n, &m.sha256).unwrap();
        assert!(report.problems[0].contains("info-hash"), "{report:?}");
        // Without a seal, hashing the pieces tells.
        fs::remove_file(dir.join(SEAL_FILE)).unwrap();
        let report = cache.verify(&n, &m.sha256).unwrap();
        assert!(report.problems[0].contains("SHA-1"), "{report:?}");
    }

    #[test]
    fn directory_trees_are_compared_with_their_archive() {
        let work = tempfile::tempdir().unwrap();
        let src = work.path().join("src");
        fs::create_dir_all(src.join("bin")).unwrap();
        fs::write(src.join("bin/run"), b"#!/bin/sh\necho run\n").unwrap();
        chmod(&src.join("bin/run"), 0o755);
        fs::write(src.join("data"), vec![9u8; 200_000]).unwrap();
        std::os::unix::fs::symlink("bin/run", src.join("run-link")).unwrap();
        let arc = work.path().join("app.tar.zst");
        archive::create(&src, File::create(&arc).unwrap()).unwrap();
        let bytes = fs::read(&arc).unwrap();
        let m = meta(&bytes, "app.tar.zst", Format::TarZst);
        let cache = Cache::new(work.path().join("cache"));
        let n = PackageName::new("app").unwrap();
        let entry = cache
            .install(&n, &m, &arc, Handoff::Move, &ExtractLimits::default())
            .unwrap();
        let report = cache.verify(&n, &m.sha256).unwrap();
        assert!(report.is_intact() && report.drift.is_empty(), "{report:?}");
        assert_eq!(report.bytes_read, bytes.len() as u64 + 200_000 + 19);

        // Writable again, contents intact: drift, put right by a reseal.
        let run = entry.launch_path.join("bin/run");
        chmod(&run, 0o755);
        let report = cache.verify(&n, &m.sha256).unwrap();
        assert!(report.is_intact(), "{report:?}");
        assert_eq!(report.drift.len(), 1, "{report:?}");
        cache.reseal(&n, &m.sha256).unwrap();
        assert!(cache.verify(&n, &m.sha256).unwrap().drift.is_empty());

        // An edit, a lost execute bit, a new file, a re-pointed link: each one a problem.
        flip(&entry.launch_path.join("data"), 5);
        chmod(&run, 0o444);
        chmod(&entry.launch_path, 0o755);
        fs::write(entry.launch_path.join("planted"), b"x").unwrap();
        fs::remove_file(entry.launch_path.join("run-link")).unwrap();
        std::os::unix::fs::symlink("data", entry.launch_path.join("run-link")).unwrap();
        let report = cache.verify(&n, &m.sha256).unwrap();
        let all = report.problems.join("\n");
        for needle in [
            "data: contents changed",
            "bin/run has mode 444",
            "planted is not in the archive",
            "run-link now points at data",
        ] {
            assert!(all.contains(needle), "{needle}: {all}");
        }
    }

    #[test]
    fn only_the_newest_quarantined_entries_are_kept() {
        let work = tempfile::tempdir().unwrap();
        let cache = Cache::new(work.path().join("cache")).with_quarantine_keep(2);
        let mut moved = Vec::new();
        for i in 0..3u8 {
            let (n, m) = install_file(&cache, work.path(), &format!("p{i}"), &[i; 1000]);
            moved.push(cache.quarantine(&n, &m.sha256).unwrap());
        }
        assert!(!moved[0].exists(), "the oldest is gone");
        assert!(moved[1].exists() && moved[2].exists());
    }
}
