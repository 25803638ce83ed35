#!/usr/bin/env python3
"""Writes the Grafana dashboards in this folder (overview, batching, language, recommendation,
mesh).

The JSON files are what Grafana (through the chart's ConfigMaps) loads; this script is how they
are written, so every panel shares one layout, one datasource variable and one label scheme:
`namespace` and `pod` from the scrape, `component` (gateway, vision, ...) from the chart's
ServiceMonitor/PodMonitor relabeling.

    python deploy/dashboards/_generate.py          # rewrite the JSON files
    python deploy/dashboards/_generate.py --check  # exit 1 if a committed file is stale

Every metric name a panel reads must be exported by a running service: tests/deploy/test_live.py
scrapes the real binaries after real calls and compares.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

DS = {"type": "prometheus", "uid": "${datasource}"}
# Server-side failures: what spends error budget (a client's bad request does not).
ERROR_CODES = "UNKNOWN|INTERNAL|UNAVAILABLE|DEADLINE_EXCEEDED|DATA_LOSS"
NS = 'namespace=~"$namespace"'


def datasource_var() -> dict:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
    }


def query_var(name: str, label: str, query: str, multi: bool = True) -> dict:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": f"{name}-var"},
        "definition": query,
        "refresh": 2,
        "includeAll": multi,
        "multi": multi,
        "allValue": ".*" if multi else None,
        "current": {},
        "sort": 1,
        "hide": 0,
    }


class Board:
    def __init__(self, uid: str, title: str, description: str, variables: list[dict]):
        self.uid = uid
        self.title = title
        self.description = description
        self.variables = variables
        self.panels: list[dict] = []
        self.y = 0
        self.x = 0
        self.row_h = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "id": len(self.panels) + 1,
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                "panels": [],
            }
        )
        self.y += 1

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_h
            self.x = 0
            self.row_h = 0

    def panel(
        self,
        title: str,
        targets: list[tuple[str, str]],
        unit: str = "short",
        kind: str = "timeseries",
        w: int = 12,
        h: int = 8,
        description: str = "",
        stack: bool = False,
    ) -> None:
        if self.x + w > 24:
            self._newline()
        p: dict = {
            "id": len(self.panels) + 1,
            "type": kind,
            "title": title,
            "description": description,
            "datasource": DS,
            "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
            "targets": [
                {
                    "refId": chr(ord("A") + i),
                    "datasource": DS,
                    "expr": expr,
                    "legendFormat": legend,
                    "format": "heatmap" if kind == "heatmap" else "time_series",
                }
                for i, (expr, legend) in enumerate(targets)
            ],
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {},
        }
        if kind == "timeseries":
            p["fieldConfig"]["defaults"]["custom"] = {
                "drawStyle": "line",
                "lineWidth": 1,
                "fillOpacity": 10,
                "stacking": {"mode": "normal" if stack else "none", "group": "A"},
            }
            p["options"] = {
                "legend": {"displayMode": "table", "placement": "right", "calcs": ["mean", "max"]},
                "tooltip": {"mode": "multi", "sort": "desc"},
            }
        elif kind == "heatmap":
            p["options"] = {
                "calculate": False,
                "yAxis": {"unit": unit},
                "cellGap": 1,
                "color": {"mode": "scheme", "scheme": "Oranges"},
            }
        elif kind == "stat":
            p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
        self.panels.append(p)
        self.x += w
        self.row_h = max(self.row_h, h)

    def json(self) -> dict:
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["marquee"],
            "schemaVersion": 39,
            "version": 1,
            "editable": True,
            "graphTooltip": 1,
            "time": {"from": "now-3h", "to": "now"},
            "refresh": "30s",
            "timezone": "",
            "annotations": {"list": []},
            "links": [
                {"type": "dashboards", "tags": ["marquee"], "asDropdown": True, "title": "Marquee"}
            ],
            "templating": {"list": self.variables},
            "panels": self.panels,
        }


def quantiles(metric: str, by: str, sel: str, legend: str) -> list[tuple[str, str]]:
    return [
        (
            f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{sel}}}[$__rate_interval])))",
            f"p{int(q * 100)} {legend}",
        )
        for q in (0.5, 0.99)
    ]


def overview() -> Board:
    b = Board(
        "marquee-overview",
        "Marquee / Overview",
        "Rate, errors and duration per service and route, and per tenant at the gateway.",
        [
            datasource_var(),
            query_var("namespace", "Namespace", "label_values(marquee_grpc_requests_total, namespace)"),
            query_var(
                "component",
                "Service",
                'label_values(marquee_grpc_requests_total{namespace=~"$namespace"}, component)',
            ),
            query_var(
                "tenant",
                "Tenant",
                'label_values(marquee_gateway_requests_total{namespace=~"$namespace"}, tenant)',
            ),
        ],
    )
    gw = f'{NS}, tenant=~"$tenant"'
    b.row("Gateway: per route and tenant")
    b.panel(
        "Calls/s by route",
        [(f"sum by (route) (rate(marquee_gateway_requests_total{{{gw}}}[$__rate_interval]))", "{{route}}")],
        unit="reqps",
        stack=True,
    )
    b.panel(
        "Server errors by route (share of calls)",
        [
            (
                f'sum by (route) (rate(marquee_gateway_requests_total{{{gw}, code=~"{ERROR_CODES}"}}[$__rate_interval]))'
                f" / sum by (route) (rate(marquee_gateway_requests_total{{{gw}}}[$__rate_interval]))",
                "{{route}}",
            )
        ],
        unit="percentunit",
        description=f"Codes {ERROR_CODES.replace('|', ', ')}: these spend the error budget.",
    )
    b.panel(
        "Calls/s by tenant",
        [(f"sum by (tenant) (rate(marquee_gateway_requests_total{{{gw}}}[$__rate_interval]))", "{{tenant}}")],
        unit="reqps",
        stack=True,
    )
    b.panel(
        "Non-OK answers by tenant and code",
        [
            (
                f'sum by (tenant, code) (rate(marquee_gateway_requests_total{{{gw}, code!="OK"}}[$__rate_interval]))',
                "{{tenant}} {{code}}",
            )
        ],
        unit="reqps",
        description="RESOURCE_EXHAUSTED here is a tenant over its quota or queue; UNAUTHENTICATED a bad credential.",
    )
    b.panel(
        "Gateway latency by method",
        quantiles("marquee_grpc_request_duration_seconds", "method", f'{NS}, component="gateway"', "{{method}}"),
        unit="s",
    )
    b.panel(
        "Backend calls/s by backend and code",
        [
            (
                f"sum by (backend, code) (rate(marquee_gateway_backend_requests_total{{{NS}}}[$__rate_interval]))",
                "{{backend}} {{code}}",
            ),
            (
                f"sum by (backend) (rate(marquee_gateway_retries_total{{{NS}}}[$__rate_interval]))",
                "{{backend}} retries",
            ),
        ],
        unit="reqps",
    )
    b.panel(
        "Healthy backend replicas",
        [(f"min by (backend) (marquee_gateway_endpoints_healthy{{{NS}}})", "{{backend}}")],
        w=12,
        description="Lowest count any gateway pod sees; 0 means calls to that backend fail.",
    )
    b.panel(
        "Refused credentials/s by reason",
        [
            (
                f"sum by (reason) (rate(marquee_gateway_auth_failures_total{{{NS}}}[$__rate_interval]))",
                "{{reason}}",
            )
        ],
        unit="reqps",
    )
    sel = f'{NS}, component=~"$component"'
    b.row("Services: per service and method")
    b.panel(
        "Calls/s by service and method",
        [
            (
                f"sum by (component, method) (rate(marquee_grpc_requests_total{{{sel}}}[$__rate_interval]))",
                "{{component}} {{method}}",
            )
        ],
        unit="reqps",
    )
    b.panel(
        "Server errors by service and method (share of calls)",
        [
            (
                f'sum by (component, method) (rate(marquee_grpc_requests_total{{{sel}, code=~"{ERROR_CODES}"}}[$__rate_interval]))'
                f" / sum by (component, method) (rate(marquee_grpc_requests_total{{{sel}}}[$__rate_interval]))",
                "{{component}} {{method}}",
            )
        ],
        unit="percentunit",
    )
    b.panel(
        "Latency by service",
        quantiles("marquee_grpc_request_duration_seconds", "component", sel, "{{component}}"),
        unit="s",
    )
    b.panel(
        "Answers/s by service and code",
        [
            (
                f"sum by (component, code) (rate(marquee_grpc_requests_total{{{sel}}}[$__rate_interval]))",
                "{{component}} {{code}}",
            )
        ],
        unit="reqps",
        stack=True,
    )
    b.panel(
        "Ready model versions",
        [(f"sum by (component, model) (marquee_model_ready{{{sel}}})", "{{component}} {{model}}")],
        w=24,
        description="Pods × versions that are loaded and warm, per model. A model at 0 is not served.",
    )
    return b


def batching() -> Board:
    b = Board(
        "marquee-batching",
        "Marquee / Batching",
        "Dynamic batching in the model services and request coalescing in the gateway.",
        [
            datasource_var(),
            query_var("namespace", "Namespace", "label_values(marquee_batcher_batches_total, namespace)"),
            query_var(
                "model",
                "Model",
                'label_values(marquee_batcher_batches_total{namespace=~"$namespace"}, model)',
            ),
        ],
    )
    sel = f'{NS}, model=~"$model"'
    b.row("Batch sizes")
    b.panel(
        "Batch size distribution",
        [(f"sum by (le) (rate(marquee_batcher_batch_size_bucket{{{sel}}}[$__rate_interval]))", "{{le}}")],
        kind="heatmap",
        description="Items per model execution.",
    )
    b.panel(
        "Mean batch size and cap",
        [
            (
                f"sum by (model) (rate(marquee_batcher_items_total{{{sel}}}[$__rate_interval]))"
                f" / sum by (model) (rate(marquee_batcher_batches_total{{{sel}}}[$__rate_interval]))",
                "{{model}} mean",
            ),
            (f"max by (model) (marquee_batcher_effective_max_batch{{{sel}}})", "{{model}} cap (warm-up profile)"),
        ],
    )
    b.panel(
        "Items/s and executions/s",
        [
            (f"sum by (model) (rate(marquee_batcher_items_total{{{sel}}}[$__rate_interval]))", "{{model}} items"),
            (f"sum by (model) (rate(marquee_batcher_batches_total{{{sel}}}[$__rate_interval]))", "{{model}} batches"),
        ],
        unit="ops",
    )
    b.panel(
        "Queue depth",
        [
            (f"sum by (model) (marquee_batcher_queue_depth{{{sel}}})", "{{model}} total"),
            (f"max by (model) (marquee_batcher_queue_depth{{{sel}}})", "{{model}} worst pod"),
        ],
        description="Items waiting for a lane. Growing queues mean the model is the bottleneck.",
    )
    b.row("Where the time goes")
    b.panel(
        "Queue wait vs compute (p50, p99)",
        quantiles("marquee_batcher_queue_wait_seconds", "model", sel, "{{model}} queue wait")
        + quantiles("marquee_model_compute_seconds", "model", sel, "{{model}} compute"),
        unit="s",
        w=24,
    )
    b.panel(
        "Refused or dropped items/s by reason",
        [
            (
                f"sum by (model, reason) (rate(marquee_batcher_rejected_total{{{sel}}}[$__rate_interval]))",
                "{{model}} {{reason}}",
            )
        ],
        unit="ops",
        description="queue_full: refused with RESOURCE_EXHAUSTED; deadline: expired while queued; cancelled: the caller left.",
    )
    b.panel(
        "Gateway coalescing: items per backend call",
        quantiles("marquee_gateway_batch_size", "route", NS, "{{route}}")
        + [
            (
                f"sum by (route) (rate(marquee_gateway_batch_size_sum{{{NS}}}[$__rate_interval]))"
                f" / sum by (route) (rate(marquee_gateway_batch_size_count{{{NS}}}[$__rate_interval]))",
                "mean {{route}}",
            )
        ],
        description="Single-item calls from many clients merged into one batched backend call.",
    )
    return b


def mesh() -> Board:
    b = Board(
        "marquee-mesh",
        "Marquee / Service mesh",
        "What the mesh proxies measure for Marquee's workloads: Linkerd (request_total, "
        "response_total, response_latency_ms) or Istio (istio_requests_total, "
        "istio_request_duration_milliseconds). Only the rows of the mesh in use have data.",
        [
            datasource_var(),
            query_var("namespace", "Namespace", "label_values(marquee_grpc_requests_total, namespace)"),
            query_var(
                "workload",
                "Workload",
                'label_values(marquee_grpc_requests_total{namespace=~"$namespace"}, component)',
            ),
        ],
    )
    ld = f'{NS}, direction="inbound", deployment=~".*-($workload)"'
    b.row("Linkerd")
    b.panel(
        "Inbound requests/s by deployment",
        [(f"sum by (deployment) (rate(request_total{{{ld}}}[$__rate_interval]))", "{{deployment}}")],
        unit="reqps",
    )
    b.panel(
        "Success rate by deployment",
        [
            (
                f'sum by (deployment) (rate(response_total{{{ld}, classification="success"}}[$__rate_interval]))'
                f" / sum by (deployment) (rate(response_total{{{ld}}}[$__rate_interval]))",
                "{{deployment}}",
            )
        ],
        unit="percentunit",
    )
    b.panel(
        "Inbound latency by deployment",
        quantiles("response_latency_ms", "deployment", ld, "{{deployment}}"),
        unit="ms",
        w=24,
    )
    ist = f'destination_workload_namespace=~"$namespace", reporter="destination", destination_workload=~".*-($workload)"'
    b.row("Istio")
    b.panel(
        "Requests/s by workload",
        [
            (
                f"sum by (destination_workload) (rate(istio_requests_total{{{ist}}}[$__rate_interval]))",
                "{{destination_workload}}",
            )
        ],
        unit="reqps",
    )
    b.panel(
        "gRPC errors by workload (share of requests)",
        [
            (
                f'sum by (destination_workload) (rate(istio_requests_total{{{ist}, grpc_response_status!~"0|"}}[$__rate_interval]))'
                f" / sum by (destination_workload) (rate(istio_requests_total{{{ist}}}[$__rate_interval]))",
                "{{destination_workload}}",
            )
        ],
        unit="percentunit",
    )
    b.panel(
        "Latency by workload",
        quantiles("istio_request_duration_milliseconds", "destination_workload", ist, "{{destination_workload}}"),
        unit="ms",
        w=24,
    )
    return b


def language() -> Board:
    b = Board(
        "marquee-language",
        "Marquee / Language",
        "Text generation (marquee-language): tokens/s, time to first token, inter-token latency, "
        "the continuous batch (running sequences, KV cache, token budget) and its waiting queue.",
        [
            datasource_var(),
            query_var("namespace", "Namespace", "label_values(marquee_language_generated_tokens_total, namespace)"),
            query_var(
                "model",
                "Model",
                'label_values(marquee_language_generated_tokens_total{namespace=~"$namespace"}, model)',
            ),
        ],
    )
    sel = f'{NS}, model=~"$model"'
    b.row("Throughput")
    b.panel(
        "Tokens/s: generated and prompt",
        [
            (
                f"sum by (model) (rate(marquee_language_generated_tokens_total{{{sel}}}[$__rate_interval]))",
                "{{model}} generated",
            ),
            (
                f"sum by (model) (rate(marquee_language_prompt_tokens_total{{{sel}}}[$__rate_interval]))",
                "{{model}} prompt (prefilled)",
            ),
        ],
        unit="short",
        description="Generated tokens/s is the decode throughput; prompt tokens/s the prefill work.",
    )
    b.panel(
        "Generations finished/s by reason",
        [
            (
                f"sum by (model, reason) (rate(marquee_language_finished_total{{{sel}}}[$__rate_interval]))",
                "{{model}} {{reason}}",
            )
        ],
        unit="ops",
        stack=True,
        description="length: max_new_tokens or the context reached; stop: a stop sequence; eos: the model ended it.",
    )
    b.row("Latency")
    b.panel(
        "Time to first token (p50, p99)",
        quantiles("marquee_language_time_to_first_token_seconds", "model", sel, "{{model}}"),
        unit="s",
        description="From arrival (queue included) to the first generated token.",
    )
    b.panel(
        "Inter-token latency (p50, p99)",
        quantiles("marquee_language_inter_token_latency_seconds", "model", sel, "{{model}}"),
        unit="s",
        description="Between consecutive tokens of one sequence: what a streaming reader sees.",
    )
    b.panel(
        "Model step time by phase (p50, p99)",
        quantiles("marquee_language_step_seconds", "model, phase", sel, "{{model}} {{phase}}"),
        unit="s",
        w=24,
        description="prefill: admitted prompts together; decode: one token for every running sequence.",
    )
    b.row("Continuous batch and queue")
    b.panel(
        "Running sequences",
        [
            (f"sum by (model) (marquee_language_running_sequences{{{sel}}})", "{{model}} total"),
            (f"max by (model) (marquee_language_running_sequences{{{sel}}})", "{{model}} busiest pod"),
        ],
        description="Sequences decoded together (at most language.max_batch_size per pod).",
    )
    b.panel(
        "KV-cache and token-budget use",
        [
            (
                f"max by (model) (marquee_language_kv_cache_used_tokens{{{sel}}}"
                f" / marquee_language_kv_cache_capacity_tokens{{{sel}}})",
                "{{model}} KV cache (busiest pod)",
            ),
            (
                f"max by (model) (marquee_language_token_budget_used{{{sel}}}"
                f" / marquee_language_token_budget_capacity{{{sel}}})",
                "{{model}} token budget (busiest pod)",
            ),
        ],
        unit="percentunit",
        description="KV cache: positions held / slots x context. Token budget: prompt + max_new_tokens "
        "reserved by running sequences / language.max_total_tokens; a full budget holds newcomers in the queue.",
    )
    b.panel(
        "Waiting queue depth",
        [
            (f"sum by (model) (marquee_batcher_queue_depth{{{sel}}})", "{{model}} total"),
            (f"max by (model) (marquee_batcher_queue_depth{{{sel}}})", "{{model}} worst pod"),
        ],
        description="Requests waiting for admission to the running batch (bounded by language.queue_capacity).",
    )
    b.panel(
        "Refused or dropped requests/s by reason",
        [
            (
                f"sum by (model, reason) (rate(marquee_batcher_rejected_total{{{sel}}}[$__rate_interval]))",
                "{{model}} {{reason}}",
            )
        ],
        unit="ops",
        description="queue_full: refused with RESOURCE_EXHAUSTED; deadline: expired waiting or mid-generation; "
        "cancelled: the caller left.",
    )
    return b


def recommendation() -> Board:
    b = Board(
        "marquee-recommendation",
        "Marquee / Recommendation",
        "The recommendation pipeline (marquee-recommendation): stage latency, exposure of the "
        "catalogue, cold starts, exact-search fallbacks, feedback and the feedback log.",
        [
            datasource_var(),
            query_var(
                "namespace", "Namespace", "label_values(marquee_recommendation_served_items_total, namespace)"
            ),
            query_var(
                "pod",
                "Pod",
                'label_values(marquee_recommendation_served_items_total{namespace=~"$namespace"}, pod)',
            ),
        ],
    )
    sel = f'{NS}, pod=~"$pod"'
    lists = f'sum(rate(marquee_recommendation_stage_seconds_count{{{sel}, stage="retrieve"}}[$__rate_interval]))'
    b.row("Pipeline")
    b.panel(
        "Stage latency (p50, p99)",
        quantiles("marquee_recommendation_stage_seconds", "stage", sel, "{{stage}}"),
        unit="s",
        description="retrieve (user tower + ANN search), filter (with any exact-search fallback), rank, "
        "rerank (diversity, long-tail floor), explain (only when asked).",
    )
    b.panel(
        "Calls/s by method and code",
        [
            (
                f'sum by (method, code) (rate(marquee_grpc_requests_total{{{sel}, component="recommendation"}}[$__rate_interval]))',
                "{{method}} {{code}}",
            )
        ],
        unit="reqps",
        stack=True,
    )
    b.panel(
        "Lists/s, cold starts and exact-search fallbacks",
        [
            (lists, "lists"),
            (
                f"sum(rate(marquee_recommendation_cold_start_total{{{sel}}}[$__rate_interval]))",
                "cold start",
            ),
            (
                f"sum(rate(marquee_recommendation_exact_fallback_total{{{sel}}}[$__rate_interval]))",
                "exact-search fallback",
            ),
        ],
        unit="ops",
        description="Cold start: a subject without history (new, forgotten or anonymous). Fallback: the filters "
        "left fewer than k of the ANN candidates, so the whole catalogue was scanned.",
    )
    b.panel(
        "Exact-search fallback share",
        [
            (
                f"sum(rate(marquee_recommendation_exact_fallback_total{{{sel}}}[$__rate_interval])) / {lists}",
                "share of lists",
            )
        ],
        unit="percentunit",
        description="Restrictive filters cost a full scan each; a high share means raising "
        "recommendation.candidates or revisiting the filters.",
    )
    b.row("Exposure (per pod, since it started)")
    b.panel(
        "Exposure Gini",
        [(f"max by (pod) (marquee_recommendation_exposure_gini{{{sel}}})", "{{pod}}")],
        w=8,
        description="Gini of item exposure over the catalogue: 0 = every item served equally, 1 = one item takes all.",
    )
    b.panel(
        "Catalogue coverage",
        [(f"max by (pod) (marquee_recommendation_catalog_coverage_ratio{{{sel}}})", "{{pod}}")],
        unit="percentunit",
        w=8,
        description="Distinct items served / catalogue size.",
    )
    b.panel(
        "Long-tail share of served slots",
        [(f"max by (pod) (marquee_recommendation_long_tail_share_ratio{{{sel}}})", "{{pod}}")],
        unit="percentunit",
        w=8,
        description="Slots that went to items outside the most popular 20 %; the long_tail_floor keeps it up.",
    )
    b.panel(
        "Items served/s",
        [(f"sum(rate(marquee_recommendation_served_items_total{{{sel}}}[$__rate_interval]))", "items")],
        unit="ops",
        w=24,
    )
    b.row("Feedback and erasure")
    b.panel(
        "Feedback events/s by type",
        [
            (
                f"sum by (event) (rate(marquee_recommendation_feedback_events_total{{{sel}}}[$__rate_interval]))",
                "{{event}}",
            )
        ],
        unit="ops",
        stack=True,
        w=8,
        description="Recorded durably (fsynced) before RecordFeedback answered.",
    )
    b.panel(
        "Users forgotten",
        [(f"sum(increase(marquee_recommendation_users_forgotten_total{{{sel}}}[$__range]))", "ForgetUser")],
        kind="stat",
        w=8,
        description="Completed ForgetUser calls in the dashboard's time range.",
    )
    b.panel(
        "Feedback-log bytes dropped at start",
        [(f"max by (pod) (marquee_recommendation_feedback_log_dropped_bytes_total{{{sel}}})", "{{pod}}")],
        unit="bytes",
        kind="stat",
        w=8,
        description="A torn or corrupt tail cut off the feedback log when the pod started; anything above 0 "
        "means feedback after that point was lost (see MarqueeRecommendationFeedbackLogTruncated).",
    )
    b.panel(
        "Feedback-database errors/s by call",
        [
            (
                f"sum by (op) (rate(marquee_recommendation_database_errors_total{{{sel}}}[$__rate_interval]))",
                "{{op}}",
            )
        ],
        unit="ops",
        w=24,
        description="PostgreSQL store only: calls that failed with UNAVAILABLE because the database did not answer "
        "(nothing acknowledged; see MarqueeRecommendationDatabaseUnavailable). Always 0 with the file store.",
    )
    return b


BOARDS = {
    "overview": overview,
    "batching": batching,
    "language": language,
    "recommendation": recommendation,
    "mesh": mesh,
}


def render(name: str) -> str:
    return json.dumps(BOARDS[name]().json(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    stale = []
    for name in BOARDS:
        path = HERE / f"{name}.json"
        text = render(name)
        if "--check" in sys.argv[1:]:
            if not path.is_file() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale dashboards (run python {Path(__file__).name}): {', '.join(stale)}", file=sys.stderr)
        sys.exit(1)
