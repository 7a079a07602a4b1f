//! The catalog API: JSON over HTTP under `/api/v1`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fbpkg_common::api::{PackageDetail, PackageSummary, TagInfo, VersionInfo};
use fbpkg_common::pkgref::{HashPrefix, PackageName, Selector, Tag};
use fbpkg_common::rollout::HostId;
use fbpkg_common::tracker_proto::Zone;
use fbpkg_common::{InfoHash, Sha256Hash};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

use super::SharedState;
use crate::catalog::{Published, Version};
use crate::error::TrackerError;
use crate::rollout::{Asker, wall_ms};

type ApiResult<T> = Result<T, TrackerError>;

fn name(s: &str) -> ApiResult<PackageName> {
    Ok(PackageName::new(s)?)
}

/// Constant-time comparison, so response timing does not leak the token.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(super) fn authorize(state: &SharedState, headers: &HeaderMap) -> ApiResult<()> {
    let Some(token) = &state.config.publish_token else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(g) if same_secret(g.as_bytes(), token.as_bytes()) => Ok(()),
        _ => Err(TrackerError::Unauthorized),
    }
}

pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TrackerError::storage("catalog task", std::io::Error::other(e.to_string())))?
}

pub(super) async fn list_packages(State(state): State<SharedState>) -> Json<Vec<PackageSummary>> {
    Json(state.catalog.summaries())
}

pub(super) async fn package_detail(
    State(state): State<SharedState>,
    Path(pkg): Path<String>,
) -> ApiResult<Json<PackageDetail>> {
    Ok(Json(state.catalog.detail(&name(&pkg)?)?))
}

/// `?host=<id>&zone=<path>` on a resolve: who asks, for per-host answers during a rollout.
#[derive(Debug, Default, Deserialize)]
pub(super) struct HostParams {
    host: Option<String>,
    zone: Option<String>,
}

impl HostParams {
    fn asker(self, remote: SocketAddr) -> ApiResult<Option<Asker>> {
        let Some(host) = self.host else {
            if self.zone.is_some() {
                return Err(TrackerError::BadRequest("zone= needs host=".into()));
            }
            return Ok(None);
        };
        Ok(Some(Asker {
            host: HostId::new(&host)?,
            zone: self.zone.as_deref().map(Zone::new).transpose()?,
            ip: remote.ip(),
        }))
    }
}

fn host_params(
    q: Result<Query<HostParams>, QueryRejection>,
    remote: SocketAddr,
) -> ApiResult<Option<Asker>> {
    q.map_err(|e| TrackerError::BadRequest(e.body_text()))?
        .0
        .asker(remote)
}

/// Resolve `pkg:selector`; a tag asked with `host=` during a rollout resolves per host.
fn resolve(
    state: &SharedState,
    pkg: &str,
    selector: &str,
    asker: Option<Asker>,
) -> ApiResult<(PackageName, Version, Option<Sha256Hash>)> {
    let n = name(pkg)?;
    let sel = Selector::parse(selector)?;
    let per_host = match (&sel, &asker) {
        (Selector::Tag(t), Some(a)) => state.rollouts.resolve_for(&n, t, a),
        (_, Some(a)) => {
            state.rollouts.seen(a);
            None
        }
        _ => None,
    };
    Ok(match per_host {
        Some(h) => (
            n.clone(),
            state.catalog.resolve(&n, &Selector::Hash(h.sha256))?,
            h.prefetch,
        ),
        None => (n.clone(), state.catalog.resolve(&n, &sel)?, None),
    })
}

pub(super) async fn get_version(
    State(state): State<SharedState>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    Path((pkg, selector)): Path<(String, String)>,
    q: Result<Query<HostParams>, QueryRejection>,
) -> ApiResult<Json<VersionInfo>> {
    let (n, v, prefetch) = resolve(&state, &pkg, &selector, host_params(q, remote)?)?;
    let mut info = state.catalog.describe(&n, &v);
    info.prefetch = prefetch;
    Ok(Json(info))
}

pub(super) async fn get_metainfo(
    State(state): State<SharedState>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    Path((pkg, selector)): Path<(String, String)>,
    q: Result<Query<HostParams>, QueryRejection>,
) -> ApiResult<Response> {
    let (n, v, _) = resolve(&state, &pkg, &selector, host_params(q, remote)?)?;
    let disposition = format!("attachment; filename=\"{n}-{}.torrent\"", v.metainfo.sha256);
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-bittorrent".to_owned()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        v.metainfo.as_bytes().to_vec(),
    )
        .into_response())
}

pub(super) async fn publish(
    State(state): State<SharedState>,
    Path((pkg, hash)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<Response> {
    authorize(&state, &headers)?;
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            super::body_too_large(&state.config)
        } else {
            TrackerError::BadRequest(e.body_text())
        }
    })?;
    let n = name(&pkg)?;
    let sha = Sha256Hash::from_hex(&hash).map_err(|e| {
        TrackerError::BadRequest(format!(
            "publish needs the full 64-digit sha256 in the URL: {e}"
        ))
    })?;
    let st = state.clone();
    let n2 = n.clone();
    let (outcome, version) = blocking(move || st.catalog.publish(&n2, &sha, &body)).await?;
    // Its swarm was registered by the catalog, with the version.
    let m = &version.metainfo;
    let status = match outcome {
        Published::Created => {
            state.metrics.publish();
            tracing::info!(package = %n, sha256 = %m.sha256, info_hash = %m.info_hash, size = m.length, "published");
            StatusCode::CREATED
        }
        Published::Unchanged => StatusCode::OK,
    };
    Ok((status, Json(state.catalog.describe(&n, &version))).into_response())
}

