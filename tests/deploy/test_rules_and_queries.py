"""Alert rules with promtool (the real one, Debian `prometheus`), and every PromQL expression in
the dashboards and rules parsed by promql-parser. Whether the metric names exist is checked
against running services in test_live.py."""

from __future__ import annotations

import shutil
import subprocess

import promql_parser
import pytest

from conftest import (
    EXTERNAL_METRICS,
    RULE_TESTS,
    RULES_FILE,
    dashboard_exprs,
    recorded_names,
    rule_exprs,
    used_metric_names,
)

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120)


def test_promtool_check_rules():
    r = promtool("check", "rules", str(RULES_FILE))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout, r.stdout


def test_promtool_unit_tests_of_every_alert():
    r = promtool("test", "rules", str(RULE_TESTS))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout, r.stdout
    # Every alert has at least one unit test that expects it to fire.
    import yaml

    alerts = {r["alert"] for g in yaml.safe_load(RULES_FILE.read_text())["groups"] for r in g["rules"] if "alert" in r}
    tested = {
        t["alertname"]
        for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for t in case.get("alert_rule_test", [])
        if t.get("exp_alerts")
    }
    assert alerts == tested, f"alerts without a firing test: {alerts - tested}"
    assert {"MarqueeErrorBudgetBurnFast", "MarqueeLatencyBudgetBurn", "MarqueeQueueFull", "MarqueeModelNotReady", "MarqueePodRestarting"} <= alerts
    assert {
        "MarqueeLanguageTimeToFirstTokenBurn",
        "MarqueeRecommendationFeedbackLogTruncated",
        "MarqueeRecommendationExactFallbackHigh",
    } <= alerts
    # The generic queue alerts are tested on the language service's series too.
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    for name in ("MarqueeQueueFull", "MarqueeQueueSaturated"):
        components = {
            a["exp_labels"]["component"]
            for case in cases
            for t in case.get("alert_rule_test", [])
            if t["alertname"] == name
            for a in t.get("exp_alerts") or []
        }
        assert {"vision", "language"} <= components, (name, components)


def test_every_alert_has_severity_and_text():
    import yaml

    for g in yaml.safe_load(RULES_FILE.read_text())["groups"]:
        for r in g["rules"]:
            if "alert" in r:
                assert r["labels"]["severity"] in {"critical", "warning"}, r["alert"]
                assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]


EXPRS = dashboard_exprs() + rule_exprs()


@pytest.mark.parametrize("where,expr", EXPRS, ids=[w for w, _ in EXPRS])
def test_every_expression_parses(where, expr):
    ast = promql_parser.parse(expr)
    assert ast is not None, where


def test_dashboards_cover_red_batching_and_mesh():
    exprs = " ".join(e for _, e in dashboard_exprs())
    for needed in (
        "sum by (route)",
        "sum by (tenant)",
        "sum by (component, method)",
        "marquee_batcher_batch_size_bucket",
        "marquee_batcher_queue_depth",
        "marquee_batcher_queue_wait_seconds_bucket",
        "marquee_model_compute_seconds_bucket",
        "marquee_batcher_rejected_total",
        "request_total",
        "response_latency_ms_bucket",
        "istio_requests_total",
    ):
        assert needed in exprs, needed


def test_language_and_recommendation_dashboards_cover_issue_6():
    boards = {}
    for where, expr in dashboard_exprs():
        boards.setdefault(where.split(":")[0], []).append(expr)
    language = " ".join(boards["language.json"])
    for needed in (
        "marquee_language_generated_tokens_total",
        "marquee_language_prompt_tokens_total",
        "marquee_language_time_to_first_token_seconds_bucket",
        "marquee_language_inter_token_latency_seconds_bucket",
        "sum by (le, model, phase) (rate(marquee_language_step_seconds_bucket",
        "marquee_language_running_sequences",
        "marquee_language_kv_cache_used_tokens",
        "marquee_language_kv_cache_capacity_tokens",
        "marquee_language_token_budget_used",
        "marquee_language_token_budget_capacity",
        "sum by (model, reason) (rate(marquee_language_finished_total",
        "marquee_batcher_queue_depth",
        "sum by (model, reason) (rate(marquee_batcher_rejected_total",
    ):
        assert needed in language, needed
    rec = " ".join(boards["recommendation.json"])
    for needed in (
        "sum by (le, stage) (rate(marquee_recommendation_stage_seconds_bucket",
        "marquee_recommendation_exposure_gini",
        "marquee_recommendation_catalog_coverage_ratio",
        "marquee_recommendation_long_tail_share_ratio",
        "marquee_recommendation_served_items_total",
        "marquee_recommendation_cold_start_total",
        "marquee_recommendation_exact_fallback_total",
        "sum by (event) (rate(marquee_recommendation_feedback_events_total",
        "marquee_recommendation_users_forgotten_total",
        "marquee_recommendation_feedback_log_dropped_bytes_total",
    ):
        assert needed in rec, needed


def test_the_only_unexported_names_are_listed_external_or_recorded():
    """The split test_live.py relies on: every name is ours (marquee_*), recorded by our rules,
    or in the short EXTERNAL_METRICS list, and every external name is actually used."""
    used = used_metric_names()
    recorded = recorded_names()
    for name in used:
        assert name.startswith("marquee_") or name in recorded or name in EXTERNAL_METRICS, name
    assert set(EXTERNAL_METRICS) <= set(used), set(EXTERNAL_METRICS) - set(used)
    assert recorded <= set(used), "every recording rule is read by an alert"
