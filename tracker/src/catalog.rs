//! The package catalog: which versions exist, their metainfo, and tags with their history.
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
//! a tag file is replaced whole on every move. Everything is loaded into memory at start; the
//! in-memory index is updated only after the file is durable.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use fbpkg_common::api::{PackageDetail, PackageSummary, TagInfo, TagMove, VersionInfo};
use fbpkg_common::bencode::{self, Limits, Writer};
use fbpkg_common::metainfo::Metainfo;
use fbpkg_common::pkgref::{HashPrefix, PackageName, Selector, Tag};
use fbpkg_common::{InfoHash, Sha256Hash};

use crate::durable::{create_dir_durable, write_atomic};
use crate::error::TrackerError;

/// A stored version.
#[derive(Debug, Clone)]
pub struct Version {
    /// The metainfo exactly as published.
    pub metainfo: Arc<Metainfo>,
    /// Publish time, Unix seconds.
    pub published_at: u64,
}

#[derive(Debug, Default)]
struct Package {
    versions: BTreeMap<Sha256Hash, Version>,
    tags: BTreeMap<Tag, TagInfo>,
}

/// What a publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// A new version was stored.
    Created,
    /// The same version was already there; nothing changed.
    Unchanged,
}

/// Counts for metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct CatalogStats {
    /// Packages.
    pub packages: usize,
    /// Versions across packages.
    pub versions: usize,
    /// Sum of version sizes.
    pub bytes: u64,
}

/// The catalog: in-memory index over the durable files.
#[derive(Debug)]
pub struct Catalog {
    root: PathBuf,
    index: RwLock<BTreeMap<PackageName, Package>>,
    /// Serialises writers so check-then-write is atomic; readers never wait on disk I/O.
    write: Mutex<()>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn lock_poisoned() -> TrackerError {
    TrackerError::storage(
        "catalog lock",
        io::Error::other("a previous writer panicked"),
    )
}

impl Catalog {
    /// Open (creating if needed) the catalog under `data_dir` and load it.
    pub fn open(data_dir: &Path) -> Result<Self, TrackerError> {
        let root = data_dir.join("catalog").join("v1");
        create_dir_durable(&root)
            .map_err(|e| TrackerError::storage(format!("creating {}", root.display()), e))?;
        let mut index = BTreeMap::new();
        let entries = fs::read_dir(&root)
            .map_err(|e| TrackerError::storage(format!("reading {}", root.display()), e))?;
        for entry in entries.flatten() {
            let dir_name = entry.file_name().to_string_lossy().into_owned();
            let Ok(name) = PackageName::new(&dir_name) else {
                tracing::warn!(path = %entry.path().display(), "ignoring a catalog entry that is not a package name");
                continue;
            };
            let pkg = Self::load_package(&entry.path(), &name)?;
            if !pkg.versions.is_empty() {
                index.insert(name, pkg);
            }
        }
        Ok(Self {
            root,
            index: RwLock::new(index),
            write: Mutex::new(()),
        })
    }

