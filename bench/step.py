"""Milliseconds per decode step, by phase, of the engine alone (in process, no front, no gRPC).

    python -m bench.step                          # tiny GPT-2 on CPU, rows 1, 8, 64
    python -m bench.step --rows 1 8 --steps 100 --name step-cpu-quick

The engine loop (`engine.core.Core`, its scheduler and model runner) runs here on a tiny GPT-2
with random weights, kept at N running rows: mixed generation lengths (8..64 new tokens), so
rows leave and new ones join all the time, as in served traffic. Each phase is timed by wrapping
the function that does it, exclusive of the wrapped functions it calls:

    mask      the decode inputs: attention mask, positions, ids (the runner's decode, minus forward)
    forward   the model forward of decode steps
    sample    token choice (`select_tokens`)
    advance   appending tokens, finishes, the scheduler's bookkeeping
    leave     rows leaving the batch
    join      new rows entering the batch (without their prefill forward)
    prefill   prompt forwards of joining rows
    pack      msgpack of the messages to the front
    other     the rest of the engine step (policy, stats)

Beside it, in the same run, transformers' own `generate()` on a batch of N equal prompts: its
time per new token ((t(T) - t(1)) / (T - 1), so without the prefill). The result goes to
bench/results/NAME.json.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: python bench/step.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import results as bench_results  # noqa: E402

PHASES = ["mask", "forward", "sample", "advance", "leave", "join", "prefill", "pack", "other"]


def build_gpt2(path: Path) -> Path:
    """A tiny GPT-2 (4 layers, 128 wide, learned positions) with random weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from bitserve.models.tiny import build_tokenizer

    tok = build_tokenizer()
    tok.padding_side = "left"
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=512,
        n_embd=128,
        n_layer=4,
        n_head=4,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = GPT2LMHeadModel(cfg).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


