//! `marquee classify`: sends one encoded image to `ImageService.Classify`.

use std::fmt::Write as _;
use std::io::Read as _;
use std::path::Path;

use anyhow::Context as _;
use marquee_proto::vision::{ClassifyRequest, ClassifyResponse, ImageInput, image_input};
use serde_json::{Value, json};

use crate::cli::ClassifyArgs;
use crate::connection::Connection;
use crate::output::{Outcome, score_json};

pub async fn run(conn: &Connection, args: ClassifyArgs, json: bool) -> anyhow::Result<Outcome> {
    let encoded = read_image(&args.image)?;
    let request = ClassifyRequest {
        model: args.model,
        image: Some(ImageInput {
            source: Some(image_input::Source::Encoded(encoded.into())),
        }),
        top_k: args.top_k,
    };
    let response = conn
        .call(conn.vision().classify(conn.request(request)))
        .await?;
    Ok(if json {
        Outcome::json(&to_json(&response), true)
    } else {
        Outcome::ok(to_text(&response))
    })
}

/// The file's bytes, or stdin's for `-`. The server decodes and validates the image; reading
/// it here only has to say clearly when the file is not there.
fn read_image(path: &Path) -> anyhow::Result<Vec<u8>> {
    if path.as_os_str() == "-" {
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .context("cannot read the image from stdin")?;
        return Ok(bytes);
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read `{}`", path.display()))?;
    if bytes.is_empty() {
        anyhow::bail!("`{}` is empty", path.display());
    }
    Ok(bytes)
}

/// A header naming the model, then one line per label, most likely first:
/// `  0.957  espresso (967)`.
pub fn to_text(response: &ClassifyResponse) -> String {
    let mut out = format!(
        "{} (version {})\n",
        response.model,
        display_version(&response.model_version)
    );
    for label in &response.labels {
        writeln!(
            out,
            "  {:.3}  {} ({})",
            label.score, label.name, label.index
        )
        .expect("writing to a String cannot fail; this is a bug");
    }
    out
}

pub fn to_json(response: &ClassifyResponse) -> Value {
    let labels: Vec<Value> = response
        .labels
        .iter()
        .map(|l| json!({ "index": l.index, "name": l.name, "score": score_json(l.score) }))
        .collect();
    json!({
        "model": response.model,
        "model_version": response.model_version,
        "labels": labels,
    })
}

fn display_version(version: &str) -> &str {
    if version.is_empty() {
        "unknown"
    } else {
        version
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use marquee_proto::vision::Label;

    fn response() -> ClassifyResponse {
        ClassifyResponse {
            model: "efficientnet_lite0".into(),
            model_version: "1".into(),
            labels: vec![
                Label {
                    index: 967,
                    name: "espresso".into(),
                    score: 0.957_31,
                },
                Label {
                    index: 504,
                    name: "coffee mug".into(),
                    score: 0.012,
                },
            ],
        }
    }

    #[test]
    fn text_has_a_header_and_one_line_per_label() {
        assert_eq!(
            to_text(&response()),
            "efficientnet_lite0 (version 1)\n  0.957  espresso (967)\n  0.012  coffee mug (504)\n"
        );
    }

    #[test]
    fn json_keeps_every_field() {
        let v = to_json(&response());
        assert_eq!(v["model"], "efficientnet_lite0");
        assert_eq!(v["model_version"], "1");
        assert_eq!(v["labels"][0]["name"], "espresso");
        assert_eq!(v["labels"][0]["index"], 967);
        assert_eq!(v["labels"][0]["score"].to_string(), "0.95731");
        assert_eq!(v["labels"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn a_missing_file_is_named_in_the_error() {
        let e = read_image(Path::new("/nonexistent/cat.png")).unwrap_err();
        let text = format!("{e:#}");
        assert!(
            text.starts_with("cannot read `/nonexistent/cat.png`: "),
            "{text}"
        );
    }
}
