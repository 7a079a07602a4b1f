#![allow(clippy::unwrap_used)]
//! `fbpkg-rs rollout` and a rollout as `fbpkg-rs get` sees it, against a real tracker process.
//!
//! - Two versions of a package are published, `prod` on the first; `rollout start` to the
//!   second with phases `50,100` runs in phase 0 (`status --json`, and the table).
//! - `get app:prod --host-id X` answers the new version exactly for the ids whose bucket (the
//!   pinned function of `fbpkg_common::rollout`) is below 5 000, the old one for the others;
//!   `get` without `--host-id` creates `STATE_DIR/host-id` and answers by it.
//! - `pause` then `status` says paused; `abort` sends every host id back to the old version.
//! - Exit codes: a wrong token 7 (start and steer), a second start 1, an unknown tag 3, a bad
//!   phase list 2 before any network.

use std::ffi::OsString;
use std::time::Duration;

use fbpkg_common::pkgref::{PackageName, Tag};
use fbpkg_common::rollout::{HostId, bucket};
use fbpkg_tests::{CliOutput, TrackerProcess, fbpkg_rs_then, host_args};
use serde_json::Value;

/// Longest one client command may take (everything here is answered from the cache or the
/// tracker's memory).
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
const TOKEN: &str = "right-token";

async fn run(args: &[&str], tail: &[OsString]) -> CliOutput {
    fbpkg_rs_then(args, tail, CLI_TIMEOUT).await
}

fn published_hash(out: &CliOutput) -> String {
    assert!(out.success(), "publish: {out}");
    out.line().strip_prefix("app:").unwrap().to_owned()
}

