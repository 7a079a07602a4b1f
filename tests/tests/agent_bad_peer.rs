#![allow(clippy::unwrap_used)]
//! A peer that serves corrupt blocks is dropped at once and never dialled again, and nothing
//! it sent reaches the cache.
//!
//! The malicious peer is written here with the wire codec: it announces itself to the tracker
//! as a seeder, answers the handshake, says it has everything (`have all`, or a full bitfield
//! for a peer without the fast extension), unchokes, and answers every request with a block of
//! the right length whose bytes are the real ones inverted. An honest in-process seed seeds the
//! same package, either super-seeding at 1 MiB/s (the download lasts a few seconds, and most
//! first blocks come from the malicious peer) or advertising everything at full speed (blocks
//! of one piece come from both peers, so the honest seed shares the blame for failed pieces
//! and must not be banned for it). The leecher must:
//!
//! - end `Seeding` with exactly the published bytes, and nothing else in its cache;
//! - close the malicious connection after its corrupt data, and never connect again for the
//!   rest of its download (while it keeps re-announcing and being told of that peer).

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fbpkg_common::PeerId;
use fbpkg_common::bitfield::Bitfield;
use fbpkg_common::metainfo::Metainfo;
use fbpkg_common::wire::{DEFAULT_MAX_MESSAGE, Message};
use fbpkg_peer::engine::{Engine, EngineConfig, Phase};
use fbpkg_tests::{
    Raw, Staged, accept_handshake, announce_as_seeder, engine, http_client, seed_from_cache,
    stop_tracker, swarm_peers, wait_for,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const PACKAGE_BYTES: usize = 4 << 20;
const HONEST_RATE: u64 = 1 << 20;
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// What the malicious peer sends for a block asked of it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Bad {
    /// The right length, every byte inverted.
    Corrupt,
    /// The right bytes, one short: a block no piece can take.
    Short,
}

/// What the malicious peer saw.
#[derive(Debug, Default)]
struct Seen {
    /// When each connection was accepted.
    connections: Vec<Instant>,
    /// Requests answered with corrupt blocks.
    corrupt_blocks: u64,
    /// When the first corrupt block was sent.
    first_corrupt: Option<Instant>,
    /// When the leecher closed each connection (EOF or reset), after how many corrupt blocks.
    closed: Vec<(Instant, u64)>,
}

/// The malicious peer: accepts every connection for `meta` and serves inverted bytes.
async fn malicious_peer(
    listener: TcpListener,
    meta: Arc<Metainfo>,
    bytes: Arc<Vec<u8>>,
    seen: Arc<Mutex<Seen>>,
    peer_id: PeerId,
    bad: Bad,
    cancel: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => return,
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
        };
        seen.lock().unwrap().connections.push(Instant::now());
        let (meta, bytes, seen, cancel) =
            (meta.clone(), bytes.clone(), seen.clone(), cancel.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = serve_corrupt(stream, &meta, &bytes, &seen, peer_id, bad) => {}
            }
        });
    }
}

/// One connection: handshake, "I have everything", unchoke, then corrupt blocks until the
/// other side closes.
async fn serve_corrupt(
    stream: TcpStream,
    meta: &Metainfo,
    bytes: &[u8],
    seen: &Mutex<Seen>,
    peer_id: PeerId,
    bad: Bad,
) {
    let Some(Raw {
        mut stream,
        mut buf,
    }) = greet_as_seed(stream, meta, peer_id).await
    else {
        return;
    };
    loop {
        loop {
            let m = match Message::decode(&mut buf, DEFAULT_MAX_MESSAGE) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => panic!("the leecher sent an undecodable message: {e}"),
            };
            if let Message::Request(b) = m {
                let start =
                    usize::try_from(meta.piece_offset(b.index) + u64::from(b.begin)).unwrap();
                let data: Vec<u8> = match bad {
                    Bad::Corrupt => bytes[start..start + b.length as usize]
                        .iter()
                        .map(|x| !x)
                        .collect(),
                    Bad::Short => bytes[start..start + b.length as usize - 1].to_vec(),
                };
                let mut out = BytesMut::new();
                Message::Piece {
                    index: b.index,
                    begin: b.begin,
                    data: Bytes::from(data),
                }
                .encode(&mut out);
                if stream.write_all(&out).await.is_err() {
                    break;
                }
                let mut s = seen.lock().unwrap();
                s.corrupt_blocks += 1;
                s.first_corrupt.get_or_insert_with(Instant::now);
            }
        }
        match stream.read_buf(&mut buf).await {
            Ok(n) if n > 0 => continue,
            // EOF, or a reset because our unread data was still queued: the leecher closed.
            _ => {
                let mut s = seen.lock().unwrap();
                let blocks = s.corrupt_blocks;
                s.closed.push((Instant::now(), blocks));
                return;
            }
        }
    }
}

