//! `GET /announce` and `GET /scrape` (BEP 3, 7, 23, 48).
//!
//! BitTorrent clients expect 200 with a bencoded body even when the tracker refuses, so every
//! refusal is a `failure reason`, never a 4xx; each is counted by outcome and logged at debug
//! (one line per request: an attacker's flood must not flood the logs at the default level).

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use fbpkg_common::tracker_proto::{
    AnnounceRequest, AnnounceResponse, Event, PeerFormat, ScrapeRequest, ScrapeResponse,
    ScrapeStats, encode_failure,
};
use tokio::time::Instant;

use super::SharedState;
use crate::metrics::AnnounceOutcome;
use crate::swarm::{PeerKey, PeerRecord, Recorded};

/// Full scrapes (no info_hash) are answered only up to this many swarms.
const MAX_FULL_SCRAPE: usize = 1000;

fn bencoded(body: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain")], body).into_response()
}

pub(super) async fn announce(
    State(state): State<SharedState>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    RawQuery(query): RawQuery,
) -> Response {
    let (body, outcome) = serve_announce(
        &state,
        remote.ip(),
        query.as_deref().unwrap_or(""),
        Instant::now(),
    );
    state.metrics.announce(outcome);
    bencoded(body)
}

/// Serve one announce: parse, record the peer, pick peers, encode. `remote` is the
/// connection's address; `ip=` overrides it only from a trusted network.
pub fn serve_announce(
    state: &super::AppState,
    remote: IpAddr,
    query: &str,
    now: Instant,
) -> (Vec<u8>, AnnounceOutcome) {
    let mut body = Vec::new();
    let config = &state.config;
    let req = match AnnounceRequest::parse(query) {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(peer = %remote, error = %e, "announce refused: malformed");
            encode_failure(&format!("bad announce: {e}"), &mut body);
            return (body, AnnounceOutcome::Malformed);
        }
    };
    let remote = remote.to_canonical();
    let ip = match req.ip {
        Some(claimed) if config.trusted_networks.iter().any(|n| n.contains(&remote)) => {
            claimed.to_canonical()
        }
        _ => remote,
    };
    let swarm = if config.allow_unregistered {
        state.swarms.get_or_create(req.info_hash, config.max_swarms)
    } else {
        state
            .swarms
            .get(&req.info_hash)
            .filter(|s| s.package.is_some())
    };
    let Some(mut swarm) = swarm else {
        let (reason, outcome) = if config.allow_unregistered {
            (
                "tracker is at its swarm limit; try again later".to_owned(),
                AnnounceOutcome::Full,
            )
        } else {
            (
                format!(
                    "unregistered torrent: info-hash {} is not a published package",
                    req.info_hash
                ),
                AnnounceOutcome::Unregistered,
            )
        };
        refused(&req, ip, outcome, &reason);
        encode_failure(&reason, &mut body);
        return (body, outcome);
    };
    let record = PeerRecord {
        peer_id: req.peer_id,
        addr: SocketAddr::new(ip, req.port),
        uploaded: req.uploaded,
        downloaded: req.downloaded,
        left: req.left,
        zone: req.zone.clone(),
        last_seen: now,
    };
    let refusal = match swarm.record(record, req.event, &config.swarm_limits()) {
        Recorded::Present | Recorded::Removed => None,
        Recorded::Full => Some((
            AnnounceOutcome::Full,
            "swarm is full; try again later".to_owned(),
        )),
        Recorded::AddressFull => Some((
            AnnounceOutcome::AddressLimit,
            format!(
                "too many peers from {ip} in this swarm (at most {}); the ones already here \
                 stay, new ones are refused until some leave",
                config.max_peers_per_address
            ),
        )),
    };
    if let Some((outcome, reason)) = refusal {
        drop(swarm);
        refused(&req, ip, outcome, &reason);
        encode_failure(&reason, &mut body);
        return (body, outcome);
    }
    let numwant = if req.event == Event::Stopped {
        0
    } else {
        req.numwant
            .unwrap_or(config.default_numwant)
            .min(config.max_numwant) as usize
    };
    let peers = if numwant == 0 {
        Vec::new()
    } else {
        let asker = PeerKey {
            peer_id: req.peer_id,
            ip,
        };
        swarm.sample(&asker, req.left == 0, req.zone.as_ref(), numwant)
    };
    let resp = AnnounceResponse {
        interval: config.interval_secs(),
        min_interval: Some(
            u32::try_from(config.min_announce_interval.as_secs()).unwrap_or(u32::MAX),
        ),
        complete: u32::try_from(swarm.seeders().len()).unwrap_or(u32::MAX),
        incomplete: u32::try_from(swarm.leechers().len()).unwrap_or(u32::MAX),
        peers,
        warning: None,
    };
    drop(swarm);
    let format = if req.compact {
        PeerFormat::Compact
    } else {
        PeerFormat::Dict {
            with_peer_id: !req.no_peer_id,
        }
    };
    resp.encode(format, &mut body);
    (body, AnnounceOutcome::Ok)
}

/// The log line of a refused announce.
fn refused(req: &AnnounceRequest, ip: IpAddr, outcome: AnnounceOutcome, reason: &str) {
    tracing::debug!(
        info_hash = %req.info_hash,
        peer = %ip,
        peer_id = %req.peer_id,
        outcome = outcome.label(),
        reason,
        "announce refused"
    );
}

pub(super) async fn scrape(
    State(state): State<SharedState>,
    RawQuery(query): RawQuery,
) -> Response {
    bencoded(scrape_body(&state, query.as_deref().unwrap_or("")))
}

/// Serve one scrape: counts for the named swarms, or for all when there are few.
pub fn scrape_body(state: &super::AppState, query: &str) -> Vec<u8> {
    state.metrics.scrape();
    let mut body = Vec::new();
    let req = match ScrapeRequest::parse(query) {
        Ok(r) => r,
        Err(e) => {
            encode_failure(&format!("bad scrape: {e}"), &mut body);
            return body;
        }
    };
    let visible = |s: &crate::swarm::Swarm| state.config.allow_unregistered || s.package.is_some();
    let stats = |s: &crate::swarm::Swarm| ScrapeStats {
        complete: u32::try_from(s.seeders().len()).unwrap_or(u32::MAX),
        downloaded: u32::try_from(s.completed).unwrap_or(u32::MAX),
        incomplete: u32::try_from(s.leechers().len()).unwrap_or(u32::MAX),
    };
    let mut resp = ScrapeResponse::default();
    if req.info_hashes.is_empty() {
        if state.swarms.len() > MAX_FULL_SCRAPE {
            encode_failure(
                "full scrape is disabled for this many swarms; name info_hash values",
                &mut body,
            );
            return body;
        }
        state.swarms.for_each(|h, s| {
            if visible(s) {
                resp.files.insert(*h, stats(s));
            }
        });
    } else {
        for h in &req.info_hashes {
            if let Some(s) = state.swarms.get(h).filter(|s| visible(s)) {
                resp.files.insert(*h, stats(&s));
            }
        }
    }
    resp.encode(&mut body);
    body
}
