//! The agent's and CLI's view of the tracker: its HTTP protocol, spoken like any client.

use std::time::Duration;

use fbpkg_common::api::{ApiError, TagInfo, VersionInfo};
use fbpkg_common::metainfo::Metainfo;
use fbpkg_common::pkgref::{PackageName, PackageRef, Selector, Tag};
use fbpkg_common::tracker_proto::{AnnounceRequest, AnnounceResponse, TrackerReply};
use reqwest::StatusCode;

use crate::error::{PeerError, Result};

/// Largest announce response read.
const MAX_ANNOUNCE_BYTES: usize = 1 << 20;
/// Largest metainfo or JSON body read.
const MAX_BODY_BYTES: usize = 16 << 20;

/// A client for one tracker.
#[derive(Debug, Clone)]
pub struct TrackerClient {
    base: String,
    http: reqwest::Client,
    token: Option<String>,
}

/// What a publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishOutcome {
    /// A new version.
    Created,
    /// Already published with the same metainfo.
    AlreadyPublished,
}

impl TrackerClient {
    /// `base` is the tracker's URL, e.g. `http://tracker:6969` (an `/announce` suffix is
    /// accepted and dropped).
    pub fn new(base: &str, token: Option<String>, timeout: Duration) -> Result<Self> {
        let trimmed = base.trim().trim_end_matches('/');
        let trimmed = trimmed.strip_suffix("/announce").unwrap_or(trimmed);
        let url = reqwest::Url::parse(trimmed)
            .map_err(|e| PeerError::BadInput(format!("tracker URL {base:?} is not a URL: {e}")))?;
        if url.scheme() != "http" {
            return Err(PeerError::BadInput(format!(
                "tracker URL {base:?}: only http:// is supported (put TLS in front with a proxy)"
            )));
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .no_proxy()
            .build()
            .map_err(|e| PeerError::Tracker(format!("HTTP client: {e}")))?;
        Ok(Self {
            base: trimmed.to_owned(),
            http,
            token: token.filter(|t| !t.is_empty()),
        })
    }

    /// The tracker's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn unreachable(&self, e: reqwest::Error) -> PeerError {
        PeerError::Tracker(format!("cannot reach {}: {}", self.base, error_chain(&e)))
    }

