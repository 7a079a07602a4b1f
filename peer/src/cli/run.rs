//! `fbpkg-rs run REF [-- ARGS...]`: find a version the way `get` does, then become its program.
//!
//! The launch path — `name:<full hash>` already in the cache — is `get`'s plus three steps: the
//! in-use hold (a shared `flock` and a one-byte append to the version's use file), reading the
//! entry's metainfo for its format and entrypoint, and `execve`. No tokio runtime, no logging
//! setup, no tracker, no agent, no socket of any kind. Anything else (a tag, a prefix, a version
//! not here) goes through `get`'s resolution and fetch first, in a runtime that is shut down
//! before the exec.
//!
//! Between finding the entry and holding it, an eviction may take it (it holds the version
//! exclusively, so the hold waits, then finds the entry gone): the version is fetched again,
//! once. What is executed and how is [`crate::launch`].

use std::convert::Infallible;
use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use fbpkg_common::Sha256Hash;
use fbpkg_common::pkgref::{PackageName, PackageRef};

use super::get::{self, FetchArgs};
use crate::cache::Cache;
use crate::error::{PeerError, Result};
use crate::launch;

/// `fbpkg-rs run` flags.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
REF is a reference as for `fbpkg-rs get`: name:<64 hex digits>, name:<8+ hex digits>,
name:<tag>. An exact version already in this host's cache starts with no network at all: no
tracker, no agent, not one socket. A tag resolves for this host (its rollout phase included);
when the tracker cannot be reached, the version this host last resolved it to runs, with a
warning. A version not in the cache is fetched first, through the agent (by run itself when
no agent runs), with progress on stderr when stderr is a terminal.

What runs: a file package runs the file (published with its execute bit: scripts with a #!
line, binaries, Python zipapps); a directory package runs its entrypoint, recorded when it was
published (`fbpkg-rs publish NAME DIR --entrypoint bin/tool`). The program replaces fbpkg-rs
(exec): same process id, ARGS after `--` passed verbatim, its exit status and the signal that
ends it are run's own. It gets the caller's environment and working directory, plus
  FBPKG_PACKAGE_DIR   the package's tree, or the cache entry holding the file
  FBPKG_PACKAGE_REF   name:<sha256> of the version running
and holds the version in use: no eviction removes it until the program, and every child that
inherited the lock, has exited.

Exit codes: the program's own once it has started. Before that: 1 other error, 2 bad reference
(or ambiguous prefix), 3 not found, 4 verification failed, 5 no peers within the timeout,
6 tracker unreachable, 126 the package cannot be run (a directory package without an
entrypoint, a file without its execute bit, exec refused: permission, unknown format),
127 the program or the interpreter its #! line names does not exist.

Example: fbpkg-rs run myapp:prod -- --port 8080")]
pub(crate) struct RunArgs {
    /// The package to run.
    reference: String,

    #[command(flatten)]
    fetch: FetchArgs,

    /// Arguments for the program, after `--`, passed as they are.
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<OsString>,
}

pub(super) fn run(args: RunArgs, log: Option<&str>) -> ExitCode {
    let err = match launch_package(&args, log) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    eprintln!("fbpkg-rs: error: {err}");
    ExitCode::from(err.exit_code())
}

/// Exec the package's program; returns only with why it could not be started.
fn launch_package(args: &RunArgs, log: Option<&str>) -> Result<Infallible> {
    let r: PackageRef = args
        .reference
        .parse()
        .map_err(|e: fbpkg_common::Error| PeerError::BadInput(e.to_string()))?;
    let cache = args.fetch.host.cache();
    // The launch path: a version the reference pins, already here.
    let mut found = get::from_cache(&r, &cache).map(|(name, sha, _)| (name, sha));
    for _ in 0..2 {
        let (name, sha) = match found.take() {
            Some(version) => version,
            None => fetch(&args.fetch, &r, &cache, log)?,
        };
        if let Some(hold) = cache.hold(&name, &sha)? {
            let meta = launch::entry_metainfo(&hold.package, &sha)?;
            let plan = launch::plan(&name, &sha, &hold.package, &meta)?;
            return Err(launch::exec(&plan, &args.args, hold));
        }
        // Evicted between the lookup (or the fetch) and the hold.
        tracing::debug!(package = %name, sha256 = %sha, "version left the cache before it could be held; fetching it again");
    }
    Err(PeerError::NotFound(format!(
        "{} left this host's cache again as soon as it was fetched (evicted?); \
         try again, or look at the cache's size limit",
        args.reference
    )))
}

/// Resolve and fetch as `get` does, in a runtime that is gone before the exec.
fn fetch(
    args: &FetchArgs,
    r: &PackageRef,
    cache: &Cache,
    log: Option<&str>,
) -> Result<(PackageName, Sha256Hash)> {
    super::init_logging(log, "warn");
    let rt = super::runtime().map_err(|e| PeerError::Agent(e.to_string()))?;
    // A tag resolved for this host is reported to its rollout as `get` does, before the exec
    // (after it nothing of fbpkg-rs is left to do it): one attempt, at most a few seconds,
    // and only on this path, which has talked to the tracker already.
    let fetched = rt.block_on(async {
        let f = get::fetch(args, r, cache).await?;
        f.handover.report().await;
        Ok::<_, PeerError>(f)
    });
    // The download has finished or failed, so its tasks are done; nothing of them may linger
    // into the program (exec would end their threads mid-write).
    rt.shutdown_timeout(Duration::from_secs(5));
    let f = fetched?;
    Ok((f.name, f.sha256))
}
