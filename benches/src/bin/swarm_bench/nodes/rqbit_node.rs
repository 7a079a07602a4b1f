//! `swarm_bench rqbit-node`: one librqbit session on one host, run inside its namespace.
//!
//! Stock session settings except what the benchmark forbids: no DHT, no local service
//! discovery, no UPnP, no persistence, TCP only on the host's address (announcing that port,
//! since librqbit otherwise announces 4240). Peers come only from the tracker in the metainfo.
//!
//! Protocol on stdin/stdout (one JSON object per stdout line):
//! - seed: adds its torrents over the files already in `--dir`, prints `ready` once its check
//!   found every piece; then serves until stdin closes, prints `exit` with its stats.
//! - leech: prints `ready` once the session listens, waits for a `go` line, adds every
//!   torrent, prints `done` with the torrent's index as each one has every piece verified and
//!   `complete` once all have, then exits (with `--linger`, keeps serving until stdin closes).
//!
//! Several `--torrent`s (the many-package scenario, B5) share one session, as they would on a
//! host: one listening port, librqbit's own sharing of peers and bandwidth between them.
//! `exit`'s `stats` add the torrents up; `torrents` has each one's.

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
    /// A .torrent (repeat for several, all in the one session).
    #[arg(long, required = true)]
    torrent: Vec<PathBuf>,
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

/// Payload bytes this session fetched from peers (not what it found on disk at the start).
fn fetched(s: &librqbit::TorrentStats) -> u64 {
    s.live.as_ref().map_or(0, |l| l.snapshot.fetched_bytes)
}

fn stats(handle: &ManagedTorrent) -> serde_json::Value {
    let s = handle.stats();
    json!({
        "uploaded_bytes": s.uploaded_bytes,
        "fetched_bytes": fetched(&s),
        "progress_bytes": s.progress_bytes,
        "total_bytes": s.total_bytes,
        "finished": s.finished,
        "error": s.error,
    })
}

/// Every torrent's stats, added up (errors listed).
fn total(handles: &[Arc<ManagedTorrent>]) -> serde_json::Value {
    let (mut up, mut progress, mut size, mut finished) = (0u64, 0u64, 0u64, true);
    let mut fetched_bytes = 0u64;
    let mut errors = Vec::new();
    for h in handles {
        let s = h.stats();
        up += s.uploaded_bytes;
        fetched_bytes += fetched(&s);
        progress += s.progress_bytes;
        size += s.total_bytes;
        finished &= s.finished;
        errors.extend(s.error);
    }
    json!({
        "uploaded_bytes": up,
        "fetched_bytes": fetched_bytes,
        "progress_bytes": progress,
        "total_bytes": size,
        "finished": finished,
        "error": (!errors.is_empty()).then(|| errors.join("; ")),
    })
}

/// Wait until every torrent has all its pieces, printing `done` for each as it does.
async fn all_completed(handles: &[Arc<ManagedTorrent>], start: Instant) -> anyhow::Result<()> {
    let mut waits = tokio::task::JoinSet::new();
    for (k, h) in handles.iter().enumerate() {
        let h = h.clone();
        waits.spawn(async move { (k, h.wait_until_completed().await) });
    }
    while let Some(joined) = waits.join_next().await {
        let (k, r) = joined.context("a completion wait panicked")?;
        r?;
        emit(json!({"event": "done", "index": k, "secs": start.elapsed().as_secs_f64()}));
    }
    Ok(())
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
        let torrents = args
            .torrent
            .iter()
            .map(|t| std::fs::read(t).with_context(|| format!("reading {}", t.display())))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut stdin = stdin_lines();
        let session = session(&args).await?;
        let mut handles = Vec::new();
        match args.role.as_str() {
            "seed" => {
                for t in torrents {
                    handles.push(add(&session, t, &args.dir).await?);
                }
                all_completed(&handles, Instant::now()).await?;
                emit(json!({"event": "ready", "stats": total(&handles)}));
                while next_line(&mut stdin).await.is_some() {}
            }
            "leech" => {
                emit(json!({"event": "ready"}));
                match next_line(&mut stdin).await.as_deref() {
                    Some("go") => {}
                    other => anyhow::bail!("expected `go`, got {other:?}"),
                }
                let start = Instant::now();
                for t in torrents {
                    handles.push(add(&session, t, &args.dir).await?);
                }
                // Stdin closing before completion means "give up" (the deadline passed).
                let completed = tokio::select! {
                    r = all_completed(&handles, start) => { r?; true }
                    () = async { while next_line(&mut stdin).await.is_some() {} } => false,
                };
                if completed {
                    emit(json!({
                        "event": "complete",
                        "secs": start.elapsed().as_secs_f64(),
                        "stats": total(&handles),
                    }));
                    if args.linger {
                        while next_line(&mut stdin).await.is_some() {}
                    }
                }
            }
            other => anyhow::bail!("--role must be seed or leech, not {other:?}"),
        }
        let final_stats = total(&handles);
        let each: Vec<_> = handles.iter().map(|h| stats(h)).collect();
        let _ = tokio::time::timeout(Duration::from_secs(5), session.stop()).await;
        emit(
            json!({"event": "exit", "stats": final_stats, "torrents": each, "usage": self_usage()}),
        );
        Ok(())
    })
}
