"""Starting Marquee binaries for end-to-end tests: on ephemeral ports, found through their one
`NAME listening grpc=… admin=…` stdout line, stopped with SIGTERM and required to exit 0.
Shared by tests/python and clients/ (separate pytest processes)."""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

STARTUP_TIMEOUT_S = 120.0
SHUTDOWN_TIMEOUT_S = 30.0
LISTEN_RE = re.compile(
    r"^marquee-\w+ listening grpc=(?P<grpc>\S+:\d+) admin=(?P<admin>\S+:\d+)$"
)


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


def bin_dir() -> Path:
    return Path(os.environ.get("MARQUEE_BIN_DIR", REPO_ROOT / "target" / "debug"))


def model_repo() -> Path:
    return Path(os.environ.get("MARQUEE_MODEL_REPO", REPO_ROOT / "model-repository"))


def read_listen_line(proc: subprocess.Popen, timeout_s: float, log_path: Path) -> re.Match:
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
def run_binary(name: str, env_overrides: dict[str, str], args: list[str] | None = None):
    """Start a Marquee binary on ephemeral ports, yield it once it listens, SIGTERM it after
    and require a clean exit."""
    binary = bin_dir() / name
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
        m = read_listen_line(proc, STARTUP_TIMEOUT_S, log_path)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        raise

    srv = Server(
        grpc_addr=m.group("grpc"),
        admin_addr=m.group("admin"),
        model_repo=model_repo(),
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


def serve_language(repo: Path):
    """`marquee-language` over `repo` (one intra-op thread, no polling), as a context manager."""
    return run_binary(
        "marquee-language",
        {
            "MARQUEE__REPOSITORY__PATH": str(repo),
            "MARQUEE__REPOSITORY__THREADS": "1",
            "MARQUEE__REPOSITORY__POLL_INTERVAL_MS": "0",
        },
    )
