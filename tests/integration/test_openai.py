"""The OpenAI-compatible HTTP front, driven by the official `openai` package: the same answers
as gRPC for the same greedy request, streams, auth, limits and the error mapping (issue 20)."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest

from bitserve_client import Client

TOKEN = "openai-front-test-token-0123456789"
CONVERSATION = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "Hello world"},
]


@pytest.fixture(scope="module")
def srv(server_factory, tiny_models, tiny_chat_lm, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("openai-auth") / "tokens"
    tokens.write_text(TOKEN + "\n")
    return server_factory(
        [
            {"name": "chat", "task": "generate", "path": str(tiny_chat_lm)},
            {"name": "plain", "task": "generate", "path": str(tiny_models["lm"]), "max_new_tokens_limit": 32},
        ],
        openai_port=0,
        auth_tokens_file=str(tokens),
        max_text_chars=400,
    )


@pytest.fixture(scope="module")
def oai(srv):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{srv.openai_port}/v1", api_key=TOKEN, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def grpc_client(srv):
    with Client(srv.target, timeout=120, token=TOKEN) as c:
        yield c


def test_completions_equal_grpc_generate(oai, grpc_client):
    got = oai.completions.create(
        model="plain", prompt="Hello world", max_tokens=10, temperature=0, logprobs=0
    )
    ref = grpc_client.generate("Hello world", model="plain", max_new_tokens=10, logprobs=True)
    (choice,) = got.choices
    assert choice.text == ref.text and got.model == "plain" and got.object == "text_completion"
    assert choice.finish_reason == {"length": "length", "eos": "stop", "stop": "stop"}[ref.finish_reason]
    assert choice.logprobs.token_logprobs == [t.logprob for t in ref.logprobs]
    assert choice.logprobs.tokens == [t.text for t in ref.logprobs]
    assert got.usage.prompt_tokens == ref.prompt_tokens and got.usage.completion_tokens == ref.tokens
    assert got.usage.total_tokens == ref.prompt_tokens + ref.tokens


def test_completions_take_a_list_of_prompts_and_stop(oai, grpc_client):
    prompts = ["Hello world", "The cat"]
    got = oai.completions.create(model="plain", prompt=prompts, max_tokens=8, temperature=0, stop=["e"])
    ref = grpc_client.generate(prompts, model="plain", max_new_tokens=8, stop=["e"])
    assert [c.text for c in got.choices] == [r.text for r in ref]
    assert [c.index for c in got.choices] == [0, 1]
    assert got.usage.prompt_tokens == sum(r.prompt_tokens for r in ref)


def test_a_streamed_completion_adds_up_to_the_grpc_answer(oai, grpc_client):
    chunks = list(
        oai.completions.create(model="plain", prompt="Hello world", max_tokens=10, temperature=0, stream=True)
    )
    ref = grpc_client.generate("Hello world", model="plain", max_new_tokens=10)
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    assert [c.choices[0].finish_reason for c in chunks][-1] is not None
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_equals_grpc_chat(oai, grpc_client):
    got = oai.chat.completions.create(
        model="chat", messages=CONVERSATION, max_tokens=12, temperature=0, logprobs=True, seed=3
    )
    ref = grpc_client.chat(CONVERSATION, model="chat", max_new_tokens=12, logprobs=True, seed=3)
    (choice,) = got.choices
    assert choice.message.role == "assistant" and choice.message.content == ref.text
    assert [t.logprob for t in choice.logprobs.content] == [t.logprob for t in ref.logprobs]
    assert got.usage.prompt_tokens == ref.prompt_tokens and got.usage.completion_tokens == ref.tokens
    assert got.object == "chat.completion" and got.id.startswith("chatcmpl-")


def test_chat_with_content_parts_and_max_completion_tokens(oai, grpc_client):
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}]}
    ]
    got = oai.chat.completions.create(model="chat", messages=parts, max_completion_tokens=6, temperature=0)
    ref = grpc_client.chat([{"role": "user", "content": "Hello world"}], model="chat", max_new_tokens=6)
    assert got.choices[0].message.content == ref.text and got.usage.completion_tokens == ref.tokens


def test_a_streamed_chat_adds_up_to_the_grpc_answer_and_reports_usage(oai, grpc_client):
    chunks = list(
        oai.chat.completions.create(
            model="chat",
            messages=CONVERSATION,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    ref = grpc_client.chat(CONVERSATION, model="chat", max_new_tokens=10)
    *content, usage = chunks
    assert content[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in content) == ref.text
    assert content[-1].choices[0].finish_reason == {"length": "length", "eos": "stop"}[ref.finish_reason]
    assert usage.choices == [] and usage.usage.completion_tokens == ref.tokens
    assert usage.usage.prompt_tokens == ref.prompt_tokens


def test_response_format_maps_to_a_constraint():
    from bitserve.api.openai import ChatBody, constraint_of
    from bitserve.types import Constraint

    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}

    def of(fmt):
        return constraint_of(
            ChatBody.model_validate({"messages": [], "response_format": fmt}).response_format
        )

    assert of({"type": "json_object"}) == Constraint("json_object", "")
    assert of({"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}) == Constraint(
        "json_schema", json.dumps(schema)
    )
    assert of({"type": "text"}) is None


def test_json_mode_answers_json_that_fits_the_schema(oai):
    """Needs the engine's constrained decoding (issue 20 item 1): the tiny model writes no JSON
    by itself. The schema bounds the answer (an enum), so `max_tokens` cannot cut it."""
    schema = {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Rome", "Lima"]}, "big": {"type": "boolean"}},
        "required": ["city", "big"],
        "additionalProperties": False,
    }
    for stream in (False, True):
        args = {
            "model": "chat",
            "messages": [{"role": "user", "content": "A city as JSON"}],
            "max_tokens": 48,
            "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
        }
        if stream:
            text = "".join(
                c.choices[0].delta.content or "" for c in oai.chat.completions.create(**args, stream=True)
            )
        else:
            got = oai.chat.completions.create(**args)
            text = got.choices[0].message.content
            assert got.choices[0].finish_reason == "stop"
        answer = json.loads(text)
        assert set(answer) == {"city", "big"} and answer["city"] in ("Paris", "Rome", "Lima")
        assert isinstance(answer["big"], bool)


def test_a_bad_or_missing_token_is_401(srv):
    url = f"http://127.0.0.1:{srv.openai_port}/v1"
    with openai.OpenAI(base_url=url, api_key="wrong-token", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as e:
            bad.chat.completions.create(model="chat", messages=CONVERSATION, max_tokens=2)
        assert e.value.status_code == 401
        assert e.value.body == {
            "message": "invalid bearer token",
            "type": "authentication_error",
            "param": None,
            "code": "UNAUTHENTICATED",
        }
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    request = urllib.request.Request(url + "/completions", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(request, timeout=30)
    assert raw.value.code == 401
    assert json.loads(raw.value.read())["error"]["message"].startswith("missing credentials: send header")


@pytest.mark.parametrize(
    "kwargs, error, status, message",
    [
        ({"model": "nope"}, openai.NotFoundError, 404, "model 'nope' is not loaded"),
        ({"model": "plain"}, openai.BadRequestError, 400, "model 'plain' has no chat template"),
        (
            {"temperature": -1},
            openai.BadRequestError,
            400,
            "temperature must be in [0, 100] (0 = greedy), got -1",
        ),
        ({"max_tokens": 2000}, openai.BadRequestError, 400, "max_new_tokens must be <= 1024"),
        (
            {"messages": [{"role": "wizard", "content": "hi"}]},
            openai.BadRequestError,
            400,
            "messages[0].role must be one of system, user, assistant; got 'wizard'",
        ),
        ({"messages": "not a list"}, openai.BadRequestError, 400, "messages: Input should be a valid list"),
        ({"n": 2, "stream": True}, openai.BadRequestError, 400, "n: streaming answers one completion"),
    ],
)
def test_errors_are_openai_bodies_with_the_matching_status(oai, kwargs, error, status, message):
    args = {"model": "chat", "messages": CONVERSATION, "max_tokens": 2, **kwargs}
    with pytest.raises(error) as e:
        got = oai.chat.completions.create(**args)
        if args.get("stream"):
            list(got)
    assert e.value.status_code == status
    assert message in e.value.body["message"], e.value.body
    assert e.value.body["code"] in ("INVALID_ARGUMENT", "FAILED_PRECONDITION", "NOT_FOUND")
    assert oai.chat.completions.create(
        model="chat", messages=CONVERSATION, max_tokens=2
    ).usage.completion_tokens


def test_a_stream_the_engine_refuses_gets_its_status_before_any_event(oai):
    with pytest.raises(openai.BadRequestError) as e:
        list(oai.completions.create(model="plain", prompt="Hello", max_tokens=64, stream=True))
    assert "max_new_tokens must be <= 32" in e.value.body["message"]


def test_the_byte_budget_and_shutdown_gate_apply(srv, oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="plain", prompt="x" * 401, max_tokens=2)
    assert e.value.body["message"] == "prompt[0] is 401 characters; the limit is 400"
    srv.server.gate.draining = True
    try:
        with pytest.raises(openai.InternalServerError) as e:
            oai.completions.create(model="plain", prompt="Hello", max_tokens=2)
        assert e.value.status_code == 503 and e.value.body["code"] == "UNAVAILABLE"
    finally:
        srv.server.gate.draining = False


def test_models_lists_what_is_served(oai, grpc_client):
    models = oai.models.list()
    assert [m.id for m in models.data] == [m.name for m in grpc_client.list_models()]
    assert sorted(m.id for m in models.data) == ["chat", "plain"]
    assert oai.models.retrieve("chat").id == "chat"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("nope")


def test_http_requests_are_counted_with_the_route_as_method(srv, oai):
    oai.chat.completions.create(model="chat", messages=CONVERSATION, max_tokens=2, temperature=0)
    body = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=30).read().decode()
    assert (
        'bitserve_requests_total{code="OK",method="/v1/chat/completions",model="chat",task="generate"}'
        in body
    )
    assert 'method="/v1/chat/completions",model="(unresolved)"' in body  # the 401s above name no model


def test_the_http_front_is_off_by_default():
    from bitserve.settings import ServerSettings

    assert ServerSettings().openai_port is None


def test_a_stream_whose_client_leaves_ends_its_generation(srv, oai):
    import time

    engine = next(e for e in srv.server.registry.engines() if e.name == "chat")
    generated = srv.server.metrics.generated_tokens.labels("chat", "generate")
    before = generated._value.get()
    stream = oai.chat.completions.create(
        model="chat", messages=CONVERSATION, max_tokens=900, temperature=0, stream=True
    )
    next(iter(stream))
    stream.close()
    end = time.monotonic() + 30
    while (srv.server.gate.inflight or engine.outstanding) and time.monotonic() < end:
        time.sleep(0.05)
    assert srv.server.gate.inflight == 0 and engine.outstanding == 0
    assert generated._value.get() - before < 900  # aborted, not run to max_tokens
    assert oai.chat.completions.create(model="chat", messages=CONVERSATION, max_tokens=2).choices


def test_every_typed_error_has_its_http_status():
    from bitserve import errors
    from bitserve.api.openai import HTTP_STATUS, error_body

    typed = {
        c.code for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.BitserveError)
    }
    assert typed - {"INTERNAL"} <= set(HTTP_STATUS), "a typed error would answer 500"
    assert error_body("RESOURCE_EXHAUSTED", "full")[0] == 429
    assert error_body("DEADLINE_EXCEEDED", "late") == (
        504,
        {"error": {"message": "late", "type": "timeout_error", "param": None, "code": "DEADLINE_EXCEEDED"}},
    )
    assert error_body("INTERNAL", "bug")[0] == 500
