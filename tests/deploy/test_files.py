"""Static checks of what cannot run here: the container build files (no base images can be
pulled) and the OpenTelemetry Collector config (no collector binary)."""

from __future__ import annotations

import re

import yaml

from conftest import DEPLOY, load_values, CHART_DIR

DOCKER = DEPLOY / "docker"


def final_stage(path) -> str:
    text = path.read_text()
    return text[[m.start() for m in re.finditer(r"(?m)^FROM ", text)][-1] :]


def test_images_run_as_non_root_without_build_tools():
    for name in ("Dockerfile.service", "Dockerfile.gateway", "Dockerfile.models"):
        stage = final_stage(DOCKER / name)
        assert re.search(r"(?m)^USER 65532:65532$", stage), name
        for tool in ("apt-get", "cargo", "pip", "rustc", "gcc"):
            assert not re.search(rf"(?m)^RUN .*\b{tool}\b", stage), f"{name}: {tool} in the final stage"
    service = (DOCKER / "Dockerfile.service").read_text()
    assert "torch==${TORCH_VERSION}" in service and "ARG TORCH_VERSION=2.13.0" in service
    assert "rpath,/opt/site-packages/torch/lib" in service
    assert "COPY --from=build /out/site-packages /opt/site-packages" in final_stage(DOCKER / "Dockerfile.service")
    gateway = (DOCKER / "Dockerfile.gateway").read_text()
    assert "torch" not in final_stage(DOCKER / "Dockerfile.gateway")
    assert "-p marquee-gateway" in gateway and "pip" not in gateway


def test_the_images_match_the_chart_defaults():
    values = load_values(CHART_DIR / "values.yaml")
    assert values["podSecurity"]["runAsUser"] == 65532
    assert values["gateway"]["image"]["repository"] == "marquee-gateway"
    for b in ("vision", "language", "recommendation"):
        assert values[b]["image"]["repository"] == f"marquee-{b}"
        assert values[b]["modelStorage"]["image"]["path"] == "/model-repository"
    assert "/model-repository" in (DOCKER / "Dockerfile.models").read_text()


def test_collector_receives_otlp_grpc_and_exports_a_traces_pipeline():
    cfg = yaml.safe_load((DEPLOY / "otel" / "collector.yaml").read_text())
    assert cfg["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    pipe = cfg["service"]["pipelines"]["traces"]
    assert pipe["receivers"] == ["otlp"]
    for p in pipe["processors"]:
        assert p in cfg["processors"], p
    for e in pipe["exporters"]:
        assert e in cfg["exporters"], e
    assert pipe["processors"][0] == "memory_limiter" and pipe["processors"][-1] == "batch"
    # The chart's example endpoint is this collector's gRPC port.
    default = load_values(CHART_DIR / "ci" / "default-values.yaml")
    assert default["telemetry"]["otlpEndpoint"].endswith(":4317")
