"""A real Prometheus (Debian's `prometheus` package) scrapes a running server and answers the
dashboard's queries and the recording rules; promtool checks and unit-tests the rules.

Slow, and skipped where the binaries are absent: `apt-get install prometheus` to run it
(`pytest -m slow tests/deploy/test_deploy_prometheus.py`). It installs nothing itself.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from bitserve_client import Client
from bitserve_client.errors import NotFoundError
from tests.deploy.test_deploy_monitoring import MONITORING, dashboard_expressions

pytestmark = pytest.mark.slow

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs = pytest.mark.skipif(
    not (PROMETHEUS and PROMTOOL), reason="needs Debian's prometheus package (apt-get install prometheus)"
)


@needs
def test_promtool_checks_the_rules():
    r = subprocess.run(
        [PROMTOOL, "check", "rules", str(MONITORING / "rules.yaml")], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 14 rules found" in r.stdout


@needs
def test_promtool_unit_tests_fire_each_alert():
    r = subprocess.run(
        [PROMTOOL, "test", "rules", "rules.test.yaml"], cwd=MONITORING, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _query(base: str, expr: str) -> list:
    out = _get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert out["status"] == "success", (expr, out)
    return out["data"]["result"]


@needs
def test_prometheus_scrapes_a_server_and_answers_the_dashboard(tiny_models, server_factory, tmp_path):
    srv = server_factory(
        [
            {"name": "lm", "task": "generate", "path": str(tiny_models["lm"])},
            {"name": "topics", "task": "classify", "path": str(tiny_models["topics"])},
        ]
    )
    rules = yaml.safe_load((MONITORING / "rules.yaml").read_text())
    for g in rules["groups"]:
        g["interval"] = "1s"  # evaluate within the test's few seconds
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "rules.yaml")],
        "scrape_configs": [
            {"job_name": "bitserve", "static_configs": [{"targets": [f"127.0.0.1:{srv.metrics_port}"]}]}
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    stop = threading.Event()

    def traffic() -> None:  # bounded: at most 200 calls, stops with the test
        with Client(srv.target) as c:
            for i in range(200):
                if stop.is_set():
                    return
                c.generate(f"hello {i}", max_new_tokens=4)
                c.classify([f"markets fell {i}", "the match ended"], model="topics")
                if i % 5 == 0:
                    with pytest.raises(NotFoundError):
                        c.generate("hello", model="missing")

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        exprs = [
            e.replace("$__rate_interval", "1m").replace('model=~"$model"', 'model=~".*"')
            for e in dashboard_expressions()
            if not e.startswith("label_values")
        ]
        recorded = [r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r]
        empty = exprs + recorded
        while empty and time.monotonic() < deadline:
            time.sleep(1)
            if proc.poll() is not None:
                pytest.fail("prometheus exited: " + (tmp_path / "prometheus.log").read_text()[-2000:])
            try:
                empty = [e for e in empty if not _query(base, e)]
            except OSError:  # not listening yet
                continue
        assert empty == [], "no data after 60 s for: " + "; ".join(empty)
        # NOT_FOUND answers show on the errors panel but are client mistakes, not server errors.
        errors = _query(base, 'sum by (model, code) (rate(bitserve_requests_total{code!="OK"}[1m]))')
        assert {(s["metric"]["model"], s["metric"]["code"]) for s in errors} == {("missing", "NOT_FOUND")}
        ratio = _query(base, 'model:bitserve_server_errors:ratio_rate5m{model="lm"}')
        assert [s["value"][1] for s in ratio] == ["0"]
        # The model is loaded: the alert on it stays silent, and every rule evaluates cleanly.
        assert _query(base, 'ALERTS{alertname="BitserveModelNotLoaded"}') == []
        groups = _get(f"{base}/api/v1/rules")["data"]["groups"]
        health = {r["name"]: r["health"] for g in groups for r in g["rules"]}
        assert len(health) == 12 and set(health.values()) == {"ok"}, health
        up = _query(base, 'up{job="bitserve"}')
        assert [s["value"][1] for s in up] == ["1"]
    finally:
        stop.set()
        worker.join(30)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
