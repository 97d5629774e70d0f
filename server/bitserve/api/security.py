"""Transport security and caller authentication: TLS / mutual TLS credentials and bearer tokens.

Tokens come from a file (one per line) or an environment variable (comma-separated); they are
compared in constant time and never logged, and only the file's path or the variable's name
is kept in settings. Health checks stay open for probes unless `auth_health` is set.
"""

from __future__ import annotations

import hashlib
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


def _entries(setting: str, items: list[tuple[str, str]], s: ServerSettings) -> list[tuple[bytes, str | None]]:
    """(token, tenant) per `<token>` or `<token> <tenant>` item; `where` names each item's place."""
    out: list[tuple[bytes, str | None]] = []
    for where, item in items:
        token, *rest = item.split()
        if len(rest) > 1:
            raise ConfigError(f"server.{setting}: {where}: expected '<token>' or '<token> <tenant>'")
        tenant = rest[0] if rest else s.default_tenant
        if tenant is not None and tenant not in s.tenants:
            # The line or item, never the token itself: a config error must not leak a secret.
            raise ConfigError(
                f"server.{setting}: {where} names tenant {tenant!r}, which server.tenants does not "
                f"define (defined: {', '.join(sorted(s.tenants)) or 'none'})"
            )
        out.append((token.encode(), tenant))
    return out


def load_token_tenants(
    s: ServerSettings, environ: Mapping[str, str] | None = None
) -> list[tuple[bytes, str | None]]:
    """Accepted bearer tokens with their tenant (None: no tenant); empty when token auth is off.

    A line of auth_tokens_file (an item of auth_tokens_env) is `<token>` or `<token> <tenant>`;
    a token that names no tenant belongs to `server.default_tenant`."""
    environ = os.environ if environ is None else environ
    out: list[tuple[bytes, str | None]] = []
    if s.auth_tokens_file:
        lines = _read("auth_tokens_file", s.auth_tokens_file).decode("utf-8", "replace").splitlines()
        found = [
            (f"line {i}", t.strip())
            for i, t in enumerate(lines, 1)
            if t.strip() and not t.strip().startswith("#")
        ]
        if not found:
            raise ConfigError(f"server.auth_tokens_file: {s.auth_tokens_file!r} holds no token")
        out += _entries("auth_tokens_file", found, s)
    if s.auth_tokens_env:
        value = environ.get(s.auth_tokens_env, "")
        items = [(f"item {i}", t.strip()) for i, t in enumerate(value.split(","), 1) if t.strip()]
        if not items:
            raise ConfigError(
                f"server.auth_tokens_env: environment variable {s.auth_tokens_env} holds no token"
            )
        out += _entries("auth_tokens_env", items, s)
    return out


def load_tokens(s: ServerSettings, environ: Mapping[str, str] | None = None) -> list[bytes]:
    """Accepted bearer tokens; empty when token auth is off."""
    return [t for t, _ in load_token_tenants(s, environ)]


def presented_token(metadata) -> bytes | None:
    """The token of `authorization: Bearer <token>` metadata, or None."""
    value = next((v for k, v in metadata or () if k == "authorization"), None)
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    scheme, _, presented = value.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return None
    return presented.strip().encode()


class TenantOf:
    """Token -> tenant name, for a call TokenAuth has let in. Looked up by the token's SHA-256,
    so the time a lookup takes tells nothing about how much of a token matched."""

    def __init__(self, entries: list[tuple[bytes, str | None]]):
        self._by_digest = {hashlib.sha256(t).digest(): tenant for t, tenant in entries}

    def __call__(self, metadata) -> str | None:
        token = presented_token(metadata)
        if token is None:
            return None
        return self._by_digest.get(hashlib.sha256(token).digest())


def check_bearer(tokens: list[bytes], value: str | None, carrier: str) -> str | None:
    """None when `value` (an authorization header or metadata value) is `Bearer <an accepted
    token>`, else why not (never quoting what was sent). Both fronts check tokens here."""
    if value is None:
        return f"missing credentials: send {carrier} 'authorization: Bearer <token>'"
    scheme, _, presented = value.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return f"malformed authorization {carrier}: expected 'Bearer <token>'"
    candidate = presented.strip().encode()
    ok = False
    for t in tokens:  # no early exit: the time taken does not tell which token matched
        ok |= hmac.compare_digest(t, candidate)
    return None if ok else "invalid bearer token"


class TokenAuth(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED unless the call carries `authorization: Bearer <an accepted token>`."""

    def __init__(self, tokens: list[bytes], *, protect_health: bool):
        self._tokens = tokens
        self._protect_health = protect_health

    def _accepts(self, metadata) -> str | None:
        """None when the caller is authenticated, else why not (never quoting what it sent)."""
        value = next((v for k, v in metadata or () if k == "authorization"), None)
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        return check_bearer(self._tokens, value, "metadata")

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
