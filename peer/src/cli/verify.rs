//! `fbpkg-rs verify [REF]`: read cached packages again; quarantine the ones that changed.
//!
//! Works on the cache directory itself, with or without an agent: it is what an operator runs
//! when a host misbehaves, and what a timer can run on a schedule. It never needs the network.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use fbpkg_common::Sha256Hash;
use fbpkg_common::pkgref::{HashPrefix, PackageName, PackageRef, Selector};
use serde::Serialize;

use super::{HostArgs, exit};
use crate::agent::control::{AgentClient, Request};
use crate::cache::{Cache, VerifyReport};
use crate::error::{PeerError, Result};

/// `fbpkg-rs verify` flags.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Each entry's archive is read again: its length, its SHA-256 (the version's name) and every
piece's SHA-1; a directory package's tree is compared with its archive, file by file. A
corrupt entry is moved to <cache>/.quarantine (the newest few are kept for a look), so get
and the agent stop using it and fetch it again. An intact entry whose files were made
writable or touched is made read-only again.

REF is name:<hash>, name:<hash prefix>, name:<tag> (as this host last resolved it), a bare
hash or prefix, or a package name for all its versions. Nothing is fetched.

Exit codes: 0 every entry intact, 4 at least one corrupt, 3 REF not in the cache,
2 bad REF, 1 an entry could not be read (permissions).")]
pub(crate) struct VerifyArgs {
    /// What to verify; every cached package when absent.
    reference: Option<String>,

    /// Only report: leave corrupt entries in place and change nothing.
    #[arg(long)]
    no_quarantine: bool,

    /// Print one JSON object instead of one line per entry.
    #[arg(long)]
    json: bool,

    #[command(flatten)]
    host: HostArgs,
}

/// One entry's outcome.
#[derive(Debug, Serialize)]
struct Outcome {
    name: PackageName,
    sha256: Sha256Hash,
    /// ok, corrupt or error.
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    report: Option<VerifyReport>,
    /// Where a corrupt entry went.
    quarantined: Option<PathBuf>,
    /// Whether write bits or times were put right.
    resealed: bool,
    error: Option<String>,
    seconds: f64,
}

#[derive(Debug, Serialize)]
struct Output {
    entries: Vec<Outcome>,
    ok: usize,
    corrupt: usize,
    errors: usize,
}

/// The entries `reference` names in this cache, without any network.
fn select(cache: &Cache, reference: Option<&str>) -> Result<Vec<(PackageName, Sha256Hash)>> {
    let Some(text) = reference else {
        return Ok(cache.versions());
    };
    let found = match text.parse::<PackageRef>() {
        Ok(r) => match (&r.name, &r.selector) {
            (Some(n), Selector::Hash(h)) => vec![(n.clone(), *h)],
            (name, Selector::Prefix(p)) => cache.find_prefix(name.as_ref(), p),
            (None, Selector::Hash(h)) => HashPrefix::new(&h.to_hex())
                .map(|p| cache.find_prefix(None, &p))
                .unwrap_or_default(),
            (Some(n), Selector::Tag(t)) => cache
                .recall_tag(n, t)
                .map(|h| vec![(n.clone(), h)])
                .unwrap_or_default(),
            (None, Selector::Tag(_)) => Vec::new(),
        },
        // A bare name: every version of it.
        Err(e) => match PackageName::new(text) {
            Ok(n) => cache
                .versions()
                .into_iter()
                .filter(|(name, _)| *name == n)
                .collect(),
            Err(_) => return Err(PeerError::BadInput(e.to_string())),
        },
    };
    let present: Vec<_> = found
        .into_iter()
        .filter(|(n, h)| cache.entry_dir(n, h).is_dir())
        .collect();
    if present.is_empty() {
        return Err(PeerError::NotFound(format!(
            "{text} matches nothing in the cache at {}",
            cache.root().display()
        )));
    }
    Ok(present)
}

