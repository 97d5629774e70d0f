"""Scheduling policy, pure: given what waits and what runs, decide what is admitted now.

No model, no clock, no threads: `Policy.schedule` takes views of the waiting and running
requests and the time, and returns a `Decision`; the scheduler carries it out. Unit-tested on
its own (tests/test_policy.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

# A nearly full batch admits newcomers once 1/JOIN_GROUP_DIVISOR of its slots are free, or
# after MAX_DEFER_STEPS decode steps (TGI's waiting_served_ratio / max_waiting_tokens idea):
# each join costs a prefill pass and a copy of the cache, paid by every running row.
JOIN_GROUP_DIVISOR = 4
MAX_DEFER_STEPS = 16


@dataclass(frozen=True)
class Waiting:
    prompt_len: int
    arrived: float
    deadline: float | None = None
    client: str = ""


@dataclass(frozen=True)
class Budget:
    max_concurrent: int  # rows in the running batch
    prefill_tokens: int  # padded prompt tokens admitted per step
    max_waiting_s: float = 0.0  # an idle engine lets a few more arrive to share one prefill


@dataclass
class Decision:
    admit: list[int] = field(default_factory=list)  # indices into `waiting`, in admission order
    expired: list[int] = field(default_factory=list)  # deadline passed while waiting
    wait_until: float | None = None  # nothing to do before then (idle batching window)


# Separates the tenant from the caller in `Waiting.client` ("acme\x1fpeer"): the front writes it
# for authenticated tenants (frontend/tenants.py); a client without it is in the unnamed tenant.
TENANT_SEP = "\x1f"


def fair_order(waiting: Sequence[Waiting], last_served: dict[str, int] | None = None) -> list[int]:
    """Indices of `waiting` round-robin across clients, each client's own requests in arrival
    order: a client with many queued requests cannot starve one with a few. The client served
    longest ago (or never) goes first (`last_served`: client -> admission counter)."""
    queues: dict[str, list[int]] = {}
    for i, w in enumerate(waiting):
        queues.setdefault(w.client, []).append(i)
    if len(queues) <= 1:
        return list(range(len(waiting)))
    served = last_served or {}
    order: list[int] = []
    lanes = [queues[c] for c in sorted(queues, key=lambda c: served.get(c, -1))]
    depth = 0
    while len(order) < len(waiting):
        for lane in lanes:
            if depth < len(lane):
                order.append(lane[depth])
        depth += 1
    return order


def tenant_key(client: str) -> str:
    """The `last_served` key of a client's tenant ("" + TENANT_SEP for the unnamed tenant)."""
    return client.partition(TENANT_SEP)[0] + TENANT_SEP if TENANT_SEP in client else TENANT_SEP


def tenant_fair_order(waiting: Sequence[Waiting], last_served: dict[str, int] | None = None) -> list[int]:
    """`fair_order` on two levels: round-robin across tenants (the part of `client` before
    TENANT_SEP), and within each tenant across its callers. A tenant with many callers gets
    no more turns than one with a single caller. The tenant served longest ago (`last_served`
    under `tenant_key`) goes first; with one tenant (none configured) this is `fair_order`."""
    tenants: dict[str, list[int]] = {}
    for i, w in enumerate(waiting):
        tenants.setdefault(tenant_key(w.client), []).append(i)
    if len(tenants) <= 1:
        return fair_order(waiting, last_served)
    served = last_served or {}

    def tenant_served(key: str) -> int:  # Policy.schedule records each tenant under its key
        return served.get(key, -1)

    lanes = []
    for tenant in sorted(tenants, key=tenant_served):
        idx = tenants[tenant]
        lanes.append([idx[k] for k in fair_order([waiting[i] for i in idx], served)])
    order: list[int] = []
    depth = 0
    while len(order) < len(waiting):
        for lane in lanes:
            if depth < len(lane):
                order.append(lane[depth])
        depth += 1
    return order


class Policy:
    """Admission between decode steps. Its state: how many steps a nearly full batch has held
    waiting requests back, and when each client was last served (round-robin)."""

    def __init__(self, budget: Budget):
        self.budget = budget
        self.deferred = 0
        self.admissions = 0
        self.last_served: dict[str, int] = {}  # client -> admission counter when last admitted

    def schedule(self, waiting: Sequence[Waiting], remaining: Sequence[int], now: float) -> Decision:
        """`remaining`: per running row, the tokens it may still generate (its max_new_tokens
        left); its length is the running batch size."""
        b = self.budget
        expired = [i for i, w in enumerate(waiting) if w.deadline is not None and now >= w.deadline]
        dead = set(expired)
        live = [i for i in range(len(waiting)) if i not in dead]
        if not live:
            return Decision(expired=expired)
        if not remaining:
            oldest = min(waiting[i].arrived for i in live)
            until = oldest + b.max_waiting_s
            if b.max_waiting_s > 0 and len(live) < b.max_concurrent and now < until:
                return Decision(expired=expired, wait_until=until)
        elif not self._join(len(remaining), remaining):
            return Decision(expired=expired)
        admit: list[int] = []
        longest = 0
        views = [waiting[i] for i in live]
        for k in tenant_fair_order(views, self.last_served):
            if len(remaining) + len(admit) >= b.max_concurrent:
                break
            n = views[k].prompt_len
            if admit and max(longest, n) * (len(admit) + 1) > b.prefill_tokens:
                break
            longest = max(longest, n)
            admit.append(live[k])
            self.admissions += 1
            self.last_served[views[k].client] = self.admissions
            self.last_served[tenant_key(views[k].client)] = self.admissions
        if len(self.last_served) > 10_000:  # forget the clients served longest ago
            keep = sorted(self.last_served, key=self.last_served.__getitem__)[-5_000:]
            self.last_served = {c: self.last_served[c] for c in keep}
        return Decision(admit=admit, expired=expired)

    def _join(self, running: int, remaining: Sequence[int]) -> bool:
        """Whether waiting requests join a running batch now: once a few slots are free (or a
        few steps have passed), together - unless no running row is due to finish before that
        wait would end (a wave of equal requests has just started: waiting would only leave
        the slots empty)."""
        b = self.budget
        free = b.max_concurrent - running
        if free <= 0:
            return False
        join = free >= max(1, b.max_concurrent // JOIN_GROUP_DIVISOR) or self.deferred >= MAX_DEFER_STEPS
        if not join:
            horizon = MAX_DEFER_STEPS - self.deferred
            join = all(r > horizon for r in remaining)
        if join:
            self.deferred = 0
            return True
        self.deferred += 1
        return False


def length_groups(lengths: Sequence[int], pass_tokens: int) -> list[list[int]]:
    """Indices of prompts split into prefill passes of similar lengths, minimising padded tokens
    plus `pass_tokens` per pass (a pass pads every prompt to its longest one: prompts of 4..51
    tokens in one pass are two thirds padding)."""
    n = len(lengths)
    if n < 2 or n * max(lengths) - sum(lengths) <= pass_tokens:
        return [list(range(n))]
    order = sorted(range(n), key=lambda i: lengths[i])
    sizes = [lengths[i] for i in order]
    best = [0] * (n + 1)  # best[j]: cost of the j shortest prompts
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = sizes[j - 1]
        best[j], cut[j] = min((best[i] + pass_tokens + (j - i) * longest, i) for i in range(j))
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]
