//! The directory a tree package is published from, and the check that a stock client's copy
//! of it is the same files.
//!
//! A stock client knows nothing of our per-file `sha256`, `mode` or `x-fbpkg-dirs`: what it
//! must get right is every regular file's bytes at its path under the torrent's name. BEP 47
//! padding is the client's business: one that knows it writes nothing for `.pad/N`, one that
//! does not writes files of zeros there. Both are accepted, anything else on disk is not.
//! BEP 47 links are optional in a client: a tree with links is only given to one that makes
//! them (libtorrent does; aria2 1.36 writes an empty file in the link's place, Transmission
//! 3.00 nothing), and then each must lead where the published one does.

use std::collections::BTreeMap;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use fbpkg_common::Sha256Hash;
use fbpkg_common::metainfo::{FileKind, Metainfo};
use fbpkg_peer::cache::sha256_file;
use rand::RngExt;

/// The directory padding files are named in (BEP 47 leaves the name free; ours is `.pad/N`).
const PAD_DIR: &str = ".pad";

/// Whether a client's copy must have the tree's empty files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmptyFiles {
    /// Every file of the package, empty or not.
    Required,
    /// The client is known not to create zero-length files (Transmission before 4.1,
    /// transmission/transmission#417): an empty file may be missing, never wrong.
    MayBeMissing,
}

/// Whether a tree has symlinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Links {
    None,
    /// A link to a file beside it and one from the root to a nested directory.
    Some,
}

/// Write a small release-like tree under `root`: a script with its execute bit, a file of
/// `big` random bytes and a few more (more than a piece, not a whole number of them: padding
/// comes before and after it), small files nested two and three directories deep, an empty
/// file, an empty directory, and `links`.
pub fn make(root: &Path, big: usize, links: Links) {
    let write = |rel: &str, bytes: &[u8], mode: u32| {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().expect("a path under the root"))
            .expect("mkdir in the tree");
        std::fs::write(&path, bytes).expect("writing a file of the tree");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .expect("chmod in the tree");
    };
    write("bin/tool", b"#!/bin/sh\necho tool\n", 0o755);
    let mut bytes = vec![0u8; big + 1001];
    rand::rng().fill(&mut bytes[..]);
    write("data/big.bin", &bytes, 0o644);
    // After the big file, so the padding behind it is inside the torrent, not trimmed off its
    // end.
    write("data/index.txt", b"big.bin\n", 0o644);
    for (i, rel) in [
        "etc/app/main.conf",
        "etc/app/conf.d/10-net.conf",
        "etc/app/conf.d/20-log.conf",
        "share/doc/app/README",
    ]
    .into_iter()
    .enumerate()
    {
        write(
            rel,
            format!("{rel}: {}\n", "x".repeat(i * 300)).as_bytes(),
            0o644,
        );
    }
    write("var/empty", b"", 0o644);
    std::fs::create_dir_all(root.join("var/spool")).expect("mkdir an empty directory");
    if links == Links::Some {
        symlink("tool", root.join("bin/run")).expect("linking to a file");
        symlink("share/doc/app", root.join("doc")).expect("linking to a directory");
    }
}

/// What a walk finds under a directory: regular files, directories, symlinks (with where they
/// lead, from the root) and anything else, by path from the root.
#[derive(Debug, Default)]
struct Walk {
    files: BTreeMap<PathBuf, Seen>,
    links: BTreeMap<PathBuf, PathBuf>,
    dirs: Vec<PathBuf>,
    other: Vec<PathBuf>,
}

/// A regular file found by [`walk`].
#[derive(Debug)]
struct Seen {
    sha256: Sha256Hash,
    len: u64,
    zeros: bool,
}

