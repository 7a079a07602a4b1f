//! Fleet rollouts: phased, health-gated, reversible moves of a tag (issue 9, tracker side).
//!
//! A rollout moves tag `T` of package `N` from `from` (where `T` pointed) to `to` through
//! phases. While it is active (running, paused or halted) in phase `p`, a host asking for `T`
//! with `host=<id>` resolves to `to` if it is in the phases so far ([`gate`] defines the set,
//! [`fbpkg_common::rollout`] the buckets), to `from` otherwise; a request without `host=` gets
//! the tag's catalog target, which stays `from` until the rollout is done. An aborted rollout
//! sends everyone back to `from`; a done one has moved the tag to `to` in the catalog.
//!
//! State machine (durable; see [`fbpkg_common::api::RolloutState`]):
//!
//! ```text
//! start -> Running(0) -> Running(1) -> ... -> Running(last) -> Done   (gate passed + bake)
//! Running <-> Paused                                                  (pause / resume)
//! Running | Paused -> Halted(reason)                                  (failures over budget)
//! Running | Paused | Halted -> Aborted                                (abort; forced start over a halt)
//! ```
//!
//! Durable: the rollout records (the [`store`]), written before memory changes, one writer at a
//! time (`write` lock, then `inner`; never the other way). Soft: which host reported what, and
//! which address each host id last resolved from. After a restart the active rollout resumes in
//! the same phase and state; its gate starts over from the hosts' next resolves and reports.
//!
//! Done moves the catalog's tag first, then records the rollout as done: a crash between the two
//! leaves an active rollout whose tag already points at `to`, which [`Rollouts::open`] finishes.
//! A plain tag move is likewise recorded after the catalog moves; a lost record is rebuilt at
//! open from the catalog.

mod controller;
pub(crate) mod gate;
mod hosts;
pub mod shared;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fbpkg_common::Sha256Hash;
use fbpkg_common::api::{
    Rollout, RolloutRequest, RolloutState, RolloutStatus, RolloutView, TagInfo,
};
use fbpkg_common::pkgref::{PackageName, Selector, Tag};
use fbpkg_common::rollout::{HostId, MaxFailures, Phase, validate_phases};
use fbpkg_common::tracker_proto::Zone;
use tokio::time::Instant;

use crate::catalog::Catalog;
use crate::error::TrackerError;
pub use controller::run_controller;
use gate::{HostVote, Verdict};
pub use hosts::PerHost;
pub use store::{FileStore, RolloutStore, TagRollouts};

/// How long a host in the current phase that resolved but has not reported yet holds the
/// phase (it is downloading, or will resolve again at its next follow interval): past it,
/// silent, it is taken for gone.
pub const DEFAULT_HOST_TIMEOUT: Duration = Duration::from_secs(120);

/// Finished rollouts kept per tag.
pub const HISTORY_PER_TAG: usize = 50;

/// Most host ids remembered (addresses, and votes per rollout): beyond it new hosts are not
/// recorded (they resolve to `from`'s side of their bucket all the same, but cannot report),
/// so a client inventing ids cannot grow the tracker without bound.
pub const MAX_HOSTS: usize = 1_000_000;

/// Who is asking: a host id with the address the request came from.
#[derive(Debug, Clone)]
pub struct Asker {
    /// The id the host claims.
    pub host: HostId,
    /// The zone it claims.
    pub zone: Option<Zone>,
    /// The connection's address.
    pub ip: IpAddr,
}

/// An operator's action on an active rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Hold in the current phase.
    Pause,
    /// Go on from a pause.
    Resume,
    /// Send everyone back to `from`.
    Abort,
}

#[derive(Debug, Default)]
struct Live {
    rollout_id: u64,
    hosts: HashMap<HostId, HostVote>,
    /// Since when the gate has passed without a break (bake clock).
    passing_since: Option<Instant>,
    /// The phase being judged, and since when (tokio's clock; from a restart after one).
    phase_since: Option<(usize, Instant)>,
}

#[derive(Debug, Default)]
struct Entry {
    rec: TagRollouts,
    live: Live,
}

