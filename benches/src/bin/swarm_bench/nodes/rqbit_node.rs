//! `swarm_bench rqbit-node`: one librqbit session on one host, run inside its namespace.
//!
//! Stock session settings except what the benchmark forbids: no DHT, no local service
//! discovery, no UPnP, no persistence, TCP only on the host's address (announcing that port,
//! since librqbit otherwise announces 4240). Peers come only from the tracker in the metainfo.
//!
//! Protocol on stdin/stdout (one JSON object per stdout line):
//! - seed: adds the torrent over the file already in `--dir`, prints `ready` once its check
//!   found every piece; then serves until stdin closes, prints `exit` with its stats.
//! - leech: prints `ready` once the session listens, waits for a `go` line, adds the torrent,
//!   prints `complete` when every piece is verified, then exits (with `--linger`, keeps
//!   serving until stdin closes).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use librqbit::{
    AddTorrent, AddTorrentOptions, ListenerMode, ListenerOptions, ManagedTorrent, Session,
    SessionOptions,
};
use serde_json::json;

use super::{emit, self_usage};

/// `rqbit-node` flags.
#[derive(Debug, clap::Args)]
pub struct RqbitArgs {
    /// `seed` or `leech`.
    #[arg(long)]
    role: String,
    /// The .torrent.
    #[arg(long)]
    torrent: PathBuf,
    /// Output folder (for a seed: holds the file already).
    #[arg(long)]
    dir: PathBuf,
    /// Address to listen on and announce.
    #[arg(long)]
    listen: SocketAddr,
    /// Leech: keep serving after completion until stdin closes.
    #[arg(long)]
    linger: bool,
}

async fn session(args: &RqbitArgs) -> anyhow::Result<Arc<Session>> {
    let opts = SessionOptions {
        dht: None,
        disable_local_service_discovery: true,
        persistence: None,
        fastresume: false,
        ipv4_only: true,
        listen: Some(ListenerOptions {
            mode: ListenerMode::TcpOnly,
            listen_addr: args.listen,
            announce_port: Some(args.listen.port()),
            enable_upnp_port_forwarding: false,
            ipv4_only: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    Session::new_with_opts(args.dir.clone(), opts)
        .await
        .context("starting the librqbit session")
}

async fn add(
    session: &Arc<Session>,
    torrent: Vec<u8>,
    dir: &std::path::Path,
) -> anyhow::Result<Arc<ManagedTorrent>> {
    session
        .add_torrent(
            AddTorrent::from_bytes(torrent),
            Some(AddTorrentOptions {
                output_folder: Some(dir.to_string_lossy().into_owned()),
                overwrite: true,
                ..Default::default()
            }),
        )
        .await
        .context("adding the torrent")?
        .into_handle()
        .context("librqbit listed the torrent without managing it")
}

fn stats(handle: &ManagedTorrent) -> serde_json::Value {
    let s = handle.stats();
    json!({
        "uploaded_bytes": s.uploaded_bytes,
        "progress_bytes": s.progress_bytes,
        "total_bytes": s.total_bytes,
        "finished": s.finished,
        "error": s.error,
    })
}

/// Lines from stdin (read by a thread); the channel closes with stdin.
type Stdin = tokio::sync::mpsc::UnboundedReceiver<String>;

fn stdin_lines() -> Stdin {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

async fn next_line(stdin: &mut Stdin) -> Option<String> {
    stdin.recv().await
}

/// Run the node.
pub fn main(args: RqbitArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let torrent = std::fs::read(&args.torrent)
            .with_context(|| format!("reading {}", args.torrent.display()))?;
        let mut stdin = stdin_lines();
        let session = session(&args).await?;
        let handle = match args.role.as_str() {
            "seed" => {
                let handle = add(&session, torrent, &args.dir).await?;
                handle.wait_until_completed().await?;
                emit(json!({"event": "ready", "stats": stats(&handle)}));
                while next_line(&mut stdin).await.is_some() {}
                handle
            }
            "leech" => {
                emit(json!({"event": "ready"}));
                match next_line(&mut stdin).await.as_deref() {
                    Some("go") => {}
                    other => anyhow::bail!("expected `go`, got {other:?}"),
                }
                let start = Instant::now();
                let handle = add(&session, torrent, &args.dir).await?;
                // Stdin closing before completion means "give up" (the deadline passed).
                let completed = tokio::select! {
                    r = handle.wait_until_completed() => { r?; true }
                    () = async { while next_line(&mut stdin).await.is_some() {} } => false,
                };
                if completed {
                    emit(json!({
                        "event": "complete",
                        "secs": start.elapsed().as_secs_f64(),
                        "stats": stats(&handle),
                    }));
                    if args.linger {
                        while next_line(&mut stdin).await.is_some() {}
                    }
                }
                handle
            }
            other => anyhow::bail!("--role must be seed or leech, not {other:?}"),
        };
        let final_stats = stats(&handle);
        let _ = tokio::time::timeout(Duration::from_secs(5), session.stop()).await;
        emit(json!({"event": "exit", "stats": final_stats, "usage": self_usage()}));
        Ok(())
    })
}
