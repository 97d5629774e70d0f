"""Served classification vs an in-process padded batch: the same texts, measured in one run.

    python -m bench.classify                          # tiny BERT head, 3 rounds, ~1-2 minutes
    python -m bench.classify --texts 64 --repeat 1    # a smoke run

Systems, per round (interleaved, so the machine's load falls on both alike):
  (b) static B   in-process: the checkpoint loaded as the server loads it, the texts tokenized and
                 run as padded batches of B (the server's max_batch_size), softmax on the logits
  (c) served N   the real gRPC server (front in this process, the head in its engine process,
                 the front's dynamic batcher forming the batches) and N concurrent closed-loop
                 clients (the real AsyncClient in a child process), one text per request
Target (issue 16): served >= 0.95x the in-process padded batch in texts per second.
"""

from __future__ import annotations

import argparse
import asyncio
import os
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
from bench.generation import InProcessServer, _span, make_prompts  # noqa: E402

MODEL_NAME = "bench-topics"
TARGET = 0.95


def run_classify_clients(
    target: str, model: str, texts: list[str], clients: int
) -> tuple[list[float], float]:
    """`clients` closed-loop workers classify `texts`, one per request; latencies and wall time."""
    return asyncio.run(_run(target, model, texts, clients))


async def _run(target: str, model: str, texts: list[str], clients: int) -> tuple[list[float], float]:
    from bitserve_client import AsyncClient

    queue = list(reversed(texts))
    lat: list[float] = []
    async with AsyncClient(target, timeout=600) as client:
        await client.classify("warm up", model=model)
        t0 = time.perf_counter()

        async def worker() -> None:
            while queue:
                text = queue.pop()
                start = time.perf_counter()
                await client.classify(text, model=model)
                lat.append(time.perf_counter() - start)

        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return lat, wall


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of process `pid` so far (/proc/PID/stat), all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def in_process(path: Path, texts: list[str], batch: int) -> float:
    """Texts per second for padded batches of `batch`, tokenization included (the server pays it too)."""
    from bitserve.engine.heads import model_half
    from bitserve.models.loading import load_checkpoint
    from bitserve.types import Task

    lm = load_checkpoint(str(path), model_half(Task.CLASSIFY, "head").model_class())
    tok = lm.tokenizer

    def run(chunk: list[str]) -> list[list[float]]:
        enc = tok(chunk, return_tensors="pt", padding=True).to(lm.device)
        with torch.inference_mode():
            return torch.softmax(lm.model(**enc).logits.float(), dim=-1).tolist()

    run(texts[:batch])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(texts), batch):
        run(texts[i : i + batch])
    return len(texts) / (time.perf_counter() - t0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.classify", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a sequence-classification checkpoint (default: build the tiny BERT)")
    p.add_argument("--texts", type=int, default=2048, help="texts per measurement")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32, help="static B and the server's max_batch_size")
    p.add_argument("--batch-delay-ms", type=float, default=5.0, help="the server's max_batch_delay_ms")
    p.add_argument("--repeat", type=int, default=3, help="interleaved rounds")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads, in process and served alike")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--note", action="append", default=[], help="a line for the result file's notes (repeatable)"
    )
    p.add_argument("--save", metavar="NAME", default=None, help="write bench/results/NAME.json")
    return p.parse_args(argv)


