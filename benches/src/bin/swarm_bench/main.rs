//! `swarm_bench`: a fleet flash crowd against the physical limit (BENCHMARKS.md, "Swarm"):
//! fbpkg-rs, librqbit, aria2 and an HTTP fan-out distribute the same package, one after the other,
//! on the same shaped network of namespaces, and are reported side by side; and fbpkg-rs's
//! phased rollouts against its own flash crowd (the `rollout` scenario, below).
//!
//! ```text
//! sudo cargo run --release -p fbpkg-benches --bin swarm_bench -- --scenario smoke
//! sudo cargo run --release -p fbpkg-benches --bin swarm_bench -- --scenario b1,b2 --json swarm.json
//! sudo cargo run --release -p fbpkg-benches --bin swarm_bench -- --cpu --rss
//! sudo cargo run --release -p fbpkg-benches --bin swarm_bench -- --scenario rollout --contenders fbpkg-rs
//! sudo cargo run --release -p fbpkg-benches --bin swarm_bench -- --scenario b3,b5 --contenders fbpkg-rs,aria2
//! ```
//!
//! Issue 12's scenarios: `b3` gives every third leecher a thin uplink (per-host caps, the
//! bound with the sum of the real uplinks); `b5` adds origin hosts `o2..o4` holding packages
//! `pkg2..pkg4`, every leecher asks for all of them at once, and each contender reports each
//! package's finish per host (every contender); `stragglers` gives two of B1's
//! eight leechers a quarter of the download rate and reports the others' eta_last against
//! T_KR and each straggler's time against its own bound; `b4` kills a quarter of the
//! leechers (fbpkg-rs's agent and `get`, aria2's `aria2c`, librqbit's node, the fan-out's
//! client) at half their progress and starts them again 5 s later on the same disk,
//! and starts 4 more hosts at T_KR / 2 (see `contenders::churn`). aria2 is Debian's `aria2c`.
//!
//! Per scenario: remove leftovers of a crashed run; build N+2 host namespaces and a switch
//! namespace (see `fbpkg_benches::swarm::netplan`); calibrate one TCP flow through the caps;
//! generate the package (random bytes on tmpfs) and its metainfo; then for each contender:
//! start it, wait until its seed is listed by the tracker, start every leecher at one instant,
//! wait for all of them until `--deadline-factor` x T_KR, read the seed's egress, stop
//! everything, verify every leecher's bytes. Everything is torn down on exit, error, panic,
//! SIGINT or SIGTERM. Needs root; not part of `cargo test`.
//!
//! # The `rollout` scenario (issue 9, "Bench")
//!
//! ```text
//! sudo target/release/swarm_bench --scenario rollout --contenders fbpkg-rs \
//!     --fbpkg-bin target/release/fbpkg-rs --json rollout.json
//! ```
//!
//! 16 hosts, B1's caps (80/80/160 Mbit/s), a 64 MiB package: T_KR 6.7 s, a whole run in
//! about two minutes. First the contenders' flash crowd of the new version (v2) to the 16
//! hosts, as in every scenario. Then, twice (`--prefetch-rate unlimited`, then `off`), from a
//! fresh tracker (`--rollout-tick 50ms`, a publish token) and fresh agent state and caches:
//! the seed publishes v1 with `--tag prod` and v2 untagged; every host runs
//! `fbpkg-rs agent --follow pkg:prod --follow-interval 250ms --host-id host-N --on-change ...`,
//! where the on-change command appends `$FBPKG_PACKAGE_HASH $(date +%s%N)` to a file of
//! that host's; once every file shows v1, `fbpkg-rs rollout start pkg:<v2> --tag prod
//! --phases 25,50,75,100 --bake 0s --max-failures 0`, and the clock (wall time taken just
//! before that command) runs until every file shows v2. Reported: per phase, the time until
//! that phase's hosts (and the earlier ones) had all activated v2 and what the phase added,
//! and the total, beside the flash crowd's T_last; and the issue's target, every phase after
//! the first adding under 1 s with prefetch. Phases go by bucket (a hash of name, tag and host
//! id), so the host ids are not `host-0..15` but the first four of `host-0, host-1, ...` in
//! each quarter of the buckets: each phase adds exactly four hosts (the table lists them).
//! `--leechers` may change N to another multiple of 4. Every wait has a deadline (v1 within
//! the scenario's deadline plus 30 s, v2 within twice the deadline).
//!
//! # The `delta` scenario (issue 13, "Bench")
//!
//! ```text
//! sudo target/release/swarm_bench --scenario delta --contenders fbpkg-rs,aria2 \
//!     --fbpkg-bin target/release/fbpkg-rs --json delta.json
//! ```
//!
//! 16 hosts, B1's caps, a 512 MiB directory made by `fbpkg_benches::delta_tree` (four large
//! random files and thousands of small text files); version N+1 replaces one large file
//! (4.75% of the bytes), edits ten small files and adds one. First the contenders' flash
//! crowds of N+1 to hosts holding nothing (fbpkg-rs publishes the directory as a tree
//! package; aria2 seeds the same metainfo from a copy with its BEP 47 padding written out as
//! files). Then fbpkg-rs from fresh agents: the seed publishes N, every host fetches it (not
//! timed), the seed publishes N+1 and every host fetches it at one instant. Reported: T_last,
//! piece bytes received per host (fbpkg-rs's own count), bytes on the wire per host, and the
//! origin's egress per copy, for the three runs side by side; and the issue's target, at most
//! 1.2x the changed bytes plus the metainfo per host and per copy. Copies are checked file by
//! file against the source tree (permission bits and `.pad/` aside).

