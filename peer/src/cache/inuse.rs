//! Which versions are in use by a running program, and when each was last launched.
//!
//! ```text
//! <cache>/.use/<name>/<sha256>      one file per version ever launched
//! ```
//!
//! A launcher opens the version's use file, takes a *shared* `flock` on it, appends one byte
//! (so the file's mtime is the last launch and its size the number of launches; no fsync, so
//! recording a launch costs the launch path a few syscalls and no disk flush), and clears close-on-exec so the program it execs keeps the lock for as long as
//! it runs, and so does any child that inherits the descriptor. The lock belongs to the open
//! file, not to a process: no agent or CLI restart releases it, only the last holder's exit.
//!
//! Eviction takes an *exclusive* lock without waiting ([`Cache::try_claim`]): it fails while
//! any program holds the version. Holding the claim, it renames the entry out of the cache;
//! a launcher that was waiting for its shared lock then finds the entry gone
//! ([`Cache::hold`] checks after locking) and fetches again instead of running a removed tree.
//! The eviction also unlinks the use file: a launcher whose lock is on an unlinked file takes
//! it again on the one at the path, or its hold would protect nothing.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::SystemTime;

use fbpkg_common::Sha256Hash;
use fbpkg_common::pkgref::PackageName;

use super::{Cache, CachedPackage};
use crate::error::{PeerError, Result};

/// Directory of the use files, under the cache root.
pub const USE_DIR: &str = ".use";

/// A shared hold on one version: while it (or a program that inherited it) lives, the version
/// is not evicted.
#[derive(Debug)]
pub struct InUse {
    file: File,
    /// The entry as found once the lock was held.
    pub package: CachedPackage,
}

impl InUse {
    /// Let the program about to be exec'd (and its children) keep the hold: clears
    /// close-on-exec on the lock's descriptor.
    pub fn inherit(&self) -> Result<()> {
        rustix::io::fcntl_setfd(self.file.as_fd(), rustix::io::FdFlags::empty()).map_err(|e| {
            PeerError::io("keeping the cache lock across exec", PathBuf::from(USE_DIR))(
                std::io::Error::from(e),
            )
        })
    }
}

/// An exclusive claim on a version that no program is using: evict it while holding this.
#[derive(Debug)]
pub struct Claim {
    _file: File,
}

impl Cache {
    /// The use file of `name:sha256` (whether or not it exists).
    pub fn use_path(&self, name: &PackageName, sha256: &Sha256Hash) -> PathBuf {
        self.root
            .join(USE_DIR)
            .join(name.as_str())
            .join(sha256.to_hex())
    }

