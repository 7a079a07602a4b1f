//! The naive fan-out: the seed serves the file over HTTP and every leecher fetches all of it.
//!
//! Clients are started and waiting before the start instant; `go` makes them connect. A
//! leecher's time is when its client has the whole body and its SHA-256 matched.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::{Value, json};

use super::{Ctx, HTTP_PORT};
use crate::measure::{Accounting, ContenderRun, Done, Window, outcomes, verify_all};
use crate::procs::Proc;

fn event(line: &str, name: &str) -> Option<Value> {
    let v: Value = serde_json::from_str(line).ok()?;
    (v["event"] == name).then_some(v)
}

/// Run the HTTP fan-out.
pub fn run(ctx: &Ctx<'_>) -> anyhow::Result<ContenderRun> {
    let mut acct = Accounting::default();
    let seed_host = &ctx.hosts.seed;
    let listen = seed_host.addr(HTTP_PORT);
    let file = ctx.pkg.path.to_str().context("non-UTF-8 path")?;
    let mut server = Proc::spawn(ctx.node(
        "seed-http",
        seed_host,
        &["http-serve", "--listen", &listen, "--file", file],
    ))?;
    server.wait_for_line("ready", Instant::now() + Duration::from_secs(20), |l| {
        event(l, "ready").is_some()
    })?;
    let url = format!("http://{listen}/{}", ctx.pkg.file_name);
    let mut clients = Vec::new();
    let mut files = Vec::new();
    for h in &ctx.hosts.leechers {
        let out = ctx.host_dir(h, "http")?.join(&ctx.pkg.file_name);
        let out_s = out.to_str().context("non-UTF-8 path")?.to_owned();
        files.push(Some(out));
        clients.push(Proc::spawn(ctx.node(
            &format!("{}-http", h.label),
            h,
            &[
                "http-get",
                "--url",
                &url,
                "--out",
                &out_s,
                "--sha256",
                &ctx.pkg.sha256,
            ],
        ))?);
    }
    for c in &mut clients {
        c.wait_for_line("ready", Instant::now() + Duration::from_secs(20), |l| {
            event(l, "ready").is_some()
        })?;
    }

    let mut win = Window::open(ctx.topo, &seed_host.ns, ctx.sample_every)?;
    let deadline = win.t0 + ctx.deadline;
    for c in &mut clients {
        c.send_line("go")?;
    }
    let ended = win.wait_all(&mut clients, deadline, |p| {
        while let Some(line) = p.try_line() {
            if event(&line, "complete").is_some() {
                return Some(Done::Line(line));
            }
        }
        p.poll().map(Done::Exited)
    })?;
    let closed = win.close()?;

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
    acct.record("seed", &seed_host.label, &mut server);
    for (c, h) in clients.iter_mut().zip(&ctx.hosts.leechers) {
        if c.wait_until(Instant::now() + Duration::from_secs(5))?
            .is_none()
        {
            c.kill();
        }
        acct.record("client", &h.label, c);
    }

    let verified = verify_all(&files, ctx.pkg);
    let labels: Vec<String> = ctx.hosts.leechers.iter().map(|h| h.label.clone()).collect();
    let outcomes = outcomes(&labels, &ended, &verified, |d| match d {
        Done::Line(l) if event(l, "complete").is_some_and(|v| v["sha256_ok"] == true) => Ok(()),
        Done::Line(_) => Err("the client's SHA-256 did not match".into()),
        Done::Exited(s) => Err(format!("client exited {s} without completing")),
    });
    Ok(ContenderRun {
        setup: json!({
            "server": "swarm_bench http-serve: a thread per connection, sendfile(2) via io::copy",
            "client": "swarm_bench http-get: one GET, SHA-256 while writing",
        }),
        payload: json!({"served_bytes": served}),
        ..ctx.report("http", closed, acct, outcomes, served)
    })
}
