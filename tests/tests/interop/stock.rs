//! The stock clients behind one interface, so a cell is written once for all of them.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use super::aria2::{self, Aria2};
use super::netns::TestNet;
use super::qbittorrent::{self, Qbittorrent};
use super::transmission::{self, Transmission};
use super::tree::EmptyFiles;

/// Which stock client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Aria2,
    Qbittorrent,
    Transmission,
}

impl Kind {
    /// The binaries it needs on `$PATH`.
    pub fn binaries(self) -> &'static [&'static str] {
        match self {
            Kind::Aria2 => &[aria2::BINARY],
            Kind::Qbittorrent => &[qbittorrent::BINARY],
            Kind::Transmission => &transmission::BINARIES,
        }
    }

    /// Whether its downloads have a torrent's zero-length files: Transmission 3.00 never
    /// creates them (transmission/transmission#417, fixed in 4.1).
    pub fn empty_files(self) -> EmptyFiles {
        match self {
            Kind::Transmission => EmptyFiles::MayBeMissing,
            Kind::Aria2 | Kind::Qbittorrent => EmptyFiles::Required,
        }
    }

    /// Its name in messages and timings.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Aria2 => "aria2",
            Kind::Qbittorrent => "qbittorrent",
            Kind::Transmission => "transmission",
        }
    }
}

/// Where a stock client runs: on loopback, or at an address inside a test namespace.
#[derive(Debug, Clone, Copy)]
pub enum Place<'a> {
    Loopback,
    Namespace(&'a TestNet, Ipv4Addr),
}

/// What a client is given a torrent for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// It has the file: hash it, then serve it.
    Seed,
    /// It starts empty and downloads.
    Download,
}

/// What a client says about one torrent.
#[derive(Debug, Clone)]
pub struct Status {
    /// Every piece verified and on disk: a downloader is done, a seeder may serve.
    pub complete: bool,
    /// Payload bytes it sent for this torrent.
    pub uploaded: u64,
    /// The client's own words, for failure messages.
    pub detail: String,
}

/// A running stock client.
#[derive(Debug)]
pub enum Stock {
    Aria2(Aria2),
    Qbittorrent(Qbittorrent),
    Transmission(Transmission),
}

impl Stock {
    /// Start a `kind` client with its files under `dir`, at `place`.
    pub async fn start(kind: Kind, dir: &Path, place: Place<'_>) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        match (kind, place) {
            (Kind::Aria2, Place::Loopback) => Aria2::start(dir).await.map(Stock::Aria2),
            (Kind::Qbittorrent, Place::Loopback) => {
                Qbittorrent::start(dir).await.map(Stock::Qbittorrent)
            }
            (Kind::Transmission, Place::Loopback) => {
                Transmission::start(dir, None, Ipv4Addr::LOCALHOST)
                    .await
                    .map(Stock::Transmission)
            }
            (Kind::Transmission, Place::Namespace(net, addr)) => {
                Transmission::start(dir, Some(net), addr)
                    .await
                    .map(Stock::Transmission)
            }
            (kind, Place::Namespace(..)) => Err(format!("{} is only run on loopback", kind.name())),
        }
    }

    /// Which client this is.
    pub fn kind(&self) -> Kind {
        match self {
            Stock::Aria2(_) => Kind::Aria2,
            Stock::Qbittorrent(_) => Kind::Qbittorrent,
            Stock::Transmission(_) => Kind::Transmission,
        }
    }

    /// Where it accepts peers: the address a tracker lists for it.
    pub fn peer_addr(&self) -> SocketAddr {
        match self {
            Stock::Aria2(c) => c.peer_addr(),
            Stock::Qbittorrent(c) => c.peer_addr(),
            Stock::Transmission(c) => c.peer_addr(),
        }
    }

    /// Add `torrent` (`info_hash` in hex) as `role`, its file in (or to be downloaded to)
    /// `dir`. Returns the handle [`Stock::status`] takes.
    pub async fn add(
        &self,
        torrent: &[u8],
        info_hash: &str,
        dir: &Path,
        role: Role,
    ) -> Result<String, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        match self {
            Stock::Aria2(c) => c.add(torrent, dir, role).await,
            Stock::Qbittorrent(c) => c
                .add(torrent, info_hash, dir)
                .await
                .map(|()| info_hash.to_owned()),
            Stock::Transmission(c) => c
                .add(torrent, info_hash, dir, role)
                .await
                .map(|()| info_hash.to_owned()),
        }
    }

    /// Where the torrent `handle` stands; `Err` when the client gave up on it.
    pub async fn status(&self, handle: &str) -> Result<Status, String> {
        match self {
            Stock::Aria2(c) => c.status(handle).await,
            Stock::Qbittorrent(c) => c.status(handle).await,
            Stock::Transmission(c) => c.status(handle).await,
        }
    }

    /// `Err` when the process has exited.
    pub fn check_alive(&self) -> Result<(), String> {
        match self {
            Stock::Aria2(c) => c.check_alive(),
            Stock::Qbittorrent(c) => c.check_alive(),
            Stock::Transmission(c) => c.check_alive(),
        }
    }

    /// The end of its logs, and anything else it can say about `handle`, for failure messages.
    pub async fn diagnosis(&self, handle: &str) -> String {
        let status = match self.status(handle).await {
            Ok(s) => s.detail,
            Err(e) => e,
        };
        let extra = match self {
            Stock::Qbittorrent(c) => format!("trackers: {}\n", c.trackers(handle).await),
            _ => String::new(),
        };
        let logs = match self {
            Stock::Aria2(c) => c.log_tail(),
            Stock::Qbittorrent(c) => c.log_tail(),
            Stock::Transmission(c) => c.log_tail(),
        };
        format!("{} status: {status}\n{extra}{logs}", self.kind().name())
    }
}
