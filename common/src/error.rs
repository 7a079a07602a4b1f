//! The one error type of the `common` crate: every rejection of untrusted input is a variant, so
//! callers (the tracker's `failure reason`, the CLI's exit codes, the agent's peer bans) can tell
//! them apart without matching on strings.

use thiserror::Error;

/// Everything `common` can reject.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum Error {
    // --- package references -------------------------------------------------------------
    /// A package or tag name that is not `[a-z0-9][a-z0-9._-]{0,127}`.
    #[error("invalid {what} {value:?}: {why}")]
    InvalidName {
        /// "package name" or "tag".
        what: &'static str,
        /// The offending input (truncated to 200 characters).
        value: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A hash or hash prefix that is not lowercase hex of the right length.
    #[error("invalid hash {value:?}: {why}")]
    InvalidHash {
        /// The offending input (truncated).
        value: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A package reference that is not `name:hash`, `name:prefix`, `name:tag` or a bare hash.
    #[error("invalid package reference {value:?}: {why}")]
    InvalidRef {
        /// The offending input (truncated).
        value: String,
        /// What is wrong with it.
        why: &'static str,
    },

    // --- bencode ----------------------------------------------------------------------------
    /// Input larger than the configured limit.
    #[error("bencode input is {len} bytes, more than the limit of {limit}")]
    TooLarge {
        /// Input size.
        len: usize,
        /// The limit it broke.
        limit: usize,
    },
    /// Lists and dictionaries nested deeper than the limit.
    #[error("bencode nesting deeper than {limit} levels")]
    TooDeep {
        /// The limit it broke.
        limit: usize,
    },
    /// Input that is not well-formed bencode.
    #[error("malformed bencode at byte {offset}: {why}")]
    Malformed {
        /// Byte offset where parsing failed.
        offset: usize,
        /// What was expected.
        why: &'static str,
    },
    /// Well-formed bencode with the wrong shape for what was expected.
    #[error("unexpected bencode structure: {0}")]
    Structure(String),

    // --- metainfo ---------------------------------------------------------------------------
    /// A required metainfo key is missing or has the wrong type.
    #[error("metainfo: {0}")]
    Metainfo(String),
    /// The piece length is not a power of two in the accepted range.
    #[error("metainfo: piece length {0} is not a power of two between 16 KiB and 64 MiB")]
    PieceLength(u64),
    /// The number of piece hashes does not match `length / piece length`.
    #[error(
        "metainfo: {got} piece hashes for a {length}-byte file in {piece_length}-byte pieces (expected {expected})"
    )]
    PieceCount {
        /// Hashes present.
        got: u64,
        /// Hashes required by the length.
        expected: u64,
        /// The declared file length.
        length: u64,
        /// The declared piece length.
        piece_length: u64,
    },
    /// The file name is not a single safe path component.
    #[error("metainfo: unsafe file name {name:?}: {why}")]
    UnsafeName {
        /// The name as found (lossy UTF-8, truncated).
        name: String,
        /// What makes it unsafe.
        why: &'static str,
    },
    /// A directory package's entrypoint that is not a safe relative path inside its tree.
    #[error("unsafe entrypoint {value:?}: {why}")]
    UnsafeEntrypoint {
        /// The path as found (lossy UTF-8, truncated).
        value: String,
        /// What makes it unsafe.
        why: &'static str,
    },
    /// A multi-file torrent that is not an fbpkg tree package.
    #[error(
        "metainfo: a multi-file torrent that is not an fbpkg tree package (x-fbpkg-format tree)"
    )]
    MultiFile,

    // --- tracker protocol -------------------------------------------------------------------
    /// A query parameter that is missing, repeated or malformed.
    #[error("{0}")]
    Query(String),

    // --- peer wire protocol -----------------------------------------------------------------
    /// A handshake that is not the BitTorrent v1 handshake.
    #[error("bad handshake: {0}")]
    Handshake(&'static str),
    /// A peer message longer than the limit.
    #[error("peer message of {len} bytes exceeds the limit of {limit}")]
    MessageTooLong {
        /// Declared length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A peer message whose payload does not fit its id.
    #[error("bad peer message (id {id}): {why}")]
    BadMessage {
        /// Message id.
        id: u8,
        /// What is wrong.
        why: &'static str,
    },
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Shorten untrusted input before it goes into an error message or a log line.
pub(crate) fn clip(s: &str) -> String {
    const MAX: usize = 200;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
