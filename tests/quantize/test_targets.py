"""Loss targets: a long prompt keeps its completion, a batch with no targets adds nothing (not
NaN), and the metrics the reports show are the textbook ones."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from bitserve.models.loading import load_tokenizer
from bitserve_quantize import data, tasks
from bitserve_quantize.errors import DataError
from bitserve_quantize.train import finetune

from ..numeric import forward_bound, gamma, log_softmax_bound
from .conftest import options, write_jsonl

LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 6


def _generate(tiny_models):
    task = tasks.get("generate")
    tok = task.prepare_tokenizer(load_tokenizer(str(tiny_models["lm"])))
    return task, tok


def test_long_prompt_is_cut_from_the_left_and_keeps_the_completion_and_eos(tiny_models):
    task, tok = _generate(tiny_models)
    rec = data.Record({"prompt": LONG_PROMPT, "completion": " a tiny model."}, "d", 1)
    completion = tok(" a tiny model.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    prompt = tok(LONG_PROMPT)["input_ids"]
    assert len(prompt) > 32
    f = task.encode(rec, tok, None, 32)
    assert len(f["input_ids"]) == 32
    assert f["input_ids"][-len(completion) :] == completion  # the completion, EOS included
    assert f["input_ids"][: 32 - len(completion)] == prompt[-(32 - len(completion)) :]  # prompt's tail
    assert [t for t in f["labels"] if t != -100] == completion


def test_completion_longer_than_max_length_keeps_one_prompt_token(tiny_models):
    task, tok = _generate(tiny_models)
    rec = data.Record({"prompt": "Hello", "completion": LONG_PROMPT}, "d", 1)
    f = task.encode(rec, tok, None, 16)
    assert len(f["input_ids"]) == 16
    assert f["labels"][0] == -100 and all(t != -100 for t in f["labels"][1:])


def test_finetune_on_prompts_longer_than_max_length_has_finite_losses(tiny_models, tmp_path, caplog):
    rows = [{"prompt": LONG_PROMPT, "completion": " jumps over."}] * 8
    d = write_jsonl(tmp_path / "d.jsonl", rows)
    res = finetune(options(tiny_models["lm"], "generate", d, tmp_path / "o", max_steps=3, batch_size=4))
    assert res.losses and all(math.isfinite(x) for x in res.losses), res.losses
    manifest = json.loads((tmp_path / "o" / "finetune.json").read_text())
    assert math.isfinite(manifest["final_loss"])


def test_cut_completions_are_counted_in_a_warning(tiny_models, tmp_path, caplog):
    rows = [{"prompt": "Hello", "completion": LONG_PROMPT}] * 3 + [{"prompt": "Hi", "completion": " ok."}] * 5
    d = write_jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        finetune(options(tiny_models["lm"], "generate", d, tmp_path / "o", max_steps=1, batch_size=4))
    assert any("3 of 8" in r.getMessage() and "--max-length" in r.getMessage() for r in caplog.records), [
        r.getMessage() for r in caplog.records
    ]


def test_examples_with_no_target_are_dropped_with_a_count(tiny_models, tmp_path, caplog):
    # max_length 1: no token can be predicted from an earlier one.
    d = write_jsonl(tmp_path / "d.jsonl", [{"text": "Hello world"}] * 4)
    with pytest.raises(DataError, match=r"0 of 4 examples have a target token within --max-length 1"):
        finetune(options(tiny_models["lm"], "generate", d, tmp_path / "o", max_steps=1, max_length=1))


def test_zero_target_batch_gives_zero_loss_and_zero_gradients(tiny_models):
    from transformers import AutoModelForCausalLM

    from bitserve_quantize.train import micro_batch_loss

    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["lm"]))
    batch = {
        "input_ids": torch.tensor([[5, 6, 7]]),
        "attention_mask": torch.ones(1, 3, dtype=torch.long),
        "labels": torch.full((1, 3), -100),
    }
    task = tasks.get("generate")
    assert task.count_targets(batch) == 0
    loss = micro_batch_loss(model, batch, task.count_targets(batch))
    assert loss.item() == 0.0
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    # The plain HF loss on the same batch is the NaN this guards against.
    assert math.isnan(model(**batch).loss.item())


def test_count_targets_counts_shifted_tokens_and_examples():
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 7, 8, -100, -100]])
    # The first position is never a target (the loss shifts by one): 3 + 2.
    assert tasks.get("generate").count_targets({"labels": labels}) == 5
    labels = torch.tensor([[4, 5, 6], [-100, 1, -100]])
    assert tasks.get("generate").count_targets({"labels": labels}) == 3
    assert tasks.get("classify").count_targets({"labels": torch.tensor([0, 2, 1])}) == 3


@pytest.mark.numeric
def test_perplexity_is_exp_of_mean_token_nll(tiny_models, tmp_path, record_property):
    import contextlib

    from transformers import AutoModelForCausalLM

    task, tok = _generate(tiny_models)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["lm"])).eval()
    rows = [{"text": "Hello world, this is"}, {"text": "The team won the football match last night."}]
    ds = data.read(write_jsonl(tmp_path / "t.jsonl", rows))
    scored = task.evaluate(model, tok, ds, batch_size=2, max_length=32, autocast=contextlib.nullcontext)
    nll, n, zmax, longest = 0.0, 0, 0.0, 0
    for r in rows:  # one example at a time, no padding: the reference
        ids = torch.tensor([tok(r["text"])["input_ids"] + [tok.eos_token_id]])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].float()
        logp = torch.log_softmax(logits, -1)
        nll -= logp.gather(1, ids[0, 1:, None]).sum().item()
        n += ids.shape[1] - 1
        zmax, longest = max(zmax, logits.abs().max().item()), max(longest, ids.shape[1])
    # Batched and padded against one at a time: the same fp32 function in other reduction
    # orders. Each token's NLL moves by at most twice the largest logit change, the mean of n
    # of them adds gamma_n; relative to the mean NLL. exp() turns an absolute change d of the
    # loss into a relative change of at most expm1(d) of the perplexity.
    d = log_softmax_bound(forward_bound(model.config, longest, zmax)) + gamma(n) * nll / n
    record_property("loss_abs", (abs(scored.metrics["loss"] - nll / n), d))
    assert scored.metrics["loss"] == pytest.approx(nll / n, abs=d)
    assert scored.metrics["perplexity"] == pytest.approx(math.exp(nll / n), rel=math.expm1(d))


def test_accuracy_and_macro_f1_against_hand_computed_values():
    gold = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 2, 2]
    assert tasks.accuracy(gold, pred) == pytest.approx(4 / 6)
    # class 0: tp2 fp0 fn1 -> 0.8; class 1: tp1 fp1 fn1 -> 0.5; class 2: tp1 fp1 fn0 -> 2/3
    assert tasks.macro_f1(gold, pred) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # A class never predicted and never right scores 0 and still counts.
    assert tasks.macro_f1([0, 1], [0, 0]) == pytest.approx((2 / 3 + 0.0) / 2)
    sklearn = pytest.importorskip("sklearn.metrics")
    assert tasks.macro_f1(gold, pred) == pytest.approx(sklearn.f1_score(gold, pred, average="macro"))
