//! Package references: what a user types after `fbpkg-rs get`.
//!
//! ```text
//! myservice:3f2a9c1b…(64 hex)   exact version (SHA-256 of the archive)
//! myservice:3f2a9c1b            hash prefix, at least 8 hex digits; the catalog resolves it
//! myservice:prod                tag: never all-hex, so a tag can never read as a hash
//! 3f2a9c1b                      bare hash or prefix, any package name
//! ```
//!
//! Names and tags are `[a-z0-9][a-z0-9._-]{0,127}`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, clip};
use crate::ids::Sha256Hash;

/// Shortest hash prefix the catalog will resolve.
pub const MIN_PREFIX_LEN: usize = 8;
/// Longest package name or tag.
pub const MAX_NAME_LEN: usize = 128;

fn check_name(what: &'static str, s: &str) -> Result<(), Error> {
    let err = |why| Error::InvalidName {
        what,
        value: clip(s),
        why,
    };
    let bytes = s.as_bytes();
    let Some(&first) = bytes.first() else {
        return Err(err("it is empty"));
    };
    if bytes.len() > MAX_NAME_LEN {
        return Err(err("it is longer than 128 characters"));
    }
    if !matches!(first, b'a'..=b'z' | b'0'..=b'9') {
        return Err(err("it must start with a lowercase letter or a digit"));
    }
    if !bytes
        .iter()
        .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
    {
        return Err(err(
            "only lowercase letters, digits, '.', '_' and '-' are allowed",
        ));
    }
    Ok(())
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal, $extra:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Validate and wrap.
            pub fn new(s: &str) -> Result<Self, Error> {
                check_name($what, s)?;
                let extra: fn(&str) -> Result<(), Error> = $extra;
                extra(s)?;
                Ok(Self(s.to_owned()))
            }
            /// The validated text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0)
            }
        }
        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                Self::new(s)
            }
        }
        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::new(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// A package name: `[a-z0-9][a-z0-9._-]{0,127}`. Safe as a single path component.
    PackageName,
    "package name",
    |_| Ok(())
);
name_type!(
    /// A tag such as `prod` or `v1.2`: a name that is not all hex digits.
    Tag,
    "tag",
    |s| {
        if is_hex(s) {
            Err(Error::InvalidName {
                what: "tag",
                value: clip(s),
                why: "a tag cannot be all hex digits (it would read as a hash)",
            })
        } else {
            Ok(())
        }
    }
);

/// A lowercase hex prefix of a SHA-256, 8 to 64 digits.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize)]
#[serde(transparent)]
pub struct HashPrefix(String);

impl HashPrefix {
    /// Validate a prefix.
    pub fn new(s: &str) -> Result<Self, Error> {
        if !is_hex(s) {
            return Err(Error::InvalidHash {
                value: clip(s),
                why: "a hash must be lowercase hex digits 0-9 a-f",
            });
        }
        if s.len() < MIN_PREFIX_LEN {
            return Err(Error::InvalidHash {
                value: clip(s),
                why: "a hash prefix needs at least 8 hex digits",
            });
        }
        if s.len() > 2 * Sha256Hash::LEN {
            return Err(Error::InvalidHash {
                value: clip(s),
                why: "a SHA-256 has 64 hex digits",
            });
        }
        Ok(Self(s.to_owned()))
    }
    /// The prefix text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// Does `hash` start with this prefix?
    pub fn matches(&self, hash: &Sha256Hash) -> bool {
        hash.starts_with_hex(&self.0)
    }
    /// The full hash when the prefix has all 64 digits.
    pub fn as_full(&self) -> Option<Sha256Hash> {
        Sha256Hash::from_hex(&self.0).ok()
    }
}

impl fmt::Display for HashPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What follows the colon in a reference.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Selector {
    /// All 64 digits: an exact version.
    Hash(Sha256Hash),
    /// 8 to 63 digits: resolved by the catalog when unambiguous.
    Prefix(HashPrefix),
    /// A movable name for a version.
    Tag(Tag),
}

