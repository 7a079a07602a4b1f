#![allow(clippy::unwrap_used)]
//! What one host can do to an agent, and what a crowd of requests does to it:
//!
//! - many `get`s of one package at once start exactly one download (one owner per info-hash);
//! - connections that handshake and stall cannot hold every slot of a package: at most
//!   `max_peers_per_address` come from one address, and when slots run short the ones that
//!   moved no data make room;
//! - a peer that sends requests and never reads cannot make the agent queue answers without
//!   bound, and is dropped once its queue stops moving;
//! - a download that fails for a full disk gives the space back at once (the partial file is
//!   closed, not only removed), and the next download works.
//!
//! Attackers are written here with the wire codec, from other loopback addresses
//! (127.0.0.2 and up) than the honest engines (127.0.0.1).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use fbpkg_common::PeerId;
use fbpkg_common::pkgref::PackageName;
use fbpkg_common::wire::{BlockRef, Message};
use fbpkg_peer::ErrorKind;
use fbpkg_peer::engine::{Engine, EngineConfig, Phase};
use fbpkg_tests::{
    Raw, Staged, admitted, engine, handshake_from, random_package, seed_from_cache, stop_tracker,
    wait_message,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(90);

/// A tracker, a seed of a fresh random package of `size` bytes (configured by `seed_cfg`),
/// all on loopback.
struct Swarm {
    staged: Staged,
    seed: Arc<Engine>,
}

impl std::ops::Deref for Swarm {
    type Target = Staged;
    fn deref(&self) -> &Staged {
        &self.staged
    }
}

impl Swarm {
    async fn new(size: usize, seed_cfg: impl FnOnce(&mut EngineConfig)) -> Self {
        let staged = Staged::new("target", size).await;
        let s = &staged;
        let seed = engine(&s.base().join("seed"), &s.url, &s.cancel, seed_cfg).await;
        seed.tracker().publish(&s.name, &s.meta).await.unwrap();
        seed_from_cache(&seed, &s.name, &s.meta, &s.bytes, s.base());
        Self { staged, seed }
    }

    async fn leecher(&self, label: &str, tweak: impl FnOnce(&mut EngineConfig)) -> Arc<Engine> {
        engine(&self.base().join(label), &self.url, &self.cancel, tweak).await
    }

    /// Download with `leecher` and check the cached bytes; returns how long it took.
    async fn fetch(&self, leecher: &Engine) -> Duration {
        let started = Instant::now();
        let t = leecher
            .download(self.name.clone(), self.meta.clone())
            .await
            .unwrap();
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
        started.elapsed()
    }

    async fn stop(self, engines: &[&Engine]) {
        self.cancel.cancel();
        for e in engines {
            e.shutdown().await;
        }
        self.seed.shutdown().await;
        let _ = stop_tracker(self.staged.tracker).await;
    }
}

/// Sixty connections from one address handshake with the seed and stall. Only
/// `max_peers_per_address` of them are admitted, and a real leecher from another address
/// then gets the package about as fast as one without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_handshakes_from_one_address_cannot_fill_the_slots() {
    let swarm = Swarm::new(4 << 20, |_| {}).await;
    let seed_addr = swarm.seed.listen_addr();
    let per_address = swarm.seed.config().max_peers_per_address;

    let baseline = swarm.leecher("baseline", |_| {}).await;
    let without = swarm.fetch(&baseline).await;
    // The baseline leecher now seeds too: stop it, so the measured leecher needs the seed.
    baseline.shutdown().await;

    let attacker = Ipv4Addr::new(127, 0, 0, 2);
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..60 {
        match handshake_from(attacker, seed_addr, &swarm.meta).await {
            Some(mut s) => {
                if admitted(&mut s).await {
                    held.push(s);
                } else {
                    refused += 1;
                }
            }
            None => refused += 1,
        }
    }
    assert_eq!(
        held.len(),
        per_address,
        "{} stalled connections from one address admitted ({refused} refused); the cap is {per_address}",
        held.len()
    );

    let leecher = swarm.leecher("leecher", |_| {}).await;
    let with = swarm.fetch(&leecher).await;
    eprintln!(
        "download without stalled peers {without:?}, with 60 from one address {with:?} ({:.2}x)",
        with.as_secs_f64() / without.as_secs_f64()
    );
    drop(held);
    swarm.stop(&[&leecher]).await;
}

