#![allow(clippy::unwrap_used)]
//! Interop with a stock BitTorrent client, both ways: librqbit 9.1 fetches a package from our
//! agent, and our agent fetches a package only librqbit seeds.
//!
//! Our tracker runs embedded on loopback (`min interval` 1 s, so librqbit re-announces
//! quickly); our agents are real `fbpkg-rs agent` processes. librqbit sessions listen on
//! 127.0.0.1 only, with DHT, local service discovery, UPnP and persistence off, and the
//! metainfo is private, so the tracker is the only way the two sides find each other.
//!
//! (a) `fbpkg-rs publish` puts the package in the agent's cache; the agent seeds it from there,
//!     super-seeding (a few pieces advertised at a time with `have`) by default, or advertising
//!     everything with `--no-superseed`. librqbit must end with the same bytes, the agent must
//!     have uploaded them, and librqbit must report its completion to our tracker.
//! (b) librqbit seeds a file it has; `fbpkg-rs get` through our agent must print a cache path
//!     holding the same bytes, which the agent then seeds.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use fbpkg_tests::{
    AgentProcess, add_torrent, embedded_tracker, fbpkg_rs, http_client, loopback_session, publish,
    random_package, stop_tracker, swarm_peers, wait_for,
};
use fbpkg_tracker::Embedded;
use rand::RngExt;
use reqwest::StatusCode;

const PACKAGE_BYTES: usize = 4 << 20;
/// A 4 MiB package over loopback takes well under two seconds from a healthy seed.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(30);
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(30);

/// Wait until the tracker lists `addr` as a seeder of `info_hash`.
async fn wait_listed_as_seeder(base_url: &str, info_hash: &str, addr: &str) {
    let client = http_client();
    let (c, u, a) = (&client, base_url, addr);
    wait_for(
        &format!("the tracker to list {addr} as a seeder"),
        ANNOUNCE_TIMEOUT,
        || async move {
            let peers = swarm_peers(c, u, info_hash).await?;
            if peers.contains(&(a.to_owned(), 0)) {
                Ok(())
            } else {
                Err(format!("{peers:?}"))
            }
        },
    )
    .await;
}

/// Our tracker with `min interval` 1 s, so librqbit re-announces quickly.
async fn tracker(dir: &Path) -> Embedded {
    embedded_tracker(dir, |c| c.min_announce_interval = Duration::from_secs(1)).await
}

/// With the agent's default super-seeding. librqbit looks for newly advertised pieces only when
/// a piece completes, a peer dies or 5 s pass, not on `have`; rationed two pieces at a time it
/// would get about two pieces every 5 s. The agent rations only fbpkg-rs peers, so a stock
/// client downloads at full speed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn librqbit_downloads_from_our_super_seeding_agent() {
    librqbit_downloads_from_our_agent(&[]).await;
}

/// The same without super-seeding (`--no-superseed`): everything is advertised at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn librqbit_downloads_from_our_agent_without_super_seeding() {
    librqbit_downloads_from_our_agent(&["--no-superseed"]).await;
}

