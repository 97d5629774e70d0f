"""LoRA adapters on classify, sentiment and translate through the real server (contract revision
5), and a model entry's default_adapter: an instruct model with an adapter answers as a second
entry serving the `quantize export` merge of the same adapter does - classify and sentiment
probabilities within a derived float bound, translate's greedy output exactly; an unknown
adapter is NOT_FOUND naming it; a sequence classifier (head backend) serves peft SEQ_CLS
adapters - their own classifier included - as their merged models; a seq2seq model refuses
any adapter with FAILED_PRECONDITION; a request naming no adapter runs with the entry's default_adapter and one
naming "base" with the base model."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from bitserve.engine import workers
from bitserve.errors import ConfigError
from bitserve.frontend.instruct import CLASSIFY_SYSTEM, CONTENT_FREE, SENTIMENT_LABELS, classify_prompt
from bitserve.settings import ModelSettings, build_settings
from bitserve_client import Client, FailedPreconditionError, InvalidArgumentError, NotFoundError

from ..adapters import make_adapter, make_classifier_adapter, merged_checkpoint
from ..numeric import U32, forward_bound, log_softmax_bound, softmax_bound

LABELS = ["business", "sports", "politics", "tech"]
TEXTS = ["The team won the football match last night.", "Stock markets fell.", "Hello", "la maison"]
RANK = 4  # make_adapter's default


@pytest.fixture(scope="module")
def dirs(tiny_chat_lm, tiny_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("lora-tasks")
    a = make_adapter(tiny_chat_lm, d / "a", seed=21)
    out = {"a": a, "merged": merged_checkpoint(tiny_chat_lm, a, d / "merged-a")}
    for kind in ("topics", "sentiment"):  # peft SEQ_CLS adapters: LoRA + their own classifier
        ad = make_classifier_adapter(tiny_models[kind], d / f"{kind}-c", seed=22)
        out[f"{kind}-c"] = ad
        out[f"{kind}-merged"] = merged_checkpoint(tiny_models[kind], ad, d / f"{kind}-m", task="classify")
    return out


@pytest.fixture(scope="module")
def srv(server_factory, tiny_chat_lm, tiny_models, dirs):
    lm, merged, ad = str(tiny_chat_lm), str(dirs["merged"]), {"a": str(dirs["a"])}
    tr = {"task": "translate", "default_max_new_tokens": 12}
    return server_factory(
        [
            {
                "name": "cls",
                "task": "classify",
                "path": lm,
                "labels": LABELS,
                "adapters": ad,
                "max_batch_delay_ms": 50,
            },
            {"name": "sent", "task": "sentiment", "path": lm, "adapters": ad},
            {"name": "tr", "path": lm, "adapters": ad, **tr},
            {"name": "tr-default", "path": lm, "adapters": ad, "default_adapter": "a", **tr},
            {"name": "gen-default", "task": "generate", "path": lm, "adapters": ad, "default_adapter": "a"},
            {"name": "cls-m", "task": "classify", "path": merged, "labels": LABELS},
            {"name": "sent-m", "task": "sentiment", "path": merged},
            {"name": "tr-m", "path": merged, **tr},
            {"name": "gen-m", "task": "generate", "path": merged},
            {
                "name": "topics",
                "task": "classify",
                "path": str(tiny_models["topics"]),
                "adapters": {"c": str(dirs["topics-c"])},
                "max_batch_delay_ms": 50,
            },
            {"name": "topics-m", "task": "classify", "path": str(dirs["topics-merged"])},
            {
                "name": "sent-head",
                "task": "sentiment",
                "path": str(tiny_models["sentiment"]),
                "adapters": {"c": str(dirs["sentiment-c"])},
            },
            {"name": "sent-head-m", "task": "sentiment", "path": str(dirs["sentiment-merged"])},
            {"name": "t5", "task": "translate", "path": str(tiny_models["t5"])},
        ]
    )


@pytest.fixture(scope="module")
def client(srv):
    with Client(srv.target, timeout=120) as c:
        yield c


def _probs(results) -> list[dict[str, float]]:
    return [{s.label: s.score for s in r} for r in results]


def _prob_bound(srv, dirs, prompts: list[list[int]], lids) -> float:
    """How far a calibrated label probability may move between the adapter served unmerged and
    merged (tests/numeric.py): each label log-likelihood by L = len(label) x the log-softmax
    bound of a forward pass whose reductions the LoRA branch and its merge lengthen by r + 2;
    score - prior by 2L; the softmax by half of that, L; plus the float32 of the response."""
    loaded = workers.load(ModelSettings(name="m", task="classify", path=str(dirs["merged"])))
    longest = max(prompts, key=len) + list(max(lids, key=len))
    with torch.inference_mode():
        zmax = loaded.model(input_ids=torch.tensor([longest])).logits.abs().max().item()
    per_token = log_softmax_bound(forward_bound(loaded.model.config, len(longest), zmax, extra_k=RANK + 2))
    return max(len(x) for x in lids) * per_token + 2 * U32


@pytest.mark.numeric
def test_classify_with_an_adapter_equals_the_merged_model(srv, client, dirs):
    e = srv.server.registry._engines["cls"]
    prompts = [e.chat_ids(CLASSIFY_SYSTEM, classify_prompt(t, LABELS)) for t in [*TEXTS, CONTENT_FREE]]
    tol = _prob_bound(srv, dirs, prompts, e.label_ids(LABELS))
    got = _probs(client.classify(TEXTS, model="cls", adapter="a"))
    want = _probs(client.classify(TEXTS, model="cls-m"))
    base = _probs(client.classify(TEXTS, model="cls"))
    moved = 0.0
    for g, w, b in zip(got, want, base, strict=True):
        assert [g[x] for x in LABELS] == pytest.approx([w[x] for x in LABELS], abs=tol)
        moved = max(moved, *(abs(g[x] - b[x]) for x in LABELS))
    assert moved > 10 * tol  # the adapter changes the answer (else the test proves nothing)
    # rows of the adapter and of the base in the same scoring batches: each as its own model
    e._batcher.stats.sizes.clear()
    jobs = [(t, a) for t in TEXTS for a in ("a", "")] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        mixed = list(pool.map(lambda j: _probs([client.classify(j[0], model="cls", adapter=j[1])])[0], jobs))
    assert max(e._batcher.stats.sizes) > 1  # some batch held several requests
    for (t, a), m in zip(jobs, mixed):
        ref = (got if a else base)[TEXTS.index(t)]
        assert [m[x] for x in LABELS] == pytest.approx([ref[x] for x in LABELS], abs=tol)


@pytest.mark.numeric
def test_sentiment_with_an_adapter_equals_the_merged_model(srv, client, dirs):
    from bitserve.frontend.instruct import SENTIMENT_SYSTEM, sentiment_prompt

    e = srv.server.registry._engines["sent"]
    prompts = [e.chat_ids(SENTIMENT_SYSTEM, sentiment_prompt(t)) for t in [*TEXTS, CONTENT_FREE]]
    tol = _prob_bound(srv, dirs, prompts, e.label_ids(SENTIMENT_LABELS))
    got = client.sentiment(TEXTS, model="sent", adapter="a")
    want = client.sentiment(TEXTS, model="sent-m")
    base = client.sentiment(TEXTS, model="sent")

    def p_pos(r):
        return r.score if r.label == "positive" else 1 - r.score

    assert [p_pos(r) for r in got] == pytest.approx([p_pos(r) for r in want], abs=tol)
    assert max(abs(p_pos(g) - p_pos(b)) for g, b in zip(got, base)) > 10 * tol


def test_translate_with_an_adapter_equals_the_merged_model(client):
    kw = {"target_lang": "fr"}
    got = [t.text for t in client.translate(TEXTS, model="tr", adapter="a", **kw)]
    assert got == [t.text for t in client.translate(TEXTS, model="tr-m", **kw)]
    assert got != [t.text for t in client.translate(TEXTS, model="tr", **kw)]


def test_unknown_adapter_is_not_found_on_every_task(client):
    with pytest.raises(NotFoundError, match="'nope'"):
        client.classify(TEXTS, model="cls", adapter="nope")
    with pytest.raises(NotFoundError, match="'nope'"):
        client.sentiment(TEXTS[0], model="sent", adapter="nope")
    with pytest.raises(NotFoundError, match="'nope'"):
        client.translate(TEXTS[0], model="tr", adapter="nope", target_lang="fr")
    with pytest.raises(InvalidArgumentError, match="not an adapter name"):
        client.classify(TEXTS[0], model="cls", adapter="bad name!")
    # the refused request did not take its batch's other rows down with it, nor stay behind
    assert client.classify(TEXTS[0], model="cls", adapter="a")


def _head_bound(path, texts) -> float:
    """tests/unit/engine/test_lora_heads.py's bound: the classifier's forward (pooler and head
    after the layers; r + 2 more terms per reduction), halved by the softmax, plus float32."""
    loaded = workers.load(ModelSettings(name="m", task="classify", path=str(path)))
    ids = [loaded.tokenizer(t)["input_ids"] for t in texts]
    with torch.inference_mode():
        zmax = max(loaded.model(input_ids=torch.tensor([i])).logits.abs().max().item() for i in ids)
    width = max(len(i) for i in ids)
    return softmax_bound(forward_bound(loaded.model.config, width, zmax, heads=2, extra_k=RANK + 2)) + 2 * U32


@pytest.mark.numeric
def test_a_sequence_classifier_serves_its_classifier_adapters_as_merged(client, dirs):
    """A peft SEQ_CLS adapter (LoRA on the encoder and its own classifier) on the head backend:
    as the merged model, alone and in batches mixed with base rows; hot-loaded too."""
    tol = _head_bound(dirs["topics-merged"], TEXTS)
    got = _probs(client.classify(TEXTS, model="topics", adapter="c"))
    want = _probs(client.classify(TEXTS, model="topics-m"))
    base = _probs(client.classify(TEXTS, model="topics"))
    labels = sorted(got[0])
    for g, w in zip(got, want, strict=True):
        assert [g[x] for x in labels] == pytest.approx([w[x] for x in labels], abs=tol)
    assert max(abs(g[x] - b[x]) for g, b in zip(got, base) for x in labels) > 10 * tol
    jobs = [(t, a) for t in TEXTS for a in ("c", "")] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        mixed = list(
            pool.map(lambda j: _probs([client.classify(j[0], model="topics", adapter=j[1])])[0], jobs)
        )
    for (t, a), m in zip(jobs, mixed):
        ref = (got if a else base)[TEXTS.index(t)]
        assert [m[x] for x in labels] == pytest.approx([ref[x] for x in labels], abs=tol)
    st = _head_bound(dirs["sentiment-merged"], TEXTS)
    s_got = client.sentiment(TEXTS, model="sent-head", adapter="c")
    s_want = client.sentiment(TEXTS, model="sent-head-m")
    assert [r.raw_label for r in s_got] == [r.raw_label for r in s_want]
    assert [r.score for r in s_got] == pytest.approx([r.score for r in s_want], abs=st)
    # hot load on a classifier, then unload: NOT_FOUND
    client.load_adapter("topics", "hot", str(dirs["topics-c"]))
    try:
        assert [a.name for a in client.list_adapters("topics")["topics"]] == ["c", "hot"]
        hot = _probs(client.classify(TEXTS, model="topics", adapter="hot"))
        for h, g in zip(hot, got, strict=True):
            assert [h[x] for x in labels] == pytest.approx([g[x] for x in labels], abs=tol)
    finally:
        client.unload_adapter("topics", "hot")
    with pytest.raises(NotFoundError, match="'hot'"):
        client.classify(TEXTS[0], model="topics", adapter="hot")


def test_a_seq2seq_model_refuses_an_adapter(client):
    with pytest.raises(NotFoundError, match="'a'"):
        client.classify(TEXTS[0], model="topics", adapter="a")  # a classifier without that adapter
    with pytest.raises(FailedPreconditionError, match="seq2seq"):
        client.translate(TEXTS[0], model="t5", adapter="a", source_lang="en", target_lang="fr")
    assert client.translate(TEXTS[0], model="t5", adapter="base", source_lang="en", target_lang="fr")
    with pytest.raises(FailedPreconditionError, match="seq2seq"):
        client.load_adapter("t5", "x", "/x")


def test_default_adapter_serves_requests_naming_none_and_base_reaches_the_base(client):
    kw = {"target_lang": "fr"}
    plain = [t.text for t in client.translate(TEXTS, model="tr-default", **kw)]
    assert plain == [t.text for t in client.translate(TEXTS, model="tr-m", **kw)]
    base = [t.text for t in client.translate(TEXTS, model="tr-default", adapter="base", **kw)]
    assert base == [t.text for t in client.translate(TEXTS, model="tr", **kw)] != plain
    for text in TEXTS:
        want = client.generate(text, model="gen-m", max_new_tokens=10).text
        assert client.generate(text, model="gen-default", max_new_tokens=10).text == want
        assert (
            client.chat([("user", text)], model="gen-default", max_new_tokens=10).text
            == client.chat([("user", text)], model="gen-m", max_new_tokens=10).text
        )
        streamed = "".join(
            ev.text for ev in client.generate_stream(text, model="gen-default", max_new_tokens=10)
        )
        assert streamed == want
    with pytest.raises(FailedPreconditionError, match="default_adapter"):
        client.unload_adapter("gen-default", "a")
    with pytest.raises(InvalidArgumentError, match="reserved"):
        client.load_adapter("gen-default", "base", "/x")


def test_default_adapter_must_be_one_of_the_entrys_adapters(tiny_chat_lm, dirs):
    m = {"name": "g", "task": "generate", "path": str(tiny_chat_lm)}
    with pytest.raises(ConfigError, match="default_adapter"):
        build_settings(config_data={"models": [{**m, "default_adapter": "a"}]}, environ={})
    with pytest.raises(ConfigError, match="reserved"):
        build_settings(config_data={"models": [{**m, "adapters": {"base": str(dirs["a"])}}]}, environ={})
    s = build_settings(
        config_data={"models": [{**m, "adapters": {"a": str(dirs["a"])}, "default_adapter": "a"}]}, environ={}
    )
    assert s.models[0].default_adapter == "a"
