"""The cost of one engine step message crossing the process boundary, by transport.

    python -m bench.ipc [--rows 64] [--messages 20000]

A child process sends `--messages` step messages ([TOKENS, 64 x [rid, token, logprob,
finish], stats]: what an engine sends per decode step of a 64-row batch) as fast as it can;
the parent receives and decodes them. Transports: ZeroMQ PUSH/PULL over a unix socket with
msgpack (what bitserve uses) and multiprocessing.Pipe with pickle. Prints microseconds per
message (receiver side, wall clock / messages) and messages per second, and saves JSON.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time

from bench.results import column, command_line, write


def step_message(rows: int) -> list:
    return [
        "tokens",
        [[i, 1000 + i, None, None] for i in range(rows)],
        {"running": {"m": rows}, "waiting": {}, "batch": rows, "stepped": {"m": rows}, "prompt_tokens": 0},
    ]


def _zmq_sender(addr: str, rows: int, n: int) -> None:
    import msgpack
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.SNDHWM, 0)
    s.connect(addr)
    msg = step_message(rows)
    for _ in range(n):
        s.send(msgpack.packb(msg, use_bin_type=True))
    s.close(linger=-1)
    ctx.term()


def bench_zmq(rows: int, n: int) -> float:
    import msgpack
    import zmq

    d = tempfile.mkdtemp()
    addr = f"ipc://{d}/b"
    ctx = zmq.Context()
    s = ctx.socket(zmq.PULL)
    s.setsockopt(zmq.RCVHWM, 0)
    s.bind(addr)
    p = mp.get_context("spawn").Process(target=_zmq_sender, args=(addr, rows, n))
    p.start()
    first = msgpack.unpackb(s.recv(), raw=False)
    t = time.perf_counter()
    for _ in range(n - 1):
        msgpack.unpackb(s.recv(), raw=False)
    dt = time.perf_counter() - t
    p.join()
    s.close()
    ctx.term()
    assert first[0] == "tokens"
    return dt / (n - 1)


def _pipe_sender(conn, rows: int, n: int) -> None:
    msg = step_message(rows)
    for _ in range(n):
        conn.send(msg)
    conn.close()


def bench_pipe(rows: int, n: int) -> float:
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_pipe_sender, args=(b, rows, n))
    p.start()
    a.recv()
    t = time.perf_counter()
    for _ in range(n - 1):
        a.recv()
    dt = time.perf_counter() - t
    p.join()
    return dt / (n - 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ipc")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--save", default="ipc", help="bench/results/NAME.json")
    args = ap.parse_args(argv)
    runs: dict[str, list[float]] = {"zmq+msgpack": [], "mp.Pipe+pickle": []}
    for _ in range(args.rounds):  # interleaved: noise hits both alike
        runs["zmq+msgpack"].append(bench_zmq(args.rows, args.messages))
        runs["mp.Pipe+pickle"].append(bench_pipe(args.rows, args.messages))
    rows = []
    for name, xs in runs.items():
        us = sorted(x * 1e6 for x in xs)
        rows.append(
            {
                "transport": name,
                "rows": args.rows,
                "us_median": us[len(us) // 2],
                "us_min": us[0],
                "us_max": us[-1],
                "rounds": len(us),
            }
        )
        print(f"{name:16s} {us[len(us) // 2]:7.2f} us/message (range {us[0]:.2f}-{us[-1]:.2f})")
    path = write(
        args.save,
        command=command_line("bench.ipc"),
        columns=[
            column("transport", "transport"),
            column("rows", "rows per step message"),
            column("us_median", "us per message, median", "{:.1f}"),
            column("us_min", "min", "{:.1f}"),
            column("us_max", "max", "{:.1f}"),
            column("rounds", "rounds (interleaved)"),
        ],
        rows=rows,
        notes=[f"{args.messages} messages per round, received and decoded by the parent process"],
    )
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
