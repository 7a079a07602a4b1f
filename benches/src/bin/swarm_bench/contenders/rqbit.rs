//! librqbit 9.1.0: one `rqbit-node` per host (see `nodes/rqbit_node.rs`), the same metainfo
//! as fbpkg-rs, the fbpkg-rs tracker (with `--allow-unregistered`) as the tracker.
//!
//! Leecher sessions are started and listening before the start instant; `go` makes them add
//! the torrent. A leecher's time is when it reports every piece verified (librqbit checks
//! SHA-1 per piece); its file is hashed afterwards.
//!
//! Many packages (B5): each origin seeds its own package, and every leecher's one session is
//! given all the torrents at `go`; it reports each as it completes (`done`), and is done when
//! it has them all.
//!
//! Churn (B4): a leecher picked to die is killed once its file holds half the package
//! (librqbit sizes the file sparse and writes what it receives) and a new node starts on the
//! same folder; told to go, it checks what is on disk, keeps the pieces that pass and fetches
//! the rest. What it fetched after the restart is its `complete` line's `fetched_bytes`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::{Value, json};

use super::churn;
use super::{Ctx, Package, RQBIT_PORT, event, scaled};
use crate::measure::{Accounting, ContenderRun, Done, Window, outcomes};
use crate::procs::Proc;
use crate::topology::Endpoint;

fn torrent_path(ctx: &Ctx<'_>, pkg: &Package) -> std::path::PathBuf {
    ctx.dir.join(format!("{}.torrent", pkg.name))
}

