//! Announce and scrape requests: parsed from a raw query string, written back into one.
//!
//! `info_hash` and `peer_id` are 20 raw bytes, percent-encoded in the URL, so the query string
//! is decoded by hand: a generic form decoder would try to make them UTF-8.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::net::IpAddr;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode, utf8_percent_encode};

use crate::error::{Error, clip};
use crate::ids::{InfoHash, PeerId};

/// Peers returned when the client does not say `numwant`.
pub const DEFAULT_NUMWANT: u32 = 50;
/// Longest `key` accepted.
const MAX_KEY_LEN: usize = 64;
/// Most info-hashes in one scrape.
pub const MAX_SCRAPE_HASHES: usize = 64;

/// Unreserved characters (RFC 3986) stay as they are; everything else is `%XX`.
const QUERY_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The `event` of an announce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Event {
    /// A regular, periodic announce.
    #[default]
    None,
    /// The first announce of a download.
    Started,
    /// The download finished (librqbit never sends this; `left=0` is what counts).
    Completed,
    /// The client leaves the swarm.
    Stopped,
}

impl Event {
    fn as_str(self) -> Option<&'static str> {
        match self {
            Event::None => None,
            Event::Started => Some("started"),
            Event::Completed => Some("completed"),
            Event::Stopped => Some("stopped"),
        }
    }
}

/// A host's place in the fleet, most general first: `dc1/rack7`. Peers sharing a longer prefix
/// are closer. Segments are `[a-z0-9._-]`, at most 8 of them, 64 characters in all.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Zone(String);

impl Zone {
    /// Validate a zone path.
    pub fn new(s: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::Query(format!("invalid zone {:?}: {why}", clip(s)));
        if s.is_empty() || s.len() > 64 {
            return Err(bad("must be 1 to 64 characters"));
        }
        let segments: Vec<&str> = s.split('/').collect();
        if segments.len() > 8 {
            return Err(bad("at most 8 segments"));
        }
        for seg in &segments {
            if seg.is_empty()
                || !seg
                    .bytes()
                    .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
            {
                return Err(bad("segments are non-empty [a-z0-9._-], separated by '/'"));
            }
        }
        Ok(Self(s.to_owned()))
    }
    /// The zone text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// How many leading segments two zones share: 0 = nothing in common.
    pub fn shared_depth(&self, other: &Zone) -> usize {
        self.0
            .split('/')
            .zip(other.0.split('/'))
            .take_while(|(a, b)| a == b)
            .count()
    }
}

impl std::str::FromStr for Zone {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Zone::new(s)
    }
}

impl serde::Serialize for Zone {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Zone {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <Cow<'de, str>>::deserialize(d)?;
        Zone::new(&s).map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for Zone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A parsed `GET /announce`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnounceRequest {
    /// The swarm.
    pub info_hash: InfoHash,
    /// The announcing peer.
    pub peer_id: PeerId,
    /// The peer's listening port (non-zero).
    pub port: u16,
    /// Bytes uploaded so far.
    pub uploaded: u64,
    /// Bytes downloaded so far.
    pub downloaded: u64,
    /// Bytes still missing; 0 means a seeder.
    pub left: u64,
    /// Lifecycle event.
    pub event: Event,
    /// Compact peer lists (BEP 23). Defaults to true.
    pub compact: bool,
    /// Peers wanted; `None` means the tracker's default.
    pub numwant: Option<u32>,
    /// Omit peer ids in dictionary peer lists.
    pub no_peer_id: bool,
    /// Opaque client key: raw bytes, as `info_hash` (aria2 sends 8 random bytes; BEP 3
    /// parameters are byte strings, not text).
    pub key: Option<Vec<u8>>,
    /// Address the client claims; honoured only from trusted networks.
    pub ip: Option<IpAddr>,
    /// fbpkg extension: the peer's zone, for locality-aware peer lists.
    pub zone: Option<Zone>,
}

/// Iterate `key=value` pairs of a raw query string, values still percent-encoded.
fn pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
}

fn decode(v: &str) -> Cow<'_, [u8]> {
    percent_decode(v.as_bytes()).into()
}

fn twenty(name: &str, v: &str) -> Result<[u8; 20], Error> {
    let bytes = decode(v);
    <[u8; 20]>::try_from(bytes.as_ref())
        .map_err(|_| Error::Query(format!("{name} must be 20 bytes, got {}", bytes.len())))
}

fn number<T: std::str::FromStr>(name: &str, v: &str) -> Result<T, Error> {
    let text = decode(v);
    std::str::from_utf8(&text)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::Query(format!("{name} is not a valid number: {:?}", clip(v))))
}

