"""Chat / ChatStream: messages rendered with the checkpoint's own chat template, on a real server."""

from __future__ import annotations

import pytest

from bitserve_client import AsyncClient, Client, FailedPreconditionError, InvalidArgumentError

CONVERSATION = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "Hello world"},
]
RENDERED = "<|im_start|>system\nYou are brief.<|im_end|>\n<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def srv(server_factory, tiny_models, tiny_chat_lm):
    return server_factory(
        [
            {"name": "chat", "task": "generate", "path": str(tiny_chat_lm)},
            {"name": "plain", "task": "generate", "path": str(tiny_models["lm"])},
        ],
        max_text_chars=200,
    )


@pytest.fixture(scope="module")
def client(srv):
    with Client(srv.target, timeout=120) as c:
        yield c


def test_the_checkpoint_template_renders_the_expected_prompt(tiny_chat_lm):
    from transformers import AutoTokenizer

    from bitserve.frontend import chat

    tok = AutoTokenizer.from_pretrained(tiny_chat_lm)
    msgs = chat.messages_from([(m["role"], m["content"]) for m in CONVERSATION], 1000)
    assert chat.render(tok, msgs, "chat") == RENDERED


def test_chat_answers_exactly_as_generate_on_the_rendered_prompt(client):
    got = client.chat(CONVERSATION, model="chat", max_new_tokens=12, logprobs=True)
    ref = client.generate(RENDERED, model="chat", max_new_tokens=12, logprobs=True)
    assert got == ref
    assert got.tokens == 12 and got.prompt_tokens == ref.prompt_tokens
    # and the template made a difference: the bare user text gives another prompt
    assert client.generate("Hello world", model="chat", max_new_tokens=12).prompt_tokens < got.prompt_tokens


def test_chat_accepts_role_content_tuples(client):
    got = client.chat([("system", "You are brief."), ("user", "Hello world")], model="chat", max_new_tokens=6)
    assert got == client.chat(CONVERSATION, model="chat", max_new_tokens=6)


def test_chat_stream_ends_with_the_chat_answer(client):
    events = list(client.chat_stream(CONVERSATION, model="chat", max_new_tokens=10))
    assert events[-1].final == client.chat(CONVERSATION, model="chat", max_new_tokens=10)
    assert all(e.final is None for e in events[:-1])


async def test_async_chat_and_chat_stream_match_the_blocking_client(srv, client):
    ref = client.chat(CONVERSATION, model="chat", max_new_tokens=8)
    async with AsyncClient(srv.target, timeout=120) as ac:
        assert await ac.chat(CONVERSATION, model="chat", max_new_tokens=8) == ref
        events = [e async for e in ac.chat_stream(CONVERSATION, model="chat", max_new_tokens=8)]
    assert events[-1].final == ref


def test_a_checkpoint_without_a_template_is_failed_precondition(client):
    with pytest.raises(FailedPreconditionError) as e:
        client.chat(CONVERSATION, model="plain")
    assert "model 'plain' has no chat template" in e.value.message
    with pytest.raises(FailedPreconditionError):
        list(client.chat_stream(CONVERSATION, model="plain"))


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "messages: at least one message"),
        ([{"role": "wizard", "content": "hi"}], "messages[0].role must be one of system, user, assistant"),
        (
            [{"role": "user", "content": "hi"}, {"role": "User", "content": "again"}],
            "messages[1].role must be one of system, user, assistant; got 'User'",
        ),
        ([{"role": "user", "content": "  "}], "messages[0].content is empty"),
        (
            [{"role": "user", "content": "x" * 201}],
            "messages: 201 characters of content in all; the limit is 200",
        ),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            "the chat template of model 'chat' rejects them: the last message must not be the assistant's",
        ),
    ],
)
def test_bad_messages_are_invalid_argument_naming_the_message(client, messages, message):
    with pytest.raises(InvalidArgumentError) as e:
        client.chat(messages, model="chat")
    assert message in e.value.message
    with pytest.raises(InvalidArgumentError):
        list(client.chat_stream(messages, model="chat"))
    assert client.chat(CONVERSATION, model="chat", max_new_tokens=2).tokens == 2  # still serving


def test_a_template_bos_is_not_doubled_when_encoding_adds_one():
    from bitserve.frontend import chat
    from bitserve.models.tiny import _with_post, build_tokenizer

    tok = _with_post(build_tokenizer(), "<s> $A", ["<s>"])
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    text = chat.render(tok, [chat.ChatMessage("user", "Hello world")], "m")
    assert text == "Hello world"
    assert tok(text)["input_ids"].count(tok.bos_token_id) == 1
    tok_no_bos = build_tokenizer()  # encoding adds nothing: the template's BOS stays
    tok_no_bos.chat_template = tok.chat_template
    assert chat.render(tok_no_bos, [chat.ChatMessage("user", "Hello world")], "m") == "<s>Hello world"


@pytest.mark.demo
def test_the_default_model_answers_a_chat_question(demo_server):
    with Client(demo_server.target, timeout=300) as c:
        g = c.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=24)
    assert "Paris" in g.text, g.text
