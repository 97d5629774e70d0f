"""Per-row logits adjustments made before a token is chosen: `logit_bias` and constrained
decoding (a JSON schema, any JSON object, a regex, a choice, an EBNF grammar).

Constraints run on xgrammar (what vLLM and SGLang default to): a grammar is compiled once per
text on a worker thread (`Grammars`, cached), each constrained row holds a matcher (`Guide`)
that advances with every accepted token, and each step fills a token bitmask for the
constrained rows only and masks their logits in place. The sampler makes ONE call,
`Adjust.apply`, on a batch that has such rows; a batch without them pays nothing (its plan has
no `Adjust`). When the grammar is complete it admits only the end tokens (the model's EOS and
the request's stop ids), so a finished constrained row ends as any row does.
"""

from __future__ import annotations

import collections
import json
import re
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bitserve.errors import InvalidArgument
from bitserve.types import Constraint

if TYPE_CHECKING:
    from bitserve.engine.sched.sequence import Sequence

GRAMMAR_CACHE_ENTRIES = 256  # compiled grammars kept, by (kind, text); least recently used go
BAN = -100.0  # a bias at or below this bans the token outright (-inf), as OpenAI documents -100


class Grammars:
    """Compiles constraints for one tokenizer on a worker thread, off the step loop; compiled
    grammars (and compile errors) are cached by their text."""

    def __init__(self, tokenizer: Any, vocab: int, stop_ids: frozenset[int]):
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab = vocab
        self.stop_ids = stop_ids
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab, stop_token_ids=sorted(stop_ids)
        )
        # xgrammar's own compile threads would compete with the step loop for the CPU.
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")
        self._cache: collections.OrderedDict[tuple[str, str], Future[Any]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.batch_matcher = xgr.BatchGrammarMatcher(max_threads=1)
        # Tokens a constrained row never takes, whatever its grammar allows: special tokens
        # other than the end tokens (the front drops them from the text, which would then not
        # be what the grammar matched) and, for JSON, tokens holding a control byte - xgrammar's
        # JSON strings admit raw control characters, which strict JSON (RFC 8259) does not.
        added = getattr(tokenizer, "added_tokens_decoder", {})
        special = set(getattr(tokenizer, "all_special_ids", ())) | {i for i, t in added.items() if t.special}
        special -= set(stop_ids)
        control = {i for i, b in enumerate(info.decoded_vocab) if any(c < 0x20 for c in b)}
        self._never = {"plain": self._mask_without(special), "json": self._mask_without(special | control)}
        self.compile_s: list[float] = []  # seconds per compile done (the benchmark reports them)

    def _mask_without(self, ids: set[int]) -> torch.Tensor:
        """A one-row bitmask (int32 words, bit j of word w: token 32w + j) allowing all but `ids`."""
        allowed = torch.ones(((self.vocab + 31) // 32) * 32, dtype=torch.bool)
        allowed[sorted(i for i in ids if i < self.vocab)] = False
        allowed[self.vocab :] = False
        bits = allowed.view(-1, 32).long() << torch.arange(32)
        # Word values up to 2**32 - 1 wrap into int32's sign bit, as xgrammar stores bit 31.
        return bits.sum(1).to(torch.int32)

    def guide(self, c: Constraint, stop_ids: frozenset[int]) -> Guide:
        key = (c.kind, c.value)
        with self._lock:
            fut = self._cache.get(key)
            if fut is None:
                fut = self._pool.submit(self._compile, c)
                self._cache[key] = fut
                while len(self._cache) > GRAMMAR_CACHE_ENTRIES:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
        never = self._never["json" if c.kind in ("json_schema", "json_object") else "plain"]
        return Guide(self, fut, sorted(self.stop_ids | stop_ids), never)

    def _compile(self, c: Constraint) -> Any:
        import time

        t0 = time.perf_counter()
        comp = self._compiler
        try:
            if c.kind == "json_schema":
                # Compact JSON (no free whitespace): fewer tokens, and a model cannot pad forever.
                out = comp.compile_json_schema(c.value, any_whitespace=False)
            elif c.kind == "json_object":
                # Any object (the built-in JSON grammar would also take arrays and scalars).
                out = comp.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            elif c.kind == "regex":
                out = comp.compile_regex(c.value)
            elif c.kind == "choice":
                out = comp.compile_grammar(choice_grammar(c.value))
            elif c.kind == "grammar":
                out = comp.compile_grammar(c.value)
            else:
                raise InvalidArgument(f"parameters.constraint: unknown kind {c.kind!r}")
        except InvalidArgument:
            raise
        except Exception as e:  # xgrammar raises RuntimeError/ValueError with the parser's words
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            first = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", first)  # xgrammar's "[time] file.cc:line: "
            raise InvalidArgument(f"parameters.constraint.{c.kind}: does not compile: {first}") from None
        self.compile_s.append(time.perf_counter() - t0)
        return out


def choice_grammar(value: str) -> str:
    """EBNF for "exactly one of these strings" (JSON string literals are EBNF string literals)."""
    options = json.loads(value)
    return "root ::= " + " | ".join(json.dumps(o) for o in options)


class Guide:
    """One row's constraint: ready once its grammar is compiled; then a matcher that advances
    with each token the row accepts."""

    __slots__ = ("grammars", "future", "stop_ids", "never", "matcher")

    def __init__(self, grammars: Grammars, future: Future[Any], stop_ids: list[int], never: torch.Tensor):
        self.grammars = grammars
        self.future = future
        self.stop_ids = stop_ids
        self.never = never  # bitmask row of the tokens this row may take at all
        self.matcher: Any = None

    def ready(self) -> bool:
        return self.future.done()

    def start(self) -> None:
        """The matcher, from the compiled grammar; raises the compile error if there was one."""
        compiled = self.future.result()
        self.matcher = self.grammars._xgr.GrammarMatcher(compiled, override_stop_tokens=self.stop_ids)

    def accept(self, token: int) -> bool:
        """Advance by the token the row chose; False if the grammar does not allow it."""
        return bool(self.matcher.accept_token(token))


def hold_compiling(waiting: list[Sequence], errors: list[tuple[int, BaseException]]) -> list[Sequence]:
    """The waiting sequences that may be admitted now: their grammar (if any) is compiled and
    their matcher started. Sequences whose grammar failed leave `waiting` with their error."""
    ready: list[Sequence] = []
    failed: set[int] = set()
    for s in waiting:
        g = s.guide
        if g is None:
            ready.append(s)
        elif g.matcher is not None:
            ready.append(s)
        elif g.ready():
            try:
                g.start()
            except Exception as e:
                errors.append((s.rid, e))
                failed.add(s.rid)
                continue
            ready.append(s)
    if failed:
        waiting[:] = [s for s in waiting if s.rid not in failed]
    return ready


class Adjust:
    """The adjustments of one batch layout (made with the sampler's plan, so once per change
    of membership): a sparse bias per row, and the rows a grammar constrains."""

    def __init__(self, seqs: list[Sequence]):
        self.seqs = seqs
        self.guided = [i for i, s in enumerate(seqs) if s.guide is not None]
        self.matchers = [seqs[i].guide.matcher for i in self.guided]  # type: ignore[union-attr]
        self.grammars = seqs[self.guided[0]].guide.grammars if self.guided else None  # type: ignore[union-attr]
        self._built = False
        self.bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.ban: tuple[torch.Tensor, torch.Tensor] | None = None
        self.bitmask: torch.Tensor | None = None

    @staticmethod
    def needed(seqs: list[Sequence]) -> bool:
        return any(s.guide is not None or s.params.logit_bias for s in seqs)

    def _build(self, vocab: int, dev: torch.device) -> None:
        rows, toks, vals, ban_rows, ban_toks = [], [], [], [], []
        for i, s in enumerate(self.seqs):
            for t, b in s.params.logit_bias:
                if not 0 <= t < vocab:
                    continue  # the front checks ids against the tokenizer; padding rows are not ours
                if b <= BAN:
                    ban_rows.append(i)
                    ban_toks.append(t)
                else:
                    rows.append(i)
                    toks.append(t)
                    vals.append(b)
        if rows:
            self.bias = (
                torch.tensor(rows, device=dev),
                torch.tensor(toks, device=dev),
                torch.tensor(vals, device=dev),
            )
        if ban_rows:
            self.ban = (torch.tensor(ban_rows, device=dev), torch.tensor(ban_toks, device=dev))
        if self.grammars is not None:
            self.bitmask = self.grammars._xgr.allocate_token_bitmask(len(self.seqs), vocab)
            self.rows = torch.tensor(self.guided)
            self.allowed = torch.stack([self.seqs[i].guide.never for i in self.guided])  # type: ignore[union-attr]
        self._built = True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Bias, then the grammar mask, in place on float logits [B, V]."""
        if not self._built:
            self._build(logits.shape[1], logits.device)
        if self.bias is not None:
            r, t, v = self.bias
            logits.index_put_((r, t), v, accumulate=True)
        if self.ban is not None:
            logits[self.ban] = -float("inf")
        if self.grammars is not None:
            assert self.bitmask is not None
            g = self.grammars
            g.batch_matcher.batch_fill_next_token_bitmask(self.matchers, self.bitmask, indices=self.guided)
            self.bitmask[self.rows] &= self.allowed
            if logits.device.type == "cpu" and logits.dtype == torch.float32 and _LITTLE_ENDIAN:
                ban_cpu(logits, self.bitmask)
            else:
                mask = self.bitmask.to(logits.device, non_blocking=True)
                g._xgr.apply_token_bitmask_inplace(
                    logits, mask, vocab_size=logits.shape[1], indices=self.guided
                )
        return logits


_LITTLE_ENDIAN = sys.byteorder == "little"


def ban_cpu(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """-inf into every `logits[i, t]` whose bit is clear in `bitmask` (int32 words, bit j of word
    w: token 32w + j, as xgrammar lays it out), for all rows at once, on the CPU.

    What xgrammar's CPU kernel does, without its per-token branch: the inverted words are
    unpacked into one byte per token (numpy's unpackbits; little-endian words, so the bytes'
    little bit order is the token order) and those bytes are the boolean mask of one
    `masked_fill_`. Rows that no grammar fills keep allocate_token_bitmask's all-ones words and
    so lose nothing. 2-3x faster on a 49,152-token vocabulary (bench/structured.py)."""
    vocab = logits.shape[1]
    banned = np.unpackbits(np.invert(bitmask.numpy()).view(np.uint8), axis=1, bitorder="little")
    logits.masked_fill_(torch.from_numpy(banned[:, :vocab]).view(torch.bool), -float("inf"))
