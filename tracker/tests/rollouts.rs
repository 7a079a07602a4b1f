//! Rollouts through the router (`oneshot`, no socket), gates driven by explicit ticks on
//! tokio's paused clock, plus one run of the controller task itself.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{Request, StatusCode, header};
use fbpkg_common::Sha256Hash;
use fbpkg_common::api::{
    ApiError, HostState, ReportAck, Rollout, RolloutState, RolloutStatus, RolloutView, VersionInfo,
};
use fbpkg_common::metainfo::{Format, Metainfo};
use fbpkg_common::pkgref::{PackageName, Tag};
use fbpkg_common::rollout::{HostId, bucket};
use fbpkg_tracker::rollout::wall_ms;
use fbpkg_tracker::{AppState, Config, SharedState, app};
use http_body_util::BodyExt;
use serde_json::json;
use tokio::time::Instant;
use tower::ServiceExt;

const TOKEN: &str = "s3cret";
const HOST_IP: &str = "10.0.0.7:50000";

struct Harness {
    dir: tempfile::TempDir,
    state: SharedState,
    a: Metainfo,
    b: Metainfo,
}

fn package(seed: u8) -> Metainfo {
    let data: Vec<u8> = (0..20_000u32)
        .map(|i| (i as u8).wrapping_mul(seed))
        .collect();
    Metainfo::build(
        &data[..],
        20_000,
        "app.bin",
        "http://127.0.0.1:6969/announce",
        Format::File,
    )
    .unwrap()
}

fn open(dir: &Path) -> SharedState {
    AppState::open(Config {
        data_dir: dir.to_path_buf(),
        publish_token: Some(TOKEN.into()),
        ..Config::default()
    })
    .unwrap()
}

/// Host ids whose bucket for app:prod is below (`true`) or at/above (`false`) `bp` basis points.
fn hosts(inside: bool, bp: u16, n: usize) -> Vec<String> {
    let (name, tag) = (PackageName::new("app").unwrap(), Tag::new("prod").unwrap());
    (0..)
        .map(|i| format!("host-{i}"))
        .filter(|h| (bucket(&name, &tag, &HostId::new(h).unwrap()) < bp) == inside)
        .take(n)
        .collect()
}

