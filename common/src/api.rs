//! JSON bodies of the tracker's catalog API (`/api/v1/...`), shared by the tracker and the CLI.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{InfoHash, Sha256Hash};
use crate::metainfo::{Format, Metainfo};
use crate::pkgref::{PackageName, Tag};
use crate::rollout::{HostId, MaxFailures, Phase};
use crate::tracker_proto::Zone;

/// Archive format as it appears in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FormatName {
    /// A single file.
    File,
    /// A single executable file.
    Executable,
    /// A directory archived as a deterministic `tar.zst`.
    TarZst,
    /// A directory as a multi-file torrent of its files.
    Tree,
}

impl From<Format> for FormatName {
    fn from(f: Format) -> Self {
        match f {
            Format::File => FormatName::File,
            Format::Executable => FormatName::Executable,
            Format::TarZst => FormatName::TarZst,
            Format::Tree => FormatName::Tree,
        }
    }
}

/// One published version of a package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// Package name.
    pub name: PackageName,
    /// SHA-256 of the archive: the version's identity.
    pub sha256: Sha256Hash,
    /// The swarm's info-hash.
    pub info_hash: InfoHash,
    /// Archive size in bytes.
    pub size: u64,
    /// Piece length in bytes.
    pub piece_length: u64,
    /// Number of pieces.
    pub pieces: u32,
    /// File name inside the metainfo (and the launcher cache).
    pub file_name: String,
    /// File or directory archive.
    pub format: FormatName,
    /// Publish time, seconds since the Unix epoch.
    pub published_at: u64,
    /// Tags currently pointing at this version.
    #[serde(default)]
    pub tags: Vec<Tag>,
    /// A tag asked with `host=` while a rollout of it runs, by a host whose phase has not come
    /// yet: the version it will move to. A following agent prefetches it, so its activation is
    /// a local switch when its phase comes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<Sha256Hash>,
}

impl VersionInfo {
    /// Describe a version from its metainfo.
    pub fn from_metainfo(name: PackageName, m: &Metainfo, published_at: u64) -> Self {
        Self {
            name,
            sha256: m.sha256,
            info_hash: m.info_hash,
            size: m.length,
            piece_length: m.piece_length,
            pieces: m.num_pieces(),
            file_name: m.name.clone(),
            format: m.format.into(),
            published_at,
            tags: Vec::new(),
            prefetch: None,
        }
    }
}

/// One move of a tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagMove {
    /// Where the tag pointed from this move on.
    pub sha256: Sha256Hash,
    /// When, seconds since the Unix epoch.
    pub at: u64,
}

/// A tag and where it has pointed, oldest first; the last entry is current.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagInfo {
    /// Current target.
    pub sha256: Sha256Hash,
    /// Every move, oldest first.
    pub history: Vec<TagMove>,
}

/// `GET /api/v1/packages`: one row per package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageSummary {
    /// Package name.
    pub name: PackageName,
    /// Number of versions.
    pub versions: usize,
    /// Sum of the versions' sizes.
    pub total_bytes: u64,
    /// The most recently published version.
    pub latest: Option<VersionInfo>,
    /// Current tag targets.
    pub tags: BTreeMap<Tag, Sha256Hash>,
}

/// `GET /api/v1/packages/{name}`: every version and tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageDetail {
    /// Package name.
    pub name: PackageName,
    /// Versions, newest first.
    pub versions: Vec<VersionInfo>,
    /// Tags with their history.
    pub tags: BTreeMap<Tag, TagInfo>,
}

/// Body of every 4xx/5xx answer of the catalog API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong, for a human.
    pub error: String,
    /// For an ambiguous prefix: the versions it matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<String>,
}

// --- rollouts --------------------------------------------------------------------------------

