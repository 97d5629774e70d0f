"""The front half of one engine process: spawn it, send it work, route what comes back.

One `EngineClient` per engine process. Requests get an id; what the engine sends back is routed
to the request's sink (generation: one call per token) or future (scoring, task-head batches).
A receive task drains every message that is waiting before it hands any out, so a front that
falls behind catches up in one go instead of message by message.

An engine process that dies is noticed at once (a thread waits on it): every request it held
fails with UNAVAILABLE, `on_state(False)` turns its models NOT_SERVING, and it is started again
(`max_restarts` within `restart_window_s`, with backoff); `on_state(True)` once it is back.
After that many restarts it is left dead (`on_give_up`), and calls are told so.

An engine process that hangs (stopped, deadlocked, stuck in one step) is noticed by a watchdog:
the front pings it every `heartbeat_s`, and it answers between two steps. Silent (no answer, no
tokens) for `unresponsive_s`, it is NOT_SERVING and takes no new calls; silent for `hung_s`, it
is killed, and from there on treated as any dead engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import zmq
import zmq.asyncio

from bitserve.errors import ConfigError, Unavailable
from bitserve.ipc import protocol as P
from bitserve.types import GenerationRequest

log = logging.getLogger(__name__)


class TokenSink(Protocol):
    def on_token(
        self, token: int, logprob: float | None, finish: str | None, now: float, top: Any = None
    ) -> None: ...
    def on_error(self, exc: BaseException) -> None: ...


def _replay(
    sink: TokenSink,
    ids: list[int],
    lps: list[float | None] | None,
    finish: str,
    first: float,
    now: float,
    tops: list[Any] | None = None,
) -> None:
    """A whole answer to its sink token by token, the tokens' times spread evenly from the
    first token's (the engine's clock) to now: time to first token stays exact, the
    inter-token latencies are their mean."""
    last = len(ids) - 1
    for k, tok in enumerate(ids):
        t = first + (now - first) * (k / last) if last else now
        top = tops[k] if tops is not None else None
        sink.on_token(tok, lps[k] if lps is not None else None, finish if k == last else None, t, top)


class EngineLink:
    """Routing shared by every way of reaching an engine: request ids, sinks, futures, and
    what to do with each message that comes back. Subclasses say how a message is sent."""

    def __init__(self, on_stats: Callable[[dict[str, Any]], None] | None = None):
        self.on_stats = on_stats
        self.info: dict[str, Any] = {}
        self.ready = False
        self.last_stats: dict[str, Any] = {"running": {}, "waiting": {}}
        self.steps = 0  # decode steps the engine reported (introspection, tests)
        self._rids = itertools.count(1)
        self._sinks: dict[int, TokenSink] = {}
        self._futures: dict[int, asyncio.Future[Any]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def _send(self, msg: list[Any]) -> None:
        raise NotImplementedError

    @property
    def running(self) -> int:
        """Sequences decoding in the engine, as of its last step report."""
        return int(sum(self.last_stats["running"].values()))

    def _fail_all(self, exc: BaseException) -> None:
        sinks, futs = list(self._sinks.values()), list(self._futures.values())
        self._sinks.clear()
        self._futures.clear()
        for sink in sinks:
            sink.on_error(exc)
        for fut in futs:
            if not fut.done():
                fut.set_exception(exc)

    # requests --------------------------------------------------------------------------------
    @property
    def not_serving_reason(self) -> str:
        """Why calls are refused while `ready` is false: what the caller can expect."""
        return "its engine process is restarting; retry shortly"

    def _check(self) -> None:
        if not self.ready:
            raise Unavailable(f"the model is not serving: {self.not_serving_reason}")

    def generate(self, req: GenerationRequest, sink: TokenSink) -> int:
        """Send one generation request; its tokens go to `sink`. Returns its id (for abort)."""
        return self.generate_many([(req, sink)])[0]

    def generate_many(self, reqs: Sequence[tuple[GenerationRequest, TokenSink]]) -> list[int]:
        """Send generation requests in one message, so the engine sees them in the same step
        (the n completions of a prompt are admitted together and share its prefill)."""
        self._check()
        wire = []
        for req, sink in reqs:
            req.rid = next(self._rids)
            wire.append([req.rid, P.request_to_wire(req, whole=bool(getattr(sink, "whole", False)))])
        if len(wire) == 1:
            self._send([P.GENERATE, *wire[0]])
        else:
            self._send([P.GENERATE_MANY, wire])
        for req, sink in reqs:
            self._sinks[req.rid] = sink
        return [req.rid for req, _ in reqs]

    def abort(self, rids: list[int]) -> None:
        live = [r for r in rids if self._sinks.pop(r, None) is not None]
        if live and self.ready:
            self._send([P.ABORT, live])

    async def call(self, op: str, *args: Any) -> Any:
        """A SCORE or BATCH job; its result."""
        self._check()
        assert self._loop is not None
        rid = next(self._rids)
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._futures[rid] = fut
        self._send([op, rid, *args])
        try:
            return await fut
        finally:
            self._futures.pop(rid, None)

    # receiving -------------------------------------------------------------------------------
    def _dispatch_all(self, msgs: list[list[Any]], now: float) -> None:
        for msg in msgs:
            try:
                self._dispatch(msg, now)
            except Exception:  # a consumer's bug must not stop the others
                log.exception("handling an engine message failed")

    def _dispatch(self, msg: list[Any], now: float) -> None:
        op = msg[0]
        if op == P.TOKENS:
            sinks = self._sinks
            for rid, token, lp, finish, top in msg[1]:
                sink = sinks.get(rid)
                if sink is None:
                    continue
                if finish is not None:
                    del sinks[rid]
                sink.on_token(token, lp, finish, now, top)
            for rid, ids, lps, finish, first, tops in msg[3]:
                sink = sinks.pop(rid, None)
                if sink is not None:
                    _replay(sink, ids, lps, finish, first, now, tops)
            stats = msg[2]
            self.last_stats.update(stats)
            self.steps += len(stats["steps"])
            if self.on_stats is not None:
                self.on_stats(stats)
        elif op == P.ERROR:
            rid, exc = msg[1], P.error_from_wire(msg[2], msg[3])
            sink = self._sinks.pop(rid, None)
            if sink is not None:
                sink.on_error(exc)
            fut = self._futures.get(rid)
            if fut is not None and not fut.done():
                fut.set_exception(exc)
        elif op == P.RESULT:
            fut = self._futures.get(msg[1])
            if fut is not None and not fut.done():
                fut.set_result(msg[2])
        else:
            self._control(msg)

    def _control(self, msg: list[Any]) -> None:
        pass

    def remember_adapter(self, model: str, name: str, path: str | None) -> None:
        """An adapter loaded (`path`) or unloaded (None) at run time; an engine process that
        restarts loads what is remembered (the in-process engine never restarts)."""


class EngineGaveUp(Exception):
    """An engine process used up its restarts (the server exits with it when told to)."""


# Engine processes' working directories (spec, sockets): `bitserve-<engine id>-<random>`.
DIR_PREFIX = "bitserve-"
_PID_FILE = "front.pid"  # the front that owns the directory
STALE_UNOWNED_S = 6 * 3600  # a directory whose owner cannot be read is stale after this long


class EngineClient(EngineLink):
    """An engine in its own process, over ZeroMQ."""

    def __init__(
        self,
        engine_id: str,
        spec: dict[str, Any],
        *,
        on_state: Callable[[bool], None] | None = None,
        on_stats: Callable[[dict[str, Any]], None] | None = None,
        on_give_up: Callable[[str], None] | None = None,
        max_restarts: int = 3,
        restart_window_s: float = 600.0,
        heartbeat_s: float = 1.0,
        unresponsive_s: float = 30.0,
        hung_s: float = 120.0,
    ):
        super().__init__(on_stats)
        self.id = engine_id
        self.spec = spec
        self.on_state = on_state
        self.on_give_up = on_give_up
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self.heartbeat_s = heartbeat_s
        self.unresponsive_s = unresponsive_s
        self.hung_s = hung_s
        self.restarts: list[float] = []
        # starting | serving | unresponsive | restarting | failed | stopped
        self.state = "starting"
        self.last_heard = time.monotonic()  # when the engine last sent anything
        self.hangs = 0  # engines killed by the watchdog (introspection, tests)
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._push: Any = None
        self._pull: Any = None
        self._recv_task: asyncio.Task[None] | None = None
        self._watchdog_task: asyncio.Task[None] | None = None
        self._ready_fut: asyncio.Future[dict[str, Any]] | None = None
        self._stopping = False
        self._restart_task: asyncio.Task[None] | None = None
        self._pings = itertools.count(1)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def not_serving_reason(self) -> str:
        if self.state == "unresponsive":
            return (
                f"its engine process has not answered for {time.monotonic() - self.last_heard:.0f} s "
                f"(it is restarted after {self.hung_s:.0f} s); retry shortly or on another replica"
            )
        if self.state == "failed":
            return (
                f"its engine process failed {self.max_restarts + 1} times within "
                f"{self.restart_window_s:.0f} s and is no longer restarted; this server cannot serve "
                "the model until it is restarted (retry on another replica)"
            )
        if self.state == "stopped":
            return "the server is shutting down; retry on another replica"
        return super().not_serving_reason

    # lifecycle -------------------------------------------------------------------------------
    async def start(self) -> dict[str, Any]:
        """Spawn the engine and wait until its weights are loaded; ConfigError if they cannot be."""
        self._loop = asyncio.get_running_loop()
        self._ctx = zmq.asyncio.Context()
        self._dir = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{self.id}-")
        Path(self._dir, _PID_FILE).write_text(str(os.getpid()))
        inbox, outbox = f"ipc://{self._dir}/in", f"ipc://{self._dir}/out"
        self._push = self._ctx.socket(zmq.PUSH)
        self._pull = self._ctx.socket(zmq.PULL)
        for s in (self._push, self._pull):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 0)
            s.setsockopt(zmq.RCVHWM, 0)
        self._push.bind(inbox)
        self._pull.bind(outbox)
        spec_file = os.path.join(self._dir, "spec.json")
        with open(spec_file, "w") as f:
            json.dump(self.spec, f)
        self._recv_task = self._loop.create_task(self._receive(), name=f"engine-{self.id}-recv")
        self.info = await self._spawn(spec_file, inbox, outbox)
        self._watchdog_task = self._loop.create_task(self._watchdog(), name=f"engine-{self.id}-watchdog")
        return self.info

    def remember_adapter(self, model: str, name: str, path: str | None) -> None:
        for m in self.spec["models"]:
            if m["name"] == model:
                adapters = m.setdefault("adapters", {})
                if path is None:
                    adapters.pop(name, None)
                else:
                    adapters[name] = path
        if self._dir is not None:
            with open(os.path.join(self._dir, "spec.json"), "w") as f:
                json.dump(self.spec, f)

    async def _spawn(self, spec_file: str, inbox: str, outbox: str) -> dict[str, Any]:
        assert self._loop is not None
        self._ready_fut = self._loop.create_future()
        cmd = [sys.executable, "-m", "bitserve.engine.core", "--spec", spec_file, "--inbox", inbox]
        self._proc = subprocess.Popen([*cmd, "--outbox", outbox], stdin=subprocess.DEVNULL)
        proc = self._proc
        threading.Thread(
            target=self._watch, args=(proc,), name=f"engine-{self.id}-watch", daemon=True
        ).start()
        info = await self._ready_fut
        self.last_heard = time.monotonic()
        self.state = "serving"
        self.ready = True
        log.info("engine %s (pid %d) ready", self.id, proc.pid)
        return info

    def _watch(self, proc: subprocess.Popen[bytes]) -> None:
        rc = proc.wait()
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._exited, proc, rc)

    def _exited(self, proc: subprocess.Popen[bytes], rc: int) -> None:
        if proc is not self._proc:
            return
        fut = self._ready_fut
        if fut is not None and not fut.done():
            fut.set_exception(ConfigError(f"engine process exited with code {rc} while loading"))
            return
        if self._stopping:
            return
        was_serving = self.state == "serving"
        self.ready = False
        self.state = "restarting"
        log.error(
            "engine %s (pid %d) exited with code %d; failing its %d requests",
            self.id,
            proc.pid,
            rc,
            len(self._sinks) + len(self._futures),
        )
        self._fail_all(
            Unavailable(f"the engine process serving this model exited (code {rc}); retry shortly")
        )
        if self.on_state is not None and was_serving:  # an unresponsive one is NOT_SERVING already
            self.on_state(False)
        assert self._loop is not None
        self._restart_task = self._loop.create_task(self._restart())

    async def _restart(self) -> None:
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < self.restart_window_s]
        while len(self.restarts) < self.max_restarts and not self._stopping:
            delay = 0.5 * 2 ** len(self.restarts)
            self.restarts.append(time.monotonic())
            await asyncio.sleep(delay)
            try:
                assert self._dir is not None
                d = self._dir
                await self._spawn(os.path.join(d, "spec.json"), f"ipc://{d}/in", f"ipc://{d}/out")
            except Exception as e:
                log.error("engine %s restart failed: %s", self.id, e)
                continue
            if self.on_state is not None:
                self.on_state(True)
            return
        if self._stopping:
            return
        self.state = "failed"
        message = (
            f"engine {self.id}: {self.max_restarts} restarts within {self.restart_window_s:.0f} s "
            "used up; giving up (its models stay NOT_SERVING until the server is restarted)"
        )
        log.error("%s", message)
        if self.on_give_up is not None:
            self.on_give_up(message)

    async def _watchdog(self) -> None:
        """Ping the engine; mark it unresponsive, and kill it when it stays silent (see the
        module's docstring). A dead one is the exit watcher's, not this loop's."""
        while not self._stopping:
            await asyncio.sleep(self.heartbeat_s)
            if self.state not in ("serving", "unresponsive"):
                continue
            with contextlib.suppress(Exception):
                self._send([P.PING, next(self._pings)])
            if self._pull.get(zmq.EVENTS) & zmq.POLLIN:
                # Answers are waiting (this loop was busy elsewhere): the engine is alive.
                self.last_heard = time.monotonic()
            silent = time.monotonic() - self.last_heard
            if self.state == "serving" and silent >= self.unresponsive_s:
                self.state = "unresponsive"
                self.ready = False
                log.error(
                    "engine %s (pid %s) has not answered for %.1f s: NOT_SERVING (killed after %.0f s)",
                    self.id,
                    self.pid,
                    silent,
                    self.hung_s,
                )
                if self.on_state is not None:
                    self.on_state(False)
            elif self.state == "unresponsive" and silent < self.unresponsive_s:
                self.state = "serving"
                self.ready = True
                log.warning("engine %s answers again: SERVING", self.id)
                if self.on_state is not None:
                    self.on_state(True)
            elif self.state == "unresponsive" and silent >= self.hung_s:
                proc = self._proc
                if proc is not None and proc.poll() is None:
                    log.error("engine %s (pid %d) silent for %.1f s: killing it", self.id, proc.pid, silent)
                    self.hangs += 1
                    proc.kill()  # the exit watcher fails its requests and restarts it
                    self.state = "restarting"

    async def stop(self, timeout: float = 30.0) -> None:
        """Let the engine finish what it accepted (the front stops sending first), then end it."""
        self._stopping = True
        self.ready = False
        self.state = "stopped"
        for task in (self._restart_task, self._watchdog_task):
            if task is not None:
                task.cancel()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(Exception):
                self._send([P.SHUTDOWN])
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if proc.poll() is None:
                log.warning("engine %s did not stop in %.0f s; killing it", self.id, timeout)
                proc.kill()
                await asyncio.to_thread(proc.wait)
        self._fail_all(Unavailable("the server is shutting down"))
        if self._recv_task is not None:
            self._recv_task.cancel()
            with contextlib.suppress(BaseException):
                await self._recv_task
        for s in (self._push, self._pull):
            if s is not None:
                s.close(linger=0)
        if self._ctx is not None:
            self._ctx.term()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def _send(self, msg: list[Any]) -> None:
        self._push.send(P.pack(msg))

    # receiving -------------------------------------------------------------------------------
    async def _receive(self) -> None:
        pull = self._pull
        while True:
            batch = [await pull.recv()]
            while True:
                try:
                    batch.append(pull.recv(zmq.NOBLOCK).result())
                except zmq.Again:
                    break
            self.last_heard = now = time.monotonic()
            self._dispatch_all([P.unpack(d) for d in batch], now)

    def _control(self, msg: list[Any]) -> None:
        op = msg[0]
        if op == P.READY:
            if self._ready_fut is not None and not self._ready_fut.done():
                self._ready_fut.set_result(msg[1])
        elif op == P.FAILED:
            if self._ready_fut is not None and not self._ready_fut.done():
                self._ready_fut.set_exception(ConfigError(msg[1]))
        # P.PONG: its arrival (last_heard) is all it says


def sweep_stale_dirs(tmp: str | None = None, *, now: float | None = None) -> list[str]:
    """Remove engine directories left by a front that is gone (killed with -9: no clean-up ran).
    A directory is stale when the front named in it no longer runs, or, when it names none (or
    cannot be read), once it is STALE_UNOWNED_S old. Returns the paths removed."""
    root = Path(tmp or tempfile.gettempdir())
    now = time.time() if now is None else now
    removed = []
    for d in root.glob(f"{DIR_PREFIX}e*"):
        try:
            if not d.is_dir() or d.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        try:
            owner: int | None = int((d / _PID_FILE).read_text().strip())
        except (OSError, ValueError):
            owner = None
        if owner is not None:
            stale = not _alive(owner)
        else:
            try:
                stale = now - d.stat().st_mtime > STALE_UNOWNED_S
            except OSError:
                continue
        if stale:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    if removed:
        log.info("removed %d stale engine directories: %s", len(removed), ", ".join(removed))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def resident_bytes(pid: int) -> int | None:
    """VmRSS of a process (Linux /proc), or None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class EngineMemoryCollector:
    """`bitserve_engine_resident_memory_bytes{engine}`: each engine process's RSS, read at
    scrape time (the front's own is `process_resident_memory_bytes`)."""

    def __init__(self, cores: list[EngineClient]):
        self.cores = cores

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        g = GaugeMetricFamily(
            "bitserve_engine_resident_memory_bytes",
            "Resident memory of each engine process (the weights it owns and their work).",
            labels=["engine"],
        )
        for core in self.cores:
            pid = core.pid
            rss = resident_bytes(pid) if pid is not None else None
            if rss is not None:
                g.add_metric([core.id], rss)
        yield g

    def describe(self) -> Any:
        return []
