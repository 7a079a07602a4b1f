//! The tracker calls the scenarios make: publishing versions, moving tags, listing swarms.

use std::time::Duration;

use fbpkg_common::Sha256Hash;
use fbpkg_common::metainfo::{Format, Metainfo};
use rand::{Rng, RngExt};
use reqwest::StatusCode;

/// An HTTP client for a loopback tracker: no proxy from the environment, and short timeouts
/// so a dead tracker is an error, not a hang.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .build()
        .expect("building an HTTP client")
}

/// `PUT /api/v1/packages/{name}/{sha256}` with the metainfo; the answer's status.
pub async fn publish(
    client: &reqwest::Client,
    base_url: &str,
    name: &str,
    metainfo: &Metainfo,
) -> reqwest::Result<StatusCode> {
    let resp = client
        .put(format!(
            "{base_url}/api/v1/packages/{name}/{}",
            metainfo.sha256
        ))
        .header("content-type", "application/x-bittorrent")
        .body(metainfo.as_bytes().to_vec())
        .send()
        .await?;
    let status = resp.status();
    // Read the body so the status is the whole, finished answer.
    resp.bytes().await?;
    Ok(status)
}

/// `PUT /api/v1/packages/{name}/tags/{tag}` pointing the tag at `sha256`; the answer's status.
pub async fn move_tag(
    client: &reqwest::Client,
    base_url: &str,
    name: &str,
    tag: &str,
    sha256: &Sha256Hash,
) -> reqwest::Result<StatusCode> {
    let resp = client
        .put(format!("{base_url}/api/v1/packages/{name}/tags/{tag}"))
        .body(sha256.to_hex())
        .send()
        .await?;
    let status = resp.status();
    resp.bytes().await?;
    Ok(status)
}

/// `size` random bytes and their single-file metainfo announcing to `announce`.
pub fn random_package(
    rng: &mut impl Rng,
    size: usize,
    file_name: &str,
    announce: &str,
) -> (Vec<u8>, Metainfo) {
    let mut bytes = vec![0u8; size];
    rng.fill(&mut bytes[..]);
    let metainfo = Metainfo::build(&bytes[..], size as u64, file_name, announce, Format::File)
        .expect("building metainfo");
    (bytes, metainfo)
}

/// What the tracker lists for one swarm (`GET /api/v1/swarms`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwarmListing {
    /// Its peers: (address, bytes left).
    pub peers: Vec<(String, u64)>,
    /// How many peers reported finishing the download.
    pub completed: u64,
}

/// The tracker's listing of the swarm `info_hash`. `Err` says what it saw instead, for
/// [`crate::wait_for`].
pub async fn swarm(
    client: &reqwest::Client,
    base_url: &str,
    info_hash: &str,
) -> Result<SwarmListing, String> {
    let swarms: serde_json::Value = client
        .get(format!("{base_url}/api/v1/swarms"))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    let swarm = swarms
        .as_array()
        .and_then(|a| a.iter().find(|s| s["info_hash"] == info_hash))
        .ok_or_else(|| format!("no swarm {info_hash} in {swarms}"))?;
    let peers = swarm["peers"]
        .as_array()
        .ok_or("no peers array")?
        .iter()
        .map(|p| {
            (
                p["addr"].as_str().unwrap_or_default().to_owned(),
                p["left"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect();
    Ok(SwarmListing {
        peers,
        completed: swarm["completed"].as_u64().unwrap_or(0),
    })
}

/// The peers the tracker lists for `info_hash`: (address, bytes left). `Err` says what it saw
/// instead, for [`crate::wait_for`].
pub async fn swarm_peers(
    client: &reqwest::Client,
    base_url: &str,
    info_hash: &str,
) -> Result<Vec<(String, u64)>, String> {
    swarm(client, base_url, info_hash).await.map(|s| s.peers)
}
