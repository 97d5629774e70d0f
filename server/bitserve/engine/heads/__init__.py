"""The engine process's half of each (task, backend): which transformers class loads the
checkpoint, and what runs its batches - a task head's runner, or (None) the shared generation
scheduler. The front's per-task classes (`bitserve.frontend`) never run here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from bitserve.errors import InvalidArgument
from bitserve.models.loaded import LoadedModel
from bitserve.types import Task


class BatchRunner(Protocol):
    def run_batch(self, items: list[Any]) -> list[Any]: ...


def _classifier(loaded: LoadedModel) -> BatchRunner:
    from bitserve.engine.heads.classifier import HeadScoreRunner

    return HeadScoreRunner(loaded)


def _seq2seq(loaded: LoadedModel) -> BatchRunner:
    from bitserve.engine.heads.seq2seq import Seq2SeqRunner

    return Seq2SeqRunner(loaded)


@dataclass(frozen=True)
class ModelHalf:
    auto_class: str  # a transformers AutoModel class name
    runner: Callable[[LoadedModel], BatchRunner] | None  # None: the generation scheduler serves it

    def model_class(self) -> Any:
        import transformers

        return getattr(transformers, self.auto_class)


_CAUSAL = "AutoModelForCausalLM"
HALVES: dict[tuple[Task, str], ModelHalf] = {
    (Task.GENERATE, "head"): ModelHalf(_CAUSAL, None),
    (Task.CLASSIFY, "instruct"): ModelHalf(_CAUSAL, None),
    (Task.SENTIMENT, "instruct"): ModelHalf(_CAUSAL, None),
    (Task.TRANSLATE, "instruct"): ModelHalf(_CAUSAL, None),
    (Task.CLASSIFY, "head"): ModelHalf("AutoModelForSequenceClassification", _classifier),
    (Task.SENTIMENT, "head"): ModelHalf("AutoModelForSequenceClassification", _classifier),
    (Task.TRANSLATE, "head"): ModelHalf("AutoModelForSeq2SeqLM", _seq2seq),
}


def model_half(task: Task, backend: str) -> ModelHalf:
    try:
        return HALVES[(task, backend)]
    except KeyError:
        known = sorted(f"{t.value}/{b}" for t, b in HALVES)
        raise InvalidArgument(
            f"no engine serves task {task.value!r} with backend {backend!r}; known: {known}"
        ) from None
