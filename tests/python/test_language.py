"""Real third-party clients against the language service: grpcurl streams a generation
through reflection only, and tritonclient reads raw logits over the Open Inference Protocol."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton

from marquee_servers import Server, model_repo, run_binary

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")


@pytest.fixture(scope="module")
def language() -> Server:
    with run_binary(
        "marquee-language",
        {
            "MARQUEE__REPOSITORY__PATH": str(model_repo()),
            "MARQUEE__REPOSITORY__THREADS": "1",
            "MARQUEE__REPOSITORY__POLL_INTERVAL_MS": "0",
            "MARQUEE__LANGUAGE__DEFAULT_MODEL": "gpt_reviews",
        },
    ) as srv:
        yield srv


def grpcurl(addr: str, method: str, body: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [GRPCURL, "-plaintext", "-d", "@", addr, method],
        input=json.dumps(body), capture_output=True, text=True, timeout=60,
    )


def stream_messages(stdout: str) -> list[dict]:
    """grpcurl prints one JSON object per stream message."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while i < len(stdout):
        if stdout[i].isspace():
            i += 1
            continue
        obj, i = decoder.raw_decode(stdout, i)
        out.append(obj)
    return out


def test_reflection_lists_only_what_the_language_service_serves(language):
    out = subprocess.run([GRPCURL, "-plaintext", language.grpc_addr, "list"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert set(out.stdout.split()) == {
        "marquee.language.v1.TextGeneration",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }


def test_the_repository_serves_only_its_causal_lm_models(language):
    """The repository also holds vision's models and the recommender: only `kind = "causal_lm"`
    models are served (`repository.models` empty)."""
    client = triton.InferenceServerClient(language.grpc_addr)
    index = client.get_model_repository_index()
    assert [(m.name, m.state) for m in index.models] == [("gpt_reviews", "READY"), ("textgenrnn", "READY")]


def test_generate_stream_through_grpcurl(language):
    body = {"prompt": "This dress is", "parameters": {"max_new_tokens": 32, "temperature": 0.8,
                                                     "top_k": 40, "seed": 11}}
    out = grpcurl(language.grpc_addr, "marquee.language.v1.TextGeneration/GenerateStream", body)
    assert out.returncode == 0, out.stderr
    messages = stream_messages(out.stdout)
    assert len(messages) > 3, messages
    summary = messages[-1]["summary"]
    assert summary["finishReason"] in {"FINISH_REASON_LENGTH", "FINISH_REASON_EOS"}
    ids = [t for m in messages for t in m.get("tokenIds", [])]
    assert len(ids) == int(summary.get("generatedTokens", 0)) - (summary["finishReason"] == "FINISH_REASON_EOS")
    text = "".join(m.get("text", "") for m in messages)
    # The same seed through the unary call gives the same text.
    unary = grpcurl(language.grpc_addr, "marquee.language.v1.TextGeneration/Generate", body)
    assert unary.returncode == 0, unary.stderr
    assert json.loads(unary.stdout)["text"] == text


def test_bad_parameter_is_readable_in_grpcurl(language):
    body = {"prompt": "hi", "parameters": {"top_p": 1.5}}
    out = grpcurl(language.grpc_addr, "marquee.language.v1.TextGeneration/Generate", body)
    assert out.returncode != 0
    assert "InvalidArgument" in out.stderr
    assert "`parameters.top_p` must be in (0, 1], got 1.5" in out.stderr, out.stderr


def test_tritonclient_reads_raw_logits(language):
    client = triton.InferenceServerClient(language.grpc_addr)
    meta = client.get_model_metadata("gpt_reviews")
    assert meta.inputs[0].name == "input_ids" and meta.inputs[0].datatype == "INT64"
    vocab = int(meta.outputs[0].shape[-1])
    ids = np.array([[0, 1812, 271, 280, 85]], dtype=np.int64)
    inp = triton.InferInput("input_ids", list(ids.shape), "INT64")
    inp.set_data_from_numpy(ids)
    result = client.infer("gpt_reviews", [inp], outputs=[triton.InferRequestedOutput("logits")])
    logits = result.as_numpy("logits")
    assert logits.shape == (1, 5, vocab)
    assert np.isfinite(logits).all()
    # Next-token distributions differ by position: the model reads its context.
    assert not np.allclose(logits[0, 1], logits[0, 4])


def marquee_cli(*args: str) -> subprocess.CompletedProcess:
    cli = Path(__import__("os").environ.get("MARQUEE_BIN_DIR", "target/debug")) / "marquee"
    return subprocess.run([str(cli), *args], capture_output=True, text=True, timeout=60)


def test_cli_generate_streams_text_and_reports_the_summary(language):
    out = marquee_cli("--endpoint", language.grpc_addr, "generate", "The sweater is",
                      "--max-new-tokens", "20", "--temperature", "0.8", "--seed", "5")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.split()) >= 3, out.stdout
    assert "seed 5" in out.stderr and "20 tokens" in out.stderr or "eos" in out.stderr, out.stderr
    again = marquee_cli("--endpoint", language.grpc_addr, "--json", "generate", "The sweater is",
                        "--max-new-tokens", "20", "--temperature", "0.8", "--seed", "5")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["text"] == out.stdout, "same seed, same text"
    bad = marquee_cli("--endpoint", language.grpc_addr, "generate", "hi", "--temperature", "0")
    assert bad.returncode == 1
    assert "INVALID_ARGUMENT" in bad.stderr and "parameters.temperature" in bad.stderr, bad.stderr
