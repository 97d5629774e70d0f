"""CUDA checks (run on a GPU machine: `python -m pytest -m gpu tests/test_gpu.py`).

The same server, engines and bitsandbytes paths as on the CPU, with models on the GPU in
float32, bfloat16, int8 and nf4.
"""

from __future__ import annotations

import pytest
import torch

from bitserve_client import Client

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def gpu_srv(server_factory, tiny_models):
    m = tiny_models
    cuda = {"device": "cuda"}
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
    ref = AutoModelForCausalLM.from_pretrained(tiny_models["lm"], dtype=torch.float32).cuda().eval()
    with Client(gpu_srv.target, timeout=120) as c:
        for prompt in ("Hello world", "The quick brown fox jumps over"):
            enc = tok(prompt, return_tensors="pt").to("cuda")
            want = ref.generate(**enc, max_new_tokens=16, do_sample=False)[0, enc["input_ids"].shape[1] :]
            got = c.generate(prompt, model="lm32", max_new_tokens=16, logprobs=True)
            ids = [t.id for t in got.logprobs]
            assert ids == want.tolist()[: len(ids)]
            # concurrent requests in one running batch give the same tokens
            batch = c.generate([prompt] * 4, model="lm32", max_new_tokens=16)
            assert all(b.text == got.text for b in batch)


def test_every_precision_answers_every_task(gpu_srv):
    with Client(gpu_srv.target, timeout=120) as c:
        for name in ("lm-bf16", "lm-int8", "lm-nf4"):
            g = c.generate(["Hello", "Once upon a time"], model=name, max_new_tokens=8)
            assert all(x.tokens >= 1 for x in g)
            events = list(c.generate_stream("Hello", model=name, max_new_tokens=8))
            assert events[-1].final is not None
        for name in ("topics32", "topics-int8"):
            res = c.classify(["The team won", "Stocks fell"], model=name)
            assert all(abs(sum(s.score for s in r) - 1) < 1e-3 for r in res)
        assert c.sentiment("I loved it").label in {"positive", "negative"}
        assert isinstance(c.translate("the house", source_lang="en", target_lang="fr").text, str)
