//! Hardening of the server stack every service and the gateway run (issue 10): metric labels
//! from a closed set (item 3), `INTERNAL` statuses that carry only a reference (item 12), and
//! open calls and stalled request bodies that cannot hold the serving capacity (item 13).
//! Real servers on `127.0.0.1:0`, real models, real gRPC and raw HTTP/2 clients.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use marquee_e2e::server::*;
use marquee_e2e::*;
use marquee_proto::common::Tensor;
use marquee_proto::inference::{InferTensorContents, ModelInferRequest, model_infer_request};
use marquee_proto::vision::classify_batch_item::Result as ItemResult;
use marquee_proto::vision::image_input::Source;
use marquee_proto::vision::*;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// Generous bound on anything a test waits for; outcomes are asserted, never timings.
const PATIENCE: Duration = Duration::from_secs(60);

/// Sends `n` calls to random paths, 64 at a time over `channel`; counts the codes.
async fn flood(channel: &Channel, seed: u64, n: usize, key: Option<&str>) -> BTreeMap<i32, usize> {
    let mut rng = Rng::new(seed);
    let paths: Vec<String> = (0..n).map(|_| rng.path(4_000)).collect();
    futures::stream::iter(paths)
        .map(|p| {
            let ch = channel.clone();
            async move { call_path(ch, &p, key).await }
        })
        .buffer_unordered(64)
        .fold(BTreeMap::new(), |mut m, code| async move {
            *m.entry(code as i32).or_insert(0) += 1;
            m
        })
        .await
}

