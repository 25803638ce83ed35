//! The serving error type and its one conversion into `tonic::Status`.
//!
//! Handlers return [`ServeError`]; only `impl From<ServeError> for Status` builds a status, with
//! `google.rpc` details (`BadRequest` field violations, `ResourceInfo` for a missing resource,
//! `RetryInfo` on overload or a hinted unavailability) so clients in any language can act on
//! the error without parsing the message. The model services and the gateway share this one
//! vocabulary; a status a backend made here is passed on by the gateway, not rebuilt.
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

/// `ErrorInfo.reason` of [`ServeError::DependencyUnavailable`] (domain [`ERROR_DOMAIN`]).
pub const DEPENDENCY_UNAVAILABLE: &str = "DEPENDENCY_UNAVAILABLE";
/// `ErrorInfo.domain` of the reasons Marquee servers send.
pub const ERROR_DOMAIN: &str = "marquee.dev";

/// Whether `status` is a replica's [`ServeError::DependencyUnavailable`]: the replica answered
/// and is healthy; what failed is shared by all of them.
pub fn is_dependency_unavailable(status: &Status) -> bool {
    status.code() == Code::Unavailable
        && status
            .get_details_error_info()
            .is_some_and(|i| i.reason == DEPENDENCY_UNAVAILABLE && i.domain == ERROR_DOMAIN)
}

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
    /// Something other than a model is not known here (an item, a user): `resource` is its
    /// kind and `field` the request field that named it, sent as `ResourceInfo`.
    #[error("{message}")]
    NotFound {
        resource: String,
        field: String,
        message: String,
    },
    /// The call carries no valid credential.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller is known but may not make this call.
    #[error("{0}")]
    PermissionDenied(String),
    /// Refused so that it is not sent again as is: a possible poison request (replicas died
    /// under it). `ABORTED`, not `UNAVAILABLE`, because clients and proxies whose retry policy
    /// covers `UNAVAILABLE` would send it to the next replica.
    #[error("{0}")]
    Aborted(String),
    /// The model exists but cannot take requests yet (loading) or any more (draining), or
    /// nothing healthy can serve the call; `retry_after`, when known, goes out as `RetryInfo`.
    #[error("{message}")]
    Unavailable {
        message: String,
        retry_after: Option<Duration>,
    },
    /// A dependency every replica shares (the recommender's database) cannot be reached: the
    /// replica itself is fine, so a proxy must neither eject it nor send the call to another
    /// replica (it would meet the same dependency). `UNAVAILABLE` with `RetryInfo` and an
    /// `ErrorInfo` of reason [`DEPENDENCY_UNAVAILABLE`] naming the dependency.
    #[error("{message}")]
    DependencyUnavailable {
        dependency: String,
        message: String,
        retry_after: Duration,
    },
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

    /// `UNAVAILABLE` without a retry hint.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::Unavailable {
            message: message.into(),
            retry_after: None,
        }
    }

    /// `UNAVAILABLE` with a hint for when to retry (`RetryInfo`).
    pub fn unavailable_retry(message: impl Into<String>, retry_after: Duration) -> Self {
        Self::Unavailable {
            message: message.into(),
            retry_after: Some(retry_after),
        }
    }

    /// A model call that failed with `message`: an allocation failure (see
    /// [`is_out_of_memory`]) is `RESOURCE_EXHAUSTED` with a retry hint, because the same call may
    /// fit once the work in flight has freed its memory; anything else is `INTERNAL`.
    pub fn model_failure(message: String) -> Self {
        if is_out_of_memory(&message) {
            Self::Overloaded {
                message: format!("the model ran out of memory; retry: {message}"),
                retry_after: OUT_OF_MEMORY_RETRY,
            }
        } else {
            Self::Internal(message)
        }
    }

    /// The gRPC code this error maps to.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument { .. } => Code::InvalidArgument,
            Self::TooLarge { .. } | Self::Overloaded { .. } => Code::ResourceExhausted,
            Self::ModelNotFound { .. } | Self::NotFound { .. } => Code::NotFound,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::Aborted(_) => Code::Aborted,
            Self::Unavailable { .. } | Self::DependencyUnavailable { .. } => Code::Unavailable,
            Self::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::Internal(_) => Code::Internal,
        }
    }

    /// The request field this error is about, if any.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::InvalidArgument { field, .. }
            | Self::TooLarge { field, .. }
            | Self::NotFound { field, .. } => Some(field),
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
fn internal_status(detail: &str) -> Status {
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
            ServeError::NotFound {
                resource,
                field,
                message,
            } => ErrorDetails::with_resource_info(
                resource.clone(),
                field.clone(),
                "",
                message.clone(),
            ),
            ServeError::Overloaded { retry_after, .. }
            | ServeError::Unavailable {
                retry_after: Some(retry_after),
                ..
            } => ErrorDetails::with_retry_info(Some(*retry_after)),
            ServeError::DependencyUnavailable {
                dependency,
                retry_after,
                ..
            } => {
                let mut d = ErrorDetails::with_retry_info(Some(*retry_after));
                d.set_error_info(
                    DEPENDENCY_UNAVAILABLE,
                    ERROR_DOMAIN,
                    [("dependency".to_string(), dependency.clone())],
                );
                d
            }
            _ => return Status::new(code, err.to_string()),
        };
        Status::with_error_details(code, err.to_string(), details)
    }
}

