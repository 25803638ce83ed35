"""Shared helpers for the deploy checks: the Helm chart rendered offline by Helm's own Go engine
(helm-python-sdk), the dashboards and alert rules, and the metric-name bookkeeping.

Environment: MARQUEE_BIN_DIR and MARQUEE_MODEL_REPO as for tests/python (the live checks start
the real binaries through tests/python/marquee_servers.py).
"""

from __future__ import annotations

import functools
import json
import sys
import tomllib
from pathlib import Path

import helm_python as helm
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "tests" / "python"))

DEPLOY = REPO_ROOT / "deploy"
CHART_DIR = DEPLOY / "helm" / "marquee"
CI_VALUES = sorted((CHART_DIR / "ci").glob("*-values.yaml"))
DASHBOARDS = sorted((DEPLOY / "dashboards").glob("*.json"))
RULES_FILE = DEPLOY / "prometheus" / "rules" / "marquee.rules.yaml"
RULE_TESTS = DEPLOY / "prometheus" / "tests" / "marquee.rules.test.yaml"
RELEASE = "mq"
NAMESPACE = "serving"
COMPONENTS = ("gateway", "vision", "language", "recommendation")
BACKENDS = ("vision", "language", "recommendation")
KUBE_VERSIONS = ("1.30.0", "1.31.0", "1.32.0")

# Series the dashboards and rules read that Marquee does not export: the service mesh proxies'
# (Linkerd, Istio), kube-state-metrics', and Prometheus' own `up`. The metric-name check skips
# exactly these; anything else must be exported by a running Marquee service.
EXTERNAL_METRICS = {
    # Linkerd proxy
    "request_total": "linkerd",
    "response_total": "linkerd",
    "response_latency_ms_bucket": "linkerd",
    # Istio (Envoy via istio-proxy)
    "istio_requests_total": "istio",
    "istio_request_duration_milliseconds_bucket": "istio",
    # kube-state-metrics
    "kube_pod_container_status_restarts_total": "kube-state-metrics",
    # Prometheus itself
    "up": "prometheus",
}

helm.disable_logging()


@functools.cache
def chart() -> helm.Chart:
    return helm.Chart.load(str(CHART_DIR))


def load_values(path: Path) -> dict:
    return helm.values_from_yaml(path.read_text())


def render(values: dict | None = None) -> list[dict]:
    """Every object the chart renders with `values` (release mq in namespace serving)."""
    out = chart().render(values or {}, name=RELEASE, namespace=NAMESPACE)
    objects = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("__template__", path)
                objects.append(doc)
    return objects


@functools.cache
def _render_ci(name: str) -> tuple:
    return tuple(render(load_values(CHART_DIR / "ci" / name)))


def render_ci(path: Path) -> list[dict]:
    return [dict(o) for o in _render_ci(path.name)]


def strip_meta(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k != "__template__"}


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def component_of(obj: dict) -> str:
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


def config_of(objects: list[dict], component: str) -> dict:
    """The parsed TOML config the chart renders for `component`."""
    for cm in by_kind(objects, "ConfigMap"):
        if cm["metadata"]["name"] == f"{RELEASE}-marquee-{component}-config":
            return tomllib.loads(cm["data"]["config.toml"])
    raise KeyError(f"no config for {component}")


def config_text_of(objects: list[dict], component: str) -> str:
    for cm in by_kind(objects, "ConfigMap"):
        if cm["metadata"]["name"] == f"{RELEASE}-marquee-{component}-config":
            return cm["data"]["config.toml"]
    raise KeyError(f"no config for {component}")


def pod_specs(objects: list[dict]) -> list[tuple[str, dict]]:
    return [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in by_kind(objects, "Deployment")]


# --- PromQL in the dashboards and rules ------------------------------------------------------

# Grafana variables are replaced by values of the right shape before parsing.
GRAFANA_VARS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$namespace": "serving",
    "$component": "vision",
    "$tenant": "web",
    "$model": "fashion_cnn",
    "$workload": "vision",
    "$pod": "mq-marquee-recommendation-0",
}


def grafana_to_promql(expr: str) -> str:
    for var in sorted(GRAFANA_VARS, key=len, reverse=True):
        expr = expr.replace(var, GRAFANA_VARS[var])
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable of every dashboard."""
    found = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())

        def panels(ps):
            for p in ps:
                yield p
                yield from panels(p.get("panels", []))

        for p in panels(board["panels"]):
            for t in p.get("targets", []):
                found.append((f"{path.name}: {p['title']}", grafana_to_promql(t["expr"])))
        for v in board["templating"]["list"]:
            if v["type"] == "query":
                q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
                # label_values(<series selector>, <label>): the selector is PromQL.
                assert q.startswith("label_values(") and q.endswith(")"), q
                selector = q[len("label_values(") : q.rindex(",")]
                found.append((f"{path.name}: variable {v['name']}", grafana_to_promql(selector)))
    return found


def rule_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load(RULES_FILE.read_text())
    return [
        (f"rules: {r.get('alert') or r.get('record')}", r["expr"])
        for g in rules["groups"]
        for r in g["rules"]
    ]


def recorded_names() -> set[str]:
    rules = yaml.safe_load(RULES_FILE.read_text())
    return {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads, from promql-parser's AST."""
    import promql_parser as pp

    names: set[str] = set()

    def visit(node):
        if isinstance(node, pp.VectorSelector):
            if node.name:
                names.add(node.name)
            for m in node.matchers.matchers:
                if m.name == "__name__":
                    names.add(m.value)

    pp.walk(pp.parse(expr), pre_visit=visit)
    return names


def used_metric_names() -> dict[str, set[str]]:
    """Metric name -> where it is used, over every dashboard and rule expression."""
    used: dict[str, set[str]] = {}
    for where, expr in dashboard_exprs() + rule_exprs():
        for n in metric_names(expr):
            used.setdefault(n, set()).add(where)
    return used


@pytest.fixture(scope="session")
def default_objects() -> list[dict]:
    return render_ci(CHART_DIR / "ci" / "default-values.yaml")
