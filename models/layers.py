"""Transformer building blocks shared by every tower: CLIP's ViT and text encoder now, BLIP and Flamingo later.

Block vocabulary follows timm (`norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2`, `qkv/proj`,
`fc1/fc2`), so readers of ViT (Dosovitskiy et al., 2021) and CLIP (Radford et al., 2021) code recognise it.

Deliberate differences from the reference implementations:
- OpenAI CLIP uses `nn.MultiheadAttention` (sequence-first, `in_proj_weight`/`out_proj`); here attention is
  batch-first and goes through `F.scaled_dot_product_attention` with a fused `qkv` Linear. The weights are the
  same numbers: `in_proj_weight` is `qkv.weight`, `out_proj` is `proj` (key maps live in `models/convert.py`).
- OpenAI's `LayerNorm` casts to fp32 by hand; here precision comes from autocast, which already runs
  layer norm in fp32.
- `Block` optionally carries a cross-attention sub-block between self-attention and the MLP (BLIP's
  image-grounded text encoder/decoder layout). It runs only when `context` is passed, so one stack serves both
  BLIP's unimodal mode (no image) and its multimodal mode. `post_norm=True` gives BERT's post-LN layout
  (`x = norm(x + sublayer(x))`, Vaswani et al. 2017) that BLIP's released text weights need; pre-norm otherwise.
- Incremental decoding keeps past keys/values in a `KVCache` passed through `Transformer.forward`; the
  cross-attention keys/values of a fixed context are computed once and reused. Positions of the new tokens are
  the caller's business (`cache.length` tokens came before).
- Attention widths default to `dim` (`head_dim = dim // num_heads`); `head_dim` can be set explicitly for
  Flamingo-style attention whose inner width (heads x 64) differs from the model width.
- `proj_bias=False` drops the biases of the output projections and the MLP (timm's name; MPT and Flamingo have
  none). `qk_norm=True` is MosaicML's QK LayerNorm (MPT-1B): queries and keys are normalised over all heads
  together, not per head as timm's `qk_norm` does.
- LLaMA's options (`models/llama.py`): `num_kv_heads` < `num_heads` is grouped-query attention (Ainslie et al.,
  2023): `qkv` projects to heads + 2 x kv_heads head widths, the cache keeps the kv heads only, and each is repeated
  for its group of query heads before `F.scaled_dot_product_attention` (a copy, as HF's `repeat_kv`: with a mask,
  SDPA's `enable_gqa` falls back to the math kernel on CUDA, transformers' `use_gqa_in_sdpa` notes).
  `rope=(cos, sin)` rotates queries and keys by their positions (RoFormer, Su et al. 2021; HF's `rotate_half`
  layout, the two halves of a head paired) before the cache stores them; `RotaryEmbedding` gives cos/sin.
  `Mlp(gated=True)` is SwiGLU (Shazeer, 2020) with gate and up projections fused in `fc1`, gate first (timm's
  `SwiGLUPacked`; its `hidden_features` counts both halves, ours one), chosen in `Block` by `mlp_layer`. RMSNorm is
  torch's `nn.RMSNorm` passed as `norm_layer`.
"""
import math
from typing import Any, Callable, Optional

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint


class QuickGELU(nn.Module):
    """GELU approximation x * sigmoid(1.702 x) used by OpenAI's released CLIP weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACT_LAYERS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


def get_act_layer(name: str) -> type[nn.Module]:
    if name not in ACT_LAYERS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACT_LAYERS)}")
    return ACT_LAYERS[name]


@dataclass
class LayerCache:
    """One block's state for incremental decoding: self-attention keys/values of every past token, in buffers
    preallocated along time (filled up to `length`, grown by doubling), and the cross-attention keys/values of the
    (fixed) context, once per sample."""

    key: Optional[torch.Tensor] = None  # (B, heads or kv_heads, capacity, head_dim)
    value: Optional[torch.Tensor] = None
    length: int = 0
    context_key: Optional[torch.Tensor] = None  # (B_context, heads, S, head_dim)
    context_value: Optional[torch.Tensor] = None

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' keys/values after the past ones; returns all of them (views of the buffers)."""
        start, end = self.length, self.length + key.shape[2]
        if self.key is None or end > self.key.shape[2]:  # a copy per doubling, not a concatenation per token
            capacity = max(end, 2 * start, 16)
            buffers = [key.new_empty(*key.shape[:2], capacity, key.shape[3]) for _ in range(2)]
            if self.key is not None:
                buffers[0][:, :, :start], buffers[1][:, :, :start] = self.key[:, :, :start], self.value[:, :, :start]
            self.key, self.value = buffers
        self.key[:, :, start:end], self.value[:, :, start:end] = key, value
        self.length = end
        return self.key[:, :, :end], self.value[:, :, :end]  # (B, heads, T_past + T, head_dim)


