//! `fbpkg-rs pin|unpin REF` and `fbpkg-rs cache ls|gc|metrics`: the launcher cache's life.
//!
//! Pins are files in the cache (see `cache::pins`), so pin and unpin work with the agent down
//! and never touch the network: REF resolves against this host's cache. `cache ls` reads the
//! cache itself and asks a running agent only what the cache cannot say (what it seeds, what
//! its followed tags resolve to). `cache gc` goes through a running agent, so the agent stops
//! seeding what is evicted; with no agent it evicts directly.

use std::process::ExitCode;
use std::time::SystemTime;

use fbpkg_common::Sha256Hash;
use fbpkg_common::pkgref::{HashPrefix, PackageName, PackageRef, Selector};
use serde::Serialize;

use super::HostArgs;
use super::status::human;
use crate::agent::budget::{metrics_text, protected_from};
use crate::agent::control::{AgentClient, Event, Request};
use crate::agent::follow::FollowStatus;
use crate::agent::follow_state::FollowState;
use crate::cache::budget::{DEFAULT_HIGH_PCT, DEFAULT_LOW_PCT, protect};
use crate::cache::{Budget, Cache, KeepReason, Protected, SweepReport};
use crate::engine::TorrentStatus;
use crate::error::{PeerError, Result};

const REF_HELP: &str = "\
REF is name:<64 hex digits> (may be pinned before it is fetched), name:<8+ hex digits> (a
unique prefix among the versions in this host's cache, or pinned), or name:<tag> (what the tag
last resolved to on this host, or what this host's agent last activated for it). Pin and unpin
never use the network.";

/// `fbpkg-rs pin` / `unpin` flags.
#[derive(Debug, clap::Args)]
#[command(after_help = REF_HELP)]
pub(crate) struct PinArgs {
    /// The version to pin or unpin.
    reference: String,

    #[command(flatten)]
    host: HostArgs,
}

/// `fbpkg-rs cache` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum CacheCommand {
    /// List the cached versions: size on disk, last use, launches, pinned, in use, seeding,
    /// and why each must stay.
    Ls(LsArgs),
    /// Evict least recently used versions down to the low watermark now (through the agent,
    /// if it runs, so it stops seeding them).
    Gc(GcArgs),
    /// Print the cache metrics in Prometheus text format (for node_exporter's textfile
    /// collector: `fbpkg-rs cache metrics > DIR/fbpkg.prom.tmp && mv DIR/fbpkg.prom.tmp
    /// DIR/fbpkg.prom`).
    Metrics(MetricsArgs),
}

/// `fbpkg-rs cache ls` flags.
#[derive(Debug, clap::Args)]
pub(crate) struct LsArgs {
    #[command(flatten)]
    host: HostArgs,
    /// Print JSON (one array) instead of a table.
    #[arg(long)]
    json: bool,
}

/// `fbpkg-rs cache gc` flags.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Never evicted: pinned versions, versions a running program was launched from (`run`), what a
followed tag resolves to for this host and the version last activated for it, downloads in
progress. With no agent running, followed tags count by what the agent last activated.")]
pub(crate) struct GcArgs {
    #[command(flatten)]
    host: HostArgs,
    /// Say what would be evicted; remove nothing.
    #[arg(long)]
    dry_run: bool,
    /// The budget to evict towards (its low watermark), instead of the agent's
    /// --cache-max-size (the same variable sets both).
    #[arg(long, env = "FBPKG_CACHE_MAX_SIZE", value_parser = fbpkg_common::size::parse_bytes)]
    max_size: Option<u64>,
    /// Print JSON instead of lines.
    #[arg(long)]
    json: bool,
}

/// `fbpkg-rs cache metrics` flags.
#[derive(Debug, clap::Args)]
pub(crate) struct MetricsArgs {
    #[command(flatten)]
    host: HostArgs,
}

