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
    if let Some(store) = state.peers.redis() {
        let m = store.mirror();
        g.copies = Some((m.is_subscribed(), m.len() as u64));
        let mut hashes = Vec::new();
        state.swarms.for_each(|h, _| hashes.push(*h));
        // While Redis is down the peer gauges read 0; `/readyz` and the
        // `store_unavailable` announce outcome say why.
        if let Ok(counts) = store.counts(&hashes, crate::peer_store::wall_ms()).await {
            for c in counts {
                g.seeders += c.seeders;
                g.leechers += c.leechers;
            }
        }
    } else {
        state.swarms.for_each(|_, s| {
            g.seeders += s.seeders().len() as u64;
            g.leechers += s.leechers().len() as u64;
        });
    }
    let mut body = state.metrics.render(&g);
    render_rollouts(&mut body, &state.rollouts.active());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// Alive: the process answers.
pub(super) async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready: the peer store answers, and the catalog is usable. The body names both stores and
/// what is wrong.
///
/// A catalog database that does not answer leaves the replica ready (200, "degraded"): it
/// still serves every read and announce from memory, and only writes fail (503). Taking every
/// replica out of its load balancer because the database is down would stop the reads too.
/// A catalog directory that is not writable, or a peer store that does not answer, is 503.
pub(super) async fn readyz(State(state): State<SharedState>) -> Response {
    let mut problems = Vec::new();
    if let Some(store) = state.peers.redis()
        && let Err(e) = store.ping().await
    {
        problems.push(format!("peer store {} not ready: {e}", store.shown()));
    }
    let catalog = state.catalog.store().describe();
    let mut degraded = None;
    match &state.pg {
        Some(pg) => {
            if let Err(e) = pg.ping().await {
                degraded = Some(format!(
                    "degraded: catalog {catalog} unavailable ({e}); reads are served from \
                     memory, publishes, tag moves and rollout changes answer 503"
                ));
            }
        }
        None => {
            if let Err(e) = state.catalog.store().check() {
                problems.push(format!("catalog {catalog} not ready: {e}"));
            }
        }
    }
    if !problems.is_empty() {
        return (StatusCode::SERVICE_UNAVAILABLE, problems.join("\n") + "\n").into_response();
    }
    let mut body = format!(
        "ready\npeer store: {}\ncatalog: {catalog}\n",
        state.peers.describe()
    );
    if let Some(d) = degraded {
        body.push_str(&d);
        body.push('\n');
    }
    (StatusCode::OK, body).into_response()
}
