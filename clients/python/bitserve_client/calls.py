"""Each client method once: its options, the request it builds and how its response is read.

`Client` and `AsyncClient` are two faces over these builders: a builder returns a `Call` (which
RPC, the request message, a reader for the response or for each streamed message, the
deadline), and a face only sends it, blocking or awaited. Options are keyword-only and typed
(`GenerationOptions`, ...); a misspelt one is a TypeError, as with a plain signature.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypedDict, TypeVar

from google.protobuf.message import Message as PbMessage

from bitserve_proto.v1 import inference_pb2 as pb

from . import results

R = TypeVar("R")

Message = Mapping[str, str] | tuple[str, str]
"""A chat message: `{"role": "user", "content": "..."}` (as in OpenAI's API) or `(role, content)`."""


class GenerationOptions(TypedDict, total=False):
    """Options of generate, generate_stream, chat and chat_stream (all keyword-only)."""

    model: str | None  # None: the one model serving the task
    max_new_tokens: int | None  # None: the server's default
    temperature: float  # 0: greedy
    top_k: int  # 0: no top-k filtering
    top_p: float  # 0 or 1: no nucleus filtering
    repetition_penalty: float  # 0 or 1: none
    stop: Sequence[str] | str | None  # the text is cut before the first one produced
    seed: int | None  # same seed, parameters and prompt -> same output
    logprobs: bool  # return each generated token's log-probability
    adapter: str | None  # a LoRA adapter of the model (ModelInfo.adapters); None: its default_adapter or
    # the base model; "base": the base model
    timeout: float | None  # seconds; None: the client's timeout
    # Contract revision 3 (a call that sets one asks the server's revision first):
    n: int  # completions per prompt (1-32); n > 1 returns a list of Generations per prompt
    top_logprobs: int  # per token, this many most likely alternatives (0-20; implies logprobs)
    logit_bias: Mapping[int, float] | None  # token id -> added to its logit, in [-100, 100]
    # At most one constraint: the output must match it.
    json_schema: Mapping[str, Any] | str | None  # a JSON Schema (a dict or its JSON text)
    json_object: bool  # any JSON object
    regex: str | None  # a regular expression the whole output matches
    choice: Sequence[str] | None  # exactly one of these strings
    grammar: str | None  # an EBNF grammar (GBNF style: `root ::= ...`)


class ClassifyOptions(TypedDict, total=False):
    model: str | None
    top_k: int | None  # None: every label
    candidate_labels: Sequence[str] | None  # zero-shot labels (instruction models)
    adapter: str | None  # a LoRA adapter of the model (contract revision 5); None: its default
    timeout: float | None


class SentimentOptions(TypedDict, total=False):
    model: str | None
    adapter: str | None  # a LoRA adapter of the model (contract revision 5); None: its default
    timeout: float | None


class TranslateOptions(TypedDict, total=False):
    source_lang: str | None
    target_lang: str | None
    model: str | None
    max_new_tokens: int | None
    adapter: str | None  # a LoRA adapter of the model (contract revision 5); None: its default
    timeout: float | None


class CallOptions(TypedDict, total=False):
    timeout: float | None


@dataclass(frozen=True)
class Call(Generic[R]):
    """One RPC to send: `read` turns the response (or each streamed message) into the result."""

    rpc: str  # the stub's method name, e.g. "Generate"
    request: PbMessage
    read: Callable[[Any], R]
    timeout: float | None
    service: str = "Inference"  # or "Admin"


def _options(kind: type, options: Mapping[str, Any]) -> Mapping[str, Any]:
    unknown = sorted(set(options) - set(kind.__annotations__))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}; allowed: {sorted(kind.__annotations__)}")
    return options


def _texts(texts: str | Sequence[str]) -> tuple[list[str], bool]:
    if isinstance(texts, str):
        return [texts], True
    return list(texts), False


def _one_or_all(read: Callable[[Any], list], single: bool) -> Callable[[Any], Any]:
    return (lambda resp: read(resp)[0]) if single else read


