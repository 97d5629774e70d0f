"""Tiny, real Hugging Face checkpoints built offline.

Tests and CPU benchmarks need checkpoints that load through the same Auto classes as real
ones, without a hub. Everything here is random-weight but deterministic (fixed seeds), and the
tokenizer is trained on a small embedded corpus with the `tokenizers` library.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is a tiny model for bitserve tests.",
    "I love this movie, it was wonderful and great.",
    "This was a terrible, awful and boring film.",
    "The team won the football match last night.",
    "Stock markets fell as the bank raised interest rates.",
    "The new phone has a faster chip and a better screen.",
    "Parliament voted on the new election law today.",
    "translate English to French: the house is blue.",
    "la maison est bleue. le chat est noir. bonjour le monde.",
    "Once upon a time there was a little model that served tokens.",
    "0123456789 !?.,;:'\"()[]{}<>/\\|@#$%^&*-+=_~`",
]

SPECIAL = ["<pad>", "</s>", "<unk>", "<s>", "[CLS]", "[SEP]", "[MASK]"]


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer (any text encodes, no unknown tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="<s>",
        model_max_length=128,
    )


def _with_post(tokenizer, template: str, specials: list[str]):
    from tokenizers import processors

    ids = [(s, tokenizer.convert_tokens_to_ids(s)) for s in specials]
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single=template, special_tokens=ids)
    return tokenizer


def build_causal_lm(
    path: str | Path, *, seed: int = 0, max_positions: int = 128, tokenizer: Any = None
) -> Path:
    """A Llama-style causal LM (rotary positions, so left padding is handled by position ids).
    `tokenizer`: another vocabulary than the tiny one (a real model's, for its size)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer() if tokenizer is None else tokenizer
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform logits; scale the head so greedy choices are well separated.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def build_classifier(
    path: str | Path,
    labels: list[str],
    *,
    seed: int = 0,
    multi_label: bool = False,
) -> Path:
    """A BERT-style sequence classifier with named labels."""
    from transformers import BertConfig, BertForSequenceClassification

    path = Path(path)
    tokenizer = _with_post(build_tokenizer(), "[CLS] $A [SEP]", ["[CLS]", "[SEP]"])
    tokenizer.cls_token = "[CLS]"
    tokenizer.sep_token = "[SEP]"
    tokenizer.mask_token = "[MASK]"
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        problem_type="multi_label_classification" if multi_label else "single_label_classification",
    )
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        model.classifier.weight.mul_(20.0)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def build_seq2seq(path: str | Path, *, seed: int = 0) -> Path:
    """A T5-style encoder-decoder; the task prefix ("translate English to French: ") selects
    the direction, as in T5 checkpoints."""
    from transformers import T5Config, T5ForConditionalGeneration

    path = Path(path)
    tokenizer = _with_post(build_tokenizer(), "$A </s>", ["</s>"])
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config.decoder_start_token_id = tokenizer.pad_token_id
    # transformers 5's T5Config always ties the embeddings and reads a `tie_word_embeddings=False`
    # kwarg as "do not scale decoder outputs"; say that directly (the checkpoint stays as built).
    config.scale_decoder_outputs = False
    model = T5ForConditionalGeneration(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
        # An untrained decoder would emit only padding; keep it producing visible tokens.
        model.lm_head.weight[tokenizer.pad_token_id].zero_()
    model.generation_config.decoder_start_token_id = tokenizer.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def build_all(root: str | Path) -> dict[str, Path]:
    """Every tiny checkpoint the test-suite and the CPU benchmarks use."""
    root = Path(root)
    return {
        "lm": build_causal_lm(root / "lm"),
        "topics": build_classifier(root / "topics", ["business", "sports", "politics", "tech"]),
        "tags": build_classifier(root / "tags", ["red", "green", "blue"], multi_label=True, seed=1),
        "sentiment": build_classifier(root / "sentiment", ["NEGATIVE", "POSITIVE"], seed=2),
        "t5": build_seq2seq(root / "t5"),
    }


if __name__ == "__main__":  # pragma: no cover
    import sys

    for name, p in build_all(sys.argv[1] if len(sys.argv) > 1 else "tiny-models").items():
        print(name, p)
