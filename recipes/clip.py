"""CLIP and SigLIP (Radford et al., 2021; Zhai et al., 2023): two towers trained with a contrastive loss over the
global batch, and the CLIP paper's predictive baselines on the same towers (models/predictive.py).

loss.name: `clip` (InfoNCE) or `siglip` (sigmoid; the logit scale starts at 10 and the bias at -10), distributed
as local rows against gathered columns; `caption` or `bow` train the predictive baselines instead (the objective
ablation). The temperature is learned as a log-scale parameter and clamped to [0, ln 100] after each optimizer
step, as OpenAI does; model.init_temperature sets its start, train.learn_temperature=false fixes it there.
"""
import importlib.util
import math
import os

import torch

from crossmodal.config import Config
from crossmodal.data.tokenizer import ClipTokenizer
from crossmodal.evaluation import binding, contrastive, probe
from crossmodal.losses import clip_loss, siglip_loss
from crossmodal.models import MODELS, convert_sync_batchnorm, create_model, is_run_checkpoint, load_run_weights
from crossmodal.models.predictive import OBJECTIVES as PREDICTIVE_OBJECTIVES, TextPredictor
from crossmodal.recipes.base import Recipe, check_unused, contrastive_step, mean_step

MAX_LOGIT_SCALE = math.log(100)  # OpenAI clamps the learned log-temperature to [0, ln 100] after each step
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
LOSSES = ("clip", "siglip")


class ClipRecipe(Recipe):
    """Contrastive image-text training of a CLIP preset (ViT or ResNet image tower, causal text tower)."""

    tasks = ("zeroshot", "retrieval", "linear_probe", "binding")

    def inputs(self) -> tuple[int, int]:
        preset = MODELS[self.cfg.model.name]
        return preset.image_size, preset.context_length

    def check(self, world_size: int) -> str | None:
        cfg = self.cfg
        if cfg.loss.name not in (*LOSSES, *PREDICTIVE_OBJECTIVES):
            return f"loss.name must be one of {', '.join((*LOSSES, *PREDICTIVE_OBJECTIVES))}; got '{cfg.loss.name}'"
        if cfg.loss.impl not in ("torch", "fused"):
            return f"loss.impl must be one of torch, fused; got '{cfg.loss.impl}'"
        if cfg.model.vit_stem != "patch" and not getattr(MODELS.get(cfg.model.name), "patch_size", None):
            return (f"model.vit_stem={cfg.model.vit_stem} needs a ViT image tower (a CLIP ViT or a BLIP preset); "
                    f"model.name is '{cfg.model.name}'")
        return check_unused(cfg, "clip") or check_no_decoder_data(cfg)

    def build_model(self, tokenizer, pretrained: bool = True) -> torch.nn.Module:
        cfg = self.cfg
        start = cfg.model.pretrained if pretrained else ""
        run_start = bool(start) and is_run_checkpoint(start)
        extra = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0} if cfg.loss.name == "siglip" else {}
        if cfg.model.init_temperature:
            extra["init_logit_scale"] = math.log(1 / cfg.model.init_temperature)
        model = create_model(
            cfg.model.name, pretrained=None if run_start else start or None, image_size=cfg.data.image_size,
            vocab_size=tokenizer.vocab_size, context_length=tokenizer.context_length, pad_id=tokenizer.pad_id,
            grad_checkpointing=cfg.model.grad_checkpointing, drop_path=cfg.model.drop_path,
            vision_stem=cfg.model.vit_stem, **extra,
        )  # fmt: skip
        model = self.wrap(model, tokenizer)
        if run_start:
            load_run_weights(model, start)
        return convert_sync_batchnorm(model) if cfg.model.sync_bn else model

    def wrap(self, model, tokenizer) -> torch.nn.Module:
        return model

    def prepare(self, model: torch.nn.Module) -> None:
        model.logit_scale.requires_grad_(self.cfg.train.learn_temperature)

    def loss(self, image_features, text_features, logit_scale, logit_bias) -> torch.Tensor:
        if self.cfg.loss.name == "siglip":
            return siglip_loss(image_features, text_features, logit_scale, logit_bias, impl=self.cfg.loss.impl)
        return clip_loss(image_features, text_features, logit_scale, impl=self.cfg.loss.impl)

    def train_step(self, model, micro_batches, step, device, autocast, scaler) -> dict[str, torch.Tensor]:
        def features(batch):
            return model(batch["image"].to(device, non_blocking=True), batch["tokens"].to(device, non_blocking=True))

        return {self.cfg.loss.name: contrastive_step(model, micro_batches, features, self.loss, autocast, scaler)}

    def before_step(self, model, step: int) -> dict[str, float]:
        return {"logit_scale": model.logit_scale.detach().exp().item()}  # what this step's loss multiplies by

    def after_step(self, model) -> None:
        """The clamp after the step, as OpenAI does (a clamp in forward would stop its gradient)."""
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def evaluate(self, model, tokenizer, device, writer=None, step: int = 0) -> dict:
        return contrastive.evaluate_run(self.cfg, model, tokenizer, device)

    def run_task(self, task: str, model, tokenizer, spec: str, args) -> dict:
        return contrastive_task(self.cfg, task, model, tokenizer, spec, args)

    @classmethod
    def load_released(cls, name: str, pretrained: str, bpe: str | None = None, **unused):
        """(config, model, tokenizer): OpenAI's `.pt` files or open_clip checkpoints, with CLIP's BPE (--bpe, else
        the file next to the weights, else the copy an installed open_clip ships)."""
        preset = MODELS[name]
        cfg = Config()
        cfg.model.name = name
        cfg.data.image_size, cfg.data.context_length = preset.image_size, preset.context_length
        cfg.data.tokenizer, cfg.eval.templates = "clip", "imagenet"
        tokenizer = ClipTokenizer(find_bpe(bpe, pretrained), context_length=preset.context_length)
        return cfg, create_model(name, pretrained=pretrained), tokenizer


