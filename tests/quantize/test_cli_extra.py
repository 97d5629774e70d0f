"""`quantize` without the `quantize` extra: every command, --help included, names the extra."""

from __future__ import annotations

import importlib.util

import pytest

from bitserve_quantize import cli


@pytest.mark.parametrize("argv", [["--help"], ["export", "--help"]])
def test_without_the_extra_quantize_says_which_extra_to_install(monkeypatch, capsys, argv):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        cli.importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a)
    )
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"quantize: needs the `quantize` extra (missing: peft): {cli.INSTALL_EXTRA}"
    assert "'.[quantize]'" in cli.INSTALL_EXTRA


def test_with_the_extra_help_is_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0 and "finetune" in capsys.readouterr().out
