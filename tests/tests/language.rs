//! End to end: the language service with the real trained GPT over real gRPC.

use std::collections::HashSet;

use futures::StreamExt;
use marquee_e2e::*;
use marquee_proto::inference::ModelInferRequest;
use marquee_proto::inference::model_infer_request::InferInputTensor;
use marquee_proto::language::text_generation_client::TextGenerationClient;
use marquee_proto::language::{
    FinishReason, GenerateRequest, GenerationParameters, GenerationSummary, TokenizeRequest,
};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

const MODEL: &str = "gpt_reviews";

async fn client(s: &TestServer) -> TextGenerationClient<Channel> {
    TextGenerationClient::new(s.channel().await)
}

fn request(prompt: &str, parameters: GenerationParameters) -> GenerateRequest {
    GenerateRequest {
        model: String::new(),
        prompt: prompt.into(),
        parameters: Some(parameters),
    }
}

fn sampled(seed: u64, max_new_tokens: u32) -> GenerationParameters {
    GenerationParameters {
        max_new_tokens: Some(max_new_tokens),
        temperature: Some(0.9),
        top_k: Some(50),
        top_p: Some(0.95),
        seed: Some(seed),
        return_logprobs: true,
        ..Default::default()
    }
}

fn greedy(max_new_tokens: u32) -> GenerationParameters {
    GenerationParameters {
        max_new_tokens: Some(max_new_tokens),
        ..Default::default()
    }
}

/// Everything a stream delivered: the text deltas, ids, logprobs and the final summary.
struct Streamed {
    deltas: Vec<String>,
    ids: Vec<u32>,
    logprobs: Vec<f32>,
    summary: GenerationSummary,
}

async fn stream(c: &mut TextGenerationClient<Channel>, req: GenerateRequest) -> Streamed {
    let mut s = c
        .generate_stream(req)
        .await
        .expect("stream starts")
        .into_inner();
    let mut out = Streamed {
        deltas: Vec::new(),
        ids: Vec::new(),
        logprobs: Vec::new(),
        summary: GenerationSummary::default(),
    };
    let mut finals = 0;
    while let Some(msg) = s.next().await {
        let msg = msg.expect("stream message");
        assert_eq!(finals, 0, "nothing may follow the final message");
        assert!(
            msg.summary.is_some() || !msg.token_ids.is_empty(),
            "every message before the final one carries tokens, got {msg:?}"
        );
        out.deltas.push(msg.text);
        out.ids.extend(msg.token_ids);
        out.logprobs.extend(msg.logprobs);
        if let Some(summary) = msg.summary {
            out.summary = summary;
            finals += 1;
        }
    }
    assert_eq!(finals, 1, "exactly one final message");
    out
}

#[tokio::test]
async fn seeded_sampling_is_deterministic_alone_and_among_16_streams() {
    let server = shared_language();
    let mut c = client(server).await;
    let prompt = "I bought this dress for a wedding and";
    let alone = c
        .generate(request(prompt, sampled(1234, 48)))
        .await
        .expect("generate")
        .into_inner();
    let again = c
        .generate(request(prompt, sampled(1234, 48)))
        .await
        .expect("generate")
        .into_inner();
    assert_eq!(alone.token_ids, again.token_ids, "same seed, same tokens");
    assert_eq!(alone.summary.as_ref().unwrap().seed, 1234);
    let other = c
        .generate(request(prompt, sampled(99, 48)))
        .await
        .expect("generate")
        .into_inner();
    assert_ne!(
        alone.token_ids, other.token_ids,
        "another seed samples differently"
    );

    // The same request as one of 17 concurrent streams (16 others with other seeds and
    // prompts) and as a concurrent unary call: identical output.
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let mut c = client(server).await;
        tasks.push(tokio::spawn(async move {
            let p = format!("Review number {i}: the fabric");
            stream(&mut c, request(&p, sampled(i, 40))).await.ids
        }));
    }
    let mut c1 = client(server).await;
    let target_stream =
        tokio::spawn(async move { stream(&mut c1, request(prompt, sampled(1234, 48))).await });
    let mut c2 = client(server).await;
    let target_unary = tokio::spawn(async move {
        c2.generate(request(prompt, sampled(1234, 48)))
            .await
            .expect("generate")
            .into_inner()
    });
    for t in tasks {
        assert!(!t.await.unwrap().is_empty());
    }
    let streamed = target_stream.await.unwrap();
    let unary = target_unary.await.unwrap();
    assert_eq!(
        streamed.ids, alone.token_ids,
        "stream under load == unary alone"
    );
    assert_eq!(streamed.deltas.concat(), alone.text);
    assert_eq!(
        unary.token_ids, alone.token_ids,
        "unary under load == unary alone"
    );
    assert_eq!(unary.text, alone.text);
}