#[derive(Debug, Default)]
struct Inner {
    tags: BTreeMap<(PackageName, Tag), Entry>,
    /// Host id -> the address it last resolved from.
    seen: HashMap<HostId, IpAddr>,
    /// Votes and addresses other replicas have not heard of yet (when sharing).
    dirty: shared::Dirty,
}

/// Every tag's rollouts: durable records plus live host votes.
#[derive(Debug)]
pub struct Rollouts {
    store: Box<dyn RolloutStore>,
    inner: Mutex<Inner>,
    /// Changes and reloads, one at a time in this process (a change takes it after its hold
    /// on the tag: [`RolloutStore::hold`]).
    write: Mutex<()>,
    wake: tokio::sync::Notify,
    /// How long a host that resolved but has not reported holds its phase.
    host_timeout: Duration,
    /// Votes are shared with other replicas ([`shared`]).
    sharing: bool,
    /// A host appeared that other replicas should hear of soon.
    share_now: tokio::sync::Notify,
}

/// Wall-clock now, Unix ms (records only; gates run on tokio's clock).
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>, TrackerError> {
    m.lock().map_err(|_| {
        TrackerError::storage(
            "rollout lock",
            std::io::Error::other("a previous writer panicked"),
        )
    })
}

fn key(name: &PackageName, tag: &Tag) -> (PackageName, Tag) {
    (name.clone(), tag.clone())
}

fn push_history(rec: &mut TagRollouts, r: Rollout) {
    rec.history.push(r);
    let over = rec.history.len().saturating_sub(HISTORY_PER_TAG);
    rec.history.drain(..over);
}

/// Finish the active rollout of `rec` (if any) with `state`.
fn finish(rec: &mut TagRollouts, state: RolloutState, now_ms: u64) {
    if let Some(mut r) = rec.current.take() {
        r.state = state;
        r.updated_at = now_ms;
        push_history(rec, r);
    }
}

/// Settle what a crash, or a save that failed after the tag moved, left between a tag's
/// record and `target`, where the catalog's tag points: an active rollout whose target the
/// tag points at already is done (its last step moved the tag; only the record was not
/// saved); a tag that moved with no record of it gets a plain move. Whether `rec` changed.
fn settle(
    name: &PackageName,
    tag: &Tag,
    rec: &mut TagRollouts,
    target: Option<Sha256Hash>,
    now_ms: u64,
) -> bool {
    match &rec.current {
        Some(r) if target == Some(r.to) => {
            tracing::info!(package = %name, %tag, id = r.id, "rollout had moved the tag before its record said so; recording it done");
            finish(rec, RolloutState::Done, now_ms);
            true
        }
        Some(_) => false,
        None => {
            // Where the record says the tag is: a done rollout (or plain move) left it at its
            // `to`, an aborted one at its `from`.
            let last = rec.history.iter().rev().find_map(|r| match r.state {
                RolloutState::Done => Some(r.to),
                RolloutState::Aborted { .. } => r.from,
                _ => None,
            });
            let Some(t) = target.filter(|t| last != Some(*t)) else {
                return false;
            };
            rec.last_id += 1;
            let m = plain_move(name, tag, last, t, rec.last_id, now_ms);
            push_history(rec, m);
            true
        }
    }
}

fn current_target(catalog: &Catalog, name: &PackageName, tag: &Tag) -> Option<Sha256Hash> {
    catalog
        .resolve(name, &Selector::Tag(tag.clone()))
        .ok()
        .map(|v| v.metainfo.sha256)
}

fn plain_move(
    name: &PackageName,
    tag: &Tag,
    from: Option<Sha256Hash>,
    to: Sha256Hash,
    id: u64,
    now_ms: u64,
) -> Rollout {
    Rollout {
        id,
        name: name.clone(),
        tag: tag.clone(),
        from,
        to,
        phases: vec![Phase::Percent(100)],
        bake_ms: 0,
        max_failures: MaxFailures::Count(0),
        phase: 0,
        state: RolloutState::Done,
        started_at: now_ms,
        updated_at: now_ms,
    }
}

