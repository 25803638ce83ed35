//! Issue 10 hardening of the gateway, end to end over real gRPC: JWT claims that are configured
//! are required (item 5); a tenant's `max_in_flight` covers streams until they end (item 6);
//! each route spends its own retry budget (item 14); a request that took down two replicas is
//! not sent to a third (item 2, the gateway's poison-request guard).

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use futures::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use marquee_e2e::jwt::jwt_keys;
use marquee_e2e::*;
use marquee_gateway::config::{ApiKey, Backend, BackendKind, Settings, Tenant};
use marquee_proto::inference::ModelInferRequest;
use marquee_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use marquee_proto::inference::model_infer_request::InferInputTensor;
use marquee_proto::language::text_generation_client::TextGenerationClient;
use marquee_proto::language::{GenerateRequest, GenerationParameters};
use marquee_proto::vision::image_input::Source;
use marquee_proto::vision::*;
use tonic::Code;

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn classify(png: Vec<u8>) -> ClassifyRequest {
    ClassifyRequest {
        model: "fashion_cnn".into(),
        image: Some(ImageInput {
            source: Some(Source::Encoded(png.into())),
        }),
        top_k: 1,
    }
}

fn a_shirt() -> ClassifyRequest {
    let (images, _) = fashion_test_set(1);
    classify(png_gray(&images[0], 28, 28))
}

fn api_key(key: &str, tenant: &str, scopes: &[&str]) -> ApiKey {
    ApiKey {
        sha256: marquee_gateway::auth::hash_key(key),
        tenant: tenant.into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
    }
}

// === item 5: JWT claims ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_must_carry_the_configured_issuer_audience_and_expiry() {
    let backend = start(fashion_backend_settings()).await;
    let keys = jwt_keys();
    let p = |n: &str| keys.dir.path().join(n).to_str().unwrap().to_string();
    let secret = keys.secret.clone();
    let mut s = gateway_settings(&[backend.grpc_addr]);
    s.auth.jwt.hs256_secret_file = Some(p("hs256.secret").into());
    s.auth.jwt.public_key_files = vec![p("rsa.pub.pem").into()];
    s.auth.jwt.issuer = Some("https://idp.example".into());
    s.auth.jwt.audience = Some("marquee".into());
    s.auth.jwt.leeway_s = 0;
    let gw = start_gateway(s).await;
    let mut client = gw.vision().await;
    let hs = EncodingKey::from_secret(&secret).unwrap();
    let rsa = EncodingKey::from_rsa_pem(&std::fs::read(p("rsa.pem")).unwrap()).unwrap();
    let good = || {
        serde_json::json!({
            "sub": "user-1", "tenant": "acme", "scope": "vision:infer",
            "exp": now_s() + 600, "iss": "https://idp.example", "aud": "marquee",
        })
    };
    let sign = |key: &EncodingKey, alg: Algorithm, claims: serde_json::Value| {
        jsonwebtoken::encode(&Header::new(alg), &claims, key).unwrap()
    };
    let without = |claim: &str| {
        let mut c = good();
        c.as_object_mut().unwrap().remove(claim);
        c
    };
    let with = |claim: &str, v: serde_json::Value| {
        let mut c = good();
        c[claim] = v;
        c
    };
    // The right token, by either algorithm, is accepted.
    for (what, t) in [
        ("HS256", sign(&hs, Algorithm::HS256, good())),
        ("RS256", sign(&rsa, Algorithm::RS256, good())),
    ] {
        let r = client.classify(with_bearer(a_shirt(), &t)).await;
        assert!(r.is_ok(), "{what}: {r:?}");
    }
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    // `alg: none`: a header and claims, no signature.
    let unsigned = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(good().to_string().as_bytes())
    );
    // The classic confusion: the RSA *public* key used as an HS256 secret.
    let confused = sign(
        &EncodingKey::from_secret(&std::fs::read(p("rsa.pub.pem")).unwrap()).unwrap(),
        Algorithm::HS256,
        good(),
    );
    // A correctly signed token padded past the 8 KiB limit (but under the 16 KiB of headers
    // HTTP/2 lets through) with a long claim.
    let huge = sign(
        &hs,
        Algorithm::HS256,
        with("pad", serde_json::json!("x".repeat(7_000))),
    );
    assert!((8 << 10..14 << 10).contains(&huge.len()), "{}", huge.len());
    let cases = [
        (
            "no iss",
            sign(&hs, Algorithm::HS256, without("iss")),
            "required claim `iss` is missing",
        ),
        (
            "no aud",
            sign(&hs, Algorithm::HS256, without("aud")),
            "required claim `aud` is missing",
        ),
        (
            "neither iss nor aud (the issue's reproduction)",
            {
                let mut c = without("iss");
                c.as_object_mut().unwrap().remove("aud");
                sign(&hs, Algorithm::HS256, c)
            },
            "is missing",
        ),
        (
            "wrong iss",
            sign(
                &rsa,
                Algorithm::RS256,
                with("iss", "https://evil.example".into()),
            ),
            "`iss` is not `https://idp.example`",
        ),
        (
            "wrong aud",
            sign(&hs, Algorithm::HS256, with("aud", "someone-else".into())),
            "`aud` does not include `marquee`",
        ),
        (
            "no exp",
            sign(&hs, Algorithm::HS256, without("exp")),
            "required claim `exp` is missing",
        ),
        (
            "not yet valid",
            sign(
                &hs,
                Algorithm::HS256,
                with("nbf", serde_json::json!(now_s() + 600)),
            ),
            "not valid yet",
        ),
        ("alg none", unsigned, "invalid JWT"),
        (
            "RSA public key as HS256 secret",
            confused,
            "signature does not verify",
        ),
        ("oversized", huge, "the limit is 8192"),
    ];
    for (what, token, needle) in cases {
        let e = client
            .classify(with_bearer(a_shirt(), &token))
            .await
            .expect_err(what);
        assert_eq!(e.code(), Code::Unauthenticated, "{what}: {e:?}");
        assert!(
            e.message().contains(needle),
            "{what}: `{}` lacks `{needle}`",
            e.message()
        );
    }
    gw.shutdown.cancel();
    backend.shutdown.cancel();
}

