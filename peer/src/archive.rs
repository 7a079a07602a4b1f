//! Directory packages: a deterministic `tar.zst` on the way in, a safe extraction on the way out.
//!
//! **Deterministic**: entries sorted by path bytes; owner, group and times zeroed; permission
//! bits kept (setuid, setgid and sticky dropped); regular files, directories and relative
//! symlinks that stay inside the tree only; zstd at a fixed level, single-threaded. The same
//! tree gives the same bytes, so the same SHA-256, on any host running the same fbpkg-rs.
//!
//! **Safe extraction** into a fresh directory: every path must be relative with no `..`; a
//! symlink's target must resolve inside the tree once every link on its way is followed (see
//! [`links`]: reading the target as text is not enough); hard links must point at an earlier
//! regular file; devices, FIFOs and anything else are refused. Files are created with `O_NOFOLLOW` and
//! `O_EXCL` and every parent is checked to be a real directory, so an entry can never write
//! through a link planted by an earlier one. Sizes and entry counts are capped (a zstd bomb
//! cannot fill the disk).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::error::{PeerError, Result};

mod compare;
mod items;
mod links;

pub use compare::{TreeCheck, compare_tree};
pub use items::tree_items;
use links::{LinkTree, Why};

/// zstd level for package archives. Part of the format: changing it changes package hashes.
pub const ZSTD_LEVEL: i32 = 3;
/// Largest zstd window accepted when decompressing (2^23 = 8 MiB), bounding decoder memory.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// Bounds on what an archive may expand to.
#[derive(Debug, Clone, Copy)]
pub struct ExtractLimits {
    /// Most bytes of file content (default 256 GiB).
    pub max_bytes: u64,
    /// Most entries (default 1,000,000).
    pub max_entries: u64,
}

impl Default for ExtractLimits {
    fn default() -> Self {
        Self {
            max_bytes: 256 << 30,
            max_entries: 1_000_000,
        }
    }
}

fn unsafe_archive(msg: impl Into<String>) -> PeerError {
    PeerError::UnsafeArchive(msg.into())
}

/// One tree entry, collected before writing so the order is the sorted one.
struct Item {
    rel: PathBuf,
    meta: fs::Metadata,
}

fn walk(root: &Path, rel: &Path, out: &mut Vec<Item>) -> Result<()> {
    let dir = root.join(rel);
    let mut children: Vec<_> = fs::read_dir(&dir)
        .map_err(PeerError::io("reading directory", &dir))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()
        .map_err(PeerError::io("reading directory", &dir))?;
    children.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
    for name in children {
        let rel = rel.join(&name);
        let path = root.join(&rel);
        let meta = fs::symlink_metadata(&path).map_err(PeerError::io("reading metadata", &path))?;
        let is_dir = meta.is_dir();
        out.push(Item {
            rel: rel.clone(),
            meta,
        });
        if is_dir {
            walk(root, &rel, out)?;
        }
    }
    Ok(())
}

/// Write the deterministic `tar.zst` of `dir` into `out`.
pub fn create(dir: &Path, out: impl Write) -> Result<()> {
    let mut items = Vec::new();
    walk(dir, Path::new(""), &mut items)?;
    let targets = check_links(dir, &items)?;
    let encoder = zstd::stream::write::Encoder::new(out, ZSTD_LEVEL)
        .map_err(PeerError::io("starting zstd", dir))?;
    let mut tar = tar::Builder::new(encoder);
    tar.follow_symlinks(false);
    for item in &items {
        let path = dir.join(&item.rel);
        let ft = item.meta.file_type();
        let mut h = tar::Header::new_gnu();
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mode(item.meta.mode() & 0o777);
        let io_err = PeerError::io("archiving", &path);
        if ft.is_dir() {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_size(0);
            tar.append_data(&mut h, &item.rel, io::empty())
                .map_err(io_err)?;
        } else if ft.is_file() {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(item.meta.len());
            let f = File::open(&path).map_err(PeerError::io("opening", &path))?;
            // A file that changes size while being archived would make a corrupt archive.
            let mut limited = BufReader::new(f).take(item.meta.len());
            tar.append_data(&mut h, &item.rel, &mut limited)
                .map_err(io_err)?;
        } else if ft.is_symlink() {
            let target = targets.get(&item.rel).ok_or_else(|| {
                PeerError::BadInput(format!("{} changed while it was archived", path.display()))
            })?;
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            h.set_mode(0o777);
            tar.append_link(&mut h, &item.rel, target).map_err(io_err)?;
        } else {
            return Err(PeerError::BadInput(format!(
                "{} is not a regular file, directory or symlink (devices, FIFOs and sockets cannot be packaged)",
                item.rel.display()
            )));
        }
    }
    let encoder = tar
        .into_inner()
        .map_err(PeerError::io("finishing tar", dir))?;
    encoder
        .finish()
        .map_err(PeerError::io("finishing zstd", dir))?;
    Ok(())
}