/// (a): `fbpkg-rs publish` through an agent started with `agent_flags`; librqbit fetches.
async fn librqbit_downloads_from_our_agent(agent_flags: &[&str]) {
    let dirs = tempfile::tempdir().unwrap();
    let base = dirs.path();
    let tracker = tracker(&base.join("tracker")).await;
    let url = format!("http://{}", tracker.addr);

    let agent = AgentProcess::start(
        &base.join("agent/state"),
        &base.join("agent/cache"),
        &url,
        agent_flags,
    )
    .await
    .unwrap();
    let mut bytes = vec![0u8; PACKAGE_BYTES];
    rand::rng().fill(&mut bytes[..]);
    let file = base.join("fromagent.bin");
    std::fs::write(&file, &bytes).unwrap();
    let mut args: Vec<OsString> = vec!["publish".into(), "fromagent".into(), file.into()];
    args.extend(agent.host_args());
    let out = fbpkg_rs(args, Duration::from_secs(30)).await;
    assert!(out.success(), "publish: {out}");
    let sha = out.line().strip_prefix("fromagent:").unwrap().to_owned();
    let status = agent.status().await.unwrap();
    let info_hash = status
        .iter()
        .find(|t| t.sha256 == sha)
        .map(|t| t.info_hash.clone())
        .unwrap_or_else(|| panic!("the agent does not seed what it published: {status:?}"));
    wait_listed_as_seeder(&url, &info_hash, &agent.listen().to_string()).await;
    let entry = agent.cache_dir().join("fromagent").join(&sha);
    let metainfo = std::fs::read(entry.join(fbpkg_peer::cache::METAINFO_FILE)).unwrap();

    let rq_dir = base.join("librqbit");
    std::fs::create_dir_all(&rq_dir).unwrap();
    let (session, port) = loopback_session(&rq_dir).await;
    let handle = add_torrent(&session, &metainfo, &rq_dir).await;
    tokio::time::timeout(DOWNLOAD_TIMEOUT, handle.wait_until_completed())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "librqbit did not download within {DOWNLOAD_TIMEOUT:?}: {}\nagent:\n{}",
                handle.stats(),
                agent.log_tail()
            )
        })
        .unwrap();
    let got = std::fs::read(rq_dir.join("fromagent.bin")).unwrap();
    assert!(
        got == bytes,
        "librqbit's copy differs from the published bytes"
    );
    let status = agent.status().await.unwrap();
    let seeded = status.iter().find(|t| t.sha256 == sha).unwrap();
    assert!(
        seeded.uploaded >= PACKAGE_BYTES as u64,
        "librqbit's bytes did not come from the agent: it uploaded {}",
        seeded.uploaded
    );
    // librqbit reports its completion to our tracker.
    wait_listed_as_seeder(&url, &info_hash, &format!("127.0.0.1:{port}")).await;

    tokio::time::timeout(Duration::from_secs(10), session.stop())
        .await
        .expect("the librqbit session did not stop");
    let _ = stop_tracker(tracker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn our_agent_downloads_what_only_librqbit_seeds() {
    let dirs = tempfile::tempdir().unwrap();
    let base = dirs.path();
    let tracker = tracker(&base.join("tracker")).await;
    let url = format!("http://{}", tracker.addr);

    let (bytes, meta) = random_package(
        &mut rand::rng(),
        PACKAGE_BYTES,
        "fromrqbit.bin",
        &tracker.announce_url(),
    );
    assert_eq!(
        publish(&http_client(), &url, "fromrqbit", &meta)
            .await
            .unwrap(),
        StatusCode::CREATED
    );
    let rq_dir = base.join("librqbit");
    std::fs::create_dir_all(&rq_dir).unwrap();
    std::fs::write(rq_dir.join("fromrqbit.bin"), &bytes).unwrap();
    let (session, port) = loopback_session(&rq_dir).await;
    let handle = add_torrent(&session, meta.as_bytes(), &rq_dir).await;
    tokio::time::timeout(Duration::from_secs(30), handle.wait_until_completed())
        .await
        .expect("librqbit did not finish checking its copy within 30 s")
        .unwrap();
    let info_hash = meta.info_hash.to_hex();
    wait_listed_as_seeder(&url, &info_hash, &format!("127.0.0.1:{port}")).await;

    let agent = AgentProcess::start(
        &base.join("agent/state"),
        &base.join("agent/cache"),
        &url,
        &[],
    )
    .await
    .unwrap();
    let mut args: Vec<OsString> = vec!["get".into(), format!("fromrqbit:{}", meta.sha256).into()];
    args.extend(agent.host_args());
    let out = fbpkg_rs(args, DOWNLOAD_TIMEOUT).await;
    assert!(
        out.success(),
        "get from librqbit: {out}\nagent:\n{}",
        agent.log_tail()
    );
    let path = agent
        .cache_dir()
        .join("fromrqbit")
        .join(meta.sha256.to_hex())
        .join("fromrqbit.bin");
    assert_eq!(Path::new(out.line()), path);
    assert!(
        std::fs::read(&path).unwrap() == bytes,
        "our copy differs from the one librqbit seeds"
    );
    assert!(
        handle.stats().uploaded_bytes >= PACKAGE_BYTES as u64,
        "the agent's bytes did not come from librqbit: it uploaded {}",
        handle.stats().uploaded_bytes
    );
    let status = agent.status().await.unwrap();
    let t = status
        .iter()
        .find(|t| t.info_hash == info_hash)
        .unwrap_or_else(|| panic!("the agent does not list the package: {status:?}"));
    assert_eq!(t.phase, "seeding");
    wait_listed_as_seeder(&url, &info_hash, &agent.listen().to_string()).await;

    tokio::time::timeout(Duration::from_secs(10), session.stop())
        .await
        .expect("the librqbit session did not stop");
    let _ = stop_tracker(tracker).await;
}
