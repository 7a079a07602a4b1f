//! `AnnounceRequest::parse` on arbitrary query strings (the tracker's hottest input).
//!
//! Checks: no panic; whatever is accepted writes back (`to_query`) into a query that parses to
//! the same request, and that written form is a fixed point.
#![no_main]

use fbpkg_common::tracker_proto::AnnounceRequest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The tracker hands the parser the raw query as `&str`; lossy conversion keeps every
    // input useful instead of discarding the non-UTF-8 ones.
    let query = String::from_utf8_lossy(data);
    let Ok(req) = AnnounceRequest::parse(&query) else {
        return;
    };
    assert_ne!(req.port, 0);
    if let Some(key) = &req.key {
        assert!(key.len() <= 64);
    }
    let written = req.to_query();
    let again = AnnounceRequest::parse(&written).expect("a written request parses");
    assert_eq!(again, req, "{written}");
    assert_eq!(again.to_query(), written);
});
