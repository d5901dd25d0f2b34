"""Fine-tuning a CLIP model on a labelled dataset: the strategy logic train.py calls when `finetune.strategy` is set.

    python train.py --config configs/clip/finetune_shapes.yaml --finetune.strategy=llrd
    python train.py --config configs/clip/finetune_shapes.yaml --finetune.strategy=full --finetune.wise_alpha=0.5

The start: `finetune.init`, a train.py checkpoint (a fine-tuning run's too: its CLIP part), whose model and
tokenizer settings the run adopts; or `finetune.pretrained`, released weights for `model.name` (eval.py's loaders): a
file, or a tag of crossmodal.hub.RELEASED (`openai`, `laion2b_s34b_b79k`, ...), downloaded with its BPE vocabulary;
a QuickGELU tag makes model.name its `-quickgelu` preset.

The model (`ZeroShotClassifier`): the CLIP model and a linear head on its normalised image features, initialised as
the zero-shot classifier (WiSE-FT's `ClassificationHead`, Wortsman et al., CVPR 2022): weight = the model's
logit_scale.exp() x the class text embeddings (eval.zeroshot_classifier: per class, the mean of its prompt
templates' embeddings, `eval.templates`), bias 0. At step 0 it predicts exactly what zero-shot classification does.
A checkpoint's `model` is its state dict (`clip.*`, `head.*`); eval.py and search.py read its `clip.*` part.

Strategies, the parameters they train (every other parameter keeps its value bit for bit, and a module whose
parameters are all frozen stays in eval mode, so BatchNorm statistics do not move either):
- linear: the head only (a linear classifier on frozen features, trained by SGD from the zero-shot head);
- full: the image tower and the head;
- gradual: gradual unfreezing (ULMFiT, Howard & Ruder, ACL 2018): the head alone at step 0, then the next layer
  group down every `finetune.unfreeze_every` steps;
- llrd: layer-wise learning-rate decay (BEiT, Bao et al., ICLR 2022; ELECTRA): all of them, layer group l at
  train.lr x layer_decay ** (depth - l), the head being layer `depth`;
- lit: LiT (Zhai et al., CVPR 2022): the image tower locked, the text tower and the temperature trained with the
  run's contrastive loss on image-text pairs (train.py's contrastive step); no head, evaluated zero-shot;
- lora: LoRA (Hu et al., ICLR 2022; models/lora.py): low-rank adapters on the image tower's attention projections
  (finetune.lora_targets; a ViT's qkv and proj, a CLIP ResNet's attention pool, its only linear layers: convolutions
  are not adapted) and the head trained, the rest frozen (finetune.lora_base_dtype=bf16 stores it in bf16).
The classification strategies leave the text tower and the temperature frozen (the head does not use them).
Layer groups, bottom to top: ViT: the embedding (patch_embed, cls_token, pos_embed, norm_pre), each block, the
output (norm, proj), the head; CLIP's ResNet: the stem, layer1 ... layer4, attnpool, the head.

Early stopping: every `train.eval_every` steps the model is evaluated on data.val (top-1: the head's, or zero-shot
for lit); a better top-1 writes out_dir/best.pt (train.py's checkpoint) and best.json; `finetune.patience`
evaluations without one stop the run. At the end the best weights are mixed with the zero-shot (initial) weights,
WiSE-FT: (1 - alpha) x zero-shot + alpha x fine-tuned for every tensor, evaluated on data.val and data.heldout for
each of `finetune.wise_alphas` (wise.json), and at `finetune.wise_alpha`, the run's result (wise.pt when below 1).

LoRA's checkpoints (this strategy, and any family's run from model.pretrained: recipes/lora.py): periodic ones and
best.pt hold the adapted model (base weights plus `*.lora_a`/`*.lora_b`), so `--resume` is exact; at the end
checkpoint.pt is rewritten with the adapters merged into plain weights (its optimizer state emptied, a `lora` entry
marking it) and the adapters alone go to lora.pt (with rank, alpha and targets); WiSE-FT mixes the merged best
weights with the zero-shot ones. `--resume` of that merged checkpoint starts new adapters (B = 0, so exactly at the
merged model) with a fresh optimizer state and goes on to train.steps (ReLoRA's merge-and-restart, Lialin et al.
2023); with train.steps unchanged nothing trains and checkpoint.pt and lora.pt stay as they are. eval.py, search.py
and WiSE-FT read any of these checkpoints as plain weights (`lora_weights` merges unmerged ones).

Deliberate differences from the references: WiSE-FT mixes only the image tower and head (its text tower is
absent); here the whole state dict is mixed, which for the classification strategies is the same (the text tower
is frozen), and for lit mixes the text towers. BatchNorm's running statistics are mixed like weights; its batch
counter is the fine-tuned model's.
"""
import difflib
import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from crossmodal import checkpointing, distributed, files, hub
from crossmodal.config import BadInput, config_from_dict
from crossmodal.data import build_dataset, eval_loader
from crossmodal.data.templates import load_templates
from crossmodal.evaluation import contrastive
from crossmodal.models import MODELS
from crossmodal.models.clip import CLIP
from crossmodal.models.lora import (ADAPTER_KEYS, DEFAULT_TARGETS, add_lora, count_trainable, lora_state_dict,
                                    merge_lora, merge_state_dict, parse_targets)
