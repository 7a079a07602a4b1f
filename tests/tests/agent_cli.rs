#![allow(clippy::unwrap_used)]
//! The `fbpkg-rs` commands against a real tracker and real agents, as an operator uses them.
//!
//! - `publish` of a directory (nested files, an executable, a relative symlink) and of a single
//!   executable file prints `name:<sha256>`; the publishing agent seeds both.
//! - `get name:<prefix>` through a second agent prints the launch path: the extracted `tree/`
//!   with the same contents, modes (minus write bits) and symlink, or the file, executable and
//!   read-only; `get --json` says the same in JSON; `status --json` lists what the agent holds.
//! - With the tracker gone, `get name:<full hash>` answers from the cache without any network
//!   (a listener the test owns stands in for the tracker and must see no connection), with or
//!   without an agent; `get name:<prefix>` and `get name:<tag>` (a tag this host resolved
//!   before) fall back to the cache with a warning.
//! - Exit codes: bad reference 2, unknown package 3, no peers 5, tracker unreachable 6.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::Duration;

use fbpkg_tests::{
    AgentProcess, CliOutput, TrackerProcess, fbpkg_rs, host_args, http_client, publish,
    swarm_peers, wait_for,
};
use rand::RngExt;
use reqwest::StatusCode;
use serde_json::Value;

/// A limit of 0 (slots, peers, connections) is refused at start, naming the flags, before the
/// agent listens or touches its state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refuses_a_zero_limit() {
    for flag in [
        "--upload-slots",
        "--min-upload-slots",
        "--max-peers",
        "--max-connections",
    ] {
        let dirs = tempfile::tempdir().unwrap();
        let state = dirs.path().join("state");
        let out = run(
            &["agent", "--listen", "127.0.0.1:0", flag, "0"],
            &host_args(&state, &dirs.path().join("cache"), "http://127.0.0.1:9"),
        )
        .await;
        assert_eq!(out.code, Some(1), "{flag} 0: {out}");
        assert!(
            out.stderr.contains(flag) && out.stderr.contains("at least 1"),
            "{flag} 0: {out}"
        );
        assert!(!state.exists(), "{flag} 0 created {}", state.display());
    }
}

/// Longest one client command may take (a small package through an agent).
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for an agent's announce to reach the tracker.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// `fbpkg-rs ARGS HOST_ARGS`.
async fn run(args: &[&str], host: &[OsString]) -> CliOutput {
    let all: Vec<OsString> = args
        .iter()
        .map(OsString::from)
        .chain(host.iter().cloned())
        .collect();
    fbpkg_rs(all, CLI_TIMEOUT).await
}

/// The hash of a `name:<64 hex>` line, checking the shape.
fn published_hash(out: &CliOutput, name: &str) -> String {
    assert!(out.success(), "publish {name}: {out}");
    let line = out.line();
    let hash = line
        .strip_prefix(&format!("{name}:"))
        .unwrap_or_else(|| panic!("publish printed {line:?}, not {name}:<hash>"));
    assert!(
        hash.len() == 64 && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "publish printed {line:?}: the hash is not 64 lowercase hex digits"
    );
    hash.to_owned()
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A tree with a nested file, an executable, a private file, a relative symlink, and a file
/// big enough to take several pieces.
fn make_tree(root: &Path) {
    let mut rng = rand::rng();
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("etc/conf.d")).unwrap();
    std::fs::create_dir_all(root.join("lib/deep/er")).unwrap();
    std::fs::write(root.join("bin/tool"), b"#!/bin/sh\necho tool\n").unwrap();
    set_mode(&root.join("bin/tool"), 0o755);
    std::fs::write(root.join("etc/conf.d/app.conf"), b"threads = 4\n").unwrap();
    set_mode(&root.join("etc/conf.d/app.conf"), 0o644);
    std::fs::write(root.join("etc/secret"), b"hunter2\n").unwrap();
    set_mode(&root.join("etc/secret"), 0o600);
    std::fs::write(root.join("README"), b"read me\n").unwrap();
    set_mode(&root.join("README"), 0o644);
    symlink("../README", root.join("etc/readme-link")).unwrap();
    let mut blob = vec![0u8; 600 << 10];
    rng.fill(&mut blob[..]);
    std::fs::write(root.join("lib/deep/er/blob.bin"), &blob).unwrap();
    set_mode(&root.join("lib/deep/er/blob.bin"), 0o644);
    set_mode(&root.join("lib/deep"), 0o750);
}

