"""LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022): a frozen linear layer plus a
trained low-rank update, y = W x + b + (alpha / rank) B A x, with A (rank x in) Kaiming-initialised and B (out x rank)
zero, so training starts exactly at the base model; merged, W' = W + (alpha / rank) B A is a plain nn.Linear again.

    model = add_lora(model, rank=8, alpha=16)  # the attention projections of any family; all else frozen
    ...train...
    merge_lora(model)  # plain nn.Linear modules, the base's own dtype

Targets are module-name patterns, fnmatch-style on the full dotted name (`visual.*attn.qkv`), a pattern also matching
as a dotted suffix (`qkv` is `*.qkv`). The default, DEFAULT_TARGETS, is every attention projection the families have:
self-attention's fused `attn.qkv` and `attn.proj` (CLIP's ViT and text towers, BLIP's BERT stack and decoder, the
MPT-style LM under Flamingo), cross-attention's `q`, `kv` and `proj` (BLIP's text encoder, Flamingo's resampler and
gated blocks) and the ResNet attention pool's `q_proj/k_proj/v_proj/c_proj` (the only linear layers of an RN-tiny
image tower: convolutions are not adapted).

Deliberate choices:
- a fused projection (`qkv`, `kv`) gets one adapter over its whole fused output, rank r for q, k and v together,
  not the paper's separate q and v adapters (PEFT does the same for fused layers; restricting it would need a
  mask on B);
- the adapter's parameters stay fp32 whatever the base's dtype: `base_dtype=torch.bfloat16` stores the frozen W and
  b in bf16 (half their memory, QLoRA's idea without the quantisation) and the base product runs in bf16, the
  adapter's in the input's dtype; this cast is the one place precision does not come from autocast;
- dropout (`dropout`) acts on the adapter's input only, as in the paper's code and PEFT;
- `LoRALinear` keeps the wrapped layer's `weight` and `bias` under their own names, so an adapted model's state dict
  is the plain model's plus `*.lora_a` / `*.lora_b`, and `merge_state_dict` merges a saved one without a model.
"""
import fnmatch
import math

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_TARGETS = ("*attn.qkv", "*attn.proj", "*attn.q", "*attn.kv", "*attnpool.q_proj", "*attnpool.k_proj",
                   "*attnpool.v_proj", "*attnpool.c_proj")
ADAPTER_KEYS = ("lora_a", "lora_b")


class LoRALinear(nn.Module):
    """A frozen nn.Linear's weight and bias (optionally stored in `base_dtype`) plus a trained rank-`rank` update
    scaled by alpha / rank; `lora_a` (rank, in) Kaiming-uniform, `lora_b` (out, rank) zero, both fp32."""

    def __init__(self, linear: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 base_dtype: torch.dtype | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1; got {rank}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.original_dtype = linear.weight.dtype  # what merge_lora gives back
        dtype = base_dtype or linear.weight.dtype
        self.weight = nn.Parameter(linear.weight.detach().to(dtype), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        device = linear.weight.device
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=torch.float32))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's (and PEFT's) initialisation of A
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            base = F.linear(x, self.weight, self.bias)
        else:  # a bf16 base under fp32 inputs: the product in the base's dtype, the result in the input's
            base = F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)
        update = F.linear(F.linear(self.dropout(x), self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))  # (..., out)
        return base + self.scale * update

    def delta(self) -> torch.Tensor:
        """(alpha / rank) B A, the (out, in) update merging adds to the weight, in fp32."""
        return self.scale * (self.lora_b @ self.lora_a)

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + (alpha / rank) B A, in the wrapped layer's original dtype."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.original_dtype)
        with torch.no_grad():
            linear.weight.copy_((self.weight.float() + self.delta()).to(self.original_dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias.to(self.original_dtype))
        return linear.requires_grad_(self.weight.requires_grad)  # frozen, as the base was

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def matches(name: str, patterns) -> bool:
    """Whether a dotted module name matches one of `patterns` (fnmatch on the whole name, or as a dotted suffix)."""
    return any(fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern) for pattern in patterns)


