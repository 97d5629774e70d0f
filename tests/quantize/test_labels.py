"""Label order, head rows, stratified eval split, and a decoder classifier's padding id."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from bitserve.models.tiny import build_classifier
from bitserve_quantize import data, tasks
from bitserve_quantize.train import _label_names, build_model, finetune

from ..numeric import forward_bound
from .conftest import options, topic_rows, write_jsonl


def _head(path) -> torch.Tensor:
    return load_file(str(path / "model.safetensors"))["classifier.weight"]


def test_numeric_labels_sort_as_numbers(tiny_models, tmp_path):
    from transformers import AutoConfig

    rows = [{"text": f"row {i}", "label": i % 12} for i in range(24)]
    ds = data.read(write_jsonl(tmp_path / "d.jsonl", rows))
    labels = _label_names(tasks.get("classify"), AutoConfig.from_pretrained(tiny_models["topics"]), ds)
    assert labels == [str(i) for i in range(12)]


def test_generic_label_checkpoint_keeps_row_i_for_label_i(tmp_path):
    from transformers import AutoConfig

    base = build_classifier(tmp_path / "generic", [f"LABEL_{i}" for i in range(12)])
    rows = [{"text": f"row {i}", "label": str(i % 12)} for i in range(24)]
    ds = data.read(write_jsonl(tmp_path / "d.jsonl", rows))
    task = tasks.get("classify")
    labels = _label_names(task, AutoConfig.from_pretrained(base), ds)
    assert labels == [str(i) for i in range(12)]
    model = build_model(options(base, "classify", ds.path, tmp_path / "o"), task, labels, torch.device("cpu"))
    # Same rows, same order: label "10" is still the checkpoint's row 10.
    assert torch.equal(model.classifier.weight.detach(), _head(base))


def test_new_label_names_get_a_fresh_head_not_another_labels_rows(tiny_models, tmp_path):
    task = tasks.get("classify")
    labels = ["a", "b", "c", "d"]  # as many as the checkpoint's four, none of its names
    opts = options(tiny_models["topics"], "classify", tmp_path / "unused", tmp_path / "o")
    model = build_model(opts, task, labels, torch.device("cpu"))
    old = _head(tiny_models["topics"])
    new = model.classifier.weight.detach()
    assert new.shape == old.shape
    # No row of the new head is a row of the old one ("a" must not inherit "business").
    assert not any(torch.equal(new[i], old[j]) for i in range(4) for j in range(4))
    assert model.config.id2label == dict(enumerate(labels))


@pytest.mark.parametrize("seed", range(8))
def test_eval_split_is_stratified_and_never_takes_a_rare_class_away(tmp_path, seed):
    rows = topic_rows(39) + [{"text": "rain and wind", "label": "weather"}]
    ds = data.read(write_jsonl(tmp_path / "d.jsonl", rows))
    train, held = data.split(ds, 0.25, seed, stratify="label")
    n_train, n_eval = (
        Counter(r.text("label") for r in train.records),
        Counter(r.text("label") for r in held.records),
    )
    assert n_train["weather"] == 1 and n_eval["weather"] == 0
    for label in ("sports", "business", "tech"):  # 13 each: round(13 * 0.25) = 3 held out
        assert n_eval[label] == 3 and n_train[label] == 10
    assert len(train) + len(held) == 40 and not {r.line for r in train.records} & {
        r.line for r in held.records
    }


def test_finetune_with_a_rare_class_and_an_eval_split(tiny_models, tmp_path):
    rows = topic_rows(39) + [{"text": "rain and wind", "label": "weather"}]
    d = write_jsonl(tmp_path / "d.jsonl", rows)
    # Seed 2 held the single "weather" row out on an unstratified split: "unknown label" at eval.
    res = finetune(
        options(tiny_models["topics"], "classify", d, tmp_path / "o", eval_split=0.25, seed=2, max_steps=1)
    )
    assert "weather" in res.labels and res.eval_metrics["accuracy"] >= 0.0
    assert json.loads((tmp_path / "o" / "finetune.json").read_text())["eval_examples"] == 9


def test_decoder_classifier_without_pad_token_id_trains_on_batches(tiny_models, tmp_path):
    from transformers import AutoTokenizer

    base = tmp_path / "llama-nopad"
    shutil.copytree(tiny_models["lm"], base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["pad_token_id"] = None  # as in many Llama-family checkpoints
    (base / "config.json").write_text(json.dumps(cfg))
    tok = AutoTokenizer.from_pretrained(base)
    tok.pad_token = None
    tok.save_pretrained(base)
    d = write_jsonl(tmp_path / "d.jsonl", topic_rows(16))
    res = finetune(options(base, "classify", d, tmp_path / "o", max_steps=2, batch_size=8))
    assert len(res.losses) == 2
    saved = json.loads((tmp_path / "o" / "config.json").read_text())
    assert saved["pad_token_id"] == tok.eos_token_id  # the tokenizer's pad (= EOS), also in the config


@pytest.mark.numeric
def test_decoder_classifier_pools_each_right_padded_row_at_its_last_token(tiny_models, tmp_path):
    """The pad id in the config is the tokenizer's pad, so a Llama head pools each row of a
    right-padded batch at its own last token: a row's logits equal those of the row alone."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    d = write_jsonl(tmp_path / "d.jsonl", topic_rows(16))
    finetune(options(tiny_models["lm"], "classify", d, tmp_path / "o", max_steps=2, batch_size=8))
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "o").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "o")
    tok.padding_side = "right"
    texts = ["goal", "the bank raised its rates today again"]
    batch = tok(texts, padding=True, return_tensors="pt")
    assert (batch["attention_mask"][0] == 0).any()  # the first row is padded
    with torch.no_grad():
        together = model(**batch).logits
        alone = torch.cat([model(**tok([t], return_tensors="pt")).logits for t in texts])
    # Two fp32 evaluations of the same row differ by rounding only (tests/numeric.py); pooling
    # at a pad position would read another token's hidden state.
    seq = batch["input_ids"].shape[1]
    bound = forward_bound(model.config, seq, float(alone.abs().max()))
    assert (together - alone).abs().max() <= bound, ((together - alone).abs().max(), bound)
