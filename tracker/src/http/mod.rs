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
use crate::config::{CatalogKind, Config};
use crate::metrics::{Metrics, Route};
use crate::peer_store::PeerStore;
use crate::postgres::{Lease, Notice, Pg};
use crate::rollout::{FileStore, Rollouts};
use crate::swarm::Swarms;

pub use announce::{scrape_any, scrape_body, serve_announce, serve_announce_any};

/// Everything a handler can reach.
#[derive(Debug)]
pub struct AppState {
    /// Validated settings.
    pub config: Config,
    /// The durable catalog.
    pub catalog: Catalog,
    /// Rollouts of tags: durable records, live host reports.
    pub rollouts: Rollouts,
    /// Soft swarm state: registrations, and the peers when the store is memory.
    pub swarms: Arc<Swarms>,
    /// Where peers are kept.
    pub peers: PeerStore,
    /// Counters.
    pub metrics: Metrics,
    /// Connection slots of the tracker listener, shared by its serving threads: a connection
    /// that outlives its accept holds one (`config.max_connections` in all).
    pub connections: Arc<tokio::sync::Semaphore>,
    /// PostgreSQL, when the catalog is there.
    pub pg: Option<Arc<Pg>>,
    /// What other replicas changed, taken once by the task that applies it
    /// ([`crate::server::run`]).
    pub notices: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Notice>>>,
    /// With PostgreSQL, the rollout controller runs only while this replica holds the lease.
    pub controller_lease: Option<Lease>,
}

/// The advisory lock key of the rollout controller's lease (any constant; "fbpkctrl").
const CONTROLLER_LEASE: i64 = 0x6662_706b_6374_726c;

impl AppState {
    /// Open the catalog under `config.data_dir` and register a swarm for every version in it.
    pub fn open(config: Config) -> Result<Arc<Self>, crate::TrackerError> {
        let (catalog, rollouts, pg, notices) = match &config.catalog {
            CatalogKind::Files => {
                let catalog = Catalog::open(&config.data_dir)?;
                let rollouts =
                    Rollouts::open(Box::new(FileStore::open(&config.data_dir)?), &catalog)?;
                (catalog, rollouts, None, None)
            }
            CatalogKind::Postgres(url) => {
                let tls = crate::tls::TlsFiles::read(
                    "--catalog",
                    config.catalog_ca.as_deref(),
                    config.catalog_cert.as_deref(),
                    config.catalog_key.as_deref(),
                )?;
                let (pg, notices) = Pg::open(url, &tls, config.catalog_timeout)?;
                let catalog = Catalog::with_store(Box::new(
                    crate::catalog::postgres::PgStore::new(pg.clone()),
                ))?;
                let rollouts = Rollouts::open(
                    Box::new(crate::rollout::store::PgStore::new(pg.clone())),
                    &catalog,
                )?
                .with_sharing();
                (catalog, rollouts, Some(pg), Some(notices))
            }
        };
        let rollouts = rollouts.with_host_timeout(config.rollout_host_timeout);
        let controller_lease = pg.as_ref().map(|pg| pg.lease(CONTROLLER_LEASE));
        let peers = PeerStore::open(&config)?;
        let swarms = Arc::new(Swarms::default());
        let hook = swarms.clone();
        catalog.on_new_version(move |name, v| hook.register_version(name, &v.metainfo));
        for (name, m) in catalog.all_versions() {
            swarms.register_version(&name, &m);
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
            peers,
            metrics: Metrics::default(),
            connections,
            pg,
            notices: std::sync::Mutex::new(notices),
            controller_lease,
        }))
    }

    /// May the rollout controller act from this replica now?
    pub fn runs_controller(&self) -> bool {
        self.controller_lease.as_ref().is_none_or(Lease::held)
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
        // A metainfo is read whole up to `max_body_bytes`, not axum's own 2 MiB (a tree of
        // tens of thousands of files has one past it); other bodies keep axum's default.
        .route(
            "/api/v1/packages/{name}/{selector}",
            get(api::get_version)
                .put(api::publish)
                .layer(axum::extract::DefaultBodyLimit::max(body_limit)),
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
    // A body past the limit, refused before any handler (its Content-Length said so), is
    // answered in the API's words like every other refusal: the CLI shows those.
    let json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if resp.status() == StatusCode::PAYLOAD_TOO_LARGE && !json {
        return body_too_large(&state.config).into_response();
    }
    resp
}

/// axum's limit on a body read whole, which routes other than publishing keep.
const AXUM_BODY_LIMIT: usize = 2 << 20;

/// The refusal of a request body past what the tracker takes.
pub(super) fn body_too_large(config: &Config) -> crate::TrackerError {
    crate::TrackerError::TooLarge(format!(
        "the request body is larger than this tracker takes: a metainfo up to {} bytes, any \
         other body up to {}",
        config.max_body_bytes,
        config.max_body_bytes.min(AXUM_BODY_LIMIT)
    ))
}
