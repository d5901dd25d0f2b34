"""Fused, memory-lean contrastive loss (C++/CUDA op `torch.ops.crossmodal.*`) with a pure-PyTorch fallback."""
from .ops import available_backends, contrastive_loss, contrastive_loss_local

__all__ = ["available_backends", "contrastive_loss", "contrastive_loss_local"]
