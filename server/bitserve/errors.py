"""Typed errors that carry a gRPC status code.

Raised anywhere below the servicer; mapped to a gRPC status in exactly one place
(`servicer._Call.__aexit__`). Anything else becomes INTERNAL, logged with context.
"""

from __future__ import annotations

import grpc

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
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(BitserveError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(BitserveError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(BitserveError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(BitserveError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(BitserveError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(BitserveError):
    code = grpc.StatusCode.UNAVAILABLE


class Cancelled(BitserveError):
    code = grpc.StatusCode.CANCELLED


class ConfigError(Exception):
    """Invalid configuration: reported as one line before anything loads."""