class Timer:
    """Exclusive time per phase: a wrapped call's time, less that of wrapped calls inside it."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.stack: list[list[Any]] = []  # [phase, child time]

    def wrap(self, owner: Any, attr: str, phase: str | Callable[[list[str]], str]) -> bool:
        fn = getattr(owner, attr, None)
        if fn is None:
            return False
        timer = self

        def timed(*a: Any, **kw: Any) -> Any:
            name = phase([f[0] for f in timer.stack]) if callable(phase) else phase
            frame = [name, 0.0]
            timer.stack.append(frame)
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                dt = time.perf_counter() - t0
                timer.stack.pop()
                timer.total[name] += dt - frame[1]
                if timer.stack:
                    timer.stack[-1][1] += dt

        setattr(owner, attr, timed)
        return True


def instrument(core: Any, timer: Timer) -> None:
    """Wrap the functions that do each phase, in whichever engine version this is."""
    from bitserve.engine.sched import scheduler as S

    sched = core.w.scheduler
    lm = sched.lm

    def fwd_phase(stack: list[str]) -> str:
        return "prefill" if "prefill" in stack or "join" in stack else "forward"

    compiled = getattr(lm, "compiled", None)
    if compiled is not None:
        # A compiled decode step: its graph call is the forward. model.forward stays unwrapped
        # (a wrapper there would sit inside the graph and fail its guards), so a join's
        # bookkeeping counts as its prefill.
        timer.wrap(compiled, "fn", "forward")
        timer.wrap(lm, "join", "prefill")
        timer.wrap(lm, "chunk", "prefill")
    else:
        timer.wrap(lm.model, "forward", fwd_phase)
        # The persistent batch: a join (or a long prompt's chunk) prefills into free slots.
        timer.wrap(lm, "join", "join")
        timer.wrap(lm, "chunk", "join")
    timer.wrap(lm, "decode", "mask")
    timer.wrap(lm, "prefill", "prefill")
    timer.wrap(S, "select_tokens", "sample")
    timer.wrap(sched, "_advance", "advance")
    timer.wrap(sched, "_advance_slots", "advance")
    # leave / join: the old engine's Batch.filter / concatenate, the persistent batch's own.
    batch_mod = getattr(S, "Batch", None)
    if batch_mod is not None and hasattr(batch_mod, "filter"):
        timer.wrap(batch_mod, "filter", "leave")
        timer.wrap(batch_mod, "concatenate", "join")
    slots = getattr(sched, "slots", None)
    if slots is not None:
        timer.wrap(slots, "leave", "leave")
    timer.wrap(core, "_pack", "pack")


class EngineRun:
    """One engine (`Core`) kept at `rows` running rows of mixed lengths; `run(k)` times k
    decode steps: ms per step and per phase."""

    def __init__(self, path: Path, rows: int, quantize: str, seed: int, compile_decode: str = "off"):
        from bitserve.engine import workers
        from bitserve.engine.core import Core
        from bitserve.ipc import protocol as P
        from bitserve.settings import ModelSettings

        settings = ModelSettings(
            name="lm",
            task="generate",
            path=str(path),
            max_concurrent_sequences=rows,
            max_waiting_ms=0,
            quantize=quantize,
            compile_decode=compile_decode,
        )
        loaded = workers.load(settings)
        t0 = time.perf_counter()
        w = workers.workers_for(loaded, [settings])  # compiles here when compile_decode is on
        self.build_s = time.perf_counter() - t0
        self.compiled = w.lm is not None and w.lm.compiled is not None
        self.sent: list[int] = []
        core = Core(w, lambda b: self.sent.append(len(b)))
        # Messages are packed where the engine process packs them; `_pack` is the hook (old
        # engines pack inside `send`: wrap P.pack then).
        if not hasattr(core, "_pack"):
            pack = P.pack
            core._pack = pack  # type: ignore[attr-defined]
            core.send = lambda m: self.sent.append(len(core._pack(m)))  # type: ignore[attr-defined]
        self.core = core
        self.timer = Timer()
        instrument(core, self.timer)
        self.sched = w.scheduler
        assert self.sched is not None
        self.sched.lm.eos = frozenset()  # random weights: lengths come from max_new_tokens alone
        self.rows = rows
        self.rng = random.Random(seed)
        self.rid = 0

    def _submit(self) -> None:
        from bitserve.ipc import protocol as P
        from bitserve.types import GenerationRequest, SamplingParams

        rng, vocab = self.rng, 300
        self.rid += 1
        n_prompt = rng.randint(4, 40)
        req = GenerationRequest(
            rid=self.rid,
            model="lm",
            prompt_ids=[rng.randrange(10, vocab) for _ in range(n_prompt)],
            params=SamplingParams(max_new_tokens=rng.randint(8, 64)),
            max_new_tokens=rng.randint(8, 64),
            stop_ids=(),
            deadline=None,
            client="",
        )
        self.core.handle([P.GENERATE, self.rid, P.request_to_wire(req)])

    def run(self, steps: int) -> dict[str, float]:
        sched, timer = self.sched, self.timer
        assert sched is not None
        timer.total.clear()
        decode_steps, t_total = 0, 0.0
        with torch.inference_mode():
            while decode_steps < steps:
                while len(sched.waiting) + len(sched.running) < self.rows:
                    self._submit()
                before = sched.stats.steps
                t0 = time.perf_counter()
                self.core.step()
                t_total += time.perf_counter() - t0
                decode_steps += sched.stats.steps - before
        per = {p: 1000 * timer.total.get(p, 0.0) / decode_steps for p in PHASES if p != "other"}
        per["other"] = max(0.0, 1000 * t_total / decode_steps - sum(per.values()))
        return {"ms_per_step": 1000 * t_total / decode_steps, **{f"ms_{p}": v for p, v in per.items()}}


def run_engine(path: Path, rows: int, steps: int, quantize: str, seed: int) -> dict[str, Any]:
    eng = EngineRun(path, rows, quantize, seed)
    eng.run(20)  # warm-up
    return eng.run(steps)


def compare_compile(
    path: Path, rows_list: list[int], rounds: int, steps: int, quantize: str
) -> tuple[list[dict[str, Any]], float]:
    """Compile off and on, interleaved: per row count, `rounds` rounds of `steps` decode steps
    each, the two engines taking turns step by step; ms/step ranges and the
    per-round ratio eager / compiled. The compiled engine runs its own copy of the weights, so
    that the eager one's timers never sit inside its graph. Returns rows and compile seconds."""
    import shutil

    compiled_path = path.parent / (path.name + "-compiled")
    if not compiled_path.exists():
        shutil.copytree(path, compiled_path)
    out = []
    compile_s = 0.0
    for n in rows_list:
        engines = {
            "off": EngineRun(path, n, quantize, seed=n, compile_decode="off"),
            "on": EngineRun(compiled_path, n, quantize, seed=n, compile_decode="on"),
        }
        assert engines["on"].compiled and not engines["off"].compiled
        compile_s = max(compile_s, engines["on"].build_s)
        for e in engines.values():
            e.run(10)  # warm-up: first joins, capacity
        got: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
        loads = []
        for r in range(rounds):
            # The two engines take turns step by step (who goes first alternates), so that a
            # burst of load on this shared machine falls on both alike.
            sums: dict[str, dict[str, float]] = {"off": defaultdict(float), "on": defaultdict(float)}
            for i in range(steps):
                for mode in ("off", "on") if (r + i) % 2 == 0 else ("on", "off"):
                    for k, v in engines[mode].run(1).items():
                        sums[mode][k] += v / steps
            for mode in ("off", "on"):
                got[mode].append(dict(sums[mode]))
            loads.append(os.getloadavg()[0])
        off = [g["ms_per_step"] for g in got["off"]]
        on = [g["ms_per_step"] for g in got["on"]]
        ratios = [a / b for a, b in zip(off, on, strict=True)]
        row: dict[str, Any] = {
            "rows": n,
            "eager_ms": statistics.median(off),
            "eager_min": min(off),
            "eager_max": max(off),
            "compiled_ms": statistics.median(on),
            "compiled_min": min(on),
            "compiled_max": max(on),
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "load_min": min(loads),
            "load_max": max(loads),
        }
        for mode, key in (("off", "eager"), ("on", "compiled")):
            for p in ("forward", "mask", "prefill"):
                row[f"{key}_{p}"] = statistics.median(g[f"ms_{p}"] for g in got[mode])
        out.append(row)
        print(
            f"rows={n:3d} eager {row['eager_ms']:.2f} [{row['eager_min']:.2f}-{row['eager_max']:.2f}] ms  "
            f"compiled {row['compiled_ms']:.2f} [{row['compiled_min']:.2f}-{row['compiled_max']:.2f}] ms  "
            f"eager/compiled {row['ratio']:.2f} [{row['ratio_min']:.2f}-{row['ratio_max']:.2f}]  "
            f"forward {row['eager_forward']:.2f} -> {row['compiled_forward']:.2f}  "
            f"load {row['load_min']:.1f}-{row['load_max']:.1f}",
            flush=True,
        )
    return out, compile_s


