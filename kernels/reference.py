"""Pure-PyTorch contrastive losses, InfoNCE and sigmoid: the fallbacks of the fused ops and their test oracles.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (CLIP), and
open_clip's `ClipLoss` (local-loss mode for the distributed form); Zhai et al. 2023, "Sigmoid Loss for
Language Image Pre-Training" (SigLIP). Deliberate difference from
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


def siglip_loss_local(
    image_local: torch.Tensor,
    text_all: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    offset: int,
) -> torch.Tensor:
    """-(1/b) sum_ij log sigmoid(z_ij (logit_scale * image_i . text_j + logit_bias)) over the b local images
    against all N texts; z_ij = +1 where j = offset + i (the image's own text), -1 elsewhere."""
    logits = _logits(image_local, text_all, logit_scale)  # (b, N)
    logits = logits + torch.as_tensor(logit_bias, device=logits.device).to(logits.dtype)
    b = len(image_local)
    signs = torch.full_like(logits, -1.0)
    signs[torch.arange(b), torch.arange(b) + offset] = 1.0
    return -F.logsigmoid(signs * logits).sum() / b


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
) -> torch.Tensor:
    """The one-process sigmoid loss: N images against their N texts, positives on the diagonal."""
    return siglip_loss_local(image_features, text_features, logit_scale, logit_bias, 0)