impl Rollouts {
    /// Load every record from `store`, and settle what a crash left between the catalog and
    /// the store (see the module doc).
    pub fn open(store: Box<dyn RolloutStore>, catalog: &Catalog) -> Result<Self, TrackerError> {
        let mut tags = BTreeMap::new();
        let now = wall_ms();
        let mut unsettled = Vec::new();
        for (name, tag, mut rec) in store.load_all()? {
            let before = rec.clone();
            let target = current_target(catalog, &name, &tag);
            // Shared: this catalog and these records are snapshots another replica may be
            // changing; settled under the tag's hold, on what is stored then, below.
            let changed = if store.shared() {
                if settle(&name, &tag, &mut rec.clone(), target, now) {
                    unsettled.push((name.clone(), tag.clone()));
                }
                false
            } else {
                settle(&name, &tag, &mut rec, target, now)
            };
            if changed {
                // This process alone writes an unshared store: no other replica to conflict
                // with (a shared one settles through `change`, below).
                store.save(&name, &tag, &before, &rec)?;
            }
            let live = Live {
                rollout_id: rec.current.as_ref().map_or(0, |r| r.id),
                ..Live::default()
            };
            tags.insert((name, tag), Entry { rec, live });
        }
        let rollouts = Self {
            store,
            inner: Mutex::new(Inner {
                tags,
                seen: HashMap::new(),
                dirty: shared::Dirty::default(),
            }),
            write: Mutex::new(()),
            wake: tokio::sync::Notify::new(),
            host_timeout: DEFAULT_HOST_TIMEOUT,
            sharing: false,
            share_now: tokio::sync::Notify::new(),
        };
        for (name, tag) in unsettled {
            // A change that changes nothing settles the record on the way. Not done now (the
            // database slow, another replica's change in the way): the next change does it.
            if let Err(e) = rollouts.change(catalog, &name, &tag, |_, _| Ok(())) {
                tracing::warn!(package = %name, %tag, error = %e, "cannot settle a rollout record at start; the next change of the tag will");
            }
        }
        Ok(rollouts)
    }

    /// Set how long a host that resolved but has not reported holds its phase.
    pub fn with_host_timeout(mut self, t: Duration) -> Self {
        self.host_timeout = t;
        self
    }

    /// One durable change of a tag's record: `f` edits a copy (and may do other durable work,
    /// such as moving the catalog's tag, before the record is saved); the copy is saved, then
    /// replaces the one in memory. Any change restarts the bake clock.
    ///
    /// With replicas the copy is the record as stored, read under the store's hold on the tag,
    /// and `f` is told where the catalog's tag points now, read from the store too: memory
    /// may be a moment behind another replica's change (an abort, a tag move), and `f` must
    /// judge what is, not what was, before it moves a tag nobody can take back. The record
    /// is settled against the tag first (see [`settle`]).
    fn change<T>(
        &self,
        catalog: &Catalog,
        name: &PackageName,
        tag: &Tag,
        f: impl FnOnce(&mut TagRollouts, Option<Sha256Hash>) -> Result<T, TrackerError>,
    ) -> Result<T, TrackerError> {
        // The tag's hold first, then this process's write lock: a wait for another replica's
        // change of this tag (up to the catalog's deadline) must not stop this replica's
        // changes of other tags, nor its reloads, which take the write lock alone.
        let held = self.store.hold(name, tag)?;
        let _w = lock(&self.write)?;
        let mut rec = match held {
            Some(_) => self.store.load_for_change(name, tag)?.unwrap_or_default(),
            None => lock(&self.inner)?
                .tags
                .get(&key(name, tag))
                .map(|e| e.rec.clone())
                .unwrap_or_default(),
        };
        let mut before = rec.clone();
        let target = catalog.tag_now(name, tag)?;
        if settle(name, tag, &mut rec, target, wall_ms()) {
            // Saved on its own: it is the truth whatever `f` makes of it, even a refusal.
            self.store.save(name, tag, &before, &rec)?;
            before = rec.clone();
        }
        let out = f(&mut rec, target).and_then(|out| {
            if rec != before {
                self.store.save(name, tag, &before, &rec)?;
            }
            Ok(out)
        });
        // Memory takes the record as stored, refused change or not: it may have been behind.
        let stored = if out.is_ok() { rec } else { before };
        self.replace(name, tag, stored)?;
        drop(held);
        out
    }