impl Harness {
    /// app with versions a and b published, prod -> a.
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let state = open(dir.path());
        let h = Harness {
            dir,
            state,
            a: package(3),
            b: package(5),
        };
        for m in [&h.a, &h.b] {
            let (s, _) = h
                .send(
                    "PUT",
                    &format!("/api/v1/packages/app/{}", m.sha256),
                    m.as_bytes().to_vec(),
                    Some(TOKEN),
                    "127.0.0.1:1",
                )
                .await;
            assert_eq!(s, StatusCode::CREATED);
        }
        h.move_tag(h.a.sha256).await;
        h
    }

    async fn send(
        &self,
        method: &str,
        uri: &str,
        body: Vec<u8>,
        token: Option<&str>,
        from: &str,
    ) -> (StatusCode, Vec<u8>) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let resp = app(self.state.clone())
            .layer(MockConnectInfo(from.parse::<SocketAddr>().unwrap()))
            .oneshot(req.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        (status, body)
    }

    async fn post(&self, uri: &str, body: serde_json::Value) -> (StatusCode, Vec<u8>) {
        self.send(
            "POST",
            uri,
            serde_json::to_vec(&body).unwrap(),
            Some(TOKEN),
            "127.0.0.1:1",
        )
        .await
    }

    async fn move_tag(&self, to: Sha256Hash) -> StatusCode {
        self.send(
            "PUT",
            "/api/v1/packages/app/tags/prod",
            to.to_hex().into_bytes(),
            Some(TOKEN),
            "127.0.0.1:1",
        )
        .await
        .0
    }

    async fn start(&self, phases: &[&str], bake_ms: u64, max_failures: &str) -> Rollout {
        let (s, b) = self.start_raw(phases, bake_ms, max_failures, false).await;
        assert_eq!(s, StatusCode::CREATED, "{}", String::from_utf8_lossy(&b));
        serde_json::from_slice(&b).unwrap()
    }

    async fn start_raw(
        &self,
        phases: &[&str],
        bake_ms: u64,
        max_failures: &str,
        force: bool,
    ) -> (StatusCode, Vec<u8>) {
        self.post(
            "/api/v1/rollouts",
            json!({"name": "app", "tag": "prod", "to": self.b.sha256.to_hex(), "phases": phases,
                   "bake_ms": bake_ms, "max_failures": max_failures, "force": force}),
        )
        .await
    }

    /// What `host` (from HOST_IP) resolves app:prod to.
    async fn resolve(&self, host: Option<&str>, zone: Option<&str>) -> Sha256Hash {
        self.resolve_info(host, zone).await.sha256
    }

    /// The whole answer to `host`'s resolve of app:prod.
    async fn resolve_info(&self, host: Option<&str>, zone: Option<&str>) -> VersionInfo {
        let mut uri = "/api/v1/packages/app/prod".to_owned();
        if let Some(h) = host {
            uri += &format!("?host={h}");
        }
        if let Some(z) = zone {
            uri += &format!("&zone={z}");
        }
        let (s, b) = self.send("GET", &uri, Vec::new(), None, HOST_IP).await;
        assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
        serde_json::from_slice::<VersionInfo>(&b).unwrap()
    }

    async fn report_from(
        &self,
        from: &str,
        host: &str,
        state: HostState,
        detail: Option<&str>,
    ) -> (StatusCode, Vec<u8>) {
        let body = json!({"name": "app", "hash": self.b.sha256.to_hex(), "host": host,
                          "state": state, "detail": detail});
        self.send(
            "POST",
            "/api/v1/reports",
            serde_json::to_vec(&body).unwrap(),
            None,
            from,
        )
        .await
    }

    /// A report as `fbpkg-rs get` sends it.
    async fn report_get(&self, host: &str, state: HostState) -> ReportAck {
        let body = json!({"name": "app", "hash": self.b.sha256.to_hex(), "host": host,
                          "state": state, "source": "get"});
        let (s, b) = self
            .send(
                "POST",
                "/api/v1/reports",
                serde_json::to_vec(&body).unwrap(),
                None,
                HOST_IP,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
        serde_json::from_slice(&b).unwrap()
    }

    async fn report(&self, host: &str, state: HostState, detail: Option<&str>) -> ReportAck {
        let (s, b) = self.report_from(HOST_IP, host, state, detail).await;
        assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
        serde_json::from_slice(&b).unwrap()
    }

    fn tick(&self) {
        self.state
            .rollouts
            .tick(&self.state.catalog, Instant::now(), wall_ms())
            .unwrap();
    }

    async fn status(&self) -> RolloutStatus {
        let (s, b) = self
            .send(
                "GET",
                "/api/v1/rollouts/app/prod",
                Vec::new(),
                None,
                HOST_IP,
            )
            .await;
        assert_eq!(s, StatusCode::OK);
        serde_json::from_slice(&b).unwrap()
    }

    async fn current(&self) -> RolloutView {
        self.status().await.current.expect("an active rollout")
    }

    async fn control(&self, action: &str) -> (StatusCode, Vec<u8>) {
        self.post(&format!("/api/v1/rollouts/app/prod/{action}"), json!(null))
            .await
    }
}

fn error(b: &[u8]) -> String {
    serde_json::from_slice::<ApiError>(b).unwrap().error
}

