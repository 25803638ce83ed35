"""Runnable examples in Markdown, and how to check them.

A runnable example is a fenced code block whose info string holds `docs-test`, followed
(blank lines only between them) by a `text expect` block saying what its output must contain:

    ```sh docs-test
    marquee classify tests/fixtures/coffee.png --top-k 3
    ```

    ```text expect
    efficientnet_lite0 (version 1)
    espresso (967)
    ```

- The language is `sh` (run with `bash -euo pipefail`) or `python` (run with the venv's python),
  from the repository root, with $MARQUEE_API_KEY set to a key the gateway accepts and
  $MARQUEE_ENDPOINT to the gateway. The one option is `exit=N`: the status the block must end
  with (default 0).
- Addresses are written as the documented defaults (`make run`'s): gateway 127.0.0.1:8000
  (admin 9000), vision 8001 (9001), language 8002 (9002), recommendation 8003 (9003). The test
  replaces them with where the services really listen; any other 127.0.0.1/localhost port is
  an error.
- Each non-blank line of the expect block must occur in the output (stdout and stderr
  together), in order, each on one output line. `…` inside a line matches anything on that
  line (`0.9…  espresso`); a line that is only `…` just marks lines left out. Runs of spaces
  match runs of spaces. Leading and trailing spaces are ignored.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

MARKER = "docs-test"
EXPECT_INFO = "text expect"
LANGUAGES = ("sh", "python")
OPTIONS = ("exit",)

# Documented default address (port) -> (service, listener).
DEFAULT_PORTS = {
    8000: ("gateway", "grpc"),
    9000: ("gateway", "admin"),
    8001: ("vision", "grpc"),
    9001: ("vision", "admin"),
    8002: ("language", "grpc"),
    9002: ("language", "admin"),
    8003: ("recommendation", "grpc"),
    9003: ("recommendation", "admin"),
}
ADDRESS_RE = re.compile(r"\b(?:127\.0\.0\.1|localhost|0\.0\.0\.0):(\d+)\b")

# Commands an `sh` block may run: what the docs teach, and shell glue. Anything else (a build,
# an install, a command the test machine lacks) does not belong in a runnable block.
SH_COMMANDS = frozenset(
    {
        "grpcurl",
        "marquee",
        "marquee-gateway",
        "curl",
        "python",
        "node",
        "printf",
        "base64",
        "sha256sum",
        "echo",
        "export",
        "cut",
        "head",
        "grep",
    }
)


@dataclass
class Block:
    path: Path  # the Markdown file
    line: int  # 1-based line of the opening fence
    lang: str
    info: str
    code: str
    options: dict[str, str] = field(default_factory=dict)
    expect: list[str] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.path.name}:{self.line}"


FENCE_RE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


def fenced_blocks(text: str) -> list[tuple[int, str, str]]:
    """(line of the opening fence, info string, body) of every fenced block, in order; a body
    keeps its lines with the fence's indentation removed."""
    lines = text.splitlines()
    out = []
    i = 0
    while i < len(lines):
        m = FENCE_RE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = len(m["indent"]), m["fence"], m["info"].strip()
        body = []
        j = i + 1
        while j < len(lines):
            close = FENCE_RE.match(lines[j])
            if close and close["fence"][0] == fence[0] and len(close["fence"]) >= len(fence) and not close["info"].strip():
                break
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        out.append((i + 1, info, "\n".join(body) + "\n", j))
        i = j + 1
    return out


