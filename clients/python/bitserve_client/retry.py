"""Honouring a server's google.rpc.RetryInfo: a RESOURCE_EXHAUSTED call (a tenant over its
limit) says in its status details when to retry; the client waits that long and sends it again.

gRPC's own retry policy (`channel.DEFAULT_SERVICE_CONFIG`) handles UNAVAILABLE; this handles
the refusals that carry a delay, on unary calls. A delay longer than `max_wait_s`, or more than
`max_attempts` refusals, raises the error, with `.retry_after` (seconds) set for the caller.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2

T = TypeVar("T")
_DETAILS = "grpc-status-details-bin"


def retry_delay(e: grpc.RpcError) -> float | None:
    """Seconds the server asked to wait before a retry (its RetryInfo), or None."""
    trailers = e.trailing_metadata() if hasattr(e, "trailing_metadata") else None
    raw = next((v for k, v in trailers or () if k == _DETAILS), None)
    if raw is None:
        return None
    status = status_pb2.Status.FromString(raw)
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None


@dataclass
class RetryInfoPolicy:
    """How long and how often to wait for a server that said when to retry; `max_attempts=1`
    turns it off. `sleep`/`asleep` are replaceable (tests)."""

    max_attempts: int = 3
    max_wait_s: float = 10.0
    sleep: Callable[[float], None] = time.sleep
    asleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    def _delay(self, e: grpc.RpcError, attempt: int) -> float | None:
        if attempt >= self.max_attempts or e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            return None
        delay = retry_delay(e)
        return delay if delay is not None and delay <= self.max_wait_s else None

    def call(self, send: Callable[[], T]) -> T:
        attempt = 1
        while True:
            try:
                return send()
            except grpc.RpcError as e:
                delay = self._delay(e, attempt)
                if delay is None:
                    raise
                self.sleep(delay)
                attempt += 1

    async def acall(self, send: Callable[[], Awaitable[T]]) -> T:
        attempt = 1
        while True:
            try:
                return await send()
            except grpc.RpcError as e:
                delay = self._delay(e, attempt)
                if delay is None:
                    raise
                await self.asleep(delay)
                attempt += 1
