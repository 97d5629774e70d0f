"""One small object per task: which columns it reads, how a record becomes tensors, how a
model is scored. A registry keyed by task name; train, export and report never branch on task.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .data import Dataset, Record, require_columns
from .errors import DataError, TaskMismatch

Metrics = dict[str, float]


@dataclass
class Scored:
    metrics: Metrics
    examples: int
    seconds: float

    @property
    def examples_per_s(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0


class Task:
    name: ClassVar[str]
    auto_class_name: ClassVar[str]
    peft_task_type: ClassVar[str]
    # Architectures ending with these serve this task; a checkpoint with another task's head is refused.
    heads: ClassVar[tuple[str, ...]]
    columns: ClassVar[tuple[tuple[str, ...], ...]]
    primary_metric: ClassVar[str]
    higher_is_better: ClassVar[bool] = True
    # Heads of other tasks this task may replace: a causal LM fine-tuned as a classifier gets a
    # new classification head on the same decoder.
    replaces: ClassVar[tuple[str, ...]] = ()

    @property
    def auto_class(self) -> Any:
        import transformers

        return getattr(transformers, self.auto_class_name)

    # --- checks -------------------------------------------------------------------------
    def check_checkpoint(self, config: Any, path: str) -> None:
        archs = list(getattr(config, "architectures", None) or [])
        all_heads = {h for t in TASKS.values() for h in t.heads}
        declared = [a for a in archs if any(a.endswith(h) for h in all_heads)]
        if declared and not any(a.endswith(h) for a in declared for h in self.heads + self.replaces):
            other = next(t.name for t in TASKS.values() if any(declared[0].endswith(h) for h in t.heads))
            raise TaskMismatch(
                f"{path}: checkpoint is a {declared[0]} ({other} task); it cannot be used for --task {self.name}"
            )
        if type(config) not in self.auto_class._model_mapping:
            raise TaskMismatch(
                f"{path}: model type {config.model_type!r} has no {self.auto_class_name} head; "
                f"it cannot be used for --task {self.name}"
            )

    def validate(self, dataset: Dataset) -> None:
        require_columns(dataset, self.columns)

    def check_labels(self, dataset: Dataset, label2id: Mapping[str, int]) -> None:
        """Eval data may only use labels the model knows (classification only)."""

    def model_kwargs(self, labels: Sequence[str] | None) -> dict[str, Any]:
        return {}

    def prepare_tokenizer(self, tokenizer: Any) -> Any:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    # --- tensors ------------------------------------------------------------------------
    def encode(self, record: Record, tokenizer: Any, config: Any, max_length: int) -> dict[str, list[int]]:
        raise NotImplementedError

    def collate(self, features: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
        """Right-pad every list field; labels pad with -100 (ignored by the loss)."""
        out: dict[str, torch.Tensor] = {}
        for key in features[0]:
            if key == "labels" and not isinstance(features[0][key], list):
                out[key] = torch.tensor([f[key] for f in features])
                continue
            width = max(len(f[key]) for f in features)
            fill = -100 if key == "labels" else (0 if key == "attention_mask" else pad_id)
            out[key] = torch.tensor([f[key] + [fill] * (width - len(f[key])) for f in features])
        return out

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        """How many targets (tokens or examples) the batch's mean loss averages over."""
        return int((batch["labels"] != -100).sum())

    def cut(self, record: Record, tokenizer: Any, max_length: int) -> bool:
        """Whether `max_length` cuts off part of what the record teaches (its completion)."""
        return False

    # --- scoring ------------------------------------------------------------------------
    def evaluate(
        self,
        model: Any,
        tokenizer: Any,
        dataset: Dataset,
        *,
        batch_size: int,
        max_length: int,
        autocast: Callable[[], Any],
    ) -> Scored:
        raise NotImplementedError


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _device_of(model: Any) -> torch.device:
    return next(p.device for p in model.parameters())


def _timed(batches: list[Any], run: Callable[[Any], None], warm_up: Callable[[Any], None]) -> float:
    """Seconds to `run` every (already tokenized) batch, after one untimed `warm_up` pass.

    The first call on a device pays one-off costs (CUDA context, kernel selection, bitsandbytes
    state); without a warm-up the first mode of a report would look slower than it is.
    """
    if batches:
        with torch.no_grad():
            warm_up(batches[0])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            run(b)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _truncate(ids: list[int], max_length: int) -> list[int]:
    return ids[:max_length]


