"""export -> `bitserve serve` -> client call, for int8 and nf4, with no quantization flag."""

from __future__ import annotations

import json

import pytest

from bitserve_quantize.export import AS_TRAINED, ExportOptions, export
from bitserve_quantize.train import finetune

from .conftest import options, topic_rows, write_jsonl


@pytest.fixture(scope="module")
def exported(tiny_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    data = write_jsonl(d / "train.jsonl", topic_rows(24))
    finetune(
        options(
            tiny_models["topics"],
            "classify",
            data,
            d / "ft",
            method="qlora",
            max_steps=3,
            lr=5e-3,
            eval_split=0.25,
        )
    )
    return {
        mode: export(ExportOptions(model=str(d / "ft"), quantize=mode, output=str(d / mode), device="cpu"))
        and d / mode
        for mode in ("int8", "nf4")
    }


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_exported_checkpoint_serves_through_the_client(exported, server_factory, mode):
    from bitserve_client import Client

    server = server_factory([{"name": f"ft-{mode}", "task": "classify", "path": str(exported[mode])}])
    with Client(server.target, timeout=60) as c:
        labels = c.classify("the team won the football match", model=f"ft-{mode}")
        assert labels and {x.label for x in labels} <= {"business", "sports", "politics", "tech"}
        info = next(m for m in c.list_models() if m.name == f"ft-{mode}")
    assert info.quantization == mode
    quality = json.loads(info.quality_report_json)
    # A QLoRA export reports the model as trained (NF4 base + adapter) beside the merge.
    assert [r["quantize"] for r in quality["results"]] == [AS_TRAINED, "none", mode]
