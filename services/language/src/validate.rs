//! Request validation: every bad parameter is an `INVALID_ARGUMENT` naming the field, the
//! limit and the value received (TGI's messages are the bar).

use marquee_core::ServeError;
use marquee_proto::language::GenerationParameters;

use crate::sampling::SamplingParams;

/// The limits requests are checked against (from the model and the config).
#[derive(Debug, Clone)]
pub struct Limits {
    pub context_length: usize,
    pub max_new_tokens: usize,
    pub default_max_new_tokens: usize,
    pub max_stop_sequences: usize,
    pub max_stop_bytes: usize,
    /// Most sequences per request (`language.max_return_sequences`).
    pub max_return_sequences: usize,
}

fn bad(field: &str, message: String) -> ServeError {
    ServeError::invalid(field, message)
}

/// Checks the parameters and fills in defaults. `seed` is used when the request sets none.
pub fn parameters(
    p: Option<&GenerationParameters>,
    limits: &Limits,
    seed: u64,
) -> Result<SamplingParams, ServeError> {
    let default = GenerationParameters::default();
    let p = p.unwrap_or(&default);
    let max_new_tokens = match p.max_new_tokens {
        None => limits.default_max_new_tokens,
        Some(0) => {
            return Err(bad(
                "parameters.max_new_tokens",
                "`parameters.max_new_tokens` must be at least 1, got 0".into(),
            ));
        }
        Some(n) if n as usize > limits.max_new_tokens => {
            return Err(bad(
                "parameters.max_new_tokens",
                format!(
                    "`parameters.max_new_tokens` must be at most {} (`language.max_new_tokens`), got {n}",
                    limits.max_new_tokens
                ),
            ));
        }
        Some(n) => n as usize,
    };
    if let Some(t) = p.temperature
        && !(t.is_finite() && t > 0.0)
    {
        return Err(bad(
            "parameters.temperature",
            format!("`parameters.temperature` must be a finite number > 0, got {t}"),
        ));
    }
    if let Some(k) = p.top_k
        && k < 0
    {
        return Err(bad(
            "parameters.top_k",
            format!("`parameters.top_k` must be >= 0 (0 turns it off), got {k}"),
        ));
    }
    if let Some(v) = p.top_p
        && !(v > 0.0 && v <= 1.0)
    {
        return Err(bad(
            "parameters.top_p",
            format!("`parameters.top_p` must be in (0, 1], got {v}"),
        ));
    }
    if let Some(v) = p.typical_p
        && !(v > 0.0 && v < 1.0)
    {
        return Err(bad(
            "parameters.typical_p",
            format!("`parameters.typical_p` must be in (0, 1), got {v}"),
        ));
    }
    if let Some(v) = p.repetition_penalty
        && !(v > 0.0 && v <= 10.0)
    {
        return Err(bad(
            "parameters.repetition_penalty",
            format!("`parameters.repetition_penalty` must be in (0, 10] (1 is off), got {v}"),
        ));
    }
    for (field, value) in [
        ("frequency_penalty", p.frequency_penalty),
        ("presence_penalty", p.presence_penalty),
    ] {
        if let Some(v) = value
            && !(-2.0..=2.0).contains(&v)
        {
            return Err(bad(
                &format!("parameters.{field}"),
                format!("`parameters.{field}` must be in [-2, 2], got {v}"),
            ));
        }
    }
    if p.stop.len() > limits.max_stop_sequences {
        return Err(bad(
            "parameters.stop",
            format!(
                "`parameters.stop` supports at most {} stop sequences, got {}",
                limits.max_stop_sequences,
                p.stop.len()
            ),
        ));
    }
    for (i, s) in p.stop.iter().enumerate() {
        if s.is_empty() || s.len() > limits.max_stop_bytes {
            return Err(bad(
                &format!("parameters.stop[{i}]"),
                format!(
                    "`parameters.stop[{i}]` must be 1..={} bytes, got {} bytes",
                    limits.max_stop_bytes,
                    s.len()
                ),
            ));
        }
    }
    if p.min_new_tokens as usize > max_new_tokens {
        return Err(bad(
            "parameters.min_new_tokens",
            format!(
                "`parameters.min_new_tokens` must be <= `max_new_tokens` ({max_new_tokens}), got {}",
                p.min_new_tokens
            ),
        ));
    }
    let sample = p.temperature.is_some()
        || p.top_k.is_some_and(|k| k > 0)
        || p.top_p.is_some()
        || p.typical_p.is_some();
    Ok(SamplingParams {
        max_new_tokens,
        min_new_tokens: p.min_new_tokens as usize,
        temperature: sample.then(|| p.temperature.unwrap_or(1.0)),
        top_k: p.top_k.unwrap_or(0).max(0) as usize,
        top_p: p.top_p.unwrap_or(1.0),
        typical_p: p.typical_p.unwrap_or(1.0),
        repetition_penalty: p.repetition_penalty.unwrap_or(1.0),
        frequency_penalty: p.frequency_penalty.unwrap_or(0.0),
        presence_penalty: p.presence_penalty.unwrap_or(0.0),
        stop: p.stop.clone(),
        seed: p.seed.unwrap_or(seed),
        return_logprobs: p.return_logprobs,
    })
}

