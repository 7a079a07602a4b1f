//! `layout_bench`: what a directory package costs on the network and on disk, as a tree and as
//! a tar.zst (issue 10's disk item, and the price of it on the wire).
//!
//! ```text
//! cargo run --release -p fbpkg-benches --bin layout_bench -- --dir /usr/bin --dir /usr/lib/python3
//! ```
//!
//! Each directory is first copied into a scratch directory with its regular files and
//! directories only (system directories hold links to `/etc/alternatives` and the like, which
//! a package refuses), so a row measures "a package made of /usr/bin's files".
//!
//! For each directory: its regular files' bytes, and the blocks they take (`du`); the tar.zst
//! `publish --format tar.zst` makes (its bytes are what every host downloads), and the cache
//! entry it leaves (archive + tree + metainfo); the tree torrent `publish` makes by default
//! (its length is what a stock client downloads, padding included, since pieces are fetched
//! whole), what it takes between fbpkg-rs agents, which send blocks zstd-compressed (read
//! here through the engine's storage from the cache entry and compressed by the engine's own
//! encoder, a piece per batch), its padding and metainfo, and the cache entry (tree +
//! metainfo). The tree's metainfo carries the compression dictionary `publish` trains (its
//! training time is given), and the row says what agents would send without it. Both entries are
//! made by `Cache::install` into a scratch cache, as a publish on that host would, and measured
//! in blocks. Publishing costs (read, hash, compress) are timed too, single-threaded, from the
//! page cache after a first read.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, ensure};
use clap::Parser;
use fbpkg_common::metainfo::{FileKind, Format, Metainfo};
use fbpkg_common::pkgref::PackageName;
use fbpkg_common::wire::BlockRef;
use fbpkg_peer::archive::{self, ExtractLimits};
use fbpkg_peer::cache::{Cache, Handoff};
use fbpkg_peer::engine::zstream::{self, BatchEncoder};
use fbpkg_peer::storage::PackageData;
use serde::Serialize;

/// Network and disk cost of a directory package, tree against tar.zst.
#[derive(Debug, Parser)]
#[command(max_term_width = 100)]
struct Args {
    /// A directory to package (repeat for several). Default: /usr/bin (binaries),
    /// /usr/lib/python3 (thousands of small text files) and the Rust toolchain's libraries
    /// (a few large files).
    #[arg(long = "dir", env = "FBPKG_BENCH_DIRS", value_delimiter = ',')]
    dirs: Vec<PathBuf>,

