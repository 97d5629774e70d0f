"""What the clients return: plain frozen dataclasses, read from the response messages here only."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from bitserve_proto.v1 import inference_pb2 as pb

_FINISH = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_EOS: "eos",
    pb.FINISH_REASON_UNSPECIFIED: "",
}
_TASK = {
    pb.TASK_GENERATE: "generate",
    pb.TASK_CLASSIFY: "classify",
    pb.TASK_SENTIMENT: "sentiment",
    pb.TASK_TRANSLATE: "translate",
    pb.TASK_UNSPECIFIED: "",
}


@dataclass(frozen=True)
class TopLogprob:
    """One of the most likely tokens at a step (`top_logprobs`)."""

    id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    id: int
    text: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()  # the step's most likely tokens, best first (top_logprobs)


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: str  # "length" | "stop" | "eos"
    tokens: int  # generated tokens
    prompt_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class StreamEvent:
    """One streamed piece: `.text` of the new token(s); the last one has `.final` set."""

    text: str
    tokens: tuple[TokenLogprob, ...] = ()
    final: Generation | None = None


@dataclass(frozen=True)
class LabelScore:
    label: str
    score: float


@dataclass(frozen=True)
class Sentiment:
    label: str  # "positive" | "negative" | "neutral"
    score: float
    raw_label: str


@dataclass(frozen=True)
class Translation:
    text: str


@dataclass(frozen=True)
class ModelInfo:
    name: str
    task: str
    quantization: str
    dtype: str
    device: str
    parameter_count: int
    memory_bytes: int
    labels: tuple[str, ...]
    architecture: str
    max_context: int
    ready: bool
    path: str
    quality_report_json: str = ""
    engine: str = ""  # models with the same engine share one copy of the weights
    extra: dict[str, Any] = field(default_factory=dict)
    device_map: dict[str, str] = field(default_factory=dict)  # module -> device when spread
    adapters: tuple[AdapterInfo, ...] = ()  # LoRA adapters a request may name (revision 4)


@dataclass(frozen=True)
class AdapterInfo:
    """A LoRA adapter of a model: its directory on the server, rank, and whether it is on the
    device now (a request for one that is not reloads it)."""

    name: str
    path: str
    rank: int
    resident: bool


def adapter_info(a: pb.AdapterInfo) -> AdapterInfo:
    return AdapterInfo(name=a.name, path=a.path, rank=a.rank, resident=a.resident)


@dataclass(frozen=True)
class ServerInfo:
    """The server's release and the contract revision it speaks (1: a server from before
    versions were reported)."""

    version: str
    contract_revision: int


def logprobs(items: Iterable[pb.TokenLogprob]) -> tuple[TokenLogprob, ...]:
    return tuple(
        TokenLogprob(t.id, t.text, t.logprob, tuple(TopLogprob(a.id, a.text, a.logprob) for a in t.top))
        for t in items
    )


def generation(g: pb.Generation) -> Generation:
    return Generation(
        text=g.text,
        finish_reason=_FINISH[g.finish_reason],
        tokens=g.generated_tokens,
        prompt_tokens=g.prompt_tokens,
        logprobs=logprobs(g.logprobs),
    )


def event(m: pb.GenerateStreamResponse) -> StreamEvent:
    final = generation(m.final) if m.HasField("final") else None
    return StreamEvent(text=m.text, tokens=logprobs(m.tokens), final=final)


def model_info(m: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=m.name,
        task=_TASK[m.task],
        quantization=m.quantization,
        dtype=m.dtype,
        device=m.device,
        parameter_count=m.parameter_count,
        memory_bytes=m.memory_bytes,
        labels=tuple(m.labels),
        architecture=m.architecture,
        max_context=m.max_context,
        ready=m.ready,
        path=m.path,
        quality_report_json=m.quality_report_json,
        engine=m.engine,
        device_map=dict(m.device_map),
        adapters=tuple(adapter_info(a) for a in m.adapters),
    )


def server_info(r: pb.ListModelsResponse) -> ServerInfo:
    # A server older than revision 2 leaves both fields unset.
    return ServerInfo(version=r.server_version or "unknown", contract_revision=max(r.contract_revision, 1))
