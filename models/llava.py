"""LLaVA (Liu et al., NeurIPS 2023, "Visual Instruction Tuning"; LLaVA-1.5, Liu et al. 2023, "Improved Baselines
with Visual Instruction Tuning"): a CLIP ViT's patch features, projected into a LLaMA-style language model's
embedding space, stand in for image tokens of the prompt.

`LLaVA` composes this codebase's `models.vit.VisionTransformer` (as transformers' `CLIPVisionModel`: no output
projection) and `models.llama.LlamaLM`. Features come from one block's output (`vision_feature_layer`, numbered as
transformers' `hidden_states`: LLaVA-1.5 takes -2, the second-to-last block, and runs no block after it), without
the CLS token ("default") or with it ("full"); a projector maps them to the LM's width: `mlp2x_gelu`
(LLaVA-1.5: linear, GELU, linear; HF's `multi_modal_projector.linear_1/linear_2`) or `linear` (LLaVA-1). The
prompt holds the image token once per image feature (llava-hf's processor writes it so); the features replace
those tokens' embeddings in order, and the LM runs on the result (`LlamaLM.forward_embeddings`). Generation is the
shared `models.generation.generate` (greedy, beam, nucleus, key/value cache).

`load_llava` reads a llava-hf folder (`LlavaForConditionalGeneration`: config.json and its weights, in any of the
key layouts `models.convert.llava_to_ours` names); `load_clip_vision` a `CLIPVisionModel` folder. Both read every
config.json field or ignore it on purpose, and refuse any other naming it (`models.convert.check_hf_fields`).

Deliberate differences from transformers' `LlavaForConditionalGeneration` (5.x):
- a padding mask (`padding_mask`, HF's attention_mask) also gives the positions, in `forward` as in `generate`
  (HF's forward numbers positions 0..T-1 whatever the mask; its generate counts real tokens, as here);
- image tokens are embedded as token 0 before their features replace them, so an image token id outside the
  vocabulary works;
- `image_sizes` (LLaVA-NeXT's any-resolution tiling) and pixel-level position interpolation are not offered;
- `eos_token_id` given as a list (LLaMA 3's configs) ends generation at its first id only.
"""
import inspect
import os
from functools import partial
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from crossmodal.config import BadInput
from crossmodal.files import shown
from crossmodal.models import convert
from crossmodal.models.generation import generate
from crossmodal.models.layers import KVCache, QuickGELU, get_act_layer
from crossmodal.models.llama import LLAMA_MODELS, LlamaLM, llama_config_to_kwargs
from crossmodal.models.lm import DecoderLM
from crossmodal.models.resnet import ModifiedResNet
from crossmodal.models.vit import VisionTransformer

# ---------------------------------------------------------------- the CLIP vision tower

# CLIP ViT-L/14 at 336 pixels (openai/clip-vit-large-patch14-336, LLaVA-1.5's tower): 24 x 24 = 576 patches.
CLIP_VIT_L_336 = dict(image_size=336, patch_size=14, width=1024, depth=24, num_heads=16, mlp_ratio=4.0,
                      act="quick_gelu", norm_eps=1e-5)


def build_clip_vision(image_size: int = 224, patch_size: int = 16, width: int = 768, depth: int = 12,
                      num_heads: int = 12, mlp_ratio: float = 4.0, act: str = "quick_gelu",
                      norm_eps: float = 1e-5) -> VisionTransformer:
    """A `VisionTransformer` laid out as transformers' `CLIPVisionModel` (pre-norm, bias-free patch convolution,
    `proj` None: CLIPVisionModel has no output projection; use `forward_features` or `hidden_states`)."""
    tower = VisionTransformer(
        image_size=image_size, patch_size=patch_size, width=width, depth=depth, num_heads=num_heads,
        mlp_ratio=mlp_ratio, output_dim=width, act_layer=get_act_layer(act),
        norm_layer=partial(nn.LayerNorm, eps=norm_eps),
    )  # fmt: skip
    tower.proj = None
    return tower


