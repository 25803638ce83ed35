#!/usr/bin/env python3
"""Marquee's language service against Hugging Face transformers, same weights, same run.

The issue's target: Marquee >= 1.5x transformers' tokens/s at 16 concurrent requests, and never
below it at 1. Both systems serve the same GPT-2-small-shaped model (124M parameters, random
weights from a fixed seed, GPT-2's real tokenizer) to the same deterministic workload:

* **Marquee**: the `marquee-language` binary (default target/release) on ephemeral ports, the
  model exported with models/export_causal_lm.py (2 intra-op threads), continuous batching. N
  closed-loop clients (python grpc, one thread each, one shared channel) each send their next
  `GenerateStream` call as soon as the previous one has finished.
* **transformers**: `GPT2LMHeadModel.from_pretrained` on the same checkpoint (float32, eval,
  `torch.inference_mode`, `torch.set_num_threads(2)`), its own KV cache (`use_cache=True`) and
  STATIC batching, which is what `generate` offers: requests are taken in arrival order in
  groups of N (N = concurrency), left-padded into one batch and run with
  `generate(do_sample=False, max_new_tokens=<max of the group>)`. A `StoppingCriteria` that
  never stops stamps the time of every step (it runs once per step, right after the step's
  tokens are chosen), giving each row's token times as if the batch were streamed.

Decoding is greedy on both sides and EOS is suppressed until a request's own max_new_tokens
(`min_new_tokens` on both sides; `--allow-eos` turns that off), so both generate exactly the
same number of useful tokens; only tokens actually generated are counted anyway (a row of a
static batch counts up to its own max_new_tokens or its EOS, never the padding steps). With the
same weights and greedy decoding the outputs should mostly agree token for token; the share of
identical completions is reported as a sanity check (float rounding differs between batch
shapes, so a near-tie can flip a token and the rest of that completion).

Figures per concurrency level: tokens/s = generated tokens / wall time of the level; TTFT
(arrival -> first token) and inter-token gaps p50/p99. Marquee's inter-token gap is the gap
between stream messages divided by the tokens the message carries. For transformers, a
request's arrival is when its client finished its previous request (closed loop with
streaming); with static batching it then waits for the rest of the group to finish before its
own group starts, and that wait counts in its TTFT. transformers is not given any cost for
being a server (no RPC, no serialisation): it is measured in-process.

The systems never run simultaneously: the server stays up but idle while transformers runs
(its CPU time over that phase is reported), and the order alternates per repetition
(`--runs`, default 3). Reported: medians of the runs and the median of the same-run ratios.

The model (built once, reused): $MARQUEE_CACHE (default ~/.cache/marquee)/bench/gpt2-small-random
(save_pretrained + GPT-2's tokenizer files from models/gpt2_tokenizer.py), exported into
.../bench/repo-gpt2-small-random-ctxC-tT/gpt2_small_random. `--tiny` uses a 2-layer, 64-wide
model of the same vocabulary for development and smoke runs.

Model-only mode (`--model-dir DIR [--name NAME]`, no transformers): measures an already-built
Marquee model (e.g. the textgenrnn character model) at 1 and 16 streams with sampling
(temperature 0.5, fixed seeds; greedy character RNNs loop), reporting characters/s
(len of the generated text / wall) and tokens/s.

    python bench/lm_vs_transformers.py --markdown --json /tmp/lm.json          # the real run
    python bench/lm_vs_transformers.py --tiny --runs 1 --requests 4 \\
        --bin-dir target/debug --markdown                                         # smoke
    python bench/lm_vs_transformers.py --model-dir ~/.cache/marquee/model-repository/textgenrnn --markdown

Progress goes to stderr; `--markdown` prints the section for bench/RESULTS.md on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.resources
import json
import math
import os
import platform
import random
import re
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Language generation vs transformers"
CHAR_SECTION = "## Language generation, model only"

GPT2_VOCAB = 50257
GPT2_EOS = 50256
SHAPES = {
    # GPT-2 small: 124,439,808 parameters (tied output layer).
    "small": dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024),
    # Development / smoke: the same vocabulary and tokenizer, ~3.3M parameters (mostly the
    # embedding table).
    "tiny": dict(n_layer=2, n_embd=64, n_head=2, n_positions=512),
}

STARTUP_TIMEOUT_S = 600.0
SHUTDOWN_TIMEOUT_S = 30.0
LISTEN_RE = re.compile(r"^marquee-\w+ listening grpc=(?P<grpc>\S+:\d+) admin=(?P<admin>\S+:\d+)$")

# Model-only mode: plain lower-case English, so a character model's vocabulary covers it.
CHAR_PROMPTS = [
    "the weather today is",
    "i think that the best way to",
    "once upon a time there was a",
    "my favourite thing about the city is",
    "we went to the market and bought",
    "the meeting was moved to",
    "she said that she would never",
    "in the morning the river",
    "he opened the door and saw",
    "the new phone has a",
    "after dinner we talked about",
    "this is the story of",
]


def log(msg: str) -> None:
    print(f"[lm-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------- stats ---


def percentile(sorted_values: list[float], p: float) -> float:
    """As marquee-bench: the element at round((n-1)·p) of the sorted values."""
    if not sorted_values:
        return float("nan")
    return sorted_values[int(math.floor((len(sorted_values) - 1) * p + 0.5))]


def median(values: list[float]) -> float:
    return percentile(sorted(values), 0.5)


# ----------------------------------------------------------------------------- model build ---


def cache_root() -> Path:
    """The Marquee cache, as scripts/bootstrap.sh computes it (one definition, the tokenizer's)."""
    sys.path.insert(0, str(REPO_ROOT / "models"))
    from gpt2_tokenizer import cache_dir

    return cache_dir()


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "missing"


def run_checked(cmd: list[str], what: str) -> None:
    log(f"{what}: {' '.join(map(str, cmd))}")
    t0 = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO_ROOT, stdout=sys.stderr, stderr=sys.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}")
    log(f"{what}: done in {time.perf_counter() - t0:.1f} s")


