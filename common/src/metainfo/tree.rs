//! Directory packages as multi-file torrents: the file list, its layout in pieces, and the
//! package's identity.
//!
//! A tree package's info dictionary lists its files the BEP 3 way (`files`, each with
//! `length` and `path`), with BEP 47 attributes: `x` executable, `l` a symlink (with
//! `symlink path`, from the package root), `p` padding. Every regular file also carries its
//! `sha256` and its permission bits (`mode`, `0o777` at most: setuid, setgid and sticky are
//! dropped); directories are listed with theirs in `x-fbpkg-dirs`.
//!
//! **Layout.** Files in path order (component by component, as a directory walk sorted by
//! name meets them). A file of at least one piece starts on a piece boundary and is followed
//! by padding up to the next one, so it owns its pieces: an unchanged large file has the same
//! piece hashes in every version. Smaller files are packed back to back, so a tree of
//! thousands of small files does not cost a piece each. Padding is zeros that no host writes
//! to disk; it costs at most one piece per large file, and nothing for small ones.
//!
//! **Identity.** The package's SHA-256 is that of its *manifest*: the bencoded dictionary
//! `{"dirs": [...], "files": [...]}` of the file list without padding, each file with its
//! path, length, attributes, mode and SHA-256 (or link target). It covers every byte (through
//! each file's SHA-256), every name, the modes and the links; not the piece length, nor the
//! padding, which only say how the bytes travel. Any host computes it from the metainfo alone,
//! and [`super::Metainfo::parse`] refuses metainfo whose `sha256` is not its manifest's, so a
//! file's `sha256` is bound to the package's name `name:<sha256>`; the bytes are then checked
//! against each file's `sha256` when a download completes.

use std::io::{self, Read};

use sha1::{Digest, Sha1};
use sha2::Sha256;

use super::{check_file_name, piece_length_for};
use crate::bencode::{self, Dict, Value, Writer};
use crate::error::Error;
use crate::ids::Sha256Hash;

/// Info key listing a tree package's empty directories.
pub const DIRS_KEY: &str = "x-fbpkg-dirs";
/// Deepest path accepted in a tree package.
pub const MAX_DEPTH: usize = 64;
/// Longest path accepted in a tree package, in bytes with `/` between components.
pub const MAX_PATH_LEN: usize = 4096;

/// One entry of a tree package's `files` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeFile {
    /// Path components from the package root, each a safe file name.
    pub path: Vec<String>,
    /// Bytes in the torrent (0 for links).
    pub length: u64,
    /// What the entry is.
    pub kind: FileKind,
}

/// A directory of a tree package, with its permission bits.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct TreeDir {
    /// Path components from the package root.
    pub path: Vec<String>,
    /// Permission bits (at most `0o777`).
    pub mode: u32,
}

/// What a [`TreeFile`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileKind {
    /// A regular file: its contents' SHA-256 and its permission bits (BEP 47 `x` when any
    /// execute bit is set).
    Regular {
        /// SHA-256 of the file's bytes.
        sha256: Sha256Hash,
        /// Permission bits (at most `0o777`).
        mode: u32,
    },
    /// A symbolic link (BEP 47 `l`) to `target`, components from the package root (empty:
    /// the root itself).
    Symlink {
        /// Where the link leads, from the package root.
        target: Vec<String>,
    },
    /// Zeros that align the next file to a piece boundary (BEP 47 `p`); never on disk.
    Pad,
}

impl TreeFile {
    /// A regular file.
    pub fn is_regular(&self) -> bool {
        matches!(self.kind, FileKind::Regular { .. })
    }

    /// The path with `/` between components.
    pub fn display_path(&self) -> String {
        self.path.join("/")
    }
}

/// What a tree package holds, as the publisher's walk finds it (in any order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeItem {
    /// A regular file of `length` bytes.
    File {
        /// Path components from the root.
        path: Vec<String>,
        /// Its size.
        length: u64,
        /// Its permission bits (others are dropped).
        mode: u32,
    },
    /// A symlink, its target already resolved to components from the root.
    Symlink {
        /// Path components from the root.
        path: Vec<String>,
        /// Where it leads, from the root.
        target: Vec<String>,
    },
    /// A directory.
    Dir {
        /// Path components from the root.
        path: Vec<String>,
        /// Its permission bits (others are dropped).
        mode: u32,
    },
}

impl TreeItem {
    fn path(&self) -> &[String] {
        match self {
            TreeItem::File { path, .. }
            | TreeItem::Symlink { path, .. }
            | TreeItem::Dir { path, .. } => path,
        }
    }
}

