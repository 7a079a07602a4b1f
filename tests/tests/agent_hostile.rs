#![allow(clippy::unwrap_used)]
//! Hostile input from the swarm and from the tracker never reaches the cache.
//!
//! (a) Hostile archives: a `tar.zst` package whose entries leave the tree (`../` climbing out,
//! an absolute path, a symlink pointing out with a file written through it) is published and
//! seeded honestly, so every piece and the SHA-256 verify. An in-process leecher must end
//! `Failed` with kind `unsafe_archive`, with no cache entry, no staging or partial leftovers,
//! and no file written anywhere outside its directories; `fbpkg-rs get` of the same package
//! must exit 4.
//!
//! (b) Hostile metainfo: the tracker cannot be made to serve metainfo for another hash (it
//! checks what is published), so a fake tracker written here serves, for the hash asked, the
//! metainfo of another archive, or bytes that are no metainfo at all. `fbpkg-rs get`, by full
//! hash and by prefix, with and without an agent, must exit 4 and cache nothing.

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fbpkg_common::api::VersionInfo;
use fbpkg_common::metainfo::{Format, Metainfo};
use fbpkg_common::pkgref::PackageName;
use fbpkg_peer::cache::METAINFO_FILE;
use fbpkg_peer::engine::{Engine, Phase};
use fbpkg_tests::{
    AgentProcess, CliOutput, embedded_tracker, engine, fbpkg_rs, random_package, stop_tracker,
    wait_for,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const CLI_TIMEOUT: Duration = Duration::from_secs(60);
const FAIL_TIMEOUT: Duration = Duration::from_secs(30);
/// Names no hostile entry may create anywhere.
const MARKERS: [&str; 3] = ["escape", "abs-pwned", "pwned"];

/// A raw tar entry, written as it is: (path, type, link target, data).
type RawEntry<'a> = (&'a [u8], tar::EntryType, &'a [u8], &'a [u8]);

/// A `tar.zst` with unchecked entries, as an attacker would write it.
fn hostile_archive(entries: &[RawEntry<'_>]) -> Vec<u8> {
    let mut tar_bytes = Vec::new();
    {
        let mut b = tar::Builder::new(&mut tar_bytes);
        for (name, ty, link, data) in entries {
            let mut h = tar::Header::new_old();
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
            h.set_entry_type(*ty);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.finish().unwrap();
    }
    zstd::encode_all(&tar_bytes[..], 3).unwrap()
}

/// Put an archive into a seed's cache by hand, as an entry `Cache::install` would have made
/// had it not refused to extract it, and seed it.
fn seed_by_hand(seed: &Engine, name: &PackageName, meta: &Arc<Metainfo>, bytes: &[u8]) {
    let dir = seed.cache().entry_dir(name, &meta.sha256);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(&meta.name);
    std::fs::write(&file, bytes).unwrap();
    std::fs::write(dir.join(METAINFO_FILE), meta.as_bytes()).unwrap();
    seed.seed(name.clone(), meta.clone(), &dir).unwrap();
}

/// Every path under `root` whose file name is one of the markers.
fn markers_under(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let path = e.path();
            if MARKERS.iter().any(|m| e.file_name() == *m) {
                found.push(path.clone());
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            }
        }
    }
    found
}

