"""Resident memory of `bitserve serve` with the default config, after warm-up.

    python -m bench.serve_memory [--out bench/results]

Starts the real server (a subprocess, free ports), waits until health says SERVING, sends one
request to each of the four default models, then reads VmRSS of the front and of every engine
process from /proc. Prints and saves JSON with the command, revision, date and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def machine() -> dict[str, object]:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def revision() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.serve_memory")
    ap.add_argument("--out", default="bench/results")
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
    total = sum(rss.values())
    result = {
        "command": "python -m bench.serve_memory",
        "revision": revision(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
        "config": "default (SmolLM2-135M-Instruct, four models, quantize none)",
        "ready_s": round(ready_s, 1),
        "rss_bytes": rss,
        "total_rss_bytes": total,
    }
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"serve-memory-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps(result, indent=2) + "\n"
    )
    print(f"total RSS after warm-up: {total / 1e9:.2f} GB over {len(rss)} processes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
