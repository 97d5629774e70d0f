"""LoRA adapters served unmerged, per row (engine/worker/lora.py), driven through the scheduler:
greedy output with an adapter equals the merged model's (peft merge_and_unload, as `quantize
export` merges) token for token - on an fp32 base, on an NF4 base against the adapter merged
into the dequantized base, on an int8 base against peft's PeftModel over the same int8 base;
label scores (classify/sentiment) with adapters equal the merged models' within a derived bound; two adapters and the base in one running batch each equal their solo
runs; an adapter that does not fit is FAILED_PRECONDITION with the reason; an unknown one is
NOT_FOUND, never the base; at most `capacity` stay resident (LRU), an evicted one reloads."""

from __future__ import annotations

import json

import pytest
import torch

from bitserve.engine import workers
from bitserve.engine.sched.scheduler import Scheduler
from bitserve.engine.worker.lora import LoraBank, read_adapter
from bitserve.engine.worker.model_runner import CausalLM
from bitserve.errors import FailedPrecondition, NotFound
from bitserve.settings import ModelSettings
from bitserve.types import GenerationRequest, SamplingParams

from ...adapters import make_adapter, merged_checkpoint

PROMPTS = ["Hello world", "The quick brown fox jumps over", "I love", "la maison", "Stock markets fell"]


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    base = tiny_models["lm"]
    return {
        "a": make_adapter(base, d / "a", seed=1),
        "b": make_adapter(base, d / "b", seed=2, r=8, alpha=16, targets=["q_proj", "v_proj", "down_proj"]),
        "c": make_adapter(base, d / "c", seed=3),
    }


def merged(base_dir, adapter_dir, dest, base: str = "fp32"):
    path = merged_checkpoint(base_dir, adapter_dir, dest, base)
    return workers.load(ModelSettings(name="lm", task="generate", path=str(path)))


def solo(loaded, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = loaded.model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=loaded.tokenizer.pad_token_id,
        )
    return out[0, len(prompt) :].tolist()


def engine(loaded, adapters: dict, *, capacity: int = 4, persistent: bool = True) -> Scheduler:
    lm = CausalLM(loaded.model, loaded.tokenizer, loaded.device, max_context=loaded.max_context)
    lm.lora = LoraBank(loaded.model, capacity=capacity)
    for name, path in adapters.items():
        lm.lora.register(f"lm:{name}", str(path))
    return Scheduler(lm, max_concurrent=8, prefill_token_budget=4096, max_waiting_ms=0, persistent=persistent)


def run(sched: Scheduler, jobs: list[tuple[int, list[int], str, int]]) -> dict[int, list[int]]:
    """jobs: (arrival step, prompt ids, adapter, max_new_tokens); tokens per job."""
    got: dict[int, list[int]] = {i: [] for i in range(len(jobs))}
    done: set[int] = set()
    step = 0
    with torch.inference_mode():
        while len(done) < len(jobs):
            for i, (at, prompt, adapter, n) in enumerate(jobs):
                if at == step:
                    p = SamplingParams(max_new_tokens=n, adapter=adapter)
                    sched.add(GenerationRequest(i, "lm", prompt, p, n, (), None))
            r = sched.step()
            assert not r.errors, r.errors
            for rid, tok, _, finish, _top in r.tokens:
                got[rid].append(tok)
                if finish is not None:
                    done.add(rid)
            step += 1
            assert step < 500
    return got


@pytest.fixture(scope="module")
def base_fp32(tiny_models):
    return workers.load(ModelSettings(name="lm", task="generate", path=str(tiny_models["lm"])))


