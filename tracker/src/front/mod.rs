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

mod handover;
mod head;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::handover::hand_to_router;
use self::head::{Head, MAX_HEAD, parse_head, response};
use crate::http::{SharedState, scrape_body, serve_announce};
use crate::metrics::Route;

/// A client must send a whole request head within this time.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// An idle keep-alive connection is closed after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// What [`serve_immediately`] left to do.
pub(crate) enum Immediate {
    /// Answered and closed.
    Done,
    /// Needs the async path; `buf` holds what was read already.
    Continue(std::net::TcpStream, BytesMut),
    /// Answered, but the answer did not fit in the socket buffer: write the rest, then close.
    Finish(std::net::TcpStream, Vec<u8>),
}

/// Serve a just-accepted connection on the spot when it already holds one complete
/// `Connection: close` announce or scrape — the connection-per-request case — with no epoll
/// registration, no task and no wake-up: read, answer, close. Anything else continues on the
/// async path. `stream` must be non-blocking.
pub(crate) fn serve_immediately(
    mut stream: std::net::TcpStream,
    remote: SocketAddr,
    state: &SharedState,
) -> Immediate {
    use std::io::{Read, Write};
    let mut first = [0u8; 2048];
    let n = match stream.read(&mut first) {
        Ok(0) => return Immediate::Done,
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            return Immediate::Continue(stream, BytesMut::new());
        }
        Err(_) => return Immediate::Done,
    };
    let (route, query) = match parse_head(&first[..n]) {
        Ok(Head::Tracker {
            route,
            query,
            keep_alive: false,
            len,
        }) if len == n && query.len() <= state.config.max_query_len => (route, query),
        _ => return Immediate::Continue(stream, BytesMut::from(&first[..n])),
    };
    let started = Instant::now();
    let body = answer(state, route, &query, remote, started);
    let mut out = Vec::with_capacity(body.len() + 128);
    response(&mut out, "200 OK", "text/plain", &body, false);
    let written = match stream.write(&out) {
        Ok(w) => w,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(_) => return Immediate::Done,
    };
    state.metrics.observe(route, started.elapsed());
    if written == out.len() {
        Immediate::Done
    } else {
        out.drain(..written);
        Immediate::Finish(stream, out)
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

/// Serve one accepted connection until it closes, the client goes idle, or shutdown. `buf`
/// holds bytes already read from it.
pub(crate) async fn serve_connection(
    mut stream: TcpStream,
    remote: SocketAddr,
    state: SharedState,
    router: Router,
    shutdown: CancellationToken,
    mut buf: BytesMut,
) {
    let mut out = Vec::with_capacity(1024);
    let mut first = true;
    loop {
        let head = loop {
            match parse_head(&buf) {
                Ok(Head::Partial) if buf.len() >= MAX_HEAD => {
                    let max = state.config.max_query_len;
                    let mut resp = Vec::new();
                    let msg = format!(
                        "request head longer than {MAX_HEAD} bytes (queries up to {max})\n"
                    );
                    response(
                        &mut resp,
                        "414 URI Too Long",
                        "text/plain",
                        msg.as_bytes(),
                        false,
                    );
                    let _ = stream.write_all(&resp).await;
                    return;
                }
                Ok(Head::Partial) => {}
                Ok(h) => break h,
                Err(_) => {
                    let mut resp = Vec::new();
                    response(
                        &mut resp,
                        "400 Bad Request",
                        "text/plain",
                        b"malformed HTTP request\n",
                        false,
                    );
                    let _ = stream.write_all(&resp).await;
                    return;
                }
            }
            let limit = if buf.is_empty() && !first {
                IDLE_TIMEOUT
            } else {
                HEAD_TIMEOUT
            };
            let read = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = tokio::time::timeout(limit, stream.read_buf(&mut buf)) => r,
            };
            match read {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                Ok(Ok(_)) => {}
            }
        };
        first = false;
        let Head::Tracker {
            route,
            query,
            keep_alive,
            len,
        } = head
        else {
            hand_to_router(stream, buf, remote, router, shutdown).await;
            return;
        };
        let started = Instant::now();
        buf.advance(len);
        out.clear();
        if query.len() > state.config.max_query_len {
            let msg = format!("query longer than {} bytes\n", state.config.max_query_len);
            response(
                &mut out,
                "414 URI Too Long",
                "text/plain",
                msg.as_bytes(),
                false,
            );
            let _ = stream.write_all(&out).await;
            return;
        }
        let body = answer(&state, route, &query, remote, started);
        response(&mut out, "200 OK", "text/plain", &body, keep_alive);
        let written = stream.write_all(&out).await;
        state.metrics.observe(route, started.elapsed());
        if written.is_err() || !keep_alive {
            return;
        }
    }
}