fn json(out: &CliOutput) -> Value {
    assert!(out.success(), "{out}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The version `get app:prod` prints for this host (`--host-id id`, or the state dir's).
async fn resolved(host_args: &[OsString], id: Option<&str>) -> String {
    let mut args = vec!["get", "app:prod", "--json"];
    if let Some(id) = id {
        args.extend(["--host-id", id]);
    }
    let v = json(&run(&args, host_args).await);
    v["sha256"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_resolves_per_host_and_is_steered_from_the_cli() {
    let dirs = tempfile::tempdir().unwrap();
    let base = dirs.path();
    let tracker =
        TrackerProcess::start_with_args(&base.join("tracker"), &["--publish-token", TOKEN])
            .unwrap();
    let url = tracker.base_url();
    // One cache holds both versions, so each `get` only resolves: what it prints is what the
    // tracker answered for the host id it sent.
    let h = host_args(&base.join("state"), &base.join("cache"), &url);
    let conn: Vec<OsString> = vec![
        "--tracker".into(),
        url.clone().into(),
        "--publish-token".into(),
        TOKEN.into(),
    ];
    let wrong: Vec<OsString> = vec![
        "--tracker".into(),
        url.clone().into(),
        "--publish-token".into(),
        "wrong-token".into(),
    ];

    let (v1, v2) = (base.join("v1.bin"), base.join("v2.bin"));
    std::fs::write(&v1, b"version one\n").unwrap();
    std::fs::write(&v2, b"version two\n").unwrap();
    let old = published_hash(
        &run(
            &[
                "publish",
                "app",
                v1.to_str().unwrap(),
                "--tag",
                "prod",
                "--publish-token",
                TOKEN,
            ],
            &h,
        )
        .await,
    );
    let new = published_hash(
        &run(
            &[
                "publish",
                "app",
                v2.to_str().unwrap(),
                "--publish-token",
                TOKEN,
            ],
            &h,
        )
        .await,
    );
    assert_ne!(old, new);

    // Bad input exits 2 before any network; a wrong token exits 7.
    let target = format!("app:{new}");
    let bad = run(
        &[
            "rollout", "start", &target, "--tag", "prod", "--phases", "10,50",
        ],
        &conn,
    )
    .await;
    assert_eq!(bad.code, Some(2), "{bad}");
    let start = [
        "rollout",
        "start",
        &target,
        "--tag",
        "prod",
        "--phases",
        "50,100",
        "--bake",
        "200ms",
        "--max-failures",
        "1",
    ];
    let refused = run(&start, &wrong).await;
    assert_eq!(refused.code, Some(7), "{refused}");
    assert!(refused.stderr.contains("not authorized"), "{refused}");

    let started = run(&start, &conn).await;
    assert!(started.success(), "{started}");
    assert!(started.line().contains("running"), "{started}");
    // One rollout per tag: a second start is refused (exit 1).
    let again = run(&start, &conn).await;
    assert_eq!(again.code, Some(1), "{again}");

    let status = json(&run(&["rollout", "status", "app:prod", "--json"], &conn).await);
    let current = &status["current"];
    assert_eq!(current["state"], "running", "{status}");
    assert_eq!(current["phase"], 0, "{status}");
    assert_eq!(current["to"], new.as_str(), "{status}");
    assert_eq!(current["from"], old.as_str(), "{status}");

    // Each host id gets the version of its bucket.
    let (name, tag) = (PackageName::new("app").unwrap(), Tag::new("prod").unwrap());
    let ids: Vec<String> = (0..12).map(|i| format!("host-{i}")).collect();
    let first = |id: &str| bucket(&name, &tag, &HostId::new(id).unwrap()) < 5000;
    assert!(
        ids.iter().any(|i| first(i)) && ids.iter().any(|i| !first(i)),
        "the ids must fall on both sides of 50% for this test to mean anything"
    );
    for id in &ids {
        let want = if first(id) { &new } else { &old };
        assert_eq!(&resolved(&h, Some(id)).await, want, "host id {id}");
    }
    // Without --host-id, get makes this host's id once and resolves by it.
    let own = resolved(&h, None).await;
    let id_file = base.join("state/host-id");
    let own_id = std::fs::read_to_string(&id_file).unwrap();
    let own_id = own_id.trim_end();
    let want = if first(own_id) { &new } else { &old };
    assert_eq!(&own, want, "this host's id {own_id}");
    assert_eq!(resolved(&h, None).await, own);
    assert_eq!(
        std::fs::read_to_string(&id_file).unwrap().trim_end(),
        own_id
    );

    // The table names the state and the phases.
    let table = run(&["rollout", "status", "app:prod"], &conn).await;
    assert!(table.success(), "{table}");
    assert!(
        table.stdout.contains("running") && table.stdout.contains("50%"),
        "{table}"
    );
    let list = json(&run(&["rollout", "list", "--json"], &conn).await);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");

    // Pause holds it; a wrong token cannot steer it.
    let denied = run(&["rollout", "abort", "app:prod"], &wrong).await;
    assert_eq!(denied.code, Some(7), "{denied}");
    assert!(
        run(&["rollout", "pause", "app:prod"], &conn)
            .await
            .success()
    );
    let status = json(&run(&["rollout", "status", "app:prod", "--json"], &conn).await);
    assert_eq!(status["current"]["state"], "paused", "{status}");

    // Abort: every host back on the old version.
    let aborted = run(&["rollout", "abort", "app:prod"], &conn).await;
    assert!(aborted.success(), "{aborted}");
    assert!(aborted.line().contains("aborted"), "{aborted}");
    for id in &ids {
        assert_eq!(
            resolved(&h, Some(id)).await,
            old,
            "host id {id} after abort"
        );
    }
    let status = json(&run(&["rollout", "status", "app:prod", "--json"], &conn).await);
    assert!(status["current"].is_null(), "{status}");
    let history = status["history"].as_array().unwrap();
    assert_eq!(history.last().unwrap()["state"], "aborted", "{status}");

    let unknown = run(&["rollout", "status", "nope:prod"], &conn).await;
    assert_eq!(unknown.code, Some(3), "{unknown}");
}
