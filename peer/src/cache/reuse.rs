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
//! A reused file of a piece or more owns its pieces (it starts on a piece boundary, padding
//! after it). When the cached version's seal recorded the file (`verify.rs`) and it is still
//! that file (same inode, length and modification time: nothing wrote to it since install
//! checked its SHA-256; the change time also moves on a link made or removed, so it is left
//! out), its pieces in the new version are **trusted**
//! ([`Reused::trusted`]): the download counts them as verified without reading them. Its bytes
//! are the ones install checked against the SHA-256 the new version names too, and a piece of
//! it is those bytes and padding; so this holds when the two versions' piece lengths differ (a
//! package near a power-of-two size). Reading them again would cost a delta a read of every
//! unchanged large file, as much disk as a full fetch writes. What the seal cannot vouch for
//! (bit rot since install) it could not for the cached version either, which launches without
//! a read; `fbpkg-rs verify` reads everything.
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

use super::{Cache, METAINFO_FILE, TREE_DIR, Unchanged};
use crate::storage::{file_starts, join};

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
    /// Pieces of the new version that hold only bytes of reused files as the cached version
    /// verified them (see the module doc), in order.
    pub trusted: Vec<u32>,
    /// The files those pieces are of (indices in the new metainfo's files, in order), each
    /// with its stamp from the cached version's seal: a file whose bytes moved since (a
    /// write after the link) is read at install after all.
    pub trusted_files: Vec<(usize, Unchanged)>,
}

/// Where a cached version holds a file.
struct Held {
    path: PathBuf,
    mode: u32,
    /// Its version's seal's stamp of it, when it is still as the seal recorded it.
    sealed: Option<Unchanged>,
}

