//! The gateway's error type and its one conversion into `tonic::Status`.

use std::time::Duration;

use marquee_core::ServeError;
use tonic::{Code, Status};

/// Everything the gateway itself can refuse or fail with. Backend answers pass through as
/// [`GatewayError::Backend`], unchanged, except an `INTERNAL` whose message is not a bare
/// reference (an older backend, or an internal status raised by a library): its detail is
/// logged under a reference of the gateway's own, never passed to the caller.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{message}")]
    Quota {
        message: String,
        retry_after: Duration,
    },
    #[error("{0}")]
    Serve(#[from] ServeError),
    #[error("{0}")]
    Unavailable(String),
    /// A request that was in flight on replicas that died under it (a possible poison
    /// request): `ABORTED`, not `UNAVAILABLE`, so that clients and proxies whose retry policy
    /// covers `UNAVAILABLE` don't send it again to the next replica.
    #[error("{0}")]
    Poisoned(String),
    #[error("backend answered {}: {}", .0.code(), .0.message())]
    Backend(Status),
}

impl From<GatewayError> for Status {
    fn from(e: GatewayError) -> Self {
        match e {
            GatewayError::Unauthenticated(m) => Status::unauthenticated(m),
            GatewayError::PermissionDenied(m) => Status::permission_denied(m),
            GatewayError::Quota {
                message,
                retry_after,
            } => ServeError::Overloaded {
                message,
                retry_after,
            }
            .into(),
            GatewayError::Serve(s) => s.into(),
            GatewayError::Unavailable(m) => Status::unavailable(m),
            GatewayError::Poisoned(m) => Status::aborted(m),
            GatewayError::Backend(s)
                if s.code() == Code::Internal
                    && !marquee_core::error::is_internal_reference(s.message()) =>
            {
                marquee_core::error::internal_status(&format!("backend answered: {}", s.message()))
            }
            GatewayError::Backend(s) => s,
        }
    }
}

impl GatewayError {
    /// The gRPC code of the status this error becomes.
    pub fn code(&self) -> Code {
        match self {
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::Quota { .. } => Code::ResourceExhausted,
            Self::Serve(s) => s.code(),
            Self::Unavailable(_) => Code::Unavailable,
            Self::Poisoned(_) => Code::Aborted,
            Self::Backend(s) => s.code(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_internal_detail_is_not_passed_through() {
        let leaked = Status::internal("model failed: Traceback (most recent call last) /srv/x.py");
        let status: Status = GatewayError::Backend(leaked).into();
        assert_eq!(status.code(), Code::Internal);
        assert!(marquee_core::error::is_internal_reference(status.message()));
        let referenced = marquee_core::error::internal_status("detail");
        let passed: Status = GatewayError::Backend(referenced.clone()).into();
        assert_eq!(
            passed.message(),
            referenced.message(),
            "the origin's reference is kept"
        );
        let other: Status = GatewayError::Backend(Status::not_found("no model `x`")).into();
        assert_eq!(other.message(), "no model `x`");
    }
}
