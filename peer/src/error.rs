//! The peer crate's one error type. Each variant maps to what a user can do about it; its
//! [`ErrorKind`] travels over the control socket and picks the CLI's exit code, in one place
//! ([`ErrorKind::exit_code`]), so no caller ever matches on message text.

use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// What went wrong, as a type: the part of an error that decides what happens next (an exit
/// code, a retry, a ban). Serialized in snake case on the control socket and in `--json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Input that cannot be parsed (a reference, a flag, a request).
    BadInput,
    /// The package, version or tag does not exist.
    NotFound,
    /// A hash prefix that matches several versions.
    Ambiguous,
    /// Bytes that do not match the hash asked for.
    Verification,
    /// A hostile or broken archive.
    UnsafeArchive,
    /// No peer could serve the package in time.
    NoPeers,
    /// The tracker cannot be reached, or answers like no fbpkg-rs tracker would.
    TrackerUnreachable,
    /// The tracker refused the request (a `failure reason`, a 4xx without a better kind).
    TrackerRefused,
    /// The tracker wants a (different) publish token.
    Unauthorized,
    /// The local agent cannot be reached or failed.
    Agent,
    /// A peer broke the wire protocol.
    Protocol,
    /// No room: the package does not fit the cache budget even after eviction, or the disk
    /// is full (ENOSPC, EDQUOT).
    NoSpace,
    /// A local file-system or socket operation failed.
    Io,
    /// Shutting down.
    Cancelled,
    /// The package cannot be run: no entrypoint, not executable, or exec refused it.
    NotRunnable,
    /// exec found nothing to run: the program, or the interpreter its `#!` line names.
    ProgramMissing,
    /// A kind this version does not know (from a newer agent).
    #[serde(other)]
    Other,
}

