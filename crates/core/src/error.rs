//! The serving error type and its one conversion into `tonic::Status`.
//!
//! Handlers return [`ServeError`]; only `impl From<ServeError> for Status` builds a status, with
//! `google.rpc` details (`BadRequest` field violations, `RetryInfo` on overload) so clients in
//! any language can act on the error without parsing the message.
//!
//! An internal error's detail (a libtorch traceback, a file path, a lock name) is for operators,
//! not callers: it is logged once with a random reference, and the caller gets only
//! `internal error; reference <id>` (also as `RequestInfo.request_id`), which an operator can
//! find in the logs.

use std::time::Duration;

use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The start of every message an `INTERNAL` status from a Marquee server carries.
pub const INTERNAL_PREFIX: &str = "internal error; reference ";

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

    /// The message a caller may see, for per-item errors inside a successful response (batch
    /// calls). An internal error is logged here with a fresh reference, like
    /// `From<ServeError> for Status` does; call this once per error.
    pub fn public_message(&self) -> String {
        match self {
            Self::Internal(detail) => internal_message(&report_internal(detail)),
            other => other.to_string(),
        }
    }
}

/// Logs an internal error's detail once, with a fresh random reference (16 hex digits) and the
/// current trace id when there is one, and returns the reference.
pub fn report_internal(detail: &str) -> String {
    let reference = RandomIdGenerator::default().new_span_id().to_string();
    let trace = tracing::Span::current()
        .context()
        .span()
        .span_context()
        .clone();
    if trace.is_valid() {
        let trace_id = trace.trace_id().to_string();
        tracing::error!(%reference, %trace_id, %detail, "internal error");
    } else {
        tracing::error!(%reference, %detail, "internal error");
    }
    reference
}

/// The caller's message for the internal error logged under `reference`.
pub fn internal_message(reference: &str) -> String {
    format!("{INTERNAL_PREFIX}{reference}")
}

/// Whether `message` is already a bare internal-error reference (as a Marquee server sends), so
/// a proxy may pass it through unchanged and the reference still names the origin's log line.
pub fn is_internal_reference(message: &str) -> bool {
    message.strip_prefix(INTERNAL_PREFIX).is_some_and(|id| {
        id.len() == 16
            && id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// An `INTERNAL` status for `detail`: the detail goes to the log, the caller gets the reference
/// (in the message and as `RequestInfo.request_id`).
pub fn internal_status(detail: &str) -> Status {
    let reference = report_internal(detail);
    Status::with_error_details(
        Code::Internal,
        internal_message(&reference),
        ErrorDetails::with_request_info(reference, ""),
    )
}

impl From<ServeError> for Status {
    fn from(err: ServeError) -> Self {
        let code = err.code();
        if let ServeError::Internal(detail) = &err {
            // Logged once here, where it becomes a status; the client sees only the reference.
            return internal_status(detail);
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

    #[test]
    fn internal_detail_is_replaced_by_a_reference() {
        let detail = "model `m` failed: RuntimeError at /opt/secret/model.py:3";
        let status: Status = ServeError::Internal(detail.into()).into();
        assert_eq!(status.code(), Code::Internal);
        assert!(
            is_internal_reference(status.message()),
            "{}",
            status.message()
        );
        assert!(!status.message().contains("RuntimeError"));
        let info = status.get_details_request_info().expect("request info");
        assert_eq!(status.message(), internal_message(&info.request_id));
        let other: Status = ServeError::Internal(detail.into()).into();
        assert_ne!(
            other.message(),
            status.message(),
            "each error has its own reference"
        );
        let item = ServeError::Internal(detail.into()).public_message();
        assert!(is_internal_reference(&item), "{item}");
        assert!(!is_internal_reference(
            "internal error; reference /etc/passwd"
        ));
    }
}