    /// Also write the results as JSON here.
    #[arg(long, env = "FBPKG_BENCH_JSON")]
    json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Row {
    dir: PathBuf,
    files: usize,
    /// Sum of the regular files' lengths.
    file_bytes: u64,
    /// Blocks the source tree takes (du).
    tree_disk: u64,
    tar_zst_bytes: u64,
    tar_zst_secs: f64,
    tar_entry_disk: u64,
    tree_torrent_bytes: u64,
    /// The torrent as agents send it to each other: blocks compressed when smaller, with the
    /// metainfo's dictionary if publish trained one.
    tree_agent_wire_bytes: u64,
    /// The same without a dictionary (as before there were any).
    tree_agent_wire_plain_bytes: u64,
    /// One core's time to read and compress the whole torrent as agents send it, with the
    /// dictionary and without: what seeding costs in CPU.
    tree_agent_secs: f64,
    tree_agent_plain_secs: f64,
    /// The compression dictionary in the metainfo (compressed), 0 when none paid.
    tree_dict_bytes: u64,
    /// Time to train it.
    tree_dict_secs: f64,
    tree_pad_bytes: u64,
    tree_metainfo_bytes: u64,
    tree_pieces: u32,
    tree_piece_length: u64,
    tree_secs: f64,
    tree_entry_disk: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dirs = if args.dirs.is_empty() {
        let mut d: Vec<PathBuf> = ["/usr/bin", "/usr/lib/python3"]
            .iter()
            .map(PathBuf::from)
            .collect();
        if let Ok(out) = std::process::Command::new("rustc")
            .args(["--print", "sysroot"])
            .output()
        {
            let root = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            d.push(Path::new(&root).join("lib/rustlib/x86_64-unknown-linux-gnu/lib"));
        }
        d.into_iter().filter(|d| d.is_dir()).collect()
    } else {
        args.dirs
    };
    ensure!(!dirs.is_empty(), "no directory to measure: pass --dir");
    let mut rows = Vec::new();
    for dir in &dirs {
        let row = measure(dir).with_context(|| format!("measuring {}", dir.display()))?;
        print_row(&row);
        rows.push(row);
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&rows)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Blocks under `path` (not following links), as `du` counts them.
fn disk(path: &Path) -> anyhow::Result<u64> {
    let md = std::fs::symlink_metadata(path)?;
    let mut total = md.blocks() * 512;
    if md.is_dir() {
        for e in std::fs::read_dir(path)? {
            total += disk(&e?.path())?;
        }
    }
    Ok(total)
}

/// Copy `from`'s regular files and directories (not links, devices, ...) into `to`.
fn stage(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let ft = e.file_type()?;
        let dest = to.join(e.file_name());
        if ft.is_dir() {
            stage(&e.path(), &dest)?;
        } else if ft.is_file() {
            std::fs::copy(e.path(), &dest)?;
        }
    }
    Ok(())
}

fn measure(source: &Path) -> anyhow::Result<Row> {
    let scratch = tempfile::tempdir()?;
    let dir = &scratch.path().join("src");
    stage(source, dir)?;
    let cache = Cache::new(scratch.path().join("cache"));
    let name = PackageName::new("bench").context("package name")?;
    let announce = "http://127.0.0.1:1/announce";

    // Warm the page cache, so both timings read from memory.
    let items = archive::tree_items(dir)?;
    let open = |path: &[String]| {
        let mut p = dir.to_path_buf();
        p.extend(path);
        std::fs::File::open(&p).map(|f| std::io::BufReader::with_capacity(1 << 20, f))
    };
    Metainfo::build_tree(items.clone(), open, "bench", announce)?;

    let started = Instant::now();
    let tree = Metainfo::build_tree(items, open, "bench", announce)?;
    let tree_secs = started.elapsed().as_secs_f64();
    // What publish adds: the compression dictionary, when it pays.
    let started = Instant::now();
    let published = PackageData::open_tree_at(dir, &tree)?;
    let trained = zstream::train(&tree, |at, buf| published.read_at(at, buf))?;
    let tree_dict_secs = started.elapsed().as_secs_f64();
    let tree_dict_bytes = trained.as_ref().map_or(0, |t| t.zdict.len() as u64);
    let tree = match trained {
        Some(t) => tree.with_zdict(t.zdict)?,
        None => tree,
    };
    let entry = cache.install(&name, &tree, dir, Handoff::Copy, &ExtractLimits::default())?;
    let tree_entry_disk = disk(&entry.dir)?;
    let dict = zstream::Dictionary::of(&tree).map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    let tree_agent_wire_bytes = agent_wire(&entry.dir, &tree, dict.as_ref())?;
    let tree_agent_secs = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let tree_agent_wire_plain_bytes = agent_wire(&entry.dir, &tree, None)?;
    let tree_agent_plain_secs = started.elapsed().as_secs_f64();
    let regular: Vec<_> = tree.files.iter().filter(|f| f.is_regular()).collect();
    let pad: u64 = tree
        .files
        .iter()
        .filter(|f| f.kind == FileKind::Pad)
        .map(|f| f.length)
        .sum();

    let archive_path = scratch.path().join("bench.tar.zst");
    let started = Instant::now();
    archive::create(
        dir,
        std::io::BufWriter::new(std::fs::File::create(&archive_path)?),
    )?;
    let tar_zst_secs = started.elapsed().as_secs_f64();
    let tar_zst_bytes = std::fs::metadata(&archive_path)?.len();
    let tar = Metainfo::build(
        std::io::BufReader::new(std::fs::File::open(&archive_path)?),
        tar_zst_bytes,
        "bench.tar.zst",
        announce,
        Format::TarZst,
    )?;
    let tar_entry = cache.install(
        &name,
        &tar,
        &archive_path,
        Handoff::Move,
        &ExtractLimits::default(),
    )?;
    let tar_entry_disk = disk(&tar_entry.dir)?;

    Ok(Row {
        dir: source.to_path_buf(),
        files: regular.len(),
        file_bytes: regular.iter().map(|f| f.length).sum(),
        tree_disk: disk(dir)?,
        tar_zst_bytes,
        tar_zst_secs,
        tar_entry_disk,
        tree_torrent_bytes: tree.length,
        tree_agent_wire_bytes,
        tree_agent_wire_plain_bytes,
        tree_agent_secs,
        tree_agent_plain_secs,
        tree_dict_bytes,
        tree_dict_secs,
        tree_pad_bytes: pad,
        tree_metainfo_bytes: tree.as_bytes().len() as u64,
        tree_pieces: tree.num_pieces(),
        tree_piece_length: tree.piece_length,
        tree_secs,
        tree_entry_disk,
    })
}

/// Block bytes an agent sends another for the whole package, each piece's blocks as one
/// compressed batch the way the engine sends them (`fbpkg_peer::engine::zstream`; in a swarm a
/// batch is whatever a peer has queued, mostly the blocks of a piece or two).
fn agent_wire(
    entry: &Path,
    meta: &Metainfo,
    dict: Option<&zstream::Dictionary>,
) -> anyhow::Result<u64> {
    let data = PackageData::open_complete(entry, meta)?;
    let block = u64::from(fbpkg_common::metainfo::BLOCK_SIZE);
    let mut buf = vec![0u8; block as usize];
    let mut out = bytes::BytesMut::new();
    let mut wire = 0u64;
    for i in 0..meta.num_pieces() {
        let (start, len) = (meta.piece_offset(i), u64::from(meta.piece_size(i)));
        let mut enc = BatchEncoder::new(dict)?;
        let mut at = 0;
        while at < len {
            let n = (len - at).min(block);
            data.read_at(start + at, &mut buf[..n as usize])?;
            let b = BlockRef {
                index: i,
                begin: u32::try_from(at)?,
                length: u32::try_from(n)?,
            };
            wire += enc.block(1, &b, &buf[..n as usize], at + n == len, &mut out)?;
            out.clear();
            at += n;
        }
    }
    Ok(wire)
}

fn mib(b: u64) -> f64 {
    b as f64 / f64::from(1 << 20)
}

fn print_row(r: &Row) {
    println!(
        "{}: {} files, {:.1} MiB of file bytes, {:.1} MiB on disk",
        r.dir.display(),
        r.files,
        mib(r.file_bytes),
        mib(r.tree_disk)
    );
    println!(
        "  tree:    network {:.1} MiB between agents ({:.2}x the tar.zst), {:.1} MiB to a stock client ({:.2}x the files; padding {:.1} MiB, metainfo {:.2} MiB, {} pieces of {} KiB), cache entry {:.1} MiB ({:.2}x the tree on disk), publish {:.2} s",
        mib(r.tree_agent_wire_bytes + r.tree_metainfo_bytes),
        (r.tree_agent_wire_bytes + r.tree_metainfo_bytes) as f64 / r.tar_zst_bytes as f64,
        mib(r.tree_torrent_bytes + r.tree_metainfo_bytes),
        (r.tree_torrent_bytes + r.tree_metainfo_bytes) as f64 / r.file_bytes as f64,
        mib(r.tree_pad_bytes),
        mib(r.tree_metainfo_bytes),
        r.tree_pieces,
        r.tree_piece_length >> 10,
        mib(r.tree_entry_disk),
        r.tree_entry_disk as f64 / r.tree_disk as f64,
        r.tree_secs
    );
    println!(
        "           compression dictionary {:.2} MiB in the metainfo (trained in {:.2} s); without it {:.1} MiB between agents ({:.2}x the tar.zst); seeding compresses {:.0} MB/s per core with it, {:.0} without",
        mib(r.tree_dict_bytes),
        r.tree_dict_secs,
        mib(r.tree_agent_wire_plain_bytes + r.tree_metainfo_bytes - r.tree_dict_bytes),
        (r.tree_agent_wire_plain_bytes + r.tree_metainfo_bytes - r.tree_dict_bytes) as f64
            / r.tar_zst_bytes as f64,
        r.tree_torrent_bytes as f64 / r.tree_agent_secs / 1e6,
        r.tree_torrent_bytes as f64 / r.tree_agent_plain_secs / 1e6,
    );
    println!(
        "  tar.zst: network {:.1} MiB ({:.2}x the files), cache entry {:.1} MiB ({:.2}x the tree on disk), publish {:.2} s",
        mib(r.tar_zst_bytes),
        r.tar_zst_bytes as f64 / r.file_bytes as f64,
        mib(r.tar_entry_disk),
        r.tar_entry_disk as f64 / r.tree_disk as f64,
        r.tar_zst_secs
    );
}