/// Asserts a second scrape has the series of the first (plus at most a few new codes of known
/// methods, e.g. a health check that timed out under the flood) and about its size.
fn assert_same_series(who: &str, before: &str, after: &str) {
    let (b, a) = (series(before), series(after));
    let new: Vec<&String> = a.difference(&b).collect();
    assert!(
        new.len() <= 4 && new.iter().all(|s| !s.contains("unknown")),
        "{who}: random paths added {} series, e.g. {:?}",
        new.len(),
        new.iter()
            .take(3)
            .map(|s| &s[..s.len().min(200)])
            .collect::<Vec<_>>()
    );
    assert!(
        after.len() <= before.len() + 8 * 1024,
        "{who}: /metrics grew from {} to {} bytes",
        before.len(),
        after.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_paths_add_no_metric_series() {
    let backend = start(fashion_backend_settings()).await;
    let gateway = start_gateway(gateway_settings(&[backend.grpc_addr])).await;
    let gw = gateway.channel().await;
    let be = backend.channel().await;

    // The first unknown path of each kind creates its `unknown` series.
    assert_eq!(
        call_path(gw.clone(), "/a/b", None).await,
        Code::Unauthenticated
    );
    assert_eq!(
        call_path(be.clone(), "/a/b", None).await,
        Code::Unimplemented
    );
    let mut limited = Vec::new();
    for _ in 0..6 {
        limited.push(call_path(gw.clone(), "/a/b", Some(LIMITED_KEY)).await);
    }
    assert!(
        limited.contains(&Code::Unimplemented) && limited.contains(&Code::ResourceExhausted),
        "the `limited` tenant (2 calls/s) is admitted, then refused: {limited:?}"
    );
    // The gateway's health checks of the backend have their series too.
    wait_until("the backend's health-check series", PATIENCE, || async {
        let body = scrape(backend.admin_addr).await;
        body.contains("/grpc.health.v1.Health/Check").then_some(())
    })
    .await;
    let gw_before = scrape(gateway.admin_addr).await;
    let be_before = scrape(backend.admin_addr).await;

    let codes = flood(&gw, 1, 10_000, None).await;
    assert_eq!(
        codes,
        BTreeMap::from([(Code::Unauthenticated as i32, 10_000)]),
        "every unauthenticated call is refused"
    );
    // An authenticated tenant over its rate: refused by the quota, path still not a label.
    let codes = flood(&gw, 2, 300, Some(LIMITED_KEY)).await;
    assert!(codes[&(Code::ResourceExhausted as i32)] > 200, "{codes:?}");
    let codes = flood(&be, 3, 10_000, None).await;
    assert_eq!(
        codes,
        BTreeMap::from([(Code::Unimplemented as i32, 10_000)]),
        "the backend serves no random path"
    );

    assert_same_series("gateway", &gw_before, &scrape(gateway.admin_addr).await);
    assert_same_series("backend", &be_before, &scrape(backend.admin_addr).await);
    // The one `unknown` label carries every call.
    assert!(
        gateway.metric(
            "marquee_grpc_requests_total",
            &[("method", "unknown"), ("code", "UNAUTHENTICATED")]
        ) >= 10_001.0
    );
    assert!(
        backend.metric(
            "marquee_grpc_requests_total",
            &[("method", "unknown"), ("code", "UNIMPLEMENTED")]
        ) >= 10_001.0
    );
}

/// Asserts `message` is a bare reference with none of the fault's detail.
fn assert_reference_only(who: &str, code: Code, message: &str) {
    assert_eq!(code, Code::Internal, "{who}: {message}");
    assert!(
        marquee_core::error::is_internal_reference(message),
        "{who}: the message is only a reference, got {message:?}"
    );
    for leak in [
        "fault",
        "secret",
        "RuntimeError",
        "Traceback",
        ".py",
        "model `",
    ] {
        assert!(
            !message.contains(leak),
            "{who}: {leak:?} leaked in {message:?}"
        );
    }
}

/// As [`assert_reference_only`], and the reference is also the `RequestInfo.request_id`.
fn assert_internal_status(who: &str, status: &Status) {
    assert_reference_only(who, status.code(), status.message());
    let info = status
        .get_details_request_info()
        .unwrap_or_else(|| panic!("{who}: RequestInfo detail"));
    assert!(
        status.message().ends_with(&info.request_id),
        "{who}: RequestInfo names the reference"
    );
}

fn tensor_input(value: f32) -> Option<ImageInput> {
    Some(ImageInput {
        source: Some(Source::Tensor(Tensor {
            shape: vec![4],
            float_data: vec![value; 4],
            ..Default::default()
        })),
    })
}

fn infer(value: f32) -> ModelInferRequest {
    ModelInferRequest {
        model_name: "faulty".into(),
        inputs: vec![model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![1, 4],
            parameters: Default::default(),
            contents: Some(InferTensorContents {
                fp32_contents: vec![value; 4],
                ..Default::default()
            }),
        }],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_errors_carry_only_a_reference() {
    let repo = fault_repo();
    let mut s = settings(repo.path());
    s.repository.profile_batching = Some(false);
    let backend = start(s).await;
    let gateway = start_gateway(gateway_settings(&[backend.grpc_addr])).await;

    // Directly: OIP and the vision API.
    let mut oip = backend.oip().await;
    let ok = oip.model_infer(infer(0.0)).await.expect("the model runs");
    assert_eq!(ok.into_inner().outputs[0].shape, vec![1, 4]);
    let err = oip.model_infer(infer(1.0)).await.unwrap_err();
    assert_internal_status("backend ModelInfer", &err);
    let mut vision = backend.vision().await;
    let classify = |value| ClassifyRequest {
        model: "faulty".into(),
        image: tensor_input(value),
        top_k: 1,
    };
    let err = vision.classify(classify(1.0)).await.unwrap_err();
    assert_internal_status("backend Classify", &err);
    // Each item of a batch that fails carries its own reference (items computed in one
    // model execution fail together, so every item here is a failing one).
    let batch = vision
        .classify_batch(ClassifyBatchRequest {
            model: "faulty".into(),
            images: vec![tensor_input(1.0).unwrap(), tensor_input(1.0).unwrap()],
            top_k: 1,
        })
        .await
        .expect("a batch whose items fail still answers")
        .into_inner();
    for item in &batch.items {
        match &item.result {
            Some(ItemResult::Error(e)) => assert_reference_only(
                "backend ClassifyBatch item",
                Code::from_i32(e.code),
                &e.message,
            ),
            other => panic!("a failing item reports an error, got {other:?}"),
        }
    }

    // Through the gateway: ModelInfer (coalesced) and Classify (coalesced into a batch).
    let ch = gateway.channel().await;
    let mut oip =
        marquee_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient::new(
            ch.clone(),
        );
    let err = oip
        .model_infer(with_key(infer(1.0), ACME_KEY))
        .await
        .unwrap_err();
    assert_reference_only("gateway ModelInfer", err.code(), err.message());
    let mut vision = marquee_proto::vision::image_service_client::ImageServiceClient::new(ch);
    let err = vision
        .classify(with_key(classify(1.0), ACME_KEY))
        .await
        .unwrap_err();
    assert_reference_only("gateway Classify", err.code(), err.message());
    let ok = vision
        .classify(with_key(classify(0.0), ACME_KEY))
        .await
        .expect("a good input still works");
    assert_eq!(ok.into_inner().labels.len(), 1);
}

/// Waits for `n` of `calls` to finish; returns their outcomes.
async fn next_outcomes(
    calls: &mut FuturesUnordered<tokio::task::JoinHandle<Stalled>>,
    n: usize,
) -> Vec<Stalled> {
    let mut out = Vec::new();
    while out.len() < n {
        let s = tokio::time::timeout(PATIENCE, calls.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} stalled calls ended: {out:?}", out.len()))
            .expect("a call is left")
            .expect("the call task ran");
        out.push(s);
    }
    out
}

fn is_code(s: &Stalled, code: Code, text: &str) -> bool {
    matches!(s, Stalled::Status(c, m) if *c == code && m.contains(text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_open_calls_neither_take_serving_capacity_nor_keep_their_permits() {
    const OPEN: usize = 6;
    const EXTRA: usize = 3;
    let backend = start(fashion_backend_settings()).await;
    let mut gs = gateway_settings(&[backend.grpc_addr]);
    gs.server.max_concurrent_requests = 4;
    gs.server.max_concurrent_open_requests = OPEN;
    gs.server.body_read_timeout_ms = 4_000;
    let gateway = start_gateway(gs).await;
    let mut vision = gateway.vision().await;
    let (images, _) = fashion_test_set(1);
    let classify = || {
        with_key(
            ClassifyRequest {
                model: "fashion_cnn".into(),
                image: Some(ImageInput {
                    source: Some(Source::Encoded(png_gray(&images[0], 28, 28).into())),
                }),
                top_k: 1,
            },
            ACME_KEY,
        )
    };
    let mut raw = RawH2::connect(gateway.grpc_addr).await;
    // Twice: the second round shows the first round's permits all came back.
    for round in 0..2 {
        let mut calls = FuturesUnordered::new();
        for _ in 0..OPEN + EXTRA {
            let call = raw.stalled_call("/grpc.health.v1.Health/Check", None).await;
            calls.push(tokio::spawn(call));
        }
        // The calls beyond the open pool are refused at once, naming the open limit...
        let refused = next_outcomes(&mut calls, EXTRA).await;
        assert!(
            refused.iter().all(|s| is_code(
                s,
                Code::ResourceExhausted,
                "server.max_concurrent_open_requests"
            )),
            "round {round}: {refused:?}"
        );
        // ...while OPEN stalled health checks hold the open pool, an authenticated inference
        // call (on a gateway whose serving limit is 4) still gets through.
        let labels = vision
            .classify(classify())
            .await
            .unwrap_or_else(|s| {
                panic!("round {round}: inference refused while probes stall: {s:?}")
            })
            .into_inner()
            .labels;
        assert_eq!(labels.len(), 1);
        // The stalled calls are cut by the body timeout, with a status that says why.
        let cut = next_outcomes(&mut calls, OPEN).await;
        assert!(
            cut.iter()
                .all(|s| is_code(s, Code::DeadlineExceeded, "server.body_read_timeout_ms")),
            "round {round}: {cut:?}"
        );
    }
    // And plain health checks answer.
    let mut health = tonic_health::pb::health_client::HealthClient::new(gateway.channel().await);
    let resp = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health answers")
        .into_inner();
    assert_eq!(resp.status, 1, "SERVING");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_request_bodies_are_cut_and_free_their_permits() {
    const LIMIT: usize = 2;
    let mut s = fashion_backend_settings();
    s.server.max_concurrent_requests = LIMIT;
    s.server.body_read_timeout_ms = 2_000;
    let backend = start(s).await;
    let mut raw = RawH2::connect(backend.grpc_addr).await;
    // Every serving permit held by a call whose body stops mid-prefix.
    let mut calls = FuturesUnordered::new();
    for _ in 0..LIMIT {
        let call = raw
            .stalled_call("/inference.GRPCInferenceService/ModelInfer", None)
            .await;
        calls.push(tokio::spawn(call));
    }
    let cut = next_outcomes(&mut calls, LIMIT).await;
    assert!(
        cut.iter()
            .all(|s| is_code(s, Code::DeadlineExceeded, "server.body_read_timeout_ms")),
        "{cut:?}"
    );
    // The permits came back: the server serves again, at its full limit.
    let (images, _) = fashion_test_set(LIMIT);
    let vision = backend.vision().await;
    let calls = images.iter().map(|px| {
        let mut v = vision.clone();
        let req = ClassifyRequest {
            model: "fashion_cnn".into(),
            image: Some(ImageInput {
                source: Some(Source::Encoded(png_gray(px, 28, 28).into())),
            }),
            top_k: 1,
        };
        async move { v.classify(req).await.map(|r| r.into_inner().labels.len()) }
    });
    for r in futures::future::join_all(calls).await {
        assert_eq!(r.expect("served after the stalled calls were cut"), 1);
    }
}

/// Slow-loris on the admin listener: connections that never finish their request headers are
/// closed after `server.body_read_timeout_ms`, and while they hang the probes still answer.
/// (`axum::serve` had no header timer: such a connection stayed open for ever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connections_that_stall_in_their_headers_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = fashion_backend_settings();
    s.server.body_read_timeout_ms = 1_000;
    let backend = start(s).await;
    let mut stalled = Vec::new();
    for _ in 0..8 {
        let mut c = tokio::net::TcpStream::connect(backend.admin_addr)
            .await
            .unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        stalled.push(c);
    }
    let (code, body) = http_get(backend.admin_addr, "/healthz").await;
    assert_eq!(
        code, 200,
        "the probe answers while 8 connections stall: {body}"
    );
    for mut c in stalled {
        // The server closes the connection (EOF, or a 408 then EOF); a bounded wait, far past
        // the 1 s timeout, so a connection left open fails the test instead of hanging it.
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(30), c.read_to_end(&mut buf)).await;
        assert!(
            read.is_ok(),
            "a connection stalled in its headers was still open after 30 s"
        );
        let text = String::from_utf8_lossy(&buf);
        assert!(
            buf.is_empty() || text.starts_with("HTTP/1.1 408"),
            "unexpected answer to a stalled request: {text}"
        );
    }
    let (code, _) = http_get(backend.admin_addr, "/metrics").await;
    assert_eq!(code, 200);
    backend.shutdown.cancel();
}

/// A stream holds its admission permit until it ends: with one open permit, an open health
/// `Watch` stream leaves none for a `Check` until the client drops it. (The permit used to be
/// released as soon as the response headers went out, so streams were never counted.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_stream_holds_its_permit_until_it_ends() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let mut s = fashion_backend_settings();
    s.server.max_concurrent_open_requests = 1;
    let backend = start(s).await;
    let mut health = HealthClient::new(backend.channel().await);
    let check = HealthCheckRequest {
        service: String::new(),
    };
    health
        .check(check.clone())
        .await
        .expect("a check is admitted while nothing else is open");
    let mut watch = health
        .watch(check.clone())
        .await
        .expect("a watch is admitted")
        .into_inner();
    watch
        .message()
        .await
        .expect("the watch sends the current status")
        .expect("a first message");
    let refused = health
        .check(check.clone())
        .await
        .expect_err("no open permit is left while the watch runs");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("server.max_concurrent_open_requests"),
        "{}",
        refused.message()
    );
    // The client leaves: the stream's body is dropped and its permit comes back.
    drop(watch);
    wait_until(
        "the permit of the dropped stream to come back",
        Duration::from_secs(60),
        || {
            let (mut health, check) = (health.clone(), check.clone());
            async move {
                match health.check(check).await {
                    Ok(_) => Some(()),
                    Err(e) if e.code() == Code::ResourceExhausted => None,
                    Err(e) => panic!("unexpected status after the watch was dropped: {e:?}"),
                }
            }
        },
    )
    .await;
    backend.shutdown.cancel();
}
