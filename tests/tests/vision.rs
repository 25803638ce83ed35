//! The vision service end to end: real models, real gRPC over loopback.

use std::time::Duration;

use futures::future::join_all;
use marquee_e2e::*;
use marquee_proto::common::Tensor;
use marquee_proto::inference::model_infer_request::InferInputTensor;
use marquee_proto::inference::{InferTensorContents, ModelInferRequest};
use marquee_proto::vision::classify_batch_item::Result as ItemResult;
use marquee_proto::vision::image_input::Source;
use marquee_proto::vision::image_service_client::ImageServiceClient;
use marquee_proto::vision::*;
use tonic::Code;

fn encoded(bytes: Vec<u8>) -> Option<ImageInput> {
    Some(ImageInput {
        source: Some(Source::Encoded(bytes.into())),
    })
}

fn classify(model: &str, image: Option<ImageInput>, top_k: u32) -> ClassifyRequest {
    ClassifyRequest {
        model: model.into(),
        image,
        top_k,
    }
}

/// The same preprocessing the service applies, run here to feed the OIP path.
fn preprocessed(model: &str, bytes: &[u8]) -> Vec<f32> {
    let dir = model_repo().join(model);
    let spec = marquee_core::model::ModelSpec::load(&dir).unwrap();
    let limits = marquee_vision::preprocess::ImageLimits {
        max_bytes: 1 << 24,
        max_pixels: 1 << 26,
        max_aspect_ratio: 20,
    };
    marquee_vision::preprocess::to_tensor(bytes, limits, spec.preprocess.as_ref().unwrap(), &|| {
        true
    })
    .unwrap()
}

