//! Tracker configuration: command-line flags (each also an `FBPKG_*` variable) turned into a
//! validated [`Config`] with documented defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::error::TrackerError;

/// `fbpkg-rs tracker` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct TrackerArgs {
    /// Address to listen on. Listening beyond loopback needs --publish-token (or
    /// --allow-unauthenticated-publish).
    #[arg(long, env = "FBPKG_TRACKER_LISTEN", default_value = "127.0.0.1:6969")]
    pub listen: SocketAddr,

    /// Where the package catalog is kept [default: ~/.local/share/fbpkg-rs/tracker].
    #[arg(long, env = "FBPKG_TRACKER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Bearer token required to publish packages and move tags.
    #[arg(long, env = "FBPKG_PUBLISH_TOKEN", hide_env_values = true)]
    pub publish_token: Option<String>,

    /// Let anyone who can reach a non-loopback listener publish. Only for isolated networks.
    #[arg(long, env = "FBPKG_ALLOW_UNAUTHENTICATED_PUBLISH")]
    pub allow_unauthenticated_publish: bool,

    /// Serve announces for any info-hash, not only published packages (public-tracker use,
    /// benchmarks).
    #[arg(long, env = "FBPKG_ALLOW_UNREGISTERED")]
    pub allow_unregistered: bool,

    /// How often peers are asked to announce.
    #[arg(long, env = "FBPKG_ANNOUNCE_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub announce_interval: Duration,

    /// Advertised as `min interval`: clients should not announce more often than this (sent in
    /// whole seconds: at least 1s).
    #[arg(long, env = "FBPKG_MIN_ANNOUNCE_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub min_announce_interval: Duration,

    /// Most peers returned by one announce, whatever numwant asks.
    #[arg(long, env = "FBPKG_MAX_NUMWANT", default_value_t = 200)]
    pub max_numwant: u32,

    /// Networks whose announces may set `ip=` (comma-separated CIDRs, e.g. 10.0.0.0/8).
    #[arg(long, env = "FBPKG_TRUSTED_NETWORKS", value_delimiter = ',')]
    pub trusted_networks: Vec<IpNet>,

    /// Most peers kept per swarm; announces beyond it get a failure reason.
    #[arg(long, env = "FBPKG_MAX_PEERS_PER_SWARM", default_value_t = 100_000)]
    pub max_peers_per_swarm: usize,

    /// Most peers of one swarm recorded under one IP address (the connection's, or a trusted
    /// `ip=`). Announces beyond it get a failure reason; the peers already there stay. The
    /// default is above any NATed rack, and low enough that one host making up peer ids cannot
    /// push the real peers out of a swarm.
    #[arg(long, env = "FBPKG_MAX_PEERS_PER_ADDRESS", default_value_t = 256)]
    pub max_peers_per_address: usize,

    /// Most swarms kept (matters with --allow-unregistered).
    #[arg(long, env = "FBPKG_MAX_SWARMS", default_value_t = 100_000)]
    pub max_swarms: usize,

    /// Most connections open at once on the tracker's listener. Beyond it a new connection is
    /// closed at once, unless it already holds one whole announce or scrape, which is answered
    /// on the spot (that costs no lasting resource).
    #[arg(long, env = "FBPKG_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// A request head must arrive whole within this time of its first byte (of the connection
    /// being accepted, for the first request), however the bytes trickle in.
    #[arg(long, env = "FBPKG_HEAD_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub head_timeout: Duration,

    /// A response must be written whole within this time, however slowly the client reads.
    #[arg(long, env = "FBPKG_WRITE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub write_timeout: Duration,

    /// A keep-alive connection waiting for its next request is closed after this long.
    #[arg(long, env = "FBPKG_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// Longest time any request may take before it is answered 408.
    #[arg(long, env = "FBPKG_REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// How often the rollout controller checks the phase gates (it also checks on every
    /// report); a halt or a phase change lands within one tick of its cause.
    #[arg(long, env = "FBPKG_ROLLOUT_TICK", default_value = "250ms", value_parser = humantime::parse_duration)]
    pub rollout_tick: Duration,

    /// How long a host in a rollout's current phase that resolved the tag but has not
    /// reported yet holds the phase (it is downloading, or will switch at its next follow
    /// interval); a host silent longer is taken for gone. Make it longer than the agents'
    /// --follow-interval and than a download takes.
    #[arg(long, env = "FBPKG_ROLLOUT_HOST_TIMEOUT", default_value = "2m", value_parser = humantime::parse_duration)]
    pub rollout_host_timeout: Duration,

    /// Serving threads, each with its own listening socket (0 = one per core).
    #[arg(long, env = "FBPKG_TRACKER_THREADS", default_value_t = 0)]
    pub threads: usize,

    /// Seconds between dashboard refreshes.
    #[arg(long, env = "FBPKG_DASHBOARD_REFRESH", default_value_t = 5)]
    pub dashboard_refresh_secs: u32,

    /// Where peers are kept: `memory` (this process), or `redis://HOST:PORT/DB`, shared by
    /// every replica pointed at it, so agents announcing to different replicas find each other.
    /// Published packages stay in each replica's catalog (--data-dir).
    #[arg(
        long,
        env = "FBPKG_TRACKER_PEER_STORE",
        default_value = "memory",
        hide_env_values = true
    )]
    pub peer_store: String,

    /// For `rediss://` (Redis over TLS): a PEM file of the certificate authorities to trust
    /// for the server's certificate, instead of the system's (a private CA, a managed Redis's
    /// own). The server's name or IP must be in its certificate.
    #[arg(long, env = "FBPKG_TRACKER_PEER_STORE_CA", value_name = "PEM")]
    pub peer_store_ca: Option<PathBuf>,

    /// For `rediss://` to a Redis that asks clients for a certificate (`tls-auth-clients`):
    /// this replica's certificate (PEM; the chain, leaf first). Needs --peer-store-key.
    #[arg(long, env = "FBPKG_TRACKER_PEER_STORE_CERT", value_name = "PEM")]
    pub peer_store_cert: Option<PathBuf>,

    /// The private key (PEM) of --peer-store-cert.
    #[arg(long, env = "FBPKG_TRACKER_PEER_STORE_KEY", value_name = "PEM")]
    pub peer_store_key: Option<PathBuf>,

    /// With Redis: do not keep copies of the swarms (answers are then drawn in Redis on every
    /// announce, about half the announces/s). A way back should the copies misbehave, or while
    /// replicas of versions that publish changes differently run side by side.
    #[arg(long, env = "FBPKG_TRACKER_NO_PEER_COPIES")]
    pub no_peer_copies: bool,

    /// Deadline of every peer-store call: past it the announce gets a failure reason ("peer
    /// store unavailable") rather than waiting.
    #[arg(long, env = "FBPKG_TRACKER_PEER_STORE_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub peer_store_timeout: Duration,

    /// Where the catalog, tags and rollouts are kept: `files` (under --data-dir, this process
    /// only), or `postgres://USER:PASSWORD@HOST:PORT/DB`, shared by every replica pointed at
    /// it: a publish, tag move or rollout step on one is seen by all at once. The schema is
    /// created or upgraded at start. Reads are served from memory either way.
    #[arg(
        long,
        env = "FBPKG_TRACKER_CATALOG",
        default_value = "files",
        hide_env_values = true
    )]
    pub catalog: String,

    /// For a catalog URL with `sslmode=require` (PostgreSQL over TLS; `disable` and the
    /// default `prefer` do not use TLS): a PEM file of the certificate authorities to trust
    /// for the server's certificate, instead of the system's. The host in the URL must be in
    /// the server's certificate.
    #[arg(long, env = "FBPKG_TRACKER_CATALOG_CA", value_name = "PEM")]
    pub catalog_ca: Option<PathBuf>,

    /// For `sslmode=require` to a PostgreSQL that asks clients for a certificate (`hostssl ...
    /// clientcert=verify-ca` or the `cert` method in pg_hba.conf): this replica's certificate
    /// (PEM; the chain, leaf first). Needs --catalog-key.
    #[arg(long, env = "FBPKG_TRACKER_CATALOG_CERT", value_name = "PEM")]
    pub catalog_cert: Option<PathBuf>,

    /// The private key (PEM) of --catalog-cert.
    #[arg(long, env = "FBPKG_TRACKER_CATALOG_KEY", value_name = "PEM")]
    pub catalog_key: Option<PathBuf>,

    /// Deadline of every catalog database call: past it a write answers 503 (reads are served
    /// from memory and never wait).
    #[arg(long, env = "FBPKG_TRACKER_CATALOG_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub catalog_timeout: Duration,
}

