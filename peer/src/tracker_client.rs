//! The agent's and CLI's view of the tracker: its HTTP protocol, spoken like any client.

use std::time::Duration;

use fbpkg_common::api::{
    ApiError, Report, ReportAck, Rollout, RolloutRequest, RolloutStatus, RolloutView, TagInfo,
    VersionInfo,
};
use fbpkg_common::metainfo::Metainfo;
use fbpkg_common::pkgref::{PackageName, PackageRef, Selector, Tag};
use fbpkg_common::rollout::HostId;
use fbpkg_common::tracker_proto::{AnnounceRequest, AnnounceResponse, TrackerReply, Zone};
use reqwest::StatusCode;

use crate::error::{PeerError, Result};

/// Largest announce response read.
const MAX_ANNOUNCE_BYTES: usize = 1 << 20;
/// Largest metainfo or JSON body read.
const MAX_BODY_BYTES: usize = 16 << 20;

/// First pause before retrying a transient failure; doubles per attempt, with jitter.
const FIRST_RETRY: Duration = Duration::from_millis(250);
/// Longest pause between two attempts.
const MAX_RETRY: Duration = Duration::from_secs(5);

/// A client for one tracker.
///
/// Every call retries transient failures — a refused or timed-out connection, a timeout, a 5xx
/// or 429 — with jittered exponential backoff for up to its retry budget: a flash crowd of a
/// whole fleet asks the tracker at the same instant, and a host whose first SYN was dropped
/// must not fail its `get` for it. Jitter spreads the retries so they do not arrive as a second
/// crowd. Answers that will not change on retry (4xx, a `failure reason`) are not retried.
#[derive(Debug, Clone)]
pub struct TrackerClient {
    base: String,
    /// Where announces go: `{base}/announce` for our tracker, or a metainfo's URL as written
    /// (stock trackers use other paths, sometimes with a query of their own).
    announce_url: String,
    http: reqwest::Client,
    token: Option<String>,
    retry_for: Duration,
}

/// What a publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishOutcome {
    /// A new version.
    Created,
    /// Already published with the same metainfo.
    AlreadyPublished,
}

/// Who asks a resolve: during a rollout a tag resolves per host (see `fbpkg_common::rollout`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asker {
    /// This host's stable id ([`crate::host_id`]).
    pub host: HostId,
    /// Its zone, when it has one: zone phases go by it.
    pub zone: Option<Zone>,
}

impl Asker {
    fn query(&self) -> Vec<(&'static str, &str)> {
        let mut q = vec![("host", self.host.as_str())];
        if let Some(z) = &self.zone {
            q.push(("zone", z.as_str()));
        }
        q
    }
}

/// What an operator does to a running rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutAction {
    /// Hold in the current phase.
    Pause,
    /// Go on after a pause.
    Resume,
    /// Send every host back to the old version.
    Abort,
}

impl RolloutAction {
    /// The API's path segment.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutAction::Pause => "pause",
            RolloutAction::Resume => "resume",
            RolloutAction::Abort => "abort",
        }
    }
}

/// One attempt's failure: worth another try, or final.
enum Attempt {
    Transient(PeerError),
    Final(PeerError),
}