fn walk(root: &Path) -> Result<Walk, String> {
    let mut out = Walk::default();
    let real_root = std::fs::canonicalize(root).map_err(|e| format!("{}: {e}", root.display()))?;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries =
            std::fs::read_dir(&dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
        for entry in entries {
            let path = entry
                .map_err(|e| format!("reading {}: {e}", dir.display()))?
                .path();
            let rel = path
                .strip_prefix(root)
                .map_err(|e| e.to_string())?
                .to_path_buf();
            let md =
                std::fs::symlink_metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            if md.is_symlink() {
                // Compared by destination: a client may spell a link's target its own way.
                let to = std::fs::canonicalize(&path)
                    .map_err(|e| format!("{} leads nowhere: {e}", rel.display()))?;
                let to = to.strip_prefix(&real_root).map_err(|_| {
                    format!(
                        "{} leads out of the tree, to {}",
                        rel.display(),
                        to.display()
                    )
                })?;
                out.links.insert(rel, to.to_path_buf());
            } else if md.is_dir() {
                out.dirs.push(rel);
                stack.push(path);
            } else if md.is_file() {
                let sha256 = sha256_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                let zeros = std::fs::read(&path)
                    .map_err(|e| format!("{}: {e}", path.display()))?
                    .iter()
                    .all(|b| *b == 0);
                let len = md.len();
                out.files.insert(rel, Seen { sha256, len, zeros });
            } else {
                out.other.push(rel);
            }
        }
    }
    Ok(out)
}

/// `Ok` when `got` (a client's download of `meta`) holds every regular file of `published`
/// with the same bytes (empty ones aside when `empty` says they may be missing) and every link
/// leading to the same place, and nothing else but padding files of `meta` holding zeros and
/// the directories they need. `Err` names the first path that differs.
pub fn compare(
    got: &Path,
    published: &Path,
    meta: &Metainfo,
    empty: EmptyFiles,
) -> Result<(), String> {
    let want = walk(published)?;
    let have = walk(got)?;
    for (rel, published) in &want.files {
        match have.files.get(rel) {
            None if published.len == 0 && empty == EmptyFiles::MayBeMissing => {}
            None => return Err(format!("{} is missing", rel.display())),
            Some(copy) if copy.sha256 != published.sha256 => {
                return Err(format!(
                    "{}: {} bytes with SHA-256 {}, published {} bytes with SHA-256 {}",
                    rel.display(),
                    copy.len,
                    copy.sha256,
                    published.len,
                    published.sha256
                ));
            }
            Some(_) => {}
        }
    }
    for (rel, to) in &want.links {
        match have.links.get(rel) {
            Some(got_to) if got_to == to => {}
            Some(got_to) => {
                return Err(format!(
                    "{} leads to {}, published to {}",
                    rel.display(),
                    got_to.display(),
                    to.display()
                ));
            }
            None if have.files.contains_key(rel) => {
                return Err(format!("{} is a file, published a link", rel.display()));
            }
            None => return Err(format!("link {} is missing", rel.display())),
        }
    }
    if let Some(extra) = have.links.keys().find(|l| !want.links.contains_key(*l)) {
        return Err(format!("link {} is not in the package", extra.display()));
    }
    let pads: BTreeMap<PathBuf, u64> = meta
        .files
        .iter()
        .filter(|f| f.kind == FileKind::Pad)
        .map(|f| (f.path.iter().collect(), f.length))
        .collect();
    for (rel, copy) in &have.files {
        if want.files.contains_key(rel) {
            continue;
        }
        match pads.get(rel) {
            None => return Err(format!("{} is not in the package", rel.display())),
            Some(_) if !copy.zeros => {
                return Err(format!(
                    "padding file {} holds non-zero bytes",
                    rel.display()
                ));
            }
            Some(&len) if copy.len > len => {
                return Err(format!(
                    "padding file {} is {} bytes, the metainfo says {len}",
                    rel.display(),
                    copy.len
                ));
            }
            Some(_) => {}
        }
    }
    // A client may leave out directories with nothing in them (a torrent lists files only).
    if let Some(extra) = have
        .dirs
        .iter()
        .find(|d| !want.dirs.contains(d) && d.as_path() != Path::new(PAD_DIR))
    {
        return Err(format!(
            "directory {} is not in the package",
            extra.display()
        ));
    }
    if let Some(odd) = have.other.first() {
        return Err(format!(
            "{} is neither a file, a link nor a directory",
            odd.display()
        ));
    }
    Ok(())
}