/// A tree's file list laid out in pieces, with its hashes: what
/// [`super::Metainfo::build_tree`] records.
pub(super) struct Built {
    pub files: Vec<TreeFile>,
    pub dirs: Vec<TreeDir>,
    pub length: u64,
    pub piece_length: u64,
    pub pieces: Vec<[u8; 20]>,
    pub sha256: Sha256Hash,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, Error::Metainfo(msg))
}

/// Lay out `items`, read every regular file through `open` once (per-file SHA-256 and piece
/// SHA-1s in one pass), and compute the manifest's SHA-256.
pub(super) fn build<R: Read>(
    mut items: Vec<TreeItem>,
    mut open: impl FnMut(&[String]) -> io::Result<R>,
) -> io::Result<Built> {
    items.sort_by(|a, b| a.path().cmp(b.path()));
    for pair in items.windows(2) {
        if pair[0].path() == pair[1].path() {
            return Err(invalid(format!(
                "{} is listed twice",
                pair[0].path().join("/")
            )));
        }
    }
    for item in &items {
        check_path(item.path()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    }
    let dirs: Vec<TreeDir> = items
        .iter()
        .filter_map(|item| match item {
            TreeItem::Dir { path, mode } => Some(TreeDir {
                path: path.clone(),
                mode: mode & 0o777,
            }),
            _ => None,
        })
        .collect();
    let content: u64 = items
        .iter()
        .map(|i| match i {
            TreeItem::File { length, .. } => *length,
            _ => 0,
        })
        .sum();
    if content == 0 {
        return Err(invalid(
            "a directory package needs at least one non-empty file".into(),
        ));
    }
    let piece_length = piece_length_for(content);
    let mut hasher = PieceHasher::new(piece_length);
    let mut files = Vec::with_capacity(items.len());
    let mut pads = 0u32;
    let mut buf = vec![0u8; 256 << 10];
    for item in items {
        match item {
            TreeItem::Dir { .. } => {}
            TreeItem::Symlink { path, target } => {
                check_target(&target)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                files.push(TreeFile {
                    path,
                    length: 0,
                    kind: FileKind::Symlink { target },
                });
            }
            TreeItem::File { path, length, mode } => {
                let aligned = length >= piece_length;
                if aligned {
                    pad_to_boundary(&mut hasher, &mut files, &mut pads);
                }
                let mut reader = open(&path)?;
                let mut whole = Sha256::new();
                let mut read = 0u64;
                loop {
                    let n = match reader.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    };
                    read += n as u64;
                    if read > length {
                        break;
                    }
                    whole.update(&buf[..n]);
                    hasher.update(&buf[..n]);
                }
                if read != length {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{} changed size while it was read ({length} bytes expected)",
                            path.join("/")
                        ),
                    ));
                }
                files.push(TreeFile {
                    path,
                    length,
                    kind: FileKind::Regular {
                        sha256: Sha256Hash(whole.finalize().into()),
                        mode: mode & 0o777,
                    },
                });
                if aligned {
                    pad_to_boundary(&mut hasher, &mut files, &mut pads);
                }
            }
        }
    }
    // No padding after the last file with bytes: it would only make the torrent longer.
    let last_bytes = files.iter().rposition(|f| f.is_regular() && f.length > 0);
    let mut i = last_bytes.map_or(0, |i| i + 1);
    while i < files.len() {
        if files[i].kind == FileKind::Pad {
            let pad = files.remove(i).length;
            hasher.total -= pad;
            hasher.unpad(pad);
        } else {
            i += 1;
        }
    }
    let (length, pieces) = hasher.finish();
    let sha256 = manifest_sha256(&files, &dirs);
    Ok(Built {
        files,
        dirs,
        length,
        piece_length,
        pieces,
        sha256,
    })
}

fn pad_to_boundary(hasher: &mut PieceHasher, files: &mut Vec<TreeFile>, pads: &mut u32) {
    let rem = hasher.total % hasher.piece_length;
    if rem == 0 {
        return;
    }
    let len = hasher.piece_length - rem;
    hasher.zeros(len);
    files.push(TreeFile {
        path: vec![".pad".into(), pads.to_string()],
        length: len,
        kind: FileKind::Pad,
    });
    *pads += 1;
}

