"""The family contract: a `Recipe` owns everything of a run that depends on the model family, so that train.py and
eval.py name none. A family subclasses it and overrides what differs; the defaults are a model that returns its
own named losses, trains every parameter and has no evaluation tasks.

The two step helpers every family's `train_step` is built from:
- `mean_step`: a loss each sample has on its own (no batch negatives), averaged over the micro-batches, with the
  gradients synchronised between processes only on the last one (DDP's no_sync; FSDP's equivalent);
- `contrastive_step`: a loss over the whole global batch (CLIP's, SigLIP's), exact under accumulation: every
  micro-batch's features are computed first without gradient, then each micro-batch is re-run with gradient
  against all the others (open_clip's --accum-freq), so 1 process x 4 accumulation steps trains the same model as
  4 processes.
"""
import contextlib
import os
from typing import Callable

import torch
from torch import nn

from crossmodal import checkpointing, distributed, parallel
from crossmodal.data import captions
from crossmodal.data.tokenizer import (BertTokenizer, ClipTokenizer, SentencePieceTokenizer, tokenizer_from_bytes,
                                       train_sentencepiece)


class Recipe:
    """One model family's part of a run (see the module docstring); `cfg` is the run's config.Config."""

    tasks: tuple[str, ...] = ()  # eval.py --task values this family does
    tokenizers: tuple[str, ...] = ("sentencepiece", "clip", "bert")  # data.tokenizer values it can train with
    sentencepiece_tokens: dict = {}  # special pieces a tokenizer trained for it needs (train_sentencepiece flags)
    sharded: bool = True  # whether train.strategy=fsdp can shard it

    def __init__(self, cfg):
        self.cfg = cfg

    # ------------------------------------------------------------ configuration

    def inputs(self) -> tuple[int, int]:
        """(image size, text context length) of the preset: what data.image_size and data.context_length left at 0
        become."""
        raise NotImplementedError

    def adopt(self) -> None:
        """Settings the run takes from where it starts, before presets fill the rest (fine-tuning: its start's
        model and tokenizer)."""

    def check(self, world_size: int) -> str | None:
        """What is wrong with this family's part of the config, or None (the shared checks run first)."""
        return None

    def plan(self) -> None:
        """Settings derived once the config is checked, before anything is built (saved in the run's config)."""

    # ------------------------------------------------------------ building

    def build_tokenizer(self, out_dir: str, checkpoint: dict | None = None):
        """A resumed run's own tokenizer (the bytes its checkpoint carries). A run that starts from another run's
        checkpoint.pt (model.pretrained) takes that run's tokenizer unless data.tokenizer_path names one: its weights
        are only meaningful with the ids they were trained on. Otherwise data.tokenizer's: CLIP's BPE or BERT's
        WordPiece from data.tokenizer_path, or sentencepiece: the model at data.tokenizer_path, or one trained on
        data.train's captions and kept in out_dir."""
        data = self.cfg.data
        if checkpoint is not None:
            return tokenizer_from_bytes(data.tokenizer, checkpoint["tokenizer"], data.context_length)
        start = checkpointing.read_run(self.cfg.model.pretrained) if self.cfg.model.pretrained else None
        if start is not None and "tokenizer" in start and not data.tokenizer_path:  # a run from another run's checkpoint
            return tokenizer_from_bytes(data.tokenizer, start["tokenizer"], data.context_length)  # kind: checked
        if data.tokenizer == "clip":
            return ClipTokenizer(data.tokenizer_path, context_length=data.context_length)
        if data.tokenizer == "bert":
            return BertTokenizer(data.tokenizer_path, context_length=data.context_length)
        path = data.tokenizer_path or os.path.join(out_dir, "tokenizer.model")
        if not os.path.exists(path):
            if data.tokenizer_path:
                raise FileNotFoundError(f"data.tokenizer_path: no sentencepiece model at '{path}'")
            if distributed.is_main():
                texts = captions(data.train, data.tokenizer_captions, data, self.cfg.seed, **self.caption_options())
                train_sentencepiece(texts, path, data.vocab_size, **self.sentencepiece_tokens)
            distributed.barrier()
        return SentencePieceTokenizer(path, context_length=data.context_length)

    def caption_options(self) -> dict:
        """Keywords for data.captions when a tokenizer is trained for this family (e.g. questions=True)."""
        return {}

    def build_model(self, tokenizer, pretrained: bool = True) -> nn.Module:
        """The model the config describes; with `pretrained`, started from the weights the config names (a new
        run), else at random (a resumed run's or a checkpoint's weights replace them)."""
        raise NotImplementedError

    def build_eval_model(self, tokenizer) -> nn.Module:
        """The model eval.py loads a run's checkpoint into (evaluation_weights picks what it loads)."""
        return self.build_model(tokenizer, pretrained=False)

    def prepare(self, model: nn.Module) -> None:
        """Freezing and locking before the optimizer is built (it skips frozen parameters)."""

    def trainable_layers(self, model: nn.Module) -> list | None:
        """(learning-rate scale, named parameters) per layer group for the optimizer; None: the whole model at 1."""
        return None

    def ddp_options(self) -> dict:
        """Keywords for DistributedDataParallel (e.g. find_unused_parameters)."""
        return {}

    def loader_options(self) -> dict:
        """Keywords for data.train_loader: what the family's batches need beyond images and tokens."""
        return {}

    # ------------------------------------------------------------ training

    def begin(self, step: int, resumed: bool) -> None:
        """Called once before the first step (`step`: where the run starts; `resumed`: from a checkpoint)."""

    def train_step(self, model: nn.Module, micro_batches: list[dict], step: int, device, autocast,
                   scaler) -> dict[str, torch.Tensor]:
        """Forward and backward over one global batch (this process's share); its named losses, detached."""
        def losses(batch):
            return model(*(batch[key].to(device, non_blocking=True) for key in ("image", "tokens")))

        return mean_step(model, micro_batches, losses, autocast, scaler)

    def before_step(self, model: nn.Module, step: int) -> dict[str, float]:
        """Called before each step's forward (e.g. what trains at this step); scalars to log for the step (e.g. the
        logit scale its loss uses)."""
        return {}

    def after_step(self, model: nn.Module) -> None:
        """Called after each optimizer step (e.g. a clamp)."""

    # ------------------------------------------------------------ evaluation

    def evaluate(self, model: nn.Module, tokenizer, device, writer=None, step: int = 0) -> dict:
        """What a run reports on data.val and data.heldout (rank 0, the model in eval mode); `writer`, a TensorBoard
        SummaryWriter, for anything beyond the scalars."""
        return {}

    def after_evaluation(self, results: dict, step: int) -> tuple[str | None, bool]:
        """(name of a checkpoint to save now, e.g. 'best', or None; whether to stop the run) on every process
        after an evaluation (`results` is empty where the process did not evaluate)."""
        return None, False

    def finish(self, model: nn.Module, tokenizer, device, results: dict) -> dict:
        """The run's final results, on rank 0 after the last evaluation (e.g. WiSE-FT)."""
        return results

    def evaluation_weights(self, checkpoint: dict) -> dict:
        """The part of a run's checkpoint that its evaluation model (build_model) loads."""
        return checkpoint

    @classmethod
    def load_released(cls, name: str, pretrained: str, **files):
        """(config, model, tokenizer) for `name` with released weights."""
        raise ValueError(f"{name}: this family has no loader for released weights")

    def run_task(self, task: str, model: nn.Module, tokenizer, spec: str, args) -> dict:
        """eval.py's --task on a dataset spec; `args`: eval.py's options. Only tasks in `self.tasks` reach here."""
        raise NotImplementedError(task)

    def check_task(self, task: str, model: nn.Module) -> str | None:
        """Why this model cannot do `task` although the family can (e.g. a released checkpoint without the part
        it needs), or None."""
        return None


