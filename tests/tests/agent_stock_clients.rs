#![allow(clippy::unwrap_used)]
//! Wire habits of stock BitTorrent clients that an agent must get along with, each played by
//! a fake peer written with the wire codec:
//!
//! - aria2 sends a bitfield or have-all late, instead of haves: the agent merges it into what
//!   it knows of the peer, and still drops a peer whose bitfield is malformed;
//! - a qBittorrent seed closes the connection right after the handshake (with a fresh peer id
//!   each time): the agent backs off from it instead of redialling in a loop;
//! - transmission answers requests in batches every ~500 ms: the agent keeps enough requests
//!   outstanding to fill a batch, instead of the few that 0.5 s at the measured rate gave.
//! - a seed gives its upload slots to peers that say they are interested: the agent says it
//!   is not any more once it holds the package.
//! - a stock client hears of every piece the agent verifies; one of our own agents only of
//!   those it lacks, when it is downloading from the agent (then a have-all at the end).
//!
//! Fake peers connect from 127.0.0.2 (the agent listens on 127.0.0.1), or listen on 127.0.0.1
//! and are announced to the tracker as seeders.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fbpkg_common::bitfield::Bitfield;
use fbpkg_common::metainfo::Metainfo;
use fbpkg_common::wire::{BlockRef, DEFAULT_MAX_MESSAGE, Message, ext};
use fbpkg_peer::engine::{Engine, Phase, Torrent};
use fbpkg_tests::{
    Raw, Staged, accept_handshake, announce_as_seeder, engine, handshake_as, handshake_from,
    random_peer_id, real_block, stop_tracker, wait_for,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// Where the fake peers that dial the agent come from.
const FAKE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// A tracker and one agent (an engine) that wants a fresh random package nobody else has.
struct Leecher {
    staged: Staged,
    engine: Arc<Engine>,
}

impl std::ops::Deref for Leecher {
    type Target = Staged;
    fn deref(&self) -> &Staged {
        &self.staged
    }
}

impl Leecher {
    /// Everything but the download itself, which [`Leecher::start`] begins.
    async fn new(size: usize) -> Self {
        let staged = Staged::new("target", size).await;
        let s = &staged;
        let engine = engine(&s.base().join("leecher"), &s.url, &s.cancel, |_| {}).await;
        engine.tracker().publish(&s.name, &s.meta).await.unwrap();
        Self { staged, engine }
    }

    async fn start(&self) -> Arc<Torrent> {
        self.engine
            .download(self.name.clone(), self.meta.clone())
            .await
            .unwrap()
    }

    /// A connection from a fake peer at [`FAKE`], past the handshake.
    async fn fake_peer(&self) -> Raw {
        handshake_from(FAKE, self.engine.listen_addr(), &self.meta)
            .await
            .expect("the agent answers the handshake")
    }

    /// Wait for `t` to end and check that it holds the package.
    async fn finished(&self, t: &Torrent) {
        let ended = tokio::time::timeout(DOWNLOAD_TIMEOUT, t.finished())
            .await
            .unwrap_or_else(|_| panic!("no end within {DOWNLOAD_TIMEOUT:?}: {:?}", t.status()));
        let Phase::Seeding(entry) = ended else {
            panic!("the download ended {ended:?}");
        };
        assert!(
            std::fs::read(&entry.launch_path).unwrap() == *self.bytes,
            "the cached bytes are not the package"
        );
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.engine.shutdown().await;
        let _ = stop_tracker(self.staged.tracker).await;
    }
}

fn bitfield_message(bits: &Bitfield) -> Message {
    Message::Bitfield(Bytes::copy_from_slice(bits.as_bytes()))
}

/// Serve every request on `raw` with the real bytes, until `done` is cancelled; `Err` says
/// how the connection ended first (closed by the agent, or an I/O error). Every message from
/// the agent goes to `seen` too.
async fn serve(
    raw: &mut Raw,
    meta: &Metainfo,
    bytes: &[u8],
    done: &CancellationToken,
    mut seen: impl FnMut(&Message),
) -> Result<(), String> {
    loop {
        let mut out = BytesMut::new();
        while let Some(m) = Message::decode(&mut raw.buf, DEFAULT_MAX_MESSAGE).unwrap() {
            seen(&m);
            if let Message::Request(b) = m {
                real_block(meta, bytes, b).encode(&mut out);
            }
        }
        if !out.is_empty() {
            raw.stream
                .write_all(&out)
                .await
                .map_err(|e| format!("writing: {e}"))?;
        }
        tokio::select! {
            _ = done.cancelled() => return Ok(()),
            r = raw.stream.read_buf(&mut raw.buf) => match r {
                Ok(0) => return Err("the agent closed the connection".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("reading: {e}")),
            },
        }
    }
}

/// A fake seeder dials the agent and says what it has in `opening` (first the required
/// message, then what aria2 sends late), then serves every request. Only the late messages
/// tell the agent of some pieces: the download completes over this one connection only if
/// the agent merges them in and keeps the connection.
async fn download_after(opening: impl FnOnce(u32) -> Vec<Message>) {
    let leecher = Leecher::new(2 << 20).await;
    let t = leecher.start().await;
    let mut raw = leecher.fake_peer().await;
    let mut out = BytesMut::new();
    for m in opening(leecher.meta.num_pieces()) {
        m.encode(&mut out);
    }
    raw.stream.write_all(&out).await.unwrap();
    let done = CancellationToken::new();
    let (meta, bytes) = (leecher.meta.clone(), leecher.bytes.clone());
    let mut served = {
        let done = done.clone();
        tokio::spawn(async move { serve(&mut raw, &meta, &bytes, &done, |_| {}).await })
    };
    tokio::select! {
        () = leecher.finished(&t) => {}
        ended = &mut served => panic!(
            "the only connection ended before the download did: {:?}",
            ended.unwrap()
        ),
    }
    done.cancel();
    served.await.unwrap().unwrap();
    leecher.stop().await;
}

/// Even pieces in the first bitfield, odd ones in a second, later one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_bitfield_adds_to_what_the_peer_has() {
    download_after(|n| {
        let (mut even, mut odd) = (Bitfield::new(n), Bitfield::new(n));
        for i in 0..n {
            if i % 2 == 0 {
                even.set(i)
            } else {
                odd.set(i)
            };
        }
        vec![
            bitfield_message(&even),
            Message::Unchoke,
            bitfield_message(&odd),
        ]
    })
    .await;
}