    /// Start a rollout (see [`RolloutRequest`]).
    pub fn start(
        &self,
        catalog: &Catalog,
        req: RolloutRequest,
        now_ms: u64,
    ) -> Result<Rollout, TrackerError> {
        validate_phases(&req.phases)?;
        let sel = match Selector::parse(req.to.trim())? {
            Selector::Tag(_) => {
                return Err(TrackerError::BadRequest(
                    "`to` must be a version hash (or a prefix of one)".into(),
                ));
            }
            s => s,
        };
        let to = catalog.resolve_fresh(&req.name, &sel)?.metainfo.sha256;
        let (name, tag) = (req.name.clone(), req.tag.clone());
        self.change(catalog, &name, &tag, |rec, target| {
            let from = target.ok_or_else(|| {
                TrackerError::NotFound(format!(
                    "{name} has no tag {tag}: a rollout moves an existing tag (set it first with PUT /api/v1/packages/{name}/tags/{tag})"
                ))
            })?;
            if from == to {
                return Err(TrackerError::Conflict(format!("{name}:{tag} already points at {to}")));
            }
            match &rec.current {
                Some(r @ Rollout { state: RolloutState::Halted { .. }, .. }) if req.force => {
                    let id = r.id;
                    tracing::warn!(package = %name, %tag, id, "halted rollout superseded by a forced start");
                    finish(rec, RolloutState::Aborted { reason: format!("superseded by rollout {} (forced)", rec.last_id + 1) }, now_ms);
                }
                Some(r @ Rollout { state: RolloutState::Halted { .. }, .. }) => {
                    return Err(TrackerError::Conflict(format!(
                        "rollout {} of {name}:{tag} is halted; abort it first or start with force",
                        r.id
                    )));
                }
                Some(r) => {
                    return Err(TrackerError::Conflict(format!(
                        "rollout {} of {name}:{tag} is already active; abort it first",
                        r.id
                    )));
                }
                None => {}
            }
            rec.last_id += 1;
            let r = Rollout {
                id: rec.last_id,
                name: name.clone(),
                tag: tag.clone(),
                from: Some(from),
                to,
                phases: req.phases.clone(),
                bake_ms: req.bake_ms,
                max_failures: req.max_failures,
                phase: 0,
                state: RolloutState::Running { phase_started: now_ms },
                started_at: now_ms,
                updated_at: now_ms,
            };
            rec.current = Some(r.clone());
            Ok(r)
        })
    }

    /// Pause, resume or abort the active rollout of `name:tag`.
    pub fn control(
        &self,
        catalog: &Catalog,
        name: &PackageName,
        tag: &Tag,
        action: Action,
        now_ms: u64,
    ) -> Result<Rollout, TrackerError> {
        self.change(catalog, name, tag, |rec, _| {
            let Some(r) = rec.current.as_mut() else {
                return Err(TrackerError::NotFound(format!(
                    "{name}:{tag} has no active rollout"
                )));
            };
            let bad = |what: &str| {
                Err(TrackerError::Conflict(format!(
                    "rollout {} of {name}:{tag} is {what}",
                    r.id
                )))
            };
            match (action, &r.state) {
                (Action::Pause, RolloutState::Running { .. }) => r.state = RolloutState::Paused,
                (Action::Pause, RolloutState::Paused) => {}
                (Action::Resume, RolloutState::Paused) => {
                    r.state = RolloutState::Running {
                        phase_started: now_ms,
                    }
                }
                (Action::Resume, RolloutState::Running { .. }) => {}
                (Action::Pause | Action::Resume, RolloutState::Halted { .. }) => {
                    return bad("halted; abort it (or start a new one with force)");
                }
                (Action::Abort, _) => {
                    let mut done = r.clone();
                    done.state = RolloutState::Aborted {
                        reason: "aborted by an operator".into(),
                    };
                    done.updated_at = now_ms;
                    rec.current = None;
                    push_history(rec, done.clone());
                    return Ok(done);
                }
                (_, RolloutState::Aborted { .. } | RolloutState::Done) => return bad("finished"),
            }
            r.updated_at = now_ms;
            Ok(r.clone())
        })
    }

