//! A long-running `fbpkg-rs` child (tracker, agent) whose stderr is read line by line for its
//! whole life: kept, bounded, for failure messages, and watched for the line that says it is
//! ready. SIGKILLed and reaped on drop.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

/// A running child process and the last lines of its stderr.
#[derive(Debug)]
pub(crate) struct LoggedChild {
    child: Child,
    log: Arc<Mutex<VecDeque<String>>>,
}

impl LoggedChild {
    /// Spawn `cmd` with stderr piped. A thread named `thread_name` drains stderr until it
    /// closes (a full pipe would block the child), keeps the last `keep` lines with ANSI escapes
    /// removed, and sends the first `Some` that `ready` returns for a line. The receiver is
    /// disconnected once stderr closes: the child exited (or closed stderr) without that line,
    /// and every line it wrote is in the log by then.
    pub(crate) fn spawn<T: Send + 'static>(
        cmd: &mut Command,
        thread_name: String,
        keep: usize,
        mut ready: impl FnMut(&str) -> Option<T> + Send + 'static,
    ) -> io::Result<(Self, mpsc::Receiver<T>)> {
        let mut child = cmd.stderr(Stdio::piped()).spawn()?;
        let Some(stderr) = child.stderr.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::other("no stderr pipe"));
        };
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, rx) = mpsc::channel();
        let kept = log.clone();
        let spawned = std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let line = strip_ansi(&line);
                    if tx.is_some()
                        && let Some(seen) = ready(&line)
                        && let Some(tx) = tx.take()
                    {
                        let _ = tx.send(seen);
                    }
                    if let Ok(mut l) = kept.lock() {
                        if l.len() == keep {
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
        Ok((Self { child, log }, rx))
    }

    /// SIGKILL it, whatever it is doing, and reap it.
    pub(crate) fn kill(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        self.child.kill()?;
        self.child.wait()
    }

    /// Every line kept so far, oldest first.
    pub(crate) fn log_lines(&self) -> Vec<String> {
        self.log
            .lock()
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The last `lines` lines, indented, one a line: for failure messages.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        self.log
            .lock()
            .map(|l| {
                l.iter()
                    .skip(l.len().saturating_sub(lines))
                    .map(|s| format!("  {s}\n"))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for LoggedChild {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// Remove ANSI escape sequences (`ESC [ ... final byte`), in case colour is forced on.
pub(crate) fn strip_ansi(s: &str) -> String {
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
