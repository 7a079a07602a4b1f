//! `upload_bench`: what it costs an agent to upload a package's blocks from a file in memory,
//! read into a buffer and sent (what the agent does), against sent from the file by the kernel
//! (`sendfile`, which the agent does not use: this measures why).
//!
//! ```text
//! cargo run --release -p fbpkg-benches --bin upload_bench -- --size 1G --rounds 5
//! ```
//!
//! A package of random bytes on a tmpfs (`--dir`, default `/dev/shm`) goes over one loopback
//! TCP connection to a reader that drops what it reads, as piece messages of 16 KiB blocks,
//! the way a connection of the agent sends them:
//!
//! - `copy`: six blocks at a time (the agent's 96 KiB high-water mark), each header and block
//!   read into one buffer with `PackageData::read_at`, then written;
//! - `file`: the socket corked, each header written and its block sent from the package's file
//!   with `sendfile(2)`, uncorked after six blocks (a block must follow its own header, so
//!   one `sendfile` moves one block).
//!
//! Each round runs both, in alternating order; the sender and the reader are threads of their
//! own, and each one's CPU time is read from `/proc/thread-self/schedstat`. Printed: CPU
//! seconds per GiB of each, median and range over the rounds, and the wall time.

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context as _, bail, ensure};
use bytes::BytesMut;
use clap::Parser;
use fbpkg_common::metainfo::{BLOCK_SIZE, Format, Metainfo};
use fbpkg_common::size::parse_bytes;
use fbpkg_common::wire::{Message, PIECE_HEADER_LEN};
use fbpkg_peer::storage::PackageData;
use rand::Rng as _;

/// Upload CPU from a file in memory: a copy through a buffer against `sendfile`.
#[derive(Parser)]
struct Args {
    /// Package size (K, M, G suffixes).
    #[arg(long, default_value = "1G", value_parser = parse_bytes)]
    size: u64,
    /// Rounds, each sending the package once each way.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Where the package is written (default a tmpfs: nothing waits on a device, and the
    /// bytes are in memory for both ways).
    #[arg(long, default_value = "/dev/shm")]
    dir: PathBuf,
    /// Blocks per write (`copy`) or per cork (`file`): 6 is the agent's 96 KiB high-water mark.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u64).range(1..=1024))]
    batch: u64,
}

/// Bytes of a piece message before its block.
const HEADER: u64 = PIECE_HEADER_LEN as u64;

#[derive(Clone, Copy, PartialEq)]
enum Way {
    Copy,
    File,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Copy => "copy",
            Way::File => "file",
        }
    }
}

/// CPU time of the calling thread, in seconds.
fn thread_cpu() -> anyhow::Result<f64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat")?;
    let ns: u64 = s
        .split_whitespace()
        .next()
        .context("empty schedstat")?
        .parse()?;
    Ok(ns as f64 / 1e9)
}

struct Run {
    sender_cpu: f64,
    reader_cpu: f64,
    wall: f64,
}

fn send(
    way: Way,
    data: &Package,
    len: u64,
    batch: u64,
    sock: &mut TcpStream,
) -> anyhow::Result<()> {
    let block = u64::from(BLOCK_SIZE);
    let blocks = len.div_ceil(block);
    // Block `b`: where it starts in the package, and its length.
    let span = |b: u64| (b * block, (len - b * block).min(block) as usize);
    let mut buf = BytesMut::with_capacity((batch * (block + HEADER)) as usize);
    let mut i = 0;
    while i < blocks {
        let blocks_now = i..(i + batch).min(blocks);
        match way {
            Way::Copy => {
                buf.clear();
                for b in blocks_now.clone() {
                    let (offset, n) = span(b);
                    Message::encode_piece_header(b as u32, 0, n, &mut buf);
                    let at = buf.len();
                    buf.resize(at + n, 0);
                    data.storage.read_at(offset, &mut buf[at..])?;
                }
                sock.write_all(&buf)?;
            }
            Way::File => {
                rustix::net::sockopt::set_tcp_cork(&*sock, true)?;
                for b in blocks_now.clone() {
                    let (offset, n) = span(b);
                    buf.clear();
                    Message::encode_piece_header(b as u32, 0, n, &mut buf);
                    sock.write_all(&buf)?;
                    let mut at = offset;
                    while at < offset + n as u64 {
                        let left = (offset + n as u64 - at) as usize;
                        let k = rustix::fs::sendfile(&*sock, &data.file, Some(&mut at), left)?;
                        ensure!(k > 0, "the file ended");
                    }
                }
                rustix::net::sockopt::set_tcp_cork(&*sock, false)?;
            }
        }
        i = blocks_now.end;
    }
    Ok(())
}