    /// Move a tag at once (today's API), recorded as a one-phase rollout that is done. Refused
    /// while a rollout of the tag is active.
    pub fn move_tag_plain(
        &self,
        catalog: &Catalog,
        name: &PackageName,
        tag: &Tag,
        target: &str,
        now_ms: u64,
    ) -> Result<TagInfo, TrackerError> {
        self.change(catalog, name, tag, |rec, from| {
            if let Some(r) = &rec.current {
                return Err(TrackerError::Conflict(format!(
                    "rollout {} of {name}:{tag} is active; abort it before moving the tag",
                    r.id
                )));
            }
            let info = catalog.move_tag(name, tag, target)?;
            if from != Some(info.sha256) {
                rec.last_id += 1;
                let m = plain_move(name, tag, from, info.sha256, rec.last_id, now_ms);
                push_history(rec, m);
            }
            Ok(info)
        })
    }

    /// Run every active rollout's gate once: halt, advance, or finish (moving the catalog's
    /// tag). `now` is tokio's clock (bake), `now_ms` the wall clock (records).
    pub fn tick(&self, catalog: &Catalog, now: Instant, now_ms: u64) -> Result<(), TrackerError> {
        enum Step {
            Halt(String),
            /// Out of this phase.
            Advance(usize),
        }
        let mut steps = Vec::new();
        {
            let mut inner = lock(&self.inner)?;
            for ((name, tag), entry) in inner.tags.iter_mut() {
                let Some(r) = entry.rec.current.as_ref() else {
                    continue;
                };
                let running = matches!(r.state, RolloutState::Running { .. });
                if !running && r.state != RolloutState::Paused {
                    continue;
                }
                let since = match entry.live.phase_since {
                    Some((p, t)) if p == r.phase => t,
                    _ => entry.live.phase_since.insert((r.phase, now)).1,
                };
                let age = now.saturating_duration_since(since);
                match gate::judge(r, &entry.live.hosts, now, self.host_timeout, age) {
                    Verdict::Halt(reason) => {
                        steps.push((name.clone(), tag.clone(), r.id, Step::Halt(reason)))
                    }
                    Verdict::Pass if running => {
                        let since = *entry.live.passing_since.get_or_insert(now);
                        if now.duration_since(since) >= Duration::from_millis(r.bake_ms) {
                            let step = Step::Advance(r.phase);
                            steps.push((name.clone(), tag.clone(), r.id, step));
                        }
                    }
                    Verdict::Pass | Verdict::Wait => entry.live.passing_since = None,
                }
            }
        }
        // Each tag's step on its own: one that fails on every tick (its store, its version)
        // must not keep the others from advancing, or from halting on unhealthy hosts.
        let mut first_failure = None;
        for (name, tag, id, step) in steps {
            let done = self.change(catalog, &name, &tag, |rec, _| {
                // Judged again on the record as it is: an operator may have acted meanwhile,
                // here or on another replica. A paused rollout may halt, never advance.
                let Some(r) = rec.current.as_mut().filter(|r| r.id == id) else {
                    return Ok(());
                };
                let still = match (&step, &r.state) {
                    (Step::Halt(_), RolloutState::Running { .. } | RolloutState::Paused) => true,
                    (Step::Advance(p), RolloutState::Running { .. }) => *p == r.phase,
                    _ => false,
                };
                if !still {
                    return Ok(());
                }
                match step {
                    Step::Halt(reason) => {
                        tracing::warn!(package = %name, %tag, id, %reason, "rollout halted");
                        r.state = RolloutState::Halted { reason };
                        r.updated_at = now_ms;
                    }
                    Step::Advance(_) if r.phase + 1 < r.phases.len() => {
                        r.phase += 1;
                        r.state = RolloutState::Running { phase_started: now_ms };
                        r.updated_at = now_ms;
                        tracing::info!(package = %name, %tag, id, phase = %r.phases[r.phase], "rollout entered the next phase");
                    }
                    Step::Advance(_) => {
                        catalog.move_tag(&name, &tag, &r.to.to_hex())?;
                        tracing::info!(package = %name, %tag, id, to = %r.to, "rollout done; tag moved");
                        finish(rec, RolloutState::Done, now_ms);
                    }
                }
                Ok(())
            });
            if let Err(e) = done {
                // The database away is every tag's failure: each would wait out its deadline
                // in turn, the tick N deadlines long. Tried again at the next tick.
                if matches!(e, TrackerError::Unavailable(_)) {
                    return Err(e);
                }
                tracing::warn!(package = %name, %tag, error = %e, "a rollout's step could not be recorded; tried again at the next tick");
                first_failure.get_or_insert(e);
            }
        }
        first_failure.map_or(Ok(()), Err)
    }

