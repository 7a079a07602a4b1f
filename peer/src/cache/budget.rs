//! The cache's size budget: what each version costs on disk, which ones must stay, and the
//! least-recently-used sweep that evicts the rest.
//!
//! The budget counts the versions' entry directories (archive, tree, metainfo, seal), as `du`
//! counts them: allocated blocks, a file linked twice in one entry counted once. Staging,
//! quarantine, pins, tag memory and use files are small or bounded and are not counted.
//!
//! A sweep evicts, oldest [`Cache::last_use`] first, until the versions' bytes are at most a
//! target. It never evicts a version that is pinned, in use (its [`Cache::try_claim`] fails),
//! or protected by the caller (the agent protects the versions its followed tags resolve to,
//! the version it last activated for each, downloads in progress and the version just
//! installed). Entries being assembled live in `.staging` and are never listed. Each eviction:
//!
//! ```text
//! try_claim (exclusive flock, no wait)   -> in use: skip it
//!   pinned meanwhile?                    -> skip it
//!   stop_seeding(name, sha)              -> the agent cancels the torrent: tracker hears `stopped`
//!   Cache::remove                        -> renamed out of the cache, then deleted
//!   unlink the use file, drop the claim  -> a launcher waiting on it finds the entry gone
//! ```

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::SystemTime;

use fbpkg_common::Sha256Hash;
use fbpkg_common::pkgref::PackageName;
use serde::{Deserialize, Serialize};

use super::Cache;
use crate::error::{PeerError, Result};

/// A version's identity in the cache.
pub type VersionKey = (PackageName, Sha256Hash);

/// The agent's size budget: `--cache-max-size` and its watermarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    /// The most the versions may take, in bytes.
    pub max_bytes: u64,
    /// Sweep when the versions take more than this percentage of `max_bytes`.
    pub high_pct: u8,
    /// ... down to this percentage.
    pub low_pct: u8,
}

/// Default `--cache-high-watermark`, percent.
pub const DEFAULT_HIGH_PCT: u8 = 90;
/// Default `--cache-low-watermark`, percent.
pub const DEFAULT_LOW_PCT: u8 = 80;

impl Budget {
    /// A budget, if `0 < low < high <= 100`.
    pub fn new(max_bytes: u64, high_pct: u8, low_pct: u8) -> std::result::Result<Self, String> {
        if !(low_pct > 0 && low_pct < high_pct && high_pct <= 100) {
            return Err(format!(
                "cache watermarks must satisfy 0 < low < high <= 100 (got low {low_pct}%, high {high_pct}%)"
            ));
        }
        Ok(Self {
            max_bytes,
            high_pct,
            low_pct,
        })
    }

    fn pct(&self, pct: u8) -> u64 {
        (u128::from(self.max_bytes) * u128::from(pct) / 100) as u64
    }

    /// Bytes past which a sweep starts.
    pub fn high_bytes(&self) -> u64 {
        self.pct(self.high_pct)
    }

    /// Bytes a sweep evicts down to.
    pub fn low_bytes(&self) -> u64 {
        self.pct(self.low_pct)
    }
}

/// Parse a watermark: `90` or `90%`.
pub fn parse_percent(s: &str) -> std::result::Result<u8, String> {
    let t = s.trim();
    let t = t.strip_suffix('%').unwrap_or(t);
    match t.trim().parse::<u8>() {
        Ok(p) if (1..=100).contains(&p) => Ok(p),
        _ => Err(format!("{s:?} is not a percentage from 1 to 100")),
    }
}

/// Why a version is kept whatever the budget says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeepReason {
    /// `fbpkg-rs pin`.
    Pinned,
    /// A running program was launched from it.
    InUse,
    /// What a followed tag resolves to for this host now (during a rollout: its target here).
    FollowedCurrent,
    /// The version last activated for a followed tag (during a rollout: the one it replaces).
    FollowedActive,
    /// The version activated before that: where an abort takes the host back.
    FollowedPrevious,
    /// A rollout's next version, fetched ahead while the host's phase has not come.
    FollowedNext,
    /// A download of it is in progress or being installed.
    Installing,
    /// Just installed: a sweep never evicts a version to make room for itself.
    JustInstalled,
}