/// Have-none first; a have-none and a have-all later (the late have-none takes nothing away).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_have_all_follows_have_none() {
    download_after(|_| {
        vec![
            Message::HaveNone,
            Message::Unchoke,
            Message::HaveNone,
            Message::HaveAll,
            Message::HaveNone,
        ]
    })
    .await;
}

/// A seed that serves the whole package hears first that the agent is interested, and once
/// the agent holds every piece, that it is not any more. (The agent asks itself whether it is
/// still interested once per run of pieces verified, not after each piece.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_seed_hears_the_agent_lose_interest_when_it_is_done() {
    let leecher = Leecher::new(2 << 20).await;
    let t = leecher.start().await;
    let mut raw = leecher.fake_peer().await;
    let mut out = BytesMut::new();
    bitfield_message(&Bitfield::full(leecher.meta.num_pieces())).encode(&mut out);
    Message::Unchoke.encode(&mut out);
    raw.stream.write_all(&out).await.unwrap();
    let interest = Arc::new(Mutex::new(Vec::new()));
    let done = CancellationToken::new();
    let (meta, bytes) = (leecher.meta.clone(), leecher.bytes.clone());
    let served = {
        let (done, interest) = (done.clone(), interest.clone());
        tokio::spawn(async move {
            serve(&mut raw, &meta, &bytes, &done, |m| {
                if matches!(m, Message::Interested | Message::NotInterested) {
                    interest.lock().unwrap().push(m.clone());
                }
            })
            .await
        })
    };
    leecher.finished(&t).await;
    let said = wait_for(
        "the agent to say it is not interested any more",
        DOWNLOAD_TIMEOUT,
        || {
            let said = interest.lock().unwrap().clone();
            async move {
                match said.last() {
                    Some(Message::NotInterested) => Ok(said),
                    _ => Err(format!("it said {said:?}")),
                }
            }
        },
    )
    .await;
    assert_eq!(
        said,
        vec![Message::Interested, Message::NotInterested],
        "interested once, until done"
    );
    done.cancel();
    // Two seeds have nothing to trade: the agent may hang up first.
    let ended = served.await.unwrap();
    assert!(
        ended
            .as_ref()
            .map_or_else(|e| e.contains("closed"), |()| true),
        "{ended:?}"
    );
    leecher.stop().await;
}

