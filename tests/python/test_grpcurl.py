"""grpcurl (a Go client no one here wrote) against the vision service, through reflection only:
the same calls the README shows."""

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import FIXTURES

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")


def grpcurl(*args: str, data: str | None = None) -> subprocess.CompletedProcess:
    cmd = [GRPCURL, "-plaintext", *(["-d", "@"] if data is not None else []), *args]
    return subprocess.run(cmd, input=data, capture_output=True, text=True, timeout=60)


def test_reflection_lists_every_service_and_only_those(server):
    out = grpcurl(server.grpc_addr, "list")
    assert out.returncode == 0, out.stderr
    services = set(out.stdout.split())
    # Vision's own API, OIP, health and reflection: not the language or recommendation APIs.
    assert services == {
        "marquee.vision.v1.ImageService",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }


def test_classify_coffee_through_grpcurl(server):
    body = json.dumps({
        "model": "efficientnet_lite0",
        "top_k": 3,
        "image": {"encoded": base64.b64encode((FIXTURES / "coffee.png").read_bytes()).decode()},
    })
    out = grpcurl(server.grpc_addr, "marquee.vision.v1.ImageService/Classify", data=body)
    assert out.returncode == 0, out.stderr
    resp = json.loads(out.stdout)
    assert resp["modelVersion"] == "1"
    assert resp["labels"][0]["name"] == "espresso"
    assert len(resp["labels"]) == 3


def test_bad_input_status_is_readable_in_grpcurl(server):
    body = json.dumps({"model": "fashion_cnn", "top_k": 0, "image": {"encoded": ""}})
    out = grpcurl(server.grpc_addr, "marquee.vision.v1.ImageService/Classify", data=body)
    assert out.returncode != 0
    assert "InvalidArgument" in out.stderr and "`top_k` must be in 1..=10" in out.stderr, out.stderr
