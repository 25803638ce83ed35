"""Hugging Face checkpoints exported with models/export_causal_lm.py and served by
`marquee-language` generate exactly what transformers generates.

A random-initialised GPT-2 (GPT-2's real tokenizer, no BOS) and a random Llama (grouped-query
attention, llama3 RoPE scaling, a SentencePiece-style byte-fallback tokenizer that adds <s>) are
saved with `save_pretrained`, exported as a user would (the script, in a subprocess) into one
repository, and served together. Greedy generation over gRPC, unary and streamed, alone and
concurrently, must equal `model.generate(..., do_sample=False)` token for token, and the text
must be what the tokenizer decodes. The exporter must refuse what it cannot export."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_checkpoints
from marquee_servers import REPO_ROOT, Server, serve_language

torch.set_num_threads(1)

EXPORT = REPO_ROOT / "models" / "export_causal_lm.py"
MAX_NEW_TOKENS = 24
RPC_TIMEOUT_S = 120
MODELS = ("gpt2_tiny", "llama_tiny")
# Plain text only: a special token's literal text is encoded as plain text by the service but
# as the special id by transformers.
PROMPTS = [
    "Hello world",
    "The quick brown fox jumps over",
    "Café crème — ünïcode ✓",
    "  leading and trailing spaces  ",
    "def main():\n    print(",
    "Once upon a time, in 1999, there were 3 small",
]


def export(src: Path, repo: Path, name: str, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.Popen(
        [sys.executable, str(EXPORT), str(src), "--out", str(repo), "--name", name, "--threads", "1", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO_ROOT),
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{name: (transformers model, tokenizer, checkpoint dir)} and the exported repository."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("hf")
    made = {
        "gpt2_tiny": hf_checkpoints.make_gpt2(root / "gpt2"),
        "llama_tiny": hf_checkpoints.make_llama(root / "llama"),
    }
    repo = root / "repository"
    procs = {name: export(root / name.split("_")[0], repo, name) for name in MODELS}
    results = {name: finish(proc) for name, proc in procs.items()}
    for name, result in results.items():
        assert result.returncode == 0, f"export of {name} failed:\n{result.stderr}"
    return {
        "models": {name: (model, tok, root / name.split("_")[0]) for name, (model, tok) in made.items()},
        "repo": repo,
        "export_logs": {name: r.stderr for name, r in results.items()},
        "root": root,
    }


@pytest.fixture(scope="module")
def language(checkpoints) -> Server:
    with serve_language(checkpoints["repo"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def expected(checkpoints):
    """{(model, prompt): (prompt ids, generated ids without EOS, ended with EOS)} from
    transformers' own greedy generate."""
    out = {}
    for name, (model, tok, _) in checkpoints["models"].items():
        eos = model.generation_config.eos_token_id
        for prompt in PROMPTS:
            ids = tok(prompt)["input_ids"]
            with torch.no_grad():
                seq = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
                                     do_sample=False, max_new_tokens=MAX_NEW_TOKENS, pad_token_id=eos)
            new = seq[0, len(ids):].tolist()
            hit_eos = eos in new
            if hit_eos:
                new = new[:new.index(eos)]
            out[name, prompt] = (ids, new, hit_eos)
    return out


def expected_text(tok, prompt_ids: list[int], new: list[int]) -> str:
    """The continuation: what decoding prompt + output adds to the decoded prompt. For
    byte-level GPT-2 this is `decode(new)`; a SentencePiece decoder drops the leading space of
    a sequence's first piece, which a continuation keeps."""
    head = tok.decode(prompt_ids, skip_special_tokens=True)
    full = tok.decode(prompt_ids + new, skip_special_tokens=True)
    assert full.startswith(head), (head, full)
    return full[len(head):]


def request(pb, name: str, prompt: str):
    language_pb2, _ = pb
    return language_pb2.GenerateRequest(
        model=name, prompt=prompt,
        parameters=language_pb2.GenerationParameters(max_new_tokens=MAX_NEW_TOKENS))


def streamed(stub, req) -> tuple[str, list[int], object]:
    text, ids, summary = "", [], None
    for message in stub.GenerateStream(req, timeout=RPC_TIMEOUT_S):
        assert summary is None, "a message after the summary"
        text += message.text
        ids += list(message.token_ids)
        if message.HasField("summary"):
            summary = message.summary
    assert summary is not None, "the stream ended without a summary"
    return text, ids, summary


def check_against_transformers(pb, checkpoints, expected, name, prompt, text, ids, summary):
    language_pb2, _ = pb
    _, tok, _ = checkpoints["models"][name]
    prompt_ids, new, hit_eos = expected[name, prompt]
    assert ids == new, f"{name} {prompt!r}: served {ids}, transformers generated {new}"
    reason = language_pb2.FINISH_REASON_EOS if hit_eos else language_pb2.FINISH_REASON_LENGTH
    assert summary.finish_reason == reason, (name, prompt, summary)
    assert summary.generated_tokens == len(new) + hit_eos
    # The BOS rule: the service's prompt is exactly transformers' input_ids.
    assert summary.prompt_tokens == len(prompt_ids), (name, prompt, summary.prompt_tokens, prompt_ids)
    want = expected_text(tok, prompt_ids, new)
    assert text == want, (f"{name} {prompt!r}: served text {text!r}, transformers decodes {want!r} "
                          f"(pieces {tok.convert_ids_to_tokens(new)})")
    plain = tok.decode(new, skip_special_tokens=True)
    assert plain == (text[1:] if name == "llama_tiny" and text.startswith(" ") else text), (name, prompt)


