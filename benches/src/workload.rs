//! The announce load of BENCHMARKS.md ("Tracker: announces per second"), apart from any socket:
//! which request to send next (a share of them with a zone, [`ZoneMix`]), and what a response
//! counts as.
//!
//! Requests are written with [`AnnounceRequest::to_query`] and responses read with
//! [`AnnounceResponse::decode`], the codec the tracker itself uses, so the generator and the
//! tracker cannot disagree on the protocol.

use fbpkg_common::tracker_proto::{AnnounceRequest, AnnounceResponse, Event, TrackerReply, Zone};
use fbpkg_common::{InfoHash, PeerId};
use rand::{Rng, RngExt};

use crate::http1;

/// Peers asked for in every announce.
pub const NUMWANT: u32 = 50;
/// `left` reported by leechers (any non-zero value makes a leecher).
const LEECHER_LEFT: u64 = 1 << 20;

/// Which announces carry a zone (`zone=dcN/rackM`, fbpkg's extension), and over how many
/// zones. A fleet's agents all send one; here a share of them does, so the bench measures the
/// tracker's zone path (closest peers first) beside the plain one. Trackers that do not know
/// the parameter ignore it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZoneMix {
    /// Announces with a zone, per million.
    per_million: u32,
    datacenters: u32,
    racks_per_datacenter: u32,
}

impl ZoneMix {
    /// `fraction` of announces (0 to 1) get a zone, uniformly over `datacenters` x
    /// `racks_per_datacenter` racks. `None` when a number is out of range.
    pub fn new(fraction: f64, datacenters: u32, racks_per_datacenter: u32) -> Option<Self> {
        let valid = fraction.is_finite()
            && (0.0..=1.0).contains(&fraction)
            && datacenters >= 1
            && racks_per_datacenter >= 1;
        valid.then(|| Self {
            per_million: (fraction * 1e6).round() as u32,
            datacenters,
            racks_per_datacenter,
        })
    }

    /// No zones at all.
    pub const NONE: ZoneMix = ZoneMix {
        per_million: 0,
        datacenters: 1,
        racks_per_datacenter: 1,
    };

    /// The share of announces with a zone.
    pub fn fraction(&self) -> f64 {
        f64::from(self.per_million) / 1e6
    }

    fn pick(&self, rng: &mut impl Rng) -> Option<Zone> {
        if rng.random_range(0..1_000_000) >= self.per_million {
            return None;
        }
        let dc = rng.random_range(0..self.datacenters);
        let rack = rng.random_range(0..self.racks_per_datacenter);
        Zone::new(&format!("dc{dc}/rack{rack}")).ok()
    }
}

impl Default for ZoneMix {
    /// A quarter of announces, over 4 datacenters of 16 racks.
    fn default() -> Self {
        Self {
            per_million: 250_000,
            datacenters: 4,
            racks_per_datacenter: 16,
        }
    }
}

/// Announces over a fixed set of swarms: BEP 3, `compact=1&numwant=50`, one seeder in four, a
/// zone on a share of them ([`ZoneMix`], a quarter by default).
#[derive(Debug, Clone)]
pub struct Workload {
    hashes: Vec<InfoHash>,
    zones: ZoneMix,
}

impl Workload {
    /// A workload over `hashes` (at least one), with the default [`ZoneMix`].
    pub fn new(hashes: Vec<InfoHash>) -> Option<Self> {
        (!hashes.is_empty()).then_some(Self {
            hashes,
            zones: ZoneMix::default(),
        })
    }

    /// The same workload with another zone mix.
    pub fn with_zones(self, zones: ZoneMix) -> Self {
        Self { zones, ..self }
    }

    /// The zone mix.
    pub fn zones(&self) -> ZoneMix {
        self.zones
    }

    /// The swarms.
    pub fn hashes(&self) -> &[InfoHash] {
        &self.hashes
    }

    /// A steady-state announce: a random swarm, a random peer id and port, a seeder with
    /// probability 1/4, a zone as the mix says.
    pub fn random(&self, rng: &mut impl Rng) -> AnnounceRequest {
        let hash = self.hashes[rng.random_range(0..self.hashes.len())];
        let seeder = rng.random_range(0..4u8) == 0;
        let zone = self.zones.pick(rng);
        announce(hash, rng, seeder, zone)
    }

    /// The `n`-th announce of the prefill: swarms in turn, so after `k * hashes` announces every
    /// swarm holds exactly `k` peers, a quarter of them seeders (rounded up).
    pub fn prefill(&self, n: u64, rng: &mut impl Rng) -> AnnounceRequest {
        let swarms = self.hashes.len() as u64;
        let hash = self.hashes[usize::try_from(n % swarms).unwrap_or(0)];
        let round = n / swarms;
        let zone = self.zones.pick(rng);
        announce(hash, rng, round.is_multiple_of(4), zone)
    }
}

fn announce(
    info_hash: InfoHash,
    rng: &mut impl Rng,
    seeder: bool,
    zone: Option<Zone>,
) -> AnnounceRequest {
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
        zone,
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
        let (mut seeders, mut zoned) = (0, 0);
        let mut racks = std::collections::HashSet::new();
        for _ in 0..4000 {
            let req = w.random(&mut rng);
            let back = AnnounceRequest::parse(&req.to_query()).unwrap();
            assert_eq!(back, req);
            assert!(back.compact && back.numwant == Some(NUMWANT));
            assert!(w.hashes().contains(&back.info_hash));
            seeders += usize::from(back.left == 0);
            if let Some(z) = back.zone {
                zoned += 1;
                let (dc, rack) = z.as_str().split_once('/').unwrap();
                let dc: u32 = dc.strip_prefix("dc").unwrap().parse().unwrap();
                let rack: u32 = rack.strip_prefix("rack").unwrap().parse().unwrap();
                assert!(dc < 4 && rack < 16, "{z}");
                racks.insert(z);
            }
        }
        assert!((800..1200).contains(&seeders), "{seeders} seeders of 4000");
        assert!((800..1200).contains(&zoned), "{zoned} zoned of 4000");
        assert!(
            racks.len() > 48,
            "zones spread over the racks: {}",
            racks.len()
        );
        let plain = w.with_zones(ZoneMix::NONE);
        assert!((0..100).all(|_| plain.random(&mut rng).zone.is_none()));
    }

    #[test]
    fn zone_mix_is_checked() {
        assert_eq!(ZoneMix::new(0.25, 4, 16), Some(ZoneMix::default()));
        assert_eq!(ZoneMix::new(0.0, 1, 1).map(|m| m.fraction()), Some(0.0));
        for bad in [
            ZoneMix::new(1.5, 4, 16),
            ZoneMix::new(f64::NAN, 4, 16),
            ZoneMix::new(0.5, 0, 16),
            ZoneMix::new(0.5, 4, 0),
        ] {
            assert_eq!(bad, None);
        }
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
