"""Quantization behind one narrow function: mode -> bitsandbytes load config.

Shared by the server (loading) and the `quantize` tool (QLoRA, export, report). Nothing else
in bitserve knows bitsandbytes internals.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

MODES = ("none", "int8", "nf4", "fp4")
FOUR_BIT = ("nf4", "fp4")

# Task heads stay in full precision: they are a sliver of the weights, carry most of the
# quantization error for classifiers, and tiny heads (N labels) don't fit 4-bit CPU kernels.
HEAD_MODULES = ["lm_head", "classifier", "score", "qa_outputs"]


def bnb_config(
    mode: str,
    compute_dtype: torch.dtype = torch.float32,
    *,
    double_quant: bool = True,
    skip_modules: Sequence[str] = (),
    offload: bool = False,
):
    """The `BitsAndBytesConfig` for a mode, or None for "none".

    `skip_modules` stay unquantized, beside the task heads. transformers matches each as a
    regex from the start of a module's path up to a module boundary, or as a suffix:
    "model.layers.3" is all of layer 3 ("model.layers.3." would also match layers 30-39).
    `offload`: the model is spread by a device map that may put layers on "cpu" or "disk".
    """
    if mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    skip = HEAD_MODULES + [m for m in skip_modules if m not in HEAD_MODULES]
    if mode == "int8":
        # LLM.int8 (vector-wise int8 with outlier decomposition).
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_skip_modules=skip, llm_int8_enable_fp32_cpu_offload=offload
        )
    if mode in FOUR_BIT:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=mode,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=double_quant,
            llm_int8_skip_modules=skip,
            llm_int8_enable_fp32_cpu_offload=offload,
        )
    raise ValueError(f"unknown quantization mode {mode!r}; expected one of {', '.join(MODES)}")


def mode_of(config: Any) -> str:
    """The quantization mode a (possibly pre-quantized) checkpoint's config declares."""
    q = getattr(config, "quantization_config", None)
    if q is None:
        return "none"
    get = q.get if isinstance(q, dict) else (lambda k, d=None: getattr(q, k, d))
    if get("load_in_8bit", False):
        return "int8"
    if get("load_in_4bit", False):
        return str(get("bnb_4bit_quant_type", "fp4"))
    method = get("quant_method", "unknown")
    return str(method)
