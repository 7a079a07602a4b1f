//! Request heads on the fast path: parsed from bytes with `httparse`, and whole responses
//! written into a buffer. No I/O here.

use crate::metrics::Route;

/// Longest request head accepted on the fast path.
pub(crate) const MAX_HEAD: usize = 8 << 10;
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
pub(crate) fn response(
    out: &mut Vec<u8>,
    status: &str,
    content_type: &str,
    body: &[u8],
    keep_alive: bool,
) {
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