/// How an engine uploads.
#[derive(Debug, Clone, Copy)]
struct Upload {
    max_rate: Option<u64>,
    superseed: bool,
}

/// The agent's defaults.
const DEFAULT_UPLOAD: Upload = Upload {
    max_rate: None,
    superseed: true,
};

impl Upload {
    /// Set an engine's configuration to upload this way.
    fn apply(self, config: &mut EngineConfig) {
        config.max_upload_rate = self.max_rate;
        config.superseed = self.superseed;
    }
}

/// The honest seed super-seeds (two pieces offered at a time) at 1 MiB/s: the leecher takes
/// most of its first blocks from the malicious peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_serving_corrupt_blocks_is_banned_and_never_reaches_the_cache() {
    corrupt_peer_beside(
        Upload {
            max_rate: Some(HONEST_RATE),
            superseed: true,
        },
        Bad::Corrupt,
    )
    .await;
}

/// A peer that answers every request with a block one byte short is dropped, and the blocks
/// asked of it go to the honest seed. They were held for ever: the block left the connection's
/// requests but stayed asked of it in the picker, out of every other peer's reach and out of
/// the request timeout's, and the download never ended while that peer stayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_serving_short_blocks_is_dropped_and_holds_nothing_back() {
    corrupt_peer_beside(
        Upload {
            max_rate: Some(HONEST_RATE),
            superseed: true,
        },
        Bad::Short,
    )
    .await;
}

/// The honest seed advertises everything at full speed (as a leecher that finished does), so
/// the leecher fetches blocks of the same pieces from both peers. A piece with a corrupt block
/// from the malicious peer and good ones from the honest seed fails too; the honest seed must
/// not be banned for it, or the leecher is left with nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_serving_corrupt_blocks_beside_a_full_speed_seed() {
    corrupt_peer_beside(
        Upload {
            max_rate: None,
            superseed: false,
        },
        Bad::Corrupt,
    )
    .await;
}

/// An engine that publishes `staged`'s package and seeds it, set up as `tweak` says.
async fn honest_seed(staged: &Staged, tweak: impl FnOnce(&mut EngineConfig)) -> Arc<Engine> {
    let (base, name, meta) = (staged.base(), &staged.name, &staged.meta);
    let seed = engine(&base.join("seed"), &staged.url, &staged.cancel, tweak).await;
    seed.tracker().publish(name, meta).await.unwrap();
    seed_from_cache(&seed, name, meta, &staged.bytes, base);
    seed
}

/// `leecher` downloads `staged`'s package within [`DOWNLOAD_TIMEOUT`] and holds its exact
/// bytes in its cache.
async fn fetches_whole(leecher: &Engine, staged: &Staged) {
    let t = leecher
        .download(staged.name.clone(), staged.meta.clone())
        .await
        .unwrap();
    let ended = tokio::time::timeout(DOWNLOAD_TIMEOUT, t.finished())
        .await
        .unwrap_or_else(|_| panic!("no end within {DOWNLOAD_TIMEOUT:?}: {:?}", t.status()));
    let Phase::Seeding(entry) = ended else {
        panic!("the leecher ended {ended:?}");
    };
    assert!(
        std::fs::read(&entry.launch_path).unwrap() == **staged.bytes,
        "the leecher's cached bytes are not the package"
    );
}

