//! The phase gate, as a pure function of a rollout and what its hosts last reported.
//!
//! **Hosts in phase `p`**: the hosts that resolved the rollout's tag with `host=` (or reported
//! on its new version) since the rollout started, and whose first phase is `p` or earlier: their
//! zone is at or under a zone phase `<= p`, or their bucket is below the percentage of the
//! latest percentage phase `<= p`. These are exactly the hosts that resolve the tag to the new
//! version while the rollout is in phase `p`. Phases are cumulative, so the hosts of phase `p`
//! include those of every earlier phase.
//!
//! Among the hosts in the current phase, a host *acts* once its latest report is `fetched` or
//! later, or while it only resolved but was seen within the host timeout (it is on its way:
//! downloading, or about to resolve again now that its phase has come). A host that resolved
//! once and went silent longer than that does not hold a phase for ever. The gate:
//!
//! - **halt** the moment the unhealthy hosts (latest report `unhealthy`) number more than the
//!   budget (`max_failures`, a count or a percentage of the hosts in the phase);
//! - **pass** when at least one host acts and every acting host is healthy, where `activated`
//!   counts as healthy for a host that does not run a health command (it never said
//!   `health_check` nor reported `healthy` or `unhealthy`) if no host in the phase runs one (a
//!   fleet without health commands), or if a `get` reported it (a host that only `get`s hands
//!   the version to its caller and has no health command to wait for); the controller
//!   advances once a pass has held for the bake time;
//! - **pass** too when the phase holds none of the hosts seen so far (and some were seen) and
//!   has been current for the host timeout: a 1% phase of a 16-host fleet is usually empty,
//!   and would otherwise hold the rollout for ever; before the timeout, the phase's hosts may
//!   simply not have resolved since the rollout started (at first, nobody has);
//! - otherwise **wait**.

use std::collections::HashMap;

use fbpkg_common::api::{FailedHost, HostState, PhaseCounts, Rollout};
use fbpkg_common::rollout::{HostId, first_phase};
use fbpkg_common::tracker_proto::Zone;
use tokio::time::{Duration, Instant};

/// What one host last said in one rollout (soft state: rebuilt from the host's next report).
#[derive(Debug, Clone)]
pub(crate) struct HostVote {
    pub zone: Option<Zone>,
    pub bucket: u16,
    pub state: HostState,
    pub detail: Option<String>,
    /// It said it runs a health command (`health_check`), or reported `healthy` or
    /// `unhealthy` at some point.
    pub health_seen: bool,
    /// Its latest report came from a `get` (no health command to wait for).
    pub by_get: bool,
    /// When it last resolved the tag or reported (tokio's clock).
    pub seen: Instant,
}

impl HostVote {
    /// A host first seen now, in `bucket`, that has only resolved.
    pub fn new(bucket: u16) -> Self {
        Self {
            zone: None,
            bucket,
            state: HostState::Resolved,
            detail: None,
            health_seen: false,
            by_get: false,
            seen: Instant::now(),
        }
    }

    /// The first phase holding this host (a valid rollout ends at 100%, so there is one).
    pub fn first_phase(&self, r: &Rollout) -> usize {
        first_phase(&r.phases, self.bucket, self.zone.as_ref()).unwrap_or(r.phases.len())
    }
}

/// The gate's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Too many unhealthy hosts; the reason, for a human.
    Halt(String),
    /// The phase's hosts are healthy.
    Pass,
    /// Not yet.
    Wait,
}

/// Most failed hosts named in a halt reason; the view lists all of them.
const REASON_HOSTS: usize = 5;

fn last_line(detail: Option<&str>) -> &str {
    let line = detail
        .unwrap_or("")
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no detail");
    let mut end = line.len().min(160);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    &line[..end]
}

