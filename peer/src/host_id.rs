//! This host's stable id, kept in the agent's state dir as `host-id`.
//!
//! The tracker draws a host's rollout bucket from this id (see `fbpkg_common::rollout`), so it
//! must not change while the host lives: a new id would move the host to another bucket, and a
//! canary could silently stop being one. It is therefore created once (16 random hex digits)
//! and never rewritten: a file that cannot be read or does not hold a valid id is an error for
//! a human to look at, not something to replace behind their back.
//!
//! Creation is atomic and race-free: the id is written to a private temporary file, synced,
//! then hard-linked to `host-id`. A link never replaces an existing file, so when two commands
//! create it at the same instant one wins and the other reads the winner's id.

use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use fbpkg_common::rollout::HostId;

use crate::error::{PeerError, Result};

/// The file name inside the state dir.
pub const FILE_NAME: &str = "host-id";

/// Where the id of the host with state dir `state_dir` lives.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

/// This host's id: read from `state_dir/host-id`, created there on first use.
pub fn load_or_create(state_dir: &Path) -> Result<HostId> {
    let file = path(state_dir);
    if let Some(id) = read(&file)? {
        return Ok(id);
    }
    crate::agent::private_dir(state_dir)?;
    let id = HostId::new(&format!("{:016x}", rand::random::<u64>()))
        .map_err(|e| PeerError::BadInput(e.to_string()))?;
    let tmp = state_dir.join(format!(
        ".{FILE_NAME}.tmp-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let written = (|| -> io::Result<()> {
        let mut f = fs::File::create_new(&tmp)?;
        writeln!(f, "{id}")?;
        f.sync_all()
    })()
    .map_err(PeerError::io("writing", &tmp));
    let linked = written.and_then(|()| match fs::hard_link(&tmp, &file) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(PeerError::io("creating", &file)(e)),
    });
    let _ = fs::remove_file(&tmp);
    if !linked? {
        // Another command created it a moment ago: that one is the host's id.
        return read(&file)?.ok_or_else(|| {
            PeerError::io("reading", &file)(io::Error::from(io::ErrorKind::NotFound))
        });
    }
    // The link is durable once the directory is.
    if let Ok(dir) = fs::File::open(state_dir) {
        let _ = dir.sync_all();
    }
    tracing::info!(host_id = %id, path = %file.display(), "created this host's id");
    Ok(id)
}

/// The id in `file`, `None` when there is no file; unreadable or invalid contents are errors.
fn read(file: &Path) -> Result<Option<HostId>> {
    let text = match fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(PeerError::io("reading this host's id", file)(e)),
    };
    HostId::new(text.trim_end_matches('\n'))
        .map(Some)
        .map_err(|e| {
            PeerError::io("reading this host's id", file)(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{e}; it was not replaced, because a new id moves this host to other rollout \
                 buckets: fix or remove the file (or pass --host-id / FBPKG_HOST_ID)"
                ),
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_stable_and_a_corrupt_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = load_or_create(&state).unwrap();
        assert_eq!(first.as_str().len(), 16, "{first}");
        assert!(first.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(
            fs::read_to_string(path(&state)).unwrap(),
            format!("{first}\n")
        );
        for _ in 0..3 {
            assert_eq!(load_or_create(&state).unwrap(), first);
        }
        // No temporary file left behind.
        let names: Vec<_> = fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [FILE_NAME]);

        // A hand-written id is kept as it is.
        fs::write(path(&state), "web-042\n").unwrap();
        assert_eq!(load_or_create(&state).unwrap().as_str(), "web-042");

        for bad in ["", "\n", "has space\n", "a/b", &"x".repeat(65)] {
            fs::write(path(&state), bad).unwrap();
            let err = load_or_create(&state).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::Io, "{bad:?}: {err}");
            assert!(err.to_string().contains("host id"), "{err}");
            assert_eq!(
                fs::read_to_string(path(&state)).unwrap(),
                bad,
                "a corrupt id was replaced"
            );
        }
    }

    #[test]
    fn an_unreadable_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: reading it fails with something other than
        // "not found", which must not be taken for a first use.
        fs::create_dir_all(path(dir.path())).unwrap();
        let err = load_or_create(dir.path()).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Io, "{err}");
    }

    #[test]
    fn concurrent_first_uses_agree() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<HostId> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(|| load_or_create(dir.path()).unwrap()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
    }
}
