//! Host votes shared by replicas (`--catalog postgres://...`).
//!
//! A host resolves and reports to whichever replica its load balancer picks, and the rollout
//! controller runs on one replica: without sharing, it would judge only the hosts that talk to
//! it. So each replica records votes as before (in memory, on the serving path, no I/O) and
//! marks them dirty; a task ([`crate::server`]) pushes dirty votes and host addresses to the
//! unlogged tables `rollout_hosts` and `host_addrs` every `--rollout-tick` (sooner when a host
//! first appears), and, while a rollout is active, pulls what other replicas pushed and merges
//! it: the newest word of a host wins, by the wall clock the replicas share.
//!
//! A report for a host that resolved on another replica a moment ago is checked against
//! `host_addrs` before it is refused ([`Rollouts::learn_host`]).

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use fbpkg_common::api::HostState;
use fbpkg_common::pkgref::{PackageName, Tag};
use fbpkg_common::rollout::{HostId, bucket};
use fbpkg_common::tracker_proto::Zone;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::gate::HostVote;
use super::{MAX_HOSTS, Rollouts, key, lock, wall_ms};
use crate::error::TrackerError;
use crate::postgres::Pg;

/// One host's vote on one tag's rollout, as replicas exchange it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedVote {
    /// The tag's package.
    pub name: PackageName,
    /// The tag.
    pub tag: Tag,
    /// The host.
    pub host: HostId,
    /// The rollout voted on.
    pub rollout_id: u64,
    /// What it said.
    pub vote: VoteBody,
    /// When it last resolved or reported, Unix ms.
    pub seen_ms: u64,
}

/// [`HostVote`] without its clock and bucket (both are local).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoteBody {
    zone: Option<String>,
    state: HostState,
    detail: Option<String>,
    health_seen: bool,
    by_get: bool,
}

/// A host's address as replicas exchange it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedAddr {
    /// The host.
    pub host: HostId,
    /// The address it last resolved from.
    pub ip: IpAddr,
    /// When, Unix ms.
    pub seen_ms: u64,
}

/// What is waiting to be pushed.
#[derive(Debug, Default)]
pub(super) struct Dirty {
    votes: HashSet<(PackageName, Tag, HostId)>,
    addrs: HashSet<HostId>,
}

impl Dirty {
    pub(super) fn vote(&mut self, name: &PackageName, tag: &Tag, host: &HostId) {
        if self.votes.len() < MAX_HOSTS {
            self.votes.insert((name.clone(), tag.clone(), host.clone()));
        }
    }

    /// Returns whether the host is new to the set (worth an early push).
    pub(super) fn addr(&mut self, host: &HostId) -> bool {
        self.addrs.len() < MAX_HOSTS && self.addrs.insert(host.clone())
    }
}

/// Unix ms of a tokio instant (the past, relative to now).
fn to_wall(at: Instant) -> u64 {
    let ago = Instant::now().saturating_duration_since(at);
    wall_ms().saturating_sub(u64::try_from(ago.as_millis()).unwrap_or(u64::MAX))
}

/// The tokio instant of a Unix ms (never in the future).
fn from_wall(ms: u64) -> Instant {
    let ago = Duration::from_millis(wall_ms().saturating_sub(ms));
    Instant::now().checked_sub(ago).unwrap_or_else(Instant::now)
}

impl Rollouts {
    /// Record votes for other replicas from now on.
    pub fn with_sharing(mut self) -> Self {
        self.sharing = true;
        self
    }

    /// Wait until a host appeared that other replicas should hear of soon.
    pub async fn host_appeared(&self) {
        self.share_now.notified().await;
    }

