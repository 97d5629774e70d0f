"""bitsandbytes' other 4-bit CPU path, on any CPU: the AVX512-BF16 inference kernel, emulated.

On a CPU with AVX512-BF16 (Zen 4 EPYC, Sapphire Rapids), bitsandbytes 0.50's `Linear4bit.forward`
takes another path in eval mode without grad: it repacks the weight (`_convert_weight_packed_for_cpu`:
the double-quantized absmax dequantized and rounded to bf16) and calls the CPU `gemv_4bit` kernel
(`csrc/cpu_ops.cpp: gemv_4bit_inference`, or the same kernel from the `kernels` package). That kernel
rounds the activations and the NF4 code values to bf16, sums each 64-wide block in fp32
(`_mm512_dpbf16_ps`: bf16 x bf16 products are exact in fp32), scales each block sum by its bf16
absmax in fp32 and rounds the output to bf16. Training never takes it (`self.training`, grads):
it dequantizes to fp32 and multiplies in fp32, as every CPU without AVX512-BF16 always does.

`emulate()` makes this machine take that path: bitsandbytes' own repacking (pure torch) runs as
it does there; only the kernel is replaced by the arithmetic above in torch. `BITSERVE_TEST_BNB_CPU=
avx512bf16` turns it on for a whole pytest session (tests/quantize/conftest.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

ENV = "BITSERVE_TEST_BNB_CPU"
PATH = "avx512bf16"


def _kernel(
    A: torch.Tensor,
    B: torch.Tensor,
    shapeB: Sequence[int],
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
) -> torch.Tensor:
    """`gemv_4bit_inference<bf16_t, NF4|FP4>` on the packed layout, as the AVX512-BF16 kernel computes."""
    n, k = int(shapeB[0]), int(shapeB[1])
    # Undo the packing of `_convert_weight_packed_for_cpu` (its inverse, steps 1-2, without the
    # re-quantization of absmax): [N, K/2] bytes -> [N, K] code indices.
    packed = B.contiguous().view(torch.uint8).reshape(-1, 32)
    qw = torch.cat([packed & 0xF, (packed >> 4) & 0xF], dim=-1)
    idx = qw.reshape(n // 32, k // 2, 32, 2).transpose(-3, -2).reshape(n, k).long()
    # The kernel's lookup table is the code book rounded to bf16 (its hex constants).
    w = code.to(torch.bfloat16).float()[idx]
    x = A.reshape(-1, k).to(torch.bfloat16).float()
    groups = k // blocksize
    partial = torch.einsum("mgb,ngb->mng", x.view(-1, groups, blocksize), w.view(n, groups, blocksize))
    scales = absmax.to(torch.bfloat16).float().reshape(groups, n).t()  # Bs layout: [K/bs, N]
    out = (partial * scales).sum(-1).to(torch.bfloat16)
    return out.to(A.dtype).reshape(*A.shape[:-1], n)


_active = [0]


@contextlib.contextmanager
def emulate() -> Iterator[None]:
    """Linear4bit layers built inside take the AVX512-BF16 inference path in eval mode."""
    import bitsandbytes.functional as F
    import bitsandbytes.nn.modules as modules

    if _active[0]:  # already on (the whole session under BITSERVE_TEST_BNB_CPU)
        yield
        return
    _active[0] += 1
    lib = torch.library.Library("bitsandbytes", "FRAGMENT")  # removed on exit
    torch.library.register_kernel("bitsandbytes::gemv_4bit", "cpu", _kernel, lib=lib)
    saved = modules.has_avx512bf16
    modules.has_avx512bf16 = lambda: True
    try:
        # The repacking asserts the layouts the kernel needs; keep it the library's own.
        assert callable(F._convert_weight_packed_for_cpu)
        yield
    finally:
        modules.has_avx512bf16 = saved
        lib._destroy()
        _active[0] -= 1


def taken(model: torch.nn.Module) -> int:
    """How many 4-bit layers of `model` ran the repacked (AVX512-BF16) kernel."""
    import bitsandbytes.nn as bnn

    return sum(
        1
        for m in model.modules()
        if isinstance(m, bnn.Linear4bit) and getattr(m.weight.quant_state, "packing_format_for_cpu", False)
    )