def parse_targets(text: str) -> tuple[str, ...] | None:
    """finetune.lora_targets: patterns separated by commas; '' is the default (None)."""
    patterns = tuple(part.strip() for part in text.split(",") if part.strip())
    return patterns or None


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, targets=None, dropout: float = 0.0,
             base_dtype: torch.dtype | None = None) -> nn.Module:
    """Wrap every nn.Linear whose name matches `targets` (default DEFAULT_TARGETS; module docstring) in a LoRALinear,
    in place, and freeze every other parameter; returns the model. No match is a ValueError naming the patterns and
    some of the model's linear layers."""
    patterns = tuple(targets) if targets else DEFAULT_TARGETS
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    chosen = [(name, module) for name, module in linears if matches(name, patterns)]
    if not chosen:
        examples = ", ".join(name for name, _ in linears[:6]) or "none"
        raise ValueError(f"LoRA targets {', '.join(patterns)} match no linear layer of this model; its linear layers "
                         f"include {examples}")
    model.requires_grad_(False)
    replace(model, {id(module): LoRALinear(module, rank, alpha, dropout, base_dtype) for _, module in chosen})
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear into a plain nn.Linear (W + (alpha / rank) B A, the base's original dtype), in place;
    returns the model. A model with no adapters is returned as it is."""
    replace(model, {id(module): module.merged().train(module.training) for module in model.modules()
                    if isinstance(module, LoRALinear)})
    return model


def replace(model: nn.Module, replacements: dict[int, nn.Module]) -> None:
    """Every child module whose id is in `replacements` replaced by its replacement, under every parent that holds
    it: a layer two stacks share (BLIP's decoder and encoder share their cross-attention) stays shared."""
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if id(child) in replacements:
                setattr(parent, name, replacements[id(child)])


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters alone: every `*.lora_a` and `*.lora_b` of the model's state dict, detached copies."""
    return {name: value.detach().clone() for name, value in model.state_dict().items()
            if name.rpartition(".")[2] in ADAPTER_KEYS}


def load_lora_state_dict(model: nn.Module, adapters: dict[str, torch.Tensor]) -> nn.Module:
    """Adapters from `lora_state_dict` into an adapted model (same targets and rank); a ValueError names what does
    not fit. Returns the model."""
    own = lora_state_dict(model)
    missing, unexpected = sorted(set(own) - set(adapters)), sorted(set(adapters) - set(own))
    shapes = [name for name in own if name in adapters and tuple(adapters[name].shape) != tuple(own[name].shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"adapters do not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}, other "
                         f"shapes {shapes[:3]} (other lora_targets or lora_rank?)")
    model.load_state_dict(adapters, strict=False)
    return model


def merge_state_dict(state: dict[str, torch.Tensor], scale: float,
                     dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A saved adapted model's state dict merged without building it: `p.weight` + scale x `p.lora_b` @ `p.lora_a`
    for every adapted layer `p`, adapter keys dropped; `scale`: alpha / rank; `dtype`: the merged layers' weights and
    biases (default: as saved; a bf16 base's model was fp32). A plain state dict comes back as is."""
    merged = {name: value for name, value in state.items() if name.rpartition(".")[2] not in ADAPTER_KEYS}
    for name in state:
        prefix, _, key = name.rpartition(".")
        if key == "lora_a":
            weight = state[f"{prefix}.weight"]
            delta = scale * (state[f"{prefix}.lora_b"].float() @ state[name].float())  # (out, in)
            merged[f"{prefix}.weight"] = (weight.float() + delta).to(dtype or weight.dtype)
            if dtype is not None and f"{prefix}.bias" in state:
                merged[f"{prefix}.bias"] = state[f"{prefix}.bias"].to(dtype)
    return merged


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters), counted once each."""
    params = {id(param): param for param in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
