//! The agent's control API: JSON lines over a Unix socket in its state directory.
//!
//! A client writes one request line; the agent answers with one or more event lines and
//! closes. `fetch` streams `progress` events until `done` or `error`. The socket is
//! owner-only (0600 in a 0700 directory): whoever can use it can make the agent fetch and
//! seed, so it is exactly as trusted as the user running the agent. No TCP port.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{Semaphore, SemaphorePermit};

use fbpkg_common::metainfo::Format;

use crate::engine::TorrentStatus;
use crate::error::{ErrorKind, PeerError, Result};

/// File name of the socket inside the state directory.
pub const SOCKET_NAME: &str = "agent.sock";
/// Longest request line accepted. The largest request is an `add`, whose metainfo goes
/// hex-encoded: a tree of thousands of files takes MiBs (about 125 bytes of metainfo a file),
/// and the tracker takes up to 8 MiB by default (`--max-body-bytes`), twice that in hex.
pub const MAX_CONTROL_LINE: usize = 20 << 20;

/// A request line up to this long is read by any connection at once. A longer one (only an
/// `add` is, its metainfo) is read on with one of [`LARGE_CONTROL_LINES`] permits: 256
/// connections of [`MAX_CONTROL_LINE`] each would be 5 GiB.
pub const SMALL_CONTROL_LINE: usize = 64 << 10;
/// Request lines longer than [`SMALL_CONTROL_LINE`] read, and answered, at once.
pub const LARGE_CONTROL_LINES: usize = 4;
/// Longest wait of a large request for its turn: past it the agent answers that it is busy
/// (four installs that do not end must not hold the connections waiting behind them).
pub const LARGE_CONTROL_WAIT: Duration = Duration::from_secs(300);

/// Read one request line from `r` within `deadline`. `Ok(None)`: the client closed without
/// sending one. A line past [`SMALL_CONTROL_LINE`] is read on only with a permit from `large`,
/// returned with the request and held until it is answered (its metainfo lives as long).
/// The wait for a permit is not counted in the deadline: a large request waits its turn
/// behind others being installed, which may take minutes (at most [`LARGE_CONTROL_WAIT`]),
/// then has `deadline` for the rest.
pub async fn read_request<'a, R: AsyncRead + Unpin>(
    r: R,
    large: &'a Semaphore,
    deadline: Duration,
) -> Result<Option<(Request, Option<SemaphorePermit<'a>>)>> {
    let mut reader = BufReader::new(r);
    let mut line = Vec::new();
    let mut small = (&mut reader).take(SMALL_CONTROL_LINE as u64);
    within(deadline, small.read_until(b'\n', &mut line)).await?;
    let mut permit = None;
    if line.len() == SMALL_CONTROL_LINE && !line.ends_with(b"\n") {
        permit = match tokio::time::timeout(LARGE_CONTROL_WAIT, large.acquire()).await {
            Ok(p) => p.ok(),
            Err(_) => {
                return Err(PeerError::Agent(format!(
                    "the agent is busy with {LARGE_CONTROL_LINES} large requests (adds) that \
                     have not ended in {} s; try again",
                    LARGE_CONTROL_WAIT.as_secs()
                )));
            }
        };
        // One byte past the limit tells a line that is too long from one that fits.
        let rest = (MAX_CONTROL_LINE + 1 - SMALL_CONTROL_LINE) as u64;
        within(
            deadline,
            (&mut reader).take(rest).read_until(b'\n', &mut line),
        )
        .await?;
    }
    if line.is_empty() {
        return Ok(None);
    }
    parse_request_line(&line).map(|req| Some((req, permit)))
}

