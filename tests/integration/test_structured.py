"""Constrained decoding and the sampling controls through the real server (gRPC, engine
process), on a tiny random-weight Llama with a real byte-level BPE vocabulary.

The grammar guarantees validity whatever the model says; the schemas drawn here bound every
string, array and integer, so each output is complete well within max_new_tokens and must end
with FINISH_REASON_EOS (a cut one would say LENGTH, and fail the test)."""

from __future__ import annotations

import json
import re

import grpc
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitserve_proto.v1 import inference_pb2 as pb
from bitserve_proto.v1 import inference_pb2_grpc as pb_grpc

# Worst case of a drawn schema: 3 properties x (a key of <= 8 tokens + an object of 3 strings of
# <= 6 characters, each <= 6 tokens as a \\uXXXX escape) ~ 500 tokens; 700 leaves room.
MAX_NEW_TOKENS = 700

names = st.from_regex(r"[a-z]{1,6}", fullmatch=True)
leaf = st.one_of(
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.tuples(st.integers(-50, 50), st.integers(0, 1000)).map(
        lambda t: {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]}
    ),
    st.integers(0, 6).map(lambda k: {"type": "string", "maxLength": k}),
    st.lists(st.one_of(st.integers(-5, 5), names), min_size=1, max_size=4, unique=True).map(
        lambda v: {"enum": v}
    ),
)
array = st.tuples(leaf, st.integers(0, 3)).map(lambda t: {"type": "array", "items": t[0], "maxItems": t[1]})


def objects(values: st.SearchStrategy) -> st.SearchStrategy:
    def with_required(props: dict) -> st.SearchStrategy:
        return st.sets(st.sampled_from(sorted(props))).map(
            lambda req: {
                "type": "object",
                "properties": props,
                "required": sorted(req),
                "additionalProperties": False,
            }
        )

    return st.dictionaries(names, values, min_size=1, max_size=3).flatmap(with_required)


schemas = objects(st.one_of(leaf, array, objects(leaf)))


@pytest.fixture(scope="module")
def stub(server_factory, tiny_chat_lm):
    srv = server_factory([{"name": "lm", "task": "generate", "path": str(tiny_chat_lm)}])
    with grpc.insecure_channel(srv.target) as ch:
        yield pb_grpc.InferenceStub(ch)


def params(**kw) -> pb.GenerationParameters:
    return pb.GenerationParameters(**kw)


def generate(stub, text: str, p: pb.GenerationParameters) -> pb.Generation:
    (g,) = stub.Generate(pb.GenerateRequest(texts=[text], model="lm", parameters=p), timeout=300).generations
    return g


def stream(stub, text: str, p: pb.GenerationParameters) -> tuple[str, pb.Generation]:
    pieces, final = [], None
    for m in stub.GenerateStream(pb.GenerateRequest(texts=[text], model="lm", parameters=p), timeout=300):
        pieces.append(m.text)
        if m.HasField("final"):
            final = m.final
    assert final is not None
    return "".join(pieces), final


def check_valid(schema: dict, g: pb.Generation) -> None:
    assert g.finish_reason == pb.FINISH_REASON_EOS, (g.finish_reason, g.text)
    jsonschema.validate(json.loads(g.text), schema)


def _json_schema_property(stub, schema: dict, seed: int) -> None:
    p = params(
        max_new_tokens=MAX_NEW_TOKENS,
        temperature=1.0,
        seed=seed,
        constraint=pb.Constraint(json_schema=json.dumps(schema)),
    )
    check_valid(schema, generate(stub, "Hello world", p))
    text, final = stream(stub, "The quick brown fox", p)
    assert text == final.text
    check_valid(schema, final)


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(schema=schemas, seed=st.integers(0, 2**32))
def test_sampled_json_follows_any_drawn_schema_unary_and_stream(stub, schema, seed):
    _json_schema_property(stub, schema, seed)


@pytest.mark.slow
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=schemas, seed=st.integers(0, 2**32))
def test_sampled_json_follows_any_drawn_schema_many(stub, schema, seed):
    _json_schema_property(stub, schema, seed)


