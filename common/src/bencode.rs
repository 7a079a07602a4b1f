//! Bounded bencode: a decoder for untrusted input and a writer for our own output.
//!
//! Every byte that reaches this module may come from a hostile peer or tracker, so decoding is
//! done in two steps: [`check`] walks the input iteratively (no recursion, so no stack overflow
//! whatever the nesting) and enforces [`Limits`]; only then does [`decode`] build a borrowed
//! [`Value`] tree, recursing at most `max_depth` levels. [`Value`] keeps the raw byte span of
//! every value, because an info-hash must be computed over the info dictionary exactly as it
//! appears in the file, never over a re-encoding.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::error::Error;

/// Bounds applied before any structure is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted input in bytes.
    pub max_len: usize,
    /// Deepest accepted nesting of lists and dictionaries.
    pub max_depth: usize,
}

impl Limits {
    /// Metainfo files: 8 MiB holds ~400k piece hashes, far beyond any package we make.
    pub const METAINFO: Limits = Limits {
        max_len: 8 << 20,
        max_depth: 16,
    };
    /// Tracker responses: a few thousand peers at most.
    pub const TRACKER_RESPONSE: Limits = Limits {
        max_len: 1 << 20,
        max_depth: 8,
    };
}

/// A decoded dictionary: key -> (value, raw byte span of the value in the input).
pub type Dict<'a> = BTreeMap<&'a [u8], (Value<'a>, Range<usize>)>;

/// A decoded bencode value borrowing from the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value<'a> {
    /// `i…e`
    Int(i64),
    /// `len:bytes`
    Bytes(&'a [u8]),
    /// `l…e`
    List(Vec<Value<'a>>),
    /// `d…e`; the raw span of each value is kept for hashing.
    Dict(Dict<'a>),
}

impl<'a> Value<'a> {
    /// The dictionary, or a structure error naming `what`.
    pub fn as_dict(&self, what: &str) -> Result<&Dict<'a>, Error> {
        match self {
            Value::Dict(d) => Ok(d),
            _ => Err(Error::Structure(format!("{what} is not a dictionary"))),
        }
    }
    /// The byte string, if this is one.
    pub fn as_bytes(&self) -> Option<&'a [u8]> {
        match self {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }
    /// The integer, if this is one.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
}

/// Look up `key` in a decoded dictionary.
pub fn get<'v, 'a>(dict: &'v Dict<'a>, key: &str) -> Option<&'v Value<'a>> {
    dict.get(key.as_bytes()).map(|(v, _)| v)
}

fn malformed(offset: usize, why: &'static str) -> Error {
    Error::Malformed { offset, why }
}

/// Parse the decimal digits of a string length or integer at `pos`, ending at `term`.
/// Returns (value, position after the terminator).
fn parse_decimal(
    input: &[u8],
    mut pos: usize,
    term: u8,
    signed: bool,
) -> Result<(i64, usize), Error> {
    let start = pos;
    let neg = signed && input.get(pos) == Some(&b'-');
    if neg {
        pos += 1;
    }
    let digits_start = pos;
    let mut value: i64 = 0;
    while let Some(&b) = input.get(pos) {
        if b == term {
            break;
        }
        if !b.is_ascii_digit() {
            return Err(malformed(pos, "expected a decimal digit"));
        }
        // Accumulate towards the sign: i64::MIN has no positive counterpart to negate.
        let digit = i64::from(b - b'0');
        value = value
            .checked_mul(10)
            .and_then(|v| {
                if neg {
                    v.checked_sub(digit)
                } else {
                    v.checked_add(digit)
                }
            })
            .ok_or_else(|| malformed(start, "integer out of range"))?;
        pos += 1;
    }
    if pos >= input.len() {
        return Err(malformed(pos, "unexpected end of input"));
    }
    let digits = &input[digits_start..pos];
    if digits.is_empty() {
        return Err(malformed(start, "empty number"));
    }
    if digits.len() > 1 && digits[0] == b'0' {
        return Err(malformed(start, "leading zero"));
    }
    if neg && value == 0 {
        return Err(malformed(start, "negative zero"));
    }
    Ok((value, pos + 1))
}

/// Skip the string starting at `pos`; returns (content range, position after).
fn scan_string(input: &[u8], pos: usize) -> Result<(Range<usize>, usize), Error> {
    let (len, after) = parse_decimal(input, pos, b':', false)?;
    let len = usize::try_from(len).map_err(|_| malformed(pos, "string length out of range"))?;
    let end = after
        .checked_add(len)
        .filter(|&e| e <= input.len())
        .ok_or_else(|| malformed(pos, "string runs past the end of input"))?;
    Ok((after..end, end))
}

/// Validate that `input` is exactly one well-formed bencode value within `limits`.
///
/// Iterative: an explicit stack of open containers, so hostile nesting costs heap, bounded by
/// `max_depth`, never call stack.
pub fn check(input: &[u8], limits: &Limits) -> Result<(), Error> {
    if input.len() > limits.max_len {
        return Err(Error::TooLarge {
            len: input.len(),
            limit: limits.max_len,
        });
    }
    // Open containers: (is a dictionary, the next item is a key).
    let mut stack: Vec<(bool, bool)> = Vec::new();
    let mut pos = 0;
    loop {
        let Some(&b) = input.get(pos) else {
            return Err(malformed(pos, "unexpected end of input"));
        };
        let expecting_key = matches!(stack.last(), Some((true, true)));
        match b {
            b'e' => match stack.pop() {
                None => return Err(malformed(pos, "'e' with nothing to close")),
                Some((true, false)) => {
                    return Err(malformed(pos, "dictionary key without a value"));
                }
                Some(_) => pos += 1,
            },
            _ if expecting_key => {
                if !b.is_ascii_digit() {
                    return Err(malformed(pos, "dictionary key is not a string"));
                }
                pos = scan_string(input, pos)?.1;
                if let Some(top) = stack.last_mut() {
                    top.1 = false;
                }
                continue;
            }
            b'i' => pos = parse_decimal(input, pos + 1, b'e', true)?.1,
            b'0'..=b'9' => pos = scan_string(input, pos)?.1,
            b'l' | b'd' => {
                if stack.len() >= limits.max_depth {
                    return Err(Error::TooDeep {
                        limit: limits.max_depth,
                    });
                }
                stack.push((b == b'd', true));
                pos += 1;
                continue;
            }
            _ => return Err(malformed(pos, "expected 'i', 'l', 'd' or a digit")),
        }
        // A whole value was consumed: a scalar, or a container just closed.
        match stack.last_mut() {
            None => break,
            Some(top) => top.1 = true,
        }
    }
    if pos != input.len() {
        return Err(malformed(pos, "trailing bytes after the value"));
    }
    Ok(())
}

/// Decode one value; `input` must already have passed [`check`].
fn decode_at<'a>(input: &'a [u8], pos: usize) -> Result<(Value<'a>, usize), Error> {
    match input.get(pos) {
        Some(b'i') => {
            let (v, after) = parse_decimal(input, pos + 1, b'e', true)?;
            Ok((Value::Int(v), after))
        }
        Some(b'0'..=b'9') => {
            let (range, after) = scan_string(input, pos)?;
            Ok((Value::Bytes(&input[range]), after))
        }
        Some(b'l') => {
            let mut items = Vec::new();
            let mut p = pos + 1;
            while input.get(p) != Some(&b'e') {
                let (v, after) = decode_at(input, p)?;
                items.push(v);
                p = after;
            }
            Ok((Value::List(items), p + 1))
        }
        Some(b'd') => {
            let mut map = BTreeMap::new();
            let mut p = pos + 1;
            while input.get(p) != Some(&b'e') {
                let (krange, after_key) = scan_string(input, p)?;
                let (v, after_val) = decode_at(input, after_key)?;
                if map
                    .insert(&input[krange], (v, after_key..after_val))
                    .is_some()
                {
                    return Err(malformed(p, "duplicate dictionary key"));
                }
                p = after_val;
            }
            Ok((Value::Dict(map), p + 1))
        }
        _ => Err(malformed(pos, "expected a value")),
    }
}

/// Check `input` against `limits`, then decode it.
pub fn decode<'a>(input: &'a [u8], limits: &Limits) -> Result<Value<'a>, Error> {
    check(input, limits)?;
    decode_at(input, 0).map(|(v, _)| v)
}

