"""Models larger than one device: `device: auto` + `max_memory` spreads the layers with
accelerate's device map. On CPU a small `cpu` cap forces a real split: the first decoder layer
stays on the CPU, the rest is offloaded to disk, and the output must equal the unsplit model's.
"""

from __future__ import annotations

import gc

import pytest
import torch

from bitserve.errors import ConfigError
from bitserve.models.loading import load_checkpoint
from bitserve.settings import build_settings
from bitserve_client import Client

PROMPTS = ["Hello world", "The quick brown fox jumps", "a"]
# Caps as fractions of the model's own size: what keeps the embeddings and decoder layer 0 on
# the CPU and sends layer 1, the norm and the head to disk (accelerate reserves room for the
# largest offloaded layer, hence more than 1.0 for the smaller nf4 model).
FP32_CAP, NF4_CAP = 0.85, 1.1


def _lm():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def _split_layers(device_map: dict[str, str]) -> set[str]:
    return {d for m, d in device_map.items() if m.startswith("model.layers")}


def _same_outputs(a, b) -> None:
    ids = torch.tensor([[1, 5, 9, 20, 3, 7, 11]])
    with torch.no_grad():
        assert torch.equal(a.model(ids).logits, b.model(ids).logits)
        ga = a.model.generate(ids, max_new_tokens=10, do_sample=False)
        gb = b.model.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(ga, gb)


def test_forced_split_over_cpu_and_disk_equals_the_unsplit_model(tiny_models, tmp_path):
    path = str(tiny_models["lm"])
    whole = load_checkpoint(path, _lm(), device="cpu")
    assert whole.device_map == {}
    split = load_checkpoint(
        path, _lm(), max_memory={"cpu": int(whole.memory_bytes * FP32_CAP)}, offload_dir=str(tmp_path)
    )
    assert _split_layers(split.device_map) == {"cpu", "disk"}, split.device_map
    assert split.device_map["model.embed_tokens"] == "cpu" and split.device_map["lm_head"] == "disk"
    assert split.device == torch.device("cpu")  # where inputs go
    assert split.parameter_count == whole.parameter_count
    _same_outputs(whole, split)
    # One fresh offload folder per load (transformers may read safetensors weights in place
    # rather than copy them there), removed when the model is freed.
    (offload,) = list(tmp_path.iterdir())
    del split
    gc.collect()
    assert not offload.exists()  # freed with the model


def test_nf4_with_max_memory_that_fits_equals_nf4_on_one_device(tiny_models, tmp_path):
    """Without a GPU there is no second in-memory place for 4-bit layers: all on the CPU."""
    path = str(tiny_models["lm"])
    whole = load_checkpoint(path, _lm(), device="cpu", quantize="nf4")
    fits = load_checkpoint(path, _lm(), quantize="nf4", max_memory={"cpu": "1GB"}, offload_dir=str(tmp_path))
    assert fits.quantization == "nf4" and fits.device_map == {"": "cpu"}
    assert type(fits.model.model.layers[1].mlp.down_proj).__name__ == "Linear4bit"
    _same_outputs(whole, fits)  # a forward, then generate's forwards: nothing reloaded between calls


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_layers_offloaded_to_disk_are_a_config_error(tiny_models, tmp_path, mode):
    """accelerate reloads a disk-offloaded bitsandbytes layer empty from its second forward on
    (nf4), or cannot run it at all without a GPU (int8): refuse at load, not on request two."""
    whole = load_checkpoint(str(tiny_models["lm"]), _lm(), device="cpu", quantize=mode)
    cap = int(whole.memory_bytes * NF4_CAP)
    with pytest.raises(
        ConfigError,
        match=rf"max_memory leaves {mode} layers to be offloaded to disk .*modules on disk.*raise max_memory",
    ):
        load_checkpoint(
            str(tiny_models["lm"]), _lm(), quantize=mode, max_memory={"cpu": cap}, offload_dir=str(tmp_path)
        )


def _model(**kw) -> dict:
    return {"name": "m", "task": "generate", "path": "/x", **kw}


