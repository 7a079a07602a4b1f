//! Counters and a latency histogram, rendered as Prometheus text. Lock-free atomics: the
//! announce path pays a few relaxed increments.
//!
//! Rollout gauges ([`render_rollouts`]) are computed at scrape time from the active rollouts,
//! like the swarm and catalog gauges: nothing is counted on the report path.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use fbpkg_common::api::{RolloutState, RolloutView};

/// Outcome of one announce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnnounceOutcome {
    /// Served with peers.
    Ok,
    /// Unknown info-hash.
    Unregistered,
    /// The query could not be parsed.
    Malformed,
    /// Swarm or tracker at capacity.
    Full,
    /// The announcing address already has the most peers allowed in the swarm.
    AddressLimit,
    /// The peer store (Redis) did not answer in time or failed.
    StoreUnavailable,
}

impl AnnounceOutcome {
    const ALL: [AnnounceOutcome; 6] = [
        AnnounceOutcome::Ok,
        AnnounceOutcome::Unregistered,
        AnnounceOutcome::Malformed,
        AnnounceOutcome::Full,
        AnnounceOutcome::AddressLimit,
        AnnounceOutcome::StoreUnavailable,
    ];
    /// The `outcome` label, and what a log line says.
    pub fn label(self) -> &'static str {
        match self {
            AnnounceOutcome::Ok => "ok",
            AnnounceOutcome::Unregistered => "unregistered",
            AnnounceOutcome::Malformed => "malformed",
            AnnounceOutcome::Full => "full",
            AnnounceOutcome::AddressLimit => "address_limit",
            AnnounceOutcome::StoreUnavailable => "store_unavailable",
        }
    }
}

/// Why the front closed a connection against the client's wish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cutoff {
    /// Accepted while the listener was at its connection cap.
    OverCap,
    /// A request head did not arrive whole in time. hyper cannot tell an idle keep-alive
    /// connection from a slow head, so on connections handed to the router both count.
    HeadTimeout,
    /// A response could not be written whole in time.
    WriteTimeout,
}

impl Cutoff {
    const ALL: [Cutoff; 3] = [Cutoff::OverCap, Cutoff::HeadTimeout, Cutoff::WriteTimeout];
    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            Cutoff::OverCap => "over_cap",
            Cutoff::HeadTimeout => "head_timeout",
            Cutoff::WriteTimeout => "write_timeout",
        }
    }
}

/// Routes whose latency is tracked separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/announce`
    Announce,
    /// `/scrape`
    Scrape,
    /// `/api/v1/...`
    Api,
    /// `/` and everything else.
    Other,
}

impl Route {
    const ALL: [Route; 4] = [Route::Announce, Route::Scrape, Route::Api, Route::Other];
    fn label(self) -> &'static str {
        match self {
            Route::Announce => "announce",
            Route::Scrape => "scrape",
            Route::Api => "api",
            Route::Other => "other",
        }
    }
    /// Classify a request path.
    pub fn of(path: &str) -> Route {
        match path {
            "/announce" => Route::Announce,
            "/scrape" => Route::Scrape,
            p if p.starts_with("/api/") => Route::Api,
            _ => Route::Other,
        }
    }
}

/// Upper bounds of the latency buckets, in microseconds.
const BUCKETS_US: [u64; 12] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000, 10_000_000,
];

#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS_US.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

/// Where a replica on Redis took an announce's peers from (`peer_store::mirror`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnsweredFrom {
    /// Its copy of the swarm.
    Copy,
    /// Its copy, loaded by this announce.
    Load,
    /// A draw in Redis (no copy yet, or no subscription).
    Draw,
}

impl AnsweredFrom {
    const ALL: [AnsweredFrom; 3] = [AnsweredFrom::Copy, AnsweredFrom::Load, AnsweredFrom::Draw];

    fn label(self) -> &'static str {
        match self {
            AnsweredFrom::Copy => "copy",
            AnsweredFrom::Load => "load",
            AnsweredFrom::Draw => "draw",
        }
    }
}

