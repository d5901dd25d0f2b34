"""Text towers: CLIP's causal text transformer and BLIP's BERT-style text encoder/decoder.

`TextTransformer`: CLIP (Radford et al., 2021, section 2.4; GPT-2 style, Radford et al., 2019).

Tokens are embedded, given learned absolute positions, run through pre-norm causal blocks and a final layer
norm; the feature at the end-of-text token is projected by `proj` (width, output_dim) as `x @ proj`.

Deliberate differences from openai/CLIP `clip/model.py:CLIP.encode_text`:
- the end-of-text token is found as the last non-pad token instead of `tokens.argmax(-1)`. For CLIP's BPE
  (pad 0, EOT 49407 the largest id, last non-pad) both agree; the last non-pad token also works for tokenizers
  whose end-of-sequence id is not the largest (sentencepiece). It is searched from the end, not counted,
  because CLIP's pad id 0 is also the byte "!" inside a text ("wow!!").
- causality comes from `is_causal=True` in `F.scaled_dot_product_attention`, not a stored (77, 77) mask, so
  sequences shorter than `context_length` use `pos_embed[:T]`, and `forward` drops the padding after the
  batch's longest text before running the blocks (exact under causal attention; 2-4x less text-tower work
  on typical captions).
- timm names (`pos_embed`, `transformer.blocks`, `norm`, `proj`) for OpenAI's `positional_embedding`,
  `transformer.resblocks`, `ln_final`, `text_projection`; `models/convert.py` maps them.

`BertTextEncoder`: BLIP's text side (Li et al., ICML 2022, section 3.1, "MED"), BERT-base (Devlin et al., 2019)
with a cross-attention sub-layer to the image tokens in every block; one stack serves three modes: unimodal
encoder (no context), image-grounded encoder (context) and image-grounded decoder (context, `is_causal`).
`LMHead` is BERT's `cls.predictions`, its output matrix tied to the word embeddings.

Deliberate differences from salesforce/BLIP `models/med.py` (a fork of HF BERT):
- the blocks are this codebase's `Block` with `post_norm=True`, fused `qkv` (BERT's separate query/key/value
  are concatenated by `models/convert.py`), cross-attention keys/values fused into `kv`;
- BLIP's pretraining decoder shares all but self-attention with the encoder (`tie_encoder_decoder_weights`
  with skip key '/attention'); here `share_all_but_self_attention` makes the decoder reuse the encoder's
  embedding, cross-attention, MLP and their norms as the same module objects;
- the hidden dropout also acts inside the MLP after GELU (timm's Mlp), where BERT has none.
- `forward` cuts the padding columns after the batch's longest text before the blocks (exact at real tokens;
  the output is zero at the cut pads), as `TextTransformer` does for CLIP.
"""
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from crossmodal.models.layers import KVCache, Transformer, causal_mask


class TextTransformer(nn.Module):
    def __init__(
        self,
        vocab_size: int = 49408,
        context_length: int = 77,
        width: int = 512,
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        output_dim: int = 512,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        pad_id: int = 0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.output_dim = output_dim
        self.pad_id = pad_id
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(context_length, width))
        self.transformer = Transformer(
            width,
            depth,
            num_heads,
            mlp_ratio=mlp_ratio,
            drop_path=drop_path,
            act_layer=act_layer,
            norm_layer=norm_layer,
        )
        self.norm = norm_layer(width)
        self.proj = nn.Parameter(torch.zeros(width, output_dim))
        self.initialize_parameters()

    @torch.no_grad()
    def initialize_parameters(self) -> None:
        # openai/CLIP `initialize_parameters`: GPT-2 style, output projections of each residual branch scaled
        # down by sqrt(2 * depth); attention biases zero as in nn.MultiheadAttention.
        width, depth = self.transformer.width, self.transformer.depth
        attn_std = width**-0.5
        proj_std = width**-0.5 * (2 * depth) ** -0.5
        fc_std = (2 * width) ** -0.5
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        for block in self.transformer.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.proj.bias)
            nn.init.normal_(block.mlp.fc1.weight, std=fc_std)
            nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
        nn.init.normal_(self.proj, std=width**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def forward_features(self, tokens: torch.Tensor, first: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, T) token ids, T <= context_length -> normalised causal features (B, T, width). first: (B, width),
        added to the first token's embedding (the predictive baselines' image, models/predictive.py)."""
        num_tokens = tokens.shape[1]
        if num_tokens > self.context_length:
            raise ValueError(f"got {num_tokens} tokens; the text tower was built for at most {self.context_length}")
        x = self.token_embedding(tokens) + self.pos_embed[:num_tokens]  # (B, T, width)
        if first is not None:
            x = torch.cat([x[:, :1] + first[:, None].to(x.dtype), x[:, 1:]], dim=1)
        x = self.transformer(x, is_causal=True)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> text embedding (B, output_dim), the last non-pad token projected."""
        lengths = text_lengths(tokens, self.pad_id)  # (B,) the end-of-text token sits at lengths - 1
        if not torch.compiler.is_compiling():
            # Causal attention: no position sees a later one, so the padding after the batch's longest text
            # cannot change any pooled feature. Dropping it is exact and skips most of the tower's work on
            # captions (~15 of 77 tokens). Costs one host sync; a compiled graph keeps the full length.
            tokens = tokens[:, : max(int(lengths.max()), 1)]  # (B, T')
        x = self.forward_features(tokens)  # (B, T', width)
        pooled = x[torch.arange(x.shape[0], device=x.device), lengths - 1]  # (B, width)
        return pooled @ self.proj


