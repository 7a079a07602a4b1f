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
    AnnounceRequest, AnnounceResponse, Event, PeerEntry, PeerFormat, ScrapeRequest, ScrapeResponse,
    ScrapeStats, encode_failure,
};
use tokio::time::Instant;

use super::SharedState;
use crate::metrics::{AnnounceOutcome, AnsweredFrom, WrittenBy};
use crate::peer_store::mirror::{Loaded, Route};
use crate::peer_store::{Announce, RedisStore, Want, wall_ms};
use crate::swarm::{Limits, PeerKey, PeerRecord, Recorded};

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
    let (body, outcome) = serve_announce_any(
        &state,
        remote.ip(),
        query.as_deref().unwrap_or(""),
        Instant::now(),
    )
    .await;
    state.metrics.announce(outcome);
    bencoded(body)
}

/// Serve one announce with whichever peer store the tracker has: [`serve_announce`] for
/// memory, one Redis round trip otherwise.
pub async fn serve_announce_any(
    state: &super::AppState,
    remote: IpAddr,
    query: &str,
    now: Instant,
) -> (Vec<u8>, AnnounceOutcome) {
    match state.peers.redis() {
        None => serve_announce(state, remote, query, now),
        Some(store) => serve_announce_redis(state, store, remote, query).await,
    }
}

/// The failure reason of an announce the peer store could not serve. Clients retry at their
/// next interval; a replica on a working store may answer them sooner.
pub const STORE_UNAVAILABLE: &str = "peer store unavailable, try again";

/// Parse the query and pick the address the peer is recorded under, or the refusal.
fn admit(
    state: &super::AppState,
    remote: IpAddr,
    query: &str,
) -> Result<(AnnounceRequest, IpAddr), (Vec<u8>, AnnounceOutcome)> {
    let req = match AnnounceRequest::parse(query) {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(peer = %remote, error = %e, "announce refused: malformed");
            let mut body = Vec::new();
            encode_failure(&format!("bad announce: {e}"), &mut body);
            return Err((body, AnnounceOutcome::Malformed));
        }
    };
    let remote = remote.to_canonical();
    let ip = match req.ip {
        Some(claimed)
            if state
                .config
                .trusted_networks
                .iter()
                .any(|n| n.contains(&remote)) =>
        {
            claimed.to_canonical()
        }
        _ => remote,
    };
    Ok((req, ip))
}

/// The refusal of an announce for a swarm this tracker does not serve.
fn unknown_swarm(
    config: &crate::Config,
    req: &AnnounceRequest,
    ip: IpAddr,
) -> (Vec<u8>, AnnounceOutcome) {
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
    refused(req, ip, outcome, &reason);
    let mut body = Vec::new();
    encode_failure(&reason, &mut body);
    (body, outcome)
}

/// The refusal for what the store did, if it refused.
fn refusal(
    recorded: Recorded,
    ip: IpAddr,
    config: &crate::Config,
) -> Option<(AnnounceOutcome, String)> {
    match recorded {
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
    }
}

/// Peers to return: none to a peer leaving.
fn numwant(config: &crate::Config, req: &AnnounceRequest) -> usize {
    if req.event == Event::Stopped {
        0
    } else {
        req.numwant
            .unwrap_or(config.default_numwant)
            .min(config.max_numwant) as usize
    }
}

/// The bencoded answer, in the format the request asked for.
fn encode_answer(
    config: &crate::Config,
    req: &AnnounceRequest,
    peers: Vec<PeerEntry>,
    complete: u32,
    incomplete: u32,
) -> Vec<u8> {
    let resp = AnnounceResponse {
        interval: config.interval_secs(),
        min_interval: Some(
            u32::try_from(config.min_announce_interval.as_secs()).unwrap_or(u32::MAX),
        ),
        complete,
        incomplete,
        peers,
        warning: None,
    };
    let format = if req.compact {
        PeerFormat::Compact
    } else {
        PeerFormat::Dict {
            with_peer_id: !req.no_peer_id,
        }
    };
    let mut body = Vec::new();
    resp.encode(format, &mut body);
    body
}