// === item 6: streams count against `max_in_flight` ===

const SOLO_KEY: &str = "solo-test-key-4b7e19";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_holds_its_tenants_in_flight_slot_until_it_ends() {
    let language = start_language(language_settings()).await;
    let mut s = Settings::default();
    s.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
    s.server.admin_addr = "127.0.0.1:0".parse().unwrap();
    s.backends.clear();
    s.backends.insert(
        "language".into(),
        Backend {
            kind: BackendKind::Language,
            endpoints: vec![language.grpc_addr.to_string()],
            health_interval_ms: 100,
            ..Backend::default()
        },
    );
    s.tenants.insert(
        "solo".into(),
        Tenant {
            max_in_flight: 1,
            ..Tenant::default()
        },
    );
    s.auth.api_keys = vec![api_key(SOLO_KEY, "solo", &["language:generate"])];
    let gw = start_gateway(s).await;
    let mut c = TextGenerationClient::new(gw.channel().await);
    let request = |tokens: u32| GenerateRequest {
        model: String::new(),
        prompt: "The jacket".into(),
        parameters: Some(GenerationParameters {
            max_new_tokens: Some(tokens),
            // No early end-of-sequence: the stream lasts its full length.
            min_new_tokens: tokens,
            ..Default::default()
        }),
    };
    let refused = |r: Result<(), tonic::Status>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.code(), Code::ResourceExhausted, "{what}: {e:?}");
        assert!(
            e.message().contains("max_in_flight"),
            "{what}: {}",
            e.message()
        );
    };

    // A long stream, read once and kept open.
    let mut long = c
        .generate_stream(with_key(request(200), SOLO_KEY))
        .await
        .expect("the first stream is admitted")
        .into_inner();
    long.next().await.expect("a first message").expect("ok");
    refused(
        c.generate(with_key(request(1), SOLO_KEY)).await.map(|_| ()),
        "a unary call while the stream is open",
    );
    refused(
        c.generate_stream(with_key(request(1), SOLO_KEY))
            .await
            .map(|_| ()),
        "a second stream while the first is open",
    );
    // The client drops the stream: the slot comes back (once the gateway sees the reset).
    drop(long);
    wait_until(
        "a call to be admitted once the dropped stream is gone",
        Duration::from_secs(60),
        || {
            let (mut c, req) = (c.clone(), with_key(request(1), SOLO_KEY));
            async move {
                match c.generate(req).await {
                    Ok(r) => Some(r.into_inner()),
                    Err(e) if e.code() == Code::ResourceExhausted => None,
                    Err(e) => panic!("after the stream was dropped: {e:?}"),
                }
            }
        },
    )
    .await;
    // A stream read to its end frees the slot by the time its caller has seen the end.
    let mut short = c
        .generate_stream(with_key(request(3), SOLO_KEY))
        .await
        .expect("admitted")
        .into_inner();
    let mut messages = 0;
    while let Some(m) = short.next().await {
        m.expect("ok");
        messages += 1;
    }
    assert!(messages >= 1);
    let next = c.generate(with_key(request(1), SOLO_KEY)).await;
    assert!(
        next.is_ok(),
        "admitted right after the stream ended: {next:?}"
    );
    gw.shutdown.cancel();
    language.shutdown.cancel();
}

