//! The tracker's HTTP protocol (BEP 3, 7, 23, 48): one codec shared by the tracker, the agent's
//! tracker client and the load generator, so they cannot drift.

mod request;
mod response;

pub use request::{
    AnnounceRequest, DEFAULT_NUMWANT, Event, MAX_SCRAPE_HASHES, ScrapeRequest, Zone,
};
pub use response::{
    AnnounceResponse, PeerEntry, PeerFormat, ScrapeResponse, ScrapeStats, TrackerReply,
    encode_failure,
};
