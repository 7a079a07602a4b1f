//! `fbpkg-rs rollout`: start, watch and steer the tracker's rollouts. A client of the
//! tracker's rollout API (README, "Rollouts"); the tracker decides, this only asks and shows.

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fbpkg_common::api::{PhaseCounts, Rollout, RolloutRequest, RolloutState, RolloutView};
use fbpkg_common::pkgref::{PackageName, PackageRef, Selector, Tag};
use fbpkg_common::rollout::{MaxFailures, Phase, validate_phases};

use crate::error::PeerError;
use crate::tracker_client::{RolloutAction, TrackerClient};

/// `fbpkg-rs rollout` flags.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Example:
  fbpkg-rs publish myapp ./build/                 # prints myapp:3f2a9c1e...
  fbpkg-rs rollout start myapp:3f2a9c1e --tag prod --phases zone:dc1/rack7,1,10,50,100 \\
      --bake 5m --max-failures 2%
  fbpkg-rs rollout status myapp:prod              # phases, host counts, failed hosts
  fbpkg-rs rollout pause myapp:prod               # hold; `resume` goes on
  fbpkg-rs rollout abort myapp:prod               # every host back to the old version

Every command but `status` and `list` needs the publish token (--publish-token or
FBPKG_PUBLISH_TOKEN). Exit codes: 0 ok, 1 refused (e.g. a rollout of the tag is already
active), 2 bad input, 3 no such package, tag or rollout, 6 tracker unreachable, 7 not
authorized.")]
pub(crate) struct RolloutArgs {
    #[command(subcommand)]
    command: RolloutCommand,
}

#[derive(Debug, clap::Subcommand)]
enum RolloutCommand {
    /// Start moving a tag to a version, phase by phase.
    Start(StartArgs),
    /// Show a tag's rollout: state, phase, host counts per phase, failed hosts.
    Status(StatusArgs),
    /// List the active rollouts.
    List(ListArgs),
    /// Hold a running rollout in its current phase.
    Pause(SteerArgs),
    /// Go on with a paused rollout.
    Resume(SteerArgs),
    /// Stop a rollout and send every host back to the old version.
    Abort(SteerArgs),
}

/// The tracker and the token, as every other command takes them.
#[derive(Debug, clap::Args)]
struct Conn {
    /// Tracker URL.
    #[arg(long, env = "FBPKG_TRACKER", default_value = "http://127.0.0.1:6969")]
    tracker: String,
    /// Bearer token for the tracker's catalog (needed to start and steer rollouts).
    #[arg(long, env = "FBPKG_PUBLISH_TOKEN", hide_env_values = true)]
    publish_token: Option<String>,
    /// Keep retrying an unreachable tracker this long (reads only: a start, pause, resume or
    /// abort is tried once, since repeating one that took effect would be refused).
    #[arg(long, env = "FBPKG_RETRY_FOR", default_value = "10s", value_parser = humantime::parse_duration)]
    retry_for: Duration,
}

impl Conn {
    fn client(&self) -> Result<TrackerClient, PeerError> {
        Ok(TrackerClient::new(
            &self.tracker,
            self.publish_token.clone(),
            Duration::from_secs(15),
        )?
        .with_retry(self.retry_for))
    }
}

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Example: move myapp:prod to 3f2a9c1e on the hosts of rack dc1/rack7, then 1%, 10%, 50% and
all, each phase healthy for 5 minutes before the next, halting past 2% unhealthy hosts:

  fbpkg-rs rollout start myapp:3f2a9c1e --tag prod --phases zone:dc1/rack7,1,10,50,100 \\
      --bake 5m --max-failures 2%")]
