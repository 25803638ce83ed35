//! Generates Rust code for every proto under `proto/` with protox, so no `protoc` is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "marquee/common/v1/common.proto",
        "marquee/vision/v1/vision.proto",
        "marquee/language/v1/language.proto",
        "marquee/recommendation/v1/recommendation.proto",
        "inference/grpc_service.proto",
    ];
    let fds = protox::compile(files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // Reflection needs the encoded descriptor set of everything we serve.
    std::fs::write(
        out.join("marquee_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(".")
        // Undecodable requests are INVALID_ARGUMENT naming the field, not INTERNAL.
        .codec_path("crate::codec::ProstCodec")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
