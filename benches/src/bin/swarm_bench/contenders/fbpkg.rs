//! fbpkg-rs: its tracker, one agent per host, `publish` on the seed, `get` on every leecher.
//!
//! A leecher's time is when its `get pkg:<sha256>` exits 0 having printed the cache path; the
//! file at that path is hashed afterwards.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};

use super::churn::{self, Victim};
use super::{AGENT_PORT, Ctx, Package, scaled};
use crate::measure::{
    Accounting, ContenderRun, Done, PackageFinish, Window, combine_ended, combine_verified,
    outcomes, verify_all,
};
use crate::procs::{self, Proc, Spec, Stdout};
use crate::topology::Endpoint;

/// An agent and where it keeps things.
pub(super) struct Agent {
    pub(super) host: Endpoint,
    pub(super) state: PathBuf,
    pub(super) cache: PathBuf,
    pub(super) proc: Proc,
}

pub(super) fn host_flags(ctx: &Ctx<'_>, state: &Path, cache: &Path) -> Vec<OsString> {
    vec![
        "--tracker".into(),
        ctx.tracker_url().into(),
        "--state-dir".into(),
        state.into(),
        "--cache-dir".into(),
        cache.into(),
    ]
}

pub(super) fn fbpkg(ctx: &Ctx<'_>, cmd: &str, rest: Vec<OsString>) -> Vec<OsString> {
    let mut argv = vec![ctx.fbpkg_bin.into(), cmd.into()];
    argv.extend(rest);
    argv
}

fn start_agent(ctx: &Ctx<'_>, host: &Endpoint) -> anyhow::Result<Agent> {
    start_agent_with(ctx, host, Vec::new())
}

/// An agent with `extra` flags after the usual ones (and before `--fbpkg-agent-arg`s).
pub(super) fn start_agent_with(
    ctx: &Ctx<'_>,
    host: &Endpoint,
    extra: Vec<OsString>,
) -> anyhow::Result<Agent> {
    let state = ctx.host_dir(host, "state")?;
    let cache = ctx.host_dir(host, "cache")?;
    let mut rest = vec!["--listen".into(), host.addr(AGENT_PORT).into()];
    rest.extend(host_flags(ctx, &state, &cache));
    rest.extend(extra);
    rest.extend(ctx.agent_args.iter().map(OsString::from));
    let label = format!("{}-agent", host.label);
    let mut spec = Spec::new(&label, Some(&host.ns), fbpkg(ctx, "agent", rest));
    spec.stderr = Some(ctx.log(&label));
    Ok(Agent {
        host: host.clone(),
        state,
        cache,
        proc: Proc::spawn(spec)?,
    })
}