from crossmodal.models.predictive import OBJECTIVES as PREDICTIVE_OBJECTIVES
from crossmodal.models.vit import VisionTransformer
from crossmodal.recipes import registry
from crossmodal.recipes.base import mean_step
from crossmodal.recipes.clip import ClipRecipe, find_bpe

STRATEGIES = ("linear", "full", "gradual", "llrd", "lit", "lora")
BASE_DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # finetune.lora_base_dtype
ADOPTED = ("model.name", "data.tokenizer", "data.tokenizer_path", "data.vocab_size", "data.context_length")


class ZeroShotClassifier(nn.Module):
    """CLIP with a linear head on its normalised image features, started as the zero-shot classifier."""

    def __init__(self, clip: CLIP, class_embeddings: torch.Tensor):
        super().__init__()
        self.clip = clip
        num_classes, embed_dim = class_embeddings.shape  # (C, D), normalised rows
        self.head = nn.Linear(embed_dim, num_classes)
        with torch.no_grad():
            self.head.weight.copy_(clip.logit_scale.exp() * class_embeddings)
            self.head.bias.zero_()

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale  # train.py logs and clamps the CLIP temperature of every run

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.clip.encode_image(images, normalize=True))  # (B, num_classes)


def wise_ft(zeroshot: dict, finetuned: dict, alpha: float) -> dict:
    """WiSE-FT: (1 - alpha) * zero-shot + alpha * fine-tuned, tensor by tensor (exactly either end at 0 and 1);
    integer buffers (BatchNorm's batch counter) are the fine-tuned model's."""
    return {name: torch.lerp(zeroshot[name].to(value), value, alpha) if value.is_floating_point() else value
            for name, value in finetuned.items()}


def parse_alphas(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


# ---------------------------------------------------------------- configuration and model


def resolve(cfg):
    """A fine-tuning run takes the model and tokenizer settings of its start: finetune.init's config (and its image
    size unless data.image_size is set), or for released weights CLIP's BPE (data.tokenizer_path, else the file
    next to the weights or open_clip's copy)."""
    if not cfg.finetune.strategy:
        return cfg
    if cfg.finetune.init:
        if not os.path.isfile(cfg.finetune.init):
            raise FileNotFoundError(f"finetune.init: no checkpoint at '{cfg.finetune.init}'")
        checkpoint = checkpointing.read_run(cfg.finetune.init)
        if checkpoint is None:
            raise FileNotFoundError(f"finetune.init: '{cfg.finetune.init}' is not a train.py checkpoint")
        start = config_from_dict(checkpoint["config"])
        for key in ADOPTED + (() if cfg.data.image_size else ("data.image_size",)):
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, getattr(getattr(start, section), name))
    elif cfg.finetune.pretrained:
        cfg.data.tokenizer = "clip"
        entry = hub.released(cfg.model.name, cfg.finetune.pretrained)  # a tag (None: a path)
        if entry is not None and entry.quick_gelu and f"{cfg.model.name}-quickgelu" in MODELS:
            # the tag's weights were trained with QuickGELU: the saved config must name the preset they load into
            cfg.model.name += "-quickgelu"
        bpe = hub.resolve_companions(cfg.model.name, cfg.finetune.pretrained, ["bpe"]).get("bpe")
        explicit = cfg.data.tokenizer_path or None
        cfg.data.tokenizer_path = bpe if bpe and not explicit else find_bpe(explicit, cfg.finetune.pretrained)
    return cfg


