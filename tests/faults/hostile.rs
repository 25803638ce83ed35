//! 10,000 hostile calls through the gateway in front of two replicas: every call gets its
//! documented status, the services keep serving, memory stays bounded and the gateway's
//! `/metrics` does not grow.
//!
//! The calls cycle through fixed categories (a deterministic schedule and pseudo-random
//! values from a seeded generator). The expected status of each is what the code and
//! docs/ARCHITECTURE.md document:
//!
//! | category | expected |
//! |---|---|
//! | unknown gRPC path, no credentials | `UNAUTHENTICATED` (auth runs before routing) |
//! | unknown gRPC path, valid key | `UNIMPLEMENTED` |
//! | bad API key / forged, expired, `alg: none`, garbage or wrong-`aud` JWT | `UNAUTHENTICATED` |
//! | JWT without `iss`/`aud` while both are configured (item 5) | `UNAUTHENTICATED` |
//! | 12 KiB header value (inside HTTP/2's 16 KiB header list), valid call | `OK` |
//! | 20 KiB header value (over the 16 KiB header list) | `UNKNOWN` (HTTP 431 from h2; no gRPC status exists yet) |
//! | 80 KiB header value (over h2's 4 × 16 KiB abuse bound; own connection) | `RESOURCE_EXHAUSTED` (h2 closes the connection with ENHANCE_YOUR_CALM), or `UNKNOWN` "transport error" when the close overtakes the reason |
//! | length prefix declaring 1 GiB (5 + 64 bytes sent) | `RESOURCE_EXHAUSTED` (message limit, before buffering) |
//! | 8 MiB + 1 KiB message (over `routes.vision.max_request_bytes`) | `RESOURCE_EXHAUSTED` |
//! | malformed protobuf body | `INVALID_ARGUMENT` naming the field (`marquee_proto::codec`) |
//! | valid request, bytes that are no image | `INVALID_ARGUMENT` |
//! | unknown model | `NOT_FOUND` |
//! | unknown `model_version` (OIP) | `NOT_FOUND` |
//! | 64 KiB `model_version` (OIP; item 4) | `NOT_FOUND` or `INVALID_ARGUMENT` (refused before any batching state exists) |
//! | hostile images to `efficientnet_lite0`: the poison PNG (item 2) | `INVALID_ARGUMENT` |

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes};
use marquee_e2e::*;
use marquee_proto::vision::image_service_client::ImageServiceClient;
use prost::Message;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

use crate::harness::*;
use crate::png::poison_png;

/// Calls in all, in rounds of `ROUND`; series and memory are measured after the first round.
const CALLS: usize = 10_000;
const ROUND: usize = 1_000;
/// Concurrent hostile clients.
const CLIENTS: usize = 16;
/// Growth allowed between the first round and the end: the allocator's slack, not a leak.
const RSS_BOUND_MIB: f64 = 64.0;

const CLASSIFY: &str = "/marquee.vision.v1.ImageService/Classify";
const MODEL_INFER: &str = "/inference.GRPCInferenceService/ModelInfer";
const ISSUER: &str = "https://idp.example";
const AUDIENCE: &str = "marquee";
const JWT_SECRET: &[u8] = b"an-hs256-secret-of-at-least-32-bytes!";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    UnknownPathNoAuth,
    UnknownPathWithKey,
    BadApiKey,
    BadJwt,
    JwtWithoutIssAud,
    BigMetadataWithinLimit,
    MetadataOverLimit,
    MetadataFarOverLimit,
    DeclaredOversize,
    RouteOversize,
    MalformedProtobuf,
    GarbageImage,
    UnknownModel,
    UnknownVersion,
    HugeVersion,
    HostileImage,
}

/// The common categories, cycled call by call.
const CYCLE: &[Kind] = &[
    Kind::UnknownPathNoAuth,
    Kind::UnknownPathWithKey,
    Kind::BadApiKey,
    Kind::BadJwt,
    Kind::JwtWithoutIssAud,
    Kind::BigMetadataWithinLimit,
    Kind::MetadataOverLimit,
    Kind::DeclaredOversize,
    Kind::MalformedProtobuf,
    Kind::GarbageImage,
    Kind::UnknownModel,
    Kind::UnknownVersion,
    Kind::HugeVersion,
    Kind::UnknownPathNoAuth,
];