/// Where the catalog, tags and rollouts are kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CatalogKind {
    /// Files under the data directory.
    #[default]
    Files,
    /// PostgreSQL at this URL (may hold a password).
    Postgres(String),
}

impl CatalogKind {
    /// `files` or a `postgres://` URL.
    pub fn parse(s: &str) -> Result<Self, TrackerError> {
        if s == "files" {
            return Ok(Self::Files);
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            crate::postgres::parse_url(s)?;
            return Ok(Self::Postgres(s.to_owned()));
        }
        Err(TrackerError::Config(
            "--catalog must be `files` or `postgres://USER:PASSWORD@HOST:PORT/DB`".into(),
        ))
    }
}

/// Where peers are kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PeerStoreKind {
    /// In this process.
    #[default]
    Memory,
    /// Redis at this URL (`redis://HOST:PORT/DB`, `rediss://` over TLS; may hold a password).
    Redis(String),
}

impl PeerStoreKind {
    /// `memory` or a `redis://` URL.
    pub fn parse(s: &str) -> Result<Self, TrackerError> {
        if s == "memory" {
            return Ok(Self::Memory);
        }
        if s.starts_with("redis://") || s.starts_with("rediss://") || s.starts_with("redis+unix://")
        {
            redis::Client::open(s).map_err(|e| {
                TrackerError::Config(format!("--peer-store: not a usable Redis URL: {e}"))
            })?;
            return Ok(Self::Redis(s.to_owned()));
        }
        Err(TrackerError::Config(
            "--peer-store must be `memory` or `redis://HOST:PORT/DB`".into(),
        ))
    }
}

