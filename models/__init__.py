"""Model presets and the builder: `create_model("ViT-B-32")` -> `CLIP`.

Paper presets follow the CLIP paper's appendix tables "CLIP-ResNet hyperparameters" and "CLIP-ViT
hyperparameters" (Radford et al., 2021), cross-checked against openai/CLIP `build_model`: ViT heads =
width // 64, text heads = text width // 64, ResNet attention-pool heads = 32 * width // 64, context 77,
vocabulary 49408; they equal open_clip v3.3.0's `model_configs/<name>.json` (tests/test_convert.py checks).
Each also exists as `<name>-quickgelu` with QuickGELU, the activation of OpenAI's released weights; the plain
names use nn.GELU (open_clip's convention).

`create_model(name, pretrained=PATH)` loads OpenAI's `.pt` archives and open_clip checkpoints through the key
maps of `models/convert.py`, into fp32 parameters; `pretrained=TAG` ("openai", "laion2b_s34b_b79k", BLIP's and
OpenFlamingo's tags) takes the file `crossmodal.hub.RELEASED` names for that model, downloaded and verified once.

BLIP presets (`BLIP-base`, `BLIP-large`, `BLIP-tiny`, `BLIP-RN-tiny`; table in `models/blip.py`) build a `models.blip.BLIP`;
`pretrained` takes salesforce/BLIP `.pth` files and HuggingFace BLIP folders or weight files, loading the parts
the checkpoint has (see `load_pretrained_blip`); a folder's config.json gives the architecture, which a train.py run
from it must share with its preset (`released_folder_problem`).

Decoder LMs (`models.lm.LM_MODELS`: `lm-tiny`, the MPT presets; `models.llama.LLAMA_MODELS`: `llama-tiny`,
LLaMA 2 and 3, Vicuna; `create_lm("llama", pretrained=FOLDER)` for any HuggingFace LLaMA folder) and Flamingo
presets (`models.flamingo.FLAMINGO_MODELS`) are built by `create_lm` and `create_flamingo`; a Flamingo takes its
frozen parts from a language-model run or MPT folder and a CLIP run or checkpoint (see `create_flamingo`). `create_model(name, pretrained=checkpoint.pt,
vision=..., lm=...)` builds a Flamingo preset with released OpenFlamingo weights from three local files (see
`create_open_flamingo`). LLaVA presets (`models.llava.LLAVA_MODELS`: `LLaVA-1.5-7b`, `LLaVA-1.5-13b`, `LLaVA-tiny`)
and `create_model("llava", pretrained=FOLDER)` build a `models.llava.LLaVA`, from a llava-hf folder when one is
given (see `create_llava`). A run with loss.name caption or bow puts a CLIP preset's towers into a
`models.predictive.TextPredictor` (the CLIP paper's predictive baselines).
"""
import contextlib
import dataclasses
import difflib
import math
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch

from crossmodal import checkpointing, hub
from crossmodal.config import BadInput
from crossmodal.files import shown
from crossmodal.models import convert
from crossmodal.models.batchnorm import convert_sync_batchnorm  # noqa: F401 (re-exported)
from crossmodal.models.blip import BLIP, BLIP_MODELS, blip_config_from_hf, build_blip
from crossmodal.models.blip import preset_differences as blip_preset_differences
from crossmodal.models.clip import CLIP
from crossmodal.models.flamingo import FLAMINGO_MODELS, Flamingo
from crossmodal.models.lm import LM_MODELS, DecoderLM, build_lm, load_mpt, mpt_config_to_kwargs
from crossmodal.models.lm import preset_differences as lm_preset_differences
from crossmodal.models.llama import LLAMA_MODELS, LlamaLM, build_llama, llama_config_to_kwargs, load_llama
from crossmodal.models.llama import preset_differences as llama_preset_differences
from crossmodal.models.llava import (LLAVA_MODELS, LLAVA_RUN_MODELS, LLaVA, build_llava, llava_config_to_kwargs,
                                    load_llava)
