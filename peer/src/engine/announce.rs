//! Announcing one torrent to the tracker: `started`, periodic, `completed`, `stopped`.
//!
//! A torrent announces to the agent's tracker, and also to the trackers its metainfo names
//! (`announce-list` tiers per BEP 12, else `announce`) when they are other trackers: a package
//! built elsewhere, announced to a stock tracker, finds the peers only that tracker knows.
//! Within a tier one tracker is used at a time; a failure moves to the next.
//!
//! When the tracker cannot be reached the announcer backs off (1 s doubling, jittered) and
//! the torrent keeps swapping with the peers it already knows. A download that knows nobody
//! yet backs off to [`STARVED_BACKOFF`] at most: in a fleet-wide flash crowd the first
//! announces are the ones most likely to be lost, and a host that waited a minute after a
//! dropped SYN would finish a minute after everyone else.

use std::sync::Arc;
use std::time::Duration;

use fbpkg_common::metainfo::Metainfo;
use fbpkg_common::tracker_proto::{AnnounceRequest, Event};

use super::torrent::{Phase, Torrent};
use crate::PeerError;
use crate::tracker_client::TrackerClient;

/// Timeout of one announce to a tracker named by a metainfo.
const LISTED_TIMEOUT: Duration = Duration::from_secs(10);

/// Trackers one announce loop talks to.
pub(crate) enum Tier {
    /// The agent's own tracker (`--tracker`).
    Ours,
    /// A tier of the metainfo's trackers, tried in order; the index is the one in use.
    Listed(Vec<TrackerClient>, usize),
}

impl Tier {
    fn client<'a>(&'a self, t: &'a Torrent) -> &'a TrackerClient {
        match self {
            Tier::Ours => &t.ctx.tracker,
            Tier::Listed(clients, i) => &clients[*i],
        }
    }

    /// The tracker in use failed: the next one of the tier takes over.
    fn failed(&mut self) {
        if let Tier::Listed(clients, i) = self {
            *i = (*i + 1) % clients.len();
        }
    }
}

/// The metainfo's tiers of trackers other than ours: `announce-list` if present (BEP 12 says
/// it replaces `announce`), else `announce`. A tier that names our tracker is ours already.
fn tier_urls(meta: &Metainfo, ours: &str) -> Vec<Vec<String>> {
    let ours = ours.trim_end_matches('/');
    let tiers: Vec<Vec<String>> = if meta.announce_list.is_empty() {
        meta.announce.iter().map(|a| vec![a.clone()]).collect()
    } else {
        meta.announce_list.clone()
    };
    tiers
        .into_iter()
        .filter(|urls| !urls.iter().any(|u| u.trim_end_matches('/') == ours))
        .collect()
}

/// Announce loops for the metainfo's other trackers. URLs we cannot speak (udp://,
/// malformed) are left out with a debug line.
pub(crate) fn listed_tiers(t: &Torrent) -> Vec<Tier> {
    tier_urls(&t.meta, t.ctx.tracker.announce_url())
        .into_iter()
        .filter_map(|urls| {
            let clients: Vec<TrackerClient> = urls
                .iter()
                .filter_map(|u| match TrackerClient::for_announce_url(u, LISTED_TIMEOUT) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::debug!(package = %t.name, tracker = %u, error = %e, "tracker from the metainfo left out");
                        None
                    }
                })
                .collect();
            (!clients.is_empty()).then_some(Tier::Listed(clients, 0))
        })
        .collect()
}

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
        // What every tracker speaks (opentracker refuses anything else). Peers come without
        // ids; a second connection to a peer we already have is found out at the handshake,
        // and the candidate then remembers the id.
        compact: true,
        numwant: Some(cfg.numwant),
        no_peer_id: false,
        key: None,
        ip: None,
        zone: cfg.zone.clone(),
    }
}

