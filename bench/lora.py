"""Many LoRA adapters on one base: 64 clients spread over 8 adapters vs the same 64 clients on
the base alone, on the same served model in the same run (phases alternate, so load drift hits
both), with equal and with mixed lengths.

    python -m bench.lora                              # tiny Llama, 8 adapters of rank 8
    python -m bench.lora --model DIR --device cuda --seconds 20 --rounds 3 --write

Throughput is generated tokens per second over all clients (each closed-loop: next request as
soon as the last answered). The base phase asks for exactly the lengths the adapter phase's
answers had (an adapter changes when EOS comes), so both do the same work per request. The
target (issue 21) is adapters >= 0.7x base. Writes bench/results/lora-<device>.json with --write.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPTS = [
    "Hello world, this is a test of",
    "The quick brown fox jumps over the lazy dog and",
    "Stock markets fell as the bank raised interest rates today and",
    "la maison est grande et",
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIXED = [8, 16, 32, 64, 128]  # max_new_tokens per request in the mixed-lengths phases


def _clients(
    target: str, clients: int, seconds: float, adapters: int, lengths: list[int], mixed: bool
) -> dict:
    return asyncio.run(_run_clients(target, clients, seconds, adapters, lengths, mixed))


async def _run_clients(target, clients, seconds, adapters, lengths, mixed) -> dict:
    import grpc

    from bitserve_proto.v1 import inference_pb2 as pb
    from bitserve_proto.v1 import inference_pb2_grpc as pb_grpc

    tokens = requests = 0
    made: list[int] = []
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.InferenceStub(ch)
        t0 = time.perf_counter()

        async def worker(w: int) -> None:
            nonlocal tokens, requests
            i = w
            while time.perf_counter() - t0 < seconds:
                if lengths:
                    n = lengths[i % len(lengths)]
                else:
                    n = MIXED[(i * 7) % len(MIXED)] if mixed else 64
                adapter = f"ad{w % adapters}" if adapters else ""
                r = await stub.Generate(
                    pb.GenerateRequest(
                        texts=[PROMPTS[i % len(PROMPTS)]],
                        model="lm",
                        adapter=adapter,
                        parameters=pb.GenerationParameters(max_new_tokens=max(1, n)),
                    )
                )
                g = r.generations[0]
                tokens += g.generated_tokens
                made.append(g.generated_tokens)
                requests += 1
                i += clients

        await asyncio.gather(*(worker(w) for w in range(clients)))
        wall = time.perf_counter() - t0
    return {"tokens": tokens, "requests": requests, "wall": wall, "made": made}


def make_adapters(base: Path, root: Path, n: int, rank: int) -> dict[str, str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = {}
    for k in range(n):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        torch.manual_seed(100 + k)
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
        peft_model = get_peft_model(model, cfg)
        d = root / f"ad{k}"
        peft_model.save_pretrained(d, safe_serialization=True)
        out[f"ad{k}"] = str(d)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.lora", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny | a checkpoint directory (a Llama-style LM)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=8.0, help="per phase")
    ap.add_argument("--rounds", type=int, default=2, help="adapter/base phase pairs per length mode")
    ap.add_argument("--write", action="store_true", help="write bench/results/lora-<device>.json")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.generation import InProcessServer

    root = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    if args.model == "tiny":
        from bitserve.models.tiny import build_causal_lm

        base = build_causal_lm(root / "lm", max_positions=512)
    else:
        base = Path(args.model)
    adapters = make_adapters(base, root, args.adapters, args.rank)
    cfg: dict[str, Any] = {
        "name": "lm",
        "task": "generate",
        "path": str(base),
        "device": args.device,
        "adapters": adapters,
        "max_resident_adapters": args.adapters,
    }
    srv = InProcessServer(cfg)
    started = time.time()
    load_before = os.getloadavg()
    ctx = mp.get_context("spawn")
    phases: dict[tuple[str, str], list[dict]] = {}
    try:
        with ctx.Pool(1) as pool:
            pool.apply(_clients, (srv.target, 4, 1.0, args.adapters, [4], False))  # warm up both paths
            for _ in range(args.rounds):
                for lengths_mode in ("equal", "mixed"):
                    lengths: list[int] = []
                    for mode in ("lora", "base"):
                        r = pool.apply(
                            _clients,
                            (
                                srv.target,
                                args.clients,
                                args.seconds,
                                args.adapters if mode == "lora" else 0,
                                lengths,
                                lengths_mode == "mixed",
                            ),
                        )
                        lengths = [max(1, x) for x in r.pop("made")]
                        r["tps"] = r["tokens"] / r["wall"]
                        r["load1"] = os.getloadavg()[0]
                        phases.setdefault((lengths_mode, mode), []).append(r)
                        print(f"{lengths_mode:5s} {mode:4s} {r['tps']:8.1f} tok/s  {r}", flush=True)
    finally:
        srv.stop()
    load_after = os.getloadavg()
    ratios = {
        lm: [a["tps"] / b["tps"] for a, b in zip(phases[(lm, "lora")], phases[(lm, "base")], strict=True)]
        for lm in ("equal", "mixed")
    }
    for lm, rs in ratios.items():
        print(
            f"{lm} lengths: {args.adapters} adapters / base throughput {statistics.median(rs):.2f}x "
            f"(per round {[round(x, 2) for x in rs]}; target >= 0.7)"
        )
    print(f"load average before {load_before}, after {load_after}")
    if args.write:
        from bench import results

        rows = [
            {
                "lengths": lm,
                "mode": f"{args.adapters} adapters" if mode == "lora" else "base only",
                "tps": statistics.median(r["tps"] for r in phases[(lm, mode)]),
                "requests": sum(r["requests"] for r in phases[(lm, mode)]),
                "ratio": statistics.median(ratios[lm]) if mode == "lora" else 1.0,
            }
            for lm in ("equal", "mixed")
            for mode in ("lora", "base")
        ]
        path = results.write(
            f"lora-{args.device}",
            command=results.command_line("bench.lora", argv),
            columns=[
                results.column("lengths", "lengths"),
                results.column("mode", "clients on"),
                results.column("tps", "tokens/s", "{:.0f}"),
                results.column("ratio", "vs base", "{:.2f}x"),
                results.column("requests", "requests done", "{}"),
            ],
            rows=rows,
            notes=[
                f"{args.clients} clients, client i on adapter i mod {args.adapters} (rank {args.rank}, all 7 "
                f"linear modules of each layer), {args.rounds} x {args.seconds:.0f} s per phase, model "
                f"{args.model}; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}"
            ],
            extra={
                "ratios": ratios,
                "load_before": load_before,
                "load_after": load_after,
                "phase_load1": {f"{k[0]}-{k[1]}": [r["load1"] for r in v] for k, v in phases.items()},
            },
            started=started,
        )
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