def parse(path: Path) -> list[Block]:
    """Every runnable block of one Markdown file, each with its expect lines and the problems
    found in its markup (a missing expect block, an unknown language or option, an orphan
    expect block)."""
    text = path.read_text()
    lines = text.splitlines()
    blocks: list[Block] = []
    found = fenced_blocks(text)
    consumed: set[int] = set()
    for k, (line, info, body, end) in enumerate(found):
        words = info.split()
        if MARKER not in words:
            continue
        lang = words[0] if words else ""
        options = {}
        block = Block(path=path, line=line, lang=lang, info=info, code=body)
        for w in words[1:]:
            if w == MARKER:
                continue
            name, eq, value = w.partition("=")
            if not eq or name not in OPTIONS:
                block.problems.append(f"unknown info-string word `{w}` (options: {', '.join(o + '=N' for o in OPTIONS)})")
            else:
                options[name] = value
        if "exit" in options and not options["exit"].isdigit():
            block.problems.append(f"`exit=` wants a number, got `{options['exit']}`")
        block.options = options
        if lang not in LANGUAGES:
            block.problems.append(f"language `{lang}` cannot be run (runnable: {', '.join(LANGUAGES)})")
        nxt = found[k + 1] if k + 1 < len(found) else None
        between = lines[end + 1 : nxt[0] - 1] if nxt else []
        if nxt and nxt[1] == EXPECT_INFO and all(not s.strip() for s in between):
            block.expect = [s.strip() for s in nxt[2].splitlines() if s.strip()]
            consumed.add(nxt[0])
            if not [s for s in block.expect if s != "…"]:
                block.problems.append("its expect block checks nothing")
        else:
            block.problems.append(f"no ```{EXPECT_INFO} block right after it: a runnable example must say what its output contains")
        blocks.append(block)
    # An expect block that belongs to no runnable block is a marker gone wrong.
    for line, info, _, _ in found:
        if info == EXPECT_INFO and line not in consumed:
            orphan = Block(path=path, line=line, lang="", info=info, code="")
            orphan.problems.append(f"```{EXPECT_INFO} block without a runnable (`{MARKER}`) block right before it")
            blocks.append(orphan)
    return blocks


def sh_commands(code: str) -> list[str]:
    """The command names an sh block runs: the first word of every simple command, including
    those inside `$( … )`. Variable assignments before a command are skipped."""
    src = re.sub(r"\\\n", " ", code)
    names = list(re.findall(r"\$\(\s*([^\s)]+)", src))
    for raw_line in src.splitlines():
        lexer = shlex.shlex(raw_line, posix=True, punctuation_chars=";&|()<>")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        try:
            tokens = list(lexer)
        except ValueError as e:
            names.append(f"<unparsable line: {e}: {raw_line}>")
            continue
        at_start, redirect = True, False
        for tok in tokens:
            if tok in (";", "&&", "||", "|", "&", "(", ")", "|&"):
                at_start, redirect = True, False
            elif tok in ("<", ">", ">>", "<<", "<<<", "2>", "&>", ">&"):
                redirect = True
            elif redirect:
                redirect = False
            elif at_start:
                if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tok):
                    names.append(tok)
                    at_start = False
    return names


def rewrite_addresses(code: str, grpc: dict[str, str], admin: dict[str, str]) -> tuple[str, list[str]]:
    """The block with every documented default address replaced by the real one, and the
    addresses it names that are not documented defaults."""
    unknown = []

    def sub(m: re.Match) -> str:
        port = int(m.group(1))
        if port not in DEFAULT_PORTS or not m.group(0).startswith("127.0.0.1:"):
            unknown.append(m.group(0))
            return m.group(0)
        service, listener = DEFAULT_PORTS[port]
        return (grpc if listener == "grpc" else admin).get(service, m.group(0))

    return ADDRESS_RE.sub(sub, code), unknown


def expect_problems(expect: list[str], output: str) -> str | None:
    """None when every expect line occurs in `output` in order; else what did not."""
    pos = 0
    for i, want in enumerate(expect):
        if want == "…":
            continue
        parts = [re.sub(r" +", lambda _: " +", re.escape(p).replace("\\ ", " ")) for p in want.split("…")]
        pattern = re.compile("[^\n]*?".join(parts))
        m = pattern.search(output, pos)
        if not m:
            return f"expect line {i + 1} `{want}` not found in the output after offset {pos}"
        pos = m.end()
    return None
