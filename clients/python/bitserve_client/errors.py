"""Typed client exceptions: one class per gRPC status code, each carrying code and message."""

from __future__ import annotations

import grpc

from .retry import retry_delay


class BitserveError(Exception):
    """A call failed. `.code` is the grpc.StatusCode, `.message` the server's explanation."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None, retry_after: float | None = None):
        super().__init__(f"{(code or self.code).name}: {message}")
        self.message = message
        # Seconds the server asked to wait before retrying (google.rpc.RetryInfo), if it said.
        self.retry_after = retry_after
        if code is not None:
            self.code = code


class InvalidArgumentError(BitserveError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(BitserveError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPreconditionError(BitserveError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(BitserveError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceededError(BitserveError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnavailableError(BitserveError):
    code = grpc.StatusCode.UNAVAILABLE


class CancelledError(BitserveError):
    code = grpc.StatusCode.CANCELLED


class InternalError(BitserveError):
    code = grpc.StatusCode.INTERNAL


class UnauthenticatedError(BitserveError):
    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[BitserveError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        FailedPreconditionError,
        ResourceExhaustedError,
        DeadlineExceededError,
        UnavailableError,
        UnauthenticatedError,
        CancelledError,
        InternalError,
    )
}


def from_rpc_error(e: grpc.RpcError) -> BitserveError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = (e.details() if hasattr(e, "details") else None) or str(e)
    cls = _BY_CODE.get(code, BitserveError)
    return cls(details, code, retry_delay(e))