/// Three peers that hold the even pieces listen while the agent downloads from a fourth: a
/// stock client that is interested in the agent, one of our agents that is, and one of our
/// agents that is not (as a seed would be, or an origin that counts the copies of the pieces
/// it handed out by the `have`s it hears). The stock client and the uninterested agent hear a
/// `have` for every piece. The interested agent hears only of the odd pieces, which it
/// lacks, and then a `have-all`, which tells it the agent is a seed now.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_downloading_hears_only_of_the_pieces_it_lacks() {
    let leecher = Leecher::new(2 << 20).await;
    let t = leecher.start().await;
    let n = leecher.meta.num_pieces();
    let mut even = Bitfield::new(n);
    for i in (0..n).step_by(2) {
        even.set(i);
    }
    let done = CancellationToken::new();
    let mut listeners = Vec::new();
    for (tag, interested) in [
        (b"-XX0001-", true),
        (b"-FB0100-", true),
        (b"-FB0100-", false),
    ] {
        let mut raw = handshake_as(
            FAKE,
            leecher.engine.listen_addr(),
            &leecher.meta,
            random_peer_id(tag),
        )
        .await
        .expect("the agent answers the handshake");
        let mut out = BytesMut::new();
        bitfield_message(&even).encode(&mut out);
        if interested {
            Message::Interested.encode(&mut out);
        }
        raw.stream.write_all(&out).await.unwrap();
        let heard = Arc::new(Mutex::new(Vec::new()));
        let (meta, bytes, done, h) = (
            leecher.meta.clone(),
            leecher.bytes.clone(),
            done.clone(),
            heard.clone(),
        );
        let task = tokio::spawn(async move {
            serve(&mut raw, &meta, &bytes, &done, |m| {
                h.lock().unwrap().push(m.clone())
            })
            .await
        });
        listeners.push((tag, interested, heard, task));
    }
    // Nothing is served until the agent has greeted every listener and unchoked those that
    // are interested: it has read that they are.
    for (_, interested, heard, _) in &listeners {
        wait_for("the agent to greet the listener", DOWNLOAD_TIMEOUT, || {
            let heard = heard.lock().unwrap().clone();
            async move {
                let greeted = heard.first() == Some(&Message::HaveNone);
                if greeted && (!interested || heard.contains(&Message::Unchoke)) {
                    Ok(())
                } else {
                    Err(format!("it said {heard:?}"))
                }
            }
        })
        .await;
    }
    let mut seed = leecher.fake_peer().await;
    let mut out = BytesMut::new();
    bitfield_message(&Bitfield::full(n)).encode(&mut out);
    Message::Unchoke.encode(&mut out);
    seed.stream.write_all(&out).await.unwrap();
    let served = {
        let (meta, bytes, done) = (leecher.meta.clone(), leecher.bytes.clone(), done.clone());
        tokio::spawn(async move { serve(&mut seed, &meta, &bytes, &done, |_| {}).await })
    };
    leecher.finished(&t).await;
    let haves = |heard: &[Message]| -> Vec<u32> {
        heard
            .iter()
            .filter_map(|m| match m {
                Message::Have(i) => Some(*i),
                _ => None,
            })
            .collect()
    };
    for (tag, interested, heard, _) in &listeners {
        let who = format!(
            "{} ({})",
            String::from_utf8_lossy(*tag),
            if *interested {
                "interested"
            } else {
                "not interested"
            }
        );
        let withheld = tag.starts_with(b"-FB") && *interested;
        let heard = wait_for(
            &format!("{who} to hear of every piece"),
            DOWNLOAD_TIMEOUT,
            || {
                let heard = heard.lock().unwrap().clone();
                async move {
                    let all =
                        heard.contains(&Message::HaveAll) || haves(&heard).len() == n as usize;
                    if all {
                        Ok(heard)
                    } else {
                        Err(format!("it heard {heard:?}"))
                    }
                }
            },
        )
        .await;
        let mut told = haves(&heard);
        told.sort_unstable();
        if withheld {
            let odd: Vec<u32> = (1..n).step_by(2).collect();
            assert!(
                told.iter().all(|i| i % 2 == 1),
                "{who}: a have for a piece it holds: {told:?}"
            );
            assert!(
                !told.is_empty(),
                "{who}: no have at all, though it lacks {odd:?}"
            );
            assert_eq!(
                heard.iter().filter(|m| **m == Message::HaveAll).count(),
                1,
                "{who}: one have-all"
            );
        } else {
            assert_eq!(
                told,
                (0..n).collect::<Vec<_>>(),
                "{who}: a have for each piece"
            );
            assert!(!heard.contains(&Message::HaveAll), "{who}: no have-all");
        }
    }
    done.cancel();
    for (_, _, _, task) in listeners {
        let _ = task.await.unwrap();
    }
    let _ = served.await.unwrap();
    leecher.stop().await;
}

