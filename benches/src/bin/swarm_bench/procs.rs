//! Child processes: started inside a namespace, waited for with a deadline, stopped by pid,
//! their CPU time and peak memory read from /proc.
//!
//! Every child gets its own process group, so a Ctrl-C reaches only this benchmark, which then
//! stops its children itself. Every child's pid is in a registry until it is reaped (an
//! unreaped pid cannot be reused), so the emergency teardown of a signal handler can kill
//! exactly the processes this run started.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use fbpkg_benches::swarm::procfs::{self, TICKS_PER_SEC};

/// Pids of children not yet reaped, with a label.
static LIVE: Mutex<BTreeMap<u32, String>> = Mutex::new(BTreeMap::new());
/// Set when the run is being torn down: no new child may start but teardown commands
/// ([`Spec::uncancellable`]).
static CLOSED: AtomicBool = AtomicBool::new(false);
/// Set by the first SIGINT or SIGTERM.
static CANCELLED: AtomicBool = AtomicBool::new(false);

/// How often waits poll.
pub const POLL: Duration = Duration::from_millis(5);

fn live() -> MutexGuard<'static, BTreeMap<u32, String>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Ask every wait to give up (a signal arrived).
pub fn cancel() {
    CANCELLED.store(true, Ordering::SeqCst);
}

/// Whether the run was interrupted.
pub fn cancelled() -> bool {
    CANCELLED.load(Ordering::SeqCst)
}

/// `Err` once the run was interrupted: every wait calls this.
pub fn check_cancelled() -> anyhow::Result<()> {
    if cancelled() {
        bail!("interrupted");
    }
    Ok(())
}

/// Send `signal` (e.g. `TERM`, `KILL`) to `pid` with kill(1).
pub fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Kill every child still running and refuse new ones (the signal handler's last resort).
pub fn kill_all_children() {
    CLOSED.store(true, Ordering::SeqCst);
    let pids: Vec<u32> = live().keys().copied().collect();
    for pid in pids {
        signal(pid, "KILL");
    }
}

/// Where a child's stdout goes.
#[derive(Debug)]
pub enum Stdout {
    /// Discarded.
    Null,
    /// Read line by line ([`Proc::line`]).
    Lines,
}

/// How to start a child.
#[derive(Debug)]
pub struct Spec {
    /// For messages and file names.
    pub label: String,
    /// Run inside this namespace (`ip netns exec NS ...`, which execs the program: the pid is
    /// the program's own).
    pub ns: Option<String>,
    /// Program and arguments.
    pub argv: Vec<OsString>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Give the child a pipe on stdin ([`Proc::send_line`]); otherwise /dev/null.
    pub stdin: bool,
    /// Stdout.
    pub stdout: Stdout,
    /// Stderr goes to this file (appended), or is discarded.
    pub stderr: Option<PathBuf>,
    /// [`run`] gives up on it when the run is interrupted (not for teardown commands).
    pub cancellable: bool,
}

impl Spec {
    /// A child `argv` in namespace `ns`, stdout and stderr discarded.
    pub fn new<I, S>(label: impl Into<String>, ns: Option<&str>, argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        Self {
            label: label.into(),
            ns: ns.map(str::to_owned),
            argv: argv.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            stdin: false,
            stdout: Stdout::Null,
            stderr: None,
            cancellable: true,
        }
    }

    /// A command that must run even after an interrupt (teardown).
    pub fn uncancellable(mut self) -> Self {
        self.cancellable = false;
        self
    }

    fn command(&self) -> anyhow::Result<Command> {
        let (program, args) = self.argv.split_first().context("empty command")?;
        let mut cmd = match &self.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program).args(args);
                c
            }
            None => {
                let mut c = Command::new(program);
                c.args(args);
                c
            }
        };
        // Nothing of the caller's fbpkg configuration may leak into a contender.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("FBPKG_") {
                cmd.env_remove(k);
            }
        }
        cmd.env_remove("RUST_LOG");
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.process_group(0);
        Ok(cmd)
    }
}