@pytest.mark.parametrize(
    ("persistent", "form"),
    [(True, "dense"), (False, "dense"), (True, "gathered")],
    ids=["slots", "copying", "gathered"],
)
def test_adapter_equals_merged_model_fp32(
    tiny_models, adapters, base_fp32, tmp_path_factory, monkeypatch, persistent, form
):
    from bitserve.engine.worker import lora

    if form == "gathered":
        monkeypatch.setattr(lora, "DENSE_COLUMNS", 0)
    loaded = base_fp32
    prompts = [loaded.tokenizer(p)["input_ids"] for p in PROMPTS]
    ref = merged(tiny_models["lm"], adapters["a"], tmp_path_factory.getbasetemp() / "merged-a")
    want = {i: solo(ref, p, 12) for i, p in enumerate(prompts)}
    base = {i: solo(loaded, p, 12) for i, p in enumerate(prompts)}
    assert want != base  # the adapter changes the output (else the test proves nothing)
    sched = engine(loaded, {"a": adapters["a"]}, persistent=persistent)
    got = run(sched, [(i % 3, p, "a", 12) for i, p in enumerate(prompts)])
    assert got == want


@pytest.mark.parametrize("form", ["dense", "gathered"])
def test_two_adapters_and_the_base_in_one_batch_each_equal_their_solo_runs(
    tiny_models, adapters, base_fp32, monkeypatch, form
):
    from bitserve.engine.worker import lora

    if form == "gathered":
        monkeypatch.setattr(lora, "DENSE_COLUMNS", 0)
    loaded = base_fp32
    prompts = [loaded.tokenizer(p)["input_ids"] for p in PROMPTS]
    names = ["a", "b", "", "b", "a"]
    lengths = [14, 6, 10, 18, 3]  # rows leave from the middle while others still run
    jobs = [(i % 2, p, names[i], lengths[i]) for i, p in enumerate(prompts)]
    sched = engine(loaded, adapters)
    mixed = run(sched, jobs)
    assert sched.lm.lora.dense == (form == "dense")
    for i, job in enumerate(jobs):
        alone = run(engine(loaded, adapters), [(0, job[1], job[2], job[3])])
        assert mixed[i] == alone[0], (PROMPTS[i], names[i])
    # and each is its own model: base rows are the base's, adapter rows differ from it
    assert mixed[2] == solo(loaded, prompts[2], lengths[2])
    assert mixed[1] != solo(loaded, prompts[1], lengths[1]) or mixed[3] != solo(
        loaded, prompts[3], lengths[3]
    )


@pytest.mark.parametrize("persistent", [True, False], ids=["slots", "copying"])
def test_one_prompt_through_two_adapters_and_the_base_admitted_together(
    tiny_models, adapters, base_fp32, persistent
):
    """Identical prompts admitted together share one prefill (the n completions of a prompt):
    never across adapters - each of these must equal its own solo run, and copies of a row keep
    its adapter."""
    loaded = base_fp32
    prompt = loaded.tokenizer(PROMPTS[1])["input_ids"]
    names = ["a", "b", "", "a", "b"]
    jobs = [(0, prompt, name, 12) for name in names]
    together = run(engine(loaded, adapters, persistent=persistent), jobs)
    alone = {name: run(engine(loaded, adapters), [(0, prompt, name, 12)])[0] for name in set(names)}
    assert len(set(map(tuple, alone.values()))) == 3  # three different models (else no test)
    assert [together[i] for i in range(len(names))] == [alone[name] for name in names]


def test_chunked_prompt_with_an_adapter(tiny_models, adapters, base_fp32, tmp_path_factory):
    loaded = base_fp32
    ref = merged(tiny_models["lm"], adapters["a"], tmp_path_factory.getbasetemp() / "merged-a")
    long = loaded.tokenizer(" ".join(PROMPTS * 2))["input_ids"]
    short = loaded.tokenizer(PROMPTS[2])["input_ids"]
    sched = engine(loaded, adapters)
    sched.chunk_tokens = 8  # the long prompt is prefilled in chunks while the short row decodes
    got = run(sched, [(0, short, "b", 10), (1, long, "a", 8)])
    assert got[1] == solo(ref, long, 8)
    assert got[0] == run(engine(loaded, adapters), [(0, short, "b", 10)])[0]


