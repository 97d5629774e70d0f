"""Instruction-model adapters (backend: instruct) on the tiny causal LM: scoring, batching, errors.

The tiny LM is random-weight, so these tests check the mechanics (exact likelihoods, calibrated
probabilities, batching, validation); tests/integration/test_demo.py checks the answers of a real model.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from bitserve.engine import workers
from bitserve.frontend.instruct import (
    CLASSIFY_SYSTEM,
    CONTENT_FREE,
    SENTIMENT_SYSTEM,
    TRANSLATE_SYSTEM,
    InstructClassifyEngine,
    InstructSentimentEngine,
    InstructTranslateEngine,
    classify_prompt,
    clean_translation,
    sentiment_prompt,
    translate_prompt,
)
from bitserve.metrics import Metrics
from bitserve.settings import ModelSettings
from bitserve_client import Client, InvalidArgumentError

from ..numeric import forward_bound, log_softmax_bound

LABELS = ["business", "sports", "politics", "tech"]
TEXTS = ["The team won the football match last night.", "Stock markets fell.", "Hello"]


@pytest.fixture(scope="module")
def srv(server_factory, tiny_models):
    lm = str(tiny_models["lm"])
    return server_factory(
        [
            # backend left to 'auto': a causal LM serving a non-generate task is an instruct model.
            {"name": "cls", "task": "classify", "path": lm, "labels": LABELS, "max_batch_delay_ms": 50},
            {"name": "cls-nolabels", "task": "classify", "path": lm, "backend": "instruct"},
            {"name": "sent", "task": "sentiment", "path": lm},
            {
                "name": "tr",
                "task": "translate",
                "path": lm,
                "default_max_new_tokens": 8,
                "max_new_tokens_limit": 32,
            },
        ]
    )


@pytest.fixture(scope="module")
def client(srv):
    with Client(srv.target, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def ref_model(tiny_models):
    """The tiny LM in this process: the served one lives in its engine process."""
    s = ModelSettings(name="ref", task="classify", path=str(tiny_models["lm"]))
    return workers.load(s).model


def engine(srv, name):
    return srv.server.registry._engines[name]


def test_auto_backend_picks_the_instruct_engines(srv):
    assert type(engine(srv, "cls")) is InstructClassifyEngine
    assert type(engine(srv, "sent")) is InstructSentimentEngine
    assert type(engine(srv, "tr")) is InstructTranslateEngine


def test_engines_on_one_checkpoint_share_one_engine_process(srv):
    """Four models on one checkpoint: one engine process owns the one copy of the weights."""
    cores = {id(engine(srv, n).core) for n in ("cls", "cls-nolabels", "sent", "tr")}
    assert len(cores) == 1
    assert len(srv.server.registry.cores) == 1
    pid = engine(srv, "cls").core.pid
    assert pid is not None and pid != __import__("os").getpid()
    # ListModels says so, and the weight-memory gauge counts that one copy once.
    with Client(srv.target) as c:
        infos = {m.name: m for m in c.list_models()}
    assert len({infos[n].engine for n in ("cls", "cls-nolabels", "sent", "tr")}) == 1
    reg = srv.server.metrics.registry
    values = [
        reg.get_sample_value(
            "bitserve_model_weight_memory_bytes", {"model": n, "task": infos[n].task, "quantization": "none"}
        )
        for n in ("cls", "cls-nolabels", "sent", "tr")
    ]
    assert sorted(values) == [0, 0, 0, infos["cls"].memory_bytes]


def _plain_loglik(model, prompt: list[int], label: tuple[int, ...]) -> float:
    """log P(label | prompt) from one unpadded forward pass, no KV cache."""
    ids = torch.tensor([prompt + list(label)])
    with torch.inference_mode():
        lp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
    return sum(lp[len(prompt) - 1 + k, t].item() for k, t in enumerate(label))


def _reference_probs(e, model, system: str, user, text: str, labels) -> list[float]:
    """The documented score: softmax over labels of log P(label) - log P(label | content-free text)."""
    lids = e.label_ids(labels)
    prompt, prior = e.chat_ids(system, user(text)), e.chat_ids(system, user(CONTENT_FREE))
    cal = [_plain_loglik(model, prompt, lab) - _plain_loglik(model, prior, lab) for lab in lids]
    return torch.softmax(torch.tensor(cal), 0).tolist()


@pytest.mark.parametrize("cache_tokens", [4096, 40])
def test_label_likelihoods_equal_a_plain_forward_pass(srv, tiny_models, monkeypatch, cache_tokens):
    """The shared-prefix KV-cache scoring gives each label's exact log-likelihood, also when the
    (prompt, label) rows are scored in small chunks (40 cached tokens: one or two rows a chunk)."""
    from bitserve.engine.worker import model_runner as runner

    monkeypatch.setattr(runner, "SCORE_CACHE_TOKENS", cache_tokens)
    e = engine(srv, "cls")
    loaded = workers.load(ModelSettings(name="x", task="classify", path=str(tiny_models["lm"])))
    model = loaded.model
    lm = runner.CausalLM(model, loaded.tokenizer, loaded.device)
    prompts = [e.chat_ids("sys", t) for t in TEXTS]  # different lengths: left padding
    labels = e.label_ids(["a", "sports news", "politics and more"])  # different lengths
    with torch.inference_mode():
        fast = lm.score(prompts, [[list(lab) for lab in labels]] * len(prompts))
        for p, got in zip(prompts, fast, strict=True):
            for lab, g in zip(labels, got, strict=True):
                ids = torch.tensor([p + list(lab)])
                logits = model(input_ids=ids).logits.float()
                lp = torch.log_softmax(logits, -1)[0]
                want = sum(lp[len(p) - 1 + k, t].item() for k, t in enumerate(lab))
                # Padded, chunked KV-cache scoring against one plain forward: the same fp32
                # function in other reduction orders (tests/numeric.py), len(lab) log-probs summed.
                zmax = logits.abs().max().item()
                tol = len(lab) * log_softmax_bound(forward_bound(model.config, ids.shape[1], zmax))
                assert g == pytest.approx(want, abs=tol)


def test_classify_scores_are_the_calibrated_label_probabilities(client, srv, ref_model):
    e = engine(srv, "cls")
    results = client.classify(TEXTS, model="cls")
    for text, r in zip(TEXTS, results):
        assert sorted(s.label for s in r) == sorted(LABELS)
        assert math.isclose(sum(s.score for s in r), 1.0, abs_tol=1e-4)
        assert [s.score for s in r] == sorted((s.score for s in r), reverse=True)
        want = _reference_probs(
            e, ref_model, CLASSIFY_SYSTEM, lambda t: classify_prompt(t, LABELS), text, LABELS
        )
        got = {s.label: s.score for s in r}
        assert [got[label] for label in LABELS] == pytest.approx(want, abs=1e-3)


def test_classify_is_deterministic_and_independent_of_the_batch(client):
    together = client.classify(TEXTS, model="cls")
    alone = [client.classify(t, model="cls") for t in TEXTS]
    assert client.classify(TEXTS, model="cls") == together
    for a, b in zip(together, alone):
        assert [s.label for s in a] == [s.label for s in b]
        for x, y in zip(a, b):
            assert x.score == pytest.approx(y.score, abs=1e-4)


def test_zero_shot_candidate_labels_and_top_k(client):
    every = client.classify(
        "A new phone chip", model="cls-nolabels", candidate_labels=["cats", "dogs", "fish"]
    )
    r = client.classify(
        "A new phone chip", model="cls-nolabels", candidate_labels=["cats", "dogs", "fish"], top_k=2
    )
    assert sorted(s.label for s in every) == ["cats", "dogs", "fish"]
    assert [s.label for s in r] == [s.label for s in every[:2]]
    assert [s.score for s in r] == pytest.approx([s.score for s in every[:2]], abs=1e-5)
    r = client.classify("A new phone chip", model="cls", candidate_labels=["yes", "no"])
    assert {s.label for s in r} == {"yes", "no"}


def test_classify_without_labels_is_invalid_argument(client):
    with pytest.raises(InvalidArgumentError, match="no default labels"):
        client.classify("text", model="cls-nolabels")
    with pytest.raises(InvalidArgumentError, match="at least two labels"):
        client.classify("text", model="cls-nolabels", candidate_labels=["only"])


def test_sentiment_is_the_more_probable_of_the_calibrated_labels(client, srv, ref_model):
    e = engine(srv, "sent")
    labels = ("positive", "negative")
    for text, r in zip(TEXTS, client.sentiment(TEXTS, model="sent")):
        want = _reference_probs(e, ref_model, SENTIMENT_SYSTEM, sentiment_prompt, text, labels)
        best = max(range(2), key=want.__getitem__)
        assert (r.label, r.raw_label) == (labels[best], labels[best])
        assert r.score == pytest.approx(want[best], abs=1e-3)


def test_concurrent_requests_share_batches(srv, client):
    e = engine(srv, "cls")
    before = e._batcher.stats.batches
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda t: client.classify(t, model="cls"), TEXTS * 2))
    alone = [client.classify(t, model="cls") for t in TEXTS]
    for got, want in zip(results, alone * 2):  # batched with others, each text keeps its answer
        assert [s.label for s in got] == [s.label for s in want]
        assert [s.score for s in got] == pytest.approx([s.score for s in want], abs=1e-4)
    assert e._batcher.stats.batches - before < 6
    assert max(e._batcher.stats.sizes) > 1


def _reference_translation(e, model, text: str, source: str, target: str, n: int) -> str:
    """Greedy decoding of the translate prompt alone (no padding, no batch), cut at the first
    end-of-turn or newline token, then cleaned."""
    tok = e.loaded.tokenizer
    prompt = e.chat_ids(TRANSLATE_SYSTEM, translate_prompt(text, source, target))
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    kept = []
    for t in out[0, len(prompt) :].tolist():
        if t == tok.eos_token_id or "\n" in tok.decode([t]):
            break
        kept.append(t)
    return clean_translation(tok.decode(kept, skip_special_tokens=True), multiline=False)


def test_translate_equals_greedy_decoding_of_each_prompt(client, srv, ref_model):
    e = engine(srv, "tr")
    texts = ["the house is blue", "hello world", "Good morning, how are you today?"]
    out = client.translate(texts, model="tr", source_lang="en", target_lang="fr")  # default: 8 tokens
    want = [_reference_translation(e, ref_model, t, "English", "French", 8) for t in texts]
    assert [t.text for t in out] == want
    assert any(want), "the reference must not be trivially empty"


def test_translate_validates_languages_and_length(client):
    with pytest.raises(InvalidArgumentError, match="target_lang is required"):
        client.translate("hello", model="tr")
    with pytest.raises(InvalidArgumentError, match="unknown language code 'xx'"):
        client.translate("hello", model="tr", target_lang="xx")
    with pytest.raises(InvalidArgumentError, match="max_new_tokens must be <= 32"):
        client.translate("hello", model="tr", target_lang="fr", max_new_tokens=33)


def test_over_long_prompt_is_invalid_argument(client, srv):
    too_long = "hello " * (engine(srv, "sent").max_input_tokens + 10)
    with pytest.raises(InvalidArgumentError, match="texts\\[0\\] makes a"):
        client.sentiment(too_long, model="sent")


def test_prompts_use_the_chat_template_when_there_is_one(tiny_models):
    s = ModelSettings(name="x", task="sentiment", path=str(tiny_models["lm"]))
    loaded = workers.load(s)
    e = InstructSentimentEngine(s, loaded, Metrics(), None)
    plain = loaded.tokenizer.decode(e.chat_ids("SYS", "USER"))
    assert plain.startswith("SYS") and plain.rstrip().endswith("Answer:")
    loaded.tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert loaded.tokenizer.decode(e.chat_ids("SYS", "USER")) == "<system>SYS<user>USER<assistant>"


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("Le chat dort.", "Le chat dort."),
        ('"Le chat dort."', "Le chat dort."),
        ("Translation: Le chat dort.", "Le chat dort."),
        ("Here is the translation: « Le chat dort. »", "Le chat dort."),
        ("The French translation is: Le chat dort.", "Le chat dort."),
        ("Le chat dort.\nThis means the cat sleeps.", "Le chat dort."),
    ],
)
def test_clean_translation_strips_chatter(raw, want):
    assert clean_translation(raw, multiline=False) == want


def test_clean_translation_keeps_lines_of_a_multiline_source():
    assert clean_translation("Ligne un.\nLigne deux.", multiline=True) == "Ligne un.\nLigne deux."
