//! `fbpkg-rs agent`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use fbpkg_common::pkgref::{PackageName, PackageRef, Selector, Tag};
use fbpkg_common::rollout::HostId;
use fbpkg_common::tracker_proto::Zone;

use super::HostArgs;
use crate::agent::Agent;
use crate::agent::budget::{CacheLife, MAX_SWEEP_INTERVAL};
use crate::agent::follow::{FollowConfig, Prefetch};
use crate::cache::Budget;
use crate::engine::{EngineConfig, MIN_UPLOAD_SLOTS};
use crate::tracker_client::Asker;

/// How long the agent retries a transient tracker failure while fetching a metainfo for a
/// `get`; under the 30 s a `get` waits for the agent's first word.
const AGENT_TRACKER_RETRY: Duration = Duration::from_secs(20);

/// `fbpkg-rs agent` flags.
#[derive(Debug, clap::Args)]
pub(crate) struct AgentArgs {
    #[command(flatten)]
    host: HostArgs,

    /// Where other agents connect to fetch pieces. Use this host's fleet address (or
    /// 0.0.0.0:6881) in a fleet; the default only serves agents on this machine.
    #[arg(long, env = "FBPKG_LISTEN", default_value = "127.0.0.1:6881")]
    listen: SocketAddr,

    /// This host's place in the fleet, most general first (e.g. dc1/rack7): the tracker
    /// prefers peers in the same rack, then the same datacenter.
    #[arg(long, env = "FBPKG_ZONE")]
    zone: Option<Zone>,

    /// Connections per package.
    #[arg(long, env = "FBPKG_MAX_PEERS", default_value_t = 50)]
    max_peers: usize,

    /// Connections per package from one IP address. One host runs one agent; a NATed group
    /// of hosts shares an address and may need more.
    #[arg(long, env = "FBPKG_AGENT_MAX_PEERS_PER_ADDRESS", default_value_t = 16)]
    max_peers_per_address: usize,

    /// Peer connections open at once across all packages, handshakes included; past it the
    /// agent stops accepting until one closes.
    #[arg(long, env = "FBPKG_AGENT_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: usize,

    /// Most peers uploaded to at once: the host's upload slots. Packages busy uploading at
    /// once share them (four get 8 each), never fewer than --min-upload-slots each; one
    /// served now and then takes no share. With --upload-slot-rate off, every package has
    /// this many.
    #[arg(long, env = "FBPKG_UPLOAD_SLOTS", default_value_t = 32)]
    upload_slots: usize,

    /// Upload rate each peer uploaded to should get (e.g. 64K, 256K): a package keeps one
    /// upload slot per this much of the rate it uploads at, from --min-upload-slots up to its
    /// share of --upload-slots, so a thin uplink serves a few peers at a useful rate rather
    /// than many at a crawl (at 64K: about 10 peers at 5 Mbit/s, all 32 at 20 Mbit/s). Less
    /// spreads pieces to more peers at once; more makes each hop of a piece faster. "off"
    /// keeps --upload-slots open per package whatever the rate.
    #[arg(long, env = "FBPKG_UPLOAD_SLOT_RATE", default_value = "64K", value_parser = parse_slot_rate)]
    upload_slot_rate: SlotRate,

    /// Fewest upload slots a package keeps however slowly it uploads, and its least share of
    /// --upload-slots (capped at --upload-slots). Fewer lets a thin uplink (under 4 Mbit/s at
    /// the default 64K per slot) serve fewer peers faster; more spreads pieces to more peers
    /// at once.
    #[arg(long, env = "FBPKG_MIN_UPLOAD_SLOTS", default_value_t = MIN_UPLOAD_SLOTS)]
    min_upload_slots: usize,

    /// Advertise everything at once when seeding from the cache, instead of handing a crowd
    /// each piece about once (super-seeding).
    #[arg(long, env = "FBPKG_NO_SUPERSEED")]
    no_superseed: bool,

    /// Cap this agent's upload across all packages, in bytes per second (e.g. 50M, 1G).
    #[arg(long, env = "FBPKG_MAX_UPLOAD_RATE", value_parser = fbpkg_common::size::parse_bytes)]
    max_upload_rate: Option<u64>,

    /// Stop uploading a package this host published (or seeds from its cache since start)
    /// once it has sent this many copies and every piece is available from another peer,
    /// e.g. 1.1. Protects the origin; costs time when leechers' uplinks are the bottleneck.
    #[arg(long, env = "FBPKG_ORIGIN_BUDGET")]
    origin_budget: Option<f64>,

    /// Give a block request to another peer after this long without an answer.
    #[arg(long, env = "FBPKG_REQUEST_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    request_timeout: Duration,