/// Appends bencode to a buffer. The caller writes dictionary keys in sorted order.
#[derive(Debug, Default)]
pub struct Writer {
    /// The encoded bytes so far.
    pub buf: Vec<u8>,
}

impl Writer {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }
    /// A writer with room for `n` bytes.
    pub fn with_capacity(n: usize) -> Self {
        Self {
            buf: Vec::with_capacity(n),
        }
    }
    /// `len:bytes`
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        push_decimal(&mut self.buf, b.len() as u64);
        self.buf.push(b':');
        self.buf.extend_from_slice(b);
        self
    }
    /// `len:` — the caller appends exactly `len` bytes next.
    pub fn string_header(&mut self, len: usize) -> &mut Self {
        push_decimal(&mut self.buf, len as u64);
        self.buf.push(b':');
        self
    }
    /// `i…e`
    pub fn int(&mut self, v: i64) -> &mut Self {
        self.buf.push(b'i');
        if v < 0 {
            self.buf.push(b'-');
        }
        push_decimal(&mut self.buf, v.unsigned_abs());
        self.buf.push(b'e');
        self
    }
    /// A key followed by an integer value.
    pub fn key_int(&mut self, k: &str, v: i64) -> &mut Self {
        self.bytes(k.as_bytes()).int(v)
    }
    /// A key followed by a byte-string value.
    pub fn key_bytes(&mut self, k: &str, v: &[u8]) -> &mut Self {
        self.bytes(k.as_bytes()).bytes(v)
    }
    /// Open a dictionary.
    pub fn dict(&mut self) -> &mut Self {
        self.buf.push(b'd');
        self
    }
    /// Open a list.
    pub fn list(&mut self) -> &mut Self {
        self.buf.push(b'l');
        self
    }
    /// Close the innermost dictionary or list.
    pub fn end(&mut self) -> &mut Self {
        self.buf.push(b'e');
        self
    }
    /// Append already-encoded bencode verbatim.
    pub fn raw(&mut self, encoded: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(encoded);
        self
    }
    /// The encoded bytes.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Append `v` in decimal without allocating.
