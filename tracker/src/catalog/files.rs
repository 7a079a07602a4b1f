//! The file-backed catalog store (the default): one process, under `--data-dir`.
//!
//! Durable, and safe against a kill -9 at any instant: every change is one file written to a
//! temporary name, fsynced, renamed over its final name, and the directory fsynced. A reader
//! (or a restart) sees the old file or the new one, never half of either. Layout:
//!
//! ```text
//! <data>/catalog/v1/<name>/versions/<sha256>.rec   d 8:metainfo <.torrent as published> 12:published at i<unix secs> e
//! <data>/catalog/v1/<name>/tags/<tag>.json         TagInfo: current target and every move
//! ```
//!
//! A version record is written once and never replaced (a published version never changes);
//! a tag file is replaced whole on every move.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fbpkg_common::Sha256Hash;
use fbpkg_common::api::{TagInfo, TagMove};
use fbpkg_common::bencode::{self, Limits, Writer};
use fbpkg_common::metainfo::Metainfo;
use fbpkg_common::pkgref::{PackageName, Tag};

use super::{CatalogStore, Package, Version};
use crate::durable::{keep_unreadable, stale_tmp, store_root, write_atomic};
use crate::error::TrackerError;

/// Files under `<data>/catalog/v1`.
#[derive(Debug)]
pub struct FileStore {
    root: PathBuf,
}

impl FileStore {
    /// Open (creating if needed) the store under `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, TrackerError> {
        Ok(Self {
            root: store_root(data_dir, "catalog")?,
        })
    }

    fn load_package_dir(dir: &Path, name: &PackageName) -> Result<Package, TrackerError> {
        let mut pkg = Package::default();
        let read = |d: &Path| -> Result<Vec<fs::DirEntry>, TrackerError> {
            match fs::read_dir(d) {
                Ok(rd) => Ok(rd.flatten().collect()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
                Err(e) => Err(TrackerError::storage(format!("reading {}", d.display()), e)),
            }
        };
        for entry in read(&dir.join("versions"))? {
            let path = entry.path();
            let file = entry.file_name().to_string_lossy().into_owned();
            if file.contains(".unreadable-") {
                continue; // kept aside for a human (`keep_unreadable`)
            }
            if file.starts_with(".tmp-") {
                // A write that never reached its rename. Ours may be a publish in progress: a
                // reload runs without the catalog's write lock (`stale_tmp`).
                if stale_tmp(&file) {
                    let _ = fs::remove_file(&path);
                }
                continue;
            }
            match Self::load_version(&path) {
                Ok(v) if file == format!("{}.rec", v.metainfo.sha256) => {
                    pkg.versions.insert(v.metainfo.sha256, v);
                }
                Ok(_) => {
                    tracing::error!(package = %name, path = %path.display(), "version record does not match its file name; skipped")
                }
                Err(e) => {
                    tracing::error!(package = %name, path = %path.display(), error = %e, "unreadable version record; skipped (kept aside if the version is published again)")
                }
            }
        }
        for entry in read(&dir.join("tags"))? {
            let path = entry.path();
            let file = entry.file_name().to_string_lossy().into_owned();
            if file.starts_with(".tmp-") {
                if stale_tmp(&file) {
                    let _ = fs::remove_file(&path);
                }
                continue;
            }
            let Some(tag) = file.strip_suffix(".json").and_then(|t| Tag::new(t).ok()) else {
                continue;
            };
            let info = fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<TagInfo>(&b).map_err(|e| e.to_string()));
            match info {
                Ok(info) if pkg.versions.contains_key(&info.sha256) => {
                    pkg.tags.insert(tag, info);
                }
                Ok(_) => {
                    tracing::error!(package = %name, %tag, "tag points at an unknown version; skipped (kept aside at the next move)")
                }
                Err(e) => {
                    tracing::error!(package = %name, %tag, error = %e, "unreadable tag file; skipped (kept aside at the next move)")
                }
            }
        }
        Ok(pkg)
    }

    fn load_version(path: &Path) -> Result<Version, String> {
        let bytes = fs::read(path).map_err(|e| e.to_string())?;
        let limits = Limits {
            max_len: Limits::METAINFO.max_len + 64,
            max_depth: Limits::METAINFO.max_depth + 1,
        };
        let rec = bencode::decode(&bytes, &limits).map_err(|e| e.to_string())?;
        let d = rec.as_dict("record").map_err(|e| e.to_string())?;
        let (_, span) = d.get(&b"metainfo"[..]).ok_or("no metainfo")?;
        let published_at = bencode::get(d, "published at")
            .and_then(bencode::Value::as_int)
            .and_then(|i| u64::try_from(i).ok())
            .ok_or("no publish time")?;
        let metainfo = Metainfo::parse(&bytes[span.clone()]).map_err(|e| e.to_string())?;
        Ok(Version {
            metainfo: Arc::new(metainfo),
            published_at,
        })
    }

    fn version_path(&self, name: &PackageName, sha: &Sha256Hash) -> PathBuf {
        self.root
            .join(name.as_str())
            .join("versions")
            .join(format!("{sha}.rec"))
    }

    fn tag_path(&self, name: &PackageName, tag: &Tag) -> PathBuf {
        self.root
            .join(name.as_str())
            .join("tags")
            .join(format!("{tag}.json"))
    }
}

