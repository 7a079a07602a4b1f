//! B4 for fbpkg-rs: hosts die and come back during the push, and others join late.
//!
//! While the crowd runs, each leecher picked to die is asked for its progress over its agent's
//! control socket (from this process, no spawn: the socket is a file the namespaces share);
//! at half the package its agent and its `get` get SIGKILL. After `restart_after` its agent
//! starts again on the same state and cache directories (it resumes the partial download), and
//! once it answers, a new `get` asks for the package. The late joiners' `get`s are told to go
//! at `join_after`. Every leecher's time still counts from the common start.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use fbpkg_benches::swarm::report::Restarted;
use fbpkg_benches::swarm::scenario::Scenario;
use serde_json::Value;

use super::Ctx;
use super::fbpkg::{Agent, get_argv, start_agent};
use crate::measure::Accounting;
use crate::procs::{Proc, Spec, Stdout};

/// How often a leecher picked to die is asked for its progress.
const PROBE_EVERY: Duration = Duration::from_millis(100);
/// How long one control-socket exchange may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Which leechers die and which join late, from the scenario.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Leechers (0-based, host order) killed at half their progress and restarted.
    pub killed: Vec<usize>,
    /// Leechers (0-based) whose `get` starts late.
    pub joiners: Vec<usize>,
    /// From a kill to the restart.
    pub restart_after: Duration,
    /// From the common start to the joiners' start: T_KR / 2.
    pub join_after: Duration,
}

impl Plan {
    /// The plan of `s`, or `None` when it has no churn.
    pub fn new(s: &Scenario, t_kr_secs: f64) -> Option<Self> {
        let c = s.churn?;
        let pick = |f: fn(&Scenario, usize) -> bool| -> Vec<usize> {
            (1..=s.leechers)
                .filter(|&i| f(s, i))
                .map(|i| i - 1)
                .collect()
        };
        Some(Self {
            killed: pick(Scenario::is_killed),
            joiners: pick(Scenario::is_joiner),
            restart_after: Duration::from_secs_f64(c.restart_after_secs),
            join_after: Duration::from_secs_f64(t_kr_secs / 2.0),
        })
    }

    /// Whether leecher `k` (0-based) starts late.
    pub fn joins_late(&self, k: usize) -> bool {
        self.joiners.contains(&k)
    }
}

/// Where one leecher is in the plan.
#[derive(Debug)]
enum State {
    /// Nothing planned, or done with.
    Steady,
    /// To be killed at half its progress; asked again at `next_probe`.
    Watching { next_probe: Instant },
    /// Killed; its agent starts again at `restart_at`.
    Down { restart_at: Instant, report: usize },
    /// Its agent was started again; its `get` goes once the agent answers.
    Restarting { report: usize },
    /// A late joiner not yet told to go.
    Waiting,
}

/// The plan carried out, one leecher at a time, from the crowd's wait loop.
#[derive(Debug)]
pub struct Churner<'p> {
    plan: &'p Plan,
    t0: Instant,
    states: Vec<State>,
    /// The killed hosts, in the order they died.
    pub restarted: Vec<Restarted>,
}

impl<'p> Churner<'p> {
    /// Before the start: `n` leechers, the clock starting at `t0`.
    pub fn new(plan: &'p Plan, n: usize, t0: Instant) -> Self {
        let states = (0..n)
            .map(|k| {
                if plan.killed.contains(&k) {
                    State::Watching { next_probe: t0 }
                } else if plan.joins_late(k) {
                    State::Waiting
                } else {
                    State::Steady
                }
            })
            .collect();
        Self {
            plan,
            t0,
            states,
            restarted: Vec::new(),
        }
    }

    /// One step for leecher `k`, whose `get` is `get` and agent `agent`. Returns whether the
    /// `get`'s exit, if it exited, is the leecher's end (not while it is down or restarting).
    pub(super) fn step(
        &mut self,
        ctx: &Ctx<'_>,
        k: usize,
        get: &mut Proc,
        agent: &mut Agent,
        acct: &mut Accounting,
    ) -> anyhow::Result<bool> {
        let now = Instant::now();
        let secs = |t: Instant| t.duration_since(self.t0).as_secs_f64();
        match self.states[k] {
            State::Steady => Ok(true),
            State::Waiting => {
                if now >= self.t0 + self.plan.join_after {
                    get.send_line("go")?;
                    self.states[k] = State::Steady;
                }
                Ok(true)
            }
            State::Watching { next_probe } => {
                if now < next_probe || get.poll().is_some() {
                    return Ok(true);
                }
                let had = bytes_have(&agent.state, &ctx.pkg.sha256).unwrap_or(0);
                if had < ctx.pkg.size / 2 {
                    self.states[k] = State::Watching {
                        next_probe: now + PROBE_EVERY,
                    };
                    return Ok(true);
                }
                agent.proc.kill();
                get.kill();
                acct.record("leecher", &agent.host.label, &mut agent.proc);
                acct.record("client", &agent.host.label, get);
                self.restarted.push(Restarted {
                    host: agent.host.label.clone(),
                    killed_at_secs: secs(now),
                    had_bytes: had,
                    restarted_at_secs: None,
                    downloaded_after_bytes: None,
                });
                self.states[k] = State::Down {
                    restart_at: now + self.plan.restart_after,
                    report: self.restarted.len() - 1,
                };
                Ok(false)
            }
            State::Down { restart_at, report } => {
                if now >= restart_at {
                    *agent = start_agent(ctx, &agent.host.clone())?;
                    self.states[k] = State::Restarting { report };
                }
                Ok(false)
            }
            State::Restarting { report } => {
                if status(&agent.state).is_err() {
                    return Ok(false);
                }
                let label = get.label.clone();
                let mut spec = Spec::new(&label, Some(&agent.host.ns), get_argv(ctx, agent));
                spec.stdout = Stdout::Lines;
                spec.stderr = Some(ctx.log(&label));
                *get = Proc::spawn(spec)?;
                self.restarted[report].restarted_at_secs = Some(secs(now));
                self.states[k] = State::Steady;
                Ok(false)
            }
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn b4_plan_names_hosts_by_index_and_joins_at_half_the_bound() {
        let s = Scenario::preset("b4").unwrap();
        let plan = Plan::new(&s, 13.4).unwrap();
        assert_eq!(plan.killed, vec![3, 7, 11, 15, 19, 23, 27, 31]);
        assert_eq!(plan.joiners, vec![32, 33, 34, 35]);
        assert!(plan.joins_late(35) && !plan.joins_late(31));
        assert_eq!(plan.restart_after, Duration::from_secs(5));
        assert_eq!(plan.join_after, Duration::from_secs_f64(6.7));
        assert!(Plan::new(&Scenario::preset("b1").unwrap(), 26.8).is_none());
    }
}
