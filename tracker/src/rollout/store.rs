//! Where rollouts are kept: the [`RolloutStore`] trait, and [`FileStore`], its file-backed
//! implementation with the catalog's discipline.
//!
//! ```text
//! <data>/rollouts/v1/<name>/<tag>.json    TagRollouts: the active rollout and the history
//! ```
//!
//! Every change replaces the tag's file whole (temporary file, fsync, rename, fsync of the
//! directory), so a kill -9 at any instant leaves the state before or after the change. Only
//! durable state goes here; what hosts report is soft state, rebuilt from their next reports.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use fbpkg_common::api::Rollout;
use fbpkg_common::pkgref::{PackageName, Tag};
use serde::{Deserialize, Serialize};

use crate::durable::{create_dir_durable, write_atomic};
use crate::error::TrackerError;

/// Everything durable about one tag's rollouts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRollouts {
    /// The last rollout id given out for this tag.
    pub last_id: u64,
    /// The active rollout (running, paused or halted).
    pub current: Option<Rollout>,
    /// Finished rollouts and plain tag moves, oldest first, bounded.
    pub history: Vec<Rollout>,
}

/// Durable storage of rollouts, one record per tag. A database backend implements this too.
pub trait RolloutStore: Send + Sync + std::fmt::Debug {
    /// Every tag's record.
    fn load_all(&self) -> Result<Vec<(PackageName, Tag, TagRollouts)>, TrackerError>;
    /// Replace one tag's record; when this returns `Ok` the record survives a crash.
    fn save(&self, name: &PackageName, tag: &Tag, rec: &TagRollouts) -> Result<(), TrackerError>;
}

/// The file-backed store (see the module doc for the layout).
#[derive(Debug)]
pub struct FileStore {
    root: PathBuf,
}

impl FileStore {
    /// Open (creating if needed) the store under `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, TrackerError> {
        let root = data_dir.join("rollouts").join("v1");
        create_dir_durable(&root)
            .map_err(|e| TrackerError::storage(format!("creating {}", root.display()), e))?;
        Ok(Self { root })
    }

    fn path(&self, name: &PackageName, tag: &Tag) -> PathBuf {
        self.root
            .join(name.as_str())
            .join(format!("{}.json", tag.as_str()))
    }
}

fn entries(dir: &Path) -> Result<Vec<fs::DirEntry>, TrackerError> {
    match fs::read_dir(dir) {
        Ok(rd) => Ok(rd.flatten().collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(TrackerError::storage(
            format!("reading {}", dir.display()),
            e,
        )),
    }
}

impl RolloutStore for FileStore {
    fn load_all(&self) -> Result<Vec<(PackageName, Tag, TagRollouts)>, TrackerError> {
        let mut out = Vec::new();
        for pkg in entries(&self.root)? {
            let Ok(name) = PackageName::new(&pkg.file_name().to_string_lossy()) else {
                continue;
            };
            for entry in entries(&pkg.path())? {
                let path = entry.path();
                let file = entry.file_name().to_string_lossy().into_owned();
                if file.starts_with(".tmp-") {
                    // A write that never reached its rename: it was never acknowledged.
                    let _ = fs::remove_file(&path);
                    continue;
                }
                let Some(tag) = file.strip_suffix(".json").and_then(|t| Tag::new(t).ok()) else {
                    continue;
                };
                let rec = fs::read(&path).map_err(|e| e.to_string()).and_then(|b| {
                    serde_json::from_slice::<TagRollouts>(&b).map_err(|e| e.to_string())
                });
                match rec {
                    Ok(rec) => out.push((name.clone(), tag, rec)),
                    // Left on disk for a human: refusing to start would take the whole
                    // catalog down for one tag's history.
                    Err(e) => {
                        tracing::error!(package = %name, %tag, error = %e, "unreadable rollout file; skipped")
                    }
                }
            }
        }
        Ok(out)
    }

    fn save(&self, name: &PackageName, tag: &Tag, rec: &TagRollouts) -> Result<(), TrackerError> {
        let path = self.path(name, tag);
        let json = serde_json::to_vec_pretty(rec)
            .map_err(|e| TrackerError::storage("encoding rollouts", e.into()))?;
        write_atomic(&path, &json)
            .map_err(|e| TrackerError::storage(format!("writing {}", path.display()), e))
    }
}