fn is_empty_or_missing(dir: &Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |mut rd| rd.next().is_none())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_archives_fail_as_unsafe_and_write_nothing() {
    let dirs = tempfile::tempdir().unwrap();
    let base = dirs.path().canonicalize().unwrap();
    let outside = base.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let tracker = embedded_tracker(&base.join("tracker"), |_| {}).await;
    let url = format!("http://{}", tracker.addr);
    let cancel = CancellationToken::new();
    let seed = engine(&base.join("seed"), &url, &cancel, |_| {}).await;
    let leecher = engine(&base.join("leecher"), &url, &cancel, |_| {}).await;

    use tar::EntryType::{Directory, Regular, Symlink};
    let absolute = outside.join("abs-pwned");
    let absolute = absolute.to_str().unwrap().as_bytes();
    // From <leecher>/cache/.staging/<id>/tree, five levels up is the test's directory.
    let climb_out = b"../../../../../escape";
    let link_out = b"../../../../../outside";
    let padding = vec![7u8; 200_000];
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "climbs-out",
            hostile_archive(&[
                (b"ok.txt", Regular, b"", &padding),
                (climb_out, Regular, b"", b"pwned"),
            ]),
        ),
        (
            "absolute",
            hostile_archive(&[
                (b"ok.txt", Regular, b"", &padding),
                (absolute, Regular, b"", b"pwned"),
            ]),
        ),
        (
            "links-out",
            hostile_archive(&[
                (b"d", Directory, b"", b""),
                (b"d/ok.txt", Regular, b"", &padding),
                (b"out", Symlink, link_out, b""),
                (b"out/pwned", Regular, b"", b"pwned"),
            ]),
        ),
    ];

    for (label, archive) in cases {
        let name = PackageName::new(&format!("evil-{label}")).unwrap();
        let meta = Arc::new(
            Metainfo::build(
                &archive[..],
                archive.len() as u64,
                &format!("{name}.tar.zst"),
                &tracker.announce_url(),
                Format::TarZst,
            )
            .unwrap(),
        );
        seed.tracker().publish(&name, &meta).await.unwrap();
        seed_by_hand(&seed, &name, &meta, &archive);

        let t = leecher.download(name.clone(), meta.clone()).await.unwrap();
        let ended = tokio::time::timeout(FAIL_TIMEOUT, t.finished())
            .await
            .unwrap_or_else(|_| {
                panic!("{label}: no end within {FAIL_TIMEOUT:?}: {:?}", t.status())
            });
        match &ended {
            Phase::Failed { kind, message } => {
                assert_eq!(
                    *kind,
                    fbpkg_peer::ErrorKind::UnsafeArchive,
                    "{label}: {message}"
                );
            }
            other => panic!("{label}: the leecher accepted a hostile archive: {other:?}"),
        }
        let cache = leecher.cache();
        assert!(
            cache.lookup(&name, &meta.sha256).is_none()
                && !cache.entry_dir(&name, &meta.sha256).exists(),
            "{label}: a cache entry exists"
        );
        assert!(
            is_empty_or_missing(&cache.root().join(".staging")),
            "{label}: staging leftovers"
        );
        // The phase turns `Failed` just before the partial data is removed.
        let partial = base.join("leecher/work").join(meta.info_hash.to_hex());
        let p = &partial;
        wait_for(
            &format!("{label}: the partial download to be removed"),
            Duration::from_secs(5),
            || async move {
                match std::fs::read_dir(p) {
                    Ok(rd) => Err(format!(
                        "{:?}",
                        rd.flatten().map(|e| e.path()).collect::<Vec<_>>()
                    )),
                    Err(_) => Ok(()),
                }
            },
        )
        .await;

        // The CLI, downloading by itself: exit 4.
        let (state, cache_dir) = (
            base.join(format!("cli-{label}/state")),
            base.join(format!("cli-{label}/cache")),
        );
        let args: Vec<OsString> = vec![
            "get".into(),
            format!("{name}:{}", meta.sha256).into(),
            "--state-dir".into(),
            state.into(),
            "--cache-dir".into(),
            cache_dir.clone().into(),
            "--tracker".into(),
            url.clone().into(),
            "--stall-timeout".into(),
            "20s".into(),
        ];
        let out = fbpkg_rs(args, CLI_TIMEOUT).await;
        assert_eq!(out.code, Some(4), "{label}: fbpkg-rs get: {out}");
        assert!(out.stderr.contains("unsafe archive"), "{label}: {out}");
        assert!(out.stdout.is_empty(), "{label}: printed a path: {out}");
        assert!(
            !cache_dir.join(name.as_str()).exists(),
            "{label}: the CLI's cache has an entry"
        );
        assert!(
            is_empty_or_missing(&cache_dir.join(".staging")),
            "{label}: the CLI left staging leftovers"
        );
    }

    assert!(
        is_empty_or_missing(&outside),
        "something was written into {}",
        outside.display()
    );
    // The seeds' archives hold the names only compressed; any file by these names was
    // created by an extraction.
    assert_eq!(markers_under(&base), Vec::<PathBuf>::new());

    cancel.cancel();
    leecher.shutdown().await;
    seed.shutdown().await;
    let _ = stop_tracker(tracker).await;
}