/// Validated tracker settings. `Config::default()` is what the flags default to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    /// Listen address (default 127.0.0.1:6969).
    pub listen: SocketAddr,
    /// Catalog directory.
    pub data_dir: PathBuf,
    /// Token for publishing; `None` means publishing is open (loopback only, unless allowed).
    #[serde(skip_serializing)]
    pub publish_token: Option<String>,
    /// Serve unknown info-hashes (default false).
    pub allow_unregistered: bool,
    /// Regular announce interval (default 60 s).
    #[serde(with = "humantime_serde_compat")]
    pub announce_interval: Duration,
    /// Minimum announce interval (default 5 s).
    #[serde(with = "humantime_serde_compat")]
    pub min_announce_interval: Duration,
    /// Peers returned by default (50) and at most (200).
    pub default_numwant: u32,
    /// Cap on numwant.
    pub max_numwant: u32,
    /// Networks allowed to set `ip=`.
    pub trusted_networks: Vec<IpNet>,
    /// Peers per swarm (default 100,000).
    pub max_peers_per_swarm: usize,
    /// Peers of one swarm under one IP address (default 256).
    pub max_peers_per_address: usize,
    /// Swarms (default 100,000).
    pub max_swarms: usize,
    /// Connections open at once on the tracker listener (default 10,000).
    pub max_connections: usize,
    /// Whole request head deadline (default 10 s).
    #[serde(with = "humantime_serde_compat")]
    pub head_timeout: Duration,
    /// Whole response write deadline (default 10 s).
    #[serde(with = "humantime_serde_compat")]
    pub write_timeout: Duration,
    /// Keep-alive idle limit (default 60 s).
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
    /// Request timeout (default 30 s).
    #[serde(with = "humantime_serde_compat")]
    pub request_timeout: Duration,
    /// Rollout gate period (default 250 ms).
    #[serde(with = "humantime_serde_compat")]
    pub rollout_tick: Duration,
    /// How long a resolved, silent host holds its rollout phase (default 2 min).
    #[serde(with = "humantime_serde_compat")]
    pub rollout_host_timeout: Duration,
    /// Longest request line query accepted (default 4 KiB).
    pub max_query_len: usize,
    /// Largest request body: a metainfo file (default 8 MiB).
    pub max_body_bytes: usize,
    /// Dashboard auto-refresh period in seconds (default 5).
    pub dashboard_refresh_secs: u32,
    /// Serving threads (default 0: one per core).
    pub threads: usize,
    /// Where peers are kept (default memory). Not serialized: the URL may hold a password.
    #[serde(skip)]
    pub peer_store: PeerStoreKind,
    /// Certificate authorities (PEM file) trusted for `rediss://`, instead of the system's.
    #[serde(default)]
    pub peer_store_ca: Option<PathBuf>,
    /// Client certificate (PEM) shown to a Redis that asks for one.
    #[serde(default)]
    pub peer_store_cert: Option<PathBuf>,
    /// Private key (PEM) of `peer_store_cert`.
    #[serde(default)]
    pub peer_store_key: Option<PathBuf>,
    /// With Redis: answer every announce by a draw in Redis, keeping no copies of swarms.
    #[serde(default)]
    pub no_peer_copies: bool,
    /// Deadline of every peer-store call (default 1 s).
    #[serde(with = "humantime_serde_compat")]
    pub peer_store_timeout: Duration,
    /// Where the catalog is kept (default files). Not serialized: the URL may hold a password.
    #[serde(skip)]
    pub catalog: CatalogKind,
    /// Certificate authorities (PEM file) trusted for a catalog URL with `sslmode=require`.
    #[serde(default)]
    pub catalog_ca: Option<PathBuf>,
    /// Client certificate (PEM) shown to a PostgreSQL that asks for one.
    #[serde(default)]
    pub catalog_cert: Option<PathBuf>,
    /// Private key (PEM) of `catalog_cert`.
    #[serde(default)]
    pub catalog_key: Option<PathBuf>,
    /// Deadline of every catalog database call (default 2 s).
    #[serde(with = "humantime_serde_compat")]
    pub catalog_timeout: Duration,
}

mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

/// Per-user default catalog location.
pub fn default_data_dir() -> PathBuf {
    dirs::data_local_dir()
        .map(|d| d.join("fbpkg-rs").join("tracker"))
        .unwrap_or_else(|| PathBuf::from("fbpkg-tracker-data"))
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 6969)),
            data_dir: default_data_dir(),
            publish_token: None,
            allow_unregistered: false,
            announce_interval: Duration::from_secs(60),
            min_announce_interval: Duration::from_secs(5),
            default_numwant: fbpkg_common::tracker_proto::DEFAULT_NUMWANT,
            max_numwant: 200,
            trusted_networks: Vec::new(),
            max_peers_per_swarm: 100_000,
            max_peers_per_address: 256,
            max_swarms: 100_000,
            max_connections: 10_000,
            head_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
            rollout_tick: Duration::from_millis(250),
            rollout_host_timeout: crate::rollout::DEFAULT_HOST_TIMEOUT,
            max_query_len: 4096,
            max_body_bytes: 8 << 20,
            dashboard_refresh_secs: 5,
            threads: 0,
            peer_store: PeerStoreKind::Memory,
            peer_store_ca: None,
            peer_store_cert: None,
            peer_store_key: None,
            no_peer_copies: false,
            peer_store_timeout: Duration::from_secs(1),
            catalog: CatalogKind::Files,
            catalog_ca: None,
            catalog_cert: None,
            catalog_key: None,
            catalog_timeout: Duration::from_secs(2),
        }
    }
}

impl TrackerArgs {
    /// Turn flags into a validated config.
    pub fn into_config(self) -> Result<Config, TrackerError> {
        let config = Config {
            listen: self.listen,
            data_dir: self.data_dir.unwrap_or_else(default_data_dir),
            publish_token: self.publish_token.filter(|t| !t.is_empty()),
            allow_unregistered: self.allow_unregistered,
            announce_interval: self.announce_interval,
            min_announce_interval: self.min_announce_interval,
            max_numwant: self.max_numwant,
            trusted_networks: self.trusted_networks,
            max_peers_per_swarm: self.max_peers_per_swarm,
            max_peers_per_address: self.max_peers_per_address,
            max_swarms: self.max_swarms,
            max_connections: self.max_connections,
            head_timeout: self.head_timeout,
            write_timeout: self.write_timeout,
            idle_timeout: self.idle_timeout,
            request_timeout: self.request_timeout,
            rollout_tick: self.rollout_tick,
            rollout_host_timeout: self.rollout_host_timeout,
            dashboard_refresh_secs: self.dashboard_refresh_secs,
            threads: self.threads,
            peer_store: PeerStoreKind::parse(&self.peer_store)?,
            peer_store_ca: self.peer_store_ca,
            peer_store_cert: self.peer_store_cert,
            peer_store_key: self.peer_store_key,
            no_peer_copies: self.no_peer_copies,
            peer_store_timeout: self.peer_store_timeout,
            catalog: CatalogKind::parse(&self.catalog)?,
            catalog_ca: self.catalog_ca,
            catalog_cert: self.catalog_cert,
            catalog_key: self.catalog_key,
            catalog_timeout: self.catalog_timeout,
            ..Config::default()
        };
        config.validate(self.allow_unauthenticated_publish)?;
        Ok(config)
    }
}

