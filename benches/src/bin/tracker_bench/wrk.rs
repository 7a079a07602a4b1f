//! Cross-check of the generator's ceiling with Debian's `wrk`: same trackers, same kind of
//! announces (drawn from a fixed table, since wrk's Lua is too slow to percent-encode random
//! ids per request). wrk does not decode bodies, so its figures are not counted, only shown.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use fbpkg_benches::workload::Workload;
use serde::Serialize;

use crate::load::Mode;

/// Distinct announces in the table wrk draws from.
const TABLE: usize = 16_384;

/// One wrk run.
#[derive(Debug, Clone, Serialize)]
pub struct WrkResult {
    /// Tracker.
    pub contender: String,
    /// Connection use.
    pub mode: Mode,
    /// Requests per second wrk reports (any status, bodies unchecked).
    pub requests_per_sec: f64,
    /// Non-2xx responses.
    pub non_2xx: u64,
    /// The "Socket errors" line, if any.
    pub socket_errors: Option<String>,
}

/// Write the Lua script that picks a random announce from a table.
pub fn write_script(dir: &Path, workload: &Workload) -> anyhow::Result<std::path::PathBuf> {
    let mut rng = rand::rng();
    let mut lua = String::from("local paths = {\n");
    for _ in 0..TABLE {
        let q = workload.random(&mut rng).to_query();
        lua.push_str(&format!("  \"/announce?{q}\",\n"));
    }
    lua.push_str(
        "}\nlocal n = #paths\nrequest = function()\n  \
         return wrk.format(nil, paths[math.random(n)])\nend\n",
    );
    let path = dir.join("announce.lua");
    std::fs::write(&path, lua).context("writing the wrk script")?;
    Ok(path)
}

/// Run wrk against `url` (`http://addr`) for `duration`.
pub fn run(
    contender: &str,
    url: &str,
    mode: Mode,
    threads: usize,
    connections: usize,
    duration: Duration,
    script: &Path,
) -> anyhow::Result<WrkResult> {
    let mut cmd = Command::new("wrk");
    cmd.arg(format!("-t{threads}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .arg("--timeout")
        .arg("5s")
        .arg("-s")
        .arg(script);
    if mode == Mode::ConnPerRequest {
        cmd.args(["-H", "Connection: close"]);
    }
    let out = cmd.arg(url).output().context("running wrk")?;
    ensure!(
        out.status.success(),
        "wrk failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(|v| v.trim().to_owned()))
    };
    Ok(WrkResult {
        contender: contender.to_owned(),
        mode,
        requests_per_sec: field("Requests/sec:")
            .and_then(|v| v.parse().ok())
            .context("wrk printed no Requests/sec")?,
        non_2xx: field("Non-2xx or 3xx responses:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        socket_errors: field("Socket errors:"),
    })
}