/// How a replica on Redis wrote an announce (`peer_store::redis_store`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WrittenBy {
    /// Plain commands, in a `MULTI` (a swarm with a copy, the peer known or well under the
    /// limits).
    Plain,
    /// `announce.lua`.
    Script,
}

impl WrittenBy {
    const ALL: [WrittenBy; 2] = [WrittenBy::Plain, WrittenBy::Script];

    fn label(self) -> &'static str {
        match self {
            WrittenBy::Plain => "plain",
            WrittenBy::Script => "script",
        }
    }
}

/// The tracker's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    announces: [AtomicU64; AnnounceOutcome::ALL.len()],
    answered_from: [AtomicU64; AnsweredFrom::ALL.len()],
    written_by: [AtomicU64; WrittenBy::ALL.len()],
    cutoffs: [AtomicU64; Cutoff::ALL.len()],
    scrapes: AtomicU64,
    publishes: AtomicU64,
    latency: [Histogram; 4],
}

impl Metrics {
    /// Count one announce.
    pub fn announce(&self, outcome: AnnounceOutcome) {
        self.announces[outcome as usize].fetch_add(1, Relaxed);
    }

    /// Count where a replica on Redis took one answer's peers from.
    pub fn answered_from(&self, from: AnsweredFrom) {
        self.answered_from[from as usize].fetch_add(1, Relaxed);
    }

    /// Answers taken from `from` so far.
    pub fn answers_from(&self, from: AnsweredFrom) -> u64 {
        self.answered_from[from as usize].load(Relaxed)
    }

    /// Count one announce a replica on Redis wrote `by`.
    pub fn written_by(&self, by: WrittenBy) {
        self.written_by[by as usize].fetch_add(1, Relaxed);
    }

    /// Announces written `by` so far.
    pub fn writes_by(&self, by: WrittenBy) -> u64 {
        self.written_by[by as usize].load(Relaxed)
    }

    /// Count one connection closed by the front.
    pub fn cutoff(&self, why: Cutoff) {
        self.cutoffs[why as usize].fetch_add(1, Relaxed);
    }

    /// Connections closed for `why` so far.
    pub fn cutoffs(&self, why: Cutoff) -> u64 {
        self.cutoffs[why as usize].load(Relaxed)
    }

    /// Count one scrape.
    pub fn scrape(&self) {
        self.scrapes.fetch_add(1, Relaxed);
    }

    /// Count one accepted publish.
    pub fn publish(&self) {
        self.publishes.fetch_add(1, Relaxed);
    }

    /// Record a request's latency.
    pub fn observe(&self, route: Route, took: Duration) {
        let h = &self.latency[route as usize];
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        if let Some(i) = BUCKETS_US.iter().position(|&b| us <= b) {
            h.buckets[i].fetch_add(1, Relaxed);
        }
        h.count.fetch_add(1, Relaxed);
        h.sum_us.fetch_add(us, Relaxed);
    }

    /// Announces counted with `outcome` so far.
    pub fn announces(&self, outcome: AnnounceOutcome) -> u64 {
        self.announces[outcome as usize].load(Relaxed)
    }

