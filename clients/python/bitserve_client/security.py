"""Channels with TLS (server roots, optional client certificate) and a bearer token.

A PEM argument is the PEM bytes or a path to a PEM file. The token travels as
`authorization: Bearer <token>` metadata on every call.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

import grpc

PEM = bytes | str | Path | None


class Options(TypedDict, total=False):
    """The security keywords of `Client` and `AsyncClient`."""

    tls: bool | None  # TLS with the system roots (implied by any certificate below)
    root_certificates: PEM  # server roots: PEM bytes or a file
    private_key: PEM  # with certificate_chain: mutual TLS
    certificate_chain: PEM
    token: str | None  # sent as `authorization: Bearer <token>` on every call


def _pem(value: PEM) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def credentials(root_certificates: PEM, private_key: PEM, certificate_chain: PEM) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(_pem(root_certificates), _pem(private_key), _pem(certificate_chain))


def _with_token(details: Any, token: str) -> Any:
    metadata = [*(details.metadata or ()), ("authorization", f"Bearer {token}")]
    return details._replace(metadata=metadata)


class _Token(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str):
        self._token = token

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(_with_token(details, self._token), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(_with_token(details, self._token), request)


class _AsyncUnaryToken(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str):
        self._token = token

    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_token(details, self._token), request)


class _AsyncStreamToken(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str):
        self._token = token

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_token(details, self._token), request)


def _secure(root_certificates: PEM, private_key: PEM, certificate_chain: PEM, tls: bool | None) -> bool:
    return bool(tls) or any(v is not None for v in (root_certificates, private_key, certificate_chain))


def channel(
    target: str,
    options: Sequence[tuple[str, Any]],
    *,
    tls: bool | None = None,
    root_certificates: PEM = None,
    private_key: PEM = None,
    certificate_chain: PEM = None,
    token: str | None = None,
) -> grpc.Channel:
    if _secure(root_certificates, private_key, certificate_chain, tls):
        ch = grpc.secure_channel(
            target, credentials(root_certificates, private_key, certificate_chain), options=options
        )
    else:
        ch = grpc.insecure_channel(target, options=options)
    return grpc.intercept_channel(ch, _Token(token)) if token else ch


def aio_channel(
    target: str,
    options: Sequence[tuple[str, Any]],
    *,
    tls: bool | None = None,
    root_certificates: PEM = None,
    private_key: PEM = None,
    certificate_chain: PEM = None,
    token: str | None = None,
) -> grpc.aio.Channel:
    interceptors = [_AsyncUnaryToken(token), _AsyncStreamToken(token)] if token else None
    if _secure(root_certificates, private_key, certificate_chain, tls):
        creds = credentials(root_certificates, private_key, certificate_chain)
        return grpc.aio.secure_channel(target, creds, options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