/// SHA-1 of each piece of a stream fed in order. Padding at the very end is taken back with
/// [`PieceHasher::unpad`] before it is hashed: zeros are held back until real bytes follow.
struct PieceHasher {
    piece_length: u64,
    piece: Sha1,
    in_piece: u64,
    /// Zeros fed but not hashed yet.
    pending_zeros: u64,
    total: u64,
    pieces: Vec<[u8; 20]>,
}

impl PieceHasher {
    fn new(piece_length: u64) -> Self {
        Self {
            piece_length,
            piece: Sha1::new(),
            in_piece: 0,
            pending_zeros: 0,
            total: 0,
            pieces: Vec::new(),
        }
    }

    fn zeros(&mut self, n: u64) {
        self.pending_zeros += n;
        self.total += n;
    }

    fn unpad(&mut self, n: u64) {
        self.pending_zeros -= n.min(self.pending_zeros);
    }

    fn flush_zeros(&mut self) {
        const ZEROS: [u8; 16 << 10] = [0; 16 << 10];
        while self.pending_zeros > 0 {
            let n = self.pending_zeros.min(ZEROS.len() as u64);
            self.pending_zeros -= n;
            self.hash(&ZEROS[..usize::try_from(n).unwrap_or(0)]);
        }
    }

    fn update(&mut self, chunk: &[u8]) {
        self.flush_zeros();
        self.total += chunk.len() as u64;
        self.hash(chunk);
    }

    fn hash(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            let take = usize::try_from((self.piece_length - self.in_piece).min(chunk.len() as u64))
                .unwrap_or(chunk.len());
            self.piece.update(&chunk[..take]);
            self.in_piece += take as u64;
            chunk = &chunk[take..];
            if self.in_piece == self.piece_length {
                self.pieces.push(self.piece.finalize_reset().into());
                self.in_piece = 0;
            }
        }
    }

    fn finish(mut self) -> (u64, Vec<[u8; 20]>) {
        self.flush_zeros();
        if self.in_piece > 0 {
            self.pieces.push(self.piece.finalize().into());
        }
        (self.total, self.pieces)
    }
}

/// The package's identity: SHA-256 of the bencoded manifest (see the module doc).
pub fn manifest_sha256(files: &[TreeFile], dirs: &[TreeDir]) -> Sha256Hash {
    let mut w = Writer::with_capacity(files.len() * 128 + 64);
    w.dict();
    w.bytes(b"dirs").list();
    for d in dirs {
        write_dir(&mut w, d);
    }
    w.end();
    w.bytes(b"files").list();
    for f in files.iter().filter(|f| f.kind != FileKind::Pad) {
        write_entry(&mut w, f);
    }
    w.end().end();
    Sha256Hash(Sha256::digest(w.finish()).into())
}

fn write_dir(w: &mut Writer, d: &TreeDir) {
    w.dict().key_int("mode", i64::from(d.mode)).bytes(b"path");
    write_path(w, &d.path);
    w.end();
}

fn write_path(w: &mut Writer, path: &[String]) {
    w.list();
    for c in path {
        w.bytes(c.as_bytes());
    }
    w.end();
}

/// One `files` entry, keys in bencode order: the same in the info dictionary and the
/// manifest.
fn write_entry(w: &mut Writer, f: &TreeFile) {
    w.dict();
    match &f.kind {
        FileKind::Regular { mode, .. } if mode & 0o111 != 0 => {
            w.key_bytes("attr", b"x");
        }
        FileKind::Regular { .. } => {}
        FileKind::Symlink { .. } => {
            w.key_bytes("attr", b"l");
        }
        FileKind::Pad => {
            w.key_bytes("attr", b"p");
        }
    }
    w.key_int("length", i64::try_from(f.length).unwrap_or(i64::MAX));
    if let FileKind::Regular { mode, .. } = f.kind {
        w.key_int("mode", i64::from(mode));
    }
    w.bytes(b"path");
    write_path(w, &f.path);
    match &f.kind {
        FileKind::Regular { sha256, .. } => {
            w.key_bytes("sha256", sha256.to_hex().as_bytes());
        }
        FileKind::Symlink { target } => {
            w.bytes(b"symlink path");
            write_path(w, target);
        }
        FileKind::Pad => {}
    }
    w.end();
}

/// Write the `files` list.
pub(super) fn write_files(w: &mut Writer, files: &[TreeFile]) {
    w.bytes(b"files").list();
    for f in files {
        write_entry(w, f);
    }
    w.end();
}