class GenerateTask(Task):
    name = "generate"
    auto_class_name = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"
    heads = ("ForCausalLM",)
    # prompt/completion: plain text; user/completion (+ optional system): a chat turn, the prompt
    # rendered by the tokenizer's chat template exactly as the server's instruct backend renders
    # it, the completion the assistant's answer ended by the end-of-turn token; text: plain LM.
    columns = (("prompt", "completion"), ("user", "completion"), ("text",))
    primary_metric = "perplexity"
    higher_is_better = False

    def encode(self, record, tokenizer, config, max_length):
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        if "completion" in record.fields and ("prompt" in record.fields or "user" in record.fields):
            if "prompt" in record.fields:
                prompt = tokenizer(record.text("prompt"))["input_ids"]
            else:
                prompt = chat_prompt_ids(tokenizer, record)
                eos = [end_of_turn_id(tokenizer)]
            completion = tokenizer(record.text("completion"), add_special_tokens=False)["input_ids"] + eos
            # The completion is what is learned: the prompt gives way first, from the left (its
            # end is the context nearest the answer). One prompt token always stays, since the
            # first position is never a target.
            keep = min(len(completion), max(max_length - 1, 0))
            completion = completion[:keep]
            prompt = prompt[-(max_length - keep) :] if max_length > keep else []
            ids = prompt + completion
            # Loss on the completion only: the prompt is context, not a target.
            labels = [-100] * len(prompt) + completion
        else:
            ids = _truncate(tokenizer(record.text("text"))["input_ids"] + eos, max_length)
            labels = list(ids)
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    def count_targets(self, batch):
        return int((batch["labels"][:, 1:] != -100).sum())  # the loss shifts labels by one

    def cut(self, record, tokenizer, max_length):
        """Whether `max_length` cuts the completion (and its EOS) of a prompt/completion record."""
        if "completion" not in record.fields or not ("prompt" in record.fields or "user" in record.fields):
            return False
        n = len(tokenizer(record.text("completion"), add_special_tokens=False)["input_ids"]) + 1
        return n > max_length - 1

    def evaluate(self, model, tokenizer, dataset, *, batch_size, max_length, autocast):
        device = _device_of(model)
        feats = [self.encode(r, tokenizer, model.config, max_length) for r in dataset.records]
        batches = [
            {k: v.to(device) for k, v in self.collate(chunk, tokenizer.pad_token_id).items()}
            for chunk in _batches(feats, batch_size)
        ]
        sums = {"nll": 0.0, "tokens": 0}

        def forward(batch):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            with autocast():
                return model(**inputs).logits

        def score(batch):
            shift_logits = forward(batch)[:, :-1].float()
            shift_labels = batch["labels"][:, 1:]
            sums["nll"] += torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)),
                shift_labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            ).item()
            sums["tokens"] += int((shift_labels != -100).sum())

        seconds = _timed(batches, score, forward)
        tokens = int(sums["tokens"])
        loss = sums["nll"] / max(tokens, 1)
        return Scored(
            {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens_per_s": tokens / seconds},
            len(feats),
            seconds,
        )


def chat_prompt_ids(tokenizer: Any, record: Record) -> list[int]:
    """A chat record's prompt ids, as `bitserve.frontend.instruct` builds them at inference: the
    system (if any) and user turns through the chat template, ending where the answer begins."""
    from bitserve.frontend import chat

    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            record.path,
            "a user/completion record needs a tokenizer with a chat template (use prompt/completion)",
            line=record.line,
            column="user",
        )
    messages = [chat.ChatMessage("user", record.text("user"))]
    if record.get("system") is not None:
        messages.insert(0, chat.ChatMessage("system", record.text("system")))
    return chat.prompt_ids(tokenizer, messages, "finetune", add_special_tokens=False)


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that ends an assistant turn: ChatML's `<|im_end|>` where the vocabulary has it
    (the instruct backend stops there), else EOS."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        return im_end
    if tokenizer.eos_token_id is None:
        raise DataError("tokenizer", "no end-of-turn token: the tokenizer has neither <|im_end|> nor EOS")
    return int(tokenizer.eos_token_id)