async fn corrupt_peer_beside(honest: Upload, bad: Bad) {
    // The leecher re-announces every second, so it is told of the malicious peer again and
    // again while it downloads.
    let staged = Staged::new("target", PACKAGE_BYTES).await;
    let (base, url, cancel) = (staged.base(), &staged.url, &staged.cancel);
    let (name, bytes, meta) = (&staged.name, &staged.bytes, &staged.meta);

    let seed = honest_seed(&staged, |c| honest.apply(c)).await;

    // The malicious peer.
    let evil_listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let evil_addr = evil_listener.local_addr().unwrap();
    let evil_id = PeerId(*b"-EV0001-corruptcorru");
    let seen = Arc::new(Mutex::new(Seen::default()));
    tokio::spawn(malicious_peer(
        evil_listener,
        meta.clone(),
        bytes.clone(),
        seen.clone(),
        evil_id,
        bad,
        cancel.clone(),
    ));
    announce_as_seeder(url, meta.info_hash, evil_id, evil_addr.port()).await;
    let (client, ih) = (http_client(), meta.info_hash.to_hex());
    let (c, u, h, honest) = (&client, &url, &ih, seed.listen_addr().to_string());
    let evil = evil_addr.to_string();
    let (honest, evil) = (&honest, &evil);
    wait_for(
        "the tracker to list both seeders",
        Duration::from_secs(15),
        || async move {
            let peers = swarm_peers(c, u, h).await?;
            let listed = |a: &String| peers.contains(&(a.clone(), 0));
            if listed(honest) && listed(evil) {
                Ok(())
            } else {
                Err(format!("{peers:?}"))
            }
        },
    )
    .await;

    // The leecher.
    let leecher = engine(&base.join("leecher"), url, cancel, |c| {
        DEFAULT_UPLOAD.apply(c)
    })
    .await;
    let t = leecher.download(name.clone(), meta.clone()).await.unwrap();
    let ended = tokio::time::timeout(DOWNLOAD_TIMEOUT, t.finished())
        .await
        .unwrap_or_else(|_| panic!("no end within {DOWNLOAD_TIMEOUT:?}: {:?}", t.status()));
    let finished_at = Instant::now();
    let Phase::Seeding(entry) = ended else {
        panic!("the leecher ended {ended:?}");
    };
    assert!(
        std::fs::read(&entry.launch_path).unwrap() == **bytes,
        "the leecher's cached bytes are not the package"
    );
    let cache_root = leecher.cache().root().to_owned();
    let mut names: Vec<_> = std::fs::read_dir(&cache_root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != ".staging")
        .collect();
    names.sort();
    assert_eq!(names, ["target"], "unexpected cache contents");
    let versions: Vec<String> = std::fs::read_dir(cache_root.join("target"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        versions,
        [meta.sha256.to_hex()],
        "unexpected versions cached"
    );
    let staging = std::fs::read_dir(cache_root.join(".staging"))
        .map(|rd| rd.count())
        .unwrap_or(0);
    assert_eq!(staging, 0, "staging leftovers");

    let s = std::mem::take(&mut *seen.lock().unwrap());
    eprintln!(
        "malicious peer: {} connection(s), {} corrupt blocks sent, closed {:?}; download took \
         {:?} after the first corrupt block",
        s.connections.len(),
        s.corrupt_blocks,
        s.closed.iter().map(|(_, n)| n).collect::<Vec<_>>(),
        s.first_corrupt.map(|f| finished_at - f)
    );
    let first_corrupt = s
        .first_corrupt
        .expect("the leecher never asked the malicious peer for a block: nothing was tested");
    // A peer whose pieces fail is banned; one that breaks the protocol may be tried again
    // later, as any broken peer is.
    if bad == Bad::Corrupt {
        assert_eq!(
            s.connections.len(),
            1,
            "the leecher connected to the malicious peer again after dropping it"
        );
    }
    let (closed_at, blocks_before_close) = *s
        .closed
        .first()
        .expect("the leecher never closed the connection to the peer that sent corrupt data");
    assert!(closed_at >= first_corrupt && blocks_before_close > 0);
    assert!(
        closed_at < finished_at,
        "the malicious connection outlived the download"
    );

    cancel.cancel();
    leecher.shutdown().await;
    seed.shutdown().await;
    let _ = stop_tracker(staged.tracker).await;
}

/// The handshake answered, "I have everything" (`have all`, or a full bitfield for a peer
/// without the fast extension) and an unchoke sent: the connection, or `None` for a handshake
/// of another swarm (not answered) or a write that failed.
async fn greet_as_seed(stream: TcpStream, meta: &Metainfo, peer_id: PeerId) -> Option<Raw> {
    let (mut raw, theirs) = accept_handshake(stream, meta, peer_id).await?;
    let mut out = BytesMut::new();
    if theirs.supports_fast() {
        Message::HaveAll.encode(&mut out);
    } else {
        let all = Bitfield::full(meta.num_pieces());
        Message::Bitfield(Bytes::copy_from_slice(all.as_bytes())).encode(&mut out);
    }
    Message::Unchoke.encode(&mut out);
    raw.stream.write_all(&out).await.ok()?;
    Some(raw)
}

/// One connection of a silent peer: handshake, "I have everything", unchoke, then nothing
/// (what it is sent is read and ignored) until the other side closes.
async fn serve_silence(stream: TcpStream, meta: &Metainfo, peer_id: PeerId) {
    let Some(Raw { mut stream, .. }) = greet_as_seed(stream, meta, peer_id).await else {
        return;
    };
    let mut sink = vec![0; 64 << 10];
    while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
}

/// Nine peers that say they have everything, unchoke, and never answer a request, beside an
/// honest seed at 1 MiB/s: the download ends. A peer whose requests time out is asked for one
/// block at a time until it answers, and is dropped after three timeouts in a row (and dialled
/// again only after a backoff). Before, the blocks that timed out went back to the same peer
/// at once (it refills first), each silent peer held four, and nine of them held more than the
/// 32 blocks the endgame starts at: no block was asked of anyone else and the download never
/// ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peers_that_never_answer_hold_back_nothing() {
    const SILENT: u8 = 9;
    let staged = Staged::new("target", PACKAGE_BYTES).await;
    let (base, url, cancel) = (staged.base(), &staged.url, &staged.cancel);
    let meta = &staged.meta;
    let seed = honest_seed(&staged, |c| {
        Upload {
            max_rate: Some(HONEST_RATE),
            superseed: true,
        }
        .apply(c);
    })
    .await;
    for n in 0..SILENT {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut id = *b"-SI0001-silentsilent";
        id[19] = b'a' + n;
        let (m, cancel) = (meta.clone(), cancel.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = cancel.cancelled() => return,
                    a = listener.accept() => match a {
                        Ok((s, _)) => s,
                        Err(_) => continue,
                    },
                };
                let m = m.clone();
                tokio::spawn(async move {
                    serve_silence(stream, &m, PeerId(id)).await;
                });
            }
        });
        announce_as_seeder(url, meta.info_hash, PeerId(id), port).await;
    }

    let leecher = engine(&base.join("leecher"), url, cancel, |c| {
        DEFAULT_UPLOAD.apply(c);
        c.request_timeout = Duration::from_secs(2);
    })
    .await;
    fetches_whole(&leecher, &staged).await;
    cancel.cancel();
    leecher.shutdown().await;
    seed.shutdown().await;
    let _ = stop_tracker(staged.tracker).await;
}

