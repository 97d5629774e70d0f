"""Typed errors that carry a status code name (a `grpc.StatusCode` member's name).

Transport-free, so the engine process imports no grpc: raised anywhere below the servicer (and
sent across the process boundary by name), mapped to a gRPC status in exactly one place
(`api.servicer._Call.__aexit__`). Anything else becomes INTERNAL, logged with context.
"""

from __future__ import annotations

# Client input that a status message may quote (a model name) is refused beyond this length: a 1 MB name
# must not become a 1 MB status message (it would overflow the client's metadata limit).
MAX_ECHO_CHARS = 200
# Whole status messages are cut to this length, whatever produced them.
MAX_MESSAGE_CHARS = 1024


def clip_message(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[: MAX_MESSAGE_CHARS - 40] + f"... ({len(message)} characters, cut)"


class BitserveError(Exception):
    code: str = "INTERNAL"

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        # Seconds after which a retry may succeed (a tenant's rate window reopening): the
        # servicer sends it as a google.rpc.RetryInfo status detail.
        self.retry_after = retry_after


class InvalidArgument(BitserveError):
    code = "INVALID_ARGUMENT"


class NotFound(BitserveError):
    code = "NOT_FOUND"


class FailedPrecondition(BitserveError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(BitserveError):
    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(BitserveError):
    code = "DEADLINE_EXCEEDED"


class Unavailable(BitserveError):
    code = "UNAVAILABLE"


class Cancelled(BitserveError):
    code = "CANCELLED"


class ConfigError(Exception):
    """Invalid configuration: reported as one line before anything loads."""
