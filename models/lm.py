"""Decoder-only language model: MPT (MosaicML, 2023), the language side of OpenFlamingo-3B and -9B, on this
codebase's `Transformer`.

Pre-norm causal blocks without any bias (Linear or LayerNorm) and without position embeddings: ALiBi (Press et
al., ICLR 2022) adds `-slope_h * (i - j)` to the score of query i on key j in head h. The output matrix is the
token embedding (tied). `qk_norm` is MosaicML's QK LayerNorm over all heads (MPT-1B has it, MPT-7B not).
`load_mpt` reads a HuggingFace folder (`config.json` and `pytorch_model.bin` or `model.safetensors`, sharded or
not) of either layout: transformers' `MptForCausalLM` ("mpt") or MosaicML's remote-code `MosaicGPT`
("mosaic_gpt", the layout of mpt-1b-redpajama-200b); the key maps live in `models/convert.py`.

Deliberate differences from transformers' `MptForCausalLM` and MosaicML's `MosaicGPT`:
- the ALiBi bias is relative to the query (`-slope * (i - j)`) where MPT adds `slope * (j - (S - 1))`: the two
  differ by a constant per query row, which the softmax cancels. Bias and causal mask are one additive float
  mask for `F.scaled_dot_product_attention`, built for the new tokens' rows only when decoding with a cache;
- with a padding mask, a padded query attends to itself (no row is empty, so no NaN); transformers fills such
  rows with the dtype's minimum. Outputs at real tokens agree;
- LayerNorm follows autocast (fp32), where MosaicML's `low_precision_layernorm` runs it in bf16/fp16; under
  autocast SDPA casts the additive mask, ALiBi included, to the compute dtype (transformers adds it in fp32);
- options the released models leave off (clip_qkv, softmax_scale, logit_scale, biases, prefix LM, learned
  positions, other attention, norm or FFN types, an untied output matrix) are not offered: `mpt_config_to_kwargs`
  refuses a config that sets one, or holds a field it does not know, naming it;
- initialisation is GPT-2's (normal 0.02, residual output projections scaled by 1/sqrt(2 * depth)); MPT-1B
  was trained from kaiming_normal_.
"""
import inspect
import math
import os
from functools import partial
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from crossmodal.config import BadInput
from crossmodal.files import shown
from crossmodal.models import convert
from crossmodal.models.layers import KVCache, Transformer

# MosaicML's model cards and config.json files; OpenFlamingo-3B uses mpt-1b-redpajama-200b, OpenFlamingo-9B mpt-7b.
LM_MODELS: dict[str, dict[str, Any]] = {
    "mpt-1b-redpajama-200b": dict(
        vocab_size=50432, context_length=2048, width=2048, depth=24, num_heads=16, mlp_ratio=4.0, qk_norm=True
    ),
    "mpt-7b": dict(vocab_size=50432, context_length=2048, width=4096, depth=32, num_heads=32, mlp_ratio=4.0),
    # For CPU demos and tests (not MosaicML's): the language side of Flamingo-tiny; the vocabulary is the tokenizer's.
    "lm-tiny": dict(vocab_size=1024, context_length=128, width=128, depth=2, num_heads=4, mlp_ratio=4.0),
}


def alibi_slopes(num_heads: int, alibi_bias_max: float = 8.0) -> torch.Tensor:
    """(num_heads,) ALiBi slopes as MPT computes them: 2^(-alibi_bias_max * h / n) for h = 1..n, n the next power
    of two; for other head counts the odd-numbered slopes of that series first, then the even ones."""
    power_of_2 = 2 ** math.ceil(math.log2(num_heads))
    slopes = 2.0 ** (-alibi_bias_max * torch.arange(1, power_of_2 + 1, dtype=torch.float64) / power_of_2)
    if power_of_2 != num_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes.float()


