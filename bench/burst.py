"""A burst against a full queue: rejections must come at once, from another process.

    python -m bench.burst [--requests 1000] [--client-procs 4] [--rounds 3] [--save burst]

Starts `bitserve serve` in its own process with a tiny sentiment classifier (a 16-text queue,
batches of 4, built offline), then sends `--requests` Sentiment calls of two texts at once from
`--client-procs` client processes (none of them the server's), each firing its share together
on one asyncio loop. Most find the queue full: RESOURCE_EXHAUSTED, which must be answered
without waiting for the queue (target: rejection p99 < 100 ms, client side).

Side by side, in interleaved rounds (the order alternates), the same clients burst a *floor*
server: a bare grpc.aio server in its own process that refuses every call at once, doing no
work at all. Its latency is what gRPC in Python and these client processes cost on this
machine; bitserve's rejections are reported next to it (ratio), with the server processes' CPU
time per request. The first burst after start is cold (it costs several times a later one):
`--warmup` bursts per server come first and are not kept. Prints and saves
bench/results/NAME.json: per round and server, counts per status, rejection and success
latency percentiles, server CPU ms per request (all of it, and the front's), and the load.
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
from typing import Any


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


def _floor(port: int, ready: mp.synchronize.Event) -> None:
    """The floor server: grpc.aio refusing every Sentiment at once, with no work of its own."""
    import grpc

    from bitserve_proto.v1 import inference_pb2 as pb

    async def refuse(request: pb.SentimentRequest, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full; retry later")

    async def serve() -> None:
        handler = grpc.method_handlers_generic_handler(
            "bitserve.v1.Inference",
            {
                "Sentiment": grpc.unary_unary_rpc_method_handler(
                    refuse,
                    request_deserializer=pb.SentimentRequest.FromString,
                    response_serializer=pb.SentimentResponse.SerializeToString,
                )
            },
        )
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(serve())


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds used so far by these processes."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _burst(target: str, requests: int, k: int, server_pids: list[int]) -> dict[str, float]:
    """One burst of `requests` calls from `k` client processes; its counts and percentiles."""
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    shares = [requests // k + (i < requests % k) for i in range(k)]
    start_at = time.time() + 3.0 + 0.5 * k  # every client connected and waiting
    clients = [ctx.Process(target=_client, args=(target, n, start_at, q)) for n in shares]
    for c in clients:
        c.start()
    time.sleep(max(0.0, start_at - time.time() - 0.5))
    cpu0, front0 = _cpu_s(server_pids), _cpu_s(server_pids[:1])
    answers = [a for _ in clients for a in q.get(timeout=600)]
    cpu, front = _cpu_s(server_pids) - cpu0, _cpu_s(server_pids[:1]) - front0
    for c in clients:
        c.join(60)
    codes: dict[str, int] = {}
    for code, _ in answers:
        codes[code] = codes.get(code, 0) + 1
    rejected = [t for code, t in answers if code == "RESOURCE_EXHAUSTED"]
    ok = [t for code, t in answers if code == "OK"]
    return {
        "requests": len(answers),
        "ok": codes.get("OK", 0),
        "rejected": len(rejected),
        "other": len(answers) - len(ok) - len(rejected),
        "reject_p50_ms": _pct(rejected, 0.5) * 1000,
        "reject_p99_ms": _pct(rejected, 0.99) * 1000,
        "ok_p50_ms": _pct(ok, 0.5) * 1000,
        "ok_p99_ms": _pct(ok, 0.99) * 1000,
        "server_cpu_ms_per_request": cpu * 1000 / max(1, len(answers)),
        "front_cpu_ms_per_request": front * 1000 / max(1, len(answers)),
    }


def _wait_healthy(target: str, proc: subprocess.Popen) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"bitserve serve exited with {proc.returncode}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.burst")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--client-procs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of bitserve and the floor")
    ap.add_argument(
        "--warmup", type=int, default=1, help="unmeasured bursts per server first (the first one is cold)"
    )
    ap.add_argument(
        "--engine-nice", type=int, default=None, help="server.engine_nice (default: the setting's)"
    )
    ap.add_argument("--save", default="burst", help="bench/results/NAME.json ('' to skip)")
    args = ap.parse_args(argv)
    import psutil
    import yaml

    from bitserve.models.tiny import build_classifier

    t_start = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="bench-burst-"))
    model = build_classifier(tmp / "sentiment", ["NEGATIVE", "POSITIVE"], seed=2)
    port = _free_port()
    cfg = {
        "server": {
            "host": "127.0.0.1",
            "port": port,
            "metrics_port": -1,
            "log_level": "WARNING",
            **({} if args.engine_nice is None else {"engine_nice": args.engine_nice}),
        },
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
    ctx = mp.get_context("spawn")
    floor_port, floor_ready = _free_port(), ctx.Event()
    floor = ctx.Process(target=_floor, args=(floor_port, floor_ready))
    floor.start()
    target = f"127.0.0.1:{port}"
    rows: list[dict[str, Any]] = []
    try:
        _wait_healthy(target, proc)
        if not floor_ready.wait(60):
            raise SystemExit("the floor server did not start")
        # The front and its engine process(es): the server's CPU is theirs together.
        server_pids = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
        servers = {
            "bitserve": (target, server_pids),
            "floor": (f"127.0.0.1:{floor_port}", [floor.pid or 0]),
        }
        for w in range(args.warmup):
            for name, (where, pids) in servers.items():
                cold = _burst(where, args.requests, args.client_procs, pids)
                print(f"warm-up {w + 1} {name:8s}: rejection p99 {cold['reject_p99_ms']:.1f} ms (not kept)")
        for r in range(args.rounds):
            order = ["bitserve", "floor"] if r % 2 == 0 else ["floor", "bitserve"]
            for name in order:
                load0 = os.getloadavg()[0]
                where, pids = servers[name]
                got = _burst(where, args.requests, args.client_procs, pids)
                row = {"round": r + 1, "server": name, **got, "load_1m": (load0 + os.getloadavg()[0]) / 2}
                rows.append(row)
                print(
                    f"round {r + 1} {name:8s}: OK {row['ok']}, RESOURCE_EXHAUSTED {row['rejected']}, "
                    f"other {row['other']}; rejection p50 {row['reject_p50_ms']:.1f} ms, p99 "
                    f"{row['reject_p99_ms']:.1f} ms; success p50 {row['ok_p50_ms']:.1f} ms; server CPU "
                    f"{row['server_cpu_ms_per_request']:.2f} ms/request (front {row['front_cpu_ms_per_request']:.2f}); load {row['load_1m']:.1f}",
                    flush=True,
                )
    finally:
        proc.terminate()
        proc.wait(60)
        floor.terminate()
        floor.join(10)

    def values(name: str, key: str) -> list[float]:
        return [float(row[key]) for row in rows if row["server"] == name]

    ratios = [
        b / f
        for b, f in zip(values("bitserve", "reject_p99_ms"), values("floor", "reject_p99_ms"), strict=True)
    ]
    b99, f99 = values("bitserve", "reject_p99_ms"), values("floor", "reject_p99_ms")
    print(
        f"rejection p99: bitserve {min(b99):.0f}-{max(b99):.0f} ms, floor {min(f99):.0f}-{max(f99):.0f} ms "
        f"(target < 100 ms); ratio per round {', '.join(f'{x:.2f}' for x in ratios)}"
    )
    if args.save:
        from bench.results import column, command_line, write

        load = os.getloadavg()
        path = write(
            args.save,
            command=command_line("bench.burst"),
            columns=[
                column("round", "round"),
                column("server", "server"),
                column("requests", "requests"),
                column("ok", "OK"),
                column("rejected", "RESOURCE_EXHAUSTED"),
                column("other", "other"),
                column("reject_p50_ms", "rejection p50, ms", "{:.1f}"),
                column("reject_p99_ms", "rejection p99, ms", "{:.1f}"),
                column("ok_p50_ms", "success p50, ms", "{:.1f}"),
                column("ok_p99_ms", "success p99, ms", "{:.1f}"),
                column("server_cpu_ms_per_request", "server CPU, ms/request", "{:.2f}"),
                column("front_cpu_ms_per_request", "of it the front (gRPC process)", "{:.2f}"),
                column("load_1m", "load (1 min)", "{:.1f}"),
            ],
            rows=rows,
            notes=[
                "server bitserve: `bitserve serve`, its own process; one tiny sentiment classifier, "
                "max_queue_size 16, max_batch_size 4, max_batch_delay_ms 2; two texts per request",
                "server floor: a bare grpc.aio server in its own process refusing every call "
                "(RESOURCE_EXHAUSTED) with no work: what gRPC in Python and the clients cost here",
                f"clients: {args.client_procs} processes (spawned, none a server's), each firing its share "
                "of the requests together on one asyncio loop; latency measured client side",
                f"{args.warmup} unmeasured burst(s) per server first: the first burst after start is "
                "cold (several times slower); rounds interleaved, the order alternating; server CPU: "
                "the server's processes (bitserve: front and engine) during the burst, per request",
                "rejection p99 ratio bitserve / floor per round: " + ", ".join(f"{x:.2f}" for x in ratios),
                f"load average at the end (1, 5, 15 min): {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f}",
            ],
            started=t_start,
        )
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
