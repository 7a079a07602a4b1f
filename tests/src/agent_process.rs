//! `fbpkg-rs agent` as a child process: its own state and cache directories, a peer port (on
//! loopback unless told otherwise) it announces, SIGKILLed on drop.
//!
//! The agent announces the port it is told (`--listen`), so it cannot be given port 0. A free
//! port is found by binding 127.0.0.1:0 and releasing it; if something takes it in between,
//! the agent exits saying it cannot listen, and the next attempt picks another port.

use std::ffi::OsString;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use fbpkg_peer::cache::Cache;
use fbpkg_peer::engine::TorrentStatus;

use crate::cli::{fbpkg_rs, fbpkg_rs_command};
use crate::logged_child::LoggedChild;

/// Longest an agent may take from spawn to `agent ready`.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Attempts at a free port before giving up.
const PORT_ATTEMPTS: usize = 5;
/// Log lines kept (an agent at `info` logs a few lines per package).
const LOG_LINES_KEPT: usize = 20_000;
/// Lines quoted in failure messages.
const LOG_TAIL_LINES: usize = 60;
/// Longest one `fbpkg-rs status` may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
/// The agents' log level (`--log`) when set, e.g. `FBPKG_TEST_LOG=debug` to see each peer
/// connection in a failing test's log tail; `info` otherwise.
pub const LOG_LEVEL_ENV: &str = "FBPKG_TEST_LOG";

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_loopback_port() -> io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// A running `fbpkg-rs agent`.
#[derive(Debug)]
pub struct AgentProcess {
    child: LoggedChild,
    state_dir: PathBuf,
    cache_dir: PathBuf,
    tracker: String,
    listen: SocketAddr,
}

impl AgentProcess {
    /// Start `fbpkg-rs agent` with `state_dir`, `cache_dir` and `tracker` (a base URL) on a free
    /// loopback port, with `extra` flags (e.g. `--max-upload-rate 4M`), and return once it has
    /// logged `agent ready` (its control socket is bound then).
    pub async fn start(
        state_dir: &Path,
        cache_dir: &Path,
        tracker: &str,
        extra: &[&str],
    ) -> io::Result<Self> {
        Self::start_at(Ipv4Addr::LOCALHOST, state_dir, cache_dir, tracker, extra).await
    }

    /// [`AgentProcess::start`] listening on `ip` instead of 127.0.0.1 (an address of this
    /// namespace, e.g. one end of a test's veth pair, for peers that will not dial loopback).
    pub async fn start_at(
        ip: Ipv4Addr,
        state_dir: &Path,
        cache_dir: &Path,
        tracker: &str,
        extra: &[&str],
    ) -> io::Result<Self> {
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = TcpListener::bind((ip, 0))?.local_addr()?.port();
            let listen = SocketAddr::from((ip, port));
            match Self::start_on(state_dir, cache_dir, tracker, extra, listen).await? {
                Ok(agent) => return Ok(agent),
                Err(log) if log.contains("cannot listen for peers") => last = log,
                Err(log) => {
                    return Err(io::Error::other(format!(
                        "agent exited before it was ready; its log:\n{log}"
                    )));
                }
            }
        }
        Err(io::Error::other(format!(
            "no free port for the agent after {PORT_ATTEMPTS} attempts; last log:\n{last}"
        )))
    }

    /// One attempt: `Ok(Err(log))` when the agent exited before it was ready.
    async fn start_on(
        state_dir: &Path,
        cache_dir: &Path,
        tracker: &str,
        extra: &[&str],
        listen: SocketAddr,
    ) -> io::Result<Result<Self, String>> {
        let port = listen.port();
        let mut cmd = fbpkg_rs_command();
        cmd.args([
            "--log",
            &std::env::var(LOG_LEVEL_ENV).unwrap_or_else(|_| "info".into()),
            "agent",
            "--listen",
        ])
        .arg(listen.to_string())
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--cache-dir")
        .arg(cache_dir)
        .arg("--tracker")
        .arg(tracker)
        .args(extra)
        .stdout(Stdio::null());
        let (child, ready) = LoggedChild::spawn(
            &mut cmd,
            format!("agent-{port}-stderr"),
            LOG_LINES_KEPT,
            |line| line.contains("agent ready").then_some(()),
        )?;
        let mut agent = Self {
            child,
            state_dir: state_dir.to_owned(),
            cache_dir: cache_dir.to_owned(),
            tracker: tracker.to_owned(),
            listen,
        };
        let waited = tokio::task::spawn_blocking(move || ready.recv_timeout(START_TIMEOUT))
            .await
            .map_err(io::Error::other)?;
        match waited {
            Ok(()) => Ok(Ok(agent)),
            Err(RecvTimeoutError::Disconnected) => {
                let _ = agent.kill();
                Ok(Err(agent.log_tail()))
            }
            Err(RecvTimeoutError::Timeout) => {
                let _ = agent.kill();
                Err(io::Error::other(format!(
                    "agent not ready after {START_TIMEOUT:?}; its log:\n{}",
                    agent.log_tail()
                )))
            }
        }
    }

    /// Where other peers connect to it.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// Its state directory (control socket, partial downloads).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Its launcher cache directory.
    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// Its launcher cache.
    pub fn cache(&self) -> Cache {
        Cache::new(&self.cache_dir)
    }

    /// `--state-dir S --cache-dir C --tracker T`: the flags that make a client command (`get`,
    /// `publish`, `status`) talk to this agent.
    pub fn host_args(&self) -> Vec<OsString> {
        vec![
            "--state-dir".into(),
            self.state_dir.clone().into(),
            "--cache-dir".into(),
            self.cache_dir.clone().into(),
            "--tracker".into(),
            self.tracker.clone().into(),
        ]
    }

    /// `fbpkg-rs status --json` against this agent.
    pub async fn status(&self) -> Result<Vec<TorrentStatus>, String> {
        let mut args: Vec<OsString> = vec!["status".into(), "--json".into()];
        args.extend(self.host_args());
        let out = fbpkg_rs(args, STATUS_TIMEOUT).await;
        if !out.success() {
            return Err(format!("fbpkg-rs status failed: {out}"));
        }
        serde_json::from_str(&out.stdout).map_err(|e| format!("status JSON: {e}: {out}"))
    }

    /// SIGKILL it, whatever it is doing, and reap it.
    pub fn kill(&mut self) -> io::Result<ExitStatus> {
        self.child.kill()
    }

    /// Every line it logged so far (the last 20,000).
    pub fn log_lines(&self) -> Vec<String> {
        self.child.log_lines()
    }

    /// The last lines it logged, for failure messages.
    pub fn log_tail(&self) -> String {
        self.child.log_tail(LOG_TAIL_LINES)
    }
}

/// The value of a `key=value` field in a tracing line (quotes removed).
pub fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim_matches('"'))
}
