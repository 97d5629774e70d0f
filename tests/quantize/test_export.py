"""Export merges adapters, quantizes, and writes a checkpoint the server loads with no flags;
report scores one checkpoint at each precision."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from bitserve.models.loading import load_checkpoint
from bitserve_quantize.export import ExportOptions, export
from bitserve_quantize.report import ReportOptions, report
from bitserve_quantize.train import finetune

from .conftest import options, topic_rows, write_jsonl


@pytest.fixture(scope="module")
def lora_classifier(tiny_models, tmp_path_factory):
    """A LoRA fine-tune with a new label set (3 topics; the base has 4) and a held-out split."""
    d = tmp_path_factory.mktemp("lora")
    data = write_jsonl(d / "train.jsonl", topic_rows(30))
    opts = options(
        tiny_models["topics"],
        "classify",
        data,
        d / "out",
        method="lora",
        lr=5e-3,
        eval_split=0.2,
        batch_size=8,
        max_steps=4,
    )
    finetune(opts)
    return d / "out"


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_export_lora_merges_and_loads_without_flags(lora_classifier, tmp_path, mode):
    out = tmp_path / f"exp-{mode}"
    manifest = export(ExportOptions(model=str(lora_classifier), quantize=mode, output=str(out), device="cpu"))
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    for key in (
        "base_model",
        "method",
        "precision",
        "data_sha256",
        "finetune_metrics",
        "quality",
        "versions",
    ):
        assert key in manifest, key
    assert manifest["method"] == "lora" and manifest["quantize"] == mode
    assert set(manifest["quality"]) == {"none", mode}
    assert json.loads((out / "manifest.json").read_text()) == manifest

    # What `bitserve serve` does with the directory: no quantize flag, the saved mode is found.
    lm = load_checkpoint(str(out), AutoModelForSequenceClassification, device="cpu")
    assert lm.quantization == mode
    assert lm.model.config.id2label == {0: "business", 1: "sports", 2: "politics", 3: "tech"}
    quality = json.loads(lm.quality_report_json)
    assert quality["task"] == "classify" and [r["quantize"] for r in quality["results"]] == ["none", mode]
    assert quality["results"][1]["memory_bytes"] < quality["results"][0]["memory_bytes"]
    assert (out / "quality.png").stat().st_size > 0

    # The export computes what the fine-tuned model computes, up to the quantization error: on
    # 48 inputs its logits stay within a bound of the unquantized LoRA model's and its
    # predictions agree. A broken export (head rows shuffled: labels swapped) fails the same check.
    reference = _logits(_lora_reference(lora_classifier), lm.tokenizer)
    exported = _logits(lm.model, lm.tokenizer)
    assert _close(exported, reference, mode), _error(exported, reference)
    shuffled = exported[:, [1, 2, 3, 0]]  # what the export's head with rows rolled would output
    assert not _close(shuffled, reference, mode)


PROBES = [r["text"] for r in topic_rows(48, seed=7)]
# Bounds on the largest logit error over the logits' spread (measured on this tiny model: 0.006
# for int8, 0.038 for nf4; 2.5 with the head rows shuffled) and on the share of argmax
# predictions that agree with the reference (measured: all; shuffled: none).
BOUNDS = {"int8": (0.02, 0.97), "nf4": (0.12, 0.9)}


def _lora_reference(path):
    from peft import PeftModel

    ft = json.loads((path / "finetune.json").read_text())
    labels = ft["labels"]
    base = AutoModelForSequenceClassification.from_pretrained(
        ft["base_model"],
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
    )
    return PeftModel.from_pretrained(base, str(path)).eval()


def _logits(model, tokenizer):
    enc = tokenizer(PROBES, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits.float()


def _error(got, ref) -> tuple[float, float]:
    rel = ((got - ref).abs().max() / ref.std()).item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return rel, agree


def _close(got, ref, mode) -> bool:
    rel, agree = _error(got, ref)
    max_rel, min_agree = BOUNDS[mode]
    return rel <= max_rel and agree >= min_agree


def test_export_new_label_set_is_stored_in_config(tiny_models, tmp_path):
    rows = [
        {"text": t["text"], "label": {"sports": "S", "business": "B", "tech": "T"}[t["label"]]}
        for t in topic_rows(12)
    ]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    finetune(
        options(
            tiny_models["topics"], "classify", data, tmp_path / "ft", method="qlora", max_steps=2, lr=5e-3
        )
    )
    export(
        ExportOptions(
            model=str(tmp_path / "ft"),
            quantize="none",
            output=str(tmp_path / "exp"),
            device="cpu",
            report=False,
        )
    )
    lm = load_checkpoint(str(tmp_path / "exp"), AutoModelForSequenceClassification, device="cpu")
    assert lm.model.config.id2label == {0: "B", 1: "S", 2: "T"}
    assert lm.model.config.num_labels == 3


def test_export_full_generate_nf4_and_report(tiny_models, tmp_path, lm_data):
    finetune(
        options(
            tiny_models["lm"],
            "generate",
            lm_data,
            tmp_path / "ft",
            max_steps=2,
            batch_size=4,
            eval_split=0.25,
        )
    )
    export(
        ExportOptions(model=str(tmp_path / "ft"), quantize="nf4", output=str(tmp_path / "exp"), device="cpu")
    )
    lm = load_checkpoint(str(tmp_path / "exp"), AutoModelForCausalLM, device="cpu")
    assert lm.quantization == "nf4"
    q = json.loads(lm.quality_report_json)
    assert q["primary_metric"] == "perplexity" and all(r["perplexity"] > 1 for r in q["results"])


def test_report_every_precision(tiny_models, tmp_path, lm_data):
    doc = report(
        ReportOptions(
            model=str(tiny_models["lm"]), data=str(lm_data), output=str(tmp_path / "r"), device="cpu"
        )
    )
    rows = {r["quantize"]: r for r in doc["results"]}
    assert list(rows) == ["none", "int8", "nf4", "fp4"]
    for r in rows.values():
        assert r["perplexity"] > 1 and r["examples_per_s"] > 0 and r["memory_bytes"] > 0
    assert rows["nf4"]["memory_bytes"] < rows["int8"]["memory_bytes"] < rows["none"]["memory_bytes"]
    assert json.loads((tmp_path / "r" / "quality.json").read_text()) == doc
    assert (tmp_path / "r" / "quality.png").stat().st_size > 1000


def test_report_translate_uses_chrf(tiny_models, tmp_path, translate_data):
    doc = report(
        ReportOptions(
            model=str(tiny_models["t5"]),
            data=str(translate_data),
            modes=("none", "int8"),
            output=str(tmp_path / "r"),
            device="cpu",
            max_length=16,
            chart=False,
        )
    )
    assert doc["primary_metric"] == "chrf"
    assert all("chrf" in r and "bleu" in r for r in doc["results"])


def test_report_saved_quantized_checkpoint_only_at_its_mode(lora_classifier, tmp_path):
    out = tmp_path / "exp"
    export(ExportOptions(model=str(lora_classifier), quantize="int8", output=str(out), device="cpu"))
    data = lora_classifier / "eval.jsonl"
    doc = report(
        ReportOptions(model=str(out), data=str(data), output=str(tmp_path / "r"), device="cpu", chart=False)
    )
    assert [r["quantize"] for r in doc["results"]] == ["int8"]