impl Selector {
    /// Parse a hash, a hash prefix or a tag. All-hex text is a hash; anything else is a tag.
    pub fn parse(s: &str) -> Result<Self, Error> {
        if is_hex(s) {
            let p = HashPrefix::new(s)?;
            return Ok(match p.as_full() {
                Some(h) => Selector::Hash(h),
                None => Selector::Prefix(p),
            });
        }
        if s.bytes().all(|b| b.is_ascii_hexdigit()) && !s.is_empty() {
            return Err(Error::InvalidHash {
                value: clip(s),
                why: "hashes are written in lowercase hex",
            });
        }
        Tag::new(s).map(Selector::Tag)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Hash(h) => write!(f, "{h}"),
            Selector::Prefix(p) => write!(f, "{p}"),
            Selector::Tag(t) => write!(f, "{t}"),
        }
    }
}

/// A parsed package reference. `name` is `None` only for a bare hash or prefix.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct PackageRef {
    /// The package name, if given.
    pub name: Option<PackageName>,
    /// The version selector.
    pub selector: Selector,
}

impl PackageRef {
    /// The exact hash, when the reference pins one.
    pub fn exact(&self) -> Option<(&PackageName, &Sha256Hash)> {
        match (&self.name, &self.selector) {
            (Some(n), Selector::Hash(h)) => Some((n, h)),
            _ => None,
        }
    }
}

impl FromStr for PackageRef {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |why| Error::InvalidRef {
            value: clip(s),
            why,
        };
        match s.split_once(':') {
            None => {
                if s.is_empty() {
                    return Err(bad("it is empty; expected name:hash, name:tag or a hash"));
                }
                if !is_hex(s) {
                    return Err(bad(
                        "expected name:hash, name:tag or a bare hash (a bare name needs :hash or :tag)",
                    ));
                }
                let selector = Selector::parse(s)?;
                Ok(PackageRef {
                    name: None,
                    selector,
                })
            }
            Some((name, sel)) => {
                if sel.contains(':') {
                    return Err(bad("more than one ':'"));
                }
                if sel.is_empty() {
                    return Err(bad(
                        "nothing after ':'; expected a hash, a hash prefix or a tag",
                    ));
                }
                Ok(PackageRef {
                    name: Some(PackageName::new(name)?),
                    selector: Selector::parse(sel)?,
                })
            }
        }
    }
}

impl fmt::Display for PackageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(n) => write!(f, "{n}:{}", self.selector),
            None => write!(f, "{}", self.selector),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_each_form() {
        let full = "3f2a9c1b".repeat(8);
        let r: PackageRef = format!("svc:{full}").parse().unwrap();
        assert!(matches!(r.selector, Selector::Hash(_)));
        assert_eq!(r.exact().unwrap().0.as_str(), "svc");

        let r: PackageRef = "svc:3f2a9c1b".parse().unwrap();
        assert_eq!(
            r.selector,
            Selector::Prefix(HashPrefix::new("3f2a9c1b").unwrap())
        );

        let r: PackageRef = "svc:prod".parse().unwrap();
        assert_eq!(r.selector, Selector::Tag(Tag::new("prod").unwrap()));

        let r: PackageRef = "3f2a9c1b00".parse().unwrap();
        assert!(r.name.is_none());
    }

    #[test]
    fn rejections_say_what_is_wrong() {
        let cases = [
            ("", "empty"),
            ("svc", "bare name"),
            ("svc:", "nothing after"),
            ("svc:abc", "at least 8"),
            ("svc:3F2A9C1B", "lowercase"),
            ("Svc:prod", "start with"),
            ("svc:pr/od", "only lowercase"),
            ("svc:a:b", "more than one"),
            (":prod", "empty"),
        ];
        for (input, needle) in cases {
            let err = input.parse::<PackageRef>().unwrap_err().to_string();
            assert!(err.contains(needle), "{input:?}: {err}");
        }
        assert!(Tag::new("deadbeef").is_err());
        assert!(Tag::new("deadbeefz").is_ok());
        assert!(PackageName::new(&"a".repeat(129)).is_err());
        assert!(PackageName::new(&"a".repeat(128)).is_ok());
        assert!(HashPrefix::new(&"a".repeat(65)).is_err());
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(name in "[a-z0-9][a-z0-9._-]{0,30}", tag in "[g-z][a-z0-9._-]{0,20}", hex in "[0-9a-f]{8,64}") {
            for s in [format!("{name}:{tag}"), format!("{name}:{hex}"), hex.clone()] {
                let r: PackageRef = s.parse().unwrap();
                prop_assert_eq!(r.to_string(), s);
            }
        }

        #[test]
        fn never_panics(s in "\\PC{0,300}") {
            let _ = s.parse::<PackageRef>();
        }
    }
}