    /// What changed here since the last call: votes of active rollouts and host addresses.
    pub fn take_dirty(&self) -> (Vec<SharedVote>, Vec<SharedAddr>) {
        let Ok(mut inner) = lock(&self.inner) else {
            return (Vec::new(), Vec::new());
        };
        let dirty = std::mem::take(&mut inner.dirty);
        let mut votes = Vec::with_capacity(dirty.votes.len());
        for (name, tag, host) in dirty.votes {
            let Some(entry) = inner.tags.get(&key(&name, &tag)) else {
                continue;
            };
            let Some(v) = entry.live.hosts.get(&host) else {
                continue;
            };
            votes.push(SharedVote {
                rollout_id: entry.live.rollout_id,
                vote: VoteBody {
                    zone: v.zone.as_ref().map(|z| z.as_str().to_owned()),
                    state: v.state,
                    detail: v.detail.clone(),
                    health_seen: v.health_seen,
                    by_get: v.by_get,
                },
                seen_ms: to_wall(v.seen),
                name,
                tag,
                host,
            });
        }
        let now = wall_ms();
        let addrs = dirty
            .addrs
            .into_iter()
            .filter_map(|host| {
                let ip = *inner.seen.get(&host)?;
                Some(SharedAddr {
                    host,
                    ip,
                    seen_ms: now,
                })
            })
            .collect();
        (votes, addrs)
    }

    /// Take in what other replicas pushed: a vote replaces ours when it is newer, for the
    /// same rollout; an address is learnt when we have none for the host.
    pub fn merge_shared(&self, votes: Vec<SharedVote>, addrs: Vec<SharedAddr>) {
        let Ok(mut inner) = lock(&self.inner) else {
            return;
        };
        let mut changed = false;
        for v in votes {
            let Some(entry) = inner.tags.get_mut(&key(&v.name, &v.tag)) else {
                continue;
            };
            if entry.live.rollout_id != v.rollout_id {
                continue;
            }
            let seen = from_wall(v.seen_ms);
            let room = entry.live.hosts.len() < MAX_HOSTS;
            // Our own votes come back too, a millisecond apart at most (rounding).
            let newer = match entry.live.hosts.get(&v.host) {
                Some(local) => seen > local.seen + Duration::from_millis(1),
                None => room,
            };
            if !newer {
                continue;
            }
            let mut vote = HostVote::new(bucket(&v.name, &v.tag, &v.host));
            vote.zone = v.vote.zone.as_deref().and_then(|z| Zone::new(z).ok());
            vote.state = v.vote.state;
            vote.detail = v.vote.detail;
            vote.health_seen = v.vote.health_seen;
            vote.by_get = v.vote.by_get;
            vote.seen = seen;
            entry.live.hosts.insert(v.host, vote);
            changed = true;
        }
        for a in addrs {
            if inner.seen.len() < MAX_HOSTS || inner.seen.contains_key(&a.host) {
                inner.seen.entry(a.host).or_insert(a.ip);
            }
        }
        drop(inner);
        if changed {
            self.wake.notify_one();
        }
    }

    /// Has `host` resolved through this replica (or been heard of from another)?
    pub fn knows_host(&self, host: &HostId) -> bool {
        lock(&self.inner).is_ok_and(|i| i.seen.contains_key(host))
    }

    /// Learn where `host` last resolved from, as another replica recorded it.
    pub fn learn_host(&self, host: HostId, ip: IpAddr) {
        if let Ok(mut inner) = lock(&self.inner)
            && (inner.seen.len() < MAX_HOSTS || inner.seen.contains_key(&host))
        {
            inner.seen.insert(host, ip);
        }
    }
}

