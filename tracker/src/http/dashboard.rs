//! `GET /`: the fleet's rollouts, packages and swarms on one server-rendered page. No scripts,
//! no external assets; it refreshes itself with a meta tag. Every value from the catalog, from
//! an announce or from a host's report is HTML-escaped: a health command's output is whatever
//! the host (or whoever holds its address) sent.
//!
//! Rollouts come first, as they are what an operator watches: each active one with a row per
//! phase and bars out of the phase's hosts (each host counted in the first phase holding it,
//! so later phases show their prefetch), the halt reason, the failed hosts with their output;
//! then the last few finished rollouts of each tag.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use axum::extract::State;
use axum::response::Html;
use fbpkg_common::Sha256Hash;
use fbpkg_common::api::{PhaseCounts, Rollout, RolloutState, RolloutView};
use fbpkg_common::rollout::Phase;

use super::SharedState;
use super::api::{SwarmView, swarm_views_any};
use crate::metrics::rollout_state_label;
use crate::rollout::wall_ms;

/// Peers listed per swarm; the counts above the table are always complete.
const PEERS_SHOWN: usize = 200;
/// Failed hosts listed per rollout (with their output); the counts are always complete.
const FAILED_SHOWN: usize = 50;
/// Finished rollouts listed per tag, and in all.
const HISTORY_SHOWN: usize = 3;
const HISTORY_ROWS: usize = 150;

