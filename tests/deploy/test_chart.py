"""The Helm chart, rendered offline by Helm's own engine for every ci values file: lint, values
schema, Kubernetes API validation (1.30-1.32, strict) and the policies Marquee promises (probes,
resources, pod security, network isolation of backends, drain within the grace period)."""

from __future__ import annotations

import base64
import copy
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import helm_python as helm
import pytest
import yaml

from conftest import (
    BACKENDS,
    CHART_DIR,
    CI_VALUES,
    COMPONENTS,
    DASHBOARDS,
    DEPLOY,
    KUBE_VERSIONS,
    NAMESPACE,
    RELEASE,
    RULES_FILE,
    by_kind,
    chart,
    component_of,
    config_of,
    config_text_of,
    load_values,
    pod_specs,
    render,
    render_ci,
    strip_meta,
)

CI_IDS = [p.name.removesuffix("-values.yaml") for p in CI_VALUES]
# The CLI installed next to this Python (the venv), whatever PATH says.
KUBERNETES_VALIDATE = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent)) or "kubernetes-validate"
CRD_GROUP = "monitoring.coreos.com/"
POSTGRES_VALUES = CHART_DIR / "ci" / "postgres-store-values.yaml"
# The two Secrets the chart generates (templates/secrets.yaml) and where the token is read.
USER_ID_KEY_SECRET = f"{RELEASE}-marquee-recommendation-user-id-key"
TENANT_TOKEN_SECRET = f"{RELEASE}-marquee-tenant-token"
TENANT_TOKEN_FILE = "/etc/marquee/secrets/tenant-token/tenant-token"


def test_the_ci_values_cover_defaults_gpu_mesh_and_a_single_service():
    assert {"default", "gpu", "mesh", "istio", "single-service", "postgres-store"} <= set(CI_IDS)


def test_generated_files_are_current():
    """values.schema.json and the dashboards are written by scripts; the committed files match."""
    for script in (DEPLOY / "helm" / "gen_schema.py", DEPLOY / "dashboards" / "_generate.py"):
        r = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


# --- lint and schema -------------------------------------------------------------------------


@pytest.mark.parametrize("values_file", CI_VALUES, ids=CI_IDS)
@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_lint_is_clean(values_file, kube):
    report = helm.lint(str(CHART_DIR), load_values(values_file), strict=True, namespace=NAMESPACE, kube_version=f"v{kube}")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert report["total_charts_linted"] == 1
    assert not problems, problems


@pytest.mark.parametrize("values_file", CI_VALUES, ids=CI_IDS)
def test_schema_accepts_the_ci_values(values_file):
    chart().validate_schema(load_values(values_file))


def _set(values: dict, dotted: str, value) -> dict:
    out = copy.deepcopy(values)
    node = out
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return out


BAD_VALUES = {
    "replicas as a string": ("vision.replicaCount", "two", "replicaCount"),
    "unknown top-level key": ("gatway", {"enabled": True}, "gatway"),
    "unknown component key": ("vision.replicas", 2, "replicas"),
    "unknown service setting": ("vision.config.server.grpc_adr", "0.0.0.0:1", "grpc_adr"),
    "chart-owned setting": ("vision.config.repository.path", "/elsewhere", "path"),
    "chart-owned language repository path": ("language.config.repository.path", "/elsewhere", "path"),
    "chart-owned recommendation repository path": ("recommendation.config.repository.path", "/elsewhere", "path"),
    "chart-owned device": ("language.config.repository.device", "cuda", "device"),
    "chart-owned state dir": ("recommendation.config.recommendation.state_dir", "/tmp", "state_dir"),
    # The old places of the unified keys are unknown keys now (the services refuse them).
    "language.repository is gone": ("language.config.language.repository", "/elsewhere", "repository"),
    "language.model is gone": ("language.config.language.model", "gpt_reviews", "model"),
    "language.threads is gone": ("language.config.language.threads", 1, "threads"),
    "recommendation.model is gone": ("recommendation.config.recommendation.model", "recommender", "model"),
    "recommendation.workers is gone": ("recommendation.config.recommendation.workers", 2, "workers"),
    # Repository keys a service would ignore are refused by it, and so by the schema.
    "language lanes other than 1": ("language.config.repository.lanes", 2, "lanes"),
    "language batching": ("language.config.repository.batching", False, "batching"),
    "recommendation profile_batching": ("recommendation.config.repository.profile_batching", False, "profile_batching"),
    "recommendation serves one model": ("recommendation.config.repository.models", ["a", "b"], "models"),
    "recommendation index kind": ("recommendation.config.recommendation.index", "annoy", "index"),
    "unknown gateway route": ("gateway.config.routes.search", {"max_batch": 4}, "search"),
    "an API key inline": ("secrets.apiKeys.key_value", "mq_secret", "key_value"),
    "port out of range": ("gateway.ports.grpc", 70000, "grpc"),
    "drain delay negative": ("gateway.config.server.drain_delay_ms", -1, "drain_delay_ms"),
    "model storage kind": ("vision.modelStorage.type", "nfs", "type"),
    "GPU device name": ("vision.gpu.device", "tpu", "device"),
    "API key hash not hex": ("gateway.config.auth.api_keys", [{"sha256": "abc", "tenant": "t", "scopes": ["admin"]}], "sha256"),
    "unknown scope": ("gateway.config.auth.api_keys", [{"sha256": "a" * 64, "tenant": "t", "scopes": ["root"]}], "scopes"),
    "tenant weight type": ("gateway.config.tenants.web", {"weight": "heavy"}, "weight"),
    "OTLP endpoint without scheme": ("telemetry.otlpEndpoint", "collector:4317", "otlpEndpoint"),
    "root user": ("podSecurity.runAsUser", 0, "runAsUser"),
    # The recommender's store and secret files are the chart's (recommendation.store, the
    # mounted Secrets), never set in `config`.
    "chart-owned store": ("recommendation.config.recommendation.store", "postgres", "store"),
    "chart-owned connection string file": ("recommendation.config.recommendation.postgres.url_file", "/tmp/url", "url_file"),
    "chart-owned user-id key file": ("recommendation.config.recommendation.user_id_key_file", "/tmp/key", "user_id_key_file"),
    "chart-owned recommender token file": ("recommendation.config.recommendation.tenant_token_file", "/tmp/t", "tenant_token_file"),
    "chart-owned gateway token file": ("gateway.config.backends.recommendation.tenant_token_file", "/tmp/t", "tenant_token_file"),
    "unknown store": ("recommendation.store", "redis", "store"),
    "read-only state claim": ("recommendation.state.accessModes", ["ReadOnlyMany"], "accessModes"),
    "state.sizeLimit is gone (a claim, not an emptyDir)": ("recommendation.state.sizeLimit", "1Gi", "sizeLimit"),
}


