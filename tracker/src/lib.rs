//! The fbpkg-rs tracker: maps package hashes to the hosts that seed them, keeps the package
//! catalog, and shows the fleet on a dashboard.
//!
//! - BitTorrent announce and scrape (BEP 3, 7, 23, 48) for the swarms of published packages
//!   ([`swarm`]: soft state, rebuilt from announces; peers known by id and address, a cap per
//!   address, so no single host can crowd the others out);
//! - the catalog ([`catalog`]: durable, crash-safe) behind a JSON API under `/api/v1`;
//! - fleet rollouts ([`rollout`]: phased, health-gated moves of a tag, driven by host reports);
//! - `/` dashboard, `/metrics` (Prometheus), `/healthz`, `/readyz`;
//! - a connection front with a connection cap and whole-message deadlines (`front.rs`).
//!
//! The service is `app(state) -> Router` plus `run(listener, state, shutdown)`:
//!
//! ```no_run
//! # async fn demo() -> Result<(), fbpkg_tracker::TrackerError> {
//! use fbpkg_tracker::{AppState, Config, bind, run};
//! let config = Config { listen: "127.0.0.1:0".parse().unwrap(), ..Config::default() };
//! let listeners = bind(config.listen, config.threads)?;
//! let state = AppState::open(config)?;
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! run(listeners, state, shutdown).await
//! # }
//! ```

pub mod catalog;
mod config;
mod durable;
mod error;
mod front;
#[doc(hidden)]
pub mod fuzzing;
mod http;
pub mod metrics;
pub mod peer_store;
pub mod postgres;
pub mod rollout;
mod server;
pub mod swarm;
mod tls;

pub use config::{CatalogKind, Config, PeerStoreKind, TrackerArgs, default_data_dir};
pub use error::TrackerError;
pub use http::{AppState, SharedState, app, serve_announce, serve_announce_any};
pub use server::{Embedded, Listeners, bind, run};
