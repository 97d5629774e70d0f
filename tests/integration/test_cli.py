"""`bitserve serve` as an operator runs it: a real process, health probe, client, SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from bitserve_client import Client

from ..numeric import forward_bound, softmax_bound


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health(port: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bitserve.cli", "health", "--target", f"127.0.0.1:{port}", "--timeout", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _reference_top(path, text):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    enc = AutoTokenizer.from_pretrained(path)(text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[0]
    probs = torch.softmax(logits, -1)
    i = int(probs.argmax())
    # The served score is the same fp32 function, other reduction orders (tests/numeric.py).
    tol = softmax_bound(
        forward_bound(model.config, enc["input_ids"].shape[1], logits.abs().max().item(), heads=2)
    )
    return model.config.id2label[i], probs[i].item(), tol


def test_serve_probe_call_and_graceful_sigterm(tmp_path, tiny_models):
    port, metrics_port = _free_port(), _free_port()
    cfg = tmp_path / "bitserve.yaml"
    cfg.write_text(
        "server: {host: 127.0.0.1, port: 1}\n"
        f"models:\n  - {{name: topics, task: classify, path: {tiny_models['topics']}}}\n"
    )
    env = {**os.environ, "BITSERVE_SERVER__METRICS_PORT": str(metrics_port)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bitserve.cli", "serve", "--config", str(cfg), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            r = _health(port)
            if r.returncode == 0:
                break
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "server never became SERVING"
            time.sleep(0.5)
        assert r.stdout.strip() == "SERVING"
        with Client(f"127.0.0.1:{port}", timeout=30) as c:
            top = c.classify("hello")[0]
        label, score, tol = _reference_top(tiny_models["topics"], "hello")
        assert top.label == label and top.score == pytest.approx(score, abs=tol)
        import urllib.request

        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
        from prometheus_client.parser import text_string_to_metric_families

        ok = [
            x.value
            for f in text_string_to_metric_families(body.decode())
            for x in f.samples
            if x.name == "bitserve_requests_total"
            and x.labels.get("model") == "topics"
            and x.labels["code"] == "OK"
        ]
        assert ok == [1.0], body  # exactly the one Classify call
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _health(port).returncode != 0


def test_a_model_that_cannot_load_exits_with_one_line(tmp_path, tiny_models):
    cfg = tmp_path / "bitserve.yaml"
    cfg.write_text(
        f"server: {{host: 127.0.0.1, port: {_free_port()}, metrics_port: -1}}\n"
        f"models:\n  - {{name: moody, task: sentiment, path: {tiny_models['tags']}}}\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "bitserve.cli", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    last = [line for line in r.stderr.splitlines() if line.startswith("bitserve:")]
    assert len(last) == 1 and "models.0 (moody)" in last[0] and "cannot map labels" in last[0], r.stderr


@pytest.mark.parametrize("args", [["serve", "--config", "/nope.yaml"]])
def test_missing_config_file(args):
    r = subprocess.run(
        [sys.executable, "-m", "bitserve.cli", *args], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "config file '/nope.yaml' not found" in r.stderr