/// `num_return_sequences`, checked against the limit and the decoding mode: several sequences
/// of a greedy decode would be one sequence repeated (Hugging Face's `generate` refuses it too).
pub fn sequences(
    p: Option<&GenerationParameters>,
    params: &SamplingParams,
    limits: &Limits,
) -> Result<usize, ServeError> {
    let n = p.map_or(0, |p| p.num_return_sequences) as usize;
    let field = "parameters.num_return_sequences";
    if n > limits.max_return_sequences {
        return Err(bad(
            field,
            format!(
                "`{field}` must be at most {} (`language.max_return_sequences`), got {n}",
                limits.max_return_sequences
            ),
        ));
    }
    if n > 1 && params.temperature.is_none() {
        return Err(bad(
            field,
            format!(
                "`{field}` is {n} but decoding is greedy, which would return one sequence {n} times; set `temperature`, `top_k`, `top_p` or `typical_p` to sample"
            ),
        ));
    }
    Ok(n.max(1))
}

/// Checks a tokenized prompt (`tokens` includes the BOS token, if any) against the context.
pub fn lengths(tokens: usize, max_new_tokens: usize, limits: &Limits) -> Result<(), ServeError> {
    let ctx = limits.context_length;
    if tokens >= ctx {
        return Err(bad(
            "prompt",
            format!(
                "`prompt` must have less than {ctx} tokens (the model's context, BOS included), got {tokens}"
            ),
        ));
    }
    if tokens + max_new_tokens > ctx {
        return Err(bad(
            "parameters.max_new_tokens",
            format!(
                "`prompt` tokens + `max_new_tokens` must be <= {ctx} (the model's context); got {tokens} prompt tokens (BOS included) and {max_new_tokens} `max_new_tokens`"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            context_length: 256,
            max_new_tokens: 200,
            default_max_new_tokens: 64,
            max_stop_sequences: 4,
            max_stop_bytes: 64,
            max_return_sequences: 4,
        }
    }

    #[test]
    fn several_sequences_need_sampling_and_stay_within_the_limit() {
        let greedy = parameters(None, &limits(), 1).expect("valid");
        let ask = |n| GenerationParameters {
            num_return_sequences: n,
            ..Default::default()
        };
        assert_eq!(sequences(None, &greedy, &limits()).ok(), Some(1));
        assert_eq!(sequences(Some(&ask(0)), &greedy, &limits()).ok(), Some(1));
        assert_eq!(sequences(Some(&ask(1)), &greedy, &limits()).ok(), Some(1));
        let e = sequences(Some(&ask(2)), &greedy, &limits()).expect_err("greedy");
        assert!(e.to_string().contains("decoding is greedy"), "{e}");
        let sampled = parameters(
            Some(&GenerationParameters {
                temperature: Some(0.7),
                ..Default::default()
            }),
            &limits(),
            1,
        )
        .expect("valid");
        assert_eq!(sequences(Some(&ask(4)), &sampled, &limits()).ok(), Some(4));
        let e = sequences(Some(&ask(5)), &sampled, &limits()).expect_err("over the limit");
        assert!(
            e.to_string()
                .contains("at most 4 (`language.max_return_sequences`), got 5"),
            "{e}"
        );
    }

    fn err(p: GenerationParameters) -> (String, String) {
        let e = parameters(Some(&p), &limits(), 1).expect_err("must be refused");
        (e.field().unwrap_or_default().to_owned(), e.to_string())
    }

    #[test]
    fn defaults_are_greedy() {
        let p = parameters(None, &limits(), 9).expect("valid");
        assert_eq!(p.temperature, None);
        assert_eq!(p.max_new_tokens, 64);
        assert_eq!(p.seed, 9);
        let p = parameters(
            Some(&GenerationParameters {
                top_p: Some(0.9),
                ..Default::default()
            }),
            &limits(),
            9,
        )
        .expect("valid");
        assert_eq!(p.temperature, Some(1.0), "top_p alone turns sampling on");
    }

    #[test]
    fn each_bad_parameter_names_field_limit_and_value() {
        let cases: Vec<(GenerationParameters, &str, &str)> = vec![
            (
                GenerationParameters {
                    max_new_tokens: Some(0),
                    ..Default::default()
                },
                "parameters.max_new_tokens",
                "got 0",
            ),
            (
                GenerationParameters {
                    max_new_tokens: Some(500),
                    ..Default::default()
                },
                "parameters.max_new_tokens",
                "at most 200",
            ),
            (
                GenerationParameters {
                    temperature: Some(0.0),
                    ..Default::default()
                },
                "parameters.temperature",
                "got 0",
            ),
            (
                GenerationParameters {
                    temperature: Some(f32::NAN),
                    ..Default::default()
                },
                "parameters.temperature",
                "got NaN",
            ),
            (
                GenerationParameters {
                    top_p: Some(1.5),
                    ..Default::default()
                },
                "parameters.top_p",
                "(0, 1], got 1.5",
            ),
            (
                GenerationParameters {
                    top_p: Some(0.0),
                    ..Default::default()
                },
                "parameters.top_p",
                "got 0",
            ),
            (
                GenerationParameters {
                    top_k: Some(-1),
                    ..Default::default()
                },
                "parameters.top_k",
                "got -1",
            ),
            (
                GenerationParameters {
                    typical_p: Some(1.0),
                    ..Default::default()
                },
                "parameters.typical_p",
                "(0, 1), got 1",
            ),
            (
                GenerationParameters {
                    repetition_penalty: Some(0.0),
                    ..Default::default()
                },
                "parameters.repetition_penalty",
                "got 0",
            ),
            (
                GenerationParameters {
                    frequency_penalty: Some(2.5),
                    ..Default::default()
                },
                "parameters.frequency_penalty",
                "[-2, 2], got 2.5",
            ),
            (
                GenerationParameters {
                    presence_penalty: Some(-3.0),
                    ..Default::default()
                },
                "parameters.presence_penalty",
                "got -3",
            ),
            (
                GenerationParameters {
                    stop: vec!["a".into(); 5],
                    ..Default::default()
                },
                "parameters.stop",
                "at most 4 stop sequences, got 5",
            ),
            (
                GenerationParameters {
                    stop: vec!["x".repeat(65)],
                    ..Default::default()
                },
                "parameters.stop[0]",
                "1..=64 bytes, got 65",
            ),
            (
                GenerationParameters {
                    min_new_tokens: 10,
                    max_new_tokens: Some(5),
                    ..Default::default()
                },
                "parameters.min_new_tokens",
                "(5), got 10",
            ),
        ];
        for (p, field, text) in cases {
            let (f, message) = err(p);
            assert_eq!(f, field, "{message}");
            assert!(
                message.contains(text),
                "`{message}` should contain `{text}`"
            );
        }
    }

    #[test]
    fn context_limits() {
        let l = limits();
        assert!(lengths(10, 200, &l).is_ok());
        let e = lengths(300, 1, &l).expect_err("prompt too long");
        assert_eq!(e.field(), Some("prompt"));
        assert!(e.to_string().contains("got 300"));
        let e = lengths(100, 200, &l).expect_err("over context");
        assert!(e.to_string().contains("100 prompt tokens"));
        assert!(e.to_string().contains("200 `max_new_tokens`"));
    }
}