def test_exports_check_themselves_against_transformers(checkpoints):
    for name, log in checkpoints["export_logs"].items():
        assert "self-check passed" in log, log
        for check in ("prefill of 6 right-padded prompts", "20 cached decode steps", "forward of a"):
            assert check in log, f"{name}: no {check!r} line in\n{log}"


def test_model_toml_states_bos_and_kv_heads(checkpoints):
    import tomllib

    repo = checkpoints["repo"]
    gpt2 = tomllib.loads((repo / "gpt2_tiny" / "model.toml").read_text())
    llama = tomllib.loads((repo / "llama_tiny" / "model.toml").read_text())
    assert gpt2["language"] == {
        "tokenizer": "tokenizer.json", "context_length": 256, "vocab_size": 50257, "eos_token_id": 50256,
        "bos_token_id": 50256, "prepend_bos": False, "num_layers": 2, "num_heads": 4, "head_dim": 16}
    assert llama["language"]["prepend_bos"] is True
    assert (llama["language"]["bos_token_id"], llama["language"]["eos_token_id"]) == (1, 2)
    assert (llama["language"]["num_heads"], llama["language"]["head_dim"]) == (2, 16), "KV heads, not query heads"
    assert llama["instance"] == {"threads": 1, "device": "cpu"}
    for name in MODELS:
        tokenizer = json.loads((repo / name / "1" / "tokenizer.json").read_text())
        assert tokenizer["post_processor"] is None, name
    # The checkpoint's own tokenizer adds <s> through its post-processor; the export moved it
    # into prepend_bos.
    source = json.loads((checkpoints["models"]["llama_tiny"][2] / "tokenizer.json").read_text())
    assert source["post_processor"]["type"] == "TemplateProcessing"
    assert sorted(p.name for p in repo.iterdir()) == list(MODELS), "no staging directories left"


@pytest.mark.parametrize("name", MODELS)
def test_greedy_generation_equals_transformers(pb, stub, checkpoints, expected, name):
    for prompt in PROMPTS:
        req = request(pb, name, prompt)
        unary = stub.Generate(req, timeout=RPC_TIMEOUT_S)
        assert unary.model == name
        check_against_transformers(pb, checkpoints, expected, name, prompt,
                                   unary.text, list(unary.token_ids), unary.summary)
        text, ids, summary = streamed(stub, req)
        check_against_transformers(pb, checkpoints, expected, name, prompt, text, ids, summary)


def test_concurrent_streams_equal_transformers(pb, stub, checkpoints, expected):
    """Every prompt of both models at once: batched prefill and decode of rows of different
    lengths, two models side by side, still give each request transformers' tokens."""
    jobs = [(name, prompt) for name in MODELS for prompt in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {job: pool.submit(streamed, stub, request(pb, *job)) for job in jobs}
        results = {job: f.result(timeout=RPC_TIMEOUT_S) for job, f in futures.items()}
    for (name, prompt), (text, ids, summary) in results.items():
        check_against_transformers(pb, checkpoints, expected, name, prompt, text, ids, summary)


def test_tokenize_matches_the_tokenizers(pb, stub, checkpoints):
    language_pb2, _ = pb
    hello = stub.Tokenize(language_pb2.TokenizeRequest(model="gpt2_tiny", text="Hello world"), timeout=60)
    assert [t.id for t in hello.tokens] == [15496, 995]
    assert [(t.text, t.start, t.end) for t in hello.tokens] == [("Hello", 0, 5), (" world", 5, 11)]
    for name, (_, tok, _) in checkpoints["models"].items():
        for prompt in PROMPTS:
            reply = stub.Tokenize(language_pb2.TokenizeRequest(model=name, text=prompt), timeout=60)
            assert [t.id for t in reply.tokens] == tok(prompt, add_special_tokens=False)["input_ids"], (name, prompt)


def test_export_refuses_an_unsupported_architecture(checkpoints):
    src = checkpoints["root"] / "bert"
    hf_checkpoints.make_bert(src)
    repo = checkpoints["root"] / "refused"
    result = finish(export(src, repo, "bert"))
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("export_causal_lm: error: unsupported architecture BertForMaskedLM"), result.stderr
    assert "GPT2LMHeadModel" in lines[-1] and "LlamaForCausalLM" in lines[-1]
    assert "Traceback" not in result.stderr
    assert not repo.exists() or not any(repo.iterdir()), "a refused export leaves nothing"


def test_export_refuses_a_folder_without_config(checkpoints):
    src = checkpoints["root"] / "no_config"
    src.mkdir()
    gpt2 = checkpoints["models"]["gpt2_tiny"][2]
    for f in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (src / f).symlink_to(gpt2 / f)
    repo = checkpoints["root"] / "refused"
    result = finish(export(src, repo, "no_config"))
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("export_causal_lm: error:") and "config.json is missing" in last, result.stderr
    assert "Traceback" not in result.stderr
    assert not repo.exists() or not any(repo.iterdir()), "a refused export leaves nothing"
