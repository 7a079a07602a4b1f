//! Announcing one torrent to the tracker: `started`, periodic, `completed`, `stopped`.
//!
//! When the tracker cannot be reached the announcer backs off (1 s doubling, jittered) and
//! the torrent keeps swapping with the peers it already knows. A download that knows nobody
//! yet backs off to [`STARVED_BACKOFF`] at most: in a fleet-wide flash crowd the first
//! announces are the ones most likely to be lost, and a host that waited a minute after a
//! dropped SYN would finish a minute after everyone else.

use std::sync::Arc;
use std::time::Duration;

use fbpkg_common::tracker_proto::{AnnounceRequest, Event};

use super::torrent::{Phase, Torrent};
use crate::PeerError;

/// First retry after a failed announce; doubles up to `max_announce_backoff`. Short, because
/// the commonest failure is a version seeded a moment before the tracker lists it (publish).
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between announce retries while a download has no peer at all.
const STARVED_BACKOFF: Duration = Duration::from_secs(4);
/// Ask for more peers early when fewer than this are connected and the download is not done.
const FEW_PEERS: usize = 3;

fn request(t: &Torrent, event: Event) -> AnnounceRequest {
    let cfg = &t.ctx.config;
    AnnounceRequest {
        info_hash: t.meta.info_hash,
        peer_id: t.ctx.peer_id,
        port: t.ctx.listen_addr.port(),
        uploaded: t.uploaded(),
        downloaded: t.downloaded(),
        left: t.left(),
        event,
        // Dictionary peers carry ids, which saves dialling peers we are already connected to.
        compact: false,
        numwant: Some(cfg.numwant),
        no_peer_id: false,
        key: None,
        ip: None,
        zone: cfg.zone.clone(),
    }
}

/// Announce until the torrent is cancelled, then say `stopped` (briefly, best effort).
pub(crate) async fn run(t: Arc<Torrent>) {
    let mut phase = t.phase();
    let mut event = if t.is_seeding() {
        Event::None
    } else {
        Event::Started
    };
    let mut backoff = FIRST_BACKOFF;
    let mut empty_backoff = FIRST_BACKOFF;
    let mut completed_sent = t.is_seeding();
    loop {
        let req = request(&t, event);
        let wait = match t.ctx.tracker.announce(&req).await {
            Ok(resp) => {
                backoff = FIRST_BACKOFF;
                event = Event::None;
                tracing::debug!(package = %t.name, peers = resp.peers.len(), seeders = resp.complete, leechers = resp.incomplete, "announced");
                t.add_candidates(resp.peers.into_iter().map(|p| (p.addr, p.peer_id)));
                let interval = Duration::from_secs(u64::from(resp.interval.max(1)));
                let min = Duration::from_secs(u64::from(resp.min_interval.unwrap_or(5)));
                (interval, min)
            }
            Err(e) => {
                // A version seeded a moment before `publish` lists it is refused once: expected.
                let just_published = t.is_seeding()
                    && t.age() < Duration::from_secs(30)
                    && matches!(e, PeerError::Unregistered(_));
                if just_published {
                    tracing::debug!(package = %t.name, error = %e, retry_in = ?backoff, "not listed by the tracker yet");
                } else {
                    tracing::warn!(package = %t.name, error = %e, retry_in = ?backoff, "announce failed; swapping with known peers");
                }
                let starved = !t.is_seeding() && t.state().peers.is_empty();
                let cap = if starved {
                    STARVED_BACKOFF.min(t.ctx.config.max_announce_backoff)
                } else {
                    t.ctx.config.max_announce_backoff
                };
                // Jitter: a fleet that lost the tracker together must not return together.
                let w = backoff.min(cap).mul_f64(0.5 + rand::random::<f64>() * 0.5);
                backoff = (backoff * 2).min(cap);
                (w, w)
            }
        };
        let (interval, min) = wait;
        let next = tokio::time::Instant::now() + interval;
        let earliest = tokio::time::Instant::now() + min;
        let quick = if t.state().peers.is_empty() {
            let q = tokio::time::Instant::now() + empty_backoff;
            empty_backoff = (empty_backoff * 2).min(min);
            q
        } else {
            empty_backoff = FIRST_BACKOFF;
            earliest
        };
        loop {
            tokio::select! {
                _ = t.cancel.cancelled() => {
                    let req = request(&t, Event::Stopped);
                    let _ = tokio::time::timeout(Duration::from_secs(2), t.ctx.tracker.announce(&req)).await;
                    return;
                }
                _ = tokio::time::sleep_until(next) => break,
                r = phase.changed() => {
                    if r.is_err() {
                        return;
                    }
                    let p = phase.borrow_and_update().clone();
                    match p {
                        Phase::Seeding(_) if !completed_sent => {
                            completed_sent = true;
                            event = Event::Completed;
                            break;
                        }
                        Phase::Failed { .. } => {
                            let req = request(&t, Event::Stopped);
                            let _ = tokio::time::timeout(Duration::from_secs(2), t.ctx.tracker.announce(&req)).await;
                            return;
                        }
                        _ => {}
                    }
                }
                // Asked for explicitly (a publish just listed the version): go now.
                _ = t.announce_now.notified() => break,
                _ = tokio::time::sleep_until(earliest.min(quick)), if needs_peers(&t) => {
                    // Short of peers: ask again at the tracker's pace, and sooner while there
                    // is nobody at all (a version seeded a moment ago is not listed yet).
                    break;
                }
            }
        }
    }
}

fn needs_peers(t: &Torrent) -> bool {
    !t.is_seeding() && t.state().peers.len() < FEW_PEERS
}
