#![allow(clippy::unwrap_used)]
//! `fbpkg-rs verify` on a real cache, with no agent, as an operator runs it.
//!
//! - A file package and a directory package published into the cache verify as `ok`, exit 0.
//! - One byte flipped in the cached file (after `chmod u+w`, as a stray edit would): `verify
//!   --no-quarantine` reports it corrupt, exits 4 and changes nothing; `verify name:hash --json`
//!   exits 4 and moves the entry to `<cache>/.quarantine`, evidence intact.
//! - `get name:hash` afterwards never prints the corrupt path (no peer has it: exit 5).
//! - A file edited inside a directory package's tree is found the same way.
//! - With nothing left, `verify` exits 0; an unknown REF exits 3, a bad one 2.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fbpkg_tests::{CliOutput, TrackerProcess, fbpkg_rs};
use serde_json::Value;

/// Longest one command may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);

struct Host {
    args: Vec<OsString>,
    cache: PathBuf,
}

impl Host {
    fn new(dir: &Path, tracker: &str) -> Self {
        let cache = dir.join("cache");
        let args = vec![
            "--state-dir".into(),
            dir.join("state").into(),
            "--cache-dir".into(),
            cache.clone().into(),
            "--tracker".into(),
            tracker.into(),
        ];
        Self { args, cache }
    }

    async fn run(&self, args: &[&str]) -> CliOutput {
        let all: Vec<OsString> = args
            .iter()
            .map(OsString::from)
            .chain(self.args.iter().cloned())
            .collect();
        fbpkg_rs(all, CLI_TIMEOUT).await
    }

    async fn publish(&self, name: &str, path: &Path) -> String {
        let out = self.run(&["publish", name, path.to_str().unwrap()]).await;
        assert!(out.success(), "publish {name}: {out}");
        let hash = out
            .line()
            .strip_prefix(&format!("{name}:"))
            .unwrap()
            .to_owned();
        assert_eq!(hash.len(), 64, "{out}");
        hash
    }
}

fn make_writable_and_flip(path: &Path, at: usize) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_quarantines_what_changed_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let tracker = TrackerProcess::start(&dir.path().join("tracker")).unwrap();
    let host = Host::new(dir.path(), &tracker.base_url());

    let file = dir.path().join("app.bin");
    let bytes: Vec<u8> = (0..400_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&file, &bytes).unwrap();
    let app = host.publish("app", &file).await;
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("bin")).unwrap();
    std::fs::write(src.join("bin/run"), b"#!/bin/sh\necho run\n").unwrap();
    std::fs::write(src.join("conf"), b"threads = 4\n").unwrap();
    let tree = host.publish("tree", &src).await;

    let out = host.run(&["verify"]).await;
    assert!(out.success(), "{out}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines.iter().all(|l| l.starts_with("ok ")), "{out}");

    // A stray edit of the cached file.
    let entry = host.cache.join("app").join(&app);
    let cached = entry.join("app.bin");
    make_writable_and_flip(&cached, 123_456);

    let out = host.run(&["verify", "--no-quarantine"]).await;
    assert_eq!(out.code, Some(4), "{out}");
    assert!(out.stdout.contains(&format!("corrupt  app:{app}")), "{out}");
    assert!(out.stdout.contains("left in place"), "{out}");
    assert!(
        out.stdout.contains(&format!("ok       tree:{tree}")),
        "{out}"
    );
    assert!(cached.exists(), "--no-quarantine changes nothing");

    let out = host.run(&["verify", &format!("app:{app}"), "--json"]).await;
    assert_eq!(out.code, Some(4), "{out}");
    let v: Value = serde_json::from_str(out.line()).unwrap();
    assert_eq!(v["corrupt"], 1, "{v}");
    assert_eq!(v["ok"], 0, "{v}");
    let e = &v["entries"][0];
    assert_eq!(e["status"], "corrupt", "{v}");
    assert!(
        e["report"]["problems"][0]
            .as_str()
            .unwrap()
            .contains("SHA-256"),
        "{v}"
    );
    let moved = PathBuf::from(e["quarantined"].as_str().unwrap());
    assert!(moved.starts_with(host.cache.join(".quarantine")), "{v}");
    assert!(!entry.exists(), "out of the cache");
    let evidence = std::fs::read(moved.join("app.bin")).unwrap();
    assert_eq!(evidence.len(), bytes.len());
    assert_ne!(evidence, bytes);

    // Nobody else has it, so get cannot answer; it must not answer with the corrupt file.
    let out = host
        .run(&["get", &format!("app:{app}"), "--stall-timeout", "2s"])
        .await;
    assert_eq!(out.code, Some(5), "{out}");
    assert!(
        !out.stdout.contains(cached.to_str().unwrap()),
        "get printed the corrupt path: {out}"
    );

    // An edit inside a directory package's tree.
    let tree_entry = host.cache.join("tree").join(&tree);
    make_writable_and_flip(&tree_entry.join("tree/conf"), 0);
    let out = host.run(&["verify", "tree"]).await;
    assert_eq!(out.code, Some(4), "{out}");
    assert!(out.stdout.contains("conf: contents changed"), "{out}");
    assert!(!tree_entry.exists());

    let out = host.run(&["verify"]).await;
    assert!(out.success() && out.stdout.is_empty(), "{out}");
    let out = host.run(&["verify", &format!("app:{app}")]).await;
    assert_eq!(out.code, Some(3), "{out}");
    let out = host.run(&["verify", "Not A Ref"]).await;
    assert_eq!(out.code, Some(2), "{out}");
}
