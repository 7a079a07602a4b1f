//! The fbpkg-rs peer agent, launcher cache and command line.
//!
//! - [`engine`]: the swarm engine (BitTorrent v1 + fast extension, rarest-first picking,
//!   super-seeding), storage in [`storage`];
//! - [`cache`]: the launcher cache, where verified packages appear atomically and read-only;
//! - [`archive`]: deterministic `tar.zst` for directory packages and their safe extraction;
//! - [`tracker_client`]: the tracker's HTTP protocol;
//! - [`host_id`]: this host's stable id, which draws its rollout buckets;
//! - [`launch`]: what `fbpkg-rs run` executes for a cached version, and the exec;
//! - [`agent`]: the long-running agent and its Unix-socket control API;
//! - [`cli`]: the `fbpkg-rs` commands.

pub mod agent;
pub mod archive;
pub mod cache;
pub mod cli;
pub mod engine;
mod error;
pub mod host_id;
pub mod launch;
pub mod storage;
pub mod tracker_client;

pub use error::{ErrorKind, PeerError, Result};