    fn load_package(dir: &Path, name: &PackageName) -> Result<Package, TrackerError> {
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
            if file.starts_with(".tmp-") {
                // A write that never reached its rename: it was never acknowledged.
                let _ = fs::remove_file(&path);
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
                    tracing::error!(package = %name, path = %path.display(), error = %e, "unreadable version record; skipped (left on disk)")
                }
            }
        }
        for entry in read(&dir.join("tags"))? {
            let path = entry.path();
            let file = entry.file_name().to_string_lossy().into_owned();
            if file.starts_with(".tmp-") {
                let _ = fs::remove_file(&path);
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
                    tracing::error!(package = %name, %tag, "tag points at an unknown version; skipped")
                }
                Err(e) => {
                    tracing::error!(package = %name, %tag, error = %e, "unreadable tag file; skipped")
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

    /// Store a version. Same info-hash again is `Unchanged`; different metainfo under an
    /// existing name and hash is a conflict.
    pub fn publish(
        &self,
        name: &PackageName,
        sha256: &Sha256Hash,
        metainfo_bytes: &[u8],
    ) -> Result<(Published, Version), TrackerError> {
        let metainfo = Metainfo::parse(metainfo_bytes)?;
        if metainfo.sha256 != *sha256 {
            return Err(TrackerError::BadRequest(format!(
                "the metainfo's sha256 is {}, not {sha256} as the URL says",
                metainfo.sha256
            )));
        }
        let _w = self.write.lock().map_err(|_| lock_poisoned())?;
        if let Some(existing) = self.find_version(name, sha256)? {
            return if existing.metainfo.same_version(&metainfo) {
                Ok((Published::Unchanged, existing))
            } else {
                Err(TrackerError::Conflict(format!(
                    "{name}:{sha256} is already published with different metainfo (info-hash {}); \
                     a published version never changes",
                    existing.metainfo.info_hash
                )))
            };
        }
        let published_at = now_secs();
        let mut rec = Writer::with_capacity(metainfo_bytes.len() + 48);
        rec.dict().bytes(b"metainfo").raw(metainfo_bytes);
        rec.key_int(
            "published at",
            i64::try_from(published_at).unwrap_or(i64::MAX),
        )
        .end();
        let path = self.version_path(name, sha256);
        write_atomic(&path, &rec.finish())
            .map_err(|e| TrackerError::storage(format!("writing {}", path.display()), e))?;
        let version = Version {
            metainfo: Arc::new(metainfo),
            published_at,
        };
        self.index
            .write()
            .map_err(|_| lock_poisoned())?
            .entry(name.clone())
            .or_default()
            .versions
            .insert(*sha256, version.clone());
        Ok((Published::Created, version))
    }

    fn find_version(
        &self,
        name: &PackageName,
        sha: &Sha256Hash,
    ) -> Result<Option<Version>, TrackerError> {
        let idx = self.index.read().map_err(|_| lock_poisoned())?;
        Ok(idx.get(name).and_then(|p| p.versions.get(sha)).cloned())
    }

    /// Point `tag` at the version `target` (a full hash or an unambiguous prefix) resolves to.
    pub fn move_tag(
        &self,
        name: &PackageName,
        tag: &Tag,
        target: &str,
    ) -> Result<TagInfo, TrackerError> {
        let selector = match Selector::parse(target.trim())? {
            Selector::Tag(_) => {
                return Err(TrackerError::BadRequest(
                    "the body must be a version hash (or a prefix of one)".into(),
                ));
            }
            s => s,
        };
        let _w = self.write.lock().map_err(|_| lock_poisoned())?;
        let version = self.resolve(name, &selector)?;
        let sha = version.metainfo.sha256;
        let mut info = {
            let idx = self.index.read().map_err(|_| lock_poisoned())?;
            idx.get(name).and_then(|p| p.tags.get(tag)).cloned()
        }
        .unwrap_or(TagInfo {
            sha256: sha,
            history: Vec::new(),
        });
        if info.history.last().is_some_and(|m| m.sha256 == sha) {
            return Ok(info);
        }
        info.sha256 = sha;
        info.history.push(TagMove {
            sha256: sha,
            at: now_secs(),
        });
        let path = self.tag_path(name, tag);
        let json = serde_json::to_vec_pretty(&info)
            .map_err(|e| TrackerError::storage("encoding tag", e.into()))?;
        write_atomic(&path, &json)
            .map_err(|e| TrackerError::storage(format!("writing {}", path.display()), e))?;
        if let Some(p) = self
            .index
            .write()
            .map_err(|_| lock_poisoned())?
            .get_mut(name)
        {
            p.tags.insert(tag.clone(), info.clone());
        }
        Ok(info)
    }

    /// Resolve a selector within one package.
    pub fn resolve(
        &self,
        name: &PackageName,
        selector: &Selector,
    ) -> Result<Version, TrackerError> {
        let idx = self.index.read().map_err(|_| lock_poisoned())?;
        let pkg = idx
            .get(name)
            .ok_or_else(|| TrackerError::NotFound(format!("no package named {name}")))?;
        match selector {
            Selector::Hash(h) => pkg
                .versions
                .get(h)
                .cloned()
                .ok_or_else(|| TrackerError::NotFound(format!("{name} has no version {h}"))),
            Selector::Prefix(p) => unique(p, pkg.versions.iter().map(|(h, v)| (name, h, v))),
            Selector::Tag(t) => {
                let info = pkg
                    .tags
                    .get(t)
                    .ok_or_else(|| TrackerError::NotFound(format!("{name} has no tag {t}")))?;
                pkg.versions.get(&info.sha256).cloned().ok_or_else(|| {
                    TrackerError::NotFound(format!("tag {t} points at a missing version"))
                })
            }
        }
    }

    /// Resolve a hash or prefix across all packages.
    pub fn resolve_any(&self, prefix: &HashPrefix) -> Result<(PackageName, Version), TrackerError> {
        let idx = self.index.read().map_err(|_| lock_poisoned())?;
        let all = idx
            .iter()
            .flat_map(|(n, p)| p.versions.iter().map(move |(h, v)| (n, h, v)));
        let v = unique(prefix, all)?;
        let name = idx
            .iter()
            .find(|(_, p)| p.versions.contains_key(&v.metainfo.sha256))
            .map(|(n, _)| n.clone())
            .ok_or_else(|| TrackerError::NotFound(format!("no version {prefix}")))?;
        Ok((name, v))
    }

    /// Describe a version, with the tags that point at it now.
    pub fn describe(&self, name: &PackageName, v: &Version) -> VersionInfo {
        match self
            .index
            .read()
            .ok()
            .as_ref()
            .and_then(|idx| idx.get(name))
        {
            Some(p) => version_info(name, p, v),
            None => VersionInfo::from_metainfo(name.clone(), &v.metainfo, v.published_at),
        }
    }

    /// One row per package.
    pub fn summaries(&self) -> Vec<PackageSummary> {
        let Ok(idx) = self.index.read() else {
            return Vec::new();
        };
        idx.iter()
            .map(|(name, p)| {
                let latest = p
                    .versions
                    .values()
                    .max_by_key(|v| (v.published_at, v.metainfo.sha256));
                PackageSummary {
                    name: name.clone(),
                    versions: p.versions.len(),
                    total_bytes: p.versions.values().map(|v| v.metainfo.length).sum(),
                    latest: latest.map(|v| version_info(name, p, v)),
                    tags: p.tags.iter().map(|(t, i)| (t.clone(), i.sha256)).collect(),
                }
            })
            .collect()
    }

    /// Every version and tag of one package, newest version first.
    pub fn detail(&self, name: &PackageName) -> Result<PackageDetail, TrackerError> {
        let idx = self.index.read().map_err(|_| lock_poisoned())?;
        let p = idx
            .get(name)
            .ok_or_else(|| TrackerError::NotFound(format!("no package named {name}")))?;
        let mut versions: Vec<VersionInfo> = p
            .versions
            .values()
            .map(|v| version_info(name, p, v))
            .collect();
        versions.sort_by(|a, b| {
            b.published_at
                .cmp(&a.published_at)
                .then(a.sha256.cmp(&b.sha256))
        });
        Ok(PackageDetail {
            name: name.clone(),
            versions,
            tags: p.tags.clone(),
        })
    }

    /// Every version's info-hash and label, for registering swarms at start.
    pub fn all_versions(&self) -> Vec<(PackageName, Arc<Metainfo>)> {
        let Ok(idx) = self.index.read() else {
            return Vec::new();
        };
        idx.iter()
            .flat_map(|(n, p)| {
                p.versions
                    .values()
                    .map(move |v| (n.clone(), v.metainfo.clone()))
            })
            .collect()
    }

    /// The version whose swarm is `info_hash`.
    pub fn by_info_hash(&self, info_hash: &InfoHash) -> Option<(PackageName, Version)> {
        let idx = self.index.read().ok()?;
        idx.iter().find_map(|(n, p)| {
            p.versions
                .values()
                .find(|v| v.metainfo.info_hash == *info_hash)
                .map(|v| (n.clone(), v.clone()))
        })
    }

    /// Counts for metrics.
    pub fn stats(&self) -> CatalogStats {
        let Ok(idx) = self.index.read() else {
            return CatalogStats::default();
        };
        CatalogStats {
            packages: idx.len(),
            versions: idx.values().map(|p| p.versions.len()).sum(),
            bytes: idx
                .values()
                .flat_map(|p| p.versions.values())
                .map(|v| v.metainfo.length)
                .sum(),
        }
    }
}

/// A version's JSON description, with the tags that point at it now.
fn version_info(name: &PackageName, p: &Package, v: &Version) -> VersionInfo {
    let mut info = VersionInfo::from_metainfo(name.clone(), &v.metainfo, v.published_at);
    info.tags = tags_for(p, &v.metainfo.sha256);
    info
}

fn tags_for(p: &Package, sha: &Sha256Hash) -> Vec<Tag> {
    p.tags
        .iter()
        .filter(|(_, i)| i.sha256 == *sha)
        .map(|(t, _)| t.clone())
        .collect()
}

fn unique<'a>(
    prefix: &HashPrefix,
    versions: impl Iterator<Item = (&'a PackageName, &'a Sha256Hash, &'a Version)>,
) -> Result<Version, TrackerError> {
    let matches: Vec<_> = versions.filter(|(_, h, _)| prefix.matches(h)).collect();
    match matches.as_slice() {
        [] => Err(TrackerError::NotFound(format!(
            "no version matches {prefix}"
        ))),
        [(_, _, v)] => Ok((*v).clone()),
        many => Err(TrackerError::Ambiguous {
            prefix: prefix.to_string(),
            candidates: many.iter().map(|(n, h, _)| format!("{n}:{h}")).collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fbpkg_common::metainfo::Format;

    fn build(seed: u8) -> Metainfo {
        let data = vec![seed; 40_000];
        Metainfo::build(
            &data[..],
            40_000,
            "app.bin",
            "http://127.0.0.1:1/announce",
            Format::File,
        )
        .unwrap()
    }

    #[test]
    fn publish_is_idempotent_and_versions_never_change() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(dir.path()).unwrap();
        let name = PackageName::new("app").unwrap();
        let m = build(1);
        assert_eq!(
            cat.publish(&name, &m.sha256, m.as_bytes()).unwrap().0,
            Published::Created
        );
        assert_eq!(
            cat.publish(&name, &m.sha256, m.as_bytes()).unwrap().0,
            Published::Unchanged
        );
        // Same content, different piece hashes (tampered): a different info-hash, refused.
        let mut other = m.as_bytes().to_vec();
        let pos = other.windows(11).position(|w| w == b"6:pieces40:").unwrap() + 11;
        other[pos] ^= 1;
        assert!(matches!(
            cat.publish(&name, &m.sha256, &other),
            Err(TrackerError::Conflict(_))
        ));
        let wrong = build(2);
        assert!(matches!(
            cat.publish(&name, &m.sha256, wrong.as_bytes()),
            Err(TrackerError::BadRequest(_))
        ));
    }

    #[test]
    fn survives_restart_with_tags_and_history() {
        let dir = tempfile::tempdir().unwrap();
        let name = PackageName::new("app").unwrap();
        let tag = Tag::new("prod").unwrap();
        let (a, b) = (build(1), build(2));
        {
            let cat = Catalog::open(dir.path()).unwrap();
            cat.publish(&name, &a.sha256, a.as_bytes()).unwrap();
            cat.publish(&name, &b.sha256, b.as_bytes()).unwrap();
            cat.move_tag(&name, &tag, &a.sha256.to_hex()).unwrap();
            cat.move_tag(&name, &tag, &b.sha256.to_hex()[..10]).unwrap();
        }
        // A leftover temporary file from an interrupted write is ignored and cleaned.
        fs::write(
            dir.path().join("catalog/v1/app/versions/.tmp-1-x.rec"),
            b"garbage",
        )
        .unwrap();
        let cat = Catalog::open(dir.path()).unwrap();
        let v = cat.resolve(&name, &Selector::Tag(tag.clone())).unwrap();
        assert_eq!(v.metainfo.sha256, b.sha256);
        assert_eq!(
            v.metainfo.as_bytes(),
            b.as_bytes(),
            "metainfo served exactly as published"
        );
        let detail = cat.detail(&name).unwrap();
        assert_eq!(detail.versions.len(), 2);
        let hist: Vec<_> = detail.tags[&tag].history.iter().map(|m| m.sha256).collect();
        assert_eq!(hist, vec![a.sha256, b.sha256]);
        assert!(
            !dir.path()
                .join("catalog/v1/app/versions/.tmp-1-x.rec")
                .exists()
        );
    }

    #[test]
    fn prefixes_resolve_when_unambiguous() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(dir.path()).unwrap();
        let name = PackageName::new("app").unwrap();
        let ms: Vec<Metainfo> = (0..40).map(build).collect();
        for m in &ms {
            cat.publish(&name, &m.sha256, m.as_bytes()).unwrap();
        }
        let full = ms[0].sha256.to_hex();
        let p = HashPrefix::new(&full[..8]).unwrap();
        assert_eq!(
            cat.resolve(&name, &Selector::Prefix(p.clone()))
                .unwrap()
                .metainfo
                .sha256,
            ms[0].sha256
        );
        assert_eq!(cat.resolve_any(&p).unwrap().0, name);
        // Force an ambiguity: two names share a version hash.
        let other = PackageName::new("other").unwrap();
        cat.publish(&other, &ms[0].sha256, ms[0].as_bytes())
            .unwrap();
        assert!(
            matches!(cat.resolve_any(&p), Err(TrackerError::Ambiguous { candidates, .. }) if candidates.len() == 2)
        );
        let absent = (0u32..)
            .map(|i| format!("{i:08x}"))
            .find(|p| !ms.iter().any(|m| m.sha256.to_hex().starts_with(p)))
            .unwrap();
        assert!(matches!(
            cat.resolve(&name, &Selector::Prefix(HashPrefix::new(&absent).unwrap())),
            Err(TrackerError::NotFound(_))
        ));
    }
}