impl CatalogStore for FileStore {
    fn load_all(&self) -> Result<BTreeMap<PackageName, Package>, TrackerError> {
        let mut index = BTreeMap::new();
        let entries = fs::read_dir(&self.root)
            .map_err(|e| TrackerError::storage(format!("reading {}", self.root.display()), e))?;
        for entry in entries.flatten() {
            let dir_name = entry.file_name().to_string_lossy().into_owned();
            let Ok(name) = PackageName::new(&dir_name) else {
                tracing::warn!(path = %entry.path().display(), "ignoring a catalog entry that is not a package name");
                continue;
            };
            let pkg = Self::load_package_dir(&entry.path(), &name)?;
            index.insert(name, pkg);
        }
        Ok(index)
    }

    fn load_package(&self, name: &PackageName) -> Result<Package, TrackerError> {
        Self::load_package_dir(&self.root.join(name.as_str()), name)
    }

    fn insert_version(
        &self,
        name: &PackageName,
        version: &Version,
        metainfo_bytes: &[u8],
    ) -> Result<Option<Version>, TrackerError> {
        // One process writes here, and the catalog checked its index under its write lock.
        let mut rec = Writer::with_capacity(metainfo_bytes.len() + 48);
        rec.dict().bytes(b"metainfo").raw(metainfo_bytes);
        rec.key_int(
            "published at",
            i64::try_from(version.published_at).unwrap_or(i64::MAX),
        )
        .end();
        let path = self.version_path(name, &version.metainfo.sha256);
        // A file here was not loaded (unreadable, or not this version's): kept, not replaced.
        keep_unreadable(&path)?;
        write_atomic(&path, &rec.finish())
            .map_err(|e| TrackerError::storage(format!("writing {}", path.display()), e))?;
        Ok(None)
    }

    fn move_tag(
        &self,
        name: &PackageName,
        tag: &Tag,
        sha256: &Sha256Hash,
        at: u64,
        known: Option<&TagInfo>,
    ) -> Result<TagInfo, TrackerError> {
        let mut info = known.cloned().unwrap_or(TagInfo {
            sha256: *sha256,
            history: Vec::new(),
        });
        if info.history.last().is_some_and(|m| m.sha256 == *sha256) {
            return Ok(info);
        }
        info.sha256 = *sha256;
        info.history.push(TagMove {
            sha256: *sha256,
            at,
        });
        let path = self.tag_path(name, tag);
        if known.is_none() {
            // A tag file the load skipped (unreadable, or naming a version it could not
            // read) holds a history this move would otherwise write over.
            keep_unreadable(&path)?;
        }
        let json = serde_json::to_vec_pretty(&info)
            .map_err(|e| TrackerError::storage("encoding tag", e.into()))?;
        write_atomic(&path, &json)
            .map_err(|e| TrackerError::storage(format!("writing {}", path.display()), e))?;
        Ok(info)
    }

    fn check(&self) -> Result<(), String> {
        let dir = self.root.parent().unwrap_or(&self.root);
        match fs::metadata(dir) {
            Ok(m) if m.is_dir() && !m.permissions().readonly() => Ok(()),
            Ok(_) => Err(format!(
                "catalog directory {} is not writable",
                dir.display()
            )),
            Err(e) => Err(format!("catalog directory {}: {e}", dir.display())),
        }
    }

    fn describe(&self) -> String {
        format!("files in {}", self.root.display())
    }
}