def check_config(cfg, world_size: int = 1) -> str | None:
    """What is wrong with the finetune section of a config (train.check_config's part), or None."""
    ft = cfg.finetune
    if ft.strategy not in STRATEGIES:
        close = difflib.get_close_matches(ft.strategy, STRATEGIES, n=1)
        return (f"finetune.strategy must be one of {', '.join(STRATEGIES)} (or '' to pre-train); got '{ft.strategy}'"
                + (f"; did you mean '{close[0]}'?" if close else ""))
    if bool(ft.init) == bool(ft.pretrained):
        return ("fine-tuning starts from finetune.init (a train.py checkpoint) or finetune.pretrained (released "
                "weights for model.name): give exactly one")
    if ft.pretrained and not os.path.isfile(ft.pretrained) and hub.released(cfg.model.name, ft.pretrained) is None:
        return f"finetune.pretrained: no file at '{ft.pretrained}' (nor a released tag: crossmodal.hub.RELEASED)"
    if cfg.model.name not in MODELS:
        return f"fine-tuning is built for CLIP models; model.name is '{cfg.model.name}'"
    if cfg.loss.name in PREDICTIVE_OBJECTIVES or cfg.train.strategy == "fsdp":
        return (f"fine-tuning trains a CLIP model with train.strategy=ddp and a contrastive loss.name (clip, siglip); "
                f"got loss.name={cfg.loss.name}, train.strategy={cfg.train.strategy}")
    if ft.unfreeze_every < 1 or not 0 < ft.layer_decay <= 1 or ft.patience < 0 or not 0 <= ft.wise_alpha <= 1:
        return "finetune: unfreeze_every must be >= 1, layer_decay in (0, 1], patience >= 0 and wise_alpha in [0, 1]"
    try:
        alphas = parse_alphas(ft.wise_alphas)
    except ValueError:
        return f"finetune.wise_alphas must be numbers separated by commas, e.g. 0,0.5,1; got '{ft.wise_alphas}'"
    if any(not 0 <= alpha <= 1 for alpha in alphas):
        return f"finetune.wise_alphas must lie in [0, 1]; got '{ft.wise_alphas}'"
    problem = lora_problem(cfg)
    if problem:
        return problem
    if ft.strategy == "gradual" and world_size > 1:
        return ("finetune.strategy=gradual runs on one process: DistributedDataParallel fixes the set of trained "
                "parameters when it wraps the model, and gradual unfreezing changes it")
    if not cfg.data.val:
        return "fine-tuning needs data.val, a labelled split: early stopping and the results are its top-1 accuracy"
    train_classes = getattr(build_dataset(cfg.data.train, cfg.data.image_size, cfg.seed, cfg.data), "classnames", None)
    if ft.strategy != "lit" and train_classes is None:
        return (f"data.train '{cfg.data.train}' has no class labels; fine-tuning a classifier needs a shapes or "
                f"imagefolder spec")
    for key in ("val", "heldout"):
        spec = getattr(cfg.data, key)
        if not spec:
            continue
        classes = getattr(build_dataset(spec, cfg.data.image_size, cfg.seed, cfg.data), "classnames", None)
        if classes is None:
            return f"data.{key} '{spec}' has no class labels; fine-tuning is evaluated by classification accuracy"
        if ft.strategy != "lit" and classes != train_classes:
            return f"data.{key} '{spec}' has other classes than data.train: the head has one output per training class"
    return None


def build(cfg, device) -> tuple[object, nn.Module, dict]:
    """(tokenizer, model, its initial weights on the CPU): the start's CLIP, with the zero-shot head unless lit."""
    if cfg.finetune.init:
        _, clip, tokenizer = registry.load_run(cfg.finetune.init, device)
    else:
        _, clip, tokenizer = registry.load_released(cfg.model.name, cfg.finetune.pretrained, device,
                                                    bpe=cfg.data.tokenizer_path)
    model = clip
    if cfg.finetune.strategy != "lit":
        classnames = build_dataset(cfg.data.train, cfg.data.image_size, cfg.seed, cfg.data).classnames
        class_embeddings = contrastive.zeroshot_classifier(clip, tokenizer, classnames,
                                                          load_templates(cfg.eval.templates), device)  # (C, D)
        model = ZeroShotClassifier(clip, class_embeddings).to(device)
    zeroshot = {name: value.detach().cpu().clone() for name, value in model.state_dict().items()}
    if cfg.finetune.strategy == "lora":  # after the zero-shot weights: WiSE-FT's other end is the plain model
        adapt(model.clip.visual, cfg)
    return tokenizer, model, zeroshot


