"""Tokenize / Detokenize: the model's own tokenizer through the server (issue 20, item 3)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from bitserve_client import AsyncClient, Client, FailedPreconditionError, InvalidArgumentError, NotFoundError

TEXTS = ["Hello world", "naïve café, déjà vu", "  spaced   out  "]


@pytest.fixture(scope="module")
def srv(server_factory, tiny_models, tiny_chat_lm):
    return server_factory(
        [
            {"name": "chat", "task": "generate", "path": str(tiny_chat_lm)},
            {"name": "topics", "task": "classify", "path": str(tiny_models["topics"])},
        ]
    )


@pytest.fixture(scope="module")
def client(srv):
    with Client(srv.target, timeout=120) as c:
        yield c


@pytest.mark.parametrize(
    "model, special", [("chat", True), ("chat", False), ("topics", True), ("topics", False)]
)
def test_ids_equal_the_tokenizers_own(client, tiny_models, tiny_chat_lm, model, special):
    tok = AutoTokenizer.from_pretrained(tiny_chat_lm if model == "chat" else tiny_models["topics"])
    got = client.tokenize(TEXTS, model=model, add_special_tokens=special)
    want = tok(TEXTS, add_special_tokens=special, return_offsets_mapping=True)
    assert [list(r.ids) for r in got] == want["input_ids"]
    assert [list(r.offsets) for r in got] == [[tuple(o) for o in offs] for offs in want["offset_mapping"]]
    assert [list(r.tokens) for r in got] == [tok.convert_ids_to_tokens(i) for i in want["input_ids"]]
    assert [r.text for r in got] == TEXTS


def test_special_tokens_are_added_by_default_and_cover_no_characters(client, tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["topics"])  # BERT: [CLS] ... [SEP]
    got = client.tokenize("Hello world", model="topics")
    assert got.ids[0] == tok.cls_token_id and got.ids[-1] == tok.sep_token_id
    assert got.offsets[0] == (0, 0) and got.offsets[-1] == (0, 0)
    assert client.tokenize("Hello world", model="topics", add_special_tokens=False).ids == got.ids[1:-1]


def test_offsets_are_characters_of_the_text(client):
    text = TEXTS[1]
    got = client.tokenize(text, model="chat", add_special_tokens=False)
    assert len(text.encode()) > len(text)  # so byte offsets would run past the end
    assert max(b for _, b in got.offsets) == len(text)
    # spans move forward and cover every non-space character (a character split over several
    # byte-level tokens is covered by each of them)
    assert got.offsets == tuple(sorted(got.offsets))
    covered = {i for a, b in got.offsets for i in range(a, b)}
    assert {i for i, ch in enumerate(text) if not ch.isspace()} <= covered


def test_messages_tokenize_as_chat_renders_them(client, tiny_chat_lm):
    from tests.integration.test_chat import CONVERSATION, RENDERED

    tok = AutoTokenizer.from_pretrained(tiny_chat_lm)
    got = client.tokenize(messages=CONVERSATION, model="chat")
    assert got.text == RENDERED and list(got.ids) == tok(RENDERED)["input_ids"]
    # the prompt Chat sends is exactly this many tokens
    assert len(got.ids) == client.chat(CONVERSATION, model="chat", max_new_tokens=1).prompt_tokens


def test_detokenize_equals_the_tokenizers_decode(client, tiny_chat_lm):
    tok = AutoTokenizer.from_pretrained(tiny_chat_lm)
    ids = tok("Hello world <|im_end|>")["input_ids"]
    assert client.detokenize(ids, model="chat") == tok.decode(ids)
    assert client.detokenize(ids, model="chat", skip_special_tokens=True) == tok.decode(
        ids, skip_special_tokens=True
    )


async def test_the_async_client_answers_the_same(srv, client):
    async with AsyncClient(srv.target, timeout=120) as ac:
        assert await ac.tokenize(TEXTS, model="chat") == client.tokenize(TEXTS, model="chat")
        ids = client.tokenize("Hello world", model="chat").ids
        assert await ac.detokenize(ids, model="chat") == client.detokenize(ids, model="chat")


def test_bad_requests_name_what_to_fix(client, tiny_chat_lm):
    vocab = len(AutoTokenizer.from_pretrained(tiny_chat_lm))
    with pytest.raises(InvalidArgumentError) as e:
        client.detokenize([1, vocab], model="chat")
    assert e.value.message == f"ids[1] is {vocab}; the model's vocabulary has ids 0..{vocab - 1}"
    with pytest.raises(InvalidArgumentError) as e:
        client.tokenize([], model="chat")
    assert e.value.message == "texts: at least one text is required"
    with pytest.raises(InvalidArgumentError) as e:
        client.tokenize("x", messages=[{"role": "user", "content": "hi"}], model="chat")
    assert e.value.message == "send texts or messages, not both"
    with pytest.raises(NotFoundError):
        client.tokenize("x", model="nope")
    with pytest.raises(FailedPreconditionError):  # a BERT classifier has no chat template
        client.tokenize(messages=[{"role": "user", "content": "hi"}], model="topics")
    assert client.tokenize("still serving", model="chat").ids