#[tokio::test(start_paused = true)]
async fn phases_advance_as_reports_come_in_then_the_tag_moves() {
    let h = Harness::new().await;
    let (a, b) = (h.a.sha256, h.b.sha256);
    let r = h.start(&["zone:dc1/rack7", "50", "100"], 1000, "0").await;
    assert_eq!(r.from, Some(a));
    assert_eq!(r.phase, 0);
    let inside = hosts(true, 5000, 2);
    let outside = hosts(false, 5000, 2);

    // Phase 1: only the zone's hosts (at or under dc1/rack7) get b.
    assert_eq!(h.resolve(Some(&outside[0]), Some("dc1/rack7/h1")).await, b);
    assert_eq!(h.resolve(Some(&inside[0]), Some("dc1/rack70")).await, a);
    assert_eq!(h.resolve(Some(&outside[1]), None).await, a);
    assert_eq!(
        h.resolve(None, None).await,
        a,
        "without host=, the tag as today"
    );

    // Nobody acted yet: the gate waits, whatever the time.
    tokio::time::advance(Duration::from_secs(5)).await;
    h.tick();
    assert_eq!(h.current().await.rollout.phase, 0);

    let ack = h.report(&outside[0], HostState::Activated, None).await;
    assert_eq!(ack.counted_for, vec!["app:prod#2".to_owned()]);
    h.tick(); // the gate passes: bake starts
    tokio::time::advance(Duration::from_millis(999)).await;
    h.tick();
    assert_eq!(h.current().await.rollout.phase, 0, "still baking");
    tokio::time::advance(Duration::from_millis(1)).await;
    h.tick();
    let v = h.current().await;
    assert_eq!(v.rollout.phase, 1);
    assert!(matches!(v.rollout.state, RolloutState::Running { .. }));

    // Phase 2 (50%): the low buckets join; the others still get a.
    assert_eq!(h.resolve(Some(&inside[0]), Some("dc1/rack70")).await, b);
    assert_eq!(h.resolve(Some(&outside[1]), None).await, a);
    let v = h.current().await;
    assert_eq!(v.phase_counts[0].activated, 1);
    assert_eq!(v.phase_counts[1].resolved, 1);
    assert_eq!(v.waiting, 1);
    // Once a host reports health, `activated` no longer passes for healthy.
    h.report(&inside[0], HostState::Healthy, None).await;
    h.tick();
    tokio::time::advance(Duration::from_secs(1)).await;
    h.tick();
    assert_eq!(
        h.current().await.rollout.phase,
        1,
        "the zone host is only activated"
    );
    h.report(&outside[0], HostState::Healthy, None).await;
    h.tick();
    tokio::time::advance(Duration::from_secs(1)).await;
    h.tick();
    assert_eq!(h.current().await.rollout.phase, 2);

    // Last phase: everyone.
    assert_eq!(h.resolve(Some(&outside[1]), None).await, b);
    h.report(&outside[1], HostState::Healthy, None).await;
    h.tick();
    tokio::time::advance(Duration::from_secs(1)).await;
    h.tick();
    let st = h.status().await;
    assert!(st.current.is_none());
    let done = st.history.last().unwrap();
    assert_eq!((done.id, &done.state), (2, &RolloutState::Done));
    assert_eq!(h.resolve(None, None).await, b, "the tag now points at b");
}