/// Read every symlink of the tree and refuse the package unless each resolves inside it, with
/// the same rule extraction applies (so what publishes also extracts). Returns the targets.
fn check_links(dir: &Path, items: &[Item]) -> Result<HashMap<PathBuf, PathBuf>> {
    let mut tree = LinkTree::new();
    let mut targets = HashMap::new();
    let refuse = |bad: links::BadLink| match bad.why {
        Why::Absolute | Why::Escapes => PeerError::BadInput(format!(
            "{} is a symlink to {} outside the package; packages hold only links that stay inside ({bad})",
            bad.link.display(),
            bad.target.display()
        )),
        _ => PeerError::BadInput(format!("{bad}; packages hold only links that resolve")),
    };
    for item in items.iter().filter(|i| i.meta.file_type().is_symlink()) {
        let path = dir.join(&item.rel);
        let target = fs::read_link(&path).map_err(PeerError::io("reading link", &path))?;
        tree.add(&item.rel, &target).map_err(refuse)?;
        targets.insert(item.rel.clone(), target);
    }
    tree.check().map_err(refuse)?;
    Ok(targets)
}

/// Check an entry path and return it as a relative path of normal components.
fn safe_relative(raw: &[u8]) -> Result<PathBuf> {
    let text = String::from_utf8_lossy(raw);
    if raw.contains(&0) {
        return Err(unsafe_archive(format!("entry {text:?} contains NUL")));
    }
    let p = Path::new(OsStr::from_bytes(raw));
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(unsafe_archive(format!("entry {text:?} contains '..'")));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(unsafe_archive(format!(
                    "entry {text:?} is an absolute path"
                )));
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(unsafe_archive(format!(
            "entry {text:?} names the archive root"
        )));
    }
    Ok(out)
}

/// Every existing ancestor of `rel` inside `root` must be a real directory, not a link.
fn check_parents(root: &Path, rel: &Path) -> Result<()> {
    let mut cur = root.to_path_buf();
    if let Some(parent) = rel.parent() {
        for c in parent.components() {
            cur.push(c);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(unsafe_archive(format!(
                        "entry {} would be written through a non-directory",
                        rel.display()
                    )));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&cur).map_err(PeerError::io("creating directory", &cur))?;
                }
                Err(e) => return Err(PeerError::io("checking", &cur)(e)),
            }
        }
    }
    Ok(())
}

/// The `tar.zst` at `archive` as a stream of tar entries, with zstd's window bounded (a
/// hostile frame cannot make decompression reserve more than 8 MiB).
pub(crate) fn open_tar(
    archive: &Path,
) -> Result<tar::Archive<zstd::stream::read::Decoder<'static, BufReader<File>>>> {
    let file = File::open(archive).map_err(PeerError::io("opening archive", archive))?;
    let mut decoder =
        zstd::stream::read::Decoder::new(file).map_err(PeerError::io("reading zstd", archive))?;
    decoder
        .window_log_max(ZSTD_WINDOW_LOG_MAX)
        .map_err(PeerError::io("configuring zstd", archive))?;
    Ok(tar::Archive::new(decoder))
}