impl Config {
    /// Check the settings make sense together. `allow_open_publish` is the operator's explicit
    /// consent to an unauthenticated catalog on a non-loopback address.
    pub fn validate(&self, allow_open_publish: bool) -> Result<(), TrackerError> {
        let bad = |msg: String| Err(TrackerError::Config(msg));
        if !self.listen.ip().is_loopback() && self.publish_token.is_none() && !allow_open_publish {
            return bad(format!(
                "refusing to listen on {} without a publish token: anyone who can reach it could \
                 publish packages. Set --publish-token (FBPKG_PUBLISH_TOKEN), or pass \
                 --allow-unauthenticated-publish on an isolated network",
                self.listen
            ));
        }
        if self.announce_interval < Duration::from_secs(1) {
            return bad("--announce-interval must be at least 1s".into());
        }
        // Sent in whole seconds: under a second would tell every client `min interval 0`,
        // and a client short of peers would announce back to back.
        if self.min_announce_interval < Duration::from_secs(1) {
            return bad("--min-announce-interval must be at least 1s".into());
        }
        if self.min_announce_interval > self.announce_interval {
            return bad("--min-announce-interval cannot exceed --announce-interval".into());
        }
        if self.max_numwant == 0 {
            return bad("--max-numwant must be at least 1".into());
        }
        if self.rollout_tick < Duration::from_millis(1) {
            return bad("--rollout-tick must be at least 1ms".into());
        }
        if self.max_peers_per_swarm == 0 || self.max_swarms == 0 || self.max_peers_per_address == 0
        {
            return bad(
                "--max-peers-per-swarm, --max-peers-per-address and --max-swarms must be at least 1"
                    .into(),
            );
        }
        if !(1..=tokio::sync::Semaphore::MAX_PERMITS).contains(&self.max_connections) {
            return bad(format!(
                "--max-connections must be between 1 and {}",
                tokio::sync::Semaphore::MAX_PERMITS
            ));
        }
        for (flag, d) in [
            ("--head-timeout", self.head_timeout),
            ("--write-timeout", self.write_timeout),
            ("--idle-timeout", self.idle_timeout),
        ] {
            if d.is_zero() {
                return bad(format!("{flag} must be more than 0"));
            }
        }
        let rediss =
            matches!(&self.peer_store, PeerStoreKind::Redis(u) if u.starts_with("rediss://"));
        for (flag, given) in [
            ("--peer-store-ca", self.peer_store_ca.is_some()),
            ("--peer-store-cert", self.peer_store_cert.is_some()),
            ("--peer-store-key", self.peer_store_key.is_some()),
        ] {
            if given && !rediss {
                return bad(format!(
                    "{flag} is for a rediss:// --peer-store (Redis over TLS)"
                ));
            }
        }
        for (flag, given) in [
            ("--catalog-ca", self.catalog_ca.is_some()),
            ("--catalog-cert", self.catalog_cert.is_some()),
            ("--catalog-key", self.catalog_key.is_some()),
        ] {
            if given && matches!(self.catalog, CatalogKind::Files) {
                return bad(format!(
                    "{flag} is for a postgres:// --catalog with sslmode=require"
                ));
            }
        }
        for (cert, key, store) in [
            (&self.peer_store_cert, &self.peer_store_key, "--peer-store"),
            (&self.catalog_cert, &self.catalog_key, "--catalog"),
        ] {
            if cert.is_some() != key.is_some() {
                return bad(format!(
                    "{store}-cert and {store}-key go together: a client certificate and its key"
                ));
            }
        }
        if self.peer_store_timeout.is_zero() {
            return bad("--peer-store-timeout must be more than 0".into());
        }
        if self.catalog_timeout.is_zero() {
            return bad("--catalog-timeout must be more than 0".into());
        }
        if self.dashboard_refresh_secs == 0 {
            return bad("--dashboard-refresh must be at least 1".into());
        }
        Ok(())
    }