#[tokio::test]
async fn stream_concatenation_equals_unary_text_ids_and_logprobs() {
    let server = shared_language();
    let mut c = client(server).await;
    for (i, prompt) in ["The sweater is", "Love this top", "Runs small, order"]
        .iter()
        .enumerate()
    {
        let params = sampled(7 + i as u64, 60);
        let unary = c
            .generate(request(prompt, params.clone()))
            .await
            .expect("generate")
            .into_inner();
        let streamed = stream(&mut c, request(prompt, params)).await;
        assert_eq!(streamed.deltas.concat(), unary.text);
        assert_eq!(streamed.ids, unary.token_ids);
        // Log-probabilities agree to float precision: other tests' requests share the batch,
        // and a matrix product's rounding depends on the batch size.
        assert_eq!(streamed.logprobs.len(), unary.logprobs.len());
        for (a, b) in streamed.logprobs.iter().zip(&unary.logprobs) {
            assert!((a - b).abs() < 1e-3, "logprob {a} vs {b}");
        }
        assert_eq!(unary.logprobs.len(), unary.token_ids.len());
        assert!(unary.logprobs.iter().all(|&l| l <= 0.0 && l.is_finite()));
        let s = unary.summary.unwrap();
        assert_eq!(streamed.summary.finish_reason, s.finish_reason);
        assert_eq!(streamed.summary.generated_tokens, s.generated_tokens);
        assert!(
            streamed.deltas.len() > 2,
            "text arrives in several messages"
        );
    }
}

#[tokio::test]
async fn a_stream_ending_on_end_of_sequence_sends_no_empty_message() {
    let server = shared_language();
    let mut c = client(server).await;
    // Reviews end: sampled long enough, some seed reaches the end-of-sequence token. The
    // `stream` helper asserts every message but the last carries tokens (an end-of-sequence
    // finish used to send an empty one first).
    for seed in 0..40 {
        let s = stream(&mut c, request("Love this top", sampled(seed, 200))).await;
        if s.summary.finish_reason == FinishReason::Eos as i32 {
            return;
        }
    }
    panic!("no seed in 0..40 ended on end-of-sequence within 200 tokens");
}

#[tokio::test]
async fn stop_sequences_are_honoured_and_excluded() {
    let server = shared_language();
    let mut c = client(server).await;
    let prompt = "This dress is";
    let full = c
        .generate(request(prompt, greedy(64)))
        .await
        .expect("generate")
        .into_inner();
    // A stop sequence taken from the middle of the greedy output: the same greedy decode must
    // end right before its first occurrence.
    let words: Vec<&str> = full.text.split_whitespace().collect();
    let stop = words
        .iter()
        .skip(3)
        .find(|w| w.len() >= 3)
        .map(|w| format!(" {w}"))
        .expect("a word to stop on");
    let cut = full.text.find(&stop).expect("stop occurs");
    let params = GenerationParameters {
        stop: vec!["never appears \u{1F600}".into(), stop.clone()],
        ..greedy(64)
    };
    let stopped = c
        .generate(request(prompt, params.clone()))
        .await
        .expect("generate")
        .into_inner();
    assert_eq!(
        stopped.summary.as_ref().unwrap().finish_reason,
        FinishReason::Stop as i32
    );
    assert_eq!(stopped.text, full.text[..cut]);
    assert!(!stopped.text.contains(&stop));
    let streamed = stream(&mut c, request(prompt, params)).await;
    assert_eq!(streamed.deltas.concat(), stopped.text);
    assert!(
        streamed.deltas.iter().all(|d| !d.contains(stop.trim())),
        "no message carries any part of the stop word: {:?}",
        streamed.deltas
    );
    assert_eq!(streamed.summary.finish_reason, FinishReason::Stop as i32);
}