class KVCache:
    """Keys/values of past tokens for each block of a decoder, for generation (`models/generation.py`)."""

    def __init__(self, num_layers: int):
        self.layers = [LayerCache() for _ in range(num_layers)]

    @property
    def length(self) -> int:
        """Number of tokens already seen (the position of the next one)."""
        return self.layers[0].length

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for layer in self.layers:
            if layer.key is not None:
                layer.key, layer.value = fn(layer.key), fn(layer.value)

    def repeat_interleave(self, repeats: int) -> None:
        """Each sample's self-attention state `repeats` times in a row: (B, ...) -> (B * repeats, ...), one copy
        per beam. The context keys/values stay once per sample: `CrossAttention` serves the copies from them."""
        self._map(lambda tensor: tensor.repeat_interleave(repeats, dim=0))

    def select(self, rows: torch.Tensor) -> None:
        """Keep the self-attention state of `rows` (N,) of the batch, e.g. the beams that survive a step. Rows are
        chosen among copies of one sample, so the context keys/values (one per sample) stay."""
        self._map(lambda tensor: tensor.index_select(0, rows))


def causal_mask(num_queries: int, num_keys: int, device: torch.device) -> torch.Tensor:
    """Bool (num_queries, num_keys), True = may attend: the queries are the last `num_queries` tokens."""
    return torch.ones(num_queries, num_keys, dtype=torch.bool, device=device).tril(num_keys - num_queries)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (..., d): the halves (x1, x2) become (-x2, x1), HF's pairing of dimension i with i + d/2."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, head_dim) by its positions' angles; cos, sin broadcastable to it."""
    return x * cos + rotate_half(x) * sin


ROPE_SCALINGS = ("linear", "llama3")  # what `RotaryEmbedding(scaling=...)` implements; HF names them rope_type


class RotaryEmbedding(nn.Module):
    """cos/sin of rotary position embeddings (RoFormer, Su et al. 2021) for given positions.

    Frequency i of a head is theta^(-2i / head_dim). `scaling` (HF's rope_scaling) stretches long contexts:
    {"rope_type": "linear", "factor": f} divides every frequency by f (Chen et al. 2023, position interpolation);
    {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    is LLaMA 3.1's: wavelengths above original / low_freq_factor are divided by factor, those below
    original / high_freq_factor kept, and the band between interpolated smoothly. The table is computed in fp32 at
    each call (head_dim / 2 numbers): no buffer, so a model built on the meta device needs nothing filled in."""

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: Optional[dict[str, Any]] = None):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings pair dimensions: head_dim {head_dim} is odd")
        kind = (scaling or {}).get("rope_type", "default")
        if kind not in ("default",) + ROPE_SCALINGS:
            raise ValueError(f"rope_type {kind!r} is not implemented; choose one of {list(ROPE_SCALINGS)} or none")
        self.head_dim, self.theta, self.scaling = head_dim, theta, dict(scaling or {})

    def inverse_frequencies(self, device: Optional[torch.device] = None) -> torch.Tensor:
        """(head_dim / 2,) angle per position of each dimension pair, in fp32."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        inv_freq = 1.0 / (self.theta**exponents)
        kind = self.scaling.get("rope_type", "default")
        if kind == "linear":
            inv_freq = inv_freq / self.scaling["factor"]
        elif kind == "llama3":
            factor, low, high = (self.scaling[key] for key in ("factor", "low_freq_factor", "high_freq_factor"))
            original = self.scaling["original_max_position_embeddings"]
            wavelength = 2 * math.pi / inv_freq
            scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
            smooth = (original / wavelength - low) / (high - low)  # 0 at the long end of the band, 1 at the short
            between = (wavelength >= original / high) & (wavelength <= original / low)
            inv_freq = torch.where(between, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
        return inv_freq

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B or 1, T) -> cos, sin (B or 1, 1, T, head_dim) in fp32, broadcastable over heads."""
        angles = positions[..., None].float() * self.inverse_frequencies(positions.device)  # (B, T, head_dim / 2)
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, head_dim)
        return angles.cos(), angles.sin()

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}, scaling={self.scaling or None}"


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    attn_mask: bool (True = may attend) or additive float, broadcastable to (B, heads, T, T). With `is_causal`
    it must be bool, and is combined with the causal mask. With a `cache`, keys and values of earlier tokens are
    prepended and the new ones stored. `num_kv_heads` < `num_heads`: grouped-query attention (`qkv` holds the
    query heads, then the key heads, then the value heads); rope: (cos, sin) of `RotaryEmbedding` for these tokens.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        head_dim: Optional[int] = None,
        proj_bias: bool = True,
        qk_norm: bool = False,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        num_kv_heads: Optional[int] = None,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        head_dim = head_dim or dim // num_heads
        inner_dim = num_heads * head_dim
        kv_dim = self.num_kv_heads * head_dim
        self.split_sizes = (inner_dim, kv_dim, kv_dim)
        self.qkv = nn.Linear(dim, inner_dim + 2 * kv_dim, bias=qkv_bias)
        self.q_norm = norm_layer(inner_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(kv_dim) if qk_norm else nn.Identity()
        self.attn_drop = attn_drop
        self.proj = nn.Linear(inner_dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
        cache: Optional[LayerCache] = None,
        rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        q, k, v = self.qkv(x).split(self.split_sizes, dim=-1)  # (B, T, inner_dim), k and v (B, T, kv_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        q = rearrange(q, "b t (h d) -> b h t d", h=self.num_heads)  # (B, heads, T, head_dim)
        k, v = (rearrange(t, "b t (h d) -> b h t d", h=self.num_kv_heads) for t in (k, v))  # (B, kv_heads, T, head_dim)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.append(k, v)  # each (B, kv_heads, T_past + T, head_dim)
        if self.num_kv_heads != self.num_heads:  # each key/value head serves a group of query heads
            group = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, heads, S, head_dim)
        if is_causal and q.shape[2] == 1 and attn_mask is None:
            is_causal = False  # the newest token may attend to every key: no mask to build
        if is_causal and (attn_mask is not None or k.shape[2] != q.shape[2]):
            # SDPA's is_causal takes no mask and aligns queries with the first keys; here they are the last ones.
            causal = causal_mask(q.shape[2], k.shape[2], q.device)  # (T, T_past + T)
            attn_mask, is_causal = causal if attn_mask is None else attn_mask & causal, False
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop if self.training else 0.0, is_causal=is_causal
        )
        x = rearrange(x, "b h t d -> b t (h d)")  # (B, T, inner_dim)
        return self.proj_drop(self.proj(x))


class CrossAttention(nn.Module):
    """Multi-head attention from queries `x` (B, T, dim) to a context (B, S, context_dim).

    Queries come from `q`, keys and values from the fused `kv`; attn_mask broadcastable to (B, heads, T, S).
    With a `cache`, the context's keys/values are computed on the first call and reused after (the context is
    fixed while decoding). When the queries hold `g` consecutive rows per context row (beam search's copies of a
    sample), each sample's rows attend to its keys/values as `g * T` queries of one row, without copying them.
    """

    def __init__(
        self,
        dim: int,
        context_dim: Optional[int] = None,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        head_dim: Optional[int] = None,
        proj_bias: bool = True,
    ):
        super().__init__()
        self.num_heads = num_heads
        head_dim = head_dim or dim // num_heads
        inner_dim = num_heads * head_dim
        self.q = nn.Linear(dim, inner_dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim or dim, 2 * inner_dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(inner_dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        cache: Optional[LayerCache] = None,
    ) -> torch.Tensor:
        q = rearrange(self.q(x), "b t (h d) -> b h t d", h=self.num_heads)  # (B, heads, T, head_dim)
        if cache is not None and cache.context_key is not None:
            k, v = cache.context_key, cache.context_value
        else:
            kv = rearrange(self.kv(context), "b s (two h d) -> two b h s d", two=2, h=self.num_heads)
            k, v = kv.unbind(0)  # each (B, heads, S, head_dim)
            if cache is not None:
                cache.context_key, cache.context_value = k, v
        group = q.shape[0] // k.shape[0]  # > 1: consecutive rows (beams) share one sample's context
        if group > 1 and attn_mask is not None:
            k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
            group = 1
        # the copies become extra queries of their sample: its keys/values are read once, not copied per beam
        q = rearrange(q, "(b g) h t d -> b h (g t) d", g=group)  # (B_context, heads, group * T, head_dim)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop if self.training else 0.0
        )
        x = rearrange(x, "b h (g t) d -> (b g) t (h d)", g=group)  # (B, T, inner_dim)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    """fc1, activation, fc2. gated=True: a GLU (SwiGLU with nn.SiLU): `fc1` projects to a gate and a value of
    `hidden_features` each (gate first) and `act(gate) * value` goes to `fc2`, as LLaMA's
    `down(silu(gate(x)) * up(x))`. One fused matmul, as `qkv`, and one name for the key maps and LoRA targets."""

    def __init__(
        self,
        in_features: int,
        hidden_features: Optional[int] = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        drop: float = 0.0,
        bias: bool = True,
        gated: bool = False,
    ):
        super().__init__()
        hidden_features = hidden_features or 4 * in_features
        self.gated = gated
        self.fc1 = nn.Linear(in_features, 2 * hidden_features if gated else hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, value = self.fc1(x).chunk(2, dim=-1)  # each (B, T, hidden)
            return self.drop2(self.fc2(self.drop1(self.act(gate) * value)))
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    """Per-channel learned residual scale (CaiT, Touvron et al. 2021)."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample (Huang et al. 2016)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)  # (B, 1, ..., 1)
        return x * mask / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class PatchEmbed(nn.Module):
    """Image to patch tokens with one strided convolution: (B, C, H, W) -> (B, H/p * W/p, dim)."""

    def __init__(self, image_size: int = 224, patch_size: int = 16, in_chans: int = 3, dim: int = 768, bias: bool = True):
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.grid_size = image_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, dim, H/p, W/p)
        return rearrange(x, "b c h w -> b (h w) c")