#[tokio::test]
async fn real_photos_classify_as_cat_and_espresso() {
    let mut client = shared().vision().await;
    let cat = client
        .classify(classify(
            "efficientnet_lite0",
            encoded(fixture("chelsea.png")),
            5,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cat.model, "efficientnet_lite0");
    assert_eq!(cat.model_version, "1");
    assert_eq!(cat.labels.len(), 5);
    assert!(
        (281..=287).contains(&cat.labels[0].index),
        "top-1 {:?} is not a cat class",
        cat.labels[0]
    );
    assert!(cat.labels[0].name.contains("cat"), "{:?}", cat.labels[0]);
    let coffee = client
        .classify(classify(
            "efficientnet_lite0",
            encoded(fixture("coffee.png")),
            1,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(coffee.labels[0].index, 967);
    assert_eq!(coffee.labels[0].name, "espresso");
    assert!(
        coffee.labels[0].score > 0.5,
        "espresso with p={}",
        coffee.labels[0].score
    );
}

#[tokio::test]
async fn the_same_photo_through_oip_gives_the_same_scores() {
    let server = shared();
    let photo = fixture("coffee.png");
    let tensor = preprocessed("efficientnet_lite0", &photo);
    let via_vision = server
        .vision()
        .await
        .classify(classify("efficientnet_lite0", encoded(photo), 3))
        .await
        .unwrap()
        .into_inner();
    let resp = server
        .oip()
        .await
        .model_infer(ModelInferRequest {
            model_name: "efficientnet_lite0".into(),
            inputs: vec![InferInputTensor {
                name: "image".into(),
                datatype: "FP32".into(),
                shape: vec![1, 3, 224, 224],
                parameters: Default::default(),
                contents: Some(InferTensorContents {
                    fp32_contents: tensor,
                    ..Default::default()
                }),
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.outputs[0].name, "logits");
    assert_eq!(resp.outputs[0].shape, vec![1, 1000]);
    let logits = &resp.outputs[0].contents.as_ref().unwrap().fp32_contents;
    let via_oip = marquee_vision::service::top_labels(logits, 3, None);
    for (a, b) in via_vision.labels.iter().zip(&via_oip) {
        assert_eq!(a.index, b.index);
        assert!(
            (a.score - b.score).abs() < 1e-5,
            "{} vs {}",
            a.score,
            b.score
        );
    }
    // The raw tensor path of ImageService agrees too.
    let raw = server
        .vision()
        .await
        .classify(classify(
            "efficientnet_lite0",
            Some(ImageInput {
                source: Some(Source::Tensor(Tensor {
                    shape: vec![3, 224, 224],
                    raw_data: preprocessed("efficientnet_lite0", &fixture("coffee.png"))
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect::<Vec<u8>>()
                        .into(),
                    ..Default::default()
                })),
            }),
            3,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(raw.labels, via_vision.labels);
}

#[tokio::test]
async fn embed_returns_normalised_penultimate_features() {
    let mut client = shared().vision().await;
    let e = client
        .embed(EmbedRequest {
            model: "efficientnet_lite0".into(),
            image: encoded(fixture("chelsea.png")),
            normalize: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(e.embedding.len(), 1280);
    let norm: f32 = e.embedding.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
}

#[tokio::test]
async fn fashion_accuracy_through_classify_batch_matches_the_build() {
    let reported: serde_json::Value = serde_json::from_slice(
        &std::fs::read(model_repo().join("fashion_cnn/metrics.json")).unwrap(),
    )
    .unwrap();
    let want = reported["test_accuracy_first_1000"].as_f64().unwrap();
    let (images, labels) = fashion_test_set(1000);
    let mut client = shared().vision().await;
    let mut correct = 0;
    for (chunk, chunk_labels) in images.chunks(250).zip(labels.chunks(250)) {
        let resp = client
            .classify_batch(ClassifyBatchRequest {
                model: "fashion_cnn".into(),
                images: chunk
                    .iter()
                    .map(|px| encoded(png_gray(px, 28, 28)).unwrap())
                    .collect(),
                top_k: 1,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.items.len(), chunk.len());
        for (item, label) in resp.items.iter().zip(chunk_labels) {
            match &item.result {
                Some(ItemResult::Classification(c)) => {
                    correct += (c.labels[0].index == *label as u32) as usize
                }
                other => panic!("item failed: {other:?}"),
            }
        }
    }
    let got = correct as f64 / 1000.0;
    assert!(
        (got - want).abs() <= 0.005,
        "served accuracy {got} vs build {want}"
    );
}

#[tokio::test]
async fn concurrent_single_calls_are_batched_and_each_caller_gets_its_own_answer() {
    // A dedicated server so the counters see only this test's calls.
    let server = start(settings(&model_repo())).await;
    let (images, _) = fashion_test_set(64);
    // What each image is on its own, one call at a time.
    let mut client = server.vision().await;
    let mut alone = Vec::new();
    for px in &images {
        let r = client
            .classify(classify("fashion_cnn", encoded(png_gray(px, 28, 28)), 3))
            .await
            .unwrap();
        alone.push(r.into_inner().labels);
    }
    let batches_before =
        server.metric("marquee_batcher_batches_total", &[("model", "fashion_cnn")]);
    let items_before = server.metric("marquee_batcher_items_total", &[("model", "fashion_cnn")]);
    let channel = server.channel().await;
    let calls = images.iter().map(|px| {
        let mut c = ImageServiceClient::new(channel.clone());
        let req = classify("fashion_cnn", encoded(png_gray(px, 28, 28)), 3);
        async move { c.classify(req).await.map(|r| r.into_inner().labels) }
    });
    let together: Vec<_> = join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let batches = server.metric("marquee_batcher_batches_total", &[("model", "fashion_cnn")])
        - batches_before;
    let items =
        server.metric("marquee_batcher_items_total", &[("model", "fashion_cnn")]) - items_before;
    assert_eq!(items, 64.0, "every call computed exactly once");
    assert!(
        batches < 64.0,
        "64 concurrent calls ran in {batches} model executions: no batching"
    );
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(
            a.iter().map(|l| l.index).collect::<Vec<_>>(),
            b.iter().map(|l| l.index).collect::<Vec<_>>(),
            "image {i}"
        );
        assert!(
            (a[0].score - b[0].score).abs() < 1e-4,
            "image {i}: {} vs {}",
            a[0].score,
            b[0].score
        );
    }
    server.shutdown.cancel();
}

#[tokio::test]
async fn admin_port_serves_metrics_and_probes() {
    let server = shared();
    let (status, body) = http_get(server.admin_addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("fashion_cnn") && body.contains("efficientnet_lite0"),
        "{body}"
    );
    assert_eq!(http_get(server.admin_addr, "/healthz").await.0, 200);
    let (status, body) = http_get(server.admin_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("marquee_model_ready{model=\"fashion_cnn\",version=\"1\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("marquee_batcher_effective_max_batch"),
        "{body}"
    );
}

#[tokio::test]
async fn health_reports_each_model_and_reflection_lists_services() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let mut health = HealthClient::new(shared().channel().await);
    for service in ["", "fashion_cnn", "efficientnet_lite0"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            ServingStatus::Serving as i32,
            "service `{service}`"
        );
    }
    let err = health
        .check(HealthCheckRequest {
            service: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

// === bad input: a clear status naming field, limit and value; the server keeps serving ===

async fn expect_error(req: ClassifyRequest, code: Code, needles: &[&str]) {
    let err = shared().vision().await.classify(req).await.unwrap_err();
    assert_eq!(err.code(), code, "{err:?}");
    for n in needles {
        assert!(err.message().contains(n), "`{}` lacks `{n}`", err.message());
    }
}

#[tokio::test]
async fn empty_body_is_invalid() {
    expect_error(
        classify("fashion_cnn", encoded(Vec::new()), 1),
        Code::InvalidArgument,
        &["`image.encoded`", "empty"],
    )
    .await;
    expect_error(
        classify("fashion_cnn", None, 1),
        Code::InvalidArgument,
        &["`image` is required"],
    )
    .await;
}

#[tokio::test]
async fn truncated_jpeg_is_invalid() {
    let img = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8 * 3, y as u8 * 3, 90]));
    let mut jpeg = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut jpeg),
        image::ImageFormat::Jpeg,
    )
    .unwrap();
    jpeg.truncate(jpeg.len() / 3);
    expect_error(
        classify("efficientnet_lite0", encoded(jpeg), 1),
        Code::InvalidArgument,
        &["`image.encoded`", "JPEG"],
    )
    .await;
    expect_error(
        classify("efficientnet_lite0", encoded(b"GIF89a garbage".to_vec()), 1),
        Code::InvalidArgument,
        &["`image.encoded`"],
    )
    .await;
}

#[tokio::test]
async fn decompression_bomb_is_refused_before_decoding() {
    let mut png = png_gray(&[0; 4], 2, 2);
    png[16..20].copy_from_slice(&50_000u32.to_be_bytes());
    png[20..24].copy_from_slice(&50_000u32.to_be_bytes());
    let mut crc = flate2::Crc::new();
    crc.update(&png[12..29]);
    png[29..33].copy_from_slice(&crc.sum().to_be_bytes());
    expect_error(
        classify("fashion_cnn", encoded(png), 1),
        Code::ResourceExhausted,
        &[
            "`image.encoded`",
            "50000×50000",
            "2500000000 pixels",
            "40000000",
        ],
    )
    .await;
}

#[tokio::test]
async fn a_64_mib_message_is_refused_as_too_large() {
    expect_error(
        classify("fashion_cnn", encoded(vec![0x89; 64 << 20]), 1),
        Code::ResourceExhausted,
        &["bytes", "`server.max_message_bytes`", "16777216"],
    )
    .await;
    // Still serving.
    let ok = shared()
        .vision()
        .await
        .classify(classify(
            "fashion_cnn",
            encoded(png_gray(&[0; 784], 28, 28)),
            1,
        ))
        .await;
    assert!(ok.is_ok(), "{ok:?}");
}

#[tokio::test]
async fn unknown_model_is_not_found() {
    expect_error(
        classify("resnet9000", encoded(fixture("chelsea.png")), 1),
        Code::NotFound,
        &["`resnet9000`"],
    )
    .await;
}

#[tokio::test]
async fn top_k_outside_the_classes_is_invalid() {
    let img = || encoded(png_gray(&[0; 784], 28, 28));
    expect_error(
        classify("fashion_cnn", img(), 0),
        Code::InvalidArgument,
        &["`top_k`", "1..=10", "got 0"],
    )
    .await;
    expect_error(
        classify("fashion_cnn", img(), 11),
        Code::InvalidArgument,
        &["`top_k`", "1..=10", "got 11"],
    )
    .await;
}

#[tokio::test]
async fn raw_tensors_with_nan_or_wrong_shape_are_invalid() {
    let tensor = |shape: Vec<i64>, data: Vec<f32>| {
        Some(ImageInput {
            source: Some(Source::Tensor(Tensor {
                shape,
                float_data: data,
                ..Default::default()
            })),
        })
    };
    let mut nan = vec![0.0; 784];
    nan[17] = f32::NAN;
    expect_error(
        classify("fashion_cnn", tensor(vec![1, 28, 28], nan), 1),
        Code::InvalidArgument,
        &["element 17 is NaN"],
    )
    .await;
    expect_error(
        classify("fashion_cnn", tensor(vec![3, 28, 28], vec![0.0; 784]), 1),
        Code::InvalidArgument,
        &["`image.tensor.shape`", "[1, 28, 28]", "[3, 28, 28]"],
    )
    .await;
}

#[tokio::test]
async fn oip_shape_dtype_and_byte_length_are_checked() {
    let mut oip = shared().oip().await;
    let req = |datatype: &str, shape: Vec<i64>, raw: Vec<u8>| ModelInferRequest {
        model_name: "fashion_cnn".into(),
        inputs: vec![InferInputTensor {
            name: "image".into(),
            datatype: datatype.into(),
            shape,
            ..Default::default()
        }],
        raw_input_contents: vec![raw.into()],
        ..Default::default()
    };
    let cases = [
        (
            req("FP32", vec![1, 28, 28], vec![0; 3136]),
            "`inputs[0].shape`",
        ),
        (
            req("FP64", vec![1, 1, 28, 28], vec![0; 6272]),
            "must be `FP32`, got `FP64`",
        ),
        (
            req("FP32", vec![2, 1, 28, 28], vec![0; 3136]),
            "needs 6272 bytes, got 3136",
        ),
        (
            req("FP32", vec![64, 1, 28, 28], vec![0; 64 * 3136]),
            "at most 32",
        ),
    ];
    for (r, needle) in cases {
        let err = oip.model_infer(r).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(
            err.message().contains(needle),
            "`{}` lacks `{needle}`",
            err.message()
        );
    }
    let mut bad = req("FP32", vec![1, 1, 28, 28], vec![0; 3136]);
    bad.raw_input_contents[0] = [f32::NAN.to_le_bytes().to_vec(), vec![0; 3132]]
        .concat()
        .into();
    let err = oip.model_infer(bad).await.unwrap_err();
    assert!(
        err.message().contains("element 0 is NaN"),
        "{}",
        err.message()
    );
    let ok = oip
        .model_infer(req("FP32", vec![2, 1, 28, 28], vec![0; 6272]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        ok.raw_output_contents[0].len(),
        2 * 10 * 4,
        "raw in → raw out, logits for 2 rows"
    );
}

#[tokio::test]
async fn a_deadline_that_expires_in_the_queue_is_never_computed() {
    // One lane running one item at a time: the 24 images below occupy the model for
    // ~12 forwards, and a later request cannot join their batches.
    let mut s = settings(&model_repo());
    s.repository.lanes = Some(1);
    s.repository.batching = Some(false);
    s.repository.models = vec!["efficientnet_lite0".into()];
    let server = start(s).await;
    let photo = fixture("chelsea.png");
    let tensor = Some(ImageInput {
        source: Some(Source::Tensor(Tensor {
            shape: vec![3, 224, 224],
            raw_data: preprocessed("efficientnet_lite0", &photo)
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
            ..Default::default()
        })),
    });
    let busy = {
        let mut c = server.vision().await;
        let req = ClassifyBatchRequest {
            model: "efficientnet_lite0".into(),
            images: (0..24).map(|_| tensor.clone().unwrap()).collect(),
            top_k: 1,
        };
        tokio::spawn(async move { c.classify_batch(req).await })
    };
    // Wait until the batch is queued or running (observed, not slept).
    wait_until(
        "the busy batch to be queued",
        Duration::from_secs(60),
        || async {
            let seen = server.metric("marquee_batcher_items_total", &[])
                + server.metric("marquee_batcher_queue_depth", &[]);
            (seen >= 1.0).then_some(())
        },
    )
    .await;
    // Preprocessed tensors, not encoded images, here and in the busy batch: everything goes
    // straight to the queue in order, whereas an image would first wait for a decode thread,
    // and under load its deadline could pass (the call cancelled) before it reached the queue
    // this test is about.
    let mut req = tonic::Request::new(classify("efficientnet_lite0", tensor.clone(), 1));
    req.set_timeout(Duration::from_millis(250));
    let err = server.vision().await.classify(req).await.unwrap_err();
    // The server answers DEADLINE_EXCEEDED just before the deadline; on a loaded 2-core box
    // tonic's client-side timer (which reports CANCELLED "Timeout expired") can win that race,
    // so the server's own answer is checked in its metrics below.
    let client_timer = err.code() == Code::Cancelled && err.message() == "Timeout expired";
    assert!(
        err.code() == Code::DeadlineExceeded || client_timer,
        "{err:?}"
    );
    let busy = busy.await.unwrap().unwrap().into_inner();
    assert!(
        busy.items
            .iter()
            .all(|i| matches!(i.result, Some(ItemResult::Classification(_))))
    );
    // Let the lane reach the expired item, then check it was dropped, not computed.
    let dropped = wait_until(
        "the expired request dropped",
        Duration::from_secs(30),
        || async {
            let dropped = server
                .metric("marquee_batcher_rejected_total", &[("reason", "deadline")])
                + server.metric("marquee_batcher_rejected_total", &[("reason", "cancelled")]);
            (dropped >= 1.0).then_some(dropped)
        },
    )
    .await;
    assert_eq!(
        dropped, 1.0,
        "the expired request was dropped before compute"
    );
    assert_eq!(
        server.metric("marquee_batcher_items_total", &[]),
        24.0,
        "only the 24 live images were computed"
    );
    server.shutdown.cancel();
}

/// `repository.batching_control`: the admin port sets a model's batch cap at run time, in the
/// same process (1: every call alone; `auto`: warm-up's choice again), and refuses it unless
/// the operator turned it on (the port is not authenticated).
#[tokio::test]
async fn the_batch_cap_is_set_at_run_time_only_when_the_operator_allows_it() {
    let mut s = settings(&model_repo());
    s.repository.batching_control = Some(true);
    let server = start(s).await;
    let cap = |srv: &TestServer| {
        srv.metric(
            "marquee_batcher_effective_max_batch",
            &[("model", "fashion_cnn")],
        )
    };
    let chosen = cap(&server);
    assert!(chosen > 1.0, "warm-up chose a batch cap above 1: {chosen}");
    let (images, _) = fashion_test_set(48);
    let channel = server.channel().await;
    let burst = || {
        let calls = images.iter().map(|px| {
            let mut c = ImageServiceClient::new(channel.clone());
            let req = classify("fashion_cnn", encoded(png_gray(px, 28, 28)), 1);
            async move { c.classify(req).await.map(|r| r.into_inner().labels) }
        });
        join_all(calls)
    };
    let counts = |srv: &TestServer| {
        (
            srv.metric("marquee_batcher_batches_total", &[("model", "fashion_cnn")]),
            srv.metric("marquee_batcher_items_total", &[("model", "fashion_cnn")]),
        )
    };

    let (status, body) = http_post(server.admin_addr, "/batching/fashion_cnn/1").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("max_batch 1 (was"), "{body}");
    assert_eq!(cap(&server), 1.0);
    let (b0, i0) = counts(&server);
    assert!(burst().await.iter().all(Result::is_ok));
    let (b1, i1) = counts(&server);
    assert_eq!(i1 - i0, 48.0);
    assert_eq!(b1 - b0, 48.0, "batching off: one execution per call");

    let (status, body) = http_post(server.admin_addr, "/batching/fashion_cnn/auto").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(cap(&server), chosen, "auto restores warm-up's choice");
    assert!(burst().await.iter().all(Result::is_ok));
    let (b2, i2) = counts(&server);
    assert_eq!(i2 - i1, 48.0);
    assert!(b2 - b1 < 48.0, "batching on again: {} executions", b2 - b1);

    for (path, want) in [
        ("/batching/no_such_model/1", 404),
        ("/batching/fashion_cnn/0", 400),
        ("/batching/fashion_cnn/many", 400),
    ] {
        let (status, body) = http_post(server.admin_addr, path).await;
        assert_eq!(status, want, "{path}: {body}");
    }

    // Off unless the operator turns it on.
    let plain = start(settings(&model_repo())).await;
    let before = cap(&plain);
    let (status, body) = http_post(plain.admin_addr, "/batching/fashion_cnn/1").await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("repository.batching_control"), "{body}");
    assert_eq!(cap(&plain), before, "unchanged");
}

/// `(thread name, niceness)` of every thread of this process.
fn thread_niceness() -> Vec<(String, i64)> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter_map(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            // Field 19 of stat; the 17th after the parenthesised name.
            let nice = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(16)?
                .parse()
                .ok()?;
            Some((comm.trim().to_string(), nice))
        })
        .collect()
}

#[test]
fn model_lanes_run_below_the_network_threads_priority() {
    // The shared server is ready, so its lanes are up (ready means warm).
    let _ = shared();
    let threads = thread_niceness();
    let lanes: Vec<_> = threads
        .iter()
        .filter(|(name, _)| name.starts_with("lane-fashion"))
        .collect();
    assert!(!lanes.is_empty(), "{threads:?}");
    // `repository.lane_nice` defaults to 10: a reply never waits behind a forward for a core.
    assert!(
        lanes
            .iter()
            .all(|(_, n)| *n == marquee_core::config::DEFAULT_LANE_NICE as i64),
        "{lanes:?}"
    );
    let runtime: Vec<_> = threads
        .iter()
        .filter(|(name, _)| name.starts_with("tokio-"))
        .collect();
    assert!(
        !runtime.is_empty() && runtime.iter().all(|(_, n)| *n == 0),
        "{runtime:?}"
    );
}

#[test]
fn the_vision_binary_allocates_with_jemalloc_libtorch_included() {
    // `MALLOC_CONF` is read only by a jemalloc built unprefixed, which defines `malloc`,
    // `free` and `posix_memalign` in the executable, where the dynamic linker binds libtorch's
    // calls too (its per-forward activations: 12.6k → 14.9k calls/s on fashion_cnn). A
    // prefixed build, or none, would ignore it and print nothing.
    let out = std::process::Command::new(workspace_binary("marquee-vision"))
        .arg("--help")
        .env("MALLOC_CONF", "stats_print:true")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Begin jemalloc statistics"),
        "no jemalloc statistics at exit: {stderr}"
    );
}
