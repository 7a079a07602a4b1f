//! The package catalog: which versions exist, their metainfo, and tags with their history.
//!
//! Every replica answers reads from memory (an index of every version and tag); writes go to
//! a durable [`CatalogStore`] first, and the index changes only once the store has the change:
//!
//! - [`files::FileStore`] (the default): files under `--data-dir`, crash-safe, one process;
//! - [`postgres::PgStore`] (`--catalog postgres://...`): shared by replicas. A change committed
//!   by one is announced to all ([`crate::postgres::Notice`]) and each reloads that package
//!   ([`Catalog::reload`]).
//!
//! Published versions never change: publishing the same name and hash again with the same
//! metainfo is a no-op, with different metainfo a conflict, whichever replica stored it first.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use fbpkg_common::api::{PackageDetail, PackageSummary, TagInfo, VersionInfo};
use fbpkg_common::metainfo::Metainfo;
pub use fbpkg_common::pkgref::PackageName;
use fbpkg_common::pkgref::{HashPrefix, Selector, Tag};
use fbpkg_common::{InfoHash, Sha256Hash};

use crate::error::TrackerError;

pub mod files;
pub mod postgres;

/// A stored version.
#[derive(Debug, Clone)]
pub struct Version {
    /// The metainfo exactly as published.
    pub metainfo: Arc<Metainfo>,
    /// Publish time, Unix seconds.
    pub published_at: u64,
}

/// One package as a store holds it.
#[derive(Debug, Default, Clone)]
pub struct Package {
    /// Its versions.
    pub versions: BTreeMap<Sha256Hash, Version>,
    /// Its tags, each with every move.
    pub tags: BTreeMap<Tag, TagInfo>,
}