class ConvStem(nn.Module):
    """Image to patch tokens with a convolutional stem (Xiao et al., "Early Convolutions Help Transformers See
    Better", NeurIPS 2021): log2(patch_size) 3x3 stride-2 convolutions (each with a norm and ReLU) then a 1x1
    convolution to `dim`; the same tokens as `PatchEmbed` (B, H/p * W/p, dim), so the ViT around it is unchanged.

    The paper's stem uses BatchNorm; here each convolution is followed by GroupNorm (8 groups), which does not
    depend on the batch: the tower trains the same model on any number of processes without synchronisation, and
    BLIP's momentum copy of it needs no running statistics. Channels double from `dim / 2^(n-1)` (at least 16) to
    `dim` over the n strided convolutions.
    """

    def __init__(self, image_size: int = 224, patch_size: int = 16, in_chans: int = 3, dim: int = 768):
        super().__init__()
        if patch_size < 2 or patch_size & (patch_size - 1):
            raise ValueError(f"a convolutional stem needs a power-of-two patch_size; got {patch_size}")
        if image_size % patch_size != 0:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.grid_size = image_size // patch_size
        self.num_patches = self.grid_size**2
        strided = patch_size.bit_length() - 1
        layers, channels = [], in_chans
        for i in range(strided):
            out = max(16, dim >> (strided - 1 - i))
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False), nn.GroupNorm(8, out), nn.ReLU()]
            channels = out
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(channels, dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.convs(x))  # (B, dim, H/p, W/p)
        return rearrange(x, "b c h w -> b (h w) c")