    /// Follow a tag (repeatable; the env var takes a comma-separated list): resolve it as this
    /// host every --follow-interval, fetch what it resolves to, run --on-change when that
    /// changes, and report to the tracker's rollouts.
    #[arg(long = "follow", env = "FBPKG_AGENT_FOLLOW", value_delimiter = ',', value_parser = parse_follow)]
    follow: Vec<(PackageName, Tag)>,

    /// Run through `sh -c` when a followed tag's resolution changes, with FBPKG_PACKAGE_PATH,
    /// FBPKG_PACKAGE_NAME, FBPKG_PACKAGE_HASH and FBPKG_PACKAGE_REF set. Without it, a change
    /// is only recorded and reported.
    #[arg(long, env = "FBPKG_AGENT_ON_CHANGE")]
    on_change: Option<String>,

    /// Run through `sh -c` after --on-change succeeds (same variables): exit 0 is healthy.
    #[arg(long, env = "FBPKG_AGENT_HEALTH_CMD")]
    health_cmd: Option<String>,

    /// Longest --on-change or --health-cmd may run before it is killed (and counts as failed).
    #[arg(long, env = "FBPKG_AGENT_HEALTH_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    health_timeout: Duration,

    /// How often each followed tag is resolved again (also once at start).
    #[arg(long, env = "FBPKG_AGENT_FOLLOW_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    follow_interval: Duration,

    /// Fetch a followed tag's next version as soon as a rollout of it starts, before this
    /// host's phase comes, at most this fast (bytes per second: 32M, 1G), so activation is a
    /// local switch; `unlimited`, or `off` to fetch only when the tag resolves to it. The cap
    /// is lifted when the phase comes or a `get` asks for the version.
    // The default is a quarter of a 1 Gbit/s link: a prefetch never starves a `get` someone
    // waits for, and 1 GB is in place within a minute.
    #[arg(long, env = "FBPKG_AGENT_PREFETCH_RATE", default_value = "32MiB", value_parser = Prefetch::parse)]
    prefetch_rate: Prefetch,

    /// This host's id for rollouts, instead of the one kept in STATE_DIR/host-id: 1 to 64 of
    /// `[A-Za-z0-9._-]`.
    #[arg(long, env = "FBPKG_HOST_ID", value_parser = parse_host_id)]
    host_id: Option<HostId>,

    /// Most the launcher cache's versions may take on disk (e.g. 20G). Past the high
    /// watermark the agent evicts least recently used versions down to the low one; never
    /// a version that is pinned, in use by a running program, what a followed tag resolves to
    /// or last activated, or being downloaded. A fetch that cannot fit even then fails before
    /// downloading (exit 8). Without it the cache grows without bound.
    #[arg(long, env = "FBPKG_CACHE_MAX_SIZE", value_parser = fbpkg_common::size::parse_bytes)]
    cache_max_size: Option<u64>,

    /// Sweep when the cache passes this percentage of --cache-max-size.
    #[arg(long, env = "FBPKG_CACHE_HIGH_WATERMARK", default_value = "90", value_parser = parse_percent)]
    cache_high_watermark: u8,

    /// A sweep evicts down to this percentage of --cache-max-size (below the high one).
    #[arg(long, env = "FBPKG_CACHE_LOW_WATERMARK", default_value = "80", value_parser = parse_percent)]
    cache_low_watermark: u8,

    /// How often the cache is checked against --cache-max-size, besides after each install
    /// (at most 1h).
    #[arg(long, env = "FBPKG_CACHE_SWEEP_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    cache_sweep_interval: Duration,
}

fn parse_percent(s: &str) -> Result<u8, String> {
    crate::cache::budget::parse_percent(s)
}

fn parse_host_id(s: &str) -> Result<HostId, String> {
    HostId::new(s).map_err(|e| e.to_string())
}

/// `--upload-slot-rate`: bytes per second, or `None` for "off".
#[derive(Debug, Clone, Copy)]
struct SlotRate(Option<u64>);

fn parse_slot_rate(s: &str) -> Result<SlotRate, String> {
    match s.trim() {
        "off" => Ok(SlotRate(None)),
        s => fbpkg_common::size::parse_bytes(s).map(|r| SlotRate(Some(r))),
    }
}

fn parse_follow(s: &str) -> Result<(PackageName, Tag), String> {
    let r: PackageRef = s.trim().parse().map_err(|e| format!("{e}"))?;
    match (r.name, r.selector) {
        (Some(n), Selector::Tag(t)) => Ok((n, t)),
        _ => Err(format!("{s:?}: --follow takes NAME:TAG (e.g. myapp:prod)")),
    }
}

