"""Which continuous-batching engine to keep: transformers' own manager (paged attention,
`init_continuous_batching`) or bitserve's TGI-style scheduler (`engines/scheduler.py`).

    python -m bench.transformers_cb [--requests 128] [--model PATH]

Both get the same prompts and per-request max_new_tokens, all submitted at once, in this
process, no gRPC; the static padded `generate()` batch is printed alongside. Correctness: each
engine's greedy tokens are compared with a solo `model.generate(do_sample=False)`.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import torch

from bench import results
from bench.generation import InProcess, make_workloads


def solo(loaded, prompt: str, n: int) -> list[int]:
    enc = loaded.tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = loaded.model.generate(**enc, max_new_tokens=n, do_sample=False)
    return out[0, enc["input_ids"].shape[1] :].tolist()


def run_hf(loaded, jobs: list[tuple[str, int]]) -> tuple[float, int, dict[int, list[int]]]:
    from transformers import GenerationConfig

    tok = loaded.tokenizer
    gc = GenerationConfig(
        do_sample=False,
        max_new_tokens=max(n for _, n in jobs),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    manager = loaded.model.init_continuous_batching(generation_config=gc)
    manager.start()
    try:
        ids = [tok(p)["input_ids"] for p, _ in jobs]
        t = time.perf_counter()
        rid = {
            manager.add_request(x, request_id=str(i), max_new_tokens=n): i
            for i, (x, (_, n)) in enumerate(zip(ids, jobs, strict=True))
        }
        out: dict[int, list[int]] = {}
        while len(out) < len(jobs):
            r = manager.get_result(timeout=30)
            if r is None:
                raise RuntimeError("transformers continuous batching stalled")
            if r.is_finished():
                out[rid[r.request_id]] = list(r.generated_tokens)
        wall = time.perf_counter() - t
    finally:
        manager.stop(block=True)
    return wall, sum(len(v) for v in out.values()), out


def run_bitserve(path: str, loaded, jobs) -> tuple[float, int, dict[int, list[int]]]:
    from bitserve.frontend.generate import CausalLMGenerateEngine
    from bitserve.metrics import Metrics
    from bitserve.settings import ModelSettings
    from bitserve.types import SamplingParams

    settings = ModelSettings(name="lm", task="generate", path=path, max_new_tokens_limit=4096)

    async def go():
        e = CausalLMGenerateEngine(settings, loaded, Metrics())
        await e.start()
        await e.generate(["warm up"], SamplingParams(max_new_tokens=4), deadline=None)
        t = time.perf_counter()
        gens = await asyncio.gather(
            *(
                e.generate([p], SamplingParams(max_new_tokens=n, logprobs=True), deadline=None)
                for p, n in jobs
            )
        )
        wall = time.perf_counter() - t
        await e.stop()
        return wall, {i: [lp.id for lp in g[0].logprobs] for i, g in enumerate(gens)}

    wall, out = asyncio.run(go())
    return wall, sum(len(v) for v in out.values()), out


def main(argv: list[str] | None = None) -> None:
    started = time.time()
    ap = argparse.ArgumentParser(prog="python -m bench.transformers_cb")
    ap.add_argument("--model")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--check", type=int, default=8, help="requests checked against solo generate()")
    ap.add_argument("--save", metavar="NAME", help="write bench/results/NAME.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from bitserve.models.loading import load_checkpoint
    from bitserve.models.tiny import build_causal_lm

    columns = [
        results.column("workload", "workload"),
        results.column("engine", "engine"),
        results.column("tokens", "tokens"),
        results.column("seconds", "seconds", "{:.2f}"),
        results.column("tok_s", "tok/s", "{:.0f}"),
        results.column("greedy_equal", "greedy == solo generate()"),
    ]
    rows: list[dict] = []

    def add(**row) -> None:
        rows.append(row)
        cells = ["-" if row[c["key"]] is None else c["format"].format(row[c["key"]]) for c in columns]
        print("| " + " | ".join(cells) + " |", flush=True)

    tmp = tempfile.TemporaryDirectory()
    path = args.model or str(build_causal_lm(Path(tmp.name) / "lm", max_positions=512))
    from transformers import AutoModelForCausalLM

    loaded = load_checkpoint(path, AutoModelForCausalLM, device="cpu")
    print("| " + " | ".join(c["title"] for c in columns) + " |")
    print("|" + "---|" * len(columns))
    for wl, jobs in make_workloads(args.requests, 0).items():
        ref = {i: solo(loaded, *jobs[i]) for i in range(args.check)}
        static = InProcess(loaded).static("fp32", wl, jobs, 64, None)
        add(
            workload=wl,
            engine="static generate() B=64",
            tokens=static.tokens,
            seconds=round(static.wall, 3),
            tok_s=round(static.tps, 1),
            greedy_equal=None,
        )
        for name, fn in (
            ("bitserve scheduler", lambda j=jobs: run_bitserve(path, loaded, j)),
            ("transformers CB (paged)", lambda j=jobs: run_hf(loaded, j)),
        ):
            try:
                wall, tokens, out = fn()
            except Exception as e:  # report, don't hide: this is an evaluation
                add(
                    workload=wl,
                    engine=name,
                    tokens=None,
                    seconds=None,
                    tok_s=None,
                    greedy_equal=f"failed: {e}",
                )
                continue
            same = sum(out[i] == ref[i] for i in ref)
            add(
                workload=wl,
                engine=name,
                tokens=tokens,
                seconds=round(wall, 3),
                tok_s=round(tokens / wall, 1),
                greedy_equal=f"{same}/{len(ref)}",
            )
    tmp.cleanup()
    if args.save:
        path_out = results.write(
            args.save,
            command=results.command_line("bench.transformers_cb", argv),
            columns=columns,
            rows=rows,
            notes=[
                f"in process, tiny Llama, CPU, {args.threads} torch thread(s), {args.requests} requests at once"
            ],
            started=started,
        )
        print(f"saved {path_out}")


if __name__ == "__main__":
    main()
