#![allow(clippy::unwrap_used)]
//! A fleet of twelve following agents carries rollouts through their transitions, against a
//! real tracker process and real agent processes on loopback (issue 9, "Tests").
//!
//! Twelve hosts with fixed `--host-id`s, chosen so that phases `25,50,100` of `app:prod` hold
//! 3, 3 and 6 of them (buckets as `fbpkg_common::rollout` draws them, like the tracker), follow
//! `app:prod` every 200 ms. Each `--on-change` writes its `FBPKG_*` variables to the host's
//! `current.env` and appends the hash to its `activations`; the health command fails while the
//! host's `fail-health` marker exists. A publisher's agent seeds v1 (tagged prod), v2 and v3.
//! One scenario, in steps that each start from where the last one left the fleet (a fleet costs
//! seconds to start on a busy machine):
//!
//! 1. Every host activates v1.
//! 2. `rollout start app:<v2> --phases 25,50,100 --bake 300ms --max-failures 0` goes to done;
//!    while it runs, no host outside the phase reached so far has activated v2 (checked at every
//!    poll); at the end every host ran `--on-change` for v1 then v2, and the catalog's tag
//!    points at v2.
//! 3. With markers on exactly the first phase's hosts, a rollout to v3 halts in phase 0 with
//!    the reason recorded and those hosts (with their health output) as the failed hosts; the
//!    nine others keep resolving v2 and never run `--on-change` for v3.
//! 4. `rollout abort`: the first phase's hosts run `--on-change` again with v2.
//! 5. A rollout to v3 with a 1 s bake is paused past phase 0. Two agents (one on v3, one
//!    outside the phases reached) are killed -9 and restarted: they keep their activation and
//!    run no `--on-change`. The tracker is killed -9: every host's `get app:prod` answers the
//!    version it last activated, with a warning (v2 outside the phases: never v3, which it
//!    may have prefetched but never ran). The tracker restarts on the same data dir and port:
//!    same rollout, paused, same phase. `resume`, then kill -9 again while it runs: it comes back
//!    running in that phase and goes on to done (the hosts that had switched say so again, see
//!    `restate` in `peer/src/agent/follow.rs`), and every host ends on v3.
//!
//! What `rollout_follow.rs` checks with four hosts (health output details, the follow table)
//! is not repeated here.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fbpkg_common::pkgref::{PackageName, Tag};
use fbpkg_common::rollout::{HostId, Phase, bucket, first_phase};
use fbpkg_tests::{
    AgentProcess, CliOutput, TrackerProcess, fbpkg_rs_then, http_client, poll, publish_versions,
};
use serde_json::Value;
use tokio::task::JoinSet;

/// Longest one client command may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest any one condition below may take to come true.
const WAIT: Duration = Duration::from_secs(120);
const TOKEN: &str = "right-token";
/// The phases of every rollout here, and how many hosts each adds.
const PHASES: &str = "25,50,100";
const HOSTS_PER_PHASE: [usize; 3] = [3, 3, 6];
/// Log lines of each process quoted when a wait times out.
const TAIL_LINES: usize = 12;

/// One following host.
struct Host {
    dir: PathBuf,
    id: String,
    /// The first phase of `PHASES` that holds it.
    phase: usize,
    agent: AgentProcess,
}

