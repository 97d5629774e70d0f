"""LoRA adapters for tests: made with peft on the tiny causal LM, with non-zero B so they change
its output (peft initializes B to zero, which would make every adapter the base model)."""

from __future__ import annotations

from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base_dir, out_dir, *, seed: int, r: int = 4, alpha: int = 8, targets=TARGETS):
    """A peft LoRA on the tiny model with random (non-zero) B, so it changes the output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False)
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(4.0)  # big enough to move greedy choices on the tiny model
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def make_classifier_adapter(base_dir, out_dir, *, seed: int, r: int = 4, alpha: int = 8):
    """A peft SEQ_CLS LoRA on a tiny BERT classifier, as a classifier fine-tune makes one: LoRA
    on the encoder's query/value and its own trained classifier (`modules_to_save`), both moved
    from their initial values so the adapter changes the scores."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    cfg = LoraConfig(
        task_type="SEQ_CLS", r=r, lora_alpha=alpha, target_modules=["query", "value"], init_lora_weights=False
    )
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(4.0)
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p) * p.abs().mean().clamp(min=0.05) * 3)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def merged_checkpoint(base_dir, adapter_dir, dest: Path, base: str = "fp32", task: str = "generate") -> Path:
    """The adapter merged into the base as `quantize export` merges it (fp32, or "dequantized":
    into the NF4 weights dequantized), saved as a checkpoint."""
    from bitserve_quantize import tasks
    from bitserve_quantize.export import _merge, _Source

    if not dest.exists():
        _merge(_Source(str(base_dir), str(adapter_dir), {}, str(base_dir)), tasks.get(task), dest, base)
    return dest
