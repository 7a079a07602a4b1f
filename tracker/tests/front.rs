//! The connection front over a real socket: keep-alive, pipelining, HTTP/1.0, hand-over to
//! the router, malformed input, and the bounds on slow or too many clients.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use fbpkg_common::PeerId;
use fbpkg_common::metainfo::{Format, Metainfo};
use fbpkg_common::tracker_proto::{AnnounceRequest, AnnounceResponse, Event, TrackerReply};
use fbpkg_tracker::metrics::Cutoff;
use fbpkg_tracker::{Config, Embedded, serve_announce};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

async fn tracker() -> (Embedded, tempfile::TempDir) {
    tracker_with(|_| {}).await
}

async fn tracker_with(tweak: impl FnOnce(&mut Config)) -> (Embedded, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        allow_unregistered: true,
        ..Config::default()
    };
    tweak(&mut config);
    (
        Embedded::start(config, CancellationToken::new())
            .await
            .unwrap(),
        dir,
    )
}

fn announce(id: u8) -> String {
    format!("/announce?{}", announce_req(id).to_query())
}

fn announce_req(id: u8) -> AnnounceRequest {
    let data = vec![id; 1000];
    let m = Metainfo::build(&data[..], 1000, "x", "http://t/announce", Format::File).unwrap();
    AnnounceRequest {
        info_hash: m.info_hash,
        peer_id: PeerId([id; 20]),
        port: 6881,
        uploaded: 0,
        downloaded: 0,
        left: 10,
        event: Event::Started,
        compact: true,
        numwant: None,
        no_peer_id: false,
        key: None,
        ip: None,
        zone: None,
    }
}

/// Poll `cond` every 10 ms until it holds; panics after 10 s.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Read until the server closes (end of stream or reset); what was read before it.
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "connection still open after {within:?}: {got:?}"
    );
    got
}

