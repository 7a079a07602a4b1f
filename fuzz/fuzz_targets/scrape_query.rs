//! `ScrapeRequest::parse` on arbitrary query strings.
//!
//! Checks: no panic; never more than `MAX_SCRAPE_HASHES` hashes; whatever is accepted writes
//! back into a query that parses to the same request, and that written form is a fixed point.
#![no_main]

use fbpkg_common::tracker_proto::{MAX_SCRAPE_HASHES, ScrapeRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let query = String::from_utf8_lossy(data);
    let Ok(req) = ScrapeRequest::parse(&query) else {
        return;
    };
    assert!(req.info_hashes.len() <= MAX_SCRAPE_HASHES);
    let written = req.to_query();
    let again = ScrapeRequest::parse(&written).expect("a written request parses");
    assert_eq!(again, req, "{written}");
    assert_eq!(again.to_query(), written);
});
