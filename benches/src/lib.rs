//! Benchmarks fbpkg-rs is held to (`shared/BENCHMARKS.md`): programs that run fbpkg-rs and its
//! contenders side by side in one run and report ratios, as JSON plus a short table.
//!
//! The library holds what the benchmark programs share and what can be tested without a
//! socket: a minimal HTTP/1.1 codec ([`http1`]), the announce workload and the rule for what a
//! response counts as ([`workload`]), latency percentiles ([`latency`]), and the release
//! `fbpkg-rs` binary both programs run ([`fbpkg_binary`]).
//!
//! ```
//! use fbpkg_benches::workload::{Outcome, Workload, classify, write_announce};
//! use fbpkg_common::InfoHash;
//!
//! let w = Workload::new(vec![InfoHash([1; 20])]).expect("one swarm");
//! let mut request = Vec::new();
//! write_announce(&mut request, "127.0.0.1:6969", &w.random(&mut rand::rng()), false);
//! assert!(request.starts_with(b"GET /announce?info_hash=%01%01"));
//! assert_eq!(classify(200, b"d8:intervali60e5:peers0:e"), Outcome::Ok { peers: 0 });
//! ```
//!
//! Programs (`cargo run --release -p fbpkg-benches --bin NAME -- --help`):
//! - `tracker_bench`: announces per second and latency, fbpkg-rs tracker against Debian's
//!   opentracker.
//! - `run_bench`: launch cost of `fbpkg-rs run` on a cached package against exec of the same
//!   file, median and p90, and the sockets it opens (none).
//! - `swarm_bench` (root): the flash crowd in network namespaces — fbpkg-rs, librqbit and an
//!   HTTP fan-out against the Kumar-Ross bound; `--cpu --rss` for CPU per GiB and peak RSS.
//!
//! Criterion micro-benches (`cargo bench -p fbpkg-benches --bench NAME`): `verify`, piece
//! verification throughput per core.

pub mod delta_tree;
pub mod fbpkg_binary;
pub mod http1;
pub mod latency;
pub mod swarm;
pub mod workload;
