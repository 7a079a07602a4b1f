//! What a following agent last activated, per followed tag: `<state dir>/follows.json`.
//!
//! The file is the agent's memory across restarts (a restarted agent does not run
//! `--on-change` again for the version already active) and this host's answer for a tag when
//! the tracker is away (`get NAME:TAG` falls back to it). It is small and rewritten whole:
//! temp file, fsync, rename, fsync of the directory, so a kill -9 at any instant leaves either
//! the old file or the new one.
//!
//! A file that cannot be read or parsed is treated as empty, with a warning: the worst outcome
//! is one more `--on-change` run for the version the tracker answers, which is what a fresh
//! host does anyway.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use fbpkg_common::Sha256Hash;
use fbpkg_common::api::HostState;
use fbpkg_common::pkgref::{PackageName, Tag};
use serde::{Deserialize, Serialize};

use crate::error::{PeerError, Result};

/// The file name inside the state dir.
pub const FILE_NAME: &str = "follows.json";

/// Where the follow state of the host with state dir `state_dir` lives.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

/// The version last activated for one followed tag, and what was last reported about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activation {
    /// The version `--on-change` last ran for (or, without one, was last recorded).
    pub sha256: Sha256Hash,
    /// The last report on it: activated, healthy or unhealthy.
    pub state: HostState,
    /// Its detail (exit status and last output lines), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The version activated before it, while a rollout may still send the host back there
    /// (kept in the cache until then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Sha256Hash>,
}

/// Every followed tag's last activation, keyed by `name:tag`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowState {
    /// `name:tag` -> its activation.
    pub follows: BTreeMap<String, Activation>,
}

/// The key of `name:tag`.
pub fn key(name: &PackageName, tag: &Tag) -> String {
    format!("{name}:{tag}")
}

impl FollowState {
    /// Read the state in `state_dir`; missing, unreadable or corrupt is empty (see the module).
    pub fn load(state_dir: &Path) -> Self {
        let file = path(state_dir);
        match fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %file.display(), error = %e, "follow state unreadable; starting from none");
                Self::default()
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Self::default(),
            Err(e) => {
                tracing::warn!(path = %file.display(), error = %e, "cannot read follow state; starting from none");
                Self::default()
            }
        }
    }

    /// The last activation of `name:tag`.
    pub fn get(&self, name: &PackageName, tag: &Tag) -> Option<&Activation> {
        self.follows.get(&key(name, tag))
    }

    /// Write the whole state atomically (temp + fsync + rename + directory fsync).
    pub fn save(&self, state_dir: &Path) -> Result<()> {
        let file = path(state_dir);
        let tmp = state_dir.join(format!(
            ".{FILE_NAME}.tmp-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| PeerError::Agent(format!("follow state: {e}")))?;
        let written = (|| -> io::Result<()> {
            let mut f = fs::File::create_new(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &file)?;
            fs::File::open(state_dir)?.sync_all()
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written.map_err(PeerError::io("writing", &file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seven() -> Sha256Hash {
        Sha256Hash::from_hex(&"07".repeat(32)).unwrap()
    }

    #[test]
    fn round_trips_and_a_corrupt_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(FollowState::load(dir.path()), FollowState::default());
        let (name, tag) = (PackageName::new("app").unwrap(), Tag::new("prod").unwrap());
        let mut s = FollowState::default();
        s.follows.insert(
            key(&name, &tag),
            Activation {
                sha256: seven(),
                state: HostState::Unhealthy,
                detail: Some("exit status 1".into()),
                previous: Some(Sha256Hash([8; 32])),
            },
        );
        s.save(dir.path()).unwrap();
        s.save(dir.path()).unwrap();
        let back = FollowState::load(dir.path());
        assert_eq!(back, s);
        assert_eq!(back.get(&name, &tag).unwrap().sha256, seven());
        // Only the file itself: no temporary left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [FILE_NAME]);
        fs::write(path(dir.path()), b"{not json").unwrap();
        assert_eq!(FollowState::load(dir.path()), FollowState::default());
    }
}
