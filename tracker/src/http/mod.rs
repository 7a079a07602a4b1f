//! The tracker's HTTP surface: `app(state) -> Router`. Handlers extract, call one function of
//! the domain modules, and encode.

mod announce;
mod api;
mod dashboard;
mod ops;
mod rollouts;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;

use crate::catalog::Catalog;
use crate::config::Config;
use crate::metrics::{Metrics, Route};
use crate::rollout::{FileStore, Rollouts};
use crate::swarm::{PackageLabel, Swarms};

pub use announce::{scrape_body, serve_announce};

/// Everything a handler can reach.
#[derive(Debug)]
pub struct AppState {
    /// Validated settings.
    pub config: Config,
    /// The durable catalog.
    pub catalog: Catalog,
    /// Rollouts of tags: durable records, live host reports.
    pub rollouts: Rollouts,
    /// Soft swarm state.
    pub swarms: Swarms,
    /// Counters.
    pub metrics: Metrics,
    /// Connection slots of the tracker listener, shared by its serving threads: a connection
    /// that outlives its accept holds one (`config.max_connections` in all).
    pub connections: Arc<tokio::sync::Semaphore>,
}

impl AppState {
    /// Open the catalog under `config.data_dir` and register a swarm for every version in it.
    pub fn open(config: Config) -> Result<Arc<Self>, crate::TrackerError> {
        let catalog = Catalog::open(&config.data_dir)?;
        let rollouts = Rollouts::open(Box::new(FileStore::open(&config.data_dir)?), &catalog)?
            .with_host_timeout(config.rollout_host_timeout);
        let swarms = Swarms::default();
        for (name, m) in catalog.all_versions() {
            swarms.register(
                m.info_hash,
                PackageLabel {
                    name,
                    sha256: m.sha256,
                    size: m.length,
                },
            );
        }
        // `validate` keeps the cap within what a semaphore holds; an unvalidated config is
        // clamped rather than allowed to panic here.
        let cap = config
            .max_connections
            .min(tokio::sync::Semaphore::MAX_PERMITS);
        let connections = Arc::new(tokio::sync::Semaphore::new(cap));
        Ok(Arc::new(Self {
            config,
            catalog,
            rollouts,
            swarms,
            metrics: Metrics::default(),
            connections,
        }))
    }

    /// Connections holding a slot now.
    pub fn open_connections(&self) -> usize {
        self.config
            .max_connections
            .min(tokio::sync::Semaphore::MAX_PERMITS)
            .saturating_sub(self.connections.available_permits())
    }
}

/// Shared state handle.
pub type SharedState = Arc<AppState>;

/// The whole router.
pub fn app(state: SharedState) -> Router {
    let timeout = state.config.request_timeout;
    let body_limit = state.config.max_body_bytes;
    Router::new()
        .route("/announce", get(announce::announce))
        .route("/scrape", get(announce::scrape))
        .route("/", get(dashboard::dashboard))
        .route("/metrics", get(ops::metrics))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/api/v1/packages", get(api::list_packages))
        .route("/api/v1/packages/{name}", get(api::package_detail))
        .route(
            "/api/v1/packages/{name}/{selector}",
            get(api::get_version).put(api::publish),
        )
        .route(
            "/api/v1/packages/{name}/{selector}/metainfo",
            get(api::get_metainfo),
        )
        .route(
            "/api/v1/packages/{name}/tags/{tag}",
            put(api::move_tag).get(api::get_tag),
        )
        .route("/api/v1/resolve/{prefix}", get(api::resolve_any))
        .route("/api/v1/swarms", get(api::swarms))
        .route(
            "/api/v1/rollouts",
            get(rollouts::list).post(rollouts::start),
        )
        .route("/api/v1/rollouts/{name}/{tag}", get(rollouts::status))
        .route(
            "/api/v1/rollouts/{name}/{tag}/{action}",
            post(rollouts::control),
        )
        .route("/api/v1/reports", post(rollouts::report))
        .layer(RequestBodyLimitLayer::new(body_limit))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            guard_and_measure,
        ))
        .with_state(state)
}

/// Refuse over-long queries before any handler parses them, and time every request.
async fn guard_and_measure(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = Route::of(req.uri().path());
    let too_long = req
        .uri()
        .query()
        .is_some_and(|q| q.len() > state.config.max_query_len);
    let resp = if too_long {
        (
            StatusCode::URI_TOO_LONG,
            format!("query longer than {} bytes\n", state.config.max_query_len),
        )
            .into_response()
    } else {
        next.run(req).await
    };
    state.metrics.observe(route, started.elapsed());
    resp
}