/// Judge the current phase of `r` (see the module doc).
pub(crate) fn judge(
    r: &Rollout,
    hosts: &HashMap<HostId, HostVote>,
    now: Instant,
    host_timeout: Duration,
    phase_age: Duration,
) -> Verdict {
    let in_phase: Vec<(&HostId, &HostVote)> = hosts
        .iter()
        .filter(|(_, v)| v.first_phase(r) <= r.phase)
        .collect();
    let mut unhealthy: Vec<&(&HostId, &HostVote)> = in_phase
        .iter()
        .filter(|(_, v)| v.state == HostState::Unhealthy)
        .collect();
    let allowed = r.max_failures.allowed(in_phase.len());
    if unhealthy.len() > allowed {
        unhealthy.sort_by_key(|(h, _)| *h);
        let mut named: Vec<String> = unhealthy
            .iter()
            .take(REASON_HOSTS)
            .map(|(h, v)| format!("{h}: {}", last_line(v.detail.as_deref())))
            .collect();
        if unhealthy.len() > REASON_HOSTS {
            named.push(format!("and {} more", unhealthy.len() - REASON_HOSTS));
        }
        return Verdict::Halt(format!(
            "{} unhealthy hosts in phase {} of {} ({}) (max {allowed} of {} hosts, max_failures {}): {}",
            unhealthy.len(),
            r.phase + 1,
            r.phases.len(),
            r.phases[r.phase],
            in_phase.len(),
            r.max_failures,
            named.join("; ")
        ));
    }
    let health_used = in_phase.iter().any(|(_, v)| v.health_seen);
    let good = |v: &HostVote| {
        v.state == HostState::Healthy
            || (v.state == HostState::Activated && !v.health_seen && (!health_used || v.by_get))
    };
    // A phase that holds none of the hosts seen (a 1% canary of a small fleet) has nothing to
    // wait for, once its hosts have had the host timeout to show up: the hosts a rollout sees
    // are those that resolved since it started, and at its start that is almost nobody.
    if in_phase.is_empty() {
        return if !hosts.is_empty() && phase_age >= host_timeout {
            Verdict::Pass
        } else {
            Verdict::Wait
        };
    }
    let mut acting = in_phase
        .iter()
        .filter(|(_, v)| {
            v.state != HostState::Resolved || now.saturating_duration_since(v.seen) <= host_timeout
        })
        .peekable();
    if acting.peek().is_some() && acting.all(|(_, v)| good(v)) {
        Verdict::Pass
    } else {
        Verdict::Wait
    }
}

/// Per-phase counts (each host in its first phase), hosts beyond the current phase, failed
/// hosts.
pub(crate) fn progress(
    r: &Rollout,
    hosts: &HashMap<HostId, HostVote>,
) -> (Vec<PhaseCounts>, usize, Vec<FailedHost>) {
    let mut counts: Vec<PhaseCounts> = r
        .phases
        .iter()
        .map(|p| PhaseCounts {
            phase: Some(p.clone()),
            ..PhaseCounts::default()
        })
        .collect();
    let mut waiting = 0;
    let mut failed = Vec::new();
    for (h, v) in hosts {
        let fp = v.first_phase(r);
        if fp > r.phase {
            waiting += 1;
        }
        if let Some(c) = counts.get_mut(fp) {
            match v.state {
                HostState::Resolved => c.resolved += 1,
                HostState::Fetched => c.fetched += 1,
                HostState::Activated => c.activated += 1,
                HostState::Healthy => c.healthy += 1,
                HostState::Unhealthy => c.unhealthy += 1,
            }
        }
        if v.state == HostState::Unhealthy {
            failed.push(FailedHost {
                host: h.clone(),
                zone: v.zone.clone(),
                phase: fp,
                detail: v.detail.clone(),
            });
        }
    }
    failed.sort_by(|a, b| a.host.cmp(&b.host));
    (counts, waiting, failed)
}

#[cfg(test)]
mod tests {
    use fbpkg_common::Sha256Hash;
    use fbpkg_common::api::RolloutState;
    use fbpkg_common::pkgref::{PackageName, Tag};
    use fbpkg_common::rollout::{MaxFailures, Phase};

    use super::*;