/// `POST /api/v1/rollouts`: start moving `name:tag` to `to` in phases.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutRequest {
    /// Package name.
    pub name: PackageName,
    /// The tag to move.
    pub tag: Tag,
    /// The new version: a full hash or an unambiguous prefix.
    pub to: String,
    /// `zone:<path>` phases first, then percentages ascending to 100.
    pub phases: Vec<Phase>,
    /// How long a phase's hosts stay healthy before the next phase starts.
    #[serde(default)]
    pub bake_ms: u64,
    /// Unhealthy hosts tolerated: `"2"` or `"2%"`.
    pub max_failures: MaxFailures,
    /// Replace a halted rollout of the tag (recorded as aborted) instead of refusing.
    #[serde(default)]
    pub force: bool,
}

/// Where a rollout is. `Running`, `Paused` and `Halted` are active (one per tag at most);
/// `Aborted` and `Done` are final and kept in the tag's history.
///
/// ```text
/// start -> Running --pause--> Paused --resume--> Running
/// Running --phase gate passes--> Running (next phase) ... --last phase passes--> Done
/// Running|Paused --failures over the budget--> Halted
/// Running|Paused|Halted --abort (or a forced start over a halt)--> Aborted
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RolloutState {
    /// Moving through [`Rollout::phase`] (serialised beside `state`), which started at
    /// `phase_started`.
    Running {
        /// When this phase started (or the rollout resumed), Unix ms.
        phase_started: u64,
    },
    /// Held by an operator; hosts keep what they resolve to.
    Paused,
    /// Stopped by the gate; hosts keep what they resolve to until an abort.
    Halted {
        /// Why, for a human: the failed hosts and their output.
        reason: String,
    },
    /// Everyone back on `from`.
    Aborted {
        /// Who or what aborted it.
        reason: String,
    },
    /// Everyone on `to`; the tag points at it.
    Done,
}

impl RolloutState {
    /// Running, paused or halted: hosts in the phases so far resolve to `to`.
    pub fn is_active(&self) -> bool {
        matches!(
            self,
            RolloutState::Running { .. } | RolloutState::Paused | RolloutState::Halted { .. }
        )
    }
}

/// One rollout of a tag, as stored and as served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// Sequence number within the tag, from 1.
    pub id: u64,
    /// Package name.
    pub name: PackageName,
    /// The tag.
    pub tag: Tag,
    /// Where the tag pointed when the rollout started (none for a tag's first move).
    pub from: Option<Sha256Hash>,
    /// The version being rolled out.
    pub to: Sha256Hash,
    /// The phases.
    pub phases: Vec<Phase>,
    /// Bake time per phase, ms.
    pub bake_ms: u64,
    /// Failure budget.
    pub max_failures: MaxFailures,
    /// Current (or, once final, last) phase index.
    pub phase: usize,
    /// Where it is.
    #[serde(flatten)]
    pub state: RolloutState,
    /// Start, Unix ms.
    pub started_at: u64,
    /// Last state change, Unix ms.
    pub updated_at: u64,
}

/// What a host last said about the version being rolled out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// It asked what the tag resolves to.
    Resolved,
    /// It has the version on disk.
    Fetched,
    /// It switched to the version (`--on-change` ran).
    Activated,
    /// Its health command passed.
    Healthy,
    /// Its health command failed (or activation did).
    Unhealthy,
}

/// `POST /api/v1/reports`: a host's report on one version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Package name.
    pub name: PackageName,
    /// The version reported on.
    pub hash: Sha256Hash,
    /// The reporting host's id (it must come from the address it last resolved from).
    pub host: HostId,
    /// The host's zone, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "zone_opt")]
    pub zone: Option<Zone>,
    /// What happened.
    pub state: HostState,
    /// Last lines of output (at most [`Report::MAX_DETAIL`] bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Who on the host sends it: a following agent (the default) or a `get`.
    #[serde(default, skip_serializing_if = "ReportSource::is_follow")]
    pub source: ReportSource,
    /// The host runs a health command after activating: until it says `healthy`, its
    /// `activated` does not pass a gate.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub health_check: bool,
}

