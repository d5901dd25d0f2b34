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

`Flamingo` (OpenFlamingo's `open_flamingo/src/flamingo.py` and `flamingo_lm.py`) joins this codebase's CLIP ViT
(patch tokens, frozen) to a `models.lm.DecoderLM` (frozen): a gated cross-attention block runs before every
`cross_attn_every_n_layers`-th decoder block. Attribute names are the ones `open_flamingo_to_ours` produces
(`vision_encoder`, `perceiver`, `lang_model`, `gated_cross_attn_layers` indexed by decoder layer, None where a
layer has none). Deliberate differences from OpenFlamingo: the layers are composed in `logits` instead of mixed
into a HuggingFace instance at run time (`extend_instance`), and the media of a prompt are passed explicitly
(no `condition_vis_x` state); the loss masks what OpenFlamingo's MMC4 training masks, for every dataset.
`vision_final_norm=False` (the OpenFlamingo presets) feeds the resampler the patch tokens before the ViT's final
LayerNorm: OpenFlamingo takes the tokens of open_clip's `VisionTransformer(output_tokens=True)`, and the open_clip
of its training (2023) applied `ln_post` to the pooled CLS token only; later open_clip versions
(`final_ln_after_pool=False`) normalise every token, which the released weights never saw.
The vision encoder may also be CLIP's ResNet (`Flamingo-RN-tiny`, beside LLaVA's and BLIP's demos on the CLIP demo's
tower): its attention pool's tokens (`ModifiedResNet.forward_tokens`: the pooled token and the grid cells) go to the
resampler, and it stays in eval mode, so BatchNorm keeps the CLIP run's statistics.
`freeze_for_training` (called by train.py) leaves trainable only the resampler, the cross-attention blocks and
the `<image>` and `<|endofchunk|>` rows of the token embedding.
"""
from typing import Optional

import torch
from einops import rearrange, repeat
from torch import nn

from crossmodal.losses import interleaved_labels, lm_loss
from crossmodal.models.generation import generate
from crossmodal.models.layers import CrossAttention, KVCache, Mlp
from crossmodal.models.lm import DecoderLM
from crossmodal.models.resnet import ModifiedResNet
from crossmodal.models.vit import VisionTransformer


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


# Presets: the vision preset (models.MODELS), the language model (models.lm.LM_MODELS) and `Flamingo` keywords.
# OpenFlamingo-3B: CLIP ViT-L/14 + MPT-1B, cross-attention in every layer, the resampler at the vision width
# (OpenFlamingo report, Table 1; `open_flamingo/src/factory.py`). Flamingo-tiny: the CPU demo's.
FLAMINGO_MODELS = {
    "OpenFlamingo-3B-vitl-mpt1b": dict(
        vision="ViT-L-14-quickgelu", lm="mpt-1b-redpajama-200b", cross_attn_every_n_layers=1, vision_final_norm=False,
    ),
    # The CLIP demo's RN-tiny tower (its 5 attention-pool tokens at 64x64), as the BLIP and LLaVA demos use it.
    "Flamingo-RN-tiny": dict(
        vision="RN-tiny", lm="lm-tiny", cross_attn_every_n_layers=1, perceiver_depth=2, perceiver_heads=4,
        perceiver_dim_head=32, num_latents=8, heads=4, dim_head=32, ff_mult=2,
    ),
    "Flamingo-tiny": dict(  # a one-layer ViT-tiny: a random frozen encoder gains nothing from depth
        vision="ViT-tiny", vision_layers=1, lm="lm-tiny", cross_attn_every_n_layers=1, perceiver_depth=2, perceiver_heads=4,
        perceiver_dim_head=32, num_latents=8, heads=4, dim_head=32, ff_mult=2,
    ),
}


class Flamingo(nn.Module):
    """Frozen vision encoder -> resampler -> gated cross-attention into a frozen decoder LM (see the module doc)."""

    def __init__(
        self,
        vision_encoder: VisionTransformer | ModifiedResNet,
        lang_model: DecoderLM,
        media_token_id: int,
        eoc_token_id: int,
        pad_token_id: int = 0,
        cross_attn_every_n_layers: int = 1,
        perceiver_depth: int = 6,
        perceiver_heads: int = 8,
        perceiver_dim_head: int = 64,
        num_latents: int = 64,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
        only_attend_immediate_media: bool = True,
        vision_final_norm: bool = True,
        max_num_frames: Optional[int] = None,
    ):
        super().__init__()
        self.media_token_id, self.eoc_token_id, self.pad_token_id = media_token_id, eoc_token_id, pad_token_id
        self.vision_final_norm = vision_final_norm
        resnet = isinstance(vision_encoder, ModifiedResNet)
        vis_dim = vision_encoder.output_dim if resnet else vision_encoder.transformer.width
        lang_dim = lang_model.token_embedding.embedding_dim
        self.vision_encoder = vision_encoder
        self.perceiver = PerceiverResampler(
            dim=vis_dim, depth=perceiver_depth, dim_head=perceiver_dim_head, heads=perceiver_heads,
            num_latents=num_latents, max_num_frames=max_num_frames,
        )  # fmt: skip
        self.lang_model = lang_model
        self.gated_cross_attn_layers = nn.ModuleList(
            GatedCrossAttentionBlock(lang_dim, vis_dim, dim_head, heads, ff_mult, only_attend_immediate_media)
            if (layer + 1) % cross_attn_every_n_layers == 0
            else None
            for layer in range(lang_model.depth)
        )

    def encode_media(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, T_media, 3, H, W), or clips (B, T_media, frames, 3, H, W) -> resampled visual tokens
        (B, T_media, num_latents, vis_dim): a clip's frames, each with its time embedding (`max_num_frames`), are
        one set of tokens for the resampler (paper section 2.1), so a clip costs the LM as many tokens as an image."""
        if images.dim() == 5:
            images = images.unsqueeze(2)  # an image is a one-frame clip
        batch, num_media = images.shape[:2]
        with torch.no_grad():  # the vision encoder is frozen: no activations kept for it
            if isinstance(self.vision_encoder, ModifiedResNet):  # (B * T_media * frames, 1 + HW, vis_dim)
                tokens = self.vision_encoder.forward_tokens(images.flatten(0, 2))
            else:  # (B * T_media * frames, HW, vis_dim): the patch tokens
                tokens = self.vision_encoder.forward_features(images.flatten(0, 2), self.vision_final_norm)[:, 1:]
        tokens = rearrange(tokens, "(b t f) v d -> b t f v d", b=batch, t=num_media)
        return self.perceiver(tokens)

    def train(self, mode: bool = True) -> "Flamingo":
        """The frozen vision encoder stays in eval mode (a ResNet's BatchNorm statistics are its CLIP run's)."""
        super().train(mode)
        self.vision_encoder.eval()
        return self

    def logits(
        self,
        tokens: torch.Tensor,
        media: torch.Tensor,
        cache: Optional[KVCache] = None,
        padding_mask: Optional[torch.Tensor] = None,
        media_locations: Optional[torch.Tensor] = None,
        use_cached_media: bool = False,
    ) -> torch.Tensor:
        """tokens (B, T), media (B, T_media, n, vis_dim) -> logits (B, T, vocab).

        media_locations (B, T'): the `<image>` positions the mask counts (default: `tokens == <image>`); with
        `use_cached_media` (decoding after a cached prompt) the prompt's, and every token comes after its images.
        cache and padding_mask (B, T_past + T): as `DecoderLM.forward`."""
        lm = self.lang_model
        if media_locations is None:
            media_locations = tokens == self.media_token_id
        num_past = cache.length if cache is not None else 0
        x = lm.token_embedding(tokens)  # (B, T, width)
        attn_bias = lm.attention_bias(tokens.shape[1], num_past, padding_mask).to(x.dtype)
        layer_caches = cache.layers if cache is not None else [None] * lm.depth
        for block, xattn, layer_cache in zip(lm.transformer.blocks, self.gated_cross_attn_layers, layer_caches):
            if xattn is not None:  # OpenFlamingo's FlamingoLayer: cross-attention before the frozen block
                x = xattn(x, media, media_locations, use_cached_media)
            x = block(x, attn_mask=attn_bias, cache=layer_cache)
        return lm.logits(x)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """The training loss of interleaved sequences: images (B, T_media, 3, H, W), tokens (B, T) padded on the
        right -> {"lm": next-token loss}, pad, `<image>`, text before the first image and text between an
        `<|endofchunk|>` and the next image left out (OpenFlamingo's labels)."""
        logits = self.logits(tokens, self.encode_media(images))
        labels = interleaved_labels(tokens, self.media_token_id, self.eoc_token_id, self.pad_token_id)
        return {"lm": lm_loss(logits, labels, label_smoothing=0.0)}

    @torch.no_grad()
    def generate(self, images: torch.Tensor, prompts: torch.Tensor, max_new_tokens: int = 20, **kwargs) -> torch.Tensor:
        """images (B, T_media, 3, H, W) and prompts (B, P) padded on the left -> the new tokens (B, <= max_new_tokens),
        up to `<|endofchunk|>` (included) or padding. The media are encoded once and the prompt's keys/values
        cached (`use_cache=False`: every step recomputes the whole sequence); kwargs go to
        `models.generation.generate` (num_beams, length_penalty, ...)."""
        prompt_length = prompts.shape[1]
        prompt_mask = prompts != self.pad_token_id  # (B, P)
        prompt_media = prompts == self.media_token_id  # (B, P)

        def decode(tokens: torch.Tensor, media: torch.Tensor, cache: Optional[KVCache]) -> torch.Tensor:
            copies = tokens.shape[0] // prompts.shape[0]  # beams
            num_past = cache.length if cache is not None else 0
            padding = prompt_mask.repeat_interleave(copies, dim=0)
            padding = torch.cat([padding, padding.new_ones(padding.shape[0], num_past + tokens.shape[1] - prompt_length)], 1)
            if num_past == 0:  # the prompt, or the whole sequence without a cache
                return self.logits(tokens, media, cache, padding)
            media_locations = prompt_media.repeat_interleave(copies, dim=0)
            return self.logits(tokens, media, cache, padding, media_locations, use_cached_media=True)

        media = self.encode_media(images)
        out = generate(decode, prompts, media, self.lang_model.depth, eos_id=self.eoc_token_id,
                       pad_id=self.pad_token_id, max_length=prompt_length + max_new_tokens, **kwargs)
        return out[:, prompt_length:]


def freeze_for_training(model: Flamingo) -> None:
    """OpenFlamingo's trainable set: the resampler, the cross-attention blocks and the token embedding, whose
    gradient is masked to the `<image>` and `<|endofchunk|>` rows (the tied output matrix shares it), so only
    those two rows change. The rest is frozen; with no gradient and no weight decay, AdamW leaves the
    embedding's other rows exactly as they were."""
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.gated_cross_attn_layers.requires_grad_(True)
    embedding = model.lang_model.token_embedding.weight
    embedding.requires_grad_(True)
    rows = torch.zeros(embedding.shape[0], 1, dtype=embedding.dtype, device=embedding.device)
    rows[[model.media_token_id, model.eoc_token_id]] = 1
    embedding.register_hook(lambda grad: grad * rows.to(grad.device, grad.dtype))