# ---------------------------------------------------------------- what trains


def layer_groups(model: ZeroShotClassifier) -> list[list[tuple[str, nn.Parameter]]]:
    """The image tower's layer groups and the head, bottom to top, as (name, parameter) lists."""
    visual = model.clip.visual
    if isinstance(visual, VisionTransformer):
        prefixes = [("patch_embed", "cls_token", "pos_embed", "norm_pre"),
                    *[(f"transformer.blocks.{i}",) for i in range(len(visual.transformer.blocks))], ("norm", "proj")]
    else:  # CLIP's ModifiedResNet
        prefixes = [("conv1", "bn1", "conv2", "bn2", "conv3", "bn3"), ("layer1",), ("layer2",), ("layer3",),
                    ("layer4",), ("attnpool",)]
    named = list(visual.named_parameters())
    groups = [[(f"clip.visual.{name}", param) for name, param in named
               if any(name == prefix or name.startswith(prefix + ".") for prefix in group)] for group in prefixes]
    if sum(len(group) for group in groups) != len(named):  # a tower this list does not know
        raise ValueError(f"layer groups cover {sum(map(len, groups))} of the image tower's {len(named)} parameters")
    return groups + [[(f"head.{name}", param) for name, param in model.head.named_parameters()]]


def trainable_layers(model: nn.Module, cfg) -> list[tuple[float, list[tuple[str, nn.Parameter]]]]:
    """Freeze all the strategy never trains; (learning-rate scale, named parameters) per layer group of the rest,
    for train.build_optimizer. Gradual's not-yet-unfrozen groups are in it (train_mode freezes them per step)."""
    model.requires_grad_(False)
    if cfg.finetune.strategy == "lora":  # the image tower's adapters and the head
        layers = [(1.0, [(name, param) for name, param in model.named_parameters()
                         if name.startswith("head.") or name.rpartition(".")[2] in ADAPTER_KEYS])]
    elif cfg.finetune.strategy == "lit":  # the text tower and the temperature (and SigLIP's bias)
        layers = [(1.0, [(name, param) for name, param in model.named_parameters() if not name.startswith("visual.")
                         and (name != "logit_scale" or cfg.train.learn_temperature)])]
    else:
        groups = layer_groups(model)
        groups = groups[-1:] if cfg.finetune.strategy == "linear" else groups
        decay = cfg.finetune.layer_decay if cfg.finetune.strategy == "llrd" else 1.0
        depth = len(groups) - 1
        layers = [(decay ** (depth - layer), group) for layer, group in enumerate(groups)]
    for _, group in layers:
        for _, param in group:
            param.requires_grad_(True)
    return layers


def train_mode(model: nn.Module, cfg, step: int) -> None:
    """Training mode for what trains at `step`: gradual unfreezing's requires_grad, then every module whose
    parameters are all frozen in eval mode (its BatchNorm statistics stay as they are, no dropout)."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    if cfg.finetune.strategy == "gradual":
        unfrozen = 1 + step // cfg.finetune.unfreeze_every  # groups from the top: the head from step 0
        for depth_from_top, group in enumerate(reversed(layer_groups(model))):
            for _, param in group:
                param.requires_grad_(depth_from_top < unfrozen)
    model.train()
    _frozen_to_eval(model)


def _frozen_to_eval(module: nn.Module) -> None:
    params = list(module.parameters())
    if params and not any(param.requires_grad for param in params):
        module.eval()
        return
    for child in module.children():
        _frozen_to_eval(child)


def train_step(model, micro_batches, device, autocast, scaler) -> dict[str, torch.Tensor]:
    """Cross-entropy of the head's logits over one global batch (this process's share), backward included."""
    def losses(batch):
        logits = model(batch["image"].to(device, non_blocking=True))  # (B, num_classes)
        return {"ce": F.cross_entropy(logits, batch["label"].to(device, non_blocking=True))}

    return mean_step(model, micro_batches, losses, autocast, scaler)


# ---------------------------------------------------------------- evaluation, early stopping, WiSE-FT


@torch.no_grad()
def classify(cfg, model: nn.Module, tokenizer, spec: str, device) -> dict:
    """top1/top5 on a labelled spec: the head's predictions, or zero-shot ones for a CLIP model (lit)."""
    size, batch_size = cfg.data.image_size, cfg.eval.batch_size
    if not isinstance(model, ZeroShotClassifier):
        return contrastive.zeroshot(model, tokenizer, spec, size, device, cfg.eval.templates, batch_size,
                                   options=cfg.data)
    _, loader = eval_loader(spec, size, tokenizer, batch_size, options=cfg.data)
    features, labels, bad = contrastive.encode_images(model.clip, loader, device)  # (N, D) normalised
    logits = model.head(features.to(device)).float().cpu()  # (N, num_classes)
    return {**contrastive.accuracy(logits, labels), "num_images": len(labels), "bad_images": bad}