def ensure_checkpoint(shape: str, seed: int, rebuild: bool) -> Path:
    """The random-weight GPT-2 checkpoint (save_pretrained + GPT-2 tokenizer files), built once."""
    out = cache_root() / "bench" / f"gpt2-{shape}-random"
    stamp = {"shape": SHAPES[shape], "seed": seed, "vocab": GPT2_VOCAB}
    stamp_path = out / "bench-stamp.json"
    if not rebuild and stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        log(f"checkpoint: reusing {out}")
        return out
    tok_script = REPO_ROOT / "models" / "gpt2_tokenizer.py"
    if not tok_script.is_file():
        raise SystemExit(f"{tok_script} does not exist yet: it writes GPT-2's tokenizer files")
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    run_checked([sys.executable, tok_script, "--out", tmp], "GPT-2 tokenizer files")
    if not (tmp / "tokenizer.json").is_file() and not (tmp / "vocab.json").is_file():
        raise SystemExit(f"models/gpt2_tokenizer.py wrote neither tokenizer.json nor vocab.json in {tmp}")
    log(f"checkpoint: building a random GPT-2 ({shape}: {SHAPES[shape]}, seed {seed}) in {out}")
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=GPT2_VOCAB, bos_token_id=GPT2_EOS, eos_token_id=GPT2_EOS, **SHAPES[shape])
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp)
    params = sum(p.numel() for p in model.parameters())
    log(f"checkpoint: {params:,} parameters")
    stamp_path_tmp = tmp / "bench-stamp.json"
    stamp_path_tmp.write_text(json.dumps(stamp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def ensure_export(ckpt: Path, shape: str, threads: int, context: int | None, rebuild: bool) -> tuple[Path, str]:
    """The checkpoint exported as a Marquee model repository; redone when the checkpoint, the
    exporter or the options change."""
    exporter = REPO_ROOT / "models" / "export_causal_lm.py"
    if not exporter.is_file():
        raise SystemExit(f"{exporter} does not exist yet: it exports the checkpoint for Marquee")
    name = f"gpt2_{shape}_random"
    ctx = context or SHAPES[shape]["n_positions"]
    repo = cache_root() / "bench" / f"repo-gpt2-{shape}-random-ctx{ctx}-t{threads}"
    stamp = {
        "checkpoint": (ckpt / "bench-stamp.json").read_text(),
        "exporter": file_sha(exporter),
        "threads": threads,
        "context": context,
    }
    stamp_path = repo / "bench-stamp.json"
    if (not rebuild and stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp
            and (repo / name / "model.toml").is_file()):
        log(f"export: reusing {repo / name}")
        return repo, name
    tmp = repo.with_name(repo.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cmd = [sys.executable, exporter, ckpt, "--out", tmp, "--name", name, "--threads", str(threads)]
    if context:
        cmd += ["--context", str(context)]
    run_checked(cmd, "export")
    if not (tmp / name / "model.toml").is_file():
        raise SystemExit(f"the exporter wrote no {tmp / name / 'model.toml'}")
    (tmp / "bench-stamp.json").write_text(json.dumps(stamp))
    shutil.rmtree(repo, ignore_errors=True)
    tmp.rename(repo)
    return repo, name


@dataclass
class ModelSpec:
    name: str
    repo: Path  # the repository the server is pointed at
    model_dir: Path
    version: int
    toml: dict
    tokenizer_path: Path

    @property
    def lang(self) -> dict:
        return self.toml["language"]

    @property
    def bos(self) -> int | None:
        """The token the service puts before every prompt (`prepend_bos`, default true), or None."""
        if not self.lang.get("prepend_bos", True):
            return None
        return int(self.lang["bos_token_id"])


def read_spec(repo: Path, name: str) -> ModelSpec:
    model_dir = repo / name
    spec = tomllib.loads((model_dir / "model.toml").read_text())
    versions = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    if not versions:
        raise SystemExit(f"no numeric version directory in {model_dir}")
    version = max(versions)
    tok = model_dir / str(version) / spec["language"].get("tokenizer", "tokenizer.json")
    return ModelSpec(name, repo, model_dir, version, spec, tok)


# -------------------------------------------------------------------------------- workload ---


@dataclass
class Request:
    index: int
    prompt: str
    prompt_ids: list[int]  # without BOS, as our tokenizer encodes it
    max_new_tokens: int
    seed: int


def word_tokens(tokenizer) -> list[str]:
    """Vocabulary entries that are one space + 2-8 lower-case letters: a prompt made of them
    re-encodes to (almost always) exactly those tokens."""
    vocab = tokenizer.get_vocab()
    words = sorted(t for t in vocab if re.fullmatch(r"\u0120[a-z]{2,8}", t))
    if len(words) < 100:  # not a GPT-2-like byte-level vocabulary
        raise SystemExit(f"the tokenizer has only {len(words)} space-prefixed word tokens")
    return words


def lm_workload(tokenizer, n: int, seed: int, prompt_range: tuple[int, int], new_range: tuple[int, int],
                context: int, extra: int) -> list[Request]:
    """`n` deterministic requests: prompts of uniformly drawn token length (re-encoded: the real
    length can differ by a token or two) and max_new_tokens, fitting the context with the
    `extra` (BOS) tokens the service adds."""
    rng = random.Random(seed)
    words = word_tokens(tokenizer)
    out = []
    for i in range(n):
        length = rng.randint(*prompt_range)
        new = rng.randint(*new_range)
        text = "".join(" " + rng.choice(words)[1:] for _ in range(length))
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        room = context - extra - len(ids)
        if room < 1:
            raise SystemExit(f"prompt of {len(ids)} tokens does not fit context {context}")
        out.append(Request(i, text, ids, min(new, room), seed * 1_000_003 + i))
    return out


def char_workload(tokenizer, n: int, seed: int, new_range: tuple[int, int], context: int,
                  extra: int) -> list[Request]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = CHAR_PROMPTS[rng.randrange(len(CHAR_PROMPTS))]
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        new = min(rng.randint(*new_range), context - extra - len(ids))
        if new < 1:
            raise SystemExit(f"prompt {text!r} ({len(ids)} tokens) leaves no room in context {context}")
        out.append(Request(i, text, ids, new, seed * 1_000_003 + i))
    return out


# ------------------------------------------------------------------------------ the server ---


def proto_stubs():
    """language_pb2 and language_pb2_grpc, generated by grpcio-tools into a temp folder."""
    from grpc_tools import protoc

    out = Path(tempfile.mkdtemp(prefix="marquee-lm-bench-pb-"))
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    rc = protoc.main([
        "protoc", f"-I{REPO_ROOT / 'proto'}", f"-I{well_known}", f"--python_out={out}",
        f"--grpc_python_out={out}", "marquee/language/v1/language.proto",
    ])
    if rc != 0:
        raise SystemExit("protoc failed on proto/marquee/language/v1/language.proto")
    sys.path.insert(0, str(out))
    pb2 = importlib.import_module("marquee.language.v1.language_pb2")
    pb2_grpc = importlib.import_module("marquee.language.v1.language_pb2_grpc")
    return pb2, pb2_grpc


def proc_status_kib(pid: int, key: str) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return float("nan")


def self_cpu_seconds() -> float:
    """This process's user + system CPU seconds (the grpc clients, while Marquee runs)."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has used (from /proc/stat: all but idle and
    iowait), summed over the cores."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return float("nan")
    busy = sum(fields[:8]) - fields[3] - fields[4]  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """`marquee-language` on ephemeral ports, found through its `listening` line."""

    def __init__(self, binary: Path, env_overrides: dict[str, str]):
        if not binary.is_file():
            raise SystemExit(f"binary not found: {binary} (build it, or pass --bin-dir)")
        self.log_path = Path(tempfile.mkdtemp(prefix="marquee-lm-bench-")) / "marquee-language.stderr.log"
        env = dict(os.environ)
        env.update({
            "MARQUEE__SERVER__GRPC_ADDR": "127.0.0.1:0",
            "MARQUEE__SERVER__ADMIN_ADDR": "127.0.0.1:0",
            "NO_COLOR": "1",
            **env_overrides,
        })
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen([str(binary)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=log_file, env=env, cwd=str(REPO_ROOT))
        try:
            m = self._read_listen_line(STARTUP_TIMEOUT_S)
        except BaseException:
            self.stop(check=False)
            raise
        self.startup_s = time.perf_counter() - t0
        self.grpc_addr, self.admin_addr = m.group("grpc"), m.group("admin")
        # Keep draining stdout so the server can never block on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()

    def _read_listen_line(self, timeout_s: float) -> re.Match:
        deadline = time.monotonic() + timeout_s
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        buf, seen = b"", []
        try:
            while time.monotonic() < deadline:
                if not sel.select(timeout=1.0):
                    if self.proc.poll() is not None:
                        break
                    continue
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    raw, buf = buf.split(b"\n", 1)
                    line = raw.decode(errors="replace").strip()
                    seen.append(line)
                    if m := LISTEN_RE.match(line):
                        return m
            else:
                raise TimeoutError(f"marquee-language printed no listening line in {timeout_s}s\n{self.log_tail()}")
        finally:
            sel.close()
        self.proc.wait(timeout=10)
        raise RuntimeError(f"marquee-language exited (code {self.proc.returncode}) before listening; "
                           f"stdout={seen!r}\nstderr tail:\n{self.log_tail()}")

    def _drain(self):
        with contextlib.suppress(Exception):
            while os.read(self.proc.stdout.fileno(), 65536):
                pass

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_mib(self) -> float:
        return proc_status_kib(self.pid, "VmRSS") / 1024

    def hwm_mib(self) -> float:
        return proc_status_kib(self.pid, "VmHWM") / 1024

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def stop(self, check: bool = True) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                if check:
                    log(f"warning: marquee-language ignored SIGTERM for {SHUTDOWN_TIMEOUT_S}s; killed")
        if check and self.proc.returncode not in (0, -signal.SIGTERM):
            log(f"warning: marquee-language exited with {self.proc.returncode}\n{self.log_tail()}")


def server_env(spec: ModelSpec, args, max_concurrency: int, max_new: int) -> dict[str, str]:
    context = int(spec.lang["context_length"])
    # At least 16 slots (the level; other settings such as max_return_sequences must
    # fit under it), more when a higher concurrency is asked for.
    batch = max(max_concurrency, 16)
    env = {
        "MARQUEE__REPOSITORY__PATH": str(spec.repo),
        "MARQUEE__REPOSITORY__POLL_INTERVAL_MS": "0",
        "MARQUEE__REPOSITORY__THREADS": str(args.threads),
        "MARQUEE__LANGUAGE__MAX_BATCH_SIZE": str(batch),
        # Every running sequence may take the whole context: the budget never holds one back.
        "MARQUEE__LANGUAGE__MAX_TOTAL_TOKENS": str(batch * context),
        "MARQUEE__LANGUAGE__MAX_PREFILL_TOKENS": str(max(2048, context)),
        "MARQUEE__LANGUAGE__OIP_MAX_TOKENS_PER_STEP": str(max(2048, context)),
        "MARQUEE__LANGUAGE__MAX_NEW_TOKENS": str(max(256, max_new)),
        "MARQUEE__LANGUAGE__QUEUE_CAPACITY": str(max(128, 2 * batch)),
    }
    for kv in args.server_env:
        key, _, value = kv.partition("=")
        env[key] = value
    return env


# ------------------------------------------------------------------------- per-request data ---


@dataclass
class Record:
    index: int
    client: int
    prompt_tokens: int  # with BOS
    max_new_tokens: int
    tokens: int = 0  # generated tokens received (EOS excluded)
    chars: int = 0
    arrival: float = 0.0  # seconds since the level's start
    ttft_ms: float = float("nan")
    itl_ms: list[float] = field(default_factory=list)
    # (ms since arrival, tokens) per message / per step
    events: list[tuple[float, int]] = field(default_factory=list)
    finish: str = ""
    token_ids: list[int] = field(default_factory=list)
    error: str = ""

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("token_ids", "itl_ms", "events")}
        d["events"] = [[round(t, 3), k] for t, k in self.events]
        d["ttft_ms"] = round(self.ttft_ms, 3) if self.ttft_ms == self.ttft_ms else None
        d["arrival"] = round(self.arrival, 6)
        return d


@dataclass
class Level:
    system: str
    concurrency: int
    wall_s: float
    records: list[Record]
    extra: dict = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.records)

    @property
    def chars(self) -> int:
        return sum(r.chars for r in self.records)

    def summary(self) -> dict:
        ok = [r for r in self.records if not r.error]
        ttft = sorted(r.ttft_ms for r in ok if r.ttft_ms == r.ttft_ms)
        itl = sorted(g for r in ok for g in r.itl_ms)
        return {
            "system": self.system,
            "concurrency": self.concurrency,
            "requests": len(ok),
            "errors": len(self.records) - len(ok),
            "tokens": self.tokens,
            "chars": self.chars,
            "wall_s": self.wall_s,
            "tokens_per_s": self.tokens / self.wall_s if self.wall_s > 0 else float("nan"),
            "chars_per_s": self.chars / self.wall_s if self.wall_s > 0 else float("nan"),
            "ttft_p50_ms": percentile(ttft, 0.5),
            "ttft_p99_ms": percentile(ttft, 0.99),
            "itl_p50_ms": percentile(itl, 0.5),
            "itl_p99_ms": percentile(itl, 0.99),
            **self.extra,
        }


# ------------------------------------------------------------------------------ marquee side ---


def marquee_level(pb2, stub, requests: list[Request], concurrency: int, sampling: dict | None,
                  no_eos: bool, budget_s: float | None, extra: int, deadline_s: float = 900.0) -> Level:
    """`concurrency` closed-loop clients, one thread each, taking `requests` in order."""
    lock = threading.Lock()
    next_i = [0]
    records: list[Record] = []
    barrier = threading.Barrier(concurrency + 1)
    start = [0.0]

    def client(c: int):
        barrier.wait()
        while True:
            with lock:
                if next_i[0] >= len(requests) or (budget_s and time.perf_counter() - start[0] >= budget_s):
                    return
                req = requests[next_i[0]]
                next_i[0] += 1
            params = pb2.GenerationParameters(max_new_tokens=req.max_new_tokens)
            if no_eos:
                params.min_new_tokens = req.max_new_tokens
            if sampling:
                params.temperature = sampling["temperature"]
                if sampling.get("top_k"):
                    params.top_k = sampling["top_k"]
                params.seed = req.seed
            rec = Record(req.index, c, len(req.prompt_ids) + extra, req.max_new_tokens)
            t0 = time.perf_counter()
            rec.arrival = t0 - start[0]
            last = None
            try:
                for msg in stub.GenerateStream(pb2.GenerateRequest(prompt=req.prompt, parameters=params),
                                               timeout=deadline_s):
                    now = time.perf_counter()
                    rec.chars += len(msg.text)
                    k = len(msg.token_ids)
                    if k:
                        rec.token_ids.extend(msg.token_ids)
                        rec.tokens += k
                        rec.events.append(((now - t0) * 1e3, k))
                        if last is None:
                            rec.ttft_ms = (now - t0) * 1e3
                        else:
                            rec.itl_ms.extend([(now - last) * 1e3 / k] * k)
                        last = now
                    if msg.HasField("summary"):
                        s = msg.summary
                        rec.finish = pb2.FinishReason.Name(s.finish_reason).removeprefix("FINISH_REASON_").lower()
                        rec.prompt_tokens = s.prompt_tokens
            except Exception as e:  # grpc.RpcError and friends: recorded, reported
                rec.error = f"{type(e).__name__}: {getattr(e, 'details', lambda: e)()}"
            with lock:
                records.append(rec)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(concurrency)]
    for t in threads:
        t.start()
    start[0] = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start[0]
    records.sort(key=lambda r: r.index)
    errors = [r for r in records if r.error]
    if errors:
        log(f"  {len(errors)} Marquee request(s) failed, e.g. {errors[0].error}")
    return Level("marquee", concurrency, wall, records)


# ------------------------------------------------------------------------- transformers side ---


class HFRunner:
    def __init__(self, ckpt: Path, tokenizer, bos: int | None, eos: int, threads: int):
        import torch
        import transformers
        from transformers import GPT2LMHeadModel, StoppingCriteria, StoppingCriteriaList

        transformers.logging.set_verbosity_error()
        torch.set_num_threads(threads)
        self.torch = torch
        self.model = GPT2LMHeadModel.from_pretrained(ckpt, dtype=torch.float32).eval()
        self.tokenizer = tokenizer
        self.bos, self.eos = bos, eos

        stamps: list[float] = []
        self.stamps = stamps

        class Stamp(StoppingCriteria):
            """Never stops; records when each step's tokens exist (called once per step)."""

            def __call__(self, input_ids, scores, **kwargs):
                stamps.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        self.criteria = StoppingCriteriaList([Stamp()])

    def generate(self, prompts: list[str], max_new: int, min_new: int):
        """One static batch: tokenise, left-pad, greedy generate, decode. Returns (new token
        rows, step stamps, texts-decoder)."""
        torch = self.torch
        head = [] if self.bos is None else [self.bos]
        ids = [head + self.tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.eos, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, width - len(x):] = torch.tensor(x)
            mask[i, width - len(x):] = 1
        self.stamps.clear()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                min_new_tokens=min_new or None, pad_token_id=self.eos, eos_token_id=self.eos,
                use_cache=True, stopping_criteria=self.criteria, num_beams=1,
                temperature=None, top_k=None, top_p=None,
            )
        return out[:, width:].tolist(), list(self.stamps), [len(x) for x in ids]


def hf_level(runner: HFRunner, requests: list[Request], concurrency: int, no_eos: bool,
             budget_s: float | None) -> Level:
    """Static batching: groups of `concurrency` requests in arrival order, each group one
    `generate` to the group's largest max_new_tokens."""
    records: list[Record] = []
    start = time.perf_counter()
    # Closed loop with streamed rows: client c's next request arrives when its previous one
    # got its last token, then waits for the whole group to finish.
    client_free = [0.0] * concurrency
    steps_run = useful_steps = 0
    for g in range(0, len(requests), concurrency):
        if budget_s and time.perf_counter() - start >= budget_s:
            break
        group = requests[g:g + concurrency]
        max_new = max(r.max_new_tokens for r in group)
        rows, stamps, lengths = runner.generate([r.prompt for r in group], max_new,
                                                max_new if no_eos else 0)
        texts = [runner.tokenizer.decode(row[:r.max_new_tokens], skip_special_tokens=False)
                 for row, r in zip(rows, group)]  # what a server would send back (timed)
        group_end = time.perf_counter()
        if len(stamps) < len(rows[0]):
            raise SystemExit(f"stopping criteria ran {len(stamps)} times for {len(rows[0])} steps")
        steps_run += len(rows[0]) * len(group)
        for c, (req, row, n_prompt) in enumerate(zip(group, rows, lengths)):
            row = row[:req.max_new_tokens]
            if runner.eos in row:
                row = row[:row.index(runner.eos)]
                finish = "eos"
            else:
                finish = "length"
            rec = Record(req.index, c, n_prompt, req.max_new_tokens, tokens=len(row), token_ids=row,
                         finish=finish)
            arrival = client_free[c]
            rec.arrival = arrival
            rel = [s - start - arrival for s in stamps[:len(row)]]
            rec.events = [(t * 1e3, 1) for t in rel]
            if row:
                rec.ttft_ms = rel[0] * 1e3
                rec.itl_ms = [(b - a) * 1e3 for a, b in zip(rel, rel[1:])]
                client_free[c] = stamps[len(row) - 1] - start
            else:
                client_free[c] = group_end - start
            rec.chars = len(texts[c])
            useful_steps += len(row)
            records.append(rec)
    wall = time.perf_counter() - start
    return Level("transformers", concurrency, wall, records,
                 extra={"padding_step_share": 1 - useful_steps / steps_run if steps_run else 0.0})


# ------------------------------------------------------------------------------------ report ---


def machine_note() -> dict:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "grpc", "tokenizers"):
        with contextlib.suppress(Exception):
            versions[mod] = importlib.import_module(mod).__version__
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                           capture_output=True, text=True).stdout.strip() != ""
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "loadavg": os.getloadavg(),
        "versions": versions,
        "commit": commit + ("-dirty" if dirty else ""),
    }