fn push_decimal(out: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const L: Limits = Limits {
        max_len: 1 << 20,
        max_depth: 8,
    };

    #[test]
    fn accepts_well_formed() {
        for ok in [
            &b"i0e"[..],
            b"i-12e",
            b"0:",
            b"4:spam",
            b"le",
            b"de",
            b"d3:cow3:moo4:spaml1:a1:bee",
            b"lli1eee",
        ] {
            check(ok, &L).unwrap_or_else(|e| panic!("{:?}: {e}", String::from_utf8_lossy(ok)));
        }
    }

    #[test]
    fn rejects_malformed_with_reason() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "end of input"),
            (b"i-0e", "negative zero"),
            (b"i03e", "leading zero"),
            (b"ie", "empty number"),
            (b"i99999999999999999999e", "out of range"),
            (b"5:ab", "past the end"),
            (b"l", "end of input"),
            (b"e", "nothing to close"),
            (b"di1ei2ee", "key is not a string"),
            (b"d1:ai1ee1:x", "trailing"),
            (b"x", "expected"),
            (b"d1:ai1e1:ai2ee", "duplicate"),
        ];
        for (input, needle) in cases {
            let err = decode(input, &L).unwrap_err().to_string();
            assert!(
                err.contains(needle),
                "{:?}: {err}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn every_i64_the_writer_writes_decodes() {
        // Found by fuzz/ `bencode`: i64::MIN was written but refused as out of range.
        for i in [i64::MIN, i64::MIN + 1, -1, 0, 1, i64::MAX] {
            let mut w = Writer::new();
            w.int(i);
            assert_eq!(decode(&w.buf, &L), Ok(Value::Int(i)), "{i}");
        }
        for past in [&b"i-9223372036854775809e"[..], b"i9223372036854775808e"] {
            let err = decode(past, &L).unwrap_err().to_string();
            assert!(err.contains("out of range"), "{err}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_without_recursion() {
        let deep = [vec![b'l'; 1_000_000], vec![b'e'; 1_000_000]].concat();
        let big = Limits {
            max_len: 4 << 20,
            max_depth: 8,
        };
        assert_eq!(check(&deep, &big), Err(Error::TooDeep { limit: 8 }));
        assert!(matches!(check(&deep, &L), Err(Error::TooLarge { .. })));
    }

    #[test]
    fn dict_keeps_raw_spans() {
        let input = b"d4:infod1:xi1ee1:zi2ee";
        let v = decode(input, &L).unwrap();
        let (_, span) = &v.as_dict("top").unwrap()[&b"info"[..]];
        assert_eq!(&input[span.clone()], b"d1:xi1ee");
    }

    fn arb_value() -> impl Strategy<Value = Vec<u8>> {
        let leaf = prop_oneof![
            any::<i64>().prop_map(|i| Writer::new().int(i).buf.clone()),
            proptest::collection::vec(any::<u8>(), 0..20)
                .prop_map(|b| Writer::new().bytes(&b).buf.clone()),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(|items| {
                    let mut w = Writer::new();
                    w.list();
                    for i in items {
                        w.raw(&i);
                    }
                    w.end();
                    w.buf
                }),
                proptest::collection::btree_map(
                    proptest::collection::vec(any::<u8>(), 0..8),
                    inner,
                    0..6
                )
                .prop_map(|m| {
                    let mut w = Writer::new();
                    w.dict();
                    for (k, v) in m {
                        w.bytes(&k).raw(&v);
                    }
                    w.end();
                    w.buf
                }),
            ]
        })
    }

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

    proptest! {
        #[test]
        fn decode_encode_round_trip(bytes in arb_value()) {
            let v = decode(&bytes, &L).unwrap();
            let mut w = Writer::new();
            encode(&v, &mut w);
            prop_assert_eq!(w.buf, bytes);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes, &L);
        }
    }
}
