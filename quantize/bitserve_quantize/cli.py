"""`quantize` console script: finetune | export | report | recover.

Each sub-command's flags map one to one onto an options dataclass and a typed function; this is
the only place that turns errors into a one-line message and an exit status.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from bitserve.models.quantization import MODES

from .errors import QuantizeError
from .export import MERGE_BASES, ExportOptions, export
from .recover import BUILTIN_DATA, INITS, RECOVER_MODES, STUDENTS, RecoverOptions, recover
from .report import COMPUTE_DTYPES, ReportOptions, report
from .tasks import TASKS
from .train import METHODS, PRECISIONS, SCHEDULES, FinetuneOptions, finetune

# What the `quantize` extra adds to a server install (pyproject.toml). They are imported where
# used, so without this check a command would fail half-way; every command, --help included,
# says which extra to install instead.
EXTRA_MODULES = ("peft", "sacrebleu", "matplotlib", "tqdm")
INSTALL_EXTRA = "pip install ./clients/python '.[quantize]'  (from a bitserve checkout)"

log = logging.getLogger("bitserve_quantize")


def _modes(value: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in value.split(",") if m.strip())
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"modes must be a comma list of {', '.join(MODES)}; got {value!r}")
    return modes


def _names(value: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in value.split(",") if m.strip())


def _quant_flags(p: argparse.ArgumentParser) -> None:
    """How int8/nf4/fp4 are applied; the defaults are the server's."""
    p.add_argument(
        "--compute-dtype",
        choices=COMPUTE_DTYPES,
        default="auto",
        help="4-bit matmul dtype (auto: load dtype)",
    )
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false", help="4-bit: fp32 scales")
    p.add_argument(
        "--skip-modules",
        type=_names,
        default=(),
        help="comma list of module names kept unquantized (e.g. model.layers.0.mlp.down_proj)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quantize", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    d = FinetuneOptions  # defaults come from the dataclass, not repeated here
    f = sub.add_parser("finetune", help="fine-tune a checkpoint (full, LoRA, QLoRA) with mixed precision")
    f.add_argument("--model", required=True, help="base checkpoint directory")
    f.add_argument("--task", required=True, choices=list(TASKS))
    f.add_argument("--data", required=True, help="training data (.jsonl or .csv)")
    f.add_argument("--output", required=True, help="output directory (model or adapter, checkpoints/)")
    f.add_argument("--method", choices=METHODS, default=d.method)
    f.add_argument("--precision", choices=PRECISIONS, default=d.precision)
    g = f.add_mutually_exclusive_group()
    g.add_argument("--eval", help="held-out data file (default: split off --eval-split of --data)")
    g.add_argument("--eval-split", type=float, default=d.eval_split, help="fraction held out (0: no eval)")
    f.add_argument("--epochs", type=int, default=d.epochs)
    f.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps (overrides --epochs)")
    f.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    f.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    f.add_argument("--lr", type=float, default=d.lr)
    f.add_argument("--schedule", choices=SCHEDULES, default=d.schedule)
    f.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    f.add_argument("--weight-decay", type=float, default=d.weight_decay)
    f.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="0 disables clipping")
    f.add_argument("--max-length", type=int, default=d.max_length, help="tokens per example")
    f.add_argument("--seed", type=int, default=d.seed)
    f.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps (0: never)")
    f.add_argument("--keep", type=int, default=d.keep, help="checkpoints kept (0: all)")
    f.add_argument("--resume", action="store_true", help="continue from the newest finished checkpoint")
    f.add_argument("--lora-r", type=int, default=d.lora_r)
    f.add_argument("--lora-alpha", type=int, default=d.lora_alpha)
    f.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    f.add_argument(
        "--lora-targets", default=d.lora_targets, help="'all-linear' or a comma list of module names"
    )
    f.add_argument("--gradient-checkpointing", action="store_true")
    f.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    f.add_argument("--device", default=d.device, help="auto | cpu | cuda[:N]")
    f.add_argument("--no-progress", dest="progress", action="store_false")
    f.set_defaults(run=_finetune)

    e = sub.add_parser(
        "export", help="merge adapters, quantize, save a servable checkpoint + manifest + report"
    )
    e.add_argument("--model", required=True, help="fine-tuned model, LoRA output, or base (with --adapter)")
    e.add_argument("--adapter", help="LoRA adapter directory to merge into --model")
    e.add_argument("--quantize", choices=MODES, default=ExportOptions.quantize)
    e.add_argument("--output", required=True)
    e.add_argument("--task", choices=list(TASKS), help="default: from the fine-tune or the checkpoint")
    e.add_argument("--data", help="report data (default: the fine-tune's held-out eval.jsonl)")
    e.add_argument("--no-report", dest="report", action="store_false")
    e.add_argument("--batch-size", type=int, default=ExportOptions.batch_size)
    e.add_argument(
        "--max-length", type=int, default=ExportOptions.max_length, help="default: the fine-tune's"
    )
    e.add_argument("--device", default=ExportOptions.device)
    e.add_argument(
        "--merge-base",
        choices=MERGE_BASES,
        default=ExportOptions.merge_base,
        help="merge LoRA into the fp32 base or the dequantized NF4 base (auto: dequantized for QLoRA)",
    )
    _quant_flags(e)
    e.set_defaults(run=_export)

    r = sub.add_parser("report", help="score one checkpoint at each precision: quality.json + chart")
    r.add_argument("--model", required=True)
    r.add_argument("--data", required=True)
    r.add_argument(
        "--quantize", dest="modes", type=_modes, default=ReportOptions.modes, help="e.g. none,int8,nf4,fp4"
    )
    r.add_argument("--task", choices=list(TASKS), help="default: from the checkpoint's architecture")
    r.add_argument("--output", help="directory for quality.json / quality.png (default: --model)")
    r.add_argument("--batch-size", type=int, default=ReportOptions.batch_size)
    r.add_argument("--max-length", type=int, default=ReportOptions.max_length)
    r.add_argument("--device", default=ReportOptions.device)
    r.add_argument("--no-chart", dest="chart", action="store_false")
    _quant_flags(r)
    r.set_defaults(run=_report)

    c = RecoverOptions
    q = sub.add_parser(
        "recover",
        help="keep the base quantized; train a LoRA adapter that distils the float model into it",
    )
    q.add_argument("--model", required=True, help="float checkpoint directory (the teacher, and the base)")
    q.add_argument("--quantize", choices=RECOVER_MODES, default=c.quantize, help="the served base's mode")
    q.add_argument(
        "--data",
        default=c.data,
        help=f"general text: a .jsonl/.csv file with a 'text' column, or built-in {', '.join(BUILTIN_DATA)} "
        "(the Python reference shipped with Python)",
    )
    q.add_argument("--output", required=True, help="adapter directory (peft) + recover.json + serve.yaml")
    q.add_argument("--steps", type=int, default=c.steps, help="optimizer steps")
    q.add_argument("--batch-size", type=int, default=c.batch_size, help="blocks per step")
    q.add_argument("--max-length", type=int, default=c.max_length, help="tokens per block")
    q.add_argument("--lr", type=float, default=c.lr)
    q.add_argument("--warmup-ratio", type=float, default=c.warmup_ratio)
    q.add_argument("--lora-r", type=int, default=c.lora_r)
    q.add_argument("--lora-alpha", type=int, default=c.lora_alpha)
    q.add_argument(
        "--lora-targets", default=c.lora_targets, help="'all-linear' or a comma list of module names"
    )
    q.add_argument(
        "--init", choices=INITS, default=c.init, help="loftq: SVD of each layer's quantization residual"
    )
    q.add_argument(
        "--student",
        choices=STUDENTS,
        default=c.student,
        help="train on the bitsandbytes layers, or on their dequantized weights (4-bit: the same "
        "function, faster); auto: dequantized for nf4/fp4, quantized for int8",
    )
    q.add_argument("--temperature", type=float, default=c.temperature, help="distillation temperature")
    q.add_argument("--eval-blocks", type=int, default=c.eval_blocks, help="held-out blocks for the KL report")
    q.add_argument("--max-grad-norm", type=float, default=c.max_grad_norm, help="0 disables clipping")
    q.add_argument("--seed", type=int, default=c.seed)
    q.add_argument("--device", default=c.device, help="auto | cpu | cuda[:N]")
    q.add_argument("--no-progress", dest="progress", action="store_false")
    q.set_defaults(run=_recover)
    return p