/// Argmax of the last row of full-recompute logits from the OIP path (no KV cache).
async fn reference_greedy(server: &TestServer, prompt_ids: &[u32], n: usize, eos: u32) -> Vec<u32> {
    let mut oip = server.oip().await;
    let mut ids: Vec<i64> = prompt_ids.iter().map(|&t| i64::from(t)).collect();
    let mut out = Vec::new();
    for _ in 0..n {
        let resp = oip
            .model_infer(ModelInferRequest {
                model_name: MODEL.into(),
                inputs: vec![InferInputTensor {
                    name: "input_ids".into(),
                    datatype: "INT64".into(),
                    shape: vec![1, ids.len() as i64],
                    contents: Some(marquee_proto::inference::InferTensorContents {
                        int64_contents: ids.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .expect("model infer")
            .into_inner();
        let shape = &resp.outputs[0].shape;
        let vocab = shape[2] as usize;
        let logits = &resp.outputs[0].contents.as_ref().unwrap().fp32_contents;
        assert_eq!(logits.len(), ids.len() * vocab);
        let last = &logits[(ids.len() - 1) * vocab..];
        let mut best = 0;
        for (i, &l) in last.iter().enumerate() {
            if l > last[best] {
                best = i;
            }
        }
        let next = best as u32;
        out.push(next);
        if next == eos {
            break;
        }
        ids.push(i64::from(next));
    }
    out
}

#[tokio::test]
async fn greedy_decoding_matches_full_recompute_without_the_cache() {
    let server = shared_language();
    let mut c = client(server).await;
    for prompt in [
        "I love the color of this",
        "Fits true to size and the",
        "Returned it because",
    ] {
        let tokens = c
            .tokenize(TokenizeRequest {
                model: MODEL.into(),
                text: prompt.into(),
            })
            .await
            .expect("tokenize")
            .into_inner()
            .tokens;
        let mut prompt_ids = vec![0u32]; // BOS, from model.toml
        prompt_ids.extend(tokens.iter().map(|t| t.id));
        let n = 40;
        let got = c
            .generate(request(prompt, greedy(n as u32)))
            .await
            .expect("generate")
            .into_inner();
        let summary = got.summary.unwrap();
        assert_eq!(summary.prompt_tokens as usize, prompt_ids.len());
        let reference = reference_greedy(server, &prompt_ids, n, 0).await;
        let mut served = got.token_ids.clone();
        if summary.finish_reason == FinishReason::Eos as i32 {
            served.push(0);
        }
        assert_eq!(
            served, reference,
            "KV-cache greedy == full recompute for `{prompt}`"
        );
    }
}

#[tokio::test]
async fn a_cancelled_stream_frees_its_slot_for_the_next_request() {
    let mut s = language_settings();
    s.language.max_batch_size = 1;
    let server = start_language(s).await;
    let steps =
        |server: &TestServer| server.metric("marquee_batcher_batches_total", &[("model", MODEL)]);
    let mut c = client(&server).await;
    let mut long = c
        .generate_stream(request("The jacket", greedy(200)))
        .await
        .expect("stream")
        .into_inner();
    long.next().await.expect("first message").expect("ok");
    let before = steps(&server);
    drop(long);
    // The only slot was taken by a 200-token generation; the next request is served as soon as
    // the cancelled one leaves, not after it would have finished.
    let next = c
        .generate(request("The skirt", greedy(5)))
        .await
        .expect("served after the cancel")
        .into_inner();
    assert_eq!(next.summary.unwrap().generated_tokens, 5);
    let used = steps(&server) - before;
    assert!(
        used < 60.0,
        "{used} model steps between the cancel and the next request's end; the cancelled stream had ~199 left"
    );
    assert_eq!(
        server.metric(
            "marquee_batcher_rejected_total",
            &[("model", MODEL), ("reason", "cancelled")]
        ),
        1.0
    );
    server.shutdown.cancel();
}

#[tokio::test]
async fn a_full_queue_is_refused_at_once_with_retry_info() {
    let mut s = language_settings();
    s.language.max_batch_size = 1;
    s.language.queue_capacity = 1;
    let server = start_language(s).await;
    let mut c = client(&server).await;
    let mut long = c
        .generate_stream(request("The jacket", greedy(200)))
        .await
        .expect("stream")
        .into_inner();
    long.next().await.expect("first message").expect("ok");
    let mut c2 = client(&server).await;
    let queued = tokio::spawn(async move { c2.generate(request("The skirt", greedy(3))).await });
    // Wait until the second request is in the queue.
    let depth = || server.metric("marquee_batcher_queue_depth", &[("model", MODEL)]);
    wait_until(
        "the second request to be queued",
        std::time::Duration::from_secs(30),
        || async { (depth() >= 1.0).then_some(()) },
    )
    .await;
    assert_eq!(depth(), 1.0, "the second request waits in the queue");
    let err = c
        .generate(request("The hat", greedy(3)))
        .await
        .expect_err("queue full");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("queue_capacity"),
        "{}",
        err.message()
    );
    assert!(err.get_details_retry_info().is_some(), "RetryInfo attached");
    drop(long);
    let served = queued
        .await
        .unwrap()
        .expect("queued request served after the cancel");
    assert_eq!(served.into_inner().summary.unwrap().generated_tokens, 3);
    server.shutdown.cancel();
}

#[tokio::test]
async fn every_bad_request_names_the_field_the_limit_and_the_value() {
    let server = shared_language();
    let mut c = client(server).await;
    let long_prompt = "great dress ".repeat(300);
    let mid_prompt = "great dress ".repeat(60);
    let p = GenerationParameters::default;
    let cases: Vec<(String, GenerationParameters, &str, &str)> = vec![
        ("".into(), p(), "prompt", "must not be empty"),
        (long_prompt, p(), "prompt", "less than 256 tokens"),
        (
            "hi".into(),
            GenerationParameters {
                max_new_tokens: Some(0),
                ..p()
            },
            "parameters.max_new_tokens",
            "got 0",
        ),
        (
            "hi".into(),
            GenerationParameters {
                max_new_tokens: Some(1000),
                ..p()
            },
            "parameters.max_new_tokens",
            "at most 255",
        ),
        (
            mid_prompt,
            GenerationParameters {
                max_new_tokens: Some(200),
                ..p()
            },
            "parameters.max_new_tokens",
            "must be <= 256",
        ),
        (
            "hi".into(),
            GenerationParameters {
                temperature: Some(0.0),
                ..p()
            },
            "parameters.temperature",
            "got 0",
        ),
        (
            "hi".into(),
            GenerationParameters {
                temperature: Some(-1.0),
                ..p()
            },
            "parameters.temperature",
            "got -1",
        ),
        (
            "hi".into(),
            GenerationParameters {
                temperature: Some(f32::NAN),
                ..p()
            },
            "parameters.temperature",
            "got NaN",
        ),
        (
            "hi".into(),
            GenerationParameters {
                top_p: Some(0.0),
                ..p()
            },
            "parameters.top_p",
            "(0, 1], got 0",
        ),
        (
            "hi".into(),
            GenerationParameters {
                top_p: Some(1.01),
                ..p()
            },
            "parameters.top_p",
            "got 1.01",
        ),
        (
            "hi".into(),
            GenerationParameters {
                top_k: Some(-5),
                ..p()
            },
            "parameters.top_k",
            "got -5",
        ),
        (
            "hi".into(),
            GenerationParameters {
                typical_p: Some(1.0),
                ..p()
            },
            "parameters.typical_p",
            "(0, 1), got 1",
        ),
        (
            "hi".into(),
            GenerationParameters {
                typical_p: Some(0.0),
                ..p()
            },
            "parameters.typical_p",
            "got 0",
        ),
        (
            "hi".into(),
            GenerationParameters {
                repetition_penalty: Some(0.0),
                ..p()
            },
            "parameters.repetition_penalty",
            "got 0",
        ),
        (
            "hi".into(),
            GenerationParameters {
                repetition_penalty: Some(11.0),
                ..p()
            },
            "parameters.repetition_penalty",
            "(0, 10]",
        ),
        (
            "hi".into(),
            GenerationParameters {
                frequency_penalty: Some(2.5),
                ..p()
            },
            "parameters.frequency_penalty",
            "[-2, 2], got 2.5",
        ),
        (
            "hi".into(),
            GenerationParameters {
                presence_penalty: Some(-2.5),
                ..p()
            },
            "parameters.presence_penalty",
            "got -2.5",
        ),
        (
            "hi".into(),
            GenerationParameters {
                stop: vec!["a".into(); 5],
                ..p()
            },
            "parameters.stop",
            "at most 4 stop sequences, got 5",
        ),
        (
            "hi".into(),
            GenerationParameters {
                stop: vec!["ok".into(), "y".repeat(65)],
                ..p()
            },
            "parameters.stop[1]",
            "1..=64 bytes, got 65",
        ),
        (
            "hi".into(),
            GenerationParameters {
                stop: vec![String::new()],
                ..p()
            },
            "parameters.stop[0]",
            "got 0 bytes",
        ),
        (
            "hi".into(),
            GenerationParameters {
                min_new_tokens: 9,
                max_new_tokens: Some(4),
                ..p()
            },
            "parameters.min_new_tokens",
            "(4), got 9",
        ),
    ];
    for (prompt, params, field, text) in cases {
        let err = c
            .generate(request(&prompt, params.clone()))
            .await
            .expect_err(&format!("{field} must be refused"));
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().contains(text),
            "{field}: `{}` lacks `{text}`",
            err.message()
        );
        let br = err.get_details_bad_request().expect("BadRequest details");
        assert_eq!(br.field_violations[0].field, field);
        // The stream refuses the same way, before any message.
        let err = c
            .generate_stream(request(&prompt, params))
            .await
            .expect_err("stream refused too");
        assert_eq!(err.code(), Code::InvalidArgument);
    }
    let err = c
        .generate(GenerateRequest {
            model: "gpt5".into(),
            prompt: "hi".into(),
            parameters: None,
        })
        .await
        .expect_err("unknown model");
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("gpt5") && err.message().contains(MODEL));
}

/// `GenerateRequest` as the wire sees it, with `prompt` as raw bytes, to send invalid UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct RawGenerateRequest {
    #[prost(string, tag = "1")]
    model: String,
    #[prost(bytes = "vec", tag = "2")]
    prompt: Vec<u8>,
}

#[tokio::test]
async fn invalid_utf8_is_invalid_argument_naming_the_field() {
    let server = shared_language();
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/marquee.language.v1.TextGeneration/Generate");
    let codec = tonic_prost::ProstCodec::<RawGenerateRequest, RawGenerateRequest>::default();
    let err = grpc
        .unary(
            tonic::Request::new(RawGenerateRequest {
                model: String::new(),
                prompt: vec![b'h', 0xff, 0xfe, b'i'],
            }),
            path,
            codec,
        )
        .await
        .expect_err("invalid UTF-8 refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("`prompt` must be valid UTF-8"),
        "{}",
        err.message()
    );
    let br = err.get_details_bad_request().expect("BadRequest");
    assert_eq!(br.field_violations[0].field, "prompt");
}

#[tokio::test]
async fn length_and_token_accounting() {
    let server = shared_language();
    let mut c = client(server).await;
    let r = c
        .generate(request(
            "Soft fabric",
            GenerationParameters {
                min_new_tokens: 7,
                ..greedy(7)
            },
        ))
        .await
        .expect("generate")
        .into_inner();
    let s = r.summary.unwrap();
    assert_eq!(s.finish_reason, FinishReason::Length as i32);
    assert_eq!(s.generated_tokens, 7);
    assert_eq!(r.token_ids.len(), 7);
    assert!(s.time_to_first_token_ms > 0.0 && s.total_ms >= s.time_to_first_token_ms);
    let tokens = c
        .tokenize(TokenizeRequest {
            model: String::new(),
            text: "Soft fabric".into(),
        })
        .await
        .expect("tokenize")
        .into_inner()
        .tokens;
    assert_eq!(s.prompt_tokens as usize, tokens.len() + 1, "BOS + prompt");
    let rebuilt: String = tokens.iter().map(|t| t.text.as_str()).collect();
    assert_eq!(rebuilt, "Soft fabric");
    assert_eq!(tokens.last().unwrap().end as usize, "Soft fabric".len());
}

#[tokio::test]
async fn generated_text_is_mostly_real_english_words() {
    // An English word list independent of the training corpus (Debian `wamerican`).
    let dict: HashSet<String> = std::fs::read_to_string("/usr/share/dict/words")
        .expect("wamerican installed by the bootstrap")
        .lines()
        .map(|w| w.to_lowercase())
        .collect();
    let server = shared_language();
    let mut c = client(server).await;
    let prompts = [
        "I ordered this blouse",
        "The material is",
        "Love it!",
        "I wanted to love this",
        "Great jeans",
        "The color",
        "Beautiful dress but",
        "Nice top,",
    ];
    let (mut words, mut real) = (0usize, 0usize);
    for (i, prompt) in prompts.iter().enumerate() {
        let params = GenerationParameters {
            max_new_tokens: Some(64),
            temperature: Some(0.8),
            top_k: Some(40),
            seed: Some(i as u64),
            ..Default::default()
        };
        let text = c
            .generate(request(prompt, params))
            .await
            .expect("generate")
            .into_inner()
            .text;
        for w in text.split(|ch: char| !ch.is_ascii_alphabetic()) {
            // Single letters ("i", "a", the "s" of "it's") say nothing either way.
            if w.len() < 2 {
                continue;
            }
            words += 1;
            real += usize::from(dict.contains(&w.to_lowercase()));
        }
    }
    let rate = real as f64 / words as f64;
    println!("real-word rate: {real}/{words} = {rate:.3}");
    assert!(words >= 200, "enough words to measure: {words}");
    assert!(
        rate >= 0.85,
        "only {rate:.3} of generated words are English words"
    );
}

const LM_KEY: &str = "language-test-key-4f21c7";

#[tokio::test]
async fn streams_pass_through_the_gateway_with_auth_and_scopes() {
    use marquee_gateway::config::{ApiKey, Backend, BackendKind};
    let lm = shared_language();
    let mut s = gateway_settings(&[lm.grpc_addr]);
    s.backends.clear();
    s.backends.insert(
        "language".into(),
        Backend {
            kind: BackendKind::Language,
            endpoints: vec![lm.grpc_addr.to_string()],
            health_interval_ms: 100,
            models_refresh_ms: 500,
            ..Backend::default()
        },
    );
    s.auth.api_keys.push(ApiKey {
        sha256: marquee_gateway::auth::hash_key(LM_KEY),
        tenant: "acme".into(),
        scopes: vec!["language:generate".into()],
    });
    let gw = start_gateway(s).await;
    let channel = gw.channel().await;
    let mut via = TextGenerationClient::new(channel);
    let mut direct = client(lm).await;
    let prompt = "The buttons on this cardigan";
    let want = direct
        .generate(request(prompt, greedy(24)))
        .await
        .expect("direct")
        .into_inner();

    // The stream through the gateway: same tokens, several messages, one final summary.
    let mut stream = via
        .generate_stream(with_key(request(prompt, greedy(24)), LM_KEY))
        .await
        .expect("stream through the gateway")
        .into_inner();
    let (mut text, mut ids, mut messages, mut finals) = (String::new(), Vec::new(), 0, 0);
    while let Some(m) = stream.next().await {
        let m = m.expect("message");
        text.push_str(&m.text);
        ids.extend(m.token_ids);
        messages += 1;
        finals += usize::from(m.summary.is_some());
    }
    assert_eq!(ids, want.token_ids);
    assert_eq!(text, want.text);
    assert!(
        messages > 2 && finals == 1,
        "{messages} messages, {finals} final"
    );

    // Unary and tokenize through the gateway, with the model left unset.
    let unary = via
        .generate(with_key(request(prompt, greedy(24)), LM_KEY))
        .await
        .expect("unary through the gateway")
        .into_inner();
    assert_eq!(unary.token_ids, want.token_ids);
    let tokens = via
        .tokenize(with_key(
            TokenizeRequest {
                model: String::new(),
                text: prompt.into(),
            },
            LM_KEY,
        ))
        .await
        .expect("tokenize through the gateway")
        .into_inner()
        .tokens;
    assert_eq!(
        tokens.len() + 1,
        want.summary.unwrap().prompt_tokens as usize
    );

    // Validation errors come back unchanged; auth is the gateway's.
    let err = via
        .generate(with_key(request("", greedy(4)), LM_KEY))
        .await
        .expect_err("empty prompt");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.get_details_bad_request().unwrap().field_violations[0].field,
        "prompt"
    );
    let err = via
        .generate_stream(with_key(request(prompt, greedy(4)), ACME_KEY))
        .await
        .expect_err("vision-only key");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("language:generate"),
        "{}",
        err.message()
    );
    let err = via
        .generate_stream(request(prompt, greedy(4)))
        .await
        .expect_err("no credentials");
    assert_eq!(err.code(), Code::Unauthenticated);
    gw.shutdown.cancel();
}