fn flag(name: &str, v: &str) -> Result<bool, Error> {
    match v {
        "1" => Ok(true),
        "0" => Ok(false),
        _ => Err(Error::Query(format!("{name} must be 0 or 1"))),
    }
}

fn bytes(name: &str, v: &str, max: usize) -> Result<Vec<u8>, Error> {
    let bytes = decode(v);
    if bytes.len() > max {
        return Err(Error::Query(format!("{name} is longer than {max} bytes")));
    }
    Ok(bytes.into_owned())
}

fn text(name: &str, v: &str, max: usize) -> Result<String, Error> {
    let bytes = decode(v);
    if bytes.len() > max {
        return Err(Error::Query(format!("{name} is longer than {max} bytes")));
    }
    String::from_utf8(bytes.into_owned()).map_err(|_| Error::Query(format!("{name} is not UTF-8")))
}

fn set_once<T>(slot: &mut Option<T>, name: &str, value: T) -> Result<(), Error> {
    if slot.replace(value).is_some() {
        return Err(Error::Query(format!("{name} given more than once")));
    }
    Ok(())
}

impl AnnounceRequest {
    /// Parse the raw query string of an announce (the part after `?`).
    pub fn parse(query: &str) -> Result<Self, Error> {
        let (mut info_hash, mut peer_id, mut port) = (None, None, None);
        let (mut uploaded, mut downloaded, mut left) = (None, None, None);
        let (mut event, mut compact, mut numwant, mut no_peer_id) = (None, None, None, None);
        let (mut key, mut ip, mut zone) = (None, None, None);
        for (k, v) in pairs(query) {
            match k {
                "info_hash" => set_once(&mut info_hash, k, InfoHash(twenty(k, v)?))?,
                "peer_id" => set_once(&mut peer_id, k, PeerId(twenty(k, v)?))?,
                "port" => {
                    let p: u16 = number(k, v)?;
                    if p == 0 {
                        return Err(Error::Query("port must be between 1 and 65535".into()));
                    }
                    set_once(&mut port, k, p)?
                }
                "uploaded" => set_once(&mut uploaded, k, number(k, v)?)?,
                "downloaded" => set_once(&mut downloaded, k, number(k, v)?)?,
                "left" => set_once(&mut left, k, number(k, v)?)?,
                "event" => {
                    let e = match v {
                        "" | "empty" | "paused" => Event::None,
                        "started" => Event::Started,
                        "completed" => Event::Completed,
                        "stopped" => Event::Stopped,
                        other => {
                            return Err(Error::Query(format!("unknown event {:?}", clip(other))));
                        }
                    };
                    set_once(&mut event, k, e)?
                }
                "compact" => set_once(&mut compact, k, flag(k, v)?)?,
                "numwant" => set_once(&mut numwant, k, number(k, v)?)?,
                "no_peer_id" => set_once(&mut no_peer_id, k, flag(k, v)?)?,
                "key" => set_once(&mut key, k, bytes(k, v, MAX_KEY_LEN)?)?,
                "ip" => {
                    let s = text(k, v, 64)?;
                    // Hostnames are not accepted: resolving them would let a client make the
                    // tracker do DNS on its behalf.
                    let addr = s.parse().map_err(|_| {
                        Error::Query(format!("ip is not an IP address: {:?}", clip(&s)))
                    })?;
                    set_once(&mut ip, k, addr)?
                }
                "zone" => set_once(&mut zone, k, Zone::new(&text(k, v, 64)?)?)?,
                _ => {} // trackerid, supportcrypto, corrupt, …: not used here.
            }
        }
        let missing = |name: &str| Error::Query(format!("missing {name}"));
        Ok(Self {
            info_hash: info_hash.ok_or_else(|| missing("info_hash"))?,
            peer_id: peer_id.ok_or_else(|| missing("peer_id"))?,
            port: port.ok_or_else(|| missing("port"))?,
            uploaded: uploaded.unwrap_or(0),
            downloaded: downloaded.unwrap_or(0),
            left: left.ok_or_else(|| missing("left"))?,
            event: event.unwrap_or_default(),
            compact: compact.unwrap_or(true),
            numwant,
            no_peer_id: no_peer_id.unwrap_or(false),
            key,
            ip,
            zone,
        })
    }