impl KeepReason {
    /// As `cache ls` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            KeepReason::Pinned => "pinned",
            KeepReason::InUse => "in use",
            KeepReason::FollowedCurrent => "followed current",
            KeepReason::FollowedActive => "followed active",
            KeepReason::FollowedPrevious => "followed previous",
            KeepReason::FollowedNext => "followed next",
            KeepReason::Installing => "installing",
            KeepReason::JustInstalled => "just installed",
        }
    }
}

/// Versions the caller protects, each with its reasons.
pub type Protected = BTreeMap<VersionKey, Vec<KeepReason>>;

/// Add `reason` for `key`.
pub fn protect(p: &mut Protected, key: VersionKey, reason: KeepReason) {
    let r = p.entry(key).or_default();
    if !r.contains(&reason) {
        r.push(reason);
        r.sort();
    }
}

/// One version in the cache, as `cache ls` and the sweep see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// Package name.
    pub name: PackageName,
    /// Its SHA-256.
    pub sha256: Sha256Hash,
    /// Bytes on disk of its entry.
    pub bytes: u64,
    /// Last launch, or else install.
    pub last_use: Option<SystemTime>,
    /// Launches recorded.
    pub launches: u64,
    /// `fbpkg-rs pin`ned.
    pub pinned: bool,
    /// A running program holds it.
    pub in_use: bool,
}

impl Version {
    /// Its key.
    pub fn key(&self) -> VersionKey {
        (self.name.clone(), self.sha256)
    }
}

/// Bytes on disk under `path`, as `du` counts them (each inode once).
pub fn disk_usage(path: &Path) -> u64 {
    fn walk(p: &Path, seen: &mut HashSet<(u64, u64)>) -> u64 {
        let Ok(m) = fs::symlink_metadata(p) else {
            return 0;
        };
        let mut n = 0;
        if seen.insert((m.dev(), m.ino())) {
            n += m.blocks() * 512;
        }
        if m.is_dir()
            && let Ok(rd) = fs::read_dir(p)
        {
            for e in rd.flatten() {
                n += walk(&e.path(), seen);
            }
        }
        n
    }
    walk(path, &mut HashSet::new())
}

/// The eviction order: oldest last use first; never used nor installed (unknown) first of
/// all; ties by name and hash, so a sweep is deterministic.
pub fn lru_order(versions: &mut [Version]) {
    versions
        .sort_by(|a, b| (a.last_use, &a.name, &a.sha256).cmp(&(b.last_use, &b.name, &b.sha256)));
}

/// One version a sweep evicted (or, dry, would evict).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evicted {
    /// Package name.
    pub name: PackageName,
    /// Its SHA-256.
    pub sha256: Sha256Hash,
    /// Bytes freed.
    pub bytes: u64,
}

/// What a sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepReport {
    /// The versions' bytes before.
    pub bytes_before: u64,
    /// ... and after.
    pub bytes_after: u64,
    /// The target it evicted towards.
    pub target: u64,
    /// Evicted, in order (dry run: would be).
    pub evicted: Vec<Evicted>,
    /// Nothing was removed.
    pub dry_run: bool,
}

impl SweepReport {
    /// Whether the versions fit the target afterwards.
    pub fn reached(&self) -> bool {
        self.bytes_after <= self.target
    }
}

impl Cache {
    /// Every version in the cache with its size, last use, launches, pin and use.
    pub fn usage(&self) -> Vec<Version> {
        self.versions()
            .into_iter()
            .map(|(name, sha)| Version {
                bytes: disk_usage(&self.entry_dir(&name, &sha)),
                last_use: self.last_use(&name, &sha),
                launches: self.launches(&name, &sha),
                pinned: self.is_pinned(&name, &sha),
                in_use: self.in_use(&name, &sha),
                name,
                sha256: sha,
            })
            .collect()
    }