VIT_STEMS = ("patch", "conv")  # how a ViT turns pixels into tokens: PatchEmbed, ConvStem


class Block(nn.Module):
    """Transformer block: self-attention, optional cross-attention to a context, MLP; each a residual sub-layer.

    Pre-norm (`x + f(norm(x))`, ViT/GPT-2) by default; `post_norm=True` gives BERT's `norm(x + f(x))`.
    The cross-attention sub-block exists when `cross_attention=True` and runs when `context` is given.
    `drop` is BERT's hidden dropout (after each sub-layer's output projection, and inside the MLP as timm's Mlp
    does); `attn_drop` drops attention probabilities. `mlp_layer` builds the MLP (timm's name; LLaMA's is
    `partial(Mlp, gated=True)`), `num_kv_heads` gives grouped-query attention.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: Optional[float] = None,
        drop_path: float = 0.0,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        cross_attention: bool = False,
        context_dim: Optional[int] = None,
        post_norm: bool = False,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        proj_bias: bool = True,
        qk_norm: bool = False,
        num_kv_heads: Optional[int] = None,
        mlp_layer: Callable[..., nn.Module] = Mlp,
    ):
        super().__init__()
        self.post_norm = post_norm

        def layer_scale() -> nn.Module:
            return LayerScale(dim, init_values) if init_values else nn.Identity()

        def drop_path_layer() -> nn.Module:
            return DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop, proj_bias=proj_bias,
            qk_norm=qk_norm, norm_layer=norm_layer, num_kv_heads=num_kv_heads,
        )  # fmt: skip
        self.ls1 = layer_scale()
        self.drop_path1 = drop_path_layer()

        self.norm_cross = norm_layer(dim) if cross_attention else nn.Identity()
        self.cross_attn = (
            CrossAttention(
                dim, context_dim=context_dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop,
                proj_bias=proj_bias,
            )
            if cross_attention
            else nn.Identity()
        )
        self.ls_cross = layer_scale() if cross_attention else nn.Identity()
        self.drop_path_cross = drop_path_layer() if cross_attention else nn.Identity()

        self.norm2 = norm_layer(dim)
        self.mlp = mlp_layer(dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop, bias=proj_bias)
        self.ls2 = layer_scale()
        self.drop_path2 = drop_path_layer()

    def residual(self, x: torch.Tensor, norm: nn.Module, sublayer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if self.post_norm:
            return norm(x + sublayer(x))  # BERT
        return x + sublayer(norm(x))

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
        context: Optional[torch.Tensor] = None,
        context_mask: Optional[torch.Tensor] = None,
        cache: Optional[LayerCache] = None,
        rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        x = self.residual(
            x, self.norm1, lambda h: self.drop_path1(self.ls1(self.attn(h, attn_mask, is_causal, cache, rope)))
        )
        if context is not None:  # BLIP runs one text stack with (multimodal) and without (unimodal) the image
            x = self.residual(
                x,
                self.norm_cross,
                lambda h: self.drop_path_cross(self.ls_cross(self.cross_attn(h, context, context_mask, cache))),
            )
        x = self.residual(x, self.norm2, lambda h: self.drop_path2(self.ls2(self.mlp(h))))
        return x


class Transformer(nn.Module):
    """A stack of `Block`s; stochastic depth grows linearly from 0 to `drop_path` over depth (as in timm)."""

    def __init__(
        self,
        width: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: Optional[float] = None,
        drop_path: float = 0.0,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        cross_attention: bool = False,
        context_dim: Optional[int] = None,
        post_norm: bool = False,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        proj_bias: bool = True,
        qk_norm: bool = False,
        num_kv_heads: Optional[int] = None,
        mlp_layer: Callable[..., nn.Module] = Mlp,
    ):
        super().__init__()
        self.width = width
        self.depth = depth
        self.grad_checkpointing = False
        drop_path_rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(
                width,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                init_values=init_values,
                drop_path=rate,
                act_layer=act_layer,
                norm_layer=norm_layer,
                cross_attention=cross_attention,
                context_dim=context_dim,
                post_norm=post_norm,
                drop=drop,
                attn_drop=attn_drop,
                proj_bias=proj_bias,
                qk_norm=qk_norm,
                num_kv_heads=num_kv_heads,
                mlp_layer=mlp_layer,
            )
            for rate in drop_path_rates
        )

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
        context: Optional[torch.Tensor] = None,
        context_mask: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        layer_caches = cache.layers if cache is not None else [None] * len(self.blocks)
        for block, layer_cache in zip(self.blocks, layer_caches):
            if self.grad_checkpointing and torch.is_grad_enabled():
                # Recompute each block's activations in backward instead of storing them.
                x = checkpoint(
                    block, x, attn_mask, is_causal, context, context_mask, layer_cache, rope, use_reentrant=False
                )
            else:
                x = block(
                    x, attn_mask=attn_mask, is_causal=is_causal, context=context, context_mask=context_mask,
                    cache=layer_cache, rope=rope,
                )  # fmt: skip
        return x
