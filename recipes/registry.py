"""The preset registry (every model name -> its family's recipe), the one place that picks a recipe from a config,
the checks every run shares, and loading a model the way eval.py, search.py and fine-tuning need it.

A family registers itself with one line in recipes/__init__.py: `register(ItsRecipe, ITS_PRESETS)`.
"""
import difflib
import os

import torch

from crossmodal import checkpointing, hub
from crossmodal.config import ConfigError, check_values, config_from_dict
from crossmodal.data import build_dataset, map_style_dataset, unreadable_start
from crossmodal.data.tokenizer import TOKENIZERS, tokenizer_from_bytes
from crossmodal.models import BLIP_MODELS, FLAMINGO_MODELS, MODELS
from crossmodal.models.layers import VIT_STEMS
from crossmodal.recipes.base import Recipe

FAMILIES: dict[str, type[Recipe]] = {}  # recipe class name -> class
PRESETS: dict[str, type[Recipe]] = {}  # model name -> the recipe of its family
VARIANTS: list = []  # (predicate on a config, recipe class): a recipe chosen by a config key, not a preset name


def register(recipe: type[Recipe], presets, when=None) -> None:
    """Make `recipe` the family of every name in `presets`; with `when(cfg)`, the recipe of configs it is true for
    (e.g. finetune.strategy set), whatever their model."""
    FAMILIES[recipe.__name__] = recipe
    if when is not None:
        VARIANTS.append((when, recipe))
    for name in presets:
        PRESETS[name] = recipe


def unknown_model(name: str) -> str:
    close = difflib.get_close_matches(name, PRESETS, n=3, cutoff=0.4)
    return f"model.name: unknown model '{name}'; closest presets: {', '.join(close or sorted(PRESETS))}"


def recipe_for(cfg) -> Recipe:
    """The recipe of a run config: a variant whose condition holds, else the family of model.name."""
    for when, recipe in VARIANTS:
        if when(cfg):
            return recipe(cfg)
    if cfg.model.name not in PRESETS:
        raise ConfigError(unknown_model(cfg.model.name))
    return PRESETS[cfg.model.name](cfg)


def resolve(cfg):
    """What the run adopts from its start (the recipe's `adopt`), then data.image_size and data.context_length left
    at 0 take the model preset's (ViT-B-32: 224 and 77), so the saved config says what was used."""
    if cfg.model.name in PRESETS or any(when(cfg) for when, _ in VARIANTS):
        recipe = recipe_for(cfg)
        recipe.adopt()
        image_size, context_length = recipe.inputs()
        cfg.data.image_size = cfg.data.image_size or image_size
        cfg.data.context_length = cfg.data.context_length or context_length
    return cfg


# (key, smallest valid value) once `resolve` has replaced the 0 that means the preset's (config.RANGES: every number)
RESOLVED_MINIMUMS = {"data.image_size": 1, "data.context_length": 2}
RESNET_STRIDE = 32  # models/resnet.py: the image shrinks 32-fold before its attention pool
CHOICES = {"train.precision": ("fp32", "bf16", "fp16"), "train.strategy": ("ddp", "fsdp"),
           "data.tokenizer": tuple(TOKENIZERS)}