def evaluate(cfg, model: nn.Module, tokenizer, device) -> dict:
    """What train.py reports for a fine-tuning run: classification accuracy on data.val and data.heldout."""
    results = {}
    for split in ("val", "heldout"):
        spec = getattr(cfg.data, split)
        if spec:
            results.update({f"{split}/{name}": value for name, value in classify(cfg, model, tokenizer, spec,
                                                                                  device).items()})
    return results


class EarlyStopping:
    """The best data.val top-1 so far and when it was reached (out_dir/best.json, which a resumed run reads)."""

    def __init__(self, cfg, resumed_step: int | None = None):
        self.path = os.path.join(cfg.out_dir, "best.json")
        self.patience, self.eval_every = cfg.finetune.patience, cfg.train.eval_every
        self.best, self.best_step = -math.inf, 0
        if resumed_step is not None and os.path.exists(self.path):
            try:
                with open(self.path, encoding="utf-8") as f:
                    record = json.load(f)
                step, best = int(record["step"]), float(record["val/top1"])
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise BadInput(f"'{files.shown(self.path)}' is not the record early stopping wrote "
                               f"({checkpointing.first_line(error)}); remove it to start the record again") from None
            if step <= resumed_step:  # not a record from beyond the checkpoint
                self.best, self.best_step = best, step

    def update(self, results: dict, step: int) -> tuple[bool, bool]:
        """(improved, stop) after an evaluation; both False on processes that did not evaluate."""
        if "val/top1" not in results:
            return False, False
        improved = results["val/top1"] > self.best
        if improved:
            self.best, self.best_step = results["val/top1"], step
            files.write_atomic(self.path, json.dumps({"step": step, "val/top1": self.best}))
        waited = (step - self.best_step) // self.eval_every if self.eval_every else 0
        return improved, self.patience > 0 and waited >= self.patience


def finish(cfg, model: nn.Module, zeroshot: dict, tokenizer, device) -> dict:
    """After training (rank 0): best.pt's weights mixed with the zero-shot ones at each of finetune.wise_alphas,
    evaluated (wise.json, a line each), then at finetune.wise_alpha: the run's result (wise.pt when below 1)."""
    best = checkpointing.load_file(os.path.join(cfg.out_dir, "best.pt"))
    if cfg.finetune.strategy == "lora":  # checkpoint.pt merged, lora.pt; then plain weights only
        finish_lora(cfg)
        best = lora_weights(best)
        merge_lora(model)
    alphas = parse_alphas(cfg.finetune.wise_alphas)
    table = {}
    for alpha in [*alphas, *([] if cfg.finetune.wise_alpha in alphas else [cfg.finetune.wise_alpha])]:
        model.load_state_dict(wise_ft(zeroshot, best["model"], alpha))
        model.eval()
        table[alpha] = evaluate(cfg, model, tokenizer, device)
        print(f"WiSE-FT alpha {alpha:g}: " + " ".join(f"{name} {value:.2f}" for name, value in table[alpha].items()
                                                      if name.endswith("top1")), flush=True)
    files.write_atomic(os.path.join(cfg.out_dir, "wise.json"), json.dumps(
        {"best_step": best["step"], "alphas": [{"alpha": alpha, **table[alpha]} for alpha in alphas]}, indent=2))
    alpha = cfg.finetune.wise_alpha
    model.load_state_dict(wise_ft(zeroshot, best["model"], alpha))
    if alpha < 1:
        wise = {key: value for key, value in best.items() if key not in ("optimizer", "scaler")}
        wise |= {"model": model.state_dict(), "wise_alpha": alpha}
        files.write_atomic(os.path.join(cfg.out_dir, "wise.pt"), lambda f: torch.save(wise, f), binary=True)
    return {**table[alpha], "best_step": best["step"], "wise_alpha": alpha,
            **{f"wise/{a:g}/{name}": value for a in alphas for name, value in table[a].items()
               if name.endswith("top1")}}