def text_lengths(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B, T) padded token ids -> (B,) lengths up to the last non-pad token. Padding only trails the text, but the
    pad id may also occur inside it (CLIP's BPE: id 0 is "!"), so the end is searched from the back, not counted."""
    non_pad = (tokens != pad_id).flip(-1).int()  # (B, T) reversed
    return tokens.shape[1] - non_pad.argmax(dim=-1)


class TextEmbedding(nn.Module):
    """BERT's embeddings without token types: word + learned absolute position, LayerNorm, dropout."""

    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        width: int,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        drop: float = 0.0,
    ):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(context_length, width))
        self.norm = norm_layer(width)
        self.drop = nn.Dropout(drop)

    def forward(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """(B, T) ids at positions start..start+T-1 -> (B, T, width)."""
        num_tokens = tokens.shape[1]
        if start + num_tokens > self.pos_embed.shape[0]:
            raise ValueError(f"position {start + num_tokens - 1} is past the {self.pos_embed.shape[0]} positions learned")
        x = self.token_embedding(tokens) + self.pos_embed[start : start + num_tokens]  # (B, T, width)
        return self.drop(self.norm(x))


class BertTextEncoder(nn.Module):
    """BLIP's text transformer (BERT with cross-attention to image tokens of width `context_dim`)."""

    def __init__(
        self,
        vocab_size: int = 30524,
        context_length: int = 512,
        width: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        context_dim: int = 768,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        drop: float = 0.0,
        attn_drop: float = 0.0,
    ):
        super().__init__()
        self.width = width
        self.embed = TextEmbedding(vocab_size, context_length, width, norm_layer=norm_layer, drop=drop)
        self.transformer = Transformer(
            width,
            depth,
            num_heads,
            mlp_ratio=mlp_ratio,
            act_layer=act_layer,
            norm_layer=norm_layer,
            cross_attention=True,
            context_dim=context_dim,
            post_norm=True,
            drop=drop,
            attn_drop=attn_drop,
        )
        self.initialize_parameters()

    @torch.no_grad()
    def initialize_parameters(self) -> None:
        # BERT: weights ~ N(0, 0.02), biases 0, LayerNorm identity.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.embed.pos_embed, std=0.02)

    def share_all_but_self_attention(self, encoder: "BertTextEncoder") -> None:
        """Reuse `encoder`'s modules except self-attention (`attn` and its post-norm `norm1`): BLIP's pretraining
        decoder (paper section 3.2, Table 3: 252M parameters instead of 361M for ViT-B)."""
        self.embed = encoder.embed
        for mine, theirs in zip(self.transformer.blocks, encoder.transformer.blocks):
            mine.norm_cross, mine.cross_attn, mine.norm2, mine.mlp = theirs.norm_cross, theirs.cross_attn, theirs.norm2, theirs.mlp

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def forward(
        self,
        tokens: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
        context: Optional[torch.Tensor] = None,
        is_causal: bool = False,
        cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        """(B, T) token ids -> hidden states (B, T, width).

        padding_mask: (B, T) bool, True = a real token (pads are never attended to; the output is zero at the
        pads after the longest text); context: image tokens (B, S, context_dim) for the image-grounded modes;
        is_causal: decoder mode; cache: keys/values of the tokens before these (generation), whose count gives
        the positions.
        """
        num_tokens = tokens.shape[1]
        if padding_mask is not None and cache is None and not torch.compiler.is_compiling():
            # Padding trails the text, and no real token attends to a pad: the columns after the batch's longest
            # text change nothing at real tokens. They are cut (a fixed-length tokenizer pads 35-token rows), the
            # mask too when every kept token is real, and the output is zero there.
            positions = torch.arange(1, num_tokens + 1, device=tokens.device)
            keep = max(int((padding_mask.any(0) * positions).max()), 1)
            tokens, padding_mask = tokens[:, :keep], padding_mask[:, :keep]
            if bool(padding_mask.all()):
                padding_mask = None
        x = self.embed(tokens, start=cache.length if cache is not None else 0)  # (B, T', width)
        attn_mask = None
        if padding_mask is not None:
            attn_mask = padding_mask[:, None, None, :]  # (B, 1, 1, T')
            if is_causal and cache is None:  # combined once here, not in every block
                attn_mask, is_causal = attn_mask & causal_mask(x.shape[1], x.shape[1], x.device), False  # (B, 1, T', T')
        x = self.transformer(x, attn_mask=attn_mask, is_causal=is_causal, context=context, cache=cache)
        return F.pad(x, (0, 0, 0, num_tokens - x.shape[1]))  # (B, T, width)


class LMHead(nn.Module):
    """BERT's `cls.predictions`: dense, GELU, LayerNorm, then logits against the word embeddings plus a bias."""

    def __init__(
        self,
        width: int,
        vocab_size: int,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.act = act_layer()
        self.norm = norm_layer(width)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        nn.init.normal_(self.dense.weight, std=0.02)
        nn.init.zeros_(self.dense.bias)

    def forward(self, x: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        """(B, T, width) hidden states, (vocab, width) tied word embeddings -> (B, T, vocab) logits."""
        return F.linear(self.norm(self.act(self.dense(x))), embedding_weight, self.bias)
