"""An engine on a thread of this process, over in-memory queues: the same `Core` loop and the
same routing as an engine process, without the process. For engine-level tests (no spawn, the
scheduler inspectable) and debugging; the server always uses processes."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from typing import Any

from bitserve.engine.core import Core
from bitserve.engine.workers import Workers
from bitserve.ipc import protocol as P
from bitserve.ipc.client import EngineLink


class LocalEngine(EngineLink):
    def __init__(self, workers: Workers, on_stats: Any = None):
        super().__init__(on_stats)
        self.workers = workers
        self._inbox: queue.Queue[bytes] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._alive = True

    @property
    def scheduler(self) -> Any:
        return self.workers.scheduler

    async def start(self) -> dict[str, Any]:
        self._loop = loop = asyncio.get_running_loop()
        core = Core(self.workers, lambda msg: self._deliver(loop, msg))

        def recv(timeout_ms: int) -> list[list[Any]]:
            out: list[list[Any]] = []
            try:
                out.append(P.unpack(self._inbox.get(timeout=timeout_ms / 1000)))
            except queue.Empty:
                return out
            while True:
                try:
                    out.append(P.unpack(self._inbox.get_nowait()))
                except queue.Empty:
                    return out

        def run() -> None:
            import torch

            with torch.inference_mode():
                core.serve(recv, lambda: self._alive)

        self._thread = threading.Thread(target=run, name="local-engine", daemon=True)
        self._thread.start()
        self.info = self.workers.info()
        self.ready = True
        return self.info

    def _deliver(self, loop: asyncio.AbstractEventLoop, msg: list[Any]) -> None:
        data = P.unpack(P.pack(msg))  # what would cross the process boundary, exactly
        loop.call_soon_threadsafe(self._dispatch_all, [data], time.monotonic())

    def _send(self, msg: list[Any]) -> None:
        self._inbox.put(P.pack(msg))

    async def stop(self, timeout: float = 30.0) -> None:
        self.ready = False
        self._inbox.put(P.pack([P.SHUTDOWN]))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)
        self._alive = False
