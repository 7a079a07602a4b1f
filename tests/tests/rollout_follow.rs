#![allow(clippy::unwrap_used)]
//! Agents that follow a tag (`agent --follow app:prod`) carry a rollout, against a real tracker
//! process and real agent processes on loopback.
//!
//! - A seeding agent publishes v1 (tagged prod) and v2. Four agents with distinct `--host-id`s,
//!   two whose bucket is in the first 50% and two outside, follow `app:prod` every 200 ms with
//!   an `--on-change` that appends `$FBPKG_PACKAGE_HASH` to a file in their directory; each
//!   file comes to hold v1.
//! - `rollout start app:<v2> --phases 50,100 --bake 300ms` reaches done, and every file ends
//!   with v2 (one activation per version: v1 then v2).
//! - v3 with `--bake 60s`: the health command fails on one first-phase host; the rollout
//!   halts with that host (and its health output) in the failed hosts, while the hosts outside
//!   the phase keep resolving v2 and never run `--on-change` for v3.
//! - A healthy host's agent is killed -9 and restarted on the same state dir: it resolves again
//!   and does not run `--on-change` for the version already active.
//! - With the tracker killed, `get app:prod` on each host answers the version its agent last
//!   activated (v3 in the phase, v2 outside), with a warning.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fbpkg_common::pkgref::{PackageName, Tag};
use fbpkg_common::rollout::{HostId, bucket};
use fbpkg_tests::{
    AgentProcess, CliOutput, TrackerProcess, fbpkg_rs, fbpkg_rs_then, publish_versions, wait_for,
};
use serde_json::Value;

const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest any one condition below may take to come true.
const WAIT: Duration = Duration::from_secs(60);
const TOKEN: &str = "right-token";

async fn run(args: &[&str], tail: &[OsString]) -> CliOutput {
    fbpkg_rs_then(args, tail, CLI_TIMEOUT).await
}

fn json(out: &CliOutput) -> Result<Value, String> {
    if !out.success() {
        return Err(format!("{out}"));
    }
    serde_json::from_str(&out.stdout).map_err(|e| format!("{e}: {out}"))
}

/// One following host: its directory, id and agent.
struct Host {
    dir: PathBuf,
    id: String,
    agent: AgentProcess,
}

impl Host {
    async fn start(dir: &Path, id: &str, tracker: &str) -> Self {
        Self::start_with(dir, id, tracker, &[]).await
    }

