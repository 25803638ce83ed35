"""Shared fixtures for the Python end-to-end tests.

A single ``marquee-vision`` server is started per test session. It binds
ephemeral ports (``127.0.0.1:0``); the real ports are taken from the one
stdout line the server prints once every model is loaded. The server is
stopped with SIGTERM at the end of the session and must exit with code 0.

Environment:
  MARQUEE_BIN_DIR     directory holding the ``marquee-vision`` binary
                      (default: <repo>/target/debug)
  MARQUEE_MODEL_REPO  model repository (default: <repo>/model-repository)
"""

from __future__ import annotations

import gzip
import hashlib
import tempfile
from pathlib import Path

import numpy as np
import pytest

from marquee_servers import REPO_ROOT, Server, model_repo, run_binary

FIXTURES = REPO_ROOT / "tests" / "fixtures"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

# The API key the gateway fixture accepts (configured by its SHA-256 only).
GATEWAY_KEY = "python-test-key-4f2a9c"


@pytest.fixture(scope="session")
def server() -> Server:
    repo = model_repo()
    if not repo.is_dir():
        pytest.fail(f"model repository not found: {repo} (set MARQUEE_MODEL_REPO)")
    with run_binary(
        "marquee-vision",
        {
            "MARQUEE__REPOSITORY__PATH": str(repo),
            "MARQUEE__REPOSITORY__THREADS": "1",
            "MARQUEE__REPOSITORY__POLL_INTERVAL_MS": "0",
        },
    ) as srv:
        yield srv


@pytest.fixture(scope="session")
def gateway(server: Server) -> Server:
    """The real gateway in front of the vision server, accepting GATEWAY_KEY (tenant `py`)."""
    cfg_dir = Path(tempfile.mkdtemp(prefix="marquee-gw-"))
    cfg = cfg_dir / "gateway.toml"
    key_hash = hashlib.sha256(GATEWAY_KEY.encode()).hexdigest()
    cfg.write_text(
        f"""
[tenants.py]
weight = 1

[[auth.api_keys]]
sha256 = "{key_hash}"
tenant = "py"
scopes = ["vision:infer"]

[backends.vision]
kind = "vision"
endpoints = ["{server.grpc_addr}"]
"""
    )
    with run_binary("marquee-gateway", {}, ["--config", str(cfg)]) as gw:
        yield gw


# ---------------------------------------------------------------------------
# Data helpers
# ---------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    assert data[0] == 0 and data[1] == 0, f"bad idx magic in {path}"
    dtype_code, ndim = data[2], data[3]
    assert dtype_code == 0x08, f"expected unsigned-byte idx data, got {dtype_code:#x} ({magic:#x})"
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    arr = np.frombuffer(data, dtype=np.uint8, offset=offset)
    assert arr.size == int(np.prod(dims)), f"{path}: size {arr.size} != dims {dims}"
    return arr.reshape(dims)


@pytest.fixture(scope="session")
def fashion_test_set() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N,28,28], labels uint8 [N]) of the Fashion-MNIST test split."""
    images = _read_idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz")
    labels = _read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28)
    assert labels.shape == (10000,)
    return images, labels


def preprocess_fashion(images_u8: np.ndarray) -> np.ndarray:
    """uint8 [N,28,28] -> float32 [N,1,28,28] as the fashion_cnn model expects."""
    x = images_u8.astype(np.float32) / 255.0
    x = (x - 0.286) / 0.353
    return np.ascontiguousarray(x[:, None, :, :], dtype=np.float32)


def preprocess_imagenet(path: Path) -> np.ndarray:
    """Photo -> float32 [1,3,224,224] for efficientnet_lite0.

    Bilinear resize of the shorter side to 256, center crop 224x224,
    (x/255 - 127/255) / (128/255) per channel.
    """
    from PIL import Image

    img = Image.open(path).convert("RGB")
    w, h = img.size
    if w <= h:
        nw, nh = 256, max(256, round(h * 256 / w))
    else:
        nw, nh = max(256, round(w * 256 / h)), 256
    img = img.resize((nw, nh), Image.BILINEAR)
    left = (nw - 224) // 2
    top = (nh - 224) // 2
    img = img.crop((left, top, left + 224, top + 224))
    x = np.asarray(img, dtype=np.float32) / 255.0  # HWC
    x = (x - 127.0 / 255.0) / (128.0 / 255.0)
    x = x.transpose(2, 0, 1)[None]  # NCHW
    return np.ascontiguousarray(x, dtype=np.float32)


@pytest.fixture(scope="session")
def pb():
    """Python stubs for marquee.language.v1 (`language_pb2`, `language_pb2_grpc`), compiled
    from proto/ by grpcio-tools, once per session."""
    import importlib.resources
    import sys

    from grpc_tools import protoc

    out = Path(tempfile.mkdtemp(prefix="marquee-language-pb-"))
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    rc = protoc.main(["protoc", f"-I{REPO_ROOT / 'proto'}", f"-I{well_known}", f"--python_out={out}",
                      f"--grpc_python_out={out}", "marquee/language/v1/language.proto"])
    assert rc == 0, "protoc failed"
    sys.path.insert(0, str(out))
    from marquee.language.v1 import language_pb2, language_pb2_grpc

    return language_pb2, language_pb2_grpc


@pytest.fixture(scope="module")
def stub(language, pb):
    """A `TextGenerationStub` on the module's `language` server fixture."""
    import grpc

    _, language_pb2_grpc = pb
    with grpc.insecure_channel(language.grpc_addr) as channel:
        yield language_pb2_grpc.TextGenerationStub(channel)
