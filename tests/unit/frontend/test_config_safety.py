"""Config that would serve nothing is refused; every bad key is named (issue 9, defect 8)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bitserve.errors import ConfigError
from bitserve.settings import build_settings


@pytest.mark.parametrize("yaml_text", ["", "models: []\n", "server: {port: 6000}\n"])
def test_a_config_without_models_is_refused(tmp_path, yaml_text):
    p = tmp_path / "c.yaml"
    p.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        build_settings(p, environ={})
    assert str(err.value) == "models: at least one model is required (a server with none serves nothing)"


def test_check_config_fails_on_an_empty_config(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("server: {port: 6000}\n")
    r = subprocess.run(
        [sys.executable, "-m", "bitserve.cli", "check-config", "--config", str(p)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stdout
    assert "models: at least one model is required" in r.stderr


def test_every_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        "server: {prot: 1, hots: x}\nmodels: [{name: a, task: classify, path: ., quantise: int8}]\nextra: 1\n"
    )
    with pytest.raises(ConfigError) as err:
        build_settings(p, environ={})
    msg = str(err.value)
    for key in ("server.prot", "server.hots", "models.0.quantise", "extra"):
        assert f"{key}: unknown key" in msg, msg
    assert "more)" not in msg and "\n" not in msg
