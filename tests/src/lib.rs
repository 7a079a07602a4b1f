//! Shared pieces of the fbpkg-rs scenario tests in `tests/tests/`: the real `fbpkg-rs` binary
//! run as a tracker process, as agent processes and as client commands; an embedded tracker
//! and engines for in-process swarms; librqbit sessions for interop; fake peers written with the
//! wire codec; and the few tracker calls every scenario makes.
//!
//! Nothing here sleeps to synchronise: the tracker's port is read from its `tracker listening`
//! log line, and every other wait polls against a deadline ([`wait_for`]).
//!
//! ```no_run
//! # async fn demo() {
//! use fbpkg_tests::{TrackerProcess, http_client, publish, random_package};
//! let dir = tempfile::tempdir().unwrap();
//! let tracker = TrackerProcess::start(dir.path()).unwrap();
//! let (_bytes, metainfo) = random_package(&mut rand::rng(), 100_000, "app.bin", &tracker.announce_url());
//! let status = publish(&http_client(), &tracker.base_url(), "app", &metainfo).await.unwrap();
//! assert_eq!(status, 201);
//! # }
//! ```

mod agent_process;
mod binary;
mod catalog;
mod cli;
mod inprocess;
mod librqbit_session;
mod logged_child;
mod postgres_process;
mod raw_peer;
mod redis_process;
mod tls_certs;
mod tracker_process;

pub use agent_process::{AgentProcess, free_loopback_port, log_field};
pub use binary::fbpkg_rs_binary;
pub use catalog::{
    SwarmListing, http_client, move_tag, publish, random_package, swarm, swarm_peers,
};
pub use cli::{CliOutput, clean_env, fbpkg_rs, fbpkg_rs_command, fbpkg_rs_then, publish_versions};
pub use inprocess::{Staged, embedded_tracker, engine, seed_from_cache, stop_tracker};
pub use librqbit_session::{add_torrent, loopback_session};
pub use postgres_process::{PostgresServer, postgres_bin_dir};
pub use raw_peer::{
    Raw, accept_handshake, admitted, announce_as_seeder, handshake_as, handshake_from,
    random_peer_id, real_block, wait_message,
};
pub use redis_process::{RedisServer, redis_server_binary};
pub use tracker_process::TrackerProcess;

use std::time::Duration;

/// Poll `probe` until it answers `Ok`, at most `timeout` in all (a probe that hangs counts).
/// `Err` says what was awaited and the last thing the probe saw.
pub async fn poll<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    const POLL: Duration = Duration::from_millis(50);
    let mut last = String::from("nothing yet");
    let polled = tokio::time::timeout(timeout, async {
        loop {
            match probe().await {
                Ok(v) => return v,
                Err(seen) => last = seen,
            }
            tokio::time::sleep(POLL).await;
        }
    })
    .await;
    polled.map_err(|_| format!("timed out after {timeout:?} waiting for {what}; last seen: {last}"))
}

/// [`poll`], panicking with what it saw when time runs out.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    poll(what, timeout, probe)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `--state-dir S --cache-dir C --tracker T`: a client with no agent behind `state`.
pub fn host_args(
    state: &std::path::Path,
    cache: &std::path::Path,
    tracker: &str,
) -> Vec<std::ffi::OsString> {
    vec![
        "--state-dir".into(),
        state.into(),
        "--cache-dir".into(),
        cache.into(),
        "--tracker".into(),
        tracker.into(),
    ]
}
