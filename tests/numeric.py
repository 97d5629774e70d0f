"""Floating-point bounds the tests derive instead of guessing (Higham, "Accuracy and Stability of
Numerical Algorithms", ch. 3).

Two evaluations of one fp32 function that differ only in how their reductions are ordered (another
kernel - ATEN_CPU_CAPABILITY, bitsandbytes' CPU paths -, another batch shape or padding, another
split across threads, processes or micro-batches) each carry a dot-product error of at most
gamma_K = K*u / (1 - K*u) of sum |x_i*w_i| for a K-long reduction (u: the unit roundoff), so they
differ by at most 2*gamma_K of it. Through a network the relative errors of the matmuls on the
path to an output add up (first order; LayerNorm, softmax and the activations are taken as
1-Lipschitz in relative terms, and sum |x*w| as the scale of the output). These are worst-case
bounds: the typical error is ~sqrt(K)*u, so a bound a real bug would break (a wrong mask, weight
or merge moves outputs by 1e-2 or more) is still far above what any kernel path produces.
"""

from __future__ import annotations

from typing import Any

import torch

U32 = torch.finfo(torch.float32).eps / 2  # fp32 unit roundoff, 2^-24
UBF16 = torch.finfo(torch.bfloat16).eps / 2  # bf16 unit roundoff, 2^-8


def gamma(k: int, u: float = U32) -> float:
    """Higham's gamma_k: the relative error bound of a k-term sum or dot product."""
    return k * u / (1 - k * u)


def matmul_path(config: Any, seq_len: int, *, heads: int = 1) -> tuple[int, int]:
    """(depth, K): how many matmuls lie in sequence on the path from the embeddings to an output
    of a transformer with `config`, and the longest reduction among them. Per layer: Q|K|V, Q.K^T
    (head_dim long), P.V (seq_len long), O, up, down; then `heads` more (pooler, classifier or
    lm_head) of hidden_size."""
    hidden = config.hidden_size
    layers = getattr(config, "num_hidden_layers", None) or config.num_layers
    inter = getattr(config, "intermediate_size", None) or getattr(config, "d_ff", hidden)
    return 6 * layers + heads, max(hidden, inter, seq_len)


def forward_bound(config: Any, seq_len: int, scale: float, *, heads: int = 1, extra_k: int = 0) -> float:
    """Largest difference of two fp32 evaluations of one transformer's outputs whose largest
    magnitude is `scale`: depth * 2 * gamma_(K + extra_k) * scale. `extra_k` adds terms to every
    reduction (a LoRA branch of rank r and its merge add r + 2)."""
    depth, k = matmul_path(config, seq_len, heads=heads)
    return depth * 2 * gamma(k + extra_k) * scale


def log_softmax_bound(logit_bound: float) -> float:
    """log_softmax moves by at most twice the largest change of its input (the value itself and
    the log-sum-exp, each 1-Lipschitz in the max norm); softmax probabilities by at most half of
    that (d p_i / d z_j = p_i (delta_ij - p_j), whose rows sum in absolute value to 2 p_i (1 - p_i)
    <= 1/2)."""
    return 2 * logit_bound


def softmax_bound(logit_bound: float) -> float:
    """Softmax probabilities move by at most half the largest change of the logits (above)."""
    return logit_bound / 2
