"""Chat messages -> one prompt, rendered with the checkpoint's own chat template.

The servicer validates the messages here, renders them with the engine's tokenizer
(`apply_chat_template(..., add_generation_prompt=True)`) and hands the text to the unchanged
generate path, so a chat answer is exactly what Generate gives for the rendered prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bitserve.errors import FailedPrecondition, InvalidArgument

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


def messages_from(pairs: Sequence[tuple[str, str]], max_chars: int) -> list[ChatMessage]:
    """(role, content) pairs -> messages; INVALID_ARGUMENT naming the message that is wrong."""
    if not pairs:
        raise InvalidArgument("messages: at least one message (role + content) is required")
    out = []
    for i, (role, content) in enumerate(pairs):
        if role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}")
        if not content.strip():
            raise InvalidArgument(f"messages[{i}].content is empty")
        out.append(ChatMessage(role, content))
    total = sum(len(m.content) for m in out)
    if total > max_chars:
        raise InvalidArgument(f"messages: {total} characters of content in all; the limit is {max_chars}")
    return out


def render(tokenizer: Any, messages: Sequence[ChatMessage], model: str) -> str:
    """The prompt for the assistant's next message, as the checkpoint's template writes it."""
    if not getattr(tokenizer, "chat_template", None):
        raise FailedPrecondition(
            f"model {model!r} has no chat template (its tokenizer defines none): "
            "send a plain prompt with Generate, or serve an instruction checkpoint"
        )
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True,
            tokenize=False,
        )
    except TemplateError as e:  # templates raise on conversations they do not accept
        raise InvalidArgument(f"messages: the chat template of model {model!r} rejects them: {e}") from None
    # The generate path encodes with special tokens; when that adds BOS itself, a BOS written by
    # the template would be doubled.
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos) :]
    return text