def run_generate(path: Path, rows: int, new_tokens: int, quantize: str) -> float:
    """transformers generate(): ms per new token for a batch of `rows` equal 20-token prompts."""
    from bitserve.engine import workers
    from bitserve.settings import ModelSettings

    loaded = workers.load(ModelSettings(name="lm", task="generate", path=str(path), quantize=quantize))
    model = loaded.model
    ids = torch.randint(10, 300, (rows, 20))

    def once(n: int) -> float:
        t0 = time.perf_counter()
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
        return time.perf_counter() - t0

    with torch.inference_mode():
        once(4)  # warm-up
        t1 = min(once(1) for _ in range(3))
        tn = min(once(new_tokens) for _ in range(2))
    return 1000 * (tn - t1) / (new_tokens - 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.step", description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--steps", type=int, default=200, help="decode steps measured per row count")
    ap.add_argument("--quantize", default="none", help="none | int8 | nf4 | fp4 (bitsandbytes)")
    ap.add_argument("--model", help="checkpoint directory (default: build the tiny GPT-2)")
    ap.add_argument("--name", default="step-cpu", help="result file bench/results/NAME.json")
    ap.add_argument("--label", default="", help="a note on what code this measures (before/after)")
    ap.add_argument(
        "--compare-compile",
        action="store_true",
        help="compile_decode off vs on, interleaved rounds (result: step-compile-cpu by default)",
    )
    ap.add_argument("--rounds", type=int, default=6, help="with --compare-compile: rounds per row count")
    args = ap.parse_args(argv)
    started = time.time()
    torch.manual_seed(0)
    if args.compare_compile:
        return _main_compile(args, argv, started)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model) if args.model else build_gpt2(Path(tmp) / "gpt2")
        out = []
        for n in args.rows:
            eng = run_engine(path, n, args.steps, args.quantize, seed=n)
            gen = run_generate(path, n, 32, args.quantize)
            row = {"rows": n, **eng, "generate_ms_per_step": gen, "ratio": gen / eng["ms_per_step"]}
            out.append(row)
            print(
                f"rows={n:3d} step {eng['ms_per_step']:.3f} ms  generate() {gen:.3f} ms  "
                + " ".join(f"{p}={eng['ms_' + p]:.3f}" for p in PHASES),
                flush=True,
            )
    cols = [
        bench_results.column("rows", "rows"),
        bench_results.column("ms_per_step", "engine ms/step", "{:.2f}"),
        *[bench_results.column(f"ms_{p}", p, "{:.3f}") for p in PHASES],
        bench_results.column("generate_ms_per_step", "generate() ms/step", "{:.2f}"),
        bench_results.column("ratio", "generate() / engine", "{:.2f}"),
    ]
    notes = [
        f"Engine alone, in process: {_model_desc(args.model)}, rows kept full with "
        "mixed lengths (prompts 4..40 tokens, 8..64 new tokens), so rows leave and join every few "
        "steps. Phases are exclusive times per decode step (join/prefill spread over all steps).",
        "generate(): transformers on a batch of N equal 20-token prompts, (t(32) - t(1)) / 31 per token.",
    ]
    if args.label:
        notes.append(args.label)
    path_out = bench_results.write(
        args.name,
        command=bench_results.command_line("bench.step", argv),
        columns=cols,
        rows=out,
        notes=notes,
        extra={"quantize": args.quantize},
        started=started,
    )
    print(f"wrote {path_out}")
    return 0


