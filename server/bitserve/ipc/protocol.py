"""Messages between the front and an engine core process: msgpack-encoded lists of plain data.

front -> core:  [GENERATE, rid, request dict]   a generation request (token ids, sampling)
                [GENERATE_MANY, [[rid, request dict], ...]]
                                                several, seen by the same step (n completions)
                [SCORE, rid, prompts, conts, model, adapters]
                                                label scoring: log-likelihood of continuations,
                                                each prompt through its LoRA adapter of `model`
                                                ("": the base); answered per prompt with its
                                                scores or an error code (a str: NOT_FOUND,
                                                RESOURCE_EXHAUSTED)
                [BATCH, rid, model, items, adapters?]
                                                one batch for a model with its own task head;
                                                with adapters (a sequence classifier's), each
                                                item through its own ("": the base), answered
                                                per item as SCORE is
                [ADAPTER, rid, op, args]        a LoRA adapter operation, between steps: "load"
                                                [model, name, path], "unload" [model, name],
                                                "list" [model] (answered with RESULT or ERROR)
                [ABORT, [rid, ...]]             the callers are gone: drop these requests
                [SHUTDOWN]                      finish what is accepted, then exit
                [PING, seq]                     are you alive? (the front's watchdog)
core -> front:  [READY, info]                   weights loaded: what was loaded, per model
                [FAILED, message]               loading failed (the process then exits)
                [TOKENS, [[rid, token, logprob, finish, top], ...], stats, finished]
                                                the tokens of the steps since the last one (one per
                                                row and step; top: [[id, logprob], ...] or None),
                                                stats (decode steps since then, and
                                                running/waiting/KV when they changed), and the
                                                whole answers of requests sent with "whole":
                                                finished = [[rid, ids, logprobs or None, finish,
                                                time of the first token (time.monotonic),
                                                tops (per token, as top above) or None], ...]
                [RESULT, rid, result]           a SCORE or BATCH answer
                [ERROR, rid, code, message]     a request failed (code: a grpc.StatusCode name)
                [PONG, seq]                     the answer to PING, sent between steps
"""

from __future__ import annotations

from typing import Any

import msgpack

from bitserve import errors
from bitserve.types import Constraint, GenerationRequest, SamplingParams

GENERATE, SCORE, BATCH, ABORT, SHUTDOWN = "gen", "score", "batch", "abort", "shutdown"
GENERATE_MANY = "genmany"
ADAPTER = "adapter"
READY, FAILED, TOKENS, RESULT, ERROR = "ready", "failed", "tokens", "result", "error"
PING, PONG = "ping", "pong"  # the front's engine watchdog


def pack(msg: list[Any]) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def unpack(data: bytes) -> list[Any]:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def request_to_wire(r: GenerationRequest, whole: bool = False) -> dict[str, Any]:
    """`whole`: the front reads the answer only when it is finished (unary, no stop strings),
    so the engine sends it in one message then, not a message per token."""
    p = r.params
    return {
        "whole": whole,
        "model": r.model,
        "prompt": r.prompt_ids,
        "max_new_tokens": r.max_new_tokens,
        "temperature": p.temperature,
        "top_k": p.top_k,
        "top_p": p.top_p,
        "repetition_penalty": p.repetition_penalty,
        "seed": p.seed,
        "logprobs": p.logprobs,
        # structured output and sampling controls (n is the front's: one request per completion)
        "top_logprobs": p.top_logprobs,
        "logit_bias": [list(b) for b in p.logit_bias],
        "constraint": [p.constraint.kind, p.constraint.value] if p.constraint is not None else None,
        "adapter": p.adapter,
        "stop_ids": list(r.stop_ids),
        "deadline": r.deadline,
        "client": r.client,
    }


def request_from_wire(rid: int, d: dict[str, Any]) -> GenerationRequest:
    params = SamplingParams(
        max_new_tokens=d["max_new_tokens"],
        temperature=d["temperature"],
        top_k=d["top_k"],
        top_p=d["top_p"],
        repetition_penalty=d["repetition_penalty"],
        seed=d["seed"],
        logprobs=d["logprobs"],
        top_logprobs=d["top_logprobs"],
        logit_bias=tuple((int(t), float(b)) for t, b in d["logit_bias"]),
        constraint=Constraint(*d["constraint"]) if d["constraint"] is not None else None,
        adapter=d.get("adapter", ""),
    )
    return GenerationRequest(
        rid=rid,
        model=d["model"],
        prompt_ids=list(d["prompt"]),
        params=params,
        max_new_tokens=d["max_new_tokens"],
        stop_ids=tuple(d["stop_ids"]),
        deadline=d["deadline"],
        client=d.get("client", ""),
    )


_BY_CODE = {
    cls.code: cls
    for cls in (
        errors.InvalidArgument,
        errors.NotFound,
        errors.FailedPrecondition,
        errors.ResourceExhausted,
        errors.DeadlineExceeded,
        errors.Unavailable,
        errors.Cancelled,
    )
}


def error_to_wire(rid: int, exc: BaseException) -> list[Any]:
    if isinstance(exc, errors.BitserveError):
        return [ERROR, rid, exc.code, exc.message]
    return [ERROR, rid, "INTERNAL", f"{type(exc).__name__}: {exc}"]


def error_from_wire(code: str, message: str) -> errors.BitserveError:
    cls = _BY_CODE.get(code, errors.BitserveError)
    return cls(message)