/// A late bitfield with a bit set past the last piece is still a protocol violation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_malformed_late_bitfield_ends_the_connection() {
    // A short last piece: the bitfield has spare bits.
    let leecher = Leecher::new((2 << 20) + 100_000).await;
    let _t = leecher.start().await;
    let n = leecher.meta.num_pieces();
    assert!(
        n % 8 != 0,
        "the package needs spare bits in its bitfield: {n} pieces"
    );
    let mut spare = Bitfield::full(n).as_bytes().to_vec();
    *spare.last_mut().unwrap() |= 1;
    let mut raw = leecher.fake_peer().await;
    let mut out = BytesMut::new();
    Message::HaveNone.encode(&mut out);
    Message::Bitfield(Bytes::from(spare)).encode(&mut out);
    raw.stream.write_all(&out).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match raw.stream.read_buf(&mut raw.buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => raw.buf.clear(),
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the agent kept a peer that sent a malformed bitfield"
    );
    leecher.stop().await;
}

/// A fake qBittorrent seed: accepts, answers the handshake with a fresh peer id, says it has
/// everything, and closes at once. The agent must back off from it (exponentially, as from a
/// peer it cannot reach) instead of redialling as fast as the connections close.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_seed_that_hangs_up_at_once_is_not_redialled_in_a_loop() {
    let leecher = Leecher::new(1 << 20).await;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let dials: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let (meta, seen, stop) = (leecher.meta.clone(), dials.clone(), leecher.cancel.clone());
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = stop.cancelled() => return,
                a = listener.accept() => match a {
                    Ok((s, _)) => s,
                    Err(_) => continue,
                },
            };
            seen.lock().unwrap().push(Instant::now());
            let meta = meta.clone();
            tokio::spawn(async move {
                if let Some((mut raw, _)) =
                    accept_handshake(stream, &meta, random_peer_id(b"-qB4630-")).await
                {
                    let mut out = BytesMut::new();
                    Message::HaveAll.encode(&mut out);
                    let _ = raw.stream.write_all(&out).await;
                }
            });
        }
    });
    announce_as_seeder(
        &leecher.url,
        leecher.meta.info_hash,
        random_peer_id(b"-qB4630-"),
        port,
    )
    .await;
    let _t = leecher.start().await;

    let count = || dials.lock().unwrap().len();
    let first = wait_for(
        "the agent to dial the seed",
        Duration::from_secs(30),
        || async {
            dials
                .lock()
                .unwrap()
                .first()
                .copied()
                .ok_or("no dial yet".to_owned())
        },
    )
    .await;
    // It does try again (the seed may have been full for a moment)...
    wait_for(
        "the agent to dial the seed again",
        Duration::from_secs(30),
        || async {
            if count() >= 2 {
                Ok(())
            } else {
                Err(format!("{} dial(s)", count()))
            }
        },
    )
    .await;
    // ...but backs off: 2, 4, 8 s between the dials, where it used to redial as fast as the
    // connections closed (16-266 times in a row against qBittorrent).
    const WINDOW: Duration = Duration::from_secs(10);
    tokio::time::sleep_until(first + WINDOW).await;
    let in_window = dials
        .lock()
        .unwrap()
        .iter()
        .filter(|&&at| at < first + WINDOW)
        .count();
    eprintln!("{in_window} connections within {WINDOW:?} of the first");
    assert!(
        in_window <= 5,
        "{in_window} connections to a seed that hangs up at once within {WINDOW:?}"
    );
    leecher.stop().await;
}

