//! Leaving nothing behind: the tmpfs work directory, leftovers of a crashed run, and signals.
//!
//! Normal path: every wait polls [`procs::check_cancelled`], so after SIGINT/SIGTERM the run
//! returns an error and the guards (`Proc`, `Topology`, `WorkDir`) tear down in order. If
//! that has not finished 30 s after the signal, or a second signal arrives, the signal thread
//! kills every child, deletes every `fbsb-` namespace and the work directory itself, and exits.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use fbpkg_benches::swarm::netplan::is_ours;

use crate::procs::{self, Spec};

/// Where everything of one run lives: `/dev/shm/fbpkg-swarm-bench-<pid>/`.
pub const SHM_PREFIX: &str = "fbpkg-swarm-bench-";

/// The run's tmpfs directory, removed on drop.
#[derive(Debug)]
pub struct WorkDir {
    /// Its path.
    pub path: PathBuf,
    keep_logs: Option<PathBuf>,
}

impl WorkDir {
    /// Create `/dev/shm/fbpkg-swarm-bench-<pid>/` (and `logs/`).
    pub fn create(keep_logs: Option<PathBuf>) -> anyhow::Result<Self> {
        let path = work_dir_path();
        std::fs::create_dir_all(path.join("logs"))
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path, keep_logs })
    }

    /// The logs directory.
    pub fn logs(&self) -> PathBuf {
        self.path.join("logs")
    }
}

fn work_dir_path() -> PathBuf {
    Path::new("/dev/shm").join(format!("{SHM_PREFIX}{}", std::process::id()))
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Some(dest) = &self.keep_logs {
            match copy_dir(&self.logs(), dest) {
                Ok(()) => eprintln!("swarm_bench: logs kept in {}", dest.display()),
                Err(e) => eprintln!("swarm_bench: could not keep the logs: {e:#}"),
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("swarm_bench: removing {}: {e}", self.path.display());
        }
    }
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

/// `fbsb-` namespaces that exist now.
pub fn our_namespaces() -> anyhow::Result<Vec<String>> {
    let out = procs::run_ok(
        Spec::new("ip netns list", None, ["ip", "netns", "list"]).uncancellable(),
        Duration::from_secs(10),
    )?;
    Ok(out.lines().filter_map(is_ours).map(str::to_owned).collect())
}

/// Kill whatever runs in namespace `ns` (only ever one of ours), then delete it.
pub fn delete_namespace(ns: &str) {
    let pids = procs::run_ok(
        Spec::new("ip netns pids", None, ["ip", "netns", "pids", ns]).uncancellable(),
        Duration::from_secs(10),
    )
    .unwrap_or_default();
    for pid in pids.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
        procs::signal(pid, "KILL");
    }
    // After a signal the run's own teardown and the last resort may both get here.
    if !Path::new("/run/netns").join(ns).exists() {
        return;
    }
    if let Err(e) = procs::run_ok(
        Spec::new("ip netns del", None, ["ip", "netns", "del", ns]).uncancellable(),
        Duration::from_secs(10),
    ) {
        eprintln!("swarm_bench: {e:#}");
    }
}

/// Whether `pid` is a live `swarm_bench` (another run).
fn is_live_bench(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|c| c.trim().starts_with("swarm_bench"))
}

/// Remove what a crashed run left: its `fbsb-` namespaces (and the processes in them) and its
/// tmpfs directory. Refuses when another run is alive, since the namespaces would be its.
pub fn remove_leftovers() -> anyhow::Result<Vec<String>> {
    let mut removed = Vec::new();
    let mut stale_dirs = Vec::new();
    for entry in std::fs::read_dir("/dev/shm").context("reading /dev/shm")? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(SHM_PREFIX)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        anyhow::ensure!(
            !is_live_bench(pid),
            "another swarm_bench run (pid {pid}) is active; wait for it or stop it"
        );
        stale_dirs.push(entry.path());
    }
    for ns in our_namespaces()? {
        delete_namespace(&ns);
        removed.push(format!("namespace {ns}"));
    }
    for dir in stale_dirs {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        removed.push(dir.display().to_string());
    }
    Ok(removed)
}

/// The last resort after a signal: kill every child, delete every namespace and the work
/// directory, exit.
fn emergency_teardown() -> ! {
    procs::kill_all_children();
    for ns in our_namespaces().unwrap_or_default() {
        delete_namespace(&ns);
    }
    let _ = std::fs::remove_dir_all(work_dir_path());
    eprintln!("swarm_bench: torn down after a signal");
    std::process::exit(130);
}

/// Handle SIGINT and SIGTERM (see the module doc).
pub fn install_signal_handler() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Register in this thread, before any child exists, so no signal is missed.
    let (mut int, mut term) = rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        anyhow::Ok((
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        ))
    })?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(async move {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                eprintln!("swarm_bench: interrupted; stopping contenders and tearing down");
                procs::cancel();
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                    () = tokio::time::sleep(Duration::from_secs(30)) => {}
                }
            });
            emergency_teardown();
        })?;
    Ok(())
}