// === item 14: one retry budget per route ===

fn vision_child_env(extra: &[(&str, String)]) -> Vec<(&'static str, String)> {
    let mut env: Vec<(&'static str, String)> = vec![
        (
            "MARQUEE__REPOSITORY__PATH",
            model_repo().display().to_string(),
        ),
        ("MARQUEE__REPOSITORY__MODELS", "fashion_cnn".into()),
        ("MARQUEE__REPOSITORY__LANES", "1".into()),
        ("MARQUEE__REPOSITORY__THREADS", "1".into()),
        ("MARQUEE__REPOSITORY__POLL_INTERVAL_MS", "0".into()),
    ];
    for (k, v) in extra {
        let k: &'static str = Box::leak(k.to_string().into_boxed_str());
        env.push((k, v.clone()));
    }
    env
}

/// A gateway in front of `replicas` that never health-checks again after its first check: a
/// dead replica stays in rotation until a call finds it dead.
fn retry_gateway(replicas: &[SocketAddr]) -> Settings {
    let mut s = gateway_settings(replicas);
    let b = s.backends.get_mut("vision").unwrap();
    b.health_interval_ms = 600_000;
    s.routes.vision.batching = false;
    s.routes.inference.batching = false;
    s.routes.vision.retry_budget_percent = 0.0;
    s.routes.inference.retry_budget_percent = 100.0;
    s
}

