"""The front process holds no weights, so it imports no torch (nor bitsandbytes, peft, xgrammar,
accelerate): a server started in a fresh interpreter, every task answered once, then its
`sys.modules` read. What it saves is the resident memory of `bench/serve_memory.py`."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ["torch", "bitsandbytes", "peft", "xgrammar", "accelerate", "sentence_transformers"]

# Runs in the fresh interpreter: the front as `bitserve serve` runs it (bitserve.api.server.Server,
# the engines in their own processes), one request per task and backend, then what it imported.
SCRIPT = """
import asyncio, json, sys

from bitserve.api.server import Server
from bitserve.settings import build_settings
from bitserve_client import AsyncClient

cfg = json.loads(sys.argv[1])
heavy = json.loads(sys.argv[2])


async def main():
    server = Server(build_settings(config_data=cfg, environ={}))
    await server.start()
    try:
        async with AsyncClient(f"127.0.0.1:{server.port}", timeout=120) as c:
            await c.generate("hello", model="lm", max_new_tokens=4)
            await c.generate("hello", model="lm", max_new_tokens=8, regex="[a-z]{1,4}")
            await c.chat([{"role": "user", "content": "hi"}], model="lm", max_new_tokens=4)
            await c.classify("hello", model="lm-classify")
            await c.sentiment("I love it", model="lm-sentiment")
            await c.translate("hello", model="lm-translate", target_lang="fr", max_new_tokens=4)
            await c.classify("hello", model="topics")
            await c.translate("hello", model="t5", source_lang="en", target_lang="fr", max_new_tokens=4)
            await c.list_models()
    finally:
        await server.stop(grace=1.0)
    print(json.dumps(sorted(m for m in heavy if m in sys.modules)))


asyncio.run(main())
"""


def test_the_front_process_imports_no_torch(tiny_models, tiny_chat_lm):
    m = tiny_models
    lm = str(tiny_chat_lm)
    cfg = {
        "server": {"host": "127.0.0.1", "port": 0, "metrics_port": -1},
        "models": [
            {"name": "lm", "task": "generate", "path": lm},
            {"name": "lm-classify", "task": "classify", "path": lm, "labels": ["yes", "no"]},
            {"name": "lm-sentiment", "task": "sentiment", "path": lm},
            {"name": "lm-translate", "task": "translate", "path": lm},
            {"name": "topics", "task": "classify", "path": str(m["topics"])},
            {"name": "t5", "task": "translate", "path": str(m["t5"])},
        ],
    }
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(cfg), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []
