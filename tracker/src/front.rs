//! The connection front: announces and scrapes are served here directly; anything else is
//! handed, bytes already read included, to hyper and the axum router.
//!
//! Why: a fleet announces constantly and often on a fresh connection each time. Through hyper
//! and tower every such connection paid for HTTP version detection, a connection builder, a
//! boxed service, middleware futures and a request timer; measured against opentracker that
//! made our connection-per-request rate 0.85x of theirs (benches/ tracker_bench). The hot path
//! here is: read the head, parse it with `httparse`, call the same [`serve_announce`] the router
//! uses, write head and body in one `write`. Keep-alive and HTTP/1.0 are honoured. The first
//! request for another path switches the connection to hyper for good.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::http::{SharedState, scrape_body, serve_announce};
use crate::metrics::Route;

/// Longest request head accepted on the fast path.
const MAX_HEAD: usize = 8 << 10;
/// A client must send a whole request head within this time.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// An idle keep-alive connection is closed after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_HEADERS: usize = 32;

/// What the front does with one parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Head {
    /// `GET /announce` or `GET /scrape` without a body: served here.
    Tracker {
        /// Which one.
        route: Route,
        /// The raw query string (may be empty).
        query: String,
        /// Keep the connection open afterwards.
        keep_alive: bool,
        /// Bytes of the head, to consume from the buffer.
        len: usize,
    },
    /// Anything else: hand the connection to the router.
    Other,
    /// Not a complete head yet.
    Partial,
}

/// Parse a request head from the front of `buf`.
pub fn parse_head(buf: &[u8]) -> Result<Head, httparse::Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(Head::Partial),
        // Too many headers and the like: let hyper give the proper answer.
        Err(httparse::Error::TooManyHeaders) => return Ok(Head::Other),
        Err(e) => return Err(e),
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Ok(Head::Other);
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let route = match path {
        "/announce" => Route::Announce,
        "/scrape" => Route::Scrape,
        _ => return Ok(Head::Other),
    };
    if method != "GET" {
        return Ok(Head::Other);
    }
    let mut keep_alive = version == 1;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") && h.value != b"0" {
            return Ok(Head::Other);
        }
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Ok(Head::Other);
        }
        if h.name.eq_ignore_ascii_case("connection") {
            let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
            if v.contains("close") {
                keep_alive = false;
            } else if v.contains("keep-alive") {
                keep_alive = true;
            }
        }
    }
    Ok(Head::Tracker {
        route,
        query: query.to_owned(),
        keep_alive,
        len,
    })
}

/// Append a whole HTTP/1.1 response.
fn response(out: &mut Vec<u8>, status: &str, content_type: &str, body: &[u8], keep_alive: bool) {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: {connection}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(body);
}

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

/// Finish the connection with hyper and the router, replaying what was already read.
async fn hand_to_router(
    stream: TcpStream,
    buf: BytesMut,
    remote: SocketAddr,
    router: Router,
    shutdown: CancellationToken,
) {
    let io = hyper_util::rt::TokioIo::new(Replay {
        prefix: buf,
        inner: stream,
    });
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let mut req = req.map(axum::body::Body::new);
        req.extensions_mut().insert(ConnectInfo(remote));
        router.clone().oneshot(req)
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        // Also the keep-alive idle limit on this path: the same as the front's.
        .header_read_timeout(IDLE_TIMEOUT)
        .serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(peer = %remote, error = %e, "HTTP connection ended with an error");
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
        }
    }
}

/// A stream that first yields bytes already read from it.
struct Replay {
    prefix: BytesMut,
    inner: TcpStream,
}

impl AsyncRead for Replay {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(out.remaining());
            out.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl AsyncWrite for Replay {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, b)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_routed() {
        let h = parse_head(b"GET /announce?a=1&b=2 HTTP/1.1\r\nHost: x\r\n\r\nGET /next").unwrap();
        assert_eq!(
            h,
            Head::Tracker {
                route: Route::Announce,
                query: "a=1&b=2".into(),
                keep_alive: true,
                len: 43
            }
        );
        let h = parse_head(b"GET /scrape HTTP/1.0\r\n\r\n").unwrap();
        assert!(matches!(
            h,
            Head::Tracker {
                route: Route::Scrape,
                keep_alive: false,
                ..
            }
        ));
        let h = parse_head(b"GET /announce?x HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").unwrap();
        assert!(matches!(
            h,
            Head::Tracker {
                keep_alive: true,
                ..
            }
        ));
        let h = parse_head(b"GET /announce?x HTTP/1.1\r\nconnection: close\r\n\r\n").unwrap();
        assert!(matches!(
            h,
            Head::Tracker {
                keep_alive: false,
                ..
            }
        ));
        assert_eq!(
            parse_head(b"GET /announce?x HTTP/1.1\r\nHost").unwrap(),
            Head::Partial
        );
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\n\r\n").unwrap(), Head::Other);
        assert_eq!(
            parse_head(b"PUT /announce HTTP/1.1\r\n\r\n").unwrap(),
            Head::Other
        );
        assert_eq!(
            parse_head(b"GET /announce HTTP/1.1\r\nContent-Length: 5\r\n\r\n").unwrap(),
            Head::Other
        );
        assert_eq!(
            parse_head(b"GET /announcement HTTP/1.1\r\n\r\n").unwrap(),
            Head::Other
        );
        assert!(parse_head(b"\x00\x01garbage\r\n\r\n").is_err());
    }
}
