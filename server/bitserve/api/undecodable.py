"""Requests that are not valid protobuf get INVALID_ARGUMENT, not an ERROR traceback and UNKNOWN.

grpc's own answer to a deserializer that raises is UNKNOWN, logged with a traceback at ERROR.
Here the deserializer hands back a marker instead, and the method answers it before the
servicer sees it. Works on the generated `add_*Servicer_to_server` functions as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc


class _Undecodable:
    def __init__(self, message: str):
        self.message = message


class _Capture:
    """Stands in for a server to collect the handlers a generated add_* function registers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:  # the generated code also calls this
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.service, self.handlers = service, handlers


def _deserializer(deserialize: Callable[[bytes], Any], type_name: str) -> Callable[[bytes], Any]:
    def run(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:
            return _Undecodable(f"request is not a valid {type_name} protobuf: {e}"[:300])

    return run


def _guard(handler: Any, type_name: str) -> Any:
    async def unary_unary(request, context):
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await handler.unary_unary(request, context)

    async def unary_stream(request, context):
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        responses = handler.unary_stream(request, context)
        try:
            async for response in responses:
                yield response
        finally:
            await responses.aclose()  # now, not when garbage-collected

    if handler.request_streaming:
        return handler  # no client-streaming methods in the contract
    changes: dict[str, Any] = {"request_deserializer": _deserializer(handler.request_deserializer, type_name)}
    if handler.unary_unary is not None:
        changes["unary_unary"] = unary_unary
    else:
        changes["unary_stream"] = unary_stream
    return handler._replace(**changes)


def add_servicer(add: Callable[[Any, Any], None], servicer: Any, server: grpc.aio.Server) -> None:
    """`add(servicer, server)` (a generated add_*Servicer_to_server), with undecodable requests
    answered INVALID_ARGUMENT."""
    capture = _Capture()
    add(servicer, capture)
    guarded = {}
    for name, handler in capture.handlers.items():
        request_type = getattr(handler.request_deserializer, "__self__", None)
        type_name = getattr(getattr(request_type, "DESCRIPTOR", None), "full_name", f"{name} request")
        guarded[name] = _guard(handler, type_name)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.service, guarded),))
    server.add_registered_method_handlers(capture.service, guarded)
