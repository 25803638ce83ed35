"""The real services, started with the configs the chart renders: every metric the dashboards
and alerts read is exported (scraped from the four admin ports after real calls: vision and the
gateway, a streamed generation on the language service, recommendations with explanations,
feedback and erasure on the recommendation service), every exposition passes `promtool check
metrics`, and one call through the gateway to vision arrives at a real OTLP receiver as one
connected trace.

The binaries read the chart's ConfigMap TOML unchanged; environment variables override only
what differs outside Kubernetes (the same way an operator would): listen addresses (ephemeral
ports), the model repository path, the backend's DNS name and the API-key file path.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.resources
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from conftest import (
    CHART_DIR,
    EXTERNAL_METRICS,
    REPO_ROOT,
    config_text_of,
    dashboard_exprs,
    load_values,
    metric_names,
    recorded_names,
    render,
    used_metric_names,
)
from marquee_servers import bin_dir, model_repo, run_binary

FIXTURES = REPO_ROOT / "tests" / "fixtures"
GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
API_KEY = "mq_deploy-test-key-7c41e0"
API_KEY_SHA = hashlib.sha256(API_KEY.encode()).hexdigest()
TENANT = "web"

# Names the services register but only export after a rare event this suite does not provoke.
# Each is proven exported by the test named here, and must at least be compiled into the binary.
EVENT_ONLY = {
    "marquee_gateway_retries_total": (
        "marquee-gateway",
        "tests/tests/gateway.rs kills a replica under load and asserts marquee_gateway_retries_total",
    ),
}


# --- OTLP receiver ----------------------------------------------------------------------------


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC trace collector endpoint that keeps every span it is sent."""

    def __init__(self):
        self.cv = threading.Condition()
        self.spans: list[tuple[str, trace_pb2.Span]] = []
        self.resources: list = []

    def Export(self, request, context):
        with self.cv:
            for rs in request.resource_spans:
                attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
                self.resources.append(rs.resource)
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append((attrs.get("service.name", ""), s))
            self.cv.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(self, predicate, timeout_s: float = 60.0):
        with self.cv:
            ok = self.cv.wait_for(lambda: predicate(list(self.spans)), timeout=timeout_s)
            return ok, list(self.spans)


@pytest.fixture(scope="session")
def receiver():
    rec = Receiver()
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(rec, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    rec.endpoint = f"http://127.0.0.1:{port}"
    yield rec
    server.stop(grace=None)


# --- generated stubs ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def marquee_pb():
    """Python stubs for marquee.{common,vision,language,recommendation}.v1, generated from
    proto/ by grpcio-tools into one folder (not the OIP protos: tritonclient owns package
    `inference` in this process)."""
    import types

    from grpc_tools import protoc

    out = Path(tempfile.mkdtemp(prefix="marquee-deploy-pb-"))
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    rc = protoc.main(
        [
            "protoc",
            f"-I{REPO_ROOT / 'proto'}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "marquee/common/v1/common.proto",
            "marquee/vision/v1/vision.proto",
            "marquee/language/v1/language.proto",
            "marquee/recommendation/v1/recommendation.proto",
        ]
    )
    assert rc == 0, "protoc failed"
    sys.path.insert(0, str(out))
    from marquee.language.v1 import language_pb2, language_pb2_grpc
    from marquee.recommendation.v1 import recommendation_pb2, recommendation_pb2_grpc
    from marquee.vision.v1 import vision_pb2, vision_pb2_grpc

    return types.SimpleNamespace(**{m.__name__.rsplit(".", 1)[1]: m for m in (
        vision_pb2, vision_pb2_grpc, language_pb2, language_pb2_grpc, recommendation_pb2, recommendation_pb2_grpc
    )})


@pytest.fixture(scope="session")
def vision_pb(marquee_pb):
    return marquee_pb.vision_pb2, marquee_pb.vision_pb2_grpc


# --- the services, from the chart's configs -----------------------------------------------------


def chart_configs() -> dict[str, str]:
    """The TOML the chart writes for vision and the gateway with the default ci values, the
    gateway routing to vision only (its language and recommendation routes are tested in
    tests/tests/gateway_routes.rs; the two services run from their own chart configs below)."""
    values = load_values(CHART_DIR / "ci" / "default-values.yaml")
    values["language"] = {"enabled": False}
    values["recommendation"] = {"enabled": False}
    objects = render(values)
    return {c: config_text_of(objects, c) for c in ("vision", "gateway")}


def live_repository(root: Path) -> Path:
    """The real models; efficientnet_lite0 with one lane and batches of one (a copy of its
    model.toml), so a short deadline deterministically expires in its queue."""
    src = model_repo()
    repo = root / "models"
    repo.mkdir()
    (repo / "fashion_cnn").symlink_to((src / "fashion_cnn").resolve())
    eff = repo / "efficientnet_lite0"
    eff.mkdir()
    for entry in (src / "efficientnet_lite0").resolve().iterdir():
        if entry.name != "model.toml":
            (eff / entry.name).symlink_to(entry.resolve())
    toml = (src / "efficientnet_lite0" / "model.toml").read_text()
    toml = re.sub(r"(?m)^max_batch_size = \d+$", "max_batch_size = 1", toml)
    toml = re.sub(r"(?m)^lanes = \d+$", "lanes = 1", toml)
    assert "max_batch_size = 1" in toml and "lanes = 1" in toml
    (eff / "model.toml").write_text(toml)
    return repo


def otel_env(receiver) -> dict[str, str]:
    # The variable the chart sets (telemetry.otlpEndpoint); a short export delay for the test.
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}


