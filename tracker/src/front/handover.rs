//! The rest of a connection that asked for something other than an announce or a scrape:
//! hyper and the axum router, with the bytes the front already read replayed first.
//!
//! The same bounds as on the fast path: hyper's `header_read_timeout` is a whole-head deadline
//! (it runs from when hyper starts waiting for a head, so here it is also the keep-alive idle
//! limit), and every response must be written whole within `write_timeout` of its handler
//! returning. hyper has no write deadline of its own, so [`Replay`] enforces it: the service
//! stamps the deadline when the handler returns, and a write still pending at that deadline
//! fails the connection.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::http::SharedState;
use crate::metrics::Cutoff;

/// Finish the connection with hyper and the router, replaying what was already read.
pub(super) async fn hand_to_router(
    stream: TcpStream,
    buf: BytesMut,
    remote: SocketAddr,
    router: Router,
    state: SharedState,
    shutdown: CancellationToken,
) {
    let clock = ResponseClock::default();
    let write_timeout = state.config.write_timeout;
    let io = hyper_util::rt::TokioIo::new(Replay {
        prefix: buf,
        inner: stream,
        clock: clock.clone(),
        timer: None,
        cut: false,
        state: state.clone(),
    });
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let mut req = req.map(axum::body::Body::new);
        req.extensions_mut().insert(ConnectInfo(remote));
        clock.set(None);
        let (clock, response) = (clock.clone(), router.clone().oneshot(req));
        async move {
            let r = response.await;
            clock.set(Some(Instant::now() + write_timeout));
            r
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(state.config.head_timeout)
        .serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                if e.is_timeout() {
                    state.metrics.cutoff(Cutoff::HeadTimeout);
                }
                tracing::debug!(peer = %remote, error = %e, "HTTP connection ended with an error");
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
        }
    }
}

/// When the response being written must be done by; `None` while a handler runs.
#[derive(Debug, Clone, Default)]
struct ResponseClock(Arc<Mutex<Option<Instant>>>);

impl ResponseClock {
    fn set(&self, deadline: Option<Instant>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = deadline;
    }
    fn get(&self) -> Option<Instant> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A stream that first yields bytes already read from it, and fails writes past the current
/// response's deadline.
struct Replay {
    prefix: BytesMut,
    inner: TcpStream,
    clock: ResponseClock,
    /// Armed at the deadline of the response whose write is pending (created on first need).
    timer: Option<Pin<Box<Sleep>>>,
    /// The deadline passed once already (counted once).
    cut: bool,
    state: SharedState,
}

impl Replay {
    /// Run a write-side poll under the current response's deadline.
    fn within_deadline<T>(
        &mut self,
        cx: &mut Context<'_>,
        op: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let deadline = self.clock.get();
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return self.timed_out();
        }
        let polled = op(Pin::new(&mut self.inner), cx);
        let Some(deadline) = deadline.filter(|_| polled.is_pending()) else {
            return polled;
        };
        let timer = match &mut self.timer {
            Some(t) => {
                if t.deadline() != deadline {
                    t.as_mut().reset(deadline);
                }
                t
            }
            None => self
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        if timer.as_mut().poll(cx).is_ready() {
            return self.timed_out();
        }
        Poll::Pending
    }

    fn timed_out<T>(&mut self) -> Poll<io::Result<T>> {
        if !self.cut {
            self.cut = true;
            self.state.metrics.cutoff(Cutoff::WriteTimeout);
        }
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "response not written within the write timeout",
        )))
    }
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
        self.within_deadline(cx, |s, cx| s.poll_write(cx, b))
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.within_deadline(cx, |s, cx| s.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.within_deadline(cx, |s, cx| s.poll_flush(cx))
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