/// Escape text for HTML element content and quoted attribute values.
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:2em;color:#222}\
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{padding:.25em .8em;border-bottom:1px solid #ddd;text-align:left}\
th{background:#f4f4f4}code{font-size:12px}.bar{background:#eee;width:120px;height:10px;display:inline-block}\
.bar i{background:#3a7;height:10px;display:block}.muted{color:#888}h2{margin-top:1.5em}\
.bar.pre i{background:#7ab}.bar.act i{background:#5a9}.bar.fail i{background:#c33}\
.rollout{border:1px solid #ddd;padding:.2em 1em .5em;margin:1em 0}.state{padding:.1em .5em;border-radius:3px;background:#eee}\
.state.running{background:#dfd}.state.paused{background:#ffd}.state.halted,.state.aborted{background:#fdd}\
.halt{background:#fee;border-left:4px solid #c33;padding:.5em .8em;white-space:pre-wrap}\
tr.current td{font-weight:bold}tr.later td{color:#888}pre{margin:0;white-space:pre-wrap;max-width:70em;font-size:12px}";

pub(super) async fn dashboard(State(state): State<SharedState>) -> Html<String> {
    let views = swarm_views_any(&state, PEERS_SHOWN).await;
    Html(render(&state, views))
}

fn render(state: &SharedState, views: Vec<SwarmView>) -> String {
    let summaries = state.catalog.summaries();
    let by_hash: BTreeMap<String, &SwarmView> = views
        .iter()
        .filter_map(|v| v.sha256.map(|h| (h.to_hex(), v)))
        .collect();
    let mut h = String::with_capacity(16 << 10);
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"{}\">\
         <title>fbpkg-rs tracker</title><style>{STYLE}</style></head><body><h1>fbpkg-rs tracker</h1>",
        state.config.dashboard_refresh_secs
    );
    let stats = state.catalog.stats();
    let (seeders, leechers) = views
        .iter()
        .fold((0, 0), |(s, l), v| (s + v.seeders, l + v.leechers));
    let _ = write!(
        h,
        "<p id=\"totals\">{} packages, {} versions ({}), {} swarms, {seeders} seeders, {leechers} leechers</p>",
        stats.packages,
        stats.versions,
        bytes(stats.bytes),
        views.len()
    );
    rollouts(
        &mut h,
        &state.rollouts.active(),
        &state.rollouts.recent_history(HISTORY_SHOWN),
        wall_ms(),
    );
    h.push_str("<h2>Packages</h2>");
    if summaries.is_empty() {
        h.push_str(
            "<p class=\"muted\">Nothing published yet: <code>fbpkg-rs publish NAME PATH</code></p>",
        );
    } else {
        h.push_str("<table id=\"packages\"><tr><th>package</th><th>versions</th><th>tags</th><th>size</th><th>latest</th></tr>");
        for s in &summaries {
            let tags: Vec<String> = s
                .tags
                .iter()
                .map(|(t, sha)| format!("{}&rarr;{}", escape(t.as_str()), &sha.to_hex()[..12]))
                .collect();
            let latest = s
                .latest
                .as_ref()
                .map(|l| l.sha256.to_hex()[..12].to_owned())
                .unwrap_or_default();
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{latest}</code></td></tr>",
                escape(s.name.as_str()),
                s.versions,
                tags.join(", "),
                bytes(s.total_bytes)
            );
        }
        h.push_str("</table>");
    }
    h.push_str("<h2>Swarms</h2>");
    for s in &summaries {
        let Ok(detail) = state.catalog.detail(&s.name) else {
            continue;
        };
        for v in &detail.versions {
            let hex = v.sha256.to_hex();
            let tags: Vec<String> = v.tags.iter().map(|t| escape(t.as_str())).collect();
            let _ = write!(
                h,
                "<h3 class=\"swarm\">{}:<code>{}</code> <span class=\"muted\">{} {}</span></h3>",
                escape(v.name.as_str()),
                &hex[..16],
                bytes(v.size),
                tags.join(" ")
            );
            match by_hash.get(&hex) {
                Some(sw) => swarm_table(&mut h, sw),
                None => h.push_str("<p class=\"muted\">no peers</p>"),
            }
        }
    }
    let unregistered: Vec<&SwarmView> = views.iter().filter(|v| v.package.is_none()).collect();
    if !unregistered.is_empty() {
        let _ = write!(h, "<h2>Unregistered swarms ({})</h2>", unregistered.len());
        for sw in unregistered.iter().take(50) {
            let _ = write!(h, "<h3 class=\"swarm\"><code>{}</code></h3>", sw.info_hash);
            swarm_table(&mut h, sw);
        }
    }
    h.push_str("<p class=\"muted\"><a href=\"/metrics\">metrics</a> &middot; <a href=\"/api/v1/packages\">catalog API</a> &middot; <a href=\"/api/v1/swarms\">swarms API</a> &middot; <a href=\"/api/v1/rollouts\">rollouts API</a></p></body></html>");
    h
}

fn swarm_table(h: &mut String, sw: &SwarmView) {
    let _ = write!(
        h,
        "<p>{} seeders, {} leechers, {} completed</p>",
        sw.seeders, sw.leechers, sw.completed
    );
    if sw.peers.is_empty() {
        return;
    }
    h.push_str("<table class=\"peers\"><tr><th>peer</th><th>zone</th><th>role</th><th>progress</th><th>up</th><th>down</th></tr>");
    for p in &sw.peers {
        let role = if p.left == 0 { "seeder" } else { "leecher" };
        let progress = p.progress.map_or_else(
            || format!("{} left", bytes(p.left)),
            |f| {
                let pct = (f * 100.0).clamp(0.0, 100.0);
                format!("<span class=\"bar\"><i style=\"width:{pct:.0}%\"></i></span> {pct:.0}%")
            },
        );
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{role}</td><td>{progress}</td><td>{}</td><td>{}</td></tr>",
            escape(&p.addr),
            escape(p.zone.as_deref().unwrap_or("")),
            bytes(p.uploaded),
            bytes(p.downloaded)
        );
    }
    h.push_str("</table>");
}

fn short(h: &Sha256Hash) -> String {
    h.to_hex()[..12].to_owned()
}

/// Whole seconds from `then_ms` to `now_ms`, for a human.
fn since(now_ms: u64, then_ms: u64) -> String {
    let secs = now_ms.saturating_sub(then_ms) / 1000;
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

fn ago(now_ms: u64, then_ms: u64) -> String {
    format!("{} ago", since(now_ms, then_ms))
}

fn phase_label(p: &Phase) -> String {
    match p {
        Phase::Percent(n) => format!("{n}%"),
        Phase::Zone(_) => escape(&p.to_string()),
    }
}

/// A bar of `n` out of `of` hosts, with the figure beside it.
fn host_bar(n: usize, of: usize, class: &str) -> String {
    let pct = if of == 0 {
        0.0
    } else {
        n as f64 * 100.0 / of as f64
    };
    format!(
        "<span class=\"bar {class}\" role=\"progressbar\" aria-valuenow=\"{n}\" aria-valuemax=\"{of}\" \
         title=\"{n} of {of} hosts\"><i style=\"width:{pct:.0}%\"></i></span> {n}/{of}"
    )
}

/// `from -> to` of a rollout, short hashes.
fn versions(r: &Rollout) -> String {
    let from = r.from.as_ref().map_or_else(
        || "none".to_owned(),
        |f| format!("<code>{}</code>", short(f)),
    );
    format!("{from} &rarr; <code>{}</code>", short(&r.to))
}

/// The rollouts section: the active ones in full, then the recent finished ones.
fn rollouts(h: &mut String, active: &[RolloutView], history: &[Rollout], now_ms: u64) {
    h.push_str("<h2>Rollouts</h2>");
    if active.is_empty() {
        h.push_str(
            "<p class=\"muted\">No active rollout: <code>fbpkg-rs rollout start NAME:HASH --tag TAG --phases 10,100</code></p>",
        );
    }
    for v in active {
        rollout_view(h, v, now_ms);
    }
    if history.is_empty() {
        return;
    }
    h.push_str("<h3>Finished</h3><table id=\"rollout-history\"><tr><th>rollout</th><th>versions</th><th>phases</th><th>state</th><th>ended</th></tr>");
    for r in history.iter().take(HISTORY_ROWS) {
        let st = rollout_state_label(&r.state);
        let why = match &r.state {
            RolloutState::Aborted { reason } => format!(": {}", escape(reason)),
            _ => String::new(),
        };
        let phases: Vec<String> = r.phases.iter().map(phase_label).collect();
        let _ = write!(
            h,
            "<tr><td>{}:{} #{}</td><td>{}</td><td>{}</td><td><span class=\"state {st}\">{st}</span>{why}</td><td>{}</td></tr>",
            escape(r.name.as_str()),
            escape(r.tag.as_str()),
            r.id,
            versions(r),
            phases.join(", "),
            ago(now_ms, r.updated_at)
        );
    }
    h.push_str("</table>");
    if history.len() > HISTORY_ROWS {
        let _ = write!(
            h,
            "<p class=\"muted\">and {} more: <code>fbpkg-rs rollout status NAME:TAG</code></p>",
            history.len() - HISTORY_ROWS
        );
    }
}

fn rollout_view(h: &mut String, v: &RolloutView, now_ms: u64) {
    let r = &v.rollout;
    let st = rollout_state_label(&r.state);
    let (name, tag) = (escape(r.name.as_str()), escape(r.tag.as_str()));
    let _ = write!(
        h,
        "<div class=\"rollout\" id=\"rollout-{name}-{tag}\"><h3>{name}:{tag} <span class=\"state {st}\">{st}</span></h3>\
         <p>rollout #{} {} &middot; phase {} of {} ({}) &middot; bake {} &middot; max failures {} &middot; started {}",
        r.id,
        versions(r),
        r.phase + 1,
        r.phases.len(),
        r.phases.get(r.phase).map(phase_label).unwrap_or_default(),
        humantime::format_duration(Duration::from_millis(r.bake_ms)),
        escape(&r.max_failures.to_string()),
        ago(now_ms, r.started_at)
    );
    if let RolloutState::Running { phase_started } = r.state {
        let _ = write!(h, ", in this phase for {}", since(now_ms, phase_started));
    }
    h.push_str("</p>");
    if let RolloutState::Halted { reason } = &r.state {
        let _ = write!(
            h,
            "<p class=\"halt\"><strong>Halted:</strong> {}</p>",
            escape(reason)
        );
    }
    h.push_str("<table class=\"phases\"><tr><th>phase</th><th>hosts</th><th>prefetched</th><th>activated</th><th>healthy</th><th>failed</th></tr>");
    for (i, c) in v.phase_counts.iter().enumerate() {
        phase_row(h, r, i, c);
    }
    h.push_str("</table>");
    if !v.failed_hosts.is_empty() {
        let _ = write!(
            h,
            "<h4>Failed hosts ({})</h4><table class=\"failed\"><tr><th>host</th><th>zone</th><th>phase</th><th>output</th></tr>",
            v.failed_hosts.len()
        );
        for f in v.failed_hosts.iter().take(FAILED_SHOWN) {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td><pre>{}</pre></td></tr>",
                escape(f.host.as_str()),
                escape(f.zone.as_ref().map_or("", |z| z.as_str())),
                f.phase + 1,
                escape(f.detail.as_deref().unwrap_or("no output"))
            );
        }
        h.push_str("</table>");
        if v.failed_hosts.len() > FAILED_SHOWN {
            let _ = write!(
                h,
                "<p class=\"muted\">and {} more: <code>fbpkg-rs rollout status {name}:{tag}</code></p>",
                v.failed_hosts.len() - FAILED_SHOWN
            );
        }
    }
    h.push_str("</div>");
}

fn phase_row(h: &mut String, r: &Rollout, i: usize, c: &PhaseCounts) {
    let (class, mark) = match i.cmp(&r.phase) {
        std::cmp::Ordering::Less => ("done", ""),
        std::cmp::Ordering::Equal => ("current", "&#9654; "),
        std::cmp::Ordering::Greater => ("later", ""),
    };
    let label = c
        .phase
        .as_ref()
        .or(r.phases.get(i))
        .map(phase_label)
        .unwrap_or_default();
    let n = c.hosts();
    let _ = write!(
        h,
        "<tr class=\"{class}\"><td>{mark}{}: {label}</td><td>{n}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
        i + 1,
        host_bar(c.prefetched(), n, "pre"),
        host_bar(c.switched(), n, "act"),
        host_bar(c.healthy, n, "ok"),
        host_bar(c.unhealthy, n, "fail"),
    );
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use axum::body::Body;
    use axum::extract::connect_info::MockConnectInfo;
    use axum::http::{Request, StatusCode};
    use fbpkg_common::metainfo::{Format, Metainfo};
    use http_body_util::BodyExt;
    use serde_json::json;
    use tower::ServiceExt;

    use super::*;
    use crate::{AppState, Config, app};

    /// Hosts resolve and report from here (a report counts only from where its host resolved).
    const HOSTS_AT: &str = "127.0.0.2:40000";

    async fn call(
        state: &SharedState,
        method: &str,
        uri: &str,
        body: Vec<u8>,
    ) -> (StatusCode, String) {
        let resp = app(state.clone())
            .layer(MockConnectInfo(
                HOSTS_AT.parse::<SocketAddr>().expect("an address"),
            ))
            .oneshot(
                Request::builder()
                    .method(method)
                    .uri(uri)
                    .body(Body::from(body))
                    .expect("a request"),
            )
            .await
            .expect("the router answers");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("a body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    fn package(seed: u8) -> Metainfo {
        let data: Vec<u8> = (0..5_000u32)
            .map(|i| (i as u8).wrapping_mul(seed))
            .collect();
        Metainfo::build(
            &data[..],
            5_000,
            "app.bin",
            "http://127.0.0.1:6969/announce",
            Format::File,
        )
        .expect("a metainfo")
    }

    async fn ok(state: &SharedState, method: &str, uri: &str, body: Vec<u8>) -> String {
        let (s, b) = call(state, method, uri, body).await;
        assert!(s.is_success(), "{method} {uri}: {s} {b}");
        b
    }

    /// A rollout of app:prod (zone dc1 first, then everyone) halted by one failed host whose
    /// output is markup, with one healthy host beside it and one later host that prefetched.
    async fn halted_rollout(state: &SharedState) -> Metainfo {
        let (a, b) = (package(3), package(5));
        for m in [&a, &b] {
            ok(
                state,
                "PUT",
                &format!("/api/v1/packages/app/{}", m.sha256),
                m.as_bytes().to_vec(),
            )
            .await;
        }
        ok(
            state,
            "PUT",
            "/api/v1/packages/app/tags/prod",
            a.sha256.to_hex().into_bytes(),
        )
        .await;
        let req = json!({"name": "app", "tag": "prod", "to": b.sha256.to_hex(),
                         "phases": ["zone:dc1", "100"], "bake_ms": 0, "max_failures": "0"});
        ok(
            state,
            "POST",
            "/api/v1/rollouts",
            req.to_string().into_bytes(),
        )
        .await;
        for (host, zone, st, detail) in [
            ("web-1", "&zone=dc1/r1", "healthy", None),
            (
                "web-2",
                "&zone=dc1/r2",
                "unhealthy",
                Some("health exit status 1\n<script>alert(1)</script>"),
            ),
            ("web-3", "", "fetched", None),
        ] {
            ok(
                state,
                "GET",
                &format!("/api/v1/packages/app/prod?host={host}{zone}"),
                Vec::new(),
            )
            .await;
            let rep = json!({"name": "app", "hash": b.sha256.to_hex(), "host": host, "state": st, "detail": detail});
            ok(
                state,
                "POST",
                "/api/v1/reports",
                rep.to_string().into_bytes(),
            )
            .await;
        }
        state
            .rollouts
            .tick(&state.catalog, tokio::time::Instant::now(), wall_ms())
            .expect("the gate runs");
        b
    }

    #[tokio::test]
    async fn dashboard_and_metrics_show_a_halted_rollout() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let state = AppState::open(Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        })
        .expect("the tracker opens");
        let b = halted_rollout(&state).await;

        let page = ok(&state, "GET", "/", Vec::new()).await;
        let shown = |what: &str, needle: &str| {
            assert!(
                page.contains(needle),
                "the dashboard does not show {what} ({needle:?}):\n{page}"
            );
        };
        shown(
            "the rollout",
            "<div class=\"rollout\" id=\"rollout-app-prod\"><h3>app:prod <span class=\"state halted\">halted</span></h3>",
        );
        shown(
            "where it is",
            "&middot; phase 1 of 2 (zone:dc1) &middot; bake 0s &middot; max failures 0 &middot;",
        );
        shown(
            "the new version",
            &format!("&rarr; <code>{}</code>", &b.sha256.to_hex()[..12]),
        );
        shown(
            "the halt reason, escaped",
            "<p class=\"halt\"><strong>Halted:</strong> 1 unhealthy hosts in phase 1 of 2 (zone:dc1) \
             (max 0 of 2 hosts, max_failures 0): web-2: &lt;script&gt;alert(1)&lt;/script&gt;</p>",
        );
        shown(
            "the current phase with its bars",
            "<tr class=\"current\"><td>&#9654; 1: zone:dc1</td><td>2</td>",
        );
        shown(
            "phase 1 prefetched",
            "aria-valuenow=\"2\" aria-valuemax=\"2\" title=\"2 of 2 hosts\"><i style=\"width:100%\"></i></span> 2/2",
        );
        shown(
            "phase 1 failed",
            "<span class=\"bar fail\" role=\"progressbar\" aria-valuenow=\"1\" aria-valuemax=\"2\"",
        );
        shown(
            "phase 2 prefetching",
            "<tr class=\"later\"><td>2: 100%</td><td>1</td><td><span class=\"bar pre\" role=\"progressbar\" aria-valuenow=\"1\" aria-valuemax=\"1\"",
        );
        shown(
            "the failed host with its output, escaped",
            "<tr><td>web-2</td><td>dc1/r2</td><td>1</td><td><pre>health exit status 1\n&lt;script&gt;alert(1)&lt;/script&gt;</pre></td></tr>",
        );
        assert!(
            !page.contains("<script"),
            "a report's markup reached the page:\n{page}"
        );
        shown("the plain tag move, finished", "<td>app:prod #1</td>");

        let metrics = ok(&state, "GET", "/metrics", Vec::new()).await;
        for line in [
            "fbpkg_tracker_rollouts_active 1",
            "fbpkg_tracker_rollout_state{package=\"app\",tag=\"prod\",state=\"halted\"} 1",
            "fbpkg_tracker_rollout_state{package=\"app\",tag=\"prod\",state=\"running\"} 0",
            "fbpkg_tracker_rollout_phase{package=\"app\",tag=\"prod\"} 1",
            "fbpkg_tracker_rollout_hosts{package=\"app\",tag=\"prod\",phase=\"1\",state=\"healthy\"} 1",
            "fbpkg_tracker_rollout_hosts{package=\"app\",tag=\"prod\",phase=\"1\",state=\"unhealthy\"} 1",
            "fbpkg_tracker_rollout_hosts{package=\"app\",tag=\"prod\",phase=\"2\",state=\"fetched\"} 1",
            "fbpkg_tracker_rollout_waiting_hosts{package=\"app\",tag=\"prod\"} 1",
        ] {
            assert!(
                metrics.lines().any(|l| l == line),
                "no {line:?} in /metrics:\n{metrics}"
            );
        }

        // Aborted, it leaves the active view for the history, with its end state.
        ok(
            &state,
            "POST",
            "/api/v1/rollouts/app/prod/abort",
            Vec::new(),
        )
        .await;
        let page = ok(&state, "GET", "/", Vec::new()).await;
        assert!(!page.contains("id=\"rollout-app-prod\""), "{page}");
        assert!(page.contains("No active rollout"), "{page}");
        assert!(
            page.contains("<td>app:prod #2</td>")
                && page.contains(
                    "<span class=\"state aborted\">aborted</span>: aborted by an operator"
                ),
            "{page}"
        );
        let metrics = ok(&state, "GET", "/metrics", Vec::new()).await;
        assert!(
            metrics.contains("\nfbpkg_tracker_rollouts_active 0\n"),
            "{metrics}"
        );
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("<script>\"x\"&'y'</script>"),
            "&lt;script&gt;&quot;x&quot;&amp;&#39;y&#39;&lt;/script&gt;"
        );
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
    }
}
