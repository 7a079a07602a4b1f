#![allow(clippy::unwrap_used)]
//! The launcher cache under a budget, with a real tracker and real agent processes on loopback.
//!
//! `a_budgeted_agent_keeps_what_must_stay`: a seeding agent publishes v1..v3 (256 KiB each,
//! v3 tagged prod) and v4; agent B runs with `--cache-max-size 1000K` (high 90%, low 80%) and
//! follows `app:prod`.
//! - B gets v1, v2, v3 (about 804 KiB: under the high watermark, nothing evicted).
//! - The test process holds v1 in use (`Cache::hold`, as `run` does); v2 is pinned by prefix;
//!   v3 is the followed tag's current version. `cache gc --max-size 1K` evicts nothing.
//! - `get v4` cannot fit even after eviction: exit 8 before downloading, the cache unchanged.
//!   A package bigger than the whole budget: exit 8 too.
//! - The hold ends: `get v4` evicts v1 (the only version that may go) to make room, and the
//!   tracker's swarm for v1 stops listing B.
//! - B restarts with a 600K budget while v4 is held: the watermark sweep evicts nothing it must
//!   not; after `unpin v2` the next sweep evicts v2; v3 (followed) and v4 (in use) stay.
//!
//! `gc_without_an_agent_goes_least_recently_used_first`: no agent; three versions published into
//! the cache with use times set apart; `cache gc --dry-run` removes nothing, `cache gc` evicts the
//! least recently used first; `cache ls --json` says seeding is unknown; `cache metrics` counts.
//!
//! `a_full_disk_leaves_the_cache_as_it_was` (root only): a cache on a 1 MiB tmpfs holding one
//! small version; a standalone `get` of a 2 MiB package fails with exit 8, and the small version
//! is still there, intact, with nothing left in staging; then, the state directory on the full
//! disk too, the disk fills while blocks are written: exit 8 as well.
//!
//! `a_standalone_get_clears_what_killed_ones_left`: the work directories of standalone `get`s
//! that died are removed by the next one; one locked, or whose process runs, is left.

use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, SystemTime};

use fbpkg_common::Sha256Hash;
use fbpkg_common::pkgref::PackageName;
use fbpkg_peer::cache::Cache;
use fbpkg_tests::{
    AgentProcess, CliOutput, TrackerProcess, fbpkg_rs_then, host_args, http_client, swarm_peers,
    wait_for,
};
use serde_json::Value;

const CLI_TIMEOUT: Duration = Duration::from_secs(60);
const WAIT: Duration = Duration::from_secs(60);
/// `fbpkg-rs` exit code for no space (`cli::exit::NO_SPACE`).
const NO_SPACE: i32 = 8;

async fn run(args: &[&str], tail: &[OsString]) -> CliOutput {
    fbpkg_rs_then(args, tail, CLI_TIMEOUT).await
}

/// Bytes no compressor shrinks, different for each seed.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Publish `bytes` as `app` through the host `tail` names; returns the hash.
async fn publish(
    dir: &Path,
    i: u64,
    len: usize,
    tag: Option<&str>,
    tail: &[OsString],
) -> Sha256Hash {
    let file = dir.join(format!("app-{i}.bin"));
    std::fs::write(&file, noise(len, i)).unwrap();
    let mut args = vec!["publish", "app", file.to_str().unwrap()];
    if let Some(t) = tag {
        args.extend(["--tag", t]);
    }
    let out = run(&args, tail).await;
    assert!(out.success(), "publish: {out}");
    let hash = out.line().strip_prefix("app:").unwrap();
    Sha256Hash::from_hex(hash).unwrap()
}

/// A tracker under `base`, its URL, and a seeding agent (host `a`) to publish through.
async fn tracker_and_seeder(base: &Path) -> (TrackerProcess, String, AgentProcess) {
    let tracker = TrackerProcess::start(&base.join("tracker")).unwrap();
    let url = tracker.base_url();
    let seeder = AgentProcess::start(&base.join("a/state"), &base.join("a/cache"), &url, &[])
        .await
        .unwrap();
    (tracker, url, seeder)
}

fn app() -> PackageName {
    PackageName::new("app").unwrap()
}

