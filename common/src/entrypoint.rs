//! A directory package's entrypoint: the program `fbpkg-rs run` starts, as a path inside the
//! package's tree (`bin/tool`).
//!
//! It is recorded in the metainfo's info dictionary (`x-fbpkg-entrypoint`), so it is covered by
//! the info-hash: every host runs the same program for the same version, and a host knows it
//! with no network at all. It comes from the publisher, so like every other key it is checked
//! when parsed: a path that could name something outside the tree is refused here, before any
//! file system is asked. Whether the path exists and is executable is a property of a tree,
//! checked by the peer (at publish, and again at run after following links).

use std::fmt;

use crate::error::{Error, clip};

/// Longest entrypoint, in bytes: deep enough for any real layout, short enough to log.
pub const MAX_ENTRYPOINT_LEN: usize = 1024;
/// Longest component (Linux's `NAME_MAX`).
pub const MAX_COMPONENT_LEN: usize = 255;

/// A relative path inside a package tree: `/`-separated UTF-8 components, none empty, `.` or
/// `..`, no NUL or control characters, at most [`MAX_ENTRYPOINT_LEN`] bytes.
///
/// Only `..` as a whole component is refused (`tool..v2` is a fine file name): that is what
/// path lookup treats as the parent. `.` and empty components are refused so that a version
/// has one spelling of its entrypoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Entrypoint(String);

impl Entrypoint {
    /// Check `path` (bytes, as found in metainfo or given on a command line).
    pub fn from_bytes(path: &[u8]) -> Result<Self, Error> {
        let shown = String::from_utf8_lossy(path);
        let bad = |why| {
            Err(Error::UnsafeEntrypoint {
                value: clip(&shown),
                why,
            })
        };
        if path.is_empty() {
            return bad("it is empty");
        }
        if path.len() > MAX_ENTRYPOINT_LEN {
            return bad("it is longer than 1024 bytes");
        }
        let Ok(text) = std::str::from_utf8(path) else {
            return bad("it is not UTF-8");
        };
        if path.contains(&0) {
            return bad("it contains NUL");
        }
        if path.iter().any(|&b| b < 0x20 || b == 0x7f) {
            return bad("it contains a control character");
        }
        if path.starts_with(b"/") {
            return bad("it is absolute; give a path relative to the package's top directory");
        }
        for component in text.split('/') {
            match component {
                "" => return bad("it has an empty component (a doubled or trailing '/')"),
                "." => return bad("it has a '.' component"),
                ".." => return bad("it has a '..' component"),
                c if c.len() > MAX_COMPONENT_LEN => {
                    return bad("it has a component longer than 255 bytes");
                }
                _ => {}
            }
        }
        Ok(Self(text.to_owned()))
    }

    /// Check `path`.
    pub fn new(path: &str) -> Result<Self, Error> {
        Self::from_bytes(path.as_bytes())
    }

    /// The path, relative to the package's top directory.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Entrypoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Entrypoint {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Self::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_relative_paths_inside_the_tree() {
        for ok in [
            "tool",
            "bin/tool",
            "a/b/c/run.sh",
            "tool..v2",
            ".hidden/x",
            "x.",
            "ü/tool",
        ] {
            assert_eq!(Entrypoint::new(ok).expect(ok).as_str(), ok);
        }
        let longest = format!("{}/{}", vec!["a".repeat(200); 5].join("/"), "b".repeat(19));
        assert_eq!(longest.len(), MAX_ENTRYPOINT_LEN);
        assert!(Entrypoint::new(&longest).is_ok());
        assert!(Entrypoint::new(&format!("{longest}b")).is_err());
    }

    #[test]
    fn refuses_paths_that_leave_the_tree_or_are_malformed() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"".to_vec(), "empty"),
            (b"/bin/sh".to_vec(), "absolute"),
            (b"../bin/sh".to_vec(), "'..'"),
            (b"bin/../../x".to_vec(), "'..'"),
            (b"bin/..".to_vec(), "'..'"),
            (b"./bin/tool".to_vec(), "'.'"),
            (b"bin//tool".to_vec(), "empty component"),
            (b"bin/".to_vec(), "empty component"),
            (b"bin/to\0ol".to_vec(), "NUL"),
            (b"bin/\ntool".to_vec(), "control"),
            (b"bin/\xfftool".to_vec(), "UTF-8"),
            ("a".repeat(256).into_bytes(), "longer than 255"),
            ("a/".repeat(600).into_bytes(), "longer than 1024"),
        ];
        for (input, needle) in cases {
            let err = Entrypoint::from_bytes(&input)
                .expect_err("refused")
                .to_string();
            assert!(err.contains(needle), "{input:?}: {err}");
            assert!(err.contains("entrypoint"), "{err}");
        }
    }

    proptest! {
        #[test]
        fn never_panics_and_what_it_accepts_stays_inside(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(e) = Entrypoint::from_bytes(&bytes) {
                prop_assert!(!e.as_str().starts_with('/'));
                prop_assert!(e.as_str().split('/').all(|c| !c.is_empty() && c != "." && c != ".."));
                prop_assert_eq!(Entrypoint::new(e.as_str()).expect("round trip"), e);
            }
        }
    }
}
