"""Train a contrastive image-text model (CLIP or SigLIP) on one process or many.

    python train.py --config configs/clip/tiny_shapes.yaml
    torchrun --nproc_per_node 2 train.py --config configs/clip/tiny_shapes.yaml --train.lr=1e-3
    torchrun --nproc_per_node 2 train.py --config configs/clip/tiny_shapes.yaml --resume
    torchrun --nproc_per_node 2 --max-restarts 3 train.py --config ... --train.strategy=fsdp --resume auto

`train.batch_size` is the global batch. The global batch at step s is the same samples whatever the
number of processes and accumulation steps (see data/__init__.py), and gradient accumulation caches
every micro-batch's features first (as open_clip's --accum-freq), so the contrastive loss is always
taken over the whole global batch: 1 process x 4 accumulation steps trains the same model as 4
processes, up to floating-point summation order.
"""
import argparse
import contextlib
import dataclasses
import difflib
import json
import math
import os
import signal
import sys
import time
import zlib

import torch
from torch.nn.parallel import DistributedDataParallel

import checkpointing
import distributed
import finetune
import parallel
from config import ConfigError, apply_overrides, config_from_dict, differences, load_config, save_config
from data import (INTERLEAVED, build_dataset, captions, map_style_dataset, shutdown_workers, skipped_rows, train_loader,
                  unreadable_start)
from data.bad_samples import BadSampleCount
from data.tokenizer import (PAD_ID, TOKENIZERS, BertTokenizer, ClipTokenizer, SentencePieceTokenizer, tokenizer_from_bytes,
                            train_sentencepiece)
from losses import clip_loss, lm_labels, lm_loss, siglip_loss
from models import (BLIP_MODELS, FLAMINGO_MODELS, LM_MODELS, MODELS, PREDICTIVE_OBJECTIVES, is_run_checkpoint,
                    model_from_config, model_inputs)
from models.blip import OBJECTIVES as BLIP_OBJECTIVES
from models.flamingo import freeze_for_training
from models.layers import VIT_STEMS

ALL_MODELS = {**MODELS, **BLIP_MODELS, **LM_MODELS, **FLAMINGO_MODELS}

MAX_LOGIT_SCALE = math.log(100)  # OpenAI clamps the learned log-temperature to [0, ln 100] after each step


def build_tokenizer(cfg, out_dir: str, checkpoint: dict | None = None) -> SentencePieceTokenizer | ClipTokenizer:
    """A resumed run's own tokenizer (the bytes its checkpoint carries). Otherwise data.tokenizer=clip: CLIP's
    byte-level BPE from data.tokenizer_path (bpe_simple_vocab_16e6.txt.gz); sentencepiece: the model at
    data.tokenizer_path, or one trained on data.train captions and kept in out_dir. A run that starts from another
    run's checkpoint.pt (model.pretrained) takes that run's tokenizer unless data.tokenizer_path names one: its
    weights are only meaningful with the ids they were trained on."""
    if checkpoint is not None:
        return tokenizer_from_bytes(cfg.data.tokenizer, checkpoint["tokenizer"], cfg.data.context_length)
    if cfg.model.pretrained and not cfg.data.tokenizer_path and is_run_checkpoint(cfg.model.pretrained):
        start = torch.load(cfg.model.pretrained, map_location="cpu", weights_only=True, mmap=True)
        return tokenizer_from_bytes(cfg.data.tokenizer, start["tokenizer"], cfg.data.context_length)  # kind: check_config
    if cfg.data.tokenizer == "clip":
        return ClipTokenizer(cfg.data.tokenizer_path, context_length=cfg.data.context_length)
    if cfg.data.tokenizer == "bert":
        return BertTokenizer(cfg.data.tokenizer_path, context_length=cfg.data.context_length)
    path = cfg.data.tokenizer_path or os.path.join(out_dir, "tokenizer.model")
    if not os.path.exists(path):
        if cfg.data.tokenizer_path:
            raise FileNotFoundError(f"data.tokenizer_path: no sentencepiece model at '{path}'")
        if distributed.is_main():
            texts = captions(cfg.data.train, cfg.data.tokenizer_captions, cfg.data, cfg.seed,
                             questions=is_blip(cfg) and cfg.model.blip_qa_fraction > 0)  # BLIP's VQA rows too
            train_sentencepiece(texts, path, cfg.data.vocab_size, blip_tokens=is_blip(cfg),  # BLIP: [DEC], [ENC]
                                flamingo_tokens=is_decoder(cfg))  # <image>, <|endofchunk|>
        distributed.barrier()
    return SentencePieceTokenizer(path, context_length=cfg.data.context_length)


def is_blip(cfg) -> bool:
    return cfg.model.name in BLIP_MODELS


def is_decoder(cfg) -> bool:
    """A language model or a Flamingo: next-token prediction on interleaved specs (no temperature, no contrast)."""
    return cfg.model.name in LM_MODELS or cfg.model.name in FLAMINGO_MODELS


