//! Fake peers written with the wire codec, for scenarios where an agent meets a peer that
//! misbehaves or behaves like a particular stock client: both ends of the handshake, reading
//! messages against a deadline, the real bytes of a block, and announcing a fake seeder.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fbpkg_common::metainfo::Metainfo;
use fbpkg_common::tracker_proto::{AnnounceRequest, AnnounceResponse, Event, TrackerReply};
use fbpkg_common::wire::{BlockRef, DEFAULT_MAX_MESSAGE, Handshake, Message};
use fbpkg_common::{InfoHash, PeerId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::http_client;

/// A connection past its handshake, with what was read after the handshake.
#[derive(Debug)]
pub struct Raw {
    /// The socket.
    pub stream: TcpStream,
    /// Bytes read past the handshake, not yet decoded.
    pub buf: BytesMut,
}

/// A peer id with the Azureus-style client tag `tag` (8 bytes, like `-XX0001-`) and random
/// bytes after it.
pub fn random_peer_id(tag: &[u8; 8]) -> PeerId {
    let mut id = [0u8; 20];
    id[..8].copy_from_slice(tag);
    for b in &mut id[8..] {
        *b = rand::random();
    }
    PeerId(id)
}

/// Connect to `to` from `from` and exchange handshakes for `meta` (offering the fast
/// extension), as a stock client (`-XX0001-`). `None` when the other side closed before
/// answering.
///
/// Panics when `from` cannot be bound.
pub async fn handshake_from(from: Ipv4Addr, to: SocketAddr, meta: &Metainfo) -> Option<Raw> {
    handshake_as(from, to, meta, random_peer_id(b"-XX0001-")).await
}

/// [`handshake_from`] with the peer id `peer_id` (an agent's, `-FB0100-`, to be treated as
/// one).
///
/// Panics when `from` cannot be bound.
pub async fn handshake_as(
    from: Ipv4Addr,
    to: SocketAddr,
    meta: &Metainfo,
    peer_id: PeerId,
) -> Option<Raw> {
    let sock = TcpSocket::new_v4().expect("a TCP socket");
    sock.bind(SocketAddr::new(IpAddr::V4(from), 0))
        .unwrap_or_else(|e| panic!("binding {from}: {e}"));
    let mut stream = sock.connect(to).await.ok()?;
    let mut out = BytesMut::new();
    Handshake::new(meta.info_hash, peer_id).encode(&mut out);
    stream.write_all(&out).await.ok()?;
    let mut buf = BytesMut::new();
    loop {
        if let Ok(Some(_)) = Handshake::decode(&mut buf) {
            return Some(Raw { stream, buf });
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// The answering side of a handshake on an accepted `stream`: read the other side's, and if
/// it is for `meta`, answer as `peer_id` (offering the fast extension). `None` when the other
/// side closed, sent garbage, or asked for another swarm.
pub async fn accept_handshake(
    mut stream: TcpStream,
    meta: &Metainfo,
    peer_id: PeerId,
) -> Option<(Raw, Handshake)> {
    let mut buf = BytesMut::with_capacity(64 << 10);
    let theirs = loop {
        match Handshake::decode(&mut buf) {
            Ok(Some(h)) => break h,
            Ok(None) => {}
            Err(_) => return None,
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    };
    if theirs.info_hash != meta.info_hash {
        return None;
    }
    let mut out = BytesMut::new();
    Handshake::new(meta.info_hash, peer_id).encode(&mut out);
    stream.write_all(&out).await.ok()?;
    Some((Raw { stream, buf }, theirs))
}

/// After the handshake: was the connection admitted (a first message arrives) or refused
/// (closed)? Waits for one or the other.
pub async fn admitted(raw: &mut Raw) -> bool {
    if !raw.buf.is_empty() {
        return true;
    }
    matches!(
        tokio::time::timeout(Duration::from_secs(20), raw.stream.read_buf(&mut raw.buf)).await,
        Ok(Ok(n)) if n > 0
    )
}

/// Read messages from `s` until one satisfies `want`; `false` if the connection ends or
/// `timeout` passes first.
pub async fn wait_message(
    s: &mut TcpStream,
    buf: &mut BytesMut,
    timeout: Duration,
    want: impl Fn(&Message) -> bool,
) -> bool {
    tokio::time::timeout(timeout, async {
        loop {
            while let Ok(Some(m)) = Message::decode(buf, DEFAULT_MAX_MESSAGE) {
                if want(&m) {
                    return true;
                }
            }
            match s.read_buf(buf).await {
                Ok(0) | Err(_) => return false,
                Ok(_) => {}
            }
        }
    })
    .await
    .unwrap_or(false)
}

/// The `piece` message that answers request `b` with the real bytes of the package `bytes`.
///
/// Panics when `b` lies outside the package.
pub fn real_block(meta: &Metainfo, bytes: &[u8], b: BlockRef) -> Message {
    let start = usize::try_from(meta.piece_offset(b.index) + u64::from(b.begin))
        .expect("an offset that fits in memory");
    Message::Piece {
        index: b.index,
        begin: b.begin,
        data: Bytes::copy_from_slice(&bytes[start..start + b.length as usize]),
    }
}

/// Tell the tracker at `base_url` that `peer_id` seeds `info_hash` at `port` (on the address
/// the request comes from).
///
/// Panics when the tracker cannot be reached or refuses.
pub async fn announce_as_seeder(base_url: &str, info_hash: InfoHash, peer_id: PeerId, port: u16) {
    let req = AnnounceRequest {
        info_hash,
        peer_id,
        port,
        uploaded: 0,
        downloaded: 0,
        left: 0,
        event: Event::Started,
        compact: true,
        numwant: Some(0),
        no_peer_id: false,
        key: None,
        ip: None,
        zone: None,
    };
    let body = http_client()
        .get(format!("{base_url}/announce?{}", req.to_query()))
        .send()
        .await
        .unwrap_or_else(|e| panic!("announcing a fake seeder: {e}"))
        .bytes()
        .await
        .unwrap_or_else(|e| panic!("announcing a fake seeder: {e}"));
    match AnnounceResponse::decode(&body) {
        Ok(TrackerReply::Ok(_)) => {}
        Ok(TrackerReply::Failure(why)) => panic!("the tracker refused a fake seeder: {why}"),
        Err(e) => panic!("the tracker's answer to a fake seeder: {e}"),
    }
}