mod calibrate;
mod cleanup;
mod contenders;
mod cpu;
mod measure;
mod nodes;
mod orchestrate;
mod procs;
mod topology;
mod warm;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use clap::{Parser, Subcommand};
use fbpkg_benches::swarm::netplan::{Queue, Tbf};
use fbpkg_benches::swarm::scenario::{Scenario, parse_rate};
use fbpkg_common::size::parse_bytes as parse_size;

use crate::contenders::Which;

/// Fleet flash crowd: fbpkg-rs, librqbit, aria2 and HTTP fan-out against the Kumar-Ross bound, on
/// network namespaces shaped with tc (needs root).
#[derive(Debug, Parser)]
#[command(max_term_width = 100, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    node: Option<Internal>,
    #[command(flatten)]
    args: Args,
}

/// Orchestrator flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Scenarios, comma-separated: b1 (seed-bound), b2 (upload-bound), b1-48 (48 leechers,
    /// 64 MiB, 20/20/40 Mbit/s), b3 (48 leechers, 64 MiB, seed up 40, every third leecher
    /// 5 Mbit/s up and the rest 20, all 40 down), b5 (24 leechers fetch 4 packages of 64 MiB
    /// from 4 origins at once, B1's caps), b4 (32 leechers and 4 that
    /// join at T_KR / 2, 128 MiB, B1's caps; 8 killed with SIGKILL at half their progress and
    /// started again 5 s later), stragglers (B1 with two of
    /// the eight leechers at 40 Mbit/s down), smoke (N=4, 32 MiB), rollout (16 hosts following a tag, 64
    /// MiB, B1's caps: the contenders' flash crowd of v2, then a phased rollout from v1 to v2
    /// with prefetch on and off; N must be a multiple of 4), delta (16 hosts, B1's caps, a
    /// 512 MiB directory: the contenders' flash crowd of version N+1, then fbpkg-rs's hosts
    /// holding N fetch N+1; fbpkg-rs and aria2 only).
    #[arg(long, value_delimiter = ',', default_value = "b1,b2")]
    scenario: Vec<String>,

    /// Contenders, comma-separated: fbpkg-rs, librqbit, aria2 (Debian's aria2c, which must
    /// be installed), http.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "fbpkg-rs,librqbit,aria2,http"
    )]
    contenders: Vec<Which>,

    /// Override N (leechers) in every scenario.
    #[arg(long)]
    leechers: Option<usize>,

    /// Override F (package size, e.g. 256M, 1G) in every scenario.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,

    /// Override the seed's upload cap (Mbit/s, or 80M, 1G).
    #[arg(long, value_parser = parse_rate)]
    seed_up: Option<u64>,

    /// Override the leechers' upload cap (in b3: of the leechers that are not slow).
    #[arg(long, value_parser = parse_rate)]
    leecher_up: Option<u64>,

    /// Override the leechers' download cap (in stragglers: of the leechers that are not).
    #[arg(long, value_parser = parse_rate)]
    leecher_down: Option<u64>,

    /// Multiply every link cap of the scenario by this (0.01 to 100), after the overrides
    /// above: B3's thin uplinks and the stragglers' downlinks too, so T_KR scales by its
    /// inverse. On a machine with few cores, a run at 0.5 or 0.25 tells whether the CPU or
    /// the swarm sets the time: a swarm that the links alone limit keeps its eta.
    #[arg(long, default_value_t = 1.0)]
    rate_scale: f64,

    /// tbf bucket size in bytes [default: 32768; 131072 for scenarios of more than 16
    /// leechers, where smaller buckets make the kernel split every GSO packet and the
    /// emulation, not the contenders, sets the time on small machines].
    #[arg(long)]
    tbf_burst: Option<u32>,

    /// tbf queue as latency at the cap's rate, in milliseconds; tc adds the bucket's bytes to
    /// the limit, so the queue can hold this plus the bucket's time at the rate.
    #[arg(long, default_value_t = Tbf::default().latency_ms)]
    tbf_latency_ms: u32,

    /// The order a cap's queue sends in: `fifo` (BENCHMARKS.md's links: one tbf, one FIFO) or
    /// `small-first` (an htb cap at the same rate that sends packets under 128 bytes, pure ACKs
    /// and requests, before the rest, somewhat as a host's fair queue would, though it can
    /// reorder a connection's segments; not the targets' topology: it tells what the FIFO
    /// costs a host whose uplink is full).
    #[arg(long, value_enum, default_value_t = Queue::Fifo)]
    queue: Queue,

    /// A contender's leechers not done after this many times T_KR count as timed out.
    #[arg(long, default_value_t = 10.0)]
    deadline_factor: f64,

    /// ... but never less than this many seconds.
    #[arg(long, default_value_t = 30.0)]
    min_deadline_secs: f64,

    /// Wire counters sampled every this many milliseconds (timelines, stalls).
    #[arg(long, default_value_t = 500)]
    sample_ms: u64,

    /// Run a churn scenario's crowd (b4) without its kills and late starts: every leecher
    /// starts at once and none dies. The baseline that tells what the churn costs from what
    /// the machine costs.
    #[arg(long)]
    no_churn: bool,

    /// Seconds of each single-flow calibration (0: skip calibration).
    #[arg(long, default_value_t = 3.0)]
    calibrate_secs: f64,

    /// librqbit leechers keep serving after completing until the run's end (default: they
    /// exit when complete).
    #[arg(long)]
    rqbit_linger: bool,

    /// Skip writing and freeing a run's worth of memory before each scenario's (and the CPU
    /// mode's) first contender. The warm-up makes the first contender start on memory just
    /// freed, as the later ones do; on a machine whose memory is slow to back it can take a
    /// minute, which a series of one contender (each run after the last) does not need.
    #[arg(long)]
    no_warm_memory: bool,

    /// Also (or, with `--scenario none`, only) measure CPU seconds per GiB delivered, on
    /// loopback, unshaped.
    #[arg(long)]
    cpu: bool,

    /// Also measure the agents' peak RSS with a 1 GiB package on loopback (implies the CPU
    /// measurement for that size).
    #[arg(long)]
    rss: bool,

    /// Leechers in the CPU/RSS mode.
    #[arg(long, default_value_t = 8)]
    cpu_leechers: usize,

    /// Package size of the CPU mode.
    #[arg(long, value_parser = parse_size, default_value = "256M")]
    cpu_size: u64,

    /// Runs of each contender in the CPU mode, the contenders' order reversed every other
    /// round, and each one's mean reported. The mode writes and frees a run's worth of memory
    /// before its first run: on a VM whose host backs memory lazily, the contender that ran
    /// first used to pay for memory left idle (16.1 s/GiB first, 9.1 second, the same build);
    /// alternating the order shows what is left of that.
    #[arg(long, default_value_t = 1)]
    cpu_rounds: usize,

    /// Package size of the RSS mode.
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    rss_size: u64,

    /// Write the JSON report here (`-` for stdout; the tables then go to stderr).
    #[arg(long)]
    json: Option<PathBuf>,

    /// A release build of fbpkg-rs; without it the bench runs
    /// `cargo build --release -p fbpkg-peer --bin fbpkg-rs` first.
    #[arg(long, env = "FBPKG_BENCH_FBPKG_BIN")]
    fbpkg_bin: Option<PathBuf>,

    /// An extra flag for every fbpkg-rs agent, repeatable (e.g. `--fbpkg-agent-arg=--origin-budget=1.1`).
    #[arg(long, allow_hyphen_values = true)]
    fbpkg_agent_arg: Vec<String>,

    /// Copy the logs (agents, tracker, nodes, tc stats) here before the tmpfs is removed.
    #[arg(long)]
    keep_logs: Option<PathBuf>,
}

