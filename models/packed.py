"""Faster `F.linear` for inference on a CPU: oneDNN's matmul on weights reordered once, for decoding.

A decoding step multiplies a few rows (batch x beams) by every weight of the decoder, so its time is the time to
read the weights. In BLIP-base's beam search (6 rows) on the 2-core AVX2 machine measured here, MKL's GEMM behind
`F.linear` read them at 2-3 GB/s; oneDNN's matmul on a copy of each weight laid out for it
(`torch.ops.mkldnn._reorder_linear_weight`, what torch.compile's CPU backend does with frozen weights) at about
6 GB/s, the memory's speed there (15-20 GB/s on weights that stay in cache). At a ViT's few hundred rows the two
were about even. (`benchmarks/bench_blip.py`, docs/results.md.) The products equal `F.linear`'s up to float32
rounding (about 1e-6 relative: another summation order).

    packing = LinearPacking()                      # owns the reordered copies, made again when a weight changes
    with packing(linear_weights(decoder) + [tied_embedding_weight]):
        logits = decoder(tokens)                   # every F.linear on those weights, nn.Linear's included

Inside the block a `TorchFunctionMode` serves `F.linear` calls whose weight is one of those given, on a float32 CPU
input without gradient and outside autocast; everything else runs as usual. Elsewhere (a GPU, bf16, a torch without
oneDNN) the block changes nothing. The copies cost as much memory as the weights they stand for, kept until the
`LinearPacking` goes; each is made on first use, laid out for the rows of that call.
"""
import contextlib
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


def linear_weights(*modules: nn.Module) -> list[torch.Tensor]:
    """The weights of every nn.Linear inside `modules`."""
    return [m.weight for module in modules for m in module.modules() if isinstance(m, nn.Linear)]


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class LinearPacking:
    """Reordered copies of weights for oneDNN's matmul, by weight, each with the version of the weight it copies."""

    def __init__(self):
        self.copies: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}  # id(weight) -> (weight, version, copy)

    def __deepcopy__(self, memo) -> "LinearPacking":  # a copied model makes its own copies (of its own weights)
        return LinearPacking()

    def __getstate__(self) -> dict:  # pickled (torch.save of a whole model): the copies are made again on use
        return {"copies": {}}

    @contextlib.contextmanager
    def __call__(self, weights: Iterable[torch.Tensor]) -> Iterator[None]:
        weights = {id(w): w for w in weights if w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() == 2}
        if not weights or not onednn_available():
            yield
            return
        with _PackedLinearMode(self, weights):
            yield

    def copy_of(self, weight: torch.Tensor, rows: int) -> torch.Tensor:
        """The reordered copy of `weight`, made now if there is none or the weight changed since."""
        entry = self.copies.get(id(weight))
        if entry is None or entry[0] is not weight or entry[1] != weight._version:
            entry = (weight, weight._version, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows))
            self.copies[id(weight)] = entry
        return entry[2]


class _PackedLinearMode(TorchFunctionMode):
    def __init__(self, packing: LinearPacking, weights: dict[int, torch.Tensor]):
        super().__init__()
        self.packing, self.weights = packing, weights

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if (
                id(weight) in self.weights
                and x.device.type == "cpu"
                and x.dtype == torch.float32
                and not torch.is_grad_enabled()
                and not torch.is_autocast_enabled("cpu")
            ):
                rows = max(1, x.numel() // x.shape[-1])
                return torch.ops.mkldnn._linear_pointwise(x, self.packing.copy_of(weight, rows), bias, "none", [], "")
        return func(*args, **kwargs)
