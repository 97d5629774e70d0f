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


# An OpenAI-compatible HTTP server (vLLM's), driven the same way ----------------------------------
# Standard library only (asyncio streams, HTTP/1.1 keep-alive, one connection per worker): the
# project declares no HTTP client, and the load generator should cost what grpc's costs.
async def _http_post(
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], host: str, path: str, body: bytes
) -> tuple[int, bytes]:
    reader, writer = conn
    writer.write(
        (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
        ).encode()
        + body
    )
    await writer.drain()
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("server closed the connection")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                break
            parts.append(await reader.readexactly(size))
            await reader.readline()
        return status, b"".join(parts)
    return status, await reader.readexactly(int(headers.get("content-length", "0")))


def run_openai_clients(
    base: str,
    model: str,
    jobs: list[tuple[str, int]],
    clients: int,
    max_seconds: float | None,
    ignore_eos: bool = True,
) -> tuple[list[Record], float]:
    """As run_clients, against POST {base}/v1/completions (greedy: temperature 0)."""
    return asyncio.run(_run_openai(base, model, jobs, clients, max_seconds, ignore_eos))


async def _run_openai(base, model, jobs, clients, max_seconds, ignore_eos):
    import json
    from urllib.parse import urlsplit

    url = urlsplit(base)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    path = url.path.rstrip("/") + "/v1/completions"

    def body(prompt: str, n: int) -> bytes:
        return json.dumps(
            {
                "model": model,
                "prompt": prompt,
                "max_tokens": n,
                "temperature": 0.0,
                "ignore_eos": ignore_eos,
                "stream": False,
            }
        ).encode()

    async def complete(conn, prompt: str, n: int) -> int:
        status, data = await _http_post(conn, f"{host}:{port}", path, body(prompt, n))
        if status != 200:
            raise RuntimeError(f"{base}: HTTP {status}: {data[:300]!r}")
        return int(json.loads(data)["usage"]["completion_tokens"])

    queue = list(reversed(jobs))
    records: list[Record] = []
    conns = [await asyncio.open_connection(host, port) for _ in range(clients)]
    try:
        await complete(conns[0], "warm up", 2)
        t0 = time.perf_counter()

        async def worker(conn) -> None:
            while queue:
                if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                    return
                prompt, n = queue.pop()
                start = time.perf_counter()
                tokens = await complete(conn, prompt, n)
                end = time.perf_counter()
                records.append(Record(start - t0, end - start, None, tokens, n))

        await asyncio.gather(*(worker(c) for c in conns))
        wall = time.perf_counter() - t0
    finally:
        for _, w in conns:
            w.close()
    return records, wall