def _options(cls: Any, args: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def _finetune(args: argparse.Namespace) -> dict[str, Any]:
    res = finetune(_options(FinetuneOptions, args))
    return {
        "output": str(res.output),
        "steps": res.steps,
        "final_loss": res.final_loss,
        "eval": res.eval_metrics,
        "trainable_parameters": res.trainable_parameters,
        "total_parameters": res.total_parameters,
        "peak_memory_bytes": res.peak_memory_bytes,
        "eval_peak_memory_bytes": res.eval_peak_memory_bytes,
        "peak_memory_kind": res.peak_memory_kind,
        "train_start_memory_bytes": res.train_start_memory_bytes,
        "skipped_steps": res.skipped_steps,
        "resumed_from": res.resumed_from,
    }


def _export(args: argparse.Namespace) -> dict[str, Any]:
    return export(_options(ExportOptions, args))


def _report(args: argparse.Namespace) -> dict[str, Any]:
    return report(_options(ReportOptions, args))


def _recover(args: argparse.Namespace) -> dict[str, Any]:
    return recover(_options(RecoverOptions, args))


def main(argv: Sequence[str] | None = None) -> int:
    missing = [m for m in EXTRA_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        print(
            f"quantize: needs the `quantize` extra (missing: {', '.join(missing)}): {INSTALL_EXTRA}",
            file=sys.stderr,
        )
        return 2
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("transformers", "accelerate", "peft", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # our own bar is the one that matters
    try:
        summary = args.run(args)
    except QuantizeError as e:
        print(f"quantize {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"quantize {args.command}: interrupted; finished checkpoints are kept", file=sys.stderr)
        return 130
    except Exception as e:  # a one-line summary, with the traceback in the debug log
        from bitserve.errors import ConfigError

        if not isinstance(e, ConfigError | OSError | ValueError):
            raise
        log.debug("%s failed", args.command, exc_info=True)
        print(
            f"quantize {args.command}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
            file=sys.stderr,
        )
        return 1
    if isinstance(summary, dict) and os.environ.get("RANK", "0") == "0":
        print(json.dumps(_compact(summary), indent=2, default=str))
    return 0


def _compact(doc: dict[str, Any]) -> dict[str, Any]:
    """The summary printed on stdout: drop bulky per-step loss lists."""
    return {k: v for k, v in doc.items() if k not in ("losses", "options")}


if __name__ == "__main__":
    sys.exit(main())