    /// The caps applied to a peer joining a swarm.
    pub fn swarm_limits(&self) -> crate::swarm::Limits {
        crate::swarm::Limits {
            max_peers: self.max_peers_per_swarm,
            max_per_address: self.max_peers_per_address,
        }
    }

    /// The announce interval in whole seconds, as written into responses.
    pub fn interval_secs(&self) -> u32 {
        u32::try_from(self.announce_interval.as_secs()).unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_store_is_memory_or_a_redis_url() {
        assert_eq!(
            PeerStoreKind::parse("memory").ok(),
            Some(PeerStoreKind::Memory)
        );
        let url = "redis://127.0.0.1:6379/2";
        assert_eq!(
            PeerStoreKind::parse(url).ok(),
            Some(PeerStoreKind::Redis(url.to_owned()))
        );
        for bad in [
            "",
            "Memory",
            "postgres://x",
            "redis://127.0.0.1:6379/notadb",
        ] {
            let e = PeerStoreKind::parse(bad).expect_err(bad).to_string();
            assert!(e.contains("--peer-store"), "{bad}: {e}");
        }
    }

    #[test]
    fn client_certificates_need_their_key_and_a_tls_store() {
        let tls = Config {
            peer_store: PeerStoreKind::Redis("rediss://127.0.0.1:6380/0".into()),
            catalog: CatalogKind::Postgres("postgres://u@127.0.0.1/db?sslmode=require".into()),
            peer_store_cert: Some("c.pem".into()),
            peer_store_key: Some("k.pem".into()),
            catalog_cert: Some("c.pem".into()),
            catalog_key: Some("k.pem".into()),
            ..Config::default()
        };
        assert!(tls.validate(false).is_ok());
        let refused = |c: Config| c.validate(false).expect_err("refused").to_string();
        let e = refused(Config {
            peer_store_key: None,
            ..tls.clone()
        });
        assert!(
            e.contains("--peer-store-cert and --peer-store-key go together"),
            "{e}"
        );
        let e = refused(Config {
            catalog_cert: None,
            ..tls.clone()
        });
        assert!(
            e.contains("--catalog-cert and --catalog-key go together"),
            "{e}"
        );
        let e = refused(Config {
            peer_store: PeerStoreKind::Redis("redis://127.0.0.1:6379/0".into()),
            ..tls.clone()
        });
        assert!(e.contains("--peer-store-cert is for a rediss://"), "{e}");
        let e = refused(Config {
            catalog: CatalogKind::Files,
            ..tls
        });
        assert!(e.contains("--catalog-cert is for a postgres://"), "{e}");
    }

    #[test]
    fn announce_intervals_are_whole_seconds_the_min_within_the_regular() {
        let refused = |c: Config| c.validate(false).expect_err("refused").to_string();
        assert!(Config::default().validate(false).is_ok());
        let e = refused(Config {
            min_announce_interval: Duration::from_millis(500),
            ..Config::default()
        });
        assert!(
            e.contains("--min-announce-interval must be at least 1s"),
            "{e}"
        );
        let e = refused(Config {
            announce_interval: Duration::from_millis(999),
            ..Config::default()
        });
        assert!(e.contains("--announce-interval must be at least 1s"), "{e}");
        let e = refused(Config {
            min_announce_interval: Duration::from_secs(61),
            ..Config::default()
        });
        assert!(e.contains("cannot exceed --announce-interval"), "{e}");
    }

    #[test]
    fn catalog_is_files_or_a_postgres_url() {
        assert_eq!(CatalogKind::parse("files").ok(), Some(CatalogKind::Files));
        let url = "postgres://fbpkg:secret@127.0.0.1:5432/fbpkg";
        assert_eq!(
            CatalogKind::parse(url).ok(),
            Some(CatalogKind::Postgres(url.to_owned()))
        );
        for bad in ["", "Files", "redis://x", "postgres://h:notaport/db"] {
            let e = CatalogKind::parse(bad).expect_err(bad).to_string();
            assert!(e.contains("--catalog"), "{bad}: {e}");
        }
    }
}