# ---------------------------------------------------------------- LoRA (this strategy's and recipes/lora.py's)


def lora_problem(cfg) -> str | None:
    """What is wrong with the finetune.lora_* settings of a lora run, or None (their ranges: config.RANGES)."""
    ft = cfg.finetune
    if ft.lora_base_dtype not in BASE_DTYPES:
        return f"finetune.lora_base_dtype must be one of {', '.join(BASE_DTYPES)}; got '{ft.lora_base_dtype}'"
    if ft.lora_heads and (ft.init or ft.pretrained):
        return (f"finetune.lora_heads='{ft.lora_heads}' is for LoRA runs from model.pretrained; the classifier "
                f"(finetune.init, finetune.pretrained) trains its head with the adapters already")
    return None


def adapt(model: nn.Module, cfg) -> nn.Module:
    """add_lora with the run's finetune.lora_* settings (everything else frozen); targets matching no linear layer
    are a BadInput naming finetune.lora_targets."""
    ft = cfg.finetune
    try:
        return add_lora(model, ft.lora_rank, ft.lora_alpha, parse_targets(ft.lora_targets), ft.lora_dropout,
                        BASE_DTYPES[ft.lora_base_dtype])
    except ValueError as error:
        raise BadInput(f"finetune.lora_targets='{ft.lora_targets}': {error}") from None


def report_trainable(model: nn.Module) -> None:
    """One line on rank 0: how much of the model a lora run trains."""
    trainable, total = count_trainable(model)
    if distributed.is_main():
        print(f"lora: {trainable:,} trainable parameters, {100 * trainable / total:.2f}% of the model's {total:,}",
              flush=True)


def lora_weights(checkpoint: dict) -> dict:
    """A checkpoint whose model holds adapters (`*.lora_a`, `*.lora_b`), with them merged into plain weights (its
    config's lora_alpha / lora_rank; fp32, the dtype of train.py's models, for a bf16 base); others as they are."""
    state = checkpoint.get("model", {})
    if not any(name.rpartition(".")[2] in ADAPTER_KEYS for name in state):
        return checkpoint
    ft = checkpoint["config"]["finetune"]
    dtype = torch.float32 if ft.get("lora_base_dtype") == "bf16" else None
    return {**checkpoint, "model": merge_state_dict(state, ft["lora_alpha"] / ft["lora_rank"], dtype)}


def finish_lora(cfg) -> bool:
    """At the end of a lora run (rank 0): out_dir/lora.pt, the adapters of the final checkpoint.pt with their
    settings, then checkpoint.pt rewritten with them merged (its optimizer state emptied: its adapters are gone; a
    `lora` entry marks it). False, writing nothing, when checkpoint.pt is merged already (this run trained no step)."""
    path = os.path.join(cfg.out_dir, checkpointing.FILE)
    last = checkpointing.load_file(path)
    if "lora" in last:
        return False
    ft = cfg.finetune
    settings = {"rank": ft.lora_rank, "alpha": ft.lora_alpha, "dropout": ft.lora_dropout,
                "targets": list(parse_targets(ft.lora_targets) or DEFAULT_TARGETS), "base_dtype": ft.lora_base_dtype,
                "heads": ft.lora_heads}
    adapters = {name: value for name, value in last["model"].items() if name.rpartition(".")[2] in ADAPTER_KEYS}
    record = {"adapters": adapters, "lora": settings, "step": last["step"], "config": last["config"],
              "base": cfg.model.pretrained or cfg.finetune.init or cfg.finetune.pretrained}
    files.write_atomic(os.path.join(cfg.out_dir, "lora.pt"), lambda f: torch.save(record, f), binary=True)
    merged = {**last, "model": lora_weights(last)["model"], "lora": {**settings, "merged": True},
              "optimizer": {"state": {}, "param_groups": last["optimizer"]["param_groups"]}}
    files.write_atomic(path, lambda f: torch.save(merged, f), binary=True)
    return True


