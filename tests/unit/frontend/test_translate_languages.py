"""Concurrent translations from different source languages each get their own language token
(issue 17: main set the shared tokenizer's `src_lang` on the event loop and tokenized later, on
the tokenization thread, so a request could be encoded with the next one's language)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

LANGS = ["eng_Latn", "fra_Latn", "deu_Latn"]


def tiny_nllb():
    """A real NllbTokenizer (BPE over a handful of pieces), built offline."""
    from transformers import NllbTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for piece in ["▁", "h", "e", "l", "o", "w", "r", "d", "▁hello", "▁world"]:
        vocab[piece] = len(vocab)
    return NllbTokenizer(vocab=vocab, merges=[], src_lang=LANGS[0], additional_special_tokens=LANGS)


class EchoCore:
    """The engine process's stand-in: a batch's answer is each item's first input token id."""

    id = "echo"
    ready = True

    async def call(self, op, model, items):
        await asyncio.sleep(0)
        return [[str(ids[0]), 1] for ids, _forced, _n in items]


async def test_mixed_source_languages_at_once_each_keep_their_own():
    from bitserve.frontend.translate import Seq2SeqTranslateEngine
    from bitserve.metrics import Metrics
    from bitserve.settings import ModelSettings

    tok = tiny_nllb()
    loaded = SimpleNamespace(tokenizer=tok, max_context=64, config=SimpleNamespace(model_type="nllb"))
    settings = ModelSettings(name="mt", task="translate", path="unused", max_batch_delay_ms=2)
    engine = Seq2SeqTranslateEngine(settings, loaded, Metrics(), EchoCore())
    await engine.start()
    try:
        sources = LANGS * 8
        results = await asyncio.gather(
            *(
                engine.translate(
                    ["hello world"], source_lang=s, target_lang="fra_Latn", max_new_tokens=None, deadline=None
                )
                for s in sources
            )
        )
    finally:
        await engine.stop()
    got = [int(r[0].text) for r in results]
    assert got == [tok.convert_tokens_to_ids(s) for s in sources]
