"""CUDA checks (run on a GPU machine: `python -m pytest -m gpu tests/integration/test_gpu.py`).

The same server, engines and bitsandbytes paths as on the CPU, with models on the GPU in
float32, bfloat16, int8 and nf4.
"""

from __future__ import annotations

import pytest
import torch

from bitserve_client import Client

DEV = "cuda"  # a module constant so the same checks can be dry-run on the CPU
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def gpu_srv(server_factory, tiny_models):
    m = tiny_models
    cuda = {"device": DEV}
    return server_factory(
        [
            {"name": "lm32", "task": "generate", "path": str(m["lm"]), "dtype": "float32", **cuda},
            {"name": "lm-bf16", "task": "generate", "path": str(m["lm"]), "dtype": "bfloat16", **cuda},
            {"name": "lm-int8", "task": "generate", "path": str(m["lm"]), "quantize": "int8", **cuda},
            {"name": "lm-nf4", "task": "generate", "path": str(m["lm"]), "quantize": "nf4", **cuda},
            {"name": "topics32", "task": "classify", "path": str(m["topics"]), "dtype": "float32", **cuda},
            {"name": "topics-int8", "task": "classify", "path": str(m["topics"]), "quantize": "int8", **cuda},
            {"name": "sent-nf4", "task": "sentiment", "path": str(m["sentiment"]), "quantize": "nf4", **cuda},
            {"name": "t5", "task": "translate", "path": str(m["t5"]), "dtype": "float32", **cuda},
        ],
        metrics_port=-1,
    )


def test_models_are_on_cuda_and_quantized_ones_are_smaller(gpu_srv):
    with Client(gpu_srv.target, timeout=120) as c:
        models = {m.name: m for m in c.list_models()}
    assert all(m.device.startswith("cuda") for m in models.values()), models
    assert models["lm-bf16"].dtype == "bfloat16"
    assert models["lm-nf4"].memory_bytes < models["lm-int8"].memory_bytes < models["lm32"].memory_bytes


def test_fp32_greedy_on_cuda_equals_transformers(gpu_srv, tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["lm"])
    ref = AutoModelForCausalLM.from_pretrained(tiny_models["lm"], dtype=torch.float32).to(DEV).eval()
    with Client(gpu_srv.target, timeout=120) as c:
        for prompt in ("Hello world", "The quick brown fox jumps over"):
            enc = tok(prompt, return_tensors="pt").to(DEV)
            want = ref.generate(**enc, max_new_tokens=16, do_sample=False)[0, enc["input_ids"].shape[1] :]
            got = c.generate(prompt, model="lm32", max_new_tokens=16, logprobs=True)
            ids = [t.id for t in got.logprobs]
            assert ids == want.tolist()[: len(ids)]
            # concurrent requests in one running batch give the same tokens
            batch = c.generate([prompt] * 4, model="lm32", max_new_tokens=16)
            assert all(b.text == got.text for b in batch)


def _teacher_forced(path, prompt, ids, *, dtype="float32", quantize="none"):
    """Per generated position: log P(served token) and max log P from transformers on CUDA at
    that precision, fed the prompt plus the served tokens (no sampling, no argmax ties)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bitserve.models.quantization import bnb_config

    torch_dtype = getattr(torch, dtype)
    q = {} if quantize == "none" else {"quantization_config": bnb_config(quantize, torch_dtype)}
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, device_map={"": DEV}, **q).eval()
    p = tok(prompt)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + ids], device=DEV)).logits[0].float()
    lp = torch.log_softmax(logits[len(p) - 1 : len(p) - 1 + len(ids)], -1)
    chosen = lp[torch.arange(len(ids)), torch.tensor(ids, device=DEV)]
    return chosen.tolist(), lp.max(-1).values.tolist()


@pytest.mark.parametrize(
    ("name", "dtype", "quantize", "tol"),
    [
        ("lm-bf16", "bfloat16", "none", 0.05),
        ("lm-int8", "float32", "int8", 0.02),
        ("lm-nf4", "float32", "nf4", 0.02),
    ],
)
def test_each_precision_generates_that_models_greedy_tokens(gpu_srv, tiny_models, name, dtype, quantize, tol):
    """Served tokens are (up to `tol`) the greedy choices of transformers' model at the same
    precision, and their log-probabilities match it: a wrong dtype, a skipped quantization or a
    corrupted weight load moves them further than that."""
    with Client(gpu_srv.target, timeout=120) as c:
        g = c.generate("Hello world", model=name, max_new_tokens=8, logprobs=True)
        events = list(c.generate_stream("Hello world", model=name, max_new_tokens=8, logprobs=True))
    ids = [t.id for t in g.logprobs]
    assert len(ids) == g.tokens >= 1 and g.finish_reason in ("length", "eos")
    assert g.finish_reason == "eos" or g.tokens == 8
    chosen, best = _teacher_forced(tiny_models["lm"], "Hello world", ids, dtype=dtype, quantize=quantize)
    assert [t.logprob for t in g.logprobs] == pytest.approx(chosen, abs=tol)
    assert all(b - c_ <= tol for c_, b in zip(chosen, best)), "a served token is not a greedy choice"
    final = events[-1].final
    assert [e.final is None for e in events] == [True] * (len(events) - 1) + [False]
    assert [t.id for t in final.logprobs] == ids


def _reference_probs_cuda(path, texts, quantize="none"):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from bitserve.models.quantization import bnb_config

    q = {} if quantize == "none" else {"quantization_config": bnb_config(quantize)}
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, dtype=torch.float32, device_map={"": DEV}, **q
    ).eval()
    out = []
    with torch.no_grad():
        for t in texts:
            logits = model(**tok(t, return_tensors="pt").to(DEV)).logits[0].float()
            out.append(torch.softmax(logits, -1).tolist())
    return out, [model.config.id2label[i] for i in range(model.config.num_labels)]


@pytest.mark.parametrize(("name", "quantize"), [("topics32", "none"), ("topics-int8", "int8")])
def test_classify_on_cuda_equals_transformers_at_that_precision(gpu_srv, tiny_models, name, quantize):
    texts = ["The team won", "Stocks fell"]
    ref, labels = _reference_probs_cuda(tiny_models["topics"], texts, quantize)
    with Client(gpu_srv.target, timeout=120) as c:
        res = c.classify(texts, model=name)
    for r, probs in zip(res, ref):
        got = {s.label: s.score for s in r}
        assert [got[label] for label in labels] == pytest.approx(
            probs, abs=1e-2 if quantize != "none" else 1e-4
        )


def test_nf4_sentiment_and_translate_on_cuda_equal_transformers(gpu_srv, tiny_models):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    texts = ["I loved it", "This was terrible"]
    ref, labels = _reference_probs_cuda(tiny_models["sentiment"], texts, "nf4")
    tok = AutoTokenizer.from_pretrained(tiny_models["t5"])
    t5 = AutoModelForSeq2SeqLM.from_pretrained(tiny_models["t5"], dtype=torch.float32).to(DEV).eval()
    enc = tok("translate English to French: the house", return_tensors="pt").to(DEV)
    want = tok.decode(t5.generate(**enc, max_new_tokens=12)[0], skip_special_tokens=True).strip()
    with Client(gpu_srv.target, timeout=120) as c:
        for r, probs in zip(c.sentiment(texts, model="sent-nf4"), ref):
            i = max(range(len(probs)), key=probs.__getitem__)
            assert r.raw_label == labels[i] and r.score == pytest.approx(probs[i], abs=1e-2)
        assert c.translate("the house", source_lang="en", target_lang="fr", max_new_tokens=12).text == want
