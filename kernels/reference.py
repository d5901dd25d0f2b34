"""Pure-PyTorch contrastive (InfoNCE) losses: the fallback of the fused op and its test oracle.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (CLIP), and
open_clip's `ClipLoss` (local-loss mode for the distributed form). Deliberate difference from
open_clip: logits and cross entropy are computed in float32 (float64 for float64 features) whatever
the feature dtype, as the fused op does, instead of in the autocast dtype.
"""
import torch
import torch.nn.functional as F


def _logits(rows: torch.Tensor, cols: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    dtype = torch.promote_types(rows.dtype, torch.float32)
    scale = torch.as_tensor(logit_scale, device=rows.device).to(dtype)
    with torch.autocast(rows.device.type, enabled=False):  # autocast would run the matmul in bf16/fp16
        return scale * rows.to(dtype) @ cols.to(dtype).T  # (rows, cols)


def contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """(CE(S) + CE(S^T)) / 2 with S = logit_scale * image_features @ text_features^T, positives on the diagonal."""
    logits_per_image = _logits(image_features, text_features, logit_scale)  # (N, N)
    labels = torch.arange(len(logits_per_image), device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels)) / 2


def contrastive_loss_local(
    image_local: torch.Tensor,
    text_local: torch.Tensor,
    image_all: torch.Tensor,
    text_all: torch.Tensor,
    logit_scale: torch.Tensor | float,
    offset: int,
) -> torch.Tensor:
    """One rank's share of the distributed loss (open_clip local_loss with gathered features).

    The b local rows are rows offset ... offset + b - 1 of the gathered (N, D) features; each direction
    is a b x N cross entropy averaged over the local rows.
    """
    logits_per_image = _logits(image_local, text_all, logit_scale)  # (b, N)
    logits_per_text = _logits(text_local, image_all, logit_scale)  # (b, N)
    labels = torch.arange(len(image_local), device=image_local.device) + offset
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
