//! Helpers of the lifecycle hardening tests: fault-injection TorchScript models built by the
//! test itself with the project's Python (torch.jit.script), health and OIP probes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use marquee_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use marquee_proto::inference::model_infer_request::InferInputTensor;
use marquee_proto::inference::{InferTensorContents, ModelInferRequest, ModelInferResponse};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The Python with torch that builds the model repository: `MARQUEE_PYTHON`, else the venv
/// named by `VIRTUAL_ENV` (set by the cargo config `scripts/bootstrap.sh` writes), else
/// bootstrap's default venv.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("MARQUEE_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = match std::env::var_os("VIRTUAL_ENV") {
        Some(v) => PathBuf::from(v).join("bin/python"),
        None => Path::new(&std::env::var_os("HOME").expect("HOME is set"))
            .join(".cache/marquee/venv/bin/python"),
    };
    assert!(
        venv.is_file(),
        "{} missing: run `make setup` (or set MARQUEE_PYTHON)",
        venv.display()
    );
    venv
}

/// Runs a Python `script` with `args` (sys.argv[1..]); panics with its stderr if it fails.
/// The script runs from a file: `torch.jit.script` reads the classes' source back.
pub fn run_python(script: &str, args: &[&Path]) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("build_model.py");
    std::fs::write(&file, script).unwrap();
    let out = std::process::Command::new(python())
        .arg(&file)
        .args(args)
        .output()
        .expect("python starts");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes `bytes` to `path` atomically (temp file in the same folder, then rename), as a
/// deployment tool replacing a file would.
pub fn replace_file(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp-replace");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Moves a finished version directory into place: `<model>/<version>` appears with its
/// `model.pt` already complete.
pub fn install_version(model_dir: &Path, version: u64, model_pt: &Path) {
    let staging = model_dir.join(format!(".{version}-staging"));
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::copy(model_pt, staging.join("model.pt")).unwrap();
    std::fs::rename(&staging, model_dir.join(version.to_string())).unwrap();
}

/// `model.toml` of a tensor model taking `x` `[4]` and returning `y` `[4]`, one lane.
pub fn tensor_manifest(name: &str) -> String {
    test_manifest(name, &[("y", 4)], 4, 16)
}

/// `model.toml` of a test tensor model: input `x` `[4]`, the given `(name, width)` outputs,
/// one lane of one thread, no queue delay.
pub fn test_manifest(
    name: &str,
    outputs: &[(&str, usize)],
    max_batch_size: usize,
    queue_capacity: usize,
) -> String {
    let mut toml = format!(
        "name = \"{name}\"\nplatform = \"torchscript\"\ndescription = \"built by the test\"\n\n\
         [[inputs]]\nname = \"x\"\ndatatype = \"FP32\"\ndims = [4]\n\n"
    );
    for (output, width) in outputs {
        toml.push_str(&format!(
            "[[outputs]]\nname = \"{output}\"\ndatatype = \"FP32\"\ndims = [{width}]\n\n"
        ));
    }
    toml.push_str(&format!(
        "[batching]\nmax_batch_size = {max_batch_size}\nmax_queue_delay_us = 0\n\
         queue_capacity = {queue_capacity}\n\n[instance]\nlanes = 1\nthreads = 1\n"
    ));
    toml
}

/// The newest numbered version directory of a model directory.
pub fn newest_version(model_dir: &Path) -> PathBuf {
    std::fs::read_dir(model_dir)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let v: u64 = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path()))
        })
        .max()
        .expect("the model has a version")
        .1
}

/// A channel to `addr`.
pub async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("server accepts connections")
}

/// The `grpc.health.v1` status of `service` (`""` = the whole server).
pub async fn health(ch: &Channel, service: &str) -> ServingStatus {
    let r = HealthClient::new(ch.clone())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health answers")
        .into_inner();
    ServingStatus::try_from(r.status).expect("a known status")
}

/// An OIP `ModelInfer` of one FP32 row of 4 values for `model` (`x` → `y`).
pub fn infer_request(model: &str, row: [f32; 4]) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.into(),
        inputs: vec![InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![1, 4],
            contents: Some(InferTensorContents {
                fp32_contents: row.to_vec(),
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// `(version, y)` of a `ModelInfer` answer.
pub fn infer_output(r: &ModelInferResponse) -> (String, Vec<f32>) {
    let y = r.outputs[0]
        .contents
        .as_ref()
        .expect("typed contents")
        .fp32_contents
        .clone();
    (r.model_version.clone(), y)
}

/// An OIP client on `ch`.
pub fn oip(ch: &Channel) -> GrpcInferenceServiceClient<Channel> {
    GrpcInferenceServiceClient::new(ch.clone())
}

/// The sum of the `marquee_grpc_requests_total` samples whose method ends with `suffix`, read
/// from the Prometheus text (so it holds however the method label is spelled).
pub fn calls_to(metrics_text: &str, suffix: &str) -> f64 {
    metrics_text
        .lines()
        .filter(|l| l.starts_with("marquee_grpc_requests_total{"))
        .filter(|l| {
            l.split("method=\"")
                .nth(1)
                .and_then(|m| m.split('"').next())
                .is_some_and(|m| m.ends_with(suffix))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
