"""Protobuf <-> plain types, and request validation that names the field and the limit.

The only module (with the servicer) that touches protobuf messages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from bitserve.errors import MAX_ECHO_CHARS, InvalidArgument
from bitserve.settings import ServerSettings
from bitserve.types import (
    FinishReason,
    Generation,
    LabelScore,
    ModelInfo,
    SamplingParams,
    SentimentResult,
    StreamChunk,
    Task,
    TokenLogprob,
    Translation,
)
from bitserve_proto.v1 import inference_pb2 as pb

MAX_STOP_SEQUENCES = 16
MAX_LANGUAGE_CODE_CHARS = 32

_TASK_TO_PB = {
    Task.GENERATE: pb.TASK_GENERATE,
    Task.CLASSIFY: pb.TASK_CLASSIFY,
    Task.SENTIMENT: pb.TASK_SENTIMENT,
    Task.TRANSLATE: pb.TASK_TRANSLATE,
}
_FINISH_TO_PB = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
}


# requests -------------------------------------------------------------------------------------
def check_request_size(request: Any, server: ServerSettings) -> None:
    """The per-request byte budget (texts x characters), checked before any work."""
    size = request.ByteSize()
    if size > server.max_request_bytes:
        raise InvalidArgument(
            f"request is {size} bytes; the limit is server.max_request_bytes={server.max_request_bytes} "
            "(send fewer or shorter texts per request)"
        )


def model_name_from(name: str) -> str:
    if len(name) > MAX_ECHO_CHARS:
        raise InvalidArgument(
            f"model: the name is {len(name)} characters; model names are at most {MAX_ECHO_CHARS}"
        )
    return name


def check_fits_queue(n_texts: int, model: str, max_queue_size: int) -> None:
    """More texts than the queue holds can never be admitted: that is the caller's to fix."""
    if n_texts > max_queue_size:
        raise InvalidArgument(
            f"texts: {n_texts} texts can never fit model {model!r}'s queue "
            f"(max_queue_size={max_queue_size}); send at most {max_queue_size} per request"
        )


def language_from(field: str, code: str) -> str | None:
    if len(code) > MAX_LANGUAGE_CODE_CHARS:
        raise InvalidArgument(
            f"{field} is {len(code)} characters; language codes are at most {MAX_LANGUAGE_CODE_CHARS}"
        )
    return code or None


def texts_from(texts: Sequence[str], server: ServerSettings, *, exactly_one: bool = False) -> list[str]:
    out = list(texts)
    if not out:
        raise InvalidArgument("texts: at least one text is required")
    if exactly_one and len(out) != 1:
        raise InvalidArgument(f"texts: GenerateStream takes exactly one text, got {len(out)}")
    if len(out) > server.max_texts_per_request:
        raise InvalidArgument(
            f"texts: {len(out)} texts exceed the limit of {server.max_texts_per_request} per request"
        )
    for i, t in enumerate(out):
        if not t.strip():
            raise InvalidArgument(f"texts[{i}] is empty")
        if len(t) > server.max_text_chars:
            raise InvalidArgument(f"texts[{i}] is {len(t)} characters; the limit is {server.max_text_chars}")
    return out


def sampling_from(
    p: pb.GenerationParameters, default_max_new_tokens: int, max_stop_chars: int | None = None
) -> SamplingParams:
    def bad(field: str, rule: str, value: object) -> InvalidArgument:
        return InvalidArgument(f"parameters.{field} must be {rule}, got {value}")

    for field in ("temperature", "top_p", "repetition_penalty"):
        v = getattr(p, field)
        if not math.isfinite(v):
            raise bad(field, "a finite number", v)
    if p.temperature < 0 or p.temperature > 100:
        raise bad("temperature", "in [0, 100] (0 = greedy)", p.temperature)
    if p.top_p < 0 or p.top_p > 1:
        raise bad("top_p", "in (0, 1] (0 = off)", p.top_p)
    if p.repetition_penalty < 0:
        raise bad("repetition_penalty", "> 0 (0 = off)", p.repetition_penalty)
    if len(p.stop) > MAX_STOP_SEQUENCES:
        raise bad("stop", f"at most {MAX_STOP_SEQUENCES} sequences", len(p.stop))
    for i, s in enumerate(p.stop):
        if not s:
            raise InvalidArgument(f"parameters.stop[{i}] is empty")
    stop_chars = sum(len(s) for s in p.stop)
    if max_stop_chars is not None and stop_chars > max_stop_chars:
        raise InvalidArgument(
            f"parameters.stop: {stop_chars} characters in all; the limit is "
            f"server.max_stop_chars={max_stop_chars}"
        )
    return SamplingParams(
        max_new_tokens=p.max_new_tokens or default_max_new_tokens,
        temperature=float(p.temperature),
        top_k=int(p.top_k),
        top_p=float(p.top_p) if 0 < p.top_p < 1 else 1.0,
        repetition_penalty=float(p.repetition_penalty) if p.repetition_penalty > 0 else 1.0,
        stop=tuple(p.stop),
        seed=int(p.seed) if p.HasField("seed") else None,
        logprobs=bool(p.logprobs),
    )


