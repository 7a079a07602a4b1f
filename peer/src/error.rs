//! The peer crate's one error type. Each variant maps to what a user can do about it; the CLI
//! turns the kind into a distinct exit code.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

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
    /// The tracker could not be reached or answered with an error.
    #[error("tracker: {0}")]
    Tracker(String),
    /// The local agent could not be reached or refused.
    #[error("agent: {0}")]
    Agent(String),
    /// A hostile or broken archive entry (absolute path, `..`, escaping link, device, …).
    #[error("unsafe archive: {0}")]
    UnsafeArchive(String),
    /// A protocol violation by a peer.
    #[error("peer protocol: {0}")]
    Protocol(#[from] fbpkg_common::Error),
    /// A file-system operation failed.
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
    /// An error the agent reported over the control socket: its kind and full message.
    #[error("{message}")]
    Remote {
        /// [`PeerError::kind`] on the agent's side.
        kind: String,
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

    /// A stable, machine-readable name of the kind, used in JSON output.
    pub fn kind(&self) -> &'static str {
        match self {
            PeerError::BadInput(_) => "bad_input",
            PeerError::NotFound(_) => "not_found",
            PeerError::Ambiguous(_) => "ambiguous",
            PeerError::Verification(_) => "verification",
            PeerError::NoPeers(_) => "no_peers",
            PeerError::Tracker(_) => "tracker",
            PeerError::Agent(_) => "agent",
            PeerError::UnsafeArchive(_) => "unsafe_archive",
            PeerError::Protocol(_) => "protocol",
            PeerError::Io { .. } => "io",
            PeerError::Cancelled => "cancelled",
            PeerError::Remote { .. } => "remote",
        }
    }

    /// The kind for exit codes, looking through errors relayed by the agent.
    pub fn effective_kind(&self) -> &str {
        match self {
            PeerError::Remote { kind, .. } => kind,
            other => other.kind(),
        }
    }
}

/// `Result` with [`PeerError`].
pub type Result<T, E = PeerError> = std::result::Result<T, E>;
