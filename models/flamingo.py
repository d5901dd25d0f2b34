"""Flamingo (Alayrac et al., NeurIPS 2022): the Perceiver resampler and the gated cross-attention block that
join a frozen vision encoder to a frozen decoder LM.

`PerceiverResampler` (paper section 2.1, Fig. 4): learned latents attend to the visual tokens of each image (or
video) concatenated with themselves, then an MLP, `depth` times; optional learned per-frame and per-media time
embeddings; a final LayerNorm. Every image becomes `num_latents` tokens whatever its number of patches.

`GatedCrossAttentionBlock` (section 2.2, Fig. 4): `x = x + tanh(attn_gate) * xattn(x, media)`, then
`x = x + tanh(ff_gate) * mlp(x)`, with both gates starting at 0 so that the model is the frozen LM at
initialisation. A text token cross-attends only to the image right before it (`only_attend_immediate_media`,
the paper's phi; earlier images reach it through the LM's self-attention) or, as an option, to every earlier
image. Text before any image attends to nothing.

Constructor keywords and forward arguments are OpenFlamingo's (mlfoundations/open_flamingo
`open_flamingo/src/helpers.py`); `models.convert.open_flamingo_to_ours` maps its parameter names. Deliberate
differences from that file:
- built from `models/layers.py`: `CrossAttention` (`q`, `kv`, `proj` for `to_q`, `to_kv`, `to_out`) through
  `F.scaled_dot_product_attention`, and `Mlp` with its LayerNorm as `norm2` for `FeedForward`;
- the resampler's latents and media of all images run as one batch (B * T_media) instead of a 4-d einsum;
- text that no image precedes gets a zero cross-attention output in both masking modes. OpenFlamingo zeroes
  it only with `only_attend_immediate_media=True`; with `False` such text attends uniformly to every image
  (all its scores are masked to the same value). Likewise a token whose image count exceeds the images given
  sees nothing here, where OpenFlamingo attends uniformly;
- attention does not subtract the row maximum by hand (SDPA's softmax is already stable).
"""
from typing import Optional

import torch
from einops import rearrange, repeat
from torch import nn

from models.layers import CrossAttention, Mlp


