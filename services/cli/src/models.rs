//! `marquee models`: the Open Inference Protocol's `ModelMetadata` for each named model, or for
//! every model in the server's `RepositoryIndex`.

use std::fmt::Write as _;

use marquee_proto::inference::model_metadata_response::TensorMetadata;
use marquee_proto::inference::{
    ModelMetadataRequest, ModelMetadataResponse, RepositoryIndexRequest,
};
use serde_json::{Value, json};

use crate::cli::ModelsArgs;
use crate::connection::Connection;
use crate::output::Outcome;

pub async fn run(conn: &Connection, args: ModelsArgs, json: bool) -> anyhow::Result<Outcome> {
    let mut oip = conn.inference();
    let names = if args.models.is_empty() {
        let request = conn.request(RepositoryIndexRequest::default());
        let index = conn.call(oip.repository_index(request)).await?;
        index.models.into_iter().map(|m| m.name).collect()
    } else {
        args.models
    };
    let mut models = Vec::with_capacity(names.len());
    for name in names {
        let request = ModelMetadataRequest {
            name,
            version: String::new(),
        };
        models.push(conn.call(oip.model_metadata(conn.request(request))).await?);
    }
    Ok(if json {
        Outcome::json(&to_json(&models), true)
    } else {
        Outcome::ok(to_text(&models))
    })
}

/// Per model: a line with its name, versions and platform, then one line per tensor.
pub fn to_text(models: &[ModelMetadataResponse]) -> String {
    let mut out = String::new();
    for m in models {
        let tensors = m
            .inputs
            .iter()
            .map(|t| ("input", t))
            .chain(m.outputs.iter().map(|t| ("output", t)));
        let name_width = m
            .inputs
            .iter()
            .chain(&m.outputs)
            .map(|t| t.name.len())
            .max()
            .unwrap_or(0);
        writeln!(
            out,
            "{}  versions: {}  platform: {}",
            m.name,
            m.versions.join(", "),
            m.platform
        )
        .expect("writing to a String cannot fail; this is a bug");
        for (kind, t) in tensors {
            writeln!(
                out,
                "  {kind:<6}  {:<name_width$}  {:<5}  {}",
                t.name,
                t.datatype,
                shape_text(&t.shape)
            )
            .expect("writing to a String cannot fail; this is a bug");
        }
    }
    out
}

/// `[-1, 3, 224, 224]`, with `-1` for a variable dimension as the protocol writes it.
fn shape_text(shape: &[i64]) -> String {
    let dims: Vec<String> = shape.iter().map(i64::to_string).collect();
    format!("[{}]", dims.join(", "))
}

pub fn to_json(models: &[ModelMetadataResponse]) -> Value {
    let tensor =
        |t: &TensorMetadata| json!({ "name": t.name, "datatype": t.datatype, "shape": t.shape });
    json!({
        "models": models
            .iter()
            .map(|m| json!({
                "name": m.name,
                "versions": m.versions,
                "platform": m.platform,
                "inputs": m.inputs.iter().map(tensor).collect::<Vec<_>>(),
                "outputs": m.outputs.iter().map(tensor).collect::<Vec<_>>(),
            }))
            .collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata() -> ModelMetadataResponse {
        ModelMetadataResponse {
            name: "efficientnet_lite0".into(),
            versions: vec!["1".into(), "2".into()],
            platform: "pytorch_torchscript".into(),
            inputs: vec![TensorMetadata {
                name: "image".into(),
                datatype: "FP32".into(),
                shape: vec![-1, 3, 224, 224],
            }],
            outputs: vec![TensorMetadata {
                name: "logits".into(),
                datatype: "FP32".into(),
                shape: vec![-1, 1000],
            }],
        }
    }

    #[test]
    fn text_lists_versions_platform_and_tensors() {
        assert_eq!(
            to_text(&[metadata()]),
            "efficientnet_lite0  versions: 1, 2  platform: pytorch_torchscript\n  \
             input   image   FP32   [-1, 3, 224, 224]\n  \
             output  logits  FP32   [-1, 1000]\n"
        );
    }

    #[test]
    fn json_is_a_list_of_models() {
        let v = to_json(&[metadata()]);
        let m = &v["models"][0];
        assert_eq!(m["name"], "efficientnet_lite0");
        assert_eq!(m["versions"], json!(["1", "2"]));
        assert_eq!(m["platform"], "pytorch_torchscript");
        assert_eq!(m["inputs"][0]["shape"], json!([-1, 3, 224, 224]));
        assert_eq!(m["outputs"][0]["name"], "logits");
        assert_eq!(v["models"].as_array().unwrap().len(), 1);
    }
}
