//! Issue 10, items 7 and 8: model lifecycle under faults, end to end.
//!
//! - A worker thread that dies (a vision lane, the language engine, a recommendation worker)
//!   turns the server NOT_SERVING for good: gRPC health `""` and the model, `/healthz` and
//!   `/readyz` 503 with the reason, OIP readiness false; a gateway in front ejects the replica
//!   and keeps it ejected (no restore on the next health check).
//! - Hot reload refuses a version whose outputs do not match `model.toml`, once (log, metric,
//!   `RepositoryIndex` reason), keeps the old version serving, and tries again only when the
//!   files change.
//!
//! The faults are real: each test builds a TorchScript model with the project's Python whose
//! output is unreadable (a sparse tensor) on a chosen input, which makes libtorch fail inside
//! the worker thread's output conversion: the same panic a real model bug would cause.

use std::time::Duration;

use marquee_e2e::lifecycle::*;
use marquee_e2e::*;
use marquee_proto::inference::{
    ModelReadyRequest, RepositoryIndexRequest, ServerLiveRequest, ServerReadyRequest,
};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const WAIT: Duration = Duration::from_secs(30);

/// Doubles its input; an input holding 13 gets a sparse output, which the lane cannot read.
const FAULTY_TENSOR_MODEL: &str = r#"
import sys, torch
class Faulty(torch.nn.Module):
    def forward(self, x):
        y = x * 2.0
        if bool((x == 13.0).any()):
            return y.to_sparse()
        return y
torch.jit.script(Faulty()).save(sys.argv[1])
"#;

/// A temporary repository holding one test tensor model, `name`, version 1 built by `script`.
fn repository_of(name: &str, script: &str) -> tempfile::TempDir {
    let repo = tempfile::tempdir().unwrap();
    let dir = repo.path().join(name);
    std::fs::create_dir_all(dir.join("1")).unwrap();
    std::fs::write(dir.join("model.toml"), tensor_manifest(name)).unwrap();
    run_python(script, &[&dir.join("1/model.pt")]);
    repo
}

/// `RepositoryIndex` of the server behind `ch`: every model, or the ready ones only.
async fn repository_index(
    ch: &tonic::transport::Channel,
    ready: bool,
) -> Vec<marquee_proto::inference::repository_index_response::ModelIndex> {
    oip(ch)
        .repository_index(RepositoryIndexRequest {
            repository_name: String::new(),
            ready,
        })
        .await
        .unwrap()
        .into_inner()
        .models
}

