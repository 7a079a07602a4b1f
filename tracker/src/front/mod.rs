//! The connection front: announces and scrapes are served here directly; anything else is
//! handed, bytes already read included, to hyper and the axum router.
//!
//! Why: a fleet announces constantly and often on a fresh connection each time. Through hyper
//! and tower every such connection paid for HTTP version detection, a connection builder, a
//! boxed service, middleware futures and a request timer; measured against opentracker that
//! made our connection-per-request rate 0.85x of theirs (benches/ tracker_bench). The hot path
//! here is: read the head, parse it with `httparse`, call the same [`serve_announce`] the router
//! uses, write head and body in one `write`. Keep-alive and HTTP/1.0 are honoured. The first
//! request for another path switches the connection to hyper for good ([`handover`]).
//!
//! Bounded by construction, so no client can hold the tracker's resources by being slow:
//!
//! - a connection cap for the listener (`max_connections`, slots in `AppState::connections`):
//!   a connection that outlives its accept holds a slot. Over the cap, a new connection is
//!   closed at once rather than left waiting: waiting would keep its descriptor and buffers
//!   (and, were we to stop accepting, the kernel backlog would fill and legitimate clients
//!   would time out in SYN retries, seconds each), while a closed announce is retried by any
//!   client at its next interval. One exception, for free: a connection whose whole
//!   `Connection: close` announce is already readable at accept is still answered on the spot
//!   ([`serve_immediately`] takes no slot), so a flood of idle connections cannot deny
//!   connection-per-request announces.
//! - a whole-head deadline (`head_timeout`): from the accept for the first request, from its
//!   first byte for a later one; not per read, so a byte every few seconds does not keep a
//!   connection open. The client gets a 408.
//! - a write deadline for every whole response (`write_timeout`), however slowly the client
//!   reads.
//! - the keep-alive idle limit (`idle_timeout`) between requests.

mod handover;
pub(crate) mod head;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::head::{Head, MAX_HEAD, parse_head, response};
use crate::http::{SharedState, scrape_any, scrape_body, serve_announce, serve_announce_any};
use crate::metrics::{Cutoff, Route};

/// What [`serve_immediately`] left to the async path.
pub(crate) enum Later {
    /// Serve the connection; holds the bytes read from it already.
    Serve(BytesMut),
    /// Answered, but the answer did not fit in the socket buffer: write the rest, then close.
    Finish(Vec<u8>),
}

/// Serve a just-accepted connection on the spot when it already holds one complete
/// `Connection: close` announce or scrape — the connection-per-request case — with no epoll
/// registration, no task and no wake-up: read, answer, close (`None`). Anything else is left
/// to the async path. `stream` must be non-blocking.
pub(crate) fn serve_immediately(
    mut stream: std::net::TcpStream,
    remote: SocketAddr,
    state: &SharedState,
) -> Option<(std::net::TcpStream, Later)> {
    use std::io::{Read, Write};
    let mut first = [0u8; 2048];
    let n = match stream.read(&mut first) {
        Ok(0) => return None,
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            return Some((stream, Later::Serve(BytesMut::new())));
        }
        Err(_) => return None,
    };
    let (route, query) = match parse_head(&first[..n]) {
        Ok(Head::Tracker {
            route,
            query,
            keep_alive: false,
            len,
        }) if len == n
            && query.len() <= state.config.max_query_len
            // A remote peer store answers asynchronously: the connection's task serves it.
            && state.peers.redis().is_none() =>
        {
            (route, query)
        }
        _ => return Some((stream, Later::Serve(BytesMut::from(&first[..n])))),
    };
    let started = Instant::now();
    let body = answer(state, route, &query, remote, started);
    let mut out = Vec::with_capacity(body.len() + 128);
    response(&mut out, "200 OK", "text/plain", &body, false);
    let written = match stream.write(&out) {
        Ok(w) => w,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(_) => return None,
    };
    state.metrics.observe(route, started.elapsed());
    if written == out.len() {
        None
    } else {
        out.drain(..written);
        Some((stream, Later::Finish(out)))
    }
}

fn answer(
    state: &SharedState,
    route: Route,
    query: &str,
    remote: SocketAddr,
    now: Instant,
) -> Vec<u8> {
    match route {
        Route::Announce => {
            let (body, outcome) = serve_announce(state, remote.ip(), query, now);
            state.metrics.announce(outcome);
            body
        }
        _ => scrape_body(state, query),
    }
}

/// [`answer`] with whichever peer store the tracker has (Redis needs a round trip).
async fn answer_any(
    state: &SharedState,
    route: Route,
    query: &str,
    remote: SocketAddr,
    now: Instant,
) -> Vec<u8> {
    if state.peers.redis().is_none() {
        return answer(state, route, query, remote, now);
    }
    match route {
        Route::Announce => {
            let (body, outcome) = serve_announce_any(state, remote.ip(), query, now).await;
            state.metrics.announce(outcome);
            body
        }
        _ => scrape_any(state, query).await,
    }
}

/// What the connection is waiting for, and until when.
#[derive(Debug, Clone, Copy)]
enum Wait {
    /// The rest of a request head: the whole head is due then.
    Head(Instant),
    /// The first byte of the next request on a keep-alive connection.
    Idle(Instant),
}

/// Serve one accepted connection until it closes, the client goes idle or is too slow, or
/// shutdown. `buf` holds bytes already read from it; `_slot` is its place under the
/// connection cap, given back when this returns.
pub(crate) async fn serve_connection(
    mut stream: TcpStream,
    remote: SocketAddr,
    state: SharedState,
    router: Router,
    shutdown: CancellationToken,
    mut buf: BytesMut,
    _slot: OwnedSemaphorePermit,
) {
    let (head_timeout, idle_timeout) = (state.config.head_timeout, state.config.idle_timeout);
    let mut out = Vec::with_capacity(1024);
    let mut wait = Wait::Head(Instant::now() + head_timeout);
    loop {
        let head = loop {
            match parse_head(&buf) {
                Ok(Head::Partial) if buf.len() >= MAX_HEAD => {
                    // A request line that ended is short enough: its headers are what is
                    // too long (431). Otherwise the line itself, so the URI (414).
                    let line_ended = buf.windows(2).any(|w| w == b"\r\n");
                    let (status, what) = if line_ended {
                        ("431 Request Header Fields Too Large", "request headers")
                    } else {
                        ("414 URI Too Long", "request line")
                    };
                    let max = state.config.max_query_len;
                    let msg = format!(
                        "{what} too long: the request head is at most {MAX_HEAD} bytes (queries up to {max})\n"
                    );
                    refuse(&mut stream, &state, status, &msg).await;
                    return;
                }
                Ok(Head::Partial) => {}
                Ok(h) => break h,
                Err(_) => {
                    let msg = "malformed HTTP request\n";
                    refuse(&mut stream, &state, "400 Bad Request", msg).await;
                    return;
                }
            }
            let (Wait::Head(deadline) | Wait::Idle(deadline)) = wait;
            let read = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)) => r,
            };
            match read {
                Err(_) => {
                    if let Wait::Head(_) = wait {
                        state.metrics.cutoff(Cutoff::HeadTimeout);
                        tracing::debug!(peer = %remote, received = buf.len(), "request head not received in time");
                        let msg = format!(
                            "request head not received within {}\n",
                            humantime::format_duration(head_timeout)
                        );
                        refuse(&mut stream, &state, "408 Request Timeout", &msg).await;
                    }
                    return;
                }
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(_)) => {
                    if let Wait::Idle(_) = wait {
                        wait = Wait::Head(Instant::now() + head_timeout);
                    }
                }
            }
        };
        let Head::Tracker {
            route,
            query,
            keep_alive,
            len,
        } = head
        else {
            handover::hand_to_router(stream, buf, remote, router, state, shutdown).await;
            return;
        };
        let started = Instant::now();
        buf.advance(len);
        out.clear();
        if query.len() > state.config.max_query_len {
            let msg = format!("query longer than {} bytes\n", state.config.max_query_len);
            refuse(&mut stream, &state, "414 URI Too Long", &msg).await;
            return;
        }
        let body = answer_any(&state, route, &query, remote, started).await;
        response(&mut out, "200 OK", "text/plain", &body, keep_alive);
        let sent = send(&mut stream, &out, &state, remote).await;
        state.metrics.observe(route, started.elapsed());
        if !sent || !keep_alive {
            return;
        }
        let now = Instant::now();
        wait = if buf.is_empty() {
            Wait::Idle(now + idle_timeout)
        } else {
            // Pipelined: the next head has begun already.
            Wait::Head(now + head_timeout)
        };
    }
}

/// Write `bytes` whole within the write deadline. False when the connection is done for.
async fn send(
    stream: &mut TcpStream,
    bytes: &[u8],
    state: &SharedState,
    remote: SocketAddr,
) -> bool {
    match tokio::time::timeout(state.config.write_timeout, stream.write_all(bytes)).await {
        Ok(r) => r.is_ok(),
        Err(_) => {
            state.metrics.cutoff(Cutoff::WriteTimeout);
            tracing::debug!(peer = %remote, bytes = bytes.len(), "response not written in time");
            false
        }
    }
}

/// Write the rest of an answer [`serve_immediately`] could not finish, within the write
/// deadline, then close.
pub(crate) async fn finish(
    mut stream: TcpStream,
    rest: Vec<u8>,
    remote: SocketAddr,
    state: SharedState,
    _slot: OwnedSemaphorePermit,
) {
    send(&mut stream, &rest, &state, remote).await;
}

/// Answer an error status and close (best effort, within the write deadline).
async fn refuse(stream: &mut TcpStream, state: &SharedState, status: &str, msg: &str) {
    let mut resp = Vec::new();
    response(&mut resp, status, "text/plain", msg.as_bytes(), false);
    if tokio::time::timeout(state.config.write_timeout, stream.write_all(&resp))
        .await
        .is_err()
    {
        return;
    }
    // Closing with unread input makes the kernel send a reset, and a client still sending
    // its (too long) request may lose the answer before it reads it. Say we are done, then
    // read and drop what still comes, bounded in time and bytes.
    let _ = stream.shutdown().await;
    let deadline = Instant::now() + LINGER;
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    while drained < LINGER_BYTES {
        match tokio::time::timeout_at(deadline, stream.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => drained += n,
            _ => break,
        }
    }
}

/// How long a refused connection is read from after the answer, so it is not reset.
const LINGER: Duration = Duration::from_secs(1);
/// Most bytes read from a refused connection after the answer.
const LINGER_BYTES: usize = 256 << 10;
