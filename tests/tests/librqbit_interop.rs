#![allow(clippy::unwrap_used)]
//! Interop: a stock BitTorrent client (librqbit) downloads an fbpkg package from another
//! librqbit, finding it only through our tracker.
//!
//! Our tracker runs embedded on loopback; the package is published through the catalog API.
//! Two librqbit sessions listen on 127.0.0.1 only, with DHT, local service discovery, UPnP and
//! persistence off, and the metainfo is private (no PEX), so the tracker's peer list is the only
//! way B can learn of A. A seeds the file it already has; B must end up with the same bytes,
//! A must have uploaded them, and the tracker must have seen both peers, B turning seeder.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fbpkg_tests::{http_client, publish, random_package, wait_for};
use fbpkg_tracker::{Config, Embedded};
use librqbit::{
    AddTorrent, AddTorrentOptions, ListenerMode, ListenerOptions, ManagedTorrent, Session,
    SessionOptions,
};
use reqwest::StatusCode;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const PACKAGE_BYTES: usize = 4 << 20;
const FILE_NAME: &str = "interop.bin";
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// A librqbit session listening on 127.0.0.1 and announcing that port.
///
/// librqbit announces port 4240 for a loopback listener unless told the port, and takes no
/// pre-bound socket, so the port is chosen by binding port 0 and releasing it; if something
/// takes it in between, the session fails to bind and the next attempt picks another.
async fn loopback_session(dir: &Path) -> (Arc<Session>, u16) {
    let mut last_error = None;
    for _ in 0..5 {
        let port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let opts = SessionOptions {
            dht: None,
            disable_local_service_discovery: true,
            persistence: None,
            fastresume: false,
            ipv4_only: true,
            listen: Some(ListenerOptions {
                mode: ListenerMode::TcpOnly,
                listen_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                announce_port: Some(port),
                enable_upnp_port_forwarding: false,
                ipv4_only: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        match Session::new_with_opts(dir.to_owned(), opts).await {
            Ok(s) => return (s, port),
            Err(e) => last_error = Some(e),
        }
    }
    panic!("no librqbit session could listen on loopback: {last_error:?}");
}

async fn add(session: &Arc<Session>, torrent: &[u8], dir: &Path) -> Arc<ManagedTorrent> {
    session
        .add_torrent(
            AddTorrent::from_bytes(torrent.to_vec()),
            Some(AddTorrentOptions {
                output_folder: Some(dir.to_str().unwrap().to_owned()),
                overwrite: true,
                ..Default::default()
            }),
        )
        .await
        .unwrap()
        .into_handle()
        .unwrap()
}

/// The peers our tracker lists for `info_hash`: (address, bytes left), and its completed count.
async fn swarm(
    client: &reqwest::Client,
    base_url: &str,
    info_hash: &str,
) -> Result<(Vec<(String, u64)>, u64), String> {
    let swarms: Value = client
        .get(format!("{base_url}/api/v1/swarms"))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    let s = swarms
        .as_array()
        .and_then(|a| a.iter().find(|s| s["info_hash"] == info_hash))
        .ok_or_else(|| format!("no swarm {info_hash} in {swarms}"))?;
    let peers = s["peers"]
        .as_array()
        .ok_or("no peers array")?
        .iter()
        .map(|p| {
            (
                p["addr"].as_str().unwrap_or_default().to_owned(),
                p["left"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect();
    Ok((peers, s["completed"].as_u64().unwrap_or(0)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn librqbit_downloads_from_librqbit_through_our_tracker() {
    let dirs = tempfile::tempdir().unwrap();
    let (catalog, dir_a, dir_b) = (
        dirs.path().join("catalog"),
        dirs.path().join("a"),
        dirs.path().join("b"),
    );
    for d in [&catalog, &dir_a, &dir_b] {
        std::fs::create_dir_all(d).unwrap();
    }
    let config = Config {
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        data_dir: catalog,
        // librqbit re-announces after `min interval`: 1 s lets B report its completion quickly.
        min_announce_interval: Duration::from_secs(1),
        ..Config::default()
    };
    let tracker = Embedded::start(config, CancellationToken::new())
        .await
        .unwrap();
    let base = format!("http://{}", tracker.addr);
    let client = http_client();

    let (bytes, metainfo) = random_package(
        &mut rand::rng(),
        PACKAGE_BYTES,
        FILE_NAME,
        &tracker.announce_url(),
    );
    assert_eq!(
        publish(&client, &base, "interop", &metainfo).await.unwrap(),
        StatusCode::CREATED
    );
    std::fs::write(dir_a.join(FILE_NAME), &bytes).unwrap();
    let info_hash = metainfo.info_hash.to_hex();

    // A: has the file, verifies it and seeds.
    let (session_a, port_a) = loopback_session(&dir_a).await;
    let handle_a = add(&session_a, metainfo.as_bytes(), &dir_a).await;
    tokio::time::timeout(Duration::from_secs(30), handle_a.wait_until_completed())
        .await
        .expect("A did not finish checking its copy within 30 s")
        .unwrap();
    let addr_a = format!("127.0.0.1:{port_a}");
    let (c, b, h, a) = (&client, base.as_str(), info_hash.as_str(), &addr_a);
    wait_for(
        "the tracker to list A as a seeder",
        Duration::from_secs(30),
        || async move {
            match swarm(c, b, h).await? {
                (peers, _) if peers.contains(&(a.clone(), 0)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;

    // B: starts empty; its only source of peers is our tracker.
    let (session_b, port_b) = loopback_session(&dir_b).await;
    let handle_b = add(&session_b, metainfo.as_bytes(), &dir_b).await;
    tokio::time::timeout(DOWNLOAD_TIMEOUT, handle_b.wait_until_completed())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "B did not download within {DOWNLOAD_TIMEOUT:?}: {}",
                handle_b.stats()
            )
        })
        .unwrap();
    let got = std::fs::read(dir_b.join(FILE_NAME)).unwrap();
    assert!(got == bytes, "B's copy differs from the published bytes");
    assert!(
        handle_a.stats().uploaded_bytes >= PACKAGE_BYTES as u64,
        "B's bytes did not come from A: A uploaded {}",
        handle_a.stats().uploaded_bytes
    );

    // The tracker saw both: A seeding, B announcing and then reporting its completion.
    let addr_b = format!("127.0.0.1:{port_b}");
    let ab = &addr_b;
    wait_for(
        "the tracker to list B as a seeder",
        Duration::from_secs(15),
        || async move {
            match swarm(c, b, h).await? {
                (peers, completed)
                    if peers.contains(&(a.clone(), 0))
                        && peers.contains(&(ab.clone(), 0))
                        && completed >= 1 =>
                {
                    Ok(())
                }
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;

    for s in [session_a, session_b] {
        tokio::time::timeout(Duration::from_secs(10), s.stop())
            .await
            .expect("a librqbit session did not stop");
    }
    tracker.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), tracker.task)
        .await
        .expect("the tracker did not stop")
        .unwrap()
        .unwrap();
}
