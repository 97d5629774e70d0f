"""Resident memory of `bitserve serve` with the default config, after warm-up.

    python -m bench.serve_memory [--out bench/results]

Starts the real server (a subprocess, free ports), waits until health says SERVING, sends one
request to each of the four default models, then reads VmRSS of the front and of every engine
process from /proc. Prints and saves JSON with the command, revision, date and machine.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss(pid: int) -> dict[str, int]:
    """VmRSS and its parts (RssAnon: heap and tensors; RssFile: mapped libraries and files), bytes."""
    keys = ("VmRSS", "RssAnon", "RssFile")
    out = dict.fromkeys(keys, 0)
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in keys:
            out[key] = int(line.split()[1]) * 1024
    return out


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.serve_memory")
    ap.add_argument("--save", default="serve-memory", help="bench/results/NAME.json")
    args = ap.parse_args(argv)
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from bitserve_client import Client

    port, mport = _free_port(), _free_port()
    env = {**os.environ, "BITSERVE_SERVER__PORT": str(port), "BITSERVE_SERVER__METRICS_PORT": str(mport)}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "bitserve.cli", "serve"], env=env)
    try:
        target = f"127.0.0.1:{port}"
        with grpc.insecure_channel(target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"bitserve serve exited with {proc.returncode}")
                try:
                    r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.5)
        ready_s = time.monotonic() - t0
        with Client(target, timeout=300) as c:
            c.generate("Hello", max_new_tokens=16)
            c.classify("The team won the match.", model="smollm2-classify")
            c.sentiment("I love it")
            c.translate("Good morning", target_lang="fr")
        time.sleep(1.0)
        procs = {"front": proc.pid, **{f"engine-{i}": p for i, p in enumerate(_children(proc.pid))}}
        rss = {name: _rss(pid) for name, pid in procs.items()}
    finally:
        proc.terminate()
        proc.wait(60)
    total = {k: sum(r[k] for r in rss.values()) for k in ("VmRSS", "RssAnon", "RssFile")}
    from bench.results import column, command_line, write

    rows = [
        {
            "process": name,
            "rss_mb": r["VmRSS"] / 1e6,
            "anon_mb": r["RssAnon"] / 1e6,
            "file_mb": r["RssFile"] / 1e6,
        }
        for name, r in [*rss.items(), ("total", total)]
    ]
    path = write(
        args.save,
        command=command_line("bench.serve_memory"),
        columns=[
            column("process", "process"),
            column("rss_mb", "resident memory after warm-up, MB", "{:.0f}"),
            column("anon_mb", "of it anonymous (heap, tensors), MB", "{:.0f}"),
            column("file_mb", "of it file-backed (libraries, mapped files), MB", "{:.0f}"),
        ],
        rows=rows,
        notes=[
            "default config: SmolLM2-135M-Instruct for all four tasks, quantize none (538 MB of fp32 weights)",
            f"command to SERVING: {ready_s:.1f} s; then one request per model, 1 s idle, /proc VmRSS",
            "file-backed: shared libraries, and the weights, mapped once from the GGUF cache's "
            "model.safetensors (/proc/PID/smaps); the front imports no torch "
            "(tests/integration/test_front_imports.py), a CPU-only engine no triton (engine/core.py)",
        ],
    )
    print(f"total RSS after warm-up: {total['VmRSS'] / 1e9:.2f} GB over {len(rss)} processes; saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
