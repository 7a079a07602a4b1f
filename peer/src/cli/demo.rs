//! `fbpkg-rs demo`: an embedded tracker and several agents on loopback, one generated package
//! published on the first and fetched by all the others at the same moment.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use fbpkg_common::metainfo::{Format, Metainfo};
use fbpkg_common::pkgref::PackageName;
use fbpkg_tracker::{Config as TrackerConfig, Embedded};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cache::{Cache, Handoff};
use crate::engine::{Engine, EngineConfig, Phase};
use crate::tracker_client::TrackerClient;

/// `fbpkg-rs demo` flags.
#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Agents to start (one seeds, the others fetch).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(2..=64))]
    agents: u16,

    /// Package size in MiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    size_mib: u64,

    /// Stop as soon as every agent has the package, instead of waiting for Ctrl-C.
    #[arg(long)]
    exit: bool,

    /// Keep the demo's files here instead of a temporary directory removed at the end.
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// Deterministic, incompressible-looking bytes, fast to make.
fn generate(path: &Path, size: u64) -> std::io::Result<()> {
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut left = size;
    let mut buf = [0u8; 8];
    while left > 0 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        buf.copy_from_slice(&x.to_le_bytes());
        let n = left.min(8) as usize;
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    w.flush()
}

pub(super) fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let (base, temporary) = match &args.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("fbpkg-demo-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&base).with_context(|| format!("cannot create {}", base.display()))?;
    let result = super::runtime()?.block_on(demo(&args, &base));
    if temporary {
        let _ = crate::cache::remove_tree(&base);
    }
    result
}

async fn demo(args: &DemoArgs, base: &Path) -> anyhow::Result<ExitCode> {
    let shutdown = super::shutdown_on_signals();
    let tracker_config = TrackerConfig {
        listen: "127.0.0.1:0".parse()?,
        data_dir: base.join("tracker"),
        announce_interval: Duration::from_secs(10),
        min_announce_interval: Duration::from_secs(2),
        dashboard_refresh_secs: 2,
        ..TrackerConfig::default()
    };
    // The tracker stops last, so the agents' `stopped` announces reach it.
    let tracker_stop = CancellationToken::new();
    let tracker = Embedded::start(tracker_config, tracker_stop.clone()).await?;
    let url = format!("http://{}", tracker.addr);
    println!("tracker and dashboard: {url}/");

    let size = args.size_mib << 20;
    let file = base.join("demo.bin");
    let file2 = file.clone();
    tokio::task::spawn_blocking(move || generate(&file2, size)).await??;
    let meta = {
        let f = std::io::BufReader::new(std::fs::File::open(&file)?);
        Arc::new(Metainfo::build(
            f,
            size,
            "demo.bin",
            &format!("{url}/announce"),
            Format::File,
        )?)
    };
    let name = PackageName::new("demo")?;

    let mut engines = Vec::new();
    for i in 0..args.agents {
        let dir = base.join(format!("agent{i}"));
        let mut config = EngineConfig::new(dir.join("work"));
        config.listen = "127.0.0.1:0".parse()?;
        let client = TrackerClient::new(&url, None, Duration::from_secs(10))?;
        let engine = Engine::start(
            config,
            client,
            Cache::new(dir.join("cache")),
            shutdown.child_token(),
        )
        .await?;
        engines.push(engine);
    }
    let seed = &engines[0];
    seed.tracker().publish(&name, &meta).await?;
    let entry = seed
        .cache()
        .install(&name, &meta, &file, Handoff::Move, &Default::default())?;
    seed.seed(name.clone(), meta.clone(), &entry.dir)?;
    println!(
        "published {name}:{} ({} MiB, {} pieces of {} KiB); agent0 seeds it",
        meta.sha256,
        args.size_mib,
        meta.num_pieces(),
        meta.piece_length >> 10
    );
    println!("fetching on {} agents at once...", engines.len() - 1);

    let started = Instant::now();
    let mut waits = Vec::new();
    for (i, e) in engines.iter().enumerate().skip(1) {
        let t = e.download(name.clone(), meta.clone()).await?;
        waits.push(tokio::spawn(async move {
            match t.finished().await {
                Phase::Seeding(entry) => Ok((i, started.elapsed(), entry.launch_path)),
                Phase::Failed { message, .. } => Err(anyhow::anyhow!("agent{i}: {message}")),
                other => Err(anyhow::anyhow!("agent{i} ended as {other:?}")),
            }
        }));
    }
    let mut failed = false;
    let all = async {
        let mut out = Vec::new();
        for w in waits {
            out.push(w.await?);
        }
        Ok::<_, anyhow::Error>(out)
    };
    let results = tokio::select! {
        r = all => r?,
        _ = shutdown.cancelled() => anyhow::bail!("interrupted"),
        _ = tokio::time::sleep(Duration::from_secs(600)) => anyhow::bail!("the demo did not finish within 10 minutes"),
    };
    for r in results {
        match r {
            Ok((i, took, path)) => println!(
                "  agent{i}: verified in {:.2} s ({:.0} MiB/s) -> {}",
                took.as_secs_f64(),
                args.size_mib as f64 / took.as_secs_f64(),
                path.display()
            ),
            Err(e) => {
                failed = true;
                println!("  {e}");
            }
        }
    }
    let seed_up = seed
        .torrent(&meta.info_hash)
        .map(|t| t.uploaded())
        .unwrap_or(0);
    println!(
        "seed uploaded {:.2}x the package; the other agents traded the rest among themselves",
        seed_up as f64 / size as f64
    );
    println!("dashboard: {url}/");
    if !args.exit && !failed {
        println!("Ctrl-C to stop.");
        shutdown.cancelled().await;
    }
    stop(engines, shutdown).await;
    tracker_stop.cancel();
    let _ = tracker.task.await;
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn stop(engines: Vec<Arc<Engine>>, shutdown: CancellationToken) {
    shutdown.cancel();
    for e in engines {
        e.shutdown().await;
    }
}
