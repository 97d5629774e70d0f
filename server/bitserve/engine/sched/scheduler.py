"""The generation step loop: admit (policy), prefill, decode, sample, retire.

`Scheduler.step()` runs one iteration and returns what happened as plain data - one token per
running row and the requests that ended in an error - for the engine process to send to the
front. Waiting requests join the running batch between steps; finished, cancelled and expired
rows leave it. Two ways to hold the running rows: the persistent batch (`SlotBatch`: slots
written in place, joins prefill into free slots, a leaving row frees its slot) for every model
it supports, and the copying `Batch` (`filter` / `concatenate`) for the others.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field

import torch

from bitserve.engine.sched.policy import Budget, Policy, Waiting, length_groups
from bitserve.engine.sched.sequence import Sequence
from bitserve.engine.worker import logits as adjust
from bitserve.engine.worker.batch import Batch
from bitserve.engine.worker.input_batch import SlotBatch
from bitserve.engine.worker.model_runner import CausalLM
from bitserve.engine.worker.sampler import select_tokens
from bitserve.errors import DeadlineExceeded, NotFound
from bitserve.types import GenerationRequest

log = logging.getLogger(__name__)

# The fixed cost of one forward pass, in padded prompt tokens: admitted prompts are prefilled
# in passes of similar lengths when the padding saved is worth more passes. On CPU a pass costs
# ~1 ms of Python, ~150 padded tokens of a small model; on a GPU the launch overhead buys
# thousands (rough: it only has to keep a GPU from splitting where padding is cheap).
PREFILL_PASS_TOKENS = {"cpu": 256}
PREFILL_PASS_TOKENS_DEFAULT = 8192
# A long prompt's chunk beside running rows is sized by time: its pass should cost about
# CHUNK_STEP_SHARE x a decode step of those rows (so their inter-token gap grows by that share
# while it prefills), at least MIN_CHUNK_TOKENS, at most the model's prefill_chunk_tokens (alone,
# it prefills in chunks of that). The first chunk, before any pass was timed, takes about
# CHUNK_TOKENS_PER_ROW tokens per running row (at least FIRST_CHUNK_TOKENS).
CHUNK_STEP_SHARE = 1.0
CHUNK_TOKENS_PER_ROW = 4
FIRST_CHUNK_TOKENS = 64
MIN_CHUNK_TOKENS = 16
DECODE_EMA = 0.2  # weight of the newest decode step in the running mean of its time

# (rid, token id, logprob or None, finish reason or None, [[id, logprob], ...] alternatives or None)
TokenOut = tuple[int, int, float | None, str | None, list[list[float]] | None]


@dataclass
class StepResult:
    tokens: list[TokenOut] = field(default_factory=list)
    errors: list[tuple[int, BaseException]] = field(default_factory=list)
    batch_size: int = 0  # rows in this step's decode pass (0: none ran)
    batch_models: dict[str, int] = field(default_factory=dict)  # those rows per model
    prompt_tokens: int = 0  # prompt tokens prefilled in this step
    queue_waits: dict[str, list[float]] = field(default_factory=dict)  # per model, of those admitted
    wait_until: float | None = None  # idle batching window: nothing to do before then


@dataclass
class SchedulerStats:
    steps: int = 0
    prefills: int = 0
    max_running: int = 0
    batch_sizes: collections.Counter[int] = field(default_factory=collections.Counter)
    prefill_rows: int = 0  # prompts prefilled (identical prompts admitted together count once)


class Scheduler:
    def __init__(
        self,
        lm: CausalLM,
        *,
        max_concurrent: int,
        prefill_token_budget: int,
        max_waiting_ms: float,
        name: str = "generate",
        persistent: bool = True,
        kv_cache_tokens: int = 0,
        prefill_chunk_tokens: int = 512,
    ):
        self.lm = lm
        self.name = name
        self.waiting: list[Sequence] = []
        self.chunk_tokens = prefill_chunk_tokens
        self._chunk_queue: list[Sequence] = []  # admitted prompts to prefill in chunks, in turn
        # Per queued long prompt (by id of its sequence): the sequences of the same prompt
        # admitted with it (n completions), which join as copies of its row when it is complete.
        self._followers: dict[int, list[Sequence]] = {}
        self._batch: Batch | None = None  # the copying path's running batch
        # The persistent batch, when this model can be served in slots.
        self.slots: SlotBatch | None = None
        reason = lm.no_slots_reason if persistent else "persistent_batch is off"
        if reason is None:
            kv = kv_cache_tokens or max_concurrent * (lm.max_context + 1)
            self.slots = lm.new_slots(max_concurrent, kv)
            log.info("%s: persistent batch (%d slots, at most %d KV tokens)", name, max_concurrent, kv)
        else:
            log.info("%s: copying batch, not the persistent one: %s", name, reason)
        self.path = "persistent" if self.slots is not None else "copying"
        kv_budget = self.slots.kv_tokens if self.slots is not None else None
        self.policy = Policy(
            Budget(max_concurrent, prefill_token_budget, max_waiting_ms / 1000.0, kv_tokens=kv_budget)
        )
        self.stats = SchedulerStats()
        self._pass_tokens = PREFILL_PASS_TOKENS.get(lm.device.type, PREFILL_PASS_TOKENS_DEFAULT)
        # After a prefill the step ends (its first tokens go out at once); the next one decodes
        # every row before anything else is admitted.
        self._decode_next = False
        self.grammars: adjust.Grammars | None = None  # made at the first constrained request
        # Seconds of a decode step (running mean) and the last chunk's (tokens, seconds): what
        # the next chunk's size comes from.
        self._decode_s = 0.0
        self._last_chunk: tuple[int, float] | None = None

    # requests --------------------------------------------------------------------------------
    def add(self, req: GenerationRequest, arrived: float | None = None) -> None:
        """Queue `req`; NOT_FOUND at once for an adapter this engine does not know."""
        seq = Sequence(req, arrived)
        if seq.adapter:
            bank = self.lm.lora
            if bank is None or seq.adapter not in bank.known:
                raise NotFound(f"model {req.model!r} has no adapter {req.params.adapter!r} loaded")
        if req.params.constraint is not None:
            if self.grammars is None:
                self.grammars = adjust.Grammars(self.lm.tokenizer, self.lm.vocab, self.lm.eos)
            # Compiles on the grammar thread; the sequence waits until its matcher can start.
            seq.guide = self.grammars.guide(req.params.constraint, seq.stop_ids)
        self.waiting.append(seq)

    def abort(self, rids: set[int]) -> None:
        """Forget these requests: waiting ones at once, running ones at the next step."""
        if not rids:
            return
        self.waiting = [s for s in self.waiting if s.rid not in rids]
        for key, fs in list(self._followers.items()):
            self._followers[key] = [f for f in fs if f.rid not in rids]
        queue: list[Sequence] = []
        for s in self._chunk_queue:
            if s.rid not in rids:
                queue.append(s)
            else:  # its followers are prefilled without it: the first leads, the others copy it
                fs = self._followers.pop(id(s), [])
                if fs:
                    queue.append(fs[0])
                    self._followers[id(fs[0])] = fs[1:]
        self._chunk_queue = queue
        if self.slots is not None and self.slots.partial is not None and self.slots.partial.rid in rids:
            self.slots.partial.cancelled = True
        if self.batch is not None:
            for s in self.batch.seqs:
                if s.rid in rids:
                    s.cancelled = True

    @property
    def batch(self) -> Batch | SlotBatch | None:
        """The running rows, or None when none runs."""
        if self.slots is not None:
            return self.slots if len(self.slots) else None
        return self._batch

    @batch.setter
    def batch(self, b: Batch | None) -> None:
        assert self.slots is None
        self._batch = b

    @property
    def running(self) -> list[Sequence]:
        b = self.batch
        return b.seqs if b is not None else []

    @property
    def chunking(self) -> bool:
        """A long prompt is being (or waits to be) prefilled in chunks."""
        return bool(self._chunk_queue) or (self.slots is not None and self.slots.partial is not None)

    def active(self) -> bool:
        """Something runs: rows decode, or a prompt is prefilled in chunks."""
        return self.batch is not None or self.chunking

    def has_work(self) -> bool:
        return bool(self.waiting) or self.active()

    # one iteration ---------------------------------------------------------------------------
    def step(self, now: float | None = None) -> StepResult:
        now = time.monotonic() if now is None else now
        out = StepResult()
        if self._decode_next and self.batch is not None:
            self._decode_next = False
            self._decode(out)
            return out
        if self.chunking:
            # One chunk, then (next step) a decode of the running rows: a long prompt delays
            # them by a chunk's pass at a time. Other joins wait for its last chunk.
            self._chunk(out)
            self._decode_next = True
            return out
        running = self.running
        slots = self.slots
        # Sequences whose grammar still compiles wait without holding up the others.
        ready = adjust.hold_compiling(self.waiting, out.errors) if self.grammars is not None else self.waiting
        if self.lm.lora is not None:
            ready = self._resident_adapters(ready, out)
        decision = self.policy.schedule(
            [Waiting(len(s.prompt_ids), s.arrived, s.deadline, s.client, s.max_new_tokens) for s in ready],
            [s.max_new_tokens - len(s.token_ids) for s in running],
            now,
            kv_needs=(
                [c + s.max_new_tokens - len(s.token_ids) for c, s in zip(slots.cols, running, strict=True)]
                if slots is not None
                else ()
            ),
        )
        for i in decision.expired:
            out.errors.append(
                (
                    ready[i].rid,
                    DeadlineExceeded("deadline expired while queued; the model was not run"),
                )
            )
        new = [ready[i] for i in decision.admit]
        if self.lm.lora is not None:
            for s in new:
                s.lora = self.lm.lora.slot[s.adapter] if s.adapter else 0
        gone = {ready[i].rid for i in set(decision.expired) | set(decision.admit)}
        if gone:
            self.waiting = [s for s in self.waiting if s.rid not in gone]
        if len(ready) < len(self.waiting) and decision.wait_until is None:
            decision.wait_until = now + 0.002  # look again soon for a compiled grammar
        if new and self.slots is not None:
            for s in new:
                out.queue_waits.setdefault(s.model, []).append(now - s.arrived)
            short = [s for s in new if len(s.prompt_ids) <= self.chunk_tokens]
            reps, copies = _distinct([s for s in new if len(s.prompt_ids) > self.chunk_tokens])
            lead = {_prompt_key(s): s for s in reps}
            for c in copies:
                self._followers.setdefault(id(lead[_prompt_key(c)]), []).append(c)
            self._chunk_queue.extend(reps)
            if short:
                self._join(short, out)
            elif self._chunk_queue:
                self._chunk(out)
            self._decode_next = True
            return out
        if new:
            for s in new:
                out.queue_waits.setdefault(s.model, []).append(now - s.arrived)
            try:
                joined = self._prefill(new, out)
            except Exception as e:
                log.exception("prefill of %d sequences failed in %s", len(new), self.name)
                out.errors.extend((s.rid, e) for s in new)
                joined = None
            if joined is not None:
                self._batch = Batch.concatenate([self._batch, joined]) if self._batch is not None else joined
            self._decode_next = True
            return out
        if self.batch is None:
            out.wait_until = decision.wait_until
            return out
        self._decode(out)
        return out

    # LoRA adapters -----------------------------------------------------------------------------
    def adapters_in_use(self) -> set[int]:
        """The bank slots that running rows and admitted prompts decode with."""
        used = {s.lora for s in self.running} | {s.lora for s in self._chunk_queue}
        if self.slots is not None and self.slots.partial is not None:
            used.add(self.slots.partial.lora)
        used.discard(0)
        return used

    def _resident_adapters(self, ready: list[Sequence], out: StepResult) -> list[Sequence]:
        """`ready` less the sequences whose adapter cannot be resident now (every slot is used
        by running rows: they wait); an adapter unloaded since the request came is NOT_FOUND."""
        bank = self.lm.lora
        assert bank is not None
        in_use = self.adapters_in_use()
        if bank.draining:
            bank.free_unused(in_use)
        if not any(s.adapter for s in ready):
            return ready
        keep: list[Sequence] = []
        failed: set[int] = set()
        for s in ready:
            if not s.adapter:
                keep.append(s)
                continue
            try:
                slot = bank.acquire(s.adapter, in_use)
            except Exception as e:  # unloaded meanwhile, or its files changed under it
                out.errors.append((s.rid, e))
                failed.add(s.rid)
                continue
            if slot is not None:
                in_use.add(slot)  # what this step admits keeps it resident
                keep.append(s)
        if failed:
            self.waiting = [s for s in self.waiting if s.rid not in failed]
        return keep

    def _decode(self, out: StepResult) -> None:
        batch = self.batch
        assert batch is not None
        self.stats.max_running = max(self.stats.max_running, len(batch))
        try:
            t0 = time.perf_counter()
            logits = self.lm.decode(batch)
            dt = time.perf_counter() - t0
            self._decode_s = dt if not self._decode_s else (1 - DECODE_EMA) * self._decode_s + DECODE_EMA * dt
            self.stats.steps += 1
            self.stats.batch_sizes[len(batch)] += 1
            out.batch_size = len(batch)
            out.batch_models = dict(collections.Counter(s.model for s in batch.seqs))
            if isinstance(batch, SlotBatch):
                self._advance_slots(batch, 0, logits, out, now=time.monotonic())
            else:
                self._batch = self._advance(batch, logits, out, now=time.monotonic())
        except Exception as e:
            log.exception("decode step of %d sequences failed in %s", len(batch), self.name)
            out.errors.extend((s.rid, e) for s in batch.seqs if not s.cancelled)
            if isinstance(batch, SlotBatch):
                batch.leave(list(range(len(batch))))
            else:
                self._batch = None

    # the persistent batch --------------------------------------------------------------------
    def _join(self, seqs: list[Sequence], out: StepResult) -> None:
        """Prefill `seqs` into free slots, a pass per length group; their first tokens out.
        Identical prompts admitted together (the n completions of a prompt) are prefilled once:
        the others join as copies of that row (KV, mask, position) and then decode on their own."""
        slots = self.slots
        assert slots is not None
        reps, copies = _distinct(seqs)
        groups = length_groups([len(s.prompt_ids) for s in reps], self._pass_tokens)
        for g in groups:
            part = [reps[i] for i in g]
            row_of = {_prompt_key(s): i for i, s in enumerate(part)}
            followers = [c for c in copies if _prompt_key(c) in row_of]
            start = len(slots)
            try:
                logits = self.lm.join(slots, part, extra=len(followers))
                self.stats.prefills += 1
                self.stats.prefill_rows += len(part)
                out.prompt_tokens += sum(len(s.prompt_ids) for s in part)
                if followers:
                    src = [row_of[_prompt_key(c)] for c in followers]
                    slots.copy_rows([start + i for i in src], followers)
                    logits = torch.cat([logits, logits[torch.tensor(src, device=logits.device)]])
                self._advance_slots(slots, start, logits, out, now=time.monotonic())
            except Exception as e:
                log.exception("prefill of %d sequences failed in %s", len(part) + len(followers), self.name)
                failed = part + followers
                out.errors.extend((s.rid, e) for s in failed)
                joined = [start + i for i, s in enumerate(slots.seqs[start:]) if s in failed]
                slots.leave(joined)

    def _chunk(self, out: StepResult) -> None:
        """The next chunk of the long prompt in prefill (the queue's first when none is)."""
        slots = self.slots
        assert slots is not None
        seq = slots.partial
        if seq is None:
            seq = self._chunk_queue.pop(0)
        if seq.cancelled:
            slots.drop_partial()
            fs = self._followers.pop(id(seq), [])
            if fs:  # the completions still wanted are prefilled without it
                self._chunk_queue.insert(0, fs[0])
                self._followers[id(fs[0])] = fs[1:]
            return
        size = self._chunk_size()
        end = min(slots.partial_done + size, len(seq.prompt_ids))
        whole = end - slots.partial_done == size  # (the last chunk may be shorter)
        followers: list[Sequence] = []
        try:
            t0 = time.perf_counter()
            logits = self.lm.chunk(slots, seq, end)
            if whole:
                self._last_chunk = (size, time.perf_counter() - t0)
            self.stats.prefills += 1
            if slots.end_chunk():
                self.stats.prefill_rows += 1
                out.prompt_tokens += len(seq.prompt_ids)
                r = len(slots) - 1
                followers = self._followers.pop(id(seq), [])
                if followers:  # the same prompt's other completions: copies of its row
                    slots.copy_rows([r] * len(followers), followers)
                    logits = logits.repeat(1 + len(followers), 1)
                self._advance_slots(slots, r, logits, out, now=time.monotonic())
        except Exception as e:
            log.exception("chunked prefill failed in %s", self.name)
            followers = followers or self._followers.pop(id(seq), [])
            out.errors.extend((s.rid, e) for s in [seq, *followers])
            if slots.partial is seq:
                slots.drop_partial()
            gone = [i for i, s in enumerate(slots.seqs) if s is seq or s in followers]
            slots.leave(gone)

    def _chunk_size(self) -> int:
        """Prompt tokens in the next chunk: `prefill_chunk_tokens` at most; beside running rows,
        as many as make the chunk's pass cost about CHUNK_STEP_SHARE x their decode step.

        A controller, not a cost model: the last whole chunk's size scaled by how far its pass
        time was from the target (at most halved or doubled per chunk), so it settles where a
        pass costs the target whatever this machine's fixed cost per pass and cost per token
        are - and follows the cost up as the prompt's context (its attention) grows.
        bench.long_join: fixed chunks of 4 tokens per row (252 beside 63 rows) made the running
        rows' inter-token p99 5.2x their median."""
        rows = len(self.running)
        if rows == 0:
            return self.chunk_tokens
        if self._last_chunk is None or not self._decode_s:
            size = max(FIRST_CHUNK_TOKENS, CHUNK_TOKENS_PER_ROW * rows)
        else:
            last, took = self._last_chunk
            scale = CHUNK_STEP_SHARE * self._decode_s / max(took, 1e-6)
            size = int(last * min(2.0, max(0.5, scale)))
        return min(self.chunk_tokens, max(MIN_CHUNK_TOKENS, size))

    def _advance_slots(
        self, slots: SlotBatch, start: int, logits: torch.Tensor, out: StepResult, *, now: float
    ) -> None:
        """Rows `start..` get one token each (their `logits`); finished, cancelled and expired
        rows leave their slots."""
        ids_t, ids, lps, tops = select_tokens(logits, slots.rows(start))
        slots.set_next(start, ids_t)
        eos = self.lm.eos
        leaving: list[int] = []
        for i, t in enumerate(ids):
            r = start + i
            s = slots.seqs[r]
            if s.cancelled:
                leaving.append(r)
                continue
            s.token_ids.append(t)
            if s.guide is not None and not s.guide.accept(t):
                out.errors.append((s.rid, RuntimeError(f"token {t} broke the request's constraint")))
                leaving.append(r)
                continue
            if t in eos:
                s.finish = "eos"
            elif t in s.stop_ids:
                s.finish = "stop"
            elif len(s.token_ids) >= s.max_new_tokens:
                s.finish = "length"
            elif s.deadline is not None and now >= s.deadline:
                out.errors.append((s.rid, DeadlineExceeded("deadline expired during generation")))
                leaving.append(r)
                continue
            want = s.params.logprobs or s.params.top_logprobs > 0
            lp = lps[i] if lps is not None and want else None
            top = tops[i][: s.params.top_logprobs] if tops is not None and s.params.top_logprobs else None
            out.tokens.append((s.rid, t, lp, s.finish, top))
            if s.finish is not None:
                leaving.append(r)
        slots.leave(leaving)

    def _prefill(self, seqs: list[Sequence], out: StepResult) -> Batch | None:
        # Identical prompts admitted together (the n completions of one prompt) are prefilled
        # once; their rows are copies of that row's cache.
        # (Same prompt, same adapter: a prompt through another adapter is another prefill.)
        reps: dict[tuple[int, ...], Sequence] = {}
        for s in seqs:
            reps.setdefault(_prompt_key(s), s)
        distinct = list(reps.values())
        groups = length_groups([len(s.prompt_ids) for s in distinct], self._pass_tokens)
        parts = [self.lm.prefill([distinct[i] for i in g]) for g in groups]
        self.stats.prefills += len(parts)
        self.stats.prefill_rows += len(distinct)
        out.prompt_tokens += sum(len(s.prompt_ids) for s in distinct)
        if len(parts) == 1:
            batch, logits = parts[0]
        else:
            # Rows (and so logits) in the order of the parts, as concatenate lays them out.
            batch = Batch.concatenate([b for b, _ in parts])
            logits = torch.cat([lg for _, lg in parts])
        if len(distinct) < len(seqs):
            batch, logits = _copy_rows(batch, logits, seqs, reps)
        return self._advance(batch, logits, out, now=time.monotonic())

    def _advance(self, batch: Batch, logits: torch.Tensor, out: StepResult, *, now: float) -> Batch | None:
        """Append one token per row; retire finished, cancelled and expired rows."""
        ids_t, ids, lps, tops = select_tokens(logits, batch)
        eos = self.lm.eos
        keep: list[int] = []
        for i, (s, t) in enumerate(zip(batch.seqs, ids, strict=True)):
            if s.cancelled:
                continue
            s.token_ids.append(t)
            if s.guide is not None and not s.guide.accept(t):
                out.errors.append((s.rid, RuntimeError(f"token {t} broke the request's constraint")))
                continue
            if t in eos:
                s.finish = "eos"
            elif t in s.stop_ids:
                s.finish = "stop"
            elif len(s.token_ids) >= s.max_new_tokens:
                s.finish = "length"
            elif s.deadline is not None and now >= s.deadline:
                out.errors.append((s.rid, DeadlineExceeded("deadline expired during generation")))
                continue
            want = s.params.logprobs or s.params.top_logprobs > 0
            lp = lps[i] if lps is not None and want else None
            top = tops[i][: s.params.top_logprobs] if tops is not None and s.params.top_logprobs else None
            out.tokens.append((s.rid, t, lp, s.finish, top))
            if s.finish is None:
                keep.append(i)
        kept = batch.filter(keep)
        if kept is not None:
            if kept is batch:
                kept.next_ids = ids_t
            else:
                kept.next_ids = ids_t.index_select(0, torch.tensor(keep, device=ids_t.device))
            if kept.seen is not None:
                kept.seen[torch.arange(len(kept), device=kept.seen.device), kept.next_ids] = True
        return kept


def _prompt_key(s: Sequence) -> tuple[int, ...]:
    """What a shared prefill must agree on: the prompt and the LoRA adapter it runs through."""
    return (s.lora, *s.prompt_ids)


def _distinct(seqs: list[Sequence]) -> tuple[list[Sequence], list[Sequence]]:
    """The first sequence of each distinct (adapter, prompt), and the others (in order)."""
    seen: set[tuple[int, ...]] = set()
    reps: list[Sequence] = []
    copies: list[Sequence] = []
    for s in seqs:
        key = _prompt_key(s)
        (copies if key in seen else reps).append(s)
        seen.add(key)
    return reps, copies


def _copy_rows(
    batch: Batch, logits: torch.Tensor, seqs: list[Sequence], reps: dict[tuple[int, ...], Sequence]
) -> tuple[Batch, torch.Tensor]:
    """The batch of `seqs` from the prefilled batch of their distinct prompts: each row a copy
    of its prompt's row (cache, mask, positions, logits)."""
    row = {id(s): i for i, s in enumerate(batch.seqs)}
    idx = [row[id(reps[_prompt_key(s)])] for s in seqs]
    copied = batch.filter(idx)
    assert copied is not None
    copied.seqs = list(seqs)
    return copied, logits.index_select(0, torch.tensor(idx, device=logits.device))