@pytest.fixture(scope="session")
def services(receiver):
    root = Path(tempfile.mkdtemp(prefix="marquee-deploy-"))
    configs = chart_configs()
    (root / "vision.toml").write_text(configs["vision"])
    (root / "gateway.toml").write_text(configs["gateway"])
    keys = root / "api-keys.toml"
    keys.write_text(
        f'[[api_keys]]\nsha256 = "{API_KEY_SHA}"\ntenant = "{TENANT}"\nscopes = ["vision:infer"]\n'
    )
    repo = live_repository(root)
    with run_binary(
        "marquee-vision",
        {
            "MARQUEE__REPOSITORY__PATH": str(repo),
            "MARQUEE__REPOSITORY__THREADS": "1",
            "MARQUEE__REPOSITORY__POLL_INTERVAL_MS": "0",
            **otel_env(receiver),
        },
        ["--config", str(root / "vision.toml")],
    ) as vision:
        with run_binary(
            "marquee-gateway",
            {
                "MARQUEE__BACKENDS__VISION__DNS": vision.grpc_addr,
                "MARQUEE__AUTH__API_KEYS_FILE": str(keys),
                **otel_env(receiver),
            },
            ["--config", str(root / "gateway.toml")],
        ) as gateway:
            for srv in (vision, gateway):
                wait_for_sigterm_handler(srv.process)
            yield {"vision": vision, "gateway": gateway}


def scrape(server) -> str:
    with urllib.request.urlopen(f"http://{server.admin_addr}/metrics", timeout=10) as r:
        return r.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def wait_metric(server, name: str, minimum: float, timeout_s: float = 60.0, **labels) -> float:
    deadline = time.monotonic() + timeout_s
    while True:
        v = sample(scrape(server), name, **labels)
        if v >= minimum or time.monotonic() > deadline:
            return v
        time.sleep(0.02)


def classify_request(vision_pb, model: str, photo: str, top_k: int = 3):
    pb2, _ = vision_pb
    return pb2.ClassifyRequest(model=model, image=pb2.ImageInput(encoded=(FIXTURES / photo).read_bytes()), top_k=top_k)