impl ErrorKind {
    /// The stable name used in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::BadInput => "bad_input",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Ambiguous => "ambiguous",
            ErrorKind::Verification => "verification",
            ErrorKind::UnsafeArchive => "unsafe_archive",
            ErrorKind::NoPeers => "no_peers",
            ErrorKind::TrackerUnreachable => "tracker_unreachable",
            ErrorKind::TrackerRefused => "tracker_refused",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Agent => "agent",
            ErrorKind::Protocol => "protocol",
            ErrorKind::NoSpace => "no_space",
            ErrorKind::Io => "io",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::NotRunnable => "not_runnable",
            ErrorKind::ProgramMissing => "program_missing",
            ErrorKind::Other => "other",
        }
    }

    /// The CLI's exit code for this kind (documented in `fbpkg-rs get --help` and the README).
    pub fn exit_code(self) -> u8 {
        use crate::cli::exit;
        match self {
            ErrorKind::BadInput | ErrorKind::Ambiguous => exit::BAD_REFERENCE,
            ErrorKind::NotFound => exit::NOT_FOUND,
            ErrorKind::Verification | ErrorKind::UnsafeArchive => exit::VERIFICATION,
            ErrorKind::NoPeers => exit::NO_PEERS,
            ErrorKind::TrackerUnreachable => exit::TRACKER,
            ErrorKind::Unauthorized => exit::UNAUTHORIZED,
            ErrorKind::NoSpace => exit::NO_SPACE,
            ErrorKind::NotRunnable => exit::NOT_RUNNABLE,
            ErrorKind::ProgramMissing => exit::PROGRAM_MISSING,
            ErrorKind::TrackerRefused
            | ErrorKind::Agent
            | ErrorKind::Protocol
            | ErrorKind::Io
            | ErrorKind::Cancelled
            | ErrorKind::Other => exit::ERROR,
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything the agent, the cache and the engine can fail with.
#[derive(Debug, Error)]
pub enum PeerError {
    /// A package reference or other user input that cannot be parsed.
    #[error("{0}")]
    BadInput(String),
    /// The package, version or tag does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A hash prefix that matches several versions.
    #[error("{0}")]
    Ambiguous(String),
    /// Downloaded bytes that do not match the hash that was asked for.
    #[error("verification failed: {0}")]
    Verification(String),
    /// No peer could serve the package within the timeout.
    #[error("no peers: {0}")]
    NoPeers(String),
    /// The tracker could not be reached (after retries), answered 5xx, or answered like no
    /// fbpkg-rs tracker would (an HTML page, an unreadable body).
    #[error("tracker: {0}")]
    Tracker(String),
    /// The tracker answered and refused: an announce `failure reason`, or a 4xx.
    #[error("tracker refused: {0}")]
    TrackerRefused(String),
    /// The tracker does not list this info-hash (yet): a version seeded a moment before
    /// `publish` listed it, or a package that was never published there.
    #[error("tracker: {0}")]
    Unregistered(String),
    /// The tracker wants a publish token, or a different one.
    #[error("not authorized: {0}")]
    Unauthorized(String),
    /// The local agent could not be reached or refused.
    #[error("agent: {0}")]
    Agent(String),
    /// A hostile or broken archive entry (absolute path, `..`, escaping link, device, …).
    #[error("unsafe archive: {0}")]
    UnsafeArchive(String),
    /// A protocol violation by a peer.
    #[error("peer protocol: {0}")]
    Protocol(#[from] fbpkg_common::Error),
    /// A package does not fit the cache budget even after eviction.
    #[error("no space: {0}")]
    NoSpace(String),
    /// A file-system operation failed (a full disk is [`ErrorKind::NoSpace`]).
    #[error("{context} ({path}): {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The operation was cancelled (shutdown).
    #[error("cancelled")]
    Cancelled,
    /// `run`: the package cannot be run (a directory without an entrypoint, a file published
    /// without its execute bit, an entrypoint that leads out of its tree, or exec refused it).
    #[error("{0}")]
    NotRunnable(String),
    /// `run`: exec found nothing to run (the program, or the interpreter its `#!` line names).
    #[error("{0}")]
    ProgramMissing(String),
    /// An error the agent reported over the control socket: its kind and full message.
    #[error("{message}")]
    Remote {
        /// [`PeerError::kind`] on the agent's side.
        kind: ErrorKind,
        /// The agent's message.
        message: String,
    },
}

impl PeerError {
    /// Attach a context and a path to an I/O error.
    pub fn io(
        context: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> PeerError {
        let path = path.into();
        move |source| PeerError::Io {
            context,
            path,
            source,
        }
    }

    /// What kind of error this is, looking through errors relayed by the agent.
    pub fn kind(&self) -> ErrorKind {
        match self {
            PeerError::BadInput(_) => ErrorKind::BadInput,
            PeerError::NotFound(_) | PeerError::Unregistered(_) => ErrorKind::NotFound,
            PeerError::Ambiguous(_) => ErrorKind::Ambiguous,
            PeerError::Verification(_) => ErrorKind::Verification,
            PeerError::NoPeers(_) => ErrorKind::NoPeers,
            PeerError::Tracker(_) => ErrorKind::TrackerUnreachable,
            PeerError::TrackerRefused(_) => ErrorKind::TrackerRefused,
            PeerError::Unauthorized(_) => ErrorKind::Unauthorized,
            PeerError::Agent(_) => ErrorKind::Agent,
            PeerError::UnsafeArchive(_) => ErrorKind::UnsafeArchive,
            PeerError::Protocol(_) => ErrorKind::Protocol,
            PeerError::NoSpace(_) => ErrorKind::NoSpace,
            PeerError::Io { source, .. } => io_kind(source),
            PeerError::Cancelled => ErrorKind::Cancelled,
            PeerError::NotRunnable(_) => ErrorKind::NotRunnable,
            PeerError::ProgramMissing(_) => ErrorKind::ProgramMissing,
            PeerError::Remote { kind, .. } => *kind,
        }
    }

    /// The CLI's exit code for this error.
    pub fn exit_code(&self) -> u8 {
        self.kind().exit_code()
    }
}

/// The kind of a local I/O error: a full disk or quota is [`ErrorKind::NoSpace`], by the
/// OS's number or, for an error made again with more context (which keeps only the kind),
/// by its kind.
pub fn io_kind(e: &io::Error) -> ErrorKind {
    match (e.raw_os_error(), e.kind()) {
        (Some(libc::ENOSPC | libc::EDQUOT), _)
        | (_, io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded) => ErrorKind::NoSpace,
        _ => ErrorKind::Io,
    }
}

/// `Result` with [`PeerError`].
pub type Result<T, E = PeerError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_as_json_and_unknown_ones_are_other() {
        for k in [
            ErrorKind::BadInput,
            ErrorKind::TrackerUnreachable,
            ErrorKind::Unauthorized,
            ErrorKind::Io,
        ] {
            let s = serde_json::to_string(&k).unwrap();
            assert_eq!(s, format!("\"{}\"", k.as_str()));
            assert_eq!(serde_json::from_str::<ErrorKind>(&s).unwrap(), k);
        }
        assert_eq!(
            serde_json::from_str::<ErrorKind>("\"from_the_future\"").unwrap(),
            ErrorKind::Other
        );
    }

    /// A full disk is "no space" whether the error carries the OS's number or only its kind
    /// (an error made again with the path in its message).
    #[test]
    fn a_full_disk_is_no_space_however_its_error_was_wrapped() {
        let os = io::Error::from_raw_os_error(libc::ENOSPC);
        let wrapped = io::Error::new(os.kind(), format!("/x/data.part: {os}"));
        assert_eq!(io_kind(&os), ErrorKind::NoSpace);
        assert_eq!(io_kind(&wrapped), ErrorKind::NoSpace);
        let quota = io::Error::new(io::Error::from_raw_os_error(libc::EDQUOT).kind(), "q");
        assert_eq!(io_kind(&quota), ErrorKind::NoSpace);
        assert_eq!(io_kind(&io::Error::other("EIO")), ErrorKind::Io);
    }

    #[test]
    fn every_documented_exit_code_has_its_kind() {
        use crate::cli::exit;
        let cases = [
            (PeerError::BadInput("x".into()), exit::BAD_REFERENCE),
            (PeerError::Ambiguous("x".into()), exit::BAD_REFERENCE),
            (PeerError::NotFound("x".into()), exit::NOT_FOUND),
            (PeerError::Verification("x".into()), exit::VERIFICATION),
            (PeerError::UnsafeArchive("x".into()), exit::VERIFICATION),
            (PeerError::NoPeers("x".into()), exit::NO_PEERS),
            (PeerError::Tracker("x".into()), exit::TRACKER),
            (PeerError::Unauthorized("x".into()), exit::UNAUTHORIZED),
            (PeerError::TrackerRefused("x".into()), exit::ERROR),
            (PeerError::NoSpace("x".into()), exit::NO_SPACE),
            (
                PeerError::io("writing", "/x")(io::Error::from_raw_os_error(libc::ENOSPC)),
                exit::NO_SPACE,
            ),
            (PeerError::NotRunnable("x".into()), exit::NOT_RUNNABLE),
            (PeerError::ProgramMissing("x".into()), exit::PROGRAM_MISSING),
            (
                PeerError::Remote {
                    kind: ErrorKind::NoPeers,
                    message: "x".into(),
                },
                exit::NO_PEERS,
            ),
            (
                PeerError::io("binding", "/x")(io::Error::from(io::ErrorKind::AddrInUse)),
                exit::ERROR,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(e.exit_code(), code, "{e:?}");
        }
    }
}