fn append(path: &PathBuf) -> anyhow::Result<File> {
    File::options()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// A running (or finished) child.
#[derive(Debug)]
pub struct Proc {
    /// Label.
    pub label: String,
    /// Pid.
    pub pid: u32,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Option<Receiver<String>>,
    status: Option<ExitStatus>,
    cpu_ticks: u64,
    sys_ticks: u64,
    hwm_bytes: Option<u64>,
}

impl Proc {
    /// Start a child.
    pub fn spawn(spec: Spec) -> anyhow::Result<Self> {
        let mut cmd = spec.command()?;
        cmd.stdin(if spec.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        cmd.stdout(match &spec.stdout {
            Stdout::Null => Stdio::null(),
            Stdout::Lines => Stdio::piped(),
        });
        cmd.stderr(match &spec.stderr {
            Some(p) => append(p)?.into(),
            None => Stdio::null(),
        });
        let mut registry = live();
        if CLOSED.load(Ordering::SeqCst) {
            bail!("shutting down: not starting {}", spec.label);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {} ({:?})", spec.label, spec.argv))?;
        let pid = child.id();
        registry.insert(pid, spec.label.clone());
        drop(registry);
        let lines = child.stdout.take().map(|out| {
            let (tx, rx) = channel();
            let name = format!("stdout-{pid}");
            let _ = std::thread::Builder::new().name(name).spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            rx
        });
        Ok(Self {
            label: spec.label,
            pid,
            stdin: child.stdin.take(),
            child,
            lines,
            status: None,
            cpu_ticks: 0,
            sys_ticks: 0,
            hwm_bytes: None,
        })
    }

    /// Check on the child without blocking: the exit status once it has exited (and been
    /// reaped). Reads its CPU time on the way, while it still exists (a zombie keeps it).
    pub fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_some() {
            return self.status;
        }
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .ok()
            .and_then(|s| procfs::parse_stat(&s));
        if let Some(s) = stat {
            self.cpu_ticks = s.cpu_ticks;
            self.sys_ticks = s.sys_ticks;
            if s.state != 'Z' && s.state != 'X' {
                return None;
            }
        }
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.reaped(status);
                Some(status)
            }
            _ => None,
        }
    }

    fn reaped(&mut self, status: ExitStatus) {
        self.status = Some(status);
        live().remove(&self.pid);
    }

    /// Wait until it exits or `deadline` passes.
    pub fn wait_until(&mut self, deadline: Instant) -> anyhow::Result<Option<ExitStatus>> {
        loop {
            if let Some(s) = self.poll() {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            check_cancelled()?;
            std::thread::sleep(POLL);
        }
    }

    /// Read its peak resident set (VmHWM) now; the largest reading is kept.
    pub fn sample_memory(&mut self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let hwm = procfs::status_kib_field(&status, "VmHWM")?;
        self.hwm_bytes = Some(self.hwm_bytes.unwrap_or(0).max(hwm));
        self.hwm_bytes
    }

    /// Peak resident set seen by [`Proc::sample_memory`].
    pub fn hwm_bytes(&self) -> Option<u64> {
        self.hwm_bytes
    }

    /// CPU seconds (user + system, all threads) as last read; final once it has exited.
    pub fn cpu_secs(&self) -> f64 {
        self.cpu_ticks as f64 / TICKS_PER_SEC
    }

    /// The system (kernel) part of [`Proc::cpu_secs`].
    pub fn sys_secs(&self) -> f64 {
        self.sys_ticks as f64 / TICKS_PER_SEC
    }

    /// Write one line to its stdin.
    pub fn send_line(&mut self, line: &str) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("no stdin pipe")?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .with_context(|| format!("writing to {}", self.label))
    }

    /// Close its stdin (our nodes take that as "stop").
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// The next stdout line, waiting until `deadline`; `None` at the deadline or when stdout
    /// has closed.
    pub fn line(&mut self, deadline: Instant) -> anyhow::Result<Option<String>> {
        let Some(rx) = &self.lines else {
            return Ok(None);
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok(line) => return Ok(Some(line)),
                Err(RecvTimeoutError::Disconnected) => return Ok(None),
                Err(RecvTimeoutError::Timeout) if left.is_zero() => return Ok(None),
                Err(RecvTimeoutError::Timeout) => check_cancelled()?,
            }
        }
    }

    /// A stdout line if one is ready now.
    pub fn try_line(&mut self) -> Option<String> {
        self.lines.as_ref()?.try_recv().ok()
    }

    /// Wait for a stdout line for which `pred` holds, skipping others, until `deadline`.
    pub fn wait_for_line(
        &mut self,
        what: &str,
        deadline: Instant,
        pred: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        while let Some(line) = self.line(deadline)? {
            if pred(&line) {
                return Ok(line);
            }
        }
        match self.poll() {
            Some(s) => bail!("{} exited ({s}) before {what}", self.label),
            None => bail!("{} did not report {what} in time", self.label),
        }
    }

    /// Stop it: SIGTERM, then SIGKILL after `grace`. Returns how it ended.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        terminate_all(&mut [&mut *self], grace);
        self.poll()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if let Some(s) = self.poll() {
            return Some(s);
        }
        let _ = self.child.kill();
        let status = self.child.wait().ok()?;
        self.reaped(status);
        Some(status)
    }
}

