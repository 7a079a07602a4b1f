//! opentracker (Debian's build, whitelist mode) on loopback.
//!
//! Debian builds it with `WANT_ACCESSLIST_WHITE`: it serves only the info-hashes listed in the
//! file given with `-w`, one hex hash a line. Started as root it chroots into `-d` and drops to
//! `nobody`, so that directory and the list must be world-readable. Only TCP (`-p`, no `-P`),
//! only 127.0.0.1 (`-i` before `-p`: the address applies to the ports named after it).

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

use fbpkg_common::InfoHash;
use fbpkg_common::bencode::{self, Limits};

use super::process::{ClientProcess, StartError, free_port, start_on_free_ports};

/// The binary, for the skip message.
pub const BINARY: &str = "opentracker";

/// A running opentracker serving a fixed whitelist.
#[derive(Debug)]
pub struct Opentracker {
    process: ClientProcess,
    addr: SocketAddr,
    http: reqwest::Client,
}

impl Opentracker {
    /// Start opentracker in `dir` serving exactly `hashes`, and return once it admits them.
    ///
    /// Its port comes from [`free_port`], free a moment before opentracker binds it; when
    /// another test's client took it meanwhile, opentracker exits saying so, and it is
    /// started again on another.
    pub async fn start(dir: &Path, hashes: &[InfoHash]) -> Result<Self, String> {
        start_on_free_ports("opentracker", || async {
            let port = free_port(Ipv4Addr::LOCALHOST).map_err(|e| e.to_string())?;
            Self::start_once(dir, hashes, port).await
        })
        .await
    }

    /// One try of [`Opentracker::start`], on `port`.
    pub async fn start_once(
        dir: &Path,
        hashes: &[InfoHash],
        port: u16,
    ) -> Result<Self, StartError> {
        let root = dir.join("opentracker");
        std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
        let list: String = hashes.iter().map(|h| format!("{}\n", h.to_hex())).collect();
        let whitelist = root.join("whitelist.txt");
        std::fs::write(&whitelist, list).map_err(|e| e.to_string())?;
        // Readable by `nobody` after the chroot: the directory, the list, and the temp dirs
        // above them (tempfile makes its directory 0700).
        for (path, mode) in [
            (dir, 0o755),
            (root.as_path(), 0o755),
            (whitelist.as_path(), 0o644),
        ] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(|e| format!("chmod {}: {e}", path.display()))?;
        }
        let mut cmd = Command::new(BINARY);
        cmd.args(["-i", "127.0.0.1", "-p", &port.to_string()])
            .arg("-d")
            .arg(&root)
            .args(["-w", "whitelist.txt"])
            .current_dir(&root);
        // Its output of its own per try: the bind failure looked for below is this try's.
        let _ = std::fs::remove_file(dir.join("opentracker.out"));
        let process =
            ClientProcess::spawn("opentracker", &mut cmd, dir, &[]).map_err(|e| e.to_string())?;
        let me = Self {
            process,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            http: fbpkg_tests::http_client(),
        };
        // The whitelist is read by a thread of its own after start-up: ask until it admits
        // each hash. A `stopped` announce is answered without adding a peer to the swarm.
        let m = &me;
        for hash in hashes {
            let probe = format!(
                "/announce?info_hash={}&peer_id=-FBINTEROP-probe0000&port=1&uploaded=0\
                 &downloaded=0&left=0&compact=1&event=stopped",
                percent_encode(&hash.0)
            );
            let probe = &probe;
            super::poll(
                "opentracker to admit the whitelisted hash",
                super::START_TIMEOUT,
                || async move {
                    if let Some(line) = m.process.logged("Address already in use") {
                        return Ok(Err(StartError::PortTaken(line)));
                    }
                    m.process.check_alive()?;
                    let body = m.get(probe.clone()).await?;
                    if body.windows(7).any(|w| w == b"failure") {
                        Err(String::from_utf8_lossy(&body).into_owned())
                    } else {
                        Ok(Ok(()))
                    }
                },
            )
            .await
            .map_err(|e| format!("{e}\n{}", me.process.log_tail()))??;
        }
        Ok(me)
    }

    /// Its announce URL, for metainfo.
    pub fn announce_url(&self) -> String {
        format!("http://{}/announce", self.addr)
    }

    /// How many seeders opentracker counts for `hash` (its scrape's `complete`).
    pub async fn seeders(&self, hash: &InfoHash) -> Result<i64, String> {
        let body = self
            .get(format!("/scrape?info_hash={}", percent_encode(&hash.0)))
            .await?;
        let shown = || String::from_utf8_lossy(&body).into_owned();
        let top = bencode::decode(&body, &Limits::TRACKER_RESPONSE)
            .map_err(|e| format!("scrape: {e}: {}", shown()))?;
        let files = bencode::get(top.as_dict("scrape").map_err(|e| e.to_string())?, "files")
            .and_then(|f| f.as_dict("files").ok())
            .ok_or_else(|| format!("scrape without files: {}", shown()))?;
        let Some((entry, _)) = files.get(&hash.0[..]) else {
            return Ok(0);
        };
        entry
            .as_dict("file")
            .ok()
            .and_then(|d| bencode::get(d, "complete"))
            .and_then(bencode::Value::as_int)
            .ok_or_else(|| format!("scrape without complete: {}", shown()))
    }

    /// `Err` when it has exited.
    pub fn check_alive(&self) -> Result<(), String> {
        self.process.check_alive()
    }

    /// The end of its output.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    async fn get(&self, path_and_query: String) -> Result<Vec<u8>, String> {
        let resp = self
            .http
            .get(format!("http://{}{path_and_query}", self.addr))
            .send()
            .await
            .map_err(|e| format!("opentracker: {e}"))?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .map_err(|e| format!("opentracker: {e}"))?;
        if status.is_success() {
            Ok(body.to_vec())
        } else {
            Err(format!(
                "opentracker: {status}: {}",
                String::from_utf8_lossy(&body)
            ))
        }
    }
}

/// Every byte as `%XX`: always valid in a query, whatever the bytes.
fn percent_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("%{b:02X}")).collect()
}
