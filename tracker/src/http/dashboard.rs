//! `GET /`: the fleet's packages and swarms on one server-rendered page. No scripts, no
//! external assets; it refreshes itself with a meta tag. Every value from the catalog or from
//! an announce is HTML-escaped.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use axum::extract::State;
use axum::response::Html;

use super::SharedState;
use super::api::{SwarmView, swarm_views};

/// Peers listed per swarm; the counts above the table are always complete.
const PEERS_SHOWN: usize = 200;

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
.bar i{background:#3a7;height:10px;display:block}.muted{color:#888}h2{margin-top:1.5em}";

pub(super) async fn dashboard(State(state): State<SharedState>) -> Html<String> {
    Html(render(&state))
}

fn render(state: &SharedState) -> String {
    let summaries = state.catalog.summaries();
    let views = swarm_views(state, PEERS_SHOWN);
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
    h.push_str("<p class=\"muted\"><a href=\"/metrics\">metrics</a> &middot; <a href=\"/api/v1/packages\">catalog API</a> &middot; <a href=\"/api/v1/swarms\">swarms API</a></p></body></html>");
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

#[cfg(test)]
mod tests {
    use super::*;

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
