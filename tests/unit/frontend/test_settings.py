"""Settings: file + env + flags precedence, one-line errors naming the key, CLI exit codes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from bitserve.errors import ConfigError
from bitserve.settings import build_settings


def write(tmp_path, text: str):
    p = tmp_path / "config.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_defaults_and_file(tmp_path):
    (tmp_path / "m").mkdir()
    p = write(
        tmp_path,
        """
        models:
          - {name: m, task: classify, path: m, quantize: int8}
    """,
    )
    s = build_settings(p, environ={})
    assert (s.server.host, s.server.port, s.server.metrics_port) == ("0.0.0.0", 50051, 8000)
    assert s.models[0].quantize == "int8"
    assert s.models[0].path == str(tmp_path / "m"), "relative paths resolve against the file"
    assert s.models[0].max_batch_size == 32


def test_env_overrides_file_and_flags_override_env(tmp_path):
    (tmp_path / "m").mkdir()
    p = write(
        tmp_path,
        """
        server: {port: 6000, metrics_port: 9000}
        models:
          - {name: m, task: generate, path: m}
    """,
    )
    env = {
        "BITSERVE_SERVER__PORT": "7000",
        "BITSERVE_MODELS__0__QUANTIZE": "nf4",
        "BITSERVE_MODELS__0__MAX_BATCH_SIZE": "4",
        "BITSERVE_CACHE_DIR": "/x",
    }
    s = build_settings(p, environ=env)
    assert s.server.port == 7000 and s.server.metrics_port == 9000
    assert s.models[0].quantize == "nf4" and s.models[0].max_batch_size == 4
    s = build_settings(p, environ=env, overrides={"server": {"port": 7100}})
    assert s.server.port == 7100


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("server: {prot: 1}\n", "server.prot: unknown key"),
        ("server: {port: 99999}\n", "server.port: Input should be less than or equal to 65535"),
        ("models: [{name: a, task: summarize, path: .}]\n", "models.0.task:"),
        ("models: [{name: a, task: classify}]\n", "models.0.path: required key is missing"),
        ("models: [{name: a, task: classify, path: ., quantize: int4}]\n", "models.0.quantize:"),
        (
            "models: [{name: a, task: classify, path: /does/not/exist}]\n",
            "models.0.path: '/does/not/exist' does not exist",
        ),
        (
            "models: [{name: a, task: classify, path: .}, {name: a, task: generate, path: .}]\n",
            "duplicate model name 'a'",
        ),
        ("server: [1, 2]\n", "server:"),
    ],
)
def test_invalid_config_is_one_line_naming_the_key(tmp_path, yaml_text, message):
    p = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as err:
        build_settings(p, environ={})
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_rejects_bad_config_before_loading_anything(tmp_path):
    p = write(tmp_path, "models: [{name: a, task: classify, path: ., quantize: int3}]\n")
    r = subprocess.run(
        [sys.executable, "-m", "bitserve.cli", "serve", "--config", str(p)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "models.0.quantize" in lines[0], r.stderr


def test_cli_check_config_ok(tmp_path, tiny_models):
    p = write(tmp_path, f"models: [{{name: a, task: classify, path: {tiny_models['topics']}}}]\n")
    r = subprocess.run(
        [sys.executable, "-m", "bitserve.cli", "check-config", "--config", str(p)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "config OK: 1 models" in r.stdout