impl TrackerClient {
    /// `base` is the tracker's URL, e.g. `http://tracker:6969` (an `/announce` suffix is
    /// accepted and dropped). `timeout` bounds one attempt; see [`Self::with_retry`].
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
            .map_err(|e| PeerError::Agent(format!("HTTP client: {e}")))?;
        Ok(Self {
            announce_url: format!("{trimmed}/announce"),
            base: trimmed.to_owned(),
            http,
            token: token.filter(|t| !t.is_empty()),
            retry_for: Duration::ZERO,
        })
    }

    /// A client for a stock tracker named by a package's metainfo: announces only, to `url`
    /// as written (http only; BEP 15 udp:// trackers are not spoken).
    pub fn for_announce_url(url: &str, timeout: Duration) -> Result<Self> {
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| PeerError::BadInput(format!("tracker URL {url:?} is not a URL: {e}")))?;
        if parsed.scheme() != "http" {
            return Err(PeerError::BadInput(format!(
                "tracker URL {url:?}: only http:// trackers are spoken"
            )));
        }
        let mut client = Self::new(url, None, timeout)?;
        client.announce_url = url.to_owned();
        Ok(client)
    }

    /// Where this client's announces go.
    pub fn announce_url(&self) -> &str {
        &self.announce_url
    }

    /// Keep retrying transient failures for up to `budget` per call (zero: one attempt).
    pub fn with_retry(mut self, budget: Duration) -> Self {
        self.retry_for = budget;
        self
    }

    /// The tracker's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn unreachable(&self, e: &reqwest::Error) -> PeerError {
        PeerError::Tracker(format!("cannot reach {}: {}", self.base, error_chain(e)))
    }

    /// One request, retried while its failures are transient and the budget lasts. Returns
    /// the status and body of the last answer that was not transient (any 2xx-4xx).
    async fn call(
        &self,
        budget: Duration,
        build: impl Fn() -> reqwest::RequestBuilder,
        max: usize,
    ) -> Result<(StatusCode, Vec<u8>)> {
        let deadline = tokio::time::Instant::now() + budget;
        let mut pause = FIRST_RETRY;
        loop {
            let err = match self.attempt(build(), max).await {
                Ok(answer) => return Ok(answer),
                Err(Attempt::Final(e)) => return Err(e),
                Err(Attempt::Transient(e)) => e,
            };
            // Full jitter over the upper half: never zero, never in lockstep with the fleet.
            let wait = pause.mul_f64(0.5 + rand::random::<f64>() * 0.5);
            if tokio::time::Instant::now() + wait > deadline {
                return Err(err);
            }
            tracing::debug!(tracker = %self.base, error = %err, retry_in = ?wait, "tracker call failed; retrying");
            tokio::time::sleep(wait).await;
            pause = (pause * 2).min(MAX_RETRY);
        }
    }

    async fn attempt(
        &self,
        req: reqwest::RequestBuilder,
        max: usize,
    ) -> Result<(StatusCode, Vec<u8>), Attempt> {
        let resp = req
            .send()
            .await
            .map_err(|e| Attempt::Transient(self.unreachable(&e)))?;
        let status = resp.status();
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            return Err(Attempt::Transient(PeerError::Tracker(format!(
                "{} answered {status}",
                self.base
            ))));
        }
        if resp.content_length().is_some_and(|n| n > max as u64) {
            return Err(Attempt::Final(PeerError::Tracker(format!(
                "{} sent a response larger than {max} bytes",
                self.base
            ))));
        }
        let mut resp = resp;
        let mut out = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if out.len() + chunk.len() > max {
                        return Err(Attempt::Final(PeerError::Tracker(format!(
                            "{} sent a response larger than {max} bytes",
                            self.base
                        ))));
                    }
                    out.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok((status, out)),
                Err(e) => return Err(Attempt::Transient(self.unreachable(&e))),
            }
        }
    }

    /// Announce; a `failure reason` becomes an error. One attempt: the announcer has its own
    /// retry loop, and a fresh announce carries fresher counters than a retried one.
    pub async fn announce(&self, req: &AnnounceRequest) -> Result<AnnounceResponse> {
        let sep = if self.announce_url.contains('?') {
            '&'
        } else {
            '?'
        };
        let url = format!("{}{sep}{}", self.announce_url, req.to_query());
        let (status, body) = self
            .call(Duration::ZERO, || self.http.get(&url), MAX_ANNOUNCE_BYTES)
            .await?;
        if !status.is_success() {
            let said = text_of(&body);
            let said = if said.is_empty() {
                String::new()
            } else {
                format!(": {said}")
            };
            return Err(PeerError::Tracker(format!(
                "{} answered the announce with {status}{said}",
                self.announce_url
            )));
        }
        match AnnounceResponse::decode(&body).map_err(|e| {
            PeerError::Tracker(format!("{}: unreadable announce response: {e}", self.base))
        })? {
            TrackerReply::Ok(r) => Ok(r),
            // BEP 3 gives refusals only as text. Ours starts this way for an info-hash it
            // does not list (see the tracker's announce handler); stock trackers say other
            // things, which stay a plain refusal.
            TrackerReply::Failure(reason) if reason.starts_with("unregistered torrent") => {
                Err(PeerError::Unregistered(reason))
            }
            TrackerReply::Failure(reason) => Err(PeerError::TrackerRefused(format!(
                "announce refused: {reason}"
            ))),
        }
    }

    /// An error answer from the catalog API. Our tracker always answers JSON ([`ApiError`]);
    /// anything else (an HTML error page) means the URL does not point at an fbpkg-rs tracker.
    fn api_error(&self, status: StatusCode, body: &[u8], what: &str) -> PeerError {
        let Ok(e) = serde_json::from_slice::<ApiError>(body) else {
            return PeerError::Tracker(format!(
                "{} answered {what} with {status} and a body that is not an fbpkg-rs tracker's; check --tracker / FBPKG_TRACKER",
                self.base
            ));
        };
        let msg = if e.candidates.is_empty() {
            e.error
        } else {
            format!("{}: {}", e.error, e.candidates.join(", "))
        };
        match status {
            StatusCode::NOT_FOUND => PeerError::NotFound(msg),
            StatusCode::CONFLICT if what == "resolve" => PeerError::Ambiguous(msg),
            StatusCode::BAD_REQUEST => PeerError::BadInput(msg),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => PeerError::Unauthorized(format!(
                "{msg} (set --publish-token / FBPKG_PUBLISH_TOKEN)"
            )),
            _ => PeerError::TrackerRefused(format!("{what}: {status}: {msg}")),
        }
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
        what: &str,
    ) -> Result<T> {
        let mut url = reqwest::Url::parse(&format!("{}{path}", self.base))
            .map_err(|e| PeerError::BadInput(format!("{}{path} is not a URL: {e}", self.base)))?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let (status, body) = self
            .call(
                self.retry_for,
                || self.http.get(url.clone()),
                MAX_BODY_BYTES,
            )
            .await?;
        self.json_answer(status, &body, what)
    }

    fn json_answer<T: serde::de::DeserializeOwned>(
        &self,
        status: StatusCode,
        body: &[u8],
        what: &str,
    ) -> Result<T> {
        if !status.is_success() {
            return Err(self.api_error(status, body, what));
        }
        serde_json::from_slice(body).map_err(|e| {
            PeerError::Tracker(format!("{}: unreadable {what} response: {e}", self.base))
        })
    }

    /// Resolve a reference to one version, as no host in particular: during a rollout a tag
    /// answers the old version. See [`Self::resolve_as`].
    pub async fn resolve(&self, r: &PackageRef) -> Result<VersionInfo> {
        self.resolve_as(r, None).await
    }

    /// Resolve a reference to one version for `asker`: during a rollout, a tag resolves to
    /// the new version exactly for the hosts in the phases reached so far.
    pub async fn resolve_as(&self, r: &PackageRef, asker: Option<&Asker>) -> Result<VersionInfo> {
        let query = asker.map(Asker::query).unwrap_or_default();
        let path = match (&r.name, &r.selector) {
            (Some(name), sel) => format!("/api/v1/packages/{name}/{sel}"),
            (None, Selector::Hash(h)) => format!("/api/v1/resolve/{h}"),
            (None, Selector::Prefix(p)) => format!("/api/v1/resolve/{p}"),
            (None, Selector::Tag(_)) => {
                return Err(PeerError::BadInput(
                    "a tag needs a package name: name:tag".into(),
                ));
            }
        };
        self.get_json(&path, &query, "resolve").await
    }

    /// Start a rollout (needs the publish token). One attempt: a start is not idempotent, and
    /// a retry after an answer lost on the way back would be refused as a second rollout.
    pub async fn start_rollout(&self, req: &RolloutRequest) -> Result<Rollout> {
        let url = format!("{}/api/v1/rollouts", self.base);
        let body = serde_json::to_vec(req)
            .map_err(|e| PeerError::BadInput(format!("rollout request: {e}")))?;
        let build = || self.authorized(self.http.post(&url).body(body.clone()));
        let (status, body) = self.call(Duration::ZERO, build, MAX_BODY_BYTES).await?;
        self.json_answer(status, &body, "rollout")
    }

    /// The active rollouts, with their progress.
    pub async fn rollouts(&self) -> Result<Vec<RolloutView>> {
        self.get_json("/api/v1/rollouts", &[], "rollouts").await
    }

    /// One tag's active rollout and history.
    pub async fn rollout_status(&self, name: &PackageName, tag: &Tag) -> Result<RolloutStatus> {
        self.get_json(&format!("/api/v1/rollouts/{name}/{tag}"), &[], "rollout")
            .await
    }

    /// Pause, resume or abort a tag's active rollout (needs the publish token). One attempt,
    /// like a start: a repeated pause or abort is refused once the first took effect.
    pub async fn steer_rollout(
        &self,
        name: &PackageName,
        tag: &Tag,
        action: RolloutAction,
    ) -> Result<Rollout> {
        let url = format!(
            "{}/api/v1/rollouts/{name}/{tag}/{}",
            self.base,
            action.as_str()
        );
        let build = || self.authorized(self.http.post(&url));
        let (status, body) = self.call(Duration::ZERO, build, MAX_BODY_BYTES).await?;
        self.json_answer(status, &body, "rollout")
    }

    /// Report this host's state on a version (`POST /api/v1/reports`). The tracker counts it
    /// only from the address the host id last resolved from, so resolve first. Retried within
    /// the client's budget: a repeated report is one vote.
    pub async fn report(&self, rep: &Report) -> Result<ReportAck> {
        let url = format!("{}/api/v1/reports", self.base);
        let body =
            serde_json::to_vec(rep).map_err(|e| PeerError::BadInput(format!("report: {e}")))?;
        let build = || {
            self.http
                .post(&url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone())
        };
        let (status, body) = self.call(self.retry_for, build, MAX_BODY_BYTES).await?;
        self.json_answer(status, &body, "report")
    }

    /// The metainfo of `name:sha256`, checked to be for that hash.
    pub async fn metainfo(
        &self,
        name: &PackageName,
        sha256: &fbpkg_common::Sha256Hash,
    ) -> Result<Metainfo> {
        let url = format!("{}/api/v1/packages/{name}/{sha256}/metainfo", self.base);
        let (status, body) = self
            .call(self.retry_for, || self.http.get(&url), MAX_BODY_BYTES)
            .await?;
        if !status.is_success() {
            return Err(self.api_error(status, &body, "metainfo"));
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
        // A PUT of the same metainfo is idempotent (200 the second time), so retrying is safe.
        let url = format!("{}/api/v1/packages/{name}/{}", self.base, m.sha256);
        let build = || self.authorized(self.http.put(&url).body(m.as_bytes().to_vec()));
        let (status, body) = self.call(self.retry_for, build, MAX_BODY_BYTES).await?;
        let outcome = match status {
            StatusCode::CREATED => PublishOutcome::Created,
            StatusCode::OK => PublishOutcome::AlreadyPublished,
            _ => return Err(self.api_error(status, &body, "publish")),
        };
        let info = serde_json::from_slice(&body).map_err(|e| {
            PeerError::Tracker(format!("{}: unreadable publish response: {e}", self.base))
        })?;
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
        let build = || self.authorized(self.http.put(&url).body(sha256.to_hex()));
        let (status, body) = self.call(self.retry_for, build, MAX_BODY_BYTES).await?;
        if !status.is_success() {
            return Err(self.api_error(status, &body, "tag"));
        }
        serde_json::from_slice(&body)
            .map_err(|e| PeerError::Tracker(format!("{}: unreadable tag response: {e}", self.base)))
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

/// What an error page says, as one short line: tags dropped, whitespace folded, clipped.
/// (opentracker answers `compact=0` with an HTML page saying it only delivers compact results.)
fn text_of(body: &[u8]) -> String {
    let raw = String::from_utf8_lossy(&body[..body.len().min(4096)]);
    let mut out = String::new();
    let mut in_tag = false;
    for c in raw.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                out.push(' ');
            }
            _ if in_tag => {}
            c if c.is_control() || c.is_whitespace() => out.push(' '),
            c => out.push(c),
        }
    }
    let folded = out.split_whitespace().collect::<Vec<_>>().join(" ");
    match folded.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &folded[..i]),
        None => folded,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::ErrorKind;

    /// An HTTP request head, read up to its blank line (or what came before the peer stopped).
    async fn read_head(s: &mut tokio::net::TcpStream) -> Vec<u8> {
        let mut head = Vec::new();
        let mut b = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&b[..n]),
            }
        }
        head
    }

    /// A one-line HTTP server: answers the n-th request (from 0) with `answer(n)`.
    async fn serve(
        listener: TcpListener,
        answer: impl Fn(usize) -> (u16, &'static str, &'static str) + Send + Sync + 'static,
    ) -> Arc<AtomicUsize> {
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                read_head(&mut s).await;
                let (status, ctype, body) = answer(seen.fetch_add(1, Ordering::SeqCst));
                let resp = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        count
    }

    const NOT_FOUND: (u16, &str, &str) = (404, "application/json", r#"{"error":"no such tag"}"#);

    fn client(addr: std::net::SocketAddr, retry: Duration) -> TrackerClient {
        TrackerClient::new(&format!("http://{addr}"), None, Duration::from_secs(5))
            .unwrap()
            .with_retry(retry)
    }

    fn tag_ref() -> PackageRef {
        "app:prod".parse().unwrap()
    }

    /// A stock tracker from a metainfo: its URL is used as written (path and query), and its
    /// HTML error page is read into one line of the error.
    #[tokio::test]
    async fn a_stock_trackers_url_and_error_page_are_used_as_written() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let head = read_head(&mut s).await;
                let line = String::from_utf8_lossy(&head)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_owned();
                let _ = tx.send(line);
                let body = "<html><head><title>Invalid Request</title></head>\n<body><h1>400 Invalid Request</h1>\n<p>This server only delivers compact results.</p></body></html>";
                let resp = format!(
                    "HTTP/1.1 400 Invalid Request\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        let url = format!("http://{addr}/ann.php?passkey=abc");
        let c = TrackerClient::for_announce_url(&url, Duration::from_secs(5)).unwrap();
        let req = AnnounceRequest {
            info_hash: fbpkg_common::InfoHash([7; 20]),
            peer_id: fbpkg_common::PeerId(*b"-FB0100-abcdefghijkl"),
            port: 6881,
            uploaded: 0,
            downloaded: 0,
            left: 1,
            event: fbpkg_common::tracker_proto::Event::Started,
            compact: true,
            numwant: None,
            no_peer_id: false,
            key: None,
            ip: None,
            zone: None,
        };
        let err = c.announce(&req).await.unwrap_err();
        let line = rx.recv().await.unwrap();
        assert!(
            line.starts_with("GET /ann.php?passkey=abc&info_hash=%07"),
            "{line}"
        );
        assert!(line.contains("&compact=1"), "{line}");
        let msg = err.to_string();
        assert_eq!(err.kind(), ErrorKind::TrackerUnreachable, "{msg}");
        assert!(
            msg.contains("400 Bad Request: Invalid Request 400 Invalid Request This server only delivers compact results."),
            "{msg}"
        );
        assert!(!msg.contains('<'), "{msg}");
        assert!(
            TrackerClient::for_announce_url("udp://tracker:80/announce", Duration::from_secs(1))
                .is_err()
        );
    }

    #[tokio::test]
    async fn transient_failures_are_retried_within_the_budget() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let count = serve(listener, |n| {
            if n < 2 {
                (503, "text/plain", "busy")
            } else {
                NOT_FOUND
            }
        })
        .await;
        let err = client(addr, Duration::from_secs(20))
            .resolve(&tag_ref())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
        assert_eq!(count.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_refused_first_connection_is_retried() {
        // Bound but not listening: connections are refused, and no other test can take the
        // port meanwhile (dropping a listener and binding again raced with them).
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        let server = tokio::spawn(async move {
            // Up a moment after the client's first attempt was refused.
            tokio::time::sleep(Duration::from_millis(300)).await;
            serve(socket.listen(16).unwrap(), |_| NOT_FOUND).await
        });
        let err = client(addr, Duration::from_secs(20))
            .resolve(&tag_ref())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
        assert!(server.await.unwrap().load(Ordering::SeqCst) >= 1);
    }

    #[tokio::test]
    async fn a_tracker_that_stays_away_is_unreachable_after_the_budget() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let count = serve(listener, |_| (503, "text/plain", "busy")).await;
        let err = client(addr, Duration::from_secs(1))
            .resolve(&tag_ref())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TrackerUnreachable, "{err}");
        assert_eq!(err.exit_code(), crate::cli::exit::TRACKER);
        assert!(count.load(Ordering::SeqCst) >= 2, "retried at least once");
    }

    #[tokio::test]
    async fn answers_are_typed_by_what_they_mean() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        serve(listener, |n| match n {
            0 => (404, "text/html", "<html><body>Not Found</body></html>"),
            1 => (401, "application/json", r#"{"error":"bad token"}"#),
            _ => (
                409,
                "application/json",
                r#"{"error":"ambiguous","candidates":["a","b"]}"#,
            ),
        })
        .await;
        let c = client(addr, Duration::ZERO);
        let html = c.resolve(&tag_ref()).await.unwrap_err();
        assert_eq!(html.kind(), ErrorKind::TrackerUnreachable, "{html}");
        assert!(
            html.to_string().contains("not an fbpkg-rs tracker"),
            "{html}"
        );
        let auth = c.resolve(&tag_ref()).await.unwrap_err();
        assert_eq!(auth.kind(), ErrorKind::Unauthorized, "{auth}");
        assert_eq!(auth.exit_code(), crate::cli::exit::UNAUTHORIZED);
        let amb = c.resolve(&tag_ref()).await.unwrap_err();
        assert_eq!(amb.kind(), ErrorKind::Ambiguous, "{amb}");
    }
}