/// The package: the agent's storage over the file (the `copy` way reads through it) and the
/// file itself (the `file` way sends from it).
struct Package {
    storage: PackageData,
    file: File,
}

fn round(way: Way, data: &Arc<Package>, len: u64, batch: u64) -> anyhow::Result<Run> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> anyhow::Result<(u64, f64)> {
        let (mut s, _) = listener.accept()?;
        let cpu0 = thread_cpu()?;
        let mut buf = vec![0u8; 256 << 10];
        let mut got = 0u64;
        loop {
            match s.read(&mut buf)? {
                0 => break,
                n => got += n as u64,
            }
        }
        Ok((got, thread_cpu()? - cpu0))
    });
    let data = data.clone();
    let sender = std::thread::spawn(move || -> anyhow::Result<(f64, f64)> {
        let mut sock = TcpStream::connect(addr)?;
        sock.set_nodelay(true)?;
        let t0 = Instant::now();
        let cpu0 = thread_cpu()?;
        send(way, &data, len, batch, &mut sock)?;
        let cpu = thread_cpu()? - cpu0;
        drop(sock);
        Ok((cpu, t0.elapsed().as_secs_f64()))
    });
    let (sender_cpu, wall) = sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    let (got, reader_cpu) = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    let blocks = len.div_ceil(u64::from(BLOCK_SIZE));
    let sent = len + HEADER * blocks;
    ensure!(
        got == sent,
        "{}: the reader got {got} bytes, not {sent}",
        way.name()
    );
    Ok(Run {
        sender_cpu,
        reader_cpu,
        wall,
    })
}

/// Median, min and max of `v` (not empty).
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.rounds == 0 {
        bail!("--rounds: at least 1");
    }
    let dir = tempfile::tempdir_in(&args.dir)
        .with_context(|| format!("a scratch directory in {}", args.dir.display()))?;
    let path = dir.path().join("pkg");
    {
        let mut f = File::create(&path)?;
        let mut chunk = vec![0u8; 1 << 20];
        let mut left = args.size;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            rand::rng().fill_bytes(&mut chunk[..n]);
            f.write_all(&chunk[..n])?;
            left -= n as u64;
        }
    }
    let meta = Metainfo::build(
        File::open(&path)?,
        args.size,
        "pkg",
        "http://127.0.0.1/announce",
        Format::File,
    )?;
    let data = Arc::new(Package {
        storage: PackageData::open_complete(dir.path(), &meta)?,
        file: File::open(&path)?,
    });
    let gib = args.size as f64 / f64::from(1u32 << 30);
    let mut runs: Vec<(Way, Run)> = Vec::new();
    for r in 0..args.rounds {
        let order = if r % 2 == 0 {
            [Way::Copy, Way::File]
        } else {
            [Way::File, Way::Copy]
        };
        for way in order {
            let run = round(way, &data, args.size, args.batch)?;
            eprintln!(
                "round {r} {}: sender {:.3} s, reader {:.3} s, wall {:.3} s",
                way.name(),
                run.sender_cpu,
                run.reader_cpu,
                run.wall
            );
            runs.push((way, run));
        }
    }
    println!(
        "{} over loopback from {}, {} blocks per write or cork, {} rounds; CPU s per GiB, \
         median (min-max)",
        fmt_size(args.size),
        args.dir.display(),
        args.batch,
        args.rounds
    );
    println!("| way | sender CPU | reader CPU | wall |");
    println!("|---|---|---|---|");
    for way in [Way::Copy, Way::File] {
        let of = |f: fn(&Run) -> f64| {
            spread(
                runs.iter()
                    .filter(|(w, _)| *w == way)
                    .map(|(_, r)| f(r) / gib)
                    .collect(),
            )
        };
        let cell = |(m, lo, hi): (f64, f64, f64)| format!("{m:.3} ({lo:.3}-{hi:.3})");
        println!(
            "| {} | {} | {} | {} |",
            way.name(),
            cell(of(|r| r.sender_cpu)),
            cell(of(|r| r.reader_cpu)),
            cell(of(|r| r.wall))
        );
    }
    Ok(())
}

fn fmt_size(n: u64) -> String {
    if n >= 1 << 30 && n.is_multiple_of(1 << 30) {
        format!("{} GiB", n >> 30)
    } else {
        format!("{} MiB", n as f64 / f64::from(1u32 << 20))
    }
}
