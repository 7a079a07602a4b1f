//! Crash-safe file writes, shared by the catalog and the rollout store: a file holds its old
//! content or all of its new content, never a mix, whenever the process or the machine dies.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::error::TrackerError;

/// `create_dir_all`, then fsync the parent of every directory it created: a new directory is
/// an entry in its parent, and without this a power cut could lose a new package's directory
/// with its acknowledged records inside.
pub(crate) fn create_dir_durable(dir: &Path) -> io::Result<()> {
    let Some(existing) = dir.ancestors().find(|a| a.is_dir()) else {
        return fs::create_dir_all(dir);
    };
    if existing == dir {
        return Ok(());
    }
    fs::create_dir_all(dir)?;
    for created in dir.ancestors().take_while(|a| *a != existing) {
        if let Some(parent) = created.parent() {
            File::open(parent)?.sync_all()?;
        }
    }
    Ok(())
}

/// The root of a file store, `<data_dir>/<what>/v1`, created durably if needed.
pub(crate) fn store_root(data_dir: &Path, what: &str) -> Result<PathBuf, TrackerError> {
    let root = data_dir.join(what).join("v1");
    create_dir_durable(&root)
        .map_err(|e| TrackerError::storage(format!("creating {}", root.display()), e))?;
    Ok(root)
}

/// Whether `file`, a name in a directory [`write_atomic`] writes, is a temporary file a write
/// left before its rename in another process (one that died: it was never acknowledged), to
/// be removed. This process's own may be a write in progress: readers that load a directory
/// without the writers' lock (a reload) must leave it.
pub(crate) fn stale_tmp(file: &str) -> bool {
    file.strip_prefix(".tmp-")
        .is_some_and(|rest| !rest.starts_with(&format!("{}-", std::process::id())))
}

/// Write `bytes` to `path` so that `path` holds either its old content or all of `bytes`.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("path has no parent"))?;
    create_dir_durable(dir)?;
    let tmp = dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// Move `path` out of the way of a write about to replace it, when it holds a record this
/// process could not read (skipped at load, so the write does not carry it on): it is kept
/// beside, as `<file>.unreadable-<unix secs>`, for a human, and logged. No file: nothing done.
pub(crate) fn keep_unreadable(path: &Path) -> Result<(), TrackerError> {
    move_aside(path).map_err(|e| TrackerError::storage(format!("keeping {}", path.display()), e))
}

fn move_aside(path: &Path) -> io::Result<()> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(());
    };
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for n in 0..100u32 {
        let suffix = if n == 0 {
            String::new()
        } else {
            format!("-{n}")
        };
        let aside = dir.join(format!(
            "{}.unreadable-{secs}{suffix}",
            name.to_string_lossy()
        ));
        if fs::symlink_metadata(&aside).is_ok() {
            continue;
        }
        return match fs::rename(path, &aside) {
            Ok(()) => {
                File::open(dir)?.sync_all()?;
                tracing::error!(kept = %aside.display(), "an unreadable record was about to be replaced; kept beside it");
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        };
    }
    Err(io::Error::other(format!(
        "{}: too many unreadable copies kept already",
        path.display()
    )))
}
