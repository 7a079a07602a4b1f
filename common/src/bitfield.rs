//! A set of piece indices in the wire protocol's layout: one bit per piece, high bit first.

use crate::error::Error;

/// Which pieces a peer (or we) have.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Bitfield {
    bytes: Vec<u8>,
    len: u32,
    ones: u32,
}

impl std::fmt::Debug for Bitfield {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bitfield({}/{})", self.ones, self.len)
    }
}

impl Bitfield {
    /// All clear.
    pub fn new(len: u32) -> Self {
        Self {
            bytes: vec![0; len.div_ceil(8) as usize],
            len,
            ones: 0,
        }
    }

    /// All set.
    pub fn full(len: u32) -> Self {
        let mut b = Self::new(len);
        for i in 0..len {
            b.set(i);
        }
        b
    }

    /// From a peer's `bitfield` message: exactly `ceil(len/8)` bytes, spare bits zero.
    pub fn from_wire(bytes: &[u8], len: u32) -> Result<Self, Error> {
        if bytes.len() != len.div_ceil(8) as usize {
            return Err(Error::BadMessage {
                id: 5,
                why: "bitfield length does not match the piece count",
            });
        }
        let spare = (8 - len % 8) % 8;
        if spare > 0 {
            let mask = (1u8 << spare) - 1;
            if bytes.last().is_some_and(|b| b & mask != 0) {
                return Err(Error::BadMessage {
                    id: 5,
                    why: "bitfield has spare bits set",
                });
            }
        }
        let ones = bytes.iter().map(|b| b.count_ones()).sum();
        Ok(Self {
            bytes: bytes.to_vec(),
            len,
            ones,
        })
    }

    /// Number of pieces covered.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// No pieces covered at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Is piece `i` set? False past the end.
    pub fn get(&self, i: u32) -> bool {
        i < self.len && self.bytes[(i / 8) as usize] & (0x80 >> (i % 8)) != 0
    }

    /// Set piece `i`; returns whether it was newly set. Ignored past the end.
    pub fn set(&mut self, i: u32) -> bool {
        if i >= self.len || self.get(i) {
            return false;
        }
        self.bytes[(i / 8) as usize] |= 0x80 >> (i % 8);
        self.ones += 1;
        true
    }

    /// Clear piece `i`; returns whether it was set.
    pub fn clear(&mut self, i: u32) -> bool {
        if !self.get(i) {
            return false;
        }
        self.bytes[(i / 8) as usize] &= !(0x80 >> (i % 8));
        self.ones -= 1;
        true
    }

    /// Pieces set.
    pub fn count(&self) -> u32 {
        self.ones
    }

    /// Every piece set.
    pub fn is_complete(&self) -> bool {
        self.ones == self.len
    }

    /// Wire bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Indices that are set, ascending.
    pub fn ones(&self) -> impl Iterator<Item = u32> + '_ {
        set_bits(self.bytes.iter().copied())
    }

    /// Indices set here and not in `other`, ascending (bits past `other`'s end count as
    /// unset there). A byte at a time: pieces a peer has that we lack, without a call per bit.
    pub fn difference<'a>(&'a self, other: &'a Bitfield) -> impl Iterator<Item = u32> + 'a {
        set_bits(
            self.bytes
                .iter()
                .enumerate()
                .map(|(k, &b)| b & !other.bytes.get(k).copied().unwrap_or(0)),
        )
    }

    /// Indices set both here and in `other`, ascending.
    pub fn intersection<'a>(&'a self, other: &'a Bitfield) -> impl Iterator<Item = u32> + 'a {
        set_bits(
            self.bytes
                .iter()
                .zip(other.bytes.iter().chain(std::iter::repeat(&0)))
                .map(|(&a, &b)| a & b),
        )
    }

    /// Is some index set here and not in `other`?
    pub fn has_any_not_in(&self, other: &Bitfield) -> bool {
        self.bytes
            .iter()
            .enumerate()
            .any(|(k, &b)| b & !other.bytes.get(k).copied().unwrap_or(0) != 0)
    }

    /// Indices that are clear, ascending.
    pub fn zeros(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len).filter(|&i| !self.get(i))
    }
}

/// The indices of the set bits of `bytes` (wire layout: high bit first), ascending. Spare bits
/// are always clear, so no index past the end comes out.
fn set_bits(bytes: impl Iterator<Item = u8>) -> impl Iterator<Item = u32> {
    bytes.enumerate().flat_map(|(k, mut b)| {
        std::iter::from_fn(move || {
            if b == 0 {
                return None;
            }
            let bit = b.leading_zeros();
            b &= !(0x80 >> bit);
            Some(k as u32 * 8 + bit)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn wire_round_trip(len in 1u32..300, set in proptest::collection::vec(any::<u32>(), 0..50)) {
            let mut b = Bitfield::new(len);
            for i in set {
                b.set(i % len);
            }
            let back = Bitfield::from_wire(b.as_bytes(), len).unwrap();
            prop_assert_eq!(back.count(), b.ones().count() as u32);
            prop_assert_eq!(back, b);
        }
    }

    proptest! {
        #[test]
        fn set_operations_agree_with_bit_by_bit(
            len in 1u32..200,
            a in proptest::collection::vec(any::<u32>(), 0..60),
            b in proptest::collection::vec(any::<u32>(), 0..60),
        ) {
            let (mut x, mut y) = (Bitfield::new(len), Bitfield::new(len));
            for i in a { x.set(i % len); }
            for i in b { y.set(i % len); }
            let ones: Vec<u32> = (0..len).filter(|&i| x.get(i)).collect();
            prop_assert_eq!(x.ones().collect::<Vec<_>>(), ones);
            let diff: Vec<u32> = (0..len).filter(|&i| x.get(i) && !y.get(i)).collect();
            prop_assert_eq!(x.difference(&y).collect::<Vec<_>>(), diff.clone());
            prop_assert_eq!(x.has_any_not_in(&y), !diff.is_empty());
            let both: Vec<u32> = (0..len).filter(|&i| x.get(i) && y.get(i)).collect();
            prop_assert_eq!(x.intersection(&y).collect::<Vec<_>>(), both);
        }
    }

    #[test]
    fn rejects_spare_bits_and_wrong_length() {
        assert!(Bitfield::from_wire(&[0xff], 7).is_err());
        assert!(Bitfield::from_wire(&[0xfe], 7).is_ok());
        assert!(Bitfield::from_wire(&[0, 0], 7).is_err());
        assert!(Bitfield::full(9).is_complete());
        let mut b = Bitfield::new(3);
        assert!(!b.set(3));
        assert!(b.set(2) && !b.set(2) && b.clear(2) && !b.clear(2));
    }
}
