//! Pins: versions an operator wants kept whatever the cache budget says.
//!
//! ```text
//! <cache>/.pins/<name>/<sha256>      one empty file per pinned version
//! ```
//!
//! A pin is a file, not a line in a shared list: pinning and unpinning are one `open(O_CREAT)`
//! or one `unlink` each, atomic by themselves, so two CLIs and the agent never race on a
//! read-modify-write, and a pin works with the agent down. The directory is fsynced after each
//! change, so a pin acknowledged survives a power cut. A version may be pinned before it is
//! fetched (by its full hash): the pin then protects it from the moment it arrives.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use fbpkg_common::Sha256Hash;
use fbpkg_common::pkgref::PackageName;

use super::Cache;
use crate::error::{PeerError, Result};

/// Directory of the pins, under the cache root.
pub const PINS_DIR: &str = ".pins";

fn sync_dir(dir: &Path) {
    if let Err(e) = File::open(dir).and_then(|f| f.sync_all()) {
        tracing::warn!(path = %dir.display(), error = %e, "cannot fsync the pins directory; the change may not survive a power cut");
    }
}

impl Cache {
    fn pin_path(&self, name: &PackageName, sha256: &Sha256Hash) -> PathBuf {
        self.root
            .join(PINS_DIR)
            .join(name.as_str())
            .join(sha256.to_hex())
    }

    /// Pin `name:sha256`; returns false if it was pinned already.
    pub fn pin(&self, name: &PackageName, sha256: &Sha256Hash) -> Result<bool> {
        let path = self.pin_path(name, sha256);
        let dir = path.parent().unwrap_or(&self.root).to_owned();
        fs::create_dir_all(&dir).map_err(PeerError::io("creating", &dir))?;
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(_) => {
                self.give_to_owner(&[&self.root().join(PINS_DIR), &dir, &path], false);
                sync_dir(&dir);
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(PeerError::io("pinning", &path)(e)),
        }
    }

    /// Unpin `name:sha256`; returns false if it was not pinned.
    pub fn unpin(&self, name: &PackageName, sha256: &Sha256Hash) -> Result<bool> {
        let path = self.pin_path(name, sha256);
        match fs::remove_file(&path) {
            Ok(()) => {
                if let Some(dir) = path.parent() {
                    sync_dir(dir);
                }
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(PeerError::io("unpinning", &path)(e)),
        }
    }

    /// Whether `name:sha256` is pinned.
    pub fn is_pinned(&self, name: &PackageName, sha256: &Sha256Hash) -> bool {
        self.pin_path(name, sha256).exists()
    }

    /// Every pin, cached or not, in name then hash order.
    pub fn pins(&self) -> Vec<(PackageName, Sha256Hash)> {
        super::versions_in(&self.root.join(PINS_DIR))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_files_that_outlive_the_cache_handle() {
        let dir = tempfile::tempdir().expect("tempdir");
        let name = PackageName::new("app").expect("name");
        let sha = Sha256Hash([3; 32]);
        let cache = Cache::new(dir.path());
        assert!(!cache.is_pinned(&name, &sha));
        assert!(cache.pin(&name, &sha).expect("pin"));
        assert!(
            !cache.pin(&name, &sha).expect("pin again"),
            "already pinned"
        );
        // Another process (a new handle) sees it.
        let again = Cache::new(dir.path());
        assert!(again.is_pinned(&name, &sha));
        assert_eq!(again.pins(), vec![(name.clone(), sha)]);
        assert!(again.unpin(&name, &sha).expect("unpin"));
        assert!(!again.unpin(&name, &sha).expect("unpin again"));
        assert!(!cache.is_pinned(&name, &sha));
        assert!(cache.pins().is_empty());
    }
}
