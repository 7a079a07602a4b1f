//! Pure types and codecs shared by the fbpkg-rs tracker and peer agent.
//!
//! Nothing here does I/O: no sockets, no tokio, no files beyond `impl Read` and `&[u8]`. Every
//! parser takes untrusted bytes and answers with a typed [`Error`], never a panic, and every
//! codec is round-trip property tested.
//!
//! - [`pkgref`]: `name:hash`, `name:prefix`, `name:tag` references.
//! - [`metainfo`]: building and parsing package `.torrent` files; [`entrypoint`]: the program
//!   a directory package runs.
//! - [`bencode`]: the bounded decoder and the writer behind them.
//! - [`tracker_proto`]: announce and scrape requests and responses.
//! - [`wire`] and [`bitfield`]: the BitTorrent peer protocol.
//! - [`api`]: JSON bodies of the catalog API.
//! - [`size`]: byte counts in command-line flags.
//!
//! ```
//! use fbpkg_common::metainfo::{Format, Metainfo};
//! use fbpkg_common::pkgref::PackageRef;
//!
//! let archive = vec![7u8; 100_000];
//! let m = Metainfo::build(&archive[..], 100_000, "tool", "http://127.0.0.1:6969/announce", Format::File)?;
//! let reference: PackageRef = format!("tool:{}", m.sha256).parse()?;
//! assert_eq!(reference.exact().map(|(_, h)| *h), Some(m.sha256));
//! assert_eq!(Metainfo::parse(m.as_bytes())?.info_hash, m.info_hash);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod api;
pub mod bencode;
pub mod bitfield;
pub mod entrypoint;
mod error;
pub mod ids;
pub mod metainfo;
pub mod pkgref;
pub mod rollout;
pub mod size;
pub mod tracker_proto;
pub mod wire;

pub use error::{Error, Result};
pub use ids::{InfoHash, PeerId, Sha256Hash};