def has_temperature(cfg) -> bool:
    """A contrastive model (CLIP, SigLIP, BLIP's ITC): a language model, a Flamingo and the predictive baselines
    (loss.name caption or bow) have none."""
    return not is_decoder(cfg) and cfg.loss.name not in PREDICTIVE_OBJECTIVES


def resolve_presets(cfg):
    """data.image_size and data.context_length left at 0 take the model preset's (ViT-B-32: 224 and 77), so
    the saved config says what was used."""
    if cfg.model.name in ALL_MODELS:
        image_size, context_length = model_inputs(cfg.model.name)
        cfg.data.image_size = cfg.data.image_size or image_size
        cfg.data.context_length = cfg.data.context_length or context_length
    return cfg


def param_groups(model: torch.nn.Module, weight_decay: float, layers: list | None = None) -> list[dict]:
    """Weight decay on matrices only: not on norms, biases, embeddings or the logit scale and bias. layers:
    (learning-rate scale, named parameters) per layer (fine-tuning's, finetune.trainable_layers); default: the
    whole model at scale 1. The training loop sets each group's lr to the schedule's times its `lr_scale`."""
    no_decay_names = ("token_embedding", "pos_embed", "cls_token", "logit_scale", "logit_bias")
    groups = []
    for lr_scale, named in layers or [(1.0, model.named_parameters())]:
        decay, no_decay = [], []
        for name, param in named:
            if not param.requires_grad:
                continue
            skip = param.ndim < 2 or any(part in name for part in no_decay_names)
            (no_decay if skip else decay).append(param)
        groups += [{"params": params, "weight_decay": decay_rate, "lr_scale": lr_scale}
                   for params, decay_rate in ((decay, weight_decay), (no_decay, 0.0))]
    return groups


def build_optimizer(model: torch.nn.Module, train_cfg, layers: list | None = None) -> torch.optim.AdamW:
    """AdamW over `param_groups`, fused: one kernel for all parameters instead of a loop over them (on a
    2-core CPU, 155 ms instead of 592 ms a step for ViT-B-32's 151M parameters)."""
    return torch.optim.AdamW(
        param_groups(model, train_cfg.weight_decay, layers), lr=train_cfg.lr,
        betas=(train_cfg.beta1, train_cfg.beta2), eps=train_cfg.eps, fused=True,
    )