from crossmodal.models.llava import preset_differences as llava_preset_differences
from crossmodal.models.predictive import OBJECTIVES as PREDICTIVE_OBJECTIVES, TextPredictor  # noqa: F401 (re-exported)
from crossmodal.models.layers import get_act_layer
from crossmodal.models.resnet import ModifiedResNet
from crossmodal.models.text import TextTransformer
from crossmodal.models.vit import VisionTransformer


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
    vision_stem: str = "patch"  # ViT: patch (one strided convolution) | conv (models.layers.ConvStem)


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
    "init_logit_scale", "init_logit_bias", "drop_path", "grad_checkpointing", "vision_stem",
)  # fmt: skip


def infer_preset(state_dict: dict) -> Optional[str]:
    """The paper preset whose architecture a state_dict (our layout) has, or None. The activation is not stored in
    weights: the answer is the GELU name, and OpenAI's weights want its `-quickgelu` twin."""
    config = convert.infer_config(state_dict)
    if config is None:
        return None
    for name, preset in PAPER_MODELS.items():
        if all(getattr(preset, field) == value for field, value in config.items()):
            return name
    return None


BLIP_OVERRIDES = ("image_size", "drop_path", "text_drop", "tie_text_decoder", "grad_checkpointing", "tokenizer",
                  "momentum_encoders", "momentum", "queue_size", "itm_uniform", "vision_stem", "token_stride")


FLAMINGO_OVERRIDES = ("vision", "lm", "tokenizer")


def create_model(
    name: str, pretrained: Optional[convert.PathLike] = None, **overrides
) -> Union[CLIP, BLIP, Flamingo, LLaVA]:
    """Build a CLIP, BLIP, Flamingo or LLaVA preset; `overrides` may set any key of OVERRIDES (CLIP), BLIP_OVERRIDES
    (BLIP) or FLAMINGO_OVERRIDES (Flamingo); a LLaVA takes none (see `create_llava`; "llava" with a llava-hf folder
    builds whatever its config.json describes).

    pretrained: an OpenAI CLIP `.pt` archive or an open_clip checkpoint, loaded as fp32 instead of the random init
    (BLIP: see `load_pretrained_blip`; Flamingo: OpenFlamingo's checkpoint.pt, see `create_open_flamingo`); or a
    tag of `crossmodal.hub.RELEASED` ("openai", "laion2b_s34b_b79k", ...), downloaded to the cache and verified
    first, with the activation its weights were trained with (and for Flamingo its vision and lm files).
    drop_path (stochastic depth, max rate over depth) applies to the transformer towers, not to the ResNet.
    """
    presets = [*MODELS, *BLIP_MODELS, *FLAMINGO_MODELS, *LLAVA_MODELS, "llava"]
    if name not in presets:
        closest = difflib.get_close_matches(name, presets, n=3, cutoff=0.4)
        raise ValueError(f"unknown model {name!r}; closest presets: {closest or sorted(MODELS)}")
    valid = BLIP_OVERRIDES if name in BLIP_MODELS else FLAMINGO_OVERRIDES if name in FLAMINGO_MODELS else OVERRIDES
    if name == "llava" or name in LLAVA_MODELS:
        valid = ()  # the architecture is the preset's or the folder's
    for key in overrides:
        if key not in valid:
            closest = difflib.get_close_matches(key, valid, n=3)
            raise ValueError(f"unknown create_model override {key!r}; closest: {closest}; valid: {list(valid)}")
    if pretrained is not None:  # a tag of crossmodal.hub.RELEASED: downloaded (or found in the cache) first
        entry = hub.released(name, pretrained)
        if entry is not None and entry.quick_gelu and name in MODELS:
            overrides.setdefault("act_layer", "quick_gelu")  # the activation the weights were trained with
        path = hub.resolve_pretrained(name, pretrained)
        missing = [key for key in valid if overrides.get(key) is None]  # Flamingo's vision and lm
        overrides.update(hub.resolve_companions(name, pretrained, missing))
        pretrained = path
    if name in BLIP_MODELS:
        return create_blip(name, pretrained, **overrides)
    if name in FLAMINGO_MODELS:
        return create_open_flamingo(name, pretrained, **overrides)
    if name == "llava" or name in LLAVA_MODELS:
        return create_llava(name, pretrained)
    grad_checkpointing = overrides.pop("grad_checkpointing", False)
    config = dataclasses.replace(MODELS[name], **overrides)
    # With weights to load, build on the meta device: no random initialisation to throw away.
    with torch.device("meta") if pretrained is not None else contextlib.nullcontext():
        model = build_model(config)
    if pretrained is not None:
        load_pretrained(model, name, config, pretrained)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def create_llava(name: str, pretrained: Optional[convert.PathLike] = None) -> LLaVA:
    """A LLaVA: "llava" with pretrained=FOLDER builds whatever the llava-hf folder's config.json describes
    (`models.llava.load_llava`); a `models.llava.LLAVA_MODELS` preset is built at random, or from a folder whose
    config.json must describe that preset (one line naming each field that differs otherwise)."""
    if pretrained is None:
        if name == "llava":
            raise ValueError("create_model('llava') takes its architecture from a folder: pass pretrained=FOLDER (a "
                             f"llava-hf folder), or name a preset: {sorted(LLAVA_MODELS)}")
        return build_llava(**LLAVA_MODELS[name])
    if name in LLAVA_MODELS:
        check_preset_folder(name, pretrained, "LLaVA", "create_model('llava', pretrained=...)",
                            lambda config, where: llava_preset_differences(name, llava_config_to_kwargs(config, where)))
    return load_llava(pretrained)


