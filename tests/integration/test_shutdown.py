"""Shutdown a load balancer can observe (issue 9, defect 7): during the grace period health
answers NOT_SERVING, new inference calls get UNAVAILABLE, accepted calls finish."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bitserve.settings import ServerSettings
from bitserve_proto.v1 import inference_pb2 as pb
from bitserve_proto.v1 import inference_pb2_grpc as pb_grpc
from tests.conftest import start_server

_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_default_grace_period_is_kubernetes_30_s():
    assert ServerSettings().grace_period_s == 30.0


def test_grace_period_is_observable_and_accepted_calls_finish(tiny_models):
    srv = start_server([{"name": "sent", "task": "sentiment", "path": str(tiny_models["sentiment"])}])
    eng = srv.server.registry._engines["sent"]
    real = eng.sentiment
    entered = threading.Event()

    async def slow(*a, **kw):
        entered.set()
        await asyncio.sleep(2.0)  # an accepted call still running when shutdown starts
        return await real(*a, **kw)

    eng.sentiment = slow
    ch = grpc.insecure_channel(srv.target)
    stub, health = pb_grpc.InferenceStub(ch), health_pb2_grpc.HealthStub(ch)
    try:
        with ThreadPoolExecutor(1) as pool:
            inflight = pool.submit(stub.Sentiment, pb.SentimentRequest(texts=["good"]), timeout=60)
            assert entered.wait(30)
            t0 = time.monotonic()
            stopping = asyncio.run_coroutine_threadsafe(srv.server.stop(grace=20.0), srv.loop)
            time.sleep(0.3)
            # Within the grace period: the port still answers, and says it is going away.
            for service in ("", "bitserve.v1.Inference", "sent"):
                r = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert r.status == _NOT_SERVING, service
            with pytest.raises(grpc.RpcError) as err:
                stub.Sentiment(pb.SentimentRequest(texts=["new"]), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in err.value.details()
            # The accepted call finishes with its answer.
            assert inflight.result(30).results[0].label in {"positive", "negative"}
            stopping.result(30)
            elapsed = time.monotonic() - t0
        # It stopped once nothing was in flight, not at the end of the 20 s grace period.
        assert elapsed < 10, elapsed
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        ch.close()
        srv.loop.call_soon_threadsafe(srv.loop.stop)
