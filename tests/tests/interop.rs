#![allow(clippy::unwrap_used)]
//! Interop: fbpkg-rs against the BitTorrent clients people already run, Debian's builds of
//! aria2 1.36, qBittorrent 4.5.2 (qbittorrent-nox), Transmission 3.00 and opentracker.
//!
//! For each stock client, every role it can play:
//!
//! - (a) two stock clients, one seeding and one downloading, finding each other only through
//!   our tracker;
//! - (b) a stock client downloading a package from our agent (`fbpkg-rs publish`, the agent
//!   seeds it from its cache): a file, and a tree package (`publish NAME DIR`, a multi-file
//!   torrent with BEP 47 padding, seeded from the cached tree);
//! - (c) our agent (`fbpkg-rs get`) downloading a package only a stock client seeds (the torrent
//!   built from our metainfo, announced to our tracker), a tree package too from aria2 and
//!   qBittorrent;
//! - opentracker: a package whose metainfo announces to opentracker (whitelist mode), fetched
//!   by our agent from a stock seeder that only opentracker knows;
//! - and how our agent treats a stock peer beyond the transfer: no redial loop against a
//!   qBittorrent seed, and fetching from Transmission as fast as Transmission itself does.
//!
//! Every transfer is checked by the SHA-256 of the resulting file against the published one
//! (a tree's, file by file: [`interop::tree::compare`]), and timed (`interop-timing` lines, shown with `--nocapture`); `agent_downloads_from_agent`
//! times the same transfer between two of our agents. Everything is on loopback except where
//! Transmission must dial a peer: it never dials 127.0.0.0/8, so those cells run it in a network
//! namespace the test creates on 198.19.x.0/24 (root only; skipped with the reason otherwise).
//! DHT, local peer discovery, PEX and UPnP/NAT-PMP are off in every client, and the metainfo is
//! private.
//!
//! A missing client binary skips its cells with a message (`scripts/interop-deps.sh` installs
//! them all; CI runs it). Sizes are small by default so the suite stays quick;
//! `FBPKG_INTEROP_BYTES=33554432` runs every cell on 32 MiB for timings:
//!
//! ```sh
//! FBPKG_INTEROP_BYTES=33554432 cargo test -p fbpkg-tests --test interop -- \
//!     --nocapture --test-threads 1 2>&1 | grep -E 'interop-timing|^test '
//! ```

#[path = "interop/mod.rs"]
mod interop;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use fbpkg_common::metainfo::FileKind;
use fbpkg_tests::log_field;

use interop::netns::TestNet;
use interop::opentracker::Opentracker;
use interop::scene::{Package, Scene, package_bytes, transfer_timeout};
use interop::stock::{Kind, Place, Stock};
use interop::tree::Links;
use interop::{skip_without, skip_without_netns};

/// Most cells: 1 MiB (32 pieces of 32 KiB).
const SMALL: usize = 1 << 20;
/// The qBittorrent cells, quick to start and fast: 4 MiB (128 pieces).
const MEDIUM: usize = 4 << 20;

/// Where the cells of `kind` run when the client must dial a peer: Transmission in a test
/// namespace with `hosts` addresses, everyone else on loopback. `Err(())` when the cell must
/// be skipped (said why already).
fn dialing_net(kind: Kind, hosts: u8) -> Result<Option<TestNet>, ()> {
    if kind != Kind::Transmission {
        return Ok(None);
    }
    if skip_without_netns() {
        return Err(());
    }
    TestNet::create(hosts)
        .map(Some)
        .map_err(|e| panic!("creating the test namespace: {e}"))
}

/// Where our tracker and agents listen: loopback, or the root end of `net`.
fn our_ip(net: Option<&TestNet>) -> Ipv4Addr {
    net.map_or(Ipv4Addr::LOCALHOST, TestNet::root_addr)
}

/// Where stock client `i` runs.
fn place(net: Option<&TestNet>, i: u8) -> Place<'_> {
    net.map_or(Place::Loopback, |n| Place::Namespace(n, n.host_addr(i)))
}

/// (a) `kind` seeds, another `kind` downloads, through our tracker only.
async fn stock_downloads_from_stock(kind: Kind, cell: &'static str, default_size: usize) {
    stock_downloads_from(kind, kind, cell, default_size).await;
}