/// SIGTERM to every process, then one `grace` for all of them to exit, then SIGKILL to those
/// still running. Each in turn with its own grace, hung agents (a deadlock, a lost signal)
/// cost the grace once each: minutes for a crowd.
pub fn terminate_all(procs: &mut [&mut Proc], grace: Duration) {
    for p in procs.iter_mut() {
        if p.poll().is_none() {
            signal(p.pid, "TERM");
        }
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && procs.iter_mut().any(|p| p.poll().is_none()) {
        std::thread::sleep(POLL);
    }
    for p in procs.iter_mut() {
        p.kill();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.kill();
        }
    }
}

/// What a short command printed.
#[derive(Debug)]
pub struct Output {
    /// Exit status.
    pub status: ExitStatus,
    /// Stdout.
    pub stdout: String,
    /// Stderr.
    pub stderr: String,
}

/// Run a short command to completion, killing it at `timeout`.
pub fn run(spec: Spec, timeout: Duration) -> anyhow::Result<Output> {
    let label = spec.label.clone();
    let mut cmd = spec.command()?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut registry = live();
    // Teardown commands (`ip netns del`) are what the last resort itself runs after closing.
    if spec.cancellable && (CLOSED.load(Ordering::SeqCst) || cancelled()) {
        bail!("shutting down: not running {label}");
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("running {label} ({:?})", spec.argv))?;
    registry.insert(child.id(), label.clone());
    drop(registry);
    let pid = child.id();
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .map(|r| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    })
    .collect();
    let deadline = Instant::now() + timeout;
    let cancellable = spec.cancellable;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() >= deadline || (cancellable && cancelled()) => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(POLL),
            Err(e) => {
                live().remove(&pid);
                return Err(e).with_context(|| format!("waiting for {label}"));
            }
        }
    };
    live().remove(&pid);
    let mut texts = readers.into_iter().map(|h| h.join().unwrap_or_default());
    let (stdout, stderr) = (
        texts.next().unwrap_or_default(),
        texts.next().unwrap_or_default(),
    );
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => {
            if cancellable {
                check_cancelled()?;
            }
            bail!("{label} took longer than {timeout:?}; stderr: {stderr}")
        }
    }
}

/// Run a short command and require success; returns its stdout.
pub fn run_ok(spec: Spec, timeout: Duration) -> anyhow::Result<String> {
    let label = spec.label.clone();
    let argv = spec.argv.clone();
    let out = run(spec, timeout)?;
    if !out.status.success() {
        bail!(
            "{label} ({argv:?}) failed ({}): {}",
            out.status,
            out.stderr.trim()
        );
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_survives_exit() {
        // A child that burns CPU and exits by itself: its time is read while it is a zombie.
        let spec = Spec::new(
            "busy",
            None,
            [
                "sh",
                "-c",
                "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done",
            ],
        );
        let mut p = Proc::spawn(spec).unwrap();
        let status = p
            .wait_until(Instant::now() + Duration::from_secs(60))
            .unwrap()
            .expect("exits");
        assert!(status.success());
        assert!(p.cpu_secs() > 0.05, "{}", p.cpu_secs());
        assert!(
            !live().contains_key(&p.pid),
            "reaped children leave the registry"
        );
    }

    #[test]
    fn short_commands_and_timeouts() {
        let out = run(
            Spec::new("echo", None, ["echo", "hi"]),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(out.stdout, "hi\n");
        let err = run(
            Spec::new("sleep", None, ["sleep", "5"]),
            Duration::from_millis(100),
        );
        assert!(err.is_err());
        let mut p = Proc::spawn(Spec::new("sleep", None, ["sleep", "30"])).unwrap();
        let s = p.terminate(Duration::from_secs(5)).unwrap();
        assert!(!s.success());
    }

    #[test]
    fn processes_that_ignore_term_share_one_grace_then_are_killed() {
        let deaf = || {
            Proc::spawn(Spec::new(
                "deaf",
                None,
                ["sh", "-c", "trap '' TERM; exec sleep 30"],
            ))
            .unwrap()
        };
        let (mut a, mut b, mut c, mut d) = (deaf(), deaf(), deaf(), deaf());
        let mut quick = Proc::spawn(Spec::new("sleep", None, ["sleep", "30"])).unwrap();
        let grace = Duration::from_secs(2);
        let started = Instant::now();
        terminate_all(&mut [&mut a, &mut b, &mut quick, &mut c, &mut d], grace);
        let took = started.elapsed();
        for p in [&mut a, &mut b, &mut c, &mut d, &mut quick] {
            let s = p.poll().expect("reaped");
            assert!(!s.success());
        }
        // One grace for all four deaf ones, not four in turn (8 s); generous for a busy machine.
        assert!(took < grace * 3, "took {took:?}");
    }
}
