//! Drivers for the stock BitTorrent clients and trackers the interop cells run against, the
//! network namespace some of them need, and the scene every cell is built in.
//!
//! Every client is a child process with its own temp directory, on free ports, killed on drop.
//! Every wait polls a condition against a deadline ([`poll`]); a client that exits early is
//! noticed at the next poll.

pub mod aria2;
pub mod netns;
pub mod opentracker;
pub mod process;
pub mod qbittorrent;
pub mod scene;
pub mod stock;
pub mod transmission;
pub mod tree;

pub use fbpkg_tests::poll;

use std::time::Duration;

/// Longest a client may take to start answering its API.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// `true` (after saying so) when one of `binaries` is not installed: the cell is skipped.
pub fn skip_without(binaries: &[&str]) -> bool {
    match binaries.iter().find(|b| !netns::on_path(b)) {
        Some(missing) => {
            eprintln!("skipped: {missing} not installed (scripts/interop-deps.sh installs it)");
            true
        }
        None => false,
    }
}

/// `true` (after saying why) when this machine cannot make a test namespace.
pub fn skip_without_netns() -> bool {
    match netns::TestNet::unavailable() {
        Some(why) => {
            eprintln!("skipped: {why}");
            true
        }
        None => false,
    }
}