/// A read of a request within `deadline`, its failures said as the client's.
async fn within(
    deadline: Duration,
    read: impl Future<Output = std::io::Result<usize>>,
) -> Result<()> {
    match tokio::time::timeout(deadline, read).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(PeerError::BadInput(format!("bad control request: {e}"))),
        Err(_) => Err(PeerError::BadInput(format!(
            "no request within {} s",
            deadline.as_secs()
        ))),
    }
}

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Is the agent there?
    Ping,
    /// Fetch `name:sha256` into the cache (resolving is the client's job).
    Fetch {
        /// Package name.
        name: String,
        /// Full SHA-256.
        sha256: String,
        /// Retry an unreachable tracker this long for the metainfo (default: the agent's).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tracker_retry_secs: Option<f64>,
    },
    /// Install a local archive into the cache and seed it (after `publish`).
    Add {
        /// Package name.
        name: String,
        /// The metainfo, hex-encoded.
        metainfo_hex: String,
        /// Absolute path of the archive.
        path: PathBuf,
        /// The agent may move the file instead of copying it.
        #[serde(default)]
        take: bool,
    },
    /// Publish the single file at `path`: into the cache and seeded, its metainfo built from
    /// the bytes as they are copied in (one read of the file; see
    /// [`crate::cache::Cache::install_built`]). Answered with `published`. Agents before this
    /// request answer "bad control request", and the client falls back to `add`.
    Publish {
        /// Package name.
        name: String,
        /// Absolute path of the file (the user's: copied, never moved).
        path: PathBuf,
        /// The metainfo's file name.
        file_name: String,
        /// The announce URL the metainfo names.
        announce: String,
        /// `file`, `executable` or `tar.zst` ([`format_name`]).
        format: String,
    },
    /// What the agent holds, fetches and serves.
    Status,
    /// Announce a package now (after `publish` listed it), instead of at the next retry.
    Announce {
        /// Swarm info-hash, hex.
        info_hash: String,
    },
    /// The followed tags (`agent --follow`) and what each resolves to for this host.
    Follows,
    /// Evict least-recently-used versions down to the low watermark now (`fbpkg-rs cache gc`).
    Gc {
        /// Say what would go; remove nothing.
        #[serde(default)]
        dry_run: bool,
        /// Instead of the agent's `--cache-max-size`, this many bytes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_size: Option<u64>,
    },
    /// The cache metrics, Prometheus text format (`fbpkg-rs cache metrics`).
    Metrics,
    /// Stop seeding `name:sha256` and remove it from the cache (a publish the tracker refused
    /// must leave nothing behind).
    Forget {
        /// Package name.
        name: String,
        /// Full SHA-256.
        sha256: String,
    },
}

/// What the agent answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Answer to ping.
    Pong {
        /// Agent version.
        version: String,
        /// Where it listens for peers.
        listen: String,
    },
    /// Download progress.
    Progress {
        /// The torrent's status (boxed: far larger than the other events).
        status: Box<TorrentStatus>,
    },
    /// The package is in the cache.
    Done {
        /// Launch path.
        path: PathBuf,
        /// The cache entry directory.
        dir: PathBuf,
    },
    /// Answer to `publish`: the package is in the cache and seeded.
    Published {
        /// Launch path.
        path: PathBuf,
        /// The cache entry directory.
        dir: PathBuf,
        /// The metainfo built, hex-encoded: what the client lists with the tracker.
        metainfo_hex: String,
        /// False when this version was in the cache already.
        fresh: bool,
    },
    /// Everything the agent has.
    Status {
        /// One per package.
        torrents: Vec<TorrentStatus>,
    },
    /// Answer to `follows`: one per followed tag (none when the agent follows nothing).
    Follows {
        /// In `name:tag` order.
        follows: Vec<super::follow::FollowStatus>,
    },
    /// Answer to `gc`: what was evicted.
    Gc {
        /// The sweep.
        report: crate::cache::SweepReport,
    },
    /// Answer to `metrics`.
    Metrics {
        /// Prometheus text exposition format.
        text: String,
    },
    /// The request failed.
    Error {
        /// [`PeerError::kind`].
        kind: ErrorKind,
        /// What happened.
        message: String,
    },
}

/// A single-file format's name in a `publish` request.
pub fn format_name(format: Format) -> &'static str {
    match format {
        Format::File => "file",
        Format::Executable => "executable",
        Format::TarZst => "tar.zst",
        Format::Tree => "tree",
    }
}

/// The format a `publish` request names; a tree is published with `add`.
pub fn parse_format(name: &str) -> Result<Format> {
    [Format::File, Format::Executable, Format::TarZst]
        .into_iter()
        .find(|&f| format_name(f) == name)
        .ok_or_else(|| {
            PeerError::BadInput(format!(
                "publish: format {name:?} is not file, executable or tar.zst"
            ))
        })
}

impl Event {
    /// An error event from an error.
    pub fn from_error(e: &PeerError) -> Self {
        Event::Error {
            kind: e.kind(),
            message: e.to_string(),
        }
    }
}

