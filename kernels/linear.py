"""Python side of the few-row linear layer (kernels/csrc/few_row_linear.cpp): `F.linear` for inputs of a few
rows on a CPU, the products of a decoding step. `F.linear` itself is its reference and its fallback."""
from typing import Optional

import torch
import torch.nn.functional as F

from .ops import _EXTENSION_ERROR

MAX_ROWS = 16  # even with oneDNN's GEMM on a reordered weight here, behind it beyond (benchmarks/bench_linear.py)


def few_row_linear_available() -> bool:
    """The op is built and this CPU runs its AVX2/FMA path."""
    return _EXTENSION_ERROR is None and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def few_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for a float32 CPU `x` (..., K) and weight (N, K); `F.linear` itself where the
    op does not run, or where a gradient is needed (the op has none)."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if needs_grad or not few_row_linear_available() or x.device.type != "cpu" or x.dtype != torch.float32:
        return F.linear(x, weight, bias)
    return torch.ops.crossmodal.few_row_linear(x, weight, bias)


if _EXTENSION_ERROR is None:

    @torch.library.register_fake("crossmodal::few_row_linear")
    def _(x, weight, bias=None):
        return x.new_empty(*x.shape[:-1], weight.shape[0])
