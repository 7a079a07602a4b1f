//! `AnnounceResponse::decode` and `ScrapeResponse::decode` on arbitrary bytes: what the agent
//! reads from a tracker, which may be anything on the path to it.
//!
//! Checks: no panic; whatever decodes re-encodes into a response that decodes to the same
//! thing: exactly, in the dictionary peer format (which carries peer ids), and up to peer ids
//! and the IPv4-before-IPv6 order in the compact format; failure reasons round-trip too.
#![no_main]

use fbpkg_common::tracker_proto::{
    AnnounceResponse, PeerEntry, PeerFormat, ScrapeResponse, TrackerReply, encode_failure,
};
use libfuzzer_sys::fuzz_target;

fn reencoded(r: &AnnounceResponse, format: PeerFormat) -> TrackerReply<AnnounceResponse> {
    let mut buf = Vec::new();
    r.encode(format, &mut buf);
    AnnounceResponse::decode(&buf).expect("an encoded response decodes")
}

fn failure_round_trips(reason: &str) {
    let mut buf = Vec::new();
    encode_failure(reason, &mut buf);
    assert_eq!(
        AnnounceResponse::decode(&buf),
        Ok(TrackerReply::Failure(reason.to_owned()))
    );
    assert_eq!(
        ScrapeResponse::decode(&buf),
        Ok(TrackerReply::Failure(reason.to_owned()))
    );
}

fuzz_target!(|data: &[u8]| {
    match AnnounceResponse::decode(data) {
        Ok(TrackerReply::Ok(r)) => {
            let dict = PeerFormat::Dict { with_peer_id: true };
            assert_eq!(reencoded(&r, dict), TrackerReply::Ok(r.clone()));

            let (v4, v6): (Vec<_>, Vec<_>) = r.peers.iter().partition(|p| p.addr.is_ipv4());
            let compact = AnnounceResponse {
                peers: v4
                    .into_iter()
                    .chain(v6)
                    .map(|p| PeerEntry {
                        addr: p.addr,
                        peer_id: None,
                    })
                    .collect(),
                ..r.clone()
            };
            assert_eq!(
                reencoded(&r, PeerFormat::Compact),
                TrackerReply::Ok(compact)
            );
        }
        Ok(TrackerReply::Failure(reason)) => failure_round_trips(&reason),
        Err(_) => {}
    }

    match ScrapeResponse::decode(data) {
        Ok(TrackerReply::Ok(r)) => {
            let mut buf = Vec::new();
            r.encode(&mut buf);
            assert_eq!(ScrapeResponse::decode(&buf), Ok(TrackerReply::Ok(r)));
        }
        Ok(TrackerReply::Failure(reason)) => failure_round_trips(&reason),
        Err(_) => {}
    }
});