/// Copy the regular files and directories under `from` to `to`, and write `meta`'s padding
/// as files of zeros: a seed's copy of a tree. A client that does not know BEP 47 (aria2)
/// reads padding from its files, and finds pieces missing without them; one that does
/// ignores them. Links take no bytes of the torrent: a seed does without them.
pub fn copy(from: &Path, to: &Path, meta: &Metainfo) -> Result<(), String> {
    let tree = walk(from)?;
    std::fs::create_dir_all(to).map_err(|e| format!("{}: {e}", to.display()))?;
    for d in &tree.dirs {
        std::fs::create_dir_all(to.join(d)).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    for f in tree.files.keys() {
        std::fs::copy(from.join(f), to.join(f)).map_err(|e| format!("{}: {e}", f.display()))?;
    }
    for pad in meta.files.iter().filter(|f| f.kind == FileKind::Pad) {
        let path = to.join(pad.path.iter().collect::<PathBuf>());
        let len = usize::try_from(pad.length).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(path.parent().unwrap_or(to))
            .and_then(|()| std::fs::write(&path, vec![0u8; len]))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// Bytes in the tree's regular files (what a client must fetch; padding aside).
pub fn content_bytes(meta: &Metainfo) -> u64 {
    meta.files
        .iter()
        .filter(|f| matches!(f.kind, FileKind::Regular { .. }))
        .map(|f| f.length)
        .sum()
}

/// The check can fail, and names what differs: a changed byte, a missing or extra file,
/// padding that is not zeros, a link that is a file in the copy.
#[test]
fn compare_names_what_differs() {
    use std::fs;
    let dir = tempfile::tempdir().expect("temp dir");
    let (src, got) = (dir.path().join("src"), dir.path().join("got"));
    make(&src, 64 << 10, Links::Some);
    let items = fbpkg_peer::archive::tree_items(&src).expect("walking the tree");
    let meta = Metainfo::build_tree(
        items,
        |p| fs::File::open(p.iter().fold(src.clone(), |at, c| at.join(c))),
        "t",
        "http://127.0.0.1:1/announce",
    )
    .expect("building the metainfo");
    let pad = meta
        .files
        .iter()
        .find(|f| f.kind == FileKind::Pad)
        .expect("the tree has padding");
    let pad_path = got.join(pad.path.iter().collect::<PathBuf>());
    let pad_len = usize::try_from(pad.length).expect("a small pad");
    let fresh = || {
        let _ = fs::remove_dir_all(&got);
        let cp = std::process::Command::new("cp")
            .arg("-a")
            .arg(&src)
            .arg(&got)
            .status()
            .expect("running cp");
        assert!(cp.success(), "cp -a: {cp}");
    };
    let check = |empty| compare(&got, &src, &meta, empty);
    let fails_on = |what: &str, empty| match check(empty) {
        Ok(()) => panic!("a copy with {what} passed"),
        Err(e) => assert!(e.contains(what), "{what}: {e}"),
    };

    fresh();
    assert_eq!(check(EmptyFiles::Required), Ok(()));
    fs::create_dir_all(pad_path.parent().expect("in .pad")).expect("mkdir .pad");
    fs::write(&pad_path, vec![0u8; pad_len]).expect("writing padding");
    assert_eq!(check(EmptyFiles::Required), Ok(()), "padding of zeros");
    fs::write(&pad_path, vec![1u8; pad_len]).expect("writing padding");
    fails_on(&pad.display_path(), EmptyFiles::Required);

    fresh();
    let big = got.join("data/big.bin");
    let mut bytes = fs::read(&big).expect("reading the copy");
    bytes[40 << 10] ^= 1;
    fs::write(&big, bytes).expect("writing the copy");
    fails_on("data/big.bin", EmptyFiles::Required);

    fresh();
    fs::remove_file(got.join("var/empty")).expect("rm");
    fails_on("var/empty", EmptyFiles::Required);
    assert_eq!(check(EmptyFiles::MayBeMissing), Ok(()));
    fs::write(got.join("etc/app/extra"), b"").expect("writing an extra file");
    fails_on("etc/app/extra", EmptyFiles::MayBeMissing);

    fresh();
    fs::remove_file(got.join("doc")).expect("rm the link");
    fs::write(got.join("doc"), b"").expect("a file in its place");
    fails_on("doc", EmptyFiles::Required);
}
