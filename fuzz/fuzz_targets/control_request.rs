//! The agent's control-socket request parser (`parse_request_line`) on arbitrary bytes.
//!
//! Checks: no panic; refusals are always `BadInput` (a message to the client, never a crash
//! or an I/O error); whatever is accepted is valid UTF-8 within the length limit, and writes
//! back (as the CLI would send it) into a line that parses to the same request.
#![no_main]

use fbpkg_peer::PeerError;
use fbpkg_peer::agent::control::{MAX_CONTROL_LINE, parse_request_line};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_request_line(data) {
        Ok(req) => {
            assert!(data.len() <= MAX_CONTROL_LINE);
            assert!(std::str::from_utf8(data).is_ok());
            let mut line = serde_json::to_vec(&req).expect("a request serializes");
            line.push(b'\n');
            assert_eq!(
                parse_request_line(&line).expect("a sent request parses"),
                req
            );
        }
        Err(PeerError::BadInput(_)) => {}
        Err(e) => panic!("refused with {e:?}, not BadInput"),
    }
});
