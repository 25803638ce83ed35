"""End-to-end tests of every Marquee client: the Python package, the Node.js example and the
`marquee` CLI, each classifying a real photo against a real server.

Environment:
  MARQUEE_TEST_GRPC_ADDR  host:port of the server to test (the gateway, or a service). When
                          unset, a ``marquee-vision`` is started on 127.0.0.1:0 for the session.
  MARQUEE_TEST_API_KEY    API key every client sends (needed only behind the gateway).
  MARQUEE_BIN_DIR         directory holding ``marquee`` and ``marquee-vision``
                          (default: <repo>/target/debug)
  MARQUEE_MODEL_REPO      model repository for the started server
                          (default: <repo>/model-repository)

Prerequisites (``make test`` does both): ``pip install --no-build-isolation ./clients/python``
into this interpreter, and ``npm ci --prefix clients/node``.
"""

from __future__ import annotations

import json
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import pytest

import marquee_client

# The server launcher shared with tests/python (kept there, imported from here).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "python"))
from marquee_servers import bin_dir, model_repo, run_binary  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
COFFEE = REPO_ROOT / "tests" / "fixtures" / "coffee.png"
NODE_CLASSIFY = REPO_ROOT / "clients" / "node" / "classify.js"
ESPRESSO = 967

CALL_TIMEOUT_S = 60.0
# The key the gateway started below accepts (configured by its SHA-256 only).
GATEWAY_KEY = "clients-test-key-b81f3e"


def _api_key() -> str | None:
    if os.environ.get("MARQUEE_TEST_GRPC_ADDR"):
        return os.environ.get("MARQUEE_TEST_API_KEY") or None
    return GATEWAY_KEY


@pytest.fixture(scope="session")
def grpc_addr():
    """host:port under test: $MARQUEE_TEST_GRPC_ADDR, or a fresh marquee-vision behind a fresh
    marquee-gateway that requires GATEWAY_KEY (the way clients reach Marquee)."""
    addr = os.environ.get("MARQUEE_TEST_GRPC_ADDR")
    if addr:
        yield addr.removeprefix("http://")
        return
    repo = model_repo()
    if not repo.is_dir():
        pytest.fail(f"model repository not found: {repo} (set MARQUEE_MODEL_REPO)")
    vision_env = {
        "MARQUEE__REPOSITORY__PATH": str(repo),
        "MARQUEE__REPOSITORY__THREADS": "1",
        "MARQUEE__REPOSITORY__POLL_INTERVAL_MS": "0",
    }
    with run_binary("marquee-vision", vision_env) as vision:
        cfg = Path(tempfile.mkdtemp(prefix="marquee-clients-gw-")) / "gateway.toml"
        cfg.write_text(
            "[tenants.clients]\n\n[[auth.api_keys]]\n"
            f'sha256 = "{hashlib.sha256(GATEWAY_KEY.encode()).hexdigest()}"\n'
            'tenant = "clients"\nscopes = ["vision:infer"]\n\n'
            f'[backends.vision]\nendpoints = ["{vision.grpc_addr}"]\n'
        )
        with run_binary("marquee-gateway", {}, ["--config", str(cfg)]) as gateway:
            yield gateway.grpc_addr


# ---------------------------------------------------------------------------
# Python package
# ---------------------------------------------------------------------------


def test_python_client_classifies_coffee_as_espresso(grpc_addr):
    with marquee_client.connect(grpc_addr, api_key=_api_key(), timeout=CALL_TIMEOUT_S) as client:
        labels = client.classify(COFFEE, top_k=3)
        name, score, index = labels[0]
        assert (name, index) == ("espresso", ESPRESSO)
        assert 0.9 < score <= 1.0, score
        assert len(labels) == 3
        assert labels[0].score >= labels[1].score >= labels[2].score

        # Bytes give the same answer as the path.
        from_bytes = client.classify(COFFEE.read_bytes(), model="efficientnet_lite0", top_k=3)
        assert [l.name for l in from_bytes] == [l.name for l in labels]


def test_python_client_raises_grpc_errors(grpc_addr):
    with marquee_client.connect(f"http://{grpc_addr}", api_key=_api_key()) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.classify(COFFEE, model="no_such_model")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value
    assert "no_such_model" in err.value.details()