def _value(cfg, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def check_config(cfg, world_size: int = 1) -> str | None:
    """What is wrong with the values of a config (its keys and types are checked on loading), or None: the checks
    every run shares, then its recipe's."""
    if cfg.model.name not in PRESETS and not any(when(cfg) for when, _ in VARIANTS):
        return unknown_model(cfg.model.name)
    problem = check_values(cfg)
    if problem:
        return problem
    for key, minimum in RESOLVED_MINIMUMS.items():
        if _value(cfg, key) < minimum:
            return f"{key} must be >= {minimum}; got {_value(cfg, key)}"
    problem = image_size_problem(cfg)
    if problem:
        return problem
    per_step = world_size * cfg.train.accum_steps
    if cfg.train.batch_size % per_step:
        return (f"train.batch_size={cfg.train.batch_size} must divide evenly into {world_size} processes x "
                f"{cfg.train.accum_steps} accumulation steps (train.accum_steps); e.g. "
                f"{per_step * max(1, round(cfg.train.batch_size / per_step))}")
    if cfg.model.vit_stem not in VIT_STEMS:
        return f"model.vit_stem must be one of {', '.join(VIT_STEMS)}; got '{cfg.model.vit_stem}'"
    for key, allowed in CHOICES.items():
        if _value(cfg, key) not in allowed:
            return f"{key} must be one of {', '.join(allowed)}; got '{_value(cfg, key)}'"
    if cfg.model.pretrained and not os.path.exists(cfg.model.pretrained):
        return f"model.pretrained: no file or folder at '{cfg.model.pretrained}'"
    start = checkpointing.read_run(cfg.model.pretrained) if cfg.model.pretrained else None
    if start is not None and "tokenizer" in start and not cfg.data.tokenizer_path:
        kind = start["config"]["data"]["tokenizer"]  # build_tokenizer takes this run's tokenizer
        if kind != cfg.data.tokenizer:
            return (f"model.pretrained '{cfg.model.pretrained}' was trained with data.tokenizer={kind}; this run has "
                    f"data.tokenizer={cfg.data.tokenizer} (name one with data.tokenizer_path, or use {kind})")
    if cfg.train.precision == "fp16" and (cfg.device == "cpu" or not torch.cuda.is_available()):
        return "train.precision=fp16 needs a GPU (its grad scaler); use bf16 on CPU"
    if cfg.data.tokenizer == "clip" and not os.path.isfile(cfg.data.tokenizer_path):
        return (f"data.tokenizer=clip needs data.tokenizer_path, the CLIP vocabulary bpe_simple_vocab_16e6.txt.gz "
                f"(openai/CLIP and open_clip ship it); no file at '{cfg.data.tokenizer_path}'")
    if cfg.data.tokenizer == "bert" and not os.path.isfile(cfg.data.tokenizer_path):
        return (f"data.tokenizer=bert needs data.tokenizer_path, a WordPiece vocab.txt (bert-base-uncased's for "
                f"BLIP's weights); no file at '{cfg.data.tokenizer_path}'")
    recipe = recipe_for(cfg)
    if cfg.data.tokenizer not in recipe.tokenizers:
        return (f"data.tokenizer={cfg.data.tokenizer} does not suit model.name={cfg.model.name}; use one of "
                f"{', '.join(recipe.tokenizers)}")
    if cfg.train.strategy == "fsdp" and (not recipe.sharded or cfg.train.precision == "fp16"):
        return (f"train.strategy=fsdp shards CLIP-family models in fp32 or bf16 (see parallel.py); model.name="
                f"{cfg.model.name} with loss.name={cfg.loss.name}, train.precision={cfg.train.precision}"
                f"{' and finetune.strategy=' + cfg.finetune.strategy if cfg.finetune.strategy else ''} needs "
                f"train.strategy=ddp")
    problem = recipe.check(world_size)
    return problem or _check_data(cfg)


def image_size_problem(cfg) -> str | None:
    """Whether data.image_size suits model.name's image tower (train.py through check_config; eval.py for its
    --data.image_size), or None."""
    tower = image_stride(cfg.model.name)
    if tower and cfg.data.image_size % tower[0]:
        (stride, kind), size = tower, cfg.data.image_size
        return (f"data.image_size={size} does not suit model.name={cfg.model.name}: its image tower takes multiples "
                f"of {stride} ({kind}); e.g. {max(stride, round(size / stride) * stride)}")
    return None


def image_stride(name: str) -> tuple[int, str] | None:
    """(what data.image_size must be a multiple of, why) for the preset `name`: its ViT's patch size or a ResNet's
    total stride; None for a model without an image tower, or a name that is no preset."""
    if name in BLIP_MODELS:
        vision = BLIP_MODELS[name]
        patch_size = None if vision.vision_tower == "resnet" else vision.patch_size
    elif name in MODELS or name in FLAMINGO_MODELS:
        patch_size = MODELS[FLAMINGO_MODELS[name]["vision"] if name in FLAMINGO_MODELS else name].patch_size
    else:
        return None
    return (patch_size, "the patch size") if patch_size else (RESNET_STRIDE, "a ResNet's stride")


def _check_data(cfg) -> str | None:
    """A bad dataset spec, or an evaluation set whose first images cannot be read, fails now, not after training."""
    for key in ("train", "val", "heldout"):
        spec = getattr(cfg.data, key)
        if not spec:
            continue
        try:
            if key == "train":
                build_dataset(spec, cfg.data.image_size, cfg.seed, cfg.data)
                continue
            dataset = map_style_dataset(spec, cfg.data.image_size, cfg.seed, cfg.data)
        except (ValueError, FileNotFoundError) as error:
            return f"data.{key}: {error}"
        failures = unreadable_start(dataset)
        if len(failures) > min(len(dataset), 16) // 2:
            return (f"data.{key}: {len(failures)} of its first {min(len(dataset), 16)} samples cannot be read, "
                    f"e.g. {'; '.join(failures[:3])}")
    return None


def load_run(path: str, device="cpu"):
    """(config, model, tokenizer) from a train.py checkpoint, a file or an FSDP run's folder (whatever number of
    processes wrote it); needs no other file. The model is in eval mode on `device`."""
    if not checkpointing.exists(path):
        raise FileNotFoundError(f"--checkpoint: no file at '{path}', nor a checkpoint folder")
    checkpoint = checkpointing.read(path)
    cfg = config_from_dict(checkpoint["config"])
    tokenizer = tokenizer_from_bytes(cfg.data.tokenizer, checkpoint["tokenizer"], cfg.data.context_length)
    recipe = recipe_for(cfg)
    model = recipe.build_eval_model(tokenizer)  # the checkpoint's weights replace the random ones
    checkpointing.load(recipe.evaluation_weights(checkpoint), model)
    return cfg, model.to(device).eval(), tokenizer


def load_released(name: str, pretrained: str, device="cpu", **files):
    """(config, model, tokenizer) for a preset with released weights; `files`: the other files its family needs
    (bpe=, vocab=, vision=, lm=; see each recipe's `load_released`). pretrained: a path, or a tag of
    `crossmodal.hub.RELEASED` for `name`, downloaded and verified first with the files it comes with (CLIP's BPE,
    OpenFlamingo's CLIP and LM folder) where `files` names none; a tag of QuickGELU weights builds the preset's
    `-quickgelu` twin."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; closest presets: "
                         f"{difflib.get_close_matches(name, PRESETS, n=3, cutoff=0.4) or sorted(PRESETS)}")
    entry = hub.released(name, pretrained)
    if entry is not None:
        path = hub.fetch(entry)
        files.update(hub.resolve_companions(name, pretrained, [key for key in entry.companions if not files.get(key)]))
        if entry.quick_gelu and f"{name}-quickgelu" in PRESETS:
            name = f"{name}-quickgelu"  # the activation the weights were trained with
        pretrained = path
    cfg, model, tokenizer = PRESETS[name].load_released(name, pretrained, **files)
    return cfg, model.to(device).eval(), tokenizer


def family_tasks() -> dict[str, tuple[str, ...]]:
    """Every registered family's eval.py tasks."""
    return {recipe.__name__: recipe.tasks for recipe in FAMILIES.values()}


def model_from_config(cfg, tokenizer, pretrained: bool = True) -> torch.nn.Module:
    """The model a run config describes, for a tokenizer (its recipe's build_model)."""
    return recipe_for(cfg).build_model(tokenizer, pretrained)
