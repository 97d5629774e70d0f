"""A 2,048-token prompt joining 63 running rows: do the running rows stall while it prefills?

    python -m bench.long_join                       # 4-layer GPT-2, 3 rounds, ~1-2 minutes
    python -m bench.long_join --repeat 1 --rows 7   # a smoke run

Measured from the client side through GenerateStream (the real gRPC server, the clients in a
child process): `--rows` streams decode long answers; once every one of them has had
`--warm-tokens` tokens, one request with a `--prompt-tokens` prompt joins. The join window runs
from sending it to its last token. Every gap between two consecutive stream messages of a
running row that ends inside the window is an inter-token gap of the join; its median and p99
are compared (target, issue 16: p99 <= 3x the median), and beside them the same rows' gaps in
an equally long window just before the join (the steady state).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import results as bench_results  # noqa: E402
from bench.generation import InProcessServer, _span, build_gpt2_tiny, make_prompts, model_settings  # noqa: E402

MODEL_NAME = "bench-lm"
TARGET = 3.0


def long_prompt(path: Path, n_tokens: int) -> str:
    """A text that the checkpoint's tokenizer encodes to about `n_tokens` tokens (the server
    reports the exact count back)."""
    from transformers import AutoTokenizer

    from bitserve.models.tiny import CORPUS

    tok = AutoTokenizer.from_pretrained(str(path))
    tok.model_max_length = 1 << 30  # the text is longer than the context until it is cut below
    text = " ".join(CORPUS[:11] * (1 + n_tokens // 100))
    ids = tok(text, add_special_tokens=False)["input_ids"][:n_tokens]
    return str(tok.decode(ids))


def run_join(
    target: str, model: str, prompts: list[str], row_tokens: int, warm: int, long_text: str, long_new: int
) -> dict[str, Any]:
    return asyncio.run(_run_join(target, model, prompts, row_tokens, warm, long_text, long_new))


async def _run_join(target, model, prompts, row_tokens, warm, long_text, long_new):
    from bitserve_client import AsyncClient

    times: list[list[float]] = [[] for _ in prompts]
    all_warm = asyncio.Event()
    out: dict[str, Any] = {}
    async with AsyncClient(target, timeout=600) as client:
        await client.generate("warm up", model=model, max_new_tokens=2)

        ended: set[int] = set()

        def check_warm() -> None:
            # Every row has had `warm` tokens or has already ended (a random model can hit its
            # end token early: waiting for such a row would wait forever).
            if not all_warm.is_set() and all(i in ended or len(t) >= warm for i, t in enumerate(times)):
                all_warm.set()

        async def row(i: int, prompt: str) -> None:
            try:
                async for ev in client.generate_stream(prompt, model=model, max_new_tokens=row_tokens):
                    if ev.final is not None and not ev.text:
                        continue  # a closing message with no token in it is not a step
                    times[i].append(time.perf_counter())
                    check_warm()
            finally:
                ended.add(i)
                check_warm()

        rows = [asyncio.create_task(row(i, p)) for i, p in enumerate(prompts)]
        try:
            await asyncio.wait_for(all_warm.wait(), timeout=300)
            t_send = time.perf_counter()
            first = None
            async for ev in client.generate_stream(long_text, model=model, max_new_tokens=long_new):
                if first is None:
                    first = time.perf_counter()
                if ev.final is not None:
                    out["long_prompt_tokens"] = ev.final.prompt_tokens
                    out["long_tokens"] = ev.final.tokens
            t_end = time.perf_counter()
            finished_early = sum(t.done() for t in rows)
        finally:
            for t in rows:
                t.cancel()
            await asyncio.gather(*rows, return_exceptions=True)
    out.update(
        t_send=t_send,
        t_first=first,
        t_end=t_end,
        times=times,
        rows_finished_before_end=finished_early,
    )
    return out


def gaps(times: list[list[float]], lo: float, hi: float) -> list[float]:
    """Every row's gaps between consecutive messages that end in (lo, hi]."""
    out: list[float] = []
    for ts in times:
        out.extend(b - a for a, b in zip(ts, ts[1:], strict=False) if lo < b <= hi)
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.long_join", description=__doc__.split("\n")[0])
    p.add_argument(
        "--model",
        help="causal LM checkpoint (default: build the 4-layer GPT-2, --prompt-tokens + 256 positions)",
    )
    p.add_argument("--rows", type=int, default=63, help="running streams")
    p.add_argument("--row-tokens", type=int, default=1024, help="max_new_tokens of each running row")
    p.add_argument("--warm-tokens", type=int, default=16, help="messages every row has before the join")
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--long-new-tokens", type=int, default=16, help="max_new_tokens of the joining request")
    p.add_argument("--repeat", type=int, default=3, help="rounds (one server; a fresh set of rows each)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a model setting for the server (e.g. prefill_token_budget=512), repeatable; integers as such",
    )
    p.add_argument(
        "--note", action="append", default=[], help="a line for the result file's notes (repeatable)"
    )
    p.add_argument("--save", metavar="NAME", default=None, help="write bench/results/NAME.json")
    return p.parse_args(argv)


