"""Plain request/result types. Nothing below the servicer sees a protobuf."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Task(str, enum.Enum):
    GENERATE = "generate"
    CLASSIFY = "classify"
    SENTIMENT = "sentiment"
    TRANSLATE = "translate"


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"


@dataclass(frozen=True)
class Constraint:
    """What the output must be: `kind` is one of CONSTRAINT_KINDS; `value` is the JSON schema
    text, the regular expression, the EBNF grammar, for "choice" a JSON list of strings, and ""
    for "json_object" (any JSON object)."""

    kind: str
    value: str


CONSTRAINT_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False
    # Structured output and the controls peers have (issue 20).
    n: int = 1  # completions per prompt (one tokenization; identical prompts share a prefill)
    top_logprobs: int = 0  # alternatives per generated token, with their logprobs (implies logprobs)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit); -100 bans
    constraint: Constraint | None = None
    # The LoRA adapter of the request's model to decode with ("" = the base model; issue 21).
    adapter: str = ""

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class TokenPrompt:
    """A prompt given as token ids (a rendered chat), named in errors by `what`."""

    ids: tuple[int, ...]
    what: str


@dataclass(frozen=True)
class TokenLogprob:
    id: int
    text: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()  # (id, text, logprob) alternatives, best first


@dataclass
class Generation:
    text: str
    generated_tokens: int
    finish_reason: FinishReason
    prompt_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class StreamChunk:
    """One step of a streamed generation: new text, or (last) the final result."""

    text: str = ""
    tokens: tuple[TokenLogprob, ...] = ()
    final: Generation | None = None


@dataclass(frozen=True)
class LabelScore:
    label: str
    score: float


@dataclass(frozen=True)
class SentimentResult:
    label: str
    score: float
    raw_label: str


@dataclass(frozen=True)
class Translation:
    text: str


@dataclass
class ModelInfo:
    name: str
    task: Task
    quantization: str
    dtype: str
    device: str
    parameter_count: int
    memory_bytes: int
    labels: list[str]
    architecture: str
    max_context: int
    ready: bool
    path: str
    quality_report_json: str = ""
    engine: str = ""  # the engine process holding the weights (shared by models with the same)
    device_map: dict[str, str] = field(default_factory=dict)
    # LoRA adapters: {"name", "path", "rank", "resident"} each, sorted by name.
    adapters: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class GenerationRequest:
    """What the front sends for one prompt (plain data; crosses the process boundary)."""

    rid: int
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop_ids: tuple[int, ...] = ()  # token ids that end the answer (besides the model's EOS)
    deadline: float | None = None  # time.monotonic() value (one clock for all processes)
    client: str = ""  # who asked: admission is fair across clients


@dataclass(frozen=True)
class Tokenized:
    """One text through the model's tokenizer: ids with their character spans and spellings."""

    text: str
    ids: tuple[int, ...]
    offsets: tuple[tuple[int, int], ...]  # [start, end) in characters, one per id
    tokens: tuple[str, ...]