def fmt(v: float, digits: int = 1) -> str:
    if v != v:
        return "—"
    return f"{v:.{digits}f}"


def pair(a: float, b: float, digits: int = 1) -> str:
    return f"{fmt(a, digits)} / {fmt(b, digits)}"


def aggregate(runs: list[dict[str, list[Level]]], systems: list[str], levels: list[int]) -> dict:
    """Medians over the runs per system and level, plus same-run ratios."""
    agg = {}
    for c in levels:
        row = {}
        for sysname in systems:
            sums = [next(l for l in run[sysname] if l.concurrency == c).summary() for run in runs]
            keys = [k for k, v in sums[0].items() if isinstance(v, (int, float)) and k != "concurrency"]
            row[sysname] = {k: median([s[k] for s in sums]) for k in keys}
            row[sysname]["per_run_tokens_per_s"] = [s["tokens_per_s"] for s in sums]
        if "marquee" in systems and "transformers" in systems:
            ratios = [m / t for m, t in zip(row["marquee"]["per_run_tokens_per_s"],
                                            row["transformers"]["per_run_tokens_per_s"])]
            row["ratio"] = median(ratios)
            row["per_run_ratio"] = ratios
        agg[c] = row
    return agg


def agreement(runs: list[dict[str, list[Level]]], levels: list[int]) -> dict:
    """Greedy outputs, Marquee vs transformers, same request: identical share and mean share of
    the common prefix, over every level of the first run."""
    same = total = 0
    prefix = []
    for c in levels:
        m = {r.index: r for r in next(l for l in runs[0]["marquee"] if l.concurrency == c).records}
        for h in next(l for l in runs[0]["transformers"] if l.concurrency == c).records:
            if h.index not in m or m[h.index].error:
                continue
            a, b = m[h.index].token_ids, h.token_ids
            total += 1
            same += a == b
            n = 0
            while n < min(len(a), len(b)) and a[n] == b[n]:
                n += 1
            prefix.append(n / max(len(a), len(b), 1))
    return {"requests": total, "identical": same,
            "mean_common_prefix": sum(prefix) / len(prefix) if prefix else float("nan")}


