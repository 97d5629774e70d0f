"""Request checks both fronts share (the gRPC servicer and the OpenAI-compatible HTTP app).

Transport-free: plain values in, plain types or a typed error out (INVALID_ARGUMENT naming the
field and the limit). Each front converts its own wire format to these arguments and maps the
errors once (`api.servicer`, `api.openai`); the checks themselves live only here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from bitserve.errors import MAX_ECHO_CHARS, InvalidArgument, Unavailable
from bitserve.frontend import chat
from bitserve.frontend.base import Engine
from bitserve.settings import ADAPTER_NAME, ServerSettings, Settings
from bitserve.types import Constraint, SamplingParams, Task, TokenPrompt

MAX_STOP_SEQUENCES = 16

# Label value for requests whose `model` names no configured model: client-chosen strings must
# not become label values (each would add series without bound). Not a valid model name.
UNRESOLVED_MODEL = "(unresolved)"


class Gate:
    """Admission both fronts pass: shutdown, the byte budget, the model name; and the count of
    accepted calls that shutdown waits for."""

    def __init__(self, settings: Settings):
        self.server = settings.server
        self.tasks = {m.name: m.task for m in settings.models}  # declared model -> its task
        self.inflight = 0
        self.draining = False  # set at shutdown: new inference calls get UNAVAILABLE

    def begin(self, size: int, model: str) -> str:
        """Checks made before any work; returns the requested model name ('' = the only one)."""
        if self.draining:
            raise Unavailable("server is shutting down; retry on another replica")
        check_size(size, self.server)
        return model_name(model)

    def label(self, name: str) -> str:
        """The metrics label for a requested model name (never a client-chosen string)."""
        return name if name in self.tasks else UNRESOLVED_MODEL

    def task_of(self, name: str, default: Task = Task.GENERATE) -> Task:
        return self.tasks.get(name, default)


def check_size(size: int, server: ServerSettings) -> None:
    """The per-request byte budget (texts x characters), checked before any work."""
    if size > server.max_request_bytes:
        raise InvalidArgument(
            f"request is {size} bytes; the limit is server.max_request_bytes={server.max_request_bytes} "
            "(send fewer or shorter texts per request)"
        )


def model_name(name: str) -> str:
    if len(name) > MAX_ECHO_CHARS:
        raise InvalidArgument(
            f"model: the name is {len(name)} characters; model names are at most {MAX_ECHO_CHARS}"
        )
    return name


def adapter_name(adapter: str, field: str = "adapter") -> str:
    """A request's LoRA adapter name, checked for form ("" = none named; the engine says
    NOT_FOUND for one its model does not have)."""
    if adapter and not ADAPTER_NAME.fullmatch(adapter):
        raise InvalidArgument(
            f"{field}: {adapter[:64]!r} is not an adapter name (letters, digits, '.', '_', '-'; at most 128)"
        )
    return adapter


def model_and_adapter(name: str) -> tuple[str, str]:
    """`model` as the OpenAI front takes it: "base" or "base:adapter" (model names hold no ':')."""
    base, _, adapter = name.partition(":")
    return base, adapter_name(adapter, "model") if adapter else ""


def fits_queue(n_texts: int, model: str, max_queue_size: int) -> None:
    """More texts than the queue holds can never be admitted: that is the caller's to fix."""
    if n_texts > max_queue_size:
        raise InvalidArgument(
            f"texts: {n_texts} texts can never fit model {model!r}'s queue "
            f"(max_queue_size={max_queue_size}); send at most {max_queue_size} per request"
        )


def texts(
    items: Sequence[str],
    server: ServerSettings,
    *,
    exactly_one: str | None = None,
    field: str = "texts",
) -> list[str]:
    """`exactly_one`: the name of a method that takes one text only."""
    out = list(items)
    if not out:
        raise InvalidArgument(f"{field}: at least one text is required")
    if exactly_one and len(out) != 1:
        raise InvalidArgument(f"{field}: {exactly_one} takes exactly one text, got {len(out)}")
    if len(out) > server.max_texts_per_request:
        raise InvalidArgument(
            f"{field}: {len(out)} texts exceed the limit of {server.max_texts_per_request} per request"
        )
    for i, t in enumerate(out):
        if not t.strip():
            raise InvalidArgument(f"{field}[{i}] is empty")
        if len(t) > server.max_text_chars:
            raise InvalidArgument(
                f"{field}[{i}] is {len(t)} characters; the limit is {server.max_text_chars}"
            )
    return out


