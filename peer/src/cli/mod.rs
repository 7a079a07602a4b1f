//! The `fbpkg-rs` command line: parses flags, sets up logging and signals, dispatches.

mod agent;
mod cache;
mod demo;
mod get;
mod memory;
mod progress;
mod publish;
mod rollout;
mod run;
mod status;
mod tracker;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::PeerError;
use crate::cache::Cache;
use crate::tracker_client::TrackerClient;

/// Peer-to-peer package distribution for server fleets.
///
/// Packages are files or directories, identified by the SHA-256 of their archive
/// (`name:<sha256>`), found through a tracker and fetched from the other hosts of the fleet
/// over BitTorrent. Every host runs `fbpkg-rs agent`; `fbpkg-rs get name:hash` prints the path
/// of the verified package in the local launcher cache, `fbpkg-rs run name:hash` runs it.
///
/// Quick start on one machine:
///
///   fbpkg-rs demo                          # tracker + 4 agents on loopback, one package
///
///   fbpkg-rs tracker &                     # or: a tracker and an agent of your own
///   fbpkg-rs agent &
///   fbpkg-rs publish myapp ./build/        # prints myapp:<sha256>
///   fbpkg-rs get myapp:<first 8+ digits>   # prints the path in the launcher cache
///   fbpkg-rs publish tool ./tool.sh --tag prod
///   fbpkg-rs run tool:prod -- --verbose    # runs it, fetching it first if needed
#[derive(Debug, Parser)]
#[command(name = "fbpkg-rs", version, max_term_width = 100, verbatim_doc_comment)]
pub struct Cli {
    /// Log filter, e.g. `info`, `debug`, `fbpkg_peer=debug` (also RUST_LOG). Defaults to
    /// `info` for services (tracker, agent) and `warn` for commands.
    #[arg(long, global = true, env = "FBPKG_LOG")]
    log: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the tracker: announces, the package catalog, the dashboard and metrics.
    Tracker(fbpkg_tracker::TrackerArgs),
    /// Run the agent on this host: fetches, verifies, caches and seeds packages.
    Agent(agent::AgentArgs),
    /// Print the launcher-cache path of a package, fetching it first if needed.
    Get(get::GetArgs),
    /// Run a package's program in place of this command, fetching the package first if needed.
    Run(run::RunArgs),
    /// Publish a file or directory as a package version; prints name:sha256.
    Publish(publish::PublishArgs),
    /// Show what this host's agent holds, fetches and serves.
    Status(status::StatusArgs),
    /// Move a tag to a new version in phases: start, status, list, pause, resume, abort.
    ///
    /// Each phase is a zone (zone:dc1/rack7: every host at or under it) or a percentage of
    /// the hosts, drawn from each host's stable bucket: the same hosts go first in every
    /// rollout of a tag. While a rollout runs, `fbpkg-rs get NAME:TAG` answers each host the
    /// version it should run now. The tracker moves to the next phase once the phase's hosts
    /// have been healthy for the bake time, and halts by itself when more hosts fail than
    /// --max-failures allows.
    Rollout(rollout::RolloutArgs),
    /// Run a tracker and several agents on loopback and push a package through the swarm.
    Demo(demo::DemoArgs),
    /// Read cached packages again; quarantine the ones that changed on disk.
    Verify(verify::VerifyArgs),
    /// Keep a version in the cache whatever the budget (`agent --cache-max-size`) says.
    Pin(cache::PinArgs),
    /// Let a pinned version be evicted again when it is the least recently used.
    Unpin(cache::PinArgs),
    /// The launcher cache: `ls` (sizes, last use, what is kept and why), `gc`, `metrics`.
    #[command(subcommand)]
    Cache(cache::CacheCommand),
}

/// Where this host's agent keeps its state and its cache, and which tracker it uses. Shared by
/// every command that talks to the agent or the tracker.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct HostArgs {
    /// Tracker URL.
    #[arg(long, env = "FBPKG_TRACKER", default_value = "http://127.0.0.1:6969")]
    pub tracker: String,
    /// Agent state: control socket, partial downloads [default: ~/.local/state/fbpkg-rs].
    #[arg(long, env = "FBPKG_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Launcher cache [default: ~/.cache/fbpkg-rs/packages].
    #[arg(long, env = "FBPKG_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
}