# A CLIPVisionConfig's fields (transformers 4.x and 5.x), as `llama_config_to_kwargs` reads LLaMA's.
CLIP_VISION_READ = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels", "image_size",
    "patch_size", "hidden_act", "layer_norm_eps",
)  # fmt: skip
CLIP_VISION_IGNORED = (
    "projection_dim",  # CLIPVisionModelWithProjection's head; CLIPVisionModel and LLaVA have none
    "attention_dropout", "dropout", "initializer_range", "initializer_factor",  # training only, initialisation
    "vocab_size",  # LlavaConfig's defaults write one into vision_config; an image tower has no vocabulary
)  # fmt: skip
CLIP_VISION_ACTS = ("quick_gelu", "gelu")  # transformers' ACT2FN names that `layers.ACT_LAYERS` computes alike


def clip_vision_config_to_kwargs(config: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """`build_clip_vision` keywords from a CLIPVisionConfig (a `clip_vision_model` config.json or LLaVA's
    vision_config; `where` names it in errors); absent fields take CLIPVisionConfig's defaults."""
    if config.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise BadInput(f"{where}: model_type={config['model_type']!r}: a CLIP vision tower (model_type "
                       f"'clip_vision_model') expected")
    convert.check_hf_fields(config, CLIP_VISION_READ, CLIP_VISION_IGNORED, where)
    act = config.get("hidden_act", "quick_gelu")
    if act not in CLIP_VISION_ACTS:
        raise BadInput(f"{where}: hidden_act={act!r}: this CLIP tower implements {' or '.join(CLIP_VISION_ACTS)}")
    if config.get("num_channels", 3) != 3:
        raise BadInput(f"{where}: num_channels={config['num_channels']!r}: this CLIP tower takes RGB images (3)")
    width = convert.hf_size(config, "hidden_size", where, 768)
    num_heads = convert.hf_size(config, "num_attention_heads", where, 12)
    image_size = convert.hf_size(config, "image_size", where, 224)
    patch_size = convert.hf_size(config, "patch_size", where, 32)
    if width % num_heads:
        raise BadInput(f"{where}: hidden_size={width} is not a multiple of num_attention_heads={num_heads}")
    if image_size % patch_size:
        raise BadInput(f"{where}: image_size={image_size} is not a multiple of patch_size={patch_size}")
    return dict(
        image_size=image_size,
        patch_size=patch_size,
        width=width,
        depth=convert.hf_size(config, "num_hidden_layers", where, 12),
        num_heads=num_heads,
        mlp_ratio=convert.hf_ratio(width, convert.hf_size(config, "intermediate_size", where, 3072),
                                   "intermediate_size", where),
        act=act,
        norm_eps=convert.hf_number(config, "layer_norm_eps", where, 1e-5),
    )


def _read_folder(path: Union[str, os.PathLike], what: str) -> tuple[str, dict[str, Any], str]:
    """(path, config.json, how errors name it) of a HuggingFace folder, or FileNotFoundError."""
    path = os.fspath(path)
    config = convert.read_hf_config(path)
    if config is None:
        raise FileNotFoundError(f"{shown(path)}: no {what} folder with a config.json there")
    return path, config, shown(os.path.join(path, "config.json"))


def _fill(model: nn.Module, state_dict: dict[str, torch.Tensor], path: str, dtype: Optional[torch.dtype]) -> None:
    """Load a state dict that must fit `model` (built on the meta device) exactly, or fail in one line."""
    problems = convert.describe_mismatch(model.state_dict(), state_dict)
    if problems:
        problems = "; ".join(problems.splitlines())  # one line
        raise ValueError(f"{shown(path)}: the weights do not fit its config.json's model: {problems}")
    dtype = dtype or torch.float32
    model.load_state_dict({key: value.to(dtype) for key, value in state_dict.items()}, assign=True)


def load_clip_vision(path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None) -> VisionTransformer:
    """The image tower of a transformers `CLIPVisionModel` folder (config.json and weights), in `dtype` (default
    fp32), eval mode. `forward_features(images, final_norm=False)` is its last_hidden_state, `forward_features(
    images)[:, 0]` its pooler_output, `hidden_states(images, [k])[0]` its hidden_states[k]."""
    path, config, where = _read_folder(path, "CLIPVisionModel")
    kwargs = clip_vision_config_to_kwargs(config, where)
    with torch.device("meta"):
        tower = build_clip_vision(**kwargs)
    _fill(tower, convert.clip_vision_to_ours(convert.read_hf_weights(path)), path, dtype)
    return tower.eval()


# ---------------------------------------------------------------- LLaVA

PROJECTORS = ("mlp2x_gelu", "linear")  # LLaVA-1.5's two layers, LLaVA-1's one
# transformers' ACT2FN names for projector_hidden_act, and the module that computes each alike.
PROJECTOR_ACTS = {"gelu": nn.GELU, "gelu_pytorch_tanh": partial(nn.GELU, approximate="tanh"), "quick_gelu": QuickGELU}
FEATURE_STRATEGIES = ("default", "full")  # CLS dropped, kept


class MultiModalProjector(nn.Module):
    """Image features (.., vision width) -> the LM's width: linear_1, act, linear_2 (`mlp2x_gelu`) or linear_1
    alone (`linear`); HF's `LlavaMultiModalProjector` names."""

    def __init__(self, in_features: int, out_features: int, kind: str = "mlp2x_gelu", act: str = "gelu",
                 bias: bool = True):
        super().__init__()
        if kind not in PROJECTORS:
            raise ValueError(f"unknown LLaVA projector {kind!r}; choose one of {list(PROJECTORS)}")
        if act not in PROJECTOR_ACTS:
            raise ValueError(f"unknown projector activation {act!r}; choose one of {sorted(PROJECTOR_ACTS)}")
        self.linear_1 = nn.Linear(in_features, out_features, bias=bias)
        two_layers = kind == "mlp2x_gelu"
        self.act = PROJECTOR_ACTS[act]() if two_layers else nn.Identity()
        self.linear_2 = nn.Linear(out_features, out_features, bias=bias) if two_layers else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LLaVA(nn.Module):
    """A CLIP image tower's features, projected, in place of the image tokens of a LLaMA-style LM's prompt.

    The tower may also be CLIP's ResNet (this codebase's demos: the CLIP demo's RN-tiny), whose tokens are its
    attention pool's with every position querying (`ModifiedResNet.forward_tokens`): the pooled token stands
    where a ViT's CLS token does and the grid cells where its patches do, so `vision_feature_select_strategy`
    means the same; its only feature layer is the last (-1). The language model may also be the MPT-style
    `models.lm.DecoderLM` (the LM demo's): any decoder with `token_embedding`, `forward_embeddings` and `depth`."""

    def __init__(
        self,
        vision_tower: Union[VisionTransformer, ModifiedResNet],
        language_model: Union[LlamaLM, DecoderLM],
        image_token_id: int,
        projector: str = "mlp2x_gelu",
        projector_act: str = "gelu",
        projector_bias: bool = True,
        vision_feature_layer: Union[int, Sequence[int]] = -2,
        vision_feature_select_strategy: str = "default",
        eos_id: int = 2,
        pad_id: Optional[int] = None,
    ):
        super().__init__()
        if vision_feature_select_strategy not in FEATURE_STRATEGIES:
            raise ValueError(f"vision_feature_select_strategy {vision_feature_select_strategy!r}: choose one of "
                             f"{list(FEATURE_STRATEGIES)}")
        layers = [vision_feature_layer] if isinstance(vision_feature_layer, int) else list(vision_feature_layer)
        if isinstance(vision_tower, ModifiedResNet):
            if layers != [-1]:
                raise ValueError(f"vision_feature_layer {vision_feature_layer!r}: a ResNet tower's features are its "
                                 f"attention pool's tokens, layer -1")
            vision_width = vision_tower.output_dim
        else:
            depth = len(vision_tower.transformer.blocks)
            if not layers or any(not -depth - 1 <= layer <= depth for layer in layers):
                raise ValueError(f"vision_feature_layer {vision_feature_layer!r}: the tower's hidden states are "
                                 f"{-depth - 1} to {depth}")
            vision_width = vision_tower.cls_token.shape[-1]
        self.vision_tower = vision_tower
        width = language_model.token_embedding.embedding_dim
        # Several layers are concatenated along the width, as HF does.
        self.multi_modal_projector = MultiModalProjector(vision_width * len(layers), width, projector, projector_act,
                                                         projector_bias)
        self.language_model = language_model
        self.image_token_id = image_token_id
        self.vision_feature_layers = layers
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.eos_id, self.pad_id = eos_id, pad_id
        self.vision_locked = False  # lock_vision

    @property
    def features_per_image(self) -> int:
        """How many image tokens each image fills: its patches (a ResNet's grid cells), plus the CLS (pooled) token
        for "full"."""
        tower = self.vision_tower
        if isinstance(tower, ModifiedResNet):
            cells = tower.attnpool.positional_embedding.shape[0] - 1
        else:
            cells = tower.patch_embed.num_patches
        return cells + (self.vision_feature_select_strategy == "full")

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, features_per_image, LM width)."""
        if isinstance(self.vision_tower, ModifiedResNet):
            states = [self.vision_tower.forward_tokens(images)]  # (N, 1 + HW, output_dim), the pooled token first
        else:
            states = self.vision_tower.hidden_states(images, self.vision_feature_layers)  # each (N, 1 + HW, width)
        if self.vision_feature_select_strategy == "default":
            states = [state[:, 1:] for state in states]  # (N, HW, width): the CLS token dropped
        return self.multi_modal_projector(torch.cat(states, dim=-1))

    def embed(self, images: Optional[torch.Tensor], input_ids: torch.Tensor,
              features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token embeddings (B, T, LM width) of `input_ids` (B, T) with the features of `images` (N, 3, H, W),
        image after image, in place of the image tokens, which must number N x features_per_image. `features`:
        `image_features(images)` computed before, in place of `images` (one image's for several prompts)."""
        is_image = input_ids == self.image_token_id  # (B, T)
        x = self.language_model.token_embedding(input_ids.masked_fill(is_image, 0))  # (B, T, width)
        num_tokens = int(is_image.sum())
        num_images = features.shape[0] if features is not None else 0 if images is None else images.shape[0]
        if num_tokens != num_images * self.features_per_image:
            raise BadInput(f"input_ids hold {num_tokens} image tokens (id {self.image_token_id}), but {num_images} "
                           f"image(s) x {self.features_per_image} features = {num_images * self.features_per_image} "
                           f"(the prompt repeats the image token once per feature, as llava-hf's processor writes it)")
        if num_images == 0:
            return x
        features = (self.image_features(images) if features is None else features).to(x.dtype)  # (N, F, width)
        return x.masked_scatter(is_image[..., None], features)

    def forward(self, images: Optional[torch.Tensor], input_ids: torch.Tensor,
                padding_mask: Optional[torch.Tensor] = None, features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """images (N, 3, H, W) (transformers' pixel_values) and input_ids (B, T) -> logits (B, T, vocab).
        padding_mask: (B, T) bool, True at real tokens (left padding), as `LlamaLM.forward_embeddings`;
        features: as `embed`'s."""
        x = self.embed(images, input_ids, features)
        return self.language_model.forward_embeddings(x, padding_mask=padding_mask)

    def lock_vision(self) -> None:
        """Freeze the image tower, as LLaVA does in both stages: no gradient, and eval mode whatever `train()`
        says, so a ResNet's BatchNorm keeps its running statistics."""
        self.vision_locked = True
        self.vision_tower.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "LLaVA":
        super().train(mode)
        if self.vision_locked:
            self.vision_tower.eval()
        return self

    def generate(
        self,
        images: Optional[torch.Tensor],
        input_ids: torch.Tensor,
        max_new_tokens: int = 20,
        num_beams: int = 1,
        padding_mask: Optional[torch.Tensor] = None,
        eos_id: Optional[int] = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The new token ids (B, <= max_new_tokens) after prompts `input_ids` (B, P) (left-padded where
        `padding_mask` says), greedy unless `num_beams` > 1 or sampling is asked for; ends at `eos_id` (the
        config's by default); kwargs go to `models.generation.generate` (top_p, top_k, temperature,
        length_penalty, use_cache, ...). The images are encoded once, into the prompt's embeddings."""
        prompt_length = input_ids.shape[1]
        eos_id = self.eos_id if eos_id is None else eos_id
        pad_id = eos_id if self.pad_id is None else self.pad_id  # HF pads with eos when the config names no pad

        def decode(tokens: torch.Tensor, prompt: torch.Tensor, cache: Optional[KVCache]) -> torch.Tensor:
            # prompt: the spliced prompt embeddings, one row per row of tokens (beams have copies)
            num_past = cache.length if cache is not None else 0
            from_prompt = max(0, min(prompt_length - num_past, tokens.shape[1]))  # tokens still in the prompt
            x = torch.cat([prompt[:, num_past : num_past + from_prompt],
                           self.language_model.token_embedding(tokens[:, from_prompt:])], dim=1)  # (N, T, width)
            padding = None
            if padding_mask is not None:
                padding = padding_mask.repeat_interleave(tokens.shape[0] // padding_mask.shape[0], dim=0)
                generated = num_past + tokens.shape[1] - prompt_length
                padding = torch.cat([padding, padding.new_ones(padding.shape[0], generated)], dim=1)
            return self.language_model.forward_embeddings(x, cache, padding, last_only=True)  # (N, 1, vocab)

        with torch.no_grad():
            prompt = self.embed(images, input_ids)  # (B, P, width)
        out = generate(decode, input_ids, prompt, self.language_model.depth, eos_id=eos_id, pad_id=pad_id,
                       max_length=prompt_length + max_new_tokens, num_beams=num_beams, **kwargs)
        return out[:, prompt_length:]


# Presets (the llava-hf config.json files of llava-1.5-7b-hf and -13b-hf: CLIP ViT-L/14-336 and Vicuna v1.5, whose
# vocabulary llava-hf padded to 32064 with the image token at 32000). `text` are `LlamaLM` keywords, `vision`
# `build_clip_vision`'s, the rest `LLaVA`'s.
LLAVA_MODELS: dict[str, dict[str, Any]] = {
    "LLaVA-1.5-7b": dict(
        vision=CLIP_VIT_L_336, text=dict(LLAMA_MODELS["vicuna-7b-v1.5"], vocab_size=32064, norm_eps=1e-5),
        image_token_id=32000, pad_id=32001,
    ),
    "LLaVA-1.5-13b": dict(
        vision=CLIP_VIT_L_336, text=dict(LLAMA_MODELS["vicuna-13b-v1.5"], vocab_size=32064, norm_eps=1e-5),
        image_token_id=32000, pad_id=32001,
    ),
    # For CPU tests and demos (not released): a 3-block tower of 16 patches and llama-tiny (grouped-query attention).
    "LLaVA-tiny": dict(
        vision=dict(image_size=32, patch_size=8, width=64, depth=3, num_heads=4, mlp_ratio=4.0, act="quick_gelu",
                    norm_eps=1e-5),
        text=dict(LLAMA_MODELS["llama-tiny"]), image_token_id=1023,
    ),
}

# Presets composed of this codebase's own presets, for runs that start from a CLIP run and a language-model run
# (recipes/llava.py; the CPU demo, configs/llava/): `tower` names a CLIP preset whose image tower is taken, `lm` a
# language-model preset (models/lm.py or models/llama.py) sized to the run's tokenizer; the rest are `LLaVA`'s (the
# image token, end and padding ids are the tokenizer's). Built by `models.create_llava_run`.
LLAVA_RUN_MODELS: dict[str, dict[str, Any]] = {
    # The CLIP demo's RN-tiny (its attention pool's 5 tokens at 64x64: the pooled one and a 2x2 grid) and the LM
    # demo's lm-tiny; BLIP-RN-tiny's image tokens are the same 5.
    "LLaVA-RN-tiny": dict(tower="RN-tiny", lm="lm-tiny", vision_feature_layer=-1,
                          vision_feature_select_strategy="full"),
    # ViT-tiny's 64 patches from its second-to-last block, as LLaVA-1.5 takes them.
    "LLaVA-ViT-tiny": dict(tower="ViT-tiny", lm="lm-tiny", vision_feature_layer=-2),
    "LLaVA-RN-llama-tiny": dict(tower="RN-tiny", lm="llama-tiny", vision_feature_layer=-1,
                                vision_feature_select_strategy="full"),
}


def build_llava(vision: dict[str, Any], text: dict[str, Any], **kwargs: Any) -> LLaVA:
    """A randomly initialised LLaVA from `build_clip_vision` keywords, `LlamaLM` keywords and `LLaVA`'s."""
    return LLaVA(build_clip_vision(**vision), LlamaLM(**text), **kwargs)


# A LlavaConfig's top-level fields (transformers 4.x and 5.x).
LLAVA_READ = (
    "vision_config", "text_config", "image_token_index", "image_token_id", "projector_hidden_act",
    "vision_feature_layer", "vision_feature_select_strategy", "multimodal_projector_bias", "tie_word_embeddings",
    "vocab_size", "pad_token_id", "eos_token_id",
)  # fmt: skip
LLAVA_IGNORED = (
    "ignore_index",  # the label the training loss skips
    "image_seq_length",  # the processor's image tokens per image; `LLaVA.embed` checks the count
    "bos_token_id", "use_cache",  # the tokenizer's, decoding
)  # fmt: skip


def llava_config_to_kwargs(config: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """`build_llava` keywords (vision, text and LLaVA's) from a llava-hf config.json (`where` names it in errors):
    every field read or ignored on purpose (the sub-configs by `clip_vision_config_to_kwargs` and
    `models.llama.llama_config_to_kwargs`), anything else refused naming it; absent fields take LlavaConfig's
    defaults (transformers 4.x files state only what differs from them)."""
    if config.get("model_type", "llava") != "llava":
        raise BadInput(f"{where}: model_type={config['model_type']!r}: a LLaVA config (model_type 'llava') expected")
    convert.check_hf_fields(config, LLAVA_READ, LLAVA_IGNORED, where)
    sections = {}
    for key in ("vision_config", "text_config"):
        section = config.get(key) or {}
        if not isinstance(section, dict):
            raise BadInput(f"{where}: {key}={section!r}: a JSON object expected")
        sections[key] = section
    # LlavaConfig's default tower (CLIP ViT-L/14-336) is what a 4.x file leaves out of vision_config.
    vision_defaults = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                       "num_attention_heads": 16, "image_size": 336, "patch_size": 14}
    vision = clip_vision_config_to_kwargs({**vision_defaults, **sections["vision_config"]}, f"{where} vision_config")
    text = llama_config_to_kwargs(sections["text_config"], f"{where} text_config")
    if "vocab_size" in config and config["vocab_size"] != text["vocab_size"]:
        raise BadInput(f"{where}: vocab_size={config['vocab_size']!r} but text_config vocab_size={text['vocab_size']}")
    if config.get("tie_word_embeddings"):  # HF ties the output matrix when either level says so
        text["tie_embeddings"] = True
    image_keys = [key for key in ("image_token_index", "image_token_id") if key in config]
    if len({config[key] for key in image_keys}) > 1:
        raise BadInput(f"{where}: image_token_index={config['image_token_index']!r} and image_token_id="
                       f"{config['image_token_id']!r} differ")
    image_token_id = config[image_keys[0]] if image_keys else 32000
    if isinstance(image_token_id, bool) or not isinstance(image_token_id, int) or image_token_id < 0:
        raise BadInput(f"{where}: {image_keys[0]}={image_token_id!r}: a token id expected")
    act = config.get("projector_hidden_act", "gelu")
    if act not in PROJECTOR_ACTS:
        raise BadInput(f"{where}: projector_hidden_act={act!r}: this LLaVA implements {sorted(PROJECTOR_ACTS)}")
    layer = config.get("vision_feature_layer", -2)
    layers = [layer] if isinstance(layer, int) and not isinstance(layer, bool) else layer
    depth = vision["depth"]
    if (not isinstance(layers, list) or not layers
            or any(isinstance(x, bool) or not isinstance(x, int) or not -depth - 1 <= x <= depth for x in layers)):
        raise BadInput(f"{where}: vision_feature_layer={layer!r}: a hidden state of the {depth}-block tower "
                       f"({-depth - 1} to {depth}) or a list of them expected")
    strategy = config.get("vision_feature_select_strategy", "default")
    if strategy not in FEATURE_STRATEGIES:
        raise BadInput(f"{where}: vision_feature_select_strategy={strategy!r}: one of {list(FEATURE_STRATEGIES)} "
                       f"expected")
    bias = config.get("multimodal_projector_bias", True)
    if not isinstance(bias, bool):
        raise BadInput(f"{where}: multimodal_projector_bias={bias!r}: true or false expected")
    # Generation's end and padding ids: the top level's, else text_config's (LlamaConfig's eos default is 2).
    eos_id = config.get("eos_token_id", sections["text_config"].get("eos_token_id", 2))
    eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id  # LLaMA 3 lists several
    pad_id = config.get("pad_token_id", sections["text_config"].get("pad_token_id"))
    for key, value in (("eos_token_id", eos_id), ("pad_token_id", pad_id)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise BadInput(f"{where}: {key}={value!r}: a token id expected")
    return dict(
        vision=vision, text=text, image_token_id=image_token_id, projector="mlp2x_gelu", projector_act=act,
        projector_bias=bias, vision_feature_layer=layer if isinstance(layer, int) else list(layers),
        vision_feature_select_strategy=strategy, eos_id=2 if eos_id is None else eos_id, pad_id=pad_id,
    )  # fmt: skip


def preset_kwargs(name: str) -> dict[str, Any]:
    """`build_llava` keywords of preset `name` with every default stated (what `llava_config_to_kwargs` returns)."""
    preset = LLAVA_MODELS[name]
    defaults = {key: parameter.default for key, parameter in inspect.signature(LLaVA).parameters.items()
                if parameter.default is not inspect.Parameter.empty}
    text = {key: parameter.default for key, parameter in inspect.signature(LlamaLM).parameters.items()}
    text.update(preset["text"])
    text["num_kv_heads"] = text["num_kv_heads"] or text["num_heads"]  # None means as many as the query heads
    return {**defaults, **preset, "text": text}


def preset_differences(name: str, kwargs: dict[str, Any]) -> list[str]:
    """'field=folder value (the preset's value)' for each keyword in which `kwargs` (`llava_config_to_kwargs`)
    differ from preset `name`; the end and padding ids (the tokenizer's, for generation) are not compared."""
    preset = preset_kwargs(name)
    differences = []
    for part in ("vision", "text"):
        differences += [f"{part}.{key}={value!r} (the preset's {preset[part][key]!r})"
                        for key, value in kwargs[part].items() if value != preset[part][key]]
    differences += [f"{key}={value!r} (the preset's {preset[key]!r})" for key, value in kwargs.items()
                    if key not in ("vision", "text", "eos_id", "pad_id") and value != preset[key]]
    return differences


def load_llava(path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None) -> LLaVA:
    """A `LLaVA` with the weights of a local llava-hf folder (config.json and `model.safetensors`,
    `pytorch_model.bin` or their shards with an index), built on the meta device, in `dtype` (default fp32), eval
    mode. A folder that does not fit fails in one line naming what differs."""
    path, config, where = _read_folder(path, "LLaVA")
    kwargs = llava_config_to_kwargs(config, where)
    with torch.device("meta"):
        model = build_llava(**kwargs)
    tied = kwargs["text"]["tie_embeddings"]
    _fill(model, convert.llava_to_ours(convert.read_llama_weights(path), tied=tied), path, dtype)
    return model.eval()