/// Where the catalog is durable. Calls block (disk or database): callers are on the blocking
/// pool.
pub trait CatalogStore: Send + Sync + std::fmt::Debug {
    /// Every package.
    fn load_all(&self) -> Result<BTreeMap<PackageName, Package>, TrackerError>;
    /// One package as stored now (empty when it has no versions).
    fn load_package(&self, name: &PackageName) -> Result<Package, TrackerError>;
    /// Store `version` (its metainfo is `metainfo_bytes`) unless the store already has this
    /// name and hash: then nothing is written and the stored version is returned.
    fn insert_version(
        &self,
        name: &PackageName,
        version: &Version,
        metainfo_bytes: &[u8],
    ) -> Result<Option<Version>, TrackerError>;
    /// Point `tag` at `sha256` (a stored version) and append the move to its history, unless
    /// it points there already; returns the tag as stored now. `known` is what this process
    /// last saw of the tag (a store shared with other processes reads its own instead).
    fn move_tag(
        &self,
        name: &PackageName,
        tag: &Tag,
        sha256: &Sha256Hash,
        at: u64,
        known: Option<&TagInfo>,
    ) -> Result<TagInfo, TrackerError>;
    /// Shared with other processes (replicas), whose writes this one's memory hears of only
    /// a moment later? The default, no: this process writes it alone.
    fn shared(&self) -> bool {
        false
    }
    /// One tag as stored now (for a shared store: as every replica sees it).
    fn load_tag(&self, name: &PackageName, tag: &Tag) -> Result<Option<TagInfo>, TrackerError> {
        Ok(self.load_package(name)?.tags.remove(tag))
    }
    /// Is it usable now? `Err` says why not (for `/readyz`).
    fn check(&self) -> Result<(), String>;
    /// What it is, without credentials (for logs and `/readyz`).
    fn describe(&self) -> String;
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

/// The catalog: an in-memory index over a durable store.
#[derive(Debug)]
pub struct Catalog {
    store: Box<dyn CatalogStore>,
    index: RwLock<BTreeMap<PackageName, Package>>,
    /// Serialises this process's writers so check-then-write is atomic here; readers never
    /// wait on the store.
    write: Mutex<()>,
    /// Told of every version a publish or a reload brings in ([`Catalog::on_new_version`]).
    new_version: std::sync::OnceLock<NewVersion>,
}

/// What [`Catalog::on_new_version`] calls.
type NewVersionFn = dyn Fn(&PackageName, &Version) + Send + Sync;

struct NewVersion(Box<NewVersionFn>);

impl std::fmt::Debug for NewVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NewVersion")
    }
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
    /// Open (creating if needed) the file catalog under `data_dir` and load it.
    pub fn open(data_dir: &std::path::Path) -> Result<Self, TrackerError> {
        Self::with_store(Box::new(files::FileStore::open(data_dir)?))
    }

    /// Load the catalog from `store`.
    pub fn with_store(store: Box<dyn CatalogStore>) -> Result<Self, TrackerError> {
        let mut index = store.load_all()?;
        index.retain(|_, p| !p.versions.is_empty());
        Ok(Self {
            store,
            index: RwLock::new(index),
            write: Mutex::new(()),
            new_version: std::sync::OnceLock::new(),
        })
    }

    /// Call `f` with every version this process adds to the catalog after opening it: one
    /// published here, or one a reload brings in from the store (published by another
    /// replica), whoever reloads: the listener, or a write that asked the store for a version
    /// this process had not heard of yet. The tracker registers their swarms with it: a
    /// version learnt any other way would be in the catalog with its announces refused. Set
    /// once; later calls are ignored.
    pub fn on_new_version(&self, f: impl Fn(&PackageName, &Version) + Send + Sync + 'static) {
        let _ = self.new_version.set(NewVersion(Box::new(f)));
    }

    /// The durable store (for `/readyz`).
    pub fn store(&self) -> &dyn CatalogStore {
        self.store.as_ref()
    }

    /// Read `name` from the store again (another replica changed it). Returns its versions
    /// this process did not know (the [`Catalog::on_new_version`] hook has been told).
    pub fn reload(&self, name: &PackageName) -> Result<Vec<Version>, TrackerError> {
        let fresh = self.store.load_package(name)?;
        Ok(self.replace(name, fresh))
    }

    /// Read every package from the store again (notifications may have been missed).
    /// Returns the versions this process did not know, with their package.
    pub fn reload_all(&self) -> Result<Vec<(PackageName, Version)>, TrackerError> {
        let all = self.store.load_all()?;
        let mut new = Vec::new();
        for (name, pkg) in all {
            for v in self.replace(&name, pkg) {
                new.push((name.clone(), v));
            }
        }
        Ok(new)
    }

    /// Swap in what the store holds for `name`; versions never go away, so the union is kept
    /// (a store read that raced a write of ours cannot lose it). Returns the new versions.
    fn replace(&self, name: &PackageName, fresh: Package) -> Vec<Version> {
        let Ok(mut idx) = self.index.write() else {
            return Vec::new();
        };
        if fresh.versions.is_empty() {
            return Vec::new();
        }
        let pkg = idx.entry(name.clone()).or_default();
        let mut new = Vec::new();
        for (sha, v) in fresh.versions {
            if let std::collections::btree_map::Entry::Vacant(e) = pkg.versions.entry(sha) {
                new.push(v.clone());
                e.insert(v);
            }
        }
        for (tag, info) in fresh.tags {
            keep_newer(&mut pkg.tags, tag, info);
        }
        drop(idx);
        if let Some(hook) = self.new_version.get() {
            for v in &new {
                (hook.0)(name, v);
            }
        }
        new
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
        let existing = match self.find_version(name, sha256)? {
            Some(v) => v,
            None => {
                let version = Version {
                    metainfo: Arc::new(metainfo.clone()),
                    published_at: now_secs(),
                };
                // Another replica may have stored it since this one last heard.
                let stored = self.store.insert_version(name, &version, metainfo_bytes)?;
                let kept = stored.clone().unwrap_or_else(|| version.clone());
                self.index
                    .write()
                    .map_err(|_| lock_poisoned())?
                    .entry(name.clone())
                    .or_default()
                    .versions
                    .insert(*sha256, kept.clone());
                // Told here, with the version in the index, not by the caller after: a publish
                // whose request was dropped meanwhile (its client gone, its deadline passed)
                // stored the version and left its swarm unregistered, every announce refused.
                if let Some(hook) = self.new_version.get() {
                    (hook.0)(name, &kept);
                }
                match stored {
                    None => return Ok((Published::Created, version)),
                    Some(_) => kept,
                }
            }
        };
        if existing.metainfo.same_version(&metainfo) {
            Ok((Published::Unchanged, existing))
        } else {
            Err(TrackerError::Conflict(format!(
                "{name}:{sha256} is already published with different metainfo (info-hash {}); \
                 a published version never changes",
                existing.metainfo.info_hash
            )))
        }
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
        let version = self.resolve_fresh(name, &selector)?;
        let sha = version.metainfo.sha256;
        let known = {
            let idx = self.index.read().map_err(|_| lock_poisoned())?;
            idx.get(name).and_then(|p| p.tags.get(tag)).cloned()
        };
        let info = self
            .store
            .move_tag(name, tag, &sha, now_secs(), known.as_ref())?;
        if let Some(p) = self
            .index
            .write()
            .map_err(|_| lock_poisoned())?
            .get_mut(name)
        {
            // Another replica's later move may have reached the index (through the listener)
            // since this one committed: a shorter history does not replace it.
            keep_newer(&mut p.tags, tag.clone(), info.clone());
        }
        Ok(info)
    }

    /// The version `name:tag` points at now. From memory, unless the store is shared: then
    /// from the store, since another replica may have moved the tag a moment ago (memory
    /// catches up on the way). For a write that depends on where the tag is.
    pub fn tag_now(
        &self,
        name: &PackageName,
        tag: &Tag,
    ) -> Result<Option<Sha256Hash>, TrackerError> {
        let in_memory = || -> Result<Option<Sha256Hash>, TrackerError> {
            let idx = self.index.read().map_err(|_| lock_poisoned())?;
            Ok(idx
                .get(name)
                .and_then(|p| p.tags.get(tag))
                .map(|t| t.sha256))
        };
        if !self.store.shared() {
            return in_memory();
        }
        let Some(info) = self.store.load_tag(name, tag)? else {
            return in_memory();
        };
        let sha = info.sha256;
        let known = {
            let mut idx = self.index.write().map_err(|_| lock_poisoned())?;
            match idx.get_mut(name) {
                Some(p) if p.versions.contains_key(&sha) => {
                    keep_newer(&mut p.tags, tag.clone(), info);
                    true
                }
                _ => false,
            }
        };
        if !known {
            // A version published elsewhere a moment ago: the whole package, so that its
            // swarm is registered too.
            self.reload(name)?;
        }
        Ok(Some(sha))
    }

    /// [`Self::resolve`], for a write that names a version: one this process has not heard
    /// of yet may have been published on another replica a moment ago, so the store is asked
    /// before the answer is "not found". Blocks (on the blocking pool).
    pub fn resolve_fresh(
        &self,
        name: &PackageName,
        selector: &Selector,
    ) -> Result<Version, TrackerError> {
        match self.resolve(name, selector) {
            // Resolved again even when the reload brought nothing new: the listener may have
            // brought it in meanwhile.
            Err(TrackerError::NotFound(e)) => match self.reload(name) {
                Ok(_) => self.resolve(name, selector),
                Err(reload) => {
                    tracing::warn!(package = %name, error = %reload, "could not read the package from the catalog store");
                    Err(TrackerError::NotFound(e))
                }
            },
            other => other,
        }
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

/// Put `info` in `tags` unless the copy there has seen more moves: a tag's history only
/// grows, so the longer one is the later state, whichever replica's news arrives last.
fn keep_newer(tags: &mut BTreeMap<Tag, TagInfo>, tag: Tag, info: TagInfo) {
    if tags
        .get(&tag)
        .is_none_or(|old| info.history.len() >= old.history.len())
    {
        tags.insert(tag, info);
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use fbpkg_common::api::TagMove;
    use fbpkg_common::metainfo::Format;

    /// Two replicas move a tag; this one commits first, and hears of the other's later move
    /// before it writes its own into the index: the later state stays, whichever arrives last.
    #[test]
    fn a_tag_in_the_index_never_goes_back_to_an_earlier_move() {
        let tag = Tag::new("prod").unwrap();
        let info = |moves: &[u8]| {
            let history: Vec<TagMove> = moves
                .iter()
                .map(|&b| TagMove {
                    sha256: Sha256Hash([b; 32]),
                    at: u64::from(b),
                })
                .collect();
            TagInfo {
                sha256: history.last().unwrap().sha256,
                history,
            }
        };
        let mut tags = BTreeMap::new();
        keep_newer(&mut tags, tag.clone(), info(&[1]));
        keep_newer(&mut tags, tag.clone(), info(&[1, 2, 3]));
        keep_newer(&mut tags, tag.clone(), info(&[1, 2]));
        assert_eq!(tags[&tag].sha256, Sha256Hash([3; 32]));
        keep_newer(&mut tags, tag.clone(), info(&[1, 2, 3, 4]));
        assert_eq!(tags[&tag].sha256, Sha256Hash([4; 32]));
    }

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

    /// Loading a package's directory removes what a dead process's write left before its
    /// rename, never this process's: a reload (a rollout naming a version this replica has
    /// not heard of) runs beside a publish, without the catalog's write lock.
    #[test]
    fn a_reload_leaves_a_write_in_progress_alone() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(dir.path()).unwrap();
        let name = PackageName::new("app").unwrap();
        let m = build(1);
        cat.publish(&name, &m.sha256, m.as_bytes()).unwrap();
        let versions = dir.path().join("catalog/v1/app/versions");
        let ours = versions.join(format!(
            ".tmp-{}-{}.rec",
            std::process::id(),
            build(2).sha256
        ));
        let dead = versions.join(format!(".tmp-1-{}.rec", build(3).sha256));
        fs::write(&ours, b"half a record").unwrap();
        fs::write(&dead, b"half a record").unwrap();
        let store = files::FileStore::open(dir.path()).unwrap();
        let pkg = store.load_package(&name).unwrap();
        assert_eq!(pkg.versions.len(), 1);
        assert!(ours.exists(), "a write in progress is left alone");
        assert!(!dead.exists(), "a dead process's leftover is removed");
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

    /// A record the load could not read is skipped, and the write that replaces it keeps it
    /// beside: a tag's history (and a version record) is never written over unseen.
    #[test]
    fn an_unreadable_record_is_kept_aside_not_written_over() {
        let dir = tempfile::tempdir().unwrap();
        let name = PackageName::new("app").unwrap();
        let tag = Tag::new("prod").unwrap();
        let (a, b) = (build(1), build(2));
        {
            let cat = Catalog::open(dir.path()).unwrap();
            cat.publish(&name, &a.sha256, a.as_bytes()).unwrap();
            cat.move_tag(&name, &tag, &a.sha256.to_hex()).unwrap();
        }
        let pkg = dir.path().join("catalog/v1/app");
        let tag_file = pkg.join("tags/prod.json");
        let version_file = pkg.join(format!("versions/{}.rec", b.sha256));
        fs::write(&tag_file, b"{\"sha256\": \"half a").unwrap();
        fs::write(&version_file, b"d8:metainfo").unwrap();
        let cat = Catalog::open(dir.path()).unwrap();
        assert!(cat.resolve(&name, &Selector::Tag(tag.clone())).is_err());
        cat.publish(&name, &b.sha256, b.as_bytes()).unwrap();
        cat.move_tag(&name, &tag, &b.sha256.to_hex()).unwrap();
        let kept = |dir: &std::path::Path, prefix: &str| -> Vec<Vec<u8>> {
            fs::read_dir(dir)
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .map(|e| fs::read(e.path()).unwrap())
                .collect()
        };
        assert_eq!(
            kept(&pkg.join("tags"), "prod.json.unreadable-"),
            vec![b"{\"sha256\": \"half a".to_vec()]
        );
        let rec = format!("{}.rec.unreadable-", b.sha256);
        assert_eq!(
            kept(&pkg.join("versions"), &rec),
            vec![b"d8:metainfo".to_vec()]
        );
        // What replaced them loads, and the copies kept aside are not read as records.
        let cat = Catalog::open(dir.path()).unwrap();
        let v = cat.resolve(&name, &Selector::Tag(tag)).unwrap();
        assert_eq!(v.metainfo.sha256, b.sha256);
        assert_eq!(cat.detail(&name).unwrap().versions.len(), 2);
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
