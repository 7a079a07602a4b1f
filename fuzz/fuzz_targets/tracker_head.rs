//! The tracker front's request-head parser (`parse_head`) on arbitrary bytes, followed, as on
//! the real fast path, by the announce or scrape query parser.
//!
//! Checks, whenever a head is to be served by the front: it is a `GET` whose length lies within
//! the input and ends the head; it parses the same from its own bytes, whatever follows; no
//! shorter prefix of it is anything but "partial" (the front parses again after every read, so
//! a prefix must never be served, handed to the router or refused); the query is the target's.
#![no_main]

use fbpkg_common::tracker_proto::{AnnounceRequest, ScrapeRequest};
use fbpkg_tracker::fuzzing::{Head, Route, parse_head};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let head = parse_head(data);
    let Ok(Head::Tracker {
        route,
        ref query,
        len,
        ..
    }) = head
    else {
        return;
    };
    assert!(len <= data.len(), "{len} > {}", data.len());
    let own = &data[..len];
    assert!(own.ends_with(b"\n"), "a head ends with an empty line");
    assert_eq!(parse_head(own), head);
    // httparse skips empty lines before the request line (RFC 9112 2.2).
    let start = own
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .expect("a head has a request line");
    let line = &own[start..];
    assert!(line.starts_with(b"GET "));

    // Every prefix when the head is short, a spread of them otherwise.
    let ends: Vec<usize> = if len <= 512 {
        (0..len).collect()
    } else {
        (0..len).step_by(len / 64).chain(len - 8..len).collect()
    };
    for end in ends {
        assert_eq!(
            parse_head(&data[..end]),
            Ok(Head::Partial),
            "prefix of {end}"
        );
    }

    let target = &line[4..];
    let target = &target[..target
        .iter()
        .position(|&b| b == b' ')
        .unwrap_or(target.len())];
    let target = std::str::from_utf8(target).expect("httparse checked the target");
    match route {
        Route::Announce => {
            assert!(target == "/announce" || target.starts_with("/announce?"));
            let _ = AnnounceRequest::parse(query);
        }
        Route::Scrape => {
            assert!(target == "/scrape" || target.starts_with("/scrape?"));
            let _ = ScrapeRequest::parse(query);
        }
        other => panic!("the front serves only announce and scrape, not {other:?}"),
    }
    let in_target = target.split_once('?').map_or("", |(_, q)| q);
    assert_eq!(query, in_target);
});
