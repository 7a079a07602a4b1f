//! The few bytes of HTTP/1.1 a load generator needs: write a request, read a response head.
//!
//! A general HTTP client costs more CPU per request than the tracker under test spends on it;
//! on a 2-core machine that would make the generator the bottleneck. This codec is pure (no
//! sockets): the caller reads into a buffer and asks [`parse_head`] whether the head is there
//! yet; "need more bytes" is `Ok(None)`, not an error.

use std::fmt;

/// Longest response head accepted; a tracker's is about 100 bytes.
pub const MAX_HEAD: usize = 8 * 1024;

/// A parsed response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// Status code.
    pub status: u16,
    /// `Content-Length`, when present.
    pub content_length: Option<usize>,
    /// The server will close the connection after this response (`Connection: close`, or
    /// HTTP/1.0 without `Connection: keep-alive`).
    pub close: bool,
    /// Bytes of the head, blank line included: the body starts here.
    pub len: usize,
}

impl Head {
    /// Total bytes of head plus body, when the body length is known.
    pub fn total_len(&self) -> Option<usize> {
        self.content_length.map(|n| self.len + n)
    }
}

/// A response head that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadError(pub String);

impl fmt::Display for HeadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HeadError {}

fn bad(msg: impl Into<String>) -> HeadError {
    HeadError(msg.into())
}

/// Parse the response head at the start of `buf`: `Ok(None)` until the blank line has arrived.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, HeadError> {
    let Some(end) = find_blank_line(buf) else {
        return if buf.len() > MAX_HEAD {
            Err(bad(format!("response head longer than {MAX_HEAD} bytes")))
        } else {
            Ok(None)
        };
    };
    let head = &buf[..end];
    let mut lines = head.split(|&b| b == b'\n').map(trim_cr);
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, |&b| b == b' ');
    let version = parts.next().unwrap_or_default();
    let keep_alive_default = match version {
        b"HTTP/1.1" => true,
        b"HTTP/1.0" => false,
        _ => {
            return Err(bad(format!(
                "not an HTTP/1.x status line: {:?}",
                String::from_utf8_lossy(&status_line[..status_line.len().min(40)])
            )));
        }
    };
    let status = parts
        .next()
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|s| (100..1000).contains(s))
        .ok_or_else(|| bad("status code is not a number"))?;
    let mut content_length = None;
    let mut close = !keep_alive_default;
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(value)
                .ok()
                .and_then(|s| s.parse::<usize>().ok())
                .ok_or_else(|| bad("Content-Length is not a number"))?;
            if content_length.replace(n).is_some_and(|old| old != n) {
                return Err(bad("conflicting Content-Length headers"));
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            return Err(bad("Transfer-Encoding is not supported by this generator"));
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|&b| b == b',').map(trim) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    close = false;
                }
            }
        }
    }
    Ok(Some(Head {
        status,
        content_length,
        close,
        len: end,
    }))
}

/// How much of a response `buf` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// The head has not fully arrived, or the body is still short.
    Incomplete,
    /// A whole response of `total` bytes (head and body) is at the start of `buf`.
    Complete {
        /// The head.
        head: Head,
        /// Bytes of head plus body.
        total: usize,
    },
    /// No `Content-Length` and the server closes: the body runs to the end of the stream.
    UntilClose(Head),
}

/// Whether `buf` starts with a whole response.
pub fn frame(buf: &[u8]) -> Result<Framing, HeadError> {
    let Some(head) = parse_head(buf)? else {
        return Ok(Framing::Incomplete);
    };
    match head.total_len() {
        Some(total) if buf.len() >= total => Ok(Framing::Complete { head, total }),
        Some(_) => Ok(Framing::Incomplete),
        None if head.status == 204 || head.status == 304 => Ok(Framing::Complete {
            head,
            total: head.len,
        }),
        None if head.close => Ok(Framing::UntilClose(head)),
        None => Err(bad("keep-alive response without Content-Length")),
    }
}

/// Index just past the first `\r\n\r\n`.
fn find_blank_line(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &v[start..end.max(start)]
}

/// Append a `GET` request for `path_and_query` to `out`.
pub fn write_get(out: &mut Vec<u8>, host: &str, path_and_query: &str, close: bool) {
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(path_and_query.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(if close {
        b"\r\nConnection: close\r\n\r\n".as_slice()
    } else {
        b"\r\n\r\n".as_slice()
    });
}

/// Append a `PUT` request with `body` to `out`.
pub fn write_put(out: &mut Vec<u8>, host: &str, path: &str, body: &[u8]) {
    out.extend_from_slice(b"PUT ");
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\nContent-Type: application/x-bittorrent\r\nContent-Length: ");
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_more_until_the_blank_line() {
        let full = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc";
        for cut in 0..full.len() - 3 {
            assert_eq!(parse_head(&full[..cut]), Ok(None), "cut at {cut}");
        }
        let head = parse_head(full).unwrap().unwrap();
        assert_eq!(
            head,
            Head {
                status: 200,
                content_length: Some(3),
                close: false,
                len: full.len() - 3
            }
        );
        assert_eq!(head.total_len(), Some(full.len()));
    }

    #[test]
    fn framing_waits_for_the_whole_body() {
        let full = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc";
        assert_eq!(frame(&full[..full.len() - 1]), Ok(Framing::Incomplete));
        assert!(matches!(frame(full), Ok(Framing::Complete { total, .. }) if total == full.len()));
        let mut two = full.to_vec();
        two.extend_from_slice(full);
        assert!(matches!(frame(&two), Ok(Framing::Complete { total, .. }) if total == full.len()));
        assert!(matches!(
            frame(b"HTTP/1.0 200 OK\r\n\r\nbody"),
            Ok(Framing::UntilClose(_))
        ));
        assert!(frame(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
    }

    #[test]
    fn connection_semantics() {
        let h = |s: &str| parse_head(s.as_bytes()).unwrap().unwrap();
        assert!(h("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n").close);
        assert!(h("HTTP/1.1 200 OK\r\nconnection: Keep-Alive, CLOSE\r\n\r\n").close);
        assert!(h("HTTP/1.0 200 OK\r\n\r\n").close);
        assert!(!h("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n").close);
        assert!(!h("HTTP/1.1 404 Not Found\r\ncontent-length:  0 \r\n\r\n").close);
        assert_eq!(
            h("HTTP/1.1 404 Not Found\r\ncontent-length:  0 \r\n\r\n").content_length,
            Some(0)
        );
    }

    #[test]
    fn rejects_what_it_cannot_frame() {
        let e = |s: &str| parse_head(s.as_bytes()).unwrap_err().0;
        assert!(e("SSH-2.0-OpenSSH\r\n\r\n").contains("status line"));
        assert!(e("HTTP/1.1 abc OK\r\n\r\n").contains("status code"));
        assert!(e("HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").contains("Content-Length"));
        assert!(
            e("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
                .contains("conflicting")
        );
        assert!(
            e("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                .contains("Transfer-Encoding")
        );
        assert!(parse_head(&vec![b'a'; MAX_HEAD + 1]).is_err());
    }

    #[test]
    fn requests_are_well_formed() {
        let mut out = Vec::new();
        write_get(&mut out, "127.0.0.1:1", "/announce?x=1", true);
        assert_eq!(
            out,
            b"GET /announce?x=1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\nConnection: close\r\n\r\n"
        );
        out.clear();
        write_put(&mut out, "h", "/p", b"xy");
        assert!(out.ends_with(b"Content-Length: 2\r\n\r\nxy"));
    }
}
