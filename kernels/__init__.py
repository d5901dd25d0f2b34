"""C++/CUDA ops with pure-PyTorch fallbacks: the fused, memory-lean contrastive losses, InfoNCE and sigmoid
(`torch.ops.crossmodal.*`), and the few-row linear layer of CPU decoding."""
from .linear import few_row_linear, few_row_linear_available
from .ops import available_backends, contrastive_loss, contrastive_loss_local, siglip_loss, siglip_loss_local

__all__ = [
    "available_backends", "contrastive_loss", "contrastive_loss_local", "few_row_linear", "few_row_linear_available",
    "siglip_loss", "siglip_loss_local",
]