def test_regex_and_choice_match_in_generate_and_chat_stream(stub):
    pattern = r"[A-Z][a-z]{2,5} [0-9]{1,3}"
    for seed in range(3):
        g = generate(
            stub,
            "Hello",
            params(max_new_tokens=40, temperature=1.0, seed=seed, constraint=pb.Constraint(regex=pattern)),
        )
        assert re.fullmatch(pattern, g.text) and g.finish_reason == pb.FINISH_REASON_EOS
    options = ["Paris", "Lyon", "Le Mans"]
    chat = pb.ChatRequest(
        model="lm",
        messages=[pb.ChatMessage(role="user", content="Pick a city")],
        parameters=params(
            max_new_tokens=20,
            temperature=1.0,
            seed=4,
            constraint=pb.Constraint(choice=pb.Choice(options=options)),
        ),
    )
    msgs = list(stub.ChatStream(chat, timeout=120))
    assert msgs[-1].final.text in options and "".join(m.text for m in msgs) == msgs[-1].final.text


@pytest.mark.parametrize(
    ("constraint", "details"),
    [
        (
            pb.Constraint(json_schema='{"type": "object", "properties": 3}'),
            "parameters.constraint.json_schema: does not compile",
        ),
        (pb.Constraint(json_schema="[1, 2"), "parameters.constraint.json_schema is not valid JSON"),
        (pb.Constraint(grammar="root ::= x"), "parameters.constraint.grammar: does not compile"),
        (pb.Constraint(choice=pb.Choice()), "parameters.constraint.choice must list at least one option"),
    ],
)
def test_bad_constraint_is_invalid_argument_naming_the_field(stub, constraint, details):
    with pytest.raises(grpc.RpcError) as e:
        generate(stub, "Hello", params(max_new_tokens=5, constraint=constraint))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(details), e.value.details()
    assert generate(stub, "Hello", params(max_new_tokens=2)).generated_tokens == 2  # still serving


def test_n_top_logprobs_logit_bias_and_counts_over_grpc(stub, tiny_chat_lm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chat_lm)
    texts = ["Hello world", "I love"]
    r = stub.Generate(
        pb.GenerateRequest(
            texts=texts,
            model="lm",
            parameters=params(max_new_tokens=5, temperature=1.0, seed=3, n=2, top_logprobs=3),
        ),
        timeout=120,
    )
    assert len(r.generations) == 4
    for k, g in enumerate(r.generations):
        assert g.prompt_tokens == len(tok(texts[k // 2])["input_ids"]) and g.generated_tokens == 5
        assert len(g.logprobs) == 5 and all(len(t.top) == 3 for t in g.logprobs)
        assert all(t.top[0].logprob >= t.top[1].logprob >= t.top[2].logprob for t in g.logprobs)
        assert all(t.logprob <= t.top[0].logprob + 1e-6 for t in g.logprobs)  # float32 ties only
    # Completion 1 of a seeded request is the single request with seed + 1.
    single = generate(stub, texts[0], params(max_new_tokens=5, temperature=1.0, seed=4))
    assert r.generations[1].text == single.text
    banned = {t.id for t in r.generations[0].logprobs}
    b = generate(
        stub,
        texts[0],
        params(
            max_new_tokens=5, temperature=1.0, seed=3, logprobs=True, logit_bias={t: -100 for t in banned}
        ),
    )
    assert not banned & {t.id for t in b.logprobs}
    chat = stub.Chat(
        pb.ChatRequest(
            model="lm",
            messages=[pb.ChatMessage(role="user", content="hi")],
            parameters=params(max_new_tokens=4, n=3),
        ),
        timeout=120,
    )
    assert len(chat.generations) == 3 and chat.generations[0] == chat.generation
    _, final = stream(stub, "Hello", params(max_new_tokens=4, top_logprobs=2))
    assert final.generated_tokens == 4 and final.prompt_tokens == len(tok("Hello")["input_ids"])
    assert all(len(t.top) == 2 for t in final.logprobs)
