"""Checkpoint-family conventions: sentiment label names and translation language codes."""

from __future__ import annotations

import pytest

from bitserve.errors import InvalidArgument
from bitserve.frontend.classify import normalize_sentiment_label
from bitserve.frontend.translate import STRATEGIES, LanguageStrategy, Prepared


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("POSITIVE", "positive"),
        ("NEGATIVE", "negative"),
        ("neutral", "neutral"),
        ("pos", "positive"),
        ("Neg", "negative"),
        ("1 star", "negative"),
        ("2 stars", "negative"),
        ("3 stars", "neutral"),
        ("5 stars", "positive"),
        ("LABEL_0", None),
        ("sports", None),
    ],
)
def test_sentiment_label_normalization(raw, norm):
    assert normalize_sentiment_label(raw) == norm


class FakeTokenizer:
    unk_token_id = 3

    def __init__(self, vocab=(), codes=()):
        self.vocab = {tok: i + 10 for i, tok in enumerate(vocab)}
        self.supported_language_codes = list(codes)

    def convert_tokens_to_ids(self, token):
        return self.vocab.get(token, self.unk_token_id)


def test_t5_prefix():
    assert STRATEGIES["t5"].prepare(FakeTokenizer(), "en", "de") == Prepared(
        prefix="translate English to German: "
    )
    with pytest.raises(InvalidArgument, match="source_lang and target_lang are required"):
        STRATEGIES["t5"].prepare(FakeTokenizer(), None, "de")


def test_m2m100_and_nllb_force_the_target_language_token():
    m2m = FakeTokenizer(vocab=["__en__", "__fr__"])
    assert STRATEGIES["m2m_100"].prepare(m2m, "en", "fr") == Prepared(forced_bos_token_id=11, src_lang="en")
    nllb = FakeTokenizer(vocab=["eng_Latn", "fra_Latn"])
    assert STRATEGIES["m2m_100"].prepare(nllb, "eng_Latn", "fra_Latn").forced_bos_token_id == 11
    with pytest.raises(InvalidArgument, match="'xx' is not a language code"):
        STRATEGIES["m2m_100"].prepare(m2m, "en", "xx")


def test_marian_multilingual_target_token_and_fixed_pairs():
    multi = FakeTokenizer(codes=[">>fra<<", ">>spa<<"])
    assert STRATEGIES["marian"].prepare(multi, None, "fra") == Prepared(prefix=">>fra<< ")
    with pytest.raises(InvalidArgument, match="not supported"):
        STRATEGIES["marian"].prepare(multi, None, "deu")
    assert STRATEGIES["marian"].prepare(FakeTokenizer(), "en", "fr") == Prepared()


def test_fixed_pair_models_reject_language_codes():
    with pytest.raises(InvalidArgument, match="fixed language pair"):
        LanguageStrategy().prepare(FakeTokenizer(), "en", "fr")


def test_fast_encode_equals_the_tokenizer_call(tiny_models):
    from transformers import AutoTokenizer

    from bitserve.frontend.base import encode

    texts = [
        "Hello world",
        "  spaces  and\ttabs\n",
        "émoji 🎉 ünïcödé",
        "translate English to French: hi",
        "a",
    ]
    for name in ("lm", "topics", "t5"):
        tok = AutoTokenizer.from_pretrained(tiny_models[name])
        for special in (True, False):
            assert encode(tok, texts, special) == tok(texts, add_special_tokens=special)["input_ids"]
        tok(texts, padding=True, truncation=True, max_length=4)  # leaves state on the backend
        assert encode(tok, texts) == tok(texts)["input_ids"]