/// Announce to the trackers of `tier` until the torrent is cancelled, then say `stopped`
/// (briefly, best effort). The first announce says `started`, a seed's too (BEP 3).
pub(crate) async fn run(t: Arc<Torrent>, mut tier: Tier) {
    let mut phase = t.phase();
    let primary = matches!(tier, Tier::Ours);
    let mut event = Event::Started;
    let mut backoff = FIRST_BACKOFF;
    let mut empty_backoff = FIRST_BACKOFF;
    let mut completed_sent = t.is_seeding();
    loop {
        let req = request(&t, event);
        let asked_at = tokio::time::Instant::now();
        let result = tier.client(&t).announce(&req).await;
        if result.is_err() {
            tier.failed();
        }
        let wait = match result {
            Ok(resp) => {
                backoff = FIRST_BACKOFF;
                event = Event::None;
                tracing::debug!(package = %t.name, peers = resp.peers.len(), seeders = resp.complete, leechers = resp.incomplete, "announced");
                // The tracker counts us among its seeds when we announced as one.
                let others = resp.complete.saturating_sub(u32::from(req.left == 0));
                t.state().tracker_seeds = Some((others, asked_at));
                t.add_candidates(resp.peers.into_iter().map(|p| (p.addr, p.peer_id)));
                intervals(resp.interval, resp.min_interval)
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
                    let _ = tokio::time::timeout(Duration::from_secs(2), tier.client(&t).announce(&req)).await;
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
                            let _ = tokio::time::timeout(Duration::from_secs(2), tier.client(&t).announce(&req)).await;
                            return;
                        }
                        _ => {}
                    }
                }
                // Asked for explicitly (a publish just listed the version): go now.
                _ = t.announce_now.notified(), if primary => break,
                _ = tokio::time::sleep_until(earliest.min(quick)), if needs_peers(&t) => {
                    // Short of peers: ask again at the tracker's pace, and sooner while there
                    // is nobody at all (a version seeded a moment ago is not listed yet).
                    break;
                }
            }
        }
    }
}

/// The tracker's `interval` and `min interval` as waits: at least a second each, whatever it
/// says (`min interval 0` would have a download short of peers announce back to back), and
/// 5 s when it gives no minimum.
fn intervals(interval: u32, min_interval: Option<u32>) -> (Duration, Duration) {
    let secs = |s: u32| Duration::from_secs(u64::from(s.max(1)));
    (secs(interval), secs(min_interval.unwrap_or(5)))
}

fn needs_peers(t: &Torrent) -> bool {
    !t.is_seeding() && t.state().peers.len() < FEW_PEERS
}

#[cfg(test)]
mod tests {
    use fbpkg_common::metainfo::Format;

    use super::*;

    fn meta(announce: &str, list: Vec<Vec<&str>>) -> Metainfo {
        let mut m = Metainfo::build(&b"data"[..], 4, "p", announce, Format::File).unwrap();
        m.announce_list = list
            .into_iter()
            .map(|t| t.into_iter().map(str::to_owned).collect())
            .collect();
        m
    }

    #[test]
    fn a_tracker_cannot_make_us_announce_back_to_back() {
        let secs = Duration::from_secs;
        assert_eq!(intervals(0, Some(0)), (secs(1), secs(1)));
        assert_eq!(intervals(60, None), (secs(60), secs(5)));
        assert_eq!(intervals(60, Some(30)), (secs(60), secs(30)));
    }

    #[test]
    fn other_trackers_come_from_announce_list_else_announce() {
        let ours = "http://127.0.0.1:6969/announce";
        // Published here: nothing else to announce to.
        assert!(tier_urls(&meta("http://127.0.0.1:6969/announce/", vec![]), ours).is_empty());
        // Built elsewhere: its announce.
        assert_eq!(
            tier_urls(&meta("http://127.0.0.9:6969/announce", vec![]), ours),
            vec![vec!["http://127.0.0.9:6969/announce".to_owned()]]
        );
        // announce-list replaces announce; a tier that names our tracker is ours already.
        let m = meta(
            "http://127.0.0.9:6969/announce",
            vec![
                vec!["http://127.0.0.1:6969/announce", "http://x/a"],
                vec!["http://y/a", "http://z/a"],
            ],
        );
        assert_eq!(
            tier_urls(&m, ours),
            vec![vec!["http://y/a".to_owned(), "http://z/a".to_owned()]]
        );
    }
}
