"""The engine process: owns one copy of the weights and everything that runs on them.

`python -m bitserve.engine.core --spec FILE --inbox ADDR --outbox ADDR` loads the checkpoint
once, builds a worker per configured model on it (a shared generation scheduler for every task
a causal LM answers; a batch runner per task head), answers READY (or FAILED), then loops:
receive what the front sent, run one scheduler step or one queued job, send the results. It
imports no gRPC and holds no asyncio loop: the front's GIL and this one never meet.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import zmq

from bitserve.engine.workers import Workers, build_workers
from bitserve.ipc import protocol as P

log = logging.getLogger("bitserve.engine.core")

IDLE_POLL_MS = 1000  # an idle engine still looks up now and then whether its front is alive
# Idle this long after work, the engine hands memory back (the empty batch's KV pages,
# malloc_trim): not at once, so that a client sending one request after another does not pay
# the pages' faults again on every request.
RELEASE_AFTER_IDLE_S = 0.5


def _die_with_parent() -> None:
    """Linux: the kernel ends this process when the front exits, however it exits."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # pragma: no cover - not Linux
        pass


class Core:
    """The engine loop, apart from its transport: `send` delivers a message to the front;
    `serve(recv, alive)` takes what arrived (`recv(timeout_ms)` -> messages)."""

    def __init__(self, workers: Workers, send: Callable[[list[Any]], None]):
        self.w = workers
        self.send = send
        self.jobs: collections.deque[list[Any]] = collections.deque()
        self.closing = False
        self._wait_until: float | None = None
        self._last_stats: Any = None
        # Requests the front wants whole (unary, no stop strings): rid -> (ids, logprobs, time
        # of the first token, top alternatives); one message when they finish instead of one
        # per token.
        self._whole: dict[int, tuple[list[int], list[float | None], list[float], list[Any]]] = {}
        self._pending = self._no_pending()

    def handle(self, msg: list[Any]) -> None:
        op = msg[0]
        if op == P.ABORT:
            for rid in msg[1]:
                self._whole.pop(rid, None)
            if self.w.scheduler is not None:
                self.w.scheduler.abort(set(msg[1]))
            return
        if op == P.SHUTDOWN:
            self.closing = True
            return
        if op == P.PING:  # answered between steps: a hung loop does not answer
            self.send([P.PONG, msg[1]])
            return
        if op == P.GENERATE_MANY:
            for rid, req in msg[1]:
                self.handle([P.GENERATE, rid, req])
            return
        rid = msg[1]
        if self.closing:
            self.send([P.ERROR, rid, "UNAVAILABLE", "the engine is shutting down"])
            return
        if op == P.GENERATE:
            if self.w.scheduler is None:
                self.send([P.ERROR, rid, "FAILED_PRECONDITION", "this engine has no causal LM"])
                return
            if msg[2].get("whole"):
                self._whole[rid] = ([], [], [], [])
            try:
                self.w.scheduler.add(P.request_from_wire(rid, msg[2]))
            except Exception as e:  # an unknown adapter: NOT_FOUND, never the base model
                self._whole.pop(rid, None)
                self.send(P.error_to_wire(rid, e))
                return
            self._wait_until = None
        elif op in (P.SCORE, P.BATCH, P.ADAPTER):
            self.jobs.append(msg)
        else:  # pragma: no cover - a front/core version mismatch
            log.error("unknown message %r", op)

    def run_job(self, msg: list[Any]) -> None:
        op, rid = msg[0], msg[1]
        try:
            if op == P.SCORE:
                result = self.w.score(*msg[2:])
            elif op == P.ADAPTER:
                result = self.w.adapter_op(msg[2], msg[3])
            else:
                result = self.w.run_batch(*msg[2:])
        except Exception as e:
            log.exception("%s job failed", op)
            self.send(P.error_to_wire(rid, e))
            return
        self.send([P.RESULT, rid, result])

    def step(self) -> None:
        sched = self.w.scheduler
        assert sched is not None
        r = sched.step()
        self._wait_until = r.wait_until
        for rid, exc in r.errors:
            self._whole.pop(rid, None)
            self.send(P.error_to_wire(rid, exc))
        tokens: list[list[Any]] = []
        finished: list[list[Any]] = []
        now = time.monotonic()
        for t in r.tokens:
            buf = self._whole.get(t[0])
            if buf is None:
                tokens.append(list(t))
                continue
            ids, lps, first, tops = buf
            ids.append(t[1])
            lps.append(t[2])
            tops.append(t[4])
            if not first:
                first.append(now)
            if t[3] is not None:
                del self._whole[t[0]]
                any_lp = any(lp is not None for lp in lps)
                any_top = any(top is not None for top in tops)
                finished.append(
                    [t[0], ids, lps if any_lp else None, t[3], first[0], tops if any_top else None]
                )
        p = self._pending
        if r.batch_size:
            p["steps"].append([r.batch_size, r.batch_models])
        p["prompt_tokens"] += r.prompt_tokens
        for model, waits in r.queue_waits.items():
            p["queue_wait"].setdefault(model, []).extend(waits)
        stats = self._stats()
        # Stats alone go out only when they change (KV "used" grows every step: not a change).
        key = {k: v for k, v in stats.items() if k != "kv"}, stats.get("kv", {}).get("reserved")
        changed = key != self._last_stats
        if tokens or finished or changed:
            self._last_stats = key
            self.send([P.TOKENS, tokens, {**stats, **p}, finished])
            self._pending = self._no_pending()

    @staticmethod
    def _no_pending() -> dict[str, Any]:
        """What the front has not been told yet: decode steps ([rows, rows per model]), prompt
        tokens prefilled and queue waits of admitted requests."""
        return {"steps": [], "prompt_tokens": 0, "queue_wait": {}}

    def _stats(self) -> dict[str, Any]:
        sched = self.w.scheduler
        assert sched is not None
        running = collections.Counter(s.model for s in sched.running)
        waiting = collections.Counter(s.model for s in sched.waiting)
        stats: dict[str, Any] = {"running": dict(running), "waiting": dict(waiting)}
        if sched.slots is not None:
            # KV tokens the persistent batch holds allocated, and those its rows fill.
            stats["kv"] = {"reserved": sched.slots.reserved_tokens, "used": sched.slots.used_tokens}
        return stats

    def timeout_ms(self) -> int:
        sched = self.w.scheduler
        if self.jobs or (sched is not None and sched.active()):
            return 0
        if sched is not None and sched.waiting:
            if self._wait_until is None:
                return 0
            return max(0, int((self._wait_until - time.monotonic()) * 1000) + 1)
        return IDLE_POLL_MS

    def serve(self, recv: Callable[[int], list[list[Any]]], alive: Callable[[], bool]) -> None:
        sched = self.w.scheduler
        worked = False
        idle_since: float | None = None
        while True:
            timeout = self.timeout_ms()
            if timeout == IDLE_POLL_MS and worked:
                # Idle after work, for RELEASE_AFTER_IDLE_S: hand the allocator's freed pages
                # (activations, caches of batches gone) and the empty batch's KV pages back to
                # the system, so RSS reflects what is really held.
                now = time.monotonic()
                if idle_since is None:
                    idle_since = now
                left = idle_since + RELEASE_AFTER_IDLE_S - now
                if left <= 0:
                    if sched is not None and sched.slots is not None:
                        sched.slots.release_pages()
                    _trim()
                    worked, idle_since = False, None
                else:
                    timeout = int(left * 1000) + 1
            msgs = recv(timeout)
            for msg in msgs:
                self.handle(msg)
            if not msgs and not alive():
                log.error("the front is gone; exiting")
                return
            busy = bool(self.jobs) or (sched is not None and sched.has_work())
            if self.closing and not busy:
                return
            if self.jobs or busy:
                worked, idle_since = True, None
            if self.jobs:
                self.run_job(self.jobs.popleft())
            if sched is not None and sched.has_work():
                if sched.active() or self._wait_until is None or time.monotonic() >= self._wait_until:
                    self.step()


