//! The gateway end to end: real gateway, real vision backends with real models, real gRPC.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use marquee_e2e::jwt::{jwt_keys, openssl};
use marquee_e2e::*;
use marquee_proto::vision::image_input::Source;
use marquee_proto::vision::image_service_client::ImageServiceClient;
use marquee_proto::vision::*;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;

fn fashion(pixels: &[u8]) -> ClassifyRequest {
    ClassifyRequest {
        model: "fashion_cnn".into(),
        image: Some(ImageInput {
            source: Some(Source::Encoded(png_gray(pixels, 28, 28).into())),
        }),
        top_k: 1,
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(
    alg: Algorithm,
    kid: Option<&str>,
    key: &EncodingKey,
    claims: serde_json::Value,
) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, &claims, key).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auth_matrix() {
    let backend = start(fashion_backend_settings()).await;
    let keys = jwt_keys();
    let mut s = gateway_settings(&[backend.grpc_addr]);
    s.auth.jwt.hs256_secret_file = Some(keys.dir.path().join("hs256.secret"));
    s.auth.jwt.public_key_files = vec![keys.dir.path().join("rsa.pub.pem")];
    s.auth.jwt.jwks_file = Some(keys.dir.path().join("jwks.json"));
    s.auth.jwt.issuer = Some("https://idp.example".into());
    s.auth.jwt.audience = Some("marquee".into());
    s.auth.jwt.leeway_s = 0;
    let gw = start_gateway(s).await;
    let (images, labels) = fashion_test_set(1);
    let req = || fashion(&images[0]);
    let mut client = gw.vision().await;

    // Health and reflection are open.
    let health = HealthClient::new(gw.channel().await)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await;
    assert!(health.is_ok(), "{health:?}");

    let expect =
        |r: Result<tonic::Response<ClassifyResponse>, tonic::Status>, code: Code, needle: &str| {
            let e = r.expect_err(needle);
            assert_eq!(e.code(), code, "{e:?}");
            assert!(
                e.message().contains(needle),
                "`{}` lacks `{needle}`",
                e.message()
            );
        };
    expect(
        client.classify(tonic::Request::new(req())).await,
        Code::Unauthenticated,
        "missing credentials",
    );
    expect(
        client.classify(with_key(req(), "not-a-key")).await,
        Code::Unauthenticated,
        "invalid API key",
    );
    expect(
        client.classify(with_key(req(), GLOBEX_KEY)).await,
        Code::PermissionDenied,
        "lacks scope `vision:infer`",
    );
    let ok = client
        .classify(with_key(req(), ACME_KEY))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.labels[0].index, labels[0] as u32);
    // The same key as a bearer token.
    assert!(client.classify(with_bearer(req(), ACME_KEY)).await.is_ok());

    let hs = EncodingKey::from_secret(&keys.secret).unwrap();
    let rsa = EncodingKey::from_rsa_pem(&keys.rsa_private).unwrap();
    let ec = EncodingKey::from_ec_pem(&keys.ec_private).unwrap();
    let claims = |tenant: &str, scope: &str, exp: u64, aud: &str, iss: &str| serde_json::json!({"sub": "user-1", "tenant": tenant, "scope": scope, "exp": exp, "nbf": now_s() - 10, "aud": aud, "iss": iss});
    let good = || {
        claims(
            "acme",
            "vision:infer",
            now_s() + 600,
            "marquee",
            "https://idp.example",
        )
    };
    for (what, t) in [
        ("HS256", token(Algorithm::HS256, None, &hs, good())),
        ("RS256", token(Algorithm::RS256, None, &rsa, good())),
        (
            "ES256 via JWKS",
            token(Algorithm::ES256, Some("ec-1"), &ec, good()),
        ),
    ] {
        let r = client.classify(with_bearer(req(), &t)).await;
        assert!(r.is_ok(), "{what}: {r:?}");
    }
    let expired = token(
        Algorithm::HS256,
        None,
        &hs,
        claims(
            "acme",
            "vision:infer",
            now_s() - 60,
            "marquee",
            "https://idp.example",
        ),
    );
    expect(
        client.classify(with_bearer(req(), &expired)).await,
        Code::Unauthenticated,
        "expired",
    );
    let forged = token(
        Algorithm::HS256,
        None,
        &EncodingKey::from_secret(b"someone-else's-secret-32-bytes-long!!").unwrap(),
        good(),
    );
    expect(
        client.classify(with_bearer(req(), &forged)).await,
        Code::Unauthenticated,
        "signature does not verify",
    );
    let wrong_aud = token(
        Algorithm::RS256,
        None,
        &rsa,
        claims(
            "acme",
            "vision:infer",
            now_s() + 600,
            "someone-else",
            "https://idp.example",
        ),
    );
    expect(
        client.classify(with_bearer(req(), &wrong_aud)).await,
        Code::Unauthenticated,
        "`aud`",
    );
    let wrong_iss = token(
        Algorithm::RS256,
        None,
        &rsa,
        claims(
            "acme",
            "vision:infer",
            now_s() + 600,
            "marquee",
            "https://evil.example",
        ),
    );
    expect(
        client.classify(with_bearer(req(), &wrong_iss)).await,
        Code::Unauthenticated,
        "`iss`",
    );
    let mut early = good();
    early["nbf"] = serde_json::json!(now_s() + 600);
    let not_yet = token(Algorithm::HS256, None, &hs, early);
    expect(
        client.classify(with_bearer(req(), &not_yet)).await,
        Code::Unauthenticated,
        "not valid yet",
    );
    let no_scope = token(
        Algorithm::HS256,
        None,
        &hs,
        claims(
            "acme",
            "recommendation:read",
            now_s() + 600,
            "marquee",
            "https://idp.example",
        ),
    );
    expect(
        client.classify(with_bearer(req(), &no_scope)).await,
        Code::PermissionDenied,
        "lacks scope `vision:infer`",
    );
    let stranger = token(
        Algorithm::HS256,
        None,
        &hs,
        claims(
            "initech",
            "vision:infer",
            now_s() + 600,
            "marquee",
            "https://idp.example",
        ),
    );
    expect(
        client.classify(with_bearer(req(), &stranger)).await,
        Code::PermissionDenied,
        "tenant `initech` is not configured",
    );
    // The credentials never reach the logs or labels; tenants in metrics are configured ones.
    let body = http_get(gw.admin_addr, "/metrics").await.1;
    assert!(
        !body.contains(ACME_KEY) && !body.contains("initech"),
        "no credentials or unknown tenants in metrics"
    );
    assert!(body.contains("tenant=\"acme\""), "{body}");
    gw.shutdown.cancel();
    backend.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_rate_and_request_size_limits_refuse_with_clear_statuses() {
    let backend = start(fashion_backend_settings()).await;
    let mut s = gateway_settings(&[backend.grpc_addr]);
    s.routes.vision.max_request_bytes = 4096;
    let gw = start_gateway(s).await;
    let (images, _) = fashion_test_set(1);
    let mut client = gw.vision().await;
    let mut refused = None;
    for _ in 0..5 {
        if let Err(e) = client
            .classify(with_key(fashion(&images[0]), LIMITED_KEY))
            .await
        {
            refused = Some(e);
            break;
        }
    }
    let e = refused.expect("a tenant limited to a burst of 2 is refused within 5 quick calls");
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message()
            .contains("tenant `limited` is over its rate of 2 calls/s"),
        "{}",
        e.message()
    );
    assert!(
        e.get_details_retry_info()
            .and_then(|r| r.retry_delay)
            .is_some(),
        "RetryInfo says when to retry"
    );

    let mut big = fashion(&images[0]);
    big.image = Some(ImageInput {
        source: Some(Source::Encoded(vec![0u8; 10_000].into())),
    });
    let e = client.classify(with_key(big, ACME_KEY)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().contains("`routes.vision.max_request_bytes`") && e.message().contains("4096"),
        "{}",
        e.message()
    );
    gw.shutdown.cancel();
    backend.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_calls_from_many_clients_are_coalesced_and_each_gets_its_own_label() {
    let backend = start(fashion_backend_settings()).await;
    let gw = start_gateway(gateway_settings(&[backend.grpc_addr])).await;
    let (images, _) = fashion_test_set(64);
    // Each image's label asked directly of the backend, one at a time.
    let mut direct = backend.vision().await;
    let mut want = Vec::new();
    for px in &images {
        want.push(
            direct
                .classify(fashion(px))
                .await
                .unwrap()
                .into_inner()
                .labels[0]
                .index,
        );
    }
    let backend_calls = |s: &TestServer| {
        s.metric(
            "marquee_grpc_requests_total",
            &[("method", "/marquee.vision.v1.ImageService/Classify")],
        ) + s.metric(
            "marquee_grpc_requests_total",
            &[("method", "/marquee.vision.v1.ImageService/ClassifyBatch")],
        )
    };
    let before = backend_calls(&backend);
    let channel = gw.channel().await;
    let calls = images.iter().map(|px| {
        let mut c = ImageServiceClient::new(channel.clone());
        let req = with_key(fashion(px), ACME_KEY);
        async move {
            c.classify(req)
                .await
                .map(|r| r.into_inner().labels[0].index)
        }
    });
    let got: Vec<u32> = join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(got, want, "every client got its own image's label");
    let rpcs = backend_calls(&backend) - before;
    assert!(
        rpcs < 64.0,
        "64 client calls reached the backend as {rpcs} RPCs: no coalescing"
    );
    assert!(
        gw.metric(
            "marquee_gateway_requests_total",
            &[("tenant", "acme"), ("code", "OK")]
        ) >= 64.0
    );
    // One bad image in the crowd fails only its own call.
    let mut c = ImageServiceClient::new(channel.clone());
    let bad = ClassifyRequest {
        image: Some(ImageInput {
            source: Some(Source::Encoded(b"not an image".to_vec().into())),
        }),
        ..fashion(&images[0])
    };
    let mut c2 = ImageServiceClient::new(channel.clone());
    let (bad_result, good_result) = tokio::join!(
        c.classify(with_key(bad, ACME_KEY)),
        c2.classify(with_key(fashion(&images[1]), ACME_KEY))
    );
    let e = bad_result.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("`image.encoded`"), "{}", e.message());
    assert_eq!(good_result.unwrap().into_inner().labels[0].index, want[1]);
    gw.shutdown.cancel();
    backend.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_tenant_does_not_starve_another() {
    let backend = start(fashion_backend_settings()).await;
    let mut s = gateway_settings(&[backend.grpc_addr]);
    // Two calls in flight saturate the backend, so the fair queue decides who goes next.
    s.backends
        .get_mut("vision")
        .unwrap()
        .max_in_flight_per_endpoint = 2;
    s.routes.vision.batching = false;
    let gw = start_gateway(s).await;
    let (images, _) = fashion_test_set(1);
    let png = fashion(&images[0]);
    let channel = gw.channel().await;
    let stop = Arc::new(AtomicBool::new(false));
    let done = |tenant_key: &'static str, n: usize| {
        (0..n)
            .map(|_| {
                let (mut c, req, stop) = (
                    ImageServiceClient::new(channel.clone()),
                    png.clone(),
                    stop.clone(),
                );
                tokio::spawn(async move {
                    let mut ok = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        c.classify(with_key(req.clone(), tenant_key))
                            .await
                            .expect("no call fails");
                        ok += 1;
                    }
                    ok
                })
            })
            .collect::<Vec<_>>()
    };
    let noisy = done(NOISY_KEY, 32);
    let quiet = done(QUIET_KEY, 2);
    // Run until the noisy tenant has had 400 calls served (a count, not a duration).
    wait_until(
        "400 noisy calls served",
        Duration::from_secs(120),
        || async {
            let served = gw.metric(
                "marquee_gateway_requests_total",
                &[("tenant", "noisy"), ("code", "OK")],
            );
            (served >= 400.0).then_some(())
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let noisy_ok: usize = join_all(noisy).await.into_iter().map(|r| r.unwrap()).sum();
    let quiet_ok: usize = join_all(quiet).await.into_iter().map(|r| r.unwrap()).sum();
    // First come, first served would give the quiet tenant 2/34 of the slots (~6%); round robin
    // between tenants gives it about half while it has a call waiting.
    assert!(
        quiet_ok * 10 >= noisy_ok * 3,
        "quiet tenant got {quiet_ok} calls against the flood's {noisy_ok}"
    );
    gw.shutdown.cancel();
    backend.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_costs_no_failed_call_and_all_down_is_unavailable_fast() {
    let a = start(fashion_backend_settings()).await;
    let mut b = ChildServer::start(
        "marquee-vision",
        &[
            (
                "MARQUEE__REPOSITORY__PATH",
                model_repo().display().to_string(),
            ),
            ("MARQUEE__REPOSITORY__MODELS", "fashion_cnn".into()),
            ("MARQUEE__REPOSITORY__LANES", "1".into()),
            ("MARQUEE__REPOSITORY__THREADS", "1".into()),
            ("MARQUEE__REPOSITORY__POLL_INTERVAL_MS", "0".into()),
        ],
    );
    let mut s = gateway_settings(&[a.grpc_addr, b.grpc_addr]);
    s.routes.vision.batching = false;
    let gw = start_gateway(s).await;
    let (images, _) = fashion_test_set(1);
    let channel = gw.channel().await;
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let loops: Vec<_> = (0..8)
        .map(|_| {
            let (mut c, req, ok, failed) = (
                ImageServiceClient::new(channel.clone()),
                fashion(&images[0]),
                ok.clone(),
                failed.clone(),
            );
            tokio::spawn(async move {
                for _ in 0..150 {
                    match c.classify(with_key(req.clone(), ACME_KEY)).await {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            eprintln!("failed: {e:?}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    // Kill replica B mid-loop, once both replicas have served traffic.
    wait_until("replica B to serve a call", Duration::from_secs(60), || async {
        let body = http_get(b.admin_addr, "/metrics").await.1;
        body.contains("marquee_grpc_requests_total{code=\"OK\",method=\"/marquee.vision.v1.ImageService/Classify\"}")
            .then_some(())
    })
    .await;
    b.kill();
    join_all(loops).await;
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no call failed when a replica died"
    );
    assert_eq!(ok.load(Ordering::Relaxed), 8 * 150);
    assert!(
        gw.metric("marquee_gateway_retries_total", &[]) >= 1.0
            || gw.metric("marquee_gateway_endpoints_healthy", &[]) == 1.0
    );
    // Now every replica is down: UNAVAILABLE at once, not a hang until the deadline.
    a.shutdown.cancel();
    wait_until("no healthy replica", Duration::from_secs(60), || async {
        (gw.metric("marquee_gateway_endpoints_healthy", &[]) <= 0.0).then_some(())
    })
    .await;
    let mut c = gw.vision().await;
    let mut req = with_key(fashion(&images[0]), ACME_KEY);
    req.set_timeout(Duration::from_secs(20));
    let started = Instant::now();
    let e = c.classify(req).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains("no healthy replica"),
        "{}",
        e.message()
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered before the 20 s deadline, not at it"
    );
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_shorter_than_the_backend_queue_is_answered_and_never_computed() {
    let mut bs = settings(&model_repo());
    bs.repository.models = vec!["efficientnet_lite0".into()];
    bs.repository.lanes = Some(1);
    bs.repository.batching = Some(false);
    // Decode all 24 images at once, so they fill the model queue faster than one lane drains
    // it (with the default 2 decode workers the queue never reaches 20).
    bs.server.blocking_threads = 24;
    bs.vision.decode_workers = 24;
    let backend = start(bs).await;
    let gw = start_gateway(gateway_settings(&[backend.grpc_addr])).await;
    let photo = fixture("chelsea.png");
    let image = || ImageInput {
        source: Some(Source::Encoded(photo.clone().into())),
    };
    // Fill the backend's queue directly.
    let busy = {
        let mut c = backend.vision().await;
        let req = ClassifyBatchRequest {
            model: "efficientnet_lite0".into(),
            images: (0..24).map(|_| image()).collect(),
            top_k: 1,
        };
        tokio::spawn(async move { c.classify_batch(req).await })
    };
    wait_until("20 images queued", Duration::from_secs(60), || async {
        (backend.metric("marquee_batcher_queue_depth", &[]) >= 20.0).then_some(())
    })
    .await;
    let mut req = with_key(
        ClassifyRequest {
            model: "efficientnet_lite0".into(),
            image: Some(image()),
            top_k: 1,
        },
        ACME_KEY,
    );
    req.set_timeout(Duration::from_millis(250));
    let e = gw.vision().await.classify(req).await.unwrap_err();
    let client_timer = e.code() == Code::Cancelled && e.message() == "Timeout expired";
    assert!(e.code() == Code::DeadlineExceeded || client_timer, "{e:?}");
    busy.await.unwrap().unwrap();
    let dropped = wait_until(
        "the expired call dropped",
        Duration::from_secs(30),
        || async {
            let dropped = backend.metric("marquee_batcher_rejected_total", &[]);
            (dropped >= 1.0).then_some(dropped)
        },
    )
    .await;
    assert_eq!(
        dropped, 1.0,
        "the backend dropped the expired call before compute"
    );
    assert_eq!(
        backend.metric("marquee_batcher_items_total", &[]),
        24.0,
        "it computed only the 24 live images"
    );
    gw.shutdown.cancel();
    backend.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oip_routes_by_model_and_unknown_models_are_not_found() {
    use marquee_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
    use marquee_proto::inference::model_infer_request::InferInputTensor;
    use marquee_proto::inference::*;
    let backend = start(fashion_backend_settings()).await;
    let gw = start_gateway(gateway_settings(&[backend.grpc_addr])).await;
    let mut oip = GrpcInferenceServiceClient::new(gw.channel().await);
    let meta = oip
        .model_metadata(with_key(
            ModelMetadataRequest {
                name: "fashion_cnn".into(),
                version: String::new(),
            },
            ACME_KEY,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.inputs[0].shape, vec![-1, 1, 28, 28]);
    let infer = ModelInferRequest {
        model_name: "fashion_cnn".into(),
        inputs: vec![InferInputTensor {
            name: "image".into(),
            datatype: "FP32".into(),
            shape: vec![2, 1, 28, 28],
            ..Default::default()
        }],
        raw_input_contents: vec![vec![0u8; 2 * 784 * 4].into()],
        ..Default::default()
    };
    let r = oip
        .model_infer(with_key(infer.clone(), ACME_KEY))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.outputs.len(), 2);
    assert_eq!(r.raw_output_contents[0].len(), 2 * 10 * 4);
    let e = oip
        .model_infer(with_key(
            ModelInferRequest {
                model_name: "nope".into(),
                ..infer.clone()
            },
            ACME_KEY,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("`nope`"), "{}", e.message());
    let e = oip
        .model_infer(with_key(infer, GLOBEX_KEY))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let index = oip
        .repository_index(with_key(RepositoryIndexRequest::default(), ACME_KEY))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        index
            .models
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>(),
        ["fashion_cnn"]
    );
    let live = oip
        .server_live(ServerLiveRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(live.live, "liveness is open");
    gw.shutdown.cancel();
    backend.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_added_to_a_backend_becomes_routable_without_a_restart() {
    let repo = temp_repo(&["fashion_cnn"]);
    let mut bs = settings(repo.path());
    bs.repository.poll_interval_ms = 100;
    bs.repository.lanes = Some(1);
    bs.repository.profile_batching = Some(false);
    let backend = start(bs).await;
    let gw = start_gateway(gateway_settings(&[backend.grpc_addr])).await;
    let req = || {
        with_key(
            ClassifyRequest {
                model: "efficientnet_lite0".into(),
                image: Some(ImageInput {
                    source: Some(Source::Encoded(fixture("coffee.png").into())),
                }),
                top_k: 1,
            },
            ACME_KEY,
        )
    };
    let mut client = gw.vision().await;
    assert_eq!(
        client.classify(req()).await.unwrap_err().code(),
        Code::NotFound
    );
    // Stage the model next to the repository, then move it in whole.
    let staging = repo.path().join(".staging");
    copy_dir(&model_repo().join("efficientnet_lite0"), &staging);
    std::fs::rename(&staging, repo.path().join("efficientnet_lite0")).unwrap();
    let health = HealthClient::new(backend.channel().await);
    wait_until(
        "efficientnet_lite0 SERVING",
        Duration::from_secs(60),
        || {
            let mut health = health.clone();
            async move {
                let r = health
                    .check(HealthCheckRequest {
                        service: "efficientnet_lite0".into(),
                    })
                    .await;
                r.is_ok_and(|r| r.into_inner().status == 1).then_some(())
            }
        },
    )
    .await;
    // The gateway learns of it on its next refresh (or at once on a miss).
    let answer = wait_until(
        "the new model to become routable",
        Duration::from_secs(60),
        || {
            let (mut client, req) = (client.clone(), req());
            async move {
                match client.classify(req).await {
                    Ok(r) => Some(r.into_inner()),
                    Err(e) => {
                        assert_eq!(e.code(), Code::NotFound, "{e:?}");
                        None
                    }
                }
            }
        },
    )
    .await;
    assert_eq!(answer.labels[0].name, "espresso");
    gw.shutdown.cancel();
    backend.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_row_model_infer_calls_are_merged_and_split_back() {
    use marquee_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
    use marquee_proto::inference::model_infer_request::InferInputTensor;
    use marquee_proto::inference::*;
    let backend = start(fashion_backend_settings()).await;
    let gw = start_gateway(gateway_settings(&[backend.grpc_addr])).await;
    let (images, _) = fashion_test_set(32);
    let row = |px: &[u8]| -> Vec<u8> {
        px.iter()
            .flat_map(|p| ((*p as f32 / 255.0 - 0.286) / 0.353).to_le_bytes())
            .collect()
    };
    let request = |id: usize, raw: Vec<u8>| ModelInferRequest {
        model_name: "fashion_cnn".into(),
        id: format!("req-{id}"),
        inputs: vec![InferInputTensor {
            name: "image".into(),
            datatype: "FP32".into(),
            shape: vec![1, 1, 28, 28],
            ..Default::default()
        }],
        raw_input_contents: vec![raw.into()],
        ..Default::default()
    };
    let logits = |r: &ModelInferResponse| -> Vec<f32> {
        r.raw_output_contents[0]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    // What each row gives on its own, straight from the backend.
    let mut direct = backend.oip().await;
    let mut want = Vec::new();
    for (i, px) in images.iter().enumerate() {
        want.push(logits(
            &direct
                .model_infer(request(i, row(px)))
                .await
                .unwrap()
                .into_inner(),
        ));
    }
    let infer_rpcs = |s: &TestServer| {
        s.metric(
            "marquee_grpc_requests_total",
            &[("method", "/inference.GRPCInferenceService/ModelInfer")],
        )
    };
    let channel = gw.channel().await;
    let run = |bad: Option<usize>| {
        let mut nan_row = row(&images[0]);
        nan_row[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
        let calls = images.iter().enumerate().map(|(i, px)| {
            let mut c = GrpcInferenceServiceClient::new(channel.clone());
            let raw = if Some(i) == bad {
                nan_row.clone()
            } else {
                row(px)
            };
            let req = with_key(request(i, raw), ACME_KEY);
            async move { c.model_infer(req).await.map(|r| r.into_inner()) }
        });
        join_all(calls)
    };
    let check = |results: &[Result<ModelInferResponse, tonic::Status>], bad: Option<usize>| {
        for (i, r) in results.iter().enumerate() {
            if Some(i) == bad {
                let e = r.as_ref().unwrap_err();
                assert_eq!(e.code(), Code::InvalidArgument);
                assert!(e.message().contains("NaN"), "{}", e.message());
                continue;
            }
            let r = r.as_ref().unwrap_or_else(|e| panic!("caller {i}: {e:?}"));
            assert_eq!(
                r.id,
                format!("req-{i}"),
                "each caller gets its own response id"
            );
            assert_eq!(r.outputs[0].shape, vec![1, 10]);
            let got = logits(r);
            assert!(
                got.iter().zip(&want[i]).all(|(a, b)| (a - b).abs() < 1e-4),
                "caller {i}: {got:?} vs {:?}",
                want[i]
            );
        }
    };
    // 32 concurrent single-row calls reach the backend as fewer, larger calls.
    let before = infer_rpcs(&backend);
    check(&run(None).await, None);
    let rpcs = infer_rpcs(&backend) - before;
    assert!(
        rpcs < 32.0,
        "32 callers reached the backend as {rpcs} ModelInfer RPCs: no merging"
    );
    // A caller with a NaN in its row fails alone; everyone merged with it still gets an answer.
    check(&run(Some(5)).await, Some(5));
    gw.shutdown.cancel();
    backend.shutdown.cancel();
}

/// A throwaway CA with a server certificate for 127.0.0.1 and a client certificate.
fn test_pki() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec[..],
            &[
                "-keyout",
                &p("ca.key"),
                "-out",
                &p("ca.pem"),
                "-days",
                "1",
                "-subj",
                "/CN=marquee-test-ca",
            ][..],
        ]
        .concat(),
    );
    for (name, ext) in [
        (
            "server",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        std::fs::write(p(&format!("{name}.ext")), ext).unwrap();
        openssl(
            &[
                &["req"][..],
                &ec[..],
                &[
                    "-keyout",
                    &p(&format!("{name}.key")),
                    "-out",
                    &p(&format!("{name}.csr")),
                    "-subj",
                    &format!("/CN={name}"),
                ][..],
            ]
            .concat(),
        );
        openssl(&[
            "x509",
            "-req",
            "-in",
            &p(&format!("{name}.csr")),
            "-CA",
            &p("ca.pem"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-out",
            &p(&format!("{name}.pem")),
            "-days",
            "1",
            "-extfile",
            &p(&format!("{name}.ext")),
        ]);
    }
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_at_the_gateway_and_mutual_tls_to_the_backend() {
    use marquee_core::config::ServerTls;
    use marquee_gateway::config::ClientTls;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig};
    let pki = test_pki();
    let f = |n: &str| pki.path().join(n);
    let mut bs = fashion_backend_settings();
    bs.server.tls = Some(ServerTls {
        cert_file: f("server.pem"),
        key_file: f("server.key"),
        client_ca_file: Some(f("ca.pem")),
    });
    let backend = start(bs).await;
    let mut s = gateway_settings(&[backend.grpc_addr]);
    s.server.tls = Some(ServerTls {
        cert_file: f("server.pem"),
        key_file: f("server.key"),
        client_ca_file: None,
    });
    s.backends.get_mut("vision").unwrap().tls = Some(ClientTls {
        ca_file: f("ca.pem"),
        domain: None,
        cert_file: Some(f("client.pem")),
        key_file: Some(f("client.key")),
    });
    let gw = start_gateway(s).await;
    let ca = Certificate::from_pem(std::fs::read(f("ca.pem")).unwrap());
    let tls = ClientTlsConfig::new().ca_certificate(ca.clone());
    let channel = Channel::from_shared(format!("https://{}", gw.grpc_addr))
        .unwrap()
        .tls_config(tls.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (images, labels) = fashion_test_set(1);
    let r = ImageServiceClient::new(channel)
        .classify(with_key(fashion(&images[0]), ACME_KEY))
        .await
        .unwrap();
    assert_eq!(
        r.into_inner().labels[0].index,
        labels[0] as u32,
        "client → TLS gateway → mTLS backend"
    );
    // Plaintext to the gateway is refused.
    let plain = Channel::from_shared(format!("http://{}", gw.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert!(
        ImageServiceClient::new(plain)
            .classify(with_key(fashion(&images[0]), ACME_KEY))
            .await
            .is_err()
    );
    // The backend refuses a client without a certificate.
    let anonymous = Channel::from_shared(format!("https://{}", backend.grpc_addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await;
    let refused = match anonymous {
        Err(_) => true,
        Ok(ch) => ImageServiceClient::new(ch)
            .classify(fashion(&images[0]))
            .await
            .is_err(),
    };
    assert!(refused, "mutual TLS: no client certificate, no call");
    gw.shutdown.cancel();
    backend.shutdown.cancel();
}
