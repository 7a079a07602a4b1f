//! aria2 (Debian's 1.36) as a daemon driven over its JSON-RPC interface on loopback.
//!
//! One `aria2c --enable-rpc` per role, started with DHT, LPD and PEX off, every socket bound
//! to 127.0.0.1 (`--interface`), no disk cache (a finished download is on disk when aria2 says
//! it is) and `--stop-with-process` pointing at the test, so even a SIGKILLed test leaves no
//! aria2 behind. Torrents are added with `aria2.addTorrent`, seeding forever (`seed-ratio` 0);
//! `check-integrity` makes a seeder hash the file it was given before it serves it.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;

use base64::Engine as _;
use serde_json::{Value, json};

use super::process::{ClientProcess, free_port};
use super::stock::{Role, Status};

/// The binary, for the skip message.
pub const BINARY: &str = "aria2c";

/// A running aria2 with its RPC port.
#[derive(Debug)]
pub struct Aria2 {
    process: ClientProcess,
    rpc: String,
    peer_addr: SocketAddr,
    http: reqwest::Client,
}

impl Aria2 {
    /// Start aria2 with its files in `dir`, listening for peers and RPC on free loopback ports.
    pub async fn start(dir: &Path) -> Result<Self, String> {
        let peer_port = free_port(Ipv4Addr::LOCALHOST).map_err(|e| e.to_string())?;
        let rpc_port = free_port(Ipv4Addr::LOCALHOST).map_err(|e| e.to_string())?;
        let log = dir.join("aria2.log");
        let mut cmd = Command::new(BINARY);
        cmd.arg("--no-conf")
            .arg("--enable-rpc")
            .arg(format!("--rpc-listen-port={rpc_port}"))
            .arg("--rpc-listen-all=false")
            .arg(format!("--listen-port={peer_port}"))
            .args(["--interface=127.0.0.1", "--disable-ipv6=true"])
            .args(["--enable-dht=false", "--enable-dht6=false"])
            .args(["--bt-enable-lpd=false", "--enable-peer-exchange=false"])
            .args(["--disk-cache=0", "--file-allocation=none"])
            .args(["--seed-ratio=0.0", "--auto-save-interval=0"])
            .arg(format!("--stop-with-process={}", std::process::id()))
            .arg(format!("--dir={}", dir.display()))
            .arg(format!("--log={}", log.display()))
            .args(["--log-level=info", "--console-log-level=error"])
            .args(["--summary-interval=0", "--show-console-readout=false"]);
        let process = ClientProcess::spawn("aria2c", &mut cmd, dir, &[log])
            .map_err(|e| e.to_string())?
            .quoting_only(is_informative);
        let me = Self {
            process,
            rpc: format!("http://127.0.0.1:{rpc_port}/jsonrpc"),
            peer_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, peer_port)),
            http: fbpkg_tests::http_client(),
        };
        let m = &me;
        super::poll(
            "aria2's RPC to answer",
            super::START_TIMEOUT,
            || async move {
                m.process.check_alive()?;
                m.call("aria2.getVersion", json!([])).await.map(drop)
            },
        )
        .await
        .map_err(|e| format!("{e}\n{}", me.process.log_tail()))?;
        Ok(me)
    }

    /// Where it accepts peers (what our tracker lists for it).
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// Add `torrent`, its file in (or to be downloaded to) `dir`. Returns the download's gid.
    /// A seed hashes its file first (`check-integrity`).
    pub async fn add(&self, torrent: &[u8], dir: &Path, role: Role) -> Result<String, String> {
        let encoded = base64::engine::general_purpose::STANDARD.encode(torrent);
        let options = json!({
            "dir": dir.display().to_string(),
            "check-integrity": (role == Role::Seed).to_string(),
            "seed-ratio": "0.0",
        });
        let gid = self
            .call("aria2.addTorrent", json!([encoded, [], options]))
            .await?;
        gid.as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("addTorrent answered {gid}"))
    }

    /// Where the download `gid` stands.
    pub async fn status(&self, gid: &str) -> Result<Status, String> {
        let keys = json!([
            "status",
            "totalLength",
            "completedLength",
            "uploadLength",
            "seeder",
            "connections",
            "errorCode",
            "errorMessage"
        ]);
        let s = self.call("aria2.tellStatus", json!([gid, keys])).await?;
        let num = |k: &str| {
            s[k].as_str()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let (total, completed) = (num("totalLength"), num("completedLength"));
        if s["status"] == "error" {
            return Err(format!("aria2 gave up: {s}"));
        }
        Ok(Status {
            complete: total > 0 && completed == total && s["seeder"] == "true",
            uploaded: num("uploadLength"),
            detail: s.to_string(),
        })
    }

    /// `Err` when it has exited.
    pub fn check_alive(&self) -> Result<(), String> {
        self.process.check_alive()
    }

    /// The end of its log.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    async fn call(&self, method: &str, params: Value) -> Result<Value, String> {
        let body = json!({"jsonrpc": "2.0", "id": "t", "method": method, "params": params});
        let reply: Value = self
            .http
            .post(&self.rpc)
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("aria2 {method}: {e}"))?
            .json()
            .await
            .map_err(|e| format!("aria2 {method}: {e}"))?;
        if let Some(err) = reply.get("error") {
            return Err(format!("aria2 {method}: {err}"));
        }
        Ok(reply["result"].clone())
    }
}

/// Whether a line of aria2's log says something about peers, trackers or pieces, rather than
/// about the test's own RPC polling (which would fill any tail of the log).
fn is_informative(line: &str) -> bool {
    const RPC: [&str; 8] = [
        "HttpServer",
        "rpc_helper",
        "POST /jsonrpc",
        "content-type: application/json",
        "accept: */*",
        "host: 127.0.0.1",
        "content-length:",
        "Persist connection",
    ];
    !line.trim().is_empty() && !RPC.iter().any(|r| line.contains(r))
}