fn present(cache: &Cache, shas: &[Sha256Hash]) -> Vec<bool> {
    shas.iter()
        .map(|s| cache.lookup(&app(), s).is_some())
        .collect()
}

fn staging_empty(cache: &Cache) -> bool {
    std::fs::read_dir(cache.root().join(".staging"))
        .map(|mut rd| rd.next().is_none())
        .unwrap_or(true)
}

async fn get(sha: &Sha256Hash, tail: &[OsString]) -> CliOutput {
    run(&["get", &format!("app:{sha}")], tail).await
}

async fn budgeted_agent(dir: &Path, tracker: &str, max: &str) -> AgentProcess {
    AgentProcess::start(
        &dir.join("state"),
        &dir.join("cache"),
        tracker,
        &[
            "--cache-max-size",
            max,
            "--cache-sweep-interval",
            "200ms",
            "--follow",
            "app:prod",
            "--follow-interval",
            "200ms",
        ],
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budgeted_agent_keeps_what_must_stay() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let (_tracker, url, seeder) = tracker_and_seeder(base).await;
    let a = seeder.host_args();
    let v: Vec<Sha256Hash> = vec![
        publish(base, 1, 256 << 10, None, &a).await,
        publish(base, 2, 256 << 10, None, &a).await,
        publish(base, 3, 256 << 10, Some("prod"), &a).await,
        publish(base, 4, 256 << 10, None, &a).await,
    ];
    let big = publish(base, 5, 2 << 20, None, &a).await;

    let mut b = budgeted_agent(&base.join("b"), &url, "1000K").await;
    let bt = b.host_args();
    let cache = b.cache();
    for s in &v[..3] {
        let out = get(s, &bt).await;
        assert!(out.success(), "get: {out}");
    }
    wait_for("B follows app:prod to v3", WAIT, || async {
        let out = run(&["status", "--follows", "--json"], &bt).await;
        let f: Value = serde_json::from_str(&out.stdout).map_err(|e| format!("{e}: {out}"))?;
        (f[0]["resolved"] == v[2].to_hex())
            .then_some(())
            .ok_or(format!("{f}"))
    })
    .await;
    assert_eq!(present(&cache, &v), [true, true, true, false]);

    // v1 in use, v2 pinned (by prefix), v3 followed: gc cannot take any of them.
    let hold = cache.hold(&app(), &v[0]).unwrap().unwrap();
    let out = run(&["pin", &format!("app:{}", &v[1].to_hex()[..10])], &bt).await;
    assert!(out.success() && out.stdout.starts_with("pinned"), "{out}");
    let out = run(&["cache", "gc", "--max-size", "1K"], &bt).await;
    assert!(out.success(), "{out}");
    assert!(!out.stdout.contains("evicted"), "{out}");
    assert_eq!(present(&cache, &v), [true, true, true, false]);
    let out = run(&["cache", "ls", "--json"], &bt).await;
    let rows: Value = serde_json::from_str(&out.stdout).unwrap();
    let reasons = |sha: &Sha256Hash| -> Vec<String> {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["sha256"] == sha.to_hex())
            .map(|r| {
                r["kept_because"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(reasons(&v[0]), ["in use"], "{rows}");
    assert_eq!(reasons(&v[1]), ["pinned"], "{rows}");
    assert!(
        reasons(&v[2]).contains(&"followed current".to_owned()),
        "{rows}"
    );
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .all(|r| r["seeding"] == true),
        "{rows}"
    );

    // Nothing may go: v4 fails before downloading, and the cache is as it was.
    let out = get(&v[3], &bt).await;
    assert_eq!(out.code, Some(NO_SPACE), "{out}");
    assert!(out.stderr.contains("no space"), "{out}");
    let out = get(&big, &bt).await;
    assert_eq!(out.code, Some(NO_SPACE), "{out}");
    assert!(
        out.stderr.contains("more than the whole cache budget"),
        "{out}"
    );
    assert_eq!(present(&cache, &v), [true, true, true, false]);
    assert!(staging_empty(&cache));

    // The program exits: v1 is what goes to make room, and B stops seeding it at once.
    drop(hold);
    let out = get(&v[3], &bt).await;
    assert!(out.success(), "{out}");
    assert_eq!(present(&cache, &v), [false, true, true, true]);
    let client = http_client();
    let ih1 = cache_info_hash(&seeder.cache(), &v[0]);
    let b_addr = b.listen().to_string();
    wait_for("the tracker to drop B from v1's swarm", WAIT, || async {
        let peers = swarm_peers(&client, &url, &ih1).await?;
        (!peers.iter().any(|(p, _)| *p == b_addr))
            .then_some(())
            .ok_or(format!("{peers:?}"))
    })
    .await;
    let out = run(&["cache", "metrics"], &bt).await;
    assert!(
        out.stdout
            .lines()
            .any(|l| l == "fbpkg_cache_evictions_total 1"),
        "{out}"
    );

    // A tighter budget after a restart, v4 in use: the watermark sweep spares v2 (pinned),
    // v3 (followed) and v4 (in use); unpinned, v2 goes.
    b.kill().unwrap();
    let hold = cache.hold(&app(), &v[3]).unwrap().unwrap();
    let b = budgeted_agent(&base.join("b"), &url, "600K").await;
    wait_for("a sweep that finds nothing to evict", WAIT, || async {
        b.log_lines()
            .iter()
            .any(|l| l.contains("nothing more may be evicted"))
            .then_some(())
            .ok_or_else(|| b.log_tail())
    })
    .await;
    assert_eq!(present(&cache, &v), [false, true, true, true]);
    let out = run(&["unpin", &format!("app:{}", v[1])], &bt).await;
    assert!(out.success() && out.stdout.starts_with("unpinned"), "{out}");
    wait_for("the sweep to evict v2", WAIT, || async {
        (present(&cache, &v) == [false, false, true, true])
            .then_some(())
            .ok_or_else(|| format!("{:?}", present(&cache, &v)))
    })
    .await;
    assert!(cache.in_use(&app(), &v[3]));
    drop(hold);
}

/// The info-hash of a cached version, from its entry's metainfo.
fn cache_info_hash(cache: &Cache, sha: &Sha256Hash) -> String {
    let bytes = std::fs::read(cache.entry_dir(&app(), sha).join(".fbpkg.torrent")).unwrap();
    fbpkg_common::metainfo::Metainfo::parse(&bytes)
        .unwrap()
        .info_hash
        .to_hex()
}

/// Set a version's last use to `secs` after an epoch long ago.
fn used_at(cache: &Cache, sha: &Sha256Hash, secs: u64) {
    drop(cache.hold(&app(), sha).unwrap().unwrap());
    std::fs::File::options()
        .write(true)
        .open(cache.use_path(&app(), sha))
        .and_then(|f| f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(secs)))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_without_an_agent_goes_least_recently_used_first() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let tracker = TrackerProcess::start(&base.join("tracker")).unwrap();
    let tail = host_args(
        &base.join("state"),
        &base.join("cache"),
        &tracker.base_url(),
    );
    let mut v = Vec::new();
    for i in 1..=3 {
        v.push(publish(base, i, 128 << 10, None, &tail).await);
    }
    let cache = Cache::new(base.join("cache"));
    assert_eq!(present(&cache, &v), [true, true, true]);
    // Last used: v2, then v3, then v1 (most recent).
    used_at(&cache, &v[1], 1_000_000);
    used_at(&cache, &v[2], 1_000_100);
    used_at(&cache, &v[0], 1_000_200);

    let out = run(&["cache", "ls", "--json"], &tail).await;
    let rows: Value = serde_json::from_str(&out.stdout).unwrap();
    let rows = rows.as_array().unwrap().clone();
    assert_eq!(rows.len(), 3, "{out}");
    assert!(
        rows.iter()
            .all(|r| r["seeding"].is_null() && r["launches"] == 1),
        "{out}"
    );
    let total: u64 = rows.iter().map(|r| r["bytes"].as_u64().unwrap()).sum();
    // A budget whose low watermark (80%) is one byte under the total: one version must go.
    let max = ((total - 1) * 100 / 80).to_string();

    let out = run(&["cache", "gc", "--dry-run", "--max-size", &max], &tail).await;
    assert!(out.success(), "{out}");
    assert!(
        out.stdout.contains(&format!("would evict app:{}", v[1])),
        "{out}"
    );
    assert_eq!(present(&cache, &v), [true, true, true]);

    let out = run(&["cache", "gc", "--max-size", &max], &tail).await;
    assert!(out.success(), "{out}");
    assert_eq!(present(&cache, &v), [true, false, true], "{out}");
    // v3 pinned: the next to go is v1, although v3 is older.
    let out = run(&["pin", &format!("app:{}", v[2])], &tail).await;
    assert!(out.success(), "{out}");
    let out = run(&["cache", "gc", "--max-size", "1K"], &tail).await;
    assert!(out.success(), "{out}");
    assert_eq!(present(&cache, &v), [false, false, true], "{out}");

    let out = run(&["cache", "metrics"], &tail).await;
    for line in [
        "fbpkg_cache_versions 1",
        "fbpkg_cache_pins 1",
        "fbpkg_cache_launches 1",
    ] {
        assert!(out.stdout.lines().any(|l| l == line), "{line}: {out}");
    }
    // A tag never resolved here cannot be pinned offline; a bad reference is exit 2.
    let out = run(&["pin", "app:prod"], &tail).await;
    assert_eq!(out.code, Some(3), "{out}");
    let out = run(&["pin", "app:?"], &tail).await;
    assert_eq!(out.code, Some(2), "{out}");
}

/// A tmpfs mounted on a fresh directory, unmounted on drop; `None` where we may not mount.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Self(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_leaves_the_cache_as_it_was() {
    let Some(disk) = Tmpfs::mount("1m") else {
        eprintln!("skipped: cannot mount a tmpfs here (this test needs root)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let (_tracker, url, seeder) = tracker_and_seeder(base).await;
    let small = publish(base, 1, 64 << 10, None, &seeder.host_args()).await;
    let big = publish(base, 2, 2 << 20, None, &seeder.host_args()).await;

    // The host's cache on the small disk, its state (partial downloads) elsewhere.
    let cache_dir = disk.0.path().join("cache");
    let tail = host_args(&base.join("b/state"), &cache_dir, &url);
    let out = get(&small, &tail).await;
    assert!(out.success(), "{out}");
    let out = get(&big, &tail).await;
    assert_eq!(out.code, Some(NO_SPACE), "{out}");
    assert!(out.stderr.contains("No space left on device"), "{out}");
    let cache = Cache::new(&cache_dir);
    assert!(cache.lookup(&app(), &big).is_none());
    assert!(cache.lookup_checked(&app(), &small).unwrap().is_some());
    assert!(staging_empty(&cache));

    // The partial download on the full disk too (the default: the state directory beside
    // the cache): the disk fills while blocks are written, and that is "no space" as well. It
    // exited 1, the writer's error having lost the OS's number on the way.
    let tail = host_args(&disk.0.path().join("state"), &cache_dir, &url);
    let out = get(&big, &tail).await;
    assert_eq!(out.code, Some(NO_SPACE), "{out}");
    assert!(cache.lookup(&app(), &big).is_none());
    assert!(cache.lookup_checked(&app(), &small).unwrap().is_some());
}

/// A standalone `get` removes what standalone `get`s killed before their end left in the
/// state directory (a partial download each, that nothing resumed or removed), and leaves
/// the work of one still running (locked, or its process alive).
#[tokio::test]
async fn a_standalone_get_clears_what_killed_ones_left() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let (_tracker, url, seeder) = tracker_and_seeder(base).await;
    let sha = publish(base, 1, 64 << 10, None, &seeder.host_args()).await;

    let state = base.join("b/state");
    let dead_pid = || {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    };
    let work = |name: String| {
        let d = state.join(name).join("a-download");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("data.part"), vec![0u8; 1 << 20]).unwrap();
        d.parent().unwrap().to_owned()
    };
    let killed = work(format!("get-{}", dead_pid()));
    let locked = work(format!("get-{}", dead_pid()));
    let running = work(format!("get-{}", std::process::id()));
    let lock = std::fs::File::open(&locked).unwrap();
    lock.lock().unwrap();

    let out = get(&sha, &host_args(&state, &base.join("b/cache"), &url)).await;
    assert!(out.success(), "{out}");
    assert!(!killed.exists(), "the killed get's download is removed");
    assert!(locked.exists() && running.exists(), "work in use is left");
    drop(lock);
}