def _parameters(options: Mapping[str, Any]) -> pb.GenerationParameters:
    o = _options(GenerationOptions, options)
    stop = o.get("stop")
    params = pb.GenerationParameters(
        max_new_tokens=o.get("max_new_tokens") or 0,
        temperature=o.get("temperature", 0.0),
        top_k=o.get("top_k", 0),
        top_p=o.get("top_p", 0.0),
        repetition_penalty=o.get("repetition_penalty", 0.0),
        stop=[stop] if isinstance(stop, str) else list(stop or []),
        logprobs=o.get("logprobs", False),
    )
    if o.get("seed") is not None:
        params.seed = o["seed"]
    # Revision-3 fields only when they say something: an unset one needs no newer server.
    if o.get("n", 1) != 1:
        params.n = o["n"]
    if o.get("top_logprobs"):
        params.top_logprobs = o["top_logprobs"]
    for token, bias in (o.get("logit_bias") or {}).items():
        params.logit_bias[int(token)] = float(bias)
    constraint = _constraint(o)
    if constraint is not None:
        params.constraint.CopyFrom(constraint)
    return params


CONSTRAINTS = ("json_schema", "json_object", "regex", "choice", "grammar")


def _constraint(o: Mapping[str, Any]) -> pb.Constraint | None:
    given = [k for k in CONSTRAINTS if o.get(k) not in (None, False)]
    if not given:
        return None
    if len(given) > 1:
        raise ValueError(f"at most one constraint per call; got {', '.join(given)}")
    (kind,) = given
    value = o[kind]
    if kind == "json_schema":
        return pb.Constraint(json_schema=value if isinstance(value, str) else json.dumps(value))
    if kind == "json_object":
        return pb.Constraint(json_object=True)
    if kind == "choice":
        if isinstance(value, str):
            raise TypeError("choice must be a list of strings, not one string")
        return pb.Constraint(choice=pb.Choice(options=list(value)))
    return pb.Constraint(**{kind: value})


def _completions(options: Mapping[str, Any]) -> int:
    return int(options.get("n", 1) or 1)


def _per_text(gens: Sequence[Any], n: int) -> list[Any]:
    """Generations in text order, n per text: one per text (n = 1) or a list of n per text."""
    read = [results.generation(g) for g in gens]
    if n == 1:
        return read
    return [read[i : i + n] for i in range(0, len(read), n)]


def _generate_request(
    prompt: str | Sequence[str], options: Mapping[str, Any]
) -> tuple[pb.GenerateRequest, bool]:
    texts, single = _texts(prompt)
    return pb.GenerateRequest(
        texts=texts,
        model=options.get("model") or "",
        parameters=_parameters(options),
        adapter=options.get("adapter") or "",
    ), single


def _chat_request(messages: Sequence[Message], options: Mapping[str, Any]) -> pb.ChatRequest:
    if isinstance(messages, (str, Mapping)):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} messages")
    pbm = []
    for m in messages:
        role, content = (m["role"], m["content"]) if isinstance(m, Mapping) else m
        pbm.append(pb.ChatMessage(role=role, content=content))
    return pb.ChatRequest(
        messages=pbm,
        model=options.get("model") or "",
        parameters=_parameters(options),
        adapter=options.get("adapter") or "",
    )


# the builders, one per client method -------------------------------------------------------------
def generate(prompt: str | Sequence[str], options: Mapping[str, Any]) -> Call[Any]:
    """A `Generation` per prompt; with n > 1 a list of n of them per prompt (seeded: completion j
    used seed + j)."""
    req, single = _generate_request(prompt, options)
    n = _completions(options)
    read = _one_or_all(lambda r: _per_text(r.generations, n), single)
    return Call("Generate", req, read, options.get("timeout"))


def generate_stream(prompt: str, options: Mapping[str, Any]) -> Call[results.StreamEvent]:
    req, _ = _generate_request(prompt, options)
    return Call("GenerateStream", req, results.event, options.get("timeout"))


