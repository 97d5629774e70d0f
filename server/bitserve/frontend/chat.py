"""Chat messages -> one prompt, rendered with the checkpoint's own chat template.

The servicer validates the messages here (their number first, before anything is built from
them), renders them with the engine's tokenizer (`apply_chat_template(...,
add_generation_prompt=True)`) and hands the prompt's token ids to the unchanged generate path.

A message's content is text, whatever it contains: `<|im_end|>\\n<|im_start|>system` written by a
caller is encoded as those characters, never as the template's special tokens, so no caller can
end its turn or write another role's. `prompt_ids` renders the template with a placeholder per
content, takes the special tokens from the template's own text only, and encodes everything
else with special-token matching off. For any content without special-token text the ids are
exactly those of encoding the rendered text (`render`), so a chat answer is what Generate gives
for that prompt.
"""

from __future__ import annotations

import copy
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bitserve.errors import FailedPrecondition, InvalidArgument

ROLES = ("system", "user", "assistant")
# Placeholders for contents while the template renders: private-use characters, so that no
# template text contains them by accident.
_HOLE = "\ue000{}\ue001"
_HOLES = re.compile("\ue000(\\d+)\ue001")


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


def check_message_count(n: int, max_messages: int) -> None:
    """Before any work on the messages: a long chat costs its size in rendering alone."""
    if n > max_messages:
        raise InvalidArgument(
            f"messages: {n} messages exceed the limit of server.max_chat_messages={max_messages}"
        )


def messages_from(
    pairs: Sequence[tuple[str, str]], max_chars: int, max_messages: int | None = None
) -> list[ChatMessage]:
    """(role, content) pairs -> messages; INVALID_ARGUMENT naming the message that is wrong."""
    if not pairs:
        raise InvalidArgument("messages: at least one message (role + content) is required")
    if max_messages is not None:
        check_message_count(len(pairs), max_messages)
    total = sum(len(c) for _, c in pairs)
    if total > max_chars:
        raise InvalidArgument(f"messages: {total} characters of content in all; the limit is {max_chars}")
    out = []
    for i, (role, content) in enumerate(pairs):
        if role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}")
        if not content.strip():
            raise InvalidArgument(f"messages[{i}].content is empty")
        out.append(ChatMessage(role, content))
    return out


def _apply(tokenizer: Any, messages: Sequence[ChatMessage], model: str, contents: Sequence[str]) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise FailedPrecondition(
            f"model {model!r} has no chat template (its tokenizer defines none): "
            "send a plain prompt with Generate, or serve an instruction checkpoint"
        )
    from jinja2 import TemplateError

    try:
        return str(
            tokenizer.apply_chat_template(
                [{"role": m.role, "content": c} for m, c in zip(messages, contents, strict=True)],
                add_generation_prompt=True,
                tokenize=False,
            )
        )
    except TemplateError as e:  # templates raise on conversations they do not accept
        raise InvalidArgument(f"messages: the chat template of model {model!r} rejects them: {e}") from None


def _encoding_adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("")["input_ids"][:1] == [bos]


def render(tokenizer: Any, messages: Sequence[ChatMessage], model: str) -> str:
    """The prompt for the assistant's next message, as the checkpoint's template writes it."""
    text = _apply(tokenizer, messages, model, [m.content for m in messages])
    # The generate path encodes with special tokens; when that adds BOS itself, a BOS written by
    # the template would be doubled.
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and _encoding_adds_bos(tokenizer):
        text = text[len(bos) :]
    return text


def prompt_ids(
    tokenizer: Any, messages: Sequence[ChatMessage], model: str, *, add_special_tokens: bool = True
) -> list[int]:
    """Token ids of the prompt `render` writes, with every content encoded as plain text.

    `add_special_tokens`: what encoding the rendered text would add (BOS); a template's own
    BOS is then not doubled. Runs off the event loop (templates are Python)."""
    skeleton = _apply(tokenizer, messages, model, [_HOLE.format(i) for i in range(len(messages))])
    # The skeleton's text between contents is the template's: only there are special tokens real.
    text_parts, contents = [], []
    last = 0
    for m in _HOLES.finditer(skeleton):
        text_parts.append(skeleton[last : m.start()])
        contents.append(messages[int(m.group(1))].content)
        last = m.end()
    text_parts.append(skeleton[last:])
    specials = _special_tokens(tokenizer)
    runs: list[str] = [""]  # text between two real special tokens
    ids_between: list[int] = []  # the special token that ends each run but the last
    for k, part in enumerate(text_parts):
        pos = 0
        for m in specials.finditer(part) if specials is not None else ():
            token = m.group(0)
            runs[-1] += part[pos : m.start()]
            info = _added(tokenizer, token)
            if info is not None and getattr(info, "lstrip", False):
                runs[-1] = runs[-1].rstrip()
            ids_between.append(int(tokenizer.convert_tokens_to_ids(token)))
            runs.append("")
            pos = m.end()
            if info is not None and getattr(info, "rstrip", False):
                while pos < len(part) and part[pos].isspace():
                    pos += 1
        runs[-1] += part[pos:]
        if k < len(contents):
            runs[-1] += contents[k]
    encode = plain_encoder(tokenizer)
    ids: list[int] = []
    for k, run in enumerate(runs):
        if run:
            ids += encode(run)
        if k < len(ids_between):
            ids.append(ids_between[k])
    if add_special_tokens:
        ids = with_added_special_tokens(tokenizer, ids)
    return ids


def _special_tokens(tokenizer: Any) -> re.Pattern[str] | None:
    tokens = sorted(
        {str(t.content) for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
        | set(getattr(tokenizer, "all_special_tokens", ())),
        key=len,
        reverse=True,  # longest first: `<|im_start|>` before any token it contains
    )
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def _added(tokenizer: Any, token: str) -> Any:
    for t in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if str(t.content) == token:
            return t
    return None


def with_added_special_tokens(tokenizer: Any, ids: list[int]) -> list[int]:
    """`ids` with what encoding adds around a text (BOS, EOS), as `tokenizer(text)` gives it;
    a BOS the template wrote itself is not doubled."""
    probe = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(probe) + 1):
        if full[start : start + len(probe)] == probe:
            prefix, suffix = full[:start], full[start + len(probe) :]
            break
    else:  # pragma: no cover - a post-processor that rewrites the text's own tokens
        return ids
    if prefix and ids[: len(prefix)] == prefix:
        prefix = []
    return [*prefix, *ids, *suffix]


_plain_lock = threading.Lock()


def plain_encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """Token ids of a text with special-token matching off (no special tokens added either).

    Fast tokenizers: a copy of the Rust backend with `encode_special_tokens` set for good, made
    once per tokenizer - transformers' `split_special_tokens=True` flips that flag on the shared
    backend for the call, which another thread's encode would see."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_special_tokens"):
        return lambda text: list(
            tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        )
    with _plain_lock:
        plain = getattr(tokenizer, "_bitserve_plain_backend", None)
        if plain is None:
            plain = copy.deepcopy(backend)
            plain.encode_special_tokens = True
            plain.no_padding()
            plain.no_truncation()
            tokenizer._bitserve_plain_backend = plain
    return lambda text: list(plain.encode(text, add_special_tokens=False).ids)
