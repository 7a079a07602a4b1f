//! One HTTP exchange over a TCP stream: tokio for the closed-loop load, blocking std sockets for
//! the open-loop latency probe (its threads sleep to a precise schedule, which tokio's
//! millisecond timer cannot do). Both frame responses with the same pure codec.

use std::io::{self, Read as _, Write as _};
use std::net::SocketAddr;
use std::ops::Range;
use std::time::Duration;

use fbpkg_benches::http1::{self, Framing};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A response read off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Where the body is in the read buffer.
    pub body: Range<usize>,
    /// The server said it closes the connection after this response.
    pub close: bool,
    /// Bytes of the response; anything after them in the buffer is the next response's.
    pub total: usize,
}

/// Why an exchange failed.
#[derive(Debug)]
pub enum ExchangeError {
    /// The stream ended (or was reset) before a byte of the response: on a reused
    /// connection this is a server that closed it, and the request may be retried.
    ClosedBeforeReply(Option<io::Error>),
    /// Writing the request failed.
    Write(io::Error),
    /// Reading failed part-way through the response.
    Read(io::Error),
    /// The stream ended part-way through the response.
    Truncated,
    /// The response cannot be framed.
    Protocol(http1::HeadError),
}

impl ExchangeError {
    /// A short label for counting errors by kind.
    pub fn label(&self) -> String {
        match self {
            Self::ClosedBeforeReply(None) => "connection closed before the response".into(),
            Self::ClosedBeforeReply(Some(e)) => format!("connection lost before the response: {e}"),
            Self::Write(e) => format!("write: {e}"),
            Self::Read(e) => format!("read: {e}"),
            Self::Truncated => "response truncated".into(),
            Self::Protocol(e) => format!("bad response: {e}"),
        }
    }

    /// Whether the request was lost to a connection the server had already given up, so a
    /// client may send it again on a new one.
    pub fn retryable(&self) -> bool {
        matches!(self, Self::ClosedBeforeReply(_) | Self::Write(_))
    }
}

fn lost_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// What to do with `n` freshly read bytes (`n == 0`: end of stream). `Ok(None)`: read more.
fn on_read(buf: &[u8], n: usize) -> Result<Option<Reply>, ExchangeError> {
    let framing = frame(buf)?;
    if n == 0 {
        return match framing {
            Framing::UntilClose(head) => Ok(Some(Reply {
                status: head.status,
                body: head.len..buf.len(),
                close: true,
                total: buf.len(),
            })),
            _ if buf.is_empty() => Err(ExchangeError::ClosedBeforeReply(None)),
            _ => Err(ExchangeError::Truncated),
        };
    }
    Ok(match framing {
        Framing::Complete { head, total } => Some(Reply {
            status: head.status,
            body: head.len..total,
            close: head.close,
            total,
        }),
        Framing::Incomplete | Framing::UntilClose(_) => None,
    })
}

fn frame(buf: &[u8]) -> Result<Framing, ExchangeError> {
    http1::frame(buf).map_err(ExchangeError::Protocol)
}

fn read_error(buf: &[u8], e: io::Error) -> ExchangeError {
    if buf.is_empty() && lost_connection(&e) {
        ExchangeError::ClosedBeforeReply(Some(e))
    } else {
        ExchangeError::Read(e)
    }
}

/// Send `request` and read one response into `buf` (cleared first).
pub async fn exchange(
    stream: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
    request: &[u8],
) -> Result<Reply, ExchangeError> {
    buf.clear();
    stream
        .write_all(request)
        .await
        .map_err(ExchangeError::Write)?;
    loop {
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        let n = match stream.read_buf(buf).await {
            Ok(n) => n,
            Err(e) => return Err(read_error(buf, e)),
        };
        if let Some(reply) = on_read(buf, n)? {
            return Ok(reply);
        }
    }
}

/// After a response the server said it would close with, wait for the close, so the server
/// side holds the TIME_WAIT and the generator does not run out of ephemeral ports. Returns
/// false when the server sent more bytes or did not close.
pub async fn await_close(stream: &mut tokio::net::TcpStream) -> bool {
    let mut scratch = [0u8; 64];
    match stream.read(&mut scratch).await {
        Ok(n) => n == 0,
        Err(e) => lost_connection(&e),
    }
}

/// Connect with Nagle off (requests are written in one piece).
pub async fn connect(addr: SocketAddr) -> io::Result<tokio::net::TcpStream> {
    let s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Blocking twin of [`exchange`]; the socket's timeouts bound it.
pub fn exchange_blocking(
    stream: &mut std::net::TcpStream,
    buf: &mut Vec<u8>,
    request: &[u8],
) -> Result<Reply, ExchangeError> {
    buf.clear();
    stream.write_all(request).map_err(ExchangeError::Write)?;
    let mut chunk = [0u8; 4096];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_error(buf, e)),
        };
        buf.extend_from_slice(&chunk[..n]);
        if let Some(reply) = on_read(buf, n)? {
            return Ok(reply);
        }
    }
}

/// Blocking twin of [`await_close`].
pub fn await_close_blocking(stream: &mut std::net::TcpStream) -> bool {
    let mut scratch = [0u8; 64];
    match stream.read(&mut scratch) {
        Ok(n) => n == 0,
        Err(e) => lost_connection(&e),
    }
}

/// Blocking connect with timeouts on every later read and write.
pub fn connect_blocking(addr: SocketAddr, timeout: Duration) -> io::Result<std::net::TcpStream> {
    let s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}
