"""The GGUF -> safetensors cache is verified at load and rebuilt when it fails (issue 9, defect 5).

The conversion itself is replaced by a copy of the tiny causal LM checkpoint, so a real model
loads from a real cache entry, offline, in seconds.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from bitserve.models import demo, gguf_cache
from bitserve.models.loading import load_checkpoint


@pytest.fixture()
def cache(tmp_path, monkeypatch, tiny_models):
    monkeypatch.setenv("BITSERVE_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def fake_convert(src, out):
        calls.append(src)
        for f in tiny_models["lm"].iterdir():
            if f.is_file():
                shutil.copy(f, out / f.name)

    monkeypatch.setattr(demo, "_convert", fake_convert)
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    return gguf, calls


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[5, 6, 7, 8]])).logits


def test_entry_records_size_and_hash_of_every_file(cache):
    gguf, calls = cache
    entry = demo.gguf_checkpoint(gguf)
    assert gguf_cache.verify(entry) is None
    assert demo.gguf_checkpoint(gguf) == entry and len(calls) == 1, "a good entry is reused"


@pytest.mark.parametrize("damage", ["truncate", "flip_a_byte", "delete_manifest"])
def test_a_damaged_entry_is_rebuilt_and_the_model_loads(cache, tiny_models, caplog, damage):
    gguf, calls = cache
    reference = logits(AutoModelForCausalLM.from_pretrained(str(tiny_models["lm"])))
    entry = demo.gguf_checkpoint(gguf)
    weights = entry / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":  # a full disk, a killed copy
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "flip_a_byte":  # same size, different content
        weights.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    else:
        (entry / gguf_cache.MANIFEST).unlink()
    caplog.set_level(logging.WARNING)
    loaded = load_checkpoint(str(gguf), AutoModelForCausalLM, device="cpu")
    assert len(calls) == 2, "the damaged entry is converted again"
    assert gguf_cache.verify(entry) is None
    torch.testing.assert_close(logits(loaded.model), reference)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(entry) in w and "failed verification" in w for w in warnings), warnings


def test_stale_temporaries_are_swept_and_live_ones_kept(cache):
    gguf, _ = cache
    root = demo.cache_dir() / "gguf"
    root.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = root / f".tiny-64-1-v2-pid{dead.pid}-abc"  # its converter was killed (kill -9)
    live = root / f".tiny-64-1-v2-pid{os.getpid()}-def"  # a conversion running in this process
    unknown_fresh = root / ".tiny-64-1-v2-xyz"  # owner unknown (old naming), recent
    unknown_old = root / ".tiny-64-1-v2-old"  # owner unknown, hours old
    for d in (killed, live, unknown_fresh, unknown_old):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 1000)
    hours_ago = time.time() - gguf_cache.STALE_AFTER_S - 60
    os.utime(unknown_old, (hours_ago, hours_ago))
    demo.gguf_checkpoint(gguf)
    assert not killed.exists() and not unknown_old.exists()
    assert live.exists() and unknown_fresh.exists()
    entries = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    assert len(entries) == 1 and entries[0].startswith("tiny-")


def test_a_failed_rebuild_names_the_cache_entry(cache, monkeypatch):
    gguf, _ = cache
    entry = demo.gguf_checkpoint(gguf)
    (entry / "model.safetensors").write_bytes(b"")

    def full_disk(src, out):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(demo, "_convert", full_disk)
    from bitserve.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        demo.gguf_checkpoint(gguf)
    assert str(entry) in str(err.value) and "No space left" in str(err.value)
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".")], "no temporary left behind"