/// The agent is ready once its control socket exists (bound right after its engine starts;
/// it may still be seeding its cache, which a leecher here does not have).
pub(super) fn wait_ready(
    ctx: &Ctx<'_>,
    agents: &mut [Agent],
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    for a in agents {
        let sock = a.state.join("agent.sock");
        while !sock.exists() {
            if let Some(s) = a.proc.poll() {
                bail!(
                    "agent {} exited ({s}); see {}",
                    a.host.label,
                    ctx.log(&format!("{}-agent", a.host.label)).display()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "agent {} not ready within {timeout:?}",
                a.host.label
            );
            procs::check_cancelled()?;
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// Stop agents together: SIGTERM to each, then one grace for all ([`procs::terminate_all`]).
pub(super) fn stop_agents<'a>(agents: impl IntoIterator<Item = &'a mut Agent>) {
    let mut all: Vec<&mut Proc> = agents.into_iter().map(|a| &mut a.proc).collect();
    procs::terminate_all(&mut all, Duration::from_secs(10));
}

/// The agent's `status --json`: one entry per package it holds. Asked by `by` (at least a
/// second given): the agents are asked in turn, and ones that hang must not take 15 s each.
fn status_all(ctx: &Ctx<'_>, a: &Agent, by: Instant) -> anyhow::Result<Value> {
    let mut rest = host_flags(ctx, &a.state, &a.cache);
    rest.push("--json".into());
    let spec = Spec::new("status", Some(&a.host.ns), fbpkg(ctx, "status", rest));
    let timeout = by
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(1));
    let out = procs::run_ok(spec, timeout)?;
    serde_json::from_str(&out).context("status --json")
}

fn publish(ctx: &Ctx<'_>, seed: &Agent, acct: &mut Accounting) -> anyhow::Result<Value> {
    publish_with(ctx, seed, acct, Vec::new())
}

/// `publish` of `ctx.pkg` on the seed with `extra` flags (`--tag`, `--publish-token`).
pub(super) fn publish_with(
    ctx: &Ctx<'_>,
    seed: &Agent,
    acct: &mut Accounting,
    extra: Vec<OsString>,
) -> anyhow::Result<Value> {
    let mut rest: Vec<OsString> = vec![
        ctx.pkg.name.clone().into(),
        ctx.pkg.path.clone().into(),
        "--json".into(),
    ];
    rest.extend(host_flags(ctx, &seed.state, &seed.cache));
    rest.extend(extra);
    let mut spec = Spec::new("publish", Some(&seed.host.ns), fbpkg(ctx, "publish", rest));
    spec.stdout = Stdout::Lines;
    spec.stderr = Some(ctx.log("publish"));
    let mut p = Proc::spawn(spec)?;
    let timeout = scaled(Duration::from_secs(60), ctx.pkg.size);
    let status = p.wait_until(Instant::now() + timeout)?;
    acct.record("publish", &seed.host.label, &mut p);
    let line = p.line(Instant::now() + Duration::from_secs(1))?;
    match status {
        Some(s) if s.success() => {}
        Some(s) => bail!("publish failed ({s}); see {}", ctx.log("publish").display()),
        None => bail!("publish took longer than {timeout:?}"),
    }
    let out: Value = serde_json::from_str(line.as_deref().unwrap_or_default())
        .context("publish --json output")?;
    ensure!(
        out["sha256"] == ctx.pkg.sha256.as_str() && out["info_hash"] == ctx.pkg.info_hash.as_str(),
        "publish made {out}, expected sha256 {} info_hash {}",
        ctx.pkg.sha256,
        ctx.pkg.info_hash
    );
    Ok(out)
}

/// A `get` of `ctx.pkg` on `a`'s host, started before the clock as an `exec-on-go` node: at
/// `go` it becomes `fbpkg-rs get`, as every other contender's leechers start at `go`.
/// Spawning through `ip netns exec` after the clock put the spawns in the measurement: 8.5 s
/// for B5's 96 gets on a busy 2-core machine.
fn start_get(ctx: &Ctx<'_>, a: &Agent) -> anyhow::Result<Proc> {
    let argv: Vec<String> = get_argv(ctx, a)
        .into_iter()
        .map(|a| {
            a.into_string()
                .map_err(|_| anyhow::anyhow!("non-UTF-8 path"))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut args = vec!["exec-on-go", "--"];
    args.extend(argv.iter().map(String::as_str));
    Proc::spawn(ctx.node(&format!("{}-get", a.host.label), &a.host, &args))
}

/// `fbpkg-rs get <pkg>:<sha256> --json` on `a`'s host.
fn get_argv(ctx: &Ctx<'_>, a: &Agent) -> Vec<OsString> {
    let mut rest: Vec<OsString> = vec![
        format!("{}:{}", ctx.pkg.name, ctx.pkg.sha256).into(),
        "--json".into(),
    ];
    rest.extend(host_flags(ctx, &a.state, &a.cache));
    fbpkg(ctx, "get", rest)
}

/// The `delta` scenario's setup: the seed publishes `ctx.pkg` (version N) and every leecher
/// fetches it, all at once, before the clock; returns how long the leechers took. Its
/// processes' CPU is not the run's.
fn fetch_held(ctx: &Ctx<'_>, agents: &mut [Agent]) -> anyhow::Result<f64> {
    let mut setup = Accounting::default();
    publish(ctx, &agents[0], &mut setup)?;
    ctx.wait_seed_listed(&ctx.hosts.seed.addr(AGENT_PORT), Duration::from_secs(120))?;
    let mut gets = Vec::new();
    for a in &agents[1..] {
        gets.push(start_get(ctx, a)?);
    }
    for g in &mut gets {
        g.wait_for_line("ready", Instant::now() + Duration::from_secs(30), |l| {
            l.contains("\"ready\"")
        })?;
    }
    let start = Instant::now();
    for g in &mut gets {
        g.send_line("go")?;
    }
    let deadline = start + ctx.deadline;
    for (g, a) in gets.iter_mut().zip(&agents[1..]) {
        match g.wait_until(deadline)? {
            Some(s) if s.success() => {}
            Some(s) => bail!(
                "{}'s get of version N exited {s}; see {}",
                a.host.label,
                ctx.log(&format!("{}-get", a.host.label)).display()
            ),
            None => {
                g.kill();
                bail!(
                    "{}'s get of version N took longer than {:?}",
                    a.host.label,
                    ctx.deadline
                )
            }
        }
    }
    Ok(start.elapsed().as_secs_f64())
}

/// A leecher in B4: its agent and its `get`.
struct Leecher<'a, 'c> {
    ctx: &'a Ctx<'c>,
    get: &'a mut Proc,
    agent: &'a mut Agent,
}

impl Victim for Leecher<'_, '_> {
    fn host(&self) -> &str {
        &self.agent.host.label
    }

    fn ended(&mut self) -> bool {
        self.get.poll().is_some()
    }

    fn bytes_have(&mut self) -> Option<u64> {
        bytes_have(&self.agent.state, &self.ctx.pkg.sha256)
    }

    fn kill(&mut self, acct: &mut Accounting) {
        self.agent.proc.kill();
        self.get.kill();
        acct.record("leecher", &self.agent.host.label, &mut self.agent.proc);
        acct.record("client", &self.agent.host.label, self.get);
    }

    /// Its agent, on the same state and cache directories: it resumes the partial download.
    fn restart(&mut self) -> anyhow::Result<()> {
        *self.agent = start_agent(self.ctx, &self.agent.host.clone())?;
        Ok(())
    }

    /// A new `get`, once the agent answers on its control socket.
    fn resume(&mut self) -> anyhow::Result<bool> {
        if status(&self.agent.state).is_err() {
            return Ok(false);
        }
        let label = self.get.label.clone();
        let mut spec = Spec::new(
            &label,
            Some(&self.agent.host.ns),
            get_argv(self.ctx, self.agent),
        );
        spec.stdout = Stdout::Lines;
        spec.stderr = Some(self.ctx.log(&label));
        *self.get = Proc::spawn(spec)?;
        Ok(true)
    }

    fn go(&mut self) -> anyhow::Result<()> {
        self.get.send_line("go")
    }
}

/// How long one control-socket exchange may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The agent's `status`, over its control socket.
fn status(state: &Path) -> anyhow::Result<Value> {
    let sock = state.join(fbpkg_peer::agent::control::SOCKET_NAME);
    let mut s = UnixStream::connect(&sock).with_context(|| format!("{}", sock.display()))?;
    s.set_read_timeout(Some(PROBE_TIMEOUT))?;
    s.set_write_timeout(Some(PROBE_TIMEOUT))?;
    s.write_all(b"{\"op\":\"status\"}\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    serde_json::from_str(&line).context("the agent's status")
}

/// Bytes of verified pieces the agent holds of package `sha256`, if it lists it. Pieces
/// received but not yet verified do not count: a restarted agent finds them on disk, so it may
/// download less than the package minus this.
fn bytes_have(state: &Path, sha256: &str) -> Option<u64> {
    status(state).ok()?["torrents"]
        .as_array()?
        .iter()
        .find(|t| t["sha256"] == sha256)?["bytes_have"]
        .as_u64()
}

/// Run fbpkg-rs.
pub fn run(ctx: &Ctx<'_>) -> anyhow::Result<ContenderRun> {
    let mut acct = Accounting::default();
    let mut notes = Vec::new();
    let mut setup_notes = BTreeMap::new();
    let mut tracker = ctx.start_tracker(false, &[])?;
    let mut agents = vec![start_agent(ctx, &ctx.hosts.seed)?];
    for h in &ctx.hosts.leechers {
        agents.push(start_agent(ctx, h)?);
    }
    // B5: the other packages' origins.
    ensure!(
        ctx.more.len() == ctx.hosts.origins.len(),
        "{} packages for {} origins",
        ctx.more.len(),
        ctx.hosts.origins.len()
    );
    let mut origins = Vec::new();
    for h in &ctx.hosts.origins {
        origins.push(start_agent(ctx, h)?);
    }
    wait_ready(ctx, &mut agents, Duration::from_secs(30))?;
    wait_ready(ctx, &mut origins, Duration::from_secs(30))?;
    if let Some(old) = ctx.hold {
        let secs = fetch_held(&ctx.with_pkg(old), &mut agents)?;
        setup_notes.insert("held_version_fetched_secs".into(), secs);
    }
    let published = publish(ctx, &agents[0], &mut acct)?;
    let served = ctx.tracker_get(
        &format!(
            "/api/v1/packages/{}/{}/metainfo",
            ctx.pkg.name, ctx.pkg.sha256
        ),
        Duration::from_secs(5),
    )?;
    let same_torrent = served == ctx.pkg.metainfo;
    if !same_torrent {
        notes.push("the tracker's metainfo differs from the one the bench computed".into());
    }
    let listed =
        ctx.wait_seed_listed(&ctx.hosts.seed.addr(AGENT_PORT), Duration::from_secs(120))?;
    setup_notes.insert("seed_listed_after_publish_secs".into(), listed);
    for (p, o) in ctx.more.iter().zip(&origins) {
        let c = ctx.with_pkg(p);
        publish(&c, o, &mut acct)?;
        c.wait_seed_listed(&o.host.addr(AGENT_PORT), Duration::from_secs(120))?;
    }
    let pkgs: Vec<&Package> = std::iter::once(ctx.pkg).chain(ctx.more).collect();
    let per_host = pkgs.len();

    // One `get` per host and package, host-major: gets[h * per_host + k].
    let mut gets = Vec::new();
    for a in &agents[1..] {
        for p in &pkgs {
            gets.push(start_get(&ctx.with_pkg(p), a)?);
        }
    }
    for g in &mut gets {
        g.wait_for_line("ready", Instant::now() + Duration::from_secs(30), |l| {
            l.contains("\"ready\"")
        })?;
    }
    let mut win = Window::open(ctx.topo, &ctx.hosts.seed.ns, ctx.sample_every)?;
    let deadline = win.t0 + ctx.deadline;
    // One `get` per leecher when there is churn (one package), so `gets` is in host order.
    let mut churn = churn::start(ctx, &mut gets, win.t0)?;
    let spawned_secs = win.secs(Instant::now());
    let mut next_rss = Instant::now();
    let ended = {
        let agents = &mut agents;
        let acct = &mut acct;
        let notes = &mut notes;
        win.wait_all(&mut gets, deadline, |p| {
            if Instant::now() >= next_rss {
                next_rss = Instant::now() + Duration::from_millis(200);
                for a in agents.iter_mut() {
                    a.proc.sample_memory();
                }
            }
            if let Some(c) = churn.as_mut()
                && let Some(k) = c.leecher(&p.label)
            {
                let mut leecher = Leecher {
                    ctx,
                    get: p,
                    agent: &mut agents[1 + k],
                };
                if !c.step_noting(k, &mut leecher, acct, notes) {
                    return None;
                }
            }
            p.poll().map(Done::Exited)
        })?
    };
    let closed = win.close()?;
    setup_notes.insert("last_go_sent_at_secs".into(), spawned_secs);

    // What the agents say they moved: of the scenario's first package in `per_agent`, and,
    // with several (B5), of each in `per_agent_packages`, in the packages' order.
    let mut per_agent = BTreeMap::new();
    let mut per_agent_packages = BTreeMap::new();
    let status_by = Instant::now() + Duration::from_secs(15);
    for a in &agents {
        let all = match status_all(ctx, a, status_by) {
            Ok(all) => all,
            Err(e) => {
                notes.push(format!("status of {}: {e:#}", a.host.label));
                continue;
            }
        };
        let of = |p: &Package| {
            all.as_array()
                .into_iter()
                .flatten()
                .find(|t| t["sha256"] == p.sha256.as_str())
                .cloned()
        };
        match of(ctx.pkg) {
            Some(s) => {
                per_agent.insert(a.host.label.clone(), s);
            }
            None => notes.push(format!("agent {} does not list the package", a.host.label)),
        }
        if per_host > 1 {
            let each: Vec<Value> = pkgs.iter().map(|p| of(p).unwrap_or(Value::Null)).collect();
            per_agent_packages.insert(a.host.label.clone(), each);
        }
    }
    let seed_payload = per_agent
        .get(&ctx.hosts.seed.label)
        .and_then(|s| s["uploaded"].as_u64());
    let sum = |field: &str| -> u64 {
        ctx.hosts
            .leechers
            .iter()
            .filter_map(|h| per_agent.get(&h.label)?[field].as_u64())
            .sum()
    };
    let restarted = churn.map(|c| {
        c.into_restarted(|_, host| per_agent.get(host).and_then(|s| s["downloaded"].as_u64()))
    });
    let payload = json!({
        "seed_uploaded": seed_payload,
        "leechers_uploaded": sum("uploaded"),
        "leechers_downloaded": sum("downloaded"),
        "per_agent": per_agent,
        "per_agent_packages": (per_host > 1).then_some(per_agent_packages),
    });

    // Stop everything; keep each process's CPU and peak RSS.
    for a in agents.iter_mut() {
        a.proc.sample_memory();
    }
    let mut paths = Vec::new();
    let get_hosts = agents[1..]
        .iter()
        .flat_map(|a| std::iter::repeat_n(a, per_host));
    for (g, a) in gets.iter_mut().zip(get_hosts) {
        if g.poll().is_none() {
            g.kill();
        }
        let mut path = None;
        while let Some(line) = g.line(Instant::now() + Duration::from_secs(2))? {
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && let Some(p) = v["path"].as_str()
            {
                path = Some(PathBuf::from(p));
            }
        }
        acct.record("client", &a.host.label, g);
        paths.push(path);
    }
    stop_agents(agents.iter_mut().chain(origins.iter_mut()));
    for (i, a) in agents.iter_mut().enumerate() {
        let role = if i == 0 { "seed" } else { "leecher" };
        acct.record(role, &a.host.label, &mut a.proc);
    }
    for o in origins.iter_mut() {
        acct.record("origin", &o.host.label, &mut o.proc);
    }
    tracker.terminate(Duration::from_secs(10));
    acct.record("tracker", &ctx.hosts.tracker.label, &mut tracker);

    let mut verified = vec![Ok(()); paths.len()];
    for (k, p) in pkgs.iter().enumerate() {
        let files: Vec<_> = paths.iter().skip(k).step_by(per_host).cloned().collect();
        for (h, r) in verify_all(&files, p).into_iter().enumerate() {
            verified[h * per_host + k] = r;
        }
    }
    let labels: Vec<String> = ctx.hosts.leechers.iter().map(|h| h.label.clone()).collect();
    let get_ok =
        |d: &Done| matches!(d, Done::Exited(s) if s.success()) || matches!(d, Done::Line(_));
    let packages = (per_host > 1).then(|| {
        let times = ended
            .chunks(per_host)
            .zip(verified.chunks(per_host))
            .map(|(e, v)| {
                e.iter()
                    .zip(v)
                    .map(|(e, v)| match e {
                        Some((t, d)) if get_ok(d) && v.is_ok() => Some(*t),
                        _ => None,
                    })
                    .collect()
            })
            .collect();
        let names: Vec<String> = pkgs.iter().map(|p| p.name.clone()).collect();
        PackageFinish::new(&labels, &names, times)
    });
    let ended = combine_ended(&ended, per_host, get_ok);
    let verified = combine_verified(&verified, per_host);
    let leechers = outcomes(&labels, &ended, &verified, |d| match d {
        Done::Exited(s) if s.success() => Ok(()),
        Done::Exited(s) => Err(format!("get exited {s}")),
        Done::Line(_) => Ok(()),
    });
    Ok(ContenderRun {
        setup: json!({
            "binary": ctx.fbpkg_bin,
            "agent_flags": "--listen <host>:6881 --tracker ... --state-dir ... --cache-dir ... (defaults otherwise)",
            "published": published,
            "same_torrent_as_tracker": same_torrent,
        }),
        payload,
        setup_notes,
        notes,
        packages,
        restarted,
        ..ctx.report("fbpkg-rs", closed, acct, leechers, seed_payload)
    })
}
