//! Fixed-size identifiers: a package's SHA-256, a torrent's info-hash, a peer id.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, clip};

macro_rules! byte_id {
    ($(#[$doc:meta])* $name:ident, $len:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            /// Length in bytes.
            pub const LEN: usize = $len;

            /// Lowercase hex, as used in URLs, paths and logs.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }

            /// Parse exactly `2 * LEN` lowercase hex digits.
            pub fn from_hex(s: &str) -> Result<Self, Error> {
                if s.len() != 2 * $len {
                    return Err(Error::InvalidHash {
                        value: clip(s),
                        why: concat!("expected ", stringify!($len), " bytes of lowercase hex"),
                    });
                }
                if !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                    return Err(Error::InvalidHash {
                        value: clip(s),
                        why: "only lowercase hex digits 0-9 a-f are allowed",
                    });
                }
                let mut out = [0u8; $len];
                hex::decode_to_slice(s, &mut out).map_err(|_| Error::InvalidHash {
                    value: clip(s),
                    why: "not hex",
                })?;
                Ok(Self(out))
            }

            /// From a byte slice of exactly `LEN` bytes.
            pub fn from_slice(b: &[u8]) -> Option<Self> {
                <[u8; $len]>::try_from(b).ok().map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                for b in self.0 {
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self)
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                Self::from_hex(s)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::from_hex(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

byte_id!(
    /// SHA-256 of a package archive: the package's identity (`name:<this>`).
    Sha256Hash,
    32
);
byte_id!(
    /// SHA-1 of a metainfo's bencoded info dictionary: the swarm's identity on the wire.
    InfoHash,
    20
);
byte_id!(
    /// A peer's 20-byte id from its handshake and announces.
    PeerId,
    20
);

impl Sha256Hash {
    /// Does this hash start with the given lowercase hex prefix?
    pub fn starts_with_hex(&self, prefix: &str) -> bool {
        let full = self.to_hex();
        full.starts_with(prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_rejections() {
        let h = Sha256Hash([0xab; 32]);
        assert_eq!(Sha256Hash::from_hex(&h.to_hex()), Ok(h));
        assert!(Sha256Hash::from_hex(&"AB".repeat(32)).is_err());
        assert!(Sha256Hash::from_hex("abcd").is_err());
        assert!(InfoHash::from_hex(&"g0".repeat(20)).is_err());
        assert_eq!(
            format!("{:?}", PeerId([0; 20])),
            format!("PeerId({})", "0".repeat(40))
        );
    }
}
