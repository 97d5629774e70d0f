"""The client installs alone: a fresh venv with only clients/python talks to a real server.

Marked `registry`: pip fetches the client's dependencies (grpcio, protobuf) and its build
backend from the package registry (CI runs these). The server runs here, from this venv, over
tiny checkpoints; the answers the lone client gets must equal what this venv's client gets.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import bitserve
from bitserve_client import CONTRACT_REVISION, Client

ROOT = Path(__file__).resolve().parents[2]

# Runs inside the client-only venv: every call the issue names, printed as JSON.
CLIENT_SCRIPT = """
import json, sys
from bitserve_client import Client
with Client(sys.argv[1], timeout=120) as c:
    info = c.server_info()
    out = {
        "models": sorted(m.name for m in c.list_models()),
        "version": info.version,
        "revision": info.contract_revision,
        "generate": c.generate("Hello world", model="lm", max_new_tokens=8).text,
        "stream": "".join(e.text for e in c.generate_stream("Hello world", model="lm", max_new_tokens=8)),
        "classify": [[s.label, s.score] for s in c.classify("a b c", model="topics")],
        "modules": sorted(m for m in ("torch", "transformers", "bitserve") if m in sys.modules),
    }
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    """A fresh venv holding the bitserve-client distribution built from this checkout, alone."""
    tmp = tmp_path_factory.mktemp("client-venv")
    src = tmp / "src"
    # Built from a copy, so the build leaves no build/ or egg-info in the checkout.
    shutil.copytree(ROOT / "clients/python", src, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin/python"
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(src)], check=True, timeout=600
    )
    return py


@pytest.mark.registry
@pytest.mark.timeout(900)
def test_the_client_distribution_alone_calls_a_real_server(client_venv, server_factory, tiny_models):
    py = client_venv
    no_torch = subprocess.run([py, "-c", "import torch"], capture_output=True, text=True, timeout=60)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr, no_torch.stderr
    listed = subprocess.run(
        [py, "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    installed = {d["name"].lower().replace("_", "-") for d in json.loads(listed.stdout)}
    # grpcio's own dependency, typing-extensions, and the venv's installers are all that may come along.
    assert installed - {"pip", "setuptools", "typing-extensions"} == {
        "bitserve-client",
        "grpcio",
        "protobuf",
        "googleapis-common-protos",
    }

    srv = server_factory(
        [
            {"name": "lm", "task": "generate", "path": str(tiny_models["lm"])},
            {"name": "topics", "task": "classify", "path": str(tiny_models["topics"])},
        ]
    )
    run = subprocess.run(
        [py, "-c", CLIENT_SCRIPT, srv.target],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=py.parent,  # not the checkout: nothing of ours on the path but what pip installed
        env={"PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr
    lone = json.loads(run.stdout)

    with Client(srv.target, timeout=120) as c:
        here_text = c.generate("Hello world", model="lm", max_new_tokens=8).text
        here_labels = [[s.label, s.score] for s in c.classify("a b c", model="topics")]
    assert lone["models"] == ["lm", "topics"]
    assert (lone["version"], lone["revision"]) == (bitserve.__version__, CONTRACT_REVISION)
    # Greedy decoding on one server: the same text whichever client asks, streamed or not.
    assert lone["generate"] == lone["stream"] == here_text and here_text
    assert lone["classify"] == here_labels and len(here_labels) == 4
    assert lone["modules"] == []