impl Host {
    /// The hashes its `--on-change` saw, in order.
    fn activations(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("activations"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The `FBPKG_*` variables of its last `--on-change`.
    fn current_env(&self) -> BTreeMap<String, String> {
        std::fs::read_to_string(self.dir.join("current.env"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    /// `status --follows --json`: its one follow.
    async fn follow(&self) -> Result<Value, String> {
        let out = fbpkg_rs_then(
            &["status", "--follows", "--json"],
            &self.agent.host_args(),
            CLI_TIMEOUT,
        )
        .await;
        Ok(json(&out)?[0].clone())
    }

    fn marker(&self) -> PathBuf {
        self.dir.join("fail-health")
    }
}

fn json(out: &CliOutput) -> Result<Value, String> {
    if !out.success() {
        return Err(format!("{out}"));
    }
    serde_json::from_str(&out.stdout).map_err(|e| format!("{e}: {out}"))
}

/// The agent of the host in `dir`: follows `app:prod` as `id`; `--on-change` writes its
/// variables then appends the hash (so `current.env` is whole once `activations` shows it).
async fn start_agent(dir: PathBuf, id: String, tracker: String) -> AgentProcess {
    let d = dir.display();
    let on_change = format!(
        "env | grep '^FBPKG_' | sort > {d}/env.tmp && mv {d}/env.tmp {d}/current.env && \
         echo \"$FBPKG_PACKAGE_HASH\" >> {d}/activations"
    );
    let health = format!("echo checking {id}; test ! -e {d}/fail-health");
    AgentProcess::start(
        &dir.join("state"),
        &dir.join("cache"),
        &tracker,
        &[
            "--host-id",
            &id,
            "--follow",
            "app:prod",
            "--follow-interval",
            "200ms",
            "--on-change",
            &on_change,
            "--health-cmd",
            &health,
            "--health-timeout",
            "20s",
        ],
    )
    .await
    .unwrap_or_else(|e| panic!("agent {id}: {e}"))
}

/// Host ids whose first phase of `PHASES` is 0, 1 and 2, `HOSTS_PER_PHASE` of each.
fn pick_hosts() -> Vec<(String, usize)> {
    let (name, tag) = (PackageName::new("app").unwrap(), Tag::new("prod").unwrap());
    let phases: Vec<Phase> = PHASES.split(',').map(|p| p.parse().unwrap()).collect();
    let mut left = HOSTS_PER_PHASE;
    let mut picked = Vec::new();
    for i in 0..10_000 {
        let id = format!("fleet-{i}");
        let b = bucket(&name, &tag, &HostId::new(&id).unwrap());
        let p = first_phase(&phases, b, None).unwrap();
        if left[p] > 0 {
            left[p] -= 1;
            picked.push((id, p));
        }
        if left == [0; 3] {
            return picked;
        }
    }
    panic!("no ids for every phase in 10 000 tries: {left:?} missing");
}

/// The tracker, the publisher, the three versions and the twelve hosts.
struct Fleet {
    base: PathBuf,
    tracker: TrackerProcess,
    addr: SocketAddr,
    url: String,
    /// `--tracker URL --publish-token T`.
    conn: Vec<OsString>,
    _publisher: AgentProcess,
    v: [String; 3],
    hosts: Vec<Host>,
    http: reqwest::Client,
}

impl Fleet {
    /// Everything up, every host on v1.
    async fn start(base: &Path) -> Self {
        let started = Instant::now();
        let tracker = start_tracker(base, None);
        let url = tracker.base_url();
        let conn: Vec<OsString> = vec![
            "--tracker".into(),
            url.clone().into(),
            "--publish-token".into(),
            TOKEN.into(),
        ];
        let publisher =
            AgentProcess::start(&base.join("pub/state"), &base.join("pub/cache"), &url, &[])
                .await
                .unwrap();
        let contents: Vec<Vec<u8>> = (1..=3)
            .map(|i| format!("version {i}\n").repeat(20_000).into_bytes())
            .collect();
        let hashes = publish_versions(
            base,
            "app",
            &contents,
            Some("prod"),
            TOKEN,
            &publisher.host_args(),
        )
        .await;
        let v: [String; 3] = hashes.try_into().unwrap();
        // All twelve at once: starting them one by one is most of a fleet's setup time.
        let mut starting = JoinSet::new();
        for (n, (id, phase)) in pick_hosts().into_iter().enumerate() {
            let dir = base.join(&id);
            std::fs::create_dir_all(&dir).unwrap();
            let url = url.clone();
            starting.spawn(async move {
                let agent = start_agent(dir.clone(), id.clone(), url).await;
                (
                    n,
                    Host {
                        dir,
                        id,
                        phase,
                        agent,
                    },
                )
            });
        }
        let mut hosts: Vec<(usize, Host)> = starting.join_all().await;
        hosts.sort_by_key(|(n, _)| *n);
        let fleet = Self {
            base: base.to_owned(),
            addr: tracker.addr(),
            tracker,
            url,
            conn,
            _publisher: publisher,
            v,
            hosts: hosts.into_iter().map(|(_, h)| h).collect(),
            http: http_client(),
        };
        let v1 = fleet.v[0].clone();
        fleet.wait_activations(|_| vec![v1.clone()]).await;
        eprintln!(
            "fleet of {} up on v1 in {:?}",
            fleet.hosts.len(),
            started.elapsed()
        );
        fleet
    }

    /// `fbpkg-rs ARGS --tracker URL --publish-token T`.
    async fn cli(&self, args: &[&str]) -> CliOutput {
        fbpkg_rs_then(args, &self.conn, CLI_TIMEOUT).await
    }

    /// `rollout start app:<to> --tag prod --phases 25,50,100 ...`; the new rollout's id.
    async fn start_rollout(&self, to: &str, bake: &str) -> u64 {
        let target = format!("app:{to}");
        let out = self
            .cli(&[
                "rollout",
                "start",
                &target,
                "--tag",
                "prod",
                "--phases",
                PHASES,
                "--bake",
                bake,
                "--max-failures",
                "0",
                "--json",
            ])
            .await;
        let r = json(&out).unwrap();
        assert_eq!(r["state"], "running", "{out}");
        assert_eq!(r["phase"], 0, "{out}");
        r["id"].as_u64().unwrap()
    }

    /// `rollout status app:prod --json`, as the CLI prints it.
    async fn status(&self) -> Result<Value, String> {
        json(&self.cli(&["rollout", "status", "app:prod", "--json"]).await)
    }

    /// The same from the API directly: what the polls read (a request, not a process).
    async fn status_api(&self) -> Result<Value, String> {
        let url = format!("{}/api/v1/rollouts/app/prod", self.url);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("{url}: {}", resp.status()));
        }
        resp.json().await.map_err(|e| e.to_string())
    }

    /// Where the catalog's `app:prod` points.
    async fn catalog_prod(&self) -> String {
        let url = format!("{}/api/v1/packages/app", self.url);
        let detail: Value = self
            .http
            .get(&url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        detail["tags"]["prod"]["sha256"]
            .as_str()
            .unwrap_or_else(|| panic!("no prod tag: {detail}"))
            .to_owned()
    }

    /// [`poll`], panicking on timeout with the rollout, every host's activations and the last
    /// lines of every process's log.
    async fn wait<T, F, Fut>(&self, what: &str, probe: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, String>>,
    {
        match poll(what, WAIT, probe).await {
            Ok(v) => v,
            Err(e) => panic!("{e}\n{}", self.dump().await),
        }
    }

    async fn dump(&self) -> String {
        let status = match self.status_api().await {
            Ok(s) => serde_json::to_string_pretty(&s).unwrap_or_default(),
            Err(e) => format!("unavailable: {e}"),
        };
        let mut out = format!("=== rollout status\n{status}\n");
        for h in &self.hosts {
            let tail: Vec<String> = h
                .agent
                .log_lines()
                .into_iter()
                .rev()
                .take(TAIL_LINES)
                .collect();
            out += &format!(
                "=== {} (phase {}), activations {:?}, log tail:\n",
                h.id,
                h.phase,
                self.short(&h.activations())
            );
            for line in tail.iter().rev() {
                out += &format!("  {line}\n");
            }
        }
        out += &format!("=== tracker log tail\n{}", self.tracker.log_tail());
        out
    }

    /// Hashes as `v1`..`v3` for messages.
    fn short(&self, hashes: &[String]) -> Vec<String> {
        hashes
            .iter()
            .map(|h| match self.v.iter().position(|v| v == h) {
                Some(i) => format!("v{}", i + 1),
                None => h.clone(),
            })
            .collect()
    }

    /// Wait until each host's activations are exactly `want(host)`, and its `current.env`
    /// names the last of them.
    async fn wait_activations(&self, want: impl Fn(&Host) -> Vec<String>) {
        self.wait("every host's activations", || async {
            let wrong: Vec<String> = self
                .hosts
                .iter()
                .filter(|h| h.activations() != want(h))
                .map(|h| {
                    format!(
                        "{} has {:?}, wants {:?}",
                        h.id,
                        self.short(&h.activations()),
                        self.short(&want(h))
                    )
                })
                .collect();
            if wrong.is_empty() {
                Ok(())
            } else {
                Err(wrong.join("; "))
            }
        })
        .await;
        for h in &self.hosts {
            let env = h.current_env();
            let last = want(h).last().cloned().unwrap_or_default();
            assert_eq!(
                env.get("FBPKG_PACKAGE_HASH"),
                Some(&last),
                "{}: {env:?}",
                h.id
            );
            assert_eq!(
                env.get("FBPKG_PACKAGE_NAME").map(String::as_str),
                Some("app")
            );
            assert_eq!(
                env.get("FBPKG_PACKAGE_REF").map(String::as_str),
                Some("app:prod")
            );
            let path = env.get("FBPKG_PACKAGE_PATH").expect("FBPKG_PACKAGE_PATH");
            assert!(Path::new(path).exists(), "{}: {path} does not exist", h.id);
        }
    }

    /// Wait until every host in `hosts` has resolved `more` times since now, to `want`.
    async fn wait_resolving(&self, hosts: &[&Host], more: u64, want: &str) {
        let mut from = Vec::new();
        for h in hosts {
            let f = self
                .wait(&format!("{} follow status", h.id), || h.follow())
                .await;
            from.push(f["resolves"].as_u64().unwrap_or(0));
        }
        for (h, from) in hosts.iter().zip(from) {
            self.wait(
                &format!("{} to resolve {more} more times", h.id),
                || async {
                    let f = h.follow().await?;
                    if f["resolves"].as_u64().unwrap_or(0) >= from + more {
                        Ok(f)
                    } else {
                        Err(f.to_string())
                    }
                },
            )
            .await;
            let f = h.follow().await.unwrap();
            assert_eq!(f["resolved"], want, "{}: {f}", h.id);
        }
    }

    /// Wait until every host in `hosts` reports `state` on `sha` in its follow status.
    async fn wait_follow_state(&self, hosts: &[&Host], sha: &str, state: &str) {
        for h in hosts {
            self.wait(&format!("{} {state} on {sha}", h.id), || async {
                let f = h.follow().await?;
                if f["activated"] == sha && f["state"] == state {
                    Ok(())
                } else {
                    Err(f.to_string())
                }
            })
            .await;
        }
    }

    /// SIGKILL the tracker and start it again on the same data dir and port.
    fn restart_tracker(&mut self) {
        self.tracker.kill().unwrap();
        self.tracker = start_tracker(&self.base, Some(self.addr));
    }
}

fn start_tracker(base: &Path, addr: Option<SocketAddr>) -> TrackerProcess {
    let listen = addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
    // A short gate tick: phases change within 50 ms of their cause, not 250.
    let extra = ["--publish-token", TOKEN, "--rollout-tick", "50ms"];
    TrackerProcess::start_on(listen, &base.join("tracker"), &extra).unwrap()
}

fn history_last(s: &Value) -> Value {
    s["history"]
        .as_array()
        .and_then(|h| h.last())
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_twelve_carries_rollouts_through_halt_abort_and_kills() {
    let t0 = Instant::now();
    let dirs = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::start(dirs.path()).await;
    let [v1, v2, v3] = fleet.v.clone();
    let step = |what: &str| eprintln!("[{:>6.1?}] {what}", t0.elapsed());

    // 2. Through the phases to done.
    step("rollout to v2");
    let id = fleet.start_rollout(&v2, "300ms").await;
    let phases_seen = std::cell::RefCell::new(Vec::new());
    fleet
        .wait("the rollout to v2 to be done", || async {
            // Activations before the status: phases only go forward, so a host beyond the
            // phase read now was beyond it when its activations were read too.
            let seen: Vec<Vec<String>> = fleet.hosts.iter().map(Host::activations).collect();
            let s = fleet.status_api().await?;
            let phase = match s["current"]["phase"].as_u64() {
                Some(p) => p as usize,
                None if history_last(&s)["id"] == id && history_last(&s)["state"] == "done" => {
                    return Ok(());
                }
                None => return Err(s.to_string()),
            };
            assert_eq!(s["current"]["state"], "running", "{s}");
            let mut ph = phases_seen.borrow_mut();
            if ph.last() != Some(&phase) {
                ph.push(phase);
            }
            for (h, seen) in fleet.hosts.iter().zip(&seen) {
                assert!(
                    h.phase <= phase || !seen.contains(&v2),
                    "{} (phase {}) activated v2 while the rollout was in phase {phase}: {s}",
                    h.id,
                    h.phase
                );
            }
            Err(s.to_string())
        })
        .await;
    let phases_seen = phases_seen.into_inner();
    eprintln!("phases seen while polling: {phases_seen:?}");
    assert!(
        phases_seen.windows(2).all(|w| w[0] < w[1]),
        "{phases_seen:?}"
    );
    fleet
        .wait_activations(|_| vec![v1.clone(), v2.clone()])
        .await;
    assert_eq!(fleet.catalog_prod().await, v2);
    let s = fleet.status().await.unwrap();
    let done = history_last(&s);
    assert!(s["current"].is_null(), "{s}");
    assert_eq!(done["state"], "done", "{s}");
    assert_eq!(done["phase"], 2, "{s}");
    assert_eq!(done["to"], v2.as_str(), "{s}");

    // 3. Health fails on exactly the first phase's hosts: halt in phase 0.
    step("rollout to v3, failing health in phase 0");
    let first: Vec<&Host> = fleet.hosts.iter().filter(|h| h.phase == 0).collect();
    let rest: Vec<&Host> = fleet.hosts.iter().filter(|h| h.phase > 0).collect();
    for h in &first {
        std::fs::write(h.marker(), b"").unwrap();
    }
    let id = fleet.start_rollout(&v3, "60s").await;
    let first_ids: Vec<&str> = first.iter().map(|h| h.id.as_str()).collect();
    let halted = fleet
        .wait(
            "the rollout to v3 to halt with every first-phase host failed",
            || async {
                let s = fleet.status_api().await?;
                let failed: Vec<&str> = s["current"]["failed_hosts"]
                    .as_array()
                    .map(|f| f.iter().filter_map(|h| h["host"].as_str()).collect())
                    .unwrap_or_default();
                if s["current"]["state"] == "halted" && failed.len() == first_ids.len() {
                    Ok(s)
                } else {
                    Err(s.to_string())
                }
            },
        )
        .await;
    let current = &halted["current"];
    assert_eq!(current["id"], id, "{halted}");
    assert_eq!(current["phase"], 0, "{halted}");
    let reason = current["reason"].as_str().unwrap();
    assert!(
        reason.contains("phase 1 of 3") && first_ids.iter().any(|id| reason.contains(id)),
        "{halted}"
    );
    let mut failed_ids = Vec::new();
    for f in current["failed_hosts"].as_array().unwrap() {
        let host = f["host"].as_str().unwrap();
        let detail = f["detail"].as_str().unwrap_or_default();
        assert_eq!(f["phase"], 0, "{halted}");
        assert!(
            detail.contains("exited with status 1") && detail.contains(&format!("checking {host}")),
            "{halted}"
        );
        failed_ids.push(host);
    }
    let mut want_failed = first_ids.clone();
    want_failed.sort_unstable();
    assert_eq!(failed_ids, want_failed, "{halted}");
    // The others keep resolving v2 and never switch.
    fleet.wait_resolving(&rest, 3, &v2).await;
    fleet
        .wait_activations(|h| {
            let mut a = vec![v1.clone(), v2.clone()];
            if h.phase == 0 {
                a.push(v3.clone());
            }
            a
        })
        .await;
    fleet.wait_follow_state(&first, &v3, "unhealthy").await;
    let table = fleet.cli(&["rollout", "status", "app:prod"]).await;
    assert!(
        table.success() && table.stdout.contains("halted"),
        "{table}"
    );

    // 4. Abort: the first phase goes back to v2, running --on-change again.
    step("abort");
    for h in &first {
        std::fs::remove_file(h.marker()).unwrap();
    }
    let aborted = fleet.cli(&["rollout", "abort", "app:prod"]).await;
    assert!(
        aborted.success() && aborted.line().contains("aborted"),
        "{aborted}"
    );
    fleet
        .wait_activations(|h| {
            let mut a = vec![v1.clone(), v2.clone()];
            if h.phase == 0 {
                a.extend([v3.clone(), v2.clone()]);
            }
            a
        })
        .await;
    fleet.wait_follow_state(&first, &v2, "healthy").await;
    let s = fleet.status().await.unwrap();
    assert!(s["current"].is_null(), "{s}");
    assert_eq!(history_last(&s)["state"], "aborted", "{s}");
    assert_eq!(fleet.catalog_prod().await, v2);

    // 5. Paused past phase 0, agents and the tracker killed -9, then on to done.
    step("rollout to v3 with kills");
    let id = fleet.start_rollout(&v3, "1s").await;
    fleet
        .wait("the rollout to v3 to pass phase 0", || async {
            let s = fleet.status_api().await?;
            match s["current"]["phase"].as_u64() {
                Some(p) if p >= 1 => Ok(()),
                _ => Err(s.to_string()),
            }
        })
        .await;
    let paused = fleet.cli(&["rollout", "pause", "app:prod", "--json"]).await;
    let paused = json(&paused).unwrap();
    assert_eq!(paused["id"], id, "{paused}");
    assert_eq!(
        paused["state"], "paused",
        "the rollout finished before it could be paused: {paused}"
    );
    let phase = paused["phase"].as_u64().unwrap() as usize;
    eprintln!("paused in phase {phase}");
    // Expected activations: v3 for the hosts in the phases reached.
    let on_v3 = |h: &Host| h.phase <= phase;
    let history = |h: &Host| {
        let mut a = vec![v1.clone(), v2.clone()];
        if h.phase == 0 {
            a.extend([v3.clone(), v2.clone()]);
        }
        a
    };
    let want_paused = |h: &Host| {
        let mut a = history(h);
        if on_v3(h) {
            a.push(v3.clone());
        }
        a
    };
    fleet.wait_activations(want_paused).await;
    let in_phase: Vec<&Host> = fleet.hosts.iter().filter(|&h| on_v3(h)).collect();
    fleet.wait_follow_state(&in_phase, &v3, "healthy").await;

    // Agents killed -9 and restarted keep their follow: no second --on-change.
    step("agent kill -9");
    let kill: Vec<usize> = [
        fleet.hosts.iter().position(|h| h.phase == 0).unwrap(),
        fleet.hosts.iter().position(|h| h.phase == 2).unwrap(),
    ]
    .into();
    for &i in &kill {
        let h = &mut fleet.hosts[i];
        h.agent.kill().unwrap();
        assert!(
            h.dir.join("state/follows.json").exists(),
            "{}: no follows.json",
            h.id
        );
        h.agent = start_agent(h.dir.clone(), h.id.clone(), fleet.url.clone()).await;
    }
    for &i in &kill {
        let h = &fleet.hosts[i];
        let want = if on_v3(h) { &v3 } else { &v2 };
        fleet
            .wait(
                &format!("restarted {} to resolve 3 times", h.id),
                || async {
                    let f = h.follow().await?;
                    if f["resolves"].as_u64().unwrap_or(0) >= 3 && f["resolved"] == want.as_str() {
                        Ok(())
                    } else {
                        Err(f.to_string())
                    }
                },
            )
            .await;
        let f = h.follow().await.unwrap();
        assert_eq!(f["activated"], want.as_str(), "{}: {f}", h.id);
        assert_eq!(f["state"], "healthy", "{}: {f}", h.id);
    }
    fleet.wait_activations(want_paused).await;

    // The tracker killed -9: each host answers what it last activated.
    step("tracker kill -9 while paused");
    fleet.tracker.kill().unwrap();
    let mut gets = JoinSet::new();
    for h in &fleet.hosts {
        let (id, args, want) = (h.id.clone(), h.agent.host_args(), want_paused(h));
        gets.spawn(async move {
            let out = fbpkg_rs_then(&["get", "app:prod", "--json"], &args, CLI_TIMEOUT).await;
            (id, out, want.last().cloned().unwrap())
        });
    }
    for (id, out, want) in gets.join_all().await {
        let v = json(&out).unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_eq!(v["sha256"], want.as_str(), "{id}: {out}");
        assert!(
            out.stderr.contains("warning") && out.stderr.contains("last activated"),
            "{id}: {out}"
        );
    }
    fleet.tracker = start_tracker(&fleet.base, Some(fleet.addr));
    let s = fleet.status().await.unwrap();
    assert_eq!(s["current"]["id"], id, "{s}");
    assert_eq!(s["current"]["state"], "paused", "{s}");
    assert_eq!(s["current"]["phase"], phase, "{s}");

    // Resumed, killed -9 again while running: back in the same phase, running.
    step("resume, tracker kill -9 while running");
    let resumed = fleet.cli(&["rollout", "resume", "app:prod"]).await;
    assert!(resumed.success(), "{resumed}");
    fleet.restart_tracker();
    let s = fleet.status().await.unwrap();
    assert_eq!(s["current"]["id"], id, "{s}");
    assert_eq!(s["current"]["state"], "running", "{s}");
    assert_eq!(s["current"]["phase"], phase, "{s}");

    step("on to done");
    fleet
        .wait(
            "the rollout to v3 to be done after the restarts",
            || async {
                let s = fleet.status_api().await?;
                let last = history_last(&s);
                if s["current"].is_null() && last["id"] == id && last["state"] == "done" {
                    Ok(())
                } else {
                    Err(s.to_string())
                }
            },
        )
        .await;
    fleet
        .wait_activations(|h| {
            let mut a = history(h);
            a.push(v3.clone());
            a
        })
        .await;
    assert_eq!(fleet.catalog_prod().await, v3);
    step("done");
}