#[tokio::test(start_paused = true)]
async fn unhealthy_hosts_over_the_budget_halt_with_the_reason() {
    let h = Harness::new().await;
    let (a, b) = (h.a.sha256, h.b.sha256);
    h.start(&["50", "100"], 0, "1").await;
    let inside = hosts(true, 5000, 3);
    let outside = hosts(false, 5000, 3);
    for host in inside.iter() {
        assert_eq!(h.resolve(Some(host), None).await, b);
    }
    for host in outside.iter() {
        assert_eq!(h.resolve(Some(host), None).await, a);
    }
    h.report(&inside[0], HostState::Unhealthy, Some("starting\nexit 1"))
        .await;
    h.tick();
    assert!(
        matches!(
            h.current().await.rollout.state,
            RolloutState::Running { .. }
        ),
        "one failure is within the budget"
    );
    // Repeated reports from one host are one vote.
    h.report(&inside[0], HostState::Unhealthy, Some("exit 1"))
        .await;
    h.tick();
    assert!(matches!(
        h.current().await.rollout.state,
        RolloutState::Running { .. }
    ));
    h.report(&inside[1], HostState::Unhealthy, Some("exit 3"))
        .await;
    h.report(&inside[2], HostState::Healthy, None).await;
    h.tick();
    let v = h.current().await;
    let RolloutState::Halted { reason } = &v.rollout.state else {
        panic!("not halted: {:?}", v.rollout.state);
    };
    assert!(
        reason.starts_with("2 unhealthy hosts in phase 1 of 2 (50) (max 1 of 3 hosts"),
        "{reason}"
    );
    assert!(
        reason.contains(&format!("{}: exit 1", inside[0])),
        "{reason}"
    );
    assert!(
        reason.contains(&format!("{}: exit 3", inside[1])),
        "{reason}"
    );
    assert_eq!(v.failed_hosts.len(), 2);
    assert_eq!(v.phase_counts[0].unhealthy, 2);
    assert_eq!(v.phase_counts[0].healthy, 1);
    // Halted holds: the phase's hosts keep b, the others keep a, even once healthy.
    for host in outside.iter() {
        assert_eq!(h.resolve(Some(host), None).await, a);
    }
    assert_eq!(h.resolve(Some(&inside[2]), None).await, b);
    h.report(&inside[0], HostState::Healthy, None).await;
    h.report(&inside[1], HostState::Healthy, None).await;
    tokio::time::advance(Duration::from_secs(10)).await;
    h.tick();
    assert!(matches!(
        h.current().await.rollout.state,
        RolloutState::Halted { .. }
    ));
    let (s, b2) = h.control("resume").await;
    assert_eq!(s, StatusCode::CONFLICT, "{}", error(&b2));

    // A new start needs an abort or force.
    let (s, body) = h.start_raw(&["100"], 0, "0", false).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(error(&body).contains("halted"), "{}", error(&body));
    let (s, _) = h.start_raw(&["100"], 0, "0", true).await;
    assert_eq!(s, StatusCode::CREATED);
    let st = h.status().await;
    assert_eq!(st.current.unwrap().rollout.id, 3);
    assert!(matches!(
        st.history.last().unwrap().state,
        RolloutState::Aborted { .. }
    ));
}

#[tokio::test(start_paused = true)]
async fn hosts_whose_phase_has_not_come_are_told_what_to_prefetch() {
    let h = Harness::new().await;
    let (a, b) = (h.a.sha256, h.b.sha256);
    h.start(&["50", "100"], 0, "0").await;
    let inside = hosts(true, 5000, 2);
    let outside = hosts(false, 5000, 1);
    let v = h.resolve_info(Some(&outside[0]), None).await;
    assert_eq!((v.sha256, v.prefetch), (a, Some(b)));
    let v = h.resolve_info(Some(&inside[0]), None).await;
    assert_eq!(
        (v.sha256, v.prefetch),
        (b, None),
        "in the phase: nothing ahead"
    );
    let v = h.resolve_info(None, None).await;
    assert_eq!(
        (v.sha256, v.prefetch),
        (a, None),
        "no host, no rollout view"
    );
    // A prefetched host is counted as fetched, in its own phase: the current phase's gate
    // does not wait for it.
    h.report(&outside[0], HostState::Fetched, None).await;
    let view = h.current().await;
    assert_eq!(view.phase_counts[1].fetched, 1);
    // Paused goes on later: keep prefetching.
    assert_eq!(h.control("pause").await.0, StatusCode::OK);
    let v = h.resolve_info(Some(&outside[0]), None).await;
    assert_eq!(v.prefetch, Some(b));
    assert_eq!(h.control("resume").await.0, StatusCode::OK);
    // Halted waits for an abort: a version that failed its checks is not worth the bytes.
    h.report(&inside[0], HostState::Unhealthy, Some("exit 1"))
        .await;
    h.tick();
    assert!(matches!(
        h.current().await.rollout.state,
        RolloutState::Halted { .. }
    ));
    let v = h.resolve_info(Some(&outside[0]), None).await;
    assert_eq!((v.sha256, v.prefetch), (a, None));
}

