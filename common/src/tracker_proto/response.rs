//! Announce and scrape responses: written by the tracker, read by agents and tests.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::bencode::{self, Limits, Value, Writer};
use crate::error::Error;
use crate::ids::{InfoHash, PeerId};

/// One peer in an announce response.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerEntry {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Its peer id, when the list is not compact and `no_peer_id` was not asked.
    pub peer_id: Option<PeerId>,
}

/// How the peer list is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerFormat {
    /// BEP 23 / BEP 7: `peers` holds 6 bytes per IPv4 peer, `peers6` 18 bytes per IPv6 peer.
    Compact,
    /// BEP 3 list of dictionaries; peer ids included unless `no_peer_id`.
    Dict {
        /// Include `peer id` in each entry.
        with_peer_id: bool,
    },
}

/// A successful announce response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AnnounceResponse {
    /// Seconds until the next regular announce.
    pub interval: u32,
    /// Announcing more often than this is refused.
    pub min_interval: Option<u32>,
    /// Seeders in the swarm.
    pub complete: u32,
    /// Leechers in the swarm.
    pub incomplete: u32,
    /// Peers to connect to.
    pub peers: Vec<PeerEntry>,
    /// A non-fatal message for the client.
    pub warning: Option<String>,
}

/// What a tracker answers: peers, or a `failure reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrackerReply<T> {
    /// The request was served.
    Ok(T),
    /// The tracker refused it, and said why.
    Failure(String),
}

/// Write a `failure reason` response.
pub fn encode_failure(reason: &str, out: &mut Vec<u8>) {
    let mut w = Writer::with_capacity(reason.len() + 24);
    w.dict()
        .key_bytes("failure reason", reason.as_bytes())
        .end();
    out.extend_from_slice(&w.finish());
}

impl AnnounceResponse {
    /// Write the response into `out`.
    pub fn encode(&self, format: PeerFormat, out: &mut Vec<u8>) {
        let mut w = Writer {
            buf: std::mem::take(out),
        };
        w.buf.reserve(64 + self.peers.len() * 8);
        w.dict();
        w.key_int("complete", i64::from(self.complete));
        w.key_int("incomplete", i64::from(self.incomplete));
        w.key_int("interval", i64::from(self.interval));
        if let Some(m) = self.min_interval {
            w.key_int("min interval", i64::from(m));
        }
        match format {
            PeerFormat::Compact => {
                // Counted first so each list is written straight into the buffer: this is the
                // tracker's hot path.
                let v4 = self.peers.iter().filter(|p| p.addr.is_ipv4()).count();
                let v6 = self.peers.len() - v4;
                w.bytes(b"peers").string_header(v4 * 6);
                for p in self.peers.iter().filter(|p| p.addr.is_ipv4()) {
                    write_compact(&mut w.buf, p.addr);
                }
                if v6 > 0 {
                    w.bytes(b"peers6").string_header(v6 * 18);
                    for p in self.peers.iter().filter(|p| p.addr.is_ipv6()) {
                        write_compact(&mut w.buf, p.addr);
                    }
                }
            }
            PeerFormat::Dict { with_peer_id } => {
                w.bytes(b"peers").list();
                for p in &self.peers {
                    w.dict().key_bytes("ip", p.addr.ip().to_string().as_bytes());
                    if let (true, Some(id)) = (with_peer_id, &p.peer_id) {
                        w.key_bytes("peer id", &id.0);
                    }
                    w.key_int("port", i64::from(p.addr.port())).end();
                }
                w.end();
            }
        }
        if let Some(warning) = &self.warning {
            w.key_bytes("warning message", warning.as_bytes());
        }
        w.end();
        *out = w.finish();
    }

