"""`bench/gpu-check.sh`, the one prepared check of the CUDA path, kept runnable without a GPU.

`--dry-run` runs every step of the real check (raw ceilings, both vision models and the
language model served and called) on the CPU with small counts; without it, on a machine with
no GPU, the script must refuse at once with the reason instead of building and failing later.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from marquee_servers import REPO_ROOT

SCRIPT = REPO_ROOT / "bench" / "gpu-check.sh"


def run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.setdefault("MARQUEE_BIN_DIR", str(REPO_ROOT / "target" / "debug"))
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def test_the_dry_run_serves_every_model_and_prints_every_figure(tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text("# Results\n\n## Another section\n\nkept\n")
    r = run("--dry-run", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert "## Another section\n\nkept" in text, "other sections are kept"
    assert "## On a GPU (`bench/gpu-check.sh`)" in text
    assert "Device `cpu`" in text
    number = r"[0-9]+(?:\.[0-9]+)?"
    for model in ("fashion_cnn", "efficientnet_lite0"):
        row = re.search(rf"^\| `{model}` \|(.*)$", text, re.M)
        assert row, text
        cells = [c.strip() for c in row.group(1).split("|") if c.strip()]
        # ceiling, forward, c=1 "calls, p50 / p99", c=32 likewise, share: all measured.
        assert len(cells) == 5, cells
        assert all(re.search(number, c) for c in cells), cells
        assert float(cells[0]) > 0 and float(cells[1]) > 0, cells
    for streams in (1, 32):
        row = re.search(rf"^\| `gpt_reviews` \| {streams} \|(.*)$", text, re.M)
        assert row, text
        tokens_per_s = float(row.group(1).split("|")[0])
        assert tokens_per_s > 0, row.group(0)
    # The printed table is the written one.
    assert "| `gpt_reviews` | 32 |" in r.stdout


def test_without_a_gpu_the_real_check_refuses_with_the_reason():
    if cuda_visible():
        pytest.skip("a GPU is visible here: the real check would run (minutes), not refuse")
    r = run()
    assert r.returncode == 69, (r.returncode, r.stderr)
    assert "no CUDA device is visible" in r.stderr and "--dry-run" in r.stderr, r.stderr


def test_unknown_arguments_are_refused():
    r = run("--dryrun")
    assert r.returncode == 64 and "unknown argument `--dryrun`" in r.stderr, r.stderr
