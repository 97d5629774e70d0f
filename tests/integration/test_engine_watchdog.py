"""The engine watchdog (issue 17): an engine process that hangs is seen, NOT_SERVING, killed and
restarted; one that used up its restarts says so, stays NOT_SERVING, and can end the server."""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bitserve_client import Client, UnavailableError

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
# Test-sized watchdog: pinged every 0.2 s, NOT_SERVING after 1.5 s of silence, killed after 4 s.
WATCHDOG = {"engine_heartbeat_s": 0.2, "engine_unresponsive_s": 1.5, "engine_hung_s": 4.0}


def _health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as ch:
        return (
            health_pb2_grpc.HealthStub(ch)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            .status
        )


def _wait_for(cond, timeout: float, step: float = 0.02) -> float | None:
    """Seconds until `cond()` held, or None if it did not within `timeout`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(step)
    return None


@pytest.fixture(scope="module")
def srv(server_factory, tiny_models):
    return server_factory(
        [
            {"name": "lm", "task": "generate", "path": str(tiny_models["lm"])},
            {"name": "sent", "task": "sentiment", "path": str(tiny_models["sentiment"])},
        ],
        **WATCHDOG,
    )


def test_a_stopped_engine_turns_not_serving_then_is_killed_and_restarted(srv):
    core = srv.server.registry._engines["lm"].core
    old_pid = core.pid
    with Client(srv.target, timeout=60) as c:
        assert c.generate("warm up", model="lm", max_new_tokens=2).tokens == 2
        assert _health(srv.target, "lm") == SERVING
        os.kill(old_pid, signal.SIGSTOP)
        try:
            # Silent for engine_unresponsive_s, seen at the next ping: NOT_SERVING. The slack
            # (one heartbeat + 1.5 s) is for a machine loaded by other work; main stays SERVING.
            seen = _wait_for(lambda: _health(srv.target, "lm") == NOT_SERVING, 10)
            assert seen is not None, "a stopped engine must turn NOT_SERVING"
            assert seen < 1.5 + 0.2 + 1.5, seen
            assert _health(srv.target, "") == NOT_SERVING
            with pytest.raises(UnavailableError, match="has not answered for"):
                c.generate("while it hangs", model="lm", max_new_tokens=2)
            # The other engine never noticed.
            assert _health(srv.target, "sent") == SERVING
            assert c.sentiment("I love it", model="sent").label in {"positive", "negative"}
            # Still silent at engine_hung_s: killed (SIGKILL reaches a stopped process) and restarted.
            back = _wait_for(lambda: core.pid != old_pid and core.ready, 60)
            assert back is not None, "a hung engine must be killed and restarted"
        finally:
            with_suppress_kill(old_pid)
        assert core.hangs == 1
        assert _wait_for(lambda: _health(srv.target, "lm") == SERVING, 30) is not None
        assert _health(srv.target, "") == SERVING
        assert c.generate("after the restart", model="lm", max_new_tokens=3).tokens == 3


def test_an_engine_that_answers_again_is_serving_again_without_a_restart(srv):
    core = srv.server.registry._engines["sent"].core
    pid = core.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        assert _wait_for(lambda: _health(srv.target, "sent") == NOT_SERVING, 10) is not None
    finally:
        os.kill(pid, signal.SIGCONT)
    assert _wait_for(lambda: _health(srv.target, "sent") == SERVING, 10) is not None
    assert core.pid == pid and core.hangs == 0
    with Client(srv.target, timeout=60) as c:
        assert c.sentiment("I love it", model="sent").label in {"positive", "negative"}


def with_suppress_kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def test_an_engine_out_of_restarts_says_it_gave_up_and_can_end_the_server(server_factory, tiny_models):
    srv = server_factory(
        [{"name": "lm", "task": "generate", "path": str(tiny_models["lm"])}],
        engine_max_restarts=0,
        exit_on_engine_failure=True,
        **WATCHDOG,
    )
    serving = asyncio.run_coroutine_threadsafe(srv.server.serve_until(asyncio.Event()), srv.loop)
    core = srv.server.registry._engines["lm"].core
    os.kill(core.pid, signal.SIGKILL)
    assert _wait_for(lambda: core.state == "failed", 30) is not None
    with Client(srv.target, timeout=60) as c:
        with pytest.raises(UnavailableError) as e:
            c.generate("hello", model="lm", max_new_tokens=2)
    assert "is no longer restarted" in e.value.message and "retry shortly" not in e.value.message
    assert _health(srv.target, "lm") == NOT_SERVING and _health(srv.target, "") == NOT_SERVING
    from bitserve.ipc.client import EngineGaveUp

    with pytest.raises(EngineGaveUp, match="giving up"):
        serving.result(30)


def test_stale_engine_dirs_are_swept_and_live_ones_kept(tmp_path):
    from bitserve.ipc.client import STALE_UNOWNED_S, sweep_stale_dirs

    dead = tmp_path / "bitserve-e0-lm-dead"
    live = tmp_path / "bitserve-e0-lm-live"
    old_unowned = tmp_path / "bitserve-e1-x-old"
    new_unowned = tmp_path / "bitserve-e1-x-new"
    other = tmp_path / "bitserve-cache"  # not an engine directory
    for d in (dead, live, old_unowned, new_unowned, other):
        d.mkdir()
        (d / "spec.json").write_text("{}")
    (dead / "front.pid").write_text(str(_a_dead_pid()))
    (live / "front.pid").write_text(str(os.getpid()))
    old = time.time() - STALE_UNOWNED_S - 60
    os.utime(old_unowned, (old, old))
    removed = sweep_stale_dirs(str(tmp_path))
    assert sorted(removed) == sorted([str(dead), str(old_unowned)])
    assert live.exists() and new_unowned.exists() and other.exists()


def _a_dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_the_server_sweeps_at_start(server_factory, tiny_models):
    stale = Path(tempfile.mkdtemp(prefix="bitserve-e9-gone-"))
    (stale / "front.pid").write_text(str(_a_dead_pid()))
    server_factory([{"name": "s", "task": "sentiment", "path": str(tiny_models["sentiment"])}])
    assert not stale.exists()