def check_unused(cfg, own: str) -> str | None:
    """A config that sets another family's keys is a mistake, not something to ignore; `own`: the caller's family
    (clip, blip, lm, llava)."""
    blip_keys = ("itm_uniform", "qa_fraction", "prompt", "lock_vision")
    if own != "blip" and any(getattr(cfg.blip, key) for key in blip_keys):
        return (f"{', '.join('blip.' + key for key in blip_keys)} are BLIP settings; model.name is "
                f"'{cfg.model.name}'")
    if own != "clip" and cfg.loss.name in ("caption", "bow"):
        return (f"loss.name={cfg.loss.name} trains a CLIP preset's image tower to predict its captions (the objective "
                f"ablation's baseline); model.name is '{cfg.model.name}'")
    if own != "llava" and (cfg.llava.lm_checkpoint or cfg.llava.qa_fraction or cfg.llava.train != "projector"):
        return (f"llava.lm_checkpoint, llava.qa_fraction and llava.train are LLaVA settings; model.name is "
                f"'{cfg.model.name}'")
    if own != "lm" and cfg.lm.induction_fraction:
        return (f"lm.induction_fraction must lie in [0, 1) and is for language models on map-style interleaved specs "
                f"(shapes_icl, interleaved); got {cfg.lm.induction_fraction} with model.name '{cfg.model.name}' and "
                f"data.train '{cfg.data.train}'")
    return None


