"""Model presets and the builder: `create_model("ViT-B-32")` -> `CLIP`.

Paper presets follow the CLIP paper's appendix tables "CLIP-ResNet hyperparameters" and "CLIP-ViT
hyperparameters" (Radford et al., 2021), cross-checked against openai/CLIP `build_model`: ViT heads =
width // 64, text heads = text width // 64, ResNet attention-pool heads = 32 * width // 64, context 77,
vocabulary 49408. Each also exists as `<name>-quickgelu` with QuickGELU, the activation of OpenAI's
released weights; the plain names use nn.GELU (open_clip's convention).
"""
import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Optional, Union

from models.clip import CLIP
from models.layers import get_act_layer
from models.resnet import ModifiedResNet
from models.text import TextTransformer
from models.vit import VisionTransformer


@dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int
    image_size: int
    vision_layers: Union[int, tuple[int, int, int, int]]  # ViT depth, or ResNet blocks per stage
    vision_width: int
    vision_heads: int  # ViT heads, or ResNet attention-pool heads
    text_width: int
    text_layers: int
    text_heads: int
    patch_size: Optional[int] = None  # None: ModifiedResNet image tower
    context_length: int = 77
    vocab_size: int = 49408
    act_layer: str = "gelu"  # gelu | quick_gelu
    pad_id: int = 0
    drop_path: float = 0.0
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: Optional[float] = None


# fmt: off
PAPER_MODELS = {
    "ViT-B-32": CLIPConfig(embed_dim=512,  image_size=224, patch_size=32, vision_layers=12, vision_width=768,  vision_heads=12, text_width=512, text_layers=12, text_heads=8),
    "ViT-B-16": CLIPConfig(embed_dim=512,  image_size=224, patch_size=16, vision_layers=12, vision_width=768,  vision_heads=12, text_width=512, text_layers=12, text_heads=8),
    "ViT-L-14": CLIPConfig(embed_dim=768,  image_size=224, patch_size=14, vision_layers=24, vision_width=1024, vision_heads=16, text_width=768, text_layers=12, text_heads=12),
    "RN50":     CLIPConfig(embed_dim=1024, image_size=224, vision_layers=(3, 4, 6, 3),  vision_width=64, vision_heads=32, text_width=512, text_layers=12, text_heads=8),
    "RN101":    CLIPConfig(embed_dim=512,  image_size=224, vision_layers=(3, 4, 23, 3), vision_width=64, vision_heads=32, text_width=512, text_layers=12, text_heads=8),
    "RN50x4":   CLIPConfig(embed_dim=640,  image_size=288, vision_layers=(4, 6, 10, 6), vision_width=80, vision_heads=40, text_width=640, text_layers=12, text_heads=10),
}
# Small presets for CPU demos and tests (not from the paper).
TINY_MODELS = {
    "ViT-tiny": CLIPConfig(embed_dim=128, image_size=64, patch_size=8, vision_layers=4, vision_width=128, vision_heads=4, text_width=128, text_layers=3, text_heads=4, context_length=32, vocab_size=1024),
    "RN-tiny":  CLIPConfig(embed_dim=128, image_size=64, vision_layers=(1, 1, 1, 1), vision_width=16, vision_heads=8, text_width=128, text_layers=3, text_heads=4, context_length=32, vocab_size=1024),
}
# fmt: on
MODELS = {
    **PAPER_MODELS,
    **{f"{name}-quickgelu": dataclasses.replace(config, act_layer="quick_gelu") for name, config in PAPER_MODELS.items()},
    **TINY_MODELS,
}

OVERRIDES = (
    "image_size", "vocab_size", "context_length", "pad_id", "act_layer", "embed_dim",
    "init_logit_scale", "init_logit_bias", "drop_path", "grad_checkpointing",
)  # fmt: skip


def create_model(name: str, **overrides) -> CLIP:
    """Build a freshly initialised CLIP preset; `overrides` may set any key of OVERRIDES.

    drop_path (stochastic depth, max rate over depth) applies to the transformer towers, not to the ResNet.
    """
    if name not in MODELS:
        closest = difflib.get_close_matches(name, MODELS, n=3, cutoff=0.4)
        raise ValueError(f"unknown model {name!r}; closest presets: {closest or sorted(MODELS)}")
    for key in overrides:
        if key not in OVERRIDES:
            closest = difflib.get_close_matches(key, OVERRIDES, n=3)
            raise ValueError(f"unknown create_model override {key!r}; closest: {closest}; valid: {list(OVERRIDES)}")
    grad_checkpointing = overrides.pop("grad_checkpointing", False)
    config = dataclasses.replace(MODELS[name], **overrides)
    act_layer = get_act_layer(config.act_layer)

    if config.patch_size is None:
        vision = ModifiedResNet(
            layers=config.vision_layers,
            output_dim=config.embed_dim,
            heads=config.vision_heads,
            image_size=config.image_size,
            width=config.vision_width,
        )
    else:
        vision = VisionTransformer(
            image_size=config.image_size,
            patch_size=config.patch_size,
            width=config.vision_width,
            depth=config.vision_layers,
            num_heads=config.vision_heads,
            output_dim=config.embed_dim,
            act_layer=act_layer,
            drop_path=config.drop_path,
        )
    text = TextTransformer(
        vocab_size=config.vocab_size,
        context_length=config.context_length,
        width=config.text_width,
        depth=config.text_layers,
        num_heads=config.text_heads,
        output_dim=config.embed_dim,
        act_layer=act_layer,
        pad_id=config.pad_id,
        drop_path=config.drop_path,
    )
    model = CLIP(
        config.embed_dim,
        vision,
        text,
        init_logit_scale=config.init_logit_scale,
        init_logit_bias=config.init_logit_bias,
    )
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model
