#![allow(clippy::unwrap_used)]
//! The dashboard, rendered by a real headless Chromium against a real `fbpkg-rs tracker`.
//!
//! A package is published and tagged, one seeder and one leecher (a quarter left) announce, and
//! the DOM Chromium renders must show the package, the tag, the swarm's counts, both peers and
//! their progress. A second test halts a real rollout (one failed host whose health output is
//! markup) and the DOM must show the rollouts view: the halt reason, the phases' progress bars,
//! the failed host's output as text, never as markup. Chromium (`/usr/bin/chromium`, Debian's
//! `chromium` package) is required: the tests fail, saying how to install it, when it is
//! missing.

use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fbpkg_common::PeerId;
use fbpkg_common::api::{RolloutState, RolloutStatus};
use fbpkg_common::metainfo::Metainfo;
use fbpkg_common::tracker_proto::{AnnounceRequest, AnnounceResponse, Event, TrackerReply};
use fbpkg_tests::{TrackerProcess, http_client, move_tag, publish, random_package, wait_for};
use reqwest::StatusCode;

const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(60);
const PACKAGE: &str = "dash-demo";
const PACKAGE_BYTES: u64 = 1 << 20;

/// Chromium: `/usr/bin/chromium`, or `chromium` on PATH.
fn chromium() -> PathBuf {
    let on_path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("chromium"))
                .collect()
        })
        .unwrap_or_default();
    std::iter::once(PathBuf::from("/usr/bin/chromium"))
        .chain(on_path)
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "the dashboard test needs Chromium, and neither /usr/bin/chromium nor `chromium` \
                 on PATH exists. Install it with `sudo apt-get install chromium` (Debian/Ubuntu), \
                 or run scripts/test.sh, which installs it"
            )
        })
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Load `url` in headless Chromium and return the DOM after load, within `CHROMIUM_TIMEOUT`.
fn dump_dom(url: &str) -> String {
    let work = tempfile::tempdir().unwrap();
    let (dom, log) = (
        work.path().join("dom.html"),
        work.path().join("chromium.log"),
    );
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--no-proxy-server",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!(
            "--user-data-dir={}",
            work.path().join("profile").display()
        ))
        .arg("--dump-dom")
        .arg(url)
        .stdin(Stdio::null())
        .stdout(File::create(&dom).unwrap())
        .stderr(File::create(&log).unwrap())
        // Its own process group, so a timeout can kill the browser's helpers too.
        .process_group(0)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + CHROMIUM_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium did not render {url} within {CHROMIUM_TIMEOUT:?}; its log:\n{}",
                tail(&log)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "chromium failed ({status}); its log:\n{}",
        tail(&log)
    );
    std::fs::read_to_string(&dom).unwrap()
}