/// Stalled connections from several addresses fill every slot of a package. A real leecher
/// still gets in: the seed evicts a connection that moved no data, once past its grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peers_that_move_no_data_make_room_for_one_that_does() {
    let swarm = Swarm::new(2 << 20, |c| {
        c.max_peers = 12;
        c.max_peers_per_address = 4;
        c.eviction_grace = Duration::from_millis(500);
        c.useless_after = Duration::from_secs(1);
    })
    .await;
    let seed_addr = swarm.seed.listen_addr();
    let mut held = Vec::new();
    for i in 0..4u8 {
        for _ in 0..3 {
            let from = Ipv4Addr::new(127, 0, 0, 2 + i);
            if let Some(mut s) = handshake_from(from, seed_addr, &swarm.meta).await
                && admitted(&mut s).await
            {
                held.push(s);
            }
        }
    }
    assert_eq!(held.len(), 12, "the stalled peers should fill every slot");

    let leecher = swarm.leecher("leecher", |_| {}).await;
    swarm.fetch(&leecher).await;
    // At least one stalled connection was closed by the seed to let the leecher in.
    let mut evicted = 0;
    for s in &mut held {
        let mut b = [0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_millis(200), s.stream.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    evicted += 1;
                    break;
                }
                Ok(Ok(_)) => continue,
                Err(_) => break,
            }
        }
    }
    assert!(evicted >= 1, "no stalled connection was evicted");
    swarm.stop(&[&leecher]).await;
}

/// A peer asks for blocks as fast as it can and never reads. The seed stops reading from it
/// once its answers pile up (the attacker's writes block after a few socket buffers, instead
/// of the seed queueing at the attacker's upload rate), then drops it when nothing moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_that_never_reads_is_bounded_then_dropped() {
    let swarm = Swarm::new(1 << 20, |c| {
        c.write_stall = Duration::from_secs(6);
    })
    .await;
    let mut s = handshake_from(Ipv4Addr::LOCALHOST, swarm.seed.listen_addr(), &swarm.meta)
        .await
        .expect("handshake")
        .stream;
    let mut chunk = BytesMut::new();
    Message::Interested.encode(&mut chunk);
    let one = BlockRef {
        index: 0,
        begin: 0,
        length: 16 << 10,
    };
    while chunk.len() < 64 << 10 {
        Message::Request(one).encode(&mut chunk);
    }
    const CEILING: usize = 256 << 20;
    let mut sent = 0usize;
    let mut blocked = false;
    while sent < CEILING {
        // A write that makes no progress for a second: the seed stopped reading.
        match tokio::time::timeout(Duration::from_secs(1), s.write_all(&chunk)).await {
            Ok(Ok(())) => sent += chunk.len(),
            Ok(Err(_)) => break,
            Err(_) => {
                blocked = true;
                break;
            }
        }
    }
    assert!(
        blocked && sent < 64 << 20,
        "the seed kept reading requests it could not answer: {} MiB accepted",
        sent >> 20
    );
    // Nothing leaves the seed's queue for this peer: it must be dropped.
    let dropped = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if s.write_all(&chunk).await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(
        dropped.is_ok(),
        "the seed kept a peer whose queue did not move"
    );
    swarm.stop(&[]).await;
}

/// Eight downloads of one package asked at the same instant share one torrent: one owner
/// writes the partial file, and everyone gets the same verified entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn simultaneous_downloads_of_one_package_have_one_owner() {
    let swarm = Swarm::new(1 << 20, |_| {}).await;
    let leecher = swarm.leecher("leecher", |_| {}).await;
    let calls = (0..8).map(|_| leecher.download(swarm.name.clone(), swarm.meta.clone()));
    let torrents: Vec<_> = futures_join_all(calls).await;
    let first = torrents[0].as_ref().unwrap().clone();
    for t in &torrents {
        assert!(
            Arc::ptr_eq(t.as_ref().unwrap(), &first),
            "two torrents for one info-hash"
        );
    }
    let ended = tokio::time::timeout(DOWNLOAD_TIMEOUT, first.finished())
        .await
        .unwrap();
    let Phase::Seeding(entry) = ended else {
        panic!("ended {ended:?}");
    };
    assert!(std::fs::read(&entry.launch_path).unwrap() == *swarm.bytes);
    swarm.stop(&[&leecher]).await;
}