    /// Read an announce response (or its failure reason) from untrusted bytes.
    pub fn decode(bytes: &[u8]) -> Result<TrackerReply<Self>, Error> {
        let v = bencode::decode(bytes, &Limits::TRACKER_RESPONSE)?;
        let d = v.as_dict("announce response")?;
        if let Some(reason) = failure(d)? {
            return Ok(TrackerReply::Failure(reason));
        }
        let uint = |key: &str, required: bool| -> Result<Option<u32>, Error> {
            match bencode::get(d, key) {
                None if required => Err(Error::Structure(format!("{key} is missing"))),
                None => Ok(None),
                Some(v) => v
                    .as_int()
                    .and_then(|i| u32::try_from(i).ok())
                    .map(Some)
                    .ok_or_else(|| {
                        Error::Structure(format!("{key} is not a non-negative integer"))
                    }),
            }
        };
        let mut peers = Vec::new();
        match bencode::get(d, "peers") {
            None => {}
            Some(Value::Bytes(b)) => read_compact(b, 6, &mut peers)?,
            Some(Value::List(items)) => {
                for item in items {
                    peers.push(read_dict_peer(item)?);
                }
            }
            Some(_) => {
                return Err(Error::Structure(
                    "peers is neither a string nor a list".into(),
                ));
            }
        }
        match bencode::get(d, "peers6") {
            None => {}
            Some(Value::Bytes(b)) => read_compact(b, 18, &mut peers)?,
            Some(_) => return Err(Error::Structure("peers6 is not a string".into())),
        }
        let warning = bencode::get(d, "warning message")
            .and_then(Value::as_bytes)
            .map(|b| String::from_utf8_lossy(b).into_owned());
        Ok(TrackerReply::Ok(Self {
            interval: uint("interval", true)?.unwrap_or(0),
            min_interval: uint("min interval", false)?,
            complete: uint("complete", false)?.unwrap_or(0),
            incomplete: uint("incomplete", false)?.unwrap_or(0),
            peers,
            warning,
        }))
    }
}

use crate::bencode::Dict;

fn failure(d: &Dict<'_>) -> Result<Option<String>, Error> {
    match bencode::get(d, "failure reason") {
        None => Ok(None),
        Some(v) => v
            .as_bytes()
            .map(|b| Some(String::from_utf8_lossy(b).into_owned()))
            .ok_or_else(|| Error::Structure("failure reason is not a string".into())),
    }
}

fn write_compact(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => out.extend_from_slice(&ip.octets()),
        IpAddr::V6(ip) => out.extend_from_slice(&ip.octets()),
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

fn read_compact(b: &[u8], width: usize, out: &mut Vec<PeerEntry>) -> Result<(), Error> {
    if !b.len().is_multiple_of(width) {
        return Err(Error::Structure(format!(
            "compact peer list length {} is not a multiple of {width}",
            b.len()
        )));
    }
    for c in b.chunks_exact(width) {
        let (ip, port) = c.split_at(width - 2);
        let ip: IpAddr = match ip.len() {
            4 => Ipv4Addr::from(<[u8; 4]>::try_from(ip).unwrap_or_default()).into(),
            _ => Ipv6Addr::from(<[u8; 16]>::try_from(ip).unwrap_or_default()).into(),
        };
        let port = u16::from_be_bytes([port[0], port[1]]);
        out.push(PeerEntry {
            addr: SocketAddr::new(ip, port),
            peer_id: None,
        });
    }
    Ok(())
}

fn read_dict_peer(item: &Value<'_>) -> Result<PeerEntry, Error> {
    let d = item.as_dict("peer entry")?;
    let ip = bencode::get(d, "ip")
        .and_then(Value::as_bytes)
        .and_then(|b| std::str::from_utf8(b).ok())
        .and_then(|s| s.parse::<IpAddr>().ok())
        .ok_or_else(|| Error::Structure("peer entry has no valid ip".into()))?;
    let port = bencode::get(d, "port")
        .and_then(Value::as_int)
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| Error::Structure("peer entry has no valid port".into()))?;
    let peer_id = bencode::get(d, "peer id")
        .and_then(Value::as_bytes)
        .and_then(PeerId::from_slice);
    Ok(PeerEntry {
        addr: SocketAddr::new(ip, port),
        peer_id,
    })
}

/// One swarm's counts in a scrape (BEP 48).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScrapeStats {
    /// Seeders.
    pub complete: u32,
    /// Completed downloads seen.
    pub downloaded: u32,
    /// Leechers.
    pub incomplete: u32,
}

/// A scrape response: counts per info-hash.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScrapeResponse {
    /// Counts by swarm.
    pub files: BTreeMap<InfoHash, ScrapeStats>,
}

