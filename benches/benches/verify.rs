//! Piece verification throughput (target: >= 1 GB/s per core, BENCHMARKS.md).
//!
//! `cargo bench -p fbpkg-benches --bench verify`
//!
//! Two figures: SHA-1 over a piece in memory (the hash alone), and `PackageData::sha1_of`, which
//! is what the agent does — read the piece back from the file (page cache) in 64 KiB chunks
//! and hash it. Both single-threaded, so the throughput is per core.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fbpkg_common::metainfo::{Format, Metainfo};
use fbpkg_peer::storage::PackageData;
use sha1::{Digest, Sha1};

const PIECE: usize = 512 << 10; // the piece length chosen for a 1 GiB package

fn verify(c: &mut Criterion) {
    let data: Vec<u8> = (0..PIECE)
        .map(|i| ((i * 2_654_435_761usize) >> 13) as u8)
        .collect();
    let mut g = c.benchmark_group("piece_verification");
    g.throughput(Throughput::Bytes(PIECE as u64));
    g.bench_function("sha1_in_memory_512KiB", |b| {
        b.iter(|| Sha1::digest(black_box(&data)))
    });

    let dir = tempfile::tempdir().expect("temp dir");
    let pieces = 64u64;
    let zeros = vec![0u8; PIECE * pieces as usize];
    let meta = Metainfo::build(
        &zeros[..],
        zeros.len() as u64,
        "pkg",
        "http://t/a",
        Format::File,
    )
    .expect("metainfo");
    let file = PackageData::open_partial(dir.path(), &meta).expect("piece file");
    for i in 0..pieces {
        file.write_at(i * PIECE as u64, &data).expect("write");
    }
    let mut i = 0u64;
    g.bench_function("piecefile_sha1_of_512KiB", |b| {
        b.iter(|| {
            i = (i + 1) % pieces;
            file.sha1_of(i * PIECE as u64, PIECE as u64).expect("hash")
        })
    });
    g.finish();
}

criterion_group!(benches, verify);
criterion_main!(benches);
