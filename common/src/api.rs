//! JSON bodies of the tracker's catalog API (`/api/v1/...`), shared by the tracker and the CLI.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{InfoHash, Sha256Hash};
use crate::metainfo::{Format, Metainfo};
use crate::pkgref::{PackageName, Tag};

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
}

impl From<Format> for FormatName {
    fn from(f: Format) -> Self {
        match f {
            Format::File => FormatName::File,
            Format::Executable => FormatName::Executable,
            Format::TarZst => FormatName::TarZst,
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
