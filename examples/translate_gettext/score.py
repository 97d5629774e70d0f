"""Score translations THROUGH THE SERVER: chrF and BLEU on held-out gettext strings.

Starts a real `bitserve serve` on a free port with the default config's translate entry (the
zero-shot instruct prompt, no adapter) and, with --merged, a second translate entry serving the
fine-tuned model (the QLoRA adapter merged into the fp32 base by `quantize export`, served with
backend: instruct). Every test string goes through the Translate RPC via the Python client with
source_lang "en" (as the README's session sends it); sacrebleu scores the answers per language.

    python examples/translate_gettext/score.py export --run mt-run              # merge the adapter
    python examples/translate_gettext/score.py score --run mt-run --result bench/results/translate-gettext.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
ZERO_SHOT = "smollm2-translate"  # the default config's translate entry
TUNED = "smollm2-translate-gettext"
EXAMPLES = ("Where is the train station?", "Open the file")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_config(merged: Path | None, only: list[str] | None = None) -> dict[str, Any]:
    """The default config's translate entry (zero-shot), plus the merged fine-tune if given;
    `only`: just these of the two. (One model per server here: two entries loading at once can
    fail with "cannot import name 'AutoConfig' from 'transformers'", an import race in the front.)"""
    from bitserve.models import demo

    cfg = demo.default_config()
    entry = next(m for m in cfg["models"] if m["name"] == ZERO_SHOT)
    models = [entry]
    if merged is not None:
        models.append({**entry, "name": TUNED, "path": str(merged)})
    models = [m for m in models if only is None or m["name"] in only]
    return {"server": {"host": "127.0.0.1"}, "models": models}


class Served:
    """`bitserve serve` in a child process on a free port, stopped on exit."""

    def __init__(self, config: dict[str, Any], log: Path):
        self.port = free_port()
        self._cfg = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
        yaml.safe_dump(config, self._cfg)
        self._cfg.close()
        self._log = log.open("w")
        bitserve = Path(sys.executable).with_name("bitserve")
        self.proc = subprocess.Popen(
            [
                str(bitserve),
                "serve",
                "--config",
                self._cfg.name,
                "--port",
                str(self.port),
                "--metrics-port",
                "-1",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.target = f"127.0.0.1:{self.port}"
        self.models = [m["name"] for m in config["models"]]

    def __enter__(self) -> Served:
        from bitserve_client import Client

        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bitserve serve exited ({self.proc.returncode}); see {self._log.name}")
            try:
                with Client(self.target, timeout=60) as c:
                    for name in self.models:  # UNAVAILABLE while a model still loads
                        c.translate("Hello", model=name, target_lang="fr", max_new_tokens=2)
                    return self
            except Exception:  # not listening yet
                pass
            time.sleep(2)
        raise TimeoutError("bitserve serve did not answer within 600 s")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()
        os.unlink(self._cfg.name)


def translate_all(
    target: str, model: str, texts: list[str], lang: str, chunk: int
) -> tuple[list[str], float]:
    from bitserve_client import Client

    out: list[str] = []
    started = time.perf_counter()
    with Client(target, timeout=900) as c:
        for i in range(0, len(texts), chunk):
            res = c.translate(texts[i : i + chunk], model=model, source_lang="en", target_lang=lang)
            out += [r.text for r in res]
    return out, time.perf_counter() - started


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def score_run(
    run: Path, langs: list[str], models: list[str], merged: Path | None, chunk: int, limit: int
) -> dict:
    import sacrebleu

    tests = {lang: read_jsonl(run / f"test-{lang}.jsonl")[: limit or None] for lang in langs}
    scores: dict[str, dict[str, Any]] = {}
    examples: dict[str, dict[str, dict[str, str]]] = {}
    for model in models:
        with Served(server_config(merged, [model]), run / f"serve-{model}.log") as srv:
            for lang in langs:
                refs = [t["target"] for t in tests[lang]]
                hyps, seconds = translate_all(
                    srv.target, model, [t["source"] for t in tests[lang]], lang, chunk
                )
                scores.setdefault(model, {})[lang] = {
                    "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score,
                    "bleu": sacrebleu.corpus_bleu(hyps, [refs]).score,
                    "strings": len(refs),
                    "seconds": round(seconds, 1),
                    "hypotheses": hyps,
                }
                ex, _ = translate_all(srv.target, model, list(EXAMPLES), lang, chunk)
                for src, hyp in zip(EXAMPLES, ex, strict=True):
                    examples.setdefault(src, {}).setdefault(lang, {})[model] = hyp
                print(
                    f"{model} {lang}: chrF {scores[model][lang]['chrf']:.1f} BLEU {scores[model][lang]['bleu']:.1f} ({seconds:.0f} s)",
                    flush=True,
                )
    return {"scores": scores, "examples": examples, "tests": tests}


def export_merged(run: Path) -> Path:
    out = run / "merged"
    cmd = [
        sys.executable, "-m", "bitserve_quantize.cli", "export", "--model", str(run / "adapter"),
        "--merge-base", "fp32", "--quantize", "none", "--output", str(out), "--no-report",
    ]  # fmt: skip
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out


def training_summary(run: Path, train_run: dict[str, Any]) -> dict[str, Any]:
    """The fine-tune's manifest; for a run stopped at a checkpoint (train.py from-checkpoint),
    the same facts from its command line, trainer state and the peak RSS read before it stopped."""
    manifest = run / "adapter" / "finetune.json"
    if manifest.is_file():
        return json.loads(manifest.read_text())
    flags = train_run["finetune"]
    opts: dict[str, Any] = {}
    for i, flag in enumerate(flags):
        if flag.startswith("--") and i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            value: Any = flags[i + 1]
            for cast in (int, float):
                try:
                    value = cast(value)
                    break
                except ValueError:
                    pass
            opts[flag[2:].replace("-", "_")] = value
    n_train = sum(1 for line in Path(opts["data"]).read_text().splitlines() if line.strip())
    return {
        "options": opts,
        "steps": train_run["stopped_at_step"],
        "schedule_steps": train_run["schedule_steps"],
        "train_examples": n_train,
        "seconds": train_run["wall_s"],
        "peak_memory_bytes": train_run["peak_memory_bytes"],
        "trainable_parameters": train_run.get("trainable_parameters"),
        "total_parameters": train_run.get("total_parameters"),
        "final_loss": train_run["losses"][-1],
        "losses": train_run["losses"],
        "eval_metrics": {},
    }


def qlora_note(ft: dict[str, Any]) -> str:
    o = ft["options"]
    stopped = (
        f" (the step-{ft['steps']} checkpoint of a {ft['schedule_steps']}-step cosine schedule: time ran out)"
        if ft.get("schedule_steps")
        else ""
    )
    return (
        f"QLoRA: NF4 base (double quant) + LoRA r={o['lora_r']} alpha={o['lora_alpha']} on "
        f"{o['lora_targets']}, {o['precision']} autocast, {ft['steps']} steps x batch {o['batch_size']} = "
        f"{ft['steps'] * o['batch_size']} rows of {ft['train_examples']} (fr, de, es interleaved){stopped}, "
        f"max {o['max_length']} tokens, lr {o['lr']:g} {o['schedule']}; {ft['seconds'] / 60:.0f} min on "
        f"the shared 2-core CPU, peak RSS {ft['peak_memory_bytes'] / 2**20:.0f} MiB."
    )


def write_result(args: argparse.Namespace, run: Path, scored: dict, started: float) -> Path:
    sys.path.insert(0, str(ROOT))
    from bench import results

    train_run = json.loads((run / "train_run.json").read_text())
    ft = training_summary(run, train_run)
    o = ft["options"]
    rows = []
    for lang in args.langs:
        zs = scored["scores"][ZERO_SHOT][lang]
        row = {
            "lang": f"en->{lang}",
            "strings": zs["strings"],
            "chrf_zero": zs["chrf"],
            "bleu_zero": zs["bleu"],
        }
        tuned = scored["scores"].get(TUNED, {}).get(lang)
        if tuned:
            row.update(
                chrf_tuned=tuned["chrf"], bleu_tuned=tuned["bleu"], chrf_gain=tuned["chrf"] - zs["chrf"]
            )
        else:
            row.update(chrf_tuned=None, bleu_tuned=None, chrf_gain=None)
        rows.append(row)
    columns = [
        results.column("lang", "pair"),
        results.column("strings", "held-out strings"),
        results.column("chrf_zero", "chrF zero-shot", "{:.1f}"),
        results.column("chrf_tuned", "chrF QLoRA (merged)", "{:.1f}"),
        results.column("chrf_gain", "chrF gain", "{:+.1f}"),
        results.column("bleu_zero", "BLEU zero-shot", "{:.1f}"),
        results.column("bleu_tuned", "BLEU QLoRA (merged)", "{:.1f}"),
    ]
    notes = [
        "Scored through a real `bitserve serve` (Translate RPC, Python client, source_lang en, greedy): "
        f"`{ZERO_SHOT}` is the default config's instruct entry (no adapter); `{TUNED}` the same entry "
        "on the QLoRA adapter merged into the fp32 base (`quantize export --merge-base fp32`), as "
        "translate requests take no adapter yet.",
        qlora_note(ft),
        "Held-out strings come from gettext catalogs (packages) never trained on (prepare.py's split); "
        "a fixed seeded sample per language, the same for both models.",
    ]
    extra = {
        "training": {
            "command": " ".join(train_run["argv"]),
            "finetune_command": " ".join(train_run["finetune"]),
            "wall_s": train_run["wall_s"],
            "finetune_seconds": ft["seconds"],
            "peak_memory_bytes": ft["peak_memory_bytes"],
            "peak_memory_kind": "process peak RSS (CPU; includes loading and NF4 quantization)",
            "trainable_parameters": ft["trainable_parameters"],
            "total_parameters": ft["total_parameters"],
            "train_examples": ft["train_examples"],
            "steps": ft["steps"],
            "final_loss": ft["final_loss"],
            "losses_every_50": ft["losses"][::50],
            "eval": ft["eval_metrics"],
            "options": o,
        },
        "served_as": "merged: adapter merged into the fp32 base by quantize export, backend instruct",
        "scores": {m: {lang: {k: v for k, v in s.items() if k != "hypotheses"} for lang, s in per.items()}
                   for m, per in scored["scores"].items()},
        "examples": scored["examples"],
        "samples": {
            lang: [
                {"source": t["source"], "reference": t["target"],
                 **{m: scored["scores"][m][lang]["hypotheses"][i] for m in scored["scores"]}}
                for i, t in enumerate(scored["tests"][lang][:10])
            ]
            for lang in args.langs
        },
    }  # fmt: skip
    return results.write(
        Path(args.result).stem,
        command=results.command_line(),
        columns=columns,
        rows=rows,
        notes=notes,
        extra=extra,
        started=started,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("export", "score"))
    p.add_argument("--run", required=True, type=Path, help="train.py's --out directory")
    p.add_argument("--langs", type=lambda s: [x for x in s.split(",") if x], default=["fr", "de", "es"])
    p.add_argument("--merged", type=Path, help="merged checkpoint (default: RUN/merged if it exists)")
    p.add_argument("--zero-shot-only", action="store_true")
    p.add_argument("--chunk", type=int, default=16, help="texts per Translate call")
    p.add_argument("--limit", type=int, default=0, help="first N test strings per language (0: all)")
    p.add_argument("--result", help="write this result file (bench/results/NAME.json)")
    args = p.parse_args()
    started = time.time()
    if args.command == "export":
        export_merged(args.run)
        return
    merged = None if args.zero_shot_only else (args.merged or args.run / "merged")
    if merged is not None and not merged.is_dir():
        sys.exit(f"{merged}: no merged checkpoint; run `score.py export --run {args.run}` first")
    models = [ZERO_SHOT] + ([TUNED] if merged is not None else [])
    # A model already scored on the same strings (an earlier run, e.g. zero-shot while training ran)
    # is not scored again.
    saved = args.run / "scores.json"
    previous = json.loads(saved.read_text()) if saved.is_file() else None
    key = {"langs": args.langs, "limit": args.limit}
    if previous is None or previous.get("key") != key:
        previous = {"key": key, "scores": {}, "examples": {}, "tests": {}}
    todo = [m for m in models if m not in previous["scores"]]
    scored = score_run(args.run, args.langs, todo, merged, args.chunk, args.limit) if todo else previous
    if todo:
        for m in previous["scores"]:
            scored["scores"].setdefault(m, previous["scores"][m])
        for src, per in previous["examples"].items():
            for lang, hyps in per.items():
                for m, h in hyps.items():
                    scored["examples"].setdefault(src, {}).setdefault(lang, {}).setdefault(m, h)
        scored["key"] = key
        saved.write_text(json.dumps(scored, indent=1, ensure_ascii=False))
    scored["scores"] = {m: scored["scores"][m] for m in models if m in scored["scores"]}
    if args.result:
        print(write_result(args, args.run, scored, started))


if __name__ == "__main__":
    main()
