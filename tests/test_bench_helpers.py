"""The benchmark harness's own arithmetic and its HTTP client: what the published ratios rest on."""

from __future__ import annotations

import asyncio
import json

import pytest

from bench._clients import Record, _http_post
from bench.generation import Result, _Rounds, _span, model_settings, vs_checks
from bench.long_join import gaps


def test_gaps_keep_only_those_ending_inside_the_window():
    times = [[0.0, 1.0, 3.0, 6.0], [0.5, 2.5]]
    # Gaps end at 1, 3, 6 (row 0) and 2.5 (row 1); the window (1, 3] holds the ones ending at 3 and 2.5.
    assert sorted(gaps(times, 1.0, 3.0)) == [2.0, 2.0]
    assert gaps(times, 6.0, 9.0) == []


def test_span_is_a_range_over_rounds_and_skips_missing_values():
    assert _span([3.0, None, 1.0, 2.0], "{:.1f}") == "1.0-3.0"
    assert _span([1.04, 1.01], "{:.1f}") == "1.0"  # equal in print: one value
    assert _span([None], "{:.1f}") is None


def _res(wl: str, system: str, size: int, tps: float) -> Result:
    return Result("fp32", wl, system, size, wall=1.0 / tps * 1000, records=[])


def test_a_target_passes_only_if_every_round_meets_it():
    def rnd(bitserve_tps: float) -> list[Result]:
        r = [_res("equal", "static", 64, 1000.0), _res("equal", "vllm", 64, 1000.0)]
        r.append(_res("equal", "bitserve", 64, bitserve_tps))
        for x in r:  # tokens / wall = tps: one record carrying all tokens
            x.records = [Record(0.0, 0.1, None, 1000, 32)]
        return r

    lines = vs_checks(_Rounds([rnd(1200.0), rnd(1050.0)]), [64], 64)
    static = next(line for line in lines if "static" in line)
    assert "1.05-1.20" in static and "SHORT (1 of 2 rounds)" in static
    lines = vs_checks(_Rounds([rnd(1200.0), rnd(1150.0)]), [64], 64)
    assert all(line.endswith("PASS") for line in lines if "unary /" in line)


def test_model_settings_parse_numbers_and_booleans():
    assert model_settings(["persistent_batch=false", "prefill_chunk_tokens=256", "dtype=float32"]) == {
        "persistent_batch": False,
        "prefill_chunk_tokens": 256,
        "dtype": "float32",
    }
    with pytest.raises(SystemExit):
        model_settings(["no-equals-sign"])


@pytest.mark.parametrize("chunked", [False, True])
def test_http_post_reads_sized_and_chunked_bodies_on_one_connection(chunked):
    payload = json.dumps({"usage": {"completion_tokens": 7}}).encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):  # keep-alive: two requests on the same connection
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(
                next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1]
            )
            await reader.readexactly(length)
            if chunked:
                body = (
                    b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (payload[:5], payload[5:])) + b"0\r\n\r\n"
                )
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload)
            await writer.drain()
        writer.close()

    async def main() -> list[tuple[int, bytes]]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        conn = await asyncio.open_connection("127.0.0.1", port)
        try:
            return [await _http_post(conn, f"127.0.0.1:{port}", "/v1/completions", b"{}") for _ in range(2)]
        finally:
            conn[1].close()
            server.close()
            await server.wait_closed()

    assert asyncio.run(main()) == [(200, payload), (200, payload)]