/// Call `i`'s category: rare expensive ones at fixed positions, the rest cycled.
fn kind_of(i: usize) -> Kind {
    match i % ROUND {
        999 => Kind::RouteOversize,
        n if n % 100 == 50 => Kind::HostileImage,
        n if n % 100 == 77 => Kind::MetadataFarOverLimit,
        _ => CYCLE[i % CYCLE.len()],
    }
}

impl Kind {
    fn expected(self) -> &'static [Code] {
        match self {
            Kind::UnknownPathNoAuth | Kind::BadApiKey | Kind::BadJwt | Kind::JwtWithoutIssAud => {
                &[Code::Unauthenticated]
            }
            Kind::UnknownPathWithKey => &[Code::Unimplemented],
            Kind::BigMetadataWithinLimit => &[Code::Ok],
            Kind::MetadataOverLimit => &[Code::Unknown],
            Kind::MetadataFarOverLimit => &[Code::ResourceExhausted, Code::Unknown],
            Kind::DeclaredOversize | Kind::RouteOversize => &[Code::ResourceExhausted],
            Kind::MalformedProtobuf => &[Code::InvalidArgument],
            Kind::GarbageImage => &[Code::InvalidArgument],
            Kind::UnknownModel | Kind::UnknownVersion => &[Code::NotFound],
            Kind::HugeVersion => &[Code::NotFound, Code::InvalidArgument],
            // Per image, from the corpus; see `hostile_images`.
            Kind::HostileImage => &[],
        }
    }
}

/// Hostile images and the status each must get: the poison image, and every image of the
/// generated corpus (`marquee_e2e::hostile`) that must be refused. The corpus's images that
/// must be served take up to a second each to decode here; `hardening_vision` sends those.
fn hostile_images() -> Vec<(String, Vec<u8>, Code)> {
    let mut images = vec![(
        "poison 1×16,000,000 PNG".to_string(),
        poison_png(),
        Code::InvalidArgument,
    )];
    images.extend(
        marquee_e2e::hostile::corpus()
            .into_iter()
            .filter(|h| h.expect != Code::Ok)
            .map(|h| (h.name.to_string(), h.bytes, h.expect)),
    );
    images
}

/// xorshift64*: the schedule's values are the same on every run.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn word(&mut self, len: usize) -> String {
        const ALPHA: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-";
        (0..len)
            .map(|_| ALPHA[self.below(ALPHA.len())] as char)
            .collect()
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

// === raw calls ===

/// Sends and receives message bytes as they are: malformed bodies and arbitrary paths.
#[derive(Clone, Default)]
struct RawCodec;
struct RawEncoder;
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// One unary call of `body` to `path` with `metadata`, as a tonic client sees it.
async fn raw_call(
    ch: &Channel,
    path: &str,
    metadata: &[(&str, String)],
    body: Bytes,
) -> (Code, String) {
    let mut g = tonic::client::Grpc::new(ch.clone());
    if let Err(e) = g.ready().await {
        return (Code::Unavailable, format!("not ready: {e}"));
    }
    let mut req = tonic::Request::new(body);
    for (k, v) in metadata {
        req.metadata_mut().insert(
            tonic::metadata::MetadataKey::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    req.set_timeout(Duration::from_secs(30));
    let path = http::uri::PathAndQuery::try_from(path).unwrap();
    match g.unary::<Bytes, Bytes, RawCodec>(req, path, RawCodec).await {
        Ok(_) => (Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_string()),
    }
}

/// A request body of one chunk.
struct OneChunk(Option<Bytes>);

impl http_body::Body for OneChunk {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.take().map(|b| Ok(http_body::Frame::data(b))))
    }
    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }
}