/// Programs run inside the namespaces (internal).
#[derive(Debug, Subcommand)]
enum Internal {
    /// A librqbit session (seed or leecher).
    #[command(hide = true)]
    RqbitNode(nodes::rqbit_node::RqbitArgs),
    /// The HTTP fan-out server.
    #[command(hide = true)]
    HttpServe(nodes::http::ServeArgs),
    /// The HTTP fan-out client.
    #[command(hide = true)]
    HttpGet(nodes::http::GetArgs),
    /// Wait for `go`, then exec a program (aria2c).
    #[command(hide = true)]
    ExecOnGo(nodes::exec_on_go::ExecArgs),
    /// GET a small resource (tracker API).
    #[command(hide = true)]
    HttpProbe(nodes::http::ProbeArgs),
    /// Calibration receiver.
    #[command(hide = true)]
    FlowRecv(nodes::flow::RecvArgs),
    /// Calibration sender.
    #[command(hide = true)]
    FlowSend(nodes::flow::SendArgs),
}

fn run_node(node: Internal) -> ExitCode {
    let r = match node {
        Internal::RqbitNode(a) => nodes::rqbit_node::main(a),
        Internal::HttpServe(a) => nodes::http::serve(a),
        Internal::HttpGet(a) => nodes::http::get(a),
        Internal::HttpProbe(a) => nodes::http::probe(a),
        Internal::ExecOnGo(a) => nodes::exec_on_go::main(a),
        Internal::FlowRecv(a) => nodes::flow::recv(a),
        Internal::FlowSend(a) => nodes::flow::send(a),
    };
    let code = match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("swarm_bench node: error: {e:#}");
            1
        }
    };
    // Leave at once: a runtime with blocked threads must not hold the exit.
    std::process::exit(code);
}