def sampling(
    default_max_new_tokens: int,
    *,
    max_new_tokens: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 0.0,
    repetition_penalty: float = 0.0,
    stop: Sequence[str] = (),
    seed: int | None = None,
    logprobs: bool = False,
    n: int = 1,
    top_logprobs: int = 0,
    logit_bias: Sequence[tuple[int, float]] = (),
    constraint: Constraint | None = None,
    prefix: str = "parameters.",
    names: dict[str, str] | None = None,
    max_stop_chars: int | None = None,
) -> SamplingParams:
    """Validated sampling parameters; 0 means "the default" for the numeric ones, as in the
    proto. `prefix` and `names` spell the fields as the caller's API does in messages."""
    names = names or {}

    def bad(field: str, rule: str, value: object) -> InvalidArgument:
        return InvalidArgument(f"{prefix}{names.get(field, field)} must be {rule}, got {value}")

    for field, v in (
        ("temperature", temperature),
        ("top_p", top_p),
        ("repetition_penalty", repetition_penalty),
    ):
        if not math.isfinite(v):
            raise bad(field, "a finite number", v)
    if max_new_tokens < 0:
        raise bad("max_new_tokens", ">= 0 (0 = the model's default)", max_new_tokens)
    if top_k < 0:
        raise bad("top_k", ">= 0 (0 = off)", top_k)
    if temperature < 0 or temperature > 100:
        raise bad("temperature", "in [0, 100] (0 = greedy)", temperature)
    if top_p < 0 or top_p > 1:
        raise bad("top_p", "in (0, 1] (0 = off)", top_p)
    if repetition_penalty < 0:
        raise bad("repetition_penalty", "> 0 (0 = off)", repetition_penalty)
    if len(stop) > MAX_STOP_SEQUENCES:
        raise bad("stop", f"at most {MAX_STOP_SEQUENCES} sequences", len(stop))
    for i, s in enumerate(stop):
        if not s:
            raise InvalidArgument(f"{prefix}{names.get('stop', 'stop')}[{i}] is empty")
    stop_chars = sum(len(s) for s in stop)
    if max_stop_chars is not None and stop_chars > max_stop_chars:
        raise InvalidArgument(
            f"{prefix}{names.get('stop', 'stop')}: {stop_chars} characters in all; the limit is "
            f"server.max_stop_chars={max_stop_chars}"
        )
    # n, top_logprobs, logit_bias and the constraint are checked by the generate engine
    # (`GenerationFront.check_params`), whichever front built them.
    return SamplingParams(
        max_new_tokens=max_new_tokens or default_max_new_tokens,
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p) if 0 < top_p < 1 else 1.0,
        repetition_penalty=float(repetition_penalty) if repetition_penalty > 0 else 1.0,
        stop=tuple(stop),
        seed=seed,
        logprobs=bool(logprobs),
        n=int(n),
        top_logprobs=int(top_logprobs),
        logit_bias=tuple((int(t), float(b)) for t, b in logit_bias),
        constraint=constraint,
    )


async def chat_text(engine: Engine, pairs: Sequence[tuple[str, str]], server: ServerSettings) -> str:
    """(role, content) pairs -> the text the checkpoint's chat template writes (Tokenize)."""
    chat.check_message_count(len(pairs), server.max_chat_messages)
    messages = chat.messages_from(pairs, server.max_text_chars)
    # Templates are Python (jinja): rendered off the event loop, like tokenization.
    return str(await engine.off_loop(chat.render, engine.tokenizer, messages, engine.name))


async def chat_prompt(
    engine: Engine, pairs: Sequence[tuple[str, str]], server: ServerSettings
) -> TokenPrompt:
    """(role, content) pairs -> the token ids of the prompt the checkpoint's chat template
    writes (special-token text in a message stays text)."""
    chat.check_message_count(len(pairs), server.max_chat_messages)
    messages = chat.messages_from(pairs, server.max_text_chars)
    # Templates are Python (jinja): rendered and encoded off the event loop, like tokenization.
    ids = await engine.off_loop(chat.prompt_ids, engine.tokenizer, messages, engine.name)
    return TokenPrompt(tuple(ids), "messages (the rendered chat prompt)")