@pytest.mark.numeric
def test_adapter_on_nf4_base_equals_merge_into_dequantized_base(tiny_models, adapters, tmp_path_factory):
    """The NF4 base dequantizes each weight and multiplies in fp32 on this CPU; the merge adds
    the adapter to those same dequantized weights, so greedy choices agree token for token."""
    nf4 = workers.load(ModelSettings(name="lm", task="generate", path=str(tiny_models["lm"]), quantize="nf4"))
    ref = merged(
        tiny_models["lm"], adapters["a"], tmp_path_factory.getbasetemp() / "merged-a-nf4", "dequantized"
    )
    prompts = [nf4.tokenizer(p)["input_ids"] for p in PROMPTS]
    want = {i: solo(ref, p, 12) for i, p in enumerate(prompts)}
    got = run(engine(nf4, {"a": adapters["a"]}), [(0, p, "a", 12) for p in prompts])
    assert got == want


def test_unknown_adapter_is_not_found_never_the_base(base_fp32, adapters):
    sched = engine(base_fp32, {"a": adapters["a"]})
    with pytest.raises(NotFound, match="'nope'"):
        sched.add(GenerationRequest(1, "lm", [5, 6], SamplingParams(adapter="nope"), 4, (), None))
    assert not sched.waiting


def test_lru_keeps_capacity_and_an_evicted_adapter_reloads(base_fp32, adapters):
    loaded = base_fp32
    prompts = [loaded.tokenizer(p)["input_ids"] for p in PROMPTS]
    sched = engine(loaded, adapters, capacity=2)
    bank = sched.lm.lora
    first = run(sched, [(0, prompts[0], "a", 6)])[0]
    run(sched, [(0, prompts[1], "b", 6)])
    run(sched, [(0, prompts[2], "c", 6)])  # evicts a, the least recently used
    assert set(bank.slot) == {"lm:b", "lm:c"} and bank.loads == 3
    again = run(sched, [(0, prompts[0], "a", 6)])[0]  # reloads a (evicting b)
    assert again == first and bank.loads == 4 and "lm:b" not in bank.slot
    # three adapters at once with room for two: the third waits for a slot, nothing fails
    got = run(sched, [(0, prompts[0], "a", 8), (0, prompts[1], "b", 8), (0, prompts[2], "c", 3)])
    assert got[0][:6] == first


def test_unload_waits_for_running_rows(base_fp32, adapters):
    loaded = base_fp32
    w = workers.Workers(loaded, [ModelSettings(name="lm", task="generate", path="x")], {}, None, None)
    sched = engine(loaded, adapters)
    w.scheduler, w.lm = sched, sched.lm
    prompt = loaded.tokenizer(PROMPTS[0])["input_ids"]
    want = run(engine(loaded, adapters), [(0, prompt, "a", 10)])[0]
    with torch.inference_mode():
        sched.add(GenerationRequest(0, "lm", prompt, SamplingParams(adapter="a"), 10, (), None))
        toks = [t[1] for t in sched.step().tokens]
        assert w.adapter_op("unload", ["lm", "a"]) == {"running": 1}
        with pytest.raises(NotFound):
            sched.add(GenerationRequest(1, "lm", prompt, SamplingParams(adapter="a"), 4, (), None))
        assert "lm:a" in sched.lm.lora.slot  # still resident: its row runs on
        while sched.has_work():
            toks += [t[1] for t in sched.step().tokens]
        sched.step()
    assert toks == want
    assert "lm:a" not in sched.lm.lora.slot
    assert [d["name"] for d in w.adapter_op("list", ["lm"])] == ["b", "c"]