    /// Prometheus text exposition; `gauges` are the current state (swarms, peers, catalog).
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP fbpkg_tracker_announces_total Announces by outcome.\n");
        out.push_str("# TYPE fbpkg_tracker_announces_total counter\n");
        for o in AnnounceOutcome::ALL {
            let _ = writeln!(
                out,
                "fbpkg_tracker_announces_total{{outcome=\"{}\"}} {}",
                o.label(),
                self.announces(o)
            );
        }
        out.push_str(
            "# HELP fbpkg_tracker_redis_answers_total With --peer-store redis: where announces' \
             peers came from (this replica's copy of the swarm, the copy's load, or a draw in \
             Redis).\n# TYPE fbpkg_tracker_redis_answers_total counter\n",
        );
        for f in AnsweredFrom::ALL {
            let _ = writeln!(
                out,
                "fbpkg_tracker_redis_answers_total{{from=\"{}\"}} {}",
                f.label(),
                self.answers_from(f)
            );
        }
        out.push_str(
            "# HELP fbpkg_tracker_redis_writes_total With --peer-store redis: how announces were \
             written (plain commands for a swarm this replica holds a copy of, or the announce \
             script).\n# TYPE fbpkg_tracker_redis_writes_total counter\n",
        );
        for b in WrittenBy::ALL {
            let _ = writeln!(
                out,
                "fbpkg_tracker_redis_writes_total{{by=\"{}\"}} {}",
                b.label(),
                self.writes_by(b)
            );
        }
        out.push_str(
            "# HELP fbpkg_tracker_connections_cut_total Connections the tracker closed: over the \
             connection cap, or a request head or response not done in time (on connections \
             handed to the router, a keep-alive wait past the head timeout counts as one).\n\
             # TYPE fbpkg_tracker_connections_cut_total counter\n",
        );
        for c in Cutoff::ALL {
            let _ = writeln!(
                out,
                "fbpkg_tracker_connections_cut_total{{reason=\"{}\"}} {}",
                c.label(),
                self.cutoffs(c)
            );
        }
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        counter(
            &mut out,
            "fbpkg_tracker_scrapes_total",
            "Scrape requests.",
            self.scrapes.load(Relaxed),
        );
        counter(
            &mut out,
            "fbpkg_tracker_publishes_total",
            "Versions newly published.",
            self.publishes.load(Relaxed),
        );
        let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            &mut out,
            "fbpkg_tracker_connections",
            "Connections open on the tracker listener (not counting those answered on accept).",
            gauges.connections,
        );
        gauge(
            &mut out,
            "fbpkg_tracker_swarms",
            "Swarms known.",
            gauges.swarms,
        );
        out.push_str(
            "# HELP fbpkg_tracker_peers Peers in all swarms.\n# TYPE fbpkg_tracker_peers gauge\n",
        );
        let _ = writeln!(
            out,
            "fbpkg_tracker_peers{{role=\"seeder\"}} {}",
            gauges.seeders
        );
        let _ = writeln!(
            out,
            "fbpkg_tracker_peers{{role=\"leecher\"}} {}",
            gauges.leechers
        );
        gauge(
            &mut out,
            "fbpkg_tracker_catalog_packages",
            "Packages in the catalog.",
            gauges.packages,
        );
        gauge(
            &mut out,
            "fbpkg_tracker_catalog_versions",
            "Versions in the catalog.",
            gauges.versions,
        );
        gauge(
            &mut out,
            "fbpkg_tracker_catalog_bytes",
            "Sum of version sizes.",
            gauges.catalog_bytes,
        );
        if let Some((following, copies)) = gauges.copies {
            gauge(
                &mut out,
                "fbpkg_tracker_redis_following",
                "With --peer-store redis: 1 while this replica follows the changes published by \
                 all (its copies of swarms are kept), else 0.",
                u64::from(following),
            );
            gauge(
                &mut out,
                "fbpkg_tracker_redis_copies",
                "Swarms this replica keeps a copy of.",
                copies,
            );
        }
        out.push_str("# HELP fbpkg_tracker_request_duration_seconds Request latency by route.\n");
        out.push_str("# TYPE fbpkg_tracker_request_duration_seconds histogram\n");
        for r in Route::ALL {
            let h = &self.latency[r as usize];
            let mut cumulative = 0;
            for (i, b) in BUCKETS_US.iter().enumerate() {
                cumulative += h.buckets[i].load(Relaxed);
                let _ = writeln!(
                    out,
                    "fbpkg_tracker_request_duration_seconds_bucket{{route=\"{}\",le=\"{}\"}} {cumulative}",
                    r.label(),
                    *b as f64 / 1e6
                );
            }
            let count = h.count.load(Relaxed);
            let _ = writeln!(
                out,
                "fbpkg_tracker_request_duration_seconds_bucket{{route=\"{0}\",le=\"+Inf\"}} {count}\n\
                 fbpkg_tracker_request_duration_seconds_sum{{route=\"{0}\"}} {1}\n\
                 fbpkg_tracker_request_duration_seconds_count{{route=\"{0}\"}} {count}",
                r.label(),
                h.sum_us.load(Relaxed) as f64 / 1e6
            );
        }
        out
    }
}

