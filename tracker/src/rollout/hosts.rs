//! The hosts' side of a rollout: per-host resolution and reports (soft state).
//!
//! A host id is never trusted alone: the tracker keeps the address each id last resolved from
//! (`host=` on a resolve), and a report naming that id counts only from that address.

use std::collections::HashMap;
use std::net::IpAddr;

use fbpkg_common::Sha256Hash;
use fbpkg_common::api::{HostState, Report, ReportAck, ReportSource, Rollout, RolloutState};
use fbpkg_common::pkgref::{PackageName, Tag};
use fbpkg_common::rollout::{HostId, bucket};

use tokio::time::Instant;

use super::gate::HostVote;
use super::{Asker, Inner, MAX_HOSTS, Rollouts, key, lock};
use crate::error::TrackerError;

impl Rollouts {
    /// Remember that `who` resolved from its address (for reports), without a tag.
    pub fn seen(&self, who: &Asker) {
        if let Ok(mut inner) = lock(&self.inner) {
            self.remember(&mut inner, who);
        }
    }

    /// Record where `who` resolved from, and mark it for other replicas when sharing (a host
    /// new here is pushed at once: its report may go to another replica next).
    fn remember(&self, inner: &mut Inner, who: &Asker) {
        let moved = remember(&mut inner.seen, who);
        if self.sharing && inner.dirty.addr(&who.host) && moved {
            self.share_now.notify_one();
        }
    }

    /// What `name:tag` resolves to for `who` while a rollout of it is active (`None`: no
    /// active rollout, the catalog's target holds). Records the host as having resolved.
    pub fn resolve_for(&self, name: &PackageName, tag: &Tag, who: &Asker) -> Option<PerHost> {
        let mut inner = lock(&self.inner).ok()?;
        self.remember(&mut inner, who);
        let inner = &mut *inner;
        let entry = inner.tags.get_mut(&key(name, tag))?;
        let r = entry.rec.current.as_ref()?;
        let room = entry.live.hosts.len() < MAX_HOSTS;
        let vote = match entry.live.hosts.get_mut(&who.host) {
            Some(v) => v,
            None if room => entry
                .live
                .hosts
                .entry(who.host.clone())
                .or_insert_with(|| HostVote::new(bucket(name, tag, &who.host))),
            None => {
                let b = bucket(name, tag, &who.host);
                let fp = fbpkg_common::rollout::first_phase(&r.phases, b, who.zone.as_ref());
                return Some(PerHost::of(r, fp.is_some_and(|f| f <= r.phase)));
            }
        };
        vote.seen = Instant::now();
        if who.zone.is_some() {
            vote.zone.clone_from(&who.zone);
        }
        let in_phase = vote.first_phase(r) <= r.phase;
        if self.sharing {
            inner.dirty.vote(name, tag, &who.host);
        }
        Some(PerHost::of(r, in_phase))
    }

    /// Record a host's report. Counted only from the address the host id last resolved from.
    pub fn report(&self, rep: Report, ip: IpAddr) -> Result<ReportAck, TrackerError> {
        let mut guard = lock(&self.inner)?;
        let inner = &mut *guard;
        match inner.seen.get(&rep.host) {
            Some(seen) if *seen == ip.to_canonical() => {}
            Some(_) => {
                return Err(TrackerError::Forbidden(format!(
                    "host id {} last resolved from another address; a host reports only for itself",
                    rep.host
                )));
            }
            None => {
                return Err(TrackerError::Forbidden(format!(
                    "host id {} has not resolved from this address; resolve with host= first",
                    rep.host
                )));
            }
        }
        let mut counted_for = Vec::new();
        for ((name, tag), entry) in inner.tags.iter_mut() {
            let Some(r) = entry.rec.current.as_ref() else {
                continue;
            };
            if *name != rep.name || r.to != rep.hash {
                continue;
            }
            if !entry.live.hosts.contains_key(&rep.host) && entry.live.hosts.len() >= MAX_HOSTS {
                continue;
            }
            let vote = entry
                .live
                .hosts
                .entry(rep.host.clone())
                .or_insert_with(|| HostVote::new(bucket(name, tag, &rep.host)));
            vote.seen = Instant::now();
            if rep.zone.is_some() {
                vote.zone.clone_from(&rep.zone);
            }
            // A `get` on a host whose agent follows the tag says less than the agent: it never
            // takes back what the health check said.
            let checked = matches!(vote.state, HostState::Healthy | HostState::Unhealthy);
            if rep.source == ReportSource::Get && checked {
                counted_for.push(format!("{name}:{tag}#{}", r.id));
                continue;
            }
            vote.state = rep.state;
            vote.detail.clone_from(&rep.detail);
            vote.health_seen |=
                rep.health_check || matches!(rep.state, HostState::Healthy | HostState::Unhealthy);
            vote.by_get = rep.source == ReportSource::Get && !vote.health_seen;
            counted_for.push(format!("{name}:{tag}#{}", r.id));
            if self.sharing {
                inner.dirty.vote(name, tag, &rep.host);
            }
        }
        drop(guard);
        if !counted_for.is_empty() {
            self.wake.notify_one();
        }
        Ok(ReportAck { counted_for })
    }
}

/// One host's answer while a rollout is active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerHost {
    /// The version the host runs now.
    pub sha256: Sha256Hash,
    /// The version it will move to, while its phase has not come and the rollout goes on
    /// (running or paused: a halted rollout waits for an abort, and prefetching a version that
    /// failed its health checks would be wasted bytes).
    pub prefetch: Option<Sha256Hash>,
}

impl PerHost {
    fn of(r: &Rollout, in_phase: bool) -> Self {
        if in_phase {
            return Self {
                sha256: r.to,
                prefetch: None,
            };
        }
        let goes_on = matches!(r.state, RolloutState::Running { .. } | RolloutState::Paused);
        Self {
            sha256: r.from.unwrap_or(r.to),
            prefetch: (goes_on && r.from.is_some()).then_some(r.to),
        }
    }
}

/// Returns whether the host is new, or resolved from another address than before.
fn remember(seen: &mut HashMap<HostId, IpAddr>, who: &Asker) -> bool {
    let ip = who.ip.to_canonical();
    if let Some(s) = seen.get_mut(&who.host) {
        std::mem::replace(s, ip) != ip
    } else if seen.len() < MAX_HOSTS {
        seen.insert(who.host.clone(), ip);
        true
    } else {
        false
    }
}
