"""Typed errors that carry a gRPC status code.

Raised anywhere below the servicer; mapped to a gRPC status in exactly one place
(`servicer._abort_on_error`). Anything else becomes INTERNAL, logged with context.
"""

from __future__ import annotations

import grpc


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
