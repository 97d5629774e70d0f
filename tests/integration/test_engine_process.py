"""The engine process, seen from outside: it owns the weights apart from the gRPC front, dies
without taking the server with it, and never blocks the front's event loop."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bitserve_client import Client, UnavailableError


@pytest.fixture(scope="module")
def srv(server_factory, tiny_models, tmp_path_factory):
    from bitserve.models.tiny import build_causal_lm

    # A long context, so that a generation lasts long enough to be killed in the middle.
    lm = build_causal_lm(tmp_path_factory.mktemp("long") / "lm", max_positions=4096)
    return server_factory(
        [
            {"name": "lm", "task": "generate", "path": str(lm), "max_new_tokens_limit": 4000},
            {"name": "sent", "task": "sentiment", "path": str(tiny_models["sentiment"])},
        ]
    )


def _health(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as ch:
        return (
            health_pb2_grpc.HealthStub(ch)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            .status
        )


def test_each_copy_of_the_weights_lives_in_its_own_process(srv):
    reg = srv.server.registry
    pids = {reg._engines[n].core.pid for n in ("lm", "sent")}
    assert len(pids) == 2 and os.getpid() not in pids
    for pid in pids:
        os.kill(pid, 0)  # alive


def test_killed_engine_fails_its_requests_then_comes_back(srv):
    SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    core = srv.server.registry._engines["lm"].core
    old_pid = core.pid
    with (
        Client(srv.target, timeout=60, service_config={})
        if _takes_service_config()
        else Client(srv.target, timeout=60) as c
    ):
        assert c.generate("warm up", model="lm", max_new_tokens=2).tokens == 2
        errors: list[BaseException] = []
        started = threading.Event()

        def long_call(i: int) -> None:
            try:
                started.set()
                c.generate(f"request {i}", model="lm", max_new_tokens=3000)
            except BaseException as e:  # noqa: BLE001 - collected and checked below
                errors.append(e)

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(long_call, i) for i in range(4)]
            started.wait(10)
            deadline = time.monotonic() + 20
            while core.running < 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert core.running == 4, f"the four calls must be decoding when the engine dies ({errors})"
            os.kill(old_pid, signal.SIGKILL)
            for f in futures:
                f.result(60)
        # Every in-flight call got UNAVAILABLE (none hung, none succeeded, none INTERNAL).
        assert len(errors) == 4 and all(isinstance(e, UnavailableError) for e in errors), errors
        # NOT_SERVING while it restarts (the overall status too), SERVING once it is back.
        seen = set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = _health(srv.target, "lm")
            seen.add(status)
            if status == SERVING and core.ready:
                break
            time.sleep(0.02)
        assert NOT_SERVING in seen and _health(srv.target, "lm") == SERVING
        assert _health(srv.target, "") == SERVING
        assert core.pid != old_pid
        # The other engine never noticed; later requests succeed on the new process.
        assert c.sentiment("I love it", model="sent").label in {"positive", "negative"}
        assert c.generate("after the restart", model="lm", max_new_tokens=3).tokens == 3


def _takes_service_config() -> bool:
    import inspect

    return "service_config" in inspect.signature(Client.__init__).parameters


def test_health_answers_while_a_huge_request_is_tokenized(srv):
    """32 texts x 100k characters: tokenizing them takes seconds, off the event loop. Health
    answers throughout (a frozen loop would take seconds per check; 1 s is a generous bound)."""
    big = ["word " * 20_000] * 32  # 100k characters each
    latencies: list[float] = []
    done = threading.Event()

    def probe() -> None:
        with grpc.insecure_channel(srv.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while not done.is_set():
                t = time.perf_counter()
                stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
                latencies.append(time.perf_counter() - t)
                time.sleep(0.01)

    with Client(srv.target, timeout=300) as c:
        t = threading.Thread(target=probe)
        t.start()
        try:
            with pytest.raises(Exception, match="accepts at most"):  # too long for the tiny model
                c.sentiment(big, model="sent")
        finally:
            done.set()
            t.join()
    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    print(f"\nhealth checks during the request: {len(latencies)}, p99 {p99 * 1000:.1f} ms")
    assert len(latencies) >= 5 and p99 < 1.0


@pytest.mark.slow
def test_compiled_decode_is_ready_before_the_first_request_and_answers_as_eager(
    server_factory, tiny_models, tmp_path
):
    """compile_decode: on compiles in the engine process before READY (the server starts only
    once it is done), and greedy answers equal the eager engine's, prompts of mixed lengths
    joining and leaving one batch."""
    import shutil

    compiled = tmp_path / "lm-compiled"  # its own checkpoint path: its own engine process
    shutil.copytree(tiny_models["lm"], compiled)
    srv = server_factory(
        [
            {"name": "eager", "task": "generate", "path": str(tiny_models["lm"]), "compile_decode": "off"},
            {"name": "compiled", "task": "generate", "path": str(compiled), "compile_decode": "on"},
        ]
    )
    engines = srv.server.registry._engines
    assert engines["compiled"].core.info["compiled_decode"] is True  # compiled before READY
    assert engines["eager"].core.info["compiled_decode"] is False
    prompts = ["Hello world", "The quick brown fox jumps over", "I love", "la maison", "Stock markets fell"]
    with Client(srv.target, timeout=120) as c, ThreadPoolExecutor(len(prompts)) as pool:
        for model in ("eager", "compiled"):
            assert c.generate("warm", model=model, max_new_tokens=2).tokens >= 1

        def answers(model: str) -> list[list[int]]:
            futs = [
                pool.submit(c.generate, p, model=model, max_new_tokens=4 + 5 * i, logprobs=True)
                for i, p in enumerate(prompts)
            ]
            return [[t.id for t in f.result().logprobs] for f in futs]

        assert answers("compiled") == answers("eager")


def test_engine_nice_lowers_the_engine_processes_priority_not_the_fronts(server_factory, tiny_models):
    """server.engine_nice: each engine process adds it to its niceness at start; the front
    (this process) keeps its own, so it gets a core first when both want one."""
    s = server_factory(
        [{"name": "sent", "task": "sentiment", "path": str(tiny_models["sentiment"])}], engine_nice=7
    )
    pid = s.server.registry._engines["sent"].core.pid
    assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 7)
    with Client(s.target) as c:
        assert c.sentiment(["good"])[0].label in ("positive", "negative")
