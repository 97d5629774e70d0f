"""Tenants: what each authenticated customer may use, checked before a request is queued, and
what it used, counted.

A bearer token names its tenant (api/security.py); the servicer puts the caller's `Tenant` in
`current_tenant` for the call. Every inference RPC passes `Tenant.admit_call` (requests per
second); a generation request passes `admit_sequences` once its prompts are tokenized
(concurrent sequences, the tenant's share of the model's room, prompt and generated tokens
per minute) and gets one `Ticket` per sequence, which gives back what it held when the
sequence ends: its slot, and the part of its `max_new_tokens` reservation it did not generate.

Rate windows are the `limits` package's (moving window for requests, fixed one-minute windows
for tokens, in memory); concurrency and shares are counters. All of it lives in the front
process, so a restarted engine process changes nothing here. Refusals are ResourceExhausted
with the tenant and its limit named and `retry_after` set (a google.rpc.RetryInfo on the wire);
a request that could never fit a limit is InvalidArgument.
"""

from __future__ import annotations

import contextvars
import math
import time
from collections.abc import Callable, Mapping

from limits import RateLimitItem, RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

from bitserve.engine.sched.policy import TENANT_SEP
from bitserve.errors import InvalidArgument, ResourceExhausted
from bitserve.metrics import Metrics
from bitserve.settings import TenantSettings

# Metric label of calls whose token names no tenant (tenants configured): bounded, and not a
# valid tenant name.
NO_TENANT = "(none)"
# Concurrency and queue shares free up when one of the tenant's sequences ends, which no window
# predicts: the retry hint is a short wait, a bit longer than a tiny generation takes.
CAPACITY_RETRY_S = 1.0
# Limit kinds, as metric labels and in messages.
REQUESTS, CONCURRENCY, SHARE = "requests_per_second", "max_concurrent_sequences", "queue_share"
PROMPT, GENERATED = "prompt_tokens_per_minute", "generated_tokens_per_minute"


def fairness_key(tenant: str | None, caller: str) -> str:
    """The scheduler's `client` value: tenant first, so admission is fair across tenants, then
    across callers within one (engine/sched/policy.py `tenant_fair_order`)."""
    return caller if tenant is None else f"{tenant}{TENANT_SEP}{caller}"


class Ticket:
    """One admitted sequence's hold on its tenant: released once, by `finish`."""

    __slots__ = ("tenant", "model", "reserved", "window", "done")

    def __init__(self, tenant: Tenant, model: str, reserved: int, window: float | None):
        self.tenant, self.model, self.reserved, self.window = tenant, model, reserved, window
        self.done = False

    def first_token(self, waited_s: float) -> None:
        self.tenant.metrics_queue_wait(waited_s)

    def finish(self, generated: int) -> None:
        """The sequence ended (finished, failed or abandoned) after `generated` tokens."""
        if self.done:
            return
        self.done = True
        self.tenant.release(self, generated)


