//! The tracker's error type and how each error is answered over HTTP.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fbpkg_common::api::ApiError;
use thiserror::Error;

/// Everything the tracker can fail with.
#[derive(Debug, Error)]
pub enum TrackerError {
    /// Settings that cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A request that cannot be served as sent.
    #[error("{0}")]
    BadRequest(String),
    /// Missing or wrong bearer token.
    #[error("publishing needs a valid 'Authorization: Bearer <token>' header")]
    Unauthorized,
    /// A caller that may not do this, whoever it is (a report for another host).
    #[error("{0}")]
    Forbidden(String),
    /// No such package, version or tag.
    #[error("{0}")]
    NotFound(String),
    /// A hash prefix matching several versions.
    #[error("hash prefix {prefix} is ambiguous: it matches {} versions", candidates.len())]
    Ambiguous {
        /// The prefix asked for.
        prefix: String,
        /// `name:hash` of every match.
        candidates: Vec<String>,
    },
    /// Publishing different metainfo under an existing name and hash.
    #[error("{0}")]
    Conflict(String),
    /// A request body past the tracker's limit.
    #[error("{0}")]
    TooLarge(String),
    /// A store the tracker needs does not answer now (the catalog database): try again.
    #[error("{0}")]
    Unavailable(String),
    /// The catalog could not be read or written.
    #[error("catalog storage: {context}: {source}")]
    Storage {
        /// What was being done.
        context: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl TrackerError {
    /// Wrap an I/O error with what was being done.
    pub fn storage(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Storage {
            context: context.into(),
            source,
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            TrackerError::Config(_) | TrackerError::Storage { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            TrackerError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            TrackerError::BadRequest(_) => StatusCode::BAD_REQUEST,
            TrackerError::Unauthorized => StatusCode::UNAUTHORIZED,
            TrackerError::Forbidden(_) => StatusCode::FORBIDDEN,
            TrackerError::NotFound(_) => StatusCode::NOT_FOUND,
            TrackerError::Ambiguous { .. } | TrackerError::Conflict(_) => StatusCode::CONFLICT,
            TrackerError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }
}

impl From<fbpkg_common::Error> for TrackerError {
    fn from(e: fbpkg_common::Error) -> Self {
        TrackerError::BadRequest(e.to_string())
    }
}

impl IntoResponse for TrackerError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "catalog request failed");
        }
        let candidates = match &self {
            TrackerError::Ambiguous { candidates, .. } => candidates.clone(),
            _ => Vec::new(),
        };
        let mut resp = (
            status,
            Json(ApiError {
                error: self.to_string(),
                candidates,
            }),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}
