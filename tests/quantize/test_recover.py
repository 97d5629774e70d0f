"""`quantize recover`: a LoRA adapter distilled from the float model onto its quantized base.

Bad flags are one clear line and exit 2 (default run); the rest load models and run under -m slow:
the adapter it writes serves on the nf4 base in the
engine (LoRA bank, unmerged) exactly as peft's PeftModel over the same nf4 base computes it, and
the serve.yaml it writes is a valid model entry; (slow) on a tiny model, the recovered nf4 base
is closer to the float model than plain nf4: lower KL to the teacher and lower perplexity on
text it was not trained on.
"""

from __future__ import annotations

import json

import pytest
import yaml

from bitserve.engine import workers
from bitserve.settings import ModelSettings, build_settings
from bitserve_quantize import cli, data, tasks
from bitserve_quantize.errors import CheckpointError, DataError, OptionError
from bitserve_quantize.recover import RecoverOptions, blocks, recover
from bitserve_quantize.report import evaluate

from ..unit.engine.test_lora import PROMPTS, engine, run, solo
from .conftest import write_jsonl

TEXT = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "A function returns a value; a generator yields many values, one at a time.",
    "Hello world, this is a tiny model that serves tokens to everyone who asks.",
    "The team won the football match last night, and the stock markets fell today.",
] * 6