/// A gRPC message whose 5-byte prefix declares `declared` bytes, followed by only 64: what
/// no tonic client would send, so it goes out as a plain HTTP/2 request.
async fn lying_prefix_call(ch: &Channel, path: &str, key: &str, declared: u32) -> (Code, String) {
    use tower::ServiceExt;
    let mut body = vec![0u8];
    body.extend_from_slice(&declared.to_be_bytes());
    body.extend_from_slice(&[0u8; 64]);
    let req = http::Request::builder()
        .method("POST")
        .uri(path)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-api-key", key)
        .body(tonic::body::Body::new(OneChunk(Some(body.into()))))
        .unwrap();
    let resp = match ch.clone().oneshot(req).await {
        Ok(r) => r,
        Err(e) => return (Code::Unavailable, format!("transport: {e}")),
    };
    let status_of = |h: &http::HeaderMap| {
        h.get("grpc-status")
            .and_then(|v| v.to_str().ok()?.parse::<i32>().ok())
            .map(|c| {
                let m = h
                    .get("grpc-message")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                (Code::from_i32(c), m)
            })
    };
    let (parts, body) = resp.into_parts();
    if let Some(s) = status_of(&parts.headers) {
        return s;
    }
    if parts.status != http::StatusCode::OK {
        return (Code::Unknown, format!("HTTP {}", parts.status));
    }
    let mut body = std::pin::pin!(body);
    loop {
        let frame =
            futures::future::poll_fn(|cx| http_body::Body::poll_frame(body.as_mut(), cx)).await;
        match frame {
            Some(Ok(f)) => {
                if let Ok(t) = f.into_trailers() {
                    return status_of(&t)
                        .unwrap_or((Code::Unknown, "trailers without grpc-status".into()));
                }
            }
            Some(Err(e)) => return (Code::Unknown, format!("body: {e}")),
            None => return (Code::Unknown, "no grpc-status".into()),
        }
    }
}

// === the calls ===

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Tokens the gateway must refuse, and one it must refuse only once `iss`/`aud` are required.
struct Tokens {
    bad: Vec<String>,
    without_iss_aud: String,
}

fn tokens() -> Tokens {
    use base64::Engine;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let sign = |secret: &[u8], claims: serde_json::Value| {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret).unwrap(),
        )
        .unwrap()
    };
    let claims = |exp: u64, aud: &str| {
        serde_json::json!({"sub": "user-1", "tenant": "acme", "scope": "vision:infer",
            "exp": exp, "aud": aud, "iss": ISSUER})
    };
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    Tokens {
        bad: vec![
            // Signed with another secret.
            sign(
                b"not-the-gateway-secret-but-32-bytes-long",
                claims(now_s() + 600, AUDIENCE),
            ),
            // Expired an hour ago (leeway is 30 s).
            sign(JWT_SECRET, claims(now_s() - 3600, AUDIENCE)),
            // For another audience.
            sign(JWT_SECRET, claims(now_s() + 600, "someone-else")),
            // `alg: none`, no signature.
            format!(
                "{}.{}.",
                b64(r#"{"alg":"none","typ":"JWT"}"#),
                b64(&claims(now_s() + 600, AUDIENCE).to_string())
            ),
            // Three dots' worth of garbage.
            "eyJhbGciOiJIUzI1NiJ9.!!!.???".to_string(),
        ],
        without_iss_aud: sign(
            JWT_SECRET,
            serde_json::json!({"tenant": "acme", "scope": "vision:infer", "exp": now_s() + 600}),
        ),
    }
}

/// Everything a hostile client needs.
struct Arsenal {
    images: Vec<(String, Vec<u8>, Code)>,
    tokens: Tokens,
    png: Vec<u8>,
    row: Vec<u8>,
    gateway: std::net::SocketAddr,
}

