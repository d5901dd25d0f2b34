"""Contrastive image-text losses: CLIP's symmetric InfoNCE and SigLIP's pairwise sigmoid loss.

CLIP: Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision".
SigLIP: Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training".

Every function takes the features *local to this process*. With torch.distributed initialised and more
than one process, the features are gathered with gradient and each rank computes the loss of its own
rows against all columns (open_clip's `--local-loss --gather-with-grad`, the only mode that scales).
Each rank's loss is a mean over its rows, so DDP's gradient average equals the gradient of one process
holding the whole global batch. The gather's backward sums the gradient from every rank (open_clip's
`torch.distributed.nn.all_gather` path has had scaling issues; this one is written out explicitly).
"""
import torch
import torch.distributed as dist

from crossmodal import distributed
from crossmodal import kernels


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate equal-sized tensors from all ranks along dim 0; backward sums gradients over ranks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world_size = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.size = dist.get_rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # every rank's loss depends on every rank's features: sum their gradients, keep our slice.
        # (all_reduce rather than reduce_scatter: gloo has no reduce_scatter.)
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each of W ranks -> (W*B, ...), rank order; identity with one process."""
    if distributed.world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    impl: str = "torch",
) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch. Features (B, D), normalised; logit_scale is the multiplier.

    impl="torch" is the pure-PyTorch loss (kernels/reference.py, also the fused op's test oracle);
    impl="fused" is the tiled C++/CUDA op that never materialises the logits matrix.
    """
    if impl not in ("torch", "fused"):
        raise ValueError(f"loss.impl must be 'torch' or 'fused', got {impl!r}")
    backend = "torch" if impl == "torch" else "auto"
    if distributed.world_size() == 1:
        return kernels.contrastive_loss(image_features, text_features, logit_scale, backend=backend)
    all_image = all_gather_with_grad(image_features)  # (N, D)
    all_text = all_gather_with_grad(text_features)  # (N, D)
    offset = distributed.rank() * image_features.shape[0]
    return kernels.contrastive_loss_local(
        image_features, text_features, all_image, all_text, logit_scale, offset, backend=backend
    )


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    impl: str = "torch",
) -> torch.Tensor:
    """Pairwise sigmoid loss: -(1/B) sum_ij log sigmoid(z_ij (t x_i.y_j + b)), z = +1 on matching pairs.

    Each rank scores its B images against all N gathered texts (one all-gather instead of big_vision's
    ring of permutes: the same gradients). Normalised by the local batch, as the paper. impl as in
    clip_loss: "torch" holds the B x N logits, "fused" never more than a block of them.
    """
    if impl not in ("torch", "fused"):
        raise ValueError(f"loss.impl must be 'torch' or 'fused', got {impl!r}")
    offset = distributed.rank() * image_features.shape[0]
    all_text = all_gather_with_grad(text_features)  # (N, D)
    backend = "torch" if impl == "torch" else "auto"
    return kernels.siglip_loss_local(image_features, all_text, logit_scale, logit_bias, offset, backend=backend)
