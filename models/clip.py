"""CLIP: contrastive language-image pre-training (Radford et al., ICML 2021, "Learning Transferable Visual
Models From Natural Language Supervision").

Two towers map images and texts to `embed_dim`-dimensional features; the contrastive losses in `losses/`
compare their L2-normalised versions scaled by a learned temperature. With `init_logit_bias` set this is
also the SigLIP model (Zhai et al., ICCV 2023): sigmoid loss, scale init log(10), bias init -10.

Deliberate differences from openai/CLIP `clip/model.py:CLIP` and open_clip `model.py:CLIP`:
- the towers are modules passed in (`visual`, `text`) and initialise themselves as OpenAI's
  `initialize_parameters` does, so BLIP and Flamingo reuse them standalone; the text tower lives under
  `text.` (open_clip's `CustomTextCLIP` layout), not flattened into the top level.
- `forward` returns a dict with the temperature multiplier already `exp`-ed. It is not clamped here: a clamp
  inside forward gives the parameter no gradient once it passes ln 100, so it could never come back.
  Training clamps the parameter to [0, ln 100] after each optimizer step, as OpenAI does (train.py).
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class CLIP(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        vision: nn.Module,
        text: nn.Module,
        init_logit_scale: float = math.log(1 / 0.07),
        init_logit_bias: Optional[float] = None,
    ):
        super().__init__()
        if vision.output_dim != embed_dim or text.output_dim != embed_dim:
            raise ValueError(
                f"tower output dims (vision {vision.output_dim}, text {text.output_dim}) must equal embed_dim {embed_dim}"
            )
        self.embed_dim = embed_dim
        self.visual = vision
        self.text = text
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))  # log of the temperature multiplier
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias))) if init_logit_bias is not None else None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(images)  # (B, embed_dim)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text(tokens)  # (B, embed_dim)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, Optional[torch.Tensor]]:
        return {
            "image_features": self.encode_image(images, normalize=True),  # (B, embed_dim)
            "text_features": self.encode_text(tokens, normalize=True),  # (B, embed_dim)
            "logit_scale": self.logit_scale.exp(),  # scalar multiplier
            "logit_bias": self.logit_bias,  # scalar or None
        }