class ClassifyTask(Task):
    name = "classify"
    auto_class_name = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"
    heads = ("ForSequenceClassification",)
    replaces = ("ForCausalLM",)
    columns = (("text", "label"),)
    primary_metric = "accuracy"

    def check_labels(self, dataset, label2id):
        known = label2id
        for r in dataset.records:
            label = r.text("label")
            if label not in known:
                raise DataError(
                    r.path,
                    f"unknown label {label!r}; the model knows {', '.join(sorted(known))}",
                    line=r.line,
                    column="label",
                )

    def model_kwargs(self, labels):
        if not labels:
            return {}
        return {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)},
        }

    def encode(self, record, tokenizer, config, max_length):
        enc = tokenizer(record.text("text"), truncation=True, max_length=max_length)
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": config.label2id[record.text("label")],
        }

    def evaluate(self, model, tokenizer, dataset, *, batch_size, max_length, autocast):
        self.check_labels(dataset, model.config.label2id)
        device = _device_of(model)
        feats = [self.encode(r, tokenizer, model.config, max_length) for r in dataset.records]
        batches = [
            {k: v.to(device) for k, v in self.collate(chunk, tokenizer.pad_token_id).items()}
            for chunk in _batches(feats, batch_size)
        ]
        gold: list[int] = [g for b in batches for g in b["labels"].tolist()]
        pred: list[int] = []

        def forward(batch):
            with autocast():
                return model(**{k: v for k, v in batch.items() if k != "labels"}).logits

        seconds = _timed(batches, lambda b: pred.extend(forward(b).argmax(-1).tolist()), forward)
        return Scored(
            {"accuracy": accuracy(gold, pred), "macro_f1": macro_f1(gold, pred)}, len(feats), seconds
        )


class SentimentTask(ClassifyTask):
    name = "sentiment"


class TranslateTask(Task):
    name = "translate"
    auto_class_name = "AutoModelForSeq2SeqLM"
    peft_task_type = "SEQ_2_SEQ_LM"
    heads = ("ForConditionalGeneration", "ForSeq2SeqLM")
    columns = (("source", "target"),)
    primary_metric = "chrf"

    def check_checkpoint(self, config, path):
        if not getattr(config, "is_encoder_decoder", False):
            raise TaskMismatch(
                f"{path}: --task translate needs an encoder-decoder checkpoint, not {config.model_type!r}"
            )
        super().check_checkpoint(config, path)

    def encode(self, record, tokenizer, config, max_length):
        enc = tokenizer(record.text("source"), truncation=True, max_length=max_length)
        labels = tokenizer(text_target=record.text("target"), truncation=True, max_length=max_length)
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": labels["input_ids"],
        }

    def evaluate(self, model, tokenizer, dataset, *, batch_size, max_length, autocast):
        import sacrebleu

        device = _device_of(model)
        hyps: list[str] = []
        refs = [r.text("target") for r in dataset.records]
        # Tokenized before the clock starts: the throughput is the model's, not the tokenizer's.
        batches = [
            tokenizer(
                [r.text("source") for r in chunk],
                truncation=True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            ).to(device)
            for chunk in _batches(dataset.records, batch_size)
        ]
        outputs: list[torch.Tensor] = []

        def generate(enc):
            with autocast():
                return model.generate(**enc, max_new_tokens=max_length, do_sample=False, num_beams=1)

        seconds = _timed(batches, lambda enc: outputs.append(generate(enc)), generate)
        for out in outputs:
            hyps += tokenizer.batch_decode(out, skip_special_tokens=True)
        return Scored(
            {
                "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score,
                "bleu": sacrebleu.corpus_bleu(hyps, [refs]).score,
            },
            len(refs),
            seconds,
        )


def accuracy(gold: Sequence[int], pred: Sequence[int]) -> float:
    return sum(g == p for g, p in zip(gold, pred, strict=True)) / max(len(gold), 1)


def macro_f1(gold: Sequence[int], pred: Sequence[int]) -> float:
    """Unweighted mean F1 over every class seen in gold or predictions."""
    classes = sorted(set(gold) | set(pred))
    scores = []
    for c in classes:
        tp = sum(g == c and p == c for g, p in zip(gold, pred, strict=True))
        fp = sum(g != c and p == c for g, p in zip(gold, pred, strict=True))
        fn = sum(g == c and p != c for g, p in zip(gold, pred, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / max(len(scores), 1)


TASKS: dict[str, Task] = {
    t.name: t for t in (GenerateTask(), ClassifyTask(), SentimentTask(), TranslateTask())
}


def get(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise TaskMismatch(f"unknown task {name!r}; expected one of {', '.join(TASKS)}") from None


def infer(config: Any, path: str) -> Task:
    """The task a checkpoint's architecture declares (classify for any sequence classifier)."""
    for arch in getattr(config, "architectures", None) or []:
        for t in TASKS.values():
            if t.name != "sentiment" and any(arch.endswith(h) for h in t.heads):
                return t
    raise TaskMismatch(f"{path}: cannot tell the task from the checkpoint; pass --task")
