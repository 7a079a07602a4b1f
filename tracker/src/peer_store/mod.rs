//! Where peers are kept: in this process ([`Swarms`](crate::swarm::Swarms), the default), or
//! in Redis ([`RedisStore`]), where tracker replicas share them.
//!
//! What is not peer state stays in each process either way: which info-hashes are published
//! packages (the catalog registers them in `Swarms` at start and on publish), and, with
//! `--allow-unregistered`, which other info-hashes were announced here lately (`Swarms` holds
//! them, without peers, so `--max-swarms`, scrape, metrics and the dashboard know which swarms
//! to ask Redis about: nothing ever lists Redis's keyspace).
//!
//! An enum, not a trait object: the memory store answers synchronously, on the accept path,
//! with no task and no allocation for a future (`front::serve_immediately`, measured in
//! benches/ tracker_bench); only the Redis store needs `async`, and it is served on the
//! connection's task.

pub mod mirror;
mod redis_store;

pub use self::redis_store::{
    Announce, Answer, Counts, Listed, Record, RedisStore, StoreError, Want,
};
use crate::config::{Config, PeerStoreKind};
use crate::error::TrackerError;

/// The peer store a tracker uses.
#[derive(Debug)]
pub enum PeerStore {
    /// `Swarms` in `AppState`.
    Memory,
    /// Redis (boxed: the memory variant is the common one and carries nothing).
    Redis(Box<RedisStore>),
}

impl PeerStore {
    /// The store `config` asks for (Redis is not contacted yet: `/readyz` says when it is
    /// reachable).
    pub fn open(config: &Config) -> Result<Self, TrackerError> {
        match &config.peer_store {
            PeerStoreKind::Memory => Ok(PeerStore::Memory),
            PeerStoreKind::Redis(url) => {
                let tls = crate::tls::TlsFiles::read(
                    "--peer-store",
                    config.peer_store_ca.as_deref(),
                    config.peer_store_cert.as_deref(),
                    config.peer_store_key.as_deref(),
                )?;
                RedisStore::open_with_tls(
                    url,
                    tls,
                    config.peer_store_timeout,
                    config.announce_interval * 2,
                    config.swarm_limits(),
                )
                .map(|r| PeerStore::Redis(Box::new(r)))
                .map_err(|e| TrackerError::Config(format!("--peer-store: {e}")))
            }
        }
    }

    /// The Redis store, when that is the one.
    pub fn redis(&self) -> Option<&RedisStore> {
        match self {
            PeerStore::Memory => None,
            PeerStore::Redis(r) => Some(r.as_ref()),
        }
    }

    /// `memory`, or where Redis is (without credentials).
    pub fn describe(&self) -> &str {
        match self {
            PeerStore::Memory => "memory",
            PeerStore::Redis(r) => r.shown(),
        }
    }
}

/// Milliseconds since the Unix epoch: the clock replicas share for peers' last-seen times.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