/// `leecher` downloads from `seeder`, both stock clients, through our tracker.
async fn stock_downloads_from(
    seeder: Kind,
    leecher: Kind,
    cell: &'static str,
    default_size: usize,
) {
    if skip_without(seeder.binaries()) || skip_without(leecher.binaries()) {
        return;
    }
    // Only a dialling Transmission needs namespaces; a Transmission seeder is dialled.
    let Ok(net) = dialing_net(leecher, 2) else {
        return;
    };
    let scene = Scene::new(cell, our_ip(net.as_ref())).await;
    let size = package_bytes(default_size);
    let package = scene.publish_random("stockpair", size).await;

    let seeder = Stock::start(seeder, &scene.path("seeder"), place(net.as_ref(), 0))
        .await
        .unwrap();
    let handle = scene
        .stock_seeds(&seeder, &package, "seeder/data", None)
        .await;
    let leecher = Stock::start(leecher, &scene.path("leecher"), place(net.as_ref(), 1))
        .await
        .unwrap();
    let took = match scene
        .stock_downloads(&leecher, &package, "leecher/data")
        .await
    {
        Ok(took) => took,
        Err(e) => panic!("{e}\nthe seeder:\n{}", seeder.diagnosis(&handle).await),
    };
    scene.report(size, took);
    scene.wait_uploaded(&seeder, &handle, size).await;
    drop((leecher, seeder));
    scene.finish().await;
}

/// What our agent publishes in a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// One file of the cell's size.
    File,
    /// A directory ([`interop::tree::make`]) whose largest file is the cell's size.
    Tree(Links),
}

/// (b) our agent publishes and seeds a package of `shape`; `kind` downloads.
async fn stock_downloads_from_agent(
    kind: Kind,
    shape: Shape,
    cell: &'static str,
    default_size: usize,
) {
    if skip_without(kind.binaries()) {
        return;
    }
    let Ok(net) = dialing_net(kind, 1) else {
        return;
    };
    let scene = Scene::new(cell, our_ip(net.as_ref())).await;
    let agent = scene.agent("agent").await;
    let package = match shape {
        Shape::File => {
            let size = package_bytes(default_size);
            scene.agent_publishes(&agent, "fromagent", size).await
        }
        Shape::Tree(links) => {
            let dir = scene.path("published/fromagent");
            interop::tree::make(&dir, package_bytes(default_size), links);
            let package = scene.agent_publishes_tree(&agent, "fromagent", &dir).await;
            // The cell is about padding as much as files: it must have some to say so.
            assert!(
                package
                    .metainfo
                    .files
                    .iter()
                    .any(|f| f.kind == FileKind::Pad),
                "the tree's metainfo has no padding: {:?}",
                package.metainfo.files
            );
            package
        }
    };
    let size = package.size();

    let stock = Stock::start(kind, &scene.path("stock"), place(net.as_ref(), 0))
        .await
        .unwrap();
    let took = match scene.stock_downloads(&stock, &package, "stock/data").await {
        Ok(took) => took,
        Err(e) => panic!("{e}\nthe agent:\n{}", agent.log_tail()),
    };
    scene.report(size, took);
    scene.wait_agent_uploaded(&agent, &package).await;
    drop((stock, agent));
    scene.finish().await;
}

/// (c) `kind` seeds a package of `shape` published to our tracker; our agent gets it.
async fn agent_downloads_from_stock(
    kind: Kind,
    shape: Shape,
    cell: &'static str,
    default_size: usize,
) {
    if skip_without(kind.binaries()) {
        return;
    }
    // Our agent dials the stock seed, which only has to accept: loopback for every client.
    let scene = Scene::new(cell, Ipv4Addr::LOCALHOST).await;
    let package = match shape {
        Shape::File => {
            let size = package_bytes(default_size);
            scene.publish_random("fromstock", size).await
        }
        Shape::Tree(links) => {
            let dir = scene.path("published/fromstock");
            interop::tree::make(&dir, package_bytes(default_size), links);
            scene.publish_tree("fromstock", &dir).await
        }
    };
    let size = package.size();

    let stock = Stock::start(kind, &scene.path("stock"), Place::Loopback)
        .await
        .unwrap();
    let handle = scene
        .stock_seeds(&stock, &package, "stock/data", None)
        .await;
    let agent = scene.agent("agent").await;
    let took = match scene.agent_gets(&agent, &package).await {
        Ok(took) => took,
        Err(e) => panic!("{e}\nthe seeder:\n{}", stock.diagnosis(&handle).await),
    };
    scene.report(size, took);
    scene.wait_uploaded(&stock, &handle, size).await;
    drop((agent, stock));
    scene.finish().await;
}

