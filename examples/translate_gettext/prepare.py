"""Debian gettext catalogs (.mo) -> an en->xx translation dataset, held out by whole catalogs.

Every package that ships translations installs `<locale dir>/<lang>/LC_MESSAGES/<domain>.mo`:
human-translated UI strings, read here with Python's `gettext`. Test strings come only from
catalogs (packages) never seen in training, so the score is not a memory of the same package.

Dropped: the place/language/currency-name catalogs (`iso_*`), plural forms, strings with no
words left once placeholders (`%s`, `%(name)d`, `{0}`, `$VAR`) are removed, untranslated
copies, and strings longer than --max-chars.

    python examples/translate_gettext/prepare.py --lang fr --out mt-fr
    -> mt-fr/train.jsonl, mt-fr/test.jsonl ({prompt, completion, source, target, catalog})
"""

from __future__ import annotations

import argparse
import gettext
import json
import random
import re
from pathlib import Path

LOCALE_DIR = Path("/usr/share/locale")
LANGUAGES = {"fr": "French", "de": "German", "es": "Spanish"}
PLACEHOLDER = re.compile(r"%(\([^)]*\))?[-#0 +]*\d*(\.\d+)?[hlLqjzt]*[a-zA-Z%]|\{[^}]*\}|\$\{?\w+\}?|<[^>]+>")
WORD = re.compile(r"[^\W\d_]{2,}")


def prompt(source: str, lang: str) -> str:
    return f"Translate from English to {LANGUAGES[lang]}.\nEnglish: {source}\n{LANGUAGES[lang]}:"


def keep(source: str, target: str, max_chars: int) -> bool:
    if not source.strip() or not target.strip() or source.strip() == target.strip():
        return False
    if len(source) > max_chars or len(target) > max_chars:
        return False
    return bool(WORD.search(PLACEHOLDER.sub(" ", source)))


def catalog(path: Path, max_chars: int) -> list[tuple[str, str]]:
    with path.open("rb") as f:
        try:
            messages = gettext.GNUTranslations(f)._catalog  # msgid -> msgstr; the stdlib's only view
        except (OSError, UnicodeDecodeError):
            return []
    pairs = []
    for source, target in messages.items():
        if not isinstance(source, str) or "\x04" in source:  # plural forms; msgctxt-prefixed ids
            continue
        if keep(source, target, max_chars):
            pairs.append((" ".join(source.split()), " ".join(target.split())))
    return sorted(set(pairs))


def build(
    lang: str, locale_dir: Path, test_fraction: float, seed: int, max_chars: int, max_per_catalog: int
) -> tuple[list[dict], list[dict]]:
    files = sorted((locale_dir / lang / "LC_MESSAGES").glob("*.mo"))
    domains = {}
    for f in files:
        if f.stem.startswith("iso_"):
            continue  # country, language and currency names: a gazetteer, not translation
        pairs = catalog(f, max_chars)
        if pairs:
            rng = random.Random(f"{seed}:{f.stem}")
            rng.shuffle(pairs)
            domains[f.stem] = pairs[:max_per_catalog] if max_per_catalog else pairs
    names = sorted(domains)
    random.Random(seed).shuffle(names)
    n_test = max(1, round(len(names) * test_fraction))
    held = set(names[:n_test])
    train, test = [], []
    for name in sorted(domains):
        for source, target in domains[name]:
            row = {
                "prompt": prompt(source, lang),
                "completion": " " + target,
                "source": source,
                "target": target,
                "catalog": name,
            }
            (test if name in held else train).append(row)
    random.Random(seed).shuffle(train)
    return train, test


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lang", choices=sorted(LANGUAGES), default="fr")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--locale-dir", type=Path, default=LOCALE_DIR)
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of catalogs held out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-chars", type=int, default=200)
    p.add_argument("--max-per-catalog", type=int, default=0, help="0: all strings of a catalog")
    args = p.parse_args()
    train, test = build(
        args.lang, args.locale_dir, args.test_fraction, args.seed, args.max_chars, args.max_per_catalog
    )
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        with (args.out / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    cats = {n: len({r["catalog"] for r in rows}) for n, rows in (("train", train), ("test", test))}
    print(
        f"{len(train)} train strings from {cats['train']} catalogs / "
        f"{len(test)} test strings from {cats['test']} held-out catalogs in {args.out}"
    )


if __name__ == "__main__":
    main()
