//! Issue 10, items 10 and 11, end to end over real gRPC:
//! - the language service's OIP `ModelInfer` (raw logits) gets a bounded share of each engine
//!   iteration and a bounded queue, and work whose caller left is never computed;
//! - the recommendation feedback log never acknowledges an event that a restart would not
//!   replay, also when the disk fills up mid-record (`RLIMIT_FSIZE` on the real binary).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use marquee_e2e::state::histogram;
use marquee_e2e::*;
use marquee_proto::inference::ModelInferRequest;
use marquee_proto::inference::model_infer_request::InferInputTensor;
use marquee_proto::language::text_generation_client::TextGenerationClient;
use marquee_proto::language::{FinishReason, GenerateRequest, GenerationParameters};
use tonic::Code;
use tonic_types::StatusExt;

// === item 10: the language service's OIP share ===

const LM: &str = "gpt_reviews";
/// The model's context: every OIP call below is one full-context row.
const CONTEXT: usize = 256;

/// A one-row full-context `input_ids`, distinct per `k`, as raw little-endian INT64.
fn oip_ids(k: usize) -> Vec<i64> {
    (0..CONTEXT)
        .map(|i| ((i * 7 + k * 131) % 2000 + 1) as i64)
        .collect()
}

fn oip_request(ids: &[i64], rows: usize) -> ModelInferRequest {
    let mut raw = Vec::with_capacity(ids.len() * 8 * rows);
    for _ in 0..rows {
        raw.extend(ids.iter().flat_map(|v| v.to_le_bytes()));
    }
    ModelInferRequest {
        model_name: LM.into(),
        inputs: vec![InferInputTensor {
            name: "input_ids".into(),
            datatype: "INT64".into(),
            shape: vec![rows as i64, ids.len() as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![raw.into()],
        ..Default::default()
    }
}

fn lm_metric(server: &TestServer, name: &str, extra: &[(&str, &str)]) -> f64 {
    let mut labels = vec![("model", LM)];
    labels.extend_from_slice(extra);
    server.metric(name, &labels)
}

fn oip_outcome(server: &TestServer, outcome: &str) -> f64 {
    lm_metric(
        server,
        "marquee_language_oip_requests_total",
        &[("outcome", outcome)],
    )
}

fn step_count(server: &TestServer, phase: &str) -> u64 {
    histogram(
        &server.metrics,
        "marquee_language_step_seconds",
        &[("model", LM), ("phase", phase)],
    )
    .count
}

/// A burst of raw-logit calls while a stream runs: 40 valid calls, 12 whose callers leave
/// while they wait, 12 with a 2 ms deadline. With an OIP budget of one full-context row per
/// engine iteration, the stream gets a decode step after every OIP batch, no iteration computes
/// more than the budget, the valid calls get the same logits bit for bit as when sent alone,
/// and no call whose caller left is computed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oip_burst_shares_the_step_budget_and_skips_callers_that_left() {
    const VALID: usize = 40;
    const LEAVING: usize = 12;
    const SHORT: usize = 12;
    let mut s = language_settings();
    s.language.oip_max_tokens_per_step = CONTEXT;
    // gpt_reviews alone: the budget is sized to its context (textgenrnn's is 2048).
    s.repository.models = vec!["gpt_reviews".into()];
    let server = start_language(s).await;
    let oip = server.oip().await.max_decoding_message_size(16 << 20);

    // Each distinct input sent alone, on a quiet engine: the reference logits.
    let mut reference = Vec::new();
    for k in 0..4 {
        let resp = oip
            .clone()
            .model_infer(oip_request(&oip_ids(k), 1))
            .await
            .expect("a lone OIP call is served")
            .into_inner();
        assert_eq!(resp.outputs[0].shape, vec![1, CONTEXT as i64, 2048]);
        reference.push(resp.raw_output_contents[0].clone());
    }
    let computed_before = oip_outcome(&server, "computed");
    let queued_before = lm_metric(&server, "marquee_language_oip_queued_total", &[]);
    let dropped =
        |server: &TestServer| oip_outcome(server, "cancelled") + oip_outcome(server, "deadline");
    let dropped_before = dropped(&server);

    // 1. The valid burst; it waits in the OIP queue, one call per iteration.
    let stream_tokens = Arc::new(AtomicUsize::new(0));
    let valid: Vec<_> = (0..VALID)
        .map(|i| {
            let (mut c, seen) = (oip.clone(), stream_tokens.clone());
            tokio::spawn(async move {
                let mut r = tonic::Request::new(oip_request(&oip_ids(i % 4), 1));
                r.set_timeout(Duration::from_secs(60));
                let out = c.model_infer(r).await;
                (out, seen.load(Ordering::SeqCst))
            })
        })
        .collect();
    let depth = || lm_metric(&server, "marquee_language_oip_queue_depth", &[]);
    wait_until("24 OIP calls queued", Duration::from_secs(60), || async {
        (depth() >= 24.0).then_some(())
    })
    .await;

    // 2. Callers that leave while their call waits behind the valid burst: sent before the
    //    stream starts, so the burst has not drained behind the stream's start on a loaded
    //    machine (depth 4 here once).
    let leaving: Vec<_> = (0..LEAVING)
        .map(|i| {
            let mut c = oip.clone();
            tokio::spawn(async move { c.model_infer(oip_request(&oip_ids(i % 4), 1)).await })
        })
        .collect();
    let queued = || lm_metric(&server, "marquee_language_oip_queued_total", &[]) - queued_before;
    wait_until(
        "the leaving callers' calls queued",
        Duration::from_secs(60),
        || async { (queued() >= (VALID + LEAVING) as f64).then_some(()) },
    )
    .await;
    assert!(
        depth() >= (LEAVING + 6) as f64,
        "the leaving calls wait behind the burst (depth {})",
        depth()
    );
    for h in &leaving {
        h.abort();
    }

    // 3. A stream starts meanwhile, and must keep receiving tokens through the burst.
    let mut text = TextGenerationClient::new(server.channel().await);
    let mut stream = text
        .generate_stream(GenerateRequest {
            model: String::new(),
            prompt: "The dress".into(),
            parameters: Some(GenerationParameters {
                max_new_tokens: Some(200),
                min_new_tokens: 200,
                ..Default::default()
            }),
        })
        .await
        .expect("stream starts")
        .into_inner();
    let first = stream.next().await.expect("a first message").expect("ok");
    stream_tokens.fetch_add(first.token_ids.len(), Ordering::SeqCst);
    let decode_steps_before = step_count(&server, "decode");
    let oip_steps_before = step_count(&server, "oip");
    let seen = stream_tokens.clone();
    let reader = tokio::spawn(async move {
        let mut summary = None;
        while let Some(msg) = stream.next().await {
            let msg = msg.expect("stream message");
            seen.fetch_add(msg.token_ids.len(), Ordering::SeqCst);
            summary = summary.or(msg.summary);
        }
        summary.expect("a final summary")
    });

    // 4. Calls whose 2 ms deadline passes long before their turn.
    let short = futures::future::join_all((0..SHORT).map(|i| {
        let mut c = oip.clone();
        async move {
            let mut r = tonic::Request::new(oip_request(&oip_ids(i % 4), 1));
            r.set_timeout(Duration::from_millis(2));
            c.model_infer(r).await
        }
    }))
    .await;
    for r in &short {
        let code = r.as_ref().expect_err("a 2 ms call behind the burst").code();
        assert!(
            matches!(code, Code::DeadlineExceeded | Code::Cancelled),
            "{code:?}"
        );
    }

    // Every valid call: the reference logits, bit for bit.
    let mut seen_at_reply = Vec::new();
    for (i, h) in valid.into_iter().enumerate() {
        let (out, seen) = h.await.unwrap();
        let resp = out.expect("valid call served").into_inner();
        assert!(
            resp.raw_output_contents[0] == reference[i % 4],
            "call {i}: logits differ from the same call sent alone"
        );
        seen_at_reply.push(seen);
    }
    // Every OIP batch since the stream started was followed by a decode step (the stream,
    // 200 tokens long, outlives the burst's few dozen batches unless the batches starve it).
    let oip_batches = step_count(&server, "oip") - oip_steps_before;
    let decode_steps = step_count(&server, "decode") - decode_steps_before;
    assert!(
        decode_steps + 1 >= oip_batches,
        "{decode_steps} decode steps for {oip_batches} OIP batches: the stream waited"
    );
    // Among the replies after the stream's first token, the stream's count kept rising.
    let during: Vec<usize> = seen_at_reply.into_iter().filter(|&n| n > 0).collect();
    assert!(
        during.len() >= 2,
        "OIP replies while the stream ran: {during:?}"
    );
    let (lo, hi) = (*during.iter().min().unwrap(), *during.iter().max().unwrap());
    assert!(
        hi > lo,
        "the stream received tokens between OIP replies ({lo}..{hi})"
    );

    // Nothing queued remains; the leaving and expired calls were dropped, never computed.
    wait_until(
        "the OIP queue to empty",
        Duration::from_secs(60),
        || async { (depth() == 0.0).then_some(()) },
    )
    .await;
    assert_eq!(
        oip_outcome(&server, "computed") - computed_before,
        VALID as f64,
        "only the valid calls were computed"
    );
    let dropped_n = dropped(&server) - dropped_before;
    assert!(
        dropped_n >= queued() - VALID as f64 && dropped_n >= LEAVING as f64,
        "{dropped_n} dropped of {} queued",
        queued()
    );
    let per_step = histogram(
        &server.metrics,
        "marquee_language_oip_step_tokens",
        &[("model", LM)],
    );
    assert_eq!(
        per_step.at_most(CONTEXT as f64),
        per_step.count,
        "no iteration computed more than the OIP budget: {per_step:?}"
    );
    assert_eq!(
        per_step.sum,
        (CONTEXT * (VALID + 4)) as f64,
        "the references and the valid calls, nothing else"
    );

    let summary = reader.await.unwrap();
    assert_eq!(summary.generated_tokens, 200);
    assert_eq!(summary.finish_reason, FinishReason::Length as i32);
    assert_eq!(stream_tokens.load(Ordering::SeqCst), 200);
    server.shutdown.cancel();
}

/// The OIP queue is bounded (`RESOURCE_EXHAUSTED` with `RetryInfo`, naming the key), a call
/// larger than the per-iteration budget is refused naming its key, and a budget below the
/// model's context fails the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oip_queue_is_bounded_and_oversize_calls_are_refused() {
    let mut bad = language_settings();
    bad.language.oip_max_tokens_per_step = CONTEXT - 1;
    // gpt_reviews alone: the budget is sized to its context (textgenrnn's is 2048).
    bad.repository.models = vec!["gpt_reviews".into()];
    let err = marquee_language::start(bad, Default::default())
        .await
        .err()
        .expect("a budget below the context is refused at start");
    assert!(err.to_string().contains("oip_max_tokens_per_step"), "{err}");

    let mut s = language_settings();
    s.language.oip_max_tokens_per_step = CONTEXT;
    // gpt_reviews alone: the budget is sized to its context (textgenrnn's is 2048).
    s.repository.models = vec!["gpt_reviews".into()];
    s.language.oip_queue_capacity = 4;
    let server = start_language(s).await;
    let oip = server.oip().await.max_decoding_message_size(16 << 20);

    let err = oip
        .clone()
        .model_infer(oip_request(&oip_ids(0)[..200], 2))
        .await
        .expect_err("2 x 200 tokens > the budget of 256");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("language.oip_max_tokens_per_step") && err.message().contains("400"),
        "{}",
        err.message()
    );

    // Bursts of 24 concurrent full-context calls against a queue of 4: some are refused at
    // once, every other one is served. (A few rounds, bounded, in case one burst drained.)
    let mut refused = 0;
    for _round in 0..5 {
        let results = futures::future::join_all((0..24).map(|i| {
            let mut c = oip.clone();
            async move { c.model_infer(oip_request(&oip_ids(i % 4), 1)).await }
        }))
        .await;
        for r in results {
            match r {
                Ok(resp) => assert_eq!(
                    resp.into_inner().raw_output_contents[0].len(),
                    CONTEXT * 2048 * 4
                ),
                Err(e) => {
                    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                    assert!(
                        e.message().contains("language.oip_queue_capacity"),
                        "{}",
                        e.message()
                    );
                    assert!(e.get_details_retry_info().is_some(), "RetryInfo attached");
                    refused += 1;
                }
            }
        }
        if refused > 0 {
            break;
        }
    }
    assert!(refused > 0, "a queue of 4 never overflowed");
    assert_eq!(oip_outcome(&server, "queue_full"), refused as f64);
    server.shutdown.cancel();
}
