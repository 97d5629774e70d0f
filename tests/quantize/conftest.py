"""Fixtures for the `quantize` tool: tiny data written per test, options sized for 2 CPU cores."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from bitserve_quantize.train import FinetuneOptions

from ..numeric import forward_bound, gamma, log_softmax_bound
from . import bnb_cpu_path

TOPICS = {
    "sports": ["match", "goal", "team", "won", "football", "coach"],
    "business": ["stock", "bank", "market", "rates", "profit", "shares"],
    "tech": ["phone", "chip", "screen", "software", "computer", "app"],
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def topic_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = list(TOPICS)[i % len(TOPICS)]
        words = rng.choices(TOPICS[label], k=5) + rng.choices(["the", "a", "today", "new"], k=2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


@pytest.fixture(scope="session", autouse=True)
def bnb_cpu():
    """`BITSERVE_TEST_BNB_CPU=avx512bf16`: in-process 4-bit layers take bitsandbytes' AVX512-BF16
    inference path on this CPU, as on a CPU that has it (bnb_cpu_path.py)."""
    path = os.environ.get(bnb_cpu_path.ENV, "")
    if path not in ("", bnb_cpu_path.PATH):
        raise pytest.UsageError(f"{bnb_cpu_path.ENV}={path!r}: expected {bnb_cpu_path.PATH!r} or unset")
    if not path:
        yield None
        return
    with bnb_cpu_path.emulate():
        yield path


@pytest.fixture
def topics_data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "topics.jsonl", topic_rows(24))


@pytest.fixture
def lm_data(tmp_path) -> Path:
    """Fixed-length prompt/completion pairs: equal token counts per example keep the per-rank
    mean loss equal to the global mean, so 1- and 2-process runs are comparable exactly."""
    rows = [
        {"prompt": "Hello world, this is", "completion": " a tiny model."},
        {"prompt": "The quick brown fox", "completion": " jumps over."},
        {"prompt": "I love this movie,", "completion": " it was great."},
        {"prompt": "The team won the", "completion": " football match."},
    ] * 4
    return write_jsonl(tmp_path / "lm.jsonl", rows)


@pytest.fixture
def translate_data(tmp_path) -> Path:
    rows = [
        {"source": "translate English to French: the house is blue.", "target": "la maison est bleue."},
        {"source": "translate English to French: the cat is black.", "target": "le chat est noir."},
        {"source": "translate English to French: hello world.", "target": "bonjour le monde."},
    ] * 4
    return write_jsonl(tmp_path / "mt.jsonl", rows)


def max_logit(path: Path, rows: list[dict]) -> float:
    """The largest |logit| of the causal LM at `path` on prompt + completion rows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        return max(
            model(**tok(r["prompt"] + r["completion"], return_tensors="pt")).logits.abs().max().item()
            for r in rows
        )


def loss_rel_bound(config, seq_len: int, zmax: float, loss: float, targets: int) -> float:
    """How far (relative) two runs' logged losses may be apart when they compute one step's mean
    loss in other reduction orders (other splits over micro-batches or processes): one forward
    on each side (tests/numeric.py), each token's NLL moving by twice the largest logit change,
    relative to the loss, plus the mean over the step's targets. Later steps start from weights
    that differ by rounding; Adam turns rounding into +-lr only where an element's gradient is
    ~0, which moves the loss at second order."""
    return log_softmax_bound(forward_bound(config, seq_len, zmax)) / loss + 2 * gamma(targets)


def options(model: Path, task: str, data: Path, output: Path, **kw) -> FinetuneOptions:
    """Small, fast defaults: a few optimizer steps, no progress bar, CPU."""
    base = dict(
        epochs=1,
        max_steps=6,
        batch_size=8,
        lr=1e-3,
        schedule="constant",
        max_length=32,
        eval_split=0.0,
        device="cpu",
        progress=False,
    )
    base.update(kw)
    return FinetuneOptions(model=str(model), task=task, data=str(data), output=str(output), **base)