def alibi_attention_bias(
    slopes: torch.Tensor, num_queries: int, num_keys: int, padding_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Additive attention mask (1 or B, heads, num_queries, num_keys): ALiBi's `-slope * (i - j)` on allowed keys,
    -inf on future keys and on padding (a query always sees itself). The queries are the last `num_queries`
    positions; padding_mask (B, num_keys) is True at real tokens."""
    keys = torch.arange(num_keys, device=slopes.device)
    distance = keys[num_keys - num_queries :, None] - keys  # (T, S): i - j
    allowed = distance >= 0
    if padding_mask is not None:
        allowed = allowed & (padding_mask[:, None, :] | (distance == 0))  # (B, T, S)
    bias = -slopes[:, None, None] * distance  # (heads, T, S)
    return torch.where(allowed.view(-1, 1, num_queries, num_keys), bias, -float("inf"))  # (1 or B, heads, T, S)


class DecoderLM(nn.Module):
    """MPT: token embedding, bias-free pre-norm causal blocks with ALiBi, final norm, tied output matrix."""

    def __init__(
        self,
        vocab_size: int = 50432,
        context_length: int = 2048,
        width: int = 2048,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        qk_norm: bool = False,
        alibi_bias_max: float = 8.0,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.context_length = context_length
        self.num_heads = num_heads
        self.alibi_bias_max = alibi_bias_max
        norm_layer = partial(nn.LayerNorm, eps=norm_eps, bias=False)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.transformer = Transformer(
            width,
            depth,
            num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=False,
            proj_bias=False,
            qk_norm=qk_norm,
            norm_layer=norm_layer,
        )
        self.norm = norm_layer(width)
        self.initialize_parameters()

    @property
    def depth(self) -> int:
        return self.transformer.depth

    @torch.no_grad()
    def initialize_parameters(self) -> None:
        # GPT-2 / nanoGPT: N(0, 0.02), the projections into the residual stream scaled by 1/sqrt(2 * depth).
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
        for block in self.transformer.blocks:
            nn.init.normal_(block.attn.proj.weight, std=0.02 / math.sqrt(2 * self.depth))
            nn.init.normal_(block.mlp.fc2.weight, std=0.02 / math.sqrt(2 * self.depth))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def attention_bias(
        self, num_tokens: int, num_past: int = 0, padding_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The additive mask of `num_tokens` new tokens after `num_past` cached ones (see `alibi_attention_bias`)."""
        num_keys = num_past + num_tokens
        if num_keys > self.context_length:
            raise ValueError(f"{num_keys} tokens; the model was built for at most {self.context_length}")
        device = self.token_embedding.weight.device
        slopes = alibi_slopes(self.num_heads, self.alibi_bias_max).to(device)
        return alibi_attention_bias(slopes, num_tokens, num_keys, padding_mask)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and the tied output matrix: (B, T, width) -> (B, T, vocab)."""
        return F.linear(self.norm(x), self.token_embedding.weight)

    def forward(
        self, tokens: torch.Tensor, cache: Optional[KVCache] = None, padding_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """(B, T) token ids -> logits (B, T, vocab).

        cache: keys/values of the tokens before these (generation); padding_mask: (B, T_past + T) bool, True at
        real tokens (left padding for batched prompts)."""
        return self.forward_embeddings(self.token_embedding(tokens), cache, padding_mask)

    def forward_embeddings(
        self, x: torch.Tensor, cache: Optional[KVCache] = None, padding_mask: Optional[torch.Tensor] = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Input embeddings (B, T, width) -> logits (B, T, vocab) (LLaVA splices image features into them); cache
        and padding_mask as `forward`; `last_only`: the last position's logits alone (B, 1, vocab), what generation
        reads."""
        num_past = cache.length if cache is not None else 0
        attn_bias = self.attention_bias(x.shape[1], num_past, padding_mask)  # (1 or B, heads, T, T_past + T)
        x = self.transformer(x, attn_mask=attn_bias.to(x.dtype), cache=cache)
        return self.logits(x[:, -1:] if last_only else x)


def build_lm(name: str, **overrides: Any) -> DecoderLM:
    if name not in LM_MODELS:
        raise ValueError(f"unknown language model {name!r}; choose one of {sorted(LM_MODELS)}")
    return DecoderLM(**{**LM_MODELS[name], **overrides})


# An MPT config.json, field by field: transformers' MptConfig ("mpt", attention options nested in attn_config),
# MosaicML's remote-code MPTConfig (also "mpt") and MosaicGPTConfig ("mosaic_gpt", flat, some with an `attn_`
# prefix). READ fields build the model or are refused where this model cannot be what they say; IGNORED ones change
# nothing the weights compute; any other field is refused (`convert.check_hf_fields`). Absent fields take MPT's
# defaults, except alibi, whose default is transformers' True but MosaicML's False: a remote-code config (auto_map)
# or MosaicGPT's must state it (absent no_bias, where they also differ, shows as unexpected bias weights).
MPT_READ = (
    "d_model", "n_heads", "n_layers", "expansion_ratio", "mlp_ratio", "max_seq_len", "vocab_size", "layer_norm_epsilon",
    "no_bias", "norm_type", "logit_scale", "tie_word_embeddings", "ffn_config", "fc_type", "attn_config",
    "alibi", "alibi_bias_max", "attn_qk_ln", "attn_clip_qkv", "softmax_scale", "prefix_lm", "attn_uses_sequence_id",
    "low_precision_layernorm",  # MosaicGPT's: LayerNorm in bf16/fp16 under autocast, the same in fp32
    "learned_pos_emb",  # MPT drops learned positions under ALiBi, which is required (a wpe weight shows as unexpected)
)  # fmt: skip
MPT_ATTENTION_READ = (
    "attn_type", "alibi", "alibi_bias_max", "qk_ln", "clip_qkv", "softmax_scale", "prefix_lm", "attn_uses_sequence_id",
)  # fmt: skip
MPT_IGNORED = (
    "resid_pdrop", "emb_pdrop", "attn_pdrop",  # dropout: training only
    "init_config", "init_device", "initializer_range", "param_init_fn", "init_std", "init_gain", "init_nonlinearity",
    "init_div_is_residual", "emb_init_std", "emb_init_uniform_lim", "fan_mode",  # initialisation
    "embedding_fraction",  # scales the embedding's gradient, not its value
    "attn_impl",  # torch, flash or triton: the same attention
    "use_cache", "verbose", "tokenizer_name", "pad_token_id", "bos_token_id", "eos_token_id",  # the tokenizer's
)  # fmt: skip
MPT_NORMS = ("layernorm", "low_precision_layernorm")  # the same LayerNorm; the low-precision one under autocast only


def mpt_config_to_kwargs(config: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """`DecoderLM` keyword arguments from an MPT config.json (`where` names it in errors): every architecture field
    built as it says, or refused (BadInput) naming it where this model cannot be what it says."""
    attn = config.get("attn_config") or {}
    if not isinstance(attn, dict):
        raise BadInput(f"{where}: attn_config={attn!r}: a JSON object expected")
    convert.check_hf_fields(config, MPT_READ, MPT_IGNORED, where)
    convert.check_hf_fields(attn, MPT_ATTENTION_READ, MPT_IGNORED, f"{where} attn_config")

    def option(name: str, flat_name: str, default: Any = None) -> tuple[str, Any]:
        """(the field's name as the file spells it, its value)."""
        if name in attn:
            return f"attn_config.{name}", attn[name]
        return flat_name, config.get(flat_name, default)

    alibi_default = True if config.get("model_type") == "mpt" and "auto_map" not in config else None
    supported = (  # (the field as the file spells it, its value, the values this model can be, what they mean)
        (*option("alibi", "alibi", alibi_default), (True,), "ALiBi (learned positions are not implemented)"),
        (*option("attn_type", "attn_type", "multihead_attention"), ("multihead_attention",), "multi-head attention"),
        (*option("clip_qkv", "attn_clip_qkv"), (None,), "no QKV clipping"),
        (*option("softmax_scale", "softmax_scale"), (None,), "a softmax scale of 1/sqrt(head_dim)"),
        (*option("prefix_lm", "prefix_lm", False), (False, None), "causal attention (no prefix LM)"),
        (*option("attn_uses_sequence_id", "attn_uses_sequence_id", False), (False,), "attention across sequence ids"),
        ("logit_scale", config.get("logit_scale"), (None,), "unscaled logits"),
        ("no_bias", config.get("no_bias", True), (True,), "no biases"),
        ("tie_word_embeddings", config.get("tie_word_embeddings", True), (True,), "the token embedding as output matrix"),
        ("ffn_config", config.get("ffn_config"), (None, {"ffn_type": "mptmlp"}), "MPT's GELU MLP"),
        ("fc_type", config.get("fc_type", "torch"), ("torch",), "plain linear layers"),
        ("norm_type", config.get("norm_type", "low_precision_layernorm"), MPT_NORMS, "LayerNorm"),
    )
    for key, value, values, what in supported:
        if value not in values:
            raise BadInput(f"{where}: {key}={value!r}: this MPT implements {what} only")
    width, num_heads = convert.hf_size(config, "d_model", where), convert.hf_size(config, "n_heads", where)
    if width % num_heads:
        raise BadInput(f"{where}: d_model={width} is not a multiple of n_heads={num_heads}")
    ratio_key = "expansion_ratio" if "expansion_ratio" in config else "mlp_ratio"  # MPT's, MosaicGPT's name
    _, qk_norm = option("qk_ln", "attn_qk_ln", False)
    alibi_key, alibi_bias_max = option("alibi_bias_max", "alibi_bias_max", 8)
    return dict(
        vocab_size=convert.hf_size(config, "vocab_size", where),
        context_length=convert.hf_size(config, "max_seq_len", where),
        width=width,
        depth=convert.hf_size(config, "n_layers", where),
        num_heads=num_heads,
        mlp_ratio=convert.hf_number(config, ratio_key, where, 4.0),  # hidden int(width * ratio), as MPT's
        qk_norm=bool(qk_norm),
        alibi_bias_max=convert.hf_number({alibi_key: alibi_bias_max}, alibi_key, where, 8.0),
        norm_eps=convert.hf_number(config, "layer_norm_epsilon", where, 1e-5),
    )


# `DecoderLM` keywords and the MPT config.json fields they come from.
MPT_FIELDS = {
    "vocab_size": "vocab_size", "context_length": "max_seq_len", "width": "d_model", "depth": "n_layers",
    "num_heads": "n_heads", "mlp_ratio": "expansion_ratio", "qk_norm": "attn_config.qk_ln",
    "alibi_bias_max": "attn_config.alibi_bias_max", "norm_eps": "layer_norm_epsilon",
}  # fmt: skip


def preset_differences(name: str, kwargs: dict[str, Any]) -> list[str]:
    """'field=folder value (the preset's value)' for each architecture keyword in which `kwargs`
    (`mpt_config_to_kwargs`) differ from preset `name`. Not compared: the vocabulary and context length, which a
    run takes from its tokenizer (ALiBi has no position weights)."""
    defaults = {key: parameter.default for key, parameter in inspect.signature(DecoderLM).parameters.items()}
    preset = {**defaults, **LM_MODELS[name]}
    return [f"{MPT_FIELDS[key]}={kwargs[key]!r} (the preset's {preset[key]!r})" for key in kwargs
            if key not in ("vocab_size", "context_length") and kwargs[key] != preset[key]]


def load_mpt(path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None) -> DecoderLM:
    """A `DecoderLM` with the weights of a local HuggingFace MPT folder, without the network. The model is built
    on the meta device and takes the file's tensors (in `dtype` if given), so no random copy is allocated."""
    config = convert.read_hf_config(path)
    if config is None:
        raise FileNotFoundError(f"{shown(path)}: no MPT folder with a config.json there")
    kwargs = mpt_config_to_kwargs(config, shown(os.path.join(path, "config.json")))
    with torch.device("meta"):
        model = DecoderLM(**kwargs)
    state_dict = convert.mpt_to_ours(convert.read_hf_weights(path))
    problems = convert.describe_mismatch(model.state_dict(), state_dict)
    if problems:
        raise ValueError(f"{path}: the weights do not fit the config's model:\n{problems}")
    if dtype is not None:
        state_dict = {key: value.to(dtype) for key, value in state_dict.items()}
    model.load_state_dict(state_dict, assign=True)
    return model.eval()
