#![allow(clippy::unwrap_used)]
//! Flash crowd: one seed and six agents fetch one 8 MiB package at the same moment.
//!
//! Every engine runs in this process against an embedded tracker on loopback, as `fbpkg-rs
//! demo` does. Checked:
//!
//! - every leecher ends `Seeding`, and its launch path holds exactly the published bytes;
//! - the seed uploads at most 1.25x the package: it super-seeds, handing each piece out about
//!   once, and the crowd trades the rest among itself;
//! - while a leecher is still downloading, its cache has no entry `<cache>/<name>/<sha>`, and
//!   an entry, the moment it appears, is whole (the cache never holds a partial package).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fbpkg_common::metainfo::BLOCK_SIZE;
use fbpkg_common::metainfo::Metainfo;
use fbpkg_common::pkgref::PackageName;
use fbpkg_common::wire::{BlockRef, DEFAULT_MAX_MESSAGE, Message};
use fbpkg_peer::cache::CachedPackage;
use fbpkg_peer::engine::{Engine, Phase, Torrent};
use fbpkg_tests::{
    Raw, Staged, embedded_tracker, engine, handshake_as, random_package, random_peer_id,
    seed_from_cache, stop_tracker,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const LEECHERS: usize = 6;
const PACKAGE_BYTES: usize = 8 << 20;
const FILE_NAME: &str = "crowd.bin";
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// The seed's upload may exceed one package by this much (endgame, a piece offered twice).
const MAX_SEED_UPLOAD_RATIO: f64 = 1.25;
/// How often the leechers' caches are looked at while they download.
const SAMPLE_EVERY: Duration = Duration::from_millis(2);

/// What the sampler saw of one leecher.
#[derive(Debug, Default)]
struct Watch {
    /// Samples taken while it was downloading.
    downloading_samples: u64,
    /// Its entry directory was seen while it was still downloading (before and after the stat).
    entry_while_downloading: bool,
    /// The entry was seen and checked whole.
    entry_checked: bool,
}

/// Look at one leecher: phase, entry directory, phase again. An entry that exists while the
/// phase was `Downloading` on both sides of the stat is a partial entry in the cache.
fn sample(t: &Torrent, entry_dir: &Path, meta: &Metainfo, bytes: &[u8], w: &mut Watch) {
    let before = t.current_phase();
    let exists = entry_dir.exists();
    let after = t.current_phase();
    let downloading = matches!(before, Phase::Downloading) && matches!(after, Phase::Downloading);
    if downloading {
        w.downloading_samples += 1;
        if exists {
            w.entry_while_downloading = true;
        }
    }
    if exists && !w.entry_checked {
        // The entry appears in one rename after the SHA-256 matched: whatever instant it is
        // first seen, it must already hold the whole package.
        let data = std::fs::read(entry_dir.join(&meta.name)).unwrap();
        assert!(
            data == bytes,
            "{} appeared with {} bytes that are not the package",
            entry_dir.display(),
            data.len()
        );
        w.entry_checked = true;
    }
}

/// Wait until `t` is seeding, and return its cache entry; panics if it fails, or with `why`
/// if `deadline` passes first.
async fn seeding_before(t: &Torrent, deadline: Instant, why: &str) -> CachedPackage {
    loop {
        match t.current_phase() {
            Phase::Seeding(entry) => return entry,
            Phase::Failed { .. } => panic!("the download failed: {:?}", t.status()),
            _ => {}
        }
        assert!(Instant::now() < deadline, "{why}: {:?}", t.status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crowd_gets_each_piece_from_the_seed_about_once() {
    let dirs = tempfile::tempdir().unwrap();
    let base = dirs.path();
    let tracker = embedded_tracker(&base.join("tracker"), |c| {
        // Leechers that started before their neighbours re-announce after `min interval` to
        // learn of them.
        c.min_announce_interval = Duration::from_secs(1);
    })
    .await;
    let url = format!("http://{}", tracker.addr);
    let cancel = CancellationToken::new();

    let name = PackageName::new("crowd").unwrap();
    let (bytes, meta) = random_package(
        &mut rand::rng(),
        PACKAGE_BYTES,
        FILE_NAME,
        &tracker.announce_url(),
    );
    let meta = Arc::new(meta);

    // The seed: the package in its cache, seeded from there, then listed by the tracker.
    let seed = engine(&base.join("seed"), &url, &cancel, |_| {}).await;
    let seeding = seed_from_cache(&seed, &name, &meta, &bytes, base);
    seed.tracker().publish(&name, &meta).await.unwrap();

    let mut leechers = Vec::new();
    for i in 0..LEECHERS {
        leechers.push(engine(&base.join(format!("leecher{i}")), &url, &cancel, |_| {}).await);
    }
    let mut torrents = Vec::new();
    let mut entry_dirs: Vec<PathBuf> = Vec::new();
    for l in &leechers {
        entry_dirs.push(l.cache().entry_dir(&name, &meta.sha256));
        torrents.push(l.download(name.clone(), meta.clone()).await.unwrap());
    }
    let started = Instant::now();

    let mut watches: Vec<Watch> = (0..LEECHERS).map(|_| Watch::default()).collect();
    let deadline = started + DOWNLOAD_TIMEOUT;
    loop {
        for ((t, dir), w) in torrents.iter().zip(&entry_dirs).zip(&mut watches) {
            sample(t, dir, &meta, &bytes, w);
        }
        let done = torrents
            .iter()
            .all(|t| matches!(t.current_phase(), Phase::Seeding(_) | Phase::Failed { .. }));
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the crowd did not finish within {DOWNLOAD_TIMEOUT:?}: {:#?}",
            torrents.iter().map(|t| t.status()).collect::<Vec<_>>()
        );
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    let took = started.elapsed();

    for (i, ((t, dir), w)) in torrents
        .iter()
        .zip(&entry_dirs)
        .zip(&mut watches)
        .enumerate()
    {
        let launch = match t.current_phase() {
            Phase::Seeding(entry) => entry.launch_path,
            other => panic!("leecher{i} ended {other:?}"),
        };
        assert_eq!(launch, dir.join(FILE_NAME), "leecher{i}'s launch path");
        assert!(
            std::fs::read(&launch).unwrap() == bytes,
            "leecher{i}'s copy differs from the published bytes"
        );
        sample(t, dir, &meta, &bytes, w);
        assert!(w.entry_checked, "leecher{i}: entry never checked");
        assert!(
            !w.entry_while_downloading,
            "leecher{i}: {} existed while it was still downloading",
            dir.display()
        );
        assert!(
            w.downloading_samples > 0,
            "leecher{i} was never seen downloading: the partial-entry check saw nothing"
        );
        assert!(
            !staging_has_leftovers(&leechers[i]),
            "leecher{i}: staging leftovers"
        );
    }

    let seed_up = seeding.uploaded();
    let ratio = seed_up as f64 / PACKAGE_BYTES as f64;
    let crowd_down: u64 = torrents.iter().map(|t| t.downloaded()).sum();
    eprintln!(
        "{LEECHERS} leechers got {PACKAGE_BYTES} bytes in {took:?}; seed uploaded {ratio:.2}x, \
         the crowd received {crowd_down} piece bytes"
    );
    assert!(
        crowd_down >= (LEECHERS * PACKAGE_BYTES) as u64,
        "the crowd received {crowd_down} bytes, less than {LEECHERS} packages"
    );
    assert!(
        ratio <= MAX_SEED_UPLOAD_RATIO,
        "the seed uploaded {seed_up} bytes = {ratio:.2}x the package (at most \
         {MAX_SEED_UPLOAD_RATIO}x expected from super-seeding)"
    );

    cancel.cancel();
    for e in leechers.iter().chain([&seed]) {
        e.shutdown().await;
    }
    stop_tracker(tracker).await.unwrap();
}

/// Does the engine's cache still hold something under `.staging`?
fn staging_has_leftovers(e: &Engine) -> bool {
    std::fs::read_dir(e.cache().root().join(".staging"))
        .map(|mut rd| rd.next().is_some())
        .unwrap_or(false)
}

/// A leecher that already holds all but one piece (a resumed download) still gets the last one
/// from a super-seeding seed. The seed offers its first pieces before the leecher's bitfield
/// arrives; they are most likely pieces the leecher holds, and it must be offered others, or
/// it has nothing to be interested in and waits for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leecher_holding_most_pieces_gets_the_rest_from_a_super_seed() {
    let st = Staged::new("resumed", 4 << 20).await;
    let (base, url, cancel) = (st.base(), &st.url, &st.cancel);
    let (name, meta, bytes) = (&st.name, &st.meta, &st.bytes[..]);
    let n = meta.num_pieces();
    assert!(
        n >= 32,
        "{n} pieces: too few for the seed's first offers to miss"
    );

    let seed = engine(&base.join("seed"), url, cancel, |_| {}).await;
    let seeding = seed_from_cache(&seed, name, meta, bytes, base);
    seed.tracker().publish(name, meta).await.unwrap();

    // The leecher's partial download: every piece but the last, as a previous run left it.
    let work = base.join("leecher/work").join(meta.info_hash.to_hex());
    std::fs::create_dir_all(&work).unwrap();
    let last = meta.piece_offset(n - 1) as usize;
    let mut part = bytes.to_vec();
    part[last..].fill(0);
    std::fs::write(work.join(fbpkg_peer::storage::PART_FILE), &part).unwrap();
    let leecher = engine(&base.join("leecher"), url, cancel, |_| {}).await;
    let t = leecher.download(name.clone(), meta.clone()).await.unwrap();
    assert_eq!(
        t.status().pieces_have,
        n - 1,
        "the partial download was not resumed"
    );

    let deadline = Instant::now() + DOWNLOAD_TIMEOUT;
    let entry = seeding_before(&t, deadline, "the last piece never came").await;
    assert!(std::fs::read(&entry.launch_path).unwrap() == bytes);
    assert_eq!(t.downloaded(), u64::from(meta.piece_size(n - 1)));
    assert_eq!(seeding.uploaded(), u64::from(meta.piece_size(n - 1)));

    cancel.cancel();
    for e in [&leecher, &seed] {
        e.shutdown().await;
    }
    stop_tracker(st.tracker).await.unwrap();
}

/// A peer that starts a super-seed's offers and never finishes them does not hold the crowd
/// back: once its offers are stale, the seed offers them to a leecher with nothing else to
/// take. It asks for one block of each piece it is offered and no more, as a prefetch capped
/// far below the crowd's rate nearly does (one capped at 16 KiB/s kept a rollout's hosts
/// waiting 48 s for the seed's last pieces); before, the leecher here waited for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_a_peer_never_finishes_go_to_another_leecher() {
    let st = Staged::new("hoarded", 1 << 20).await;
    let (base, url, cancel) = (st.base(), &st.url, &st.cancel);
    let (name, meta, bytes) = (&st.name, &st.meta, &st.bytes[..]);
    assert!(
        meta.piece_length > u64::from(BLOCK_SIZE),
        "a piece of one block cannot be left half requested"
    );

    let seed = engine(&base.join("seed"), url, cancel, |_| {}).await;
    let seeding = seed_from_cache(&seed, name, meta, bytes, base);
    seed.tracker().publish(name, meta).await.unwrap();

    // The hoarder, with an agent's peer id so that the seed rations it.
    let Raw {
        mut stream,
        mut buf,
    } = handshake_as(
        std::net::Ipv4Addr::new(127, 0, 0, 2),
        seed.listen_addr(),
        meta,
        random_peer_id(b"-FB0100-"),
    )
    .await
    .expect("the seed answers the handshake");
    let mut out = bytes::BytesMut::new();
    Message::Interested.encode(&mut out);
    stream.write_all(&out).await.unwrap();
    let mut hoarded = Vec::new();
    let deadline = Instant::now() + DOWNLOAD_TIMEOUT;
    while hoarded.len() < 2 {
        while let Some(m) = Message::decode(&mut buf, DEFAULT_MAX_MESSAGE).unwrap() {
            if let Message::Have(index) = m {
                let mut out = bytes::BytesMut::new();
                Message::Request(BlockRef {
                    index,
                    begin: 0,
                    length: BLOCK_SIZE,
                })
                .encode(&mut out);
                stream.write_all(&out).await.unwrap();
                hoarded.push(index);
            }
        }
        let n = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf))
            .await
            .expect("the seed offered the hoarder two pieces")
            .unwrap();
        assert!(n > 0, "the seed closed the hoarder's connection");
    }
    // From now on it only reads, so that the seed is never blocked writing to it.
    let hoarder = tokio::spawn(async move {
        let mut sink = vec![0u8; 64 << 10];
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    });

    let leecher = engine(&base.join("leecher"), url, cancel, |_| {}).await;
    let t = leecher.download(name.clone(), meta.clone()).await.unwrap();
    let why = format!("the pieces offered to the hoarder ({hoarded:?}) never came");
    let entry = seeding_before(&t, deadline, &why).await;
    assert!(std::fs::read(&entry.launch_path).unwrap() == bytes);
    // The package went out once, and one block of each hoarded piece besides.
    let most = bytes.len() as u64 + hoarded.len() as u64 * u64::from(BLOCK_SIZE);
    assert!(
        seeding.uploaded() <= most,
        "the seed uploaded {} bytes for a package of {}",
        seeding.uploaded(),
        bytes.len()
    );

    hoarder.abort();
    cancel.cancel();
    for e in [&leecher, &seed] {
        e.shutdown().await;
    }
    stop_tracker(st.tracker).await.unwrap();
}