COLUMNS = [
    ("window", "window", "{}"),
    ("gaps", "gaps", "{}"),
    ("median_ms", "median gap ms", "{}"),
    ("p99_ms", "p99 gap ms", "{}"),
    ("max_ms", "max gap ms", "{}"),
    ("p99_x_median", "p99 / median", "{}"),
    ("p99_x_before", "p99 / median before", "{}"),
]


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    command = bench_results.command_line("bench.long_join", argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="bitserve-bench-")
    path = (
        Path(args.model)
        if args.model
        else build_gpt2_tiny(Path(tmp.name) / "gpt2-tiny", n_positions=args.prompt_tokens + 256)
    )
    text = long_prompt(path, args.prompt_tokens)
    prompts = make_prompts(args.rows, 0)
    cfg = {
        "name": MODEL_NAME,
        "task": "generate",
        "path": str(path),
        "max_concurrent_sequences": args.rows + 1,
        "max_new_tokens_limit": 4096,
        **model_settings(args.set),
    }
    print(
        f"# long join: a {args.prompt_tokens}-token prompt joins {args.rows} running streams\n"
        f"model: {args.model or 'random gpt2-tiny'}; settings {cfg}; {args.repeat} rounds",
        flush=True,
    )
    srv = InProcessServer(cfg)
    pool = ProcessPoolExecutor(1, mp_context=get_context("spawn"))
    runs: list[dict[str, Any]] = []
    try:
        pool.submit(time.sleep, 0).result()
        for rnd in range(args.repeat):
            r = pool.submit(
                run_join,
                srv.target,
                MODEL_NAME,
                prompts,
                args.row_tokens,
                args.warm_tokens,
                text,
                args.long_new_tokens,
            ).result()
            width = r["t_end"] - r["t_send"]
            join = gaps(r["times"], r["t_send"], r["t_end"])
            before = gaps(r["times"], r["t_send"] - width, r["t_send"])
            runs.append(
                {
                    "join": [round(g, 6) for g in join],
                    "before": [round(g, 6) for g in before],
                    "window_s": width,
                    "ttft_s": r["t_first"] - r["t_send"],
                    "long_prompt_tokens": r.get("long_prompt_tokens"),
                    "rows_finished_before_end": r["rows_finished_before_end"],
                }
            )
            print(
                f"round {rnd + 1}/{args.repeat}: prompt {r.get('long_prompt_tokens')} tokens, its TTFT "
                f"{runs[-1]['ttft_s'] * 1000:.0f} ms, window {width * 1000:.0f} ms; join gaps median "
                f"{statistics.median(join) * 1000:.1f} ms, p99 {pct(join, 0.99) * 1000:.1f} ms, max "
                f"{max(join) * 1000:.1f} ms = {pct(join, 0.99) / statistics.median(join):.2f}x; before: median "
                f"{statistics.median(before) * 1000:.1f} ms"
                + (
                    f"; {r['rows_finished_before_end']} rows ended inside the window (raise --row-tokens)"
                    if r["rows_finished_before_end"]
                    else ""
                ),
                flush=True,
            )
    finally:
        pool.shutdown()
        srv.stop()
        tmp.cleanup()

    def row(name: str, key: str) -> dict[str, Any]:
        meds = [statistics.median(r[key]) for r in runs]
        p99s = [pct(r[key], 0.99) for r in runs]
        return {
            "window": name,
            "gaps": _span([float(len(r[key])) for r in runs], "{:.0f}"),
            "median_ms": _span([m * 1000 for m in meds], "{:,.1f}"),
            "p99_ms": _span([p * 1000 for p in p99s], "{:,.1f}"),
            "max_ms": _span([max(r[key]) * 1000 for r in runs], "{:,.1f}"),
            "p99_x_median": _span([p / m for p, m in zip(p99s, meds, strict=True)], "{:.2f}"),
            "p99_x_before": _span(
                [p / statistics.median(r["before"]) for p, r in zip(p99s, runs, strict=True)], "{:.2f}"
            ),
        }

    rows = [
        row(f"join: {args.prompt_tokens}-token prompt sent -> its last token", "join"),
        row("before: as long, just before", "before"),
    ]
    ratios = [pct(r["join"], 0.99) / statistics.median(r["join"]) for r in runs]
    met = sum(x <= TARGET for x in ratios)
    check = (
        f"{args.rows} running rows' inter-token p99 / median during the join: {_span(list(ratios), '{:.2f}')} "
        f"(target <= {TARGET:g}x) "
        + ("PASS" if met == len(ratios) else f"SHORT ({met} of {len(ratios)} rounds)")
    )
    # The window's own median rises when every step in it is slower (each carries a prompt
    # chunk); against the steady median before the join, a uniform slow-down shows as well.
    steady = [pct(r["join"], 0.99) / statistics.median(r["before"]) for r in runs]
    met = sum(x <= TARGET for x in steady)
    check_steady = (
        f"the same p99 / the rows' median just before the join: {_span(list(steady), '{:.2f}')} "
        f"(the stricter reading of the target, <= {TARGET:g}x) "
        + ("PASS" if met == len(steady) else f"SHORT ({met} of {len(steady)} rounds)")
    )
    notes = [
        *args.note,
        f"client side, GenerateStream; {args.rows} rows of up to {args.row_tokens} new tokens, the joining "
        f"request {args.long_new_tokens} new tokens; server model settings {cfg | {'path': '(tmp)'}}",
        "the joining request's TTFT, ms: " + str(_span([r["ttft_s"] * 1000 for r in runs], "{:,.0f}")),
        check,
        check_steady,
    ]
    print()
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k, _, _ in COLUMNS) + " |")
    for n in notes:
        print("- " + n)
    if args.save:
        out = bench_results.write(
            args.save,
            command=command,
            columns=[bench_results.column(*c) for c in COLUMNS],
            rows=rows,
            notes=notes,
            extra={"args": vars(args), "rounds": runs},
            started=started,
        )
        print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
