//! The `fbpkg-rs` binary's own surface: help for every command, and the launch path.
//! (Its presence also makes `cargo test` build the binary the scenario tests in `tests/` run.)
#![allow(clippy::unwrap_used)]

use std::process::Command;

use fbpkg_common::metainfo::{Format, Metainfo};
use fbpkg_common::pkgref::PackageName;
use fbpkg_peer::cache::{Cache, Handoff};

fn fbpkg() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fbpkg-rs"));
    for (k, _) in std::env::vars() {
        if k.starts_with("FBPKG_") || k == "RUST_LOG" {
            c.env_remove(k);
        }
    }
    c
}

#[test]
fn every_command_has_help() {
    for cmd in ["tracker", "agent", "get", "publish", "status", "demo"] {
        let out = fbpkg().args([cmd, "--help"]).output().unwrap();
        assert!(out.status.success(), "{cmd} --help");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("Usage: fbpkg-rs"), "{cmd}: {text}");
        assert!(
            text.contains("[env: FBPKG_") || cmd == "demo",
            "{cmd} documents its variables"
        );
    }
}

#[test]
fn get_answers_from_the_cache_and_rejects_bad_references() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(dir.path().join("cache"));
    let bytes = b"#!/bin/sh\necho launched\n".repeat(10);
    let meta = Metainfo::build(
        &bytes[..],
        bytes.len() as u64,
        "run.sh",
        "http://127.0.0.1:1/announce",
        Format::Executable,
    )
    .unwrap();
    let file = dir.path().join("run.sh");
    std::fs::write(&file, &bytes).unwrap();
    let name = PackageName::new("tool").unwrap();
    let entry = cache
        .install(&name, &meta, &file, Handoff::Move, &Default::default())
        .unwrap();

    // Port 1 on loopback: nothing listens, and a cache hit must not try.
    let out = fbpkg()
        .args([
            "get",
            &format!("tool:{}", meta.sha256),
            "--tracker",
            "http://127.0.0.1:1",
        ])
        .arg("--cache-dir")
        .arg(cache.root())
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        entry.launch_path.display().to_string()
    );
    assert!(
        out.stderr.is_empty(),
        "quiet on a hit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !dir.path().join("state").exists(),
        "a cache hit creates no agent state"
    );

    for bad in ["tool", "Tool:abc", "tool:abc", ""] {
        let out = fbpkg()
            .args(["get", bad])
            .arg("--cache-dir")
            .arg(cache.root())
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{bad:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