/// Push votes and addresses (newest wins per host).
pub fn push(pg: &Pg, votes: &[SharedVote], addrs: &[SharedAddr]) -> Result<(), TrackerError> {
    if votes.is_empty() && addrs.is_empty() {
        return Ok(());
    }
    let rows: Vec<(String, String, String, i64, serde_json::Value, i64)> = votes
        .iter()
        .map(|v| {
            (
                v.name.as_str().to_owned(),
                v.tag.as_str().to_owned(),
                v.host.as_str().to_owned(),
                i64::try_from(v.rollout_id).unwrap_or(i64::MAX),
                serde_json::to_value(&v.vote).unwrap_or_default(),
                i64::try_from(v.seen_ms).unwrap_or(i64::MAX),
            )
        })
        .collect();
    let addr_rows: Vec<(String, String, i64)> = addrs
        .iter()
        .map(|a| {
            (
                a.host.as_str().to_owned(),
                a.ip.to_string(),
                i64::try_from(a.seen_ms).unwrap_or(i64::MAX),
            )
        })
        .collect();
    pg.run("sharing host votes", |mut db| async move {
        let tx = db.transaction().await?;
        let vote = tx
            .prepare(
                "INSERT INTO rollout_hosts (name, tag, host, rollout_id, vote, seen_ms)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (name, tag, host) DO UPDATE
                 SET rollout_id = EXCLUDED.rollout_id, vote = EXCLUDED.vote,
                     seen_ms = EXCLUDED.seen_ms
                 WHERE rollout_hosts.seen_ms <= EXCLUDED.seen_ms",
            )
            .await?;
        for (n, t, h, id, v, ms) in &rows {
            tx.execute(&vote, &[n, t, h, id, v, ms]).await?;
        }
        let addr = tx
            .prepare(
                "INSERT INTO host_addrs (host, ip, seen_ms) VALUES ($1, $2, $3)
                 ON CONFLICT (host) DO UPDATE SET ip = EXCLUDED.ip, seen_ms = EXCLUDED.seen_ms
                 WHERE host_addrs.seen_ms <= EXCLUDED.seen_ms",
            )
            .await?;
        for (h, ip, ms) in &addr_rows {
            tx.execute(&addr, &[h, ip, ms]).await?;
        }
        tx.commit().await
    })
}

/// Votes and addresses pushed since `since_ms` (by any replica, ours included).
pub fn pull(pg: &Pg, since_ms: u64) -> Result<(Vec<SharedVote>, Vec<SharedAddr>), TrackerError> {
    let since = i64::try_from(since_ms).unwrap_or(i64::MAX);
    let (votes, addrs) = pg.run("reading shared host votes", |db| async move {
        let votes = db
            .query(
                "SELECT name, tag, host, rollout_id, vote, seen_ms FROM rollout_hosts
                 WHERE seen_ms > $1",
                &[&since],
            )
            .await?;
        let addrs = db
            .query(
                "SELECT host, ip, seen_ms FROM host_addrs WHERE seen_ms > $1",
                &[&since],
            )
            .await?;
        Ok((votes, addrs))
    })?;
    let ms = |v: i64| u64::try_from(v).unwrap_or(0);
    let votes = votes
        .iter()
        .filter_map(|r| {
            Some(SharedVote {
                name: PackageName::new(r.get::<_, &str>(0)).ok()?,
                tag: Tag::new(r.get::<_, &str>(1)).ok()?,
                host: HostId::new(r.get::<_, &str>(2)).ok()?,
                rollout_id: ms(r.get(3)),
                vote: serde_json::from_value(r.get(4)).ok()?,
                seen_ms: ms(r.get(5)),
            })
        })
        .collect();
    let addrs = addrs
        .iter()
        .filter_map(|r| {
            Some(SharedAddr {
                host: HostId::new(r.get::<_, &str>(0)).ok()?,
                ip: r.get::<_, &str>(1).parse().ok()?,
                seen_ms: ms(r.get(2)),
            })
        })
        .collect();
    Ok((votes, addrs))
}

/// Where `host` last resolved from, as any replica recorded it.
pub fn host_addr(pg: &Pg, host: &HostId) -> Result<Option<IpAddr>, TrackerError> {
    let h = host.as_str();
    let ip = pg.run("looking up a host", |db| async move {
        db.query_opt("SELECT ip FROM host_addrs WHERE host = $1", &[&h])
            .await
            .map(|r| r.map(|r| r.get::<_, String>(0)))
    })?;
    Ok(ip.and_then(|ip| ip.parse().ok()))
}
