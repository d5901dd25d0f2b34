"""LLaMA-style decoder-only language model (Touvron et al., 2023, "LLaMA: Open and Efficient Foundation Language
Models"; LLaMA 2, Touvron et al., 2023), the language side of LLaVA (Vicuna v1.5 is a fine-tuned LLaMA 2), on this
codebase's `Transformer`.

Pre-norm causal blocks with RMSNorm (Zhang & Sennrich, 2019), no biases, SwiGLU MLPs (Shazeer, 2020), rotary
position embeddings on queries and keys (RoFormer, Su et al., 2021), grouped-query attention where the config has
fewer key/value heads than query heads (GQA, Ainslie et al., 2023: LLaMA 2 70B, LLaMA 3), a final RMSNorm and an
output matrix of its own (`lm_head`) or the token embedding (`tie_word_embeddings`). `load_llama` reads a
HuggingFace `LlamaForCausalLM` folder (config.json, `model.safetensors` or `pytorch_model.bin`, sharded with an
index or not) without the safetensors package; the key map lives in `models/convert.py`.

Deliberate differences from transformers' `LlamaForCausalLM` (5.x):
- q/k/v are one fused `qkv` Linear and gate/up one fused `mlp.fc1` (gate first), as the other towers' blocks;
  the key map concatenates HF's separate projections;
- RMSNorm is `nn.RMSNorm`, which normalises in the input's precision under no autocast (HF upcasts bf16/fp16 to
  fp32 first); under autocast both run in fp32. Rotary cos/sin are computed in fp32 and cast to the activations'
  dtype, as HF does;
- with a padding mask, a padded query attends to itself (no row is empty, so no NaN); outputs at real tokens agree.
  Positions come from the padding mask (left padding: the first real token is position 0), as HF's generate
  derives its position_ids;
- rope_scaling "dynamic", "yarn" and "longrope" are refused (they change frequencies with the sequence length or
  add attention factors); "linear" and "llama3" are implemented (`layers.RotaryEmbedding`);
- more tokens than `max_position_embeddings` are refused (HF extrapolates);
- loaded weights are fp32 unless `dtype` says otherwise (precision comes from autocast);
- initialisation is normal(0.02) for every Linear and the embedding (HF's `initializer_range`), without GPT-2's
  residual scaling.
"""
import inspect
import os
from functools import partial
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from crossmodal.config import BadInput
from crossmodal.files import shown
from crossmodal.models import convert
from crossmodal.models.layers import ROPE_SCALINGS, KVCache, Mlp, RotaryEmbedding, Transformer, causal_mask

# The released config.json files (meta-llama/Llama-2-7b-hf, Llama-2-13b-hf, Meta-Llama-3-8B; lmsys/vicuna-*-v1.5,
# fine-tuned from LLaMA 2 with its architecture); mlp_ratio = intermediate_size / hidden_size.
LLAMA_MODELS: dict[str, dict[str, Any]] = {
    "Llama-2-7b": dict(
        vocab_size=32000, context_length=4096, width=4096, depth=32, num_heads=32, mlp_ratio=11008 / 4096
    ),
    "Llama-2-13b": dict(
        vocab_size=32000, context_length=4096, width=5120, depth=40, num_heads=40, mlp_ratio=13824 / 5120
    ),
    "vicuna-7b-v1.5": dict(
        vocab_size=32000, context_length=4096, width=4096, depth=32, num_heads=32, mlp_ratio=11008 / 4096
    ),
    "vicuna-13b-v1.5": dict(
        vocab_size=32000, context_length=4096, width=5120, depth=40, num_heads=40, mlp_ratio=13824 / 5120
    ),
    "Llama-3-8B": dict(
        vocab_size=128256, context_length=8192, width=4096, depth=32, num_heads=32, num_kv_heads=8,
        mlp_ratio=14336 / 4096, rope_theta=500000.0,
    ),  # fmt: skip
    # For CPU demos and tests (not Meta's): grouped-query attention with two query heads per key/value head.
    "llama-tiny": dict(
        vocab_size=1024, context_length=256, width=128, depth=2, num_heads=4, num_kv_heads=2, mlp_ratio=2.75
    ),
}


