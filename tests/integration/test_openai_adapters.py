"""LoRA adapters on the OpenAI HTTP front, driven by the official `openai` package: `model` as
"base:adapter" on /v1/completions and /v1/chat/completions (streams too) answers as the merged
model does; /v1/models lists each adapter as "base:adapter", a hot-loaded one as well; an unknown
adapter is a 404 with an OpenAI-style error body, never the base model."""

from __future__ import annotations

import openai
import pytest

from bitserve_client import Client

from ..adapters import make_adapter, merged_checkpoint

PROMPTS = ["Hello world", "The quick brown fox jumps over", "la maison"]
N = 10


@pytest.fixture(scope="module")
def dirs(tiny_chat_lm, tmp_path_factory):
    d = tmp_path_factory.mktemp("oai-lora")
    a = make_adapter(tiny_chat_lm, d / "a", seed=31)
    return {
        "a": a,
        "b": make_adapter(tiny_chat_lm, d / "b", seed=32),
        "merged": merged_checkpoint(tiny_chat_lm, a, d / "m"),
    }


@pytest.fixture(scope="module")
def srv(server_factory, tiny_chat_lm, dirs):
    return server_factory(
        [
            {"name": "lm", "task": "generate", "path": str(tiny_chat_lm), "adapters": {"a": str(dirs["a"])}},
            {"name": "merged", "task": "generate", "path": str(dirs["merged"])},
        ],
        openai_port=0,
    )


@pytest.fixture(scope="module")
def oai(srv):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{srv.openai_port}/v1", api_key="x", max_retries=0) as c:
        yield c


def _complete(oai, model: str, prompt: str, **kw):
    return oai.completions.create(model=model, prompt=prompt, max_tokens=N, temperature=0, **kw)


def test_completions_with_base_colon_adapter_equal_the_merged_model(oai):
    for p in PROMPTS:
        got = _complete(oai, "lm:a", p)
        assert got.choices[0].text == _complete(oai, "merged", p).choices[0].text
        assert got.model == "lm:a"
        streamed = "".join(c.choices[0].text for c in _complete(oai, "lm:a", p, stream=True))
        assert streamed == got.choices[0].text
    assert [_complete(oai, "lm", p).choices[0].text for p in PROMPTS] != [
        _complete(oai, "merged", p).choices[0].text for p in PROMPTS
    ]


def test_chat_completions_with_base_colon_adapter_equal_the_merged_model(oai):
    msgs = [{"role": "user", "content": "Hello world"}]

    def chat(model, **kw):
        return oai.chat.completions.create(model=model, messages=msgs, max_tokens=N, temperature=0, **kw)

    got = chat("lm:a")
    assert got.choices[0].message.content == chat("merged").choices[0].message.content
    assert got.model == "lm:a"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat("lm:a", stream=True) if c.choices)
    assert streamed == got.choices[0].message.content


def test_models_lists_each_adapter_as_base_colon_adapter(srv, oai, dirs):
    assert sorted(m.id for m in oai.models.list().data) == ["lm", "lm:a", "merged"]
    card = oai.models.retrieve("lm:a")
    assert card.id == "lm:a" and card.model_extra["parent"] == "lm"
    with Client(srv.target, timeout=120) as c:
        c.load_adapter("lm", "b", str(dirs["b"]))
        try:
            assert sorted(m.id for m in oai.models.list().data) == ["lm", "lm:a", "lm:b", "merged"]
            assert (
                _complete(oai, "lm:b", PROMPTS[0]).choices[0].text
                == c.generate(PROMPTS[0], model="lm", adapter="b", max_new_tokens=N).text
            )
        finally:
            c.unload_adapter("lm", "b")
    assert "lm:b" not in [m.id for m in oai.models.list().data]
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("lm:b")


@pytest.mark.parametrize("stream", [False, True])
def test_an_unknown_adapter_is_a_404_openai_error_never_the_base(oai, stream):
    with pytest.raises(openai.NotFoundError) as e:
        _complete(oai, "lm:nope", PROMPTS[0], stream=stream)
    assert e.value.status_code == 404
    assert e.value.body["code"] == "NOT_FOUND" and "'nope'" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(
            model="lm:nope", messages=[{"role": "user", "content": "hi"}], max_tokens=2, stream=stream
        )
    with pytest.raises(openai.BadRequestError) as bad:
        _complete(oai, "lm:bad name!", PROMPTS[0])
    assert bad.value.body["code"] == "INVALID_ARGUMENT" and "not an adapter name" in bad.value.body["message"]
    with pytest.raises(openai.NotFoundError):  # an unknown base: as before
        _complete(oai, "zz:a", PROMPTS[0])
