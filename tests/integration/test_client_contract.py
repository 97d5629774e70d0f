"""Versions: the server reports its release and contract revision; a client refuses to send a
field that the server's (older) contract does not have, instead of the server dropping it.

The "older server" is a stub servicer speaking revision 1 (ListModels without the version
fields, as every server before revision 2 answers). The tests here mark a revision-1 field
(`logprobs`) as newer through the one seam that reads the `since` marks, `contract.field_since`;
the client's real revision-3 options (n, top_logprobs, logit_bias, the constraints) are refused
the same way in test_client_options.py.
"""

from __future__ import annotations

import asyncio
from concurrent import futures

import grpc
import pytest

import bitserve
from bitserve_client import (
    CONTRACT_REVISION,
    AsyncClient,
    Client,
    IncompatibleServerError,
    ServerInfo,
    contract,
)
from bitserve_proto.v1 import inference_pb2 as pb
from bitserve_proto.v1 import inference_pb2_grpc as pb_grpc


class OldServer(pb_grpc.InferenceServicer):
    """Revision 1: ListModels reports no version; Generate echoes the prompt."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def ListModels(self, request, context):
        self.calls.append("ListModels")
        return pb.ListModelsResponse(models=[pb.ModelInfo(name="lm", task=pb.TASK_GENERATE)])

    def Generate(self, request, context):
        self.calls.append("Generate")
        return pb.GenerateResponse(
            generations=[pb.Generation(text=t, generated_tokens=1) for t in request.texts]
        )


@pytest.fixture
def old_server():
    servicer = OldServer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_InferenceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(0)


@pytest.fixture
def logprobs_is_newer(monkeypatch):
    """GenerationParameters.logprobs as if revision 3 had added it."""
    real = contract.field_since
    monkeypatch.setattr(
        contract,
        "field_since",
        lambda f: 3 if f.full_name == "bitserve.v1.GenerationParameters.logprobs" else real(f),
    )


@pytest.fixture(scope="module")
def srv(server_factory, tiny_models):
    return server_factory([{"name": "lm", "task": "generate", "path": str(tiny_models["lm"])}])


def test_the_server_reports_its_version_and_contract_revision(srv):
    with Client(srv.target, timeout=60) as c:
        assert c.server_info() == ServerInfo(
            version=bitserve.__version__, contract_revision=CONTRACT_REVISION
        )
    assert CONTRACT_REVISION == pb.DESCRIPTOR.GetOptions().Extensions[pb.contract_revision] == 5


def test_an_adapter_or_an_admin_call_to_an_older_server_fails_before_it_is_sent(old_server):
    target, servicer = old_server
    with Client(target, timeout=10) as c:
        with pytest.raises(IncompatibleServerError, match=r"GenerateRequest\.adapter \(revision 4\)"):
            c.generate("hi", adapter="a")
        with pytest.raises(IncompatibleServerError, match=r"LoadAdapter \(revision 4\)"):
            c.load_adapter("lm", "a", "/x")
    assert servicer.calls == ["ListModels"]


@pytest.mark.parametrize("revision", [1, 4])
def test_an_adapter_on_classify_sentiment_translate_to_an_older_server_fails_before_it_is_sent(
    old_server, monkeypatch, revision
):
    """Revision 5 added the adapter to the other tasks: a revision-4 server (which takes it on
    generate) would drop it there and answer with the base model."""
    target, servicer = old_server
    real = servicer.ListModels
    monkeypatch.setattr(
        servicer,
        "ListModels",
        lambda r, ctx: (real(r, ctx), pb.ListModelsResponse(contract_revision=revision))[1],
    )
    with Client(target, timeout=10) as c:
        for call, field in (
            (lambda: c.classify("hi", adapter="a"), "ClassifyRequest"),
            (lambda: c.sentiment("hi", adapter="a"), "SentimentRequest"),
            (lambda: c.translate("hi", target_lang="fr", adapter="a"), "TranslateRequest"),
        ):
            with pytest.raises(IncompatibleServerError, match=rf"{field}\.adapter \(revision 5\)"):
                call()
    assert servicer.calls == ["ListModels"]


def test_a_server_from_before_versions_reads_as_revision_1(old_server):
    target, _ = old_server
    with Client(target, timeout=10) as c:
        assert c.server_info() == ServerInfo(version="unknown", contract_revision=1)


def test_a_call_with_only_revision_1_fields_never_asks_the_server(old_server, logprobs_is_newer):
    target, servicer = old_server
    with Client(target, timeout=10) as c:
        assert c.generate("hi", max_new_tokens=2).text == "hi"
    assert servicer.calls == ["Generate"]


def test_a_newer_field_to_an_older_server_fails_before_it_is_sent(old_server, logprobs_is_newer):
    target, servicer = old_server
    with Client(target, timeout=10) as c:
        for _ in range(2):
            with pytest.raises(IncompatibleServerError) as e:
                c.generate("hi", logprobs=True)
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
            msg = e.value.message
            assert f"the server at {target} (bitserve unknown) speaks contract revision 1" in msg
            assert "GenerateRequest.parameters.logprobs (revision 3)" in msg
            assert f"speaks revision {CONTRACT_REVISION}" in msg and "leave those fields unset" in msg
        with pytest.raises(IncompatibleServerError):
            list(c.generate_stream("hi", logprobs=True))
        assert c.generate("hi").text == "hi"  # the same client still sends what the server knows
    # The revision was asked once; the refused calls never reached the server.
    assert servicer.calls == ["ListModels", "Generate"]


def test_the_async_face_refuses_the_same_call(old_server, logprobs_is_newer):
    target, servicer = old_server

    async def go() -> str:
        async with AsyncClient(target, timeout=10) as c:
            with pytest.raises(IncompatibleServerError, match=r"parameters\.logprobs \(revision 3\)"):
                await c.generate("hi", logprobs=True)
            return (await c.generate("hi")).text

    assert asyncio.run(go()) == "hi"
    assert servicer.calls == ["ListModels", "Generate"]


def test_a_newer_field_to_a_server_that_knows_it_is_sent(srv, monkeypatch):
    real = contract.field_since
    monkeypatch.setattr(
        contract,
        "field_since",
        lambda f: (
            CONTRACT_REVISION if f.full_name == "bitserve.v1.GenerationParameters.logprobs" else real(f)
        ),
    )
    with Client(srv.target, timeout=60) as c:
        g = c.generate("Hello", max_new_tokens=3, logprobs=True)
    assert len(g.logprobs) == g.tokens == 3
