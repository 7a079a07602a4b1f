//! Transmission (Debian's 3.00): `transmission-daemon` with a temp config directory, torrents
//! added with `transmission-remote`, progress read over the same RPC endpoint as JSON.
//!
//! `settings.json` is written before it starts: DHT, LPD, PEX, uTP and port forwarding off,
//! peers and RPC bound to the one address it is given, no RPC authentication or whitelist (the
//! address is loopback or inside the test's namespace), no queueing. Transmission never dials
//! a peer on 127.0.0.0/8, so where it has to dial it runs in a [`TestNet`] namespace.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Value, json};

use super::netns::TestNet;
use super::process::{ClientProcess, StartError, free_port, start_on_free_ports};
use super::stock::{Role, Status};

/// The binaries, for the skip message.
pub const BINARIES: [&str; 2] = ["transmission-daemon", "transmission-remote"];
/// Longest one `transmission-remote` may take.
const REMOTE_TIMEOUT: Duration = Duration::from_secs(20);
/// Transmission's torrent status codes (`tr_torrent_activity`).
const STATUS_CHECK_WAIT: u64 = 1;
const STATUS_CHECK: u64 = 2;
/// `tr_stat_errtype`: 3 is a local error (disk, data); 1 and 2 are tracker warnings and errors.
const ERROR_LOCAL: u64 = 3;

/// A running transmission-daemon.
#[derive(Debug)]
pub struct Transmission {
    process: ClientProcess,
    rpc_host: String,
    peer_addr: SocketAddr,
    http: reqwest::Client,
    session_id: Mutex<String>,
}

impl Transmission {
    /// Start transmission-daemon with its config in `dir`, on `addr`: loopback (`net` None)
    /// or an address inside `net`.
    ///
    /// The ports come from [`free_port`], free a moment before the daemon binds them: with
    /// the tests' clients starting side by side, one can be taken meanwhile. Transmission
    /// then runs on without it, and another daemon's RPC on the same port would answer for it
    /// (a test once read a sibling test's seeder as its own). So the daemon must say it is
    /// ours (its config directory) and must not have logged a failed bind, or it is stopped
    /// and started again on other ports.
    pub async fn start(dir: &Path, net: Option<&TestNet>, addr: Ipv4Addr) -> Result<Self, String> {
        start_on_free_ports("transmission-daemon", || Self::start_once(dir, net, addr)).await
    }

    async fn start_once(
        dir: &Path,
        net: Option<&TestNet>,
        addr: Ipv4Addr,
    ) -> Result<Self, StartError> {
        // A namespace's ports are all free; on loopback ask the kernel.
        let peer_port = free_port(Ipv4Addr::LOCALHOST).map_err(|e| e.to_string())?;
        let rpc_port = free_port(Ipv4Addr::LOCALHOST).map_err(|e| e.to_string())?;
        let config = dir.join("config");
        let downloads = dir.join("downloads");
        for d in [&config, &downloads] {
            std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
        }
        let settings = json!({
            "dht-enabled": false,
            "lpd-enabled": false,
            "pex-enabled": false,
            "utp-enabled": false,
            "port-forwarding-enabled": false,
            "bind-address-ipv4": addr.to_string(),
            "bind-address-ipv6": "::1",
            "peer-port": peer_port,
            "peer-port-random-on-start": false,
            "rpc-enabled": true,
            "rpc-bind-address": addr.to_string(),
            "rpc-port": rpc_port,
            "rpc-authentication-required": false,
            "rpc-whitelist-enabled": false,
            "rpc-host-whitelist-enabled": false,
            "download-dir": downloads.display().to_string(),
            "incomplete-dir-enabled": false,
            "rename-partial-files": false,
            "download-queue-enabled": false,
            "seed-queue-enabled": false,
            "queue-stalled-enabled": false,
            "ratio-limit-enabled": false,
            "idle-seeding-limit-enabled": false,
            "speed-limit-up-enabled": false,
            "speed-limit-down-enabled": false,
            "blocklist-enabled": false,
            "start-added-torrents": true,
            "message-level": 2,
        });
        std::fs::write(config.join("settings.json"), settings.to_string())
            .map_err(|e| e.to_string())?;
        let log = dir.join("transmission.log");
        // A log of its own per try: the bind failures looked for below are this try's.
        let _ = std::fs::remove_file(&log);
        let mut cmd = match net {
            Some(net) => net.command(BINARIES[0]),
            None => Command::new(BINARIES[0]),
        };
        cmd.arg("--foreground")
            .arg("--config-dir")
            .arg(&config)
            .arg("--logfile")
            .arg(&log);
        let process = ClientProcess::spawn(
            "transmission-daemon",
            &mut cmd,
            dir,
            std::slice::from_ref(&log),
        )
        .map_err(|e| e.to_string())?;
        let me = Self {
            process,
            rpc_host: format!("{addr}:{rpc_port}"),
            peer_addr: SocketAddr::from((addr, peer_port)),
            http: fbpkg_tests::http_client(),
            session_id: Mutex::new(String::new()),
        };
        let m = &me;
        let session = super::poll(
            "transmission's RPC to answer",
            super::START_TIMEOUT,
            || async move {
                m.process.check_alive()?;
                m.rpc("session-get", json!({})).await
            },
        )
        .await
        .map_err(|e| format!("{e}\n{}", me.process.log_tail()))?;
        let ours = config.display().to_string();
        if session["config-dir"].as_str() != Some(ours.as_str()) {
            return Err(StartError::PortTaken(format!(
                "the RPC on {} answered for config-dir {}, not {ours}",
                me.rpc_host, session["config-dir"]
            )));
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("Couldn't bind port")) {
            return Err(StartError::PortTaken(line.to_owned()));
        }
        for off in [
            "dht-enabled",
            "lpd-enabled",
            "pex-enabled",
            "port-forwarding-enabled",
        ] {
            if session[off] != false {
                return Err(format!("transmission started with {off} = {}", session[off]).into());
            }
        }
        Ok(me)
    }

