//! The model-service kit's promises, checked against all three model services by the same test
//! code: each is the real binary, started on a private copy of its model, called over real gRPC.
//!
//! - readiness: health `""` and the model SERVING, `/readyz` 200 naming the model, OIP
//!   `ServerReady`/`ModelReady` true, `RepositoryIndex` listing it READY, and reflection listing
//!   exactly the services the binary serves;
//! - hot reload: a new version dropped into the repository goes live with no failed call, and
//!   no client sees the old version again once it has seen the new one;
//! - drain: on SIGTERM the server reports NOT_SERVING everywhere (health `""` and per model,
//!   `/readyz`, OIP `ServerReady` and `ModelReady`) while it still answers calls, lets a long
//!   call finish, and exits 0.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use marquee_e2e::lifecycle::{channel, health, oip};
use marquee_e2e::*;
use marquee_proto::inference::{
    ModelReadyRequest, RepositoryIndexRequest, ServerLiveRequest, ServerReadyRequest,
};
use marquee_proto::language::text_generation_client::TextGenerationClient;
use marquee_proto::language::{GenerateRequest, GenerationParameters};
use marquee_proto::recommendation::recommender_client::RecommenderClient;
use marquee_proto::recommendation::{FeedbackEvent, RecommendRequest, RecordFeedbackRequest};
use marquee_proto::vision::image_input::Source;
use marquee_proto::vision::image_service_client::ImageServiceClient;
use marquee_proto::vision::{ClassifyRequest, ImageInput};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

/// The three model services, as the tests drive them.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Vision,
    Language,
    Recommendation,
}

impl Kind {
    fn binary(self) -> &'static str {
        match self {
            Kind::Vision => "marquee-vision",
            Kind::Language => "marquee-language",
            Kind::Recommendation => "marquee-recommendation",
        }
    }

    /// The model each serves in these tests (the smallest of its kind).
    fn model(self) -> &'static str {
        match self {
            Kind::Vision => "fashion_cnn",
            Kind::Language => "gpt_reviews",
            Kind::Recommendation => "recommender",
        }
    }

    /// The gRPC services the binary answers besides health and reflection.
    fn services(self) -> &'static [&'static str] {
        match self {
            Kind::Vision => &[
                "inference.GRPCInferenceService",
                "marquee.vision.v1.ImageService",
            ],
            Kind::Language => &[
                "inference.GRPCInferenceService",
                "marquee.language.v1.TextGeneration",
            ],
            Kind::Recommendation => &[
                "inference.GRPCInferenceService",
                "marquee.recommendation.v1.Recommender",
            ],
        }
    }

    /// Starts the binary on a private repository holding only this kind's model, polling for
    /// new versions every 50 ms, one lane of one thread.
    fn start(self, repo: &Path, state: &Path, extra: &[(&str, String)]) -> ChildServer {
        let mut env = vec![
            ("MARQUEE__REPOSITORY__PATH", repo.display().to_string()),
            ("MARQUEE__REPOSITORY__POLL_INTERVAL_MS", "50".to_string()),
            ("MARQUEE__REPOSITORY__THREADS", "1".to_string()),
        ];
        match self {
            Kind::Vision => {
                env.push(("MARQUEE__REPOSITORY__LANES", "1".into()));
                env.push(("MARQUEE__REPOSITORY__PROFILE_BATCHING", "false".into()));
            }
            Kind::Language => {}
            Kind::Recommendation => {
                env.push(("MARQUEE__REPOSITORY__LANES", "1".into()));
                env.push((
                    "MARQUEE__RECOMMENDATION__STATE_DIR",
                    state.display().to_string(),
                ));
            }
        }
        env.extend(extra.iter().cloned());
        ChildServer::start(self.binary(), &env)
    }

    /// One ordinary call of the service's own API; the model version that answered.
    async fn call(self, ch: &Channel) -> Result<String, tonic::Status> {
        match self {
            Kind::Vision => {
                let (images, _) = fashion_test_set(1);
                let png = png_gray(&images[0], 28, 28);
                let r = ImageServiceClient::new(ch.clone())
                    .classify(ClassifyRequest {
                        model: self.model().into(),
                        image: Some(ImageInput {
                            source: Some(Source::Encoded(png.into())),
                        }),
                        top_k: 1,
                    })
                    .await?
                    .into_inner();
                Ok(r.model_version)
            }
            Kind::Language => self.generate(ch, 4).await,
            Kind::Recommendation => {
                let r = RecommenderClient::new(ch.clone())
                    .recommend(RecommendRequest {
                        subject: Some(
                            marquee_proto::recommendation::recommend_request::Subject::UserId(1),
                        ),
                        k: 10,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                assert_eq!(r.items.len(), 10);
                Ok(r.model_version)
            }
        }
    }

    /// A call that keeps the server busy for a while (drain lets it finish).
    async fn long_call(self, ch: &Channel) -> Result<String, tonic::Status> {
        match self {
            Kind::Language => self.generate(ch, 200).await,
            _ => {
                let mut last = String::new();
                for _ in 0..20 {
                    last = self.call(ch).await?;
                }
                Ok(last)
            }
        }
    }

    async fn generate(self, ch: &Channel, tokens: u32) -> Result<String, tonic::Status> {
        let mut stream = TextGenerationClient::new(ch.clone())
            .generate_stream(GenerateRequest {
                model: self.model().into(),
                prompt: "This dress".into(),
                parameters: Some(GenerationParameters {
                    max_new_tokens: Some(tokens),
                    min_new_tokens: tokens,
                    seed: Some(7),
                    ..Default::default()
                }),
            })
            .await?
            .into_inner();
        let mut generated = 0;
        while let Some(msg) = stream.message().await? {
            generated += msg.token_ids.len();
            if let Some(summary) = msg.summary {
                assert_eq!(generated, tokens as usize, "every token arrived");
                return Ok(summary.model_version);
            }
        }
        panic!("the stream ended without a summary");
    }
}

/// A repository with a private copy of `kind`'s model (all its files, version 1).
fn private_repo(kind: Kind) -> tempfile::TempDir {
    temp_repo(&[kind.model()])
}

/// Publishes version 2 as a copy of version 1, the way a deployment should: written under a
/// hidden name, then renamed into place in one step.
fn publish_version_2(repo: &Path, kind: Kind) {
    let model = repo.join(kind.model());
    let staging = model.join(".2-staging");
    copy_dir(&model.join("1"), &staging);
    std::fs::rename(&staging, model.join("2")).unwrap();
}

async fn admin_ready(admin: std::net::SocketAddr) -> (u16, String) {
    http_get(admin, "/readyz").await
}

/// The services reflection lists.
async fn reflected_services(ch: &Channel) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(ch.clone())
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .expect("reflection answers")
        .into_inner();
    let resp = stream.message().await.unwrap().expect("one answer");
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("not a service list: {resp:?}");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    names
}