def markdown_compare(res: dict) -> str:
    cfg, agg, mach = res["config"], res["aggregate"], res["machine"]
    levels = cfg["concurrency"]
    lines = [SECTION, ""]
    lines.append(
        f"`bench/lm_vs_transformers.py` at commit `{mach['commit']}`: GPT-2-{cfg['shape']}-shaped model "
        f"({cfg['params']:,} parameters, random weights, seed {cfg['seed']}; GPT-2's tokenizer), exported with "
        f"`models/export_causal_lm.py` (context {cfg['context']}, {cfg['threads']} intra-op threads). "
        f"**Marquee**: `{cfg['binary']}` (max batch {cfg['server_env'].get('MARQUEE__LANGUAGE__MAX_BATCH_SIZE')}, "
        f"other scheduler settings default), one `GenerateStream` per request from python grpc clients "
        f"(one thread each) in the same process as the bench. **transformers** {mach['versions'].get('transformers', '?')} "
        f"/ torch {mach['versions'].get('torch', '?')}: `GPT2LMHeadModel` float32, eval, inference mode, "
        f"{cfg['threads']} threads, its KV cache, static batches of N requests in arrival order, left-padded, "
        f"`generate(do_sample=False, max_new_tokens=<group max>)`, measured in-process (no RPC), rows "
        f"streamed as if by a per-step callback. Workload (seed {cfg['seed']}): prompts of "
        f"{cfg['prompt_tokens'][0]}–{cfg['prompt_tokens'][1]} words{' (+ BOS)' if cfg['prepend_bos'] else ' (no BOS, as GPT-2)'}, {cfg['new_tokens'][0]}–"
        f"{cfg['new_tokens'][1]} new tokens, greedy, "
        + ("EOS suppressed until each request's max_new_tokens on both sides (`min_new_tokens`), so "
           "both generate the same tokens; " if cfg["no_eos"] else "EOS allowed; ")
        + f"N closed-loop clients per level; requests per level: "
        + ", ".join(f"{c}: {cfg['requests_per_level'][str(c)]}" for c in levels)
        + f". Each figure is the median of {cfg['runs']} run(s), alternating which system goes first; "
        f"ratios are medians of the same-run ratios. The server stays up but idle while transformers runs."
    )
    lines.append("")
    lines.append("| concurrency | Marquee tokens/s | transformers tokens/s | ratio (per run) "
                 "| TTFT p50 / p99 ms, Marquee | TTFT p50 / p99 ms, transformers "
                 "| inter-token p50 / p99 ms, Marquee | inter-token p50 / p99 ms, transformers |")
    lines.append("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in levels:
        row = agg[str(c)]
        m, t = row["marquee"], row["transformers"]
        per = ", ".join(f"{r:.2f}" for r in row["per_run_ratio"])
        lines.append(
            f"| {c} | {m['tokens_per_s']:.1f} | {t['tokens_per_s']:.1f} | **{row['ratio']:.2f}×** ({per}) "
            f"| {pair(m['ttft_p50_ms'], m['ttft_p99_ms'])} | {pair(t['ttft_p50_ms'], t['ttft_p99_ms'])} "
            f"| {pair(m['itl_p50_ms'], m['itl_p99_ms'], 2)} | {pair(t['itl_p50_ms'], t['itl_p99_ms'], 2)} |")
    lines.append("")
    toks = ", ".join(f"c={c}: {agg[str(c)]['marquee']['tokens']:.0f} vs {agg[str(c)]['transformers']['tokens']:.0f}"
                     for c in levels)
    pad = ", ".join(f"c={c}: {agg[str(c)]['transformers'].get('padding_step_share', 0) * 100:.0f}%" for c in levels)
    lines.append(f"Generated tokens per level (Marquee vs transformers, median): {toks}. Share of transformers' "
                 f"row-steps spent past a row's own max_new_tokens (static batching's waste): {pad}.")
    cpu = "; ".join(
        f"c={c}: Marquee server {agg[str(c)]['marquee'].get('server_cpu_cores', float('nan')):.2f} + its clients "
        f"{agg[str(c)]['marquee'].get('client_cpu_cores', float('nan')):.2f}, transformers "
        f"{agg[str(c)]['transformers'].get('transformers_cpu_cores', float('nan')):.2f}"
        for c in levels)
    lines.append(f"CPU used during the levels (cores, medians): {cpu}. Other processes on the machine used up "
                 f"to {res['other_cpu_cores_max']:.2f} cores during any level (noise; ~0 on an idle machine).")
    ag = res["agreement"]
    lines.append(f"Same weights, greedy: {ag['identical']} of {ag['requests']} completions identical token for "
                 f"token (first run; mean common prefix {ag['mean_common_prefix'] * 100:.0f}%).")
    mem = res["memory"]
    lines.append(f"Resident memory after the runs: Marquee server {mem['server_rss_mib']:.0f} MiB (peak "
                 f"{mem['server_hwm_mib']:.0f} MiB; its KV cache of max batch × context is preallocated: "
                 f"{mem['kv_cache_mib']:.0f} MiB), the bench process with transformers' model "
                 f"{mem['bench_rss_mib']:.0f} MiB (peak {mem['bench_hwm_mib']:.0f} MiB, grpc clients included). "
                 f"The idle server used {res['server_idle_cpu_s']:.2f} CPU-seconds over "
                 f"{res['transformers_seconds']:.0f} s of transformers runs.")
    lines.append("")
    lines.append("| target | measured | verdict |")
    lines.append("| --- | --- | --- |")
    for c, want, label in ((16, 1.5, "≥ 1.5× transformers' tokens/s at 16 concurrent requests"),
                           (1, 1.0, "never below transformers at 1")):
        if str(c) in agg:
            r = agg[str(c)]
            verdict = "met" if r["ratio"] >= want else "**missed**"
            lines.append(f"| {label} | {r['marquee']['tokens_per_s']:.1f} vs {r['transformers']['tokens_per_s']:.1f} "
                         f"tokens/s ({r['ratio']:.2f}×; runs {', '.join(f'{x:.2f}' for x in r['per_run_ratio'])}) "
                         f"| {verdict} |")
    lines.append("")
    lines.append(machine_line(mach, res))
    lines.append("")
    return "\n".join(lines)


def machine_line(mach: dict, res: dict) -> str:
    v = mach["versions"]
    la = res.get("loadavg_before", mach["loadavg"])
    lb = res.get("loadavg_after", mach["loadavg"])
    return (f"Machine: {mach['cpu'] or 'unknown CPU'}, {mach['affinity']} cores usable; load average "
            f"{la[0]:.2f} before, {lb[0]:.2f} after; python {v.get('python')}, torch {v.get('torch')}, "
            f"transformers {v.get('transformers', '—')}, grpcio {v.get('grpc')}, tokenizers {v.get('tokenizers')}; "
            f"{res['elapsed_s'] / 60:.1f} min in all.")


def markdown_model_only(res: dict) -> str:
    cfg, agg, mach = res["config"], res["aggregate"], res["machine"]
    lines = [f"{CHAR_SECTION} (`{cfg['name']}`)", ""]
    lines.append(
        f"`bench/lm_vs_transformers.py --model-dir` at commit `{mach['commit']}`: model `{cfg['name']}` (version "
        f"{cfg['version']}, context {cfg['context']}, vocabulary {cfg['vocab_size']}), `{cfg['binary']}` with "
        f"{cfg['threads']} intra-op threads and max batch {cfg['server_env'].get('MARQUEE__LANGUAGE__MAX_BATCH_SIZE')}; "
        f"sampling at temperature {cfg['temperature']}"
        + (f", top-k {cfg['top_k']}" if cfg.get("top_k") else "")
        + f", a fixed seed per request; {cfg['new_tokens'][0]}–{cfg['new_tokens'][1]} new tokens per request; "
        f"N closed-loop python grpc clients; requests per level: "
        + ", ".join(f"{c}: {cfg['requests_per_level'][str(c)]}" for c in cfg["concurrency"])
        + f". Median of {cfg['runs']} run(s)."
    )
    lines.append("")
    lines.append("| concurrent streams | characters/s | tokens/s | requests | TTFT p50 / p99 (ms) | inter-token p50 / p99 (ms) |")
    lines.append("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in cfg["concurrency"]:
        m = agg[str(c)]["marquee"]
        lines.append(f"| {c} | {m['chars_per_s']:.0f} | {m['tokens_per_s']:.0f} | {m['requests']:.0f} "
                     f"| {pair(m['ttft_p50_ms'], m['ttft_p99_ms'])} | {pair(m['itl_p50_ms'], m['itl_p99_ms'], 2)} |")
    lines.append("")
    lines.append("CPU used during the levels (cores, medians): " + "; ".join(
        f"c={c}: server {agg[str(c)]['marquee'].get('server_cpu_cores', float('nan')):.2f}, clients "
        f"{agg[str(c)]['marquee'].get('client_cpu_cores', float('nan')):.2f}" for c in cfg["concurrency"])
        + f". Other processes on the machine used up to {res['other_cpu_cores_max']:.2f} cores during any level.")
    mem = res["memory"]
    lines.append(f"Server resident memory after the runs: {mem['server_rss_mib']:.0f} MiB (peak {mem['server_hwm_mib']:.0f} MiB).")
    lines.append("")
    lines.append(machine_line(mach, res))
    lines.append("")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- main ---


def parse_range(s: str) -> tuple[int, int]:
    a, _, b = s.partition("-")
    lo, hi = int(a), int(b or a)
    if lo < 1 or hi < lo:
        raise argparse.ArgumentTypeError(f"bad range {s!r}")
    return lo, hi


def parse_levels(s: str) -> list[int]:
    levels = [int(x) for x in s.split(",") if x.strip()]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"bad concurrency list {s!r}")
    return levels


def requests_for(args, c: int) -> int:
    if args.requests:
        return args.requests
    return max(8, 3 * c)  # c=1: 8, c=8: 24, c=16: 48 (three static groups)


def kv_cache_mib(spec: ModelSpec, batch: int) -> float:
    """K and V caches [L, batch, H, context, D] float32, as the service preallocates them (NaN
    for a model without them, e.g. a recurrent one)."""
    l = spec.lang
    try:
        return 2 * l["num_layers"] * batch * l["num_heads"] * l["context_length"] * l["head_dim"] * 4 / 2**20
    except KeyError:
        return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide GPT-2 (development, smoke runs)")
    p.add_argument("--model-dir", type=Path,
                   help="model-only mode: an already-built Marquee model (DIR with model.toml, or a "
                        "repository holding NAME/); no transformers side")
    p.add_argument("--name", help="model-only mode: the model's name (default: DIR's name)")
    p.add_argument("--bin-dir", type=Path, default=REPO_ROOT / "target" / "release",
                   help="directory holding marquee-language (default target/release)")
    p.add_argument("--concurrency", type=parse_levels, default=None,
                   help="comma-separated levels (default 1,8,16; model-only: 1,16)")
    p.add_argument("--requests", type=int, default=0,
                   help="requests per level (default max(8, 3 x concurrency))")
    p.add_argument("--level-seconds", type=float, default=None,
                   help="also stop issuing requests (Marquee) / starting groups (transformers) after this "
                        "many seconds per level; the systems may then complete different request sets")
    p.add_argument("--runs", type=int, default=3, help="repetitions, alternating order (default 3)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for both systems (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-tokens", type=parse_range, default=(8, 128), help="e.g. 8-128")
    p.add_argument("--new-tokens", type=parse_range, default=None, help="default 16-128 (model-only: 64-256)")
    p.add_argument("--context", type=int, default=None, help="export context (default the model's n_positions)")
    p.add_argument("--allow-eos", action="store_true",
                   help="do not suppress EOS before max_new_tokens (min_new_tokens)")
    p.add_argument("--temperature", type=float, default=0.5, help="model-only mode's sampling temperature")
    p.add_argument("--top-k", type=int, default=0, help="model-only mode's top-k (default off)")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for marquee-language (repeatable), e.g. "
                        "MARQUEE__LANGUAGE__DECODE_STEPS_PER_PREFILL=8")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached checkpoint and export")
    p.add_argument("--json", type=Path, help="write every raw figure here")
    p.add_argument("--markdown", action="store_true", help="print the RESULTS.md section on stdout")
    args = p.parse_args()

    began = time.perf_counter()
    loadavg_before = os.getloadavg()
    model_only = args.model_dir is not None
    levels = args.concurrency or ([1, 16] if model_only else [1, 8, 16])
    new_range = args.new_tokens or ((64, 256) if model_only else (16, 128))
    no_eos = not args.allow_eos and not model_only
    binary = (args.bin_dir / "marquee-language").resolve()
    if not binary.is_file():
        raise SystemExit(f"binary not found: {binary} (cargo build --release -p marquee-language, or --bin-dir)")

    from tokenizers import Tokenizer

    params = None
    shape = "tiny" if args.tiny else "small"
    tmp_repo = None
    if model_only:
        d = args.model_dir.resolve()
        if (d / "model.toml").is_file():
            name = args.name or d.name
            # A repository with just this model (symlinked), so no other model shares the server.
            tmp_repo = Path(tempfile.mkdtemp(prefix="marquee-lm-bench-repo-"))
            (tmp_repo / name).symlink_to(d)
            spec = read_spec(tmp_repo, name)
        elif args.name and (d / args.name / "model.toml").is_file():
            spec = read_spec(d, args.name)
        else:
            raise SystemExit(f"{d} holds no model.toml (nor {args.name or 'NAME'}/model.toml; pass --name)")
        ckpt = None
    else:
        ckpt = ensure_checkpoint(shape, args.seed, args.rebuild)
        repo, name = ensure_export(ckpt, shape, args.threads, args.context, args.rebuild)
        spec = read_spec(repo, name)
    tokenizer = Tokenizer.from_file(str(spec.tokenizer_path))
    context = int(spec.lang["context_length"])
    bos, eos = spec.bos, int(spec.lang["eos_token_id"])
    extra = 0 if bos is None else 1
    log(f"model {spec.name} v{spec.version} in {spec.repo}: context {context}, vocab {spec.lang['vocab_size']}, "
        f"BOS prepended: {bos if bos is not None else 'no'}, eos {eos}")

    n_max = max(requests_for(args, c) for c in levels)
    if model_only:
        workload = char_workload(tokenizer, n_max, args.seed, new_range, context, extra)
    else:
        workload = lm_workload(tokenizer, n_max, args.seed, args.prompt_tokens, new_range, context, extra)
    max_new = max(r.max_new_tokens for r in workload)
    per_level = {c: workload[:requests_for(args, c)] for c in levels}
    for c, w in per_level.items():
        if len(w) < c:
            log(f"warning: {len(w)} requests at concurrency {c}: only {len(w)} clients are ever busy")
    log("workload: " + ", ".join(
        f"c={c}: {len(w)} requests, {sum(r.max_new_tokens for r in w)} tokens asked, prompts "
        f"{min(len(r.prompt_ids) for r in w)}-{max(len(r.prompt_ids) for r in w)} tokens"
        for c, w in per_level.items()))

    import grpc

    pb2, pb2_grpc = proto_stubs()
    env = server_env(spec, args, max(levels), max_new)
    log(f"starting {binary} ({', '.join(f'{k}={v}' for k, v in env.items() if 'LANGUAGE' in k or 'THREADS' in k)})")
    server = Server(binary, env)
    log(f"server pid {server.pid} listening on {server.grpc_addr} after {server.startup_s:.1f} s; "
        f"RSS {server.rss_mib():.0f} MiB")
    channel = grpc.insecure_channel(server.grpc_addr)
    stub = pb2_grpc.TextGenerationStub(channel)
    sampling = {"temperature": args.temperature, "top_k": args.top_k} if model_only else None

    hf = None
    if not model_only:
        log(f"transformers: loading {ckpt}")
        hf = HFRunner(ckpt, tokenizer, bos, eos, args.threads)
        params = sum(p.numel() for p in hf.model.parameters())

    # Warm-up (untimed), both systems at every level's batch size: the allocators, the
    # connections, and TorchScript's profiling executor, which optimises a method for the
    # shapes of its first calls.
    t0 = time.perf_counter()
    for c in levels:
        warm = [Request(-1, r.prompt, r.prompt_ids, min(4, r.max_new_tokens), r.seed) for r in workload[:c]]
        marquee_level(pb2, stub, warm, c, sampling, no_eos, None, extra)
        if hf:
            hf.generate([r.prompt for r in warm], 4, 4)
    log(f"warm-up: {time.perf_counter() - t0:.1f} s")

    systems = ["marquee"] if model_only else ["marquee", "transformers"]
    runs: list[dict[str, list[Level]]] = []
    idle_cpu = 0.0
    hf_seconds = 0.0
    for run in range(args.runs):
        order = systems if run % 2 == 0 else systems[::-1]
        result: dict[str, list[Level]] = {}
        for sysname in order:
            result[sysname] = []
            for c in levels:
                reqs = per_level[c]
                if sysname == "marquee":
                    cpu0, self0, all0 = server.cpu_seconds(), self_cpu_seconds(), machine_busy_seconds()
                    lvl = marquee_level(pb2, stub, reqs, c, sampling, no_eos, args.level_seconds, extra)
                    server_cpu, self_cpu = server.cpu_seconds() - cpu0, self_cpu_seconds() - self0
                    lvl.extra["server_cpu_cores"] = server_cpu / lvl.wall_s
                    lvl.extra["client_cpu_cores"] = self_cpu / lvl.wall_s
                else:
                    cpu0, self0, all0 = server.cpu_seconds(), self_cpu_seconds(), machine_busy_seconds()
                    lvl = hf_level(hf, reqs, c, no_eos, args.level_seconds)
                    server_cpu, self_cpu = server.cpu_seconds() - cpu0, self_cpu_seconds() - self0
                    idle_cpu += server_cpu
                    hf_seconds += lvl.wall_s
                    lvl.extra["transformers_cpu_cores"] = self_cpu / lvl.wall_s
                # Cores busy with anything but the server and this process: noise from elsewhere.
                lvl.extra["other_cpu_cores"] = max(
                    0.0, (machine_busy_seconds() - all0 - server_cpu - self_cpu) / lvl.wall_s)
                s = lvl.summary()
                log(f"run {run + 1}/{args.runs} {sysname:>12} c={c:<3} {s['tokens']:>6} tokens in {s['wall_s']:7.2f} s "
                    f"= {s['tokens_per_s']:8.1f} tok/s ({s['chars_per_s']:.0f} chars/s); TTFT p50 {s['ttft_p50_ms']:.1f} "
                    f"p99 {s['ttft_p99_ms']:.1f} ms; ITL p50 {s['itl_p50_ms']:.2f} p99 {s['itl_p99_ms']:.2f} ms"
                    + f"; other processes {s['other_cpu_cores']:.2f} cores"
                    + (f"; {s['errors']} errors" if s["errors"] else ""))
                result[sysname].append(lvl)
        runs.append(result)

    memory = {
        "server_rss_mib": server.rss_mib(),
        "server_hwm_mib": server.hwm_mib(),
        "kv_cache_mib": kv_cache_mib(spec, int(env["MARQUEE__LANGUAGE__MAX_BATCH_SIZE"])),
        "bench_rss_mib": proc_status_kib(os.getpid(), "VmRSS") / 1024,
        "bench_hwm_mib": proc_status_kib(os.getpid(), "VmHWM") / 1024,
    }
    channel.close()
    server.stop()
    if tmp_repo:
        shutil.rmtree(tmp_repo, ignore_errors=True)

    agg = aggregate(runs, systems, levels)
    res = {
        "config": {
            "mode": "model-only" if model_only else "compare",
            "shape": None if model_only else shape,
            "params": params,
            "name": spec.name,
            "version": spec.version,
            "context": context,
            "vocab_size": spec.lang["vocab_size"],
            "prepend_bos": bos is not None,
            "seed": args.seed,
            "threads": args.threads,
            "runs": args.runs,
            "concurrency": levels,
            "requests_per_level": {str(c): len(per_level[c]) for c in levels},
            "level_seconds": args.level_seconds,
            "prompt_tokens": list(args.prompt_tokens),
            "new_tokens": list(new_range),
            "no_eos": no_eos,
            "temperature": args.temperature if model_only else None,
            "top_k": args.top_k if model_only else None,
            "binary": os.path.relpath(binary, REPO_ROOT) if binary.is_relative_to(REPO_ROOT) else str(binary),
            "server_env": env,
            "checkpoint": str(ckpt) if ckpt else None,
            "repository": str(spec.repo),
        },
        "machine": machine_note(),
        "loadavg_before": loadavg_before,
        "loadavg_after": os.getloadavg(),
        "server_startup_s": server.startup_s,
        "memory": memory,
        "server_idle_cpu_s": idle_cpu,
        "other_cpu_cores_max": max(l.extra.get("other_cpu_cores", 0.0) for run in runs
                                   for lvls in run.values() for l in lvls),
        "transformers_seconds": hf_seconds,
        "aggregate": {str(c): v for c, v in agg.items()},
        "agreement": None if model_only else agreement(runs, levels),
        "runs": [{sysname: [{"summary": l.summary(), "records": [r.to_json() for r in l.records]}
                            for l in lvls] for sysname, lvls in run.items()} for run in runs],
        "elapsed_s": time.perf_counter() - began,
    }
    if res["agreement"]:
        a = res["agreement"]
        log(f"agreement: {a['identical']}/{a['requests']} completions identical; mean common prefix "
            f"{a['mean_common_prefix'] * 100:.0f}%")
    for c in levels:
        row = agg[c]
        msg = f"median c={c}: Marquee {row['marquee']['tokens_per_s']:.1f} tok/s"
        if "ratio" in row:
            msg += f", transformers {row['transformers']['tokens_per_s']:.1f} tok/s, ratio {row['ratio']:.2f}x"
        log(msg)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=float))
        log(f"wrote {args.json}")
    if args.markdown:
        print(markdown_model_only(res) if model_only else markdown_compare(res))


if __name__ == "__main__":
    main()