impl Args {
    /// The scenarios asked for, with overrides applied.
    fn scenarios(&self) -> anyhow::Result<Vec<Scenario>> {
        let mut out = Vec::new();
        for name in &self.scenario {
            let name = name.trim().to_ascii_lowercase();
            if name == "none" {
                continue;
            }
            let mut s = Scenario::preset(&name).with_context(|| {
                format!("unknown scenario {name:?} (b1, b2, b1-48, b3, b4, b5, stragglers, smoke, rollout, delta, none)")
            })?;
            if let Some(n) = self.leechers {
                s.leechers = n;
            }
            if let Some(f) = self.size {
                s.package_bytes = f;
            }
            if let Some(r) = self.seed_up {
                s.caps.seed_up_bps = r;
            }
            if let Some(r) = self.leecher_up {
                s.caps.leecher_up_bps = r;
            }
            if let Some(r) = self.leecher_down {
                s.caps.leecher_down_bps = r;
            }
            s.scale_rates(self.rate_scale);
            s.validate().map_err(anyhow::Error::msg)?;
            out.push(s);
        }
        Ok(out)
    }

    /// The shaping of a scenario with `leechers` leechers.
    fn tbf(&self, leechers: usize) -> anyhow::Result<Tbf> {
        ensure!(
            self.tbf_burst
                .is_none_or(|b| (2048..=16 << 20).contains(&b)),
            "--tbf-burst must be 2 KiB to 16 MiB"
        );
        ensure!(
            (1..=10_000).contains(&self.tbf_latency_ms),
            "--tbf-latency-ms must be 1 to 10000"
        );
        let mut tbf = Tbf::for_leechers(leechers, self.tbf_latency_ms);
        tbf.queue = self.queue;
        if let Some(b) = self.tbf_burst {
            tbf.burst_bytes = b;
        }
        Ok(tbf)
    }

    fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            self.deadline_factor.is_finite() && self.deadline_factor >= 1.0,
            "--deadline-factor must be at least 1"
        );
        ensure!(
            self.min_deadline_secs.is_finite()
                && (1.0..=86_400.0).contains(&self.min_deadline_secs),
            "--min-deadline-secs must be 1 to 86400"
        );
        ensure!(
            (50..=10_000).contains(&self.sample_ms),
            "--sample-ms must be 50 to 10000"
        );
        ensure!(
            self.calibrate_secs.is_finite() && (0.0..=60.0).contains(&self.calibrate_secs),
            "--calibrate-secs must be 0 to 60"
        );
        ensure!(
            (1..=64).contains(&self.cpu_leechers),
            "--cpu-leechers must be 1 to 64"
        );
        ensure!(
            (1..=8).contains(&self.cpu_rounds),
            "--cpu-rounds must be 1 to 8"
        );
        ensure!(
            (0.01..=100.0).contains(&self.rate_scale),
            "--rate-scale must be 0.01 to 100"
        );
        ensure!(!self.contenders.is_empty(), "no contenders");
        Ok(())
    }

    fn min_deadline(&self) -> Duration {
        Duration::from_secs_f64(self.min_deadline_secs)
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|u| u.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(node) = cli.node {
        return run_node(node);
    }
    let result = orchestrate::bench(cli.args);
    match result {
        Ok(()) if !procs::cancelled() => ExitCode::SUCCESS,
        Ok(()) => ExitCode::from(130),
        Err(e) => {
            eprintln!("swarm_bench: error: {e:#}");
            if procs::cancelled() {
                ExitCode::from(130)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