@pytest.mark.parametrize("case", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_schema_rejects_bad_values(case):
    path, value, named = case
    bad = _set({}, path, value)
    with pytest.raises(helm.HelmValuesError) as e:
        chart().validate_schema(bad)
    assert named in str(e.value), str(e.value)
    # Rendering refuses them too (what `helm install` does).
    with pytest.raises(helm.HelmError):
        render(bad)


# --- Kubernetes API validation ----------------------------------------------------------------


@pytest.mark.parametrize("values_file", CI_VALUES, ids=CI_IDS)
@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_manifests_validate_strictly(values_file, kube, tmp_path):
    objects = render_ci(values_file)
    core = [strip_meta(o) for o in objects if not o["apiVersion"].startswith(CRD_GROUP)]
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump_all(core, sort_keys=False))
    r = subprocess.run(
        [KUBERNETES_VALIDATE, "-k", kube, "--strict", str(manifest)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ERROR" not in r.stdout + r.stderr
    # Every core object had a schema (a kind without one is only warned about) and passed.
    assert "Couldn't find schema" not in r.stdout + r.stderr, r.stdout + r.stderr
    passed = [line for line in r.stdout.splitlines() if line.startswith("INFO") and f"against version {kube[:4]}" in line]
    assert len(passed) == len(core) >= 5, r.stdout


def test_prometheus_operator_objects_have_their_required_shape():
    """No schema for the CRDs ships offline: check what prometheus-operator needs of them."""
    objects = render_ci(CHART_DIR / "ci" / "mesh-values.yaml") + render_ci(CHART_DIR / "ci" / "istio-values.yaml")
    crds = [o for o in objects if o["apiVersion"].startswith(CRD_GROUP)]
    kinds = {o["kind"] for o in crds}
    assert kinds == {"ServiceMonitor", "PodMonitor", "PrometheusRule"}, kinds
    for o in crds:
        assert o["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(o) - {"__template__"} == {"apiVersion", "kind", "metadata", "spec"}
        if o["kind"] in ("ServiceMonitor", "PodMonitor"):
            key = "endpoints" if o["kind"] == "ServiceMonitor" else "podMetricsEndpoints"
            assert set(o["spec"]) == {"selector", "namespaceSelector", key}
            (ep,) = o["spec"][key]
            assert ep["port"] == "admin" and ep["path"] == "/metrics"
            assert {"targetLabel": "component", "sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_component"]} in ep["relabelings"]
    (rule,) = [o for o in crds if o["kind"] == "PrometheusRule"]
    assert rule["spec"]["groups"] == yaml.safe_load(RULES_FILE.read_text())["groups"], "the chart ships the promtool-tested rules"


# --- policies -------------------------------------------------------------------------------


def all_rendered():
    return [(p.name.removesuffix("-values.yaml"), render_ci(p)) for p in CI_VALUES]


@pytest.mark.parametrize("values_file", CI_VALUES, ids=CI_IDS)
def test_every_container_has_grpc_probes_resources_and_locked_down_security(values_file):
    objects = render_ci(values_file)
    specs = pod_specs(objects)
    assert specs
    for name, spec in specs:
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0, name
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        for c in spec.get("initContainers", []) + spec["containers"]:
            where = f"{name}/{c['name']}"
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["privileged"] is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), where
        for c in spec["containers"]:
            grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                # Native gRPC health on the serving port, server-wide status (service ""),
                # which turns NOT_SERVING when a drain starts.
                assert c[probe]["grpc"] == {"port": grpc_port, "service": ""}, f"{name} {probe}"
            start = c["startupProbe"]
            assert start["periodSeconds"] * start["failureThreshold"] >= (60 if "gateway" in name else 600), (
                f"{name}: start-up probe must allow for model warm-up"
            )


@pytest.mark.parametrize("values_file", CI_VALUES, ids=CI_IDS)
def test_grace_period_covers_prestop_drain_and_in_flight_calls(values_file):
    objects = render_ci(values_file)
    for d in by_kind(objects, "Deployment"):
        comp = component_of(d)
        spec = d["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        server = config_of(objects, comp)["server"]
        # What the service will actually do on SIGTERM, from the config the pod reads.
        drain_s = (server.get("drain_delay_ms", 0) + server.get("shutdown_grace_ms", 30000)) / 1000
        pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        assert pre_stop >= 1, f"{comp}: preStop sleep lets endpoint removal propagate"
        assert spec["terminationGracePeriodSeconds"] >= pre_stop + math.ceil(drain_s), comp
        assert server.get("drain_delay_ms", 0) > 0, f"{comp}: reports NOT_SERVING before closing"


@pytest.mark.parametrize("values_file", CI_VALUES, ids=CI_IDS)
def test_only_the_gateway_is_reachable_from_outside_the_release(values_file):
    objects = render_ci(values_file)
    values = load_values(values_file)
    policies = {component_of(p): p for p in by_kind(objects, "NetworkPolicy")}
    deployments = {component_of(d): d for d in by_kind(objects, "Deployment")}
    assert set(policies) == set(deployments), "every component is covered by a policy"
    gateway_labels = {
        "app.kubernetes.io/name": "marquee",
        "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/component": "gateway",
    }
    prometheus = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    }
    for comp, pol in policies.items():
        spec = pol["spec"]
        assert spec["policyTypes"] == ["Ingress"]
        assert spec["podSelector"]["matchLabels"] == deployments[comp]["spec"]["selector"]["matchLabels"]
        c = deployments[comp]["spec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        open_ports = set()
        for rule in spec["ingress"]:
            rule_ports = {p["port"] for p in rule["ports"]}
            open_ports |= rule_ports
            peers = rule.get("from")
            if ports["admin"] in rule_ports:
                assert rule_ports.isdisjoint({ports["grpc"]}), "admin and gRPC never share a rule"
                assert peers == [prometheus], f"{comp}: only Prometheus scrapes the admin port"
            elif comp == "gateway":
                assert ports["grpc"] in rule_ports
                assert peers == (values.get("networkPolicy", {}).get("gatewayFrom") or None)
            else:
                assert ports["grpc"] in rule_ports
                # Backends: the gRPC port (and a mesh proxy's inbound port) only from this
                # release's gateway pods: no namespace selector, no IP block, no open rule.
                assert peers == [{"podSelector": {"matchLabels": gateway_labels}}], f"{comp}: {peers}"
        assert {ports["grpc"], ports["admin"]} <= open_ports


def test_backends_get_headless_services_that_the_gateway_config_resolves(default_objects):
    services = {component_of(s): s for s in by_kind(default_objects, "Service")}
    assert services["gateway"]["spec"]["type"] == "ClusterIP"
    gateway = config_of(default_objects, "gateway")
    for b in BACKENDS:
        svc = services[b]
        assert svc["spec"]["clusterIP"] == "None", f"{b}: headless, so DNS returns every pod"
        grpc = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
        expected = {
            "kind": b,
            "endpoints": [],
            "dns": f"{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{grpc}",
        }
        if b == "recommendation":
            # The tenant token (test_the_tenant_token_is_one_secret_on_both_sides_of_the_call).
            expected["tenant_token_file"] = TENANT_TOKEN_FILE
        assert gateway["backends"][b] == expected


def test_each_service_reads_its_rendered_config_and_listens_where_its_ports_say(default_objects):
    for d in by_kind(default_objects, "Deployment"):
        comp = component_of(d)
        spec = d["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        cfg = config_of(default_objects, comp)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert cfg["server"]["grpc_addr"] == f"0.0.0.0:{ports['grpc']}"
        assert cfg["server"]["admin_addr"] == f"0.0.0.0:{ports['admin']}"
        assert c["args"] == ["--config", "/etc/marquee/config/config.toml"]
        mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
        assert mount["mountPath"] == "/etc/marquee/config" and mount["readOnly"]
        vol = next(v for v in spec["volumes"] if v["name"] == "config")
        assert vol["configMap"]["name"] == f"{RELEASE}-marquee-{comp}-config"
        # A changed config rolls the pods.
        assert len(d["spec"]["template"]["metadata"]["annotations"]["checksum/config"]) == 64
        if comp != "gateway":
            models = next(m for m in c["volumeMounts"] if m["name"] == "models")
            assert model_path(cfg, comp) == models["mountPath"] and models["readOnly"]


def model_path(cfg: dict, comp: str) -> str:
    """Where a service reads its model repository: `[repository] path`, the same for every model
    service."""
    return cfg["repository"]["path"]


def device_of(cfg: dict, comp: str):
    return cfg["repository"].get("device")


def test_values_reach_the_config_as_typed_toml(default_objects):
    gw = config_of(default_objects, "gateway")
    assert gw["tenants"]["web"] == {"weight": 2, "rate_per_s": 200, "burst": 400}
    assert isinstance(gw["tenants"]["web"]["weight"], int), "integers stay integers (Helm's toToml writes 2.0)"
    assert gw["routes"]["vision"]["max_batch"] == 16
    assert gw["telemetry"] == {"log_format": "json", "log_filter": "info"}
    vision = config_of(default_objects, "vision")
    assert vision["repository"]["models"] == ["efficientnet_lite0", "fashion_cnn"]
    assert vision["vision"] == {"max_batch_items": 64}
    # Each service's own sections (services/*/src/lib.rs): every model service has `[repository]`.
    language = config_of(default_objects, "language")
    assert set(language) == {"server", "repository", "telemetry", "language"}
    assert language["repository"] == {"path": "/models", "models": ["gpt_reviews"], "poll_interval_ms": 10000}
    assert language["language"] == {"default_model": "gpt_reviews"}, "no model, repository or threads in [language] any more"
    rec = config_of(default_objects, "recommendation")
    assert set(rec) == {"server", "repository", "telemetry", "recommendation"}
    assert rec["repository"] == {"path": "/models", "poll_interval_ms": 10000}
    # The file store (the service's default, so no `store` key) and the chart's secret files.
    assert rec["recommendation"] == {
        "state_dir": "/var/lib/marquee",
        "user_id_key_file": "/etc/marquee/secrets/user-id-key/user-id.key",
        "tenant_token_file": TENANT_TOKEN_FILE,
    }


def test_repository_overrides_pass_through_where_the_service_uses_them():
    """`repository.lanes` is the recommender's engine workers; language takes `lanes = 1` (its
    only value) and `threads`; vision takes the batching keys."""
    objects = render(
        {
            "vision": {"config": {"repository": {"batching": False, "profile_batching": False, "lanes": 3}}},
            "language": {"config": {"repository": {"lanes": 1, "threads": 2, "models": ["gpt_reviews"]}}},
            "recommendation": {"config": {"repository": {"lanes": 2, "models": ["recommender"], "poll_interval_ms": 0}}},
        }
    )
    vision = config_of(objects, "vision")["repository"]
    assert (vision["batching"], vision["profile_batching"], vision["lanes"]) == (False, False, 3)
    assert config_of(objects, "language")["repository"] == {"path": "/models", "lanes": 1, "threads": 2, "models": ["gpt_reviews"], "poll_interval_ms": 10000}
    assert config_of(objects, "recommendation")["repository"] == {"path": "/models", "lanes": 2, "models": ["recommender"], "poll_interval_ms": 0}


def test_every_documented_vision_setting_passes_the_schema_and_reaches_the_config():
    """docs/CONFIG.md's `[vision]` keys, the decode pool's included (the schema used to refuse
    `max_aspect_ratio`, `decode_workers` and `decode_queue`, which the service accepts)."""
    vision = {
        "max_image_bytes": 4194304,
        "max_pixels": 20000000,
        "max_batch_items": 64,
        "max_aspect_ratio": 10,
        "decode_workers": 2,
        "decode_queue": 128,
    }
    objects = render({"vision": {"config": {"vision": vision}}})
    assert config_of(objects, "vision")["vision"] == vision


def test_every_gateway_route_takes_its_limits_from_values():
    routes = {r: {"default_timeout_ms": 5000, "max_timeout_ms": 60000} for r in ("vision", "inference", "language", "recommendation")}
    objects = render({"gateway": {"config": {"routes": routes}}})
    assert config_of(objects, "gateway")["routes"] == routes


def test_credentials_are_referenced_and_only_marquees_own_keys_are_generated(default_objects):
    """API keys, JWT keys and the database's connection string are the operator's: the chart
    only mounts them. The only Secrets it writes are the two keys Marquee makes up itself."""
    generated = {s["metadata"]["name"] for s in by_kind(default_objects, "Secret")}
    assert generated == {USER_ID_KEY_SECRET, TENANT_TOKEN_SECRET}
    for objects in (render_ci(CHART_DIR / "ci" / "mesh-values.yaml"), render_ci(CHART_DIR / "ci" / "postgres-store-values.yaml")):
        names = {s["metadata"]["name"] for s in by_kind(objects, "Secret")}
        assert "marquee-jwt" not in names and "recommendations-db-app" not in names and names <= generated
    gw = next(d for d in by_kind(default_objects, "Deployment") if component_of(d) == "gateway")
    spec = gw["spec"]["template"]["spec"]
    vol = next(v for v in spec["volumes"] if v["name"] == "api-keys")
    assert vol["secret"]["secretName"] == "marquee-api-keys"
    mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "api-keys")
    assert mount["readOnly"]
    cfg = config_of(default_objects, "gateway")
    assert cfg["auth"]["api_keys_file"] == f"{mount['mountPath']}/api-keys.toml"
    assert cfg["auth"]["api_keys"] == []


def test_jwt_keys_come_from_a_secret():
    objects = render_ci(CHART_DIR / "ci" / "mesh-values.yaml")
    cfg = config_of(objects, "gateway")["auth"]["jwt"]
    assert cfg["public_key_files"] == ["/etc/marquee/secrets/jwt/issuer-rs256.pem"]
    assert cfg["jwks_file"] == "/etc/marquee/secrets/jwt/jwks.json"
    assert cfg["issuer"] == "https://auth.example.com/" and "hs256_secret_file" not in cfg
    gw = next(d for d in by_kind(objects, "Deployment") if component_of(d) == "gateway")
    vol = next(v for v in gw["spec"]["template"]["spec"]["volumes"] if v["name"] == "jwt")
    assert vol["secret"]["secretName"] == "marquee-jwt"


def test_otlp_endpoint_is_passed_as_the_standard_variable():
    with_otlp = render_ci(CHART_DIR / "ci" / "default-values.yaml")
    without = render_ci(CHART_DIR / "ci" / "mesh-values.yaml")
    for objects, expected in ((with_otlp, "http://otel-collector.observability:4317"), (without, None)):
        for _, spec in pod_specs(objects):
            env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
            assert env.get("OTEL_EXPORTER_OTLP_ENDPOINT") == expected


def test_gpu_values_request_gpus_and_select_gpu_nodes():
    objects = render_ci(CHART_DIR / "ci" / "gpu-values.yaml")
    deps = {component_of(d): d["spec"]["template"]["spec"] for d in by_kind(objects, "Deployment")}
    for comp, dev in (("vision", "cuda"), ("language", "cuda:0")):
        spec = deps[comp]
        assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert device_of(config_of(objects, comp), comp) == dev
    assert deps["vision"]["runtimeClassName"] == "nvidia"
    assert "nvidia.com/gpu" not in deps["recommendation"]["containers"][0]["resources"]["limits"]
    assert device_of(config_of(objects, "recommendation"), "recommendation") is None
    # Model storage: a created claim for language, an existing one for recommendation.
    claims = [c for c in by_kind(objects, "PersistentVolumeClaim") if c["metadata"]["name"].endswith("-models")]
    assert [c["metadata"]["name"] for c in claims] == [f"{RELEASE}-marquee-language-models"]
    assert claims[0]["spec"]["resources"]["requests"]["storage"] == "20Gi"
    vol = next(v for v in deps["recommendation"]["volumes"] if v["name"] == "models")
    assert vol["persistentVolumeClaim"] == {"claimName": "recommendation-models", "readOnly": True}
    assert "initContainers" not in deps["language"]
    # Queue depth autoscaling.
    hpa = next(h for h in by_kind(objects, "HorizontalPodAutoscaler") if component_of(h) == "vision")
    pods_metric = next(m for m in hpa["spec"]["metrics"] if m["type"] == "Pods")
    assert pods_metric["pods"]["metric"]["name"] == "marquee_batcher_queue_depth"


def test_recommendation_state_is_writable_and_its_key_comes_from_a_secret():
    objects = render({"secrets": {"userIdKey": {"existingSecret": "rec-user-key"}}, "recommendation": {"state": {"existingClaim": "rec-state"}}})
    rec = next(d for d in by_kind(objects, "Deployment") if component_of(d) == "recommendation")
    spec = rec["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    cfg = config_of(objects, "recommendation")["recommendation"]
    assert cfg["state_dir"] == mounts["state"]["mountPath"] and not mounts["state"].get("readOnly")
    assert volumes["state"]["persistentVolumeClaim"] == {"claimName": "rec-state"}
    assert cfg["user_id_key_file"] == f"{mounts['user-id-key']['mountPath']}/user-id.key" and mounts["user-id-key"]["readOnly"]
    assert volumes["user-id-key"]["secret"]["secretName"] == "rec-user-key"
    # A named claim and a named key: the chart creates neither.
    assert not [c for c in by_kind(objects, "PersistentVolumeClaim") if c["metadata"]["name"].endswith("-state")]
    assert USER_ID_KEY_SECRET not in {s["metadata"]["name"] for s in by_kind(objects, "Secret")}


def deployment_of(objects: list[dict], comp: str) -> dict:
    (d,) = [d for d in by_kind(objects, "Deployment") if component_of(d) == comp]
    return d


def volume_and_mount(deployment: dict, name: str) -> tuple[dict, dict]:
    spec = deployment["spec"]["template"]["spec"]
    vol = next(v for v in spec["volumes"] if v["name"] == name)
    mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == name)
    return vol, mount


def test_the_file_store_is_one_recreated_replica_on_a_claim(default_objects):
    """The default store: one feedback log written by exactly one pod, on a claim (an emptyDir
    would lose users' histories with the pod), never two pods at once (Recreate, no HPA), and no
    disruption budget that could hold a node drain forever."""
    rec = deployment_of(default_objects, "recommendation")
    assert rec["spec"]["replicas"] == 1
    assert rec["spec"]["strategy"] == {"type": "Recreate"}, "the old pod is gone before the new one opens the log"
    vol, mount = volume_and_mount(rec, "state")
    (claim,) = [c for c in by_kind(default_objects, "PersistentVolumeClaim") if c["metadata"]["name"] == f"{RELEASE}-marquee-recommendation-state"]
    assert vol == {"name": "state", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}
    assert not mount.get("readOnly")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert "storageClassName" not in claim["spec"], "the cluster's default class"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    cfg = config_of(default_objects, "recommendation")["recommendation"]
    assert cfg["state_dir"] == mount["mountPath"]
    assert "store" not in cfg and "postgres" not in cfg, "file is the service's default store"
    assert "recommendation" not in {component_of(h) for h in by_kind(default_objects, "HorizontalPodAutoscaler")}
    assert "recommendation" not in {component_of(p) for p in by_kind(default_objects, "PodDisruptionBudget")}
    # Size, class and access mode come from values; even a budget of 0 is not rendered for it.
    objects = render(
        {
            "recommendation": {
                "state": {"size": "20Gi", "storageClassName": "fast-rwo", "accessModes": ["ReadWriteOncePod"]},
                "pdb": {"enabled": True, "maxUnavailable": 0},
            }
        }
    )
    (claim,) = [c for c in by_kind(objects, "PersistentVolumeClaim") if c["metadata"]["name"].endswith("-state")]
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert claim["spec"]["storageClassName"] == "fast-rwo"
    assert claim["spec"]["accessModes"] == ["ReadWriteOncePod"]
    assert "recommendation" not in {component_of(p) for p in by_kind(objects, "PodDisruptionBudget")}


FILE_STORE_SCALING = {
    "autoscaling": ({"autoscaling": {"enabled": True}}, "'/recommendation/autoscaling/enabled': value must be false"),
    "two replicas": ({"replicaCount": 2}, "'/recommendation/replicaCount': maximum: got 2, want 1"),
}


@pytest.mark.parametrize("case", FILE_STORE_SCALING.values(), ids=FILE_STORE_SCALING.keys())
def test_the_schema_refuses_scaling_the_file_store(case):
    rec, refused = case
    for values in ({"recommendation": rec}, {"recommendation": {**rec, "store": "file"}}):
        with pytest.raises(helm.HelmValuesError) as e:
            chart().validate_schema(values)
        message = str(e.value)
        # The message names the key and the reason: the store (which would have to be another).
        assert refused in message, message
        assert "'/recommendation/store': value must be 'postgres'" in message, message
        with pytest.raises(helm.HelmError):
            render(values)
    # The same scaling with the postgres store is fine.
    values = {"recommendation": {**rec, "store": "postgres", "postgres": {"existingSecret": "db"}}}
    chart().validate_schema(values)
    assert deployment_of(render(values), "recommendation")


def test_the_templates_refuse_what_the_schema_refuses_when_it_is_skipped(tmp_path):
    """`helm install --skip-schema-validation` skips the schema, not the templates' own check:
    the chart without its schema still refuses two writers on one log, and a postgres store
    without a connection string."""
    unchecked = tmp_path / "marquee"
    shutil.copytree(CHART_DIR, unchecked)
    (unchecked / "values.schema.json").unlink()
    loose = helm.Chart.load(str(unchecked))
    for values, reason in (
        ({"recommendation": {"replicaCount": 2}}, "recommendation.store is file"),
        ({"recommendation": {"autoscaling": {"enabled": True}}}, "recommendation.store is file"),
        ({"recommendation": {"store": "postgres"}}, "recommendation.postgres.existingSecret"),
    ):
        with pytest.raises(helm.HelmRenderError) as e:
            loose.render(values, name=RELEASE, namespace=NAMESPACE)
        assert reason in str(e.value), str(e.value)


def test_the_schema_requires_the_connection_string_secret_with_the_postgres_store():
    for values in (
        {"recommendation": {"store": "postgres"}},
        {"recommendation": {"store": "postgres", "postgres": {"existingSecret": ""}}},
    ):
        with pytest.raises(helm.HelmValuesError) as e:
            chart().validate_schema(values)
        message = str(e.value)
        assert "'/recommendation/postgres/existingSecret': minLength: got 0, want 1" in message, message
        assert "'/recommendation/store': value must be 'file'" in message, message


def test_the_postgres_store_is_stateless_and_autoscales():
    objects = render_ci(POSTGRES_VALUES)
    rec = deployment_of(objects, "recommendation")
    # Replicas are interchangeable: rolled like every other service, counted by the HPA.
    assert "replicas" not in rec["spec"], "the HPA owns the replica count"
    assert rec["spec"]["strategy"]["type"] == "RollingUpdate"
    assert rec["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    (hpa,) = [h for h in by_kind(objects, "HorizontalPodAutoscaler") if component_of(h) == "recommendation"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": rec["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert "recommendation" in {component_of(p) for p in by_kind(objects, "PodDisruptionBudget")}
    assert not by_kind(objects, "PersistentVolumeClaim"), "no claim: the state is in PostgreSQL"
    state, _ = volume_and_mount(rec, "state")
    assert "emptyDir" in state and "persistentVolumeClaim" not in state
    # The connection string: only its key of the operator's Secret, read-only, as url_file.
    vol, mount = volume_and_mount(rec, "postgres")
    assert vol["secret"] == {"secretName": "recommendations-db-app", "items": [{"key": "uri", "path": "uri"}], "defaultMode": 0o440}
    assert mount["readOnly"]
    # TLS: the CA certificate from its own Secret, as ca_file (the service then requires TLS).
    ca_vol, ca_mount = volume_and_mount(rec, "postgres-ca")
    assert ca_vol["secret"] == {"secretName": "recommendations-db-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}], "defaultMode": 0o440}
    assert ca_mount["readOnly"] and ca_mount["mountPath"] != mount["mountPath"]
    cfg = config_of(objects, "recommendation")["recommendation"]
    assert cfg["store"] == "postgres"
    assert cfg["postgres"] == {
        "url_file": f"{mount['mountPath']}/uri",
        "ca_file": f"{ca_mount['mountPath']}/ca.crt",
        "pool_size": 16,
        "timeout_ms": 1500,
    }
    text = config_text_of(objects, "recommendation")
    assert 'store = "postgres"' in text and "[recommendation.postgres]" in text
    # Nothing of the database's Secret is written by the chart.
    assert "recommendations-db-app" not in {s["metadata"]["name"] for s in by_kind(objects, "Secret")}


def test_the_database_ca_is_optional_and_defaults_to_the_connection_strings_secret():
    """Without a CA key: plain TCP, no CA volume, no ca_file (the service then refuses
    `sslmode=require` itself). A CA key without its own Secret: read from the connection
    string's Secret."""
    base = load_values(POSTGRES_VALUES)
    plain = copy.deepcopy(base)
    plain["recommendation"]["postgres"]["ca"] = {"existingSecret": "", "key": ""}
    objects = render(plain)
    rec = deployment_of(objects, "recommendation")
    assert "postgres-ca" not in {v["name"] for v in rec["spec"]["template"]["spec"]["volumes"]}
    assert "ca_file" not in config_of(objects, "recommendation")["recommendation"]["postgres"]
    same = copy.deepcopy(base)
    same["recommendation"]["postgres"]["ca"] = {"existingSecret": "", "key": "ca.crt"}
    vol, _ = volume_and_mount(deployment_of(render(same), "recommendation"), "postgres-ca")
    assert vol["secret"]["secretName"] == "recommendations-db-app"


@pytest.mark.parametrize("values_file", [CHART_DIR / "ci" / "default-values.yaml", POSTGRES_VALUES], ids=["generated", "existing"])
def test_every_recommender_replica_mounts_the_one_user_id_key_secret(values_file):
    """One pod template (one Deployment, which the HPA scales) mounts one Secret: every
    replica hashes user ids with the same key. Generated: 32 random bytes, the key the
    service would make itself, kept and immutable; or an existing Secret, only referenced."""
    objects = render_ci(values_file)
    named = load_values(values_file).get("secrets", {}).get("userIdKey", {}).get("existingSecret")
    recs = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet") and component_of(o) == "recommendation"]
    assert len(recs) == 1
    vol, mount = volume_and_mount(recs[0], "user-id-key")
    assert vol["secret"]["secretName"] == (named or USER_ID_KEY_SECRET)
    assert vol["secret"]["items"] == [{"key": "user-id.key", "path": "user-id.key"}]
    assert mount["readOnly"]
    cfg = config_of(objects, "recommendation")["recommendation"]
    assert cfg["user_id_key_file"] == f"{mount['mountPath']}/user-id.key"
    secrets = {s["metadata"]["name"]: s for s in by_kind(objects, "Secret")}
    if named:
        assert named not in secrets and USER_ID_KEY_SECRET not in secrets
        return
    secret = secrets[USER_ID_KEY_SECRET]
    assert component_of(secret) == "recommendation"
    # privacy.rs UserKey::load_or_create: the whole file is the key, >= 16 bytes; it makes 32.
    assert len(base64.b64decode(secret["data"]["user-id.key"])) == 32
    assert secret["immutable"] is True
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


@pytest.mark.parametrize(
    "values",
    [{}, {"secrets": {"tenantToken": {"existingSecret": "shared-token", "key": "token"}}}],
    ids=["generated", "existing"],
)
def test_the_tenant_token_is_one_secret_on_both_sides_of_the_call(values):
    """The gateway sends the token it reads from `backends.recommendation.tenant_token_file`;
    the recommender, given the same file as `recommendation.tenant_token_file`, refuses a
    tenant header without it. Both mount one Secret at one path."""
    objects = render(values)
    named = values.get("secrets", {}).get("tenantToken", {})
    secret_name, key = named.get("existingSecret", TENANT_TOKEN_SECRET), named.get("key", "tenant-token")
    backends = config_of(objects, "gateway")["backends"]
    path = config_of(objects, "recommendation")["recommendation"]["tenant_token_file"]
    assert backends["recommendation"]["tenant_token_file"] == path
    # Only the recommender reads tenants with a token.
    assert all("tenant_token_file" not in backends[b] for b in ("vision", "language"))
    mounted = {}
    for comp in ("gateway", "recommendation"):
        vol, mount = volume_and_mount(deployment_of(objects, comp), "tenant-token")
        assert mount["readOnly"]
        assert f"{mount['mountPath']}/{vol['secret']['items'][0]['path']}" == path, comp
        mounted[comp] = vol["secret"]
    assert mounted["gateway"] == mounted["recommendation"]
    assert mounted["gateway"]["secretName"] == secret_name and mounted["gateway"]["items"] == [{"key": key, "path": key}]
    for comp in ("vision", "language"):
        spec = deployment_of(objects, comp)["spec"]["template"]["spec"]
        assert "tenant-token" not in {v["name"] for v in spec["volumes"]}, comp
    secrets = {s["metadata"]["name"]: s for s in by_kind(objects, "Secret")}
    if "existingSecret" in named:
        assert secret_name not in secrets and TENANT_TOKEN_SECRET not in secrets
    else:
        token = base64.b64decode(secrets[TENANT_TOKEN_SECRET]["data"][key]).decode()
        # marquee_core::tenant::read_token_file: at least 16 visible ASCII characters.
        assert len(token) >= 16 and token.isascii() and token.isprintable() and " " not in token
        assert secrets[TENANT_TOKEN_SECRET]["immutable"] is True
    # No recommender: no token anywhere.
    without = render({**values, "recommendation": {"enabled": False}})
    assert not by_kind(without, "Secret")
    gw = deployment_of(without, "gateway")["spec"]["template"]["spec"]
    assert "tenant-token" not in {v["name"] for v in gw["volumes"]}


def test_models_are_copied_from_a_model_image_by_default(default_objects):
    vision = next(d for d in by_kind(default_objects, "Deployment") if component_of(d) == "vision")
    spec = vision["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    assert init["image"] == "ghcr.io/marquee/models-vision:0.1.0"
    assert init["command"] == ["cp", "-RL", "/model-repository/.", "/models/"]
    vol = next(v for v in spec["volumes"] if v["name"] == "models")
    assert "emptyDir" in vol


def test_mesh_annotations_and_proxy_ports():
    linkerd = render_ci(CHART_DIR / "ci" / "mesh-values.yaml")
    for d in by_kind(linkerd, "Deployment"):
        ann = d["spec"]["template"]["metadata"]["annotations"]
        assert ann["linkerd.io/inject"] == "enabled"
        grace = d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert int(ann["config.alpha.linkerd.io/proxy-wait-before-exit-seconds"]) <= grace
    for pol in by_kind(linkerd, "NetworkPolicy"):
        ports = [{p["port"] for p in r["ports"]} for r in pol["spec"]["ingress"]]
        assert any(4143 in p for p in ports) and any(4191 in p for p in ports)
    istio = render_ci(CHART_DIR / "ci" / "istio-values.yaml")
    for d in by_kind(istio, "Deployment"):
        meta = d["spec"]["template"]["metadata"]
        assert meta["labels"]["sidecar.istio.io/inject"] == "true"
        assert json.loads(meta["annotations"]["proxy.istio.io/config"])["holdApplicationUntilProxyStarts"] is True
    # No mesh: no mesh annotations.
    for d in render_ci(CHART_DIR / "ci" / "default-values.yaml"):
        if d["kind"] == "Deployment":
            assert not any("linkerd" in k or "istio" in k for k in d["spec"]["template"]["metadata"]["annotations"])


def test_autoscaling_and_disruption_budgets(default_objects):
    hpas = {component_of(h): h for h in by_kind(default_objects, "HorizontalPodAutoscaler")}
    pdbs = {component_of(p): p for p in by_kind(default_objects, "PodDisruptionBudget")}
    for d in by_kind(default_objects, "Deployment"):
        comp = component_of(d)
        if comp == "recommendation":
            # The file store (default): one replica, no HPA, no PDB
            # (test_the_file_store_is_one_recreated_replica_on_a_claim).
            assert comp not in hpas and comp not in pdbs
            continue
        assert "replicas" not in d["spec"], f"{comp}: the HPA owns the replica count"
        cpu = hpas[comp]["spec"]["metrics"][0]
        assert cpu["resource"]["name"] == "cpu" and cpu["resource"]["target"]["type"] == "Utilization"
        assert hpas[comp]["spec"]["scaleTargetRef"]["name"] == d["metadata"]["name"]
        assert pdbs[comp]["spec"]["selector"]["matchLabels"] == d["spec"]["selector"]["matchLabels"]
        assert d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    istio = render_ci(CHART_DIR / "ci" / "istio-values.yaml")
    gw = next(d for d in by_kind(istio, "Deployment") if component_of(d) == "gateway")
    assert gw["spec"]["replicas"] == 3
    assert "gateway" not in {component_of(h) for h in by_kind(istio, "HorizontalPodAutoscaler")}


def test_a_single_service_renders_alone():
    objects = render_ci(CHART_DIR / "ci" / "single-service-values.yaml")
    comps = {component_of(o) for o in objects if "app.kubernetes.io/component" in o["metadata"].get("labels", {})}
    assert comps == {"vision"}
    assert not [o for o in objects if o["kind"] == "ConfigMap" and "dashboard" in o["metadata"]["name"]]
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["ConfigMap", "Deployment", "NetworkPolicy", "PodDisruptionBudget", "Service"], kinds


def test_dashboards_are_provisioned_for_the_grafana_sidecar(default_objects):
    maps = [o for o in by_kind(default_objects, "ConfigMap") if "-dashboard-" in o["metadata"]["name"]]
    assert len(maps) == len(DASHBOARDS) >= 3
    files = {p.name: json.loads(p.read_text()) for p in DASHBOARDS}
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["annotations"]["grafana_folder"] == "Marquee"
        ((name, text),) = cm["data"].items()
        assert json.loads(text) == files[name]
    uids = [b["uid"] for b in files.values()]
    assert len(set(uids)) == len(uids)
    assert {"overview.json", "batching.json", "language.json", "recommendation.json", "mesh.json"} <= set(files)


@pytest.mark.parametrize("component", ["language", "recommendation"])
def test_a_component_dashboard_follows_its_component(component):
    """language.json and recommendation.json are provisioned only with their service; the
    others (overview, batching, mesh) always."""
    values = load_values(CHART_DIR / "ci" / "default-values.yaml")
    values[component] = {"enabled": False}
    names = {
        next(iter(cm["data"]))
        for cm in by_kind(render(values), "ConfigMap")
        if "-dashboard-" in cm["metadata"]["name"]
    }
    assert names == {p.name for p in DASHBOARDS} - {f"{component}.json"}


@pytest.mark.parametrize("values_file", CI_VALUES, ids=CI_IDS)
def test_objects_are_namespaced_labelled_and_uniquely_named(values_file):
    objects = render_ci(values_file)
    seen = set()
    for o in objects:
        meta = o["metadata"]
        key = (o["kind"], meta["name"])
        assert key not in seen, key
        seen.add(key)
        assert meta["namespace"] == NAMESPACE, key
        assert meta["labels"]["app.kubernetes.io/instance"] == RELEASE, key
        assert len(meta["name"]) <= 63, key
    assert {c for c in COMPONENTS} >= {component_of(o) for o in objects if "app.kubernetes.io/component" in o["metadata"]["labels"]}


# Values that are Kubernetes objects passed through verbatim: the API server (and
# kubernetes-validate above) checks their inside.
K8S_PASSTHROUGH = {"affinity", "tolerations.items", "extraEnv.items", "gatewayFrom.items", "matchExpressions.items"}


def test_the_schema_closes_every_object():
    """Every object in values.schema.json either lists its keys with `additionalProperties:
    false` or types every value of a name-keyed map; only raw Kubernetes objects are open."""
    open_paths = []

    def walk(node, path):
        if not isinstance(node, dict):
            return
        if node.get("type") == "object":
            ap = node.get("additionalProperties")
            tail = ".".join(path[-2:]) if path and path[-1] == "items" else (path[-1] if path else "")
            if ap is None or ap is True:
                if tail not in K8S_PASSTHROUGH:
                    open_paths.append(".".join(path))
            elif ap is not False:
                walk(ap, path + ["*"])
        for key, sub in node.get("properties", {}).items():
            walk(sub, path + [key])
        if "items" in node:
            walk(node["items"], path + ["items"])
        for alt in node.get("anyOf", []):
            walk(alt, path)

    schema = chart().schema
    schema = json.loads(schema) if isinstance(schema, (str, bytes)) else schema
    walk(schema, [])
    assert schema["additionalProperties"] is False
    assert not open_paths, open_paths
