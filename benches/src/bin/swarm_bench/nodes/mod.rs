//! The programs `swarm_bench` runs inside the namespaces (hidden subcommands of the same
//! binary): a librqbit node, an HTTP server and client, a tracker probe, a single TCP flow
//! for calibrating the caps, and a launcher that starts a stock program (aria2) at `go`. They talk to the orchestrator with lines: commands on stdin,
//! one JSON event per line on stdout.

pub mod exec_on_go;
pub mod flow;
pub mod http;
pub mod rqbit_node;

use fbpkg_benches::swarm::procfs;
use serde_json::json;

/// Print one event line (stdout is line-buffered, so it leaves at once).
pub fn emit(event: serde_json::Value) {
    println!("{event}");
}

/// This process's CPU seconds and peak RSS so far.
pub fn self_usage() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| procfs::parse_stat(&s))
        .map(|s| s.cpu_ticks as f64 / procfs::TICKS_PER_SEC);
    let hwm = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| procfs::status_kib_field(&s, "VmHWM"));
    json!({"cpu_secs": cpu, "vm_hwm_bytes": hwm})
}

/// Wait for a `go` line on stdin (blocking).
pub fn wait_for_go() -> anyhow::Result<()> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    anyhow::ensure!(line.trim() == "go", "expected `go`, got {line:?}");
    Ok(())
}

/// Block until stdin closes.
pub fn wait_for_eof() {
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
}

/// `host:port` and path of an `http://host:port/path` URL.
pub fn split_url(url: &str) -> anyhow::Result<(&str, &str)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("{url:?} is not an http:// URL"))?;
    Ok(match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            split_url("http://198.18.0.254:6969/api/v1/swarms").unwrap(),
            ("198.18.0.254:6969", "/api/v1/swarms")
        );
        assert_eq!(
            split_url("http://127.0.0.1:80").unwrap(),
            ("127.0.0.1:80", "/")
        );
        assert!(split_url("https://x/").is_err());
    }
}