// The timing reference: the same transfer between two of our agents.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_downloads_from_agent() {
    let scene = Scene::new("agent<-agent", Ipv4Addr::LOCALHOST).await;
    let size = package_bytes(SMALL);
    let seed = scene.agent("seed").await;
    let package = scene.agent_publishes(&seed, "baseline", size).await;
    let leech = scene.agent("leech").await;
    let took = scene.agent_gets(&leech, &package).await.unwrap();
    scene.report(size, took);
    scene.wait_agent_uploaded(&seed, &package).await;
    drop((leech, seed));
    scene.finish().await;
}

// aria2

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aria2_downloads_from_aria2_through_our_tracker() {
    stock_downloads_from_stock(Kind::Aria2, "aria2<-aria2", SMALL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aria2_downloads_from_our_agent() {
    stock_downloads_from_agent(Kind::Aria2, Shape::File, "aria2<-agent", SMALL).await;
}

/// A tree package ([`interop::tree::make`]: padding before and after a file of more than a
/// piece, small files in nested directories, an executable, an empty file) reaches aria2 as
/// its files under `<download dir>/<name>/`, byte for byte; aria2 writes the padding as `.pad/N`
/// files of zeros. No symlinks: aria2 1.36 does not know BEP 47 links, and makes an empty
/// file where a link is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aria2_downloads_a_tree_from_our_agent() {
    stock_downloads_from_agent(
        Kind::Aria2,
        Shape::Tree(Links::None),
        "aria2<-agent (tree)",
        SMALL,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_agent_downloads_from_aria2() {
    agent_downloads_from_stock(Kind::Aria2, Shape::File, "agent<-aria2", SMALL).await;
}

// qBittorrent

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qbittorrent_downloads_from_qbittorrent_through_our_tracker() {
    stock_downloads_from_stock(Kind::Qbittorrent, "qbittorrent<-qbittorrent", MEDIUM).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qbittorrent_downloads_from_our_agent() {
    stock_downloads_from_agent(Kind::Qbittorrent, Shape::File, "qbittorrent<-agent", MEDIUM).await;
}

/// A tree package (with links, which the agent makes from the metainfo: the seed has none)
/// from a qBittorrent seed: what libtorrent sends for padding, our agent drops, and it
/// installs the tree whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_agent_downloads_a_tree_from_qbittorrent() {
    agent_downloads_from_stock(
        Kind::Qbittorrent,
        Shape::Tree(Links::Some),
        "agent<-qbittorrent (tree)",
        MEDIUM,
    )
    .await;
}

/// The same from aria2, which does not know BEP 47 padding: it reads the padding from `.pad/N`
/// files of zeros in its copy and sends it like any other bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_agent_downloads_a_tree_from_aria2() {
    agent_downloads_from_stock(
        Kind::Aria2,
        Shape::Tree(Links::Some),
        "agent<-aria2 (tree)",
        SMALL,
    )
    .await;
}

/// [`aria2_downloads_a_tree_from_our_agent`] for qBittorrent, with symlinks: libtorrent 2.0
/// knows BEP 47, so it writes no padding and makes the links (to a file, and from the root
/// to a nested directory), each of which must lead where the published one does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qbittorrent_downloads_a_tree_from_our_agent() {
    stock_downloads_from_agent(
        Kind::Qbittorrent,
        Shape::Tree(Links::Some),
        "qbittorrent<-agent (tree)",
        MEDIUM,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_agent_downloads_from_qbittorrent() {
    agent_downloads_from_stock(Kind::Qbittorrent, Shape::File, "agent<-qbittorrent", MEDIUM).await;
}

/// Once our agent has the package, it and the qBittorrent seed are both seeds, and libtorrent
/// closes a connection between two seeds. The agent must not dial the seed again and again:
/// over a few seconds after the `get`, a handful of dials at most.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_agent_does_not_redial_a_qbittorrent_seed_in_a_loop() {
    /// Outgoing connections to the seed allowed in all: the download's, and a few more.
    const MAX_DIALS: usize = 4;
    /// How long the agent is watched after the `get`.
    const WATCH: Duration = Duration::from_secs(5);
    if skip_without(Kind::Qbittorrent.binaries()) {
        return;
    }
    let scene = Scene::new("agent<-qbittorrent (redial)", Ipv4Addr::LOCALHOST).await;
    let package = scene.publish_random("redial", package_bytes(SMALL)).await;
    let stock = Stock::start(Kind::Qbittorrent, &scene.path("stock"), Place::Loopback)
        .await
        .unwrap();
    let handle = scene
        .stock_seeds(&stock, &package, "stock/data", None)
        .await;
    // The per-connection lines are at debug level.
    let agent = scene
        .agent_with("agent", &["--log", "info,fbpkg_peer::engine::peer=debug"])
        .await;
    if let Err(e) = scene.agent_gets(&agent, &package).await {
        panic!("{e}\nthe seeder:\n{}", stock.diagnosis(&handle).await);
    }

    let seed = stock.peer_addr().to_string();
    let dials = || {
        agent
            .log_lines()
            .into_iter()
            .filter(|l| {
                l.contains("peer connected")
                    && log_field(l, "peer") == Some(seed.as_str())
                    && log_field(l, "outgoing") == Some("true")
            })
            .collect::<Vec<_>>()
    };
    // Watch for the whole window; fail as soon as the count is over.
    let watched = tokio::time::timeout(WATCH, async {
        loop {
            let seen = dials();
            if seen.len() > MAX_DIALS {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    if let Ok(seen) = watched {
        panic!(
            "the agent dialed the seed {} times so far, at most {MAX_DIALS} expected in {WATCH:?} \
             after the get; first and last:\n  {}\n  {}",
            seen.len(),
            seen.first().map_or("", String::as_str),
            seen.last().map_or("", String::as_str),
        );
    }
    // The download itself dialed the seed: a count of 0 means the log line changed, not that
    // the agent behaves.
    assert!(
        !dials().is_empty(),
        "no `peer connected ... outgoing=true` line for {seed}: has the log format changed?\n{}",
        agent.log_tail()
    );
    drop((agent, stock));
    scene.finish().await;
}

// Transmission

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transmission_downloads_from_transmission_through_our_tracker() {
    stock_downloads_from_stock(Kind::Transmission, "transmission<-transmission", SMALL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transmission_downloads_from_our_agent() {
    stock_downloads_from_agent(
        Kind::Transmission,
        Shape::File,
        "transmission<-agent",
        SMALL,
    )
    .await;
}

/// [`aria2_downloads_a_tree_from_our_agent`] for Transmission, which does not create the empty
/// file (Transmission 3.00 never creates zero-length files, transmission/transmission#417).
/// No symlinks: Transmission 3.00 does not know BEP 47 links, and makes nothing where a link
/// is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transmission_downloads_a_tree_from_our_agent() {
    stock_downloads_from_agent(
        Kind::Transmission,
        Shape::Tree(Links::None),
        "transmission<-agent (tree)",
        SMALL,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_agent_downloads_from_transmission() {
    agent_downloads_from_stock(
        Kind::Transmission,
        Shape::File,
        "agent<-transmission",
        SMALL,
    )
    .await;
}

/// The reference for the cell above: how fast another stock client (qBittorrent, whose
/// libtorrent was reported to fetch 32 MiB from a Transmission seeder in 8 s) gets the same
/// package from the same kind of seeder, on loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qbittorrent_downloads_from_transmission() {
    stock_downloads_from(
        Kind::Transmission,
        Kind::Qbittorrent,
        "qbittorrent<-transmission",
        SMALL,
    )
    .await;
}

/// Transmission unchokes a new peer only at its next rechoke (every 10 s), so the first byte
/// takes a while whoever asks; after that, our agent must fetch about as fast as another
/// Transmission does (2.6 MiB/s from the first piece on, measured here the same way for
/// `transmission_downloads_from_transmission_through_our_tracker`; 1 MiB/s is the floor
/// asserted, so a loaded machine does not fail it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_agent_fetches_from_transmission_at_transmission_speed() {
    const BYTES: usize = 8 << 20;
    const MIN_RATE: f64 = (1 << 20) as f64;
    if skip_without(Kind::Transmission.binaries()) {
        return;
    }
    let scene = Scene::new("agent<-transmission (rate)", Ipv4Addr::LOCALHOST).await;
    let package = scene.publish_random("rate", BYTES).await;
    let stock = Stock::start(Kind::Transmission, &scene.path("stock"), Place::Loopback)
        .await
        .unwrap();
    let handle = scene
        .stock_seeds(&stock, &package, "stock/data", None)
        .await;
    let agent = scene.agent("agent").await;

    // Watch the agent's progress while `get` runs: when the first verified piece is in, and
    // when the last one is.
    let sha = package.sha256().to_hex();
    let watch = async {
        let (mut first, deadline) = (None, Instant::now() + transfer_timeout(BYTES));
        while Instant::now() < deadline {
            let have = agent.status().await.ok().and_then(|s| {
                s.into_iter()
                    .find(|t| t.sha256 == sha)
                    .map(|t| t.bytes_have)
            });
            match have {
                Some(h) if h >= BYTES as u64 => return first.map(|f: Instant| f.elapsed()),
                Some(h) if h > 0 && first.is_none() => first = Some(Instant::now()),
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    };
    let (got, after_first) = tokio::join!(scene.agent_gets(&agent, &package), watch);
    if let Err(e) = got {
        panic!("{e}\nthe seeder:\n{}", stock.diagnosis(&handle).await);
    }
    let after_first =
        after_first.expect("the agent's progress was not seen from first to last piece");
    let rate = BYTES as f64 / after_first.as_secs_f64().max(0.001);
    eprintln!(
        "interop-timing cell=agent<-transmission-after-first-piece bytes={BYTES} secs={:.3} mib_per_s={:.2}",
        after_first.as_secs_f64(),
        rate / f64::from(1 << 20)
    );
    assert!(
        rate >= MIN_RATE,
        "{:.2} MiB/s from Transmission after the first piece ({after_first:?} for {BYTES} bytes), \
         at least {:.2} expected",
        rate / f64::from(1 << 20),
        MIN_RATE / f64::from(1 << 20)
    );
    drop((agent, stock));
    scene.finish().await;
}

/// A port taken between [`free_port`](interop::process::free_port) and the client's own bind
/// (by a sibling test's client) is noticed, so the client is started again on another, and not
/// mistaken for a client of the test's own or for a client that failed: both log the failed
/// bind and exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_clients_notice_a_port_taken_before_they_bind_it() {
    use interop::process::StartError;
    if skip_without(&[interop::opentracker::BINARY, interop::aria2::BINARY]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Whatever holds the port closes each connection at once (the thread, blocked in
    // `accept`, ends with the test binary).
    let taken = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    std::thread::spawn(move || taken.incoming().for_each(drop));
    let said = |r: Result<(), StartError>| match r {
        Err(StartError::PortTaken(why)) => why,
        Err(StartError::Failed(why)) => panic!("failed, not noticed as a taken port: {why}"),
        Ok(()) => panic!("a client on a taken port passed as the test's own"),
    };

    let aria2_dir = dir.path().join("aria2");
    std::fs::create_dir_all(&aria2_dir).unwrap();
    let why = said(
        interop::aria2::Aria2::start_once(&aria2_dir, port)
            .await
            .map(drop),
    );
    assert!(
        why.contains(&format!("failed to bind TCP port {port}")),
        "{why}"
    );

    let hash = Package::random("taken", 1 << 10, "http://127.0.0.1:1/announce")
        .metainfo
        .info_hash;
    let why = said(
        Opentracker::start_once(dir.path(), &[hash], port)
            .await
            .map(drop),
    );
    assert!(why.contains("Address already in use"), "{why}");
}

// opentracker

/// The package's metainfo announces to opentracker, which knows only its info-hash; aria2
/// seeds it there and nowhere else. Our tracker's catalog has the metainfo (so `get` can
/// resolve the reference) but no peer: the agent must announce where the metainfo says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_agent_downloads_through_opentracker_from_aria2() {
    if skip_without(&[interop::opentracker::BINARY]) || skip_without(Kind::Aria2.binaries()) {
        return;
    }
    let scene = Scene::new("agent<-aria2 (opentracker)", Ipv4Addr::LOCALHOST).await;
    let size = package_bytes(SMALL);
    // The info-hash does not depend on the announce URL: make the package, start opentracker
    // with its hash, then point the metainfo at it.
    let draft = Package::random("viaopentracker", size, "http://127.0.0.1:1/announce");
    let opentracker = Opentracker::start(&scene.path("opentracker"), &[draft.metainfo.info_hash])
        .await
        .unwrap();
    let package = draft.announcing_to(&opentracker.announce_url());
    scene.publish(&package).await;

    let stock = Stock::start(Kind::Aria2, &scene.path("stock"), Place::Loopback)
        .await
        .unwrap();
    let handle = scene
        .stock_seeds(&stock, &package, "stock/data", Some(&opentracker))
        .await;
    let agent = scene.agent("agent").await;
    let took = match scene.agent_gets(&agent, &package).await {
        Ok(took) => took,
        Err(e) => panic!(
            "{e}\nthe seeder:\n{}\nopentracker:\n{}",
            stock.diagnosis(&handle).await,
            opentracker.log_tail()
        ),
    };
    scene.report(size, took);
    drop((agent, stock, opentracker));
    scene.finish().await;
}
