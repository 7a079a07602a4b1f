//! A stock client's process: started with its output in a log file, SIGKILLed and reaped on
//! drop, whatever the test did before.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

/// Lines of a client's log quoted in failure messages.
const LOG_TAIL_LINES: usize = 40;

/// A running client process. Killed on drop.
#[derive(Debug)]
pub struct ClientProcess {
    name: String,
    child: Mutex<Child>,
    logs: Vec<PathBuf>,
    quote: fn(&str) -> bool,
}

impl ClientProcess {
    /// Spawn `cmd` with stdin closed and stdout and stderr appended to `dir/<name>.out`.
    /// `logs` are further files the client writes (its own log), quoted on failure.
    pub fn spawn(name: &str, cmd: &mut Command, dir: &Path, logs: &[PathBuf]) -> io::Result<Self> {
        let out_path = dir.join(format!("{name}.out"));
        let out = File::options().create(true).append(true).open(&out_path)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("starting {name} ({cmd:?}): {e}")))?;
        let mut all = vec![out_path];
        all.extend(logs.iter().cloned());
        Ok(Self {
            name: name.to_owned(),
            child: Mutex::new(child),
            logs: all,
            quote: |_| true,
        })
    }

    /// Quote only the log lines `quote` accepts in [`ClientProcess::log_tail`].
    pub fn quoting_only(mut self, quote: fn(&str) -> bool) -> Self {
        self.quote = quote;
        self
    }

    /// `Err` with its exit status when it has exited: a client that dies early is a failure,
    /// not a wait until the deadline.
    pub fn check_alive(&self) -> Result<(), String> {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!(
                "{} exited: {status}\n{}",
                self.name,
                self.log_tail()
            )),
            Err(e) => Err(format!("{}: {e}", self.name)),
        }
    }

    /// The first line of its logs (its output first) that contains `needle`, if one does.
    pub fn logged(&self, needle: &str) -> Option<String> {
        self.logs.iter().find_map(|path| {
            let text = std::fs::read(path).ok()?;
            String::from_utf8_lossy(&text)
                .lines()
                .find(|l| l.contains(needle))
                .map(str::to_owned)
        })
    }

    /// The last lines of each of its logs, for failure messages.
    pub fn log_tail(&self) -> String {
        let mut out = String::new();
        for path in &self.logs {
            let text = std::fs::read(path)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_else(|e| format!("(cannot read: {e})"));
            let lines: Vec<&str> = text.lines().filter(|l| (self.quote)(l)).collect();
            out.push_str(&format!("--- {} ({}):\n", self.name, path.display()));
            for line in &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..] {
                out.push_str("  ");
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for ClientProcess {
    fn drop(&mut self) {
        // Stock clients save state and say goodbye to trackers when asked politely; a test has
        // nothing to keep, so SIGKILL and reap.
        let child = self.child.get_mut().unwrap_or_else(|p| p.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A TCP port on `ip` that was free a moment ago (the client that gets it binds it itself).
pub fn free_port(ip: Ipv4Addr) -> io::Result<u16> {
    Ok(TcpListener::bind((ip, 0))?.local_addr()?.port())
}

/// Why a client's start did not give the test a client of its own.
pub enum StartError {
    /// A port it was given was taken between [`free_port`] and its bind (by another test's
    /// client, say), and another client may answer on it: worth a try on fresh ports.
    PortTaken(String),
    Failed(String),
}

impl From<String> for StartError {
    fn from(why: String) -> Self {
        StartError::Failed(why)
    }
}

/// Starts on fresh ports after a port was taken, at most this many times in all.
const START_ATTEMPTS: usize = 3;

/// Run `start`, which picks its ports with [`free_port`], until it gives a client of its own:
/// again after [`StartError::PortTaken`], at most [`START_ATTEMPTS`] times.
pub async fn start_on_free_ports<T, F, Fut>(name: &str, mut start: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StartError>>,
{
    let mut taken = Vec::new();
    for _ in 0..START_ATTEMPTS {
        match start().await {
            Ok(client) => return Ok(client),
            Err(StartError::PortTaken(why)) => taken.push(why),
            Err(StartError::Failed(why)) => return Err(why),
        }
    }
    Err(format!(
        "{name} found a port taken {START_ATTEMPTS} times:\n{}",
        taken.join("\n")
    ))
}