/// A node on `host` with `pkgs`' torrents; a seed gets their files copied into its folder.
fn start_node(
    ctx: &Ctx<'_>,
    host: &Endpoint,
    role: &str,
    pkgs: &[&Package],
) -> anyhow::Result<Proc> {
    let dir = ctx.host_dir(host, "rqbit")?;
    let listen = host.addr(RQBIT_PORT);
    let torrents = pkgs
        .iter()
        .map(|p| {
            torrent_path(ctx, p)
                .to_str()
                .map(str::to_owned)
                .context("non-UTF-8 path")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut args = vec![
        "rqbit-node",
        "--role",
        role,
        "--dir",
        dir.to_str().context("non-UTF-8 path")?,
        "--listen",
        listen.as_str(),
    ];
    for t in &torrents {
        args.extend(["--torrent", t.as_str()]);
    }
    if ctx.rqbit_linger && role == "leech" {
        args.push("--linger");
    }
    if role == "seed" {
        for p in pkgs {
            std::fs::copy(&p.path, dir.join(&p.file_name))
                .context("copying the package into the seed's folder")?;
        }
    }
    Proc::spawn(ctx.node(&format!("{}-rqbit", host.label), host, &args))
}

/// The `exit` event's stats of a node that was told to stop.
fn stop(p: &mut Proc) -> Option<Value> {
    p.close_stdin();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut exit = None;
    while let Ok(Some(line)) = p.line(deadline) {
        if let Some(v) = event(&line, "exit") {
            exit = Some(v);
        }
    }
    if p.wait_until(deadline).ok().flatten().is_none() {
        p.kill();
    }
    exit
}

/// Run librqbit.
pub fn run(ctx: &Ctx<'_>) -> anyhow::Result<ContenderRun> {
    let mut acct = Accounting::default();
    let mut setup_notes = BTreeMap::new();
    let mut notes = Vec::new();
    let pkgs = ctx.packages()?;
    let per_host = pkgs.len();
    for p in &pkgs {
        std::fs::write(torrent_path(ctx, p), &p.metainfo)?;
    }
    let mut tracker = ctx.start_tracker(true, &[])?;
    let mut seed = start_node(ctx, &ctx.hosts.seed, "seed", &[ctx.pkg])?;
    let mut origins = Vec::new();
    for (h, p) in ctx.hosts.origins.iter().zip(ctx.more) {
        origins.push(start_node(ctx, h, "seed", &[p])?);
    }
    let t = Instant::now();
    for s in std::iter::once(&mut seed).chain(origins.iter_mut()) {
        s.wait_for_line(
            "its check of the package",
            Instant::now() + scaled(Duration::from_secs(60), ctx.pkg.size),
            |l| event(l, "ready").is_some(),
        )?;
    }
    setup_notes.insert("seed_check_secs".into(), t.elapsed().as_secs_f64());
    let mut leechers = Vec::new();
    for h in &ctx.hosts.leechers {
        leechers.push(start_node(ctx, h, "leech", &pkgs)?);
    }
    for p in &mut leechers {
        p.wait_for_line("ready", Instant::now() + Duration::from_secs(30), |l| {
            event(l, "ready").is_some()
        })?;
    }
    let listed =
        ctx.wait_seed_listed(&ctx.hosts.seed.addr(RQBIT_PORT), Duration::from_secs(120))?;
    for (h, p) in ctx.hosts.origins.iter().zip(ctx.more) {
        ctx.with_pkg(p)
            .wait_seed_listed(&h.addr(RQBIT_PORT), Duration::from_secs(120))?;
    }
    setup_notes.insert("seed_listed_after_ready_secs".into(), listed);

    // A killed leecher's new node on the same folder checks the file when it adds the torrent.
    let restart = |h: &Endpoint| start_node(ctx, h, "leech", &[ctx.pkg]);
    let victims = churn::Clients::new(ctx, "rqbit", &restart, churn::ready_then_go)?;
    let mut win = Window::open(ctx.topo, &ctx.hosts.seed.ns, ctx.sample_every)?;
    let deadline = win.t0 + ctx.deadline;
    let mut churn = churn::start(ctx, &mut leechers, win.t0)?;
    let (ended, finished) = win.wait_all_packages(&mut leechers, deadline, per_host, |p| {
        victims.step(churn.as_mut(), p, &mut acct, &mut notes)
    })?;
    let closed = win.close()?;
    // Every leecher gives up at once, so that each one's exit stats say what it held when the
    // crowd's wait ended, not after the stops before its own.
    for p in &mut leechers {
        p.close_stdin();
    }

    let seed_exit = stop(&mut seed);
    acct.record("seed", &ctx.hosts.seed.label, &mut seed);
    acct.set_reported_rss(seed_exit.as_ref());
    for (p, h) in origins.iter_mut().zip(&ctx.hosts.origins) {
        let exit = stop(p);
        acct.record("origin", &h.label, p);
        acct.set_reported_rss(exit.as_ref());
    }
    let seed_payload = seed_exit
        .as_ref()
        .and_then(|v| v["stats"]["uploaded_bytes"].as_u64());
    let mut leecher_exits = BTreeMap::new();
    for (p, h) in leechers.iter_mut().zip(&ctx.hosts.leechers) {
        let exit = stop(p);
        acct.record("leecher", &h.label, p);
        acct.set_reported_rss(exit.as_ref());
        if let Some(v) = exit {
            leecher_exits.insert(h.label.clone(), v);
        }
    }
    tracker.terminate(Duration::from_secs(10));
    acct.record("tracker", &ctx.hosts.tracker.label, &mut tracker);
    let leechers_uploaded: u64 = leecher_exits
        .values()
        .filter_map(|v| v["stats"]["uploaded_bytes"].as_u64())
        .sum();
    let completes: Vec<Option<Value>> = ended
        .iter()
        .map(|e| match e {
            Some((_, Done::Line(l))) => event(l, "complete"),
            _ => None,
        })
        .collect();
    if completes.iter().any(Option::is_none) {
        notes.push("some leechers never reported completion".into());
    }

    // What each restarted node fetched: its `complete` line's count (it started from zero).
    let restarted = churn.map(|c| {
        c.into_restarted(|k, _| completes[k].as_ref()?["stats"]["fetched_bytes"].as_u64())
    });
    let pids: Vec<u32> = leechers.iter().map(|p| p.pid).collect();
    let (labels, packages, verified) = ctx.verify_leechers("rqbit", &pkgs, &pids, &finished);
    let outcomes = outcomes(&labels, &ended, &verified, |d| match d {
        Done::Line(_) => Ok(()),
        Done::Exited(s) => Err(format!("exited {s} without completing")),
    });
    Ok(ContenderRun {
        setup: json!({
            "version": "9.1.0",
            "session": "SessionOptions::default() except dht: None, disable_local_service_discovery, \
                        persistence: None, fastresume: false, ipv4_only, TCP only on the host address \
                        with announce_port, no UPnP",
            "leechers_exit_on_completion": !ctx.rqbit_linger,
        }),
        payload: json!({
            "seed_uploaded": seed_payload,
            "leechers_uploaded": leechers_uploaded,
            "completions": completes,
            // Each leecher's last word: what it fetched from peers, and what it holds verified.
            "leechers": leecher_exits
                .iter()
                .map(|(h, v)| (h.clone(), v["stats"].clone()))
                .collect::<BTreeMap<_, _>>(),
        }),
        setup_notes,
        notes,
        packages,
        restarted,
        ..ctx.report("librqbit", closed, acct, outcomes, seed_payload)
    })
}
