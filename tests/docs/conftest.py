"""The services the documented examples call: marquee-vision, marquee-language,
marquee-recommendation and marquee-gateway in front of them, started once per session from
$MARQUEE_BIN_DIR on ephemeral ports (each binary's `NAME listening grpc=… admin=…` line gives
its real addresses), configured from the TOML files in tests/docs/services/ (change a service's
settings there, in one place), stopped with SIGTERM and required to exit 0.

The gateway gets what `make run` gives it: one tenant `local` and one API key with scope
`admin`, which the examples read from $MARQUEE_API_KEY.

Environment: MARQUEE_BIN_DIR (the binaries, `marquee` included; default <repo>/target/debug)
and MARQUEE_MODEL_REPO (default <repo>/model-repository), as for tests/python.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "tests" / "python"))
from marquee_servers import bin_dir, model_repo, run_binary  # noqa: E402

SERVICES_DIR = Path(__file__).resolve().parent / "services"
API_KEY = "mq_docs-test-key-5e1d07"

# Models the gateway must have routed before the examples run (from its /readyz body).
GATEWAY_MODELS = ("efficientnet_lite0@vision", "fashion_cnn@vision", "gpt_reviews@language", "textgenrnn@language")
READY_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Stack:
    """Where each service really listens, by the name the docs use for it."""

    grpc: dict[str, str]  # service -> host:port
    admin: dict[str, str]
    api_key: str
    bin_dir: Path


def service_config(name: str, root: Path, **values: str) -> Path:
    """tests/docs/services/<name>.toml with its @PLACEHOLDERS@ filled in, written under root."""
    text = (SERVICES_DIR / f"{name}.toml").read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    assert "@" not in text.replace("@@", ""), f"unfilled placeholder in {name}.toml:\n{text}"
    path = root / f"{name}.toml"
    path.write_text(text)
    return path


def wait_ready(admin_addr: str, needles: tuple[str, ...], timeout_s: float) -> str:
    """Poll the gateway's /readyz until it answers 200 and lists every model in `needles`."""
    deadline = time.monotonic() + timeout_s
    body = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{admin_addr}/readyz", timeout=5) as r:
                body = r.read().decode()
                if r.status == 200 and all(n in body for n in needles):
                    return body
        except urllib.error.HTTPError as e:
            body = f"{e.code}: {e.read().decode(errors='replace')}"
        except OSError as e:
            body = repr(e)
        time.sleep(0.05)
    pytest.fail(f"gateway not ready with {needles} within {timeout_s}s; last /readyz: {body}")


@pytest.fixture(scope="session")
def stack() -> Stack:
    repo = model_repo()
    if not repo.is_dir():
        pytest.fail(f"model repository not found: {repo} (set MARQUEE_MODEL_REPO)")
    if not (bin_dir() / "marquee").is_file():
        pytest.fail(f"the `marquee` CLI is not in {bin_dir()} (set MARQUEE_BIN_DIR)")
    root = Path(tempfile.mkdtemp(prefix="marquee-docs-"))
    (root / "state").mkdir()
    # As `make run`: the gateway vouches for the caller's tenant with a token only it and the
    # recommender know.
    token = root / "tenant.token"
    token.write_text(secrets.token_urlsafe(24) + "\n")
    common = {"MODEL_REPO": str(repo), "STATE_DIR": str(root / "state"), "TENANT_TOKEN": str(token)}
    with contextlib.ExitStack() as stack:
        backends = {}
        for name in ("vision", "language", "recommendation"):
            cfg = service_config(name, root, **common)
            backends[name] = stack.enter_context(run_binary(f"marquee-{name}", {}, ["--config", str(cfg)]))
        gw_cfg = service_config(
            "gateway",
            root,
            API_KEY_SHA256=hashlib.sha256(API_KEY.encode()).hexdigest(),
            VISION=backends["vision"].grpc_addr,
            LANGUAGE=backends["language"].grpc_addr,
            RECOMMENDATION=backends["recommendation"].grpc_addr,
            TENANT_TOKEN=str(token),
        )
        gateway = stack.enter_context(run_binary("marquee-gateway", {}, ["--config", str(gw_cfg)]))
        wait_ready(gateway.admin_addr, GATEWAY_MODELS, READY_TIMEOUT_S)
        servers = {"gateway": gateway, **backends}
        yield Stack(
            grpc={n: s.grpc_addr for n, s in servers.items()},
            admin={n: s.admin_addr for n, s in servers.items()},
            api_key=API_KEY,
            bin_dir=bin_dir(),
        )