class PredictiveRecipe(ClipRecipe):
    """The CLIP paper's predictive baselines (loss.name caption or bow): a CLIP preset's image tower predicts its
    caption through the causal text tower, or its bag of words; zero-shot by prompt log-likelihood."""

    tasks = ("zeroshot", "linear_probe")
    sharded = False

    def check(self, world_size: int) -> str | None:
        return super().check(world_size) or (
            f"loss.name={self.cfg.loss.name} trains a CLIP preset's image tower to predict its captions with "
            f"train.strategy=ddp" if self.cfg.train.strategy == "fsdp" else None)

    def wrap(self, model, tokenizer) -> torch.nn.Module:
        return TextPredictor(model.visual, self.cfg.loss.name, tokenizer.vocab_size, tokenizer.pad_id,
                             tokenizer.bos_id, tokenizer.eos_id, text=model.text if self.cfg.loss.name == "caption"
                             else None)

    def prepare(self, model) -> None:
        pass  # no temperature

    def train_step(self, model, micro_batches, step, device, autocast, scaler) -> dict[str, torch.Tensor]:
        def losses(batch):
            return model(batch["image"].to(device, non_blocking=True), batch["tokens"].to(device, non_blocking=True))

        return mean_step(model, micro_batches, losses, autocast, scaler)

    def before_step(self, model, step: int) -> dict[str, float]:
        return {}

    def after_step(self, model) -> None:
        pass


def is_predictive(cfg) -> bool:
    return cfg.loss.name in PREDICTIVE_OBJECTIVES and cfg.model.name in MODELS


def contrastive_task(cfg, task: str, model, tokenizer, spec: str, args) -> dict:
    """eval.py's zeroshot, retrieval, binding and linear_probe for any model with encode_image (and encode_text)."""
    loading = dict(batch_size=args.batch_size, workers=args.workers, options=cfg.data)
    if task == "zeroshot":
        return contrastive.zeroshot(model, tokenizer, spec, cfg.data.image_size, args.device,
                                    args.templates or cfg.eval.templates, args.batch_size, args.classnames,
                                    args.workers, cfg.data)
    if task == "retrieval":
        return contrastive.retrieval(model, tokenizer, spec, cfg.data.image_size, args.device, **loading)
    if task == "binding":  # with BLIP's ITM too where the model has it
        return binding.binding(model, tokenizer, spec, cfg.data.image_size, args.device, **loading,
                               log_every=args.log_every)
    plot_path = os.path.splitext(args.out)[0] + "_confusion.png" if args.out else None
    if not args.data or (args.val is None and args.test is None):
        raise ValueError("--task linear_probe needs --data (the training split) and --val or --test (labelled splits)")
    results = probe.linear_probe(model, tokenizer, spec, args.val, cfg.data.image_size, args.device, cfg.data,
                                 test_spec=args.test, shots=args.shots, seeds=tuple(args.seeds),
                                 batch_size=args.batch_size, workers=args.workers, plot_path=plot_path)
    return results


def check_no_decoder_data(cfg) -> str | None:
    """Image-text families train on captions, not on interleaved sequences or question-only specs."""
    from crossmodal.data import INTERLEAVED

    kind = cfg.data.train.partition(":")[0]
    if kind in INTERLEAVED:
        return (f"model.name={cfg.model.name} with data.train={cfg.data.train}: interleaved specs "
                f"({', '.join(INTERLEAVED)}) are for language models and Flamingo")
    if kind == "vqa":
        return ("data.train: vqa specs hold questions and answers, not captions; CLIP cannot train on them (a BLIP "
                "decoder can: blip.losses=lm, blip.qa_fraction=1)")
    return None


def find_bpe(bpe: str | None, pretrained: str | None) -> str:
    """--bpe, else the vocabulary file next to the weights, else the copy an installed open_clip ships."""
    if bpe:
        if not os.path.isfile(bpe):
            raise FileNotFoundError(f"--bpe: no CLIP BPE vocabulary at '{bpe}'")
        return bpe
    candidates = [os.path.join(os.path.dirname(os.path.abspath(pretrained)), BPE_FILE)] if pretrained else []
    spec = importlib.util.find_spec("open_clip")  # located, not imported
    if spec and spec.submodule_search_locations:
        candidates += [os.path.join(location, BPE_FILE) for location in spec.submodule_search_locations]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"no CLIP BPE vocabulary found (looked for {BPE_FILE} at {candidates or 'nothing'}); "
                            f"pass --bpe PATH/{BPE_FILE} (it ships with openai/CLIP and open_clip)")
