"""A burst against a full queue: rejections must come at once, from another process.

    python -m bench.burst [--requests 1000] [--client-procs 4] [--save burst]

Starts `bitserve serve` in its own process with a tiny sentiment classifier (a 16-text queue,
batches of 4, built offline), then sends `--requests` Sentiment calls of two texts at once from
`--client-procs` client processes (none of them the server's), each firing its share together
on one asyncio loop. Most find the queue full: RESOURCE_EXHAUSTED, which must be answered
without waiting for the queue (target: rejection p99 < 100 ms, client side). Prints and saves
bench/results/NAME.json: counts per status, rejection and success latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _client(target: str, n: int, start_at: float, out: mp.Queue) -> None:
    """One client process: `n` calls issued together at `start_at` (wall clock)."""
    import grpc

    from bitserve_proto.v1 import inference_pb2 as pb
    from bitserve_proto.v1 import inference_pb2_grpc as pb_grpc

    async def run() -> list[tuple[str, float]]:
        async with grpc.aio.insecure_channel(target) as ch:
            stub = pb_grpc.InferenceStub(ch)
            await ch.channel_ready()
            req = pb.SentimentRequest(model="burst", texts=["good", "bad"])

            async def one() -> tuple[str, float]:
                t0 = time.perf_counter()
                try:
                    await stub.Sentiment(req, timeout=120)
                    return "OK", time.perf_counter() - t0
                except grpc.aio.AioRpcError as e:
                    return e.code().name, time.perf_counter() - t0

            await asyncio.sleep(max(0.0, start_at - time.time()))
            return list(await asyncio.gather(*(one() for _ in range(n))))

    out.put(asyncio.run(run()))


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.burst")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--client-procs", type=int, default=4)
    ap.add_argument("--save", default="burst", help="bench/results/NAME.json ('' to skip)")
    args = ap.parse_args(argv)
    import grpc
    import yaml
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from bitserve.models.tiny import build_classifier

    t_start = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="bench-burst-"))
    model = build_classifier(tmp / "sentiment", ["NEGATIVE", "POSITIVE"], seed=2)
    port = _free_port()
    cfg = {
        "server": {"host": "127.0.0.1", "port": port, "metrics_port": -1, "log_level": "WARNING"},
        "models": [
            {
                "name": "burst",
                "task": "sentiment",
                "path": str(model),
                "max_queue_size": 16,
                "max_batch_size": 4,
                "max_batch_delay_ms": 2,
            }
        ],
    }
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "bitserve.cli", "serve", "--config", str(tmp / "config.yaml")]
    )
    target = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"bitserve serve exited with {proc.returncode}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.3)
        ctx = mp.get_context("spawn")
        q: mp.Queue = ctx.Queue()
        k = args.client_procs
        shares = [args.requests // k + (i < args.requests % k) for i in range(k)]
        start_at = time.time() + 3.0 + 0.5 * k  # every client connected and waiting
        clients = [ctx.Process(target=_client, args=(target, n, start_at, q)) for n in shares]
        for c in clients:
            c.start()
        answers = [a for _ in clients for a in q.get(timeout=600)]
        for c in clients:
            c.join(60)
    finally:
        proc.terminate()
        proc.wait(60)
    codes: dict[str, int] = {}
    for code, _ in answers:
        codes[code] = codes.get(code, 0) + 1
    rejected = [t for code, t in answers if code == "RESOURCE_EXHAUSTED"]
    ok = [t for code, t in answers if code == "OK"]
    row = {
        "requests": len(answers),
        "ok": codes.get("OK", 0),
        "rejected": len(rejected),
        "other": len(answers) - len(ok) - len(rejected),
        "reject_p50_ms": _pct(rejected, 0.5) * 1000,
        "reject_p99_ms": _pct(rejected, 0.99) * 1000,
        "ok_p50_ms": _pct(ok, 0.5) * 1000,
        "ok_p99_ms": _pct(ok, 0.99) * 1000,
    }
    print(
        f"burst of {row['requests']} from {args.client_procs} client processes: {codes}; rejection p50 "
        f"{row['reject_p50_ms']:.1f} ms, p99 {row['reject_p99_ms']:.1f} ms (target < 100 ms); "
        f"success p50 {row['ok_p50_ms']:.1f} ms, p99 {row['ok_p99_ms']:.1f} ms"
    )
    if args.save:
        from bench.results import column, command_line, write

        load = os.getloadavg()
        path = write(
            args.save,
            command=command_line("bench.burst"),
            columns=[
                column("requests", "requests"),
                column("ok", "OK"),
                column("rejected", "RESOURCE_EXHAUSTED"),
                column("other", "other"),
                column("reject_p50_ms", "rejection p50, ms", "{:.1f}"),
                column("reject_p99_ms", "rejection p99, ms", "{:.1f}"),
                column("ok_p50_ms", "success p50, ms", "{:.1f}"),
                column("ok_p99_ms", "success p99, ms", "{:.1f}"),
            ],
            rows=[row],
            notes=[
                "server: `bitserve serve`, its own process; one tiny sentiment classifier, max_queue_size 16, "
                "max_batch_size 4, max_batch_delay_ms 2; two texts per request",
                f"clients: {args.client_procs} processes (spawned, none the server's), each firing its share "
                "of the requests together on one asyncio loop; latency measured client side",
                f"load average at the end (1, 5, 15 min): {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f}",
            ],
            started=t_start,
        )
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