/// Write `x-fbpkg-dirs` if there are directories.
pub(super) fn write_dirs(w: &mut Writer, dirs: &[TreeDir]) {
    if dirs.is_empty() {
        return;
    }
    w.bytes(DIRS_KEY.as_bytes()).list();
    for d in dirs {
        write_dir(w, d);
    }
    w.end();
}

fn parse_mode(d: &Dict<'_>, what: &str) -> Result<u32, Error> {
    bencode::get(d, "mode")
        .and_then(Value::as_int)
        .and_then(|m| u32::try_from(m).ok())
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| meta_err(format!("{what}.mode is not a permission mode (0 to 0o777)")))
}

fn meta_err(msg: impl Into<String>) -> Error {
    Error::Metainfo(msg.into())
}

/// A path of a tree package: 1 to [`MAX_DEPTH`] safe components, at most [`MAX_PATH_LEN`]
/// bytes.
pub fn check_path(path: &[String]) -> Result<(), Error> {
    if path.is_empty() {
        return Err(meta_err("a file has an empty path"));
    }
    check_components(path)
}

fn check_target(target: &[String]) -> Result<(), Error> {
    check_components(target)
}

fn check_components(path: &[String]) -> Result<(), Error> {
    if path.len() > MAX_DEPTH {
        return Err(meta_err(format!(
            "path {}... is deeper than {MAX_DEPTH} components",
            path[..4].join("/")
        )));
    }
    if path.iter().map(|c| c.len() + 1).sum::<usize>() > MAX_PATH_LEN {
        return Err(meta_err(format!(
            "a path is longer than {MAX_PATH_LEN} bytes"
        )));
    }
    for c in path {
        check_file_name(c.as_bytes())?;
    }
    Ok(())
}

fn parse_path(v: Option<&Value<'_>>, what: &str) -> Result<Vec<String>, Error> {
    let Some(Value::List(items)) = v else {
        return Err(meta_err(format!("{what} is not a list")));
    };
    items
        .iter()
        .map(|c| {
            let b = c
                .as_bytes()
                .ok_or_else(|| meta_err(format!("{what} holds a non-string")))?;
            check_file_name(b)?;
            Ok(String::from_utf8_lossy(b).into_owned())
        })
        .collect()
}