/// Send `start`, then a never-ending request target one byte every `every`, until the server
/// closes the connection; returns what it answered and how long after the call it closed.
async fn trickle(s: TcpStream, start: &str, every: Duration) -> (Vec<u8>, Duration) {
    let started = tokio::time::Instant::now();
    let (mut r, mut w) = s.into_split();
    let bytes: Vec<u8> = start
        .bytes()
        .chain(std::iter::repeat_n(b'a', 1 << 20))
        .collect();
    let writer = tokio::spawn(async move {
        for b in bytes {
            if w.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
    });
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(8), async {
        loop {
            match r.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    writer.abort();
    assert!(
        closed.is_ok(),
        "a head trickled in for 8 s was not cut: {got:?}"
    );
    (got, started.elapsed())
}

/// Read HTTP/1.1 responses (with content-length) until `n` are complete or the peer closes.
async fn read_responses(s: &mut TcpStream, n: usize) -> Vec<(u16, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while out.len() < n {
        let mut chunk = [0u8; 4096];
        let read = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .expect("response in time");
        let got = read.unwrap();
        buf.extend_from_slice(&chunk[..got]);
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let status: u16 = head[9..12].parse().unwrap();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            if buf.len() < end + 4 + len {
                break;
            }
            out.push((status, buf[end + 4..end + 4 + len].to_vec()));
            buf.drain(..end + 4 + len);
        }
        if got == 0 {
            break;
        }
    }
    out
}

#[tokio::test]
async fn keep_alive_pipelining_and_hand_over() {
    let (t, _dir) = tracker().await;
    let mut s = TcpStream::connect(t.addr).await.unwrap();
    // Two announces in one write, then a dashboard request on the same connection.
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: x\r\n\r\nGET {} HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        announce(1),
        announce(2)
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let got = read_responses(&mut s, 3).await;
    assert_eq!(got.len(), 3, "{got:?}");
    for (status, body) in &got[..2] {
        assert_eq!(*status, 200);
        assert!(matches!(
            AnnounceResponse::decode(body).unwrap(),
            TrackerReply::Ok(_)
        ));
    }
    assert_eq!(got[2], (200, b"ok\n".to_vec()), "handed to the router");
    // The router keeps serving announces on that connection too.
    s.write_all(format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", announce(3)).as_bytes())
        .await
        .unwrap();
    let got = read_responses(&mut s, 1).await;
    assert_eq!(got[0].0, 200);
    t.shutdown.cancel();
}

#[tokio::test]
async fn http10_closes_and_garbage_is_refused() {
    let (t, _dir) = tracker().await;
    let mut s = TcpStream::connect(t.addr).await.unwrap();
    s.write_all(format!("GET {} HTTP/1.0\r\n\r\n", announce(1)).as_bytes())
        .await
        .unwrap();
    let got = read_responses(&mut s, 2).await;
    assert_eq!(got.len(), 1);
    let mut rest = Vec::new();
    assert_eq!(
        s.read_to_end(&mut rest).await.unwrap(),
        0,
        "closed after an HTTP/1.0 answer"
    );

    let mut s = TcpStream::connect(t.addr).await.unwrap();
    s.write_all(b"\x16\x03\x01 not http at all\r\n\r\n")
        .await
        .unwrap();
    let got = read_responses(&mut s, 1).await;
    assert_eq!(got[0].0, 400);

    let mut s = TcpStream::connect(t.addr).await.unwrap();
    let long = format!(
        "GET /announce?{} HTTP/1.1\r\nHost: x\r\n\r\n",
        "a".repeat(6000)
    );
    s.write_all(long.as_bytes()).await.unwrap();
    let got = read_responses(&mut s, 1).await;
    assert_eq!(got[0].0, 414);

    // A short request line with 9 KB of headers: 431, and the answer arrives whole although
    // the client sent more than the tracker read (closing with unread input would reset the
    // connection and lose the answer).
    let mut s = TcpStream::connect(t.addr).await.unwrap();
    let big = format!(
        "GET {} HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        announce(1),
        "b".repeat(9000)
    );
    s.write_all(big.as_bytes()).await.unwrap();
    let got = read_responses(&mut s, 1).await;
    assert_eq!(got[0].0, 431);
    t.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), t.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_trickled_head_is_cut_at_the_head_deadline() {
    let head_timeout = Duration::from_millis(500);
    let (t, _dir) = tracker_with(|c| c.head_timeout = head_timeout).await;
    // One byte every 100 ms: each read well within any per-read limit.
    let s = TcpStream::connect(t.addr).await.unwrap();
    let (got, took) = trickle(s, "GET /announce?", Duration::from_millis(100)).await;
    assert!(
        took >= head_timeout,
        "cut after {took:?}, before the deadline"
    );
    assert!(
        String::from_utf8_lossy(&got).starts_with("HTTP/1.1 408"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(t.state.metrics.cutoffs(Cutoff::HeadTimeout) >= 1);

    // Same on a keep-alive connection, for the second head, from its first byte.
    let mut s = TcpStream::connect(t.addr).await.unwrap();
    s.write_all(format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", announce(1)).as_bytes())
        .await
        .unwrap();
    assert_eq!(read_responses(&mut s, 1).await[0].0, 200);
    let (got, _) = trickle(s, "GET /announce?", Duration::from_millis(100)).await;
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 408"));

    // And on a connection handed over to hyper.
    let mut s = TcpStream::connect(t.addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_responses(&mut s, 1).await[0], (200, b"ok\n".to_vec()));
    trickle(s, "GET /healthz?", Duration::from_millis(100)).await;
    t.shutdown.cancel();
}

#[tokio::test]
async fn a_client_that_does_not_read_is_cut_at_the_write_deadline() {
    let (t, _dir) = tracker_with(|c| c.write_timeout = Duration::from_millis(300)).await;
    // Big answers: 200 peers with ids each.
    let mut req = announce_req(1);
    for i in 0..200u8 {
        let mut peer = req.clone();
        peer.peer_id = PeerId([i; 20]);
        let ip = std::net::IpAddr::from([127, 0, 1, i]);
        serve_announce(&t.state, ip, &peer.to_query(), tokio::time::Instant::now());
    }
    req.compact = false;
    req.numwant = Some(200);
    let request = format!(
        "GET /announce?{} HTTP/1.1\r\nHost: x\r\n\r\n",
        req.to_query()
    );
    // Pipeline requests and never read: the answers fill both socket buffers.
    let s = TcpStream::connect(t.addr).await.unwrap();
    let (_r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        for _ in 0..100_000 {
            if w.write_all(request.as_bytes()).await.is_err() {
                return;
            }
        }
    });
    until("the write deadline to cut the connection", || {
        t.state.metrics.cutoffs(Cutoff::WriteTimeout) == 1
    })
    .await;
    until("its slot to be given back", || {
        t.state.open_connections() == 0
    })
    .await;
    writer.abort();

    // The same on a connection handed to the router: /api/v1/swarms lists the 200 peers.
    let request = "GET /api/v1/swarms HTTP/1.1\r\nHost: x\r\n\r\n";
    let s = TcpStream::connect(t.addr).await.unwrap();
    let (_r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        for _ in 0..100_000 {
            if w.write_all(request.as_bytes()).await.is_err() {
                return;
            }
        }
    });
    until("the write deadline to cut the router's connection", || {
        t.state.metrics.cutoffs(Cutoff::WriteTimeout) == 2
    })
    .await;
    until("its slot to be given back", || {
        t.state.open_connections() == 0
    })
    .await;
    writer.abort();
    t.shutdown.cancel();
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_at_once() {
    let (t, _dir) = tracker_with(|c| c.max_connections = 2).await;
    let held: Vec<TcpStream> = vec![
        TcpStream::connect(t.addr).await.unwrap(),
        TcpStream::connect(t.addr).await.unwrap(),
    ];
    until("two connections held", || t.state.open_connections() == 2).await;
    // The default head deadline is 10 s: a prompt close is the cap's doing.
    let mut third = TcpStream::connect(t.addr).await.unwrap();
    let got = read_until_closed(&mut third, Duration::from_secs(3)).await;
    assert!(got.is_empty(), "{got:?}");
    assert_eq!(t.state.metrics.cutoffs(Cutoff::OverCap), 1);
    // A slot given back is a slot for the next one.
    drop(held);
    until("slots given back", || t.state.open_connections() == 0).await;
    let mut s = TcpStream::connect(t.addr).await.unwrap();
    s.write_all(format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", announce(1)).as_bytes())
        .await
        .unwrap();
    assert_eq!(read_responses(&mut s, 1).await[0].0, 200);
    t.shutdown.cancel();
}
