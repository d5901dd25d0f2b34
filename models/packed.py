"""Faster `F.linear` for inference on a CPU, for generation: a few-row kernel for decoding steps, oneDNN's matmul on
weights reordered once for the rest.

A decoding step multiplies a few rows (batch x beams) by every weight of the decoder, so its time is the time to
read the weights. On the 2-core AVX2 machine of docs/results.md, MKL's GEMM behind `F.linear` read BLIP-base's
decoder weights at 3-6 GB/s with 6 rows, oneDNN's matmul on a copy of each weight laid out for it
(`torch.ops.mkldnn._reorder_linear_weight`, what torch.compile's CPU backend does with frozen weights) at 7-9 GB/s,
and this codebase's few-row kernel (kernels/csrc/few_row_linear.cpp) at 12-14 GB/s, on the weights as they are; a
plain sum reads them at 15-20 GB/s (benchmarks/bench_linear.py). So calls of up to `kernels.linear.MAX_ROWS` rows
go to the kernel, larger ones (an image tower's hundreds of rows, where oneDNN and MKL are about even) to oneDNN.
The products equal `F.linear`'s up to float32 rounding (about 1e-6 relative: another summation order).

    packing = LinearPacking()                      # owns the reordered copies, made again when a weight changes
    with packing(linear_modules(decoder) + [lm_head]):
        logits = lm_head(decoder(tokens), tied_embedding_weight)

Inside the block, the given modules' `forward` is served by `LinearPacking.linear`: an nn.Linear directly, any
other module (a tied output layer calling F.linear itself) under a `TorchFunctionMode` that catches its F.linear
calls. Only those modules pay for it, not every other operator of the step as a mode around the whole decoder
would (measured: 0.25 s of 1.4 s of BLIP-base's beam search). Calls run on the fast path only on a float32 CPU
input without gradient and outside autocast; everything else, and everywhere else (a GPU, bf16), runs as usual.
The oneDNN copies cost as much memory as the weights they stand for, kept until the `LinearPacking` goes.
"""
import contextlib
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from crossmodal.kernels.linear import MAX_ROWS, few_row_linear_available


def linear_modules(*modules: nn.Module) -> list[nn.Module]:
    """Every nn.Linear inside `modules`."""
    return [m for module in modules for m in module.modules() if isinstance(m, nn.Linear)]


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class LinearPacking:
    """Serves F.linear on a CPU at inference; keeps oneDNN copies of weights, each with the version it copies."""

    def __init__(self):
        self.copies: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}  # id(weight) -> (weight, version, copy)

    def __deepcopy__(self, memo) -> "LinearPacking":  # a copied model makes its own copies (of its own weights)
        return LinearPacking()

    def __getstate__(self) -> dict:  # pickled (torch.save of a whole model): the copies are made again on use
        return {"copies": {}}

    @contextlib.contextmanager
    def __call__(self, modules: Iterable[nn.Module]) -> Iterator[None]:
        # an instance attribute hides the class's forward until it is deleted; modules that already have one (an
        # enclosing block's) keep it
        modules = [m for m in {id(m): m for m in modules}.values() if "forward" not in vars(m)]
        if not (onednn_available() or few_row_linear_available()):
            yield
            return
        for module in modules:
            module.forward = self._serving(module)
        try:
            yield
        finally:
            for module in modules:
                del module.forward

    def _serving(self, module: nn.Module) -> Callable:
        if isinstance(module, nn.Linear):
            return lambda x: self.linear(x, module.weight, module.bias)
        class_forward = type(module).forward

        def forward(*args, **kwargs):
            with _LinearMode(self):
                return class_forward(module, *args, **kwargs)

        return forward

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`F.linear(x, weight, bias)`, on the few-row kernel or oneDNN where they may run."""
        if (
            x.device.type != "cpu"
            or x.dtype != torch.float32
            or weight.dtype != torch.float32
            or torch.is_grad_enabled()
            or torch.is_autocast_enabled("cpu")
        ):
            return F.linear(x, weight, bias)
        rows = max(1, x.numel() // x.shape[-1])
        if rows <= MAX_ROWS and few_row_linear_available():  # a decoding step: the weight as it is
            return torch.ops.crossmodal.few_row_linear(x, weight, bias)
        if onednn_available():
            return torch.ops.mkldnn._linear_pointwise(x, self.copy_of(weight, rows), bias, "none", [], "")
        return F.linear(x, weight, bias)

    def copy_of(self, weight: torch.Tensor, rows: int) -> torch.Tensor:
        """The reordered copy of `weight`, made now if there is none or the weight changed since."""
        entry = self.copies.get(id(weight))
        if entry is None or entry[0] is not weight or entry[1] != weight._version:
            entry = (weight, weight._version, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows))
            self.copies[id(weight)] = entry
        return entry[2]


class _LinearMode(TorchFunctionMode):
    """Sends F.linear to `packing.linear` inside a module whose forward calls F.linear itself."""

    def __init__(self, packing: LinearPacking):
        super().__init__()
        self.packing = packing

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            return self.packing.linear(x, weight, args[2] if len(args) > 2 else kwargs.get("bias"))
        return func(*args, **kwargs)