    /// Write this request as a query string (without the leading `?`).
    pub fn to_query(&self) -> String {
        let mut q = String::with_capacity(256);
        let enc = |b: &[u8]| percent_encoding::percent_encode(b, QUERY_ENCODE).to_string();
        let _ = write!(
            q,
            "info_hash={}&peer_id={}&port={}&uploaded={}&downloaded={}&left={}&compact={}",
            enc(&self.info_hash.0),
            enc(&self.peer_id.0),
            self.port,
            self.uploaded,
            self.downloaded,
            self.left,
            u8::from(self.compact)
        );
        if let Some(e) = self.event.as_str() {
            let _ = write!(q, "&event={e}");
        }
        if let Some(n) = self.numwant {
            let _ = write!(q, "&numwant={n}");
        }
        if self.no_peer_id {
            q.push_str("&no_peer_id=1");
        }
        if let Some(k) = &self.key {
            let _ = write!(q, "&key={}", enc(k));
        }
        if let Some(ip) = &self.ip {
            let _ = write!(
                q,
                "&ip={}",
                utf8_percent_encode(&ip.to_string(), QUERY_ENCODE)
            );
        }
        if let Some(z) = &self.zone {
            let _ = write!(q, "&zone={}", utf8_percent_encode(z.as_str(), QUERY_ENCODE));
        }
        q
    }
}

/// A parsed `GET /scrape` (BEP 48): zero or more info-hashes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScrapeRequest {
    /// The swarms asked about; empty asks for all (which a tracker may refuse).
    pub info_hashes: Vec<InfoHash>,
}

impl ScrapeRequest {
    /// Parse the raw query string of a scrape.
    pub fn parse(query: &str) -> Result<Self, Error> {
        let mut info_hashes = Vec::new();
        for (k, v) in pairs(query) {
            if k == "info_hash" {
                if info_hashes.len() == MAX_SCRAPE_HASHES {
                    return Err(Error::Query(format!(
                        "at most {MAX_SCRAPE_HASHES} info_hash values per scrape"
                    )));
                }
                info_hashes.push(InfoHash(twenty(k, v)?));
            }
        }
        Ok(Self { info_hashes })
    }

    /// Write this request as a query string.
    pub fn to_query(&self) -> String {
        self.info_hashes
            .iter()
            .map(|h| {
                format!(
                    "info_hash={}",
                    percent_encoding::percent_encode(&h.0, QUERY_ENCODE)
                )
            })
            .collect::<Vec<_>>()
            .join("&")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_zone() -> impl Strategy<Value = Zone> {
        "[a-z0-9]{1,6}(/[a-z0-9]{1,6}){0,3}".prop_map(|s| Zone::new(&s).unwrap())
    }

    fn arb_param() -> impl Strategy<Value = &'static str> {
        proptest::sample::select(vec![
            "info_hash",
            "peer_id",
            "port",
            "uploaded",
            "downloaded",
            "left",
            "event",
            "compact",
            "numwant",
            "no_peer_id",
            "key",
            "ip",
            "zone",
            "trackerid",
        ])
    }