def candidate_labels_from(labels: Sequence[str], server: ServerSettings) -> list[str]:
    if len(labels) > server.max_candidate_labels:
        raise InvalidArgument(
            f"candidate_labels: {len(labels)} labels exceed the limit of "
            f"server.max_candidate_labels={server.max_candidate_labels}"
        )
    out = [label.strip() for label in labels]
    for i, label in enumerate(out):
        if not label:
            raise InvalidArgument(f"candidate_labels[{i}] is empty")
        if len(label) > server.max_label_chars:
            raise InvalidArgument(
                f"candidate_labels[{i}] is {len(label)} characters; the limit is "
                f"server.max_label_chars={server.max_label_chars}"
            )
    if len(set(out)) != len(out):
        raise InvalidArgument("candidate_labels: labels must be distinct")
    return out


# results --------------------------------------------------------------------------------------
def _logprobs_pb(items: Sequence[TokenLogprob]) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(id=t.id, text=t.text, logprob=t.logprob) for t in items]


def generation_pb(g: Generation) -> pb.Generation:
    return pb.Generation(
        text=g.text,
        generated_tokens=g.generated_tokens,
        finish_reason=_FINISH_TO_PB[g.finish_reason],
        prompt_tokens=g.prompt_tokens,
        logprobs=_logprobs_pb(g.logprobs),
    )


def generate_response(model: str, gens: Sequence[Generation]) -> pb.GenerateResponse:
    return pb.GenerateResponse(model=model, generations=[generation_pb(g) for g in gens])


def stream_response(model: str, chunk: StreamChunk) -> pb.GenerateStreamResponse:
    msg = pb.GenerateStreamResponse(model=model, text=chunk.text, tokens=_logprobs_pb(chunk.tokens))
    if chunk.final is not None:
        msg.final.CopyFrom(generation_pb(chunk.final))
    return msg


def classify_response(
    model: str, results: Sequence[Sequence[LabelScore]], multi_label: bool
) -> pb.ClassifyResponse:
    return pb.ClassifyResponse(
        model=model,
        multi_label=multi_label,
        results=[
            pb.Classification(labels=[pb.LabelScore(label=s.label, score=s.score) for s in r])
            for r in results
        ],
    )


def sentiment_response(model: str, results: Sequence[SentimentResult]) -> pb.SentimentResponse:
    return pb.SentimentResponse(
        model=model,
        results=[pb.SentimentResult(label=r.label, score=r.score, raw_label=r.raw_label) for r in results],
    )


def translate_response(model: str, results: Sequence[Translation]) -> pb.TranslateResponse:
    return pb.TranslateResponse(model=model, results=[pb.Translation(text=r.text) for r in results])


def model_info_pb(m: ModelInfo, *, with_path: bool = True) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=m.name,
        task=_TASK_TO_PB[m.task],
        quantization=m.quantization,
        dtype=m.dtype,
        device=m.device,
        parameter_count=m.parameter_count,
        memory_bytes=m.memory_bytes,
        labels=m.labels,
        architecture=m.architecture,
        max_context=m.max_context,
        ready=m.ready,
        quality_report_json=m.quality_report_json,
        path=m.path if with_path else "",
        engine=m.engine,
        device_map=m.device_map,
    )
