//! What a command hands back to `main`, and the conversions shared by every command's output.

use marquee_proto::code_name;
use serde_json::Value;

/// The text a command prints on stdout, and whether the process should exit 0.
pub struct Outcome {
    pub stdout: String,
    pub success: bool,
}

impl Outcome {
    pub fn ok(stdout: String) -> Self {
        Self {
            stdout,
            success: true,
        }
    }

    /// `value` pretty-printed, with a trailing newline.
    pub fn json(value: &Value, success: bool) -> Self {
        let mut stdout = serde_json::to_string_pretty(value)
            .expect("serialising a serde_json::Value cannot fail; this is a bug");
        stdout.push('\n');
        Self { stdout, success }
    }
}

/// The text after `error: `: `CODE: message` for a gRPC status, the context chain otherwise.
pub fn describe_error(error: &anyhow::Error) -> String {
    match error.downcast_ref::<tonic::Status>() {
        Some(status) => describe_status(status),
        None => format!("{error:#}"),
    }
}

fn describe_status(status: &tonic::Status) -> String {
    let name = code_name(status.code());
    // A transport failure (refused connection, reset) often has an empty message; its cause
    // chain says what happened.
    let mut message = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            if !message.is_empty() {
                message.push_str(": ");
            }
            message.push_str(&text);
        }
        source = cause.source();
    }
    if message.is_empty() {
        name.to_owned()
    } else {
        format!("{name}: {message}")
    }
}

/// A score as JSON: the shortest decimal that round-trips the `f32` (`0.957`, not
/// `0.9570000171661377`), so scripts see the value the server computed.
pub fn score_json(score: f32) -> Value {
    score
        .to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn status_errors_name_the_code() {
        let e = anyhow::Error::new(tonic::Status::not_found(
            "model `x` is not in the repository",
        ));
        assert_eq!(
            describe_error(&e),
            "NOT_FOUND: model `x` is not in the repository"
        );
        let e = anyhow::Error::new(tonic::Status::unauthenticated(""));
        assert_eq!(describe_error(&e), "UNAUTHENTICATED");
    }

    #[test]
    fn other_errors_keep_their_context() {
        let e = anyhow::anyhow!("No such file or directory").context("cannot read `a.png`");
        assert_eq!(
            describe_error(&e),
            "cannot read `a.png`: No such file or directory"
        );
    }

    #[test]
    fn every_code_has_a_distinct_upper_case_name() {
        let names: std::collections::HashSet<_> =
            (0..=16).map(|i| code_name(Code::from_i32(i))).collect();
        assert_eq!(names.len(), 17);
        assert!(
            names
                .iter()
                .all(|n| n.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        );
    }

    #[test]
    fn scores_keep_their_short_form() {
        assert_eq!(score_json(0.957).to_string(), "0.957");
        assert_eq!(score_json(1.0).to_string(), "1.0");
        assert_eq!(score_json(f32::NAN), Value::Null);
    }
}