def check_preset_folder(name: str, folder: convert.PathLike, what: str, load_as: str, differences) -> None:
    """A released folder given with a preset's name must describe that preset: `differences(config, where)` lists
    the fields in which its config.json does not; any is one line, which names `load_as`, the call that loads the
    folder as it is."""
    folder = os.fspath(folder)
    config = convert.read_hf_config(folder)
    if config is None:
        raise FileNotFoundError(f"{shown(folder)}: no {what} folder with a config.json there")
    where = shown(os.path.join(folder, "config.json"))
    found = differences(config, where)
    if found:
        raise BadInput(f"{where} describes another model than the preset {name} ({'; '.join(found)}): load it as "
                       f"{load_as}")


BLIP_TEXT_LENGTH = 35  # BLIP's text max_length for retrieval (30 in pretraining); BERT's positions allow 512


def load_blip_vision(model: BLIP, path: str) -> None:
    """A BLIP's image tower from a train.py CLIP run's checkpoint.pt whose image tower has the same architecture
    (BLIP-RN-tiny: an RN-tiny run), the way BLIP starts from an ImageNet-trained ViT."""
    weights = _run_weights(path)
    if weights is None:
        raise FileNotFoundError(f"model.vision_checkpoint: no train.py checkpoint at '{path}'")
    visual = {key[len("visual."):]: value for key, value in weights.items() if key.startswith("visual.")}
    expected = model.visual_encoder.state_dict()
    missing, unexpected = sorted(set(expected) - set(visual)), sorted(set(visual) - set(expected))
    shapes = [f"{key} {tuple(visual[key].shape)} (needs {tuple(value.shape)})" for key, value in expected.items()
              if key in visual and visual[key].shape != value.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"model.vision_checkpoint '{path}': its image tower does not fit this BLIP's "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]}, shapes {shapes[:3]}); it needs a CLIP "
                         f"run of the same tower (BLIP-RN-tiny: RN-tiny)")
    model.visual_encoder.load_state_dict(visual)


def is_run_checkpoint(path: str) -> bool:
    """Whether `path` is a checkpoint train.py wrote (a dict with model, config and tokenizer)."""
    checkpoint = checkpointing.read_run(path)
    return checkpoint is not None and "tokenizer" in checkpoint


