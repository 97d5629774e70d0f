"""Tenant isolation: a victim tenant's latency while a hog tenant sends at its limit (issue 22).

    python -m bench.tenants [--rounds 3] [--calls 10] [--save tenants]

Starts `bitserve serve` in its own process with a tiny causal LM (max_queue_size 6,
max_concurrent_sequences 4) and two tenants: `hog` (max_concurrent_sequences 2, queue_share 0.3)
and `victim` (no limits). Each round measures the victim's latency (`--calls` sequential
Generates of 16 tokens from its own process) idle, then with the hog's 8 callers (two processes
of four threads, 64 tokens per call, a refused call resent after 50 ms without honouring its
RetryInfo) keeping it at its limit; rounds alternate which phase goes first, so a change in the
machine's load hits both alike. Prints per round the victim's p50 both ways and their ratio
(target: contended p50 <= 2x idle), the victim's refusals (target: none) and the hog's outcomes;
saves bench/results/NAME.json.

The hog's callers run on the same machine as the server and the victim (its client processes
take CPU the server would otherwise have): on a 2-core machine the ratio measures that sharing
as well as the server's isolation, which is why it is a benchmark and not a timed test. The
test that can fail without a clock is tests/integration/test_tenants.py (the victim is never
refused while the hog is at its limit) with the scheduler's order in tests/unit/frontend/test_tenants.py.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.burst import _free_port, _wait_healthy

TENANTS = {"hog": {"max_concurrent_sequences": 2, "queue_share": 0.3}, "victim": {}}


def _token(tenant: str) -> str:
    return f"bench-token-of-{tenant}-0123456789"


def hog_callers(target: str, token: str, stop: Any, counts: Any) -> None:
    """4 callers of the hog tenant in this (spawned) process, sending until `stop`; refused
    calls ignore RetryInfo and resend 20 times a second. counts: [OK, RESOURCE_EXHAUSTED]."""
    from bitserve_client import Client
    from bitserve_client.errors import ResourceExhaustedError
    from bitserve_client.retry import RetryInfoPolicy

    def caller(i: int) -> None:
        with Client(target, token=token, timeout=60, service_config={}) as c:
            c.retry_policy = RetryInfoPolicy(max_attempts=1)
            while not stop.is_set():
                try:
                    c.generate(f"hog {i}", model="lm", max_new_tokens=64)
                    k = 0
                except ResourceExhaustedError:
                    k = 1
                    time.sleep(0.05)
                with counts.get_lock():
                    counts[k] += 1

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _victim(target: str, n: int, out: Any) -> None:
    """`n` sequential Generates of the victim tenant (its own process): latencies, refusals."""
    from bitserve_client import Client
    from bitserve_client.errors import ResourceExhaustedError
    from bitserve_client.retry import RetryInfoPolicy

    times, refused = [], 0
    with Client(target, token=_token("victim"), timeout=60, service_config={}) as c:
        c.retry_policy = RetryInfoPolicy(max_attempts=1)
        c.generate("warm up", model="lm", max_new_tokens=16)
        for i in range(n):
            start = time.perf_counter()
            try:
                c.generate(f"victim {i}", model="lm", max_new_tokens=16)
                times.append(time.perf_counter() - start)
            except ResourceExhaustedError:
                refused += 1
    out.put((times, refused))


def _measure(target: str, n: int) -> tuple[list[float], int]:
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    p = ctx.Process(target=_victim, args=(target, n, q))
    p.start()
    got = q.get(timeout=600)
    p.join(60)
    return got


def _hog_sequences(metrics_port: int) -> float:
    """Sequences the hog holds now, from the server's tenant-usage gauge (fraction x limit)."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith("bitserve_tenant_limit_usage") and 'tenant="hog"' in line:
            if 'limit="max_concurrent_sequences"' in line:
                return float(line.rsplit(" ", 1)[1]) * 2
    return -1.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tenants")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=10, help="victim calls per phase")
    ap.add_argument("--save", default="tenants", help="bench/results/NAME.json ('' to skip)")
    args = ap.parse_args(argv)
    import yaml

    from bitserve.models.tiny import build_causal_lm

    t_start = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="bench-tenants-"))
    lm = build_causal_lm(tmp / "lm", max_positions=4096)
    tokens = tmp / "tokens"
    tokens.write_text("".join(f"{_token(t)} {t}\n" for t in TENANTS))
    port, metrics_port = _free_port(), _free_port()
    cfg = {
        "server": {
            "host": "127.0.0.1",
            "port": port,
            "metrics_port": metrics_port,
            "log_level": "WARNING",
            "auth_tokens_file": str(tokens),
            "tenants": TENANTS,
        },
        "models": [
            {
                "name": "lm",
                "task": "generate",
                "path": str(lm),
                "max_new_tokens_limit": 4000,
                "max_queue_size": 6,
                "max_concurrent_sequences": 4,
            }
        ],
    }
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "bitserve.cli", "serve", "--config", str(tmp / "config.yaml")]
    )
    target = f"127.0.0.1:{port}"
    rows: list[dict[str, Any]] = []
    ctx = mp.get_context("spawn")
    try:
        _wait_healthy(target, proc)
        for r in range(args.rounds):
            phases = ["idle", "contended"] if r % 2 == 0 else ["contended", "idle"]
            got: dict[str, tuple[list[float], int]] = {}
            hog = [0, 0]
            load0 = os.getloadavg()[0]
            for phase in phases:
                if phase == "idle":
                    got[phase] = _measure(target, args.calls)
                    continue
                stop, counts = ctx.Event(), ctx.Array("i", 2)
                procs = [
                    ctx.Process(target=hog_callers, args=(target, _token("hog"), stop, counts))
                    for _ in range(2)
                ]
                for p in procs:
                    p.start()
                try:
                    deadline = time.monotonic() + 60
                    while _hog_sequences(metrics_port) < 2 and time.monotonic() < deadline:
                        time.sleep(0.05)
                    got[phase] = _measure(target, args.calls)
                finally:
                    stop.set()
                    for p in procs:
                        p.join(60)
                    hog = [counts[0], counts[1]]
            idle, busy = statistics.median(got["idle"][0]), statistics.median(got["contended"][0])
            row = {
                "round": r + 1,
                "idle_p50_ms": idle * 1000,
                "contended_p50_ms": busy * 1000,
                "ratio": busy / idle,
                "victim_refused": got["idle"][1] + got["contended"][1],
                "hog_ok": hog[0],
                "hog_refused": hog[1],
                "load_1m": (load0 + os.getloadavg()[0]) / 2,
            }
            rows.append(row)
            print(
                f"round {r + 1} ({' then '.join(phases)}): victim p50 idle {row['idle_p50_ms']:.1f} ms, "
                f"hog at its limit {row['contended_p50_ms']:.1f} ms, ratio {row['ratio']:.2f} (target <= 2); "
                f"victim refused {row['victim_refused']}; hog OK {hog[0]}, refused {hog[1]}; "
                f"load {row['load_1m']:.1f}",
                flush=True,
            )
    finally:
        proc.terminate()
        proc.wait(60)
    ratios = [row["ratio"] for row in rows]
    print(
        f"victim p50 ratio (hog at its limit / idle): {min(ratios):.2f}-{max(ratios):.2f} over {len(rows)} rounds"
    )
    if args.save:
        from bench.results import column, command_line, write

        load = os.getloadavg()
        path = write(
            args.save,
            command=command_line("bench.tenants"),
            columns=[
                column("round", "round"),
                column("idle_p50_ms", "victim p50 idle, ms", "{:.1f}"),
                column("contended_p50_ms", "victim p50, hog at its limit, ms", "{:.1f}"),
                column("ratio", "ratio", "{:.2f}"),
                column("victim_refused", "victim refused"),
                column("hog_ok", "hog OK"),
                column("hog_refused", "hog refused"),
                column("load_1m", "load (1 min)", "{:.1f}"),
            ],
            rows=rows,
            notes=[
                "server: `bitserve serve`, its own process; a tiny causal LM, max_queue_size 6, "
                "max_concurrent_sequences 4; tenants hog (max_concurrent_sequences 2, queue_share 0.3) "
                "and victim (no limits), bearer tokens",
                f"victim: {args.calls} sequential Generates of 16 tokens per phase from its own process; "
                "hog: 8 callers (2 processes x 4 threads) of 64-token Generates, refused calls resent after 50 ms",
                "phases alternate their order per round; the hog's client processes share the machine",
                f"load average at the end (1, 5, 15 min): {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f}",
            ],
            started=t_start,
        )
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