def _rewrite(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_adapter_that_does_not_fit_is_failed_precondition(base_fp32, adapters, tmp_path, tiny_models):
    model = base_fp32.model
    with pytest.raises(FailedPrecondition, match="max_lora_rank=2"):
        read_adapter(adapters["a"], model, max_rank=2)
    with pytest.raises(FailedPrecondition, match="do not fit"):
        read_adapter(_rewrite(adapters["a"], tmp_path / "r", r=8), model, max_rank=64)
    with pytest.raises(FailedPrecondition, match="modules_to_save"):
        read_adapter(_rewrite(adapters["a"], tmp_path / "m", modules_to_save=["lm_head"]), model, max_rank=64)
    with pytest.raises(FailedPrecondition, match="no adapter_config.json"):
        read_adapter(tiny_models["lm"], model, max_rank=64)
    # an adapter made for another base: its modules are not there
    from safetensors.torch import load_file, save_file

    other = _rewrite(adapters["a"], tmp_path / "o")
    t = load_file(str(other / "adapter_model.safetensors"))
    save_file(
        {k.replace("model.layers", "transformer.h"): v for k, v in t.items()},
        str(other / "adapter_model.safetensors"),
    )
    with pytest.raises(FailedPrecondition, match="not in the base model"):
        read_adapter(other, model, max_rank=64)


def test_compiled_decode_steps_with_adapter_rows_run_eager_and_equal_merged(
    tiny_models, adapters, base_fp32, tmp_path_factory
):
    """With compile_decode on, a step whose rows are all base rows takes the compiled graph and
    a step with an adapter row the eager path (the graph is the base's): both answer as solo."""
    from bitserve.engine.worker import compiled

    torch._dynamo.reset()
    loaded = base_fp32
    ref = merged(tiny_models["lm"], adapters["a"], tmp_path_factory.getbasetemp() / "merged-a")
    prompts = [loaded.tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
    sched = engine(loaded, {"a": adapters["a"]})
    lm = sched.lm
    lm.compiled = compiled.CompiledDecode(lm.model, lm.device, lm._cache_kw, backend="eager")
    assert sched.slots is not None
    lm.warm_up(sched.slots)
    calls = {"n": 0}
    real = lm.compiled.decode

    def counted(batch):
        calls["n"] += 1
        return real(batch)

    lm.compiled.decode = counted  # type: ignore[method-assign]
    base_only = run(sched, [(0, p, "", 8) for p in prompts])
    assert calls["n"] > 0 and base_only == {i: solo(loaded, p, 8) for i, p in enumerate(prompts)}
    calls["n"] = 0
    with_a = run(sched, [(0, p, "a", 8) for p in prompts])
    assert calls["n"] == 0 and with_a == {i: solo(ref, p, 8) for i, p in enumerate(prompts)}


# label scoring (classify / sentiment on the instruct backend) ---------------------------------
def _score_bound(loaded, prompts, conts, rank: int) -> float:
    """What two fp32 evaluations of one label's summed log-likelihood may differ by when one
    runs the adapter unmerged and the other merged (tests/numeric.py: the LoRA branch and its
    merge add rank + 2 terms to each reduction), summed over the label's tokens."""
    from ...numeric import forward_bound, log_softmax_bound

    width = max(len(p) for p in prompts) + max(len(c) for cs in conts for c in cs)
    longest = max(prompts, key=len) + max((c for cs in conts for c in cs), key=len)
    with torch.inference_mode():
        zmax = loaded.model(input_ids=torch.tensor([longest])).logits.abs().max().item()
    per_token = log_softmax_bound(forward_bound(loaded.model.config, width, zmax, extra_k=rank + 2))
    return max(len(c) for cs in conts for c in cs) * per_token


@pytest.mark.numeric
def test_label_scores_with_adapters_equal_the_merged_models_in_one_mixed_batch(
    tiny_models, adapters, base_fp32, tmp_path_factory
):
    """Prompts of adapter a, adapter b and the base in one SCORE call (one pass): each prompt's
    label log-likelihoods equal its own model's (a and b merged as `quantize export` merges,
    the base itself) within the derived bound; an unknown adapter is NOT_FOUND for its prompt
    alone."""
    tmp = tmp_path_factory.getbasetemp()
    refs = {
        "a": merged(tiny_models["lm"], adapters["a"], tmp / "merged-a"),
        "b": merged(tiny_models["lm"], adapters["b"], tmp / "merged-b"),
        "": base_fp32,
    }
    loaded = base_fp32
    tok = loaded.tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    labels = [tok(w, add_special_tokens=False)["input_ids"] for w in ("sports news", "tech", "a b c d")]
    names = ["a", "", "b", "a", "b"]
    sched = engine(loaded, adapters, capacity=2)
    w = workers.Workers(loaded, [ModelSettings(name="lm", task="classify", path="x")], {}, sched, sched.lm)
    with torch.inference_mode():
        got = w.score(prompts, [labels] * len(prompts), "lm", names)
        want = []
        for p, name in zip(prompts, names):
            ref = CausalLM(refs[name].model, refs[name].tokenizer, refs[name].device)
            want.append(ref.score([p], [labels])[0])
        base = w.score(prompts, [labels] * len(prompts))
    tol = _score_bound(loaded, prompts, [labels], rank=8)
    for i, name in enumerate(names):
        assert got[i] == pytest.approx(want[i], abs=tol), (i, name)
        if name:  # the adapter moves the scores far beyond the bound (else no test)
            assert max(abs(x - y) for x, y in zip(got[i], base[i])) > 100 * tol
    assert sched.lm.lora.index is None  # the pass left the hooks off
    # an unknown adapter fails its own prompt only
    with torch.inference_mode():
        mixed = w.score([prompts[1], prompts[0]], [labels] * 2, "lm", ["nope", "a"])
    assert mixed[0] == "NOT_FOUND" and mixed[1] == pytest.approx(want[0], abs=tol)


def test_label_scoring_groups_adapters_that_cannot_be_resident_together(tiny_models, adapters, base_fp32):
    """Three adapters with room for one: scored one adapter per pass, each as scored alone."""
    loaded = base_fp32
    tok = loaded.tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:3]]
    labels = [tok(w, add_special_tokens=False)["input_ids"] for w in ("yes", "no")]
    sched = engine(loaded, adapters, capacity=1)
    w = workers.Workers(loaded, [ModelSettings(name="lm", task="classify", path="x")], {}, sched, sched.lm)
    with torch.inference_mode():
        together = w.score(prompts, [labels] * 3, "lm", ["a", "b", "c"])
        alone = [w.score([p], [labels], "lm", [n])[0] for p, n in zip(prompts, "abc")]
    assert together == alone
    # every slot held by a running row: RESOURCE_EXHAUSTED for the adapter prompt, the base row scores
    with torch.inference_mode():
        sched.add(GenerationRequest(0, "lm", prompts[0], SamplingParams(adapter="a"), 20, (), None))
        sched.step()
        held = w.score(prompts[:2], [labels] * 2, "lm", ["b", ""])
        assert held[0] == "RESOURCE_EXHAUSTED" and held[1] == w.score(prompts[1:2], [labels])[0]