/// Sends call `i` on `ch`; the status it got and the status(es) it should have got.
async fn hostile_call(i: usize, ch: &Channel, a: &Arsenal) -> (Kind, Code, String, Vec<Code>) {
    let kind = kind_of(i);
    let mut rng = Rng::new(i as u64 + 1);
    let key = || ("x-api-key", ACME_KEY.to_string());
    let classify = |png: Vec<u8>| Bytes::from(classify_request(png).encode_to_vec());
    let mut expected = kind.expected().to_vec();
    let (code, message) = match kind {
        Kind::UnknownPathNoAuth | Kind::UnknownPathWithKey => {
            // Mostly short paths, one in ten up to 2 KiB.
            let long = rng.below(10) == 0;
            let (s, m) = if long {
                (rng.below(1024) + 512, rng.below(1024) + 1)
            } else {
                (rng.below(32) + 4, rng.below(24) + 2)
            };
            let path = format!("/{}/{}", rng.word(s), rng.word(m));
            let meta = if kind == Kind::UnknownPathWithKey {
                vec![key()]
            } else {
                vec![]
            };
            raw_call(ch, &path, &meta, Bytes::from(rng.bytes(16))).await
        }
        Kind::BadApiKey => {
            let n = rng.below(200) + 1;
            let bad = rng.word(n);
            raw_call(ch, CLASSIFY, &[("x-api-key", bad)], classify(a.png.clone())).await
        }
        Kind::BadJwt => {
            let t = &a.tokens.bad[rng.below(a.tokens.bad.len())];
            let meta = [("authorization", format!("Bearer {t}"))];
            raw_call(ch, CLASSIFY, &meta, classify(a.png.clone())).await
        }
        Kind::JwtWithoutIssAud => {
            let meta = [(
                "authorization",
                format!("Bearer {}", a.tokens.without_iss_aud),
            )];
            raw_call(ch, CLASSIFY, &meta, classify(a.png.clone())).await
        }
        Kind::BigMetadataWithinLimit => {
            let meta = [key(), ("x-padding", "a".repeat(12 << 10))];
            raw_call(ch, CLASSIFY, &meta, classify(a.png.clone())).await
        }
        Kind::MetadataOverLimit => {
            let meta = [key(), ("x-padding", "a".repeat(20 << 10))];
            raw_call(ch, CLASSIFY, &meta, classify(a.png.clone())).await
        }
        Kind::MetadataFarOverLimit => {
            // h2 closes the whole connection for this one: give it its own.
            let own = Channel::from_shared(format!("http://{}", a.gateway))
                .unwrap()
                .connect()
                .await
                .expect("gateway accepts connections");
            let meta = [key(), ("x-padding", "a".repeat(80 << 10))];
            raw_call(&own, CLASSIFY, &meta, classify(a.png.clone())).await
        }
        Kind::DeclaredOversize => lying_prefix_call(ch, CLASSIFY, ACME_KEY, 1 << 30).await,
        Kind::RouteOversize => {
            let big = classify(rng.bytes((8 << 20) + 1024));
            raw_call(ch, CLASSIFY, &[key()], big).await
        }
        Kind::MalformedProtobuf => {
            let body: Vec<u8> = match rng.below(3) {
                // Field 1 with wire type 7, which does not exist.
                0 => vec![0x0F, 0x01, 0x02, 0x03],
                // Field 1, length-delimited, longer than the message.
                1 => vec![0x0A, 0xFF, 0xFF, 0x03, 0x61],
                // A varint that never ends.
                _ => vec![
                    0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
                ],
            };
            let path = if rng.below(2) == 0 {
                CLASSIFY
            } else {
                MODEL_INFER
            };
            raw_call(ch, path, &[key()], Bytes::from(body)).await
        }
        Kind::GarbageImage => {
            let n = rng.below(4096) + 16;
            let junk = rng.bytes(n);
            raw_call(ch, CLASSIFY, &[key()], classify(junk)).await
        }
        Kind::UnknownModel => {
            let mut req = classify_request(a.png.clone());
            req.model = format!("no-such-model-{}", rng.word(24));
            raw_call(ch, CLASSIFY, &[key()], req.encode_to_vec().into()).await
        }
        Kind::UnknownVersion | Kind::HugeVersion => {
            let mut req = infer_request(i, a.row.clone());
            req.model_version = if kind == Kind::HugeVersion {
                rng.word(64 << 10)
            } else {
                format!("9{}", rng.below(1_000_000))
            };
            raw_call(ch, MODEL_INFER, &[key()], req.encode_to_vec().into()).await
        }
        Kind::HostileImage => {
            let (_, bytes, expect) = &a.images[(i / 100) % a.images.len()];
            expected = vec![*expect];
            let mut req = classify_request(bytes.clone());
            req.model = POISON_MODEL.into();
            raw_call(ch, CLASSIFY, &[key()], req.encode_to_vec().into()).await
        }
    };
    (kind, code, message, expected)
}

