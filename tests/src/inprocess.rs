//! The pieces of an in-process swarm, as `fbpkg-rs demo` runs one: an embedded tracker and
//! engines on loopback, each with its own cache and work directory, and a seed serving a
//! package from its cache.
//!
//! Everything binds 127.0.0.1:0 and reads the port back, so scenarios run side by side.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fbpkg_common::metainfo::Metainfo;
use fbpkg_common::pkgref::PackageName;
use fbpkg_peer::cache::{Cache, Handoff};
use fbpkg_peer::engine::{Engine, EngineConfig, Torrent};
use fbpkg_peer::tracker_client::TrackerClient;
use fbpkg_tracker::{Config, Embedded};
use tokio_util::sync::CancellationToken;

/// Longest one request of an engine to the tracker may take.
const TRACKER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest an embedded tracker may take to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A tracker serving on 127.0.0.1:0 in this process over the catalog in `data_dir`, with the
/// default configuration changed by `tweak`. Cancel its `shutdown` token to stop it.
///
/// Panics when it cannot start.
pub async fn embedded_tracker(data_dir: &Path, tweak: impl FnOnce(&mut Config)) -> Embedded {
    let mut config = Config {
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        data_dir: data_dir.to_owned(),
        ..Config::default()
    };
    tweak(&mut config);
    Embedded::start(config, CancellationToken::new())
        .await
        .unwrap_or_else(|e| panic!("starting the embedded tracker: {e}"))
}

/// Stop `tracker` and wait for it to finish; `Err` says why it did not stop cleanly within
/// 10 s (scenarios that only clean up ignore it).
pub async fn stop_tracker(tracker: Embedded) -> Result<(), String> {
    tracker.shutdown.cancel();
    match tokio::time::timeout(STOP_TIMEOUT, tracker.task).await {
        Err(_) => Err(format!("the tracker did not stop within {STOP_TIMEOUT:?}")),
        Ok(Err(e)) => Err(format!("the tracker's task failed: {e}")),
        Ok(Ok(Err(e))) => Err(format!("the tracker stopped with an error: {e}")),
        Ok(Ok(Ok(()))) => Ok(()),
    }
}

/// An engine on 127.0.0.1:0 announcing to `tracker_url`, with its cache in `dir/cache` and its
/// partial downloads in `dir/work`, the default configuration changed by `tweak`, stopped by
/// (a child of) `cancel`.
///
/// Panics when it cannot start.
pub async fn engine(
    dir: &Path,
    tracker_url: &str,
    cancel: &CancellationToken,
    tweak: impl FnOnce(&mut EngineConfig),
) -> Arc<Engine> {
    let mut config = EngineConfig {
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        ..EngineConfig::new(dir.join("work"))
    };
    tweak(&mut config);
    let tracker = TrackerClient::new(tracker_url, None, TRACKER_TIMEOUT)
        .unwrap_or_else(|e| panic!("tracker client for {tracker_url}: {e}"));
    Engine::start(
        config,
        tracker,
        Cache::new(dir.join("cache")),
        cancel.child_token(),
    )
    .await
    .unwrap_or_else(|e| panic!("starting an engine in {}: {e}", dir.display()))
}

/// Make `seed` seed the package `bytes` from its cache, as an agent seeds what it published:
/// the bytes are written to `scratch/<file name>`, installed (copied) into the seed's cache and
/// seeded from the cache entry. Publishing it to the tracker is left to the caller.
///
/// Panics when any step fails.
pub fn seed_from_cache(
    seed: &Engine,
    name: &PackageName,
    meta: &Arc<Metainfo>,
    bytes: &[u8],
    scratch: &Path,
) -> Arc<Torrent> {
    let original = scratch.join(&meta.name);
    std::fs::write(&original, bytes)
        .unwrap_or_else(|e| panic!("writing {}: {e}", original.display()));
    let entry = seed
        .cache()
        .install(name, meta, &original, Handoff::Copy, &Default::default())
        .unwrap_or_else(|e| panic!("installing {name} into the seed's cache: {e}"));
    seed.seed(name.clone(), meta.clone(), &entry.dir)
        .unwrap_or_else(|e| panic!("seeding {name}: {e}"))
}

/// The start of most in-process swarm scenarios: an embedded tracker that lets clients
/// re-announce every second, and a random package of `size` bytes announced to it (not
/// published yet: the engine that seeds it publishes it with its own client).
pub struct Staged {
    /// Holds every directory of the scenario; removed on drop.
    pub dirs: tempfile::TempDir,
    /// The tracker.
    pub tracker: Embedded,
    /// Its base URL, for engines.
    pub url: String,
    /// Parent of every engine's token.
    pub cancel: CancellationToken,
    /// The package's name.
    pub name: PackageName,
    /// The package's bytes.
    pub bytes: Arc<Vec<u8>>,
    /// Its metainfo.
    pub meta: Arc<Metainfo>,
}

impl std::fmt::Debug for Staged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staged")
            .field("dir", &self.dirs.path())
            .field("url", &self.url)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Staged {
    /// A tracker under `<tmp>/tracker` and a package `name` (file `<name>.bin`).
    pub async fn new(name: &str, size: usize) -> Self {
        let dirs = tempfile::tempdir().expect("a temporary directory");
        let tracker = embedded_tracker(&dirs.path().join("tracker"), |c| {
            c.min_announce_interval = Duration::from_secs(1);
        })
        .await;
        let url = format!("http://{}", tracker.addr);
        let (bytes, meta) = crate::random_package(
            &mut rand::rng(),
            size,
            &format!("{name}.bin"),
            &tracker.announce_url(),
        );
        Self {
            dirs,
            tracker,
            url,
            cancel: CancellationToken::new(),
            name: PackageName::new(name).expect("a valid package name"),
            bytes: Arc::new(bytes),
            meta: Arc::new(meta),
        }
    }

    /// The scenario's directory.
    pub fn base(&self) -> &Path {
        self.dirs.path()
    }
}