async fn readiness(kind: Kind) {
    let repo = private_repo(kind);
    let state = tempfile::tempdir().unwrap();
    let server = kind.start(repo.path(), state.path(), &[]);
    let ch = channel(server.grpc_addr).await;
    assert_eq!(kind.call(&ch).await.unwrap(), "1");
    assert_eq!(health(&ch, "").await, ServingStatus::Serving);
    assert_eq!(health(&ch, kind.model()).await, ServingStatus::Serving);
    let (code, body) = admin_ready(server.admin_addr).await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains(kind.model()),
        "/readyz names the model: {body}"
    );
    let mut oip = oip(&ch);
    assert!(
        oip.server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        oip.server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let ready = oip
        .model_ready(ModelReadyRequest {
            name: kind.model().into(),
            version: "1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ready.ready);
    let index = oip
        .repository_index(RepositoryIndexRequest::default())
        .await
        .unwrap()
        .into_inner();
    let listed: Vec<_> = index
        .models
        .iter()
        .map(|m| (m.name.as_str(), m.version.as_str(), m.state.as_str()))
        .collect();
    assert_eq!(listed, [(kind.model(), "1", "READY")]);
    let mut want: Vec<String> = kind
        .services()
        .iter()
        .chain(&[
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ])
        .map(|s| s.to_string())
        .collect();
    want.sort();
    assert_eq!(
        reflected_services(&ch).await,
        want,
        "reflection lists exactly what {} serves",
        kind.binary()
    );
}

async fn hot_reload(kind: Kind) {
    let repo = private_repo(kind);
    let state = tempfile::tempdir().unwrap();
    let server = kind.start(repo.path(), state.path(), &[]);
    let ch = channel(server.grpc_addr).await;
    // Recommender: an event acknowledged by version 1 must be part of version 2's users.
    let before = match kind {
        Kind::Recommendation => Some(feedback(&ch).await),
        _ => None,
    };
    let failures = Arc::new(AtomicUsize::new(0));
    let calls_at_v1 = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..3 {
        let (ch, failures, calls_at_v1) = (ch.clone(), failures.clone(), calls_at_v1.clone());
        clients.push(tokio::spawn(async move {
            let mut versions = Vec::new();
            while versions.iter().filter(|v| *v == "2").count() < 5 {
                match kind.call(&ch).await {
                    Ok(v) => {
                        if v == "1" {
                            calls_at_v1.fetch_add(1, Ordering::Relaxed);
                        }
                        versions.push(v);
                    }
                    Err(e) => {
                        eprintln!("call failed during reload: {e:?}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            versions
        }));
    }
    // Version 2 arrives once traffic flows on version 1.
    wait_until("calls on version 1", Duration::from_secs(60), || {
        let n = calls_at_v1.load(Ordering::Relaxed);
        async move { (n >= 6).then_some(()) }
    })
    .await;
    publish_version_2(repo.path(), kind);
    let results =
        tokio::time::timeout(Duration::from_secs(180), futures::future::join_all(clients))
            .await
            .expect("every client saw version 2 within 3 minutes");
    assert_eq!(failures.load(Ordering::Relaxed), 0, "no call failed");
    for versions in results {
        let versions = versions.unwrap();
        let first_v2 = versions.iter().position(|v| v == "2").unwrap();
        assert!(
            versions[first_v2..].iter().all(|v| v == "2"),
            "once on version 2, never back: {versions:?}"
        );
        assert!(versions[..first_v2].iter().all(|v| v == "1"));
    }
    assert_eq!(health(&ch, kind.model()).await, ServingStatus::Serving);
    if let Some(before) = before {
        assert_eq!(
            feedback(&ch).await,
            before + 1,
            "the event acknowledged by version 1 is in version 2's history"
        );
    }
    let (_, metrics) = http_get(server.admin_addr, "/metrics").await;
    let ready = |v: &str| {
        format!(
            "marquee_model_ready{{model=\"{}\",version=\"{v}\"}}",
            kind.model()
        )
    };
    assert!(metrics.contains(&format!("{} 1", ready("2"))), "{metrics}");
    assert!(metrics.contains(&format!("{} 0", ready("1"))), "{metrics}");
}

/// Records a click of user 1 on item 50; the user's history length after it.
async fn feedback(ch: &Channel) -> u32 {
    RecommenderClient::new(ch.clone())
        .record_feedback(RecordFeedbackRequest {
            user_id: 1,
            item_id: 50,
            event: FeedbackEvent::Click as i32,
            timestamp_ms: 0,
        })
        .await
        .expect("feedback is recorded")
        .into_inner()
        .history_length
}

async fn drain(kind: Kind) {
    let repo = private_repo(kind);
    let state = tempfile::tempdir().unwrap();
    // A long drain delay: the checks below run inside it (they do not wait for it).
    let mut server = kind.start(
        repo.path(),
        state.path(),
        &[("MARQUEE__SERVER__DRAIN_DELAY_MS", "3000".into())],
    );
    let ch = channel(server.grpc_addr).await;
    assert_eq!(kind.call(&ch).await.unwrap(), "1");
    let long = {
        let ch = ch.clone();
        tokio::spawn(async move { kind.long_call(&ch).await })
    };
    // SAFETY: kill(2) on a child process this test spawned and still owns.
    assert_eq!(
        unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) },
        0
    );
    wait_until("NOT_SERVING", Duration::from_secs(10), || {
        let ch = ch.clone();
        async move { (health(&ch, "").await == ServingStatus::NotServing).then_some(()) }
    })
    .await;
    assert_eq!(health(&ch, kind.model()).await, ServingStatus::NotServing);
    assert_eq!(admin_ready(server.admin_addr).await.0, 503);
    let mut oip = oip(&ch);
    assert!(
        !oip.server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready,
        "OIP readiness agrees with health while draining"
    );
    assert!(
        !oip.model_ready(ModelReadyRequest {
            name: kind.model().into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .ready
    );
    assert!(
        oip.server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live,
        "draining is not dead"
    );
    // Still answering while balancers move away.
    assert_eq!(kind.call(&ch).await.unwrap(), "1");
    assert_eq!(long.await.unwrap().unwrap(), "1", "the long call finished");
    let status = tokio::task::spawn_blocking(move || server.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "clean exit after the drain: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vision_readiness() {
    readiness(Kind::Vision).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn language_readiness() {
    readiness(Kind::Language).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recommendation_readiness() {
    readiness(Kind::Recommendation).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vision_hot_reload() {
    hot_reload(Kind::Vision).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn language_hot_reload() {
    hot_reload(Kind::Language).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recommendation_hot_reload() {
    hot_reload(Kind::Recommendation).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vision_drain() {
    drain(Kind::Vision).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn language_drain() {
    drain(Kind::Language).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recommendation_drain() {
    drain(Kind::Recommendation).await;
}
