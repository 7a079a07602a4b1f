//! The peer wire codec on an arbitrary byte stream: `Message::decode` until it wants more
//! bytes or refuses, and `Handshake::decode`.
//!
//! Checks: no panic and no endless loop (each message consumes at least its 4-byte length);
//! "need more bytes" consumes nothing; each decoded message re-encodes to exactly the frame it
//! came from (an unknown id: to that id without its payload); the same stream delivered in
//! chunks of arbitrary sizes gives the same messages and the same refusal; a handshake is
//! accepted exactly when the bytes are one, and its prefixes only ever ask for more.
#![no_main]

use bytes::{BufMut, BytesMut};
use fbpkg_common::wire::{Handshake, Message, PROTOCOL};
use libfuzzer_sys::fuzz_target;

/// Decode everything `buf` holds; true when decoding stopped on an error.
fn drain(buf: &mut BytesMut, max: usize, out: &mut Vec<Message>) -> bool {
    loop {
        // Copy the frame at the front only once it is complete, and never the whole buffer:
        // a stream of keep-alives, or a large frame arriving in small chunks, would otherwise
        // make the harness (not the codec) quadratic in the input.
        let frame_len = match buf.get(..4) {
            Some(l) => 4 + u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize,
            None => buf.len(),
        };
        let before_len = buf.len();
        let copy = if before_len >= frame_len {
            frame_len
        } else {
            before_len.min(4)
        };
        let before = buf[..copy].to_vec();
        match Message::decode(buf, max) {
            Ok(Some(m)) => {
                let used = before_len - buf.len();
                assert!(used >= 4, "a message consumed {used} bytes");
                assert_eq!(used, frame_len, "a message consumed more than its frame");
                let frame = &before[..];
                let mut again = BytesMut::new();
                m.encode(&mut again);
                match m {
                    Message::Unknown { id } => {
                        assert_eq!(frame[4], id);
                        assert_eq!(&again[..], &[0, 0, 0, 1, id]);
                    }
                    _ => assert_eq!(&again[..], frame, "{m:?}"),
                }
                assert_eq!(Message::decode(&mut again, max), Ok(Some(m.clone())));
                assert!(again.is_empty());
                out.push(m);
            }
            Ok(None) => {
                assert_eq!(buf.len(), before_len, "waiting for more consumed bytes");
                assert_eq!(&buf[..before.len()], &before[..]);
                return false;
            }
            Err(_) => return true,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // First byte: the receive limit, small or the default, so both sides of it are reached.
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let max = match sel % 4 {
        0 => fbpkg_common::wire::DEFAULT_MAX_MESSAGE,
        1 => 0,
        _ => usize::from(sel),
    };

    // Second byte seeds the chunk sizes of the fragmented delivery.
    let Some((&chunk_seed, stream)) = rest.split_first() else {
        return;
    };

    let mut whole = BytesMut::from(stream);
    let mut at_once = Vec::new();
    let failed = drain(&mut whole, max, &mut at_once);

    let mut buf = BytesMut::new();
    let mut in_chunks = Vec::new();
    let mut chunk_failed = false;
    let mut state = u32::from(chunk_seed) | 1;
    let mut left = stream;
    while !left.is_empty() && !chunk_failed {
        // xorshift: chunk sizes 1..=32, mostly small.
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let n = (state % 32 + 1) as usize;
        let (chunk, tail) = left.split_at(n.min(left.len()));
        left = tail;
        buf.put_slice(chunk);
        chunk_failed = drain(&mut buf, max, &mut in_chunks);
    }
    assert_eq!(in_chunks, at_once);
    assert_eq!(chunk_failed, failed);

    // The handshake, on the same bytes.
    let mut hs = BytesMut::from(stream);
    let seen = stream.len().min(20);
    let is_prefix = stream.first().is_none_or(|&b| b == 19)
        && (seen <= 1 || stream[1..seen] == PROTOCOL[..seen - 1]);
    match Handshake::decode(&mut hs) {
        Ok(Some(h)) => {
            assert!(is_prefix);
            assert_eq!(hs.len(), stream.len() - Handshake::LEN);
            let mut again = BytesMut::new();
            h.encode(&mut again);
            assert_eq!(&again[..], &stream[..Handshake::LEN]);
            assert_eq!(&again[20..28], &h.reserved);
        }
        Ok(None) => {
            assert!(is_prefix);
            assert!(stream.len() < Handshake::LEN);
            assert_eq!(&hs[..], stream, "waiting for more consumed bytes");
        }
        Err(_) => assert!(!is_prefix),
    }
});