    /// Where it accepts peers.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// Add `torrent` with `transmission-remote -a`, its file in (or to be downloaded to)
    /// `dir`; a seed is then told to verify what is there (`-v`), so it hashes its file first.
    pub async fn add(
        &self,
        torrent: &[u8],
        info_hash: &str,
        dir: &Path,
        role: Role,
    ) -> Result<(), String> {
        let file = dir.join(format!("{info_hash}.torrent"));
        std::fs::write(&file, torrent).map_err(|e| e.to_string())?;
        let file = file.display().to_string();
        let dir = dir.display().to_string();
        self.remote(&["--add", &file, "--download-dir", &dir])
            .await?;
        if role == Role::Seed {
            self.remote(&["--torrent", info_hash, "--verify"]).await?;
        }
        Ok(())
    }

    /// Where the torrent `info_hash` stands.
    pub async fn status(&self, info_hash: &str) -> Result<Status, String> {
        let fields = [
            "hashString",
            "status",
            "percentDone",
            "leftUntilDone",
            "haveValid",
            "sizeWhenDone",
            "uploadedEver",
            "peersConnected",
            "error",
            "errorString",
        ];
        let got = self
            .rpc("torrent-get", json!({"ids": [info_hash], "fields": fields}))
            .await?;
        let t = got["torrents"]
            .as_array()
            .and_then(|a| a.first())
            .ok_or_else(|| format!("transmission does not list {info_hash}: {got}"))?;
        if t["error"] == ERROR_LOCAL {
            return Err(format!("transmission: {t}"));
        }
        let size = t["sizeWhenDone"].as_u64().unwrap_or(0);
        let status = t["status"].as_u64().unwrap_or(0);
        Ok(Status {
            complete: size > 0
                && t["leftUntilDone"] == 0
                && t["haveValid"] == size
                && status != STATUS_CHECK_WAIT
                && status != STATUS_CHECK,
            uploaded: t["uploadedEver"].as_u64().unwrap_or(0),
            detail: t.to_string(),
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

    /// `transmission-remote HOST:PORT ARGS`; `Err` unless it says "success".
    async fn remote(&self, args: &[&str]) -> Result<(), String> {
        let mut cmd = tokio::process::Command::new(BINARIES[1]);
        cmd.arg(&self.rpc_host)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let shown = format!("transmission-remote {} {}", self.rpc_host, args.join(" "));
        let out = tokio::time::timeout(REMOTE_TIMEOUT, cmd.output())
            .await
            .map_err(|_| format!("{shown}: no answer within {REMOTE_TIMEOUT:?}"))?
            .map_err(|e| format!("{shown}: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if out.status.success() && stdout.contains("success") {
            Ok(())
        } else {
            Err(format!(
                "{shown}: {}: {stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// One RPC call, answering the CSRF challenge (409 with a session id) once.
    async fn rpc(&self, method: &str, arguments: Value) -> Result<Value, String> {
        let url = format!("http://{}/transmission/rpc", self.rpc_host);
        let body = json!({"method": method, "arguments": arguments});
        for _ in 0..2 {
            let id = self
                .session_id
                .lock()
                .map(|s| s.clone())
                .unwrap_or_default();
            let resp = self
                .http
                .post(&url)
                .header("X-Transmission-Session-Id", id)
                .json(&body)
                .send()
                .await
                .map_err(|e| format!("transmission {method}: {e}"))?;
            if resp.status() == reqwest::StatusCode::CONFLICT {
                let fresh = resp
                    .headers()
                    .get("X-Transmission-Session-Id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                if let Ok(mut s) = self.session_id.lock() {
                    *s = fresh;
                }
                continue;
            }
            let reply: Value = resp
                .error_for_status()
                .map_err(|e| format!("transmission {method}: {e}"))?
                .json()
                .await
                .map_err(|e| format!("transmission {method}: {e}"))?;
            if reply["result"] != "success" {
                return Err(format!("transmission {method}: {reply}"));
            }
            return Ok(reply["arguments"].clone());
        }
        Err(format!("transmission {method}: no session id after a 409"))
    }
}
