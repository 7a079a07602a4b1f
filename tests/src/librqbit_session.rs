//! A stock BitTorrent client for the interop scenarios: a librqbit session on loopback that can
//! find peers only through the tracker in the metainfo.
//!
//! DHT, local service discovery, UPnP and persistence are off and the session listens on
//! 127.0.0.1 only; with private metainfo (no PEX) the tracker's peer list is its one source.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;

use librqbit::{
    AddTorrent, AddTorrentOptions, ListenerMode, ListenerOptions, ManagedTorrent, Session,
    SessionOptions,
};

/// Attempts at a free port before giving up.
const PORT_ATTEMPTS: usize = 5;

/// A librqbit session over `dir` listening on 127.0.0.1 and announcing that port, and the port.
///
/// librqbit announces port 4240 for a loopback listener unless told the port, and takes no
/// pre-bound socket, so the port is chosen by binding port 0 and releasing it; if something
/// takes it in between, the session fails to bind and the next attempt picks another.
///
/// Panics when no attempt could listen.
pub async fn loopback_session(dir: &Path) -> (Arc<Session>, u16) {
    let mut last_error = None;
    for _ in 0..PORT_ATTEMPTS {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("binding a loopback port")
            .port();
        let opts = SessionOptions {
            dht: None,
            disable_local_service_discovery: true,
            persistence: None,
            fastresume: false,
            ipv4_only: true,
            listen: Some(ListenerOptions {
                mode: ListenerMode::TcpOnly,
                listen_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                announce_port: Some(port),
                enable_upnp_port_forwarding: false,
                ipv4_only: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        match Session::new_with_opts(dir.to_owned(), opts).await {
            Ok(s) => return (s, port),
            Err(e) => last_error = Some(e),
        }
    }
    panic!("no librqbit session could listen on loopback: {last_error:?}");
}

/// Add `torrent` (metainfo bytes) to `session` with its files in `dir`: a file already there is
/// checked and seeded, a missing one downloaded. Panics when librqbit refuses it.
pub async fn add_torrent(
    session: &Arc<Session>,
    torrent: &[u8],
    dir: &Path,
) -> Arc<ManagedTorrent> {
    let output_folder = dir
        .to_str()
        .unwrap_or_else(|| panic!("{} is not UTF-8", dir.display()))
        .to_owned();
    session
        .add_torrent(
            AddTorrent::from_bytes(torrent.to_vec()),
            Some(AddTorrentOptions {
                output_folder: Some(output_folder),
                overwrite: true,
                ..Default::default()
            }),
        )
        .await
        .unwrap_or_else(|e| panic!("librqbit refused the torrent: {e:#}"))
        .into_handle()
        .expect("librqbit added the torrent in list-only mode")
}