#[tokio::test(start_paused = true)]
async fn hosts_that_only_get_move_a_rollout_and_never_take_back_a_health_check() {
    let h = Harness::new().await;
    let b = h.b.sha256;
    h.start(&["50", "100"], 0, "0").await;
    let inside = hosts(true, 5000, 2);
    for host in &inside {
        assert_eq!(h.resolve(Some(host), None).await, b);
    }
    // One host runs a health command, the other only `get`s: its activation is enough.
    let body = json!({"name": "app", "hash": b.to_hex(), "host": inside[0],
                      "state": "activated", "health_check": true});
    let (s, _) = h
        .send(
            "POST",
            "/api/v1/reports",
            serde_json::to_vec(&body).unwrap(),
            None,
            HOST_IP,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    h.report_get(&inside[1], HostState::Activated).await;
    h.tick();
    assert_eq!(
        h.current().await.rollout.phase,
        0,
        "the agent's check is pending"
    );
    h.report(&inside[0], HostState::Healthy, None).await;
    // A later `get` on the checked host says less than its agent: the vote stays healthy.
    let ack = h.report_get(&inside[0], HostState::Activated).await;
    assert_eq!(ack.counted_for.len(), 1, "still one vote");
    let counts = &h.current().await.phase_counts[0];
    assert_eq!((counts.healthy, counts.activated), (1, 1));
    h.tick();
    assert_eq!(
        h.current().await.rollout.phase,
        1,
        "a fleet of gets moves on"
    );
}

#[tokio::test(start_paused = true)]
async fn abort_sends_everyone_back() {
    let h = Harness::new().await;
    let (a, b) = (h.a.sha256, h.b.sha256);
    h.start(&["50", "100"], 0, "0").await;
    let inside = hosts(true, 5000, 1);
    assert_eq!(h.resolve(Some(&inside[0]), None).await, b);
    let (s, body) = h.control("abort").await;
    assert_eq!(s, StatusCode::OK);
    let r: Rollout = serde_json::from_slice(&body).unwrap();
    assert!(matches!(r.state, RolloutState::Aborted { .. }));
    assert_eq!(h.resolve(Some(&inside[0]), None).await, a);
    assert_eq!(h.resolve(None, None).await, a);
    let ack = h.report(&inside[0], HostState::Healthy, None).await;
    assert!(ack.counted_for.is_empty(), "no active rollout to count for");
    let st = h.status().await;
    assert!(st.current.is_none());
    assert_eq!(
        st.history.len(),
        2,
        "the plain move, then the aborted rollout"
    );
    assert_eq!(h.control("abort").await.0, StatusCode::NOT_FOUND);
    // After an abort a new rollout may start.
    h.start(&["100"], 0, "0").await;
}

#[tokio::test(start_paused = true)]
async fn pause_holds_and_resume_goes_on() {
    let h = Harness::new().await;
    h.start(&["50", "100"], 500, "0").await;
    let inside = hosts(true, 5000, 1);
    h.resolve(Some(&inside[0]), None).await;
    assert_eq!(h.control("pause").await.0, StatusCode::OK);
    assert_eq!(h.current().await.rollout.state, RolloutState::Paused);
    h.report(&inside[0], HostState::Healthy, None).await;
    for _ in 0..4 {
        h.tick();
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    assert_eq!(h.current().await.rollout.phase, 0, "paused holds");
    assert_eq!(h.control("resume").await.0, StatusCode::OK);
    h.tick();
    tokio::time::advance(Duration::from_millis(500)).await;
    h.tick();
    let v = h.current().await;
    assert_eq!(v.rollout.phase, 1);
    assert!(matches!(v.rollout.state, RolloutState::Running { .. }));
}

#[tokio::test(start_paused = true)]
async fn a_restarted_tracker_resumes_in_the_same_phase() {
    let mut h = Harness::new().await;
    let b = h.b.sha256;
    h.start(&["25", "50", "100"], 0, "0").await;
    let first = hosts(true, 2500, 1);
    h.resolve(Some(&first[0]), None).await;
    h.report(&first[0], HostState::Healthy, None).await;
    h.tick();
    assert_eq!(h.current().await.rollout.phase, 1);
    // Reopen from disk, as after a kill -9 (every change is durable before it is visible).
    h.state = open(h.dir.path());
    let v = h.current().await;
    assert_eq!(v.rollout.phase, 1);
    assert!(matches!(v.rollout.state, RolloutState::Running { .. }));
    let second = hosts(true, 5000, 40)
        .into_iter()
        .find(|x| !hosts(true, 2500, 40).contains(x))
        .unwrap();
    assert_eq!(h.resolve(Some(&second), None).await, b);
    assert_eq!(h.resolve(None, None).await, h.a.sha256);
    // Host reports are soft state: the gate starts over from the hosts' next reports.
    assert_eq!(v.phase_counts.iter().map(|c| c.healthy).sum::<usize>(), 0);
}

#[tokio::test]
async fn a_report_counts_only_from_the_hosts_own_address() {
    let h = Harness::new().await;
    h.start(&["100"], 0, "0").await;
    let (s, b) = h
        .report_from(HOST_IP, "never-seen", HostState::Healthy, None)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{}", error(&b));
    h.resolve(Some("host-x"), None).await;
    let (s, b) = h
        .report_from("10.9.9.9:1234", "host-x", HostState::Unhealthy, None)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(error(&b).contains("another address"), "{}", error(&b));
    assert_eq!(
        h.report_from("10.0.0.7:1", "host-x", HostState::Healthy, None)
            .await
            .0,
        StatusCode::OK,
        "same address, another port"
    );
    // Malformed bodies and host ids are 400 with the API's error JSON.
    let (s, b) = h
        .report_from(HOST_IP, "bad/id", HostState::Healthy, None)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(error(&b).contains("host id"), "{}", error(&b));
    let (s, _) = h
        .send(
            "GET",
            &format!("/api/v1/packages/app/prod?host={}", "x".repeat(65)),
            Vec::new(),
            None,
            HOST_IP,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_plain_tag_move_is_a_one_phase_rollout_in_the_history() {
    let h = Harness::new().await;
    assert_eq!(h.move_tag(h.b.sha256).await, StatusCode::OK);
    assert_eq!(h.move_tag(h.b.sha256).await, StatusCode::OK);
    let st = h.status().await;
    assert!(st.current.is_none());
    let moves: Vec<_> = st
        .history
        .iter()
        .map(|r| (r.from, r.to, r.phases.len(), r.state.clone()))
        .collect();
    assert_eq!(
        moves,
        vec![
            (None, h.a.sha256, 1, RolloutState::Done),
            (Some(h.a.sha256), h.b.sha256, 1, RolloutState::Done),
        ],
        "a move to where the tag already points records nothing"
    );
    // While a rollout is active, the tag moves only through it.
    h.move_tag(h.a.sha256).await;
    h.start(&["100"], 0, "0").await;
    assert_eq!(h.move_tag(h.a.sha256).await, StatusCode::CONFLICT);
}

#[tokio::test]
async fn bad_requests_are_refused_precisely() {
    let h = Harness::new().await;
    let b = h.b.sha256.to_hex();
    let cases = [
        (
            json!({"name": "app", "tag": "prod", "to": "0123456789abcdef", "phases": ["100"], "max_failures": "1"}),
            StatusCode::NOT_FOUND,
            "no version",
        ),
        (
            json!({"name": "app", "tag": "prod", "to": b, "phases": ["50", "10", "100"], "max_failures": "1"}),
            StatusCode::BAD_REQUEST,
            "ascend",
        ),
        (
            json!({"name": "app", "tag": "prod", "to": b, "phases": ["10", "50"], "max_failures": "1"}),
            StatusCode::BAD_REQUEST,
            "last phase must be 100",
        ),
        (
            json!({"name": "app", "tag": "prod", "to": b, "phases": ["100"], "max_failures": "5x"}),
            StatusCode::BAD_REQUEST,
            "max_failures",
        ),
        (
            json!({"name": "app", "tag": "prod", "to": b, "phases": ["zone:DC1"], "max_failures": "1"}),
            StatusCode::BAD_REQUEST,
            "zone",
        ),
        (
            json!({"name": "app", "tag": "nope", "to": b, "phases": ["100"], "max_failures": "1"}),
            StatusCode::NOT_FOUND,
            "no tag",
        ),
        (
            json!({"name": "app", "tag": "prod", "to": h.a.sha256.to_hex(), "phases": ["100"], "max_failures": "1"}),
            StatusCode::CONFLICT,
            "already points",
        ),
    ];
    for (body, status, needle) in cases {
        let (s, resp) = h.post("/api/v1/rollouts", body.clone()).await;
        assert_eq!(s, status, "{body}: {}", String::from_utf8_lossy(&resp));
        assert!(error(&resp).contains(needle), "{body}: {}", error(&resp));
    }
    let body =
        json!({"name": "app", "tag": "prod", "to": b, "phases": ["100"], "max_failures": "1"});
    let (s, _) = h
        .send(
            "POST",
            "/api/v1/rollouts",
            serde_json::to_vec(&body).unwrap(),
            None,
            "127.0.0.1:1",
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(
        h.post("/api/v1/rollouts", body.clone()).await.0,
        StatusCode::CREATED
    );
    let (s, resp) = h.post("/api/v1/rollouts", body).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(error(&resp).contains("already active"));
    let (s, _) = h
        .send(
            "POST",
            "/api/v1/rollouts/app/prod/pause",
            Vec::new(),
            None,
            "127.0.0.1:1",
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(h.control("explode").await.0, StatusCode::NOT_FOUND);
    let (s, list) = h
        .send("GET", "/api/v1/rollouts", Vec::new(), None, HOST_IP)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        serde_json::from_slice::<Vec<RolloutView>>(&list)
            .unwrap()
            .len(),
        1
    );
}

/// The controller task on tokio's paused clock: a report wakes it, the bake elapses, the
/// rollout finishes and the tag moves, with nobody calling `tick`.
#[tokio::test(start_paused = true)]
async fn the_controller_task_drives_the_gates() {
    let h = Harness::new().await;
    h.start(&["100"], 2000, "0").await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(fbpkg_tracker::rollout::run_controller(
        h.state.clone(),
        shutdown.clone(),
    ));
    h.resolve(Some("host-1"), None).await;
    h.report("host-1", HostState::Healthy, None).await;
    let started = Instant::now();
    while h.status().await.current.is_some() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "never finished"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "finished before the bake"
    );
    assert_eq!(h.resolve(None, None).await, h.b.sha256);
    shutdown.cancel();
    task.await.unwrap();
}

/// The two crash windows between the catalog and the rollout store: the catalog's tag moved but
/// the record did not follow. Reopening settles both from the catalog; a half-written
/// temporary file is ignored.
#[tokio::test]
async fn reopening_settles_what_a_crash_left_between_catalog_and_store() {
    let mut h = Harness::new().await;
    let (name, tag) = (PackageName::new("app").unwrap(), Tag::new("prod").unwrap());
    h.start(&["50", "100"], 0, "0").await;
    // The controller's last step moved the catalog's tag, then the process died.
    h.state
        .catalog
        .move_tag(&name, &tag, &h.b.sha256.to_hex())
        .unwrap();
    std::fs::write(
        h.dir.path().join("rollouts/v1/app/.tmp-1-prod.json"),
        b"{ half",
    )
    .unwrap();
    h.state = open(h.dir.path());
    let st = h.status().await;
    assert!(st.current.is_none());
    assert_eq!(st.history.last().unwrap().state, RolloutState::Done);
    assert_eq!(st.history.last().unwrap().id, 2);
    assert!(
        !h.dir
            .path()
            .join("rollouts/v1/app/.tmp-1-prod.json")
            .exists()
    );

    // A plain move whose record was lost: rebuilt as a one-phase rollout.
    h.state
        .catalog
        .move_tag(&name, &tag, &h.a.sha256.to_hex())
        .unwrap();
    h.state = open(h.dir.path());
    let last = h.status().await.history.last().unwrap().clone();
    assert_eq!(
        (last.id, last.from, last.to, last.state),
        (3, Some(h.b.sha256), h.a.sha256, RolloutState::Done)
    );
}

#[tokio::test]
async fn history_is_bounded_per_tag() {
    let h = Harness::new().await;
    for i in 0..60 {
        let to = if i % 2 == 0 { h.b.sha256 } else { h.a.sha256 };
        assert_eq!(h.move_tag(to).await, StatusCode::OK);
    }
    let st = h.status().await;
    assert_eq!(st.history.len(), fbpkg_tracker::rollout::HISTORY_PER_TAG);
    assert_eq!(st.history.last().unwrap().id, 61);
}

/// A history whose last completed move has been trimmed away (fifty aborted rollouts since)
/// still says where the tag is: an aborted rollout left it at its `from`. Reading "no move on
/// record" there made the next change record a plain move that never happened.
#[tokio::test(start_paused = true)]
async fn aborted_rollouts_alone_still_say_where_the_tag_is() {
    let h = Harness::new().await;
    for _ in 0..fbpkg_tracker::rollout::HISTORY_PER_TAG {
        h.start(&["100"], 0, "0").await;
        assert_eq!(h.control("abort").await.0, StatusCode::OK);
    }
    let st = h.status().await;
    assert!(
        st.history
            .iter()
            .all(|r| matches!(r.state, RolloutState::Aborted { .. })),
        "the plain move that set the tag has been trimmed"
    );
    let r = h.start(&["100"], 0, "0").await;
    assert_eq!(r.from, Some(h.a.sha256));
    let st = h.status().await;
    assert!(
        st.history.iter().all(|r| r.from.is_some()),
        "no move from nowhere recorded: {:?}",
        st.history.last()
    );
    assert_eq!(st.current.expect("active").rollout.id, r.id);
    assert_eq!(r.id, fbpkg_tracker::rollout::HISTORY_PER_TAG as u64 + 2);
}

/// Each tag's step is taken on its own: one whose record cannot be written (on every tick)
/// does not keep another tag's rollout from halting on its unhealthy hosts. The first failing
/// step returned from the gate, and every tag after it in order was never judged again.
#[tokio::test(start_paused = true)]
async fn a_tag_whose_step_fails_does_not_hold_up_the_others() {
    let h = Harness::new().await;
    let b = h.b.sha256;
    let (s, _) = h
        .send(
            "PUT",
            "/api/v1/packages/app/tags/alpha",
            h.a.sha256.to_hex().into_bytes(),
            Some(TOKEN),
            "127.0.0.1:1",
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    for tag in ["alpha", "prod"] {
        let (s, body) = h
            .post(
                "/api/v1/rollouts",
                json!({"name": "app", "tag": tag, "to": b.to_hex(), "phases": ["100"],
                       "bake_ms": 0, "max_failures": "0"}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{}", String::from_utf8_lossy(&body));
        let (s, body) = h
            .send(
                "GET",
                &format!("/api/v1/packages/app/{tag}?host=host-1"),
                Vec::new(),
                None,
                HOST_IP,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    }
    let ack = h
        .report("host-1", HostState::Unhealthy, Some("exit 1"))
        .await;
    assert_eq!(ack.counted_for.len(), 2, "{:?}", ack.counted_for);
    // app:alpha's record can no longer be replaced (a directory where its file goes).
    let record = h.dir.path().join("rollouts/v1/app/alpha.json");
    std::fs::remove_file(&record).unwrap();
    std::fs::create_dir_all(record.join("in-the-way")).unwrap();
    let failed = h
        .state
        .rollouts
        .tick(&h.state.catalog, Instant::now(), wall_ms());
    assert!(failed.is_err(), "alpha's step could not be recorded");
    assert!(
        matches!(h.current().await.rollout.state, RolloutState::Halted { .. }),
        "prod halts all the same"
    );
}