#[tokio::test]
async fn special_token_text_in_a_prompt_is_plain_text() {
    let server = shared_language();
    let mut c = client(server).await;
    let text = "great<|endoftext|>dress";
    let tokens = c
        .tokenize(TokenizeRequest {
            model: String::new(),
            text: text.into(),
        })
        .await
        .expect("tokenize")
        .into_inner()
        .tokens;
    assert!(
        tokens.iter().all(|t| t.id != 0),
        "the control token (id 0) must not come from user text: {tokens:?}"
    );
    let rebuilt: String = tokens.iter().map(|t| t.text.as_str()).collect();
    assert_eq!(rebuilt, text);
    assert_eq!(tokens.last().unwrap().end as usize, text.len());
}

/// `num_return_sequences`: one prefill of the prompt, copied into every sequence's slot; each
/// sequence samples with its own seed and equals a lone request with that seed, streamed and
/// unary. Its own server, so the prompt-token counter shows exactly one prefill.
#[tokio::test]
async fn several_sequences_share_one_prefill_and_each_equals_its_seed_alone() {
    let server = start_language(language_settings()).await;
    let mut c = client(&server).await;
    let prompt = "This skirt is";
    let prompt_tokens = c
        .tokenize(TokenizeRequest {
            model: String::new(),
            text: prompt.into(),
        })
        .await
        .expect("tokenize")
        .into_inner()
        .tokens
        .len()
        + 1; // BOS
    let prefilled = || server.metric("marquee_language_prompt_tokens_total", &[("model", MODEL)]);
    let mut params = sampled(77, 24);
    params.num_return_sequences = 4;
    let before = prefilled();
    let unary = c
        .generate(request(prompt, params.clone()))
        .await
        .expect("generate")
        .into_inner();
    assert_eq!(
        prefilled() - before,
        prompt_tokens as f64,
        "four sequences, one prefill of the prompt"
    );
    assert_eq!(unary.sequences.len(), 4);
    let seeds: HashSet<u64> = unary
        .sequences
        .iter()
        .map(|s| s.summary.as_ref().expect("summary").seed)
        .collect();
    assert_eq!(seeds.len(), 4, "each sequence has its own seed");
    assert_eq!(unary.sequences[0].summary.as_ref().unwrap().seed, 77);
    assert_eq!(unary.token_ids, unary.sequences[0].token_ids);
    assert_eq!(unary.text, unary.sequences[0].text);
    let distinct: HashSet<&Vec<u32>> = unary.sequences.iter().map(|s| &s.token_ids).collect();
    assert!(distinct.len() > 1, "samples differ: {:?}", unary.sequences);
    for (i, seq) in unary.sequences.iter().enumerate() {
        assert_eq!(seq.index as usize, i);
        let seed = seq.summary.as_ref().unwrap().seed;
        let alone = c
            .generate(request(prompt, sampled(seed, 24)))
            .await
            .expect("generate")
            .into_inner();
        assert_eq!(
            alone.token_ids, seq.token_ids,
            "sequence {i} == its seed alone"
        );
        assert_eq!(alone.text, seq.text);
    }

    // Streamed: messages carry their sequence's index; per index the same ids and text, and one
    // summary each.
    let mut s = c
        .generate_stream(request(prompt, params.clone()))
        .await
        .expect("stream starts")
        .into_inner();
    let mut ids = vec![Vec::new(); 4];
    let mut texts = vec![String::new(); 4];
    let mut summaries = [0; 4];
    while let Some(msg) = s.next().await {
        let msg = msg.expect("stream message");
        let i = msg.index as usize;
        assert_eq!(summaries[i], 0, "nothing follows a sequence's summary");
        ids[i].extend(msg.token_ids);
        texts[i].push_str(&msg.text);
        if msg.summary.is_some() {
            summaries[i] += 1;
        }
    }
    assert_eq!(summaries, [1; 4]);
    for (i, seq) in unary.sequences.iter().enumerate() {
        assert_eq!(ids[i], seq.token_ids, "streamed sequence {i}");
        assert_eq!(texts[i], seq.text);
    }

    // Refused: several sequences of a greedy decode, and more than the limit.
    for (n, sample, needle) in [
        (2, false, "decoding is greedy"),
        (
            9,
            true,
            "at most 8 (`language.max_return_sequences`), got 9",
        ),
    ] {
        let mut p = if sample { sampled(1, 8) } else { greedy(8) };
        p.num_return_sequences = n;
        let e = c.generate(request(prompt, p)).await.expect_err("refused");
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains(needle), "{}", e.message());
        assert_eq!(
            e.get_details_bad_request()
                .expect("field violation")
                .field_violations[0]
                .field,
            "parameters.num_return_sequences"
        );
    }
}

