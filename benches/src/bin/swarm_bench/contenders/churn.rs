//! B4: hosts die and come back during the push, and others join late.
//!
//! While the crowd runs, each leecher picked to die is asked how much of the package it holds
//! ([`Victim::bytes_have`]); at half the package everything of it on the host gets SIGKILL.
//! After `restart_after` it starts again on the same disk and, once it is ready, asks for the
//! package again. The late joiners are told to go at `join_after`. Every leecher's time still
//! counts from the common start. What killing, restarting and resuming mean is each
//! contender's: fbpkg-rs's agent and `get` (`fbpkg.rs`), aria2's `aria2c` (`aria2.rs`),
//! librqbit's node (`rqbit.rs`), the fan-out's client (`http.rs`).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::ensure;
use fbpkg_benches::swarm::report::Restarted;
use fbpkg_benches::swarm::scenario::Scenario;

use super::Ctx;
use crate::measure::Accounting;
use crate::procs::Proc;
use crate::topology::Endpoint;

/// How often a leecher picked to die is asked for its progress.
const PROBE_EVERY: Duration = Duration::from_millis(100);

/// One contender's leecher, as the plan handles it.
pub(super) trait Victim {
    /// Its host's label.
    fn host(&self) -> &str;
    /// Whether its download has ended (it is not killed then).
    fn ended(&mut self) -> bool;
    /// Bytes of the package it holds, when it can say.
    fn bytes_have(&mut self) -> Option<u64>;
    /// SIGKILL every process of it, their CPU kept in `acct`.
    fn kill(&mut self, acct: &mut Accounting);
    /// Start it again on the same disk.
    fn restart(&mut self) -> anyhow::Result<()>;
    /// Once restarted: ask for the package again if it is ready to (`Ok(false)`: not yet).
    fn resume(&mut self) -> anyhow::Result<bool>;
    /// Start a late joiner's download.
    fn go(&mut self) -> anyhow::Result<()>;
}

/// A stock client's leecher: one process on its host that writes the package into one file
/// without preallocating it (aria2, librqbit, the fan-out's client), so the file's allocated
/// bytes are what it holds.
struct Client<'a> {
    proc: &'a mut Proc,
    host: &'a Endpoint,
    /// The package's file on the host.
    file: &'a Path,
    /// Starts the client again on the same folder.
    restart: &'a dyn Fn(&Endpoint) -> anyhow::Result<Proc>,
    /// Once restarted: whether it is ready, and then told to go.
    resume: fn(&mut Proc) -> anyhow::Result<bool>,
}

impl Victim for Client<'_> {
    fn host(&self) -> &str {
        &self.host.label
    }

    fn ended(&mut self) -> bool {
        self.proc.poll().is_some()
    }

    /// The bytes allocated to its file (tmpfs allocates what is written), at most its length.
    fn bytes_have(&mut self) -> Option<u64> {
        let meta = std::fs::metadata(self.file).ok()?;
        Some((meta.blocks() * 512).min(meta.len()))
    }

    fn kill(&mut self, acct: &mut Accounting) {
        self.proc.kill();
        acct.record("leecher", &self.host.label, self.proc);
    }

    fn restart(&mut self) -> anyhow::Result<()> {
        *self.proc = (self.restart)(self.host)?;
        Ok(())
    }

    fn resume(&mut self) -> anyhow::Result<bool> {
        (self.resume)(self.proc)
    }

    fn go(&mut self) -> anyhow::Result<()> {
        self.proc.send_line("go")
    }
}

/// A restarted client's turn to go, for one that says `ready` when it is (`rqbit-node`,
/// `http-get`): `go` once it has.
pub(super) fn ready_then_go(p: &mut Proc) -> anyhow::Result<bool> {
    while let Some(line) = p.try_line() {
        if super::event(&line, "ready").is_some() {
            p.send_line("go")?;
            return Ok(true);
        }
    }
    Ok(false)
}

/// A contender's stock clients as the plan handles them, one per leecher in host order.
pub(super) struct Clients<'a> {
    hosts: &'a [Endpoint],
    /// Each one's package file.
    files: Vec<PathBuf>,
    restart: &'a dyn Fn(&Endpoint) -> anyhow::Result<Proc>,
    resume: fn(&mut Proc) -> anyhow::Result<bool>,
}