    prop_compose! {
        fn arb_request()(
            ih in any::<[u8; 20]>(), pid in any::<[u8; 20]>(), port in 1u16.., up in any::<u64>(),
            down in any::<u64>(), left in any::<u64>(), ev in 0..4u8, compact in any::<bool>(),
            numwant in proptest::option::of(0u32..1000), no_peer_id in any::<bool>(),
            key in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20)), ip in proptest::option::of(any::<IpAddr>()),
            zone in proptest::option::of(arb_zone()),
        ) -> AnnounceRequest {
            AnnounceRequest {
                info_hash: InfoHash(ih), peer_id: PeerId(pid), port, uploaded: up, downloaded: down, left,
                event: [Event::None, Event::Started, Event::Completed, Event::Stopped][ev as usize],
                compact, numwant, no_peer_id, key, ip, zone,
            }
        }
    }

    proptest! {
        #[test]
        fn announce_round_trip(req in arb_request()) {
            prop_assert_eq!(AnnounceRequest::parse(&req.to_query()).unwrap(), req);
        }

        #[test]
        fn scrape_round_trip(hashes in proptest::collection::vec(any::<[u8; 20]>(), 0..10)) {
            let req = ScrapeRequest { info_hashes: hashes.into_iter().map(InfoHash).collect() };
            prop_assert_eq!(ScrapeRequest::parse(&req.to_query()).unwrap(), req);
        }

        #[test]
        fn accepted_queries_round_trip(
            req in arb_request(),
            extra in proptest::collection::vec((arb_param(), "[%0-9A-Fa-z.:/_+-]{0,24}"), 0..4),
        ) {
            // A valid query with parameters added or repeated: whatever the parser still
            // accepts must write back into a query it reads the same, and that is a fixed point.
            let mut q = req.to_query();
            for (k, v) in extra {
                q.push_str(&format!("&{k}={v}"));
            }
            if let Ok(parsed) = AnnounceRequest::parse(&q) {
                let written = parsed.to_query();
                prop_assert_eq!(AnnounceRequest::parse(&written).unwrap(), parsed);
                prop_assert_eq!(AnnounceRequest::parse(&written).unwrap().to_query(), written);
            }
        }

        #[test]
        fn scrapes_are_bounded_and_round_trip(
            parts in proptest::collection::vec(
                prop_oneof![3 => any::<[u8; 20]>().prop_map(Some), 1 => Just(None)],
                0..100,
            ),
            all_escaped in any::<bool>(),
        ) {
            // Hashes in either spelling, with other parameters and empty pairs between them:
            // accepted exactly up to the limit, read as written, and written back to itself.
            let set = if all_escaped { NON_ALPHANUMERIC } else { QUERY_ENCODE };
            let q = parts
                .iter()
                .map(|p| match p {
                    Some(h) => format!("info_hash={}", percent_encoding::percent_encode(h, set)),
                    None => "trackerid=x&".into(),
                })
                .collect::<Vec<_>>()
                .join("&");
            let hashes: Vec<InfoHash> = parts.iter().flatten().copied().map(InfoHash).collect();
            match ScrapeRequest::parse(&q) {
                Ok(parsed) => {
                    prop_assert!(hashes.len() <= MAX_SCRAPE_HASHES);
                    prop_assert_eq!(&parsed.info_hashes, &hashes);
                    prop_assert_eq!(ScrapeRequest::parse(&parsed.to_query()).unwrap(), parsed);
                }
                Err(e) => prop_assert!(hashes.len() > MAX_SCRAPE_HASHES, "{}", e),
            }
        }

        #[test]
        fn garbage_never_panics(q in "\\PC{0,300}") {
            let _ = AnnounceRequest::parse(&q);
            let _ = ScrapeRequest::parse(&q);
        }
    }

    #[test]
    fn rejections_name_the_parameter() {
        let ok = "info_hash=%01%02%03%04%05%06%07%08%09%0A%0B%0C%0D%0E%0F%10%11%12%13%14&peer_id=-XX0001-abcdefghijkl&port=6881&left=0";
        assert!(AnnounceRequest::parse(ok).is_ok());
        let cases = [
            (
                "peer_id=-XX0001-abcdefghijkl&port=6881&left=0",
                "missing info_hash",
            ),
            (&ok.replace("%14", "") as &str, "info_hash must be 20 bytes"),
            (&ok.replace("port=6881", "port=0"), "port must be"),
            (&ok.replace("port=6881", "port=99999"), "port is not"),
            (&ok.replace("&left=0", ""), "missing left"),
            (&format!("{ok}&event=bogus"), "unknown event"),
            (&format!("{ok}&port=1"), "more than once"),
            (&format!("{ok}&compact=2"), "0 or 1"),
            (&format!("{ok}&ip=example.com"), "not an IP"),
            (&format!("{ok}&zone=DC1"), "invalid zone"),
        ];
        for (q, needle) in cases {
            let err = AnnounceRequest::parse(q).unwrap_err().to_string();
            assert!(err.contains(needle), "{q}: {err}");
        }
    }

    /// aria2 sends `key` as 8 raw bytes; the tracker refused every aria2 announce when it
    /// wanted text.
    #[test]
    fn key_is_opaque_bytes() {
        let ok = "info_hash=%01%02%03%04%05%06%07%08%09%0A%0B%0C%0D%0E%0F%10%11%12%13%14&peer_id=-aria2-abcdefghijklm&port=6881&left=0";
        let req = AnnounceRequest::parse(&format!("{ok}&key=%FF%00%D8%80a%9C%01%FE")).unwrap();
        assert_eq!(
            req.key.as_deref(),
            Some(&[0xff, 0, 0xd8, 0x80, b'a', 0x9c, 1, 0xfe][..])
        );
        assert_eq!(AnnounceRequest::parse(&req.to_query()).unwrap(), req);
        let long = format!("{ok}&key={}", "%AB".repeat(MAX_KEY_LEN + 1));
        let err = AnnounceRequest::parse(&long).unwrap_err().to_string();
        assert!(err.contains("key is longer than"), "{err}");
    }

    #[test]
    fn zone_depth() {
        let a = Zone::new("dc1/rack7").unwrap();
        assert_eq!(a.shared_depth(&Zone::new("dc1/rack7").unwrap()), 2);
        assert_eq!(a.shared_depth(&Zone::new("dc1/rack8").unwrap()), 1);
        assert_eq!(a.shared_depth(&Zone::new("dc2/rack7").unwrap()), 0);
    }
}
