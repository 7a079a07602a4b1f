//! `fbpkg-rs tracker` as a child process: started on a free loopback port, killed on drop.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::binary::fbpkg_rs_binary;

/// Longest a tracker may take from spawn to its `tracker listening` line.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Log lines kept for failure messages.
const LOG_LINES_KEPT: usize = 200;

/// A running `fbpkg-rs tracker --listen 127.0.0.1:0 --data-dir DIR`. SIGKILLed on drop.
#[derive(Debug)]
pub struct TrackerProcess {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<VecDeque<String>>>,
}

impl TrackerProcess {
    /// Start a tracker on a kernel-chosen loopback port over the catalog in `data_dir`, and
    /// return once it has bound its listener (connections are queued from then on, so it needs
    /// no further readiness wait).
    pub fn start(data_dir: &Path) -> io::Result<Self> {
        let mut cmd = Command::new(fbpkg_rs_binary());
        // The operator's environment must not reconfigure the tracker under test, and the
        // `tracker listening` line is info level whatever RUST_LOG says.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("FBPKG_") {
                cmd.env_remove(&key);
            }
        }
        cmd.env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .args(["--log", "info", "tracker", "--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        let Some(stderr) = child.stderr.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::other("no stderr pipe"));
        };
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, rx) = mpsc::channel();
        let log2 = log.clone();
        // Drains stderr for the child's whole life (a full pipe would block the tracker), and
        // reports the listening address once.
        let spawned = std::thread::Builder::new()
            .name("tracker-stderr".into())
            .spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let line = strip_ansi(&line);
                    if let Some(addr) = listening_addr(&line)
                        && let Some(tx) = tx.take()
                    {
                        let _ = tx.send(addr);
                    }
                    if let Ok(mut l) = log2.lock() {
                        if l.len() == LOG_LINES_KEPT {
                            l.pop_front();
                        }
                        l.push_back(line);
                    }
                }
            });
        if let Err(e) = spawned {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        let mut tracker = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
        };
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(addr) => {
                tracker.addr = addr;
                Ok(tracker)
            }
            Err(e) => {
                let why = match e {
                    mpsc::RecvTimeoutError::Timeout => {
                        format!("not listening after {START_TIMEOUT:?}")
                    }
                    mpsc::RecvTimeoutError::Disconnected => "exited before listening".to_owned(),
                };
                let status = tracker.kill().ok();
                Err(io::Error::other(format!(
                    "tracker {why} (status {status:?}); its log:\n{}",
                    tracker.log_tail()
                )))
            }
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The announce URL to put into metainfo.
    pub fn announce_url(&self) -> String {
        format!("http://{}/announce", self.addr)
    }

    /// SIGKILL it, whatever it is doing, and reap it.
    pub fn kill(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        self.child.kill()?;
        self.child.wait()
    }

    /// The last lines it logged, for failure messages.
    pub fn log_tail(&self) -> String {
        self.log
            .lock()
            .map(|l| l.iter().map(|s| format!("  {s}\n")).collect())
            .unwrap_or_default()
    }
}

impl Drop for TrackerProcess {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// The address of a `... tracker listening addr=127.0.0.1:PORT ...` log line.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    if !line.contains("tracker listening") {
        return None;
    }
    line.split_whitespace()
        .find_map(|field| field.strip_prefix("addr="))
        .and_then(|a| a.trim_matches('"').parse().ok())
}

/// Remove ANSI escape sequences (`ESC [ ... final byte`), in case colour is forced on.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        if chars.next() == Some('[') {
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_address_in_plain_and_coloured_lines() {
        let plain = "2026-01-01T00:00:00.000000Z  INFO fbpkg_tracker::server: tracker listening \
                     addr=127.0.0.1:40123 data_dir=/tmp/x";
        assert_eq!(
            listening_addr(plain),
            Some(SocketAddr::from(([127, 0, 0, 1], 40123)))
        );
        let coloured = "\u{1b}[2m2026-01-01T00:00:00Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \
                        \u{1b}[2mfbpkg_tracker::server\u{1b}[0m\u{1b}[2m:\u{1b}[0m tracker listening \
                        \u{1b}[3maddr\u{1b}[0m\u{1b}[2m=\u{1b}[0m127.0.0.1:5 \u{1b}[3mdata_dir\u{1b}[0m=/d";
        assert_eq!(
            listening_addr(&strip_ansi(coloured)),
            Some(SocketAddr::from(([127, 0, 0, 1], 5)))
        );
        assert_eq!(listening_addr("tracker stopped addr=127.0.0.1:5"), None);
    }
}