impl<'a> Clients<'a> {
    /// Clients that keep the package in the folder `sub` of each host's; a killed one is
    /// started again with `restart` and, once `resume` says it is ready, told to go.
    pub fn new(
        ctx: &'a Ctx<'_>,
        sub: &str,
        restart: &'a dyn Fn(&Endpoint) -> anyhow::Result<Proc>,
        resume: fn(&mut Proc) -> anyhow::Result<bool>,
    ) -> anyhow::Result<Self> {
        let files = ctx
            .hosts
            .leechers
            .iter()
            .map(|h| Ok(ctx.host_dir(h, sub)?.join(&ctx.pkg.file_name)))
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            hosts: &ctx.hosts.leechers,
            files,
            restart,
            resume,
        })
    }

    /// The plan's step (none without churn) for the process `p` of the crowd's wait loop, an
    /// error noted in `notes`. Returns whether `p` is to be read this turn (not while its host
    /// is down or restarting).
    pub fn step(
        &self,
        churn: Option<&mut Churner<'_>>,
        p: &mut Proc,
        acct: &mut Accounting,
        notes: &mut Vec<String>,
    ) -> bool {
        let Some(c) = churn else {
            return true;
        };
        let Some(k) = c.leecher(&p.label) else {
            return true;
        };
        let mut leecher = Client {
            proc: p,
            host: &self.hosts[k],
            file: &self.files[k],
            restart: self.restart,
            resume: self.resume,
        };
        c.step_noting(k, &mut leecher, acct, notes)
    }
}

/// Which leechers die and which join late, from the scenario.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Leechers (0-based, host order) killed at half their progress and restarted.
    pub killed: Vec<usize>,
    /// Leechers (0-based) whose download starts late.
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
    /// Killed; it starts again at `restart_at`.
    Down { restart_at: Instant, report: usize },
    /// Started again; it asks for the package once it is ready to.
    Restarting { report: usize },
    /// A late joiner not yet told to go.
    Waiting,
}

/// The plan carried out, one leecher at a time, from the crowd's wait loop.
#[derive(Debug)]
pub struct Churner<'p> {
    plan: &'p Plan,
    t0: Instant,
    /// Half the package: a leecher picked to die is killed once it holds this much.
    half: u64,
    states: Vec<State>,
    /// Each leecher's process label, to its index.
    index: BTreeMap<String, usize>,
    /// The killed hosts, in the order they died.
    pub restarted: Vec<Restarted>,
    /// Which leecher each of `restarted` is.
    killed: Vec<usize>,
}

/// At the start instant `t0`: tell every leecher but the plan's late joiners to go, and make
/// the plan's churner (none when the scenario has no churn). `leechers` are the processes the
/// crowd's wait loop watches, one per leecher, in host order.
pub(super) fn start<'p>(
    ctx: &Ctx<'p>,
    leechers: &mut [Proc],
    t0: Instant,
) -> anyhow::Result<Option<Churner<'p>>> {
    ensure!(
        ctx.churn.is_none() || ctx.more.is_empty(),
        "churn with many packages is not a scenario"
    );
    for (k, p) in leechers.iter_mut().enumerate() {
        if !ctx.churn.is_some_and(|plan| plan.joins_late(k)) {
            p.send_line("go")?;
        }
    }
    Ok(ctx.churn.map(|plan| Churner {
        index: leechers
            .iter()
            .enumerate()
            .map(|(k, p)| (p.label.clone(), k))
            .collect(),
        ..Churner::new(plan, leechers.len(), ctx.pkg.size, t0)
    }))
}

