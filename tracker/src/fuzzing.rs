//! The tracker's untrusted-input parsers, exposed for the fuzz targets in `fuzz/` only.
//!
//! Not an API: the connection front's request-head parser is crate-private, and a fuzz target
//! is another crate. Property tests of the same parser live here too, beside what they test
//! through, so `cargo test` covers what the fuzzer covers.

pub use crate::front::head::{Head, parse_head};
pub use crate::metrics::Route;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A request head the front must serve, with what it must make of it.
    #[derive(Debug, Clone)]
    struct ValidHead {
        bytes: Vec<u8>,
        route: Route,
        query: String,
        keep_alive: bool,
    }

    prop_compose! {
        fn arb_head()(
            scrape in any::<bool>(),
            query in proptest::option::of("[A-Za-z0-9%=&._~-]{0,80}"),
            http11 in any::<bool>(),
            connection in proptest::option::of(prop_oneof![
                Just("close"), Just("Close"), Just("keep-alive"), Just("Keep-Alive"), Just("upgrade"),
            ]),
            extra in proptest::collection::vec(("[A-Za-z][A-Za-z0-9-]{0,12}", "[ -~]{0,30}"), 0..6),
            lf_only in any::<bool>(),
        ) -> ValidHead {
            let nl = if lf_only { "\n" } else { "\r\n" };
            let path = if scrape { "/scrape" } else { "/announce" };
            let target = match &query {
                Some(q) => format!("{path}?{q}"),
                None => path.to_owned(),
            };
            let version = if http11 { "1.1" } else { "1.0" };
            let mut head = format!("GET {target} HTTP/{version}{nl}");
            // Extra headers that would change how the front must answer are left out here
            // and tested on their own.
            for (name, value) in extra.iter().filter(|(n, _)| {
                let n = n.to_ascii_lowercase();
                n != "connection" && n != "content-length" && n != "transfer-encoding"
            }) {
                head.push_str(&format!("{name}: {}{nl}", value.trim()));
            }
            let mut keep_alive = http11;
            if let Some(c) = connection {
                head.push_str(&format!("Connection: {c}{nl}"));
                let c = c.to_ascii_lowercase();
                if c == "close" {
                    keep_alive = false;
                } else if c == "keep-alive" {
                    keep_alive = true;
                }
            }
            head.push_str(nl);
            ValidHead {
                bytes: head.into_bytes(),
                route: if scrape { Route::Scrape } else { Route::Announce },
                query: query.unwrap_or_default(),
                keep_alive,
            }
        }
    }

    proptest! {
        #[test]
        fn valid_heads_are_served_whatever_follows(
            h in arb_head(),
            next in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let mut buf = h.bytes.clone();
            buf.extend_from_slice(&next);
            let want = Head::Tracker {
                route: h.route,
                query: h.query.clone(),
                keep_alive: h.keep_alive,
                len: h.bytes.len(),
            };
            prop_assert_eq!(parse_head(&buf).unwrap(), want);
        }

        #[test]
        fn fragmented_heads_wait_for_the_rest(h in arb_head()) {
            // The front parses again after every read: no prefix of a head may be served,
            // handed to the router or refused.
            for end in 0..h.bytes.len() {
                prop_assert_eq!(parse_head(&h.bytes[..end]).unwrap(), Head::Partial, "prefix of {} bytes", end);
            }
        }

        #[test]
        fn heads_with_a_body_or_another_method_go_to_the_router(
            h in arb_head(),
            what in 0..4usize,
        ) {
            let text = String::from_utf8(h.bytes).unwrap();
            let nl = if text.ends_with("\r\n\r\n") { "\r\n" } else { "\n" };
            let text = match what {
                0 => text.replacen("GET ", "POST ", 1),
                1 => text.replacen("GET ", "HEAD ", 1),
                2 => format!("{}Content-Length: 3{nl}{nl}abc", text.strip_suffix(nl).unwrap()),
                _ => format!("{}Transfer-Encoding: chunked{nl}{nl}", text.strip_suffix(nl).unwrap()),
            };
            prop_assert_eq!(parse_head(text.as_bytes()).unwrap(), Head::Other);
        }

        #[test]
        fn garbage_never_panics_and_tracker_heads_are_sound(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            if let Ok(Head::Tracker { query, len, .. }) = parse_head(&bytes) {
                prop_assert!(len <= bytes.len());
                prop_assert!(bytes.starts_with(b"GET "));
                prop_assert!(query.len() < len);
                prop_assert_eq!(parse_head(&bytes[..len]), parse_head(&bytes));
            }
        }
    }
}
