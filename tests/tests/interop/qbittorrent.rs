//! qBittorrent (Debian's qbittorrent-nox 4.5.2, libtorrent 2.0) driven over its WebUI API.
//!
//! Each instance gets a temp profile (`--profile`) with a `qBittorrent.conf` written before it
//! starts: legal notice accepted, DHT, LSD, PEX and UPnP/NAT-PMP off (they must be off before
//! the session starts, or it would bootstrap DHT), BitTorrent bound to `lo`/127.0.0.1 on a free
//! port, several connections per IP allowed (every peer here is 127.0.0.1), and the WebUI on
//! 127.0.0.1 with authentication bypassed for localhost. After start the test reads the
//! preferences back and refuses to go on if any of the discovery switches is on.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;

use serde_json::Value;

use super::process::{ClientProcess, StartError, free_port, start_on_free_ports};
use super::stock::Status;

/// The binary, for the skip message.
pub const BINARY: &str = "qbittorrent-nox";

/// A running qbittorrent-nox and its WebUI.
#[derive(Debug)]
pub struct Qbittorrent {
    process: ClientProcess,
    webui: String,
    peer_addr: SocketAddr,
    http: reqwest::Client,
}

impl Qbittorrent {
    /// Start qbittorrent-nox with its profile in `dir`.
    ///
    /// Its ports come from [`free_port`], free a moment before it binds them, and another
    /// test's client can take one meanwhile: then another qBittorrent's Web UI may answer on
    /// ours. The preferences must be ours (our peer port and save path), or it is stopped and
    /// started again on other ports.
    pub async fn start(dir: &Path) -> Result<Self, String> {
        start_on_free_ports("qbittorrent-nox", || Self::start_once(dir)).await
    }