    /// The use file of `name:sha256`, made if missing. What it makes (the file, its
    /// directories) belongs to the cache's owner: a launcher running as root beside an agent
    /// that is not (the DaemonSet's uid 65532) must not leave files the agent cannot open. A
    /// use file this process may only read is opened read-only: a `flock` needs no more, and
    /// the launch is recorded only where it can be.
    fn open_use(&self, name: &PackageName, sha256: &Sha256Hash) -> Result<File> {
        let path = self.use_path(name, sha256);
        let open = || {
            OpenOptions::new()
                .read(true)
                .append(true)
                .create(true)
                .open(&path)
        };
        let opened = match open() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let dir = self.root.join(USE_DIR);
                fs::create_dir_all(path.parent().unwrap_or(&dir))
                    .map_err(PeerError::io("creating", &dir))?;
                self.give_to_owner(&[&dir, path.parent().unwrap_or(&dir)], false);
                open()
            }
            other => other,
        };
        match opened {
            Ok(f) => {
                self.give_to_owner(&[&path], false);
                Ok(f)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
                ) =>
            {
                File::open(&path).map_err(PeerError::io("opening", &path))
            }
            Err(e) => Err(PeerError::io("opening", &path)(e)),
        }
    }

    /// Mark `name:sha256` as launched now and hold it in use. Waits while an eviction holds
    /// the version; `Ok(None)` if the entry is not (or no longer) in the cache.
    pub fn hold(&self, name: &PackageName, sha256: &Sha256Hash) -> Result<Option<InUse>> {
        if self.lookup(name, sha256).is_none() {
            return Ok(None);
        }
        let path = self.use_path(name, sha256);
        let mut tries = 0;
        let file = loop {
            let file = self.open_use(name, sha256)?;
            file.lock_shared()
                .map_err(PeerError::io("locking", &path))?;
            // An eviction unlinks the use file under its claim. A lock on one unlinked while
            // we waited holds nothing back: the next claim would take a new file at the path,
            // the version installed again meanwhile, and remove it under the running program.
            // The lock counts only on the file that is at the path.
            let current = fs::metadata(&path).map(|m| (m.dev(), m.ino()));
            let ours = file.metadata().map(|m| (m.dev(), m.ino()));
            if let (Ok(a), Ok(b)) = (&current, &ours)
                && a == b
            {
                break file;
            }
            tries += 1;
            if tries == 8 {
                return Err(PeerError::io("locking", &path)(std::io::Error::other(
                    "the use file keeps being replaced",
                )));
            }
        };
        // An eviction may have renamed the entry out while we waited for the lock.
        let Some(package) = self.lookup(name, sha256) else {
            return Ok(None);
        };
        // The last use and the launch count, for LRU eviction and metrics. Best effort: a
        // full disk or a read-only use file still launches.
        if let Err(e) = (&file).write_all(b"\n") {
            tracing::debug!(path = %path.display(), error = %e, "cannot record the launch time");
        }
        Ok(Some(InUse { file, package }))
    }

    /// Claim `name:sha256` for eviction, without waiting: `Ok(None)` while any program holds
    /// it in use.
    pub fn try_claim(&self, name: &PackageName, sha256: &Sha256Hash) -> Result<Option<Claim>> {
        let file = self.open_use(name, sha256)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Claim { _file: file })),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => {
                Err(PeerError::io("locking", self.use_path(name, sha256))(e))
            }
        }
    }

    /// Whether a running program holds `name:sha256` (a snapshot: it may change at once).
    pub fn in_use(&self, name: &PackageName, sha256: &Sha256Hash) -> bool {
        let path = self.use_path(name, sha256);
        let Ok(file) = File::open(&path) else {
            return false;
        };
        matches!(file.try_lock(), Err(TryLockError::WouldBlock))
    }

    /// How many times `name:sha256` was launched.
    pub fn launches(&self, name: &PackageName, sha256: &Sha256Hash) -> u64 {
        fs::metadata(self.use_path(name, sha256)).map_or(0, |m| m.len())
    }

    /// When `name:sha256` was last launched, or else installed (its entry's mtime).
    pub fn last_use(&self, name: &PackageName, sha256: &Sha256Hash) -> Option<SystemTime> {
        fs::metadata(self.use_path(name, sha256))
            .and_then(|m| m.modified())
            .or_else(|_| fs::metadata(self.entry_dir(name, sha256)).and_then(|m| m.modified()))
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::ExtractLimits;
    use crate::cache::Handoff;
    use crate::cache::tests::meta;
    use fbpkg_common::metainfo::Format;

    fn cached(root: &std::path::Path) -> (Cache, PackageName, Sha256Hash) {
        let cache = Cache::new(root.join("cache"));
        let data = root.join("tool.bin");
        let bytes = b"#!/bin/sh\necho hi\n";
        fs::write(&data, bytes).expect("write");
        let meta = meta(bytes, "tool.bin", Format::Executable);
        let name = PackageName::new("tool").expect("name");
        cache
            .install(
                &name,
                &meta,
                &data,
                Handoff::Copy,
                &ExtractLimits::default(),
            )
            .expect("install");
        (cache, name, meta.sha256)
    }

    #[test]
    fn a_held_version_cannot_be_claimed_until_the_hold_ends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cache, name, sha) = cached(dir.path());
        assert!(!cache.in_use(&name, &sha));
        let hold = cache.hold(&name, &sha).expect("hold").expect("cached");
        assert!(hold.package.launch_path.ends_with("tool.bin"));
        assert!(cache.in_use(&name, &sha));
        assert!(cache.try_claim(&name, &sha).expect("claim").is_none());
        // A second launcher shares the version.
        let second = cache.hold(&name, &sha).expect("hold").expect("cached");
        drop(hold);
        assert!(cache.try_claim(&name, &sha).expect("claim").is_none());
        drop(second);
        assert!(!cache.in_use(&name, &sha));
        assert!(cache.try_claim(&name, &sha).expect("claim").is_some());
    }

    #[test]
    fn hold_after_an_eviction_finds_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cache, name, sha) = cached(dir.path());
        let claim = cache.try_claim(&name, &sha).expect("claim").expect("free");
        cache.remove(&name, &sha).expect("remove");
        drop(claim);
        assert!(cache.hold(&name, &sha).expect("hold").is_none());
        let other = Sha256Hash([7; 32]);
        assert!(cache.hold(&name, &other).expect("hold").is_none());
    }

    /// A launcher waits for its lock while an eviction removes the version and its use file,
    /// and the version is installed again before the eviction ends: the launcher's hold must
    /// be on the use file there now, or the next eviction would remove the version it runs.
    #[test]
    fn a_hold_that_waited_out_an_eviction_holds_the_use_file_there_now() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cache, name, sha) = cached(dir.path());
        let use_file = cache.use_path(&name, &sha);
        let claim = cache.try_claim(&name, &sha).expect("claim").expect("free");
        let ino = fs::metadata(&use_file).expect("use file").ino();
        let launcher = std::thread::spawn({
            let (cache, name) = (cache.clone(), name.clone());
            move || cache.hold(&name, &sha)
        });
        // The launcher waits for its shared lock on the use file (/proc/locks lists it).
        let waiting = |ino: u64| {
            fs::read_to_string("/proc/locks").is_ok_and(|l| {
                l.lines()
                    .any(|l| l.contains("->") && l.contains(&format!(":{ino} ")))
            })
        };
        let mut polls = 0;
        while !waiting(ino) {
            polls += 1;
            assert!(polls < 2_000, "the launcher never waited for the lock");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // The eviction, and an install of the same version before it lets go.
        cache.remove(&name, &sha).expect("remove");
        fs::remove_file(&use_file).expect("unlink the use file");
        let again = dir.path().join("again");
        fs::write(&again, b"#!/bin/sh\necho hi\n").expect("write");
        let meta = meta(b"#!/bin/sh\necho hi\n", "tool.bin", Format::Executable);
        cache
            .install(
                &name,
                &meta,
                &again,
                Handoff::Move,
                &ExtractLimits::default(),
            )
            .expect("install again");
        drop(claim);

        let hold = launcher
            .join()
            .expect("launcher")
            .expect("hold")
            .expect("cached");
        assert!(cache.in_use(&name, &sha));
        assert!(
            cache.try_claim(&name, &sha).expect("claim").is_none(),
            "the running version cannot be claimed"
        );
        drop(hold);
        assert!(cache.try_claim(&name, &sha).expect("claim").is_some());
    }

    /// A launcher running as root records its launch in files the cache's owner (an agent
    /// that is not root) can open later: they are made over to that owner.
    #[test]
    fn use_files_a_root_launcher_makes_belong_to_the_cache_owner() {
        if !crate::cache::tests::running_as_root() {
            eprintln!("skipped: only root makes files another user owns");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let (cache, name, sha) = cached(dir.path());
        let nobody = 65534;
        std::os::unix::fs::chown(cache.root(), Some(nobody), Some(nobody)).expect("chown");
        drop(cache.hold(&name, &sha).expect("hold").expect("cached"));
        let use_file = cache.use_path(&name, &sha);
        for p in [
            use_file.as_path(),
            use_file.parent().expect("dir"),
            &cache.root().join(USE_DIR),
        ] {
            assert_eq!(
                fs::metadata(p).expect("made").uid(),
                nobody,
                "{}",
                p.display()
            );
        }
        assert_eq!(cache.launches(&name, &sha), 1);
    }

    #[test]
    fn a_launch_moves_the_last_use_forward() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cache, name, sha) = cached(dir.path());
        let installed = cache.last_use(&name, &sha).expect("install time");
        let old = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        drop(cache.hold(&name, &sha).expect("hold"));
        File::options()
            .write(true)
            .open(cache.use_path(&name, &sha))
            .and_then(|f| f.set_modified(old))
            .expect("age the use file");
        assert_eq!(cache.last_use(&name, &sha), Some(old));
        drop(cache.hold(&name, &sha).expect("hold"));
        assert!(cache.last_use(&name, &sha).expect("used") >= installed);
        assert_eq!(cache.launches(&name, &sha), 2);
    }

    #[test]
    fn inherit_clears_close_on_exec() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cache, name, sha) = cached(dir.path());
        let hold = cache.hold(&name, &sha).expect("hold").expect("cached");
        let before = rustix::io::fcntl_getfd(hold.file.as_fd()).expect("getfd");
        assert!(before.contains(rustix::io::FdFlags::CLOEXEC));
        hold.inherit().expect("inherit");
        let after = rustix::io::fcntl_getfd(hold.file.as_fd()).expect("getfd");
        assert!(!after.contains(rustix::io::FdFlags::CLOEXEC));
    }
}