def _model_desc(model: str | None) -> str:
    """What the notes say was measured: the built tiny GPT-2, or the checkpoint given."""
    if not model:
        return "a tiny random GPT-2 (4 layers, 128 wide)"
    import json

    try:
        cfg = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return f"the checkpoint {Path(model).name}"
    layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    width = cfg.get("hidden_size", cfg.get("n_embd"))
    return f"{cfg.get('model_type', 'a model')} from {Path(model).name} ({layers} layers, {width} wide)"


def _main_compile(args: argparse.Namespace, argv: list[str] | None, started: float) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model) if args.model else build_gpt2(Path(tmp) / "gpt2")
        out, compile_s = compare_compile(path, args.rows, args.rounds, args.steps, args.quantize)
    cols = [
        bench_results.column("rows", "rows"),
        bench_results.column("eager_ms", "eager ms/step", "{:.2f}"),
        bench_results.column("eager_min", "eager min", "{:.2f}"),
        bench_results.column("eager_max", "eager max", "{:.2f}"),
        bench_results.column("compiled_ms", "compiled ms/step", "{:.2f}"),
        bench_results.column("compiled_min", "compiled min", "{:.2f}"),
        bench_results.column("compiled_max", "compiled max", "{:.2f}"),
        bench_results.column("ratio", "eager / compiled", "{:.2f}"),
        bench_results.column("ratio_min", "ratio min", "{:.2f}"),
        bench_results.column("ratio_max", "ratio max", "{:.2f}"),
        bench_results.column("eager_forward", "eager forward ms", "{:.2f}"),
        bench_results.column("compiled_forward", "compiled forward ms", "{:.2f}"),
        bench_results.column("load_min", "load min", "{:.1f}"),
        bench_results.column("load_max", "load max", "{:.1f}"),
    ]
    notes = [
        f"Engine alone, in process, {_model_desc(args.model)}, rows kept full with "
        "mixed lengths (prompts 4..40, 8..64 new tokens): compile_decode off and on, "
        f"{args.rounds} rounds of {args.steps} decode steps per row count, the two engines taking "
        "turns step by step (who goes first alternates). ms/step: median of the rounds, min and max beside it; the ratio is "
        "per round (eager / compiled: above 1, compiling pays). forward: the decode forward "
        "alone (compiled: the graph call). load: 1-minute load average after each round.",
        f"Compiling (at warm-up, before READY; two graphs: one row and any other count) took "
        f"{compile_s:.0f} s on this machine.",
    ]
    if args.label:
        notes.append(args.label)
    name = args.name if args.name != "step-cpu" else "step-compile-cpu"
    path_out = bench_results.write(
        name,
        command=bench_results.command_line("bench.step", argv),
        columns=cols,
        rows=out,
        notes=notes,
        extra={"quantize": args.quantize, "compile_s": round(compile_s, 1)},
        started=started,
    )
    print(f"wrote {path_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
