"""A QLoRA export is the model that was trained: the adapter merges into the NF4 weights it was
trained against (dequantized), and the report shows the as-trained model beside the merge."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from bitserve.models.loading import load_tokenizer
from bitserve_quantize import report, tasks
from bitserve_quantize.export import AS_TRAINED, ExportOptions, _merge_base, _resolve, export, load_as_trained
from bitserve_quantize.report import QuantOptions
from bitserve_quantize.train import finetune

from ..numeric import forward_bound
from . import bnb_cpu_path
from .conftest import options, topic_rows, write_jsonl


@pytest.fixture(scope="module")
def qlora_classifier(tiny_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("qlora")
    data = write_jsonl(d / "train.jsonl", topic_rows(40))
    finetune(
        options(
            tiny_models["topics"],
            "classify",
            data,
            d / "out",
            method="qlora",
            lr=2e-2,
            eval_split=0.25,
            max_steps=4,
            max_length=24,
        )
    )
    return d / "out"


def _logits(model, tokenizer, texts):
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits.float()


@pytest.mark.numeric
@pytest.mark.parametrize("cpu_path", ["native", bnb_cpu_path.PATH])
def test_dequantized_merge_is_the_trained_model_and_fp32_merge_is_not(
    qlora_classifier, tmp_path, cpu_path, record_property
):
    """Also on bitsandbytes' AVX512-BF16 CPU inference path (emulated here): the as-trained model
    is evaluated on the kernels it was trained with, not on that path's bf16 arithmetic."""
    texts = [r["text"] for r in topic_rows(24, seed=5)]
    tok = load_tokenizer(str(qlora_classifier))
    src = _resolve(ExportOptions(model=str(qlora_classifier), output=str(tmp_path / "x")))
    with bnb_cpu_path.emulate() if cpu_path != "native" else contextlib.nullcontext():
        as_trained = load_as_trained(src, tasks.get("classify"))
        trained = _logits(as_trained, tok, texts)
        assert bnb_cpu_path.taken(as_trained) == 0
        merged = {}
        for base in ("dequantized", "fp32"):
            out = tmp_path / base
            manifest = export(
                ExportOptions(
                    model=str(qlora_classifier), output=str(out), merge_base=base, device="cpu", report=False
                )
            )
            assert manifest["merge_base"] == base
            model = AutoModelForSequenceClassification.from_pretrained(out).eval()
            merged[base] = _logits(model, tok, texts)
        if cpu_path != "native":
            # The emulation is live: the server's NF4 load of the merge runs that path's kernel.
            served = report.load(
                str(tmp_path / "dequantized"), tasks.get("classify"), "nf4", "cpu", QuantOptions()
            )
            served_logits = _logits(served.model, tok, texts)
            assert bnb_cpu_path.taken(served.model) > 0
            record_property("served_nf4_vs_trained", (served_logits - trained).abs().max().item())
    err_deq = (merged["dequantized"] - trained).abs().max().item()
    err_fp32 = (merged["fp32"] - trained).abs().max().item()
    # Merged and unmerged are one fp32 function: the merge rounds W + s*B*A once and each dot
    # product sums in another order; the rank-r LoRA branch and the merge add r + 2 terms to
    # every reduction of the 14 sequential matmuls (2 layers x 6, pooler, classifier).
    r = 8  # FinetuneOptions.lora_r
    seq_len = tok(texts, padding=True, return_tensors="pt")["input_ids"].shape[1]
    bound = forward_bound(model.config, seq_len, trained.abs().max().item(), heads=2, extra_k=r + 2)
    record_property("err_deq", (err_deq, bound))
    record_property("err_fp32", (err_fp32, bound))
    assert err_deq < bound, (err_deq, bound)
    # The fp32 merge differs by NF4's quantization error: more than any float rounding can.
    assert err_fp32 > bound, (err_fp32, bound)


def test_qlora_export_reports_the_as_trained_model_and_labels_both_evals(qlora_classifier, tmp_path):
    manifest = export(
        ExportOptions(model=str(qlora_classifier), output=str(tmp_path / "e"), quantize="int8", device="cpu")
    )
    assert manifest["merge_base"] == "dequantized"  # the default for a QLoRA fine-tune
    assert list(manifest["quality"]) == [AS_TRAINED, "none", "int8"]
    # The merged fp32 model scores what the as-trained model scores: the same function.
    assert manifest["quality"]["none"]["accuracy"] == manifest["quality"][AS_TRAINED]["accuracy"]
    # The fine-tune's eval and the export's are taken on the same inputs, and say how.
    assert manifest["finetune_eval"] == {"max_length": 24, "autocast": "fp32", "examples": 10}
    assert manifest["quality_eval"]["max_length"] == 24
    quality = json.loads((tmp_path / "e" / "quality.json").read_text())
    assert quality["max_length"] == 24


def test_a_4bit_export_of_qlora_merges_into_fp32_and_the_others_into_the_dequantized_base(
    qlora_classifier, tmp_path
):
    for mode, base in (("nf4", "fp32"), ("fp4", "fp32"), ("int8", "dequantized"), ("none", "dequantized")):
        opts = ExportOptions(model=str(qlora_classifier), output=str(tmp_path / mode), quantize=mode)
        assert _merge_base(opts, _resolve(opts)) == base, mode


@pytest.mark.numeric
def test_quantizing_nf4_weights_again_rounds_a_lora_sized_update_away_but_not_fp32_ones():
    """Why a 4-bit export of QLoRA merges into fp32: dequantized NF4 weights sit on the NF4 grid,
    and an update much smaller than the grid's steps rounds back to them; fp32 weights lie
    between the grid's levels, so the update moves some of them across one: on average, all of it."""
    import bitsandbytes.functional as F

    def round_trip(x: torch.Tensor) -> torch.Tensor:
        q, state = F.quantize_4bit(x.contiguous(), blocksize=64, quant_type="nf4")
        return F.dequantize_4bit(q, state)

    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 256, generator=g) * 0.02
    lora = torch.randn(256, 8, generator=g) @ torch.randn(8, 256, generator=g)
    update = lora / lora.abs().max() * 0.01 * w.abs().max()  # 1% of the largest weight
    nf4 = round_trip(w)

    def kept(merged: torch.Tensor) -> float:  # the share of the update the export keeps
        return float(((round_trip(merged) - nf4) * update).sum() / (update * update).sum())

    # Measured 0.016 and 1.03. Quantizing is an absmax scale and a nearest-level lookup, with no
    # reduction whose order a CPU kernel could change; the bounds leave 0.08 and 0.23 of room.
    assert kept(nf4 + update) < 0.1
    assert kept(w + update) > 0.8