/// Current-state values for [`Metrics::render`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    /// Swarms.
    pub swarms: u64,
    /// Seeders across swarms.
    pub seeders: u64,
    /// Leechers across swarms.
    pub leechers: u64,
    /// Catalog packages.
    pub packages: u64,
    /// Catalog versions.
    pub versions: u64,
    /// Catalog bytes.
    pub catalog_bytes: u64,
    /// Open connections.
    pub connections: u64,
    /// With Redis: whether this replica follows the published changes, and the swarms it
    /// keeps a copy of.
    pub copies: Option<(bool, u64)>,
}

/// The `state` label of a rollout (and what the dashboard shows).
pub(crate) fn rollout_state_label(s: &RolloutState) -> &'static str {
    match s {
        RolloutState::Running { .. } => "running",
        RolloutState::Paused => "paused",
        RolloutState::Halted { .. } => "halted",
        RolloutState::Aborted { .. } => "aborted",
        RolloutState::Done => "done",
    }
}

/// Escape a label value per the text exposition format: backslash, double quote, line feed.
fn label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Append the rollout gauges of `views` (the active rollouts) to a [`Metrics::render`] text.
/// Phases are numbered from 1, as in halt reasons; each host counts once, in the first phase
/// holding it, under its latest report.
pub fn render_rollouts(out: &mut String, views: &[RolloutView]) {
    let head = |out: &mut String, name: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    };
    let ids: Vec<String> = views
        .iter()
        .map(|v| {
            format!(
                "package=\"{}\",tag=\"{}\"",
                label(v.rollout.name.as_str()),
                label(v.rollout.tag.as_str())
            )
        })
        .collect();
    head(
        out,
        "fbpkg_tracker_rollouts_active",
        "Rollouts running, paused or halted (one per tag at most).",
    );
    let _ = writeln!(out, "fbpkg_tracker_rollouts_active {}", views.len());
    head(
        out,
        "fbpkg_tracker_rollout_state",
        "State of each active rollout: 1 for its current state, 0 for the others.",
    );
    for (v, id) in views.iter().zip(&ids) {
        let now = rollout_state_label(&v.rollout.state);
        for st in ["running", "paused", "halted"] {
            let _ = writeln!(
                out,
                "fbpkg_tracker_rollout_state{{{id},state=\"{st}\"}} {}",
                u8::from(st == now)
            );
        }
    }
    head(
        out,
        "fbpkg_tracker_rollout_phase",
        "Current phase of each active rollout, counting from 1.",
    );
    for (v, id) in views.iter().zip(&ids) {
        let _ = writeln!(
            out,
            "fbpkg_tracker_rollout_phase{{{id}}} {}",
            v.rollout.phase + 1
        );
    }
    head(
        out,
        "fbpkg_tracker_rollout_phases",
        "Phases of each active rollout.",
    );
    for (v, id) in views.iter().zip(&ids) {
        let _ = writeln!(
            out,
            "fbpkg_tracker_rollout_phases{{{id}}} {}",
            v.rollout.phases.len()
        );
    }
    head(
        out,
        "fbpkg_tracker_rollout_hosts",
        "Hosts of each active rollout by phase (from 1; a host counts in the first phase holding \
         it) and latest report (resolved, fetched, activated, healthy, unhealthy).",
    );
    for (v, id) in views.iter().zip(&ids) {
        for (i, c) in v.phase_counts.iter().enumerate() {
            for (st, n) in [
                ("resolved", c.resolved),
                ("fetched", c.fetched),
                ("activated", c.activated),
                ("healthy", c.healthy),
                ("unhealthy", c.unhealthy),
            ] {
                let _ = writeln!(
                    out,
                    "fbpkg_tracker_rollout_hosts{{{id},phase=\"{}\",state=\"{st}\"}} {n}",
                    i + 1
                );
            }
        }
    }
    head(
        out,
        "fbpkg_tracker_rollout_waiting_hosts",
        "Hosts that resolved the tag of an active rollout but are in no phase reached yet.",
    );
    for (v, id) in views.iter().zip(&ids) {
        let _ = writeln!(
            out,
            "fbpkg_tracker_rollout_waiting_hosts{{{id}}} {}",
            v.waiting
        );
    }
}