@pytest.mark.numeric
def test_adapter_on_int8_base_equals_peft_on_the_same_int8_base(tiny_models, adapters):
    """An LLM.int8 base (bitsandbytes Linear8bitLt) with the adapter unmerged equals peft's own
    PeftModel over the same int8-loaded base with the same adapter, token for token. Not the
    merge into a dequantized int8 base: LLM.int8 also quantizes the activations (per row, to
    int8, beside an fp16 outlier part), so a merged weight's product rounds differently from
    base(x) + the LoRA term; peft, like this bank, adds the LoRA term beside the int8 matmul."""
    from peft import PeftModel

    settings = ModelSettings(name="lm", task="generate", path=str(tiny_models["lm"]), quantize="int8")
    served = workers.load(settings)
    assert served.quantization == "int8"
    ref = workers.load(settings)
    ref.model = PeftModel.from_pretrained(ref.model, str(adapters["a"])).eval()
    prompts = [served.tokenizer(p)["input_ids"] for p in PROMPTS]
    want = {i: solo(ref, p, 12) for i, p in enumerate(prompts)}
    assert want != {i: solo(served, p, 12) for i, p in enumerate(prompts)}  # the adapter matters
    got = run(engine(served, {"a": adapters["a"]}), [(i % 2, p, "a", 12) for i, p in enumerate(prompts)])
    assert got == want
