//! `/metrics`, `/healthz`, `/readyz`.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::SharedState;
use crate::metrics::{Gauges, render_rollouts};

pub(super) async fn metrics(State(state): State<SharedState>) -> Response {
    let stats = state.catalog.stats();
    let mut g = Gauges {
        swarms: state.swarms.len() as u64,
        packages: stats.packages as u64,
        versions: stats.versions as u64,
        catalog_bytes: stats.bytes,
        connections: state.open_connections() as u64,
        ..Gauges::default()
    };
    state.swarms.for_each(|_, s| {
        g.seeders += s.seeders().len() as u64;
        g.leechers += s.leechers().len() as u64;
    });
    let mut body = state.metrics.render(&g);
    render_rollouts(&mut body, &state.rollouts.active());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// Alive: the process answers.
pub(super) async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready: the catalog directory is still there and writable.
pub(super) async fn readyz(State(state): State<SharedState>) -> Response {
    let dir = state.config.data_dir.join("catalog");
    match tokio::fs::metadata(&dir).await {
        Ok(m) if m.is_dir() && !m.permissions().readonly() => {
            (StatusCode::OK, "ready\n").into_response()
        }
        Ok(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "catalog directory is not writable\n",
        )
            .into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("catalog directory: {e}\n"),
        )
            .into_response(),
    }
}