@pytest.fixture(scope="session")
def exercised(services, vision_pb):
    """Real calls that make every labelled series appear; returns the scrapes."""
    pb2, pb2_grpc = vision_pb
    gw, vs = services["gateway"], services["vision"]
    key = (("x-api-key", API_KEY),)
    with grpc.insecure_channel(gw.grpc_addr) as ch:
        stub = pb2_grpc.ImageServiceStub(ch)
        # The gateway finds vision through its DNS name, then health-checks it.
        assert wait_metric(gw, "marquee_gateway_endpoints_healthy", 1, backend="vision") == 1
        # ...and learns its models from its repository index (`models_refresh_ms`).
        coffee = None
        deadline = time.monotonic() + 60
        while coffee is None:
            try:
                coffee = stub.Classify(classify_request(vision_pb, "efficientnet_lite0", "coffee.png"), metadata=key, timeout=60)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        assert coffee.labels[0].name == "espresso", coffee.labels
        # Concurrent single-image calls: coalesced by the gateway into ClassifyBatch calls.
        req = classify_request(vision_pb, "fashion_cnn", "chelsea.png", top_k=1)
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(lambda _: stub.Classify(req, metadata=key, timeout=60), range(32)))
        assert all(len(r.labels) == 1 for r in results)
        with pytest.raises(grpc.RpcError) as e:
            stub.Classify(req, timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # A deadline that expires in the (one-lane, batch-of-one) efficientnet queue: dropped before
    # compute, counted in marquee_batcher_rejected_total. With 24 or more images queued ahead (each
    # a forward pass of its own) the late call's 0.5 s (enough to decode its image, even in a
    # debug build) runs out before it reaches the front of the queue.
    with grpc.insecure_channel(vs.grpc_addr) as ch:
        stub = pb2_grpc.ImageServiceStub(ch)
        image = pb2.ImageInput(encoded=(FIXTURES / "chelsea.png").read_bytes())
        busy = stub.ClassifyBatch.future(
            pb2.ClassifyBatchRequest(model="efficientnet_lite0", images=[image] * 48, top_k=1), timeout=120
        )
        assert wait_metric(vs, "marquee_batcher_queue_depth", 24, model="efficientnet_lite0") >= 24
        with pytest.raises(grpc.RpcError) as e:
            stub.Classify(classify_request(vision_pb, "efficientnet_lite0", "chelsea.png", 1), timeout=0.5)
        # The service answers DEADLINE_EXCEEDED just before the deadline; on a loaded machine
        # tonic's own grpc-timeout timer (CANCELLED "Timeout expired") can win that race (as in
        # tests/tests/vision.rs). Either way the item must be dropped, not computed: checked below.
        err = e.value
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED or (
            err.code() == grpc.StatusCode.CANCELLED and err.details() == "Timeout expired"
        ), err
        assert len(busy.result().items) == 48
        dropped = wait_metric(vs, "marquee_batcher_rejected_total", 1, model="efficientnet_lite0")
        assert dropped == 1, "the expired call was dropped before compute (reason deadline or cancelled)"
    return {"gateway": scrape(gw), "vision": scrape(vs)}


# --- language and recommendation, from the chart's configs --------------------------------------


def chart_config_files(root: Path) -> dict[str, Path]:
    """The TOML the chart writes for language and recommendation with the default ci values."""
    objects = render(load_values(CHART_DIR / "ci" / "default-values.yaml"))
    files = {}
    for component in ("language", "recommendation"):
        files[component] = root / f"{component}.toml"
        files[component].write_text(config_text_of(objects, component))
    return files


def recommendation_secret_files(root: Path) -> dict[str, str]:
    """The files the chart mounts from its Secrets into the recommender, made as the chart
    makes them (32 random bytes; a token of letters and digits), as env overrides of the
    rendered paths under /etc/marquee/secrets."""
    user_id_key = root / "user-id.key"
    user_id_key.write_bytes(os.urandom(32))
    tenant_token = root / "tenant-token"
    tenant_token.write_text(secrets.token_hex(24))
    return {
        "MARQUEE__RECOMMENDATION__USER_ID_KEY_FILE": str(user_id_key),
        "MARQUEE__RECOMMENDATION__TENANT_TOKEN_FILE": str(tenant_token),
    }


@pytest.fixture(scope="session")
def ml_services(receiver):
    """marquee-language and marquee-recommendation on the chart's TOML. Only the paths differ
    outside the pod (`repository.path`, the model mount, the state volume and the two files
    the chart mounts from Secrets: the user-id key and the tenant token, written here as the
    chart generates them) and libtorch gets one thread (`repository.threads`, the same
    override on both)."""
    root = Path(tempfile.mkdtemp(prefix="marquee-deploy-ml-"))
    files = chart_config_files(root)
    secret_files = recommendation_secret_files(root)
    with run_binary(
        "marquee-language",
        {"MARQUEE__REPOSITORY__PATH": str(model_repo()), "MARQUEE__REPOSITORY__THREADS": "1", **otel_env(receiver)},
        ["--config", str(files["language"])],
    ) as language:
        with run_binary(
            "marquee-recommendation",
            {
                "MARQUEE__REPOSITORY__PATH": str(model_repo()),
                "MARQUEE__REPOSITORY__THREADS": "1",
                "MARQUEE__RECOMMENDATION__STATE_DIR": str(root / "state"),
                **secret_files,
            },
            ["--config", str(files["recommendation"])],
        ) as recommendation:
            for srv in (language, recommendation):
                wait_for_sigterm_handler(srv.process)
            token = Path(secret_files["MARQUEE__RECOMMENDATION__TENANT_TOKEN_FILE"]).read_text()
            yield {"language": language, "recommendation": recommendation, "tenant_token": token}


LANGUAGE_MODEL = "gpt_reviews"
KNOWN_USER = 1  # in the MovieLens training histories
NEW_USER = 990_001  # never seen: served as cold start
RARE_GENRE = "Film-Noir"  # 24 films of 1682: fewer than k survive the ANN candidates


@pytest.fixture(scope="session")
def exercised_ml(ml_services, marquee_pb):
    """Real calls that make the language and recommendation series appear (every label value
    the dashboards group by); returns the scrapes."""
    lpb, lgrpc = marquee_pb.language_pb2, marquee_pb.language_pb2_grpc
    rpb, rgrpc = marquee_pb.recommendation_pb2, marquee_pb.recommendation_pb2_grpc
    lang, rec = ml_services["language"], ml_services["recommendation"]

    with grpc.insecure_channel(lang.grpc_addr) as ch:
        stub = lgrpc.TextGenerationStub(ch)
        # A streamed generation to its length limit: prefill, decode, TTFT, inter-token latency.
        params = lpb.GenerationParameters(max_new_tokens=12, min_new_tokens=12, seed=7)
        stream = list(stub.GenerateStream(lpb.GenerateRequest(model=LANGUAGE_MODEL, prompt="This dress is", parameters=params), timeout=120))
        summary = stream[-1].summary
        assert summary.generated_tokens == 12 and summary.finish_reason == lpb.FINISH_REASON_LENGTH, summary
        assert "".join(m.text for m in stream[:-1]), "no text streamed"
        # The same as one unary call: the same greedy tokens.
        unary = stub.Generate(lpb.GenerateRequest(model=LANGUAGE_MODEL, prompt="This dress is", parameters=params), timeout=120)
        assert list(unary.token_ids) == [t for m in stream[:-1] for t in m.token_ids]
        # A stream the caller leaves after its first message: the engine drops the sequence at
        # its next step and counts it (marquee_batcher_rejected_total{reason="cancelled"}).
        long = lpb.GenerationParameters(max_new_tokens=240, min_new_tokens=240, seed=7)
        call = stub.GenerateStream(lpb.GenerateRequest(model=LANGUAGE_MODEL, prompt="I", parameters=long), timeout=120)
        next(call)
        call.cancel()
    assert wait_metric(lang, "marquee_batcher_rejected_total", 1, model=LANGUAGE_MODEL, reason="cancelled") == 1

    with grpc.insecure_channel(rec.grpc_addr) as ch:
        stub = rgrpc.RecommenderStub(ch)
        known = stub.Recommend(rpb.RecommendRequest(user_id=KNOWN_USER, k=10, explain=True), timeout=120)
        assert len(known.items) == 10 and not known.cold_start
        assert all(it.explanation.features for it in known.items), "explain=True explains every item"
        cold = stub.Recommend(rpb.RecommendRequest(user_id=NEW_USER, k=5), timeout=120)
        assert cold.cold_start and len(cold.items) == 5
        noir = stub.Recommend(rpb.RecommendRequest(user_id=KNOWN_USER, k=30, filter=rpb.Filter(require_genres=[RARE_GENRE])), timeout=120)
        assert noir.items and all(RARE_GENRE in it.genres for it in noir.items)
        similar = stub.SimilarItems(rpb.SimilarItemsRequest(item_id=known.items[0].item_id, k=5), timeout=120)
        assert len(similar.items) == 5
        now_ms = int(time.time() * 1000)
        for event in (rpb.FEEDBACK_EVENT_LIKE, rpb.FEEDBACK_EVENT_CLICK):
            stub.RecordFeedback(rpb.RecordFeedbackRequest(user_id=NEW_USER, item_id=similar.items[0].item_id, event=event, timestamp_ms=now_ms), timeout=60)
        forgot = stub.ForgetUser(rpb.ForgetUserRequest(user_id=NEW_USER), timeout=60)
        assert forgot.history_removed >= 1
    return {"language": scrape(lang), "recommendation": scrape(rec)}


def test_language_and_recommendation_series_carry_the_labels_the_queries_use(exercised_ml):
    lang, rec = exercised_ml["language"], exercised_ml["recommendation"]
    m = LANGUAGE_MODEL
    for phase in ("prefill", "decode"):
        assert sample(lang, "marquee_language_step_seconds_count", model=m, phase=phase) >= 1, phase
    assert sample(lang, "marquee_language_finished_total", model=m, reason="length") >= 1
    assert sample(lang, "marquee_language_time_to_first_token_seconds_count", model=m) >= 2
    assert sample(lang, "marquee_language_generated_tokens_total", model=m) >= 13
    assert sample(lang, "marquee_language_kv_cache_capacity_tokens", model=m) > 0
    assert sample(lang, "marquee_language_token_budget_capacity", model=m) > 0
    # The TTFT SLO reads the 1 s bucket by its exact `le` value.
    assert 'marquee_language_time_to_first_token_seconds_bucket{model="gpt_reviews",le="1"}' in lang
    # The language service exports the batcher series with its model label (queue alerts).
    assert 'marquee_batcher_queue_depth{model="gpt_reviews"}' in lang
    # Filters run inside the retrieval scan: no separate `filter` stage.
    for stage in ("retrieve", "rank", "rerank", "explain"):
        assert sample(rec, "marquee_recommendation_stage_seconds_count", stage=stage) >= 1, stage
    assert sample(rec, "marquee_recommendation_stage_seconds_count", stage="filter") == 0
    assert sample(rec, "marquee_recommendation_engine_batch_requests_count") >= 1
    assert sample(rec, "marquee_recommendation_feedback_events_total", event="like") == 1
    assert sample(rec, "marquee_recommendation_feedback_events_total", event="click") == 1
    assert sample(rec, "marquee_recommendation_cold_start_total") >= 1
    assert sample(rec, "marquee_recommendation_exact_fallback_total") >= 1
    assert sample(rec, "marquee_recommendation_users_forgotten_total") == 1
    assert sample(rec, "marquee_recommendation_feedback_log_dropped_bytes_total") == 0
    assert sample(rec, "marquee_recommendation_served_items_total") >= 15
    assert 0 < sample(rec, "marquee_recommendation_catalog_coverage_ratio") <= 1
    assert 0 <= sample(rec, "marquee_recommendation_exposure_gini") <= 1
    assert sample(rec, "marquee_grpc_requests_total", code="OK") >= 5


def dashboard_names(board: str) -> set[str]:
    return {n for where, expr in dashboard_exprs() if where.startswith(f"{board}:") for n in metric_names(expr)}


def test_the_language_and_recommendation_dashboards_read_their_own_service(exercised_ml):
    """Each service's dashboard, and every alert on a service's own metrics, is fed by that
    service alone (the union check below could be satisfied by another service's series)."""
    used = used_metric_names()
    for service, board in (("language", "language.json"), ("recommendation", "recommendation.json")):
        exported = sample_names(exercised_ml[service])
        names = dashboard_names(board) | {n for n in used if n.startswith(f"marquee_{service}_")}
        assert len(names) >= 10, names
        missing = sorted(names - exported)
        assert not missing, f"{board} or the rules read names marquee-{service} does not export: {missing}"


def sample_names(text: str) -> set[str]:
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_every_metric_the_dashboards_and_alerts_read_is_exported(exercised, exercised_ml):
    expositions = {**exercised, **exercised_ml}
    exported = set().union(*(sample_names(text) for text in expositions.values()))
    used = used_metric_names()
    ours = {n for n in used if n not in EXTERNAL_METRICS and n not in recorded_names()}
    missing = {n: sorted(used[n]) for n in ours - exported - set(EVENT_ONLY)}
    assert not missing, f"used but not exported by any of {sorted(expositions)}: {missing}"
    assert len(ours) >= 40
    for name, (binary, proof) in EVENT_ONLY.items():
        assert name in used and name not in exported, f"{name}: remove it from EVENT_ONLY"
        assert name.encode() in (bin_dir() / binary).read_bytes(), f"{name} is not registered by {binary} ({proof})"


def test_labels_the_queries_group_by_are_on_the_series(exercised):
    gw, vs = exercised["gateway"], exercised["vision"]
    assert sample(gw, "marquee_gateway_requests_total", tenant=TENANT, code="OK", route="/marquee.vision.v1.ImageService/Classify") == 33
    assert sample(gw, "marquee_gateway_auth_failures_total") >= 1
    assert sample(gw, "marquee_gateway_batch_size_count", route="vision.classify") >= 1
    assert sample(gw, "marquee_gateway_backend_requests_total", backend="vision", code="OK") >= 1
    # The latency SLO reads the 1 s bucket by its exact `le` value.
    buckets = [l for l in vs.splitlines() if l.startswith("marquee_grpc_request_duration_seconds_bucket")]
    assert any('le="1"' in l for l in buckets), buckets[:20]
    for model in ("efficientnet_lite0", "fashion_cnn"):
        assert sample(vs, "marquee_model_ready", model=model) == 1
        assert sample(vs, "marquee_batcher_batches_total", model=model) >= 1
    assert sample(vs, "marquee_batcher_effective_max_batch", model="efficientnet_lite0") == 1


@pytest.mark.parametrize("service", ["gateway", "vision", "language", "recommendation"])
def test_promtool_check_metrics_on_the_exposition(request, service):
    fixture = "exercised" if service in ("gateway", "vision") else "exercised_ml"
    exposition = request.getfixturevalue(fixture)[service]
    r = subprocess.run(
        [shutil.which("promtool") or "/usr/bin/promtool", "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr


# --- tracing ----------------------------------------------------------------------------------


def span_id_hex(b: bytes) -> str:
    return b.hex()


def test_one_call_through_the_gateway_is_one_connected_trace(services, vision_pb, receiver, exercised):
    _, pb2_grpc = vision_pb
    pb2 = vision_pb[0]
    trace_id = os.urandom(16).hex()
    client_span = os.urandom(8).hex()
    image_bytes = (FIXTURES / "coffee.png").read_bytes()
    with grpc.insecure_channel(services["gateway"].grpc_addr) as ch:
        stub = pb2_grpc.ImageServiceStub(ch)
        resp = stub.ClassifyBatch(
            pb2.ClassifyBatchRequest(
                model="efficientnet_lite0", images=[pb2.ImageInput(encoded=image_bytes)], top_k=1
            ),
            metadata=(("x-api-key", API_KEY), ("traceparent", f"00-{trace_id}-{client_span}-01")),
            timeout=60,
        )
    assert resp.items[0].classification.labels[0].name == "espresso"

    def ours(spans):
        return [(svc, s) for svc, s in spans if s.trace_id.hex() == trace_id]

    def complete(spans):
        mine = ours(spans)
        vision_ids = {s.span_id for svc, s in mine if svc == "marquee-vision"}
        linked = any(
            svc == "marquee-vision" and s.name == "batch" and any(l.span_id in vision_ids for l in s.links)
            for svc, s in spans
        )
        return {svc for svc, _ in mine} == {"marquee-gateway", "marquee-vision"} and linked

    ok, spans = receiver.wait_for(complete)
    mine = ours(spans)
    assert ok, f"incomplete trace: {[(svc, s.name) for svc, s in mine]}"
    by_id = {s.span_id.hex(): (svc, s) for svc, s in mine}

    def one(service, name, kind):
        found = [s for svc, s in mine if svc == service and s.name == name and s.kind == kind]
        assert len(found) == 1, f"{service} {name}: {[(svc, s.name, s.kind) for svc, s in mine]}"
        return found[0]

    method = "marquee.vision.v1.ImageService/ClassifyBatch"
    gw_server = one("marquee-gateway", method, trace_pb2.Span.SPAN_KIND_SERVER)
    vs_server = one("marquee-vision", method, trace_pb2.Span.SPAN_KIND_SERVER)
    clients = [s for svc, s in mine if svc == "marquee-gateway" and s.kind == trace_pb2.Span.SPAN_KIND_CLIENT]
    assert len(clients) == 1, clients
    gw_client = clients[0]
    # The caller's traceparent is the gateway server span's parent.
    assert gw_server.parent_span_id.hex() == client_span
    # The gateway's backend call descends from its server span...
    node, chain = gw_client, []
    while node.parent_span_id.hex() in by_id and node.span_id != gw_server.span_id:
        node = by_id[node.parent_span_id.hex()][1]
        chain.append(node.name)
    assert node.span_id == gw_server.span_id, f"client span does not descend from the server span: {chain}"
    # ...and W3C trace context carries the hop: vision's server span is the child of the
    # gateway's client span, the span that sent the call.
    assert vs_server.parent_span_id == gw_client.span_id, "vision's server span is not the child of the gateway's client span"
    # Every span of this call is in this one trace and hangs off it (no orphans).
    for svc, s in mine:
        if s.span_id != gw_server.span_id:
            assert s.parent_span_id.hex() in by_id, f"{svc} {s.name} has a parent outside the trace"
    # The batch that computed the image: its own root span, linked to the request span(s).
    vision_ids = {s.span_id for svc, s in mine if svc == "marquee-vision"}
    batches = [s for svc, s in spans if svc == "marquee-vision" and s.name == "batch" and any(l.span_id in vision_ids for l in s.links)]
    assert len(batches) == 1, "one image, batches of one: one batch"
    (batch,) = batches
    (link,) = [l for l in batch.links if l.trace_id.hex() == trace_id]
    assert link.span_id in vision_ids
    assert batch.parent_span_id == b"", "a batch serves many traces: it is a root span, linked, not parented"
    attrs = {a.key: a.value for a in batch.attributes}
    assert attrs["model"].string_value == "efficientnet_lite0"
    rows = attrs["rows"]  # tracing-opentelemetry exports a usize field as a string
    assert (rows.int_value if rows.HasField("int_value") else int(rows.string_value)) == 1

    # No payloads, credentials or raw user ids anywhere in what was exported.
    forbidden = [API_KEY, API_KEY_SHA, image_bytes[:64].hex(), "x-api-key"]
    for svc, s in spans:
        values = [a.value for a in s.attributes]
        values += [a.value for e in s.events for a in e.attributes]
        values += [a.value for l in s.links for a in l.attributes]
        for v in values:
            assert not v.HasField("bytes_value"), f"{svc} {s.name}: a bytes attribute"
            text = str(v)
            assert len(text) < 512, f"{svc} {s.name}: an attribute of {len(text)} chars looks like a payload"
            for f in forbidden:
                assert f not in text, f"{svc} {s.name} carries {f!r}"
    for res in receiver.resources:
        for a in res.attributes:
            assert API_KEY not in str(a.value)


# --- every service starts from the chart's config, and its probes' target answers ---------------


def wait_for_sigterm_handler(proc, timeout_s: float = 30.0) -> None:
    """Waits until the process catches SIGTERM (its SigCgt mask in /proc). The services print
    their listening line just before they install the handler (marquee_core::serve::run_binary),
    so on a loaded machine a SIGTERM sent at once can still find the default action and kill the
    process without a drain; run_binary's clean-exit check would then fail for that reason."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        caught = int(next(l.split()[1] for l in status.splitlines() if l.startswith("SigCgt:")), 16)
        if caught & (1 << (15 - 1)):
            return
        assert time.monotonic() < deadline, "the service never installed its SIGTERM handler"
        time.sleep(0.01)


def health(addr: str, service: str = "") -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(addr) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_vision_and_the_gateway_answer_the_probes_service(services):
    from grpc_health.v1 import health_pb2

    for name in ("vision", "gateway"):
        # What the chart's startup/readiness/liveness probes ask: grpc.health.v1, service "".
        assert health(services[name].grpc_addr) == health_pb2.HealthCheckResponse.SERVING, name


@pytest.mark.parametrize("component", ["language", "recommendation"])
def test_language_and_recommendation_run_the_config_the_chart_renders(component, ml_services):
    """The chart's TOML for language and recommendation is accepted by their real binaries
    (their `deny_unknown_fields` settings refuse anything misplaced with exit 64), and they
    answer the probes' health check."""
    from grpc_health.v1 import health_pb2

    srv = ml_services[component]
    assert health(srv.grpc_addr) == health_pb2.HealthCheckResponse.SERVING
    assert "marquee_" in scrape(srv)


def test_the_recommender_on_the_charts_config_refuses_a_forged_tenant(ml_services, marquee_pb):
    """The chart gives the recommender a tenant token (and the gateway the same one): a caller
    that reaches the recommender directly and names a tenant without the token is refused;
    with the token, as the gateway sends it, the tenant is accepted."""
    rpb, rgrpc = marquee_pb.recommendation_pb2, marquee_pb.recommendation_pb2_grpc
    request = rpb.RecommendRequest(user_id=KNOWN_USER, k=3)
    with grpc.insecure_channel(ml_services["recommendation"].grpc_addr) as ch:
        stub = rgrpc.RecommenderStub(ch)
        for forged in ([("x-marquee-tenant", "acme")], [("x-marquee-tenant", "acme"), ("x-marquee-tenant-token", "not-the-token-0123456789")]):
            with pytest.raises(grpc.RpcError) as e:
                stub.Recommend(request, metadata=forged, timeout=60)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, e.value
        token = ml_services["tenant_token"].strip()
        assert stub.Recommend(request, metadata=[("x-marquee-tenant", "acme"), ("x-marquee-tenant-token", token)], timeout=60).items


# --- what each service serves: reflection, and the OIP discovery calls --------------------------

# Every service: health, reflection (v1 and v1alpha) and the Open Inference Protocol.
COMMON_SERVICES = {
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
    "inference.GRPCInferenceService",
}
OWN_SERVICE = {
    "vision": "marquee.vision.v1.ImageService",
    "language": "marquee.language.v1.TextGeneration",
    "recommendation": "marquee.recommendation.v1.Recommender",
}


def grpcurl(addr: str, *args: str, body: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [GRPCURL, "-plaintext", *(["-d", "@"] if body is not None else []), addr, *args]
    data = json.dumps(body) if body is not None else None
    return subprocess.run(cmd, input=data, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("component", ["vision", "language", "recommendation"])
def test_reflection_lists_only_the_services_each_serves(request, component):
    fixture = "services" if component == "vision" else "ml_services"
    srv = request.getfixturevalue(fixture)[component]
    out = grpcurl(srv.grpc_addr, "list")
    assert out.returncode == 0, out.stderr
    assert set(out.stdout.split()) == COMMON_SERVICES | {OWN_SERVICE[component]}


@pytest.mark.parametrize("component, model", [("language", "gpt_reviews"), ("recommendation", "recommender")])
def test_oip_repository_index_lists_the_served_model(ml_services, component, model):
    """What the gateway's model table is built from (`models_refresh_ms`): the one model the
    chart's config serves (language: `repository.models = ["gpt_reviews"]` of the ci values,
    though the repository also holds vision's models and the recommender)."""
    out = grpcurl(ml_services[component].grpc_addr, "inference.GRPCInferenceService/RepositoryIndex", body={})
    assert out.returncode == 0, out.stderr
    models = json.loads(out.stdout)["models"]
    assert [(m["name"], m["state"]) for m in models] == [(model, "READY")], models
    ready = grpcurl(ml_services[component].grpc_addr, "inference.GRPCInferenceService/ModelReady", body={"name": model})
    assert ready.returncode == 0 and json.loads(ready.stdout) == {"ready": True}, ready.stdout + ready.stderr


def test_recommender_refuses_tensor_inference_with_failed_precondition(ml_services):
    body = {
        "model_name": "recommender",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "contents": {"fp32_contents": [1.0]}}],
    }
    out = grpcurl(ml_services["recommendation"].grpc_addr, "inference.GRPCInferenceService/ModelInfer", body=body)
    assert out.returncode != 0
    assert "FailedPrecondition" in out.stderr, out.stderr
    assert "marquee.recommendation.v1.Recommender" in out.stderr, out.stderr


REFUSED_AT_START = {
    # The schema refuses these values (tests/deploy/test_chart.py BAD_VALUES); so do the services.
    "language lanes": ("marquee-language", {"MARQUEE__REPOSITORY__LANES": "2"}, "`repository.lanes` is not used by the language service"),
    "language batching": ("marquee-language", {"MARQUEE__REPOSITORY__BATCHING": "false"}, "`repository.batching` is not used by the language service"),
    "recommendation profile_batching": ("marquee-recommendation", {"MARQUEE__REPOSITORY__PROFILE_BATCHING": "false"}, "`repository.profile_batching` is not used by the recommendation service"),
    # The keys the unified `[repository]` replaced are unknown now.
    "old language repository": ("marquee-language", {"MARQUEE__LANGUAGE__REPOSITORY": "/models"}, "unknown field `repository`"),
    "old recommendation workers": ("marquee-recommendation", {"MARQUEE__RECOMMENDATION__WORKERS": "2"}, "unknown field `workers`"),
}


@pytest.mark.parametrize("case", REFUSED_AT_START.values(), ids=REFUSED_AT_START.keys())
def test_services_refuse_repository_keys_they_would_ignore(case, tmp_path):
    """With the chart's TOML plus one refused key, the service exits 64 (EX_CONFIG) naming it,
    before loading any model."""
    binary, env, message = case
    component = binary.removeprefix("marquee-")
    config = chart_config_files(tmp_path)[component]
    r = subprocess.run(
        [str(bin_dir() / binary), "--config", str(config)],
        env={
            **os.environ,
            "MARQUEE__SERVER__GRPC_ADDR": "127.0.0.1:0",
            "MARQUEE__SERVER__ADMIN_ADDR": "127.0.0.1:0",
            "MARQUEE__REPOSITORY__PATH": str(model_repo()),
            "NO_COLOR": "1",
            **({"MARQUEE__RECOMMENDATION__STATE_DIR": str(tmp_path / "state"), **recommendation_secret_files(tmp_path)} if component == "recommendation" else {}),
            **env,
        },
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 64, r.stdout + r.stderr
    assert message in r.stderr, r.stderr


def test_language_steps_are_spans_linked_to_the_requests_they_serve(ml_services, marquee_pb, receiver):
    """Each `prefill` and `decode` call of the engine is a root span (it serves many traces),
    linked to the span of every request it computes: a trace of one generation leads to the
    steps that made its tokens."""
    lpb, lgrpc = marquee_pb.language_pb2, marquee_pb.language_pb2_grpc
    trace_id = os.urandom(16).hex()
    params = lpb.GenerationParameters(max_new_tokens=5, min_new_tokens=5, seed=3)
    with grpc.insecure_channel(ml_services["language"].grpc_addr) as ch:
        out = lgrpc.TextGenerationStub(ch).Generate(
            lpb.GenerateRequest(model=LANGUAGE_MODEL, prompt="Nice fit", parameters=params),
            metadata=(("traceparent", f"00-{trace_id}-{os.urandom(8).hex()}-01"),),
            timeout=60,
        )
    assert out.summary.generated_tokens == 5

    def linked(spans, name):
        mine = {s.span_id for svc, s in spans if svc == "marquee-language" and s.trace_id.hex() == trace_id}
        return [s for svc, s in spans if svc == "marquee-language" and s.name == name
                and any(l.trace_id.hex() == trace_id and l.span_id in mine for l in s.links)]

    # One prefill, then a decode step per token after the first (5 tokens: 4 steps).
    ok, spans = receiver.wait_for(lambda sp: len(linked(sp, "lm_prefill")) == 1 and len(linked(sp, "lm_decode")) >= 4)
    assert ok, f"steps: {[(svc, s.name) for svc, s in spans if svc == 'marquee-language']}"
    for s in linked(spans, "lm_prefill") + linked(spans, "lm_decode"):
        assert s.parent_span_id == b"", "a step serves many traces: a root span, linked, not parented"
    (prefill,) = linked(spans, "lm_prefill")
    attrs = {a.key: a.value for a in prefill.attributes}
    prompt_tokens = attrs["prompt_tokens"]
    assert (prompt_tokens.int_value if prompt_tokens.HasField("int_value") else int(prompt_tokens.string_value)) == out.summary.prompt_tokens