fn fashion_infer() -> ModelInferRequest {
    ModelInferRequest {
        model_name: "fashion_cnn".into(),
        inputs: vec![InferInputTensor {
            name: "image".into(),
            datatype: "FP32".into(),
            shape: vec![1, 1, 28, 28],
            ..Default::default()
        }],
        raw_input_contents: vec![vec![0u8; 784 * 4].into()],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_route_spends_its_own_retry_budget() {
    let a = start(fashion_backend_settings()).await;
    let mut b = ChildServer::start("marquee-vision", &vision_child_env(&[]));
    let replicas = [a.grpc_addr, b.grpc_addr];
    // Two gateways with the same settings, so each route meets the dead replica afresh.
    let vision_gw = start_gateway(retry_gateway(&replicas)).await;
    let oip_gw = start_gateway(retry_gateway(&replicas)).await;
    // Each gateway's one health check has reached B (so none can eject B after it dies).
    let checks = || async {
        http_get(b.admin_addr, "/metrics")
            .await
            .1
            .lines()
            .filter(|l| {
                l.starts_with("marquee_grpc_requests_total{")
                    && l.contains("/grpc.health.v1.Health/Check")
                    && l.contains("code=\"OK\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    wait_until(
        "a health check from each gateway",
        Duration::from_secs(60),
        || async { (checks().await >= 2.0).then_some(()) },
    )
    .await;
    assert_eq!(checks().await, 2.0, "one health check from each gateway");
    for gw in [&vision_gw, &oip_gw] {
        assert_eq!(gw.metric("marquee_gateway_endpoints_healthy", &[]), 2.0);
    }
    b.kill();
    let retries = |gw: &TestGateway, route: &str| {
        gw.metric("marquee_gateway_retries_total", &[("route", route)])
    };

    // `routes.vision.retry_budget_percent = 0`: the call that finds B dead fails, unretried.
    let mut vision = vision_gw.vision().await;
    let mut failed = Vec::new();
    for _ in 0..200 {
        if let Err(e) = vision.classify(with_key(a_shirt(), ACME_KEY)).await {
            failed.push(e);
        }
        if vision_gw.metric("marquee_gateway_endpoints_healthy", &[]) == 1.0 {
            break;
        }
    }
    assert_eq!(
        vision_gw.metric("marquee_gateway_endpoints_healthy", &[]),
        1.0,
        "a call found the dead replica"
    );
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].code(), Code::Unavailable, "{:?}", failed[0]);
    assert_eq!(retries(&vision_gw, "vision"), 0.0);

    // `routes.inference.retry_budget_percent = 100`: the same failure is retried on A.
    let mut oip = GrpcInferenceServiceClient::new(oip_gw.channel().await);
    for _ in 0..200 {
        let r = oip.model_infer(with_key(fashion_infer(), ACME_KEY)).await;
        assert!(r.is_ok(), "OIP calls are retried: {r:?}");
        if oip_gw.metric("marquee_gateway_endpoints_healthy", &[]) == 1.0 {
            break;
        }
    }
    assert_eq!(
        oip_gw.metric("marquee_gateway_endpoints_healthy", &[]),
        1.0,
        "a call found the dead replica"
    );
    assert_eq!(retries(&oip_gw, "inference"), 1.0);
    assert_eq!(retries(&oip_gw, "vision"), 0.0);
    vision_gw.shutdown.cancel();
    oip_gw.shutdown.cancel();
    a.shutdown.cancel();
}

// === item 2: the poison-request guard ===

/// A valid greyscale PNG of `side`×`side` black pixels: a few hundred KB that decode to
/// `side²` bytes. Written row by row, so the test never holds the decoded image.
fn black_png(side: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&side.to_be_bytes());
    ihdr.extend_from_slice(&side.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // 8-bit greyscale, no interlace
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    let row = vec![0u8; side as usize + 1]; // filter byte 0, then the pixels
    for _ in 0..side {
        z.write_all(&row).unwrap();
    }
    let idat = z.finish().unwrap();
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &idat);
    chunk(&mut out, b"IEND", &[]);
    out
}

/// The virtual memory size of process `pid` (bytes), from `/proc/<pid>/status`.
fn vm_size(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmSize in /proc/<pid>/status");
    kb * 1024
}

/// Caps a child's address space at what it maps now plus `headroom`, and turns off its core
/// dumps: an allocation past the cap makes the Rust allocator abort the process, exactly as a
/// decode too big for the machine does.
fn cap_address_space(pid: u32, headroom: u64) {
    let cap = vm_size(pid) + headroom;
    for (resource, value) in [(libc::RLIMIT_AS, cap), (libc::RLIMIT_CORE, 0)] {
        let limit = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: plain syscall on a child we own, with a valid `rlimit` and no old-limit out.
        let rc = unsafe { libc::prlimit(pid as i32, resource, &limit, std::ptr::null_mut()) };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    }
}

const POISON_SIDE: u32 = 16_384; // decodes to 256 MiB of pixels
const HEADROOM: u64 = 128 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_kills_two_replicas_is_not_sent_to_a_third() {
    let env = vision_child_env(&[
        // Admit the image (the pixel limit is what normally refuses it); the address-space
        // cap below is what it meets instead.
        ("MARQUEE__VISION__MAX_PIXELS", "1000000000".into()),
    ]);
    let mut replicas: Vec<ChildServer> = (0..3)
        .map(|_| ChildServer::start("marquee-vision", &env))
        .collect();
    for r in &replicas {
        cap_address_space(r.child.id(), HEADROOM);
    }
    let addrs: Vec<SocketAddr> = replicas.iter().map(|r| r.grpc_addr).collect();
    let mut s = gateway_settings(&addrs);
    s.routes.vision.batching = false;
    let gw = start_gateway(s).await;
    let mut client = gw.vision().await;
    client
        .classify(with_key(a_shirt(), ACME_KEY))
        .await
        .expect("capped replicas still serve a normal image");
    let poison = classify(black_png(POISON_SIDE));
    assert!(poison.image.as_ref().unwrap().source.is_some());

    let e = client
        .classify(with_key(poison.clone(), ACME_KEY))
        .await
        .expect_err("the poison image fails");
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    for needle in [
        "not retried further",
        "2 replicas",
        "failed mid-call",
        "possible poison request",
    ] {
        assert!(
            e.message().contains(needle),
            "`{}` lacks `{needle}`",
            e.message()
        );
    }
    fn dead(replicas: &mut [ChildServer]) -> usize {
        replicas
            .iter_mut()
            .map(|r| usize::from(r.child.try_wait().unwrap().is_some()))
            .sum()
    }
    wait_until("two replicas to die", Duration::from_secs(60), || {
        let died = dead(&mut replicas);
        async move { (died >= 2).then_some(()) }
    })
    .await;
    assert_eq!(dead(&mut replicas), 2, "exactly two replicas died");
    // Killed the way the issue's reproduction was: the allocator's abort, not a signal of ours.
    for r in replicas.iter_mut() {
        if let Some(status) = r.child.try_wait().unwrap() {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(status.signal(), Some(libc::SIGABRT), "{status:?}");
        }
    }
    assert_eq!(
        gw.metric(
            "marquee_gateway_poison_requests_total",
            &[("outcome", "failed")]
        ),
        1.0
    );

    // The same request again is refused at once: it never reaches the last replica.
    let e = client
        .classify(with_key(poison, ACME_KEY))
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    assert!(
        e.message().contains("refused without sending it"),
        "{}",
        e.message()
    );
    assert_eq!(
        gw.metric(
            "marquee_gateway_poison_requests_total",
            &[("outcome", "refused")]
        ),
        1.0
    );
    // The survivor serves as before.
    let ok = client
        .classify(with_key(a_shirt(), ACME_KEY))
        .await
        .expect("the third replica serves");
    assert_eq!(ok.into_inner().labels.len(), 1);
    assert_eq!(dead(&mut replicas), 2, "the third replica is still alive");
    gw.shutdown.cancel();
}
