//! The bounded bencode checker and decoder on arbitrary bytes.
//!
//! Checks: no panic; `decode` accepts only what `check` accepts (and refuses beyond that only
//! duplicate keys); every dictionary value's raw span (what info-hashes are computed over)
//! decodes on its own to that same value; the canonical re-encoding of whatever decodes has
//! the same length (only key order may differ) and decodes again to the same value; and every
//! integer the writer writes decodes back.
#![no_main]

use fbpkg_common::Error;
use fbpkg_common::bencode::{self, Limits, Value, Writer};
use libfuzzer_sys::fuzz_target;

const L: Limits = Limits {
    max_len: 1 << 20,
    max_depth: 16,
};

fn encode(v: &Value<'_>, w: &mut Writer) {
    match v {
        Value::Int(i) => {
            w.int(*i);
        }
        Value::Bytes(b) => {
            w.bytes(b);
        }
        Value::List(items) => {
            w.list();
            items.iter().for_each(|i| encode(i, w));
            w.end();
        }
        Value::Dict(m) => {
            w.dict();
            for (k, (v, _)) in m {
                w.bytes(k);
                encode(v, w);
            }
            w.end();
        }
    }
}

fn canonical(v: &Value<'_>) -> Vec<u8> {
    let mut w = Writer::new();
    encode(v, &mut w);
    w.finish()
}

/// Every dictionary value's span in `input` is that value, standing alone.
fn check_spans(input: &[u8], v: &Value<'_>) {
    match v {
        Value::List(items) => items.iter().for_each(|i| check_spans(input, i)),
        Value::Dict(m) => {
            for (v, span) in m.values() {
                let raw = &input[span.clone()];
                let alone = bencode::decode(raw, &L).expect("a value's span decodes alone");
                assert_eq!(canonical(&alone), canonical(v), "span {span:?}");
                check_spans(input, v);
            }
        }
        Value::Int(_) | Value::Bytes(_) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let checked = bencode::check(data, &L);
    match bencode::decode(data, &L) {
        Ok(v) => {
            assert_eq!(checked, Ok(()));
            check_spans(data, &v);
            let canon = canonical(&v);
            let again = bencode::decode(&canon, &L).expect("the canonical encoding decodes");
            assert_eq!(canonical(&again), canon);
            // Numbers have one accepted spelling, so re-encoding can only reorder keys.
            assert_eq!(canon.len(), data.len());
        }
        Err(Error::Malformed {
            why: "duplicate dictionary key",
            ..
        }) => assert_eq!(checked, Ok(())),
        Err(e) => assert_eq!(checked, Err(e)),
    }

    // The writer's integers, whatever their value, are the decoder's integers.
    if let Some(head) = data.get(..8) {
        let i = i64::from_le_bytes(head.try_into().expect("8 bytes"));
        let mut w = Writer::new();
        w.int(i);
        assert_eq!(bencode::decode(&w.buf, &L), Ok(Value::Int(i)), "{i}");
    }
});
