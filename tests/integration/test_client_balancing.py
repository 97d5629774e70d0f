"""Client targets, round-robin over several servers, and retries of UNAVAILABLE, on real servers.

Two servers on loopback serve the same tiny checkpoint under different model names, so the name
a ListModels answer carries says which server took the call.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from concurrent import futures

import grpc
import pytest

from bitserve_client import AsyncClient, Client, UnavailableError
from bitserve_client.channel import target_of
from bitserve_proto.v1 import inference_pb2 as pb
from tests.conftest import start_server


@pytest.fixture
def pair(tiny_models):
    servers = [
        start_server([{"name": name, "task": "generate", "path": str(tiny_models["lm"])}], metrics_port=-1)
        for name in ("a", "b")
    ]
    running = list(servers)
    yield servers, running
    for s in running:
        s.stop()


def _which(client: Client, n: int) -> Counter:
    return Counter(client.list_models()[0].name for _ in range(n))


def test_target_of_lists_and_uris():
    assert target_of("localhost:50051") == "localhost:50051"
    assert target_of("dns:///bitserve.internal:50051") == "dns:///bitserve.internal:50051"
    assert target_of(["127.0.0.1:5001", "127.0.0.2:5002"]) == "ipv4:127.0.0.1:5001,127.0.0.2:5002"
    assert target_of(["[::1]:5001", "[::1]:5002"]) == "ipv6:[::1]:5001,[::1]:5002"
    assert target_of(["localhost:5001"]) == "ipv4:127.0.0.1:5001"
    with pytest.raises(ValueError, match="cannot mix IPv4 and IPv6"):
        target_of(["127.0.0.1:1", "[::1]:2"])
    with pytest.raises(ValueError, match="must be host:port"):
        target_of(["127.0.0.1"])
    with pytest.raises(ValueError, match="at least one address"):
        target_of([])


def test_a_list_of_addresses_spreads_calls_over_every_server(pair):
    (a, b), _ = pair
    with Client([a.target, b.target], timeout=30) as c:
        counts = _which(c, 20)
        gens = [c.generate("Hello world", max_new_tokens=3).text for _ in range(4)]
    # round_robin alternates between ready servers: each gets half, give or take connection start-up
    assert set(counts) == {"a", "b"} and min(counts.values()) >= 6, counts
    assert len(set(gens)) == 1  # same checkpoint behind both: same greedy answer


def test_calls_survive_one_server_stopping(pair):
    (a, b), running = pair
    with Client([a.target, b.target], timeout=30) as c:
        assert set(_which(c, 10)) == {"a", "b"}
        a.stop()
        running.remove(a)
        # every call succeeds: those that meet the stopped server fail UNAVAILABLE and are retried
        assert _which(c, 20) == Counter({"b": 20})
        assert c.generate("Hello world", max_new_tokens=3).tokens == 3


def test_without_retries_a_stopped_server_is_an_unavailable_error(pair):
    (a, b), running = pair
    b.stop()
    running.remove(b)
    with Client([b.target], timeout=10, service_config={}) as c, pytest.raises(UnavailableError):
        c.list_models()


async def test_async_client_balances_and_retries_too(pair):
    (a, b), running = pair
    async with AsyncClient([a.target, b.target], timeout=30) as c:
        names = Counter([(await c.list_models())[0].name for _ in range(20)])
        assert set(names) == {"a", "b"}, names
        await asyncio.get_running_loop().run_in_executor(None, b.stop)
        running.remove(b)
        names = Counter([(await c.list_models())[0].name for _ in range(20)])
        assert names == Counter({"a": 20})


def test_a_dns_target_reaches_the_server(pair):
    (a, _), _ = pair
    with Client(f"dns:///localhost:{a.port}", timeout=30) as c:
        assert c.list_models()[0].name == "a"


class _Flaky:
    """A stand-in Inference server whose calls fail UNAVAILABLE the first `fail` times."""

    def __init__(self, fail: int, stream_sends_first: bool = False):
        self.fail, self.stream_sends_first, self.attempts = fail, stream_sends_first, Counter()
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        handlers = {
            "ListModels": grpc.unary_unary_rpc_method_handler(
                self.list_models,
                request_deserializer=pb.ListModelsRequest.FromString,
                response_serializer=pb.ListModelsResponse.SerializeToString,
            ),
            "GenerateStream": grpc.unary_stream_rpc_method_handler(
                self.generate_stream,
                request_deserializer=pb.GenerateRequest.FromString,
                response_serializer=pb.GenerateStreamResponse.SerializeToString,
            ),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("bitserve.v1.Inference", handlers),)
        )
        self.target = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def _attempt(self, method: str) -> bool:
        self.attempts[method] += 1
        return self.attempts[method] <= self.fail

    def list_models(self, request, context):
        if self._attempt("ListModels"):
            context.abort(grpc.StatusCode.UNAVAILABLE, "not yet")
        return pb.ListModelsResponse(models=[pb.ModelInfo(name="flaky")])

    def generate_stream(self, request, context):
        failing = self._attempt("GenerateStream")
        if failing and self.stream_sends_first:
            yield pb.GenerateStreamResponse(text="first")
        if failing:
            context.abort(grpc.StatusCode.UNAVAILABLE, "gone mid-stream")
        yield pb.GenerateStreamResponse(text="ok", final=pb.Generation(text="ok"))


@pytest.fixture
def flaky():
    made = []

    def make(fail, **kw):
        made.append(_Flaky(fail, **kw))
        return made[-1]

    yield make
    for f in made:
        f.server.stop(None)


def test_unavailable_is_retried_with_backoff_up_to_four_attempts(flaky):
    srv = flaky(3)
    with Client(srv.target, timeout=30) as c:
        assert c.list_models()[0].name == "flaky"
    assert srv.attempts["ListModels"] == 4
    srv = flaky(4)  # one failure more than the policy allows: the caller sees it
    with Client(srv.target, timeout=30) as c, pytest.raises(UnavailableError, match="not yet"):
        c.list_models()
    assert srv.attempts["ListModels"] == 4


def test_service_config_replaces_the_default_policy(flaky):
    srv = flaky(1)
    with Client(srv.target, timeout=30, service_config={}) as c, pytest.raises(UnavailableError):
        c.list_models()
    assert srv.attempts["ListModels"] == 1


def test_a_stream_is_retried_before_its_first_message_never_after(flaky):
    srv = flaky(1)
    with Client(srv.target, timeout=30) as c:
        assert [e.text for e in c.generate_stream("hi")] == ["ok"]
    assert srv.attempts["GenerateStream"] == 2
    srv = flaky(1, stream_sends_first=True)
    with Client(srv.target, timeout=30) as c:
        got = []
        with pytest.raises(UnavailableError, match="gone mid-stream"):
            for e in c.generate_stream("hi"):
                got.append(e.text)
    assert got == ["first"] and srv.attempts["GenerateStream"] == 1
