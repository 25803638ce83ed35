//! Generated gRPC messages, clients and servers for every Marquee protocol.

pub mod codec;

/// The encoded `FileDescriptorSet` of every proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/marquee_descriptor.bin"));

pub mod marquee {
    pub mod common {
        pub mod v1 {
            tonic::include_proto!("marquee.common.v1");
        }
    }
    pub mod vision {
        pub mod v1 {
            tonic::include_proto!("marquee.vision.v1");
        }
    }
    pub mod language {
        pub mod v1 {
            tonic::include_proto!("marquee.language.v1");
        }
    }
    pub mod recommendation {
        pub mod v1 {
            tonic::include_proto!("marquee.recommendation.v1");
        }
    }
}

/// The Open Inference Protocol (KServe V2), package `inference`.
pub mod inference {
    tonic::include_proto!("inference");
}

pub use marquee::common::v1 as common;
pub use marquee::language::v1 as language;
pub use marquee::recommendation::v1 as recommendation;
pub use marquee::vision::v1 as vision;

/// The canonical upper-case name of a gRPC status code, as in the gRPC spec and grpcurl; used
/// for metric labels and CLI output.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
