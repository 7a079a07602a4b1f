//! The agent's side of the cache budget (`agent --cache-max-size`): when to sweep, what it
//! knows must stay, and the cache metrics.
//!
//! ```text
//! every --cache-sweep-interval, and after each install:
//!     versions' bytes > high watermark?  -> sweep down to the low watermark
//! before a download (the size is in the metainfo):
//!     cannot fit even with every evictable version gone -> fail `no_space`, evict nothing
//!     else evict just enough that it lands under the high watermark
//! `fbpkg-rs cache gc` (control op `gc`):  sweep down to the low watermark now
//! ```
//!
//! On top of what the cache itself spares (pinned, in use), the agent protects what only it
//! knows: each followed tag's current resolution for this host and the version it last
//! activated (during a rollout these are the rollout's to and from versions on this host),
//! downloads in progress, and the version whose install triggered the sweep. Sweeps run one
//! at a time, on the blocking pool; each eviction stops the torrent first, so the tracker
//! hears `stopped` for it at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use fbpkg_common::Sha256Hash;
use fbpkg_common::metainfo::Metainfo;
use fbpkg_common::pkgref::PackageName;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::Agent;
use super::follow::FollowStatus;
use crate::cache::budget::{VersionKey, protect};
use crate::cache::{Budget, Cache, KeepReason, Protected, SweepReport};
use crate::engine::{Engine, TorrentStatus};
use crate::error::{PeerError, Result};

/// Longest `--cache-sweep-interval`: a budget checked less often than hourly is no budget.
pub const MAX_SWEEP_INTERVAL: Duration = Duration::from_secs(3600);

/// The budget and the eviction counters of one agent.
#[derive(Debug)]
pub struct CacheLife {
    /// `--cache-max-size` and its watermarks; `None`: the cache grows without bound.
    pub budget: Option<Budget>,
    /// `--cache-sweep-interval`.
    pub sweep_every: Duration,
    evictions: AtomicU64,
    evicted_bytes: AtomicU64,
    /// The last sweep could not get under the low watermark: said once, not every sweep.
    stuck: AtomicBool,
    /// One sweep at a time: two would pick the same versions.
    sweeping: tokio::sync::Mutex<()>,
}

impl CacheLife {
    /// A budget (or none) checked every `sweep_every`.
    pub fn new(budget: Option<Budget>, sweep_every: Duration) -> Self {
        Self {
            budget,
            sweep_every,
            evictions: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
            stuck: AtomicBool::new(false),
            sweeping: tokio::sync::Mutex::new(()),
        }
    }
}

impl Default for CacheLife {
    fn default() -> Self {
        Self::new(None, Duration::from_secs(60))
    }
}

/// What must stay, from what the agent's follows and torrents say: each followed tag's
/// current resolution and last activation, and every download in progress. `cache ls` asks
/// the agent for the same two lists and shows the same reasons.
pub fn protected_from(
    follows: &[FollowStatus],
    torrents: &[TorrentStatus],
    just_installed: Option<&VersionKey>,
) -> Protected {
    let mut p = Protected::new();
    for f in follows {
        let Some(name) = f
            .reference
            .split_once(':')
            .and_then(|(n, _)| PackageName::new(n).ok())
        else {
            continue;
        };
        if let Some(s) = f.resolved {
            protect(&mut p, (name.clone(), s), KeepReason::FollowedCurrent);
        }
        if let Some(s) = f.activated {
            protect(&mut p, (name.clone(), s), KeepReason::FollowedActive);
        }
        // Set only while a rollout may still send the host back (see `FollowStatus`):
        // afterwards it would cost a budget sized for two versions its room for the next.
        if let Some(s) = f.previous {
            protect(&mut p, (name.clone(), s), KeepReason::FollowedPrevious);
        }
        if let Some(s) = f.next {
            protect(&mut p, (name.clone(), s), KeepReason::FollowedNext);
        }
    }
    for t in torrents {
        if matches!(t.phase.as_str(), "downloading" | "verifying")
            && let (Ok(n), Ok(s)) = (PackageName::new(&t.name), Sha256Hash::from_hex(&t.sha256))
        {
            protect(&mut p, (n, s), KeepReason::Installing);
        }
    }
    if let Some(k) = just_installed {
        protect(&mut p, k.clone(), KeepReason::JustInstalled);
    }
    p
}

/// Stop seeding `name:sha` now (the torrent's cancellation sends the tracker `stopped`).
fn stop_seeding(engine: &Engine, name: &PackageName, sha: &Sha256Hash) {
    if let Some(t) = engine.find(name, sha) {
        engine.remove(&t.meta.info_hash);
    }
}

impl Agent {
    /// What this agent knows must stay, besides pins and programs in use.
    pub fn protected(&self, just_installed: Option<&VersionKey>) -> Protected {
        protected_from(
            &self.follows.status(),
            &self.engine.status(),
            just_installed,
        )
    }

