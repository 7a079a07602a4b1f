//! The rollout API: start, watch and steer rollouts; hosts' reports.
//!
//! ```text
//! POST /api/v1/rollouts                               RolloutRequest -> Rollout (201)     token
//! GET  /api/v1/rollouts                               active rollouts, with progress
//! GET  /api/v1/rollouts/{name}/{tag}                  RolloutStatus: current + history
//! POST /api/v1/rollouts/{name}/{tag}/pause|resume|abort  -> Rollout                    token
//! POST /api/v1/reports                                Report -> ReportAck (host id + address)
//! ```

use std::net::SocketAddr;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use fbpkg_common::api::{Report, ReportAck, Rollout, RolloutRequest, RolloutStatus, RolloutView};
use fbpkg_common::pkgref::{PackageName, Tag};
use serde::de::DeserializeOwned;

use super::SharedState;

use super::api::{authorize, blocking};
use crate::error::TrackerError;
use crate::rollout::{Action, wall_ms};

type ApiResult<T> = Result<T, TrackerError>;

/// How long a report from a host this replica has not seen waits for the replica it resolved
/// through to share its address (replicas see each other's writes within a second).
const HOST_ADDR_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// JSON bodies parsed here rather than by axum's extractor, so a bad body gets the API's own
/// error JSON with serde's precise message.
fn json<T: DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body)
        .map_err(|e| TrackerError::BadRequest(format!("bad JSON body: {e}")))
}

pub(super) async fn start(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Rollout>)> {
    authorize(&state, &headers)?;
    let req: RolloutRequest = json(&body)?;
    let st = state.clone();
    let r = blocking(move || st.rollouts.start(&st.catalog, req, wall_ms())).await?;
    tracing::info!(package = %r.name, tag = %r.tag, id = r.id, to = %r.to, phases = r.phases.len(), "rollout started");
    Ok((StatusCode::CREATED, Json(r)))
}

pub(super) async fn list(State(state): State<SharedState>) -> Json<Vec<RolloutView>> {
    Json(state.rollouts.active())
}

pub(super) async fn status(
    State(state): State<SharedState>,
    Path((pkg, tag)): Path<(String, String)>,
) -> ApiResult<Json<RolloutStatus>> {
    let (n, t) = (PackageName::new(&pkg)?, Tag::new(&tag)?);
    if let Some(s) = state.rollouts.status(&n, &t) {
        return Ok(Json(s));
    }
    // A tag moved before rollouts existed has no record yet: an empty history, not a 404.
    state
        .catalog
        .detail(&n)?
        .tags
        .get(&t)
        .ok_or_else(|| TrackerError::NotFound(format!("{n} has no tag {t}")))?;
    Ok(Json(RolloutStatus {
        current: None,
        history: Vec::new(),
    }))
}

pub(super) async fn control(
    State(state): State<SharedState>,
    Path((pkg, tag, action)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> ApiResult<Json<Rollout>> {
    authorize(&state, &headers)?;
    let action = match action.as_str() {
        "pause" => Action::Pause,
        "resume" => Action::Resume,
        "abort" => Action::Abort,
        other => {
            return Err(TrackerError::NotFound(format!(
                "no rollout action {other:?}: pause, resume or abort"
            )));
        }
    };
    let (n, t) = (PackageName::new(&pkg)?, Tag::new(&tag)?);
    let st = state.clone();
    let r = blocking(move || st.rollouts.control(&st.catalog, &n, &t, action, wall_ms())).await?;
    tracing::info!(package = %r.name, tag = %r.tag, id = r.id, ?action, "rollout steered");
    Ok(Json(r))
}

/// Keep the last `max` bytes of `s` (the end of a command's output is what explains it).
fn tail(s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_owned()
}

pub(super) async fn report(
    State(state): State<SharedState>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> ApiResult<Json<ReportAck>> {
    let mut rep: Report = json(&body)?;
    rep.detail = rep.detail.map(|d| tail(d, Report::MAX_DETAIL));
    tracing::debug!(package = %rep.name, sha256 = %rep.hash, host = %rep.host, peer = %remote, state = ?rep.state, "report");
    // With replicas, the host may have resolved through another one, which pushes the
    // host's address a moment after its first resolve: a report that follows that resolve at
    // once may arrive first, so look again for up to a second before refusing.
    if let Some(pg) = &state.pg
        && !state.rollouts.knows_host(&rep.host)
    {
        let give_up = tokio::time::Instant::now() + HOST_ADDR_WAIT;
        loop {
            let (pg, host) = (pg.clone(), rep.host.clone());
            let found = blocking(move || crate::rollout::shared::host_addr(&pg, &host)).await;
            if let Ok(Some(ip)) = found {
                state.rollouts.learn_host(rep.host.clone(), ip);
                break;
            }
            if tokio::time::Instant::now() >= give_up {
                break;
            }
            tokio::time::sleep(HOST_ADDR_WAIT / 4).await;
        }
    }
    Ok(Json(state.rollouts.report(rep, remote.ip())?))
}