def learning_rate(step: int, train_cfg) -> float:
    """Linear warmup, then cosine decay from train.lr to train.min_lr at train.steps."""
    if step < train_cfg.warmup_steps:
        return train_cfg.lr * (step + 1) / train_cfg.warmup_steps
    progress = (step - train_cfg.warmup_steps) / max(1, train_cfg.steps - train_cfg.warmup_steps)
    return train_cfg.min_lr + 0.5 * (train_cfg.lr - train_cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


@contextlib.contextmanager
def running_stats_kept(model: torch.nn.Module):
    """BatchNorm running statistics as they were before the block: exact accumulation's gradient-free
    caching pass re-runs every micro-batch, and must not count it twice in the running averages."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [{name: buffer.clone() for name, buffer in m.named_buffers()} for m in norms]
    try:
        yield
    finally:
        for module, buffers in zip(norms, saved):
            for name, buffer in buffers.items():
                getattr(module, name).copy_(buffer)


def temperature_parameter(model: torch.nn.Module) -> torch.nn.Parameter:
    """CLIP's log-scale `logit_scale`, or BLIP's `temp` (the temperature itself)."""
    return model.temp if hasattr(model, "temp") else model.logit_scale


def logit_multiplier(model: torch.nn.Module) -> torch.Tensor:
    """1 / temperature: what the contrastive loss multiplies cosine similarities by."""
    return 1 / model.temp.detach().clamp(0.001, 0.5) if hasattr(model, "temp") else model.logit_scale.detach().exp()


def compute_loss(cfg, image_features, text_features, logit_scale, logit_bias) -> torch.Tensor:
    if cfg.loss.name == "siglip":
        return siglip_loss(image_features, text_features, logit_scale, logit_bias)
    return clip_loss(image_features, text_features, logit_scale, impl=cfg.loss.impl)


def train_step(cfg, model, micro_batches, device, autocast, scaler, step: int = 0) -> dict[str, torch.Tensor]:
    """Forward and backward over one global batch (this process's share); returns its named losses (local,
    detached; train.py logs each and their sum). A model family turns a batch into its losses: CLIP one
    contrastive loss (`clip` or `siglip`), BLIP `itc`, `itm` and `lm`, a language model or Flamingo `lm`, a fine-tuned
    classifier `ce` (finetune.py; LiT trains CLIP's contrastive loss with the image tower locked), the predictive
    baselines `caption` or `bow` (models/predictive.py)."""
    if cfg.finetune.strategy:
        finetune.train_mode(model, cfg, step)  # what trains at this step; frozen modules in eval mode
        if cfg.finetune.strategy != "lit":
            return finetune.train_step(model, micro_batches, device, autocast, scaler)
    if is_decoder(cfg) or cfg.loss.name in PREDICTIVE_OBJECTIVES:
        return own_loss_step(model, micro_batches, device, autocast, scaler)
    if not is_blip(cfg):
        return {cfg.loss.name: contrastive_step(cfg, model, micro_batches, device, autocast, scaler)}
    (batch,) = micro_batches  # check_config: BLIP trains without accumulation
    decoder = {}  # model.blip_qa_fraction or blip_prompt: the decoder's own rows (data.Collate)
    if "decoder_tokens" in batch:
        decoder = {"decoder_tokens": batch["decoder_tokens"].to(device), "prompt_length": batch["prompt_lengths"]}
    tokens = batch["tokens"].to(device, non_blocking=True) if "tokens" in batch else None  # vqa: questions only
    with autocast:
        losses = model(batch["image"].to(device, non_blocking=True), tokens,
                       image_ids=image_ids(batch["key"]).to(device), alpha=blip_alpha(cfg, step),
                       itm_uniform=cfg.model.blip_itm_uniform * max(0.0, 1 - step / cfg.train.steps), **decoder)
    scaler.scale(sum(losses.values())).backward()
    return {name: value.detach() for name, value in losses.items()}


def own_loss_step(model, micro_batches, device, autocast, scaler) -> dict[str, torch.Tensor]:
    """A loss each sample has on its own (no batch negatives), averaged over micro-batches: a Flamingo's next-token
    loss (images and text), a language model's on the text (pads left out), a predictive baseline's."""
    totals = {}
    for i, batch in enumerate(micro_batches):
        tokens = batch["tokens"].to(device, non_blocking=True)
        images = batch.get("images", batch.get("image"))  # interleaved sequences' images, or one per caption
        with parallel.gradient_sync(model, i == len(micro_batches) - 1), autocast:
            if images is not None:
                losses = model(images.to(device, non_blocking=True), tokens)
            else:
                labels = lm_labels(tokens, PAD_ID, batch.get("prompt_lengths", 0))  # induction rows: the repeat only
                losses = {"lm": lm_loss(model(tokens), labels, label_smoothing=0.0)}
            scaler.scale(sum(losses.values()) / len(micro_batches)).backward()
        for name, value in losses.items():
            totals[name] = totals.get(name, 0.0) + value.detach() / len(micro_batches)
    return totals


def image_ids(keys: list[str]) -> torch.Tensor:
    """An id per sample's image (its path; a shapes index): BLIP counts every caption of an image as a positive."""
    return torch.tensor([zlib.crc32(key.encode()) & 0x7FFFFFFF for key in keys])


def blip_alpha(cfg, step: int) -> float:
    """BLIP's momentum-distillation weight, ramped linearly from 0 over model.blip_alpha_steps."""
    return cfg.model.blip_alpha * min(1.0, step / max(1, cfg.model.blip_alpha_steps))


def contrastive_step(cfg, model, micro_batches, device, autocast, scaler) -> torch.Tensor:
    """The contrastive loss over the global batch, exactly also under accumulation (see below)."""
    def forward(batch):
        return model(batch["image"].to(device, non_blocking=True), batch["tokens"].to(device, non_blocking=True))

    if len(micro_batches) == 1:
        with autocast:
            out = forward(micro_batches[0])
            loss = compute_loss(cfg, out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"])
        scaler.scale(loss).backward()
        return loss.detach()
    # Exact accumulation: the loss needs every micro-batch's features as negatives. Cache them without
    # gradient, then re-run each micro-batch with gradient, splicing its live features into the cache.
    with torch.no_grad(), autocast, running_stats_kept(model):
        cached = [forward(batch) for batch in micro_batches]
    last = len(micro_batches) - 1
    for i, batch in enumerate(micro_batches):
        with parallel.gradient_sync(model, i == last), autocast:
            out = forward(batch)
            images = torch.cat([out["image_features"] if j == i else c["image_features"] for j, c in enumerate(cached)])
            texts = torch.cat([out["text_features"] if j == i else c["text_features"] for j, c in enumerate(cached)])
            # the logit scale and bias enter the loss once, through the last (synchronising) micro-batch
            scale, bias = out["logit_scale"], out["logit_bias"]
            if i < last:
                scale, bias = scale.detach(), bias.detach() if bias is not None else None
            loss = compute_loss(cfg, images, texts, scale, bias)
            scaler.scale(loss).backward()
    return loss.detach()


# (key, smallest valid value): counts and intervals that must be positive or at least non-negative
MINIMUMS = {
    "train.steps": 1, "train.batch_size": 1, "train.accum_steps": 1, "train.log_every": 1, "train.ckpt_every": 1,
    "train.eval_every": 0, "train.warmup_steps": 0, "train.lr": 0.0, "train.min_lr": 0.0, "train.weight_decay": 0.0,
    "train.grad_clip": 0.0, "model.init_temperature": 0.0, "data.workers": 0, "data.image_size": 1, "data.context_length": 2, "data.vocab_size": 8,
    "data.tokenizer_captions": 1, "data.shuffle_buffer": 1, "data.max_bad_fraction": 0.0, "model.drop_path": 0.0,
    "model.blip_text_drop": 0.0,
    "eval.batch_size": 1,
}


def check_config(cfg, world_size: int = 1) -> str | None:
    """What is wrong with the values of a config (its keys and types are checked on loading), or None."""
    if cfg.model.name not in ALL_MODELS:
        close = difflib.get_close_matches(cfg.model.name, ALL_MODELS, n=3, cutoff=0.4)
        return f"model.name: unknown model '{cfg.model.name}'; closest presets: {', '.join(close or sorted(ALL_MODELS))}"
    for key, minimum in MINIMUMS.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value < minimum or (key == "train.lr" and value == 0):
            return f"{key} must be {'>' if key == 'train.lr' else '>='} {minimum}; got {value}"
    if cfg.data.max_bad_fraction > 1 or cfg.model.drop_path >= 1 or cfg.model.blip_text_drop >= 1:
        return "data.max_bad_fraction must be at most 1, and model.drop_path and model.blip_text_drop below 1"
    per_step = world_size * cfg.train.accum_steps
    if cfg.train.batch_size % per_step:
        return (f"train.batch_size={cfg.train.batch_size} must divide evenly into {world_size} processes x "
                f"{cfg.train.accum_steps} accumulation steps (train.accum_steps); e.g. {per_step * max(1, round(cfg.train.batch_size / per_step))}")
    if cfg.model.vit_stem not in VIT_STEMS:
        return f"model.vit_stem must be one of {', '.join(VIT_STEMS)}; got '{cfg.model.vit_stem}'"
    if cfg.model.vit_stem != "patch" and not (is_blip(cfg) or getattr(MODELS.get(cfg.model.name), "patch_size", None)):
        return f"model.vit_stem={cfg.model.vit_stem} needs a ViT image tower (a CLIP ViT or a BLIP preset); model.name is '{cfg.model.name}'"
    if is_blip(cfg):
        if cfg.train.accum_steps != 1:
            return ("train.accum_steps must be 1 for BLIP: every forward updates the momentum encoders and the "
                    "feature queue, so micro-batches cannot be cached and re-run as CLIP's exact accumulation does")
        if cfg.data.tokenizer == "clip":
            return "data.tokenizer=clip has no [DEC] and [ENC] tokens for BLIP; use bert or sentencepiece"
        for key in ("blip_itm_uniform", "blip_qa_fraction", "blip_momentum"):
            if not 0 <= getattr(cfg.model, key) <= 1:
                return f"model.{key} must lie in [0, 1]; got {getattr(cfg.model, key)}"
        if cfg.model.blip_qa_fraction and not cfg.data.train.startswith(("shapes:", "vqa:")):
            return (f"model.blip_qa_fraction needs training data with questions and answers (shapes, vqa); "
                    f"data.train is '{cfg.data.train}'")
        objectives = cfg.model.blip_losses.split(",")
        if not objectives or not set(objectives) <= set(BLIP_OBJECTIVES) or len(set(objectives)) < len(objectives):
            return f"model.blip_losses must list some of {','.join(BLIP_OBJECTIVES)}, comma-separated; got '{cfg.model.blip_losses}'"
        if "itm" in objectives and "itc" not in objectives:
            return "model.blip_losses: itm samples its hard negatives from ITC's similarities; add itc"
        preset_queue = BLIP_MODELS[cfg.model.name].queue_size
        queue = preset_queue if cfg.model.blip_queue_size == -1 else cfg.model.blip_queue_size
        if "itc" in objectives and (cfg.model.blip_queue_size < -1 or queue % cfg.train.batch_size):
            return (f"model.blip_queue_size must be 0 (no queue), a multiple of the global batch "
                    f"train.batch_size={cfg.train.batch_size}, or -1 (the preset's {preset_queue}); "
                    f"got {cfg.model.blip_queue_size}")
        if cfg.data.train.startswith("vqa:") and (cfg.model.blip_qa_fraction != 1 or objectives != ["lm"]):
            return ("data.train: a vqa spec holds questions without captions: train it with model.blip_losses=lm "
                    "and model.blip_qa_fraction=1 (the decoder learns the answers)")
        if cfg.model.vision_checkpoint and not is_run_checkpoint(cfg.model.vision_checkpoint):
            return (f"model.vision_checkpoint: no train.py checkpoint at '{cfg.model.vision_checkpoint}' (a BLIP's image "
                    f"tower starts from a CLIP run of the same tower; for BLIP-RN-tiny run configs/clip/tiny_shapes.yaml first)")
    elif cfg.model.blip_itm_uniform or cfg.model.blip_qa_fraction or cfg.model.blip_prompt or cfg.model.blip_lock_vision:
        return (f"model.blip_itm_uniform, model.blip_qa_fraction, model.blip_prompt and model.blip_lock_vision are "
                f"BLIP settings; model.name is '{cfg.model.name}'")
    if cfg.data.train.startswith("vqa:") and not is_blip(cfg):
        return ("data.train: vqa specs hold questions and answers, not captions; CLIP cannot train on them (a BLIP "
                "decoder can: model.blip_losses=lm, model.blip_qa_fraction=1)")
    if cfg.model.pretrained and not os.path.exists(cfg.model.pretrained):
        return f"model.pretrained: no file or folder at '{cfg.model.pretrained}'"
    if cfg.model.pretrained and not cfg.data.tokenizer_path and is_run_checkpoint(cfg.model.pretrained):
        start = torch.load(cfg.model.pretrained, map_location="cpu", weights_only=True, mmap=True)
        kind = start["config"]["data"]["tokenizer"]  # build_tokenizer takes this run's tokenizer
        if kind != cfg.data.tokenizer:
            return (f"model.pretrained '{cfg.model.pretrained}' was trained with data.tokenizer={kind}; this run has "
                    f"data.tokenizer={cfg.data.tokenizer} (name one with data.tokenizer_path, or use {kind})")
    if cfg.model.pretrained and cfg.model.name in FLAMINGO_MODELS and not is_run_checkpoint(cfg.model.pretrained):
        return (f"model.pretrained '{cfg.model.pretrained}': a Flamingo run starts from another run's checkpoint.pt "
                f"(its frozen parts come from model.lm_checkpoint and model.vision_checkpoint)")
    if cfg.data.induction_fraction and (cfg.model.name not in LM_MODELS or not 0 < cfg.data.induction_fraction < 1
                                        or cfg.data.train.startswith("interleaved_wds:")):
        return (f"data.induction_fraction must lie in [0, 1) and is for language models on map-style interleaved specs "
                f"(shapes_icl, interleaved); got {cfg.data.induction_fraction} with model.name '{cfg.model.name}' and "
                f"data.train '{cfg.data.train}'")
    if is_decoder(cfg) != (cfg.data.train.partition(":")[0] in INTERLEAVED) or (
            is_decoder(cfg) and cfg.data.tokenizer != "sentencepiece"):
        return (f"model.name={cfg.model.name} with data.train={cfg.data.train}: language models and Flamingo train on "
                f"interleaved specs ({', '.join(INTERLEAVED)}) with data.tokenizer=sentencepiece, other models not")
    choices = {"train.precision": ("fp32", "bf16", "fp16"), "train.strategy": ("ddp", "fsdp"),
               "loss.name": ("clip", "siglip", *PREDICTIVE_OBJECTIVES), "loss.impl": ("torch", "fused"),
               "data.tokenizer": tuple(TOKENIZERS)}
    for key, allowed in choices.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            return f"{key} must be one of {', '.join(allowed)}; got '{value}'"
    if cfg.data.tokenizer == "clip" and not os.path.isfile(cfg.data.tokenizer_path):
        return (f"data.tokenizer=clip needs data.tokenizer_path, the CLIP vocabulary bpe_simple_vocab_16e6.txt.gz "
                f"(openai/CLIP and open_clip ship it); no file at '{cfg.data.tokenizer_path}'")
    if cfg.data.tokenizer == "bert" and not os.path.isfile(cfg.data.tokenizer_path):
        return (f"data.tokenizer=bert needs data.tokenizer_path, a WordPiece vocab.txt (bert-base-uncased's for "
                f"BLIP's weights); no file at '{cfg.data.tokenizer_path}'")
    if cfg.train.strategy == "fsdp" and (is_blip(cfg) or cfg.train.precision == "fp16"):
        return ("train.strategy=fsdp shards CLIP-family models in fp32 or bf16 (see parallel.py); BLIP's momentum "
                "encoders and fp16's grad scaler need train.strategy=ddp")
    if cfg.loss.name == "siglip" and cfg.loss.impl == "fused":
        return "loss.impl=fused implements the CLIP (softmax) loss only; use loss.impl=torch with siglip"
    if cfg.loss.name in PREDICTIVE_OBJECTIVES and (
            cfg.model.name not in MODELS or cfg.finetune.strategy or cfg.train.strategy == "fsdp"):
        return (f"loss.name={cfg.loss.name} trains a CLIP preset's image tower to predict its captions (the objective "
                f"ablation's baseline) with train.strategy=ddp and no finetune.strategy; model.name is "
                f"'{cfg.model.name}'")
    for key in ("train", "val", "heldout"):  # a bad dataset spec fails now, not after training
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
        failures = unreadable_start(dataset)  # an evaluation set that cannot be read fails now, not after training
        if len(failures) > min(len(dataset), 16) // 2:
            return (f"data.{key}: {len(failures)} of its first {min(len(dataset), 16)} samples cannot be read, "
                    f"e.g. {'; '.join(failures[:3])}")
    if cfg.finetune.strategy and cfg.train.strategy == "fsdp":
        return "finetune.strategy trains with train.strategy=ddp (its classifier is not sharded)"
    return finetune.check_config(cfg, world_size) if cfg.finetune.strategy else None


RESUME_OUT_DIR = "out_dir"  # what a bare `--resume` means: out_dir's checkpoint, which must exist


def load_run_config(args, overrides: list[str]):
    """(config, checkpoint or None). A resumed run keeps its own config (the checkpoint's) with the command
    line's dotted overrides on top, e.g. `--resume --train.steps=2000` to train longer; the keys that changed
    are printed. `--resume auto` starts fresh when out_dir holds no checkpoint yet (a scheduler's restart)."""
    cfg = load_config(args.config, overrides)  # also names out_dir, where the checkpoint is
    main_process = os.environ.get("RANK", "0") == "0"  # the process group does not exist yet
    if not args.resume:
        return cfg, None
    path = args.resume if args.resume not in ("auto", RESUME_OUT_DIR) else checkpointing.find(cfg.out_dir)
    if not checkpointing.exists(path):
        if args.resume == "auto":
            if main_process:
                print(f"--resume auto: no checkpoint at '{path}' yet; starting a new run", flush=True)
            return cfg, None
        raise FileNotFoundError(f"--resume: no checkpoint at '{path}'")
    checkpoint = checkpointing.read(path)
    saved = resolve_presets(config_from_dict(checkpoint["config"]))
    resumed = apply_overrides(saved, overrides)
    if resumed.train.strategy == "fsdp" and "folder" not in checkpoint and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ConfigError(f"{path} is one file, which FSDP does not load; resume it with --train.strategy=ddp")
    if main_process:
        changed = differences(saved, resumed)
        print(f"resuming {path} with its own config" + ("; changed: " if changed else "") +
              ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changed), flush=True)
        ignored = [key for key, _, _ in differences(resumed, resolve_presets(cfg)) if key != "out_dir"]
        if args.config and ignored:
            print(f"note: {args.config} differs from the run's config in {', '.join(ignored)}; the run's values are "
                  f"kept (override them on the command line to change them)", flush=True)
    return resumed, checkpoint


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device: torch.device) -> None:
    if isinstance(state, torch.Tensor):  # checkpoints written before CUDA states were saved
        state = {"cpu": state}
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file overriding the defaults in config.py")
    parser.add_argument("--resume", nargs="?", const=RESUME_OUT_DIR, default=None,
                        help="continue from out_dir's checkpoint, from CHECKPOINT (a file or folder), or with 'auto' "
                             "from out_dir's checkpoint when there is one (else start fresh)")
    parser.add_argument("--wise_alpha", type=float, help="WiSE-FT mixing of a fine-tuning run's result, 0.0 (zero-shot "
                        "weights) to 1.0 (fine-tuned): short for --finetune.wise_alpha")
    args, overrides = parser.parse_known_args(argv)
    if args.wise_alpha is not None:
        overrides.append(f"--finetune.wise_alpha={args.wise_alpha}")
    try:
        cfg, checkpoint = load_run_config(args, overrides)
        cfg = resolve_presets(finetune.resolve(cfg))  # fine-tuning: the model and tokenizer of finetune.init
    except (ConfigError, FileNotFoundError) as error:
        sys.exit(f"config error: {error}")
    problem = check_config(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    if problem:
        sys.exit(f"config error: {problem}")
    if is_blip(cfg) and not cfg.model.blip_alpha_steps:  # BLIP ramps alpha over its first two epochs
        if cfg.data.train.startswith("wds:"):
            cfg.model.blip_alpha_steps = max(1, cfg.train.steps // 10)  # a stream has no epoch length
        else:
            size = len(build_dataset(cfg.data.train, cfg.data.image_size, cfg.seed, cfg.data))
            cfg.model.blip_alpha_steps = max(1, 2 * size // cfg.train.batch_size)
    sigterm_handler = signal.getsignal(signal.SIGTERM)  # train() answers SIGTERM with a checkpoint meanwhile
    try:
        return train(cfg, checkpoint)
    finally:  # every way out (the end, an error, sys.exit, SIGTERM) stops the data workers
        shutdown_workers()
        signal.signal(signal.SIGTERM, sigterm_handler)


def train(cfg, checkpoint: dict | None) -> dict:
    device = distributed.init(cfg.device)
    rank, world_size = distributed.rank(), distributed.world_size()
    main_process = distributed.is_main()
    if main_process:
        os.makedirs(cfg.out_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.out_dir, "config.yaml"))
    distributed.barrier()

    torch.manual_seed(cfg.seed)  # identical initial weights on every process
    layers = None
    if cfg.finetune.strategy:  # the start's weights and tokenizer, a zero-shot head; the strategy's layers train
        tokenizer, model, zeroshot_weights = finetune.build(cfg, device)
        layers = finetune.trainable_layers(model, cfg)
    else:
        tokenizer = build_tokenizer(cfg, cfg.out_dir, checkpoint)
        model = model_from_config(cfg, tokenizer, pretrained=checkpoint is None).to(device)
        if cfg.model.name in FLAMINGO_MODELS:  # only the resampler, cross-attention and two embedding rows train
            freeze_for_training(model)
        if has_temperature(cfg):  # before the optimizer: it skips frozen ones
            temperature_parameter(model).requires_grad_(cfg.train.learn_temperature)
    model = parallel.prepare(model, cfg.train, device)  # on the device; FSDP shards it here
    optimizer = build_optimizer(model, cfg.train, layers)
    if cfg.train.precision == "fp16" and device.type != "cuda":
        sys.exit("config error: train.precision=fp16 needs a GPU (its grad scaler); use bf16 on CPU")
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    step = 0
    if checkpoint is not None:
        checkpointing.load(checkpoint, model, optimizer)
        scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"][rank % len(checkpoint["rng"])], device)
        step = checkpoint["step"]
        if main_process:
            print(f"resumed from step {step}", flush=True)
    raw_model = model
    # (fsdp: sharded above.) BLIP's feature queue is the same on every rank by construction: no need to broadcast it
    if world_size > 1 and cfg.train.strategy == "ddp":
        some_objectives = is_blip(cfg) and set(cfg.model.blip_losses.split(",")) != set(BLIP_OBJECTIVES)
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        forward_sync_buffers=not is_blip(cfg),
                                        find_unused_parameters=some_objectives)  # e.g. no ITM head when captioning

    def whole_model() -> torch.nn.Module | None:  # to evaluate on rank 0: under FSDP, a gathered copy
        return parallel.unsharded(raw_model, lambda: model_from_config(cfg, tokenizer, pretrained=False), device)

    stop_requested = False

    def request_stop(signum, frame):
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)

    def save(name: str = "checkpoint") -> None:
        rng_states = distributed.all_gather_object(rng_state(device))  # every process takes part
        checkpointing.save(cfg.out_dir, raw_model, optimizer, {
            "scaler": scaler.state_dict(), "step": step, "config": dataclasses.asdict(cfg), "rng": rng_states,
            "tokenizer": tokenizer.model_bytes(),
        }, sharded=cfg.train.strategy == "fsdp", name=name)

    writer = None
    if main_process:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(cfg.out_dir, "tb"))
    loader = train_loader(cfg, tokenizer, rank, world_size, start_step=step, text_only=cfg.model.name in LM_MODELS)
    malformed = skipped_rows(loader)  # index rows the dataset left out; the same on every rank
    if malformed.bad and main_process:
        print(f"data.train: left out {malformed.describe('index rows')}", flush=True)
    if malformed.too_many(cfg.data.max_bad_fraction):
        sys.exit(f"data.train: too many malformed index rows: {malformed.describe('rows')}; more than "
                 f"data.max_bad_fraction={cfg.data.max_bad_fraction}")
    batches = iter(loader)
    early_stopping = finetune.EarlyStopping(cfg, step if checkpoint is not None else None)
    stop_early = False
    bad_samples, bad_reported = BadSampleCount(), set()  # unreadable samples this process skipped, this run
    model.train()
    start_step, run_start = step, time.time()
    interval_start, interval_start_step = run_start, step
    while step < cfg.train.steps:
        lr = learning_rate(step, cfg.train)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # fine-tuning's layer-wise rates
        micro_batches = [next(batches) for _ in range(cfg.train.accum_steps)]
        for batch in micro_batches:
            bad_samples.add_batch(batch)
        # what this step's loss multiplies similarities by (a decoder has no temperature)
        scale = logit_multiplier(raw_model) if has_temperature(cfg) else torch.ones(())
        losses = train_step(cfg, model, micro_batches, device, autocast, scaler, step)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            sys.exit(f"non-finite loss {loss.item()} at step {step} (lr {lr:.3g}) on rank {rank}; "
                     f"try a lower train.lr or train.precision=bf16")
        scaler.unscale_(optimizer)
        parallel.average_replicated_gradients(raw_model)  # FSDP's unsharded scalars; DDP averaged everything
        max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        grad_norm = parallel.clip_grad_norm_(raw_model, max_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if has_temperature(cfg) and not is_blip(cfg):  # after the step, as OpenAI does: a clamp in forward stops its gradient
            with torch.no_grad():  # (BLIP clamps its temperature at the start of each forward, as BLIP does)
                raw_model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        step += 1

        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            named = distributed.all_reduce_mean(torch.stack([value.float() for value in losses.values()])).tolist()
            named, mean_loss = dict(zip(losses, named)), sum(named)
            bad = bad_samples.summed_over_ranks()  # since the start of this run, over all ranks
            if main_process:
                elapsed, steps_done = time.time() - interval_start, step - interval_start_step
                samples_per_s = steps_done * cfg.train.batch_size / elapsed
                eta = (cfg.train.steps - step) * elapsed / steps_done
                bad_text = f" bad {bad.bad}/{bad.seen} ({100 * bad.fraction:.2f}%)" if bad.bad else ""
                parts = "".join(f" {name} {value:.4f}" for name, value in named.items()) if len(named) > 1 else ""
                print(f"step {step}/{cfg.train.steps} loss {mean_loss:.4f}{parts} lr {lr:.3g} scale {scale.item():.1f} "
                      f"grad_norm {grad_norm.item():.2f} {samples_per_s:.0f} samples/s eta {eta / 60:.1f} min"
                      f"{bad_text}", flush=True)
                for example in [e for e in bad.examples if e not in bad_reported]:
                    print(f"bad sample skipped: {example}", flush=True)
                    bad_reported.add(example)
                for name, value in (("loss", mean_loss), ("lr", lr), ("logit_scale", scale.item()),
                                    ("grad_norm", grad_norm.item()), ("samples_per_s", samples_per_s),
                                    *((f"loss_{name}", value) for name, value in named.items() if len(named) > 1)):
                    writer.add_scalar(f"train/{name}", value, step)
                writer.add_scalar("data/bad_samples", bad.bad, step)
                writer.add_scalar("data/bad_fraction", bad.fraction, step)
            interval_start, interval_start_step = time.time(), step
            if bad.too_many(cfg.data.max_bad_fraction):  # the same sums on every rank: all stop here
                sys.exit(f"too many bad samples at step {step}: {bad.describe()}; more than "
                         f"data.max_bad_fraction={cfg.data.max_bad_fraction} (fix or remove them, or raise it)")
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
            results = run_evaluation(cfg, whole_model(), tokenizer, device, writer, step)
            model.train()
            if cfg.finetune.strategy:  # early stopping on val top-1; best.pt keeps the best weights
                improved, stop_early = (distributed.any_rank(flag) for flag in early_stopping.update(results, step))
                if improved:
                    save("best")
        stop_requested = distributed.any_rank(stop_requested)  # a SIGTERM on any rank stops them all here
        if step % cfg.train.ckpt_every == 0 or step == cfg.train.steps or stop_requested or stop_early:
            save()
        if stop_early:
            if main_process:
                print(f"early stopping at step {step}: no better val top-1 in {cfg.finetune.patience} evaluations "
                      f"since step {early_stopping.best_step}", flush=True)
            break
        if stop_requested:
            if main_process:
                print(f"SIGTERM: saved checkpoint at step {step}; continue with --resume", flush=True)
            distributed.cleanup()
            sys.exit(0)

    if main_process:
        print(f"trained steps {start_step}-{step} in {(time.time() - run_start) / 60:.1f} min", flush=True)
    shutdown_workers()  # the training loader is spent; its workers would idle through the evaluation
    if not stop_early:
        results = run_evaluation(cfg, whole_model(), tokenizer, device, writer, step)
    if cfg.finetune.strategy:  # the best weights, WiSE-FT mixed with the zero-shot ones at several alphas
        if distributed.any_rank(early_stopping.update(results, step)[0]):
            save("best")
        results = finetune.finish(cfg, raw_model, zeroshot_weights, tokenizer, device) if main_process else {}
        distributed.barrier()
    if writer is not None:
        writer.close()
    distributed.cleanup()
    return results


def run_evaluation(cfg, model, tokenizer, device, writer, step: int) -> dict:
    """Zero-shot and retrieval on data.val, zero-shot on data.heldout; rank 0 evaluates, others wait."""
    import eval as evaluation

    results = {}
    if distributed.is_main():
        model.eval()
        evaluate = finetune.evaluate if cfg.finetune.strategy else evaluation.evaluate_all
        results = evaluate(cfg, model, tokenizer, device)
        results["step"] = step
        print(json.dumps(results), flush=True)
        with open(os.path.join(cfg.out_dir, "eval.jsonl"), "a") as f:
            f.write(json.dumps(results) + "\n")
        for name, value in results.items():
            if isinstance(value, float):
                writer.add_scalar(f"eval/{name}", value, step)
        if is_blip(cfg):  # what the captioner says and answers, not only its scores
            picture, table = evaluation.blip_examples(cfg, model, tokenizer, device)
            writer.add_image("val/examples", picture, step, dataformats="HWC")
            writer.add_text("val/examples", table, step)
    distributed.barrier()
    return results


if __name__ == "__main__":
    main()
