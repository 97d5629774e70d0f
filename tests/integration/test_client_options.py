"""The Python client's revision-3 options through a real server: n, top_logprobs, logit_bias and
the constraints (json_schema, json_object, regex, choice, grammar) on generate, generate_stream,
chat and chat_stream, read back into typed results (lists of Generations, `TokenLogprob.top`);
and the same options refused before they are sent to a server that speaks an older revision."""

from __future__ import annotations

import asyncio
import json
import re
from concurrent import futures

import grpc
import jsonschema
import pytest

from bitserve_client import AsyncClient, Client, Generation, IncompatibleServerError, TopLogprob
from bitserve_proto.v1 import inference_pb2 as pb
from bitserve_proto.v1 import inference_pb2_grpc as pb_grpc

SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}},
    "required": ["n", "ok"],
    "additionalProperties": False,
}
CHAT = [{"role": "user", "content": "Say something"}]


@pytest.fixture(scope="module")
def target(server_factory, tiny_chat_lm):
    return server_factory([{"name": "lm", "task": "generate", "path": str(tiny_chat_lm)}]).target


@pytest.fixture(scope="module")
def c(target):
    with Client(target, timeout=300) as client:
        yield client


def ids(g: Generation) -> list[int]:
    return [t.id for t in g.logprobs]


def streamed(events) -> tuple[str, Generation]:
    events = list(events)
    assert events[-1].final is not None
    return "".join(e.text for e in events), events[-1].final


def test_n_gives_n_generations_per_prompt_each_equal_to_its_seeded_single_call(c):
    opts = {"max_new_tokens": 8, "temperature": 1.0, "seed": 21, "logprobs": True}
    three = c.generate("Hello world", n=3, **opts)
    assert isinstance(three, list) and len(three) == 3
    for j, g in enumerate(three):
        assert ids(g) == ids(c.generate("Hello world", **{**opts, "seed": 21 + j})), j
    assert len({tuple(ids(g)) for g in three}) > 1
    per_text = c.generate(["Hello world", "I love"], n=2, **opts)
    assert [len(gs) for gs in per_text] == [2, 2]
    assert [ids(g) for g in per_text[0]] == [ids(g) for g in three[:2]]
    replies = c.chat(CHAT, n=2, **opts)
    assert len(replies) == 2 and all(isinstance(g, Generation) for g in replies)
    assert ids(replies[1]) == ids(c.chat(CHAT, **{**opts, "seed": 22}))
    assert isinstance(c.chat(CHAT, max_new_tokens=2), Generation)  # n = 1: one reply, as before


def test_top_logprobs_come_back_typed_best_first_in_unary_and_stream(c):
    g = c.generate("Hello world", max_new_tokens=5, top_logprobs=4)
    assert len(g.logprobs) == 5
    for t in g.logprobs:
        assert len(t.top) == 4 and all(isinstance(a, TopLogprob) for a in t.top)
        lps = [a.logprob for a in t.top]
        assert lps == sorted(lps, reverse=True)
        assert t.top[0].id == t.id and t.top[0].logprob == pytest.approx(t.logprob)  # greedy
    _, final = streamed(c.generate_stream("Hello world", max_new_tokens=5, top_logprobs=4))
    events = list(c.chat_stream(CHAT, max_new_tokens=3, top_logprobs=2))
    assert all(len(t.top) == 2 for e in events for t in e.tokens)
    assert [[a.id for a in t.top] for t in final.logprobs] == [[a.id for a in t.top] for t in g.logprobs]


def test_logit_bias_bans_and_forces_tokens(c):
    free = c.generate("Hello world", max_new_tokens=6, logprobs=True)
    banned = set(ids(free))
    g = c.generate("Hello world", max_new_tokens=6, logprobs=True, logit_bias={t: -100 for t in banned})
    assert not banned & set(ids(g))
    forced = ids(free)[0] + 1
    g = c.generate("Hello world", max_new_tokens=4, logprobs=True, logit_bias={forced: 100})
    assert ids(g) == [forced] * 4
    replies = c.chat(CHAT, max_new_tokens=3, logprobs=True, logit_bias={forced: 100}, n=2)
    assert [ids(r) for r in replies] == [[forced] * 3] * 2


