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
import random
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

    timer.wrap(lm.model, "forward", fwd_phase)
    timer.wrap(lm, "decode", "mask")
    timer.wrap(lm, "prefill", "prefill")
    # The persistent batch: a join (or a long prompt's chunk) prefills into free slots.
    timer.wrap(lm, "join", "join")
    timer.wrap(lm, "chunk", "join")
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


def run_engine(path: Path, rows: int, steps: int, quantize: str, seed: int) -> dict[str, Any]:
    from bitserve.engine import workers
    from bitserve.engine.core import Core
    from bitserve.ipc import protocol as P
    from bitserve.settings import ModelSettings
    from bitserve.types import GenerationRequest, SamplingParams

    settings = ModelSettings(
        name="lm",
        task="generate",
        path=str(path),
        max_concurrent_sequences=rows,
        max_waiting_ms=0,
        quantize=quantize,
    )
    loaded = workers.load(settings)
    w = workers.workers_for(loaded, [settings])
    sent: list[int] = []
    core = Core(w, lambda b: sent.append(len(b)))
    # Messages are packed where the engine process packs them; `_pack` is the hook (old engines
    # pack inside `send`: wrap P.pack then).
    if not hasattr(core, "_pack"):
        pack = P.pack
        core._pack = pack  # type: ignore[attr-defined]
        core.send = lambda m: sent.append(len(core._pack(m)))  # type: ignore[attr-defined]
    timer = Timer()
    instrument(core, timer)
    sched = w.scheduler
    assert sched is not None
    rng = random.Random(seed)
    vocab = 300
    rid = 0

    def submit() -> None:
        nonlocal rid
        rid += 1
        n_prompt = rng.randint(4, 40)
        req = GenerationRequest(
            rid=rid,
            model="lm",
            prompt_ids=[rng.randrange(10, vocab) for _ in range(n_prompt)],
            params=SamplingParams(max_new_tokens=rng.randint(8, 64)),
            max_new_tokens=rng.randint(8, 64),
            stop_ids=(),
            deadline=None,
            client="",
        )
        core.handle([P.GENERATE, rid, P.request_to_wire(req)])

    sched.lm.eos = frozenset()  # random weights: lengths come from max_new_tokens alone
    decode_steps = 0
    t_total = 0.0
    warm = 20
    i = 0
    with torch.inference_mode():
        while decode_steps < steps + warm:
            while len(sched.waiting) + len(sched.running) < rows:
                submit()
            before = sched.stats.steps
            if decode_steps == warm and i >= 0:
                timer.total.clear()
                t_total = 0.0
                i = -1
            t0 = time.perf_counter()
            core.step()
            t_total += time.perf_counter() - t0
            decode_steps += sched.stats.steps - before
    measured = steps
    per = {p: 1000 * timer.total.get(p, 0.0) / measured for p in PHASES if p != "other"}
    per["other"] = max(0.0, 1000 * t_total / measured - sum(per.values()))
    return {"ms_per_step": 1000 * t_total / measured, **{f"ms_{p}": v for p, v in per.items()}}


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
    args = ap.parse_args(argv)
    started = time.time()
    torch.manual_seed(0)
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
        "Engine alone, in process: a tiny random GPT-2 (4 layers, 128 wide), rows kept full with "
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


if __name__ == "__main__":
    sys.exit(main())