    fn vote(zone: Option<&str>, state: HostState) -> HostVote {
        HostVote {
            zone: zone.map(|z| Zone::new(z).expect("a valid zone")),
            bucket: 9_999,
            state,
            detail: (state == HostState::Unhealthy).then(|| "exit 1".to_owned()),
            health_seen: matches!(state, HostState::Healthy | HostState::Unhealthy),
            by_get: false,
            seen: Instant::now(),
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(120);

    fn judge_now(r: &Rollout, hosts: &HashMap<HostId, HostVote>) -> Verdict {
        judge(r, hosts, Instant::now(), TIMEOUT, TIMEOUT)
    }

    fn rollout() -> Rollout {
        Rollout {
            id: 1,
            name: PackageName::new("app").expect("a valid name"),
            tag: Tag::new("prod").expect("a valid tag"),
            from: Some(Sha256Hash([1; 32])),
            to: Sha256Hash([2; 32]),
            phases: vec![
                "zone:dc1".parse::<Phase>().expect("a valid phase"),
                Phase::Percent(100),
            ],
            bake_ms: 0,
            max_failures: MaxFailures::Count(1),
            phase: 0,
            state: RolloutState::Running { phase_started: 0 },
            started_at: 0,
            updated_at: 0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_host_on_its_way_holds_its_phase_until_it_goes_silent() {
        let r = rollout();
        let id = |h: &str| HostId::new(h).expect("a valid host id");
        let mut hosts = HashMap::new();
        hosts.insert(id("done"), vote(Some("dc1"), HostState::Activated));
        hosts.insert(id("downloading"), vote(Some("dc1"), HostState::Resolved));
        assert_eq!(
            judge_now(&r, &hosts),
            Verdict::Wait,
            "one host is still on its way"
        );
        tokio::time::advance(TIMEOUT).await;
        if let Some(v) = hosts.get_mut(&id("done")) {
            v.seen = Instant::now();
        }
        assert_eq!(
            judge_now(&r, &hosts),
            Verdict::Wait,
            "seen just within the timeout"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(judge_now(&r, &hosts), Verdict::Pass, "gone silent");
    }

    #[test]
    fn a_phase_that_holds_none_of_the_hosts_seen_passes() {
        let r = rollout();
        let mut hosts = HashMap::new();
        assert_eq!(judge_now(&r, &hosts), Verdict::Wait, "nobody seen yet");
        let id = |h: &str| HostId::new(h).expect("a valid host id");
        hosts.insert(id("far"), vote(Some("dc2"), HostState::Fetched));
        let early = judge(&r, &hosts, Instant::now(), TIMEOUT, TIMEOUT / 2);
        assert_eq!(
            early,
            Verdict::Wait,
            "dc1's hosts may not have resolved yet"
        );
        assert_eq!(
            judge_now(&r, &hosts),
            Verdict::Pass,
            "dc1 holds none of them"
        );
        hosts.insert(id("near"), vote(Some("dc1"), HostState::Resolved));
        assert_eq!(judge_now(&r, &hosts), Verdict::Wait, "a dc1 host showed up");
        hosts.insert(id("near"), vote(Some("dc1"), HostState::Healthy));
        assert_eq!(judge_now(&r, &hosts), Verdict::Pass);
    }

    #[test]
    fn progress_counts_later_phases_prefetch_in_their_own_row() {
        let r = rollout();
        let hosts: HashMap<HostId, HostVote> = [
            ("a", vote(Some("dc1/r1"), HostState::Healthy)),
            ("b", vote(Some("dc1/r2"), HostState::Unhealthy)),
            ("c", vote(Some("dc2"), HostState::Fetched)),
            ("d", vote(None, HostState::Resolved)),
        ]
        .into_iter()
        .map(|(h, v)| (HostId::new(h).expect("a valid host id"), v))
        .collect();
        let (counts, waiting, failed) = progress(&r, &hosts);
        assert_eq!(
            (
                counts[0].hosts(),
                counts[0].prefetched(),
                counts[0].switched()
            ),
            (2, 2, 1)
        );
        assert_eq!((counts[0].healthy, counts[0].unhealthy), (1, 1));
        assert_eq!(
            (
                counts[1].hosts(),
                counts[1].prefetched(),
                counts[1].switched()
            ),
            (2, 1, 0),
            "the later phase's hosts show their prefetch"
        );
        assert_eq!(waiting, 2);
        assert_eq!(failed.len(), 1);
        assert_eq!((failed[0].host.as_str(), failed[0].phase), ("b", 0));
        assert_eq!(
            judge_now(&r, &hosts),
            Verdict::Wait,
            "one failure is within the budget"
        );
    }
}
