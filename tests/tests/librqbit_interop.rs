#![allow(clippy::unwrap_used)]
//! Interop: a stock BitTorrent client (librqbit) downloads an fbpkg package from another
//! librqbit, finding it only through our tracker.
//!
//! Our tracker runs embedded on loopback; the package is published through the catalog API.
//! Two librqbit sessions listen on 127.0.0.1 only, with DHT, local service discovery, UPnP and
//! persistence off, and the metainfo is private (no PEX), so the tracker's peer list is the only
//! way B can learn of A. The metainfo carries a compression dictionary (`x-fbpkg-zdict`, a
//! top-level key of ours). A seeds the file it already has; B must end up with the same bytes,
//! A must have uploaded them, and the tracker must have seen both peers, B turning seeder.

use std::time::Duration;

use fbpkg_tests::{
    add_torrent, embedded_tracker, http_client, loopback_session, publish, random_package,
    stop_tracker, swarm, wait_for,
};
use reqwest::StatusCode;

const PACKAGE_BYTES: usize = 4 << 20;
const FILE_NAME: &str = "interop.bin";
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(60);

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
    let tracker = embedded_tracker(&catalog, |c| {
        // librqbit re-announces after `min interval`: 1 s lets B report its completion quickly.
        c.min_announce_interval = Duration::from_secs(1);
    })
    .await;
    let base = format!("http://{}", tracker.addr);
    let client = http_client();

    let (bytes, metainfo) = random_package(
        &mut rand::rng(),
        PACKAGE_BYTES,
        FILE_NAME,
        &tracker.announce_url(),
    );
    // With a compression dictionary, as `publish` adds to tree packages: a top-level key
    // stock clients must pass over (the bytes are opaque to them, and to this test).
    let metainfo = metainfo.with_zdict(vec![0x5a; 200 << 10]).unwrap();
    assert_eq!(
        publish(&client, &base, "interop", &metainfo).await.unwrap(),
        StatusCode::CREATED
    );
    std::fs::write(dir_a.join(FILE_NAME), &bytes).unwrap();
    let info_hash = metainfo.info_hash.to_hex();

    // A: has the file, verifies it and seeds.
    let (session_a, port_a) = loopback_session(&dir_a).await;
    let handle_a = add_torrent(&session_a, metainfo.as_bytes(), &dir_a).await;
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
                s if s.peers.contains(&(a.clone(), 0)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;

    // B: starts empty; its only source of peers is our tracker.
    let (session_b, port_b) = loopback_session(&dir_b).await;
    let handle_b = add_torrent(&session_b, metainfo.as_bytes(), &dir_b).await;
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
                s if s.peers.contains(&(a.clone(), 0))
                    && s.peers.contains(&(ab.clone(), 0))
                    && s.completed >= 1 =>
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
    stop_tracker(tracker).await.unwrap();
}