def mean_step(model: nn.Module, micro_batches: list[dict], losses: Callable[[dict], dict], autocast,
              scaler) -> dict[str, torch.Tensor]:
    """Named losses of each micro-batch (`losses(batch)`), each averaged over the micro-batches, backward included;
    gradients are synchronised between processes on the last micro-batch only."""
    totals, last = {}, len(micro_batches) - 1
    for i, batch in enumerate(micro_batches):
        with parallel.gradient_sync(model, i == last), autocast:
            named = losses(batch)
            scaler.scale(sum(named.values()) / len(micro_batches)).backward()
        for name, value in named.items():
            totals[name] = totals.get(name, 0.0) + value.detach() / len(micro_batches)
    return totals


def contrastive_step(model: nn.Module, micro_batches: list[dict], features: Callable[[dict], dict],
                     loss: Callable[..., torch.Tensor], autocast, scaler) -> torch.Tensor:
    """A loss over the whole global batch, exact under accumulation (module docstring). features(batch) -> dict of
    image_features, text_features, logit_scale, logit_bias; loss(images, texts, scale, bias) -> the loss."""
    if len(micro_batches) == 1:
        with autocast:
            out = features(micro_batches[0])
            value = loss(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"])
        scaler.scale(value).backward()
        return value.detach()
    with torch.no_grad(), autocast, running_stats_kept(model):
        cached = [features(batch) for batch in micro_batches]
    last = len(micro_batches) - 1
    for i, batch in enumerate(micro_batches):
        with parallel.gradient_sync(model, i == last), autocast:
            out = features(batch)
            images = torch.cat([out["image_features"] if j == i else c["image_features"] for j, c in enumerate(cached)])
            texts = torch.cat([out["text_features"] if j == i else c["text_features"] for j, c in enumerate(cached)])
            # the logit scale and bias enter the loss once, through the last (synchronising) micro-batch
            scale, bias = out["logit_scale"], out["logit_bias"]
            if i < last:
                scale, bias = scale.detach(), bias.detach() if bias is not None else None
            value = loss(images, texts, scale, bias)
            scaler.scale(value).backward()
    return value.detach()


@contextlib.contextmanager
def running_stats_kept(model: nn.Module):
    """BatchNorm running statistics as they were before the block: exact accumulation's gradient-free caching pass
    re-runs every micro-batch, and must not count it twice in the running averages."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [{name: buffer.clone() for name, buffer in m.named_buffers()} for m in norms]
    try:
        yield
    finally:
        for module, buffers in zip(norms, saved):
            for name, buffer in buffers.items():
                getattr(module, name).copy_(buffer)