COLUMNS = [
    ("system", "system", "{}"),
    ("texts", "texts", "{}"),
    ("texts_s", "texts/s", "{}"),
    ("p50_latency_ms", "p50 lat ms", "{}"),
    ("p99_latency_ms", "p99 lat ms", "{}"),
    ("x_static", "x static B", "{}"),
]


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    command = bench_results.command_line("bench.classify", argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from bitserve.models.tiny import build_classifier

    tmp = tempfile.TemporaryDirectory(prefix="bitserve-bench-")
    path = (
        Path(args.model)
        if args.model
        else build_classifier(Path(tmp.name) / "topics", ["business", "sports", "politics", "tech"])
    )
    texts = make_prompts(args.texts, args.seed)
    print(
        f"# classify: served vs in-process\nmodel: {args.model or 'tiny BERT head (4 labels)'}; "
        f"{len(texts)} texts; clients {args.clients}; B={args.batch_size}; {args.repeat} rounds",
        flush=True,
    )
    static_tps: list[float] = []
    served_tps: list[float] = []
    p50: list[float] = []
    p99: list[float] = []
    pool = ProcessPoolExecutor(1, mp_context=get_context("spawn"))
    pool.submit(time.sleep, 0).result()
    client_pid = pool.submit(os.getpid).result()
    cpu_ms: dict[str, list[float]] = {"static": [], "client": [], "front": [], "engine": []}
    mean_batch: list[float] = []
    try:
        for rnd in range(args.repeat):
            c0 = cpu_seconds(os.getpid())
            static_tps.append(in_process(path, texts, args.batch_size))
            cpu_ms["static"].append((cpu_seconds(os.getpid()) - c0) * 1000 / len(texts))
            srv = InProcessServer(
                {
                    "name": MODEL_NAME,
                    "task": "classify",
                    "path": str(path),
                    "max_batch_size": args.batch_size,
                    "max_batch_delay_ms": args.batch_delay_ms,
                    "max_queue_size": max(1024, 2 * args.clients),
                }
            )
            pids = {"client": client_pid, "front": os.getpid(), "engine": srv.engine().core.pid}
            try:
                c0s = {k: cpu_seconds(p) for k, p in pids.items()}
                lat, wall = pool.submit(
                    run_classify_clients, srv.target, MODEL_NAME, texts, args.clients
                ).result()
                for k, p in pids.items():
                    cpu_ms[k].append((cpu_seconds(p) - c0s[k]) * 1000 / len(texts))
                sizes = srv.engine()._batcher.stats.sizes  # the batches the front's batcher formed
                mean_batch.append(sum(sizes) / max(1, len(sizes)))
            finally:
                srv.stop()
            served_tps.append(len(lat) / wall)
            lat.sort()
            p50.append(lat[len(lat) // 2])
            p99.append(lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))])
            print(
                f"round {rnd + 1}/{args.repeat}: static B={args.batch_size} {static_tps[-1]:.0f} texts/s; "
                f"served N={args.clients} {served_tps[-1]:.0f} texts/s = {served_tps[-1] / static_tps[-1]:.2f}x; "
                "CPU ms per text: "
                + ", ".join(f"{k} {v[-1]:.3f}" for k, v in cpu_ms.items())
                + f"; mean served batch {mean_batch[-1]:.1f}",
                flush=True,
            )
    finally:
        pool.shutdown()
        tmp.cleanup()

    ratios = [s / b for s, b in zip(served_tps, static_tps, strict=True)]
    met = sum(r >= TARGET for r in ratios)
    check = (
        f"served N={args.clients} / static B={args.batch_size}: {_span(list(ratios), '{:.2f}')} "
        f"(target >= {TARGET}x) "
        + ("PASS" if met == len(ratios) else f"SHORT ({met} of {len(ratios)} rounds)")
    )
    rows: list[dict[str, Any]] = [
        {
            "system": f"(b) in-process padded B={args.batch_size}",
            "texts": len(texts),
            "texts_s": _span(list(static_tps), "{:,.0f}"),
            "p50_latency_ms": None,
            "p99_latency_ms": None,
            "x_static": "1.00",
        },
        {
            "system": f"(c) served N={args.clients}, 1 text per request",
            "texts": len(texts),
            "texts_s": _span(list(served_tps), "{:,.0f}"),
            "p50_latency_ms": _span([x * 1000 for x in p50], "{:,.1f}"),
            "p99_latency_ms": _span([x * 1000 for x in p99], "{:,.1f}"),
            "x_static": _span(list(ratios), "{:.2f}"),
        },
    ]
    notes = [
        *args.note,
        f"{args.repeat} interleaved rounds, each cell the range over rounds; ratios per round; "
        f"{args.threads} torch thread(s); server max_batch_size {args.batch_size}, "
        f"max_batch_delay_ms {args.batch_delay_ms:g}",
        check,
        "CPU ms per text (user+system, /proc): in-process "
        + _span(cpu_ms["static"], "{:.3f}")
        + "; served: client "
        + _span(cpu_ms["client"], "{:.3f}")
        + " (the AsyncClient's child process; its warm-up call included), front "
        + _span(cpu_ms["front"], "{:.3f}")
        + ", engine "
        + _span(cpu_ms["engine"], "{:.3f}")
        + f" ({os.cpu_count()} cores); mean served batch "
        + _span(mean_batch, "{:.1f}"),
    ]
    print()
    for row in rows:
        print("| " + " | ".join("-" if row[k] is None else str(row[k]) for k, _, _ in COLUMNS) + " |")
    print("- " + check)
    if args.save:
        out = bench_results.write(
            args.save,
            command=command,
            columns=[bench_results.column(*c) for c in COLUMNS],
            rows=rows,
            notes=notes,
            extra={
                "args": vars(args),
                "rounds": {
                    "static_texts_s": static_tps,
                    "served_texts_s": served_tps,
                    "p50_s": p50,
                    "p99_s": p99,
                    "cpu_ms_per_text": cpu_ms,
                    "mean_served_batch": mean_batch,
                },
            },
            started=started,
        )
        print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