struct StartArgs {
    /// The version to roll out: NAME:HASH, a full hash or a unique prefix of 8+ digits.
    version: String,
    /// The tag to move (e.g. prod).
    #[arg(long)]
    tag: String,
    /// Comma-separated phases: zone:<path> phases first, then percentages ascending to 100.
    #[arg(long, value_delimiter = ',', default_value = "1,10,50,100")]
    phases: Vec<String>,
    /// How long a phase's hosts stay healthy before the next phase starts.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    bake: Duration,
    /// Unhealthy hosts tolerated before the rollout halts: a count ("2") or a percentage of
    /// the hosts reached so far ("2%").
    #[arg(long, default_value = "0")]
    max_failures: String,
    /// Replace a halted rollout of the tag (it is recorded as aborted) instead of refusing.
    #[arg(long)]
    force: bool,
    /// Print the API's JSON instead of a summary.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, clap::Args)]
struct StatusArgs {
    /// The tag: NAME:TAG.
    tag: String,
    /// Print the API's JSON (current rollout and history) instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, clap::Args)]
struct ListArgs {
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, clap::Args)]
struct SteerArgs {
    /// The tag: NAME:TAG.
    tag: String,
    /// Print the API's JSON instead of a summary.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

fn bad(e: impl std::fmt::Display) -> PeerError {
    PeerError::BadInput(e.to_string())
}

/// `NAME:TAG`, refusing hashes (a rollout is of a tag).
fn parse_tag(s: &str) -> Result<(PackageName, Tag), PeerError> {
    let r: PackageRef = s.parse().map_err(bad)?;
    match (r.name, r.selector) {
        (Some(n), Selector::Tag(t)) => Ok((n, t)),
        _ => Err(bad(format!("{s:?}: give NAME:TAG, e.g. myapp:prod"))),
    }
}

/// The request of `rollout start`, checked here so bad input exits 2 before any network.
fn request(a: &StartArgs) -> Result<RolloutRequest, PeerError> {
    let r: PackageRef = a.version.parse().map_err(bad)?;
    let (name, to) = match (r.name, r.selector) {
        (Some(n), Selector::Hash(h)) => (n, h.to_hex()),
        (Some(n), Selector::Prefix(p)) => (n, p.to_string()),
        _ => {
            return Err(bad(format!(
                "{:?}: give NAME:HASH (a full hash or a prefix of 8+ digits), not a tag",
                a.version
            )));
        }
    };
    let phases = a
        .phases
        .iter()
        .map(|p| p.trim().parse::<Phase>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad)?;
    validate_phases(&phases).map_err(bad)?;
    let bake_ms = u64::try_from(a.bake.as_millis())
        .map_err(|_| bad(format!("--bake {:?} is too long", a.bake)))?;
    Ok(RolloutRequest {
        name,
        tag: Tag::new(&a.tag).map_err(bad)?,
        to,
        phases,
        bake_ms,
        max_failures: a.max_failures.parse::<MaxFailures>().map_err(bad)?,
        force: a.force,
    })
}

pub(super) fn run(args: RolloutArgs) -> anyhow::Result<ExitCode> {
    let rt = super::runtime()?;
    match args.command {
        RolloutCommand::Start(a) => {
            let req = request(&a)?;
            let r = rt.block_on(a.conn.client()?.start_rollout(&req))?;
            print_rollout(&r, a.json)?;
        }
        RolloutCommand::Status(a) => {
            let (name, tag) = parse_tag(&a.tag)?;
            let s = rt.block_on(a.conn.client()?.rollout_status(&name, &tag))?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                match &s.current {
                    Some(v) => print!("{}", view_table(v, now_ms())),
                    None => {
                        println!("{name}:{tag}: no active rollout");
                        if let Some(last) = s.history.last() {
                            println!("last: {}", summary(last));
                        }
                    }
                }
            }
        }
        RolloutCommand::List(a) => {
            let all = rt.block_on(a.conn.client()?.rollouts())?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                print!("{}", list_table(&all));
            }
        }
        RolloutCommand::Pause(a) => steer(&rt, a, RolloutAction::Pause)?,
        RolloutCommand::Resume(a) => steer(&rt, a, RolloutAction::Resume)?,
        RolloutCommand::Abort(a) => steer(&rt, a, RolloutAction::Abort)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn steer(rt: &tokio::runtime::Runtime, a: SteerArgs, action: RolloutAction) -> anyhow::Result<()> {
    let (name, tag) = parse_tag(&a.tag)?;
    let r = rt.block_on(a.conn.client()?.steer_rollout(&name, &tag, action))?;
    print_rollout(&r, a.json)
}

fn print_rollout(r: &Rollout, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
    } else {
        println!("{}", summary(r));
    }
    Ok(())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn short(h: &fbpkg_common::Sha256Hash) -> String {
    h.to_hex()[..12].to_owned()
}

fn state_name(s: &RolloutState) -> &'static str {
    match s {
        RolloutState::Running { .. } => "running",
        RolloutState::Paused => "paused",
        RolloutState::Halted { .. } => "halted",
        RolloutState::Aborted { .. } => "aborted",
        RolloutState::Done => "done",
    }
}

/// One line: `myapp:prod #3 running, phase 2/4 (10), 3f2a9c1e1234 -> 9a8b7c6d5e4f`.
fn summary(r: &Rollout) -> String {
    let from = r
        .from
        .as_ref()
        .map(short)
        .unwrap_or_else(|| "(none)".into());
    let phase = r
        .phases
        .get(r.phase)
        .map(|p| p.to_string())
        .unwrap_or_default();
    let mut s = format!(
        "{}:{} #{} {}, phase {}/{} ({phase}), {from} -> {}",
        r.name,
        r.tag,
        r.id,
        state_name(&r.state),
        r.phase + 1,
        r.phases.len(),
        short(&r.to)
    );
    match &r.state {
        RolloutState::Halted { reason } | RolloutState::Aborted { reason } => {
            s.push_str(&format!(": {reason}"));
        }
        _ => {}
    }
    s
}

fn ago(now: u64, then: u64) -> String {
    let secs = now.saturating_sub(then) / 1000;
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// The `status` table of an active rollout.
fn view_table(v: &RolloutView, now: u64) -> String {
    let r = &v.rollout;
    let mut out = format!("{}\n", summary(r));
    out.push_str(&format!(
        "started {} ago, bake {}, max failures {}\n",
        ago(now, r.started_at),
        humantime::format_duration(Duration::from_millis(r.bake_ms)),
        r.max_failures
    ));
    if let RolloutState::Running { phase_started } = r.state {
        out.push_str(&format!("in this phase for {}\n", ago(now, phase_started)));
    }
    out.push_str(&format!(
        "\n  {:<20} {:>8} {:>8} {:>9} {:>8} {:>9}\n",
        "PHASE", "RESOLVED", "FETCHED", "ACTIVATED", "HEALTHY", "UNHEALTHY"
    ));
    for (i, c) in v.phase_counts.iter().enumerate() {
        let PhaseCounts {
            phase,
            resolved,
            fetched,
            activated,
            healthy,
            unhealthy,
        } = c;
        let label = phase
            .as_ref()
            .or(r.phases.get(i))
            .map(|p| match p {
                Phase::Percent(_) => format!("{p}%"),
                Phase::Zone(_) => p.to_string(),
            })
            .unwrap_or_default();
        let mark = if i == r.phase { '*' } else { ' ' };
        out.push_str(&format!(
            "{mark} {label:<20} {resolved:>8} {fetched:>8} {activated:>9} {healthy:>8} {unhealthy:>9}\n"
        ));
    }
    out.push_str(&format!("  hosts in no phase reached yet: {}\n", v.waiting));
    if !v.failed_hosts.is_empty() {
        out.push_str("\nfailed hosts:\n");
        for f in &v.failed_hosts {
            let zone = f.zone.as_ref().map(|z| z.as_str()).unwrap_or("-");
            out.push_str(&format!(
                "  {} (zone {zone}, phase {})\n",
                f.host,
                f.phase + 1
            ));
            for line in f.detail.as_deref().unwrap_or("no detail").lines() {
                out.push_str(&format!("    | {line}\n"));
            }
        }
    }
    out
}

/// The `list` table.
fn list_table(all: &[RolloutView]) -> String {
    if all.is_empty() {
        return "no active rollouts\n".into();
    }
    let mut out = format!(
        "{:<32} {:>4} {:<8} {:>7} {:<14} {:<14} {:>6}\n",
        "TAG", "ID", "STATE", "PHASE", "FROM", "TO", "FAILED"
    );
    for v in all {
        let r = &v.rollout;
        out.push_str(&format!(
            "{:<32} {:>4} {:<8} {:>7} {:<14} {:<14} {:>6}\n",
            format!("{}:{}", r.name, r.tag),
            r.id,
            state_name(&r.state),
            format!("{}/{}", r.phase + 1, r.phases.len()),
            r.from.as_ref().map(short).unwrap_or_else(|| "-".into()),
            short(&r.to),
            v.failed_hosts.len()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    fn start(args: &[&str]) -> Result<RolloutRequest, PeerError> {
        let cli =
            super::super::Cli::try_parse_from(["fbpkg-rs", "rollout", "start"].iter().chain(args))
                .map_err(bad)?;
        match cli.command {
            super::super::Command::Rollout(RolloutArgs {
                command: RolloutCommand::Start(a),
            }) => request(&a),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn start_flags_make_the_request() {
        let h = "ab".repeat(32);
        let r = start(&[
            &format!("myapp:{h}"),
            "--tag",
            "prod",
            "--phases",
            "zone:dc1/rack7,10,100",
            "--bake",
            "5m",
            "--max-failures",
            "2%",
            "--force",
        ])
        .unwrap();
        assert_eq!(r.name.as_str(), "myapp");
        assert_eq!(r.tag.as_str(), "prod");
        assert_eq!(r.to, h);
        assert_eq!(
            r.phases.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            ["zone:dc1/rack7", "10", "100"]
        );
        assert_eq!(r.bake_ms, 300_000);
        assert_eq!(r.max_failures, MaxFailures::Percent(2));
        assert!(r.force);
        let p = start(&["myapp:abcdef12", "--tag", "prod"]).unwrap();
        assert_eq!(p.to, "abcdef12");
        assert_eq!(p.phases.len(), 4);
        assert!(!p.force);
    }

    #[test]
    fn bad_start_input_is_bad_input() {
        for args in [
            &["myapp:prod", "--tag", "prod"][..],
            &["abcdef12", "--tag", "prod"],
            &["myapp:abcdef12", "--tag", "prod", "--phases", "10,50"],
            &["myapp:abcdef12", "--tag", "prod", "--phases", "50,10,100"],
            &["myapp:abcdef12", "--tag", "prod", "--max-failures", "x"],
            &["myapp:abcdef12", "--tag", "NOT A TAG"],
        ] {
            let e = start(args).unwrap_err();
            assert_eq!(
                e.exit_code(),
                super::super::exit::BAD_REFERENCE,
                "{args:?}: {e}"
            );
        }
        assert!(parse_tag("myapp:prod").is_ok());
        assert!(parse_tag(&format!("myapp:{}", "ab".repeat(32))).is_err());
        assert!(parse_tag("prod").is_err());
    }
}