class LlamaLM(nn.Module):
    """LLaMA: token embedding, pre-RMSNorm causal blocks (rotary attention, SwiGLU), final RMSNorm, output matrix."""

    def __init__(
        self,
        vocab_size: int = 32000,
        context_length: int = 4096,
        width: int = 4096,
        depth: int = 32,
        num_heads: int = 32,
        num_kv_heads: Optional[int] = None,
        mlp_ratio: float = 11008 / 4096,
        norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        rope_scaling: Optional[dict[str, Any]] = None,
        tie_embeddings: bool = False,
    ):
        super().__init__()
        self.context_length = context_length
        norm_layer = partial(nn.RMSNorm, eps=norm_eps)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.rope = RotaryEmbedding(width // num_heads, theta=rope_theta, scaling=rope_scaling)
        self.transformer = Transformer(
            width,
            depth,
            num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=False,
            proj_bias=False,
            act_layer=nn.SiLU,
            norm_layer=norm_layer,
            num_kv_heads=num_kv_heads,
            mlp_layer=partial(Mlp, gated=True),
        )
        self.norm = norm_layer(width)
        self.lm_head = None if tie_embeddings else nn.Linear(width, vocab_size, bias=False)
        self.initialize_parameters()

    @property
    def depth(self) -> int:
        return self.transformer.depth

    @torch.no_grad()
    def initialize_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and the output matrix: (B, T, width) -> (B, T, vocab)."""
        x = self.norm(x)
        return self.lm_head(x) if self.lm_head is not None else F.linear(x, self.token_embedding.weight)

    def forward(
        self, tokens: torch.Tensor, cache: Optional[KVCache] = None, padding_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """(B, T) token ids -> logits (B, T, vocab); cache and padding_mask as `forward_embeddings`."""
        return self.forward_embeddings(self.token_embedding(tokens), cache, padding_mask)

    def forward_embeddings(
        self, x: torch.Tensor, cache: Optional[KVCache] = None, padding_mask: Optional[torch.Tensor] = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Input embeddings (B, T, width) -> logits (B, T, vocab) (LLaVA splices image features into them).

        cache: keys/values of the tokens before these (generation), whose count gives the new tokens' positions;
        padding_mask: (B, T_past + T) bool, True at real tokens (left padding for batched prompts): positions count
        real tokens only, and no query attends to padding. `last_only`: the last position's logits alone (B, 1,
        vocab), what generation reads (a long prompt's other positions would cost a vocabulary-wide matmul each)."""
        num_tokens = x.shape[1]
        num_past = cache.length if cache is not None else 0
        num_keys = num_past + num_tokens
        if num_keys > self.context_length:
            raise ValueError(f"{num_keys} tokens; the model was built for at most {self.context_length}")
        attn_mask = None
        if padding_mask is None:
            positions = torch.arange(num_past, num_keys, device=x.device)[None]  # (1, T)
        else:
            if padding_mask.shape != (x.shape[0], num_keys):
                raise ValueError(f"padding_mask {tuple(padding_mask.shape)}: ({x.shape[0]}, {num_keys}) expected")
            positions = (padding_mask.long().cumsum(1) - 1).clamp(min=0)[:, num_past:]  # (B, T)
            keys = torch.arange(num_keys, device=x.device)
            itself = keys == keys[num_past:, None]  # (T, S): each query's own key
            allowed = causal_mask(num_tokens, num_keys, x.device) & (padding_mask[:, None, :] | itself)  # (B, T, S)
            attn_mask = allowed[:, None]  # (B, 1, T, T_past + T)
        cos, sin = self.rope(positions)  # each (B or 1, 1, T, head_dim)
        x = self.transformer(
            x, attn_mask=attn_mask, is_causal=attn_mask is None, cache=cache, rope=(cos.to(x.dtype), sin.to(x.dtype))
        )
        return self.logits(x[:, -1:] if last_only else x)


def build_llama(name: str, **overrides: Any) -> LlamaLM:
    if name not in LLAMA_MODELS:
        raise ValueError(f"unknown LLaMA model {name!r}; choose one of {sorted(LLAMA_MODELS)}")
    return LlamaLM(**{**LLAMA_MODELS[name], **overrides})


# A LLaMA config.json (transformers' LlamaConfig, 4.x and 5.x), field by field. READ fields build the model or are
# refused where this model cannot be what they say; IGNORED ones change nothing the weights compute; any other
# field is refused (`convert.check_hf_fields`). Rotary settings are `rope_theta` and `rope_scaling` (4.x) or one
# `rope_parameters` object holding both (5.x).
LLAMA_READ = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
    "rope_theta", "rope_scaling", "rope_parameters", "attention_bias", "mlp_bias",
)  # fmt: skip
LLAMA_IGNORED = (
    "initializer_range", "attention_dropout",  # initialisation, training-only dropout
    "pretraining_tp",  # HF 4.x splits the projections into this many slices and sums them: the same numbers
    "use_cache", "pad_token_id", "bos_token_id", "eos_token_id",  # decoding and the tokenizer's
)  # fmt: skip
# The fields of each rope_scaling / rope_parameters type this model implements; "type" is the 4.x name of rope_type.
ROPE_FIELDS = {
    "default": ("rope_type", "type", "rope_theta"),
    "linear": ("rope_type", "type", "rope_theta", "factor"),
    "llama3": ("rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
}  # fmt: skip


def _rope_config(config: dict[str, Any], where: str) -> tuple[float, Optional[dict[str, Any]]]:
    """(rope_theta, the scaling `layers.RotaryEmbedding` takes) from a config.json, or BadInput naming the field."""
    key = "rope_parameters" if config.get("rope_parameters") is not None else "rope_scaling"
    rope = config.get(key) or {}
    if not isinstance(rope, dict):
        raise BadInput(f"{where}: {key}={rope!r}: a JSON object expected")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_FIELDS:
        raise BadInput(f"{where}: {key} rope_type={kind!r}: this LLaMA implements rotary scaling "
                       f"{', '.join(ROPE_SCALINGS)} or none ('dynamic', 'yarn' and 'longrope' are not implemented)")
    unknown = sorted(set(rope) - set(ROPE_FIELDS[kind]))
    if unknown:
        raise BadInput(f"{where}: {key}: {', '.join(f'{field}={rope[field]!r}' for field in unknown)}: field(s) this "
                       f"loader does not know for rope_type {kind!r}; refused rather than ignored")
    theta = convert.hf_number(rope if "rope_theta" in rope else config, "rope_theta", where, 10000.0)
    if kind == "default":
        return theta, None
    scaling = {"rope_type": kind, "factor": convert.hf_number(rope, "factor", f"{where} {key}", None)}
    if kind == "llama3":
        for field in ("low_freq_factor", "high_freq_factor"):
            scaling[field] = convert.hf_number(rope, field, f"{where} {key}", None)
        if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
            raise BadInput(f"{where}: {key}: high_freq_factor={rope['high_freq_factor']!r} must exceed "
                           f"low_freq_factor={rope['low_freq_factor']!r}")
        # HF's default when absent: the model's own context (`standardize_rope_params`)
        original = rope.get("original_max_position_embeddings", config.get("max_position_embeddings", 2048))
        scaling["original_max_position_embeddings"] = convert.hf_size(
            {"original_max_position_embeddings": original}, "original_max_position_embeddings", f"{where} {key}")
    return theta, scaling


def llama_config_to_kwargs(config: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """`LlamaLM` keyword arguments from a LLaMA config.json (`where` names it in errors): every architecture field
    built as it says, or refused (BadInput) naming it where this model cannot be what it says."""
    if config.get("model_type", "llama") != "llama":
        raise BadInput(f"{where}: model_type={config['model_type']!r}: a LLaMA config (model_type 'llama') expected")
    convert.check_hf_fields(config, LLAMA_READ, LLAMA_IGNORED, where)
    supported = (  # (field, its value, the values this model can be, what they mean)
        ("hidden_act", config.get("hidden_act", "silu"), ("silu",), "SwiGLU (a SiLU gate)"),
        ("attention_bias", config.get("attention_bias", False), (False,), "attention without biases"),
        ("mlp_bias", config.get("mlp_bias", False), (False,), "an MLP without biases"),
    )
    for key, value, values, what in supported:
        if value not in values:
            raise BadInput(f"{where}: {key}={value!r}: this LLaMA implements {what} only")
    width = convert.hf_size(config, "hidden_size", where, 4096)
    num_heads = convert.hf_size(config, "num_attention_heads", where, 32)
    num_kv_heads = convert.hf_size(config, "num_key_value_heads", where, num_heads)
    if width % num_heads or num_heads % num_kv_heads:
        raise BadInput(f"{where}: hidden_size={width}, num_attention_heads={num_heads}, num_key_value_heads="
                       f"{num_kv_heads}: the width must be a multiple of the heads, the heads of the key/value heads")
    if config.get("head_dim") is not None and config["head_dim"] != width // num_heads:
        raise BadInput(f"{where}: head_dim={config['head_dim']!r}: this LLaMA implements head_dim = hidden_size / "
                       f"num_attention_heads ({width // num_heads}) only")
    rope_theta, rope_scaling = _rope_config(config, where)
    hidden = convert.hf_size(config, "intermediate_size", where, 11008)
    return dict(
        vocab_size=convert.hf_size(config, "vocab_size", where, 32000),
        context_length=convert.hf_size(config, "max_position_embeddings", where, 2048),
        width=width,
        depth=convert.hf_size(config, "num_hidden_layers", where, 32),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        mlp_ratio=convert.hf_ratio(width, hidden, "intermediate_size", where),
        norm_eps=convert.hf_number(config, "rms_norm_eps", where, 1e-6),  # LlamaConfig's default
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


# `LlamaLM` keywords and the config.json fields they come from.
LLAMA_FIELDS = {
    "vocab_size": "vocab_size", "context_length": "max_position_embeddings", "width": "hidden_size",
    "depth": "num_hidden_layers", "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
    "mlp_ratio": "intermediate_size / hidden_size", "norm_eps": "rms_norm_eps", "rope_theta": "rope_theta",
    "rope_scaling": "rope_scaling", "tie_embeddings": "tie_word_embeddings",
}  # fmt: skip


def preset_differences(name: str, kwargs: dict[str, Any]) -> list[str]:
    """'field=folder value (the preset's value)' for each keyword in which `kwargs` (`llama_config_to_kwargs`)
    differ from preset `name` (num_kv_heads None and equal to the heads are the same)."""
    defaults = {key: parameter.default for key, parameter in inspect.signature(LlamaLM).parameters.items()}
    preset = {**defaults, **LLAMA_MODELS[name]}
    preset["num_kv_heads"] = preset["num_kv_heads"] or preset["num_heads"]
    return [f"{LLAMA_FIELDS[key]}={kwargs[key]!r} (the preset's {preset[key]!r})" for key in kwargs
            if kwargs[key] != preset[key]]


def load_llama(path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None) -> LlamaLM:
    """A `LlamaLM` with the weights of a local HuggingFace LLaMA folder (config.json and `model.safetensors`,
    `pytorch_model.bin` or their shards with an index), without the network, in `dtype` (default fp32, whatever the
    file holds). The model is built on the meta device and takes the file's tensors, so no random copy is
    allocated. A folder that does not fit (missing shard, keys or shapes the config does not give) fails in one
    line naming what differs."""
    path = os.fspath(path)
    config = convert.read_hf_config(path)
    if config is None:
        raise FileNotFoundError(f"{shown(path)}: no LLaMA folder with a config.json there")
    kwargs = llama_config_to_kwargs(config, shown(os.path.join(path, "config.json")))
    with torch.device("meta"):
        model = LlamaLM(**kwargs)
    state_dict = convert.llama_to_ours(convert.read_llama_weights(path), tied=kwargs["tie_embeddings"])
    problems = convert.describe_mismatch(model.state_dict(), state_dict)
    if problems:
        problems = problems.replace("\n", "; ")  # one line
        raise ValueError(f"{shown(path)}: the weights do not fit its config.json's model: {problems}")
    dtype = dtype or torch.float32
    model.load_state_dict({key: value.to(dtype) for key, value in state_dict.items()}, assign=True)
    return model.eval()