    /// Evict `name:sha256` unless it is in use or pinned: claim it, `stop_seeding`, remove it.
    /// `Ok(false)` when it was kept.
    pub fn evict(
        &self,
        name: &PackageName,
        sha256: &Sha256Hash,
        stop_seeding: impl FnOnce(),
    ) -> Result<bool> {
        let Some(claim) = self.try_claim(name, sha256)? else {
            return Ok(false);
        };
        if self.is_pinned(name, sha256) {
            return Ok(false);
        }
        stop_seeding();
        self.remove(name, sha256)?;
        // Under the claim: a launcher that waits for the lock finds the entry gone either way.
        let use_file = self.use_path(name, sha256);
        if let Err(e) = fs::remove_file(&use_file)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::debug!(path = %use_file.display(), error = %e, "cannot remove an evicted version's use file");
        }
        drop(claim);
        Ok(true)
    }

    /// Evict least-recently-used versions until the versions take at most `target` bytes,
    /// sparing pinned, in-use and `protected` ones. `stop_seeding` runs for each version just
    /// before it is removed; `why` goes in the log.
    pub fn sweep(
        &self,
        target: u64,
        protected: &Protected,
        dry_run: bool,
        why: &str,
        stop_seeding: impl FnMut(&PackageName, &Sha256Hash),
    ) -> Result<SweepReport> {
        self.sweep_over(target, target, protected, dry_run, why, stop_seeding)
    }

    /// [`Cache::sweep`] down to `target`, only if the versions take more than `trigger`
    /// (watermarks: over the high one, down to the low one). Untriggered, the report's target
    /// is `trigger`, which the versions are within. One walk of the cache either way.
    pub fn sweep_over(
        &self,
        trigger: u64,
        target: u64,
        protected: &Protected,
        dry_run: bool,
        why: &str,
        stop_seeding: impl FnMut(&PackageName, &Sha256Hash),
    ) -> Result<SweepReport> {
        let versions = self.usage();
        self.sweep_versions(
            versions,
            trigger,
            target,
            protected,
            dry_run,
            why,
            stop_seeding,
        )
    }

    /// The sweep, over `versions` as [`Cache::usage`] listed them.
    #[allow(clippy::too_many_arguments)]
    fn sweep_versions(
        &self,
        versions: Vec<Version>,
        trigger: u64,
        target: u64,
        protected: &Protected,
        dry_run: bool,
        why: &str,
        mut stop_seeding: impl FnMut(&PackageName, &Sha256Hash),
    ) -> Result<SweepReport> {
        let total: u64 = versions.iter().map(|v| v.bytes).sum();
        let mut report = SweepReport {
            bytes_before: total,
            bytes_after: total,
            target,
            evicted: Vec::new(),
            dry_run,
        };
        if total <= trigger {
            report.target = trigger;
            return Ok(report);
        }
        let mut candidates: Vec<Version> = versions
            .into_iter()
            .filter(|v| !v.pinned && !v.in_use && !protected.contains_key(&v.key()))
            .collect();
        // Every candidate in turn, not only those `plan` picks: one pinned or launched since
        // the walk is passed over, and the next stands in for it.
        lru_order(&mut candidates);
        for v in candidates {
            if report.bytes_after <= target {
                break;
            }
            if !dry_run {
                let evicted = self.evict(&v.name, &v.sha256, || stop_seeding(&v.name, &v.sha256));
                match evicted {
                    Ok(true) => {
                        tracing::info!(package = %v.name, sha256 = %v.sha256, bytes = v.bytes, reason = why, "evicted from the cache");
                    }
                    Ok(false) => {
                        tracing::debug!(package = %v.name, sha256 = %v.sha256, "kept: in use or pinned since the sweep began");
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(package = %v.name, sha256 = %v.sha256, error = %e, "cannot evict");
                        continue;
                    }
                }
            }
            report.bytes_after = report.bytes_after.saturating_sub(v.bytes);
            report.evicted.push(Evicted {
                name: v.name,
                sha256: v.sha256,
                bytes: v.bytes,
            });
        }
        Ok(report)
    }

    /// Fail with [`PeerError::NoSpace`] unless a package of `bytes` can fit in `budget` once
    /// every evictable version is gone; otherwise evict just enough that it lands under the
    /// high watermark (or, if it is that big, under the maximum). Nothing is evicted when it
    /// cannot fit.
    pub fn make_room(
        &self,
        budget: &Budget,
        label: &str,
        bytes: u64,
        protected: &Protected,
        stop_seeding: impl FnMut(&PackageName, &Sha256Hash),
    ) -> Result<SweepReport> {
        if bytes > budget.max_bytes {
            return Err(PeerError::NoSpace(format!(
                "{label} is {bytes} bytes, more than the whole cache budget ({} bytes, --cache-max-size)",
                budget.max_bytes
            )));
        }
        let room = budget.max_bytes - bytes;
        // One walk of the cache for both passes: pins and uses are checked again at each
        // eviction anyway.
        let versions = self.usage();
        let dry =
            self.sweep_versions(versions.clone(), room, room, protected, true, "", |_, _| {})?;
        if !dry.reached() {
            return Err(PeerError::NoSpace(format!(
                "{label} needs {bytes} bytes but the cache budget is {} bytes and {} bytes of it are pinned, in use or followed",
                budget.max_bytes, dry.bytes_after
            )));
        }
        let target = budget.high_bytes().checked_sub(bytes).unwrap_or(room);
        self.sweep_versions(
            versions,
            target,
            target,
            protected,
            false,
            &format!("room for {label}"),
            stop_seeding,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::ExtractLimits;
    use crate::cache::Handoff;
    use crate::cache::tests::meta;
    use fbpkg_common::metainfo::Format;
    use std::fs::File;
    use std::time::Duration;

    /// A cache with versions `a`, `b`, `c` of package `app`, 64 KiB each, last used in that
    /// order (a oldest).
    fn three(root: &Path) -> (Cache, PackageName, Vec<Sha256Hash>) {
        let cache = Cache::new(root.join("cache"));
        let name = PackageName::new("app").expect("name");
        let mut shas = Vec::new();
        for (i, tag) in [b'a', b'b', b'c'].into_iter().enumerate() {
            let bytes = vec![tag; 64 << 10];
            let m = meta(&bytes, "app.bin", Format::File);
            let f = root.join(format!("{i}.bin"));
            fs::write(&f, &bytes).expect("write");
            cache
                .install(&name, &m, &f, Handoff::Move, &ExtractLimits::default())
                .expect("install");
            // Installs happen within one second; the use files' mtimes order them.
            drop(cache.hold(&name, &m.sha256).expect("hold"));
            let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + i as u64 * 100);
            File::options()
                .write(true)
                .open(cache.use_path(&name, &m.sha256))
                .and_then(|f| f.set_modified(t))
                .expect("age the use file");
            shas.push(m.sha256);
        }
        (cache, name, shas)
    }

    fn cached(cache: &Cache, name: &PackageName, shas: &[Sha256Hash]) -> Vec<bool> {
        shas.iter()
            .map(|s| cache.lookup(name, s).is_some())
            .collect()
    }

    #[test]
    fn watermarks_are_validated_and_computed_without_overflow() {
        assert!(Budget::new(100, 90, 80).is_ok());
        assert!(Budget::new(100, 80, 80).is_err(), "low must be under high");
        assert!(Budget::new(100, 101, 80).is_err());
        assert!(Budget::new(100, 90, 0).is_err());
        let b = Budget::new(20 << 30, 90, 80).expect("budget");
        assert_eq!(b.high_bytes(), 18 << 30);
        assert_eq!(b.low_bytes(), 16 << 30);
        let huge = Budget::new(u64::MAX, 100, 50).expect("budget");
        assert_eq!(huge.high_bytes(), u64::MAX);
        assert_eq!(parse_percent("90"), Ok(90));
        assert_eq!(parse_percent(" 75% "), Ok(75));
        assert!(parse_percent("0").is_err());
        assert!(parse_percent("101").is_err());
        assert!(parse_percent("ninety").is_err());
    }

    #[test]
    fn the_eviction_order_is_unknown_first_then_oldest() {
        let name = PackageName::new("p").expect("name");
        let v = |n: u8, secs: Option<u64>| Version {
            name: name.clone(),
            sha256: Sha256Hash([n; 32]),
            bytes: 10,
            last_use: secs.map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s)),
            launches: 0,
            pinned: false,
            in_use: false,
        };
        let mut vs = vec![v(1, Some(30)), v(2, Some(10)), v(3, None), v(4, Some(20))];
        lru_order(&mut vs);
        let order: Vec<u8> = vs.iter().map(|v| v.sha256.0[0]).collect();
        assert_eq!(order, [3, 2, 4, 1], "unknown first, then oldest");
    }

    #[test]
    fn a_sweep_evicts_in_lru_order_and_spares_pinned_in_use_and_protected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cache, name, shas) = three(dir.path());
        let sizes: Vec<u64> = cache.usage().iter().map(|v| v.bytes).collect();
        assert!(sizes.iter().all(|&b| b >= 64 << 10), "{sizes:?}");
        let one = sizes[0];
        let total: u64 = sizes.iter().sum();

        // Room for two: the oldest (a) goes, and seeding stops before removal.
        let mut stopped = Vec::new();
        let r = cache
            .sweep(total - 1, &Protected::new(), false, "test", |_, s| {
                stopped.push(*s)
            })
            .expect("sweep");
        assert_eq!(stopped, [shas[0]]);
        assert_eq!(r.evicted.len(), 1);
        assert!(r.reached());
        assert_eq!(cached(&cache, &name, &shas), [false, true, true]);
        assert!(!cache.use_path(&name, &shas[0]).exists());

        // b is pinned, c is held by a running program: nothing can go.
        assert!(cache.pin(&name, &shas[1]).expect("pin"));
        let hold = cache.hold(&name, &shas[2]).expect("hold").expect("cached");
        let r = cache
            .sweep(0, &Protected::new(), false, "test", |_, _| {})
            .expect("sweep");
        assert!(r.evicted.is_empty());
        assert!(!r.reached());
        assert_eq!(cached(&cache, &name, &shas), [false, true, true]);

        // The program exits; a protected version (a followed tag's current) stays too.
        drop(hold);
        let mut p = Protected::new();
        protect(&mut p, (name.clone(), shas[2]), KeepReason::FollowedCurrent);
        let r = cache
            .sweep(0, &p, true, "test", |_, _| {})
            .expect("dry sweep");
        assert!(r.evicted.is_empty(), "{r:?}");
        // Unpinned, b is next; c survives only while protected.
        assert!(cache.unpin(&name, &shas[1]).expect("unpin"));
        let r = cache
            .sweep(one, &p, false, "test", |_, _| {})
            .expect("sweep");
        assert_eq!(r.evicted.len(), 1);
        assert_eq!(cached(&cache, &name, &shas), [false, false, true]);
    }

    /// A version pinned (or launched) between the cache walk and its eviction is passed over,
    /// and the next least recently used goes in its place: the sweep still reaches its
    /// target. Before, it evicted only the versions planned at the walk.
    #[test]
    fn a_version_kept_since_the_walk_gives_its_turn_to_the_next() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cache, name, shas) = three(dir.path());
        let versions = cache.usage();
        let one = versions[0].bytes;
        let total: u64 = versions.iter().map(|v| v.bytes).sum();
        assert!(
            cache.pin(&name, &shas[0]).expect("pin"),
            "pinned after the walk"
        );
        let r = cache
            .sweep_versions(
                versions,
                total - one,
                total - one,
                &Protected::new(),
                false,
                "test",
                |_, _| {},
            )
            .expect("sweep");
        assert!(r.reached(), "{r:?}");
        assert_eq!(cached(&cache, &name, &shas), [true, false, true]);
    }

    #[test]
    fn a_version_claimed_while_held_is_not_evicted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cache, name, shas) = three(dir.path());
        let _hold = cache.hold(&name, &shas[0]).expect("hold").expect("cached");
        assert!(
            !cache
                .evict(&name, &shas[0], || panic!("must not stop seeding"))
                .expect("evict")
        );
        assert!(cache.lookup(&name, &shas[0]).is_some());
    }

    #[test]
    fn make_room_refuses_what_cannot_fit_and_then_touches_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cache, name, shas) = three(dir.path());
        let total: u64 = cache.usage().iter().map(|v| v.bytes).sum();
        let budget = Budget::new(total, 90, 80).expect("budget");
        let err = cache
            .make_room(&budget, "big", total + 1, &Protected::new(), |_, _| {})
            .expect_err("bigger than the budget");
        assert!(matches!(err, PeerError::NoSpace(_)), "{err}");
        // Everything pinned: even a small package cannot make room.
        for s in &shas {
            cache.pin(&name, s).expect("pin");
        }
        let err = cache
            .make_room(&budget, "small", 1000, &Protected::new(), |_, _| {})
            .expect_err("all pinned");
        assert!(matches!(err, PeerError::NoSpace(_)), "{err}");
        assert_eq!(cached(&cache, &name, &shas), [true, true, true]);
        // Unpinned: the oldest goes to make room, just enough for under the high watermark.
        for s in &shas {
            cache.unpin(&name, s).expect("unpin");
        }
        let r = cache
            .make_room(&budget, "small", 1000, &Protected::new(), |_, _| {})
            .expect("room");
        assert_eq!(r.evicted.len(), 1);
        assert_eq!(cached(&cache, &name, &shas), [false, true, true]);
    }
}
