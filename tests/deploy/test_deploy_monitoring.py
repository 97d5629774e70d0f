"""deploy/monitoring: every metric and label the dashboard and the rules query is one the server exports.

A real in-process server on a tiny model answers a few calls (one of them an error), then its
/metrics page is the reference: a renamed metric or label in server/bitserve/metrics.py, or a
typo in a query, fails here. tests/deploy/test_deploy_prometheus.py (slow) runs the queries in a real
Prometheus.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bitserve_client import Client
from bitserve_client.errors import NotFoundError

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"instance", "job"}


def dashboard_expressions() -> list[str]:
    dash = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def rule_expressions() -> list[str]:
    rules = yaml.safe_load((MONITORING / "rules.yaml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


_SELECTOR = re.compile(r"\b(bitserve_\w+)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|on|without|ignoring)\s*\(([^)]*)\)")
_LABEL_VALUES = re.compile(r"label_values\((\w+),\s*(\w+)\)")


def problems(exprs: list[str], exported: dict[str, set[str]]) -> list[str]:
    """What in `exprs` the server does not export: metric names, matcher labels, grouping labels.

    `exported` maps each sample name (`..._total`, `..._bucket`, gauges) to its label names.
    """
    out: list[str] = []
    for expr in exprs:
        names: list[str] = []
        for name, matchers in _SELECTOR.findall(expr):
            names.append(name)
            if name not in exported:
                out.append(f"{name} (in {expr!r}) is not exported")
                continue
            for label in _MATCHER.findall(matchers or ""):
                if label not in exported[name]:
                    out.append(f"{name} has no label {label!r} (in {expr!r})")
        for name, label in _LABEL_VALUES.findall(expr):
            if label not in exported.get(name, set()):
                out.append(f"{name} has no label {label!r} (in {expr!r})")
        known = set().union(*(exported.get(n, set()) for n in names)) | TARGET_LABELS
        for group in _GROUPING.findall(expr):
            for label in (x.strip() for x in group.split(",") if x.strip()):
                if label not in known:
                    out.append(f"grouping label {label!r} is on none of {names} (in {expr!r})")
    return out


@pytest.fixture(scope="module")
def exported(tiny_models, server_factory, tmp_path_factory) -> dict[str, set[str]]:
    # A generation model and a batched (classify) one: queue wait is a batcher metric. A tenant
    # with every kind of limit, for the per-tenant row and the near-quota alert.
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text("monitoring-test-token acme\n")
    limits = {
        "requests_per_second": 100,
        "max_concurrent_sequences": 64,
        "queue_share": 0.5,
        "prompt_tokens_per_minute": 100_000,
        "generated_tokens_per_minute": 100_000,
    }
    srv = server_factory(
        [
            {"name": "lm", "task": "generate", "path": str(tiny_models["lm"])},
            {"name": "topics", "task": "classify", "path": str(tiny_models["topics"])},
        ],
        auth_tokens_file=str(tokens),
        tenants={"acme": limits},
    )
    with Client(srv.target, token="monitoring-test-token") as c:
        c.generate("hello there", max_new_tokens=4)
        c.classify(["markets fell", "the match ended"], model="topics")
        list(c.generate_stream("hello", max_new_tokens=3))
        with pytest.raises(NotFoundError):  # an error, so bitserve_requests_total has a code != OK
            c.generate("hello", model="missing")
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def test_dashboard_queries_only_exported_metrics_and_labels(exported):
    exprs = dashboard_expressions()
    assert len(exprs) >= 12
    assert problems(exprs, exported) == []


def test_rules_query_only_exported_metrics_and_labels(exported):
    exprs = rule_expressions()
    assert problems(exprs, exported) == []


def test_dashboard_covers_the_serving_signals():
    """The panels the issue asks for, each named by the metric it plots."""
    text = " ".join(dashboard_expressions())
    for metric in (
        "bitserve_requests_total",  # throughput and errors by code
        "bitserve_generated_tokens_total",
        "bitserve_request_duration_seconds_bucket",
        "bitserve_time_to_first_token_seconds_bucket",
        "bitserve_inter_token_latency_seconds_bucket",
        "bitserve_queue_depth",
        "bitserve_batch_size_bucket",
        "bitserve_model_weight_memory_bytes",
        "bitserve_running_sequences",
        # per tenant
        "bitserve_tenant_requests_total",
        "bitserve_tenant_generated_tokens_total",
        "bitserve_tenant_prompt_tokens_total",
        "bitserve_tenant_queue_wait_seconds_bucket",
        "bitserve_tenant_limit_usage_ratio",
    ):
        assert metric in text, metric
    assert re.search(r"sum by \(model, code\) \(rate\(bitserve_requests_total\{[^}]*code!=\"OK\"", text)


def test_alerts_cover_errors_saturation_latency_and_loading():
    rules = yaml.safe_load((MONITORING / "rules.yaml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert {
        "BitserveErrorRatioHigh",
        "BitserveQueueSaturated",
        "BitserveLatencyP99High",
        "BitserveModelNotLoaded",
        "BitserveTenantNearQuota",
    } <= set(alerts)
    assert "histogram_quantile(0.99" in alerts["BitserveLatencyP99High"]["expr"]
    assert "bitserve_model_loaded" in alerts["BitserveModelNotLoaded"]["expr"]


def test_the_checker_catches_a_renamed_metric_and_a_wrong_label(exported):
    bad = [
        "rate(bitserve_request_total[5m])",  # the counter is bitserve_requests_total
        'sum by (model) (bitserve_queue_depth{modle="x"})',
        "sum by (method) (bitserve_queue_depth)",  # the queue gauge has no method label
        "label_values(bitserve_model_loaded, name)",
    ]
    found = problems(bad, exported)
    assert len(found) == 4, found
    assert "bitserve_request_total" in found[0] and "'modle'" in found[1]
    assert "'method'" in found[2] and "'name'" in found[3]
