"""Every method x precision trains on CPU; QLoRA trains only adapters; resume and interruption."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from bitserve_quantize import checkpoints, tasks
from bitserve_quantize.train import build_model, finetune

from .conftest import options, topic_rows, write_jsonl


def _went_down(losses: list[float]) -> bool:
    # Dropout makes single steps noisy; compare the first and last three.
    return sum(losses[-3:]) < sum(losses[:3])


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_each_method_and_precision_trains(tiny_models, tmp_path, method, precision):
    # One batch of 8 seen every step: the loss must fall within a handful of steps.
    d = write_jsonl(tmp_path / "d.jsonl", topic_rows(8))
    lr = 2e-3 if method == "full" else 5e-3
    res = finetune(
        options(
            tiny_models["topics"],
            "classify",
            d,
            tmp_path / "o",
            method=method,
            precision=precision,
            lr=lr,
            max_steps=8,
        )
    )
    assert len(res.losses) == 8 and all(torch.isfinite(torch.tensor(res.losses)))
    assert _went_down(res.losses), res.losses
    manifest = json.loads((tmp_path / "o" / "finetune.json").read_text())
    assert manifest["method"] == method and manifest["precision"] == precision
    assert manifest["labels"] == ["business", "sports", "politics", "tech"]  # the checkpoint's names kept


def test_qlora_trains_only_adapters_and_the_head(tiny_models, tmp_path):
    opts = options(tiny_models["topics"], "classify", tmp_path / "unused", tmp_path / "o", method="qlora")
    labels = ["business", "sports", "tech"]
    model = build_model(opts, tasks.get("classify"), labels, torch.device("cpu"))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_A." in n or ".lora_B." in n or ".modules_to_save." in n for n in trainable), sorted(
        trainable
    )
    # Count: LoRA adds r*(in+out) per adapted linear; the head (hidden x labels + bias) is trained too.
    import bitsandbytes as bnb

    r = opts.lora_r
    adapted = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert adapted, "the base must be NF4"
    assert {m.weight.quant_state.quant_type for m in adapted} == {"nf4"}
    expected_lora = sum(r * (m.in_features + m.out_features) for m in adapted)
    hidden = model.config.hidden_size
    expected_head = hidden * len(labels) + len(labels)
    lora = sum(p.numel() for n, p in trainable.items() if ".lora_" in n)
    head = sum(p.numel() for n, p in trainable.items() if ".modules_to_save." in n)
    assert lora == expected_lora and head == expected_head
    frozen_4bit = [p for p in model.parameters() if type(p).__name__ == "Params4bit"]
    assert frozen_4bit and not any(p.requires_grad for p in frozen_4bit)


def test_qlora_generate_trains_adapters_only(tiny_models, tmp_path, lm_data):
    res = finetune(
        options(
            tiny_models["lm"],
            "generate",
            lm_data,
            tmp_path / "o",
            method="qlora",
            precision="bf16",
            lr=2e-2,
            batch_size=4,
        )
    )
    assert _went_down(res.losses), res.losses
    adapter = tmp_path / "o" / "adapter_model.safetensors"
    from safetensors import safe_open

    with safe_open(adapter, "pt") as f:
        saved = {n: f.get_tensor(n).numel() for n in f.keys()}
    # A causal LM has no separate head to train: every trainable parameter is an adapter.
    assert saved and all(".lora_A." in n or ".lora_B." in n for n in saved)
    assert res.trainable_parameters == sum(saved.values())
    assert res.trainable_parameters < 0.2 * res.total_parameters


def test_translate_full_bf16_trains(tiny_models, tmp_path, translate_data):
    res = finetune(
        options(
            tiny_models["t5"],
            "translate",
            translate_data,
            tmp_path / "o",
            precision="bf16",
            lr=3e-3,
            batch_size=4,
            eval_split=0.25,
        )
    )
    assert _went_down(res.losses), res.losses
    assert {"chrf", "bleu"} <= set(res.eval_metrics)


@pytest.mark.numeric
def test_resume_after_interruption_continues_from_the_checkpoint(
    tiny_models, tmp_path, topics_data, monkeypatch
):
    kw = dict(max_steps=6, save_every=2, batch_size=4, lr=1e-3)
    straight = finetune(options(tiny_models["topics"], "classify", topics_data, tmp_path / "a", **kw))

    real_save = checkpoints.save

    def save_then_die(output, step, **k):
        path = real_save(output, step, **k)
        if step == 4:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(checkpoints, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        finetune(options(tiny_models["topics"], "classify", topics_data, tmp_path / "b", **kw))
    monkeypatch.setattr(checkpoints, "save", real_save)
    assert [s for s, _ in checkpoints.finished(tmp_path / "b")] == [2, 4]
    assert not (tmp_path / "b" / "finetune.json").exists()

    resumed = finetune(
        options(tiny_models["topics"], "classify", topics_data, tmp_path / "b", resume=True, **kw)
    )
    assert resumed.resumed_from == 4
    # Model, optimizer, scheduler and RNG (dropout) restored: the same losses as the straight run,
    # bit for bit (the same operations in the same order on the same kernels).
    assert resumed.losses == straight.losses


def test_interrupted_checkpoint_write_keeps_finished_ones(tiny_models, tmp_path, topics_data, monkeypatch):
    real = torch.save
    calls = {"n": 0}

    def flaky(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # second checkpoint: rng (1), state (2) for step 2; then rng (3), state (4)
            raise KeyboardInterrupt
        return real(obj, f, *a, **k)

    monkeypatch.setattr(checkpoints.torch, "save", flaky)
    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):
        finetune(
            options(
                tiny_models["topics"], "classify", topics_data, out, max_steps=6, save_every=2, batch_size=4
            )
        )
    monkeypatch.setattr(checkpoints.torch, "save", real)
    assert [s for s, _ in checkpoints.finished(out)] == [2]
    assert (out / "checkpoints" / "step-00000002" / "trainer_state.json").is_file()
    resumed = finetune(
        options(
            tiny_models["topics"],
            "classify",
            topics_data,
            out,
            max_steps=6,
            save_every=2,
            batch_size=4,
            resume=True,
        )
    )
    assert resumed.resumed_from == 2 and len(resumed.losses) == 6
    assert [s for s, _ in checkpoints.finished(out)] == [2, 4]
    shutil.rmtree(out)


@pytest.mark.numeric
@pytest.mark.parametrize("method", ["full", "qlora"])
def test_gradient_checkpointing_trains_like_without(tiny_models, tmp_path, method):
    d = write_jsonl(tmp_path / "d.jsonl", topic_rows(8))
    # fp32, no dropout differences: recomputing activations must not change the losses.
    common = dict(method=method, precision="fp32", lr=5e-3, max_steps=4, seed=3)
    plain = finetune(options(tiny_models["topics"], "classify", d, tmp_path / "a", **common))
    ckpt = finetune(
        options(tiny_models["topics"], "classify", d, tmp_path / "b", gradient_checkpointing=True, **common)
    )
    # Recomputation runs the same forward again (same inputs, same kernels, dropout's RNG state
    # replayed): the losses are equal bit for bit.
    assert ckpt.losses == plain.losses
    opts = options(
        tiny_models["topics"], "classify", d, tmp_path / "c", gradient_checkpointing=True, **common
    )
    model = build_model(
        opts, tasks.get("classify"), ["business", "sports", "politics", "tech"], torch.device("cpu")
    )
    assert model.is_gradient_checkpointing, "the option must switch checkpointing on"