/// A fake transmission seed: answers the requests it holds in one batch every 500 ms. With a
/// request window of 0.5 s of the measured rate, the rate measured was limited by the window
/// itself: the agent kept 16 requests outstanding, 16 blocks a batch, and 32 MiB took a
/// minute. The window must grow until a batch fills the link: here, past 128 (the most a
/// stock client is asked for at once is 250).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_seed_that_answers_in_batches_gets_more_requests_outstanding() {
    const BATCH_EVERY: Duration = Duration::from_millis(500);
    const WANTED: usize = 128;
    let leecher = Leecher::new(32 << 20).await;
    let t = leecher.start().await;
    let mut raw = leecher.fake_peer().await;
    let mut out = BytesMut::new();
    Message::HaveAll.encode(&mut out);
    Message::Unchoke.encode(&mut out);
    raw.stream.write_all(&out).await.unwrap();

    let mut held: Vec<BlockRef> = Vec::new();
    let mut per_batch = Vec::new();
    let mut batches = tokio::time::interval(BATCH_EVERY);
    let grown = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            tokio::select! {
                r = raw.stream.read_buf(&mut raw.buf) => {
                    assert!(r.unwrap() > 0, "the agent closed the connection");
                    while let Some(m) = Message::decode(&mut raw.buf, DEFAULT_MAX_MESSAGE).unwrap() {
                        match m {
                            Message::Request(b) => held.push(b),
                            Message::Cancel(b) => held.retain(|&h| h != b),
                            _ => {}
                        }
                    }
                }
                _ = batches.tick() => {
                    per_batch.push(held.len());
                    if held.len() >= WANTED {
                        return;
                    }
                    let mut out = BytesMut::new();
                    for b in held.drain(..) {
                        real_block(&leecher.meta, &leecher.bytes, b).encode(&mut out);
                    }
                    raw.stream.write_all(&out).await.unwrap();
                }
            }
        }
    })
    .await;
    assert!(
        grown.is_ok(),
        "requests outstanding at each batch never reached {WANTED}: {per_batch:?} ({:?})",
        t.status()
    );
    eprintln!("requests outstanding at each batch: {per_batch:?}");
    leecher.stop().await;
}

/// A seed that says in its extension handshake (BEP 10) that it keeps 20 requests queued: the
/// agent fills that queue and never asks for more at once, and tells the seed its own queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_seeds_reqq_caps_the_requests_outstanding() {
    const BATCH_EVERY: Duration = Duration::from_millis(500);
    const REQQ: usize = 20;
    let leecher = Leecher::new(32 << 20).await;
    let t = leecher.start().await;
    let mut raw = leecher.fake_peer().await;
    let mut out = BytesMut::new();
    Message::HaveAll.encode(&mut out);
    Message::Extended {
        id: ext::HANDSHAKE_ID,
        payload: ext::handshake(REQQ as u32, "fake 1.0", None).into(),
    }
    .encode(&mut out);
    Message::Unchoke.encode(&mut out);
    raw.stream.write_all(&out).await.unwrap();

    let (mut held, mut most, mut theirs): (Vec<BlockRef>, usize, Option<u32>) =
        (Vec::new(), 0, None);
    let mut batches = tokio::time::interval(BATCH_EVERY);
    let filled = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            tokio::select! {
                r = raw.stream.read_buf(&mut raw.buf) => {
                    if r.unwrap() == 0 {
                        return; // done, or gave up on us: the checks below say which
                    }
                    while let Some(m) = Message::decode(&mut raw.buf, DEFAULT_MAX_MESSAGE).unwrap() {
                        match m {
                            Message::Request(b) => held.push(b),
                            Message::Cancel(b) => held.retain(|&h| h != b),
                            Message::Extended { id: ext::HANDSHAKE_ID, payload } => {
                                theirs = ext::reqq(&payload);
                            }
                            _ => {}
                        }
                    }
                    most = most.max(held.len());
                }
                _ = batches.tick() => {
                    if held.len() == REQQ && theirs.is_some() {
                        return;
                    }
                    let mut out = BytesMut::new();
                    for b in held.drain(..) {
                        real_block(&leecher.meta, &leecher.bytes, b).encode(&mut out);
                    }
                    raw.stream.write_all(&out).await.unwrap();
                }
            }
        }
    })
    .await;
    assert!(
        most <= REQQ,
        "{most} requests outstanding, the seed keeps {REQQ}"
    );
    assert!(
        filled.is_ok() && most == REQQ,
        "the queue of {REQQ} was never filled (most {most}, agent's reqq {theirs:?}): {:?}",
        t.status()
    );
    assert_eq!(theirs, Some(512), "the agent's own queue");
    leecher.stop().await;
}
