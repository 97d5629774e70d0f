"""Loading: quantization modes, pre-quantized checkpoints, dtype and device resolution."""

from __future__ import annotations

import pytest
import torch

from bitserve.errors import ConfigError
from bitserve.models.loading import load_checkpoint, resolve_device, resolve_dtype

from ..numeric import forward_bound


def _auto_cls():
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification


@pytest.mark.parametrize("mode", ["int8", "nf4", "fp4"])
def test_quantized_modes_use_less_memory(tiny_models, mode):
    base = load_checkpoint(str(tiny_models["topics"]), _auto_cls())
    q = load_checkpoint(str(tiny_models["topics"]), _auto_cls(), quantize=mode)
    assert q.quantization == mode and base.quantization == "none"
    assert q.memory_bytes < base.memory_bytes
    assert q.parameter_count == base.parameter_count
    # The quantized model computes nearly the fp32 function (measured max gap: int8 0.002, nf4 0.004,
    # fp4 0.014) yet not exactly it: a load that skipped quantization or scrambled weights fails.
    enc = base.tokenizer(
        ["The team won the match", "Stocks fell sharply today", "hi"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        gap = (
            (torch.softmax(q.model(**enc).logits, -1) - torch.softmax(base.model(**enc).logits, -1))
            .abs()
            .max()
        )
    assert 0 < gap.item() < 0.05


@pytest.mark.numeric
def test_checkpoint_saved_quantized_loads_as_is(tiny_models, tmp_path):
    q = load_checkpoint(str(tiny_models["topics"]), _auto_cls(), quantize="nf4")
    q.model.save_pretrained(tmp_path / "nf4")
    q.tokenizer.save_pretrained(tmp_path / "nf4")
    again = load_checkpoint(str(tmp_path / "nf4"), _auto_cls())  # no quantize flag needed
    assert again.quantization == "nf4"
    assert again.memory_bytes == pytest.approx(q.memory_bytes, rel=0.01)
    enc = again.tokenizer(["hello"], return_tensors="pt")
    with torch.no_grad():
        a = again.model(**enc).logits
        b = q.model(**enc).logits
    # The same NF4 weights, reloaded: the reload need not run each layer in the same reduction
    # order (it is not bit for bit on this CPU), so the fp32 bound of tests/numeric.py.
    tol = forward_bound(q.model.config, enc["input_ids"].shape[1], b.abs().max().item(), heads=2)
    assert (a - b).abs().max().item() <= tol
    with pytest.raises(ConfigError, match="saved quantized as nf4"):
        load_checkpoint(str(tmp_path / "nf4"), _auto_cls(), quantize="int8")


def test_dtype_and_device_resolution(tiny_models):
    assert resolve_device("cpu").type == "cpu"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")
    lm = load_checkpoint(str(tiny_models["topics"]), _auto_cls(), dtype="bfloat16")
    assert lm.dtype == torch.bfloat16 and next(lm.model.parameters()).dtype == torch.bfloat16