/// Announce as a peer with `left` bytes missing; the tracker's answer.
async fn announce(
    client: &reqwest::Client,
    base_url: &str,
    m: &Metainfo,
    peer: u8,
    port: u16,
    left: u64,
) -> AnnounceResponse {
    let req = AnnounceRequest {
        info_hash: m.info_hash,
        peer_id: PeerId([peer; 20]),
        port,
        uploaded: 0,
        downloaded: PACKAGE_BYTES - left,
        left,
        event: Event::Started,
        compact: true,
        numwant: None,
        no_peer_id: false,
        key: None,
        ip: None,
        zone: None,
    };
    let resp = client
        .get(format!("{base_url}/announce?{}", req.to_query()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    match AnnounceResponse::decode(&resp.bytes().await.unwrap()).unwrap() {
        TrackerReply::Ok(r) => r,
        TrackerReply::Failure(why) => panic!("announce refused: {why}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_renders_packages_swarms_and_progress_in_chromium() {
    let browser = chromium();
    let dir = tempfile::tempdir().unwrap();
    let tracker = TrackerProcess::start(dir.path()).unwrap();
    let (base, client) = (tracker.base_url(), http_client());

    let (_, m) = random_package(
        &mut rand::rng(),
        PACKAGE_BYTES as usize,
        "dash-demo.bin",
        &tracker.announce_url(),
    );
    assert_eq!(
        publish(&client, &base, PACKAGE, &m).await.unwrap(),
        StatusCode::CREATED
    );
    assert_eq!(
        move_tag(&client, &base, PACKAGE, "prod", &m.sha256)
            .await
            .unwrap(),
        StatusCode::OK
    );
    // Peer records only: nothing listens on these ports, and nothing connects to them.
    let seeder = announce(&client, &base, &m, b'S', 7001, 0).await;
    assert_eq!((seeder.complete, seeder.incomplete), (1, 0));
    let leecher = announce(&client, &base, &m, b'L', 7002, PACKAGE_BYTES / 4).await;
    assert_eq!((leecher.complete, leecher.incomplete), (1, 1));
    assert_eq!(
        leecher
            .peers
            .iter()
            .map(|p| p.addr.to_string())
            .collect::<Vec<_>>(),
        ["127.0.0.1:7001"],
        "the leecher is told about the seeder"
    );

    let url = format!("{base}/");
    let dom = tokio::task::spawn_blocking(move || dump_dom(&url))
        .await
        .unwrap();
    let shown = |what: &str, needle: &str| {
        assert!(
            dom.contains(needle),
            "the dashboard rendered by {} does not show {what} ({needle:?}):\n{dom}",
            browser.display()
        );
    };
    shown("the title", "<h1>fbpkg-rs tracker</h1>");
    shown("the package", &format!("<td>{PACKAGE}</td>"));
    shown(
        "the version",
        &format!("{PACKAGE}:<code>{}</code>", &m.sha256.to_hex()[..16]),
    );
    shown("the tag", &format!("prod→{}", &m.sha256.to_hex()[..12]));
    shown(
        "the totals",
        "1 packages, 1 versions (1.0 MiB), 1 swarms, 1 seeders, 1 leechers",
    );
    shown("the swarm's counts", "1 seeders, 1 leechers, 0 completed");
    shown("the seeder", "<td>127.0.0.1:7001</td>");
    shown("the leecher", "<td>127.0.0.1:7002</td>");
    shown("the seeder's progress", "width:100%");
    shown("the leecher's progress", "width:75%");
    shown("the leecher's progress figure", "75%</td>");
}

/// `method url` with `body`; the answer must be a success. Its body.
async fn call_ok(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: String,
) -> String {
    let resp = client
        .request(method.clone(), url)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert!(status.is_success(), "{method} {url}: {status} {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_a_halted_rollout_in_chromium() {
    const APP: &str = "dash-rollout";
    let browser = chromium();
    let dir = tempfile::tempdir().unwrap();
    let tracker = TrackerProcess::start(dir.path()).unwrap();
    let (base, client) = (tracker.base_url(), http_client());
    let mut rng = rand::rng();
    let (_, old) = random_package(&mut rng, 64 << 10, "app.bin", &tracker.announce_url());
    let (_, new) = random_package(&mut rng, 64 << 10, "app.bin", &tracker.announce_url());
    for m in [&old, &new] {
        assert_eq!(
            publish(&client, &base, APP, m).await.unwrap(),
            StatusCode::CREATED
        );
    }
    assert_eq!(
        move_tag(&client, &base, APP, "prod", &old.sha256)
            .await
            .unwrap(),
        StatusCode::OK
    );
    let start = serde_json::json!({"name": APP, "tag": "prod", "to": new.sha256.to_hex(),
        "phases": ["zone:dc1", "100"], "bake_ms": 3_600_000, "max_failures": "0"});
    call_ok(
        &client,
        reqwest::Method::POST,
        &format!("{base}/api/v1/rollouts"),
        start.to_string(),
    )
    .await;

    // Three hosts on this loopback address: two in the zone phase (one healthy, one whose
    // health command failed with markup in its output), one in the later phase that prefetched.
    // The controller judges after every report; the hour of bake keeps the healthy host's pass
    // from moving the rollout on before the failure comes in (a halt needs no bake).
    let hostile =
        "health exit status 1\n<script>document.title='pwned'</script><b id=\"injected\">x</b>";
    for (host, zone, state, detail) in [
        ("web-1", "&zone=dc1/r1", "healthy", None),
        ("web-2", "&zone=dc1/r2", "unhealthy", Some(hostile)),
        ("web-3", "", "fetched", None),
    ] {
        call_ok(
            &client,
            reqwest::Method::GET,
            &format!("{base}/api/v1/packages/{APP}/prod?host={host}{zone}"),
            String::new(),
        )
        .await;
        let report = serde_json::json!({"name": APP, "hash": new.sha256.to_hex(), "host": host,
            "state": state, "detail": detail});
        call_ok(
            &client,
            reqwest::Method::POST,
            &format!("{base}/api/v1/reports"),
            report.to_string(),
        )
        .await;
    }
    let status_url = format!("{base}/api/v1/rollouts/{APP}/prod");
    let reason = wait_for("the rollout to halt", Duration::from_secs(20), || async {
        let text = client
            .get(&status_url)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .text()
            .await
            .map_err(|e| e.to_string())?;
        let st: RolloutStatus = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
        match st.current.map(|v| v.rollout.state) {
            Some(RolloutState::Halted { reason }) => Ok(reason),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(
        reason.starts_with("1 unhealthy hosts in phase 1 of 2 (zone:dc1)"),
        "{reason}"
    );

    let url = format!("{base}/");
    let dom = tokio::task::spawn_blocking(move || dump_dom(&url))
        .await
        .unwrap();
    let shown = |what: &str, needle: &str| {
        assert!(
            dom.contains(needle),
            "the dashboard rendered by {} does not show {what} ({needle:?}):\n{dom}",
            browser.display()
        );
    };
    shown("the rollouts view", "<h2>Rollouts</h2>");
    shown(
        "the rollout and its state",
        &format!(
            "<div class=\"rollout\" id=\"rollout-{APP}-prod\"><h3>{APP}:prod <span class=\"state halted\">halted</span></h3>"
        ),
    );
    shown("where it is", "phase 1 of 2 (zone:dc1)");
    shown(
        "the halt reason",
        "<p class=\"halt\"><strong>Halted:</strong> 1 unhealthy hosts in phase 1 of 2 (zone:dc1) (max 0 of 2 hosts, max_failures 0): web-2: ",
    );
    shown(
        "the current phase",
        "<tr class=\"current\"><td>▶ 1: zone:dc1</td><td>2</td>",
    );
    shown(
        "the current phase's failed bar",
        "<span class=\"bar fail\" role=\"progressbar\" aria-valuenow=\"1\" aria-valuemax=\"2\" title=\"1 of 2 hosts\"><i style=\"width:50%\"></i></span> 1/2",
    );
    shown(
        "the current phase's healthy bar",
        "<span class=\"bar ok\" role=\"progressbar\" aria-valuenow=\"1\" aria-valuemax=\"2\"",
    );
    shown(
        "the later phase's prefetch bar",
        "<tr class=\"later\"><td>2: 100%</td><td>1</td><td><span class=\"bar pre\" role=\"progressbar\" aria-valuenow=\"1\" aria-valuemax=\"1\" title=\"1 of 1 hosts\"><i style=\"width:100%\"></i></span> 1/1</td>",
    );
    shown(
        "the failed host with its output as text",
        "<tr><td>web-2</td><td>dc1/r2</td><td>1</td><td><pre>health exit status 1\n&lt;script&gt;document.title='pwned'&lt;/script&gt;&lt;b id=\"injected\"&gt;x&lt;/b&gt;</pre></td></tr>",
    );
    // What the browser parsed: no element came from a report, and no script ran.
    assert!(
        !dom.contains("<script"),
        "a report's script reached the DOM:\n{dom}"
    );
    assert!(
        !dom.contains("<b id="),
        "a report's markup became an element:\n{dom}"
    );
    shown("the untouched title", "<title>fbpkg-rs tracker</title>");
}