def test_python_generated_stubs_are_importable():
    # In a child process: the OIP stubs share proto package `inference` with tritonclient, and
    # must not be loaded into a pytest process that may also import tritonclient.
    code = """
from marquee_client.inference import grpc_service_pb2, grpc_service_pb2_grpc
from marquee_client.marquee.common.v1 import common_pb2
from marquee_client.marquee.vision.v1 import vision_pb2, vision_pb2_grpc
assert vision_pb2.ClassifyRequest.DESCRIPTOR.full_name == "marquee.vision.v1.ClassifyRequest"
assert vision_pb2.ClassifyRequest.__module__ == "marquee_client.marquee.vision.v1.vision_pb2"
assert common_pb2.Tensor.DESCRIPTOR.full_name == "marquee.common.v1.Tensor"
assert grpc_service_pb2.ModelInferRequest.DESCRIPTOR.full_name == "inference.ModelInferRequest"
assert grpc_service_pb2_grpc.GRPCInferenceServiceStub and vision_pb2_grpc.ImageServiceStub
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------
# Node.js example
# ---------------------------------------------------------------------------


def _node(*args: str) -> subprocess.CompletedProcess:
    node = shutil.which("node")
    if node is None:
        pytest.fail("`node` is not on PATH; the Node.js client cannot be tested")
    if not (NODE_CLASSIFY.parent / "node_modules").is_dir():
        pytest.fail("clients/node/node_modules is missing: run `npm ci --prefix clients/node`")
    key = _api_key()
    return subprocess.run(
        [node, str(NODE_CLASSIFY), *args, *(["--api-key", key] if key else [])],
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT_S + 30,
        cwd=str(REPO_ROOT),
    )


def test_node_client_classifies_coffee_as_espresso(grpc_addr):
    r = _node(str(COFFEE), "--endpoint", grpc_addr, "--top-k", "3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("efficientnet_lite0 (version "), r.stdout
    assert re.fullmatch(r"  0\.9\d\d  espresso \(967\)", lines[1]), r.stdout
    assert len(lines) == 4, r.stdout


def test_node_client_exits_nonzero_with_the_grpc_status(grpc_addr):
    r = _node(str(COFFEE), "--endpoint", grpc_addr, "--model", "no_such_model")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: NOT_FOUND: "), r.stderr
    assert "no_such_model" in r.stderr


# ---------------------------------------------------------------------------
# marquee CLI
# ---------------------------------------------------------------------------


def _cli(*args: str, endpoint: str) -> subprocess.CompletedProcess:
    binary = bin_dir() / "marquee"
    if not binary.is_file():
        pytest.fail(f"CLI binary not found: {binary} (cargo build -p marquee-cli)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARQUEE_")}
    if _api_key():
        env["MARQUEE_API_KEY"] = _api_key()
    return subprocess.run(
        [str(binary), *args, "--endpoint", endpoint],
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT_S + 30,
        env=env,
        cwd=str(REPO_ROOT),
    )


def test_cli_classify_json(grpc_addr):
    r = _cli("classify", str(COFFEE), "--json", "--top-k", "3", endpoint=f"http://{grpc_addr}")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["model"] == "efficientnet_lite0"
    assert out["model_version"], out
    assert [set(l) for l in out["labels"]] == [{"index", "name", "score"}] * 3
    top = out["labels"][0]
    assert (top["name"], top["index"]) == ("espresso", ESPRESSO)
    assert 0.9 < top["score"] <= 1.0


def test_cli_classify_text(grpc_addr):
    r = _cli("classify", str(COFFEE), "--top-k", "2", endpoint=grpc_addr)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert re.fullmatch(r"efficientnet_lite0 \(version \S+\)", lines[0]), r.stdout
    assert re.fullmatch(r"  0\.9\d\d  espresso \(967\)", lines[1]), r.stdout
    assert len(lines) == 3


def test_cli_health_and_models(grpc_addr):
    r = _cli("health", "--model", "efficientnet_lite0", "--json", endpoint=grpc_addr)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["status"] == "SERVING" and out["server"] == "SERVING", out
    assert out["server_ready"] is True
    assert out["models"] == [{"name": "efficientnet_lite0", "ready": True}]

    r = _cli("health", "--service", "no_such_model", endpoint=grpc_addr)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stdout.splitlines()[0] == "NOT_SERVING", r.stdout

    r = _cli("models", "--model", "efficientnet_lite0", "--json", endpoint=grpc_addr)
    assert r.returncode == 0, r.stderr
    (model,) = json.loads(r.stdout)["models"]
    assert model["name"] == "efficientnet_lite0"
    assert model["inputs"][0]["datatype"] == "FP32"
    assert model["inputs"][0]["shape"][-3:] == [3, 224, 224]
    assert model["outputs"][0]["shape"][-1] == 1000

    # Without --model: every model in the server's RepositoryIndex.
    r = _cli("models", endpoint=grpc_addr)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^efficientnet_lite0  versions: \S+  platform: ", r.stdout, re.M), r.stdout
    assert re.search(r"^  input   image\s+FP32\s+\[-1, 3, 224, 224\]$", r.stdout, re.M), r.stdout


def test_cli_errors_name_the_grpc_code(grpc_addr):
    r = _cli("classify", str(COFFEE), "--model", "no_such_model", endpoint=grpc_addr)
    assert r.returncode == 1
    assert r.stderr.startswith("error: NOT_FOUND: "), r.stderr

    r = _cli("classify", "does/not/exist.png", endpoint=grpc_addr)
    assert r.returncode == 1
    assert r.stderr.startswith("error: cannot read `does/not/exist.png`: "), r.stderr

    # Port 1 on loopback: nothing listens, the connection is refused at once.
    r = _cli("health", "--timeout", "5", endpoint="http://127.0.0.1:1")
    assert r.returncode == 1
    assert r.stderr.startswith("error: UNAVAILABLE"), r.stderr

    r = _cli("classify", endpoint=grpc_addr)
    assert r.returncode == 2, r.stderr


# ---------------------------------------------------------------------------
# The auth contract: every client sends its key as `x-api-key` metadata
# ---------------------------------------------------------------------------

TEST_KEY = "mk_test_key-123"


@pytest.fixture(scope="module")
def key_checking_addr():
    """A stand-in ImageService that answers only calls carrying `x-api-key: TEST_KEY`, as the
    gateway will; it names the key it saw in the response's `model_version`."""
    from concurrent import futures

    from marquee_client.marquee.vision.v1 import vision_pb2, vision_pb2_grpc

    class KeyChecking(vision_pb2_grpc.ImageServiceServicer):
        def Classify(self, request, context):
            keys = [v for k, v in context.invocation_metadata() if k == "x-api-key"]
            if keys != [TEST_KEY]:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, f"missing or bad api key: {len(keys)} sent")
            return vision_pb2.ClassifyResponse(
                model=request.model,
                model_version="key-ok",
                labels=[vision_pb2.Label(index=967, name="espresso", score=1.0)][: request.top_k],
            )

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    vision_pb2_grpc.add_ImageServiceServicer_to_server(KeyChecking(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def test_every_client_sends_the_api_key(key_checking_addr):
    addr = key_checking_addr
    with marquee_client.connect(addr, api_key=TEST_KEY) as client:
        assert client.classify(COFFEE, top_k=1) == [("espresso", 1.0, 967)]

    r = subprocess.run(
        ["node", str(NODE_CLASSIFY), str(COFFEE), "--endpoint", addr, "--api-key", TEST_KEY],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0 and "(version key-ok)" in r.stdout, (r.stdout, r.stderr)

    r = _cli("classify", str(COFFEE), "--api-key", TEST_KEY, "--json", endpoint=addr)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model_version"] == "key-ok"
    assert TEST_KEY not in r.stdout + r.stderr


def test_every_client_reports_unauthenticated_without_a_key(key_checking_addr):
    addr = key_checking_addr
    with marquee_client.connect(addr) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.classify(COFFEE)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    r = subprocess.run(
        ["node", str(NODE_CLASSIFY), str(COFFEE), "--endpoint", addr],
        capture_output=True, text=True, timeout=60, env={**os.environ, "MARQUEE_API_KEY": ""},
    )
    assert r.returncode == 1 and r.stderr.startswith("error: UNAUTHENTICATED: "), r.stderr

    r = _cli("classify", str(COFFEE), endpoint=addr)
    assert r.returncode == 1 and r.stderr.startswith("error: UNAUTHENTICATED: "), r.stderr
