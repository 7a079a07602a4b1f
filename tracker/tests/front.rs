//! The connection front over a real socket: keep-alive, pipelining, HTTP/1.0, hand-over to
//! the router, malformed input.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use fbpkg_common::PeerId;
use fbpkg_common::metainfo::{Format, Metainfo};
use fbpkg_common::tracker_proto::{AnnounceRequest, AnnounceResponse, Event, TrackerReply};
use fbpkg_tracker::{Config, Embedded};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

async fn tracker() -> (Embedded, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        allow_unregistered: true,
        ..Config::default()
    };
    (
        Embedded::start(config, CancellationToken::new())
            .await
            .unwrap(),
        dir,
    )
}

fn announce(id: u8) -> String {
    let data = vec![id; 1000];
    let m = Metainfo::build(&data[..], 1000, "x", "http://t/announce", Format::File).unwrap();
    let req = AnnounceRequest {
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
    };
    format!("/announce?{}", req.to_query())
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
    t.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), t.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