/// A fake tracker: answers the catalog API from `routes` (path -> status, content type, body),
/// 404 otherwise, and records every path asked for.
async fn fake_tracker(
    routes: Vec<(String, u16, &'static str, Vec<u8>)>,
    asked: Arc<Mutex<Vec<String>>>,
    cancel: CancellationToken,
) -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let routes = Arc::new(routes);
    tokio::spawn(async move {
        loop {
            let mut stream = tokio::select! {
                _ = cancel.cancelled() => return,
                a = listener.accept() => match a {
                    Ok((s, _)) => s,
                    Err(_) => continue,
                },
            };
            let (routes, asked) = (routes.clone(), asked.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 << 10 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head);
                let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                asked.lock().unwrap().push(path.clone());
                // Routes name paths; a resolve also carries this host's id in its query.
                let route = path.split('?').next().unwrap_or("");
                let (status, ctype, body) = routes
                    .iter()
                    .find(|(p, ..)| p == route)
                    .map(|(_, s, c, b)| (*s, *c, b.clone()))
                    .unwrap_or((
                        404,
                        "application/json",
                        br#"{"error":"no such thing"}"#.to_vec(),
                    ));
                let reason = if status == 200 { "OK" } else { "Not Found" };
                let mut resp = format!(
                    "HTTP/1.1 {status} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n\
                     connection: close\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                resp.extend_from_slice(&body);
                let _ = stream.write_all(&resp).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metainfo_for_another_hash_is_a_verification_error() {
    let dirs = tempfile::tempdir().unwrap();
    let base = dirs.path();
    let mut rng = rand::rng();
    // The version asked for, and an impostor the fake tracker serves in its place.
    let (_, asked_for) =
        random_package(&mut rng, 1 << 20, "app.bin", "http://127.0.0.1:1/announce");
    let (_, impostor) = random_package(&mut rng, 1 << 20, "app.bin", "http://127.0.0.1:1/announce");
    let (_, garbage_version) =
        random_package(&mut rng, 1 << 20, "junk.bin", "http://127.0.0.1:1/announce");
    let app = PackageName::new("app").unwrap();
    let junk = PackageName::new("junk").unwrap();
    let x = asked_for.sha256.to_hex();
    let g = garbage_version.sha256.to_hex();
    let json = |v: &VersionInfo| serde_json::to_vec(v).unwrap();
    let routes = vec![
        (
            format!("/api/v1/packages/app/{}", &x[..10]),
            200,
            "application/json",
            json(&VersionInfo::from_metainfo(app.clone(), &asked_for, 0)),
        ),
        (
            format!("/api/v1/packages/app/{x}/metainfo"),
            200,
            "application/x-bittorrent",
            impostor.as_bytes().to_vec(),
        ),
        (
            format!("/api/v1/packages/junk/{g}/metainfo"),
            200,
            "application/x-bittorrent",
            b"d4:infod6:lengthi-1eee".to_vec(),
        ),
    ];
    let asked = Arc::new(Mutex::new(Vec::new()));
    let cancel = CancellationToken::new();
    let fake = fake_tracker(routes, asked.clone(), cancel.clone()).await;
    let url = format!("http://{fake}");

    let get = |reference: String, state: PathBuf, cache: PathBuf| {
        let url = url.clone();
        async move {
            let args: Vec<OsString> = vec![
                "get".into(),
                reference.into(),
                "--state-dir".into(),
                state.into(),
                "--cache-dir".into(),
                cache.into(),
                "--tracker".into(),
                url.into(),
            ];
            fbpkg_rs(args, CLI_TIMEOUT).await
        }
    };
    let check = |what: &str, out: &CliOutput, needle: &str| {
        assert_eq!(out.code, Some(4), "{what}: {out}");
        assert!(out.stdout.is_empty(), "{what}: printed a path: {out}");
        assert!(
            out.stderr.contains("verification failed") && out.stderr.contains(needle),
            "{what}: {out}"
        );
    };

    // Without an agent: by full hash, by prefix, and unparseable metainfo.
    let (state, cache) = (base.join("cli/state"), base.join("cli/cache"));
    let wrong = format!("is for {}", impostor.sha256);
    let out = get(format!("app:{x}"), state.clone(), cache.clone()).await;
    check("full hash", &out, &wrong);
    let out = get(format!("app:{}", &x[..10]), state.clone(), cache.clone()).await;
    check("prefix", &out, &wrong);
    let out = get(format!("junk:{g}"), state.clone(), cache.clone()).await;
    check("garbage metainfo", &out, "invalid");
    assert!(is_empty_or_missing(&cache), "the CLI cached something");

    // Through an agent that uses the fake tracker.
    let agent = AgentProcess::start(
        &base.join("agent/state"),
        &base.join("agent/cache"),
        &url,
        &[],
    )
    .await
    .unwrap();
    let out = get(
        format!("app:{x}"),
        agent.state_dir().to_owned(),
        agent.cache_dir().to_owned(),
    )
    .await;
    check("through the agent", &out, &wrong);
    assert!(
        agent.cache().lookup(&app, &asked_for.sha256).is_none()
            && agent.cache().lookup(&app, &impostor.sha256).is_none()
            && agent
                .cache()
                .lookup(&junk, &garbage_version.sha256)
                .is_none(),
        "the agent cached something"
    );
    let status = agent.status().await.unwrap();
    assert!(
        status.is_empty(),
        "the agent took up a torrent for wrong metainfo: {status:?}"
    );
    let asked = asked.lock().unwrap().clone();
    assert!(
        asked.iter().all(|p| !p.starts_with("/announce")),
        "someone announced a swarm from wrong metainfo: {asked:?}"
    );
    cancel.cancel();
}
