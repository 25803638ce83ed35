//! The gateway's error type. Every status it becomes is made by core's one conversion
//! (`impl From<ServeError> for Status`), or is a backend's own status passed on.

use marquee_core::ServeError;
use tonic::{Code, Status};

/// What a gateway call can fail with: its own refusal or failure (auth, quotas, routing,
/// deadlines, replicas), in core's vocabulary, or a backend's answer.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    Serve(#[from] ServeError),
    /// A status made by a backend (by its own single conversion), or made here once for every
    /// caller of a failed batch, passed on unchanged. The exception is an `INTERNAL` whose
    /// message is not a bare reference (an older backend, or an internal status raised by a
    /// library): its detail is logged under a reference of the gateway's own, never passed to
    /// the caller.
    #[error("backend answered {}: {}", .0.code(), .0.message())]
    Backend(Status),
}

impl From<GatewayError> for Status {
    fn from(e: GatewayError) -> Self {
        match e {
            GatewayError::Serve(s) => s.into(),
            GatewayError::Backend(s)
                if s.code() == Code::Internal
                    && !marquee_core::error::is_internal_reference(s.message()) =>
            {
                ServeError::Internal(format!("backend answered: {}", s.message())).into()
            }
            GatewayError::Backend(s) => s,
        }
    }
}

impl GatewayError {
    /// The gRPC code of the status this error becomes.
    pub fn code(&self) -> Code {
        match self {
            Self::Serve(s) => s.code(),
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
        let referenced: Status = ServeError::Internal("detail".into()).into();
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
