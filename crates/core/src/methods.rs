//! The closed set of gRPC methods a Marquee server can serve, read once from the compiled
//! descriptor sets (every Marquee protocol, gRPC health, reflection v1 and v1alpha).
//!
//! A request path is chosen by the client (any bytes, up to ~16 KiB), so nothing keyed by it may
//! grow with it: metric labels, span names and per-method limits look the path up here and use
//! the *stored* name, or [`UNKNOWN`] for anything else.

use std::collections::HashMap;
use std::sync::LazyLock;

use prost::Message;

/// The label of every path that is not a known method.
pub const UNKNOWN: &str = "unknown";

/// One servable gRPC method.
#[derive(Debug)]
pub struct Method {
    /// `/package.Service/Method`.
    pub path: String,
    /// Whether the client sends a stream of messages (reflection's `ServerReflectionInfo`).
    pub client_streaming: bool,
    /// Whether the method is a probe or discovery call anyone may make without credentials
    /// (health, reflection, OIP liveness/readiness). Open calls get their own small
    /// concurrency limit so they cannot take the serving capacity, nor be starved by it.
    pub open: bool,
}

/// Services whose every method is open.
const OPEN_SERVICES: &[&str] = &[
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Single open methods of otherwise closed services.
const OPEN_METHODS: &[&str] = &[
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
];

static METHODS: LazyLock<HashMap<String, Method>> = LazyLock::new(|| {
    let sets = [
        marquee_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ];
    let mut methods = HashMap::new();
    for bytes in sets {
        let set = prost_types::FileDescriptorSet::decode(bytes)
            .expect("compiled-in descriptor sets decode, this is a bug");
        for file in &set.file {
            for service in &file.service {
                let service_name = match file.package() {
                    "" => service.name().to_string(),
                    p => format!("{p}.{}", service.name()),
                };
                for m in &service.method {
                    let path = format!("/{service_name}/{}", m.name());
                    let open = OPEN_SERVICES.contains(&service_name.as_str())
                        || OPEN_METHODS.contains(&path.as_str());
                    let method = Method {
                        path: path.clone(),
                        client_streaming: m.client_streaming(),
                        open,
                    };
                    methods.insert(path, method);
                }
            }
        }
    }
    methods
});

/// The known method at `path`, if it is one.
pub fn lookup(path: &str) -> Option<&'static Method> {
    METHODS.get(path)
}

/// The metric label (and span name) for `path`: the method's own name, or [`UNKNOWN`].
pub fn label(path: &str) -> &'static str {
    lookup(path).map_or(UNKNOWN, |m| m.path.as_str())
}

/// Whether `path` is an open method (see [`Method::open`]).
pub fn is_open(path: &str) -> bool {
    lookup(path).is_some_and(|m| m.open)
}

/// How many methods are known: the bound on every label set keyed by method.
pub fn count() -> usize {
    METHODS.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_methods_label_themselves_and_others_are_unknown() {
        for path in [
            "/marquee.vision.v1.ImageService/Classify",
            "/inference.GRPCInferenceService/ModelInfer",
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            assert_eq!(label(path), path);
        }
        assert_eq!(label("/marquee.vision.v1.ImageService/Nope"), UNKNOWN);
        assert_eq!(label(&format!("/{}", "x".repeat(16_000))), UNKNOWN);
        assert!(count() < 100, "a small closed set, got {}", count());
    }

    #[test]
    fn only_probes_and_discovery_are_open() {
        assert!(is_open("/grpc.health.v1.Health/Check"));
        assert!(is_open("/grpc.health.v1.Health/Watch"));
        assert!(is_open(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
        assert!(is_open("/inference.GRPCInferenceService/ServerLive"));
        assert!(!is_open("/inference.GRPCInferenceService/ModelInfer"));
        assert!(!is_open("/marquee.vision.v1.ImageService/Classify"));
        assert!(!is_open("/grpc.health.v1.Health/Unknown"));
        let refl = lookup("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo").unwrap();
        assert!(refl.client_streaming);
        assert!(
            !lookup("/grpc.health.v1.Health/Check")
                .unwrap()
                .client_streaming
        );
    }
}
