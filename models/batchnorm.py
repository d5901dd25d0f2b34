"""Synchronised batch normalisation: training-mode statistics over the whole global batch, on any device.

With per-process BatchNorm, W processes of B samples normalise each process's B samples by their own
mean and variance, so CLIP's ResNet trains a different model on 1 and on W processes. Here the sums
behind the mean and variance are all-reduced, so every process normalises by the statistics of all
W*B samples, and the backward all-reduces the two sums the input gradient needs: forward and backward
equal one process holding the whole batch (up to summation order), on CPU (gloo) and GPU (NCCL) alike.

Deliberate differences from `torch.nn.SyncBatchNorm`: that module refuses CPU tensors and computes its
statistics with CUDA-only kernels; this one is written with tensor ops and two all-reduces per pass (the
mean first, then the centred sum of squares: no E[x^2] - E[x]^2 cancellation). Parameters, buffers and
their names are those of `nn.BatchNorm2d`, so checkpoints are interchangeable.
"""
import torch
import torch.distributed as dist
from torch import nn

from crossmodal import distributed


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(tensor)
    return tensor


class _SyncBatchNormFunction(torch.autograd.Function):
    """y = (x - mean) * invstd with mean and variance over every process's (N, H, W) positions."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dims = (0, 2, 3)
        count = _all_reduce(torch.tensor(float(x.numel() // x.shape[1]), device=x.device, dtype=torch.float64))
        mean = _all_reduce(x.sum(dims, dtype=torch.float64)) / count  # (C,)
        centred = x - mean.to(x.dtype)[None, :, None, None]
        var = _all_reduce((centred.double() ** 2).sum(dims)) / count  # (C,) biased, as used to normalise
        invstd = torch.rsqrt(var + eps).to(x.dtype)
        xhat = centred * invstd[None, :, None, None]
        ctx.save_for_backward(xhat, invstd, count)
        mean, unbiased_var = mean.to(x.dtype), (var * count / (count - 1).clamp(min=1)).to(x.dtype)
        ctx.mark_non_differentiable(mean, unbiased_var)
        return xhat, mean, unbiased_var

    @staticmethod
    def backward(ctx, grad_xhat: torch.Tensor, _grad_mean, _grad_var):
        xhat, invstd, count = ctx.saved_tensors
        dims = (0, 2, 3)
        # d(sum of every process's loss)/dx: the statistics depend on all processes' inputs, so the two
        # sums of the upstream gradient are global.
        sums = _all_reduce(torch.stack([grad_xhat.sum(dims), (grad_xhat * xhat).sum(dims)]).double())
        mean_grad, mean_grad_xhat = (sums / count).to(grad_xhat.dtype)  # (C,) each
        grad_x = (grad_xhat - mean_grad[None, :, None, None] - xhat * mean_grad_xhat[None, :, None, None])
        return grad_x * invstd[None, :, None, None], None


class SyncBatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` whose training-mode statistics cover all processes of the default group."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and distributed.world_size() > 1):
            return super().forward(x)
        xhat, mean, unbiased_var = _SyncBatchNormFunction.apply(x, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(unbiased_var, momentum)
        if not self.affine:
            return xhat
        return xhat * self.weight[None, :, None, None] + self.bias[None, :, None, None]


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every `nn.BatchNorm2d` in `module` by a `SyncBatchNorm2d` holding the same tensors."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats)
            sync.load_state_dict(child.state_dict(), assign=True)
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child)
    return module