/// Parse one request line as read from the socket, trailing newline included or not.
///
/// Pure, so the untrusted side of the control socket can be fuzzed and property tested apart
/// from the socket: a line over [`MAX_CONTROL_LINE`] bytes, not UTF-8, or not a [`Request`]
/// is a [`PeerError::BadInput`] that says which.
pub fn parse_request_line(line: &[u8]) -> Result<Request> {
    if line.len() > MAX_CONTROL_LINE {
        return Err(PeerError::BadInput(format!(
            "bad control request: request too long ({} bytes, at most {MAX_CONTROL_LINE})",
            line.len()
        )));
    }
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let text = std::str::from_utf8(line)
        .map_err(|e| PeerError::BadInput(format!("bad control request: not UTF-8 ({e})")))?;
    serde_json::from_str(text).map_err(|e| PeerError::BadInput(format!("bad control request: {e}")))
}

/// The socket path for a state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

/// A connection to a running agent.
#[derive(Debug)]
pub struct AgentClient {
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    write: tokio::net::unix::OwnedWriteHalf,
}

impl AgentClient {
    /// Connect, or `Ok(None)` when no agent is listening there.
    pub async fn connect(state_dir: &Path) -> Result<Option<Self>> {
        let path = socket_path(state_dir);
        match tokio::time::timeout(Duration::from_secs(2), UnixStream::connect(&path)).await {
            Ok(Ok(s)) => {
                let (r, w) = s.into_split();
                Ok(Some(Self {
                    lines: BufReader::new(r).lines(),
                    write: w,
                }))
            }
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                Ok(None)
            }
            Ok(Err(e)) => Err(PeerError::Agent(format!(
                "cannot connect to {}: {e}",
                path.display()
            ))),
            Err(_) => Err(PeerError::Agent(format!(
                "{} did not answer within 2 s",
                path.display()
            ))),
        }
    }

    /// Send the request line. A request the agent would refuse as too long is an error here,
    /// and when the agent stops reading, its own answer (why) is the error if it sent one.
    pub async fn send(&mut self, req: &Request) -> Result<()> {
        let mut line = serde_json::to_vec(req).map_err(|e| PeerError::Agent(e.to_string()))?;
        line.push(b'\n');
        if line.len() > MAX_CONTROL_LINE {
            return Err(PeerError::Agent(format!(
                "request of {} bytes is over the agent's limit of {MAX_CONTROL_LINE}",
                line.len()
            )));
        }
        let Err(e) = self.write.write_all(&line).await else {
            return Ok(());
        };
        let answer = tokio::time::timeout(Duration::from_secs(1), self.next()).await;
        match answer {
            Ok(Ok(Some(Event::Error { kind, message }))) => {
                Err(PeerError::Remote { kind, message })
            }
            _ => Err(PeerError::Agent(format!("writing to the agent: {e}"))),
        }
    }

    /// The next event, or `None` when the agent closed the connection.
    pub async fn next(&mut self) -> Result<Option<Event>> {
        let line = self
            .lines
            .next_line()
            .await
            .map_err(|e| PeerError::Agent(format!("reading from the agent: {e}")))?;
        match line {
            None => Ok(None),
            Some(l) => serde_json::from_str(&l)
                .map(Some)
                .map_err(|e| PeerError::Agent(format!("unreadable agent answer: {e}"))),
        }
    }

    /// Send a request and return its single answer, turning an error event into an error.
    pub async fn call(mut self, req: &Request) -> Result<Event> {
        self.send(req).await?;
        match self.next().await? {
            Some(Event::Error { kind, message }) => Err(PeerError::Remote { kind, message }),
            Some(e) => Ok(e),
            None => Err(PeerError::Agent(
                "the agent closed the connection without answering".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn requests_and_events_are_json_lines() {
        let r = Request::Fetch {
            name: "a".into(),
            sha256: "b".into(),
            tracker_retry_secs: None,
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"op":"fetch","name":"a","sha256":"b"}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        let e = Event::Error {
            kind: ErrorKind::NotFound,
            message: "x".into(),
        };
        assert_eq!(
            serde_json::from_str::<Event>(&serde_json::to_string(&e).unwrap()).unwrap(),
            e
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"rm -rf"}"#).is_err());
    }

    #[test]
    fn request_lines_over_the_limit_are_refused() {
        assert_eq!(
            parse_request_line(b"{\"op\":\"ping\"}\n").unwrap(),
            Request::Ping
        );
        let mut long = br#"{"op":"fetch","name":""#.to_vec();
        long.resize(MAX_CONTROL_LINE + 1, b'a');
        let err = parse_request_line(&long).unwrap_err().to_string();
        assert!(err.contains("request too long"), "{err}");
        assert!(parse_request_line(b"\xff\xfe").is_err());
    }

    /// A ping padded with `pad` spaces (JSON allows them) to make a line of any length.
    fn padded_ping(pad: usize) -> Vec<u8> {
        let mut line = b"{\"op\":\"ping\"".to_vec();
        line.resize(line.len() + pad, b' ');
        line.extend_from_slice(b"}\n");
        line
    }

    /// What `read_request` makes of `line`, given `permits` for long lines, on the paused
    /// clock (a wait for a permit ends when the agent gives up on it).
    async fn read_with(line: Vec<u8>, permits: usize) -> (Result<Option<Request>>, usize) {
        let large = Semaphore::new(permits);
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let writer = tokio::spawn(async move { client.write_all(&line).await });
        let got = read_request(server, &large, Duration::from_secs(10)).await;
        let held = permits - large.available_permits();
        drop(writer.await);
        (got.map(|r| r.map(|(req, _permit)| req)), held)
    }

    /// Short requests need no permit; a long one (an `add`'s metainfo) waits its turn for one
    /// of the few (an install may hold it for minutes: the wait is not a client's fault), and
    /// holds it while it is answered; one over the limit is refused whatever it holds.
    #[tokio::test(start_paused = true)]
    async fn long_request_lines_are_read_a_few_at_a_time() {
        let short = padded_ping(SMALL_CONTROL_LINE - 100);
        assert!(short.len() < SMALL_CONTROL_LINE);
        let (got, held) = read_with(short, 0).await;
        assert_eq!(got.unwrap(), Some(Request::Ping));
        assert_eq!(held, 0);

        let long = padded_ping(SMALL_CONTROL_LINE);
        let (got, held) = read_with(long.clone(), 1).await;
        assert_eq!(got.unwrap(), Some(Request::Ping));
        assert_eq!(held, 1, "the permit is held with the request");
        let waiting = tokio::time::timeout(
            LARGE_CONTROL_WAIT - Duration::from_secs(1),
            read_with(long.clone(), 0),
        )
        .await;
        assert!(
            waiting.is_err(),
            "waits its turn, not the client's deadline"
        );
        let given_up = tokio::time::timeout(LARGE_CONTROL_WAIT * 2, read_with(long, 0)).await;
        let err = given_up
            .expect("given up, not waiting on")
            .0
            .unwrap_err()
            .to_string();
        assert!(err.contains("busy"), "{err}");

        let (got, _) = read_with(padded_ping(MAX_CONTROL_LINE), 1).await;
        let err = got.unwrap_err().to_string();
        assert!(err.contains("request too long"), "{err}");
        let (got, _) = read_with(Vec::new(), 0).await;
        assert!(got.unwrap().is_none(), "closed without a request");

        // Half a line, then nothing: the client's deadline.
        let none = Semaphore::new(0);
        let (mut client, server) = tokio::io::duplex(1024);
        client.write_all(b"{\"op\"").await.unwrap();
        let got = read_request(server, &none, Duration::from_secs(10)).await;
        let err = got.map(|r| r.map(|(req, _)| req)).unwrap_err().to_string();
        assert!(err.contains("no request within 10 s"), "{err}");
        drop(client);
    }

    fn bad_input(line: &[u8]) -> String {
        match parse_request_line(line) {
            Err(PeerError::BadInput(m)) => m,
            other => panic!(
                "{:?}: expected BadInput, got {other:?}",
                String::from_utf8_lossy(line)
            ),
        }
    }

    #[test]
    fn request_lines_parse_with_or_without_newline() {
        for line in [
            &br#"{"op":"ping"}"#[..],
            b"{\"op\":\"ping\"}\n",
            b"{\"op\":\"ping\"}\r\n",
            b"  {\"op\":\"ping\"}  \n",
        ] {
            assert_eq!(parse_request_line(line).unwrap(), Request::Ping);
        }
        let add = br#"{"op":"add","name":"p","metainfo_hex":"00","path":"/x"}"#;
        assert_eq!(
            parse_request_line(add).unwrap(),
            Request::Add {
                name: "p".into(),
                metainfo_hex: "00".into(),
                path: "/x".into(),
                take: false,
            }
        );
    }

    #[test]
    fn publish_names_the_single_file_formats() {
        for f in [Format::File, Format::Executable, Format::TarZst] {
            assert_eq!(parse_format(format_name(f)).unwrap(), f);
        }
        assert!(
            parse_format("tree").is_err(),
            "a tree is published with add"
        );
        assert!(parse_format("zip").is_err());
        let r = Request::Publish {
            name: "p".into(),
            path: "/x/p.bin".into(),
            file_name: "p.bin".into(),
            announce: "http://127.0.0.1:1/announce".into(),
            format: "file".into(),
        };
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(parse_request_line(line.as_bytes()).unwrap(), r);
        // What an agent from before `publish` answers: the client falls back on it.
        let old = serde_json::from_str::<Request>(&line.replace("publish", "publish2"));
        assert!(
            old.unwrap_err()
                .to_string()
                .contains("unknown variant `publish2`")
        );
    }

    #[test]
    fn request_lines_are_rejected_with_a_reason() {
        assert!(bad_input(b"{\"op\":\"ping\"}\xff\n").contains("not UTF-8"));
        assert!(bad_input(br#"{"op":"rm -rf"}"#).contains("bad control request"));
        assert!(bad_input(b"").contains("bad control request"));
        assert!(bad_input(b"\n").contains("bad control request"));
        assert!(bad_input(br#"{"op":"fetch","name":"a"}"#).contains("sha256"));
        // Two requests on one line is not one request.
        assert!(bad_input(b"{\"op\":\"ping\"}\n{\"op\":\"ping\"}\n").contains("trailing"));
    }

    #[test]
    fn request_lines_are_bounded() {
        // A valid request padded with JSON whitespace to one byte past the limit: only the
        // length can be what rejects it.
        let mut line = br#"{"op":"ping"}"#.to_vec();
        line.resize(MAX_CONTROL_LINE + 1, b' ');
        assert!(bad_input(&line).contains("request too long"));
        line.truncate(MAX_CONTROL_LINE);
        assert_eq!(parse_request_line(&line).unwrap(), Request::Ping);
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        let text = || "\\PC{0,24}";
        prop_oneof![
            Just(Request::Ping),
            Just(Request::Status),
            Just(Request::Follows),
            Just(Request::Metrics),
            (any::<bool>(), proptest::option::of(any::<u64>()))
                .prop_map(|(dry_run, max_size)| Request::Gc { dry_run, max_size }),
            (text(), text()).prop_map(|(name, sha256)| Request::Fetch {
                name,
                sha256,
                tracker_retry_secs: None
            }),
            (text(), "[0-9a-f]{0,64}", text(), any::<bool>()).prop_map(
                |(name, metainfo_hex, path, take)| Request::Add {
                    name,
                    metainfo_hex,
                    path: path.into(),
                    take,
                }
            ),
            text().prop_map(|info_hash| Request::Announce { info_hash }),
        ]
    }

    proptest! {
        #[test]
        fn request_line_round_trip(req in arb_request(), crlf in any::<bool>()) {
            let mut line = serde_json::to_vec(&req).unwrap();
            line.extend_from_slice(if crlf { b"\r\n" } else { b"\n" });
            prop_assert_eq!(parse_request_line(&line).unwrap(), req);
        }

        #[test]
        fn request_line_garbage_is_bad_input(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            match parse_request_line(&bytes) {
                Ok(req) => {
                    // Whatever is accepted must be what a client could have sent.
                    let again = serde_json::to_vec(&req).unwrap();
                    prop_assert_eq!(parse_request_line(&again).unwrap(), req);
                }
                Err(e) => prop_assert!(matches!(e, PeerError::BadInput(_))),
            }
        }

        #[test]
        fn request_line_mutations_never_panic(req in arb_request(), at in any::<usize>(), byte in any::<u8>()) {
            // Garbage rarely gets past `{"op":`; flipping one byte of a real request does.
            let mut line = serde_json::to_vec(&req).unwrap();
            let i = at % line.len();
            line[i] = byte;
            if let Ok(again) = parse_request_line(&line) {
                let line = serde_json::to_vec(&again).unwrap();
                prop_assert_eq!(parse_request_line(&line).unwrap(), again);
            }
        }
    }
}
