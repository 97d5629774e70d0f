"""LoRA adapters on a sequence classifier (head backend; engine/worker/lora.py with `heads`): a
peft SEQ_CLS adapter - LoRA on the encoder plus its own classifier (`modules_to_save`) - served
per row on the shared base equals the `quantize export` merge of it within a derived float
bound; rows of two adapters and of the base in one batch each equal their own model; an unknown
adapter is NOT_FOUND for its row alone; more adapters than slots are run in further passes."""

from __future__ import annotations

import pytest
import torch

from bitserve.engine import workers
from bitserve.settings import ModelSettings

from ...adapters import make_classifier_adapter, merged_checkpoint
from ...numeric import U32, forward_bound, softmax_bound

TEXTS = ["The team won the football match.", "Stock markets fell sharply today.", "Hello", "la maison bleue"]
RANK = 4


@pytest.fixture(scope="module")
def cls_adapters(tiny_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("lora-heads")
    base = tiny_models["topics"]
    out = {name: make_classifier_adapter(base, d / name, seed=seed) for name, seed in (("a", 41), ("b", 42))}
    merged = {name: merged_checkpoint(base, out[name], d / f"merged-{name}", task="classify") for name in out}
    return out, merged


def _workers(path, adapters: dict, capacity: int = 4):
    m = ModelSettings(
        name="topics",
        task="classify",
        path=str(path),
        adapters={k: str(v) for k, v in adapters.items()},
        max_resident_adapters=capacity,
    )
    return workers.workers_for(workers.load(m), [m])


def _ids(w) -> list[list[int]]:
    return [w.loaded.tokenizer(t)["input_ids"] for t in TEXTS]


def _bound(loaded, ids) -> float:
    """Softmax probabilities of two fp32 evaluations, one with the adapter unmerged (the LoRA
    branch, the head applied as a batched matmul), one merged: tests/numeric.py's forward bound
    (pooler and classifier after the layers; r + 2 more terms per reduction), halved by the
    softmax, plus the float32 of the answer."""
    width = max(len(i) for i in ids)
    with torch.inference_mode():
        zmax = max(loaded.model(input_ids=torch.tensor([i])).logits.abs().max().item() for i in ids)
    return softmax_bound(forward_bound(loaded.model.config, width, zmax, heads=2, extra_k=RANK + 2)) + 2 * U32


@pytest.mark.numeric
def test_classifier_adapters_and_the_base_in_one_batch_equal_their_merged_models(tiny_models, cls_adapters):
    dirs, merged = cls_adapters
    w = _workers(tiny_models["topics"], dirs)
    ids = _ids(w)
    names = ["a", "", "b", "a", "b", ""] + ["a"] * 2
    rows = [ids[i % len(ids)] for i in range(len(names))]
    with torch.inference_mode():
        got = w.run_batch("topics", rows, names)
        base = w.run_batch("topics", rows)
        refs = {"": w}
        refs.update({n: _workers(merged[n], {}) for n in ("a", "b")})
        want = [refs[n].run_batch("topics", [r])[0] for r, n in zip(rows, names)]
    tol = max(_bound(refs[n].loaded, ids) for n in refs)
    for i, n in enumerate(names):
        assert got[i] == pytest.approx(want[i], abs=tol), (i, n)
        if n:  # the adapter moves the probabilities far beyond the bound (else no test)
            assert max(abs(x - y) for x, y in zip(got[i], base[i])) > 10 * tol, (i, n)
    assert w.head_bank is not None and w.head_bank.index is None
    # an unknown adapter fails its own row only
    with torch.inference_mode():
        mixed = w.run_batch("topics", [rows[1], rows[0]], ["nope", "a"])
    assert mixed[0] == "NOT_FOUND" and mixed[1] == pytest.approx(want[0], abs=tol)


def test_more_classifier_adapters_than_slots_run_in_further_passes(tiny_models, cls_adapters):
    dirs, _ = cls_adapters
    w = _workers(tiny_models["topics"], dirs, capacity=1)
    ids = _ids(w)
    with torch.inference_mode():
        together = w.run_batch("topics", ids[:3], ["a", "b", ""])
        alone = [w.run_batch("topics", [i], [n])[0] for i, n in zip(ids[:3], ["a", "b", ""])]
    tol = _bound(w.loaded, ids)
    for t, a in zip(together, alone):
        assert t == pytest.approx(a, abs=tol)


def test_hot_load_and_unload_on_a_classifier(tiny_models, cls_adapters):
    dirs, _ = cls_adapters
    w = _workers(tiny_models["topics"], {})
    ids = _ids(w)
    info = w.adapter_op("load", ["topics", "b", str(dirs["b"])])
    assert info["resident"] and info["rank"] == RANK
    with torch.inference_mode():
        with_b = w.run_batch("topics", ids[:1], ["b"])[0]
        assert with_b != w.run_batch("topics", ids[:1])[0]
    assert [d["name"] for d in w.adapter_op("list", ["topics"])] == ["b"]
    assert w.adapter_op("unload", ["topics", "b"]) == {"running": 0}
    with torch.inference_mode():
        assert w.run_batch("topics", ids[:1], ["b"]) == ["NOT_FOUND"]
    assert w.info()["adapters"] == {"topics": []}


def test_a_replaced_head_that_is_not_one_linear_layer_is_failed_precondition(
    tiny_models, cls_adapters, tmp_path
):
    import shutil

    from safetensors.torch import load_file, save_file

    from bitserve.engine.worker.lora import read_adapter
    from bitserve.errors import FailedPrecondition

    dirs, _ = cls_adapters
    model = workers.load(ModelSettings(name="t", task="classify", path=str(tiny_models["topics"]))).model
    assert read_adapter(dirs["a"], model, 64, heads=True).heads  # as saved: served
    with pytest.raises(FailedPrecondition, match="modules_to_save"):
        read_adapter(dirs["a"], model, 64)  # a bank without heads (a causal LM's) refuses it
    bad = shutil.copytree(dirs["a"], tmp_path / "several")
    t = load_file(str(bad / "adapter_model.safetensors"))
    save_file(
        {k.replace("classifier.", "classifier.out_proj."): v for k, v in t.items()},
        str(bad / "adapter_model.safetensors"),
    )
    with pytest.raises(FailedPrecondition, match="head of several layers"):
        read_adapter(bad, model, 64, heads=True)