/// The one version `reference` names on this host (for `unpin`, pinned versions count too).
fn resolve_local(
    reference: &str,
    cache: &Cache,
    state_dir: &std::path::Path,
) -> Result<(PackageName, Sha256Hash)> {
    let r: PackageRef = reference
        .parse()
        .map_err(|e| PeerError::BadInput(format!("{e}")))?;
    let prefix = match &r.selector {
        Selector::Hash(h) => match &r.name {
            Some(n) => return Ok((n.clone(), *h)),
            None => HashPrefix::new(&h.to_hex()).map_err(|e| PeerError::BadInput(e.to_string()))?,
        },
        Selector::Prefix(p) => p.clone(),
        Selector::Tag(tag) => {
            let Some(name) = &r.name else {
                return Err(PeerError::BadInput(format!(
                    "{reference}: a tag needs a name"
                )));
            };
            let known = FollowState::load(state_dir)
                .get(name, tag)
                .map(|a| a.sha256)
                .or_else(|| cache.recall_tag(name, tag));
            return known.map(|h| (name.clone(), h)).ok_or_else(|| {
                PeerError::NotFound(format!(
                    "{name}:{tag} has never resolved on this host; pin by hash, or `fbpkg-rs get {name}:{tag}` first"
                ))
            });
        }
    };
    let mut found = cache.find_prefix(r.name.as_ref(), &prefix);
    found.extend(
        cache
            .pins()
            .into_iter()
            .filter(|(n, h)| prefix.matches(h) && r.name.as_ref().is_none_or(|want| want == n)),
    );
    found.sort();
    found.dedup();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(PeerError::NotFound(format!(
            "no version matching {reference} in this host's cache (a version not cached yet is pinned by its full hash)"
        ))),
        many => Err(PeerError::Ambiguous(format!(
            "{reference} matches {} versions: {}",
            many.len(),
            many.iter()
                .map(|(n, h)| format!("{n}:{}", &h.to_hex()[..12]))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

pub(super) fn pin(args: PinArgs, on: bool) -> anyhow::Result<ExitCode> {
    let cache = args.host.cache();
    let (name, sha) = resolve_local(&args.reference, &cache, &args.host.state_dir())?;
    let changed = if on {
        cache.pin(&name, &sha)?
    } else {
        cache.unpin(&name, &sha)?
    };
    let what = match (on, changed) {
        (true, true) => "pinned",
        (true, false) => "already pinned",
        (false, true) => "unpinned",
        (false, false) => "was not pinned",
    };
    let note = if on && cache.lookup(&name, &sha).is_none() {
        " (not in the cache yet: kept once fetched)"
    } else {
        ""
    };
    println!("{what} {name}:{sha}{note}");
    Ok(ExitCode::SUCCESS)
}

pub(super) fn run(cmd: CacheCommand) -> anyhow::Result<ExitCode> {
    super::runtime()?.block_on(async move {
        match cmd {
            CacheCommand::Ls(a) => ls(a).await,
            CacheCommand::Gc(a) => gc(a).await,
            CacheCommand::Metrics(a) => metrics(a).await,
        }
    })
}

/// One row of `cache ls`.
#[derive(Debug, Serialize)]
struct Row {
    name: PackageName,
    sha256: Sha256Hash,
    bytes: u64,
    /// RFC 3339, UTC.
    last_use: Option<String>,
    launches: u64,
    pinned: bool,
    in_use: bool,
    /// `null` when no agent runs to say.
    seeding: Option<bool>,
    kept_because: Vec<&'static str>,
}

/// Ask the agent (if one runs) what it seeds and follows.
async fn agent_view(
    state_dir: &std::path::Path,
) -> Result<Option<(Vec<TorrentStatus>, Vec<FollowStatus>)>> {
    let Some(a) = AgentClient::connect(state_dir).await? else {
        return Ok(None);
    };
    let Event::Status { torrents } = a.call(&Request::Status).await? else {
        return Err(PeerError::Agent("unexpected answer to status".into()));
    };
    let follows = match AgentClient::connect(state_dir).await? {
        Some(a) => match a.call(&Request::Follows).await {
            Ok(Event::Follows { follows }) => follows,
            _ => Vec::new(),
        },
        None => Vec::new(),
    };
    Ok(Some((torrents, follows)))
}

/// With no agent: the followed tags' last activations, from its durable state.
fn offline_protected(state_dir: &std::path::Path) -> Protected {
    let mut p = Protected::new();
    for (k, a) in FollowState::load(state_dir).follows {
        if let Some(name) = k
            .split_once(':')
            .and_then(|(n, _)| PackageName::new(n).ok())
        {
            // Kept while a rollout may send the host back (the agent clears it after).
            if let Some(previous) = a.previous {
                protect(
                    &mut p,
                    (name.clone(), previous),
                    KeepReason::FollowedPrevious,
                );
            }
            protect(&mut p, (name, a.sha256), KeepReason::FollowedActive);
        }
    }
    p
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

async fn ls(args: LsArgs) -> anyhow::Result<ExitCode> {
    let cache = args.host.cache();
    let state_dir = args.host.state_dir();
    let view = agent_view(&state_dir).await?;
    let (protected, seeding) = match &view {
        Some((torrents, follows)) => (
            protected_from(follows, torrents, None),
            Some(
                torrents
                    .iter()
                    .filter(|t| t.phase == "seeding")
                    .map(|t| (t.name.clone(), t.sha256.clone()))
                    .collect::<std::collections::HashSet<_>>(),
            ),
        ),
        None => (offline_protected(&state_dir), None),
    };
    let c = cache.clone();
    let versions = tokio::task::spawn_blocking(move || c.usage()).await?;
    let rows: Vec<Row> = versions
        .into_iter()
        .map(|v| {
            let mut kept: Vec<KeepReason> = protected.get(&v.key()).cloned().unwrap_or_default();
            if v.pinned {
                kept.push(KeepReason::Pinned);
            }
            if v.in_use {
                kept.push(KeepReason::InUse);
            }
            kept.sort();
            kept.dedup();
            Row {
                seeding: seeding
                    .as_ref()
                    .map(|s| s.contains(&(v.name.to_string(), v.sha256.to_hex()))),
                last_use: v.last_use.map(rfc3339),
                kept_because: kept.into_iter().map(KeepReason::as_str).collect(),
                name: v.name,
                sha256: v.sha256,
                bytes: v.bytes,
                launches: v.launches,
                pinned: v.pinned,
                in_use: v.in_use,
            }
        })
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        println!("the cache is empty ({})", cache.root().display());
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:<14} {:>10} {:<20} {:>8} {:<7} {:<8} KEPT BECAUSE",
        "PACKAGE", "VERSION", "SIZE", "LAST USE", "LAUNCHES", "IN USE", "SEEDING"
    );
    let yes = |b: bool| if b { "yes" } else { "no" };
    let mut total = 0;
    for r in &rows {
        total += r.bytes;
        println!(
            "{:<24} {:<14} {:>10} {:<20} {:>8} {:<7} {:<8} {}",
            r.name,
            &r.sha256.to_hex()[..12],
            human(r.bytes as f64),
            r.last_use.as_deref().unwrap_or("-"),
            r.launches,
            yes(r.in_use),
            r.seeding.map_or("unknown", yes),
            if r.kept_because.is_empty() {
                "-".to_owned()
            } else {
                r.kept_because.join(", ")
            }
        );
    }
    println!("{} versions, {}", rows.len(), human(total as f64));
    Ok(ExitCode::SUCCESS)
}

async fn gc(args: GcArgs) -> anyhow::Result<ExitCode> {
    let state_dir = args.host.state_dir();
    let report = match AgentClient::connect(&state_dir).await? {
        Some(agent) => {
            let req = Request::Gc {
                dry_run: args.dry_run,
                max_size: args.max_size,
            };
            match agent.call(&req).await? {
                Event::Gc { report } => report,
                other => anyhow::bail!("unexpected answer from the agent: {other:?}"),
            }
        }
        None => {
            let Some(max) = args.max_size else {
                return Err(PeerError::BadInput(
                    "no agent is running to say the budget: give --max-size SIZE".into(),
                )
                .into());
            };
            let budget =
                Budget::new(max, DEFAULT_HIGH_PCT, DEFAULT_LOW_PCT).map_err(PeerError::BadInput)?;
            let cache = args.host.cache();
            let protected = offline_protected(&state_dir);
            let dry = args.dry_run;
            tokio::task::spawn_blocking(move || {
                cache.sweep(budget.low_bytes(), &protected, dry, "gc", |_, _| {})
            })
            .await??
        }
    };
    print_gc(&report, args.json)?;
    Ok(ExitCode::SUCCESS)
}

fn print_gc(r: &SweepReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    let verb = if r.dry_run { "would evict" } else { "evicted" };
    for e in &r.evicted {
        println!("{verb} {}:{} {}", e.name, e.sha256, human(e.bytes as f64));
    }
    println!(
        "cache: {} -> {} (target {})",
        human(r.bytes_before as f64),
        human(r.bytes_after as f64),
        human(r.target as f64)
    );
    if !r.reached() {
        eprintln!(
            "fbpkg-rs: warning: the rest is pinned, in use or followed; `fbpkg-rs cache ls` says which"
        );
    }
    Ok(())
}

async fn metrics(args: MetricsArgs) -> anyhow::Result<ExitCode> {
    let text = match AgentClient::connect(&args.host.state_dir()).await? {
        Some(agent) => match agent.call(&Request::Metrics).await? {
            Event::Metrics { text } => text,
            other => anyhow::bail!("unexpected answer from the agent: {other:?}"),
        },
        // No agent: the gauges the cache can tell; no eviction counters.
        None => {
            let cache = args.host.cache();
            tokio::task::spawn_blocking(move || metrics_text(&cache, None, None)).await?
        }
    };
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}