    /// Is some rollout running or paused (a gate to run)?
    pub fn has_active(&self) -> bool {
        lock(&self.inner).is_ok_and(|inner| {
            inner
                .tags
                .values()
                .any(|e| e.rec.current.as_ref().is_some_and(|r| r.state.is_active()))
        })
    }

    /// Read one tag's record from the store again: another replica changed it.
    pub fn reload(&self, name: &PackageName, tag: &Tag) -> Result<(), TrackerError> {
        let _w = lock(&self.write)?;
        let Some(rec) = self.store.load(name, tag)? else {
            return Ok(());
        };
        self.replace(name, tag, rec)
    }

    /// Read every record from the store again (changes may have been missed).
    pub fn reload_all(&self) -> Result<(), TrackerError> {
        let _w = lock(&self.write)?;
        for (name, tag, rec) in self.store.load_all()? {
            self.replace(&name, &tag, rec)?;
        }
        Ok(())
    }

    /// Put `rec`, as stored, in memory for a tag. Host reports stay while the rollout is the
    /// same one; any change (here or on another replica: a pause, a phase) restarts the bake
    /// clock.
    fn replace(&self, name: &PackageName, tag: &Tag, rec: TagRollouts) -> Result<(), TrackerError> {
        let mut inner = lock(&self.inner)?;
        let entry = inner.tags.entry(key(name, tag)).or_default();
        if entry.rec == rec {
            return Ok(());
        }
        let id = rec.current.as_ref().map_or(0, |r| r.id);
        if entry.live.rollout_id != id {
            entry.live = Live {
                rollout_id: id,
                ..Live::default()
            };
        }
        entry.live.passing_since = None;
        entry.rec = rec;
        drop(inner);
        self.wake.notify_one();
        Ok(())
    }

    /// Wait until a report or a change may have moved a gate.
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    /// Every active rollout with its progress.
    pub fn active(&self) -> Vec<RolloutView> {
        let Ok(inner) = lock(&self.inner) else {
            return Vec::new();
        };
        inner.tags.values().filter_map(view).collect()
    }

    /// The last `per_tag` finished rollouts (and plain tag moves) of every tag: tags in name
    /// order, newest first within a tag.
    pub fn recent_history(&self, per_tag: usize) -> Vec<Rollout> {
        let Ok(inner) = lock(&self.inner) else {
            return Vec::new();
        };
        inner
            .tags
            .values()
            .flat_map(|e| e.rec.history.iter().rev().take(per_tag).cloned())
            .collect()
    }

    /// One tag's active rollout and history (`None`: nothing recorded for it).
    pub fn status(&self, name: &PackageName, tag: &Tag) -> Option<RolloutStatus> {
        let inner = lock(&self.inner).ok()?;
        let e = inner.tags.get(&key(name, tag))?;
        Some(RolloutStatus {
            current: view(e),
            history: e.rec.history.clone(),
        })
    }
}

fn view(e: &Entry) -> Option<RolloutView> {
    let r = e.rec.current.as_ref()?;
    let (phase_counts, waiting, failed_hosts) = gate::progress(r, &e.live.hosts);
    Some(RolloutView {
        rollout: r.clone(),
        phase_counts,
        waiting,
        failed_hosts,
    })
}
