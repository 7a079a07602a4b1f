//! The made-up directory package of issue 13's benches (`delta_bench` on loopback, the swarm
//! bench's `delta` scenario): version N, and version N+1 that changes a few percent of its
//! bytes in a handful of files, as a rebuild of one library and a few configs would.
//!
//! Version N: four large files of random bytes ("binaries": 40%, 25% and 10% of the size, and
//! one of the changed share less a quarter percent) and thousands of small text files of
//! 1–48 KiB (the rest). Version N+1 replaces the smallest large file with new bytes, edits ten
//! small files and adds one. Everything is deterministic: the same size and share make the
//! same trees on every run.

use std::io::{BufWriter, Write as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// Small files version N+1 edits.
pub const EDITED_SMALL_FILES: usize = 10;

/// Version N as made: what version N+1 changes, by path relative to the root.
#[derive(Debug, Clone)]
pub struct Tree {
    /// The small files.
    pub small: Vec<PathBuf>,
    /// The large file N+1 replaces.
    pub changed: PathBuf,
    /// Every file (regular files only; the tree has no links).
    pub files: usize,
}

/// xorshift64*: fast, deterministic filler for the made-up files.
struct Filler(u64);

impl Filler {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// `len` random bytes into `path`, in 1 MiB writes.
    fn random_file(&mut self, path: &Path, len: u64) -> anyhow::Result<()> {
        let file =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut out = BufWriter::new(file);
        let mut left = len;
        let mut buf = vec![0u8; 1 << 20];
        while left > 0 {
            let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
            for chunk in buf[..n].chunks_mut(8) {
                let v = self.next().to_le_bytes();
                chunk.copy_from_slice(&v[..chunk.len()]);
            }
            out.write_all(&buf[..n])?;
            left -= n as u64;
        }
        out.flush()?;
        Ok(())
    }

    /// Config-like text of about `len` bytes.
    fn text(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 32);
        while out.len() < len {
            let v = self.next();
            out.extend_from_slice(format!("key_{} = {}\n", v % 997, v >> 40).as_bytes());
        }
        out.truncate(len);
        out
    }
}

/// Make version N of `size` bytes under `root` (made if missing), of which version N+1 will
/// change about `changed_share` (0.01 to 0.40).
pub fn make_tree(root: &Path, size: u64, changed_share: f64) -> anyhow::Result<Tree> {
    anyhow::ensure!(
        (0.01..=0.40).contains(&changed_share),
        "the changed share must be 1% to 40%, not {:.1}%",
        changed_share * 100.0
    );
    let mut fill = Filler(0x9e37_79b9_7f4a_7c15);
    for dir in ["bin", "lib"] {
        std::fs::create_dir_all(root.join(dir))
            .with_context(|| format!("creating {}", root.join(dir).display()))?;
    }
    let large_shares = [0.40, 0.25, 0.10, changed_share - 0.0025];
    let mut large = Vec::new();
    let mut large_bytes = 0;
    for (i, share) in large_shares.iter().enumerate() {
        let rel = Path::new(if i < 2 { "bin" } else { "lib" }).join(format!("part{i}.bin"));
        let len = (size as f64 * share) as u64;
        fill.random_file(&root.join(&rel), len)?;
        large_bytes += len;
        large.push(rel);
    }
    let small_total = size.saturating_sub(large_bytes);
    let mut small = Vec::new();
    let mut written = 0u64;
    while written < small_total {
        let n = small.len();
        let dir = Path::new("share").join(format!("d{:02}", n % 64));
        std::fs::create_dir_all(root.join(&dir))?;
        let rel = dir.join(format!("f{n:05}.conf"));
        let want = (1024 + fill.next() % (47 * 1024)).min(small_total - written);
        let text = fill.text(usize::try_from(want).unwrap_or(usize::MAX));
        std::fs::write(root.join(&rel), text)?;
        written += want;
        small.push(rel);
    }
    let changed = large.pop().context("no large file")?;
    let files = small.len() + large.len() + 1;
    Ok(Tree {
        small,
        changed,
        files,
    })
}

/// Turn version N under `root` into N+1, every changed file through a new inode (a cache, or
/// [`link_copy`], may share the old one's blocks); returns the bytes of the files that changed
/// or appeared.
pub fn make_next(root: &Path, tree: &Tree) -> anyhow::Result<u64> {
    let mut fill = Filler(0x1234_5678_9abc_def1);
    let large = root.join(&tree.changed);
    let tmp = large.with_extension("new");
    fill.random_file(&tmp, file_len(&large))?;
    std::fs::rename(&tmp, &large)?;
    let mut changed = file_len(&large);
    let step = (tree.small.len() / EDITED_SMALL_FILES).max(1);
    for rel in tree.small.iter().step_by(step).take(EDITED_SMALL_FILES) {
        let path = root.join(rel);
        let mut bytes = std::fs::read(&path)?;
        bytes.extend_from_slice(b"added_in_next = true\n");
        replace(&path, &bytes)?;
        changed += bytes.len() as u64;
    }
    let added = root
        .join(tree.small.first().context("no small files")?)
        .with_file_name("added.conf");
    let bytes = fill.text(8 * 1024);
    std::fs::write(&added, &bytes)?;
    Ok(changed + bytes.len() as u64)
}

/// Replace `path` by `bytes` through a new inode.
fn replace(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Make `to` a copy of the tree at `from` whose files are hard links to `from`'s (so both
/// cost one tree): [`make_next`] on the copy then leaves `from` as it was.
pub fn link_copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for e in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if e.file_type()?.is_dir() {
            link_copy(&src, &dst)?;
        } else {
            std::fs::hard_link(&src, &dst)
                .with_context(|| format!("linking {} to {}", dst.display(), src.display()))?;
        }
    }
    Ok(())
}

/// Bytes in the regular files under `root`.
pub fn tree_bytes(root: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let e = e?;
            let meta = e.metadata()?;
            if meta.is_dir() {
                dirs.push(e.path());
            } else {
                total += meta.len();
            }
        }
    }
    Ok(total)
}

/// `path`'s length, 0 when it cannot be read.
pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_changes_about_the_share_and_leaves_the_linked_original_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (n, next) = (dir.path().join("n"), dir.path().join("next"));
        let size = 8 << 20;
        let tree = make_tree(&n, size, 0.05).expect("tree N");
        assert_eq!(tree_bytes(&n).expect("size"), size);
        let before = std::fs::read(n.join(&tree.changed)).expect("read");
        link_copy(&n, &next).expect("copy");
        let changed = make_next(&next, &tree).expect("N+1");
        // The replaced file (4.75%), ten edited small files and one added.
        let share = changed as f64 / size as f64;
        assert!((0.05..0.10).contains(&share), "changed share {share}");
        assert_eq!(std::fs::read(n.join(&tree.changed)).expect("read"), before);
        assert_ne!(
            std::fs::read(next.join(&tree.changed)).expect("read"),
            before
        );
        assert_eq!(tree_bytes(&n).expect("size"), size);
        // The same size and share make the same tree.
        let again = make_tree(&dir.path().join("again"), size, 0.05).expect("again");
        assert_eq!(again.small, tree.small);
        assert_eq!(
            std::fs::read(dir.path().join("again").join(&again.changed)).expect("read"),
            before
        );
    }
}