/// One host that opens connections and never sends its handshake holds only a few of the
/// agent's connection slots: the rest of its connections are closed at once, and a leecher
/// from elsewhere downloads. Before, each such connection held a slot until the handshake
/// timeout, and twenty of them held all sixteen here: the seed neither accepted nor dialled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_that_never_handshake_hold_few_slots() {
    const SILENT: usize = 20;
    let staged = Staged::new("target", PACKAGE_BYTES).await;
    let (base, url, cancel) = (staged.base(), &staged.url, &staged.cancel);
    let seed = honest_seed(&staged, |c| {
        c.max_connections = 16;
        c.handshake_timeout = Duration::from_secs(300);
    })
    .await;

    // From another loopback address than the leecher's.
    let mut silent = Vec::new();
    for _ in 0..SILENT {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind((Ipv4Addr::new(127, 0, 0, 9), 0).into())
            .unwrap();
        silent.push(socket.connect(seed.listen_addr()).await.unwrap());
    }
    let closed = Arc::new(Mutex::new(0usize));
    for mut s in silent {
        let closed = closed.clone();
        tokio::spawn(async move {
            let mut b = [0u8; 64];
            // EOF or a reset: the seed let it go.
            if !matches!(s.read(&mut b).await, Ok(n) if n > 0) {
                *closed.lock().unwrap() += 1;
            }
        });
    }
    wait_for(
        "the seed to close what is past the cap",
        DOWNLOAD_TIMEOUT,
        || {
            let n = *closed.lock().unwrap();
            async move {
                if n >= SILENT - fbpkg_peer::engine::HALF_OPEN_PER_ADDRESS as usize {
                    Ok(())
                } else {
                    Err(format!("{n} closed"))
                }
            }
        },
    )
    .await;

    let leecher = engine(&base.join("leecher"), url, cancel, |_| {}).await;
    fetches_whole(&leecher, &staged).await;
    cancel.cancel();
    leecher.shutdown().await;
    seed.shutdown().await;
    let _ = stop_tracker(staged.tracker).await;
}
