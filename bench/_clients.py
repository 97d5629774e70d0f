"""Load generators for the benchmark, run in a child process so that the clients' Python work
does not share the server's interpreter lock (as real clients would not).

Imports only grpc and the client: a spawned child starts in about a second.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass


@dataclass
class Record:
    start: float  # seconds since the run began
    latency: float
    ttft: float | None
    tokens: int
    max_new_tokens: int


def run_clients(
    target: str,
    model: str,
    jobs: list[tuple[str, int]],
    clients: int,
    stream: bool,
    max_seconds: float | None,
) -> tuple[list[Record], float]:
    """`clients` closed-loop workers share `jobs` (prompt, max_new_tokens); each sends its next
    request as soon as the previous one answered. Returns the records and the wall time."""
    return asyncio.run(_run(target, model, jobs, clients, stream, max_seconds))


async def _run(target, model, jobs, clients, stream, max_seconds):
    from bitserve_client import AsyncClient

    queue = list(reversed(jobs))
    records: list[Record] = []
    async with AsyncClient(target, timeout=600) as client:
        # One warm-up call: channel connect and first-use costs are not the server's.
        await client.generate("warm up", model=model, max_new_tokens=2)
        t0 = time.perf_counter()

        async def worker() -> None:
            while queue:
                if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                    return
                prompt, n = queue.pop()
                start = time.perf_counter()
                ttft = None
                if stream:
                    tokens = 0
                    async for ev in client.generate_stream(prompt, model=model, max_new_tokens=n):
                        if ttft is None:
                            ttft = time.perf_counter() - start
                        if ev.final is not None:
                            tokens = ev.final.tokens
                else:
                    tokens = (await client.generate(prompt, model=model, max_new_tokens=n)).tokens
                end = time.perf_counter()
                records.append(Record(start - t0, end - start, ttft, tokens, n))

        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return records, wall