class PerceiverBlock(nn.Module):
    """One resampler layer: latents attend to [media; latents] (keys/values from both), then an MLP."""

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8, ff_mult: int = 4):
        super().__init__()
        self.norm_media = nn.LayerNorm(dim)
        self.norm1 = nn.LayerNorm(dim)  # on the latents
        self.attn = CrossAttention(dim, num_heads=heads, head_dim=dim_head, qkv_bias=False, proj_bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * ff_mult), bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x: media tokens (N, S, dim); latents (N, L, dim) -> latents (N, L, dim)."""
        latents_normed = self.norm1(latents)
        context = torch.cat([self.norm_media(x), latents_normed], dim=1)  # (N, S + L, dim)
        latents = latents + self.attn(latents_normed, context)
        return latents + self.mlp(self.norm2(latents))


class PerceiverResampler(nn.Module):
    """Visual tokens of each image or video -> `num_latents` tokens (OpenFlamingo's keywords and defaults)."""

    def __init__(
        self,
        dim: int,
        depth: int = 6,
        dim_head: int = 64,
        heads: int = 8,
        num_latents: int = 64,
        max_num_media: Optional[int] = None,
        max_num_frames: Optional[int] = None,
        ff_mult: int = 4,
    ):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        # Released OpenFlamingo models pass only `dim`: neither time embedding exists there.
        self.frame_embs = nn.Parameter(torch.randn(max_num_frames, dim)) if max_num_frames else None
        self.media_time_embs = nn.Parameter(torch.randn(max_num_media, 1, dim)) if max_num_media else None
        self.blocks = nn.ModuleList(PerceiverBlock(dim, dim_head, heads, ff_mult) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: visual tokens (B, T_media, frames, tokens, dim) -> (B, T_media, num_latents, dim)."""
        batch, num_media, num_frames = x.shape[:3]
        if self.frame_embs is not None:
            x = x + self.frame_embs[:num_frames, None]  # (frames, 1, dim) over every token of a frame
        x = rearrange(x, "b t f v d -> b t (f v) d")  # a video's frames are one set of tokens
        if self.media_time_embs is not None:
            x = x + self.media_time_embs[:num_media]  # (T_media, 1, dim)
        x = rearrange(x, "b t s d -> (b t) s d")  # (B * T_media, frames * tokens, dim)
        latents = repeat(self.latents, "n d -> bt n d", bt=batch * num_media)
        for block in self.blocks:
            latents = block(x, latents)
        return rearrange(self.norm(latents), "(b t) n d -> b t n d", b=batch)


def media_attention_mask(
    media_locations: torch.Tensor,
    num_tokens: int,
    num_media: int,
    only_attend_immediate_media: bool = True,
    use_cached_media: bool = False,
) -> torch.Tensor:
    """Bool (B, num_tokens, num_media), True where a text token may attend to an image.

    media_locations (B, T) is True at the `<image>` tokens. A token's "time" is the number of images at or
    before it; it sees the image with that index (only_attend_immediate_media) or every image up to it. With
    `use_cached_media` (incremental decoding) every token comes after all images in `media_locations`.
    """
    if use_cached_media:
        text_time = media_locations.sum(dim=1, keepdim=True).expand(-1, num_tokens)  # (B, T)
    else:
        text_time = media_locations.cumsum(dim=1)  # (B, T)
    media_time = torch.arange(1, num_media + 1, device=media_locations.device)  # (num_media,)
    if only_attend_immediate_media:
        return text_time[:, :, None] == media_time
    return text_time[:, :, None] >= media_time


class GatedCrossAttentionBlock(nn.Module):
    """Masked cross-attention to the images and a feed-forward, each behind `tanh(gate)` with the gate at 0."""

    def __init__(
        self,
        dim: int,
        dim_visual: int,
        dim_head: int = 64,
        heads: int = 8,
        ff_mult: int = 4,
        only_attend_immediate_media: bool = True,
    ):
        super().__init__()
        self.only_attend_immediate_media = only_attend_immediate_media
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CrossAttention(
            dim, context_dim=dim_visual, num_heads=heads, head_dim=dim_head, qkv_bias=False, proj_bias=False
        )
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * ff_mult), bias=False)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self,
        x: torch.Tensor,
        media: torch.Tensor,
        media_locations: Optional[torch.Tensor] = None,
        use_cached_media: bool = False,
    ) -> torch.Tensor:
        """x: text (B, T, dim); media: resampled images (B, T_media, n, dim_visual); media_locations: (B, T) bool,
        True at `<image>` tokens (None: every token sees every image). -> (B, T, dim)."""
        num_media, num_latents = media.shape[1:3]
        media = rearrange(media, "b m n d -> b (m n) d")  # (B, T_media * n, dim_visual)
        if media_locations is None:
            attn_mask, sees_media = None, 1.0
        else:
            visible = media_attention_mask(
                media_locations, x.shape[1], num_media, self.only_attend_immediate_media, use_cached_media
            )  # (B, T, T_media)
            sees_media = visible.any(dim=-1, keepdim=True)  # (B, T, 1)
            # A row with nothing visible would be all -inf (NaN); it attends anywhere and its output is zeroed.
            attn_mask = (visible | ~sees_media).repeat_interleave(num_latents, dim=-1)  # (B, T, T_media * n)
            attn_mask = attn_mask[:, None]  # (B, 1, T, T_media * n): the same for every head
        x = x + self.attn_gate.tanh() * sees_media * self.attn(self.norm1(x), media, attn_mask)
        return x + self.ff_gate.tanh() * self.mlp(self.norm2(x))