/// The pieces of the file at index `at` when it owns them: their indices. It must be a piece
/// long or more, start on a piece boundary, and be followed by padding (and empty files) up
/// to the next one, or the end: the layout `publish` makes, checked here rather than assumed,
/// since a metainfo's piece hashes and padding are not covered by the package's SHA-256.
fn own_pieces(meta: &Metainfo, starts: &[u64], at: usize) -> Option<std::ops::RangeInclusive<u32>> {
    let (start, len) = (*starts.get(at)?, meta.files.get(at)?.length);
    let pl = meta.piece_length;
    if len < pl || !start.is_multiple_of(pl) {
        return None;
    }
    let end = start + len;
    let boundary = end.next_multiple_of(pl).min(meta.length);
    let mut to = end;
    for f in &meta.files[at + 1..] {
        if to >= boundary {
            break;
        }
        match f.kind {
            _ if f.length == 0 => {}
            FileKind::Pad => to += f.length,
            _ => return None,
        }
    }
    if to != boundary {
        return None;
    }
    let first = u32::try_from(start / pl).ok()?;
    let last = u32::try_from((end - 1) / pl).ok()?;
    (last < meta.num_pieces()).then_some(first..=last)
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
        // SHA-256 and length of a file -> where a cached version holds it, one whose pieces
        // can be trusted first.
        let mut held: HashMap<(Sha256Hash, u64), Held> = HashMap::new();
        for sha in super::hashes_in(&self.root.join(name.as_str())) {
            if sha == meta.sha256 {
                continue;
            }
            let dir = self.entry_dir(name, &sha);
            let Ok(old) = super::read_own(&dir.join(METAINFO_FILE), super::METAINFO_CAP)
                .map_err(|_| ())
                .and_then(|b| Metainfo::parse(&b).map_err(|_| ()))
            else {
                continue;
            };
            if old.format != Format::Tree || old.sha256 != sha {
                continue;
            }
            let sealed: HashMap<usize, Unchanged> =
                super::verify::sealed_files(&dir).into_iter().collect();
            for (j, f) in old.files.iter().enumerate() {
                let FileKind::Regular { sha256, mode } = f.kind else {
                    continue;
                };
                if f.length == 0 {
                    continue;
                }
                let key = (sha256, f.length);
                if held.get(&key).is_some_and(|h| h.sealed.is_some()) {
                    continue;
                }
                let path = join(&dir.join(TREE_DIR), &f.path);
                let sealed = sealed
                    .get(&j)
                    .copied()
                    .filter(|stamp| Unchanged::of(&path).is_ok_and(|now| now.same_bytes_as(stamp)));
                held.insert(key, Held { path, mode, sealed });
            }
        }
        if held.is_empty() {
            return done;
        }
        let new_at = file_starts(meta);
        for (at, f) in meta.files.iter().enumerate() {
            let FileKind::Regular { sha256, mode } = f.kind else {
                continue;
            };
            let Some(Held {
                path: from,
                mode: old_mode,
                sealed,
            }) = held.get(&(sha256, f.length))
            else {
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
                // The link is the file the seal stamped (nothing replaced or wrote to it
                // since it was looked at), and owns its pieces here.
                if let Some(stamp) = sealed
                    && Unchanged::of(&to).is_ok_and(|now| now.same_bytes_as(stamp))
                    && let Some(range) = own_pieces(meta, &new_at, at)
                {
                    done.trusted.extend(range);
                    done.trusted_files.push((at, *stamp));
                }
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

#[cfg(test)]
mod tests {
    use std::fs::File;

    use fbpkg_common::metainfo::TreeItem;

    use super::*;
    use crate::archive::ExtractLimits;
    use crate::cache::Handoff;

    /// A tree of a large file `big` (several pieces) and a small one, `small`.
    fn version(dir: &Path, small: &[u8]) -> Metainfo {
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
        fs::create_dir_all(dir).expect("dir");
        fs::write(dir.join("big"), &big).expect("big");
        fs::write(dir.join("small"), small).expect("small");
        let items = ["big", "small"]
            .iter()
            .map(|n| TreeItem::File {
                path: vec![(*n).to_owned()],
                length: fs::metadata(dir.join(n)).expect("len").len(),
                mode: 0o644,
            })
            .collect();
        Metainfo::build_tree(
            items,
            |p| File::open(join(dir, p)),
            "app",
            "http://127.0.0.1:1/announce",
        )
        .expect("metainfo")
    }

    #[test]
    fn pieces_of_files_unchanged_since_install_are_trusted_and_others_are_not() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let name = PackageName::new("app").expect("name");
        let install_v1 = |cache: &str| {
            let cache = Cache::new(tmp.path().join(cache));
            let src = tmp.path().join(format!("v1-{}", rand::random::<u32>()));
            let v1 = version(&src, b"one");
            let entry = cache
                .install(&name, &v1, &src, Handoff::Move, &ExtractLimits::default())
                .expect("install v1");
            (cache, entry.dir.join(TREE_DIR).join("big"))
        };
        let v2 = version(&tmp.path().join("v2"), b"two!");
        // 32 KiB pieces: big (200,000 bytes) is pieces 0 to 6, padding after it, then small.
        assert_eq!(v2.piece_length, 32 << 10);
        let big = 0..=6u32;
        let small_at = v2
            .files
            .iter()
            .position(|f| f.path == ["small"])
            .expect("small");
        assert_eq!(
            own_pieces(&v2, &file_starts(&v2), small_at),
            None,
            "small is packed"
        );

        // As installed: linked, and its pieces trusted; small changed, so not reused.
        let (cache, _) = install_v1("a");
        let r = cache.reuse_into(&name, &v2, &tmp.path().join("a-work1/tree"));
        assert_eq!((r.linked, r.copied), (1, 0));
        assert_eq!(r.trusted, big.clone().collect::<Vec<_>>());

        // A link made and removed moves its change time, not its bytes: still trusted.
        let (cache, cached_big) = install_v1("b");
        fs::hard_link(&cached_big, tmp.path().join("b-link")).expect("link");
        fs::remove_file(tmp.path().join("b-link")).expect("unlink");
        let r = cache.reuse_into(&name, &v2, &tmp.path().join("b-work1/tree"));
        assert_eq!(r.trusted, big.clone().collect::<Vec<_>>());

        // Written since install (the same bytes, even): linked, read, not trusted. (The
        // clock's tick may need a few tries to pass.)
        let (cache, cached_big) = install_v1("c");
        fs::set_permissions(&cached_big, fs::Permissions::from_mode(0o644)).expect("chmod");
        let stamp = Unchanged::of(&cached_big).expect("stamp");
        let bytes = fs::read(&cached_big).expect("read");
        let moved = (0..1000).any(|_| {
            fs::write(&cached_big, &bytes).expect("write");
            let now = Unchanged::of(&cached_big).expect("stamp");
            !now.same_bytes_as(&stamp) || {
                std::thread::sleep(std::time::Duration::from_millis(1));
                false
            }
        });
        assert!(moved, "a write never moved the modification time");
        let r = cache.reuse_into(&name, &v2, &tmp.path().join("c-work/tree"));
        assert_eq!(r.linked, 1);
        assert!(r.trusted.is_empty(), "{:?}", r.trusted);
    }
}