/// Who on a host sends a report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportSource {
    /// An agent following the tag: it activates and may check health.
    #[default]
    Follow,
    /// `fbpkg-rs get` or `run`: handing the version to its caller is the activation, and there
    /// is no health check to wait for.
    Get,
}

impl ReportSource {
    fn is_follow(&self) -> bool {
        *self == ReportSource::Follow
    }
}

impl Report {
    /// Most bytes of `detail` accepted.
    pub const MAX_DETAIL: usize = 4096;
}

/// Answer to a report: the rollouts (`name:tag#id`) it counted for; empty when the version is
/// not being rolled out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportAck {
    /// `name:tag#id` of each rollout the report counted for.
    pub counted_for: Vec<String>,
}

/// Host counts of one phase by latest state (each host counted once, in the first phase whose
/// set holds it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseCounts {
    /// The phase.
    pub phase: Option<Phase>,
    /// Hosts that only resolved.
    pub resolved: usize,
    /// Hosts whose latest report is fetched.
    pub fetched: usize,
    /// ... activated.
    pub activated: usize,
    /// ... healthy.
    pub healthy: usize,
    /// ... unhealthy.
    pub unhealthy: usize,
}

/// Derived counts, for views that draw a phase's progress as bars out of [`PhaseCounts::hosts`].
/// Methods rather than fields: the wire format stays the five exclusive counts above, so the
/// derived ones can never disagree with them.
impl PhaseCounts {
    /// Every host counted in the phase, whatever it last said.
    pub fn hosts(&self) -> usize {
        self.resolved + self.fetched + self.activated + self.healthy + self.unhealthy
    }

    /// Hosts with the version on disk: latest report `fetched` or later. An agent reports
    /// `unhealthy` only after fetching (its `--on-change` or health command failed), so failed
    /// hosts count too. Hosts in later phases prefetch, so this is where their progress shows.
    pub fn prefetched(&self) -> usize {
        self.fetched + self.activated + self.healthy + self.unhealthy
    }

    /// Hosts switched to the version and not failed: latest report `activated` or `healthy`.
    /// A host whose health command failed after activating is counted in `unhealthy` only.
    pub fn switched(&self) -> usize {
        self.activated + self.healthy
    }
}

/// A host whose latest report is unhealthy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedHost {
    /// Host id.
    pub host: HostId,
    /// Its zone.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "zone_opt")]
    pub zone: Option<Zone>,
    /// Index of the first phase holding it.
    pub phase: usize,
    /// What it said.
    pub detail: Option<String>,
}

/// An active rollout with its live progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutView {
    /// The rollout.
    #[serde(flatten)]
    pub rollout: Rollout,
    /// One entry per phase, in order.
    pub phase_counts: Vec<PhaseCounts>,
    /// Hosts that resolved the tag during the rollout but fall in no phase yet reached.
    pub waiting: usize,
    /// Unhealthy hosts.
    pub failed_hosts: Vec<FailedHost>,
}

/// `GET /api/v1/rollouts/{name}/{tag}`: the active rollout (if any) and the finished ones,
/// newest last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutStatus {
    /// The active rollout.
    pub current: Option<RolloutView>,
    /// Finished rollouts (and plain tag moves), oldest first.
    pub history: Vec<Rollout>,
}

/// Zones are validated strings; serde through their text.
mod zone_opt {
    use super::Zone;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(z: &Option<Zone>, s: S) -> Result<S::Ok, S::Error> {
        match z {
            Some(z) => s.serialize_some(z.as_str()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Zone>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| Zone::new(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_counts_derive_hosts_prefetched_and_switched() {
        let c = PhaseCounts {
            phase: None,
            resolved: 1,
            fetched: 2,
            activated: 3,
            healthy: 4,
            unhealthy: 5,
        };
        assert_eq!(c.hosts(), 15);
        assert_eq!(c.prefetched(), 14, "all but the host that only resolved");
        assert_eq!(c.switched(), 7);
        assert_eq!(PhaseCounts::default().hosts(), 0);
    }
}
