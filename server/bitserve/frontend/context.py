"""Per-request context the servicer sets and the engines read (without widening every call)."""

from __future__ import annotations

import contextvars

# Who sent the request being handled: the `x-client-id` metadata value, else the peer address.
# Generation admits waiting requests round-robin across clients (generation/policy.py).
current_client: contextvars.ContextVar[str] = contextvars.ContextVar("bitserve_client", default="")