#[cfg(test)]
mod tests {
    use fbpkg_common::Sha256Hash;
    use fbpkg_common::api::{PhaseCounts, Rollout};
    use fbpkg_common::pkgref::{PackageName, Tag};
    use fbpkg_common::rollout::{MaxFailures, Phase};

    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("plain-1.2"), "plain-1.2");
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn rollout_gauges_name_the_state_phase_and_host_counts() {
        let view = RolloutView {
            rollout: Rollout {
                id: 4,
                name: PackageName::new("app").expect("valid name"),
                tag: Tag::new("prod").expect("valid tag"),
                from: Some(Sha256Hash([1; 32])),
                to: Sha256Hash([2; 32]),
                phases: vec![Phase::Percent(10), Phase::Percent(100)],
                bake_ms: 0,
                max_failures: MaxFailures::Count(0),
                phase: 0,
                state: RolloutState::Halted {
                    reason: "1 unhealthy".into(),
                },
                started_at: 0,
                updated_at: 0,
            },
            phase_counts: vec![
                PhaseCounts {
                    phase: Some(Phase::Percent(10)),
                    healthy: 2,
                    unhealthy: 1,
                    ..PhaseCounts::default()
                },
                PhaseCounts {
                    phase: Some(Phase::Percent(100)),
                    fetched: 5,
                    ..PhaseCounts::default()
                },
            ],
            waiting: 5,
            failed_hosts: Vec::new(),
        };
        let mut out = String::new();
        render_rollouts(&mut out, std::slice::from_ref(&view));
        for line in [
            "fbpkg_tracker_rollouts_active 1",
            "fbpkg_tracker_rollout_state{package=\"app\",tag=\"prod\",state=\"halted\"} 1",
            "fbpkg_tracker_rollout_state{package=\"app\",tag=\"prod\",state=\"running\"} 0",
            "fbpkg_tracker_rollout_phase{package=\"app\",tag=\"prod\"} 1",
            "fbpkg_tracker_rollout_phases{package=\"app\",tag=\"prod\"} 2",
            "fbpkg_tracker_rollout_hosts{package=\"app\",tag=\"prod\",phase=\"1\",state=\"unhealthy\"} 1",
            "fbpkg_tracker_rollout_hosts{package=\"app\",tag=\"prod\",phase=\"1\",state=\"healthy\"} 2",
            "fbpkg_tracker_rollout_hosts{package=\"app\",tag=\"prod\",phase=\"2\",state=\"fetched\"} 5",
            "fbpkg_tracker_rollout_waiting_hosts{package=\"app\",tag=\"prod\"} 5",
        ] {
            assert!(out.lines().any(|l| l == line), "no {line:?} in:\n{out}");
        }
        // Every sample line belongs to a family announced with HELP and TYPE.
        for l in out.lines().filter(|l| !l.starts_with('#')) {
            let family = l.split(['{', ' ']).next().unwrap_or_default();
            assert!(
                out.contains(&format!("# TYPE {family} gauge\n")),
                "{family} has no TYPE line"
            );
        }
        let mut none = String::new();
        render_rollouts(&mut none, &[]);
        assert!(none.contains("fbpkg_tracker_rollouts_active 0\n"), "{none}");
        assert!(!none.contains("fbpkg_tracker_rollout_state{"), "{none}");
    }
}
