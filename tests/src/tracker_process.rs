//! `fbpkg-rs tracker` as a child process: started on a free loopback port, killed on drop.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use crate::cli::fbpkg_rs_command;
use crate::logged_child::LoggedChild;

/// Longest a tracker may take from spawn to its `tracker listening` line.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Log lines kept for failure messages.
const LOG_LINES_KEPT: usize = 200;

/// A running `fbpkg-rs tracker --listen 127.0.0.1:0 --data-dir DIR`. SIGKILLed on drop.
#[derive(Debug)]
pub struct TrackerProcess {
    child: LoggedChild,
    addr: SocketAddr,
}

impl TrackerProcess {
    /// Start a tracker on a kernel-chosen loopback port over the catalog in `data_dir`, and
    /// return once it has bound its listener (connections are queued from then on, so it needs
    /// no further readiness wait).
    pub fn start(data_dir: &Path) -> io::Result<Self> {
        Self::start_with_args(data_dir, &[])
    }

    /// [`Self::start`] with more `fbpkg-rs tracker` flags, e.g. `["--publish-token", "t"]`.
    pub fn start_with_args(data_dir: &Path, extra: &[&str]) -> io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), data_dir, extra)
    }

    /// [`Self::start_with_args`] on `listen`: how a scenario restarts a killed tracker where
    /// its clients already point (it binds with `SO_REUSEADDR`, so the old connections in
    /// TIME_WAIT do not keep it out).
    pub fn start_on(listen: SocketAddr, data_dir: &Path, extra: &[&str]) -> io::Result<Self> {
        // A clean environment: the operator's `FBPKG_*` must not reconfigure the tracker under
        // test, and the `tracker listening` line is info level whatever RUST_LOG says.
        let mut cmd = fbpkg_rs_command();
        cmd.args(["--log", "info", "tracker", "--listen"])
            .arg(listen.to_string())
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .stdout(Stdio::null());
        let (mut child, listening) = LoggedChild::spawn(
            &mut cmd,
            "tracker-stderr".into(),
            LOG_LINES_KEPT,
            listening_addr,
        )?;
        match listening.recv_timeout(START_TIMEOUT) {
            Ok(addr) => Ok(Self { child, addr }),
            Err(e) => {
                let why = match e {
                    RecvTimeoutError::Timeout => format!("not listening after {START_TIMEOUT:?}"),
                    RecvTimeoutError::Disconnected => "exited before listening".to_owned(),
                };
                let status = child.kill().ok();
                Err(io::Error::other(format!(
                    "tracker {why} (status {status:?}); its log:\n{}",
                    child.log_tail(LOG_LINES_KEPT)
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
        self.child.kill()
    }

    /// The last lines it logged, for failure messages.
    pub fn log_tail(&self) -> String {
        self.child.log_tail(LOG_LINES_KEPT)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logged_child::strip_ansi;

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