#[derive(Default)]
struct Tally {
    calls: usize,
    /// Calls whose status was not the documented one.
    wrong: usize,
    codes: BTreeMap<&'static str, usize>,
    example: Option<String>,
}

/// Sends calls `range` from `CLIENTS` concurrent clients; the tallies by category.
async fn run_round(
    range: std::ops::Range<usize>,
    channels: &[Channel],
    arsenal: &Arc<Arsenal>,
    tally: &Arc<Mutex<BTreeMap<Kind, Tally>>>,
) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(range.start));
    let end = range.end;
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (ch, a, t, next) = (
                channels[c % channels.len()].clone(),
                arsenal.clone(),
                tally.clone(),
                next.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= end {
                        return;
                    }
                    let (kind, code, message, expected) = hostile_call(i, &ch, &a).await;
                    let mut t = t.lock().unwrap();
                    let e = t.entry(kind).or_default();
                    e.calls += 1;
                    *e.codes.entry(code_name(code)).or_default() += 1;
                    if !expected.contains(&code) {
                        e.wrong += 1;
                        if e.example.is_none() {
                            e.example = Some(format!(
                                "call {i}: {} {}",
                                code_name(code),
                                truncate(&message, 120)
                            ));
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("hostile client does not panic");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_hostile_calls_get_their_documented_status_and_leave_the_services_bounded() {
    let _one_at_a_time = serial().await;
    let secrets = tempfile::tempdir().unwrap();
    let secret_file = secrets.path().join("hs256.secret");
    std::fs::write(&secret_file, JWT_SECRET).unwrap();
    let env = replica_env_serving(&model_repo(), &[MODEL, POISON_MODEL], 0, 0);
    let mut c = Cluster::start(env, |s| {
        s.auth.jwt.hs256_secret_file = Some(secret_file.clone());
        s.auth.jwt.issuer = Some(ISSUER.into());
        s.auth.jwt.audience = Some(AUDIENCE.into());
    })
    .await;
    let arsenal = Arc::new(Arsenal {
        images: hostile_images(),
        tokens: tokens(),
        png: c.inputs.pngs[0].clone(),
        row: c.inputs.rows[0].clone(),
        gateway: c.gw.grpc_addr,
    });
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(c.gw.channel().await);
    }
    let tally = Arc::new(Mutex::new(BTreeMap::new()));
    let gw_metrics = || try_http_get(c.gw.admin_addr, "/metrics");

    // Round 1: every category at least once; the baseline for series and memory.
    run_round(0..ROUND, &channels, &arsenal, &tally).await;
    let text = gw_metrics().await.unwrap_or_default();
    let (series_1, bytes_1) = (series(&text), text.len());
    let rss_1 = rss_mib("self");
    let mut replica_rss_1 = Vec::new();
    let mut replica_series_1 = Vec::new();
    for r in &c.replicas {
        replica_rss_1.push(r.rss_mib());
        replica_series_1.push(r.metrics().await.map_or(0, |t| series(&t)));
    }
    // Rounds 2..
    let mut start = ROUND;
    while start < CALLS {
        run_round(start..start + ROUND, &channels, &arsenal, &tally).await;
        start += ROUND;
    }
    let text = gw_metrics().await.unwrap_or_default();
    let (series_n, bytes_n) = (series(&text), text.len());
    let rss_n = rss_mib("self");

    // Still serving: a normal call through the gateway, each replica alive and answering.
    let mut normal = ImageServiceClient::new(c.gw.channel().await);
    let normal_ok = normal
        .classify(with_key(classify_request(arsenal.png.clone()), ACME_KEY))
        .await
        .is_ok();
    let mut replicas_text = Vec::new();
    let mut replicas_ok = true;
    let mut replicas_bounded = true;
    for (i, r) in c.replicas.iter_mut().enumerate() {
        let alive = r.is_alive();
        let (rss, series_now) = if alive {
            (r.rss_mib(), r.metrics().await.map_or(0, |t| series(&t)))
        } else {
            (0.0, 0)
        };
        let answers = alive
            && ImageServiceClient::new(r.channel().await)
                .classify(classify_request(arsenal.png.clone()))
                .await
                .is_ok();
        replicas_ok &= answers;
        replicas_bounded &= rss - replica_rss_1[i] <= RSS_BOUND_MIB;
        let (name, how) = (r.name, r.describe());
        replicas_text.push(format!(
            "{name} {how} RSS {:.0}→{:.0} MiB, series {}→{}",
            replica_rss_1[i], rss, replica_series_1[i], series_now
        ));
    }

    let tally = tally.lock().unwrap();
    let total: usize = tally.values().map(|t| t.calls).sum();
    let wrong: usize = tally.values().map(|t| t.wrong).sum();
    for (kind, t) in tally.iter() {
        let expected = if *kind == Kind::HostileImage {
            arsenal
                .images
                .iter()
                .map(|(n, _, e)| format!("{n}: {}", code_name(*e)))
                .collect::<Vec<_>>()
                .join("; ")
        } else {
            kind.expected()
                .iter()
                .map(|c| code_name(*c))
                .collect::<Vec<_>>()
                .join(" or ")
        };
        let codes = t
            .codes
            .iter()
            .map(|(c, n)| format!("{c} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        report(
            &format!("hostile calls: {kind:?}"),
            &expected,
            &format!(
                "{} calls, {} not as documented ({codes}){}",
                t.calls,
                t.wrong,
                t.example
                    .as_ref()
                    .map(|e| format!("; first: {e}"))
                    .unwrap_or_default()
            ),
        );
    }
    let rss_growth = rss_n - rss_1;
    report(
        "10,000 hostile calls through the gateway (paths, metadata, sizes, credentials, bodies, versions, images)",
        &format!(
            "every call its documented status; a normal call succeeds after; gateway /metrics series unchanged after round 1; RSS growth ≤ {RSS_BOUND_MIB} MiB (gateway and each replica)"
        ),
        &format!(
            "calls {total}, not as documented {wrong}; normal call after: {}; gateway /metrics series {series_1}→{series_n} ({:.0}→{:.0} KiB); gateway(test process) RSS {rss_1:.0}→{rss_n:.0} MiB; replicas: {}",
            if normal_ok { "OK" } else { "FAILED" },
            bytes_1 as f64 / 1024.0,
            bytes_n as f64 / 1024.0,
            replicas_text.join("; ")
        ),
    );
    c.stop();
    let failures: Vec<String> = tally
        .iter()
        .filter(|(_, t)| t.wrong > 0)
        .map(|(k, t)| {
            format!(
                "{k:?}: {} of {} ({})",
                t.wrong,
                t.calls,
                t.example.clone().unwrap_or_default()
            )
        })
        .collect();
    assert_eq!(total, CALLS);
    assert!(
        failures.is_empty(),
        "calls with an undocumented status: {failures:#?}"
    );
    assert!(normal_ok, "a normal call succeeds after the hostile ones");
    assert!(replicas_ok, "both replicas stay up: {replicas_text:?}");
    assert_eq!(
        series_n, series_1,
        "the gateway's /metrics series stay the same after the first round"
    );
    assert!(
        rss_growth <= RSS_BOUND_MIB,
        "the gateway's memory stays bounded: +{rss_growth:.0} MiB"
    );
    assert!(
        replicas_bounded,
        "the replicas' memory stays bounded: {replicas_text:?}"
    );
}
