"""Every runnable example in README.md and docs/*.md, run against the real services, so an
example that no longer works fails `make test`. The markup is described in docblocks.py; the
services are started by conftest.py.

Besides running each block, these tests fail when a block is marked wrongly (no expect block,
a language or command the test cannot run, an address that is not a documented default) and
when the README's examples disappear (a count, and the calls the README must show)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import REPO_ROOT, Stack
from docblocks import SH_COMMANDS, Block, expect_problems, parse, rewrite_addresses, sh_commands

README = REPO_ROOT / "README.md"
DOCS = sorted((REPO_ROOT / "docs").glob("*.md"))
BLOCK_TIMEOUT_S = 120.0

# Fewest runnable blocks per file: a block cannot silently vanish (or lose its marker).
MIN_BLOCKS = {"README.md": 8, "API.md": 5, "CLIENTS.md": 6, "GATEWAY.md": 1, "OPERATIONS.md": 2}
# What the README's examples must call: each service once, streamed generation, the CLI.
README_MUST_CALL = (
    "marquee.vision.v1.ImageService/Classify",
    "marquee.language.v1.TextGeneration/GenerateStream",
    "marquee.recommendation.v1.Recommender/Recommend",
    "marquee classify",
    "marquee generate",
    "marquee recommend",
)


def all_blocks() -> list[Block]:
    return [b for path in [README, *DOCS] for b in parse(path)]


BLOCKS = all_blocks()
RUNNABLE = [b for b in BLOCKS if b.lang]


# --- the markup ----------------------------------------------------------------------------


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.id)
def test_block_is_well_formed(block: Block):
    problems = list(block.problems)
    if block.lang == "sh":
        unknown = [c for c in sh_commands(block.code) if c not in SH_COMMANDS]
        if unknown:
            problems.append(f"runs commands the docs test does not support: {unknown} (supported: {sorted(SH_COMMANDS)})")
    _, addresses = rewrite_addresses(block.code, {}, {})
    if addresses:
        problems.append(f"names addresses that are not documented defaults: {addresses}")
    assert not problems, f"{block.path.relative_to(REPO_ROOT)} line {block.line}:\n  " + "\n  ".join(problems)


def test_every_file_keeps_its_examples():
    counts = {path.name: sum(1 for b in BLOCKS if b.path == path and b.lang) for path in [README, *DOCS]}
    short = {name: (counts.get(name, 0), n) for name, n in MIN_BLOCKS.items() if counts.get(name, 0) < n}
    assert not short, f"runnable blocks (found, at least): {short}; all counts: {counts}"


def test_readme_shows_each_service():
    code = "".join(b.code for b in RUNNABLE if b.path == README)
    missing = [c for c in README_MUST_CALL if c not in code]
    assert not missing, f"README.md has no runnable example calling {missing}"
    assert any(b.lang == "python" for b in RUNNABLE if b.path == README), "README.md has no runnable Python example"


def test_unsupported_blocks_are_caught(tmp_path: Path):
    """The checks above do fail: a block with no expect block, an unknown language, an unknown
    command, an orphan expect block and a stray address are each reported."""
    md = tmp_path / "bad.md"
    md.write_text(
        "```sh docs-test\nmarquee health\n```\n\n"  # no expect block
        "```ruby docs-test\nputs 1\n```\n\n```text expect\n1\n```\n"
        "```sh docs-test\ncargo build && grpcurl 127.0.0.1:8000 list\n```\n\n```text expect\nx\n```\n"
        "```sh docs-test retries=3\ncurl http://127.0.0.1:7777/\n```\n\n```text expect\n…\n```\n"
        "```text expect\norphan\n```\n"
    )
    blocks = parse(md)
    assert [b.line for b in blocks] == [1, 5, 12, 19, 26]
    assert "no ```text expect" in blocks[0].problems[0]
    assert any("language `ruby`" in p for p in blocks[1].problems)
    assert not blocks[2].problems and sh_commands(blocks[2].code) == ["cargo", "grpcurl"]
    assert {"unknown info-string word `retries=3` (options: exit=N)", "its expect block checks nothing"} <= set(blocks[3].problems)
    assert rewrite_addresses(blocks[3].code, {}, {})[1] == ["127.0.0.1:7777"]
    assert "without a runnable" in blocks[4].problems[0]


def test_expect_matching():
    out = "efficientnet_lite0 (version 1)\n  0.954  espresso (967)\n  0.014  cup (968)\n"
    assert expect_problems(["efficientnet_lite0 (version 1)", "…", "0.9…  espresso (967)"], out) is None
    assert expect_problems(["0.9…espresso (967)"], out) is None
    assert expect_problems(["cup (968)", "espresso (967)"], out) is not None  # order matters
    assert expect_problems(["0.9…cup"], out) is not None  # `…` stays within one line
    assert expect_problems(["espresso (968)"], out) is not None


# --- running them ---------------------------------------------------------------------------


def run_block(block: Block, stack: Stack, tmp: Path) -> subprocess.CompletedProcess:
    code, unknown = rewrite_addresses(block.code, stack.grpc, stack.admin)
    assert not unknown, unknown
    venv_bin = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARQUEE")}
    env.update(
        PATH=os.pathsep.join([str(stack.bin_dir), str(venv_bin), env.get("PATH", "")]),
        MARQUEE_API_KEY=stack.api_key,
        MARQUEE_ENDPOINT=f"http://{stack.grpc['gateway']}",
        NO_COLOR="1",
    )
    if block.lang == "sh":
        argv = ["bash", "-euo", "pipefail", "-c", code]
    else:
        script = tmp / "example.py"
        script.write_text(code)
        argv = [sys.executable, str(script)]
    return subprocess.run(
        argv,
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=BLOCK_TIMEOUT_S,
        text=True,
    )


@pytest.mark.parametrize("block", [b for b in RUNNABLE if not b.problems], ids=lambda b: b.id)
def test_example_runs(block: Block, stack: Stack):
    with tempfile.TemporaryDirectory(prefix="marquee-docs-block-") as tmp:
        done = run_block(block, stack, Path(tmp))
    where = f"{block.path.relative_to(REPO_ROOT)} line {block.line}"
    want = int(block.options.get("exit", "0"))
    assert done.returncode == want, f"{where}: exit {done.returncode}, expected {want}\n--- output ---\n{done.stdout}"
    problem = expect_problems(block.expect or [], done.stdout)
    assert problem is None, f"{where}: {problem}\n--- output ---\n{done.stdout}"
