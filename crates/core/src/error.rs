//! The serving error type and its one conversion into `tonic::Status`.
//!
//! Handlers return [`ServeError`]; only `impl From<ServeError> for Status` builds a status, with
//! `google.rpc` details (`BadRequest` field violations, `RetryInfo` on overload) so clients in
//! any language can act on the error without parsing the message.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Everything that can go wrong serving a request. Messages are lowercase, name the field in
/// backticks, and state the limit and the value received.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum ServeError {
    /// The request itself is wrong; `field` is the request path, e.g. `image.encoded`.
    #[error("{message}")]
    InvalidArgument { field: String, message: String },
    /// A request is larger than a configured limit.
    #[error("{message}")]
    TooLarge { field: String, message: String },
    /// The named model (or version) is not in the repository.
    #[error("model `{model}` is not served here{detail}")]
    ModelNotFound { model: String, detail: String },
    /// The model exists but cannot take requests yet (loading) or any more (draining).
    #[error("{0}")]
    Unavailable(String),
    /// The queue is full: refused at once, with a hint for when to retry.
    #[error("{message}")]
    Overloaded {
        message: String,
        retry_after: Duration,
    },
    /// The deadline passed before the work could be done; it was not computed.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The request is valid but this model cannot serve it (e.g. `Embed` on a model without an
    /// embedding output).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A bug or a model failure; details are logged, not leaked.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServeError {
    /// Shorthand for a field violation.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The gRPC code this error maps to.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument { .. } => Code::InvalidArgument,
            Self::TooLarge { .. } | Self::Overloaded { .. } => Code::ResourceExhausted,
            Self::ModelNotFound { .. } => Code::NotFound,
            Self::Unavailable(_) => Code::Unavailable,
            Self::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::Internal(_) => Code::Internal,
        }
    }

    /// The request field this error is about, if any.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::InvalidArgument { field, .. } | Self::TooLarge { field, .. } => Some(field),
            _ => None,
        }
    }
}

impl From<ServeError> for Status {
    fn from(err: ServeError) -> Self {
        let code = err.code();
        if let ServeError::Internal(detail) = &err {
            // Logged once here, where it becomes a status; the client sees no internals.
            tracing::error!(%detail, "internal error");
        }
        let details = match &err {
            ServeError::InvalidArgument { field, message }
            | ServeError::TooLarge { field, message } => {
                ErrorDetails::with_bad_request_violation(field.clone(), message.clone())
            }
            ServeError::Overloaded { retry_after, .. } => {
                ErrorDetails::with_retry_info(Some(*retry_after))
            }
            _ => return Status::new(code, err.to_string()),
        };
        Status::with_error_details(code, err.to_string(), details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overload_carries_retry_info() {
        let status: Status = ServeError::Overloaded {
            message: "queue full".into(),
            retry_after: Duration::from_millis(50),
        }
        .into();
        assert_eq!(status.code(), Code::ResourceExhausted);
        let retry = status.get_details_retry_info().expect("retry info");
        assert_eq!(retry.retry_delay, Some(Duration::from_millis(50)));
    }

    #[test]
    fn field_violation_names_the_field() {
        let status: Status =
            ServeError::invalid("top_k", "`top_k` must be in 1..=10, got 11").into();
        assert_eq!(status.code(), Code::InvalidArgument);
        let br = status.get_details_bad_request().expect("bad request");
        assert_eq!(br.field_violations[0].field, "top_k");
        assert!(status.message().contains("got 11"));
    }
}
