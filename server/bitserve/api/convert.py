"""Protobuf <-> plain types, and request validation that names the field and the limit.

The only module (with the servicer) that touches protobuf messages.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from bitserve.api import checks
from bitserve.errors import InvalidArgument
from bitserve.settings import ServerSettings
from bitserve.types import (
    Constraint,
    FinishReason,
    Generation,
    LabelScore,
    ModelInfo,
    SamplingParams,
    SentimentResult,
    StreamChunk,
    Task,
    Tokenized,
    TokenLogprob,
    Translation,
)
from bitserve_proto.v1 import inference_pb2 as pb

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
# The checks themselves are shared with the HTTP front (`api.checks`); these adapt messages.
def check_request_size(request: Any, server: ServerSettings) -> None:
    """The per-request byte budget (texts x characters), checked before any work."""
    checks.check_size(request.ByteSize(), server)


model_name_from = checks.model_name
check_fits_queue = checks.fits_queue


def language_from(field: str, code: str) -> str | None:
    if len(code) > MAX_LANGUAGE_CODE_CHARS:
        raise InvalidArgument(
            f"{field} is {len(code)} characters; language codes are at most {MAX_LANGUAGE_CODE_CHARS}"
        )
    return code or None


def texts_from(texts: Sequence[str], server: ServerSettings, *, exactly_one: bool = False) -> list[str]:
    return checks.texts(texts, server, exactly_one="GenerateStream" if exactly_one else None)


def sampling_from(
    p: pb.GenerationParameters, default_max_new_tokens: int, max_stop_chars: int | None = None
) -> SamplingParams:
    return checks.sampling(
        default_max_new_tokens,
        max_new_tokens=p.max_new_tokens,
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        repetition_penalty=p.repetition_penalty,
        stop=p.stop,
        seed=int(p.seed) if p.HasField("seed") else None,
        logprobs=p.logprobs,
        n=int(p.n) or 1,
        top_logprobs=int(p.top_logprobs),
        logit_bias=sorted((int(t), float(b)) for t, b in p.logit_bias.items()),
        constraint=constraint_from(p.constraint) if p.HasField("constraint") else None,
        max_stop_chars=max_stop_chars,
    )


def constraint_from(c: pb.Constraint) -> Constraint | None:
    kind = c.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "choice":
        return Constraint("choice", json.dumps(list(c.choice.options)))
    if kind == "json_object":
        return Constraint("json_object", "") if c.json_object else None
    return Constraint(kind, str(getattr(c, kind)))


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
    return [
        pb.TokenLogprob(
            id=t.id,
            text=t.text,
            logprob=t.logprob,
            top=[pb.TopLogprob(id=i, text=x, logprob=v) for i, x, v in t.top],
        )
        for t in items
    ]


def generation_pb(g: Generation) -> pb.Generation:
    return pb.Generation(
        text=g.text,
        generated_tokens=g.generated_tokens,
        finish_reason=_FINISH_TO_PB[g.finish_reason],
        prompt_tokens=g.prompt_tokens,
        logprobs=_logprobs_pb(g.logprobs),
    )


def chat_response(model: str, gens: Sequence[Generation]) -> pb.ChatResponse:
    out = pb.ChatResponse(model=model, generation=generation_pb(gens[0]))
    if len(gens) > 1:
        out.generations.extend(generation_pb(g) for g in gens)
    return out


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


def tokenize_response(model: str, results: Sequence[Tokenized]) -> pb.TokenizeResponse:
    return pb.TokenizeResponse(
        model=model,
        results=[
            pb.Tokens(
                ids=r.ids,
                offsets=[pb.TokenOffset(start=a, end=b) for a, b in r.offsets],
                tokens=r.tokens,
                text=r.text,
            )
            for r in results
        ],
    )


def adapter_from(adapter: str) -> str:
    """A request's LoRA adapter name, checked for form here ("" = none named; the engine says
    NOT_FOUND for one its model does not have)."""
    return checks.adapter_name(adapter)


def with_adapter(params: SamplingParams, adapter: str) -> SamplingParams:
    """`params` naming the request's LoRA adapter (`adapter_from`)."""
    if not adapter:
        return params
    return dataclasses.replace(params, adapter=adapter_from(adapter))


def adapter_info_pb(a: dict[str, Any], *, with_path: bool = True) -> pb.AdapterInfo:
    return pb.AdapterInfo(
        name=a["name"], path=a["path"] if with_path else "", rank=a["rank"], resident=a["resident"]
    )


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
        adapters=[adapter_info_pb(a, with_path=with_path) for a in m.adapters],
    )