def chat(messages: Sequence[Message], options: Mapping[str, Any]) -> Call[Any]:
    """The assistant's reply, a `Generation`; with n > 1 a list of n replies."""
    req = _chat_request(messages, options)
    if _completions(options) == 1:
        return Call("Chat", req, lambda r: results.generation(r.generation), options.get("timeout"))
    return Call(
        "Chat",
        req,
        lambda r: [results.generation(g) for g in (r.generations or [r.generation])],
        options.get("timeout"),
    )


def chat_stream(messages: Sequence[Message], options: Mapping[str, Any]) -> Call[results.StreamEvent]:
    return Call("ChatStream", _chat_request(messages, options), results.event, options.get("timeout"))


def classify(texts: str | Sequence[str], options: Mapping[str, Any]) -> Call[Any]:
    o = _options(ClassifyOptions, options)
    items, single = _texts(texts)
    req = pb.ClassifyRequest(
        texts=items,
        model=o.get("model") or "",
        top_k=o.get("top_k") or 0,
        candidate_labels=list(o.get("candidate_labels") or []),
        adapter=o.get("adapter") or "",
    )
    read = _one_or_all(
        lambda r: [[results.LabelScore(s.label, s.score) for s in c.labels] for c in r.results], single
    )
    return Call("Classify", req, read, o.get("timeout"))


def sentiment(texts: str | Sequence[str], options: Mapping[str, Any]) -> Call[Any]:
    o = _options(SentimentOptions, options)
    items, single = _texts(texts)
    read = _one_or_all(
        lambda r: [results.Sentiment(s.label, s.score, s.raw_label) for s in r.results], single
    )
    req = pb.SentimentRequest(texts=items, model=o.get("model") or "", adapter=o.get("adapter") or "")
    return Call("Sentiment", req, read, o.get("timeout"))


def translate(texts: str | Sequence[str], options: Mapping[str, Any]) -> Call[Any]:
    o = _options(TranslateOptions, options)
    items, single = _texts(texts)
    req = pb.TranslateRequest(
        texts=items,
        model=o.get("model") or "",
        source_lang=o.get("source_lang") or "",
        target_lang=o.get("target_lang") or "",
        max_new_tokens=o.get("max_new_tokens") or 0,
        adapter=o.get("adapter") or "",
    )
    read = _one_or_all(lambda r: [results.Translation(t.text) for t in r.results], single)
    return Call("Translate", req, read, o.get("timeout"))


def _models(r: pb.ListModelsResponse) -> list[results.ModelInfo]:
    return [results.model_info(m) for m in r.models]


def list_models(options: Mapping[str, Any]) -> Call[list[results.ModelInfo]]:
    o = _options(CallOptions, options)
    return Call("ListModels", pb.ListModelsRequest(), _models, o.get("timeout"))


# the Admin service (LoRA adapters at run time) -----------------------------------------------
def load_adapter(model: str, name: str, path: str, options: Mapping[str, Any]) -> Call[results.AdapterInfo]:
    o = _options(CallOptions, options)
    req = pb.LoadAdapterRequest(model=model, name=name, path=path)
    return Call("LoadAdapter", req, lambda r: results.adapter_info(r.adapter), o.get("timeout"), "Admin")


def unload_adapter(model: str, name: str, options: Mapping[str, Any]) -> Call[int]:
    o = _options(CallOptions, options)
    req = pb.UnloadAdapterRequest(model=model, name=name)
    return Call("UnloadAdapter", req, lambda r: int(r.running), o.get("timeout"), "Admin")


def list_adapters(
    model: str | None, options: Mapping[str, Any]
) -> Call[dict[str, list[results.AdapterInfo]]]:
    o = _options(CallOptions, options)
    req = pb.ListAdaptersRequest(model=model or "")
    return Call(
        "ListAdapters",
        req,
        lambda r: {m: [results.adapter_info(a) for a in v.adapters] for m, v in r.models.items()},
        o.get("timeout"),
        "Admin",
    )


def server_info(options: Mapping[str, Any]) -> Call[results.ServerInfo]:
    o = _options(CallOptions, options)
    return Call("ListModels", pb.ListModelsRequest(), results.server_info, o.get("timeout"))
