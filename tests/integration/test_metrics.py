"""The Prometheus exposition, as a Prometheus user reads it (issue 10 item 9)."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bitserve_proto.v1 import inference_pb2 as pb
from bitserve_proto.v1 import inference_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def srv(server_factory, tiny_models):
    s = server_factory([{"name": "sent", "task": "sentiment", "path": str(tiny_models["sentiment"])}])
    with grpc.insecure_channel(s.target) as ch:
        stub = pb_grpc.InferenceStub(ch)
        stub.Sentiment(pb.SentimentRequest(texts=["good"]), timeout=60)
        with pytest.raises(grpc.RpcError):
            stub.Sentiment(pb.SentimentRequest(texts=[""]), timeout=60)
    return s


def exposition(srv) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()


def test_request_duration_is_labelled_by_status_code(srv):
    fams = {f.name: f for f in text_string_to_metric_families(exposition(srv))}
    counts = {
        s.labels["code"]: s.value
        for s in fams["bitserve_request_duration_seconds"].samples
        if s.name == "bitserve_request_duration_seconds_count" and s.labels["model"] == "sent"
    }
    assert counts == {"OK": 1, "INVALID_ARGUMENT": 1}


def test_duration_buckets_are_fine_between_1_and_10_seconds(srv):
    fams = {f.name: f for f in text_string_to_metric_families(exposition(srv))}
    bounds = sorted(
        {
            float(s.labels["le"])
            for s in fams["bitserve_request_duration_seconds"].samples
            if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"
        }
    )
    between = [b for b in bounds if 1 <= b <= 10]
    assert len(between) >= 8, between
    assert max(b / a for a, b in zip(between, between[1:])) <= 1.5, between


def test_process_metrics_are_exported(srv):
    names = {f.name for f in text_string_to_metric_families(exposition(srv))}
    for name in ("process_resident_memory_bytes", "process_cpu_seconds", "process_open_fds"):
        assert name in names, sorted(n for n in names if n.startswith("process"))


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (Debian: apt-get install prometheus); exposition not linted",
)
def test_promtool_check_metrics_passes(srv):
    r = subprocess.run(
        ["promtool", "check", "metrics"], input=exposition(srv), capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr
