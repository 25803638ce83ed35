//! `marquee generate`: streams `TextGeneration.GenerateStream`, printing text as it arrives.

use std::io::Write as _;

use marquee_proto::language::{
    FinishReason, GenerateRequest, GenerationParameters, GenerationSummary,
};
use serde_json::json;

use crate::cli::GenerateArgs;
use crate::connection::Connection;
use crate::output::Outcome;

pub async fn run(conn: &Connection, args: GenerateArgs, json: bool) -> anyhow::Result<Outcome> {
    let n = args.num_return_sequences.max(1) as usize;
    let request = GenerateRequest {
        model: args.model.unwrap_or_default(),
        prompt: args.prompt,
        parameters: Some(GenerationParameters {
            max_new_tokens: args.max_new_tokens,
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            repetition_penalty: args.repetition_penalty,
            stop: args.stop,
            seed: args.seed,
            num_return_sequences: args.num_return_sequences,
            ..Default::default()
        }),
    };
    let mut stream = conn
        .call(conn.language().generate_stream(conn.request(request)))
        .await?;
    let mut sequences = vec![(String::new(), Vec::new(), None); n];
    let mut stdout = std::io::stdout().lock();
    while let Some(message) = stream.message().await? {
        let Some((text, ids, summary)) = sequences.get_mut(message.index as usize) else {
            anyhow::bail!("the server sent sequence {} of {n}", message.index);
        };
        if !json && n == 1 && !message.text.is_empty() {
            // Text as it is generated; a closed stdout (`| head`) just stops the printing.
            let _ = write!(stdout, "{}", message.text);
            let _ = stdout.flush();
        }
        text.push_str(&message.text);
        ids.extend(message.token_ids);
        if message.summary.is_some() {
            *summary = message.summary;
        }
    }
    let described = |(text, ids, summary): &(String, Vec<u32>, Option<GenerationSummary>)| {
        let s = summary.clone().unwrap_or_default();
        json!({
            "text": text,
            "token_ids": ids,
            "finish_reason": finish(&s),
            "prompt_tokens": s.prompt_tokens,
            "generated_tokens": s.generated_tokens,
            "seed": s.seed,
            "time_to_first_token_ms": s.time_to_first_token_ms,
            "total_ms": s.total_ms,
        })
    };
    if json {
        let mut out = described(&sequences[0]);
        if n > 1 {
            out["sequences"] = sequences.iter().map(described).collect();
        }
        return Ok(Outcome::json(&out, true));
    }
    for (i, (text, _, summary)) in sequences.iter().enumerate() {
        let summary = summary.clone().unwrap_or_default();
        if n > 1 {
            let _ = write!(
                stdout,
                "{}--- sequence {i} ---\n{text}",
                if i > 0 { "\n" } else { "" }
            );
            let _ = stdout.flush();
        }
        // The summary goes to stderr, so stdout holds exactly the generated text.
        eprintln!(
            "\n[{}, {} tokens, seed {}, first token after {:.1} ms, {:.1} ms in all]",
            finish(&summary),
            summary.generated_tokens,
            summary.seed,
            summary.time_to_first_token_ms,
            summary.total_ms
        );
    }
    Ok(Outcome::ok(String::new()))
}

fn finish(s: &GenerationSummary) -> &'static str {
    match FinishReason::try_from(s.finish_reason).unwrap_or(FinishReason::Unspecified) {
        FinishReason::Length => "length",
        FinishReason::Stop => "stop",
        FinishReason::Eos => "eos",
        FinishReason::Unspecified => "unspecified",
    }
}