def resume_merged(checkpoint: dict | None, model: nn.Module) -> None:
    """Resuming a lora run's merged checkpoint.pt (module docstring): its weights get the adapted model's new
    adapters (B = 0: exactly the merged model), so train.py loads it like any checkpoint; its optimizer state is
    empty. Other checkpoints are left as they are."""
    if checkpoint is None or "lora" not in checkpoint or "folder" in checkpoint:
        return
    checkpoint["model"] = {**checkpoint["model"], **lora_state_dict(model)}
    if distributed.is_main():
        print(f"{files.shown(checkpoint['path'])} holds merged LoRA weights: new adapters train on them from step "
              f"{checkpoint['step']}, with a fresh optimizer state", flush=True)


# ---------------------------------------------------------------- the recipe


class FinetuneRecipe(ClipRecipe):
    """Fine-tuning a CLIP model (finetune.strategy set): the start's weights and tokenizer, a zero-shot head, the
    strategy's layers trained; early stopping on val top-1 and WiSE-FT at the end (module docstring). Its checkpoints
    evaluate as the CLIP they hold (eval.py reads their `clip.*` part)."""

    def adopt(self) -> None:
        resolve(self.cfg)

    def check(self, world_size: int) -> str | None:
        return super().check(world_size) or check_config(self.cfg, world_size)

    def start(self):
        """(tokenizer, model, zero-shot weights) of the start, built once."""
        if not hasattr(self, "_start"):
            self._start = build(self.cfg, "cpu")
        return self._start

    def build_tokenizer(self, out_dir: str, checkpoint: dict | None = None):
        self.resuming = checkpoint
        return self.start()[0]

    def build_model(self, tokenizer, pretrained: bool = True) -> nn.Module:
        """The start's CLIP with its zero-shot head (lit: without), also on resume: its zero-shot weights are
        WiSE-FT's other end."""
        model = self.start()[1]
        if self.cfg.finetune.strategy == "lora":
            resume_merged(getattr(self, "resuming", None), model)
        return model

    def build_eval_model(self, tokenizer) -> nn.Module:
        return super().build_model(tokenizer, pretrained=False)

    def evaluation_weights(self, checkpoint: dict) -> dict:
        checkpoint = lora_weights(checkpoint)  # plain weights (lora)
        if "head.weight" not in checkpoint.get("model", {}):  # lit: a CLIP model already
            return checkpoint
        clip = {name[len("clip."):]: value for name, value in checkpoint["model"].items() if name.startswith("clip.")}
        return {**checkpoint, "model": clip}

    def prepare(self, model: nn.Module) -> None:
        pass  # trainable_layers freezes

    def trainable_layers(self, model: nn.Module) -> list:
        layers = trainable_layers(model, self.cfg)
        if self.cfg.finetune.strategy == "lora":
            report_trainable(model)
        return layers

    def before_step(self, model: nn.Module, step: int) -> dict[str, float]:
        train_mode(model, self.cfg, step)  # what trains at this step; frozen modules in eval mode
        return super().before_step(getattr(model, "module", model), step)

    def train_step(self, model, micro_batches, step, device, autocast, scaler) -> dict:
        if self.cfg.finetune.strategy == "lit":
            return super().train_step(model, micro_batches, step, device, autocast, scaler)
        return train_step(model, micro_batches, device, autocast, scaler)

    def begin(self, step: int, resumed: bool) -> None:
        self.early_stopping = EarlyStopping(self.cfg, step if resumed else None)

    def evaluate(self, model, tokenizer, device, writer=None, step: int = 0) -> dict:
        return evaluate(self.cfg, model, tokenizer, device)

    def after_evaluation(self, results: dict, step: int) -> tuple[str | None, bool]:
        """best.pt when val top-1 improved; stop after finetune.patience evaluations without."""
        improved, stop = self.early_stopping.update(results, step)
        if stop:
            print(f"early stopping at step {step}: no better val top-1 in {self.cfg.finetune.patience} evaluations "
                  f"since step {self.early_stopping.best_step}", flush=True)
        return ("best" if improved else None), stop

    def finish(self, model, tokenizer, device, results: dict) -> dict:
        return finish(self.cfg, model, self.start()[2], tokenizer, device)