def _trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:  # pragma: no cover - not glibc
        pass


def _zmq_recv(pull: Any) -> Callable[[int], list[list[Any]]]:
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)

    def recv(timeout_ms: int) -> list[list[Any]]:
        out: list[list[Any]] = []
        if poller.poll(timeout_ms):
            while True:
                try:
                    out.append(P.unpack(pull.recv(zmq.NOBLOCK)))
                except zmq.Again:
                    break
        return out

    return recv


def _without_triton_on_cpu(spec: dict[str, Any]) -> None:
    """An engine whose models all run on the CPU has no use for triton (a GPU kernel compiler:
    inductor's CPU backend emits C++, xgrammar and bitsandbytes have CPU kernels), yet
    torch._dynamo (imported by transformers), bitsandbytes and xgrammar import it when it is
    installed (xgrammar depends on it): ~100 MB of resident memory per engine
    (bench/results/serve-memory.json). Marked absent, those imports take their no-triton path."""
    import torch

    def on_cpu(device: str) -> bool:
        return device == "cpu" or (device == "auto" and not torch.cuda.is_available())

    if all(on_cpu(str(m.get("device", "auto"))) for m in spec["models"]):
        sys.modules.setdefault("triton", None)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bitserve-engine")
    ap.add_argument("--spec", required=True, help="JSON file: the models this engine serves")
    ap.add_argument("--inbox", required=True)
    ap.add_argument("--outbox", required=True)
    args = ap.parse_args(argv)
    _die_with_parent()
    parent = os.getppid()
    # The front decides when this process ends (SHUTDOWN after its grace period): a Ctrl-C
    # or SIGTERM sent to the whole process group must not cut accepted requests short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(args.spec) as f:
        spec = json.load(f)
    if spec.get("nice"):
        os.nice(int(spec["nice"]))  # server.engine_nice: the front gets a core first
    logging.basicConfig(
        level=spec.get("log_level", "INFO").upper(),
        format=f"%(asctime)s %(levelname)s engine[{spec['engine']}] %(name)s: %(message)s",
    )
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    for s in (pull, push):
        s.setsockopt(zmq.LINGER, 5000)
        s.setsockopt(zmq.SNDHWM, 0)
        s.setsockopt(zmq.RCVHWM, 0)
    pull.connect(args.inbox)
    push.connect(args.outbox)
    try:
        _without_triton_on_cpu(spec)
        workers = build_workers(spec)
    except Exception as e:
        log.exception("loading failed")
        push.send(P.pack([P.FAILED, f"{type(e).__name__}: {e}".replace("\n", " ")]))
        push.close(linger=5000)
        return 1
    # What loading made (modules, parameters, tokenizers: ~430k objects for a tiny GPT-2) is
    # kept for the process's life: out of the collector's generations, so a full collection
    # does not stall a decode step scanning it (measured: one 211 ms step of 63 rows).
    gc.collect()
    gc.freeze()
    push.send(P.pack([P.READY, workers.info()]))
    import torch

    try:
        with torch.inference_mode():

            def send(msg: list[Any]) -> None:
                push.send(P.pack(msg), copy=False)

            core = Core(workers, send)
            core.serve(_zmq_recv(pull), lambda: os.getppid() == parent)
    finally:
        push.close(linger=5000)
        pull.close(linger=0)
        ctx.term()
    return 0


if __name__ == "__main__":
    code = main()
    # Exit without the interpreter's teardown: its sockets are closed and nothing is left to
    # flush but stdio, and some extensions report "leaked" objects at teardown (triton's
    # nanobind, imported by bitsandbytes when installed) into the stderr the front shares.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