def test_max_memory_settings_normalize_keys_and_reject_what_accelerate_would():
    s = build_settings(
        config_data={"models": [_model(max_memory={0: "70GiB", "cuda:1": "1.5GB", "CPU": 1000})]},
        environ={"BITSERVE_MODELS__0__MAX_MEMORY__2": "20GiB"},
        check_paths=False,
    )
    assert s.models[0].max_memory == {0: "70GiB", 1: "1.5GB", "cpu": 1000, 2: "20GiB"}
    cases = {
        "models.0: max_memory spreads the model over devices: it needs device: auto, not 'cpu'": _model(
            device="cpu", max_memory={"cpu": "1GB"}
        ),
        "models.0.max_memory: key 'gpu0' must be a GPU index (0, 1, ... or cuda:N) or 'cpu'": _model(
            max_memory={"gpu0": "1GB"}
        ),
        "models.0.max_memory: cpu: 'lots' is not a size; use bytes or e.g. '500MB', '1.5GiB'": _model(
            max_memory={"cpu": "lots"}
        ),
        "models.0.max_memory: 0: '2TB' is not a size": _model(max_memory={0: "2TB"}),
    }
    for message, model in cases.items():
        with pytest.raises(ConfigError) as err:
            build_settings(config_data={"models": [model]}, environ={}, check_paths=False)
        assert str(err.value).startswith(message), str(err.value)


def test_server_lists_the_placement_and_generates_like_the_unsplit_model(
    tiny_models, server_factory, tmp_path
):
    path = str(tiny_models["lm"])
    cap = int(load_checkpoint(path, _lm(), device="cpu").memory_bytes * FP32_CAP)
    srv = server_factory(
        [
            {"name": "whole", "task": "generate", "path": path, "device": "cpu"},
            {
                "name": "split",
                "task": "generate",
                "path": path,
                "max_memory": {"cpu": cap},
                "offload_dir": str(tmp_path),
            },
        ]
    )
    with Client(srv.target) as c:
        models = {m.name: m for m in c.list_models()}
        assert models["whole"].device_map == {}
        assert models["split"].device == "cpu"
        assert _split_layers(models["split"].device_map) == {"cpu", "disk"}
        for prompt in PROMPTS:
            a = c.generate(prompt, model="whole", max_new_tokens=12, logprobs=True)
            b = c.generate(prompt, model="split", max_new_tokens=12, logprobs=True)
            assert [t.id for t in b.logprobs] == [t.id for t in a.logprobs]
            assert (b.text, b.finish_reason) == (a.text, a.finish_reason)
        batch = c.generate(PROMPTS, model="split", max_new_tokens=12)
        assert [g.text for g in batch] == [
            c.generate(p, model="whole", max_new_tokens=12).text for p in PROMPTS
        ]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_and_cpu_split_equals_the_model_on_the_gpu(tiny_models, tmp_path):
    """Layer 0 on cuda:0, the rest in CPU memory (run on the GPU by accelerate's hooks)."""
    path = str(tiny_models["lm"])
    whole = load_checkpoint(path, _lm(), device="cuda:0", dtype="float32")
    split = load_checkpoint(
        path,
        _lm(),
        dtype="float32",
        max_memory={0: int(whole.memory_bytes * FP32_CAP), "cpu": "1GB"},
        offload_dir=str(tmp_path),
    )
    assert _split_layers(split.device_map) == {"cuda:0", "cpu"}, split.device_map
    assert split.device == torch.device("cuda:0")
    ids = torch.tensor([[1, 5, 9, 20, 3, 7, 11]], device="cuda:0")
    with torch.no_grad():
        torch.testing.assert_close(split.model(ids).logits, whole.model(ids).logits)
        for _ in range(2):
            assert torch.equal(
                split.model.generate(ids, max_new_tokens=10, do_sample=False),
                whole.model.generate(ids, max_new_tokens=10, do_sample=False),
            )


def test_a_spread_copy_never_shares_an_engine_with_an_unspread_one(tiny_models):
    from bitserve.frontend.registry import engine_groups

    path = str(tiny_models["lm"])
    s = build_settings(
        config_data={
            "models": [
                {"name": "a", "task": "generate", "path": path},
                {"name": "b", "task": "generate", "path": path, "max_memory": {"cpu": "1GB"}},
                {"name": "c", "task": "generate", "path": path, "max_memory": {"cpu": 10**9}},
                {"name": "d", "task": "generate", "path": path, "max_memory": {"cpu": "1GB"}},
            ]
        },
        environ={},
    )
    assert engine_groups(s.models) == [[0], [1, 3], [2]]