def load_run_weights(model: torch.nn.Module, path: str) -> None:
    """The online weights of a train.py checkpoint into `model` (momentum copies and queues are left out: they
    restart from the loaded weights); a BLIP image encoder's positions are resized to the model's image size."""
    state_dict = checkpointing.read_run(path)["model"]
    state_dict = {key: value for key, value in state_dict.items()
                  if not (key.split(".")[0].endswith("_m") or key.startswith("queue."))}
    expected = model.state_dict()
    key = "visual_encoder.pos_embed"
    if key in state_dict and key in expected and state_dict[key].shape != expected[key].shape:
        state_dict[key] = convert.interpolate_pos_embed(state_dict[key], expected[key].shape[1] - 1)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [name for name in missing if not (name.split(".")[0].endswith("_m") or name.startswith("queue."))]
    if missing or unexpected:
        raise ValueError(f"model.pretrained '{path}' does not fit this model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


def build_model(config: CLIPConfig) -> CLIP:
    act_layer = get_act_layer(config.act_layer)
    if config.patch_size is None and config.vision_stem != "patch":
        raise ValueError(f"vision_stem={config.vision_stem!r} is a ViT option; this preset has a ResNet image tower")
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
            stem=config.vision_stem,
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
    return CLIP(
        config.embed_dim,
        vision,
        text,
        init_logit_scale=config.init_logit_scale,
        init_logit_bias=config.init_logit_bias,
    )


def load_pretrained(model: CLIP, name: str, config: CLIPConfig, path: convert.PathLike) -> None:
    """Fill `model` (built on the meta device) with a checkpoint's weights, or fail naming every mismatch."""
    checkpoint, source = convert.load_checkpoint(path)
    state_dict = convert.openclip_to_ours(checkpoint)
    problems = convert.describe_mismatch(model.state_dict(), state_dict)
    if problems:
        guess = infer_preset(state_dict)
        hint = f"\nThe checkpoint has the architecture of {guess!r} ({guess}-quickgelu for OpenAI's weights)."
        raise ValueError(f"checkpoint {str(path)!r} does not fit model {name!r}:\n{problems}{hint if guess else ''}")
    if source == "openai" and config.act_layer != "quick_gelu":
        quick_name = f"{name}-quickgelu"
        fix = f"the preset {quick_name!r}" if quick_name in MODELS else "act_layer='quick_gelu'"
        warnings.warn(
            f"{str(path)!r} holds OpenAI CLIP weights, trained with QuickGELU, but model {name!r} is built with GELU, "
            f"so its features will be off: use {fix}",
            stacklevel=3,
        )
    model.load_state_dict(state_dict, assign=True)  # the meta tensors become the checkpoint's
    model.float()  # OpenAI's weights are mostly fp16; precision comes from autocast


# ---------------------------------------------------------------- BLIP

BLIP_PARTS = ("visual_encoder", "text_encoder", "text_decoder", "lm_head", "vision_proj", "text_proj", "itm_head", "temp")



def create_blip(name: str, pretrained: Optional[convert.PathLike] = None, **overrides) -> BLIP:
    """A BLIP preset. tokenizer: a `data.tokenizer` tokenizer whose vocabulary and special ids the model takes,
    kept as `model.tokenizer` for `generate`; by default the BertTokenizer of a HuggingFace folder's vocab.txt.
    With `pretrained`, the image size is the checkpoint's unless overridden. A HuggingFace folder's config.json
    gives the architecture (`models.blip.blip_config_from_hf`): where it differs from the preset, the folder's is
    built, so that the weights compute what they were trained to."""
    grad_checkpointing = overrides.pop("grad_checkpointing", False)
    tokenizer = overrides.pop("tokenizer", None)
    if tokenizer is None and pretrained is not None and os.path.isfile(os.path.join(pretrained, "vocab.txt")):
        from crossmodal.data.tokenizer import BertTokenizer  # here: models does not depend on data otherwise

        tokenizer = BertTokenizer(os.path.join(pretrained, "vocab.txt"))
    config = dataclasses.replace(BLIP_MODELS[name], **overrides)
    if pretrained is None:
        model = build_blip(config, tokenizer=tokenizer)
    else:
        hf_config = convert.read_hf_config(pretrained)  # checked before the weights are read
        where = shown(os.path.join(pretrained, "config.json"))
        folder = {} if hf_config is None else blip_config_from_hf(hf_config, where, tokenizer)
        config = dataclasses.replace(config, **{key: value for key, value in folder.items() if key not in overrides})
        state_dict = convert.blip_to_ours(convert.load_blip_checkpoint(pretrained))
        if "visual_encoder.pos_embed" in state_dict:
            grid = math.isqrt(state_dict["visual_encoder.pos_embed"].shape[1] - 1)
            if folder and grid * folder["patch_size"] != folder["image_size"]:
                raise BadInput(f"{where}: vision_config image_size={folder['image_size']}, but the weights' position "
                               f"embedding is a {grid}x{grid} grid of {folder['patch_size']}-pixel patches")
            if "image_size" not in overrides:
                config = dataclasses.replace(config, image_size=grid * config.patch_size)
        config = dataclasses.replace(config, tie_text_decoder=_text_decoder_is_tied(state_dict))
        with torch.device("meta"):  # released weights hold no momentum copies: those start from the loaded ones
            model = build_blip(dataclasses.replace(config, momentum_encoders=False), tokenizer=tokenizer)
        load_pretrained_blip(model, name, state_dict, pretrained)
        if config.momentum_encoders:
            model.add_momentum_encoders(config.momentum, config.queue_size)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def released_folder_problem(key: str, path: convert.PathLike, name: str) -> Optional[str]:
    """What stops a train.py run from starting at a released folder (config key `key`: model.pretrained,
    flamingo.lm_checkpoint) of preset `name`: the architecture fields in which its config.json (HuggingFace BLIP
    for a BLIP preset, MPT or LLaMA for a language-model preset) differs from the preset. The loaders build the
    folder's architecture, but a run records only the preset's name and rebuilds the preset to resume or be evaluated, so
    its checkpoints would compute something else. None for a file, or a folder without config.json."""
    hf_config = convert.read_hf_config(path)
    if hf_config is None:
        return None
    where = shown(os.path.join(path, "config.json"))
    if name in BLIP_MODELS:
        differences = blip_preset_differences(BLIP_MODELS[name], blip_config_from_hf(hf_config, where))
    elif name in LLAMA_MODELS:
        differences = llama_preset_differences(name, llama_config_to_kwargs(hf_config, where))
    else:
        differences = lm_preset_differences(name, mpt_config_to_kwargs(hf_config, where))
    if not differences:
        return None
    return (f"{key}: {where} describes another architecture than the preset {name} ({'; '.join(differences)}); a run "
            f"records only the preset's name, so its checkpoints would reload as the preset: start from weights of "
            f"the preset's architecture (eval.py --model {name} --pretrained evaluates this folder as it is)")


def _text_decoder_is_tied(state_dict: dict) -> bool:
    """Pretraining checkpoints repeat the shared encoder/decoder tensors under both prefixes."""
    key = "embed.token_embedding.weight"
    encoder, decoder = state_dict.get(f"text_encoder.{key}"), state_dict.get(f"text_decoder.{key}")
    return encoder is not None and decoder is not None and torch.equal(encoder, decoder)


def load_pretrained_blip(model: BLIP, name: str, state_dict: dict, path: convert.PathLike) -> None:
    """Fill `model` (built on the meta device) with the parts a checkpoint (our layout) holds; the parts it lacks
    become None, so that using them fails naming them (a retrieval checkpoint has no decoder, a captioning one no
    text encoder). A checkpoint without `temp` (HuggingFace's) keeps the initial 0.07."""
    def present(part: str) -> bool:
        return any(key == part or key.startswith(part + ".") for key in state_dict)

    if not present("visual_encoder"):
        raise ValueError(f"checkpoint {str(path)!r} holds no BLIP image encoder (keys: {list(state_dict)[:5]}...)")
    if not present("text_decoder"):
        model.text_decoder = model.lm_head = None
    for part in BLIP_PARTS[:-1]:  # all but temp
        if not present(part):
            setattr(model, part, None)
    state_dict.setdefault("temp", torch.tensor(0.07))
    expected = model.state_dict()
    num_patches = expected["visual_encoder.pos_embed"].shape[1] - 1
    state_dict["visual_encoder.pos_embed"] = convert.interpolate_pos_embed(state_dict["visual_encoder.pos_embed"], num_patches)
    problems = convert.describe_mismatch(expected, state_dict)
    if problems:
        raise ValueError(f"checkpoint {str(path)!r} does not fit model {name!r}:\n{problems}")
    model.load_state_dict(state_dict, assign=True)
    model.float()


# ---------------------------------------------------------------- decoder LMs and Flamingo


def create_lm(name: str, pretrained: Optional[convert.PathLike] = None, **overrides) -> Union[DecoderLM, LlamaLM]:
    """A `models.lm.LM_MODELS` preset (MPT; pretrained: a local HuggingFace MPT folder, `load_mpt`) or a LLaMA:
    "llama" with pretrained=FOLDER builds whatever the folder's config.json describes (`models.llama.load_llama`);
    a `models.llama.LLAMA_MODELS` preset is built at random with `overrides`, or from a folder whose config.json
    must describe that preset."""
    if name == "llama" or name in LLAMA_MODELS:
        if pretrained is None:
            if name == "llama":
                raise ValueError("create_lm('llama') takes its architecture from a folder: pass pretrained=FOLDER "
                                 f"(a HuggingFace LLaMA folder), or name a preset: {sorted(LLAMA_MODELS)}")
            return build_llama(name, **overrides)
        if overrides:
            raise ValueError(f"create_lm({name!r}, pretrained=...): the folder's config.json gives the architecture; "
                             f"no overrides ({', '.join(overrides)})")
        if name in LLAMA_MODELS:
            def differences(config, where):
                return llama_preset_differences(name, llama_config_to_kwargs(config, where))

            check_preset_folder(name, pretrained, "LLaMA", "create_lm('llama', pretrained=...)", differences)
        return load_llama(pretrained)
    return load_mpt(pretrained) if pretrained is not None else build_lm(name, **overrides)


def _run_weights(path: convert.PathLike) -> Optional[dict]:
    """The model state dict of a train.py checkpoint, or None if `path` is not one."""
    checkpoint = checkpointing.read_run(os.fspath(path))
    return None if checkpoint is None else checkpoint["model"]


def _flamingo_preset(name: str, image_size: int = 0) -> tuple[str, CLIPConfig, str, dict]:
    """A Flamingo preset's (vision preset name, its CLIP config, LM preset name, `Flamingo` keywords)."""
    preset = dict(FLAMINGO_MODELS[name])
    vision_name, lm_name = preset.pop("vision"), preset.pop("lm")
    vision_layers = preset.pop("vision_layers", None)
    vision_config = MODELS[vision_name]
    if vision_layers:
        vision_config = dataclasses.replace(vision_config, vision_layers=vision_layers)
    if image_size:
        vision_config = dataclasses.replace(vision_config, image_size=image_size)
    return vision_name, vision_config, lm_name, preset


def _clip_tower(name: str, config: CLIPConfig, checkpoint: str = "") -> torch.nn.Module:
    """The image tower of CLIP preset `name` (`config`: its CLIP config, image size included), from a train.py CLIP
    run's checkpoint.pt, an OpenAI/open_clip checkpoint of the preset, or random where `checkpoint` is empty."""
    run = _run_weights(checkpoint) if checkpoint else None
    if checkpoint and run is None:
        return create_model(name, pretrained=checkpoint, image_size=config.image_size).visual
    vision = build_model(config).visual
    if run is not None:
        vision.load_state_dict({key[len("visual."):]: value for key, value in run.items() if key.startswith("visual.")})
    return vision


def _language_model(name: str, tokenizer, context_length: int = 0, checkpoint: str = "",
                    key: str = "lm_checkpoint") -> Union[DecoderLM, LlamaLM]:
    """Language-model preset `name` for a tokenizer's ids: from a HuggingFace folder (MPT, or LLaMA for a LLaMA
    preset), a train.py language-model run's checkpoint.pt (same tokenizer), or random where `checkpoint` is
    empty; `key` names the setting in errors."""
    if checkpoint and os.path.isdir(checkpoint):
        lang_model = create_lm(name, pretrained=checkpoint) if name in LLAMA_MODELS else load_mpt(checkpoint)
    else:
        presets = {**LM_MODELS, **LLAMA_MODELS}
        lang_model = create_lm(name, vocab_size=tokenizer.vocab_size,
                               context_length=context_length or presets[name]["context_length"])
        if checkpoint:
            weights = _run_weights(checkpoint)
            if weights is None:
                raise FileNotFoundError(f"{key}: no train.py checkpoint or HuggingFace folder at '{checkpoint}'")
            problems = convert.describe_mismatch(lang_model.state_dict(), weights)
            if problems:
                raise ValueError(f"{key} '{checkpoint}' does not fit {name} with this tokenizer: "
                                 f"{'; '.join(problems.splitlines())}")
            lang_model.load_state_dict(weights)
    if lang_model.token_embedding.num_embeddings < tokenizer.vocab_size:
        raise ValueError(f"the language model has {lang_model.token_embedding.num_embeddings} token embeddings, the "
                         f"tokenizer {tokenizer.vocab_size} ids")
    return lang_model


def create_flamingo(
    name: str, tokenizer, image_size: int = 0, context_length: int = 0, lm_checkpoint: str = "",
    vision_checkpoint: str = "",
) -> Flamingo:
    """A Flamingo preset for a tokenizer with `media_id` and `eoc_id` (`<image>`, `<|endofchunk|>`).

    lm_checkpoint: a train.py language-model run's checkpoint.pt (same tokenizer) or a HuggingFace MPT folder;
    vision_checkpoint: a train.py CLIP run's checkpoint.pt, or an OpenAI/open_clip checkpoint of the vision preset.
    Either left empty keeps that part's random initialisation (frozen all the same)."""
    vision_name, vision_config, lm_name, preset = _flamingo_preset(name, image_size)
    if tokenizer.media_id is None:
        raise ValueError(f"{name} needs a tokenizer with <image> and <|endofchunk|> (sentencepiece: flamingo_tokens)")
    vision = _clip_tower(vision_name, vision_config, vision_checkpoint)
    lang_model = _language_model(lm_name, tokenizer, context_length, lm_checkpoint, "flamingo.lm_checkpoint")
    return Flamingo(vision, lang_model, tokenizer.media_id, tokenizer.eoc_id, tokenizer.pad_id, **preset)


def create_llava_run(
    name: str, tokenizer, image_size: int = 0, context_length: int = 0, lm_checkpoint: str = "",
    vision_checkpoint: str = "", select: str = "",
) -> LLaVA:
    """A `models.llava.LLAVA_RUN_MODELS` preset for a tokenizer with `<image>` (sentencepiece: flamingo_tokens),
    whose ids the model takes (its image token, end and padding).

    vision_checkpoint: a train.py CLIP run's checkpoint.pt of the tower preset (or an OpenAI/open_clip checkpoint);
    lm_checkpoint: a train.py language-model run's checkpoint.pt (same tokenizer) or a HuggingFace folder; either
    left empty keeps that part random. select: "default" or "full" in place of the preset's feature strategy."""
    preset = dict(LLAVA_RUN_MODELS[name])
    tower_name, lm_name = preset.pop("tower"), preset.pop("lm")
    if tokenizer.media_id is None:
        raise ValueError(f"{name} needs a tokenizer with <image> (sentencepiece: flamingo_tokens)")
    vision_config = MODELS[tower_name]
    if image_size:
        vision_config = dataclasses.replace(vision_config, image_size=image_size)
    vision = _clip_tower(tower_name, vision_config, vision_checkpoint)
    if isinstance(vision, VisionTransformer):
        vision.proj = None  # LLaVA reads the tower's hidden states; CLIP's output projection is not used
    lang_model = _language_model(lm_name, tokenizer, context_length, lm_checkpoint, "llava.lm_checkpoint")
    if select:
        preset["vision_feature_select_strategy"] = select
    return LLaVA(vision, lang_model, tokenizer.media_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, **preset)


# What an OpenFlamingo checkpoint.pt holds (its trainable parts): the resampler, the gated cross-attention blocks and
# the LM's token embedding, resized by OpenFlamingo's factory to its tokenizer (the added tokens' rows trained).
OPEN_FLAMINGO_TRAINED = ("perceiver.", "gated_cross_attn_layers.", "lang_model.token_embedding.")


def _require(path: Optional[convert.PathLike], what: str, folder: bool = False) -> str:
    if not path:
        raise ValueError(f"create_model: no {what} given")
    if not (os.path.isdir(path) if folder else os.path.isfile(path)):
        raise FileNotFoundError(f"{what}: no {'folder' if folder else 'file'} at '{path}'")
    return os.fspath(path)


def create_open_flamingo(
    name: str, pretrained: Optional[convert.PathLike], vision: Optional[convert.PathLike] = None,
    lm: Optional[convert.PathLike] = None, tokenizer=None,
) -> Flamingo:
    """A Flamingo preset with released OpenFlamingo weights, from three local files (no network):

    pretrained: OpenFlamingo's `checkpoint.pt` (e.g. openflamingo/OpenFlamingo-3B-vitl-mpt1b's), which holds only
        the parts OpenFlamingo trained: the resampler, the gated cross-attention blocks and the token embedding
        (any other key, such as a full state dict's frozen parts, is ignored: those come from `vision` and `lm`);
    vision: the checkpoint of the preset's CLIP (OpenAI's `ViT-L-14.pt` or an open_clip file of its weights), whose
        image tower is taken;
    lm: the language model's HuggingFace folder (config.json, pytorch_model.bin or model.safetensors, and
        tokenizer.json), e.g. anas-awadalla/mpt-1b-redpajama-200b, read by `models.lm.load_mpt`;
    tokenizer: the `data.tokenizer` tokenizer whose `<image>`, `<|endofchunk|>` and pad ids the model takes;
        default: `GPTNeoXTokenizer` of lm/tokenizer.json, OpenFlamingo's tokens added as its factory adds them.

    Every part is built on the meta device and takes its file's tensors, so nothing is initialised at random; the
    LM's token embedding is replaced by the checkpoint's (OpenFlamingo resized it to its tokenizer's length, and
    the output matrix is tied to it). A file that is missing, or does not fit the preset, fails naming it.
    The model is returned in eval mode, fp32 (precision comes from autocast)."""
    if pretrained is None:
        raise ValueError(f"create_model({name!r}) loads released OpenFlamingo weights: pass pretrained=checkpoint.pt, "
                         f"vision= and lm=; a randomly initialised Flamingo for training is models.create_flamingo")
    pretrained = _require(pretrained, "pretrained (OpenFlamingo's checkpoint.pt)")
    vision = _require(vision, "vision (the CLIP checkpoint, e.g. OpenAI's ViT-L-14.pt)")
    lm = _require(lm, "lm (the language model's HuggingFace folder, e.g. mpt-1b-redpajama-200b/)", folder=True)
    for file in ("config.json",) + (() if tokenizer is not None else ("tokenizer.json",)):
        _require(os.path.join(lm, file), f"lm/{file}")
    if tokenizer is None:
        from crossmodal.data.tokenizer import GPTNeoXTokenizer  # here: models does not depend on data otherwise

        tokenizer = GPTNeoXTokenizer(os.path.join(lm, "tokenizer.json"))
    lang_model = load_mpt(lm)  # first: a config.json it cannot build is refused before any weights are read
    vision_name, vision_config, _, preset = _flamingo_preset(name)
    with torch.device("meta"):
        clip = build_model(vision_config)
    load_pretrained(clip, vision_name, vision_config, vision)
    state_dict = convert.open_flamingo_to_ours(convert.load_open_flamingo_checkpoint(pretrained))
    trained = {key: value for key, value in state_dict.items() if key.startswith(OPEN_FLAMINGO_TRAINED)}
    embedding = trained.get("lang_model.token_embedding.weight")
    if embedding is not None:
        if embedding.shape[0] != tokenizer.vocab_size:  # the factory resizes the embedding to len(tokenizer)
            raise ValueError(f"{pretrained}: its token embedding has {embedding.shape[0]} rows and the tokenizer "
                             f"{tokenizer.vocab_size} ids; OpenFlamingo's are equal (another tokenizer.json?)")
        lang_model.token_embedding = torch.nn.Embedding(*embedding.shape, device="meta")
    with torch.device("meta"):
        model = Flamingo(clip.visual, lang_model, tokenizer.media_id, tokenizer.eoc_id, tokenizer.pad_id, **preset)
    expected = {key: value for key, value in model.state_dict().items() if key.startswith(OPEN_FLAMINGO_TRAINED)}
    problems = convert.describe_mismatch(expected, trained)
    if problems:
        raise ValueError(f"checkpoint {pretrained!r} does not fit model {name!r} (an OpenFlamingo checkpoint.pt of "
                         f"this preset holds its resampler, cross-attention blocks and token embedding):\n{problems}")
    model.load_state_dict(trained, strict=False, assign=True)
    return model.float().eval()