class Tenant:
    def __init__(self, name: str, limits: TenantSettings, book: Tenants):
        self.name, self.limits, self._book = name, limits, book
        self.sequences = 0  # queued or running, across models
        self.per_model: dict[str, int] = {}
        rps = limits.requests_per_second
        self._rate: RateLimitItem | None = None
        if rps is not None:
            burst = limits.burst or math.ceil(rps)
            # `burst` calls per burst/rps seconds: the average rate is at most `rps`.
            self._rate = RateLimitItemPerSecond(burst, max(1, math.ceil(burst / rps)))
        self._prompt = _per_minute(limits.prompt_tokens_per_minute, PROMPT)
        self._generated = _per_minute(limits.generated_tokens_per_minute, GENERATED)
        m = book.metrics
        self._wait = m.tenant_queue_wait.labels(name) if m else None
        self._prompt_count = m.tenant_prompt_tokens.labels(name) if m else None
        self._generated_count = m.tenant_generated_tokens.labels(name) if m else None

    # checks --------------------------------------------------------------------------------
    def admit_call(self) -> None:
        """One inference RPC, or RESOURCE_EXHAUSTED over requests_per_second."""
        if self._rate is None:
            return
        if not self._book.moving.hit(self._rate, self.name):
            rate = self.limits.requests_per_second
            self._refuse(
                REQUESTS,
                f"tenant {self.name!r} is over its limit of {rate:g} requests per second "
                f"(burst {self._rate.amount})",
                self._book.moving.get_window_stats(self._rate, self.name).reset_time,
            )

    def check_capacity(self, model: str, capacity: int, n: int) -> None:
        """The limits `admit_sequences` checks that need no prompt (concurrent sequences, the
        queue share), for `n` sequences; takes nothing. Also checked before the request is
        tokenized, so that a tenant at its limit is refused without using the tokenization
        thread the other tenants' requests need (issue 22)."""
        lim = self.limits
        if lim.max_concurrent_sequences is not None:
            self._fits(CONCURRENCY, n, lim.max_concurrent_sequences, "sequences")
            if self.sequences + n > lim.max_concurrent_sequences:
                self._refuse(
                    CONCURRENCY,
                    f"tenant {self.name!r} has {self.sequences} sequences queued or running, "
                    f"at its limit of {lim.max_concurrent_sequences} concurrent sequences",
                    time.time() + CAPACITY_RETRY_S,
                )
        if lim.queue_share is not None:
            share = max(1, math.floor(lim.queue_share * capacity))
            self._fits(SHARE, n, share, f"sequences on model {model!r}")
            held = self.per_model.get(model, 0)
            if held + n > share:
                self._refuse(
                    SHARE,
                    f"tenant {self.name!r} holds {held} of the {capacity} queue places of model {model!r}, "
                    f"at its queue_share of {lim.queue_share:g} ({share} places)",
                    time.time() + CAPACITY_RETRY_S,
                )

    def admit_sequences(
        self, model: str, capacity: int, prompt_lens: list[int], max_new_tokens: int
    ) -> list[Ticket]:
        """Room for these sequences of one request on `model` (whose room is `capacity`
        sequences), or an error naming the limit; nothing is taken unless everything fits."""
        n = len(prompt_lens)
        self.check_capacity(model, capacity, n)
        costs = ((PROMPT, self._prompt, sum(prompt_lens)), (GENERATED, self._generated, n * max_new_tokens))
        window = self._book.fixed
        for kind, item, cost in costs:
            if item is None:
                continue
            self._fits(
                kind, cost, item.amount, "tokens (texts x max_new_tokens)" if kind == GENERATED else "tokens"
            )
            if not window.test(item, self.name, cost=cost):
                left = window.get_window_stats(item, self.name).remaining
                self._refuse(
                    kind,
                    f"tenant {self.name!r} is over its limit of {item.amount} {kind.replace('_', ' ')}: "
                    f"this request needs {cost}, {left} are left in this minute",
                    window.get_window_stats(item, self.name).reset_time,
                )
        for _, item, cost in costs:
            if item is not None:
                window.hit(item, self.name, cost=cost)
        expiry = None
        if self._generated is not None:
            expiry = self._book.storage.get_expiry(self._generated.key_for(self.name))
        self.sequences += n
        self.per_model[model] = self.per_model.get(model, 0) + n
        if self._prompt_count is not None:
            self._prompt_count.inc(sum(prompt_lens))
        return [Ticket(self, model, max_new_tokens, expiry) for _ in range(n)]

    def _fits(self, kind: str, need: int, limit: int, what: str) -> None:
        if need > limit:
            raise InvalidArgument(
                f"this request needs {need} {what}, more than tenant {self.name!r}'s whole "
                f"{kind} limit of {limit}; send a smaller request"
            )

    def _refuse(self, kind: str, message: str, reset_at: float) -> None:
        if self._book.metrics is not None:
            self._book.metrics.tenant_limited.labels(self.name, kind).inc()
        retry = max(reset_at - time.time(), 0.001)
        raise ResourceExhausted(f"{message}; retry in {retry:.2f} s", retry_after=retry)

    # accounting ----------------------------------------------------------------------------
    def release(self, ticket: Ticket, generated: int) -> None:
        self.sequences -= 1
        self.per_model[ticket.model] -= 1
        if self._generated_count is not None:
            self._generated_count.inc(generated)
        unused = ticket.reserved - generated
        if self._generated is not None and unused > 0:
            key = self._generated.key_for(self.name)
            # Only into the window the reservation was taken from: a new window owes nothing.
            if self._book.storage.get_expiry(key) == ticket.window:
                self._book.storage.decr(key, unused)

    def metrics_queue_wait(self, seconds: float) -> None:
        if self._wait is not None:
            self._wait.observe(seconds)

    def usage(self) -> dict[str, Callable[[], float]]:
        """Per configured limit, its use now as a fraction of the limit (for the gauges)."""
        out: dict[str, Callable[[], float]] = {}
        lim = self.limits
        if self._rate is not None:
            rate = self._rate
            out[REQUESTS] = lambda: (
                1 - self._book.moving.get_window_stats(rate, self.name).remaining / rate.amount
            )
        if lim.max_concurrent_sequences is not None:
            most = lim.max_concurrent_sequences
            out[CONCURRENCY] = lambda: self.sequences / most
        for kind, item in ((PROMPT, self._prompt), (GENERATED, self._generated)):
            if item is not None:
                out[kind] = _window_use(self._book.fixed, item, self.name)
        return out