impl HostArgs {
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(|| {
            dirs::state_dir()
                .or_else(dirs::data_local_dir)
                .map(|d| d.join("fbpkg-rs"))
                .unwrap_or_else(|| PathBuf::from(".fbpkg-rs-state"))
        })
    }

    pub fn cache(&self) -> Cache {
        Cache::new(self.cache_dir.clone().unwrap_or_else(|| {
            dirs::cache_dir()
                .map(|d| d.join("fbpkg-rs").join("packages"))
                .unwrap_or_else(|| PathBuf::from(".fbpkg-rs-cache"))
        }))
    }

    /// A client that retries transient tracker failures for up to `retry_for` per call.
    pub fn tracker_client(
        &self,
        token: Option<String>,
        retry_for: Duration,
    ) -> Result<TrackerClient, PeerError> {
        Ok(
            TrackerClient::new(&self.tracker, token, Duration::from_secs(15))?
                .with_retry(retry_for),
        )
    }
}

/// Exit codes of `get`, `run` (before its program starts) and the other client commands.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Anything not listed below.
    pub const ERROR: u8 = 1;
    /// The reference cannot be parsed, or a prefix matches several versions.
    pub const BAD_REFERENCE: u8 = 2;
    /// No such package, version or tag.
    pub const NOT_FOUND: u8 = 3;
    /// Downloaded data did not match the hash asked for, or the archive is unsafe.
    pub const VERIFICATION: u8 = 4;
    /// No peer could serve the package within the timeout.
    pub const NO_PEERS: u8 = 5;
    /// The tracker is needed and cannot be reached (after retries), or answers like no
    /// fbpkg-rs tracker would.
    pub const TRACKER: u8 = 6;
    /// The tracker refused the publish token (or wants one).
    pub const UNAUTHORIZED: u8 = 7;
    /// No room: the package does not fit the cache budget (`agent --cache-max-size`) even
    /// after evicting every version that may go, or the disk filled up. The cache is left as
    /// it was.
    pub const NO_SPACE: u8 = 8;
    /// `run`: the package cannot be run (a directory package without an entrypoint, a file
    /// published without its execute bit), or exec refused the program (permission, a format
    /// the kernel cannot run). 126 as in sh and env: "found but cannot execute".
    pub const NOT_RUNNABLE: u8 = 126;
    /// `run`: exec found nothing to run: the program, or the interpreter its `#!` line names,
    /// does not exist. 127 as in sh and env: "not found".
    pub const PROGRAM_MISSING: u8 = 127;
}

/// Install the tracing subscriber: human-readable lines on stderr.
pub(crate) fn init_logging(filter: Option<&str>, default: &str) {
    use std::io::IsTerminal as _;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .or_else(|| filter.map(str::to_owned))
        .unwrap_or_else(|| default.to_owned());
    let env_filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// A token cancelled on the first SIGINT or SIGTERM.
pub(crate) fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        t.cancel();
    });
    token
}

/// Threads for blocking work (disk reads and writes, hashing). Few, so each stays busy and
/// warm: with tokio's default of 512, a crowd's block writes spread over dozens of threads
/// that sleep and wake for every batch.
const BLOCKING_THREADS: usize = 4;

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS)
        .build()?)
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    memory::one_arena();
    let cli = Cli::parse();
    let log = cli.log.as_deref();
    let result = match cli.command {
        Command::Tracker(args) => {
            init_logging(log, "info");
            tracker::run(args)
        }
        Command::Agent(args) => {
            init_logging(log, "info");
            agent::run(args)
        }
        // `get` sets up logging only when it leaves the cache-hit fast path.
        Command::Get(args) => return get::run(args, log),
        // So does `run`, which on success never returns: the package's program replaces it.
        Command::Run(args) => return run::run(args, log),
        Command::Publish(args) => {
            init_logging(log, "warn");
            publish::run(args)
        }
        Command::Status(args) => {
            init_logging(log, "warn");
            status::run(args)
        }
        Command::Rollout(args) => {
            init_logging(log, "warn");
            rollout::run(args)
        }
        Command::Demo(args) => {
            init_logging(log, "warn");
            demo::run(args)
        }
        Command::Verify(args) => {
            init_logging(log, "warn");
            verify::run(args)
        }
        Command::Pin(args) => {
            init_logging(log, "warn");
            cache::pin(args, true)
        }
        Command::Unpin(args) => {
            init_logging(log, "warn");
            cache::pin(args, false)
        }
        Command::Cache(cmd) => {
            init_logging(log, "warn");
            cache::run(cmd)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fbpkg-rs: error: {e:#}");
            let code = e
                .downcast_ref::<PeerError>()
                .map(PeerError::exit_code)
                .unwrap_or(exit::ERROR);
            ExitCode::from(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
