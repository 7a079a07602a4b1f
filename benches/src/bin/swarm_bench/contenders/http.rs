//! The naive fan-out: the seed serves the file over HTTP and every leecher fetches all of it.
//!
//! Clients are started and waiting before the start instant; `go` makes them connect. A
//! leecher's time is when its client has the whole body and its SHA-256 matched.
//!
//! Many packages (B5): each origin serves its own package the same way, and every leecher's
//! client fetches all of them at once, a connection each; it is done when it has them all.
//!
//! Churn (B4): a client picked to die is killed once its file holds half the package, and a
//! new one on the same file asks for the rest (`Range: bytes=N-`), hashing what it kept
//! first. What it fetched after the restart is its `complete` line's `bytes`.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::json;

use super::{Ctx, HTTP_PORT, Package, churn, event};
use crate::measure::{Accounting, ContenderRun, Done, Window, outcomes};
use crate::procs::Proc;
use crate::topology::Endpoint;

/// A server on `host` for `pkg`, ready; and the URL it answers on.
fn start_server(ctx: &Ctx<'_>, host: &Endpoint, pkg: &Package) -> anyhow::Result<(Proc, String)> {
    let listen = host.addr(HTTP_PORT);
    let file = pkg.path.to_str().context("non-UTF-8 path")?;
    let mut server = Proc::spawn(ctx.node(
        &format!("{}-http", host.label),
        host,
        &["http-serve", "--listen", &listen, "--file", file],
    ))?;
    server.wait_for_line("ready", Instant::now() + Duration::from_secs(20), |l| {
        event(l, "ready").is_some()
    })?;
    Ok((server, format!("http://{listen}/{}", pkg.file_name)))
}

/// A host's client for every package, started and waiting for `go`; with `resume`, it keeps
/// what its files hold and asks for the rest.
fn start_client(
    ctx: &Ctx<'_>,
    host: &Endpoint,
    pkgs: &[&Package],
    urls: &[String],
    resume: bool,
) -> anyhow::Result<Proc> {
    let dir = ctx.host_dir(host, "http")?;
    let mut args = vec!["http-get".to_owned()];
    for (p, url) in pkgs.iter().zip(urls) {
        let out = dir.join(&p.file_name);
        args.extend([
            "--url".to_owned(),
            url.clone(),
            "--out".to_owned(),
            out.to_str().context("non-UTF-8 path")?.to_owned(),
            "--sha256".to_owned(),
            p.sha256.clone(),
        ]);
    }
    if resume {
        args.push("--resume".to_owned());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Proc::spawn(ctx.node(&format!("{}-http", host.label), host, &args))
}

/// Close a server's stdin and read the bytes it says it served.
fn stop_server(server: &mut Proc) -> anyhow::Result<Option<u64>> {
    server.close_stdin();
    let mut served = None;
    let stop_by = Instant::now() + Duration::from_secs(10);
    while let Ok(Some(line)) = server.line(stop_by) {
        if let Some(v) = event(&line, "exit") {
            served = v["served_bytes"].as_u64();
        }
    }
    if server.wait_until(stop_by)?.is_none() {
        server.kill();
    }
    Ok(served)
}

/// Run the HTTP fan-out.
pub fn run(ctx: &Ctx<'_>) -> anyhow::Result<ContenderRun> {
    let mut acct = Accounting::default();
    let seed_host = &ctx.hosts.seed;
    let pkgs = ctx.packages()?;
    let per_host = pkgs.len();
    let (mut server, url) = start_server(ctx, seed_host, ctx.pkg)?;
    let mut urls = vec![url];
    let mut origins = Vec::new();
    for (h, p) in ctx.hosts.origins.iter().zip(ctx.more) {
        let (o, url) = start_server(ctx, h, p)?;
        origins.push(o);
        urls.push(url);
    }
    let mut clients = Vec::new();
    for h in &ctx.hosts.leechers {
        clients.push(start_client(ctx, h, &pkgs, &urls, false)?);
    }
    for c in &mut clients {
        c.wait_for_line("ready", Instant::now() + Duration::from_secs(20), |l| {
            event(l, "ready").is_some()
        })?;
    }

    // A killed client's successor asks for what its file lacks.
    let restart = |h: &Endpoint| start_client(ctx, h, &pkgs, &urls, true);
    let victims = churn::Clients::new(ctx, "http", &restart, churn::ready_then_go)?;
    let mut notes = Vec::new();
    let mut win = Window::open(ctx.topo, &seed_host.ns, ctx.sample_every)?;
    let deadline = win.t0 + ctx.deadline;
    let mut churn = churn::start(ctx, &mut clients, win.t0)?;
    let (ended, finished) = win.wait_all_packages(&mut clients, deadline, per_host, |p| {
        victims.step(churn.as_mut(), p, &mut acct, &mut notes)
    })?;
    let closed = win.close()?;

    let served = stop_server(&mut server)?;
    acct.record("seed", &seed_host.label, &mut server);
    for (o, h) in origins.iter_mut().zip(&ctx.hosts.origins) {
        stop_server(o)?;
        acct.record("origin", &h.label, o);
    }
    for (c, h) in clients.iter_mut().zip(&ctx.hosts.leechers) {
        if c.wait_until(Instant::now() + Duration::from_secs(5))?
            .is_none()
        {
            c.kill();
        }
        acct.record("leecher", &h.label, c);
    }

    // What each restarted client fetched: its `complete` line's body bytes.
    let restarted = churn.map(|c| {
        c.into_restarted(|k, _| match &ended[k] {
            Some((_, Done::Line(l))) => event(l, "complete")?["bytes"].as_u64(),
            _ => None,
        })
    });
    let pids: Vec<u32> = clients.iter().map(|p| p.pid).collect();
    let (labels, packages, verified) = ctx.verify_leechers("http", &pkgs, &pids, &finished);
    let outcomes = outcomes(&labels, &ended, &verified, |d| match d {
        Done::Line(l) if event(l, "complete").is_some_and(|v| v["sha256_ok"] == true) => Ok(()),
        Done::Line(_) => Err("the client's SHA-256 did not match".into()),
        Done::Exited(s) => Err(format!("client exited {s} without completing")),
    });
    Ok(ContenderRun {
        setup: json!({
            "server": "swarm_bench http-serve: a thread per connection, sendfile(2) via io::copy",
            "client": "swarm_bench http-get: one GET per package (all at once), SHA-256 while writing",
        }),
        payload: json!({"served_bytes": served}),
        notes,
        packages,
        restarted,
        ..ctx.report("http", closed, acct, outcomes, served)
    })
}