/// With several causal LMs in the repository (`gpt_reviews` and the character RNN
/// `textgenrnn`), a request without a model name gets `language.default_model`, or is refused
/// naming the models when none is set; a named model is served by its own engine.
#[tokio::test]
async fn an_empty_model_name_gets_the_default_model_or_is_refused_among_several() {
    let mut settings = language_settings();
    settings.language.default_model = String::new();
    let server = start_language(settings).await;
    let mut c = client(&server).await;
    let e = c
        .generate(request("The dress", greedy(4)))
        .await
        .expect_err("no default among several");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        e.get_details_bad_request()
            .expect("field violation")
            .field_violations[0]
            .field,
        "model"
    );
    for name in ["gpt_reviews", "textgenrnn"] {
        assert!(e.message().contains(name), "{}", e.message());
    }
    let mut named = request("The movie was", sampled(3, 30));
    named.model = "textgenrnn".into();
    let out = c.generate(named).await.expect("generate").into_inner();
    assert_eq!(out.model, "textgenrnn");
    // One token per character, plus its `<s>` BOS.
    assert_eq!(out.summary.as_ref().unwrap().prompt_tokens, 14);
    assert!(!out.text.is_empty());

    let shared = shared_language();
    let mut c = client(shared).await;
    let out = c
        .generate(request("The dress", greedy(4)))
        .await
        .expect("the default model")
        .into_inner();
    assert_eq!(out.model, MODEL);
}