pub(super) async fn move_tag(
    State(state): State<SharedState>,
    Path((pkg, tag)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<TagInfo>> {
    authorize(&state, &headers)?;
    let n = name(&pkg)?;
    let t = Tag::new(&tag)?;
    let target = String::from_utf8(body.to_vec())
        .map_err(|_| TrackerError::BadRequest("body is not UTF-8".into()))?;
    let st = state.clone();
    let info = blocking(move || {
        st.rollouts
            .move_tag_plain(&st.catalog, &n, &t, &target, wall_ms())
    })
    .await?;
    tracing::info!(package = %pkg, %tag, sha256 = %info.sha256, "tag moved");
    Ok(Json(info))
}

pub(super) async fn get_tag(
    State(state): State<SharedState>,
    Path((pkg, tag)): Path<(String, String)>,
) -> ApiResult<Json<TagInfo>> {
    let n = name(&pkg)?;
    let t = Tag::new(&tag)?;
    state
        .catalog
        .detail(&n)?
        .tags
        .remove(&t)
        .map(Json)
        .ok_or_else(|| TrackerError::NotFound(format!("{n} has no tag {t}")))
}

pub(super) async fn resolve_any(
    State(state): State<SharedState>,
    Path(prefix): Path<String>,
) -> ApiResult<Json<VersionInfo>> {
    let p = HashPrefix::new(&prefix)?;
    let (n, v) = state.catalog.resolve_any(&p)?;
    Ok(Json(state.catalog.describe(&n, &v)))
}

/// One swarm, as `/api/v1/swarms` and the dashboard show it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SwarmView {
    pub info_hash: InfoHash,
    pub package: Option<String>,
    pub sha256: Option<Sha256Hash>,
    pub size: Option<u64>,
    pub seeders: usize,
    pub leechers: usize,
    pub completed: u64,
    pub peers: Vec<PeerView>,
}

/// One peer of a swarm.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PeerView {
    pub addr: String,
    pub zone: Option<String>,
    pub left: u64,
    /// 0.0 to 1.0 when the package size is known.
    pub progress: Option<f64>,
    pub uploaded: u64,
    pub downloaded: u64,
}

/// How much of a package of `size` bytes a peer missing `left` has.
fn progress(size: Option<u64>, left: u64) -> Option<f64> {
    size.filter(|&s| s > 0)
        .map(|s| 1.0 - (left.min(s) as f64 / s as f64))
}

/// Snapshot of every swarm, registered ones first, then by package name.
pub(crate) fn swarm_views(state: &SharedState, max_peers: usize) -> Vec<SwarmView> {
    let mut out = Vec::new();
    state.swarms.for_each(|h, s| {
        let size = s.package.as_ref().map(|p| p.size);
        let peers = s
            .seeders()
            .iter()
            .chain(s.leechers())
            .take(max_peers)
            .map(|p| PeerView {
                addr: p.addr.to_string(),
                zone: p.zone.as_ref().map(|z| z.to_string()),
                left: p.left,
                progress: progress(size, p.left),
                uploaded: p.uploaded,
                downloaded: p.downloaded,
            })
            .collect();
        out.push(SwarmView {
            info_hash: *h,
            package: s.package.as_ref().map(|p| p.name.to_string()),
            sha256: s.package.as_ref().map(|p| p.sha256),
            size,
            seeders: s.seeders().len(),
            leechers: s.leechers().len(),
            completed: s.completed,
            peers,
        });
    });
    out.sort_by(|a, b| {
        (a.package.is_none(), &a.package, a.info_hash).cmp(&(
            b.package.is_none(),
            &b.package,
            b.info_hash,
        ))
    });
    out
}

/// [`swarm_views`] with the counts and peers from the peer store. While Redis is down the
/// views count and list no peers.
pub(crate) async fn swarm_views_any(state: &SharedState, max_peers: usize) -> Vec<SwarmView> {
    let mut views = swarm_views(state, max_peers);
    let Some(store) = state.peers.redis() else {
        return views;
    };
    let hashes: Vec<InfoHash> = views.iter().map(|v| v.info_hash).collect();
    let now = crate::peer_store::wall_ms();
    if let Ok(counts) = store.counts(&hashes, now).await {
        for (v, c) in views.iter_mut().zip(counts) {
            v.seeders = usize::try_from(c.seeders).unwrap_or(usize::MAX);
            v.leechers = usize::try_from(c.leechers).unwrap_or(usize::MAX);
            v.completed = c.completed;
        }
    }
    if let Ok(lists) = store.list(&hashes, max_peers, now).await {
        for (v, list) in views.iter_mut().zip(lists) {
            let size = v.size;
            v.peers = list
                .into_iter()
                .map(|p| PeerView {
                    addr: p.addr.to_string(),
                    zone: p.zone,
                    left: p.left,
                    progress: progress(size, p.left),
                    uploaded: p.uploaded,
                    downloaded: p.downloaded,
                })
                .collect();
        }
    }
    views
}

pub(super) async fn swarms(State(state): State<SharedState>) -> Json<Vec<SwarmView>> {
    Json(swarm_views_any(&state, 1000).await)
}
