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
use std::sync::OnceLock;

use base64::Engine as _;
use serde_json::{Value, json};

use super::process::{ClientProcess, StartError, free_port, start_on_free_ports};
use super::stock::{Role, Status};

/// The binary, for the skip message.
pub const BINARY: &str = "aria2c";

/// A running aria2 with its RPC port.
#[derive(Debug)]
pub struct Aria2 {
    process: ClientProcess,
    rpc: String,
    /// The ports it may listen for peers on, in the order it tries them.
    peer_ports: Vec<u16>,
    /// The one it bound, read from its log once the first torrent is added.
    peer_port: OnceLock<u16>,
    http: reqwest::Client,
}

/// Free ports offered to aria2 for peers: it binds the first one it can when the first torrent
/// is added, seconds after they were picked, so one taken meanwhile leaves it the others.
const PEER_PORT_CHOICES: usize = 4;

/// What aria2 logs when it has bound its peer port (1.36).
const PEER_LISTENING: &str = "IPv4 BitTorrent: listening on TCP port ";

impl Aria2 {
    /// Start aria2 with its files in `dir`, listening for RPC on a free loopback port.
    ///
    /// The RPC port comes from [`free_port`], free a moment before aria2 binds it: when
    /// another test's client took it meanwhile, aria2 logs the failed bind and exits (with
    /// IPv6 off it has no RPC left), and until it has, the client holding the port (another
    /// aria2, say) may answer for it. So it must not have logged the failed bind and the RPC
    /// must answer with our `dir`, or it is started again on another port.
    pub async fn start(dir: &Path) -> Result<Self, String> {
        start_on_free_ports("aria2c", || async {
            let rpc_port = free_port(Ipv4Addr::LOCALHOST).map_err(|e| e.to_string())?;
            Self::start_once(dir, rpc_port).await
        })
        .await
    }

    /// One try of [`Aria2::start`], its RPC on `rpc_port`.
    pub async fn start_once(dir: &Path, rpc_port: u16) -> Result<Self, StartError> {
        let peer_ports = (0..PEER_PORT_CHOICES)
            .map(|_| free_port(Ipv4Addr::LOCALHOST))
            .collect::<Result<Vec<u16>, _>>()
            .map_err(|e| e.to_string())?;
        let listen: Vec<String> = peer_ports.iter().map(u16::to_string).collect();
        let log = dir.join("aria2.log");
        // Its logs of its own per try: the bind failure looked for below is this try's.
        for old in [&log, &dir.join("aria2c.out")] {
            let _ = std::fs::remove_file(old);
        }
        let mut cmd = Command::new(BINARY);
        cmd.arg("--no-conf")
            .arg("--enable-rpc")
            .arg(format!("--rpc-listen-port={rpc_port}"))
            .arg("--rpc-listen-all=false")
            .arg(format!("--listen-port={}", listen.join(",")))
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
            peer_ports,
            peer_port: OnceLock::new(),
            http: fbpkg_tests::http_client(),
        };
        let m = &me;
        let options = super::poll(
            "aria2's RPC to answer",
            super::START_TIMEOUT,
            || async move {
                if let Some(line) = m.process.logged("RPC: failed to bind") {
                    return Ok(Err(StartError::PortTaken(line)));
                }
                m.process.check_alive()?;
                m.call("aria2.getGlobalOption", json!([])).await.map(Ok)
            },
        )
        .await
        .map_err(|e| format!("{e}\n{}", me.process.log_tail()))??;
        let ours = dir.display().to_string();
        if options["dir"].as_str() != Some(ours.as_str()) {
            return Err(StartError::PortTaken(format!(
                "the RPC on {} answered for dir {}, not {ours}",
                me.rpc, options["dir"]
            )));
        }
        Ok(me)
    }

    /// Where it accepts peers (what our tracker lists for it): known once a torrent was
    /// added ([`Aria2::add`]); before that, the first port it will try.
    pub fn peer_addr(&self) -> SocketAddr {
        let port = self.peer_port.get().unwrap_or(&self.peer_ports[0]);
        SocketAddr::from((Ipv4Addr::LOCALHOST, *port))
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
        if self.peer_port.get().is_none() {
            let port = self.bound_peer_port().await?;
            let _ = self.peer_port.set(port);
        }
        gid.as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("addTorrent answered {gid}"))
    }

    /// The peer port it bound at its first torrent, from its log.
    async fn bound_peer_port(&self) -> Result<u16, String> {
        let bound = super::poll(
            "aria2 to bind a peer port",
            super::START_TIMEOUT,
            || async move {
                if let Some(line) = self.process.logged("Errors occurred while binding port") {
                    return Ok(Err(format!(
                        "aria2 found every port of {:?} taken: {line}",
                        self.peer_ports
                    )));
                }
                self.process.check_alive()?;
                let line = self
                    .process
                    .logged(PEER_LISTENING)
                    .ok_or("not in its log yet")?;
                Ok(line
                    .split(PEER_LISTENING)
                    .nth(1)
                    .and_then(|p| p.trim().parse::<u16>().ok())
                    .filter(|p| self.peer_ports.contains(p))
                    .ok_or_else(|| format!("{line:?} names none of {:?}", self.peer_ports)))
            },
        )
        .await;
        bound.map_err(|e| format!("{e}\n{}", self.process.log_tail()))?
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
