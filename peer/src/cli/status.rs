//! `fbpkg-rs status`: what this host's agent holds, fetches and serves, and the tags it
//! follows.

use std::process::ExitCode;

use super::HostArgs;
use crate::agent::control::{AgentClient, Event, Request};
use crate::agent::follow::FollowStatus;
use crate::engine::TorrentStatus;
use crate::error::PeerError;

/// `fbpkg-rs status` flags.
#[derive(Debug, clap::Args)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    host: HostArgs,

    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,

    /// Only the followed tags (`agent --follow`): what each resolves to for this host, the
    /// version last activated and its health.
    #[arg(long)]
    follows: bool,
}

fn short(h: Option<&fbpkg_common::Sha256Hash>) -> String {
    h.map(|h| h.to_hex()[..12].to_owned())
        .unwrap_or_else(|| "-".into())
}

fn follows_table(rows: &[FollowStatus]) -> String {
    if rows.is_empty() {
        return "no follows: start the agent with --follow NAME:TAG\n".to_owned();
    }
    let mut out = format!(
        "{:<32} {:<14} {:<14} {:<10}\n",
        "FOLLOW", "RESOLVES TO", "ACTIVE", "STATE"
    );
    for r in rows {
        let state = r
            .state
            .map(|s| format!("{s:?}").to_lowercase())
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<32} {:<14} {:<14} {:<10}\n",
            r.reference,
            short(r.resolved.as_ref()),
            short(r.activated.as_ref()),
            state
        ));
        if let Some(d) = &r.detail {
            let last = d.lines().last().unwrap_or_default();
            out.push_str(&format!(
                "    {}\n",
                last.chars().take(160).collect::<String>()
            ));
        }
        if let Some(e) = &r.error {
            out.push_str(&format!("    error: {e}\n"));
        }
    }
    out
}

pub(super) fn human(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    // Rates computed from differences can come out as -0.0 or a hair below zero.
    let mut v = if n > 0.0 { n } else { 0.0 };
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

fn table(rows: &[TorrentStatus]) -> String {
    if rows.is_empty() {
        return "no packages: `fbpkg-rs get` or `fbpkg-rs publish` one\n".to_owned();
    }
    let mut out = format!(
        "{:<24} {:<14} {:<11} {:>7} {:>5} {:>12} {:>12} {:>10}\n",
        "PACKAGE", "VERSION", "STATE", "DONE", "PEERS", "DOWN/s", "UP/s", "UPLOADED"
    );
    for r in rows {
        let pct = if r.pieces_total == 0 {
            100.0
        } else {
            100.0 * f64::from(r.pieces_have) / f64::from(r.pieces_total)
        };
        out.push_str(&format!(
            "{:<24} {:<14} {:<11} {:>6.1}% {:>5} {:>12} {:>12} {:>10}\n",
            r.name,
            &r.sha256[..12.min(r.sha256.len())],
            r.phase,
            pct,
            r.peers,
            human(r.download_rate),
            human(r.upload_rate),
            human(r.uploaded as f64)
        ));
        if let Some(e) = &r.error {
            out.push_str(&format!("    error: {e}\n"));
        }
    }
    out
}

pub(super) fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let state_dir = args.host.state_dir();
    super::runtime()?.block_on(async {
        let Some(agent) = AgentClient::connect(&state_dir).await? else {
            return Err(PeerError::Agent(format!(
                "no agent is running with state directory {} (start one with `fbpkg-rs agent`)",
                state_dir.display()
            ))
            .into());
        };
        if args.follows {
            let Event::Follows { follows } = agent.call(&Request::Follows).await? else {
                anyhow::bail!("unexpected answer from the agent");
            };
            if args.json {
                println!("{}", serde_json::to_string_pretty(&follows)?);
            } else {
                print!("{}", follows_table(&follows));
            }
            return Ok(ExitCode::SUCCESS);
        }
        let Event::Status { torrents } = agent.call(&Request::Status).await? else {
            anyhow::bail!("unexpected answer from the agent");
        };
        if !args.json {
            // An agent from before follows answers an error: then there is nothing to show.
            let follows = match AgentClient::connect(&state_dir).await? {
                Some(a) => match a.call(&Request::Follows).await {
                    Ok(Event::Follows { follows }) => follows,
                    _ => Vec::new(),
                },
                None => Vec::new(),
            };
            print!("{}", table(&torrents));
            if !follows.is_empty() {
                print!("\n{}", follows_table(&follows));
            }
            return Ok(ExitCode::SUCCESS);
        }
        if args.json {
            println!("{}", serde_json::to_string_pretty(&torrents)?);
        } else {
            print!("{}", table(&torrents));
        }
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::human;

    #[test]
    fn sizes_are_never_negative() {
        assert_eq!(human(-0.0), "0.0 B");
        assert_eq!(human(-3.0), "0.0 B");
        assert_eq!(human(f64::NAN), "0.0 B");
        assert_eq!(human(1536.0), "1.5 KiB");
    }
}