fn check_one(cache: &Cache, name: &PackageName, sha: &Sha256Hash, quarantine: bool) -> Outcome {
    let started = Instant::now();
    let mut out = Outcome {
        name: name.clone(),
        sha256: *sha,
        status: "ok",
        report: None,
        quarantined: None,
        resealed: false,
        error: None,
        seconds: 0.0,
    };
    match cache.verify(name, sha) {
        Err(e) => {
            out.status = "error";
            out.error = Some(e.to_string());
        }
        Ok(report) => {
            if !report.is_intact() {
                out.status = "corrupt";
                if quarantine {
                    match cache.quarantine(name, sha) {
                        Ok(to) => out.quarantined = Some(to),
                        Err(e) => out.error = Some(format!("cannot quarantine: {e}")),
                    }
                }
            } else if quarantine && !report.drift.is_empty() {
                match cache.reseal(name, sha) {
                    Ok(()) => out.resealed = true,
                    Err(e) => out.error = Some(format!("cannot reseal: {e}")),
                }
            }
            out.report = Some(report);
        }
    }
    out.seconds = started.elapsed().as_secs_f64();
    out
}

fn print_line(o: &Outcome) {
    let what = format!("{}:{}", o.name, o.sha256);
    let mib = |r: &VerifyReport| r.bytes_read as f64 / (1 << 20) as f64;
    match (o.status, &o.report) {
        ("ok", Some(r)) => {
            let mut line = format!("ok       {what} ({:.1} MiB in {:.2} s)", mib(r), o.seconds);
            if o.resealed {
                line.push_str(&format!("; resealed: {}", r.drift.join("; ")));
            } else if !r.drift.is_empty() {
                line.push_str(&format!("; drift: {}", r.drift.join("; ")));
            }
            println!("{line}");
        }
        ("corrupt", Some(r)) => {
            let fate = match &o.quarantined {
                Some(p) => format!("quarantined to {}", p.display()),
                None => "left in place".to_owned(),
            };
            println!("corrupt  {what}: {} -> {fate}", r.problems.join("; "));
        }
        _ => {}
    }
    if let Some(e) = &o.error {
        eprintln!("fbpkg-rs: error: {what}: {e}");
    }
}

pub(super) fn run(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let cache = args.host.cache();
    let selected = select(&cache, args.reference.as_deref())?;
    let mut entries = Vec::with_capacity(selected.len());
    for (name, sha) in &selected {
        let o = check_one(&cache, name, sha, !args.no_quarantine);
        if o.quarantined.is_some() {
            forget_quarantined(&args.host, &o);
        }
        if !args.json {
            print_line(&o);
        }
        entries.push(o);
    }
    let count = |s: &str| entries.iter().filter(|o| o.status == s).count();
    let out = Output {
        ok: count("ok"),
        corrupt: count("corrupt"),
        errors: entries.iter().filter(|o| o.error.is_some()).count(),
        entries,
    };
    if args.json {
        println!("{}", serde_json::to_string(&out)?);
    }
    Ok(ExitCode::from(if out.corrupt > 0 {
        exit::VERIFICATION
    } else if out.errors > 0 {
        exit::ERROR
    } else {
        exit::OK
    }))
}

/// A running agent still holds a quarantined entry's file open and would go on seeding it:
/// ask it to stop (`forget`; the entry is already out of the cache). The next `get` fetches the
/// package again. Asked at once, not once every entry is read: a verify of a large cache
/// takes minutes, and a `forget` sent at its end took out of the cache whatever copy had been
/// fetched again meanwhile (the path a `get` had just printed).
fn forget_quarantined(host: &HostArgs, o: &Outcome) {
    let state_dir = host.state_dir();
    let told = super::runtime().map_err(|e| e.to_string()).and_then(|rt| {
        rt.block_on(async {
            let Some(agent) = AgentClient::connect(&state_dir)
                .await
                .map_err(|e| e.to_string())?
            else {
                return Ok(());
            };
            let req = Request::Forget {
                name: o.name.to_string(),
                sha256: o.sha256.to_hex(),
            };
            agent.call(&req).await.map_err(|e| e.to_string()).map(drop)
        })
    });
    if let Err(e) = told {
        eprintln!(
            "fbpkg-rs: warning: could not tell the agent to stop seeding what was quarantined: {e}"
        );
    }
}