/// Poll every future in the same task, as a burst of control requests is: each runs until
/// its first await before the next starts.
async fn futures_join_all<F: Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut set: Vec<std::pin::Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in set.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|o| o.unwrap()).collect()
}

/// Bytes used on the file system of `dir`.
fn used_bytes(dir: &std::path::Path) -> u64 {
    let out = std::process::Command::new("df")
        .args(["-B1", "--output=used"])
        .arg(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap()
}

/// A download into a work directory on a 2 MiB tmpfs fails for lack of space, with an I/O
/// error. The space comes back at once (the partial file is closed, not just unlinked), and
/// a small download into the same directory then works. Needs root (it mounts a tmpfs).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_download_that_fills_the_disk_gives_the_space_back() {
    let is_root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if !is_root {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let swarm = Swarm::new(8 << 20, |_| {}).await;
    let small_dir = tempfile::tempdir().unwrap();
    let mount = swarm.base().join("small-disk");
    std::fs::create_dir_all(&mount).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&mount)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(mount.clone());
    let before = used_bytes(&mount);

    let work = mount.join("work");
    let leecher = swarm
        .leecher("leecher", |c| c.work_dir = work.clone())
        .await;
    let t = leecher
        .download(swarm.name.clone(), swarm.meta.clone())
        .await
        .unwrap();
    let ended = tokio::time::timeout(DOWNLOAD_TIMEOUT, t.finished())
        .await
        .unwrap();
    let Phase::Failed { kind, message } = ended else {
        panic!("an 8 MiB download into 2 MiB ended {ended:?}");
    };
    assert_eq!(
        kind,
        ErrorKind::NoSpace,
        "a full disk is no space: {message}"
    );
    fbpkg_tests::wait_for(
        "the failed download's space to come back",
        Duration::from_secs(10),
        || async {
            let used = used_bytes(&mount);
            if used <= before + (64 << 10) {
                Ok(())
            } else {
                Err(format!("{used} bytes used, {before} before"))
            }
        },
    )
    .await;

    // A package that fits goes through.
    let (small, small_meta) = random_package(
        &mut rand::rng(),
        512 << 10,
        "small.bin",
        &swarm.tracker.announce_url(),
    );
    let small_name = PackageName::new("small").unwrap();
    let small_meta = Arc::new(small_meta);
    swarm
        .seed
        .tracker()
        .publish(&small_name, &small_meta)
        .await
        .unwrap();
    seed_from_cache(
        &swarm.seed,
        &small_name,
        &small_meta,
        &small,
        small_dir.path(),
    );
    let t = leecher
        .download(small_name, small_meta.clone())
        .await
        .unwrap();
    let ended = tokio::time::timeout(DOWNLOAD_TIMEOUT, t.finished())
        .await
        .unwrap();
    assert!(
        matches!(ended, Phase::Seeding(_)),
        "a download that fits, after one that did not: {ended:?}"
    );
    swarm.stop(&[&leecher]).await;
}

/// More peers want data than the seed has upload slots: the slots rotate, so the one that
/// asked last is served too instead of waiting for the first to finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upload_slots_rotate_when_peers_wait_for_one() {
    let swarm = Swarm::new(1 << 20, |c| {
        c.upload_slots = 1;
        c.slot_rotation = Duration::from_millis(500);
        c.superseed = false;
    })
    .await;
    let addr = swarm.seed.listen_addr();
    let mut interested = BytesMut::new();
    Message::Interested.encode(&mut interested);
    let Raw {
        stream: mut a,
        buf: mut first,
    } = handshake_from(Ipv4Addr::new(127, 0, 0, 2), addr, &swarm.meta)
        .await
        .unwrap();
    a.write_all(&interested).await.unwrap();
    assert!(
        wait_message(&mut a, &mut first, Duration::from_secs(10), |m| {
            matches!(m, Message::Unchoke)
        })
        .await,
        "the first interested peer gets the only slot"
    );
    let Raw {
        stream: mut b,
        buf: mut second,
    } = handshake_from(Ipv4Addr::new(127, 0, 0, 3), addr, &swarm.meta)
        .await
        .unwrap();
    b.write_all(&interested).await.unwrap();
    assert!(
        wait_message(&mut b, &mut second, Duration::from_secs(20), |m| {
            matches!(m, Message::Unchoke)
        })
        .await,
        "the second interested peer never got a slot while the first held it"
    );
    assert!(
        wait_message(&mut a, &mut first, Duration::from_secs(5), |m| {
            matches!(m, Message::Choke)
        })
        .await,
        "the first peer's slot was not taken back"
    );
    swarm.stop(&[]).await;
}