/// Serve one announce from the in-memory store: parse, record the peer, pick peers, encode.
/// `remote` is the connection's address; `ip=` overrides it only from a trusted network.
pub fn serve_announce(
    state: &super::AppState,
    remote: IpAddr,
    query: &str,
    now: Instant,
) -> (Vec<u8>, AnnounceOutcome) {
    let config = &state.config;
    let (req, ip) = match admit(state, remote, query) {
        Ok(a) => a,
        Err(refused) => return refused,
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
        return unknown_swarm(config, &req, ip);
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
    let recorded = swarm.record(record, req.event, &config.swarm_limits());
    if let Some((outcome, reason)) = refusal(recorded, ip, config) {
        drop(swarm);
        return refused(&req, ip, outcome, &reason);
    }
    let numwant = numwant(config, &req);
    let peers = if numwant == 0 {
        Vec::new()
    } else {
        let asker = PeerKey {
            peer_id: req.peer_id,
            ip,
        };
        swarm.sample(&asker, req.left == 0, req.zone.as_ref(), numwant)
    };
    let complete = u32::try_from(swarm.seeders().len()).unwrap_or(u32::MAX);
    let incomplete = u32::try_from(swarm.leechers().len()).unwrap_or(u32::MAX);
    drop(swarm);
    let body = encode_answer(config, &req, peers, complete, incomplete);
    (body, AnnounceOutcome::Ok)
}

/// Serve one announce from Redis: the same checks and answers as [`serve_announce`], the
/// peers shared with the other replicas. Registration is this replica's (its catalog).
async fn serve_announce_redis(
    state: &super::AppState,
    store: &RedisStore,
    remote: IpAddr,
    query: &str,
) -> (Vec<u8>, AnnounceOutcome) {
    let config = &state.config;
    let (req, ip) = match admit(state, remote, query) {
        Ok(a) => a,
        Err(refused) => return refused,
    };
    // The map entry (no peers in it) is how this replica knows which swarms to count for
    // scrape, metrics and the dashboard; the guard is dropped before any await.
    let known = if config.allow_unregistered {
        state
            .swarms
            .get_or_create(req.info_hash, config.max_swarms)
            .is_some()
    } else {
        state
            .swarms
            .get(&req.info_hash)
            .is_some_and(|s| s.package.is_some())
    };
    if !known {
        return unknown_swarm(config, &req, ip);
    }
    let numwant = numwant(config, &req);
    let announce = Announce {
        info_hash: req.info_hash,
        peer_id: req.peer_id,
        addr: SocketAddr::new(ip, req.port),
        event: req.event,
        uploaded: req.uploaded,
        downloaded: req.downloaded,
        left: req.left,
        zone: req.zone.clone(),
        numwant,
    };
    // The answer comes from this replica's copy of the swarm when it has one (mirror.rs); the
    // first announce to a swarm here loads the copy along with its write; while that is on
    // its way, answers are drawn in Redis. With a copy, most announces are written without
    // the script.
    let mirror = store.mirror();
    let h = req.info_hash;
    let now_ms = wall_ms();
    let route = mirror.route(&h, now_ms, store.peer_ttl());
    if route == Route::Plain
        && let Some(served) = serve_plain(state, store, &req, &announce, now_ms).await
    {
        return served;
    }
    let (want, load) = if route != Route::Cold {
        (Want::Nothing, None)
    } else if let Some(claim) = mirror.claim(&h) {
        (Want::All, Some(claim))
    } else if numwant == 0 {
        (Want::Nothing, None)
    } else {
        (Want::Draw, None)
    };
    // A claim not used (an error below, or this future dropped) is given back on drop.
    let answer = match store.announce_wanting(&announce, now_ms, want).await {
        Ok(a) => a,
        Err(e) => return store_failed(&h, ip, &e),
    };
    state.metrics.written_by(WrittenBy::Script);
    // Only a recorded peer's answer carries the swarm (a refusal or a leave does not). This
    // announce's own change reaches the copy as published, in order with everyone's.
    if let Some(claim) = load
        && answer.recorded == Recorded::Present
    {
        let at = Loaded {
            seq: answer.seq,
            oldest_ms: answer.oldest_ms,
            peers: &answer.all,
        };
        claim.loaded(&state.swarms, at, store.peer_ttl());
    } else if route != Route::Cold {
        mirror.scripted(&h, now_ms, answer.oldest_ms);
    }
    if let Some((outcome, reason)) = refusal(answer.recorded, ip, config) {
        return refused(&req, ip, outcome, &reason);
    }
    if numwant > 0 {
        state.metrics.answered_from(match want {
            Want::Draw => AnsweredFrom::Draw,
            Want::All => AnsweredFrom::Load,
            Want::Nothing => AnsweredFrom::Copy,
        });
    }
    let peers = if want == Want::Draw || numwant == 0 {
        answer.peers
    } else {
        from_copy(state, &req, ip, numwant)
    };
    let body = encode_answer(config, &req, peers, answer.complete, answer.incomplete);
    (body, AnnounceOutcome::Ok)
}

/// Serve an announce to a swarm this replica holds a copy of by a plain write
/// ([`RedisStore::write_plain`]): the copy records the peer at once and answers. `None` when
/// the announce needs the script: a stop, a completion, a new role or zone; a join at or over
/// half a limit (the script counts those in Redis: the copy may be milliseconds behind), or
/// to a role the copy holds nobody in (the script gives the role's new set its TTL).
async fn serve_plain(
    state: &super::AppState,
    store: &RedisStore,
    req: &AnnounceRequest,
    announce: &Announce,
    now_ms: u64,
) -> Option<(Vec<u8>, AnnounceOutcome)> {
    if matches!(req.event, Event::Stopped | Event::Completed) {
        return None;
    }
    let config = &state.config;
    let limits = config.swarm_limits();
    let ip = announce.addr.ip();
    let asker = PeerKey {
        peer_id: req.peer_id,
        ip,
    };
    let seeder = req.left == 0;
    let (join, complete, incomplete) = {
        let mut swarm = state.swarms.get(&req.info_hash)?;
        let join = match swarm.peer(&asker) {
            Some(p) if (p.left == 0) == seeder && p.zone == req.zone => false,
            Some(_) => return None,
            None => {
                let under_half = |n: usize, most: usize| (n + 1).saturating_mul(2) <= most;
                let of_role = if seeder {
                    swarm.seeders().len()
                } else {
                    swarm.leechers().len()
                };
                if of_role == 0
                    || !under_half(swarm.from_address(ip), limits.max_per_address)
                    || !under_half(swarm.len(), limits.max_peers)
                {
                    return None;
                }
                true
            }
        };
        let rec = PeerRecord {
            peer_id: req.peer_id,
            addr: announce.addr,
            uploaded: req.uploaded,
            downloaded: req.downloaded,
            left: req.left,
            zone: req.zone.clone(),
            last_seen: Instant::now(),
        };
        swarm.record(rec, Event::None, &Limits::NONE);
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        (
            join,
            count(swarm.seeders().len()),
            count(swarm.leechers().len()),
        )
    };
    // The copy holds a peer Redis may not yet. The write is queued before this future can be
    // dropped (its client gone), and is sent whether or not anyone waits, until its deadline;
    // should it fail, or not be answered in time, the copy goes and is loaded again (here,
    // or in the batcher when nobody waits any more).
    if let Err(e) = store.write_plain(announce, now_ms, join).await {
        store.mirror().forget(&req.info_hash);
        return Some(store_failed(&req.info_hash, ip, &e));
    }
    state.metrics.written_by(WrittenBy::Plain);
    let numwant = announce.numwant;
    let peers = if numwant == 0 {
        Vec::new()
    } else {
        state.metrics.answered_from(AnsweredFrom::Copy);
        from_copy(state, req, ip, numwant)
    };
    let body = encode_answer(config, req, peers, complete, incomplete);
    Some((body, AnnounceOutcome::Ok))
}

/// `numwant` peers for the announcer (recorded under `ip`) from this replica's copy of the
/// swarm, drawn as the embedded store draws them.
fn from_copy(
    state: &super::AppState,
    req: &AnnounceRequest,
    ip: IpAddr,
    numwant: usize,
) -> Vec<PeerEntry> {
    let asker = PeerKey {
        peer_id: req.peer_id,
        ip,
    };
    state.swarms.get(&req.info_hash).map_or_else(Vec::new, |s| {
        s.sample(&asker, req.left == 0, req.zone.as_ref(), numwant)
    })
}

/// The answer to an announce the peer store failed (Redis down, or past its deadline).
fn store_failed(
    h: &fbpkg_common::InfoHash,
    ip: IpAddr,
    e: &crate::peer_store::StoreError,
) -> (Vec<u8>, AnnounceOutcome) {
    tracing::debug!(info_hash = %h, peer = %ip, error = %e, "announce failed: peer store");
    let mut body = Vec::new();
    encode_failure(STORE_UNAVAILABLE, &mut body);
    (body, AnnounceOutcome::StoreUnavailable)
}

/// A refused announce: its log line, and the failure answer.
fn refused(
    req: &AnnounceRequest,
    ip: IpAddr,
    outcome: AnnounceOutcome,
    reason: &str,
) -> (Vec<u8>, AnnounceOutcome) {
    tracing::debug!(
        info_hash = %req.info_hash,
        peer = %ip,
        peer_id = %req.peer_id,
        outcome = outcome.label(),
        reason,
        "announce refused"
    );
    let mut body = Vec::new();
    encode_failure(reason, &mut body);
    (body, outcome)
}

pub(super) async fn scrape(
    State(state): State<SharedState>,
    RawQuery(query): RawQuery,
) -> Response {
    bencoded(scrape_any(&state, query.as_deref().unwrap_or("")).await)
}

/// Serve one scrape with whichever peer store the tracker has.
pub async fn scrape_any(state: &super::AppState, query: &str) -> Vec<u8> {
    let Some(store) = state.peers.redis() else {
        return scrape_body(state, query);
    };
    let mut body = Vec::new();
    let hashes = match scraped_swarms(state, query) {
        Ok(h) => h,
        Err(why) => {
            encode_failure(&why, &mut body);
            return body;
        }
    };
    let counts = match store.counts(&hashes, wall_ms()).await {
        Ok(c) => c,
        Err(_) => {
            encode_failure(STORE_UNAVAILABLE, &mut body);
            return body;
        }
    };
    let mut resp = ScrapeResponse::default();
    for (h, c) in hashes.into_iter().zip(counts) {
        resp.files
            .insert(h, scrape_stats(c.seeders, c.completed, c.leechers));
    }
    resp.encode(&mut body);
    body
}

/// Serve one scrape from the in-memory store: counts for the named swarms, or for all when
/// there are few.
pub fn scrape_body(state: &super::AppState, query: &str) -> Vec<u8> {
    let mut body = Vec::new();
    let hashes = match scraped_swarms(state, query) {
        Ok(h) => h,
        Err(why) => {
            encode_failure(&why, &mut body);
            return body;
        }
    };
    let mut resp = ScrapeResponse::default();
    for h in hashes {
        // A swarm swept since it was listed is left out, as if it had not been.
        if let Some(s) = state.swarms.get(&h) {
            let stats = scrape_stats(
                s.seeders().len() as u64,
                s.completed,
                s.leechers().len() as u64,
            );
            resp.files.insert(h, stats);
        }
    }
    resp.encode(&mut body);
    body
}

/// The swarms one scrape asks about and may see (counted as a scrape): the named ones, or
/// all of them when there are few; `Err` is the failure reason to answer.
fn scraped_swarms(
    state: &super::AppState,
    query: &str,
) -> Result<Vec<fbpkg_common::InfoHash>, String> {
    state.metrics.scrape();
    let req = ScrapeRequest::parse(query).map_err(|e| format!("bad scrape: {e}"))?;
    let visible = |s: &crate::swarm::Swarm| state.config.allow_unregistered || s.package.is_some();
    let mut hashes = Vec::new();
    if req.info_hashes.is_empty() {
        if state.swarms.len() > MAX_FULL_SCRAPE {
            return Err(
                "full scrape is disabled for this many swarms; name info_hash values".into(),
            );
        }
        state.swarms.for_each(|h, s| {
            if visible(s) {
                hashes.push(*h);
            }
        });
    } else {
        hashes.extend(
            req.info_hashes
                .iter()
                .filter(|h| state.swarms.get(h).is_some_and(|s| visible(&s))),
        );
    }
    Ok(hashes)
}

fn scrape_stats(seeders: u64, completed: u64, leechers: u64) -> ScrapeStats {
    let clamp = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
    ScrapeStats {
        complete: clamp(seeders),
        downloaded: clamp(completed),
        incomplete: clamp(leechers),
    }
}