/// The `files` list and empty directories of an info dictionary, checked: safe paths, in
/// order, no duplicates, no file beneath another file or link, lengths that add up.
pub(super) fn parse(
    info: &Dict<'_>,
    files: &Value<'_>,
) -> Result<(Vec<TreeFile>, Vec<TreeDir>, u64), Error> {
    let Value::List(list) = files else {
        return Err(meta_err("info.files is not a list"));
    };
    if list.is_empty() {
        return Err(meta_err("info.files is empty"));
    }
    let mut out = Vec::with_capacity(list.len());
    let mut total: u64 = 0;
    // Bytes in regular files: padding alone is no package (`build` makes none such).
    let mut content: u64 = 0;
    for (i, entry) in list.iter().enumerate() {
        let what = format!("info.files[{i}]");
        let d = entry.as_dict(&what)?;
        let length = bencode::get(d, "length")
            .and_then(Value::as_int)
            .and_then(|l| u64::try_from(l).ok())
            .ok_or_else(|| meta_err(format!("{what}.length is not a non-negative integer")))?;
        total = total
            .checked_add(length)
            .ok_or_else(|| meta_err("info.files add up to more than 2^64 bytes"))?;
        let path = parse_path(bencode::get(d, "path"), &format!("{what}.path"))?;
        check_path(&path)?;
        let attr = match bencode::get(d, "attr") {
            None => &b""[..],
            Some(v) => v
                .as_bytes()
                .ok_or_else(|| meta_err(format!("{what}.attr is not a string")))?,
        };
        let kind = if attr.contains(&b'p') {
            FileKind::Pad
        } else if attr.contains(&b'l') {
            if length != 0 {
                return Err(meta_err(format!("{what} is a symlink with a length")));
            }
            let target = parse_path(
                bencode::get(d, "symlink path"),
                &format!("{what}.symlink path"),
            )?;
            check_target(&target)?;
            FileKind::Symlink { target }
        } else {
            let sha256 = bencode::get(d, "sha256")
                .and_then(Value::as_bytes)
                .and_then(|b| std::str::from_utf8(b).ok())
                .and_then(|s| Sha256Hash::from_hex(s).ok())
                .ok_or_else(|| {
                    meta_err(format!("{what}.sha256 is not 64 lowercase hex characters"))
                })?;
            let mode = parse_mode(d, &what)?;
            if (mode & 0o111 != 0) != attr.contains(&b'x') {
                return Err(meta_err(format!(
                    "{what}: the x attribute and the mode's execute bits disagree"
                )));
            }
            content += length;
            FileKind::Regular { sha256, mode }
        };
        out.push(TreeFile { path, length, kind });
    }
    if content == 0 {
        return Err(meta_err("info.files hold no file with bytes"));
    }
    let dirs = match bencode::get(info, DIRS_KEY) {
        None => Vec::new(),
        Some(Value::List(ds)) => ds
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let what = format!("info.{DIRS_KEY}[{i}]");
                let dict = d.as_dict(&what)?;
                let path = parse_path(bencode::get(dict, "path"), &format!("{what}.path"))?;
                check_path(&path)?;
                Ok(TreeDir {
                    path,
                    mode: parse_mode(dict, &what)?,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?,
        Some(_) => return Err(meta_err(format!("info.{DIRS_KEY} is not a list"))),
    };
    check_order(&out, &dirs)?;
    Ok((out, dirs, total))
}

/// Entries (padding aside) and directories each strictly in path order; no path twice;
/// nothing beneath a file or link.
fn check_order(files: &[TreeFile], dirs: &[TreeDir]) -> Result<(), Error> {
    let mut paths: Vec<(&[String], bool)> = files
        .iter()
        .filter(|f| f.kind != FileKind::Pad)
        .map(|f| (f.path.as_slice(), false))
        .collect();
    let sorted =
        paths.windows(2).all(|w| w[0].0 < w[1].0) && dirs.windows(2).all(|w| w[0].path < w[1].path);
    if !sorted {
        return Err(meta_err(
            "info.files (or the directories) are not in path order without repeats",
        ));
    }
    paths.extend(dirs.iter().map(|d| (d.path.as_slice(), true)));
    paths.sort();
    for w in paths.windows(2) {
        let ((a, a_dir), (b, _)) = (w[0], w[1]);
        if a == b {
            return Err(meta_err(format!("{} is listed twice", a.join("/"))));
        }
        if !a_dir && b.starts_with(a) {
            return Err(meta_err(format!(
                "{} is beneath {}, which is not a directory",
                b.join("/"),
                a.join("/")
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Vec<String> {
        s.split('/').map(str::to_owned).collect()
    }

    #[test]
    fn large_files_own_their_pieces_and_small_ones_pack() {
        // 32 KiB pieces: "a" (1 KiB) and "b" (1 KiB) pack; "big" (40 KiB) starts on a
        // boundary and is padded after; "c" (1 KiB) follows on the next boundary.
        let sizes = [("a", 1024u64), ("b", 1024), ("big", 40 << 10), ("c", 1024)];
        let items = sizes
            .iter()
            .map(|(n, l)| TreeItem::File {
                path: p(n),
                length: *l,
                mode: 0o644,
            })
            .collect();
        let built = build(items, |path| {
            let len = sizes.iter().find(|(n, _)| p(n) == path).unwrap().1;
            Ok(io::repeat(path[0].as_bytes()[0]).take(len))
        })
        .unwrap();
        assert_eq!(built.piece_length, 32 << 10);
        let layout: Vec<(String, u64)> = built
            .files
            .iter()
            .map(|f| (f.display_path(), f.length))
            .collect();
        assert_eq!(
            layout,
            vec![
                ("a".into(), 1024),
                ("b".into(), 1024),
                (".pad/0".into(), (32 << 10) - 2048),
                ("big".into(), 40 << 10),
                (".pad/1".into(), (24 << 10)),
                ("c".into(), 1024),
            ]
        );
        assert_eq!(built.length, (96 << 10) + 1024);
        assert_eq!(built.pieces.len(), 4);
        // The big file's first piece is its first 32 KiB, whatever comes before it.
        let first_of_big: [u8; 20] = Sha1::digest([b'b'; 32 << 10]).into();
        assert_eq!(built.pieces[1], first_of_big);
    }

    #[test]
    fn no_padding_at_the_end_and_empty_trees_are_refused() {
        let items = vec![TreeItem::File {
            path: p("big"),
            length: 40 << 10,
            mode: 0o755,
        }];
        let built = build(items, |_| Ok(io::repeat(7).take(40 << 10))).unwrap();
        assert_eq!(built.files.len(), 1);
        assert_eq!(built.length, 40 << 10);
        let empty = vec![TreeItem::File {
            path: p("e"),
            length: 0,
            mode: 0o644,
        }];
        assert!(build(empty, |_| Ok(io::empty())).is_err());
    }

    #[test]
    fn a_file_that_changes_size_while_read_is_refused() {
        let items = vec![TreeItem::File {
            path: p("f"),
            length: 10,
            mode: 0o644,
        }];
        let err = build(items, |_| Ok(io::repeat(1).take(11))).err().unwrap();
        assert!(err.to_string().contains("changed size"), "{err}");
    }

    #[test]
    fn directories_keep_their_permission_bits_only() {
        let items = vec![
            TreeItem::Dir {
                path: p("d"),
                mode: 0o4700,
            },
            TreeItem::File {
                path: p("d/f"),
                length: 3,
                mode: 0o2640,
            },
        ];
        let built = build(items, |_| Ok(io::repeat(1).take(3))).unwrap();
        assert_eq!(
            built.dirs,
            vec![TreeDir {
                path: p("d"),
                mode: 0o700
            }]
        );
        assert!(matches!(
            built.files[0].kind,
            FileKind::Regular { mode: 0o640, .. }
        ));
    }

    #[test]
    fn identity_covers_names_bits_and_links_but_not_piece_layout() {
        let f = |exec| TreeFile {
            path: p("bin/tool"),
            length: 5,
            kind: FileKind::Regular {
                sha256: Sha256Hash([1; 32]),
                mode: if exec { 0o755 } else { 0o644 },
            },
        };
        let base = manifest_sha256(&[f(true)], &[]);
        assert_ne!(base, manifest_sha256(&[f(false)], &[]));
        let dir = |mode| TreeDir {
            path: p("empty"),
            mode,
        };
        assert_ne!(base, manifest_sha256(&[f(true)], &[dir(0o755)]));
        assert_ne!(
            manifest_sha256(&[f(true)], &[dir(0o700)]),
            manifest_sha256(&[f(true)], &[dir(0o755)])
        );
        let pad = TreeFile {
            path: p(".pad/0"),
            length: 100,
            kind: FileKind::Pad,
        };
        assert_eq!(base, manifest_sha256(&[pad, f(true)], &[]));
        let link = |t: &str| TreeFile {
            path: p("l"),
            length: 0,
            kind: FileKind::Symlink { target: p(t) },
        };
        assert_ne!(
            manifest_sha256(&[f(true), link("a")], &[]),
            manifest_sha256(&[f(true), link("b")], &[])
        );
    }

    /// Padding and links only: every piece is zeros, and the "package" installs as an empty
    /// tree. `build` refuses such a tree; so does `parse`, even with a matching identity.
    #[test]
    fn a_tree_of_padding_only_is_refused() {
        let pad = TreeFile {
            path: p(".pad/0"),
            length: 16 << 10,
            kind: FileKind::Pad,
        };
        let sha = manifest_sha256(&[pad], &[]).to_hex();
        let piece: [u8; 20] = Sha1::digest([0u8; 16 << 10]).into();
        let mut info = b"d5:filesld4:attr1:p6:lengthi16384e4:pathl4:.pad1:0eee".to_vec();
        info.extend_from_slice(b"4:name3:app12:piece lengthi16384e6:pieces20:");
        info.extend_from_slice(&piece);
        info.extend_from_slice(format!("6:sha25664:{sha}14:x-fbpkg-format4:treee").as_bytes());
        let mut file = b"d4:info".to_vec();
        file.extend_from_slice(&info);
        file.push(b'e');
        let err = super::super::Metainfo::parse(&file)
            .expect_err("padding alone is refused")
            .to_string();
        assert!(err.contains("no file with bytes"), "{err}");
    }

    #[test]
    fn order_and_nesting_are_checked() {
        let file = |s: &str| TreeFile {
            path: p(s),
            length: 1,
            kind: FileKind::Regular {
                sha256: Sha256Hash([0; 32]),
                mode: 0o644,
            },
        };
        let dir = |s: &str| TreeDir {
            path: p(s),
            mode: 0o755,
        };
        assert!(check_order(&[file("a"), file("b/c")], &[dir("b"), dir("d")]).is_ok());
        assert!(check_order(&[file("b"), file("a")], &[]).is_err());
        assert!(check_order(&[file("a"), file("a")], &[]).is_err());
        assert!(check_order(&[file("a"), file("a/b")], &[]).is_err());
        assert!(check_order(&[file("a/b")], &[dir("a/b/c")]).is_err());
        assert!(check_order(&[file("a")], &[dir("a")]).is_err());
        assert!(check_order(&[], &[dir("b"), dir("a")]).is_err());
    }
}
