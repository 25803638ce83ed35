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

import contextlib
import gzip
import hashlib
import os
import re
import selectors
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = REPO_ROOT / "tests" / "fixtures"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

STARTUP_TIMEOUT_S = 120.0
SHUTDOWN_TIMEOUT_S = 30.0
LISTEN_RE = re.compile(
    r"^marquee-\w+ listening grpc=(?P<grpc>\S+:\d+) admin=(?P<admin>\S+:\d+)$"
)
# The API key the gateway fixture accepts (configured by its SHA-256 only).
GATEWAY_KEY = "python-test-key-4f2a9c"


@dataclass(frozen=True)
class Server:
    grpc_addr: str
    admin_addr: str
    model_repo: Path
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "<no log>"
        return "\n".join(lines[-n:])


def _bin_dir() -> Path:
    return Path(os.environ.get("MARQUEE_BIN_DIR", REPO_ROOT / "target" / "debug"))


def _model_repo() -> Path:
    return Path(os.environ.get("MARQUEE_MODEL_REPO", REPO_ROOT / "model-repository"))


def _read_listen_line(proc: subprocess.Popen, timeout_s: float, log_path: Path) -> re.Match:
    """Read stdout until the 'listening' line appears, the process dies or the timeout hits."""
    deadline = time.monotonic() + timeout_s
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    seen: list[str] = []
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"marquee-vision printed no listening line within {timeout_s}s; "
                    f"stdout so far={seen!r}"
                )
            if not sel.select(timeout=min(remaining, 1.0)):
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break  # EOF: process closed stdout (probably exited)
            buf += chunk
            while b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                line = raw.decode(errors="replace").strip()
                seen.append(line)
                m = LISTEN_RE.match(line)
                if m:
                    return m
    finally:
        sel.close()
    proc.wait(timeout=5)
    tail = log_path.read_text(errors="replace")[-4000:]
    raise RuntimeError(
        f"marquee-vision exited (code {proc.returncode}) before listening; "
        f"stdout={seen!r}\nstderr tail:\n{tail}"
    )


@contextlib.contextmanager
def _run_binary(name: str, env_overrides: dict[str, str], args: list[str] | None = None):
    """Start a Marquee binary on ephemeral ports, yield it once it listens, SIGTERM it after
    and require a clean exit."""
    binary = _bin_dir() / name
    if not binary.is_file():
        pytest.fail(f"binary not found: {binary} (set MARQUEE_BIN_DIR)")
    log_dir = Path(tempfile.mkdtemp(prefix="marquee-e2e-"))
    log_path = log_dir / f"{name}.stderr.log"
    env = dict(os.environ)
    env.update(
        {
            "MARQUEE__SERVER__GRPC_ADDR": "127.0.0.1:0",
            "MARQUEE__SERVER__ADMIN_ADDR": "127.0.0.1:0",
            "NO_COLOR": "1",
            **env_overrides,
        }
    )
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [str(binary), *(args or [])],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log_file,
            env=env,
            cwd=str(REPO_ROOT),
        )
    try:
        m = _read_listen_line(proc, STARTUP_TIMEOUT_S, log_path)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        raise

    srv = Server(
        grpc_addr=m.group("grpc"),
        admin_addr=m.group("admin"),
        model_repo=_model_repo(),
        process=proc,
        log_path=log_path,
    )
    assert not srv.grpc_addr.endswith(":0"), srv.grpc_addr
    assert not srv.admin_addr.endswith(":0"), srv.admin_addr
    try:
        yield srv
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
                pytest.fail(f"{name} did not exit within {SHUTDOWN_TIMEOUT_S}s of SIGTERM\n{srv.log_tail()}")
        else:
            code = proc.returncode
        if proc.stdout is not None:
            proc.stdout.close()
        assert code == 0, f"{name} exit code {code} after SIGTERM\n{srv.log_tail()}"


@pytest.fixture(scope="session")
def server() -> Server:
    model_repo = _model_repo()
    if not model_repo.is_dir():
        pytest.fail(f"model repository not found: {model_repo} (set MARQUEE_MODEL_REPO)")
    with _run_binary(
        "marquee-vision",
        {
            "MARQUEE__REPOSITORY__PATH": str(model_repo),
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
    with _run_binary("marquee-gateway", {}, ["--config", str(cfg)]) as gw:
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
