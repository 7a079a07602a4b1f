//! The `fbpkg-rs` command line: parses flags, sets up logging and signals, dispatches.

mod tracker;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// Peer-to-peer package distribution for server fleets.
///
/// Packages are files or directories, identified by the SHA-256 of their archive
/// (`name:<sha256>`), found through a tracker and fetched from the other hosts of the fleet
/// over BitTorrent. Every host runs `fbpkg-rs agent`; `fbpkg-rs get name:hash` prints the path
/// of the verified package in the local launcher cache.
#[derive(Debug, Parser)]
#[command(name = "fbpkg-rs", version, max_term_width = 100)]
pub struct Cli {
    /// Log filter, e.g. `info`, `debug`, `fbpkg_peer=debug` (also RUST_LOG).
    #[arg(long, global = true, env = "FBPKG_LOG", default_value = "info")]
    log: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the tracker: announces, the package catalog, the dashboard and metrics.
    Tracker(fbpkg_tracker::TrackerArgs),
}

/// Install the tracing subscriber: human-readable lines on stderr.
pub(crate) fn init_logging(filter: &str) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_owned());
    let env_filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal as _;
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

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Tracker(args) => {
            init_logging(&cli.log);
            tracker::run(args)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fbpkg-rs: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
