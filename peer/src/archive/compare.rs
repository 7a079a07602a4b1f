//! An extracted tree checked against the archive it came from (`fbpkg-rs verify`).
//!
//! The archive's SHA-256 proves the archive; launchers run the tree. So the tree is compared
//! with the archive entry by entry, streaming both (no second copy on disk): each file's bytes,
//! each entry's kind and mode as extraction left them, each symlink's target, each hard link's
//! inode, and nothing in the tree that the archive does not hold.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{ExtractLimits, safe_relative};
use crate::error::{PeerError, Result};

/// Problems listed one by one; beyond this, counted.
const MAX_LISTED: usize = 20;

/// What comparing a tree with its archive found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TreeCheck {
    /// Differences that make the tree untrustworthy: content, kind, link targets, modes other
    /// than write bits, entries missing or extra.
    pub problems: Vec<String>,
    /// Write bits that came back, contents intact: the tree can be made read-only again.
    pub drift: Vec<String>,
    /// File bytes read from the tree.
    pub bytes_read: u64,
}

impl TreeCheck {
    fn problem(&mut self, extra: &mut u64, msg: String) {
        if self.problems.len() < MAX_LISTED {
            self.problems.push(msg);
        } else {
            *extra += 1;
        }
    }
}

/// Compare the tree at `tree` with the `tar.zst` at `archive` it was extracted from.
/// I/O errors on the archive are errors (it was checked just before); differences in the tree,
/// including files that cannot be read, are problems.
pub fn compare_tree(archive: &Path, tree: &Path, limits: &ExtractLimits) -> Result<TreeCheck> {
    let mut out = TreeCheck::default();
    let mut extra = 0u64;
    let mut tar = super::open_tar(archive)?;
    let entries = tar
        .entries()
        .map_err(PeerError::io("reading archive", archive))?;
    // Every path the archive accounts for, implicit parent directories included.
    let mut seen: HashSet<PathBuf> = HashSet::new();
    let mut count = 0u64;
    let mut a = vec![0u8; 256 << 10];
    let mut b = vec![0u8; 256 << 10];
    for entry in entries {
        let mut entry = entry.map_err(PeerError::io("reading archive", archive))?;
        count += 1;
        if count > limits.max_entries {
            out.problem(
                &mut extra,
                format!("the archive has more than {} entries", limits.max_entries),
            );
            break;
        }
        let raw = entry.path_bytes().into_owned();
        let rel = match safe_relative(&raw) {
            Ok(r) => r,
            Err(e) => {
                out.problem(&mut extra, e.to_string());
                break;
            }
        };
        for ancestor in rel.ancestors().skip(1) {
            if !ancestor.as_os_str().is_empty() && !seen.insert(ancestor.to_owned()) {
                break;
            }
        }
        seen.insert(rel.clone());
        let path = tree.join(&rel);
        let shown = rel.display();
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) => {
                out.problem(&mut extra, format!("{shown}: {e}"));
                continue;
            }
        };
        let header_mode = entry.header().mode().unwrap_or(0o644) & 0o777;
        let mode = meta.mode() & 0o777;
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if !meta.is_file() {
                    out.problem(&mut extra, format!("{shown} is no longer a regular file"));
                    continue;
                }
                // Extraction keeps the archive's bits, owner-readable; install strips write
                // bits. Versions before the owner-read bit extracted the bits as they were
                // (a root agent could install such a file): that is the package too.
                let old = header_mode & 0o555;
                let want = old | 0o400;
                check_mode(
                    &mut out,
                    &mut extra,
                    &shown,
                    if mode == old { want } else { mode },
                    want,
                );
                if meta.len() != entry.size() {
                    out.problem(
                        &mut extra,
                        format!("{shown} is {} bytes, not {}", meta.len(), entry.size()),
                    );
                    continue;
                }
                match same_bytes(&mut entry, &path, &mut a, &mut b) {
                    Ok((true, n)) => out.bytes_read += n,
                    Ok((false, n)) => {
                        out.bytes_read += n;
                        out.problem(&mut extra, format!("{shown}: contents changed"));
                    }
                    Err(Side::Tree(e)) => {
                        out.problem(&mut extra, format!("{shown} cannot be read: {e}"))
                    }
                    Err(Side::Archive(e)) => {
                        return Err(PeerError::io("reading archive", archive)(e));
                    }
                }
            }
            tar::EntryType::Directory => {
                if !meta.is_dir() {
                    out.problem(&mut extra, format!("{shown} is no longer a directory"));
                    continue;
                }
                // Extraction makes directories owner-rwx, install strips write bits.
                check_mode(
                    &mut out,
                    &mut extra,
                    &shown,
                    mode,
                    (header_mode & 0o055) | 0o500,
                );
            }
            tar::EntryType::Symlink => {
                let want = entry.link_name_bytes().map(|l| l.into_owned());
                match fs::read_link(&path) {
                    Ok(got) if Some(got.as_os_str().as_bytes()) == want.as_deref() => {}
                    Ok(got) => out.problem(
                        &mut extra,
                        format!("{shown} now points at {}", got.display()),
                    ),
                    Err(_) => out.problem(&mut extra, format!("{shown} is no longer a symlink")),
                }
            }
            tar::EntryType::Link => {
                let source = entry
                    .link_name_bytes()
                    .and_then(|l| safe_relative(&l).ok())
                    .and_then(|s| fs::symlink_metadata(tree.join(s)).ok());
                match source {
                    Some(s) if meta.is_file() && s.dev() == meta.dev() && s.ino() == meta.ino() => {
                    }
                    _ => out.problem(
                        &mut extra,
                        format!("{shown} is no longer a hard link to its source"),
                    ),
                }
            }
            other => out.problem(
                &mut extra,
                format!("{shown} has entry type {other:?}, which is never extracted"),
            ),
        }
    }
    find_extra(tree, Path::new(""), &seen, &mut out, &mut extra);
    if extra > 0 {
        out.problems.push(format!("and {extra} more differences"));
    }
    Ok(out)
}