impl<'p> Churner<'p> {
    /// Before the start: `n` leechers of a package of `size` bytes, the clock starting at
    /// `t0`.
    pub fn new(plan: &'p Plan, n: usize, size: u64, t0: Instant) -> Self {
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
            half: size / 2,
            states,
            index: BTreeMap::new(),
            restarted: Vec::new(),
            killed: Vec::new(),
        }
    }

    /// The killed hosts, each with what it downloaded once restarted: `fetched(k, host)` for
    /// leecher `k` on `host`, where the contender can say.
    pub fn into_restarted(
        self,
        mut fetched: impl FnMut(usize, &str) -> Option<u64>,
    ) -> Vec<Restarted> {
        self.restarted
            .into_iter()
            .zip(self.killed)
            .map(|(mut r, k)| {
                r.downloaded_after_bytes = fetched(k, &r.host);
                r
            })
            .collect()
    }

    /// Which leecher the process labelled `label` is, if one.
    pub fn leecher(&self, label: &str) -> Option<usize> {
        self.index.get(label).copied()
    }

    /// One step for leecher `k`. Returns whether its process's exit, if it exited, is the
    /// leecher's end (not while it is down or restarting).
    pub(super) fn step(
        &mut self,
        k: usize,
        v: &mut impl Victim,
        acct: &mut Accounting,
    ) -> anyhow::Result<bool> {
        self.step_at(Instant::now(), k, v, acct)
    }

    /// [`Churner::step`] from a crowd's wait loop: an error goes into `notes` and the leecher
    /// counts as steady for this turn. Returns whether its process's exit is its end.
    pub(super) fn step_noting(
        &mut self,
        k: usize,
        v: &mut impl Victim,
        acct: &mut Accounting,
        notes: &mut Vec<String>,
    ) -> bool {
        self.step(k, v, acct).unwrap_or_else(|e| {
            notes.push(format!("churn on {}: {e:#}", v.host()));
            true
        })
    }

    fn step_at(
        &mut self,
        now: Instant,
        k: usize,
        v: &mut impl Victim,
        acct: &mut Accounting,
    ) -> anyhow::Result<bool> {
        let secs = |t: Instant| t.duration_since(self.t0).as_secs_f64();
        match self.states[k] {
            State::Steady => Ok(true),
            State::Waiting => {
                if now >= self.t0 + self.plan.join_after {
                    v.go()?;
                    self.states[k] = State::Steady;
                }
                Ok(true)
            }
            State::Watching { next_probe } => {
                if now < next_probe || v.ended() {
                    return Ok(true);
                }
                let had = v.bytes_have().unwrap_or(0);
                if had < self.half {
                    self.states[k] = State::Watching {
                        next_probe: now + PROBE_EVERY,
                    };
                    return Ok(true);
                }
                v.kill(acct);
                self.restarted.push(Restarted {
                    host: v.host().to_owned(),
                    killed_at_secs: secs(now),
                    had_bytes: had,
                    restarted_at_secs: None,
                    downloaded_after_bytes: None,
                });
                self.killed.push(k);
                self.states[k] = State::Down {
                    restart_at: now + self.plan.restart_after,
                    report: self.restarted.len() - 1,
                };
                Ok(false)
            }
            State::Down { restart_at, report } => {
                if now >= restart_at {
                    v.restart()?;
                    self.states[k] = State::Restarting { report };
                }
                Ok(false)
            }
            State::Restarting { report } => {
                if v.resume()? {
                    self.restarted[report].restarted_at_secs = Some(secs(now));
                    self.states[k] = State::Steady;
                }
                Ok(false)
            }
        }
    }
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

    /// A leecher that does what it is told and says what it holds.
    #[derive(Default)]
    struct Fake {
        have: u64,
        ended: bool,
        kills: u32,
        restarts: u32,
        /// `resume` answers "not yet" this many times after a restart.
        not_ready: u32,
        resumed: u32,
        gone: u32,
    }

    impl Victim for Fake {
        fn host(&self) -> &str {
            "l004"
        }
        fn ended(&mut self) -> bool {
            self.ended
        }
        fn bytes_have(&mut self) -> Option<u64> {
            Some(self.have)
        }
        fn kill(&mut self, _: &mut Accounting) {
            self.kills += 1;
        }
        fn restart(&mut self) -> anyhow::Result<()> {
            self.restarts += 1;
            Ok(())
        }
        fn resume(&mut self) -> anyhow::Result<bool> {
            if self.not_ready > 0 {
                self.not_ready -= 1;
                return Ok(false);
            }
            self.resumed += 1;
            Ok(true)
        }
        fn go(&mut self) -> anyhow::Result<()> {
            self.gone += 1;
            Ok(())
        }
    }

    const SIZE: u64 = 128 << 20;

    fn b4() -> Plan {
        Plan::new(&Scenario::preset("b4").unwrap(), 13.4).unwrap()
    }

    #[test]
    fn a_victim_dies_at_half_the_package_and_comes_back_after_the_pause() {
        let plan = b4();
        let t0 = Instant::now();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        let mut c = Churner::new(&plan, 36, SIZE, t0);
        let mut acct = Accounting::default();
        let mut v = Fake {
            have: SIZE / 2 - 1,
            not_ready: 2,
            ..Fake::default()
        };
        // Short of half: asked again, not killed, its exit would count.
        assert!(c.step_at(at(1.0), 3, &mut v, &mut acct).unwrap());
        assert_eq!(v.kills, 0);
        // Half reached, but not asked again before the probe interval is up.
        v.have = SIZE / 2;
        assert!(c.step_at(at(1.05), 3, &mut v, &mut acct).unwrap());
        assert_eq!(v.kills, 0);
        assert!(!c.step_at(at(1.2), 3, &mut v, &mut acct).unwrap());
        assert_eq!(v.kills, 1);
        assert_eq!(c.restarted.len(), 1);
        assert_eq!(c.restarted[0].had_bytes, SIZE / 2);
        assert!((c.restarted[0].killed_at_secs - 1.2).abs() < 1e-6);
        // Down for `restart_after`: its exit is not its end, and nothing starts.
        assert!(!c.step_at(at(6.1), 3, &mut v, &mut acct).unwrap());
        assert_eq!(v.restarts, 0);
        assert!(!c.step_at(at(6.2), 3, &mut v, &mut acct).unwrap());
        assert_eq!(v.restarts, 1);
        // Asks for the package again once it is ready, and only then counts as restarted.
        assert!(!c.step_at(at(6.3), 3, &mut v, &mut acct).unwrap());
        assert!(!c.step_at(at(6.4), 3, &mut v, &mut acct).unwrap());
        assert_eq!((v.resumed, c.restarted[0].restarted_at_secs), (0, None));
        assert!(!c.step_at(at(6.5), 3, &mut v, &mut acct).unwrap());
        assert_eq!(v.resumed, 1);
        assert!((c.restarted[0].restarted_at_secs.unwrap() - 6.5).abs() < 1e-6);
        // Then it is like any other: never killed twice.
        assert!(c.step_at(at(9.0), 3, &mut v, &mut acct).unwrap());
        assert_eq!((v.kills, v.restarts, v.resumed), (1, 1, 1));
        // What it fetched once back is asked of the contender by leecher and host.
        let r = c.into_restarted(|k, host| (k == 3 && host == "l004").then_some(42));
        assert_eq!(r[0].downloaded_after_bytes, Some(42));
    }

    #[test]
    fn a_victim_done_before_half_is_spared_and_the_others_are_left_alone() {
        let plan = b4();
        let t0 = Instant::now();
        let mut c = Churner::new(&plan, 36, SIZE, t0);
        let mut acct = Accounting::default();
        let mut done = Fake {
            have: SIZE,
            ended: true,
            ..Fake::default()
        };
        assert!(c.step_at(t0, 7, &mut done, &mut acct).unwrap());
        let mut steady = Fake {
            have: SIZE,
            ..Fake::default()
        };
        assert!(c.step_at(t0, 0, &mut steady, &mut acct).unwrap());
        assert_eq!((done.kills, steady.kills, steady.gone), (0, 0, 0));
        assert!(c.restarted.is_empty());
    }

    #[test]
    fn a_joiner_goes_once_at_half_the_bound() {
        let plan = b4();
        let t0 = Instant::now();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        let mut c = Churner::new(&plan, 36, SIZE, t0);
        let mut acct = Accounting::default();
        let mut v = Fake::default();
        assert!(c.step_at(at(6.6), 32, &mut v, &mut acct).unwrap());
        assert_eq!(v.gone, 0);
        assert!(c.step_at(at(6.7), 32, &mut v, &mut acct).unwrap());
        assert!(c.step_at(at(7.0), 32, &mut v, &mut acct).unwrap());
        assert_eq!((v.gone, v.kills), (1, 0));
    }
}
