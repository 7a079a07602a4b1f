//! A new version of a tree package starts from the files the cache already holds.
//!
//! Before a tree download starts, each of its regular files whose SHA-256 and length match a
//! file of a cached version of the same package is put in the download's tree. The download
//! then resumes as after a restart: every piece is checked against the new metainfo's SHA-1
//! and only the pieces that fail are fetched. So version N+1 costs the pieces that changed,
//! and nothing reused is trusted before it matched the new version's hashes: its pieces here.
//! A reused file ([`Reused::files_at`]) whose every piece verified then is not read again at
//! install ([`Cache::install_reusing`]): its SHA-256 was checked when the cached version was
//! installed, the new metainfo names the same one, and its pieces have just matched the new
//! version's SHA-1s; a second pass over it would cost a delta what a full fetch's install
//! costs.
//!
//! A file that keeps its mode is **hard-linked**, so the two versions share its blocks on
//! disk; one whose mode changed is copied. A linked file is copy on write in the download
//! (`storage.rs`): small files share pieces with their neighbours, and when a neighbour
//! changed, that piece is fetched again, but the blocks for the linked file hold the bytes it
//! has and are not written; a block that differs (a cached copy gone bad, a peer's bad block)
//! first gives the file an inode of its own, so the cached version is never written through
//! the link. A version whose metainfo cannot be read is skipped; reuse never fails a download.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use fbpkg_common::Sha256Hash;
use fbpkg_common::metainfo::{FileKind, Format, Metainfo};
use fbpkg_common::pkgref::PackageName;

use super::{Cache, METAINFO_FILE, TREE_DIR};
use crate::storage::join;

/// What [`Cache::reuse_into`] put in a download's tree.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reused {
    /// Their indices in the new metainfo's files, in order.
    pub files_at: Vec<usize>,
    /// Files hard-linked from a cached version.
    pub linked: usize,
    /// Files copied from a cached version.
    pub copied: usize,
    /// Their bytes.
    pub bytes: u64,
}

impl Reused {
    /// Files reused.
    pub fn files(&self) -> usize {
        self.linked + self.copied
    }
}

impl Cache {
    /// Put the files of `meta` (a tree package) that cached versions of `name` already hold
    /// into `tree`, a download's tree that does not exist yet. Best effort: what cannot be
    /// reused is left to the swarm.
    pub fn reuse_into(&self, name: &PackageName, meta: &Metainfo, tree: &Path) -> Reused {
        let mut done = Reused::default();
        if meta.format != Format::Tree {
            return done;
        }
        // SHA-256 and length of a file -> where a cached version holds it, with its mode.
        let mut held: HashMap<(Sha256Hash, u64), (PathBuf, u32)> = HashMap::new();
        for sha in super::hashes_in(&self.root.join(name.as_str())) {
            if sha == meta.sha256 {
                continue;
            }
            let dir = self.entry_dir(name, &sha);
            let Ok(old) = fs::read(dir.join(METAINFO_FILE))
                .map_err(|_| ())
                .and_then(|b| Metainfo::parse(&b).map_err(|_| ()))
            else {
                continue;
            };
            if old.format != Format::Tree || old.sha256 != sha {
                continue;
            }
            for f in &old.files {
                if let FileKind::Regular { sha256, mode } = f.kind
                    && f.length > 0
                {
                    held.entry((sha256, f.length))
                        .or_insert_with(|| (join(&dir.join(TREE_DIR), &f.path), mode));
                }
            }
        }
        if held.is_empty() {
            return done;
        }
        for (at, f) in meta.files.iter().enumerate() {
            let FileKind::Regular { sha256, mode } = f.kind else {
                continue;
            };
            let Some((from, old_mode)) = held.get(&(sha256, f.length)) else {
                continue;
            };
            let to = join(tree, &f.path);
            if let Some(parent) = to.parent()
                && fs::create_dir_all(parent).is_err()
            {
                continue;
            }
            if *old_mode == mode && fs::hard_link(from, &to).is_ok() {
                done.linked += 1;
                done.bytes += f.length;
                done.files_at.push(at);
                continue;
            }
            let copied = fs::copy(from, &to)
                .and_then(|_| fs::set_permissions(&to, fs::Permissions::from_mode(0o644)));
            match copied {
                Ok(()) => {
                    done.copied += 1;
                    done.bytes += f.length;
                    done.files_at.push(at);
                }
                Err(e) => {
                    tracing::debug!(from = %from.display(), error = %e, "cannot reuse a cached file");
                    let _ = fs::remove_file(&to);
                }
            }
        }
        done
    }
}