    async fn body(&self, resp: reqwest::Response, max: usize) -> Result<(StatusCode, Vec<u8>)> {
        let status = resp.status();
        if resp.content_length().is_some_and(|n| n > max as u64) {
            return Err(PeerError::Tracker(format!(
                "response larger than {max} bytes"
            )));
        }
        let mut resp = resp;
        let mut out = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.unreachable(e))? {
            if out.len() + chunk.len() > max {
                return Err(PeerError::Tracker(format!(
                    "response larger than {max} bytes"
                )));
            }
            out.extend_from_slice(&chunk);
        }
        Ok((status, out))
    }

    /// Announce; a `failure reason` becomes an error.
    pub async fn announce(&self, req: &AnnounceRequest) -> Result<AnnounceResponse> {
        let url = format!("{}/announce?{}", self.base, req.to_query());
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let (status, body) = self.body(resp, MAX_ANNOUNCE_BYTES).await?;
        if !status.is_success() {
            return Err(PeerError::Tracker(format!("announce answered {status}")));
        }
        match AnnounceResponse::decode(&body)
            .map_err(|e| PeerError::Tracker(format!("bad announce response: {e}")))?
        {
            TrackerReply::Ok(r) => Ok(r),
            TrackerReply::Failure(reason) => {
                Err(PeerError::Tracker(format!("announce refused: {reason}")))
            }
        }
    }

    fn api_error(status: StatusCode, body: &[u8], what: &str) -> PeerError {
        let msg = serde_json::from_slice::<ApiError>(body)
            .map(|e| {
                if e.candidates.is_empty() {
                    e.error
                } else {
                    format!("{}: {}", e.error, e.candidates.join(", "))
                }
            })
            .unwrap_or_else(|_| String::from_utf8_lossy(body).trim().to_owned());
        match status {
            StatusCode::NOT_FOUND => PeerError::NotFound(msg),
            StatusCode::CONFLICT if what == "resolve" => PeerError::Ambiguous(msg),
            StatusCode::BAD_REQUEST => PeerError::BadInput(msg),
            StatusCode::UNAUTHORIZED => {
                PeerError::Tracker(format!("{msg} (set --publish-token / FBPKG_PUBLISH_TOKEN)"))
            }
            _ => PeerError::Tracker(format!("{what}: {status}: {msg}")),
        }
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str, what: &str) -> Result<T> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let (status, body) = self.body(resp, MAX_BODY_BYTES).await?;
        if !status.is_success() {
            return Err(Self::api_error(status, &body, what));
        }
        serde_json::from_slice(&body)
            .map_err(|e| PeerError::Tracker(format!("bad {what} response: {e}")))
    }

    /// Resolve a reference to one version.
    pub async fn resolve(&self, r: &PackageRef) -> Result<VersionInfo> {
        match (&r.name, &r.selector) {
            (Some(name), sel) => {
                self.get_json(&format!("/api/v1/packages/{name}/{sel}"), "resolve")
                    .await
            }
            (None, Selector::Hash(h)) => {
                self.get_json(&format!("/api/v1/resolve/{h}"), "resolve")
                    .await
            }
            (None, Selector::Prefix(p)) => {
                self.get_json(&format!("/api/v1/resolve/{p}"), "resolve")
                    .await
            }
            (None, Selector::Tag(_)) => Err(PeerError::BadInput(
                "a tag needs a package name: name:tag".into(),
            )),
        }
    }

    /// The metainfo of `name:sha256`, checked to be for that hash.
    pub async fn metainfo(
        &self,
        name: &PackageName,
        sha256: &fbpkg_common::Sha256Hash,
    ) -> Result<Metainfo> {
        let url = format!("{}/api/v1/packages/{name}/{sha256}/metainfo", self.base);
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let (status, body) = self.body(resp, MAX_BODY_BYTES).await?;
        if !status.is_success() {
            return Err(Self::api_error(status, &body, "metainfo"));
        }
        let m = Metainfo::parse(&body).map_err(|e| {
            PeerError::Verification(format!("the tracker's metainfo is invalid: {e}"))
        })?;
        if m.sha256 != *sha256 {
            return Err(PeerError::Verification(format!(
                "the tracker's metainfo is for {}, not {sha256}",
                m.sha256
            )));
        }
        Ok(m)
    }

    fn authorized(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// Register a version.
    pub async fn publish(
        &self,
        name: &PackageName,
        m: &Metainfo,
    ) -> Result<(PublishOutcome, VersionInfo)> {
        let url = format!("{}/api/v1/packages/{name}/{}", self.base, m.sha256);
        let req = self.authorized(self.http.put(url).body(m.as_bytes().to_vec()));
        let resp = req.send().await.map_err(|e| self.unreachable(e))?;
        let (status, body) = self.body(resp, MAX_BODY_BYTES).await?;
        let outcome = match status {
            StatusCode::CREATED => PublishOutcome::Created,
            StatusCode::OK => PublishOutcome::AlreadyPublished,
            _ => return Err(Self::api_error(status, &body, "publish")),
        };
        let info = serde_json::from_slice(&body)
            .map_err(|e| PeerError::Tracker(format!("bad publish response: {e}")))?;
        Ok((outcome, info))
    }

    /// Point a tag at a version.
    pub async fn move_tag(
        &self,
        name: &PackageName,
        tag: &Tag,
        sha256: &fbpkg_common::Sha256Hash,
    ) -> Result<TagInfo> {
        let url = format!("{}/api/v1/packages/{name}/tags/{tag}", self.base);
        let req = self.authorized(self.http.put(url).body(sha256.to_hex()));
        let resp = req.send().await.map_err(|e| self.unreachable(e))?;
        let (status, body) = self.body(resp, MAX_BODY_BYTES).await?;
        if !status.is_success() {
            return Err(Self::api_error(status, &body, "tag"));
        }
        serde_json::from_slice(&body)
            .map_err(|e| PeerError::Tracker(format!("bad tag response: {e}")))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}
