"""Transport security and caller authentication: TLS / mutual TLS credentials and bearer tokens.

Tokens come from a file (one per line) or an environment variable (comma-separated); they are
compared in constant time and never logged, and only the file's path or the variable's name
is kept in settings. Health checks stay open for probes unless `auth_health` is set.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from pathlib import Path

import grpc

from bitserve.errors import ConfigError
from bitserve.settings import ServerSettings

HEALTH_PREFIX = "/grpc.health.v1.Health/"


def _read(setting: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"server.{setting}: cannot read {path!r}: {e.strerror or e}") from None


def server_credentials(s: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings, or None for plaintext."""
    if not s.tls_cert_file:
        return None
    assert s.tls_key_file is not None  # the settings validator pairs them
    pair = (_read("tls_key_file", s.tls_key_file), _read("tls_cert_file", s.tls_cert_file))
    client_ca = _read("tls_client_ca_file", s.tls_client_ca_file) if s.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def load_tokens(s: ServerSettings, environ: Mapping[str, str] | None = None) -> list[bytes]:
    """Accepted bearer tokens; empty when token auth is off."""
    environ = os.environ if environ is None else environ
    tokens: list[str] = []
    if s.auth_tokens_file:
        lines = _read("auth_tokens_file", s.auth_tokens_file).decode("utf-8", "replace").splitlines()
        found = [t.strip() for t in lines if t.strip() and not t.strip().startswith("#")]
        if not found:
            raise ConfigError(f"server.auth_tokens_file: {s.auth_tokens_file!r} holds no token")
        tokens += found
    if s.auth_tokens_env:
        value = environ.get(s.auth_tokens_env, "")
        found = [t.strip() for t in value.split(",") if t.strip()]
        if not found:
            raise ConfigError(
                f"server.auth_tokens_env: environment variable {s.auth_tokens_env} holds no token"
            )
        tokens += found
    return [t.encode() for t in tokens]


class TokenAuth(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED unless the call carries `authorization: Bearer <an accepted token>`."""

    def __init__(self, tokens: list[bytes], *, protect_health: bool):
        self._tokens = tokens
        self._protect_health = protect_health

    def _accepts(self, metadata) -> str | None:
        """None when the caller is authenticated, else why not (never quoting what it sent)."""
        value = next((v for k, v in metadata or () if k == "authorization"), None)
        if value is None:
            return "missing credentials: send metadata 'authorization: Bearer <token>'"
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, presented = value.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return "malformed authorization metadata: expected 'Bearer <token>'"
        candidate = presented.strip().encode()
        ok = False
        for t in self._tokens:  # no early exit: the time taken does not tell which token matched
            ok |= hmac.compare_digest(t, candidate)
        return None if ok else "invalid bearer token"

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or (details.method.startswith(HEALTH_PREFIX) and not self._protect_health):
            return handler
        problem = self._accepts(details.invocation_metadata)
        if problem is None:
            return handler
        return _denied(handler, problem)


def _denied(handler, message: str):
    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover  (makes this an async generator, as the method expects)

    if handler.unary_unary is not None:
        return handler._replace(unary_unary=unary)
    if handler.unary_stream is not None:
        return handler._replace(unary_stream=streaming)
    if handler.stream_unary is not None:
        return handler._replace(stream_unary=unary)
    return handler._replace(stream_stream=streaming)