/// Asserts the admin probes fail with the death's reason, and that OIP readiness agrees.
async fn assert_dead(admin: std::net::SocketAddr, ch: &tonic::transport::Channel, model: &str) {
    let (code, body) = http_get(admin, "/healthz").await;
    assert_eq!(code, 503, "liveness fails: {body}");
    assert!(
        body.contains("panicked") && body.contains(model),
        "/healthz names the dead worker and why: {body}"
    );
    let (code, body) = http_get(admin, "/readyz").await;
    assert_eq!(code, 503, "readiness fails: {body}");
    assert_eq!(health(ch, "").await, ServingStatus::NotServing);
    assert_eq!(health(ch, model).await, ServingStatus::NotServing);
    let mut oip = oip(ch);
    assert!(
        !oip.server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        !oip.server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert!(
        !oip.model_ready(ModelReadyRequest {
            name: model.into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .ready
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_vision_lane_fails_health_and_the_gateway_keeps_the_replica_ejected() {
    let repo = repository_of("faulty", FAULTY_TENSOR_MODEL);
    let backend = start(settings(repo.path())).await;
    let gateway = start_gateway(gateway_settings(&[backend.grpc_addr])).await;
    let gw = channel(gateway.grpc_addr).await;
    let direct = channel(backend.grpc_addr).await;

    let ok = oip(&gw)
        .model_infer(with_key(
            infer_request("faulty", [1.0, 2.0, 3.0, 4.0]),
            ACME_KEY,
        ))
        .await
        .expect("a healthy replica answers through the gateway")
        .into_inner();
    assert_eq!(infer_output(&ok).1, vec![2.0, 4.0, 6.0, 8.0]);
    assert_eq!(health(&direct, "").await, ServingStatus::Serving);
    assert_eq!(http_get(backend.admin_addr, "/healthz").await.0, 200);

    // The poison input kills the only lane: its caller gets an error, not a hang.
    let err = oip(&direct)
        .model_infer(infer_request("faulty", [13.0, 0.0, 0.0, 0.0]))
        .await
        .expect_err("the batch whose lane died fails");
    assert_eq!(err.code(), Code::Internal, "{err:?}");

    wait_until("gRPC health NOT_SERVING", WAIT, || async {
        (health(&direct, "").await == ServingStatus::NotServing).then_some(())
    })
    .await;
    assert_dead(backend.admin_addr, &direct, "faulty").await;
    // Later calls are refused at once (retryable elsewhere) instead of waiting for a lane that
    // is gone.
    let err = oip(&direct)
        .model_infer(infer_request("faulty", [1.0, 2.0, 3.0, 4.0]))
        .await
        .expect_err("a dead model refuses");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let index = repository_index(&direct, false).await;
    assert_eq!(index[0].state, "UNAVAILABLE");
    assert!(index[0].reason.contains("panicked"), "{index:?}");

    // The gateway ejects the replica and, over several of its health checks, never restores it.
    wait_until("the gateway to eject the replica", WAIT, || async {
        (gateway.metric(
            "marquee_gateway_endpoints_healthy",
            &[("backend", "vision")],
        ) == 0.0)
            .then_some(())
    })
    .await;
    let checks = calls_to(&backend.metrics.render(), "Health/Check");
    let infers = calls_to(&backend.metrics.render(), "ModelInfer");
    wait_until("five more gateway health checks", WAIT, || async {
        (calls_to(&backend.metrics.render(), "Health/Check") >= checks + 5.0).then_some(())
    })
    .await;
    assert_eq!(
        gateway.metric(
            "marquee_gateway_endpoints_healthy",
            &[("backend", "vision")]
        ),
        0.0,
        "the replica stays ejected while its health says NOT_SERVING"
    );
    let err = oip(&gw)
        .model_infer(with_key(
            infer_request("faulty", [1.0, 2.0, 3.0, 4.0]),
            ACME_KEY,
        ))
        .await
        .expect_err("no healthy replica");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(
        calls_to(&backend.metrics.render(), "ModelInfer"),
        infers,
        "the gateway sent nothing to the dead replica"
    );
    gateway.shutdown.cancel();
    backend.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicked_language_engine_fails_liveness_and_readiness() {
    use marquee_proto::language::text_generation_client::TextGenerationClient;
    use marquee_proto::language::{GenerateRequest, GenerationParameters};
    let repo = tempfile::tempdir().unwrap();
    let model = "gpt_reviews";
    copy_dir(&model_repo().join(model), &repo.path().join(model));
    let weights = newest_version(&repo.path().join(model)).join("model.pt");
    // The real model, with `prefill` answering an unreadable (sparse) logits tensor for prompts
    // of 24 tokens or more; warm-up prefills at most 16.
    run_python(
        r#"
import sys, torch
class Faulty(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
    def forward(self, input_ids):
        return self.inner(input_ids)
    @torch.jit.export
    def prefill(self, input_ids, attention_mask, positions):
        logits, k, v = self.inner.prefill(input_ids, attention_mask, positions)
        if input_ids.size(1) >= 24:
            return logits.to_sparse(), k, v
        return logits, k, v
    @torch.jit.export
    def decode(self, tokens, positions, k_cache, v_cache):
        return self.inner.decode(tokens, positions, k_cache, v_cache)
torch.jit.script(Faulty(torch.jit.load(sys.argv[1]))).save(sys.argv[1])
"#,
        &[&weights],
    );
    let mut s = language_settings();
    s.repository.path = repo.path().to_path_buf();
    s.language.max_batch_size = 4;
    let server = start_language(s).await;
    let ch = channel(server.grpc_addr).await;
    let mut text = TextGenerationClient::new(ch.clone());
    let request = |prompt: &str| GenerateRequest {
        model: String::new(),
        prompt: prompt.into(),
        parameters: Some(GenerationParameters {
            max_new_tokens: Some(4),
            ..Default::default()
        }),
    };
    text.generate(request("a short prompt"))
        .await
        .expect("a short prompt is served");
    assert_eq!(health(&ch, "").await, ServingStatus::Serving);

    let long = "the film was a quiet delight and the cast was wonderful throughout ".repeat(4);
    let err = text
        .generate(request(&long))
        .await
        .expect_err("the request whose prefill killed the engine fails");
    assert_eq!(
        err.code(),
        Code::Internal,
        "a request that killed the engine is not retryable: {err:?}"
    );
    wait_until("gRPC health NOT_SERVING", WAIT, || async {
        (health(&ch, "").await == ServingStatus::NotServing).then_some(())
    })
    .await;
    assert_dead(server.admin_addr, &ch, model).await;
    let err = text
        .generate(request("a short prompt"))
        .await
        .expect_err("a dead engine refuses");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    server.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_recommendation_worker_fails_liveness_and_readiness() {
    use marquee_proto::recommendation as pb;
    let repo = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let model = "recommender";
    copy_dir(&model_repo().join(model), &repo.path().join(model));
    let ranker = newest_version(&repo.path().join(model)).join("ranker.pt");
    // The real ranker, answering unreadable scores (a sparse `[n, 1]` tensor, which libtorch
    // cannot flatten) when the user has a genre profile (any history); warm-up ranks for a cold
    // user.
    run_python(
        r#"
import sys, torch
class Faulty(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
    def forward(self, user_emb, item_emb, user_features, item_features, genre_profile):
        s = self.inner(user_emb, item_emb, user_features, item_features, genre_profile)
        if bool((genre_profile > 0).any()):
            return s.unsqueeze(1).to_sparse()
        return s
torch.jit.script(Faulty(torch.jit.load(sys.argv[1]))).save(sys.argv[1])
"#,
        &[&ranker],
    );
    let mut s = recommendation_settings(state.path());
    s.repository.path = repo.path().to_path_buf();
    s.repository.lanes = Some(1);
    // Exact search: retrieval is not what this test is about.
    s.recommendation.index = "exact".into();
    let server = start_recommendation(s).await;
    let ch = channel(server.grpc_addr).await;
    let mut rec = pb::recommender_client::RecommenderClient::new(ch.clone());
    let cold = pb::RecommendRequest {
        k: 5,
        ..Default::default()
    };
    rec.recommend(cold.clone())
        .await
        .expect("a cold start is served");
    assert_eq!(health(&ch, "").await, ServingStatus::Serving);

    let with_history = pb::RecommendRequest {
        k: 5,
        subject: Some(pb::recommend_request::Subject::Anonymous(
            pb::AnonymousContext {
                recent_item_ids: vec![1, 2, 3],
            },
        )),
        ..Default::default()
    };
    let err = rec
        .recommend(with_history)
        .await
        .expect_err("the request whose worker died fails");
    assert_eq!(
        err.code(),
        Code::Internal,
        "a request that killed a worker is not retryable: {err:?}"
    );
    wait_until("gRPC health NOT_SERVING", WAIT, || async {
        (health(&ch, "").await == ServingStatus::NotServing).then_some(())
    })
    .await;
    let (code, body) = http_get(server.admin_addr, "/healthz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("panicked") && body.contains(model), "{body}");
    let (code, body) = http_get(server.admin_addr, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(health(&ch, model).await, ServingStatus::NotServing);
    let err = rec.recommend(cold).await.expect_err("no worker is left");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    server.shutdown.cancel();
}

/// Writes a tensor model `y = x * factor` (or, with `bad`, `y` of 3 values per item instead of
/// the 4 that `model.toml` declares) to `out`.
/// Waits for five more scans of the repository, then asserts `model`'s refusal was counted
/// once, not once per scan (the files did not change, so it is not retried).
async fn assert_refused_once(server: &TestServer, model: &str) {
    let polls = server.metric("marquee_model_repository_polls_total", &[]);
    wait_until("five more repository polls", WAIT, || async {
        (server.metric("marquee_model_repository_polls_total", &[]) >= polls + 5.0).then_some(())
    })
    .await;
    assert_eq!(
        server.metric("marquee_model_load_failures_total", &[("model", model)]),
        1.0,
        "a refused version is counted once, not once per poll"
    );
}

fn scale_model(factor: f32, bad: bool, out: &std::path::Path) {
    let body = if bad {
        format!("return x[:, :3] * {factor:.1}")
    } else {
        format!("return x * {factor:.1}")
    };
    run_python(
        &format!(
            "import sys, torch\nclass Scale(torch.nn.Module):\n    def forward(self, x):\n        {body}\ntorch.jit.script(Scale()).save(sys.argv[1])\n"
        ),
        &[out],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_whose_outputs_do_not_match_model_toml_is_refused_once_until_its_files_change() {
    let repo = tempfile::tempdir().unwrap();
    let dir = repo.path().join("scale");
    let build = tempfile::tempdir().unwrap();
    let (double, bad, triple) = (
        build.path().join("double.pt"),
        build.path().join("bad.pt"),
        build.path().join("triple.pt"),
    );
    scale_model(2.0, false, &double);
    scale_model(2.0, true, &bad);
    scale_model(3.0, false, &triple);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("model.toml"), tensor_manifest("scale")).unwrap();
    install_version(&dir, 1, &double);
    let mut s = settings(repo.path());
    s.repository.poll_interval_ms = 50;
    let server = start(s).await;
    let ch = channel(server.grpc_addr).await;
    let infer = || async {
        oip(&ch)
            .model_infer(infer_request("scale", [1.0, 2.0, 3.0, 4.0]))
            .await
            .map(|r| infer_output(&r.into_inner()))
    };
    assert_eq!(
        infer().await.unwrap(),
        ("1".to_string(), vec![2.0, 4.0, 6.0, 8.0])
    );

    install_version(&dir, 2, &bad);
    let index = || repository_index(&ch, false);
    let refused = wait_until(
        "RepositoryIndex to show version 2 refused",
        WAIT,
        || async {
            index()
                .await
                .into_iter()
                .find(|m| m.name == "scale" && m.version == "2")
        },
    )
    .await;
    assert_eq!(refused.state, "UNAVAILABLE");
    assert!(
        refused.reason.contains("output `y`") && refused.reason.contains("model.toml"),
        "the reason names the output and the declaration: {}",
        refused.reason
    );
    // Several more scans of the unchanged files: no retry, no second count.
    assert_refused_once(&server, "scale").await;
    assert_eq!(
        infer().await.expect("the old version keeps serving"),
        ("1".to_string(), vec![2.0, 4.0, 6.0, 8.0])
    );
    let listed = index().await;
    assert!(
        listed
            .iter()
            .any(|m| m.name == "scale" && m.version == "1" && m.state == "READY"),
        "{listed:?}"
    );
    assert_eq!(health(&ch, "scale").await, ServingStatus::Serving);
    let ready_only = repository_index(&ch, true).await;
    assert!(
        ready_only.iter().all(|m| m.state == "READY"),
        "`ready: true` lists ready models only: {ready_only:?}"
    );

    // Fixing the files makes the version eligible again, and it goes live.
    replace_file(&dir.join("2/model.pt"), &std::fs::read(&triple).unwrap());
    let live = wait_until("version 2 to go live once fixed", WAIT, || async {
        infer().await.ok().filter(|(v, _)| v == "2")
    })
    .await;
    assert_eq!(live.1, vec![3.0, 6.0, 9.0, 12.0]);
    assert!(
        index().await.iter().all(|m| m.state == "READY"),
        "the refusal is gone once the version serves"
    );
    assert_eq!(
        server.metric("marquee_model_load_failures_total", &[("model", "scale")]),
        1.0
    );
    server.shutdown.cancel();
}

/// Doubles its input; an input holding 17 asks libtorch's allocator for 256 TiB, more than any
/// machine's address space: the same error path as a CUDA batch that does not fit.
const GREEDY_TENSOR_MODEL: &str = r#"
import sys, torch
class Greedy(torch.nn.Module):
    def forward(self, x):
        if bool((x == 17.0).any()):
            big = torch.empty([70368744177664], dtype=torch.float32)
            return big[:x.numel()].view(x.shape)
        return x * 2.0
torch.jit.script(Greedy()).save(sys.argv[1])
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_runs_out_of_memory_is_resource_exhausted_and_the_replica_keeps_serving() {
    let repo = repository_of("greedy", GREEDY_TENSOR_MODEL);
    let server = start(settings(repo.path())).await;
    let ch = channel(server.grpc_addr).await;

    let err = oip(&ch)
        .model_infer(infer_request("greedy", [17.0, 0.0, 0.0, 0.0]))
        .await
        .expect_err("a batch that cannot be allocated fails");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("out of memory"), "{err:?}");
    let retry = tonic_types::StatusExt::get_details_retry_info(&err);
    assert!(
        retry.and_then(|r| r.retry_delay).is_some(),
        "a retry hint: {err:?}"
    );
    assert_eq!(
        server.metric(
            "marquee_batcher_rejected_total",
            &[("model", "greedy"), ("reason", "out_of_memory")]
        ),
        1.0
    );
    // Nothing died: the same lane answers the next call, and every probe stays healthy.
    let ok = oip(&ch)
        .model_infer(infer_request("greedy", [1.0, 2.0, 3.0, 4.0]))
        .await
        .expect("the replica keeps serving")
        .into_inner();
    assert_eq!(infer_output(&ok).1, vec![2.0, 4.0, 6.0, 8.0]);
    assert_eq!(health(&ch, "").await, ServingStatus::Serving);
    assert_eq!(http_get(server.admin_addr, "/healthz").await.0, 200);
    assert_eq!(http_get(server.admin_addr, "/readyz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_on_a_gpu_this_process_cannot_see_is_refused_with_the_reason_once() {
    let repo = tempfile::tempdir().unwrap();
    let build = tempfile::tempdir().unwrap();
    let double = build.path().join("double.pt");
    scale_model(2.0, false, &double);
    for (name, device) in [("on_cpu", "cpu"), ("on_gpu", "cuda:99")] {
        let dir = repo.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let manifest = tensor_manifest(name).replace(
            "[instance]\n",
            &format!("[instance]\ndevice = \"{device}\"\n"),
        );
        std::fs::write(dir.join("model.toml"), manifest).unwrap();
        install_version(&dir, 1, &double);
    }
    // At start, the process refuses to come up, with the reason (the orchestrator shows it).
    let mut s = settings(repo.path());
    s.repository.poll_interval_ms = 50;
    let err = match marquee_vision::start(s.clone(), Default::default()).await {
        Ok(_) => panic!("a server whose model needs a missing GPU started"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("cuda:99") && err.contains("CUDA device(s)"),
        "{err}"
    );
    // Added later to a running server, it is refused once, with the reason in the index.
    let gpu_dir = repo.path().join("on_gpu");
    let parked = build.path().join("on_gpu");
    std::fs::rename(&gpu_dir, &parked).unwrap();
    let server = start(s).await;
    let ch = channel(server.grpc_addr).await;
    copy_dir(&parked, &gpu_dir);
    let index = wait_until("RepositoryIndex to list on_gpu", WAIT, || async {
        let models = repository_index(&ch, false).await;
        models.iter().any(|m| m.name == "on_gpu").then_some(models)
    })
    .await;
    let gpu = index
        .iter()
        .find(|m| m.name == "on_gpu")
        .unwrap_or_else(|| panic!("{index:?}"));
    assert_eq!(gpu.state, "UNAVAILABLE", "{gpu:?}");
    // The reason names the device and what this process sees (0 here, 1 on a one-GPU node),
    // not a libtorch dispatch error from inside a forward.
    assert!(
        gpu.reason.contains("cuda:99") && gpu.reason.contains("CUDA device(s)"),
        "{gpu:?}"
    );
    assert_refused_once(&server, "on_gpu").await;
    let err = oip(&ch)
        .model_infer(infer_request("on_gpu", [1.0, 2.0, 3.0, 4.0]))
        .await
        .expect_err("a refused model does not serve");
    assert_ne!(err.code(), Code::Ok);
    let ok = oip(&ch)
        .model_infer(infer_request("on_cpu", [1.0, 2.0, 3.0, 4.0]))
        .await
        .expect("the model on the CPU serves beside it")
        .into_inner();
    assert_eq!(infer_output(&ok).1, vec![2.0, 4.0, 6.0, 8.0]);
}
