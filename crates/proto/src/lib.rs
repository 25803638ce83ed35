//! Generated gRPC messages, clients and servers for every Marquee protocol.

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
}

/// The Open Inference Protocol (KServe V2), package `inference`.
pub mod inference {
    tonic::include_proto!("inference");
}

pub use marquee::common::v1 as common;
pub use marquee::vision::v1 as vision;