def test_constraints_hold_in_generate_stream_and_chat(c):
    sampled = {"max_new_tokens": 60, "temperature": 1.0, "seed": 3}
    g = c.generate("A record:", json_schema=SCHEMA, **sampled)
    assert g.finish_reason == "eos"
    jsonschema.validate(json.loads(g.text), SCHEMA)
    text, final = streamed(c.generate_stream("A record:", json_schema=json.dumps(SCHEMA), **sampled))
    assert text == final.text
    jsonschema.validate(json.loads(text), SCHEMA)
    # Any JSON object: the random model's keys are unbounded, so it may be cut (LENGTH); whole, it parses.
    obj = c.chat(CHAT, json_object=True, **sampled)
    assert obj.text.startswith("{")
    if obj.finish_reason == "eos":
        assert isinstance(json.loads(obj.text), dict)
    else:
        assert obj.finish_reason == "length" and obj.tokens == 60
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", c.generate("Code:", regex=r"[0-9]{3}-[a-z]{2}", **sampled).text)
    for g in c.chat(CHAT, choice=["yes", "no", "maybe"], n=3, **sampled):
        assert g.text in ("yes", "no", "maybe")
    text, _ = streamed(c.chat_stream(CHAT, grammar='root ::= "a" [b-c]+ "d"', **sampled))
    assert re.fullmatch(r"a[b-c]+d", text)


def test_the_async_client_takes_the_same_options(target):
    async def main():
        async with AsyncClient(target, timeout=300) as ac:
            gens = await ac.generate(
                "Hello", n=2, max_new_tokens=4, choice=["up", "down"], temperature=1.0, seed=5
            )
            events = [e async for e in ac.generate_stream("Hello", max_new_tokens=3, top_logprobs=2)]
            return gens, events

    gens, events = asyncio.run(main())
    assert len(gens) == 2 and all(g.text in ("up", "down") for g in gens)
    assert all(len(t.top) == 2 for e in events for t in e.tokens)


def test_bad_options_fail_in_the_client_or_name_the_field(c):
    with pytest.raises(ValueError, match="at most one constraint per call; got json_schema, regex"):
        c.generate("x", json_schema=SCHEMA, regex="a")
    with pytest.raises(TypeError, match="choice must be a list of strings"):
        c.generate("x", choice="yes")
    from bitserve_client import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="parameters.constraint.grammar"):
        c.generate("x", grammar="root ::= x")


class OldServer(pb_grpc.InferenceServicer):
    """Revision 1: ListModels reports no version."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def ListModels(self, request, context):
        self.calls.append("ListModels")
        return pb.ListModelsResponse(models=[pb.ModelInfo(name="lm", task=pb.TASK_GENERATE)])

    def Generate(self, request, context):
        self.calls.append("Generate")
        return pb.GenerateResponse(generations=[pb.Generation(text=t) for t in request.texts])


@pytest.mark.parametrize(
    ("option", "field"),
    [
        ({"n": 2}, "parameters.n"),
        ({"top_logprobs": 2}, "parameters.top_logprobs"),
        ({"logit_bias": {5: 1.0}}, "parameters.logit_bias"),
        ({"json_schema": SCHEMA}, "parameters.constraint"),
        ({"choice": ["a", "b"]}, "parameters.constraint"),
    ],
)
def test_revision_3_options_are_not_sent_to_an_older_server(option, field):
    servicer = OldServer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_InferenceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=30) as old:
            with pytest.raises(
                IncompatibleServerError, match=re.escape(f"GenerateRequest.{field} (revision 3)")
            ):
                old.generate("Hello", **option)
            assert old.generate("Hello", n=1, top_logprobs=0).text == "Hello"  # defaults: revision 1
    finally:
        server.stop(0)
    assert servicer.calls == ["ListModels", "Generate"]
