"""Vision Transformer image tower (Dosovitskiy et al., ICLR 2021) in CLIP's variant (Radford et al., 2021).

CLIP's changes to ViT, kept here: a layer norm on the embedded tokens before the transformer (`norm_pre`,
OpenAI's `ln_pre`), a bias-free patch convolution, and a projection matrix `proj` (width, output_dim) applied
as `x @ proj` to the normalised CLS token, so OpenAI weights convert by renaming only.

Deliberate differences from openai/CLIP `clip/model.py:VisionTransformer`:
- timm names and shapes for the stem (`patch_embed.proj`, `cls_token` (1, 1, width), `pos_embed`
  (1, 1 + HW, width)); OpenAI's `class_embedding` (width,) and `positional_embedding` (1 + HW, width) are
  reshaped by `models/convert.py`. BLIP's ViT keys have the same names.
- `forward_features` applies the final norm to every token, not only CLS (layer norm is per token, so the
  pooled output is identical); BLIP and Flamingo consume these tokens.
- `norm_pre=False, patch_bias=True` give the timm/DeiT ViT that BLIP builds on.
- `hidden_states` gives the blocks' outputs as transformers numbers them (CLIPVisionModel's `hidden_states`), for
  LLaVA's features from an inner block; HuggingFace CLIP vision weights load through `models/convert.py`.
- `stem="conv"` replaces the patch convolution by a convolutional stem (`models.layers.ConvStem`, Xiao et al.
  2021), which trains far better than a patch convolution on small images and small budgets (the CPU demos).
"""
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from crossmodal.models.layers import VIT_STEMS, ConvStem, PatchEmbed, Transformer


class VisionTransformer(nn.Module):
    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        width: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        output_dim: int = 512,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        init_values: Optional[float] = None,
        drop_path: float = 0.0,
        norm_pre: bool = True,
        patch_bias: bool = False,
        stem: str = "patch",
    ):
        super().__init__()
        self.image_size = image_size
        self.output_dim = output_dim
        if stem not in VIT_STEMS:
            raise ValueError(f"unknown ViT stem {stem!r}; valid: {', '.join(VIT_STEMS)}")
        if stem == "patch":
            self.patch_embed = PatchEmbed(image_size, patch_size, in_chans=3, dim=width, bias=patch_bias)
        else:
            self.patch_embed = ConvStem(image_size, patch_size, in_chans=3, dim=width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, width))
        self.norm_pre = norm_layer(width) if norm_pre else nn.Identity()
        self.transformer = Transformer(
            width,
            depth,
            num_heads,
            mlp_ratio=mlp_ratio,
            init_values=init_values,
            drop_path=drop_path,
            act_layer=act_layer,
            norm_layer=norm_layer,
        )
        self.norm = norm_layer(width)
        self.proj = nn.Parameter(torch.zeros(width, output_dim))
        self.initialize_parameters()

    @torch.no_grad()
    def initialize_parameters(self) -> None:
        # openai/CLIP: class/positional embeddings and proj ~ N(0, width^-1); blocks keep the default init of
        # nn.MultiheadAttention (xavier-uniform in-projection, zero attention biases) and nn.Linear.
        scale = self.transformer.width**-0.5
        nn.init.normal_(self.cls_token, std=scale)
        nn.init.normal_(self.pos_embed, std=scale)
        nn.init.normal_(self.proj, std=scale)
        for block in self.transformer.blocks:
            nn.init.xavier_uniform_(block.attn.qkv.weight)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.zeros_(block.attn.proj.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the tokens the blocks take (B, 1 + HW, width): patches, CLS first, positions, norm_pre."""
        x = self.patch_embed(images)  # (B, HW, width)
        cls_token = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, width)
        x = torch.cat([cls_token, x], dim=1) + self.pos_embed  # (B, 1 + HW, width)
        return self.norm_pre(x)

    def forward_features(self, images: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        """(B, 3, H, W) -> tokens (B, 1 + HW, width), CLS first, normalised unless `final_norm=False` (the patch
        tokens OpenFlamingo's models were trained on: see `models.flamingo.Flamingo`)."""
        x = self.transformer(self.embed(images))
        return self.norm(x) if final_norm else x

    def hidden_states(self, images: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]:
        """The tokens (B, 1 + HW, width) after each of `layers` blocks, numbered as transformers' `hidden_states`:
        0 is the output of `embed`, i the output of block i, negative counts from the end (-1: the last block,
        -2: the one before). No final norm; the blocks after the deepest one asked for do not run (LLaVA's
        features come from the second-to-last block)."""
        depth = len(self.transformer.blocks)
        for layer in layers:
            if not -depth - 1 <= layer <= depth:
                raise ValueError(f"hidden state {layer} of a {depth}-block ViT: valid are {-depth - 1} to {depth}")
        wanted = [layer % (depth + 1) for layer in layers]  # -1 -> depth, -(depth + 1) -> 0
        states = [self.embed(images)]
        for block in self.transformer.blocks[: max(wanted)]:
            states.append(block(states[-1]))
        return [states[layer] for layer in wanted]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> image embedding (B, output_dim), the CLS token projected."""
        return self.forward_features(images)[:, 0] @ self.proj