/// 20,000 announces with made-up peer ids, from one address, for a published package. A
/// real leecher then downloads as if they were not there: the tracker keeps at most a few
/// peers per address per swarm and puts the few seeds first in a leecher's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fake_announces_from_one_address_do_not_hide_the_seed() {
    use fbpkg_common::tracker_proto::{AnnounceRequest, Event};
    let swarm = Swarm::new(2 << 20, |_| {}).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)))
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let url = swarm.url.clone();
    let ih = swarm.meta.info_hash;
    let mut tasks = Vec::new();
    for worker in 0..8u16 {
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..2_500u16 {
                let mut id = [0u8; 20];
                id[..8].copy_from_slice(b"-FB0100-");
                for b in &mut id[8..] {
                    *b = rand::random();
                }
                let req = AnnounceRequest {
                    info_hash: ih,
                    peer_id: PeerId(id),
                    port: 10_000 + worker * 2_500 + i,
                    uploaded: 0,
                    downloaded: 0,
                    left: 1,
                    event: Event::Started,
                    compact: true,
                    numwant: Some(0),
                    no_peer_id: true,
                    key: None,
                    ip: None,
                    zone: None,
                };
                let _ = client
                    .get(format!("{url}/announce?{}", req.to_query()))
                    .send()
                    .await
                    .and_then(|r| r.error_for_status());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let leecher = swarm.leecher("leecher", |_| {}).await;
    let took = swarm.fetch(&leecher).await;
    eprintln!("download after 20,000 fake announces: {took:?}");
    swarm.stop(&[&leecher]).await;
}

/// A seed whose cached file was altered on disk (a stray `chmod u+w` and a write) notices it
/// the first time it serves a bad piece: it stops serving, takes the entry out of its cache
/// and fetches the package again from a good seed. Nothing bad reaches the leecher's cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_seed_notices_its_cached_copy_changed_and_fetches_it_again() {
    use std::os::unix::fs::PermissionsExt;
    let swarm = Swarm::new(2 << 20, |c| c.superseed = false).await;
    let entry = swarm
        .seed
        .cache()
        .lookup(&swarm.name, &swarm.meta.sha256)
        .unwrap();
    let file = entry.dir.join(&swarm.meta.name);
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    let piece = usize::try_from(swarm.meta.piece_length).unwrap();
    for i in (0..bytes.len()).step_by(piece) {
        bytes[i] ^= 0xff;
    }
    std::fs::write(&file, &bytes).unwrap();

    let leecher = swarm.leecher("leecher", |_| {}).await;
    let t = leecher
        .download(swarm.name.clone(), swarm.meta.clone())
        .await
        .unwrap();
    let (seed, name, sha) = (&swarm.seed, &swarm.name, swarm.meta.sha256);
    fbpkg_tests::wait_for(
        "the seed to take its corrupt copy out of the cache",
        Duration::from_secs(30),
        || async move {
            match seed.cache().lookup(name, &sha) {
                None => Ok(()),
                Some(e) => Err(format!("still cached at {}", e.dir.display())),
            }
        },
    )
    .await;

    // A good seed joins: the first seed and the leecher both get the real bytes from it.
    let good = swarm.leecher("good-seed", |_| {}).await;
    let scratch = tempfile::tempdir().unwrap();
    seed_from_cache(
        &good,
        &swarm.name,
        &swarm.meta,
        &swarm.bytes,
        scratch.path(),
    );
    let ended = tokio::time::timeout(DOWNLOAD_TIMEOUT, t.finished())
        .await
        .unwrap();
    let Phase::Seeding(got) = ended else {
        panic!("leecher ended {ended:?}");
    };
    assert!(std::fs::read(&got.launch_path).unwrap() == *swarm.bytes);
    let refetched = fbpkg_tests::wait_for(
        "the first seed to fetch the package again",
        DOWNLOAD_TIMEOUT,
        || async move {
            seed.cache()
                .lookup(name, &sha)
                .ok_or_else(|| "not cached yet".to_owned())
        },
    )
    .await;
    assert!(
        std::fs::read(&refetched.launch_path).unwrap() == *swarm.bytes,
        "the re-fetched copy is not the package"
    );
    swarm.stop(&[&leecher, &good]).await;
}