def _per_minute(amount: int | None, kind: str) -> RateLimitItem | None:
    # The namespace keeps the two token windows of a tenant apart when their amounts are equal.
    return None if amount is None else RateLimitItemPerMinute(amount, namespace=kind)


def _window_use(window: FixedWindowRateLimiter, item: RateLimitItem, name: str) -> Callable[[], float]:
    return lambda: 1 - window.get_window_stats(item, name).remaining / item.amount


class Tenants:
    """The configured tenants and their shared window storage; empty when none is configured."""

    def __init__(self, tenants: Mapping[str, TenantSettings], metrics: Metrics | None = None):
        self.metrics = metrics
        self.storage = MemoryStorage()
        self.moving = MovingWindowRateLimiter(self.storage)
        self.fixed = FixedWindowRateLimiter(self.storage)
        self._tenants = {name: Tenant(name, limits, self) for name, limits in tenants.items()}
        if metrics is not None:
            for t in self._tenants.values():
                # Every series exists from the start, at 0: a dashboard shows idle tenants, and
                # no label value is ever created from what a caller sends.
                for code in ("OK", "RESOURCE_EXHAUSTED"):
                    metrics.tenant_requests.labels(t.name, code)
                metrics.tenant_prompt_tokens.labels(t.name)
                metrics.tenant_generated_tokens.labels(t.name)
                for kind, use in t.usage().items():
                    metrics.tenant_limit_usage.labels(t.name, kind).set_function(use)
                    metrics.tenant_limited.labels(t.name, kind)

    def __bool__(self) -> bool:
        return bool(self._tenants)

    def get(self, name: str | None) -> Tenant | None:
        return None if name is None else self._tenants.get(name)

    def count(self, tenant: Tenant | None, code: str) -> None:
        """One answered RPC, by its final status code (tenants configured only)."""
        if self._tenants and self.metrics is not None:
            self.metrics.tenant_requests.labels(tenant.name if tenant else NO_TENANT, code).inc()


# The tenant of the call being handled (None: no tenant, no limits); set by the servicer.
current_tenant: contextvars.ContextVar[Tenant | None] = contextvars.ContextVar(
    "bitserve_tenant", default=None
)


def check_capacity(model: str, capacity: int, n: int) -> None:
    """`Tenant.check_capacity` for the current call's tenant (none: nothing to check)."""
    tenant = current_tenant.get()
    if tenant is not None:
        tenant.check_capacity(model, capacity, n)


def admit_sequences(
    model: str, capacity: int, prompt_lens: list[int], max_new_tokens: int
) -> list[Ticket | None]:
    """`Tenant.admit_sequences` for the current call's tenant; no tickets without one."""
    tenant = current_tenant.get()
    if tenant is None:
        return [None] * len(prompt_lens)
    return list(tenant.admit_sequences(model, capacity, prompt_lens, max_new_tokens))