fn check_mode(
    out: &mut TreeCheck,
    extra: &mut u64,
    shown: &dyn std::fmt::Display,
    got: u32,
    want: u32,
) {
    if got == want {
        return;
    }
    if got & !0o222 == want {
        out.drift.push(format!("{shown} is writable ({got:o})"));
    } else {
        out.problem(extra, format!("{shown} has mode {got:o}, not {want:o}"));
    }
}

/// Which side of a comparison failed to read.
enum Side {
    Archive(io::Error),
    Tree(io::Error),
}

/// Whether the archive entry's bytes equal the file's; and the bytes compared.
fn same_bytes(
    entry: &mut impl Read,
    path: &Path,
    a: &mut [u8],
    b: &mut [u8],
) -> Result<(bool, u64), Side> {
    let mut f = File::open(path).map_err(Side::Tree)?;
    let mut total = 0u64;
    loop {
        let n = read_full(entry, a).map_err(Side::Archive)?;
        // At the archive's end the file must end too: one byte more would be a difference.
        let want = n.max(1);
        let m = read_full(&mut f, &mut b[..want]).map_err(Side::Tree)?;
        if n == 0 {
            return Ok((m == 0, total));
        }
        total += m as u64;
        if m != n || a[..n] != b[..n] {
            return Ok((false, total));
        }
    }
}

/// Fill `buf` as far as the reader goes; short only at its end.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Name what the tree holds that the archive does not.
fn find_extra(
    tree: &Path,
    rel: &Path,
    seen: &HashSet<PathBuf>,
    out: &mut TreeCheck,
    extra: &mut u64,
) {
    let dir = tree.join(rel);
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) => {
            out.problem(extra, format!("cannot list {}: {e}", dir.display()));
            return;
        }
    };
    for e in rd {
        let e = match e {
            Ok(e) => e,
            Err(err) => {
                out.problem(extra, format!("cannot list {}: {err}", dir.display()));
                return;
            }
        };
        let child = rel.join(e.file_name());
        if !seen.contains(&child) {
            out.problem(extra, format!("{} is not in the archive", child.display()));
            continue;
        }
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            find_extra(tree, &child, seen, out, extra);
        }
    }
}
