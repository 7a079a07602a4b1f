//! The announce load of BENCHMARKS.md ("Tracker: announces per second"), apart from any socket:
//! which request to send next, and what a response counts as.
//!
//! Requests are written with [`AnnounceRequest::to_query`] and responses read with
//! [`AnnounceResponse::decode`], the codec the tracker itself uses, so the generator and the
//! tracker cannot disagree on the protocol.

use fbpkg_common::tracker_proto::{AnnounceRequest, AnnounceResponse, Event, TrackerReply};
use fbpkg_common::{InfoHash, PeerId};
use rand::{Rng, RngExt};

use crate::http1;

/// Peers asked for in every announce.
pub const NUMWANT: u32 = 50;
/// `left` reported by leechers (any non-zero value makes a leecher).
const LEECHER_LEFT: u64 = 1 << 20;

/// Announces over a fixed set of swarms: BEP 3, `compact=1&numwant=50`, one seeder in four.
#[derive(Debug, Clone)]
pub struct Workload {
    hashes: Vec<InfoHash>,
}

impl Workload {
    /// A workload over `hashes` (at least one).
    pub fn new(hashes: Vec<InfoHash>) -> Option<Self> {
        (!hashes.is_empty()).then_some(Self { hashes })
    }

    /// The swarms.
    pub fn hashes(&self) -> &[InfoHash] {
        &self.hashes
    }

    /// A steady-state announce: a random swarm, a random peer id and port, a seeder with
    /// probability 1/4.
    pub fn random(&self, rng: &mut impl Rng) -> AnnounceRequest {
        let hash = self.hashes[rng.random_range(0..self.hashes.len())];
        let seeder = rng.random_range(0..4u8) == 0;
        announce(hash, rng, seeder)
    }

    /// The `n`-th announce of the prefill: swarms in turn, so after `k * hashes` announces every
    /// swarm holds exactly `k` peers, a quarter of them seeders (rounded up).
    pub fn prefill(&self, n: u64, rng: &mut impl Rng) -> AnnounceRequest {
        let swarms = self.hashes.len() as u64;
        let hash = self.hashes[usize::try_from(n % swarms).unwrap_or(0)];
        let round = n / swarms;
        announce(hash, rng, round.is_multiple_of(4))
    }
}

fn announce(info_hash: InfoHash, rng: &mut impl Rng, seeder: bool) -> AnnounceRequest {
    let mut peer_id = [0u8; 20];
    rng.fill(&mut peer_id[..]);
    AnnounceRequest {
        info_hash,
        peer_id: PeerId(peer_id),
        port: rng.random_range(1024..=u16::MAX),
        uploaded: 0,
        downloaded: 0,
        left: if seeder { 0 } else { LEECHER_LEFT },
        event: Event::None,
        compact: true,
        numwant: Some(NUMWANT),
        no_peer_id: false,
        key: None,
        ip: None,
        zone: None,
    }
}

/// Append the HTTP/1.1 request for `req` to `out`.
pub fn write_announce(out: &mut Vec<u8>, host: &str, req: &AnnounceRequest, close: bool) {
    let mut path = String::with_capacity(200);
    path.push_str("/announce?");
    path.push_str(&req.to_query());
    http1::write_get(out, host, &path, close);
}

/// What one response counts as. Only [`Outcome::Ok`] is counted as served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 200, a bencoded announce response without `failure reason`.
    Ok {
        /// Peers in the response.
        peers: usize,
    },
    /// 200 with a `failure reason`.
    Failure(String),
    /// Any status but 200.
    Status(u16),
    /// 200 but the body is not an announce response.
    BadBody(String),
}

/// Classify a response.
pub fn classify(status: u16, body: &[u8]) -> Outcome {
    if status != 200 {
        return Outcome::Status(status);
    }
    match AnnounceResponse::decode(body) {
        Ok(TrackerReply::Ok(r)) => Outcome::Ok {
            peers: r.peers.len(),
        },
        Ok(TrackerReply::Failure(reason)) => Outcome::Failure(reason),
        Err(e) => Outcome::BadBody(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fbpkg_common::tracker_proto::{PeerEntry, PeerFormat, encode_failure};
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn workload(n: u8) -> Workload {
        Workload::new((0..n).map(|i| InfoHash([i; 20])).collect()).unwrap()
    }

    #[test]
    fn requests_round_trip_through_the_trackers_parser() {
        let w = workload(8);
        let mut rng = SmallRng::seed_from_u64(1);
        let mut seeders = 0;
        for _ in 0..4000 {
            let req = w.random(&mut rng);
            let back = AnnounceRequest::parse(&req.to_query()).unwrap();
            assert_eq!(back, req);
            assert!(back.compact && back.numwant == Some(NUMWANT));
            assert!(w.hashes().contains(&back.info_hash));
            seeders += usize::from(back.left == 0);
        }
        assert!((800..1200).contains(&seeders), "{seeders} seeders of 4000");
    }

    #[test]
    fn prefill_fills_every_swarm_evenly() {
        let w = workload(4);
        let mut rng = SmallRng::seed_from_u64(2);
        let reqs: Vec<_> = (0..16).map(|n| w.prefill(n, &mut rng)).collect();
        for h in w.hashes() {
            let mine: Vec<_> = reqs.iter().filter(|r| r.info_hash == *h).collect();
            assert_eq!(mine.len(), 4);
            assert_eq!(mine.iter().filter(|r| r.left == 0).count(), 1);
        }
    }

    #[test]
    fn http_request_is_one_get_line() {
        let w = workload(1);
        let req = w.random(&mut SmallRng::seed_from_u64(3));
        let mut out = Vec::new();
        write_announce(&mut out, "127.0.0.1:9", &req, false);
        let text = String::from_utf8(out).unwrap();
        let line = text.lines().next().unwrap();
        let query = line
            .strip_prefix("GET /announce?")
            .and_then(|l| l.strip_suffix(" HTTP/1.1"))
            .unwrap();
        assert_eq!(AnnounceRequest::parse(query).unwrap(), req);
    }

    #[test]
    fn only_clean_200s_count() {
        let mut ok = Vec::new();
        AnnounceResponse {
            interval: 60,
            peers: vec![PeerEntry {
                addr: "127.0.0.1:1".parse().unwrap(),
                peer_id: None,
            }],
            ..Default::default()
        }
        .encode(PeerFormat::Compact, &mut ok);
        assert_eq!(classify(200, &ok), Outcome::Ok { peers: 1 });
        assert_eq!(classify(503, &ok), Outcome::Status(503));
        let mut failed = Vec::new();
        encode_failure("unregistered torrent", &mut failed);
        assert_eq!(
            classify(200, &failed),
            Outcome::Failure("unregistered torrent".into())
        );
        assert!(matches!(classify(200, b"<html>"), Outcome::BadBody(_)));
        // opentracker's own bytes, as captured from Debian's build.
        let ot = b"d8:completei1e10:downloadedi0e10:incompletei0e8:intervali1863e12:min intervali931e5:peers6:\x7f\x00\x00\x01\x1a\xe1e";
        assert_eq!(classify(200, ot), Outcome::Ok { peers: 1 });
    }
}