/// Extract the `tar.zst` at `archive` into `dest`, which must not exist yet. On error the
/// partly extracted `dest` is left for the caller to remove (it is a staging directory).
pub fn extract(archive: &Path, dest: &Path, limits: &ExtractLimits) -> Result<()> {
    fs::create_dir(dest).map_err(PeerError::io("creating extraction directory", dest))?;
    let mut tar = open_tar(archive)?;
    let entries = tar
        .entries()
        .map_err(|e| unsafe_archive(format!("not a tar archive: {e}")))?;
    let (mut count, mut total) = (0u64, 0u64);
    let mut dirs = Vec::new();
    let mut links = LinkTree::new();
    for entry in entries {
        let mut entry = entry.map_err(|e| unsafe_archive(format!("corrupt archive: {e}")))?;
        count += 1;
        if count > limits.max_entries {
            return Err(unsafe_archive(format!(
                "more than {} entries",
                limits.max_entries
            )));
        }
        let raw_path = entry.path_bytes().into_owned();
        let rel = safe_relative(&raw_path)?;
        check_parents(dest, &rel)?;
        let target = dest.join(&rel);
        let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                total = total.saturating_add(entry.size());
                if total > limits.max_bytes {
                    return Err(unsafe_archive(format!(
                        "expands beyond {} bytes",
                        limits.max_bytes
                    )));
                }
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&target)
                    .map_err(|e| {
                        unsafe_archive(format!(
                            "cannot create {} ({e}); duplicate entry?",
                            rel.display()
                        ))
                    })?;
                let copied =
                    io::copy(&mut entry, &mut f).map_err(PeerError::io("extracting", &target))?;
                if copied != entry.size() {
                    return Err(unsafe_archive(format!("{} is truncated", rel.display())));
                }
                // Readable by its owner whatever the archive says (as a tree package's files
                // are): install reads every file back to fsync it, and an agent that is not
                // root could not open a file archived as 000, so the package never installed.
                f.set_permissions(fs::Permissions::from_mode(mode | 0o400))
                    .map_err(PeerError::io("chmod", &target))?;
            }
            tar::EntryType::Directory => {
                match fs::symlink_metadata(&target) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        return Err(unsafe_archive(format!(
                            "{} is both a file and a directory",
                            rel.display()
                        )));
                    }
                    Err(_) => fs::create_dir(&target)
                        .map_err(PeerError::io("creating directory", &target))?,
                }
                dirs.push((target, mode));
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| {
                        unsafe_archive(format!("symlink {} has no target", rel.display()))
                    })?
                    .into_owned();
                let link_path = Path::new(OsStr::from_bytes(&link));
                if link.contains(&0) {
                    return Err(unsafe_archive(format!(
                        "symlink {} has a target with NUL",
                        rel.display()
                    )));
                }
                if link_path.has_root() {
                    return Err(unsafe_archive(format!(
                        "symlink {} -> {} is absolute, so it leaves the package",
                        rel.display(),
                        link_path.display()
                    )));
                }
                std::os::unix::fs::symlink(link_path, &target).map_err(|e| {
                    unsafe_archive(format!(
                        "cannot create {} ({e}); duplicate entry?",
                        rel.display()
                    ))
                })?;
                // Where it leads through other links is known only once all are here: checked
                // after the last entry (see `links`).
                links
                    .add(&rel, link_path)
                    .map_err(|bad| unsafe_archive(bad.to_string()))?;
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| {
                        unsafe_archive(format!("hard link {} has no target", rel.display()))
                    })?
                    .into_owned();
                let source_rel = safe_relative(&link)?;
                let source = dest.join(&source_rel);
                check_parents(dest, &source_rel)?;
                match fs::symlink_metadata(&source) {
                    Ok(m) if m.is_file() => {}
                    _ => {
                        return Err(unsafe_archive(format!(
                            "hard link {} must point at an earlier regular file",
                            rel.display()
                        )));
                    }
                }
                fs::hard_link(&source, &target).map_err(PeerError::io("linking", &target))?;
            }
            other => {
                return Err(unsafe_archive(format!(
                    "{} has entry type {other:?}; only files, directories and links are allowed",
                    rel.display()
                )));
            }
        }
    }
    links
        .check()
        .map_err(|bad| unsafe_archive(bad.to_string()))?;
    for (dir, mode) in dirs.into_iter().rev() {
        fs::set_permissions(&dir, fs::Permissions::from_mode(mode | 0o700))
            .map_err(PeerError::io("chmod", &dir))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tree(root: &Path) {
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::create_dir_all(root.join("etc/conf.d")).unwrap();
        fs::write(root.join("bin/tool"), b"#!/bin/sh\necho hi\n").unwrap();
        fs::set_permissions(root.join("bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(root.join("etc/conf.d/a.conf"), vec![b'x'; 100_000]).unwrap();
        fs::write(root.join("README"), b"readme").unwrap();
        symlink("../README", root.join("etc/readme-link")).unwrap();
        let long = "d".repeat(120);
        fs::create_dir_all(root.join(&long)).unwrap();
        fs::write(root.join(&long).join("f".repeat(120)), b"long path").unwrap();
    }

    fn archive_bytes(dir: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        create(dir, &mut out).unwrap();
        out
    }

    #[test]
    fn same_tree_same_bytes_and_round_trip() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        tree(a.path());
        tree(b.path());
        // Different times and creation order must not matter.
        filetime_touch(&a.path().join("README"));
        let (x, y) = (archive_bytes(a.path()), archive_bytes(b.path()));
        assert_eq!(x, y);

        let work = tempfile::tempdir().unwrap();
        let arc = work.path().join("p.tar.zst");
        fs::write(&arc, &x).unwrap();
        let out = work.path().join("out");
        extract(&arc, &out, &ExtractLimits::default()).unwrap();
        assert_eq!(
            fs::read(out.join("bin/tool")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        assert_eq!(
            fs::metadata(out.join("bin/tool")).unwrap().mode() & 0o777,
            0o755
        );
        assert_eq!(
            fs::read_link(out.join("etc/readme-link")).unwrap(),
            Path::new("../README")
        );
        assert_eq!(fs::read(out.join("etc/readme-link")).unwrap(), b"readme");
        let long = out.join("d".repeat(120)).join("f".repeat(120));
        assert_eq!(fs::read(long).unwrap(), b"long path");
    }

    fn filetime_touch(p: &Path) {
        let f = File::options().append(true).open(p).unwrap();
        f.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(12345))
            .unwrap();
    }

    #[test]
    fn publish_refuses_escaping_links_and_devices() {
        let d = tempfile::tempdir().unwrap();
        symlink("/etc/passwd", d.path().join("evil")).unwrap();
        let err = create(d.path(), Vec::new()).unwrap_err().to_string();
        assert!(err.contains("outside the package"), "{err}");

        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        let err = create(d.path(), Vec::new()).unwrap_err().to_string();
        assert!(err.contains("devices, FIFOs"), "{err}");
    }

    /// A raw tar entry, written as it is: (name, type, link target, data).
    type RawEntry<'a> = (&'a [u8], tar::EntryType, &'a [u8], &'a [u8]);

    fn hostile(entries: &[RawEntry<'_>]) -> Vec<u8> {
        let mut tar_bytes = Vec::new();
        {
            let mut b = tar::Builder::new(&mut tar_bytes);
            for (name, ty, link, data) in entries {
                let mut h = tar::Header::new_old();
                h.as_old_mut().name[..name.len()].copy_from_slice(name);
                h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
                h.set_entry_type(*ty);
                h.set_size(data.len() as u64);
                h.set_mode(0o644);
                h.set_cksum();
                b.append(&h, *data).unwrap();
            }
            b.finish().unwrap();
        }
        zstd::encode_all(&tar_bytes[..], 3).unwrap()
    }

    /// A file archived with no permission at all is extracted readable by its owner (what
    /// install and verify need), and the tree compares equal to its archive.
    #[test]
    fn a_file_archived_unreadable_is_extracted_readable_by_its_owner() {
        let mut tar_bytes = Vec::new();
        {
            let mut b = tar::Builder::new(&mut tar_bytes);
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(5);
            h.set_mode(0o000);
            h.set_cksum();
            b.append_data(&mut h, "secret", &b"hello"[..]).unwrap();
            b.finish().unwrap();
        }
        let work = tempfile::tempdir().unwrap();
        let arc = work.path().join("a.tar.zst");
        fs::write(&arc, zstd::encode_all(&tar_bytes[..], 3).unwrap()).unwrap();
        let out = work.path().join("out");
        extract(&arc, &out, &ExtractLimits::default()).unwrap();
        let mode = fs::metadata(out.join("secret")).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o400);
        let check = compare_tree(&arc, &out, &ExtractLimits::default()).unwrap();
        assert!(check.problems.is_empty(), "{:?}", check.problems);
        // As an agent before the owner-read bit left it (running as root): still the package.
        fs::set_permissions(out.join("secret"), fs::Permissions::from_mode(0o000)).unwrap();
        let check = compare_tree(&arc, &out, &ExtractLimits::default()).unwrap();
        assert!(check.problems.is_empty(), "{:?}", check.problems);
        fs::set_permissions(out.join("secret"), fs::Permissions::from_mode(0o500)).unwrap();
        let check = compare_tree(&arc, &out, &ExtractLimits::default()).unwrap();
        assert!(!check.problems.is_empty(), "another mode is a problem");
    }

    fn extract_err(bytes: &[u8]) -> String {
        let work = tempfile::tempdir().unwrap();
        let arc = work.path().join("a.tar.zst");
        fs::write(&arc, bytes).unwrap();
        let err = extract(&arc, &work.path().join("out"), &ExtractLimits::default()).unwrap_err();
        assert!(matches!(err, PeerError::UnsafeArchive(_)), "{err}");
        err.to_string()
    }

    #[test]
    fn hostile_entries_are_refused() {
        use tar::EntryType::*;
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (hostile(&[(b"/etc/x", Regular, b"", b"x")]), "absolute"),
            (hostile(&[(b"a/../../x", Regular, b"", b"x")]), "'..'"),
            (
                hostile(&[(b"l", Symlink, b"/etc", b"")]),
                "leaves the package",
            ),
            (
                hostile(&[(b"a/l", Symlink, b"../../etc", b"")]),
                "leaves the package",
            ),
            // A link inside the tree, then a file written through it: refused.
            (
                hostile(&[
                    (b"d", Directory, b"", b""),
                    (b"l", Symlink, b"d", b""),
                    (b"l/f", Regular, b"", b"x"),
                ]),
                "non-directory",
            ),
            (hostile(&[(b"dev", Char, b"", b"")]), "entry type"),
            (hostile(&[(b"fifo", Fifo, b"", b"")]), "entry type"),
            (hostile(&[(b"h", Link, b"/etc/passwd", b"")]), "absolute"),
            (
                hostile(&[(b"h", Link, b"missing", b"")]),
                "earlier regular file",
            ),
            (
                hostile(&[(b"f", Regular, b"", b"x"), (b"f", Regular, b"", b"y")]),
                "duplicate",
            ),
            (b"not zstd at all".to_vec(), "archive"),
        ];
        for (bytes, needle) in cases {
            let err = extract_err(&bytes);
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }

    /// Links checked as text pass here; resolved beneath the root, they leave it.
    #[test]
    fn links_that_leave_through_other_links_are_refused() {
        use tar::EntryType::*;
        let cases: Vec<Vec<RawEntry<'_>>> = vec![
            // `m` reads as `d1`, but `l` is the root, so `m` is the root's parent.
            vec![
                (b"d1/d2/l", Symlink, b"../..", b""),
                (b"m", Symlink, b"d1/d2/l/../..", b""),
            ],
            // The same with `m` first: `l` does not exist yet when `m` arrives.
            vec![
                (b"m", Symlink, b"d1/d2/l/../..", b""),
                (b"d1/d2/l", Symlink, b"../..", b""),
            ],
            // A link to a link to outside.
            vec![(b"a", Symlink, b"b", b""), (b"b", Symlink, b"c/../..", b"")],
            // Absolute, through a link.
            vec![(b"a", Symlink, b"b/x", b""), (b"b", Symlink, b"/etc", b"")],
            vec![(b"a", Symlink, b"b", b""), (b"b", Symlink, b"a", b"")],
        ];
        for entries in cases {
            let work = tempfile::tempdir().unwrap();
            let arc = work.path().join("a.tar.zst");
            fs::write(&arc, hostile(&entries)).unwrap();
            let err =
                extract(&arc, &work.path().join("out"), &ExtractLimits::default()).unwrap_err();
            assert!(matches!(err, PeerError::UnsafeArchive(_)), "{err}");
            let msg = err.to_string();
            assert!(
                msg.contains("leaves the package") || msg.contains("loop"),
                "{msg}"
            );
            // Nothing beside the archive and the (refused) extraction directory.
            let mut beside: Vec<_> = fs::read_dir(work.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            beside.sort();
            assert_eq!(beside, ["a.tar.zst", "out"]);
        }

        // Publishing the first tree is refused the same way.
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("d1/d2")).unwrap();
        symlink("../..", d.path().join("d1/d2/l")).unwrap();
        symlink("d1/d2/l/../..", d.path().join("m")).unwrap();
        let err = create(d.path(), Vec::new()).unwrap_err();
        assert!(matches!(err, PeerError::BadInput(_)), "{err}");
        assert!(err.to_string().contains("outside the package"), "{err}");
    }

    /// Links through links that stay inside are kept: real trees have them
    /// (`current -> v2`, `lib/libfoo.so -> libfoo.so.1`).
    #[test]
    fn links_through_links_that_stay_inside_round_trip() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("v2/bin")).unwrap();
        fs::write(d.path().join("v2/bin/tool"), b"tool").unwrap();
        symlink("v2", d.path().join("current")).unwrap();
        symlink("current/bin", d.path().join("bin")).unwrap();
        symlink("../bin/tool", d.path().join("v2/tool-link")).unwrap();
        let bytes = archive_bytes(d.path());
        let work = tempfile::tempdir().unwrap();
        let arc = work.path().join("p.tar.zst");
        fs::write(&arc, bytes).unwrap();
        let out = work.path().join("out");
        extract(&arc, &out, &ExtractLimits::default()).unwrap();
        assert_eq!(fs::read(out.join("bin/tool")).unwrap(), b"tool");
        assert_eq!(fs::read(out.join("v2/tool-link")).unwrap(), b"tool");
    }

    #[test]
    fn bombs_are_capped() {
        let big = vec![0u8; 1 << 20];
        let bytes = hostile(&[
            (b"a", tar::EntryType::Regular, b"", &big),
            (b"b", tar::EntryType::Regular, b"", &big),
        ]);
        let work = tempfile::tempdir().unwrap();
        let arc = work.path().join("a.tar.zst");
        fs::write(&arc, bytes).unwrap();
        let limits = ExtractLimits {
            max_bytes: 1_500_000,
            max_entries: 10,
        };
        let err = extract(&arc, &work.path().join("out"), &limits)
            .unwrap_err()
            .to_string();
        assert!(err.contains("expands beyond"), "{err}");
        let limits = ExtractLimits {
            max_bytes: u64::MAX,
            max_entries: 1,
        };
        let err = extract(&arc, &work.path().join("out2"), &limits)
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than 1 entries"), "{err}");
    }
}