@pytest.fixture
def text_data(tmp_path):
    return write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in TEXT])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--steps", "0"], "--steps must be at least 1, not 0"),
        (["--max-length", "1"], "--max-length must be at least 2"),
        (["--lr", "0"], "--lr must be positive"),
        (["--temperature", "-1"], "--temperature must be positive"),
        (
            ["--quantize", "int8", "--student", "dequantized"],
            "int8 (LLM.int8) also quantizes the activations",
        ),
        (["--data", "nope.jsonl"], "--data: 'nope.jsonl' is neither a file nor a built-in text (pydoc)"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(tiny_models, tmp_path, capsys, flags, message):
    argv = ["recover", "--model", str(tiny_models["lm"]), "--output", str(tmp_path / "o"), *flags]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("quantize recover: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_argparse_refuses_an_unquantized_mode_and_a_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["recover", "--model", "m", "--output", "o", "--quantize", "none"])
    assert e.value.code == 2 and "invalid choice: 'none'" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        RecoverOptions(model=str(tmp_path), output=str(tmp_path / "o")).check()
    with pytest.raises(OptionError, match="--init must be one of loftq, zero"):
        RecoverOptions(model=str(tmp_path), output="o", init="svd").check()


def test_blocks_pack_text_with_eos_and_refuse_too_little(tiny_models):
    from bitserve.models.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_models["lm"]))
    b = blocks(tok, ["hello world", "la maison"], 4)
    ids = tok("hello world", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids += tok("la maison", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert b.shape == (len(ids) // 4, 4) and b.flatten().tolist() == ids[: b.numel()]
    with pytest.raises(DataError, match="fewer than one block"):
        blocks(tok, ["hi"], 64)


@pytest.fixture(scope="module")
def recovered(tiny_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("recover")
    f = write_jsonl(d / "text.jsonl", [{"text": t} for t in TEXT])
    out = d / "adapter"
    summary = recover(
        RecoverOptions(
            model=str(tiny_models["lm"]),
            output=str(out),
            quantize="nf4",
            data=str(f),
            steps=6,
            batch_size=4,
            max_length=32,
            lr=1e-2,
            lora_r=8,
            lora_alpha=8,
            eval_blocks=4,
            device="cpu",
            progress=False,
        )
    )
    return out, summary


@pytest.mark.slow  # ~20-60 s on the shared 2-core machine (two nf4 loads, a recover run)
@pytest.mark.numeric
def test_recovered_adapter_on_the_nf4_base_serves_as_peft_computes_it(tiny_models, recovered):
    """The engine's LoRA bank over the nf4 base (as a model entry `quantize: nf4` with the
    adapter loads it) gives the same greedy tokens as peft's PeftModel over the same nf4 base:
    both add the LoRA term beside the same 4-bit matmul (the nf4 test beside this one in
    tests/unit/engine/test_lora.py); and the adapter changes the output."""
    from peft import PeftModel

    out, summary = recovered
    assert summary["student"] == "dequantized" and summary["loftq_layers"] == 14
    settings = ModelSettings(name="lm", task="generate", path=str(tiny_models["lm"]), quantize="nf4")
    served = workers.load(settings)
    assert served.quantization == "nf4"
    ref = workers.load(settings)
    ref.model = PeftModel.from_pretrained(ref.model, str(out)).eval()
    prompts = [served.tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
    want = {i: solo(ref, p, 8) for i, p in enumerate(prompts)}
    assert want != {i: solo(served, p, 8) for i, p in enumerate(prompts)}  # the adapter matters
    got = run(engine(served, {"a": out}), [(i % 2, p, "a", 8) for i, p in enumerate(prompts)])
    assert got == want


@pytest.mark.slow
def test_the_written_config_snippet_is_a_valid_model_entry(tiny_models, recovered):
    out, summary = recovered
    cfg = yaml.safe_load((out / "serve.yaml").read_text())
    assert (out / "serve.yaml").read_text() == summary["config"]
    m = build_settings(config_data=cfg, environ={}).models[0]
    assert (m.quantize, m.default_adapter, m.adapters) == ("nf4", "recovered", {"recovered": str(out)})
    manifest = json.loads((out / "recover.json").read_text())
    assert manifest["steps"] == 6 and len(manifest["losses"]) == 6
    assert manifest["adapter_bytes"] == sum(p.numel() * 4 for p in _adapter_tensors(out).values())


def _adapter_tensors(out):
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


@pytest.mark.slow
def test_recovered_nf4_is_closer_to_the_float_model_than_plain_nf4(tiny_models, tmp_path):
    """A small version of examples/quantize_quality/recover_nf4.py on the tiny model: trained on
    the Python reference (pydoc_data), scored on other text. The recovered base's KL to the float
    model on held-out blocks and its perplexity on unseen text are both below plain nf4's."""
    path = str(tiny_models["lm"])
    summary = recover(
        RecoverOptions(
            model=path,
            output=str(tmp_path / "a"),
            quantize="nf4",
            data="pydoc",
            steps=60,
            batch_size=8,
            max_length=64,
            lr=5e-3,
            lora_r=8,
            lora_alpha=8,
            eval_blocks=8,
            device="cpu",
            progress=False,
        )
    )
    assert summary["kl_recovered"] < summary["kl_init"] <= summary["kl_quantized"]
    assert summary["kl_recovered"] < 0.8 * summary["kl_quantized"]
    held = data.read(write_jsonl(tmp_path / "held.jsonl", [{"text": t} for t in TEXT[:4]]))
    task = tasks.get("generate")
    kw = {"batch_size": 4, "max_length": 64, "device": "cpu"}
    fp32 = evaluate(path, task, held, "none", **kw)["perplexity"]
    plain = evaluate(path, task, held, "nf4", **kw)["perplexity"]
    fixed = evaluate(path, task, held, "nf4", adapter=str(tmp_path / "a"), **kw)["perplexity"]
    assert abs(fixed - fp32) < abs(plain - fp32), (fp32, plain, fixed)


@pytest.mark.slow
def test_int8_trains_on_the_bitsandbytes_layers_and_never_keeps_a_worse_adapter(
    tiny_models, text_data, tmp_path
):
    """LLM.int8 quantizes activations too, so its student is the bitsandbytes model itself; a run
    whose training raises the held-out KL (here: a large lr on an already tiny int8 error) keeps
    the LoftQ-initialised adapter, so the result is never further from the teacher than the init."""
    summary = recover(
        RecoverOptions(
            model=str(tiny_models["lm"]),
            output=str(tmp_path / "a"),
            quantize="int8",
            data=str(text_data),
            steps=4,
            batch_size=4,
            max_length=32,
            lr=5e-2,
            lora_r=4,
            lora_alpha=4,
            device="cpu",
            progress=False,
        )
    )
    assert summary["student"] == "quantized" and summary["loftq_layers"] == 14
    assert summary["kl_recovered"] == min(summary["kl_trained"], summary["kl_init"])
    assert summary["kl_init"] < summary["kl_quantized"]
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
