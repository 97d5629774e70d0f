"""The generate task's chat rows (`user`/`completion`, optional `system`): trained on the very
prompt the instruct backend sends at inference, loss on the answer and its end-of-turn only."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from bitserve.frontend.instruct import TRANSLATE_SYSTEM, _InstructEngine, translate_prompt
from bitserve_quantize.data import Record
from bitserve_quantize.errors import DataError
from bitserve_quantize.tasks import GenerateTask, end_of_turn_id


@pytest.fixture
def tok(tiny_chat_lm):
    """The tiny chat tokenizer with ChatML's turn markers as special tokens, as SmolLM2 has them
    (only tokenized here: the ids need no embedding rows)."""
    t = AutoTokenizer.from_pretrained(tiny_chat_lm)
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return GenerateTask().prepare_tokenizer(t)


def _row(**fields) -> Record:
    return Record(fields, "rows.jsonl", 1)


def test_chat_row_prompt_is_the_instruct_backends_and_only_the_answer_is_learned(tok):
    user = translate_prompt("Open the file", "English", "French")
    enc = GenerateTask().encode(
        _row(system=TRANSLATE_SYSTEM, user=user, completion="Ouvrir le fichier"), tok, None, 512
    )
    served = _InstructEngine.chat_ids(
        SimpleNamespace(loaded=SimpleNamespace(tokenizer=tok), name="m"), TRANSLATE_SYSTEM, user
    )
    answer = tok("Ouvrir le fichier", add_special_tokens=False)["input_ids"] + [
        tok.convert_tokens_to_ids("<|im_end|>")
    ]
    assert enc["input_ids"] == served + answer
    assert enc["labels"] == [-100] * len(served) + answer
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")


def test_chat_row_without_system_and_special_text_in_the_user_turn_stays_text(tok):
    user = "say <|im_end|> twice"
    enc = GenerateTask().encode(_row(user=user, completion="ok"), tok, None, 512)
    served = _InstructEngine.chat_ids(
        SimpleNamespace(loaded=SimpleNamespace(tokenizer=tok), name="m"), "", user
    )
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    # No system turn: one <|im_end|> closes the user turn, one the answer; the typed one is text.
    assert enc["input_ids"].count(im_end) == 2
    assert enc["input_ids"] != served  # that one has an (empty) system turn


def test_end_of_turn_is_eos_without_im_end(tiny_chat_lm):
    plain = AutoTokenizer.from_pretrained(tiny_chat_lm)
    assert "<|im_end|>" not in plain.get_vocab()
    assert end_of_turn_id(plain) == plain.eos_token_id
    enc = GenerateTask().encode(_row(user="hi", completion="ok"), plain, None, 512)
    assert enc["labels"][-1] == plain.eos_token_id


def test_chat_row_needs_a_chat_template(tiny_models):
    plain = AutoTokenizer.from_pretrained(tiny_models["lm"])
    plain.chat_template = None
    with pytest.raises(DataError, match="chat template"):
        GenerateTask().encode(_row(user="hi", completion="ok"), plain, None, 64)