    async fn start_once(dir: &Path) -> Result<Self, StartError> {
        let peer_port = free_port(Ipv4Addr::LOCALHOST).map_err(|e| e.to_string())?;
        let webui_port = free_port(Ipv4Addr::LOCALHOST).map_err(|e| e.to_string())?;
        let profile = dir.join("profile");
        let config_dir = profile.join("qBittorrent/config");
        std::fs::create_dir_all(&config_dir).map_err(|e| e.to_string())?;
        let save = dir.join("downloads");
        std::fs::create_dir_all(&save).map_err(|e| e.to_string())?;
        let conf = format!(
            "[LegalNotice]\n\
             Accepted=true\n\
             \n\
             [BitTorrent]\n\
             Session\\DHTEnabled=false\n\
             Session\\LSDEnabled=false\n\
             Session\\PeXEnabled=false\n\
             Session\\Port={peer_port}\n\
             Session\\Interface=lo\n\
             Session\\InterfaceName=lo\n\
             Session\\InterfaceAddress=127.0.0.1\n\
             Session\\MultiConnectionsPerIp=true\n\
             Session\\QueueingSystemEnabled=false\n\
             Session\\DefaultSavePath={save}\n\
             Session\\AnonymousModeEnabled=false\n\
             \n\
             [Network]\n\
             PortForwardingEnabled=false\n\
             \n\
             [Preferences]\n\
             WebUI\\Enabled=true\n\
             WebUI\\Address=127.0.0.1\n\
             WebUI\\Port={webui_port}\n\
             WebUI\\LocalHostAuth=false\n\
             WebUI\\CSRFProtection=false\n\
             WebUI\\HostHeaderValidation=false\n\
             General\\Locale=en\n",
            save = save.display()
        );
        std::fs::write(config_dir.join("qBittorrent.conf"), conf).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(BINARY);
        cmd.arg(format!("--profile={}", profile.display()));
        let log = profile.join("qBittorrent/data/logs/qbittorrent.log");
        let process = ClientProcess::spawn("qbittorrent-nox", &mut cmd, dir, &[log])
            .map_err(|e| e.to_string())?;
        let me = Self {
            process,
            webui: format!("http://127.0.0.1:{webui_port}/api/v2"),
            peer_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, peer_port)),
            http: fbpkg_tests::http_client(),
        };
        let m = &me;
        let prefs = super::poll(
            "qBittorrent's WebUI to answer",
            super::START_TIMEOUT,
            || async move {
                m.process.check_alive()?;
                m.get_json("app/preferences").await
            },
        )
        .await
        .map_err(|e| format!("{e}\n{}", me.process.log_tail()))?;
        let save_path = prefs["save_path"].as_str().unwrap_or_default();
        if prefs["listen_port"] != peer_port
            || Path::new(save_path.trim_end_matches('/')) != save.as_path()
        {
            return Err(StartError::PortTaken(format!(
                "the Web UI on {} answered for a client listening on {} and saving to {}",
                me.webui, prefs["listen_port"], prefs["save_path"]
            )));
        }
        for off in ["dht", "pex", "lsd", "upnp"] {
            if prefs[off] != false {
                return Err(format!("qBittorrent started with {off} = {}", prefs[off]).into());
            }
        }
        Ok(me)
    }

    /// Where it accepts peers.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// Add `torrent` (info-hash `info_hash`), its file in (or to be downloaded to) `dir`.
    /// Returns once qBittorrent lists it.
    pub async fn add(&self, torrent: &[u8], info_hash: &str, dir: &Path) -> Result<(), String> {
        // reqwest is built without multipart here; the form is three fields.
        let boundary = "fbpkg-interop-boundary-7d1f";
        let mut body = Vec::new();
        let field = |body: &mut Vec<u8>, name: &str, value: &str| {
            body.extend_from_slice(
                format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
                )
                .as_bytes(),
            );
        };
        field(&mut body, "savepath", &dir.display().to_string());
        field(&mut body, "paused", "false");
        field(&mut body, "autoTMM", "false");
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"torrents\"; \
                 filename=\"package.torrent\"\r\nContent-Type: application/x-bittorrent\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(torrent);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let resp = self
            .http
            .post(format!("{}/torrents/add", self.webui))
            .header(
                "content-type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(body)
            .send()
            .await
            .map_err(|e| format!("qBittorrent torrents/add: {e}"))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() || text.trim() != "Ok." {
            return Err(format!("qBittorrent torrents/add: {status}: {text}"));
        }
        super::poll(
            "qBittorrent to list the torrent",
            super::START_TIMEOUT,
            || {
                let s = self.torrent(info_hash);
                async move { s.await.map(drop) }
            },
        )
        .await
    }

    /// Where the torrent `info_hash` stands.
    pub async fn status(&self, info_hash: &str) -> Result<Status, String> {
        let t = self.torrent(info_hash).await?;
        let state = t["state"].as_str().unwrap_or_default();
        if state == "error" || state == "missingFiles" {
            return Err(format!("qBittorrent: {t}"));
        }
        // progress reaches 1 only once every piece passed its hash check and was written;
        // "checking*" states come before a seed serves anything.
        let complete = t["progress"].as_f64() == Some(1.0)
            && t["amount_left"] == 0
            && !state.starts_with("checking")
            && !state.starts_with("paused");
        Ok(Status {
            complete,
            uploaded: t["uploaded"].as_u64().unwrap_or(0),
            detail: format!(
                "state={state} progress={} uploaded={} num_seeds={} num_leechs={} tracker={}",
                t["progress"], t["uploaded"], t["num_seeds"], t["num_leechs"], t["tracker"]
            ),
        })
    }

    /// What qBittorrent says about its trackers for `info_hash` (for failure messages).
    pub async fn trackers(&self, info_hash: &str) -> String {
        match self
            .get_json(&format!("torrents/trackers?hash={info_hash}"))
            .await
        {
            Ok(v) => v.to_string(),
            Err(e) => e,
        }
    }

    /// `Err` when it has exited.
    pub fn check_alive(&self) -> Result<(), String> {
        self.process.check_alive()
    }

    /// The end of its logs.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    async fn torrent(&self, info_hash: &str) -> Result<Value, String> {
        let list = self
            .get_json(&format!("torrents/info?hashes={info_hash}"))
            .await?;
        list.as_array()
            .and_then(|a| a.first())
            .cloned()
            .ok_or_else(|| format!("qBittorrent does not list {info_hash}: {list}"))
    }

    async fn get_json(&self, path: &str) -> Result<Value, String> {
        self.http
            .get(format!("{}/{path}", self.webui))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| format!("qBittorrent {path}: {e}"))?
            .json()
            .await
            .map_err(|e| format!("qBittorrent {path}: {e}"))
    }
}