    async fn start_with(dir: &Path, id: &str, tracker: &str, extra: &[&str]) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let agent = start_agent_with(dir, id, tracker, extra).await;
        Self {
            dir: dir.to_owned(),
            id: id.to_owned(),
            agent,
        }
    }

    /// The hashes its `--on-change` saw, in order.
    fn activations(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("activations"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// `status --follows --json`: its one follow.
    async fn follow(&self) -> Result<Value, String> {
        let mut args: Vec<OsString> = vec!["status".into(), "--follows".into(), "--json".into()];
        args.extend(self.agent.host_args());
        let v = json(&fbpkg_rs(args, CLI_TIMEOUT).await)?;
        Ok(v[0].clone())
    }

    async fn resolves(&self) -> u64 {
        self.follow().await.unwrap()["resolves"].as_u64().unwrap()
    }
}

async fn start_agent(dir: &Path, id: &str, tracker: &str) -> AgentProcess {
    start_agent_with(dir, id, tracker, &[]).await
}

async fn start_agent_with(dir: &Path, id: &str, tracker: &str, extra: &[&str]) -> AgentProcess {
    let d = dir.display();
    let on_change = format!("echo \"$FBPKG_PACKAGE_HASH\" >> {d}/activations");
    let health = format!("echo checking {id}; test ! -e {d}/fail-health");
    let mut args = vec![
        "--host-id",
        id,
        "--follow",
        "app:prod",
        "--follow-interval",
        "200ms",
        "--on-change",
        &on_change,
        "--health-cmd",
        &health,
        "--health-timeout",
        "20s",
    ];
    args.extend(extra);
    AgentProcess::start(&dir.join("state"), &dir.join("cache"), tracker, &args)
        .await
        .unwrap()
}

/// Wait until every host's activations are exactly `want`.
async fn wait_activations(hosts: &[&Host], want: &[&str]) {
    for h in hosts {
        wait_for(&format!("{} activations {want:?}", h.id), WAIT, || async {
            let seen = h.activations();
            if seen == want {
                Ok(())
            } else {
                Err(format!("{seen:?}"))
            }
        })
        .await;
    }
}

/// A tracker taking `TOKEN`, the CLI's arguments to reach it, and the agent of the host that
/// publishes (it seeds every version).
async fn tracker_and_publisher(base: &Path) -> (TrackerProcess, Vec<OsString>, AgentProcess) {
    let tracker =
        TrackerProcess::start_with_args(&base.join("tracker"), &["--publish-token", TOKEN])
            .unwrap();
    let url = tracker.base_url();
    let conn: Vec<OsString> = vec![
        "--tracker".into(),
        url.clone().into(),
        "--publish-token".into(),
        TOKEN.into(),
    ];
    let publisher =
        AgentProcess::start(&base.join("pub/state"), &base.join("pub/cache"), &url, &[])
            .await
            .unwrap();
    (tracker, conn, publisher)
}

async fn rollout_status(conn: &[OsString]) -> Result<Value, String> {
    json(&run(&["rollout", "status", "app:prod", "--json"], conn).await)
}

/// Wait for the rollout of app:prod to halt; its status then.
async fn wait_halted(conn: &[OsString]) -> Value {
    wait_for("the rollout to halt", WAIT, || async {
        let s = rollout_status(conn).await?;
        if s["current"]["state"] == "halted" {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn following_agents_carry_a_rollout_halt_on_bad_health_and_remember_across_restarts() {
    let dirs = tempfile::tempdir().unwrap();
    let base = dirs.path();
    let (mut tracker, conn, publisher) = tracker_and_publisher(base).await;
    let url = tracker.base_url();
    let contents: Vec<Vec<u8>> = (1..=3)
        .map(|i| format!("version {i}\n").repeat(1000).into_bytes())
        .collect();
    let versions = publish_versions(
        base,
        "app",
        &contents,
        Some("prod"),
        TOKEN,
        &publisher.host_args(),
    )
    .await;
    let (v1, v2, v3) = (
        versions[0].as_str(),
        versions[1].as_str(),
        versions[2].as_str(),
    );

    // Two ids in the first 50% of app:prod's buckets, two outside.
    let (name, tag) = (PackageName::new("app").unwrap(), Tag::new("prod").unwrap());
    let first = |id: &str| bucket(&name, &tag, &HostId::new(id).unwrap()) < 5000;
    let ids: Vec<String> = (0..64).map(|i| format!("host-{i}")).collect();
    let inside: Vec<&String> = ids.iter().filter(|i| first(i)).take(2).collect();
    let outside: Vec<&String> = ids.iter().filter(|i| !first(i)).take(2).collect();
    let mut hosts = Vec::new();
    for id in inside.iter().chain(&outside) {
        hosts.push(Host::start(&base.join(id.as_str()), id, &url).await);
    }
    let all: Vec<&Host> = hosts.iter().collect();
    wait_activations(&all, &[v1]).await;

    // A rollout to v2 goes through both phases as the hosts report healthy.
    let target = format!("app:{v2}");
    let start = [
        "rollout", "start", &target, "--tag", "prod", "--phases", "50,100", "--bake", "300ms",
    ];
    let started = run(&start, &conn).await;
    assert!(started.success(), "{started}");
    wait_for("the rollout to v2 to be done", WAIT, || async {
        let s = rollout_status(&conn).await?;
        let last = s["history"].as_array().and_then(|h| h.last()).cloned();
        match last {
            Some(r) if s["current"].is_null() && r["state"] == "done" && r["to"] == v2 => Ok(()),
            _ => Err(s.to_string()),
        }
    })
    .await;
    wait_activations(&all, &[v1, v2]).await;
    for h in &hosts {
        // The rollout done, nothing will send the host back to v1: the budget may let it go.
        wait_for(&format!("{} to let v1 go", h.id), WAIT, || async {
            let f = h.follow().await?;
            if f["previous"].is_null() {
                Ok(())
            } else {
                Err(f.to_string())
            }
        })
        .await;
        let f = h.follow().await.unwrap();
        assert_eq!(f["reference"], "app:prod", "{f}");
        assert_eq!(f["resolved"], v2, "{}: {f}", h.id);
        assert_eq!(f["activated"], v2, "{}: {f}", h.id);
    }
    // The table names the follow and its state.
    let mut table_args: Vec<OsString> = vec!["status".into()];
    table_args.extend(hosts[0].agent.host_args());
    let table = fbpkg_rs(table_args, CLI_TIMEOUT).await;
    assert!(
        table.success() && table.stdout.contains("app:prod") && table.stdout.contains("healthy"),
        "{table}"
    );

    // v3: the health check fails on one first-phase host, which halts the rollout there.
    let (bad, good) = (&hosts[0], &hosts[1]);
    std::fs::write(bad.dir.join("fail-health"), b"").unwrap();
    let target = format!("app:{v3}");
    let start = [
        "rollout", "start", &target, "--tag", "prod", "--phases", "50,100", "--bake", "60s",
    ];
    let started = run(&start, &conn).await;
    assert!(started.success(), "{started}");
    let halted = wait_halted(&conn).await;
    let current = &halted["current"];
    assert_eq!(current["phase"], 0, "{halted}");
    let failed = current["failed_hosts"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{halted}");
    assert_eq!(failed[0]["host"], bad.id.as_str(), "{halted}");
    let detail = failed[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("exited with status 1") && detail.contains(&format!("checking {}", bad.id)),
        "{halted}"
    );
    wait_activations(&[bad, good], &[v1, v2, v3]).await;
    // The hosts outside the phase keep resolving v2 and never switch.
    for h in &hosts[2..] {
        let from = h.resolves().await;
        wait_for(
            &format!("{} to resolve 3 more times", h.id),
            WAIT,
            || async {
                let f = h.follow().await?;
                let n = f["resolves"].as_u64().unwrap_or(0);
                if n >= from + 3 {
                    Ok(())
                } else {
                    Err(f.to_string())
                }
            },
        )
        .await;
        let f = h.follow().await.unwrap();
        assert_eq!(f["resolved"], v2, "{}: {f}", h.id);
        assert_eq!(h.activations(), [v1, v2], "{}", h.id);
    }
    let f = bad.follow().await.unwrap();
    assert_eq!(f["state"], "unhealthy", "{f}");
    assert_eq!(f["activated"], v3, "{f}");

    // kill -9 a healthy host's agent and restart it: no second --on-change for v3.
    let good = &mut hosts[1];
    good.agent.kill().unwrap();
    good.agent = start_agent(&good.dir, &good.id, &url).await;
    wait_for("the restarted agent to resolve 3 times", WAIT, || async {
        let f = good.follow().await?;
        if f["resolves"].as_u64().unwrap_or(0) >= 3 && f["resolved"] == v3 {
            Ok(())
        } else {
            Err(f.to_string())
        }
    })
    .await;
    let f = good.follow().await.unwrap();
    assert_eq!(f["activated"], v3, "{f}");
    assert_eq!(f["state"], "healthy", "{f}");
    assert_eq!(good.activations(), [v1, v2, v3]);

    // The tracker gone: each host's get answers the version its agent last activated.
    tracker.kill().unwrap();
    for (h, want) in [(&hosts[0], v3), (&hosts[2], v2)] {
        let mut args: Vec<OsString> = vec!["get".into(), "app:prod".into(), "--json".into()];
        args.extend(h.agent.host_args());
        let out = fbpkg_rs(args, CLI_TIMEOUT).await;
        let v = json(&out).unwrap();
        assert_eq!(v["sha256"], want, "{}: {out}", h.id);
        assert!(
            out.stderr.contains("warning") && out.stderr.contains("last activated"),
            "{}: {out}",
            h.id
        );
    }
    drop(publisher);
}

/// While a rollout is in its first phase, a following host outside it fetches the new version
/// ahead under its `--prefetch-rate` (the bytes it has received never exceed the cap's budget
/// for the time since the download began), without switching to it; a `get` of the version on
/// that host lifts the cap; the host then says `fetched`, counted in its own phase. A host that
/// only `get`s the tag counts as activated, so its phase's gate does not wait for a health
/// check it will never run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_outside_the_phase_prefetch_and_a_get_counts_as_activated() {
    let dirs = tempfile::tempdir().unwrap();
    let base = dirs.path();
    let (tracker, conn, publisher) = tracker_and_publisher(base).await;
    let url = tracker.base_url();
    // 4 MiB: over four minutes at the 16 KiB/s prefetch cap below.
    let contents: Vec<Vec<u8>> = (1..=2u8)
        .map(|i| {
            (0..4u32 << 20)
                .map(|b| (b.wrapping_mul(2_654_435_761) >> 13) as u8 ^ i)
                .collect()
        })
        .collect();
    let versions = publish_versions(
        base,
        "app",
        &contents,
        Some("prod"),
        TOKEN,
        &publisher.host_args(),
    )
    .await;
    let (v1, v2) = (versions[0].as_str(), versions[1].as_str());

    let (name, tag) = (PackageName::new("app").unwrap(), Tag::new("prod").unwrap());
    let first = |id: &str| bucket(&name, &tag, &HostId::new(id).unwrap()) < 5000;
    let ids: Vec<String> = (0..64).map(|i| format!("host-{i}")).collect();
    let inside: Vec<&String> = ids.iter().filter(|i| first(i)).take(2).collect();
    let outside = ids.iter().find(|i| !first(i)).unwrap();
    let follower = Host::start(&base.join(inside[0].as_str()), inside[0], &url).await;
    let later = Host::start_with(
        &base.join(outside.as_str()),
        outside,
        &url,
        &["--prefetch-rate", "16K"],
    )
    .await;
    wait_activations(&[&follower, &later], &[v1]).await;

    // A long bake holds the first phase once it passes.
    let target = format!("app:{v2}");
    let start = [
        "rollout", "start", &target, "--tag", "prod", "--phases", "50,100", "--bake", "1h",
    ];
    let started = run(&start, &conn).await;
    assert!(started.success(), "{started}");

    // A host with no agent that only `get`s, inside the first phase.
    let getter = base.join("getter");
    let mut args: Vec<OsString> = vec![
        "get".into(),
        "app:prod".into(),
        "--json".into(),
        "--host-id".into(),
        inside[1].into(),
    ];
    args.extend(fbpkg_tests::host_args(
        &getter.join("state"),
        &getter.join("cache"),
        &url,
    ));
    let out = fbpkg_rs(args, CLI_TIMEOUT).await;
    assert_eq!(json(&out).unwrap()["sha256"], v2, "{out}");

    // The later host prefetches v2 within its cap: 16 KiB/s after a 256 KiB burst.
    let mut status_args: Vec<OsString> = vec!["status".into(), "--json".into()];
    status_args.extend(later.agent.host_args());
    let mut samples = 0;
    while samples < 10 {
        let v = json(&fbpkg_rs(status_args.clone(), CLI_TIMEOUT).await).unwrap();
        let prefetch = v
            .as_array()
            .and_then(|ts| ts.iter().find(|t| t["sha256"] == v2))
            .cloned();
        if let Some(t) = prefetch {
            let (got, age) = (
                t["downloaded"].as_u64().unwrap(),
                t["age_secs"].as_f64().unwrap(),
            );
            let budget = (256 << 10) as f64 + 16384.0 * age + 4.0 * 16384.0;
            assert!(got as f64 <= budget, "{got} bytes in {age} s: {t}");
            assert_ne!(t["phase"], "seeding", "a 4 MiB prefetch at 16 KiB/s: {t}");
            samples += 1;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Someone on that host needs v2 now: the cap goes, and the download finishes.
    let mut args: Vec<OsString> = vec!["get".into(), format!("app:{v2}").into()];
    args.extend(later.agent.host_args());
    let out = fbpkg_rs(args, CLI_TIMEOUT).await;
    assert!(out.success(), "{out}");

    let status = wait_for(
        "the phase's hosts to be healthy or activated, and the later host prefetched",
        WAIT,
        || async {
            let s = rollout_status(&conn).await?;
            let counts = &s["current"]["phase_counts"];
            let ok = counts[0]["healthy"] == 1
                && counts[0]["activated"] == 1
                && counts[1]["fetched"] == 1;
            if ok { Ok(s) } else { Err(s.to_string()) }
        },
    )
    .await;
    assert_eq!(status["current"]["phase"], 0, "{status}");
    // The later host has v2 in its cache, and still runs v1.
    assert!(later.dir.join("cache/app").join(v2).is_dir());
    let f = later.follow().await.unwrap();
    assert_eq!(
        (&f["resolved"], &f["activated"]),
        (&v1.into(), &v1.into()),
        "{f}"
    );
    assert_eq!(later.activations(), [v1]);
    assert_eq!(follower.activations(), [v1, v2]);
    // While the rollout goes on, the cache budget keeps what an abort would need: the version
    // the follower ran before, and the one the later host fetched ahead.
    let f = follower.follow().await.unwrap();
    assert_eq!(f["previous"], v1, "{f}");
    let f = later.follow().await.unwrap();
    assert_eq!(f["next"], v2, "{f}");
    drop(publisher);
}

/// A following host that can never fetch the rollout's version (it does not fit the cache
/// budget beside the version it runs) says so: `unhealthy`, with why, and the rollout halts
/// naming it. Before, the host only resolved, pass after pass, and the gate waited for ever
/// with no failed host and no reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_cannot_fetch_the_new_version_fails_the_gate_saying_why() {
    let dirs = tempfile::tempdir().unwrap();
    let base = dirs.path();
    let (tracker, conn, publisher) = tracker_and_publisher(base).await;
    let url = tracker.base_url();
    // v2 alone fits the 2 MiB budget; beside v1, which the host runs, it does not.
    let contents: Vec<Vec<u8>> = [1usize << 20, 3 << 19]
        .iter()
        .map(|&len| (0..len).map(|b| (b * 7 % 251) as u8).collect())
        .collect();
    let versions = publish_versions(
        base,
        "app",
        &contents,
        Some("prod"),
        TOKEN,
        &publisher.host_args(),
    )
    .await;
    let (v1, v2) = (versions[0].as_str(), versions[1].as_str());
    let host = Host::start_with(
        &base.join("host-0"),
        "host-0",
        &url,
        &["--cache-max-size", "2M", "--cache-sweep-interval", "200ms"],
    )
    .await;
    wait_activations(&[&host], &[v1]).await;

    let target = format!("app:{v2}");
    let start = [
        "rollout", "start", &target, "--tag", "prod", "--phases", "100", "--bake", "0s",
    ];
    let started = run(&start, &conn).await;
    assert!(started.success(), "{started}");
    let halted = wait_halted(&conn).await;
    let failed = halted["current"]["failed_hosts"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{halted}");
    assert_eq!(failed[0]["host"], "host-0", "{halted}");
    let detail = failed[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("fetch app:") && detail.contains("no space"),
        "{halted}"
    );
    assert_eq!(host.activations(), [v1], "v1 runs on");
    drop(publisher);
}
