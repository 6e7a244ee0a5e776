//! `ApiError`: every way an HTTP request can fail, and its one mapping to a response.
//!
//! A 4xx body is one line saying what the caller did wrong; the two texts the old service had
//! (`Missing query param 'site' or 'apiKey'.`, `ApiKey invalid.`) are kept byte for byte. A 5xx
//! body is opaque; the cause is logged in full.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::delivery::SendError;
use crate::store::StoreError;

/// Why an HTTP request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// `site` or the API key is absent.
    #[error("Missing query param 'site' or 'apiKey'.")]
    MissingSiteOrKey,
    /// Unknown site or wrong key.
    #[error("ApiKey invalid.")]
    InvalidKey,
    /// The body or a parameter is malformed; the text says how.
    #[error("{0}")]
    BadRequest(String),
    /// The body is larger than allowed.
    #[error("Request body is larger than {max} bytes (server.max_body_bytes).")]
    TooLarge {
        /// The limit.
        max: usize,
    },
    /// The body's content type is not one we read.
    #[error("Unsupported Content-Type {0}: send application/json or application/x-www-form-urlencoded.")]
    UnsupportedMediaType(String),
    /// The site's rate limit is exhausted.
    #[error("Rate limit of this site exceeded; retry after {} s.", retry_after_secs(*retry_after))]
    RateLimited {
        /// How long until a request would pass.
        retry_after: std::time::Duration,
    },
    /// The message is larger than `max_message_bytes`.
    #[error("{0}")]
    MessageTooLarge(String),
    /// An `Idempotency-Key` was reused for a different request.
    #[error("{0}")]
    KeyReused(String),
    /// The request took longer than `server.request_timeout_secs`.
    #[error(
        "Request not done within {} s (server.request_timeout_secs). A message it carried may have been stored: \
         retry with the same Idempotency-Key to store it once.",
        after.as_secs()
    )]
    Timeout {
        /// The limit.
        after: std::time::Duration,
    },
    /// Carrying out the request failed in a way that does not say whether it took effect.
    #[error("Internal error; the message may have been stored.")]
    Internal(String),
    /// The store could not make the message durable. Nothing was answered 200.
    #[error("{}", match .0 {
        StoreError::DiskFull { .. } => "Message not stored: the data disk is almost full.",
        StoreError::Unavailable(_) => "Message not confirmed: the store (Redis) is unreachable. Retry with the same \
            Idempotency-Key to store it once.",
        _ => "Message not stored: storage unavailable.",
    })]
    Storage(#[from] StoreError),
}

fn retry_after_secs(wait: std::time::Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

impl From<SendError> for ApiError {
    fn from(e: SendError) -> Self {
        match e {
            SendError::TooLarge { .. } => Self::MessageTooLarge(e.to_string()),
            SendError::KeyReused => Self::KeyReused(e.to_string()),
            SendError::Store(e) => Self::Storage(e),
            SendError::Internal(cause) => Self::Internal(cause),
        }
    }
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            Self::MissingSiteOrKey | Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::InvalidKey => StatusCode::UNAUTHORIZED,
            Self::TooLarge { .. } | Self::MessageTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::KeyReused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Storage(StoreError::Io(_) | StoreError::DiskFull { .. }) => StatusCode::INSUFFICIENT_STORAGE,
            Self::Storage(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Timeout { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let Self::Storage(cause) = &self {
            tracing::error!(error.message = %cause, error.cause_chain = ?cause, "request failed in the store");
        } else if let Self::Internal(cause) = &self {
            tracing::error!(error.message = %cause, "request failed");
        } else {
            tracing::info!(status = status.as_u16(), reason = %self, "request refused");
        }
        let mut response = (status, self.to_string()).into_response();
        if let Self::RateLimited { retry_after } = &self {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, retry_after_secs(*retry_after).into());
        }
        response
    }
}