impl ScrapeResponse {
    /// Write the response into `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = Writer::with_capacity(16 + self.files.len() * 80);
        w.dict().bytes(b"files").dict();
        for (h, s) in &self.files {
            w.bytes(&h.0).dict();
            w.key_int("complete", i64::from(s.complete));
            w.key_int("downloaded", i64::from(s.downloaded));
            w.key_int("incomplete", i64::from(s.incomplete));
            w.end();
        }
        w.end().end();
        out.extend_from_slice(&w.finish());
    }

    /// Read a scrape response (or its failure reason) from untrusted bytes.
    pub fn decode(bytes: &[u8]) -> Result<TrackerReply<Self>, Error> {
        let v = bencode::decode(bytes, &Limits::TRACKER_RESPONSE)?;
        let d = v.as_dict("scrape response")?;
        if let Some(reason) = failure(d)? {
            return Ok(TrackerReply::Failure(reason));
        }
        let files = bencode::get(d, "files")
            .ok_or_else(|| Error::Structure("files is missing".into()))?
            .as_dict("files")?;
        let mut out = BTreeMap::new();
        for (k, (v, _)) in files {
            let h = InfoHash::from_slice(k)
                .ok_or_else(|| Error::Structure("files key is not 20 bytes".into()))?;
            let s = v.as_dict("scrape entry")?;
            let n = |key: &str| {
                bencode::get(s, key)
                    .and_then(Value::as_int)
                    .and_then(|i| u32::try_from(i).ok())
                    .unwrap_or(0)
            };
            out.insert(
                h,
                ScrapeStats {
                    complete: n("complete"),
                    downloaded: n("downloaded"),
                    incomplete: n("incomplete"),
                },
            );
        }
        Ok(TrackerReply::Ok(Self { files: out }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_v4() -> impl Strategy<Value = SocketAddr> {
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, p)| SocketAddr::new(Ipv4Addr::from(ip).into(), p))
    }
    fn arb_v6() -> impl Strategy<Value = SocketAddr> {
        (any::<[u8; 16]>(), any::<u16>())
            .prop_map(|(ip, p)| SocketAddr::new(Ipv6Addr::from(ip).into(), p))
    }

    prop_compose! {
        fn arb_response(with_ids: bool)(
            interval in any::<u32>(), min in proptest::option::of(any::<u32>()),
            complete in any::<u32>(), incomplete in any::<u32>(),
            v4 in proptest::collection::vec((arb_v4(), any::<[u8; 20]>()), 0..20),
            v6 in proptest::collection::vec((arb_v6(), any::<[u8; 20]>()), 0..5),
            warning in proptest::option::of("[ -~]{0,30}"),
        ) -> AnnounceResponse {
            let peers = v4.into_iter().chain(v6)
                .map(|(addr, id)| PeerEntry { addr, peer_id: with_ids.then_some(PeerId(id)) })
                .collect();
            AnnounceResponse { interval, min_interval: min, complete, incomplete, peers, warning }
        }
    }

    proptest! {
        #[test]
        fn compact_round_trip(r in arb_response(false)) {
            let mut buf = Vec::new();
            r.encode(PeerFormat::Compact, &mut buf);
            prop_assert_eq!(AnnounceResponse::decode(&buf).unwrap(), TrackerReply::Ok(r));
        }

        #[test]
        fn dict_round_trip(r in arb_response(true)) {
            let mut buf = Vec::new();
            r.encode(PeerFormat::Dict { with_peer_id: true }, &mut buf);
            prop_assert_eq!(AnnounceResponse::decode(&buf).unwrap(), TrackerReply::Ok(r));
        }

        #[test]
        fn scrape_round_trip(entries in proptest::collection::btree_map(any::<[u8; 20]>(), any::<(u32, u32, u32)>(), 0..10)) {
            let r = ScrapeResponse { files: entries.into_iter().map(|(h, (c, d, i))| {
                (InfoHash(h), ScrapeStats { complete: c, downloaded: d, incomplete: i })
            }).collect() };
            let mut buf = Vec::new();
            r.encode(&mut buf);
            prop_assert_eq!(ScrapeResponse::decode(&buf).unwrap(), TrackerReply::Ok(r));
        }

        #[test]
        fn failure_round_trip(reason in "\\PC{0,50}") {
            let mut buf = Vec::new();
            encode_failure(&reason, &mut buf);
            prop_assert_eq!(AnnounceResponse::decode(&buf).unwrap(), TrackerReply::Failure(reason.clone()));
            prop_assert_eq!(ScrapeResponse::decode(&buf).unwrap(), TrackerReply::Failure(reason));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = AnnounceResponse::decode(&bytes);
            let _ = ScrapeResponse::decode(&bytes);
        }
    }

    #[test]
    fn no_peer_id_omits_ids() {
        let r = AnnounceResponse {
            interval: 60,
            peers: vec![PeerEntry {
                addr: "127.0.0.1:1".parse().unwrap(),
                peer_id: Some(PeerId([7; 20])),
            }],
            ..Default::default()
        };
        let mut buf = Vec::new();
        r.encode(
            PeerFormat::Dict {
                with_peer_id: false,
            },
            &mut buf,
        );
        let TrackerReply::Ok(back) = AnnounceResponse::decode(&buf).unwrap() else {
            panic!()
        };
        assert_eq!(back.peers[0].peer_id, None);
    }
}