/// Everything under `root`: relative path -> (kind, mode bits, contents or link target).
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (&'static str, u32, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, (&'static str, u32, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().to_owned();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let mode = meta.mode() & 0o7777;
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).unwrap();
                out.insert(
                    rel,
                    ("symlink", 0, target.into_os_string().into_encoded_bytes()),
                );
            } else if meta.is_dir() {
                out.insert(rel, ("dir", mode, Vec::new()));
                walk(root, &path, out);
            } else {
                out.insert(rel, ("file", mode, std::fs::read(&path).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// A listener standing in for the tracker: any connection to it is a failure of the test.
fn silent_listener() -> (TcpListener, String) {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    l.set_nonblocking(true).unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    (l, url)
}

fn assert_untouched(l: &TcpListener) {
    // The kernel completes handshakes into the backlog without accept(), so any connection
    // attempt made so far is waiting here.
    match l.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        Ok((_, peer)) => panic!("the cache-only get connected to the tracker from {peer}"),
        Err(e) => panic!("accept: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_get_through_agents_then_offline_from_the_cache() {
    let dirs = tempfile::tempdir().unwrap();
    let base = dirs.path();
    let mut tracker = TrackerProcess::start(&base.join("tracker")).unwrap();
    let url = tracker.base_url();
    let a = AgentProcess::start(&base.join("a/state"), &base.join("a/cache"), &url, &[])
        .await
        .unwrap();

    // Publish a directory and a single executable file through agent A.
    let src = base.join("src");
    make_tree(&src);
    let tool = base.join("tool.sh");
    let mut tool_bytes = b"#!/bin/sh\nexit 0\n".to_vec();
    tool_bytes.extend((0..300_000u32).map(|i| (i % 251) as u8));
    std::fs::write(&tool, &tool_bytes).unwrap();
    set_mode(&tool, 0o755);
    let out = run(
        &["publish", "treepkg", src.to_str().unwrap(), "--tag", "prod"],
        &a.host_args(),
    )
    .await;
    let tree_sha = published_hash(&out, "treepkg");
    let out = run(
        &["publish", "toolpkg", tool.to_str().unwrap()],
        &a.host_args(),
    )
    .await;
    let tool_sha = published_hash(&out, "toolpkg");
    let a_status = a.status().await.unwrap();
    for sha in [&tree_sha, &tool_sha] {
        assert!(
            a_status
                .iter()
                .any(|t| &t.sha256 == sha && t.phase == "seeding" && t.check_secs.is_none()),
            "the publishing agent does not seed {sha} (with no download's check): {a_status:#?}"
        );
    }

    // The tracker refuses A's first announce (the version is not listed until after A seeds
    // it); wait for A's retry to land, so B's first announce finds it.
    let client = http_client();
    for sha in [&tree_sha, &tool_sha] {
        let info_hash = &a_status
            .iter()
            .find(|t| &t.sha256 == sha)
            .unwrap()
            .info_hash;
        let (c, u, want) = (&client, &url, (a.listen().to_string(), 0));
        wait_for("the tracker to list A as a seeder", START_TIMEOUT, || {
            let want = want.clone();
            async move {
                let peers = swarm_peers(c, u, info_hash).await?;
                if peers.contains(&want) {
                    Ok(())
                } else {
                    Err(format!("{peers:?}"))
                }
            }
        })
        .await;
    }

    // Agent B fetches both by prefix.
    let b = AgentProcess::start(&base.join("b/state"), &base.join("b/cache"), &url, &[])
        .await
        .unwrap();
    let tree_ref = format!("treepkg:{}", &tree_sha[..8]);
    let out = run(&["get", &tree_ref], &b.host_args()).await;
    assert!(
        out.success(),
        "get {tree_ref}: {out}\nagent B:\n{}",
        b.log_tail()
    );
    let tree_path = b.cache_dir().join("treepkg").join(&tree_sha).join("tree");
    assert_eq!(Path::new(out.line()), tree_path, "{out}");
    let expected: BTreeMap<_, _> = snapshot(&src)
        .into_iter()
        .map(|(p, (kind, mode, data))| (p, (kind, mode & 0o555, data)))
        .collect();
    let got = snapshot(&tree_path);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "the extracted tree has other entries"
    );
    for (p, want) in &expected {
        let have = &got[p];
        assert_eq!(
            (have.0, have.1),
            (want.0, want.1),
            "{}: kind and mode (read-only) differ",
            p.display()
        );
        assert!(have.2 == want.2, "{}: contents differ", p.display());
    }
    assert_eq!(
        std::fs::read(tree_path.join("etc/readme-link")).unwrap(),
        b"read me\n",
        "the symlink does not resolve inside the tree"
    );

    // A tag resolves through the tracker, and this host remembers where it pointed.
    let out = run(&["get", "treepkg:prod"], &b.host_args()).await;
    assert!(out.success(), "get treepkg:prod: {out}");
    assert_eq!(Path::new(out.line()), tree_path);

    let tool_ref = format!("toolpkg:{}", &tool_sha[..8]);
    let out = run(&["get", "--json", &tool_ref], &b.host_args()).await;
    assert!(out.success(), "get --json {tool_ref}: {out}");
    let json: Value = serde_json::from_str(out.line()).unwrap_or_else(|e| panic!("{e}: {out}"));
    let tool_path = b
        .cache_dir()
        .join("toolpkg")
        .join(&tool_sha)
        .join("tool.sh");
    assert_eq!(
        json["path"].as_str().map(Path::new),
        Some(tool_path.as_path())
    );
    assert_eq!(json["name"], "toolpkg");
    assert_eq!(json["sha256"], tool_sha.as_str());
    assert_eq!(json["source"], "agent", "{out}");
    assert_eq!(std::fs::read(&tool_path).unwrap(), tool_bytes);
    assert_eq!(
        std::fs::metadata(&tool_path).unwrap().mode() & 0o777,
        0o555,
        "the file package must keep its exec bit and be read-only"
    );

    let b_status = b.status().await.unwrap();
    for (name, sha, path) in [
        ("treepkg", &tree_sha, &tree_path),
        ("toolpkg", &tool_sha, &tool_path),
    ] {
        let t = b_status
            .iter()
            .find(|t| &t.sha256 == sha)
            .unwrap_or_else(|| panic!("status --json does not list {name}: {b_status:#?}"));
        assert_eq!(t.name, name);
        assert_eq!(t.phase, "seeding");
        assert_eq!(t.pieces_have, t.pieces_total);
        assert_eq!(t.path.as_ref(), Some(path));
        assert!(
            t.check_secs.is_some_and(|s| s > 0.0 && s < t.age_secs),
            "a download says how long its final check took: {t:#?}"
        );
    }

    // The tracker is gone. A full hash is answered from the cache, with no network at all:
    // through the agent's state dir, and with a state dir no agent ever used.
    let dead_url = url.clone();
    tracker.kill().unwrap();
    let (listener, silent_url) = silent_listener();
    let full = format!("treepkg:{tree_sha}");
    let fresh_state = base.join("fresh-state");
    for hosts in [
        host_args(b.state_dir(), b.cache_dir(), &silent_url),
        host_args(&fresh_state, b.cache_dir(), &silent_url),
    ] {
        let out = run(&["get", &full], &hosts).await;
        assert!(out.success(), "offline get {full}: {out}");
        assert_eq!(Path::new(out.line()), tree_path);
        let out = run(&["get", "--json", &full], &hosts).await;
        assert!(out.success(), "offline get --json {full}: {out}");
        let json: Value = serde_json::from_str(out.line()).unwrap();
        assert_eq!(
            json["path"].as_str().map(Path::new),
            Some(tree_path.as_path())
        );
        assert_eq!(json["source"], "cache");
    }
    assert_untouched(&listener);

    // A prefix or a tag needs the tracker; unreachable, the cache answers with a warning.
    for hosts in [
        host_args(b.state_dir(), b.cache_dir(), &dead_url),
        host_args(&fresh_state, b.cache_dir(), &dead_url),
    ] {
        for (reference, path) in [
            (tool_ref.as_str(), &tool_path),
            ("treepkg:prod", &tree_path),
        ] {
            let out = run(&["get", reference], &hosts).await;
            assert!(
                out.success(),
                "get {reference} with the tracker down: {out}"
            );
            assert_eq!(Path::new(out.line()), path);
            assert!(
                out.stderr.contains("warning") && out.stderr.contains("tracker unreachable"),
                "no warning about the fallback: {out}"
            );
        }
    }

    // What the cache does not hold needs the tracker: exit 6, by tag and by prefix (no agent),
    // and by full hash (through agent B, which cannot reach the tracker either), once the
    // retries of a stall timeout are spent.
    let empty_cache = base.join("empty-cache");
    let out = run(
        &["get", "--stall-timeout", "2s", "treepkg:prod"],
        &host_args(&fresh_state, &empty_cache, &dead_url),
    )
    .await;
    assert_eq!(out.code, Some(6), "get treepkg:prod, nothing cached: {out}");
    let missing_prefix = "treepkg:00000000";
    let out = run(
        &["get", "--stall-timeout", "2s", missing_prefix],
        &host_args(&fresh_state, b.cache_dir(), &dead_url),
    )
    .await;
    assert_eq!(out.code, Some(6), "get {missing_prefix}: {out}");
    let missing_full = format!("treepkg:{}", "0".repeat(64));
    let out = run(
        &["get", "--stall-timeout", "2s", &missing_full],
        &host_args(b.state_dir(), b.cache_dir(), &dead_url),
    )
    .await;
    assert_eq!(out.code, Some(6), "get {missing_full} via the agent: {out}");
}

/// A tracker and agents A and B under `base`, each with its state and cache directories.
async fn tracker_and_two_agents(base: &Path) -> (TrackerProcess, AgentProcess, AgentProcess) {
    let tracker = TrackerProcess::start(&base.join("tracker")).unwrap();
    let url = tracker.base_url();
    let a = AgentProcess::start(&base.join("a/state"), &base.join("a/cache"), &url, &[])
        .await
        .unwrap();
    let b = AgentProcess::start(&base.join("b/state"), &base.join("b/cache"), &url, &[])
        .await
        .unwrap();
    (tracker, a, b)
}

/// A host's cached copy edited behind its agent's back: `get` through the agent finds the
/// seal broken and quarantines the entry, and the agent fetches the version again from the
/// publisher, instead of answering with the entry it was seeding, which is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_through_an_agent_fetches_again_what_it_found_changed() {
    let dirs = tempfile::tempdir().unwrap();
    let base = dirs.path();
    let (_tracker, a, b) = tracker_and_two_agents(base).await;
    let tool = base.join("tool.bin");
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&tool, &bytes).unwrap();
    let out = run(
        &["publish", "toolpkg", tool.to_str().unwrap()],
        &a.host_args(),
    )
    .await;
    let sha = published_hash(&out, "toolpkg");
    let reference = format!("toolpkg:{sha}");

    // B fetches it (retrying while the tracker does not list A yet), and seeds it.
    let b_args = b.host_args();
    let first = {
        let (r, args) = (&reference, &b_args);
        wait_for(
            "B to get the package from A",
            START_TIMEOUT * 3,
            || async move {
                let out = run(&["get", r], args).await;
                if out.success() {
                    Ok(PathBuf::from(out.line()))
                } else {
                    Err(out.to_string())
                }
            },
        )
        .await
    };
    assert_eq!(std::fs::read(&first).unwrap(), bytes);

    // A stray edit of B's copy.
    set_mode(&first, 0o644);
    let mut changed = bytes.clone();
    changed[1_000] ^= 1;
    std::fs::write(&first, &changed).unwrap();

    let out = run(&["get", &reference], &b_args).await;
    assert!(out.success(), "{out}");
    let again = PathBuf::from(out.line());
    assert_eq!(
        std::fs::read(&again).ok().as_deref(),
        Some(&bytes[..]),
        "get printed {} (the copy B seeded was quarantined); B's log:\n{}",
        again.display(),
        b.log_tail()
    );
    let quarantined = std::fs::read_dir(b.cache_dir().join(".quarantine"))
        .unwrap()
        .count();
    assert_eq!(quarantined, 1, "the changed copy kept as evidence");
}

/// `Forget` (a refused publish's undo) stops seeding, but leaves a version in the cache while
/// a running program holds it: its tree is not removed under it. Once it ends, it goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_leaves_a_version_a_program_runs_from() {
    use fbpkg_peer::agent::control::{AgentClient, Request};
    let dirs = tempfile::tempdir().unwrap();
    let base = dirs.path();
    let tracker = TrackerProcess::start(&base.join("tracker")).unwrap();
    let a = AgentProcess::start(
        &base.join("a/state"),
        &base.join("a/cache"),
        &tracker.base_url(),
        &[],
    )
    .await
    .unwrap();
    let tool = base.join("tool.bin");
    std::fs::write(&tool, b"#!/bin/sh\nsleep 60\n").unwrap();
    let out = run(
        &["publish", "toolpkg", tool.to_str().unwrap()],
        &a.host_args(),
    )
    .await;
    let sha = published_hash(&out, "toolpkg");
    let (name, hash) = (
        fbpkg_common::pkgref::PackageName::new("toolpkg").unwrap(),
        fbpkg_common::Sha256Hash::from_hex(&sha).unwrap(),
    );
    let forget = || async {
        let agent = AgentClient::connect(a.state_dir()).await.unwrap().unwrap();
        agent
            .call(&Request::Forget {
                name: "toolpkg".into(),
                sha256: sha.clone(),
            })
            .await
    };

    let running = a.cache().hold(&name, &hash).unwrap().expect("cached");
    let err = forget().await.expect_err("kept while in use");
    assert!(err.to_string().contains("stays in the cache"), "{err}");
    assert!(
        running.package.launch_path.exists(),
        "the program's file is still there"
    );
    let seeding = a.status().await.unwrap();
    assert!(!seeding.iter().any(|t| t.sha256 == sha), "{seeding:#?}");

    drop(running);
    forget().await.expect("forgotten once nothing runs from it");
    assert!(a.cache().lookup(&name, &hash).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_exit_codes_without_an_agent() {
    let dirs = tempfile::tempdir().unwrap();
    let base = dirs.path();
    let tracker = TrackerProcess::start(&base.join("tracker")).unwrap();
    let url = tracker.base_url();
    let hosts = host_args(&base.join("state"), &base.join("cache"), &url);

    for bad in [
        "",
        "justaname",
        "app:",
        "app:1:2",
        "Bad Name:prod",
        "app:ABCDEF0123",
        "app:0123",
    ] {
        let out = run(&["get", bad], &hosts).await;
        assert_eq!(out.code, Some(2), "get {bad:?}: {out}");
    }

    for unknown in [
        "nosuch:prod".to_owned(),
        "nosuch:0123abcd".to_owned(),
        format!("nosuch:{}", "ab".repeat(32)),
        "0123abcd0123".to_owned(),
    ] {
        let out = run(&["get", &unknown], &hosts).await;
        assert_eq!(out.code, Some(3), "get {unknown}: {out}");
    }

    // Listed by the tracker, seeded by nobody.
    let (_, meta) = fbpkg_tests::random_package(
        &mut rand::rng(),
        1 << 20,
        "orphan.bin",
        &tracker.announce_url(),
    );
    assert_eq!(
        publish(&http_client(), &url, "orphan", &meta)
            .await
            .unwrap(),
        StatusCode::CREATED
    );
    let orphan = format!("orphan:{}", meta.sha256);
    let started = std::time::Instant::now();
    let out = run(&["get", &orphan, "--stall-timeout", "2s"], &hosts).await;
    assert_eq!(out.code, Some(5), "get {orphan} with nobody seeding: {out}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "exit 5 took {:?} with a 2 s stall timeout",
        started.elapsed()
    );
    assert!(
        !base
            .join("cache/orphan")
            .join(meta.sha256.to_hex())
            .exists(),
        "a failed get left a cache entry"
    );
}

/// A `get` on another host right after `publish` returns.
///
/// The publishing agent's first announce is refused (the tracker lists the version only after
/// the agent seeds it) and retried a second later, so the getter's first announce may find no
/// peer. A leecher with nobody to talk to must ask again soon — at most one `min interval`
/// (5 s here) — not wait a whole announce interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_right_after_publish_waits_at_most_one_min_interval() {
    const MIN_INTERVAL: Duration = Duration::from_secs(5); // the tracker's default
    let dirs = tempfile::tempdir().unwrap();
    let base = dirs.path();
    let (_tracker, a, b) = tracker_and_two_agents(base).await;
    let file = base.join("app.bin");
    let mut bytes = vec![0u8; 700 << 10];
    rand::rng().fill(&mut bytes[..]);
    std::fs::write(&file, &bytes).unwrap();
    let out = run(&["publish", "app", file.to_str().unwrap()], &a.host_args()).await;
    let sha = published_hash(&out, "app");
    let started = std::time::Instant::now();
    let out = run(&["get", &format!("app:{}", &sha[..8])], &b.host_args()).await;
    let took = started.elapsed();
    assert!(out.success(), "{out}");
    assert_eq!(std::fs::read(out.line()).unwrap(), bytes);
    assert!(
        took < MIN_INTERVAL + Duration::from_secs(3),
        "get right after publish took {took:?}: the leecher waited more than one min interval \
         ({MIN_INTERVAL:?}) before asking the tracker again"
    );
}

/// A publish the tracker refuses (wrong token) exits 7 and leaves nothing behind: not in the
/// cache, not seeded by the agent. Without an agent, likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_publish_exits_7_and_leaves_nothing_behind() {
    let dirs = tempfile::tempdir().unwrap();
    let base = dirs.path();
    let tracker = fbpkg_tests::embedded_tracker(&base.join("tracker"), |c| {
        c.publish_token = Some("right-token".into());
    })
    .await;
    let url = format!("http://{}", tracker.addr);
    let file = base.join("tool.bin");
    std::fs::write(&file, b"#!/bin/sh\necho hi\n").unwrap();
    let agent = AgentProcess::start(&base.join("a-state"), &base.join("a-cache"), &url, &[])
        .await
        .unwrap();
    let file_arg = file.to_str().unwrap();
    for (label, hosts) in [
        ("through the agent", agent.host_args()),
        (
            "without an agent",
            host_args(&base.join("lone-state"), &base.join("lone-cache"), &url),
        ),
    ] {
        let out = run(
            &[
                "publish",
                "tool",
                file_arg,
                "--publish-token",
                "wrong-token",
            ],
            &hosts,
        )
        .await;
        assert_eq!(out.code, Some(7), "{label}: {out}");
        assert!(out.stderr.contains("not authorized"), "{label}: {out}");
    }
    for cache in [agent.cache_dir().to_owned(), base.join("lone-cache")] {
        let left: Vec<_> = std::fs::read_dir(&cache)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name())
                    .filter(|n| n != ".staging")
                    .collect()
            })
            .unwrap_or_default();
        let tool_dir = cache.join("tool");
        let versions = std::fs::read_dir(&tool_dir)
            .map(|rd| rd.count())
            .unwrap_or(0);
        assert_eq!(
            versions,
            0,
            "{}: a refused version stayed: {left:?}",
            cache.display()
        );
    }
    let status = agent.status().await.unwrap();
    assert!(
        status.iter().all(|t| t.name != "tool"),
        "the agent still seeds a refused version: {status:?}"
    );
    let _ = fbpkg_tests::stop_tracker(tracker).await;
}

/// An agent that cannot listen where it is told exits 1 with the address in the message, not
/// as a bad reference (2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_cannot_listen_says_so_and_exits_1() {
    let dirs = tempfile::tempdir().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run(
        &["agent", "--listen", &addr],
        &host_args(
            &dirs.path().join("state"),
            &dirs.path().join("cache"),
            "http://127.0.0.1:9",
        ),
    )
    .await;
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr.contains("cannot listen for peers") && out.stderr.contains(&addr),
        "{out}"
    );
}