    /// Run one sweep (or make room for a download) on the blocking pool, one at a time.
    async fn sweep_with<F>(&self, just_installed: Option<VersionKey>, f: F) -> Result<SweepReport>
    where
        F: FnOnce(
                &Cache,
                &Protected,
                &mut dyn FnMut(&PackageName, &Sha256Hash),
            ) -> Result<SweepReport>
            + Send
            + 'static,
    {
        let _one = self.cache_life.sweeping.lock().await;
        let protected = self.protected(just_installed.as_ref());
        let engine = self.engine.clone();
        let report = tokio::task::spawn_blocking(move || {
            let cache = engine.cache().clone();
            f(&cache, &protected, &mut |n, s| stop_seeding(&engine, n, s))
        })
        .await
        .map_err(|e| PeerError::Agent(format!("sweep task: {e}")))??;
        if !report.dry_run {
            self.cache_life
                .evictions
                .fetch_add(report.evicted.len() as u64, Relaxed);
            self.cache_life
                .evicted_bytes
                .fetch_add(report.evicted.iter().map(|e| e.bytes).sum(), Relaxed);
        }
        Ok(report)
    }

    /// Over the high watermark: evict down to the low one.
    async fn sweep_if_over(&self, just_installed: Option<VersionKey>) {
        let Some(budget) = self.cache_life.budget else {
            return;
        };
        let r = self
            .sweep_with(just_installed, move |cache, protected, stop| {
                cache.sweep_over(
                    budget.high_bytes(),
                    budget.low_bytes(),
                    protected,
                    false,
                    "over the high watermark",
                    stop,
                )
            })
            .await;
        match r {
            Ok(r) if !r.reached() => {
                // Once when it starts, not every sweep: it lasts until a pin, a program or a
                // follow lets go.
                if !self.cache_life.stuck.swap(true, Relaxed) {
                    tracing::warn!(
                        bytes = r.bytes_after,
                        target = r.target,
                        max = budget.max_bytes,
                        "cache over its low watermark and nothing more may be evicted (pinned, in use or followed)"
                    );
                }
            }
            Ok(r) => {
                if self.cache_life.stuck.swap(false, Relaxed) {
                    tracing::info!(bytes = r.bytes_after, "cache back within its budget");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cache sweep failed"),
        }
    }

    /// Before downloading `meta`: refuse it if it cannot fit the budget even after eviction,
    /// else evict what it needs.
    pub(super) async fn make_room(&self, name: &PackageName, meta: &Metainfo) -> Result<()> {
        let Some(budget) = self.cache_life.budget else {
            return Ok(());
        };
        let label = format!("{name}:{}", meta.sha256);
        // What the entry will hold: a tree's padding is never written.
        let bytes = meta.stored_bytes();
        self.sweep_with(None, move |cache, protected, stop| {
            cache.make_room(&budget, &label, bytes, protected, stop)
        })
        .await
        .map(drop)
    }

    /// `fbpkg-rs cache gc`: down to the low watermark of `max_size` (default: the agent's
    /// budget) now.
    pub(super) async fn gc(&self, dry_run: bool, max_size: Option<u64>) -> Result<SweepReport> {
        let budget = match (max_size, self.cache_life.budget) {
            (Some(m), Some(b)) => Budget { max_bytes: m, ..b },
            (Some(m), None) => Budget::new(
                m,
                crate::cache::budget::DEFAULT_HIGH_PCT,
                crate::cache::budget::DEFAULT_LOW_PCT,
            )
            .map_err(PeerError::BadInput)?,
            (None, Some(b)) => b,
            (None, None) => {
                return Err(PeerError::BadInput(
                    "this agent has no cache budget: give `cache gc --max-size SIZE`, or start the agent with --cache-max-size".into(),
                ));
            }
        };
        self.sweep_with(None, move |cache, protected, stop| {
            cache.sweep(budget.low_bytes(), protected, dry_run, "gc", stop)
        })
        .await
    }

    /// The cache metrics in Prometheus text format.
    pub(super) async fn cache_metrics(&self) -> String {
        let cache = self.engine.cache().clone();
        let counters = (
            self.cache_life.evictions.load(Relaxed),
            self.cache_life.evicted_bytes.load(Relaxed),
        );
        let budget = self.cache_life.budget;
        tokio::task::spawn_blocking(move || metrics_text(&cache, budget, Some(counters)))
            .await
            .unwrap_or_default()
    }
}

/// Sweep every `sweep_every` and after each install, until `shutdown`.
pub async fn sweep_loop(agent: Arc<Agent>, shutdown: CancellationToken) {
    if agent.cache_life.budget.is_none() {
        return;
    }
    let mut installs = agent.engine.installs();
    let mut tick = tokio::time::interval(agent.cache_life.sweep_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let just = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => None,
            i = installs.recv() => match i {
                Ok(k) => Some(k),
                Err(RecvError::Lagged(_)) => None,
                Err(RecvError::Closed) => return,
            },
        };
        agent.sweep_if_over(just).await;
    }
}

/// The cache metrics as Prometheus text: gauges read from the cache, and the eviction
/// counters (`evictions`, bytes) when an agent keeps them.
pub fn metrics_text(
    cache: &Cache,
    budget: Option<Budget>,
    evictions: Option<(u64, u64)>,
) -> String {
    use std::fmt::Write as _;
    let versions = cache.usage();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    metric(
        "fbpkg_cache_bytes",
        "gauge",
        "Bytes on disk of the versions in the launcher cache.",
        versions.iter().map(|v| v.bytes).sum(),
    );
    metric(
        "fbpkg_cache_versions",
        "gauge",
        "Versions in the launcher cache.",
        versions.len() as u64,
    );
    metric(
        "fbpkg_cache_pins",
        "gauge",
        "Pinned versions (cached or not).",
        cache.pins().len() as u64,
    );
    metric(
        "fbpkg_cache_in_use_versions",
        "gauge",
        "Versions a running program was launched from.",
        versions.iter().filter(|v| v.in_use).count() as u64,
    );
    metric(
        "fbpkg_cache_launches",
        "gauge",
        "Launches recorded for the versions in the cache (an evicted version's launches leave with it).",
        versions.iter().map(|v| v.launches).sum(),
    );
    if let Some(b) = budget {
        metric(
            "fbpkg_cache_max_bytes",
            "gauge",
            "The cache budget, --cache-max-size.",
            b.max_bytes,
        );
        metric(
            "fbpkg_cache_high_watermark_bytes",
            "gauge",
            "A sweep starts past this many bytes.",
            b.high_bytes(),
        );
    }
    if let Some((n, bytes)) = evictions {
        metric(
            "fbpkg_cache_evictions_total",
            "counter",
            "Versions evicted since the agent started.",
            n,
        );
        metric(
            "fbpkg_cache_evicted_bytes_total",
            "counter",
            "Bytes evicted since the agent started.",
            bytes,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// During a rollout the versions a host moves between stay: where the tag resolves, the
    /// one it runs, the one it ran before (an abort goes back to it: after the switch it is
    /// neither of the others), and the one it fetches ahead of its phase.
    #[test]
    fn a_followed_tags_versions_are_protected() {
        let (cur, old) = (Sha256Hash([1; 32]), Sha256Hash([2; 32]));
        let (before, next) = (Sha256Hash([4; 32]), Sha256Hash([5; 32]));
        let follow = FollowStatus {
            reference: "app:prod".into(),
            resolved: Some(cur),
            activated: Some(old),
            previous: Some(before),
            next: Some(next),
            state: None,
            detail: None,
            resolves: 1,
            pending_reports: 0,
            error: None,
        };
        let name = PackageName::new("app").expect("name");
        let just = (name.clone(), Sha256Hash([3; 32]));
        let p = protected_from(&[follow], &[], Some(&just));
        assert_eq!(
            p.get(&(name.clone(), cur)),
            Some(&vec![KeepReason::FollowedCurrent])
        );
        assert_eq!(
            p.get(&(name.clone(), old)),
            Some(&vec![KeepReason::FollowedActive])
        );
        assert_eq!(
            p.get(&(name.clone(), before)),
            Some(&vec![KeepReason::FollowedPrevious])
        );
        assert_eq!(
            p.get(&(name.clone(), next)),
            Some(&vec![KeepReason::FollowedNext])
        );
        assert_eq!(p.get(&just), Some(&vec![KeepReason::JustInstalled]));
        assert_eq!(p.len(), 5);
    }

    #[test]
    fn metrics_are_prometheus_text() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::new(dir.path());
        let name = PackageName::new("app").expect("name");
        cache.pin(&name, &Sha256Hash([1; 32])).expect("pin");
        let text = metrics_text(
            &cache,
            Some(Budget::new(1000, 90, 80).expect("budget")),
            Some((3, 4096)),
        );
        for line in [
            "fbpkg_cache_bytes 0",
            "fbpkg_cache_versions 0",
            "fbpkg_cache_pins 1",
            "fbpkg_cache_launches 0",
            "fbpkg_cache_max_bytes 1000",
            "fbpkg_cache_high_watermark_bytes 900",
            "# TYPE fbpkg_cache_evictions_total counter",
            "fbpkg_cache_evictions_total 3",
            "fbpkg_cache_evicted_bytes_total 4096",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
        let bare = metrics_text(&cache, None, None);
        assert!(!bare.contains("evictions"), "{bare}");
    }
}