pub(super) fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    if args.max_peers == 0
        || args.upload_slots == 0
        || args.min_upload_slots == 0
        || args.max_peers_per_address == 0
        || args.max_connections == 0
    {
        anyhow::bail!(
            "--max-peers, --max-peers-per-address, --max-connections, --upload-slots and --min-upload-slots must be at least 1"
        );
    }
    let state_dir = args.host.state_dir();
    let cache = args.host.cache();
    // Metainfo fetches for `get`s retry for a while; announces have their own loop.
    let tracker = args.host.tracker_client(None, AGENT_TRACKER_RETRY)?;
    let tracker_is_local = tracker.base().split("//").nth(1).is_some_and(|h| {
        h.starts_with("127.") || h.starts_with("localhost") || h.starts_with("[::1]")
    });
    if !tracker_is_local && args.listen.ip().is_loopback() {
        tracing::warn!(
            listen = %args.listen,
            "the tracker is remote but this agent listens on loopback: other hosts cannot fetch from it (set --listen)"
        );
    }
    let mut config = EngineConfig::new(state_dir.join("downloads"));
    config.listen = args.listen;
    config.zone = args.zone.clone();
    config.max_peers = args.max_peers;
    config.max_peers_per_address = args.max_peers_per_address;
    config.max_connections = args.max_connections;
    config.upload_slots = args.upload_slots;
    config.upload_slot_rate = args.upload_slot_rate.0;
    config.min_upload_slots = args.min_upload_slots;
    config.superseed = !args.no_superseed;
    config.request_timeout = args.request_timeout;
    config.max_upload_rate = args.max_upload_rate;
    if let Some(b) = args.origin_budget {
        if !(b.is_finite() && b >= 1.0) {
            anyhow::bail!("--origin-budget must be at least 1 (one copy of the package)");
        }
        config.origin_budget = Some(b);
    }
    let follow = if args.follow.is_empty() {
        if args.on_change.is_some() || args.health_cmd.is_some() {
            anyhow::bail!("--on-change and --health-cmd need at least one --follow NAME:TAG");
        }
        None
    } else {
        if args.follow_interval.is_zero() || args.health_timeout.is_zero() {
            anyhow::bail!("--follow-interval and --health-timeout must be more than zero");
        }
        let mut follows = args.follow.clone();
        follows.sort();
        follows.dedup();
        let host = match &args.host_id {
            Some(h) => h.clone(),
            None => crate::host_id::load_or_create(&state_dir)?,
        };
        Some(FollowConfig {
            follows,
            asker: Asker {
                host,
                zone: args.zone.clone(),
            },
            on_change: args.on_change.clone(),
            health_cmd: args.health_cmd.clone(),
            health_timeout: args.health_timeout,
            interval: args.follow_interval,
            prefetch: args.prefetch_rate,
        })
    };
    let budget = args
        .cache_max_size
        .map(|max| Budget::new(max, args.cache_high_watermark, args.cache_low_watermark))
        .transpose()
        .map_err(|e| anyhow::anyhow!("--cache-high-watermark/--cache-low-watermark: {e}"))?;
    if args.cache_sweep_interval.is_zero() || args.cache_sweep_interval > MAX_SWEEP_INTERVAL {
        anyhow::bail!("--cache-sweep-interval must be more than zero and at most 1h");
    }
    let cache_life = CacheLife::new(budget, args.cache_sweep_interval);
    super::runtime()?.block_on(async move {
        let shutdown = super::shutdown_on_signals();
        Agent::run(
            state_dir, cache, tracker, config, follow, cache_life, shutdown,
        )
        .await?;
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    fn agent(args: &[&str]) -> AgentArgs {
        let cli =
            super::super::Cli::try_parse_from(["fbpkg-rs", "agent"].iter().chain(args)).unwrap();
        match cli.command {
            super::super::Command::Agent(a) => a,
            other => panic!("{other:?}"),
        }
    }

    /// The flags' defaults are the engine's: the README and `--help` describe one setting.
    #[test]
    fn slot_flags_default_to_the_engine_config() {
        let engine = EngineConfig::new("work".into());
        let a = agent(&[]);
        assert_eq!(a.upload_slot_rate.0, engine.upload_slot_rate);
        assert_eq!(a.min_upload_slots, engine.min_upload_slots);
        assert_eq!(a.upload_slots, engine.upload_slots);
        let a = agent(&["--upload-slot-rate=off", "--min-upload-slots=8"]);
        assert_eq!((a.upload_slot_rate.0, a.min_upload_slots), (None, 8));
        assert_eq!(
            agent(&["--upload-slot-rate=256K"]).upload_slot_rate.0,
            Some(256 << 10)
        );
    }
}