/// The status a per-item error of a batch response stands for: what its caller would have got
/// calling alone. `code`, `field` and `message` are as a Marquee server wrote them (from
/// [`ServeError::code`], [`ServeError::field`] and [`ServeError::public_message`]), so a field
/// comes back as the `BadRequest` violation the single call carries, and an internal error's
/// message is already a bare reference.
pub fn item_status(code: Code, field: String, message: String) -> Status {
    if field.is_empty() {
        Status::new(code, message)
    } else {
        Status::with_error_details(
            code,
            message.clone(),
            ErrorDetails::with_bad_request_violation(field, message),
        )
    }
}

/// Retry hint after a model call ran out of memory: long enough for the calls in flight to
/// end and free theirs.
pub const OUT_OF_MEMORY_RETRY: Duration = Duration::from_millis(200);

/// Whether a libtorch error is an allocation failure (CUDA's caching allocator, cuBLAS's
/// workspace, or the CPU allocator): the request was too large for the memory left now, not
/// wrong, so it is answered `RESOURCE_EXHAUSTED` and the worker carries on.
pub fn is_out_of_memory(error: &str) -> bool {
    [
        "CUDA out of memory",
        "CUDA error: out of memory",
        "CUBLAS_STATUS_ALLOC_FAILED",
        "DefaultCPUAllocator: can't allocate memory",
    ]
    .iter()
    .any(|m| error.contains(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_failures_are_told_apart_from_other_errors() {
        // The messages libtorch 2.x raises, verbatim in their distinctive parts.
        assert!(is_out_of_memory(
            "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 139.81 GiB"
        ));
        assert!(is_out_of_memory(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate 8796093022208 bytes."
        ));
        assert!(is_out_of_memory(
            "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
        ));
        assert!(!is_out_of_memory(
            "Expected all tensors to be on the same device"
        ));
        // What the language engine and the batcher send their callers.
        let oom = ServeError::model_failure("CUDA out of memory. Tried to allocate 2 GiB".into());
        assert_eq!(oom.code(), Code::ResourceExhausted);
        let other = ServeError::model_failure("shape mismatch".into());
        assert_eq!(other.code(), Code::Internal);
    }

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
    fn a_dependency_outage_says_so_and_when_to_retry() {
        let status: Status = ServeError::DependencyUnavailable {
            dependency: "postgres".into(),
            message: "the feedback database is unavailable".into(),
            retry_after: Duration::from_secs(1),
        }
        .into();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(is_dependency_unavailable(&status));
        let info = status.get_details_error_info().expect("error info");
        assert_eq!(
            info.metadata.get("dependency").map(String::as_str),
            Some("postgres")
        );
        let retry = status.get_details_retry_info().expect("retry info");
        assert_eq!(retry.retry_delay, Some(Duration::from_secs(1)));
        assert!(!is_dependency_unavailable(
            &ServeError::unavailable("draining").into()
        ));
    }

    #[test]
    fn unavailable_carries_retry_info_only_when_hinted() {
        let plain: Status = ServeError::unavailable("draining").into();
        assert_eq!(plain.code(), Code::Unavailable);
        assert_eq!(plain.message(), "draining");
        assert!(plain.get_details_retry_info().is_none());
        let hinted: Status =
            ServeError::unavailable_retry("disk full", Duration::from_millis(200)).into();
        assert_eq!(hinted.code(), Code::Unavailable);
        assert_eq!(hinted.message(), "disk full");
        let retry = hinted.get_details_retry_info().expect("retry info");
        assert_eq!(retry.retry_delay, Some(Duration::from_millis(200)));
    }

    #[test]
    fn the_gateway_and_recommender_codes() {
        let cases = [
            (
                ServeError::Unauthenticated("no credentials".into()),
                Code::Unauthenticated,
            ),
            (
                ServeError::PermissionDenied("lacks scope".into()),
                Code::PermissionDenied,
            ),
            (
                ServeError::Aborted("possible poison request".into()),
                Code::Aborted,
            ),
        ];
        for (err, code) in cases {
            let message = err.to_string();
            let status: Status = err.into();
            assert_eq!((status.code(), status.message()), (code, message.as_str()));
        }
        let missing: Status = ServeError::NotFound {
            resource: "item".into(),
            field: "item_id".into(),
            message: "item `42` is not in the catalogue".into(),
        }
        .into();
        assert_eq!(missing.code(), Code::NotFound);
        assert_eq!(missing.message(), "item `42` is not in the catalogue");
        let info = missing.get_details_resource_info().expect("resource info");
        assert_eq!(
            (info.resource_type.as_str(), info.resource_name.as_str()),
            ("item", "item_id")
        );
    }

    #[test]
    fn an_item_error_becomes_the_status_of_its_single_call() {
        let err = ServeError::invalid("image.encoded", "`image.encoded` is empty");
        let single: Status = err.clone().into();
        let item = item_status(
            err.code(),
            err.field().unwrap_or_default().to_string(),
            err.public_message(),
        );
        assert_eq!(item.code(), single.code());
        assert_eq!(item.message(), single.message());
        assert_eq!(
            format!("{:?}", item.get_details_bad_request()),
            format!("{:?}", single.get_details_bad_request())
        );
        let plain = item_status(Code::DeadlineExceeded, String::new(), "late".into());
        assert_eq!(
            (plain.code(), plain.message()),
            (Code::DeadlineExceeded, "late")
        );
        assert!(plain.get_details_bad_request().is_none());
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
