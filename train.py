"""Train any registered model family (recipes/) on one process or many.

    python train.py --config configs/clip/tiny_shapes.yaml
    torchrun --nproc_per_node 2 train.py --config configs/clip/tiny_shapes.yaml --train.lr=1e-3
    torchrun --nproc_per_node 2 train.py --config configs/clip/tiny_shapes.yaml --resume
    torchrun --nproc_per_node 2 --max-restarts 3 train.py --config ... --train.strategy=fsdp --resume auto

Everything that depends on the model family (checks, model, losses, evaluation) is its recipe's (recipes/).
`train.batch_size` is the global batch, the same samples at step s for any number of processes and accumulation
steps (data/__init__.py); the recipes' steps are exact under accumulation (recipes/base.py).
"""
import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel

from crossmodal import checkpointing, distributed, parallel
from crossmodal.config import (BadInput, ConfigError, apply_overrides, config_from_dict, differences, fail,
                               load_config, save_config)
from crossmodal.data import shutdown_workers, skipped_rows, train_loader
from crossmodal.data.bad_samples import BadSampleCount
from crossmodal.recipes import check_config, recipe_for, resolve


def param_groups(model: torch.nn.Module, weight_decay: float, layers: list | None = None) -> list[dict]:
    """Weight decay on matrices only (not norms, biases, embeddings, the logit scale and bias); layers: the recipe's
    (learning-rate scale, named parameters) per layer group, default the whole model at scale 1 (`lr_scale`)."""
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
    """AdamW over `param_groups`, fused (2-core CPU, ViT-B-32: 155 ms a step instead of 592 ms)."""
    return torch.optim.AdamW(param_groups(model, train_cfg.weight_decay, layers), lr=train_cfg.lr,
                             betas=(train_cfg.beta1, train_cfg.beta2), eps=train_cfg.eps, fused=True)


def learning_rate(step: int, train_cfg) -> float:
    """Linear warmup, then cosine decay from train.lr to train.min_lr at train.steps."""
    if step < train_cfg.warmup_steps:
        return train_cfg.lr * (step + 1) / train_cfg.warmup_steps
    progress = (step - train_cfg.warmup_steps) / max(1, train_cfg.steps - train_cfg.warmup_steps)
    return train_cfg.min_lr + 0.5 * (train_cfg.lr - train_cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def load_run_config(args, overrides: list[str]):
    """(config, checkpoint or None). A resumed run keeps its own config with the command line's overrides on top
    (`--resume --train.steps=2000`), printing what changed; `--resume auto` starts fresh without a checkpoint."""
    cfg = load_config(args.config, overrides)  # also names out_dir, where the checkpoint is
    main_process = os.environ.get("RANK", "0") == "0"  # the process group does not exist yet
    if not args.resume:
        return cfg, None
    path = args.resume if args.resume not in ("auto", "out_dir") else checkpointing.find(cfg.out_dir)
    if not checkpointing.exists(path):
        if args.resume == "auto":
            if main_process:
                print(f"--resume auto: no checkpoint at '{path}' yet; starting a new run", flush=True)
            return cfg, None
        raise FileNotFoundError(f"--resume: no checkpoint at '{path}'")
    checkpoint = checkpointing.read(path, resuming=True)
    saved = resolve(config_from_dict(checkpoint["config"]))
    resumed = apply_overrides(saved, overrides)
    if resumed.train.strategy == "fsdp" and "folder" not in checkpoint and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ConfigError(f"{path} is one file, which FSDP does not load; resume it with --train.strategy=ddp")
    if main_process:
        changed = differences(saved, resumed)
        print(f"resuming {path} with its own config" + ("; changed: " if changed else "") +
              ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changed), flush=True)
        ignored = [key for key, _, _ in differences(resumed, resolve(cfg)) if key != "out_dir"]
        if args.config and ignored:
            print(f"note: {args.config} differs from the run's config in {', '.join(ignored)}; the run's values are "
                  f"kept (override them on the command line to change them)", flush=True)
    return resumed, checkpoint


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file overriding the defaults in config.py")
    parser.add_argument("--resume", nargs="?", const="out_dir", default=None,  # bare: out_dir's, which must exist
                        help="continue from out_dir's checkpoint, from CHECKPOINT (a file or folder), or with 'auto' "
                             "from out_dir's checkpoint when there is one (else start fresh)")
    parser.add_argument("--wise_alpha", type=float, help="WiSE-FT mixing of a fine-tuning run's result, 0.0 (zero-shot "
                        "weights) to 1.0 (fine-tuned): short for --finetune.wise_alpha")
    args, overrides = parser.parse_known_args(argv)
    if args.wise_alpha is not None:
        overrides.append(f"--finetune.wise_alpha={args.wise_alpha}")
    try:
        cfg, checkpoint = load_run_config(args, overrides)
        cfg = resolve(cfg)  # what the run adopts from its start, then the preset's image size and context length
        problem = checkpointing.out_dir_problem(cfg.out_dir) or check_config(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    except (ConfigError, FileNotFoundError) as error:
        fail(f"config error: {error}")
    except BadInput as error:  # a checkpoint that cannot be read
        fail(f"train.py: {error}")
    if problem:
        fail(f"config error: {problem}")
    recipe_for(cfg).plan()
    handlers = {stop: signal.getsignal(stop) for stop in (signal.SIGTERM, signal.SIGINT)}  # train() answers them
    try:
        return train(cfg, checkpoint)
    except (BadInput, FileNotFoundError) as error:  # found while building: e.g. weights that do not fit the model
        fail(f"train.py: {error}")
    finally:  # every way out (the end, an error, sys.exit, a stop signal) stops the data workers
        shutdown_workers()
        for stop, handler in handlers.items():
            signal.signal(stop, handler)


def build(cfg, recipe, checkpoint: dict | None, device: torch.device):
    """(tokenizer, the model, the model as trained (under DDP, wrapped), optimizer, grad scaler, first step): the
    recipe's, on the device (FSDP shards it), with a resumed run's state."""
    tokenizer = recipe.build_tokenizer(cfg.out_dir, checkpoint)
    model = recipe.build_model(tokenizer, pretrained=checkpoint is None)
    recipe.prepare(model)  # freezing, before the optimizer: it skips frozen parameters
    layers = recipe.trainable_layers(model)
    model = parallel.prepare(model, cfg.train, device)  # on the device; FSDP shards it here
    optimizer = build_optimizer(model, cfg.train, layers)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    step = checkpointing.resume(checkpoint, model, optimizer, scaler, device) if checkpoint is not None else 0
    trained = model  # (fsdp: sharded above)
    if distributed.world_size() > 1 and cfg.train.strategy == "ddp":
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          **recipe.ddp_options())
    return tokenizer, model, trained, optimizer, scaler, step


def train(cfg, checkpoint: dict | None) -> dict:
    device, rank, main_process = distributed.init(cfg.device), distributed.rank(), distributed.is_main()
    os.makedirs(cfg.out_dir, exist_ok=True)  # (on every process: exist_ok makes that safe)
    torch.manual_seed(cfg.seed)  # identical initial weights on every process
    recipe = recipe_for(cfg)
    tokenizer, raw_model, model, optimizer, scaler, step = build(cfg, recipe, checkpoint, device)
    if main_process:  # once a resumed checkpoint is known to fit: a refused one leaves the run as it was
        save_config(cfg, os.path.join(cfg.out_dir, "config.yaml"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def save(name: str = "checkpoint") -> None:
        rng_states = distributed.all_gather_object(checkpointing.rng_state(device))  # every process takes part
        checkpointing.save(cfg.out_dir, raw_model, optimizer, {
            "scaler": scaler.state_dict(), "step": step, "config": dataclasses.asdict(cfg), "rng": rng_states,
            "tokenizer": tokenizer.model_bytes(),
        }, sharded=cfg.train.strategy == "fsdp", name=name)

    def evaluate() -> dict:  # rank 0 evaluates (under FSDP a gathered copy), the others wait
        whole = parallel.unsharded(raw_model, lambda: recipe.build_model(tokenizer, pretrained=False), device)
        return run_evaluation(cfg, recipe, whole, tokenizer, device, log.writer, step)

    loader = train_loader(cfg, tokenizer, rank, distributed.world_size(), start_step=step, **recipe.loader_options())
    received, batches, log = [], iter(loader), TrainingLog(cfg, loader, step)  # received: the stop signals
    for stop in (signal.SIGTERM, signal.SIGINT):  # a scheduler's preemption, Ctrl-C: a checkpoint, then exit
        signal.signal(stop, lambda signum, frame: received.append(signum))
    recipe.begin(step, resumed=checkpoint is not None)
    stop_requested, stop_early, results = False, False, {}
    model.train()
    while step < cfg.train.steps:
        lr = learning_rate(step, cfg.train)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # layer-wise rates
        micro_batches = [next(batches) for _ in range(cfg.train.accum_steps)]
        scalars = recipe.before_step(raw_model, step)
        losses = recipe.train_step(model, micro_batches, step, device, autocast, scaler)
        if not torch.isfinite(loss := sum(losses.values())):
            sys.exit(f"non-finite loss {loss.item()} at step {step} (lr {lr:.3g}) on rank {rank}; "
                     f"try a lower train.lr or train.precision=bf16")
        scaler.unscale_(optimizer)
        parallel.average_replicated_gradients(raw_model)  # FSDP's unsharded scalars; DDP averaged everything
        grad_norm = parallel.clip_grad_norm_(raw_model, cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        recipe.after_step(raw_model)
        step += 1
        log.step(step, lr, losses, {**scalars, "grad_norm": grad_norm.item()}, micro_batches)
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
            results = evaluate()
            model.train()
            keep, stop_early = distributed.broadcast_object(recipe.after_evaluation(results, step))
            if keep:
                save(keep)
        stop_requested = distributed.any_rank(bool(received))  # a stop signal on any rank stops them all here
        if step % cfg.train.ckpt_every == 0 or step == cfg.train.steps or stop_requested or stop_early:
            save()
        if stop_early or stop_requested:
            break
    if stop_requested:
        if main_process:
            name = signal.Signals(received[0]).name if received else "a stop signal on another process"
            print(f"{name}: saved checkpoint at step {step}; continue with --resume", flush=True)
        distributed.cleanup()
        sys.exit(0)
    if main_process:
        print(f"trained steps {log.start_step}-{step} in {(time.time() - log.run_start) / 60:.1f} min", flush=True)
    shutdown_workers()  # the training loader is spent; its workers would idle through the evaluation
    if not stop_early:
        results = evaluate()
        keep, _ = distributed.broadcast_object(recipe.after_evaluation(results, step))
        if keep:
            save(keep)
    results = recipe.finish(raw_model, tokenizer, device, results) if main_process else {}  # e.g. WiSE-FT
    distributed.barrier()
    if log.writer is not None:
        log.writer.close()
    distributed.cleanup()
    return results


SHORT = {"logit_scale": "scale"}  # the log line's names for a recipe's scalars


class TrainingLog:
    """A line every train.log_every steps on rank 0 (losses, lr, the recipe's scalars, samples/s, ETA, bad samples),
    TensorBoard scalars (out_dir/tb), and the stop when bad samples or malformed index rows pass
    data.max_bad_fraction (summed over ranks)."""

    def __init__(self, cfg, loader, step: int):
        self.cfg, self.writer = cfg, None
        if distributed.is_main():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(cfg.out_dir, "tb"))
        malformed = skipped_rows(loader)  # index rows the dataset left out; the same on every rank
        if malformed.bad and distributed.is_main():
            print(f"data.train: left out {malformed.describe('index rows')}", flush=True)
        if malformed.too_many(cfg.data.max_bad_fraction):
            sys.exit(f"data.train: too many malformed index rows: {malformed.describe('rows')}; more than "
                     f"data.max_bad_fraction={cfg.data.max_bad_fraction}")
        self.start_step = self.interval_step = step
        self.run_start = self.interval_start = time.time()
        self.bad, self.reported = BadSampleCount(), set()  # unreadable samples this process skipped, this run

    def step(self, step: int, lr: float, losses: dict, scalars: dict, micro_batches: list[dict]) -> None:
        cfg = self.cfg
        for batch in micro_batches:
            self.bad.add_batch(batch)
        if step % cfg.train.log_every and step != cfg.train.steps:
            return
        named = distributed.all_reduce_mean(torch.stack([value.float() for value in losses.values()])).tolist()
        named, mean_loss = dict(zip(losses, named)), sum(named)
        bad = self.bad.summed_over_ranks()  # since the start of this run, over all ranks
        if self.writer is not None:
            elapsed, steps_done = time.time() - self.interval_start, step - self.interval_step
            samples_per_s = steps_done * cfg.train.batch_size / elapsed
            eta = (cfg.train.steps - step) * elapsed / steps_done
            parts = "".join(f" {name} {value:.4f}" for name, value in named.items()) if len(named) > 1 else ""
            shown = "".join(f" {SHORT.get(key, key)} {value:.{1 if key in SHORT else 2}f}"
                            for key, value in scalars.items())
            bad_text = f" bad {bad.bad}/{bad.seen} ({100 * bad.fraction:.2f}%)" if bad.bad else ""
            print(f"step {step}/{cfg.train.steps} loss {mean_loss:.4f}{parts} lr {lr:.3g}{shown} {samples_per_s:.0f} "
                  f"samples/s eta {eta / 60:.1f} min{bad_text}", flush=True)
            for example in [e for e in bad.examples if e not in self.reported]:
                print(f"bad sample skipped: {example}", flush=True)
                self.reported.add(example)
            for name, value in (("loss", mean_loss), ("lr", lr), *scalars.items(), ("samples_per_s", samples_per_s),
                                *((f"loss_{name}", value) for name, value in named.items() if len(named) > 1)):
                self.writer.add_scalar(f"train/{name}", value, step)
            self.writer.add_scalar("data/bad_samples", bad.bad, step)
            self.writer.add_scalar("data/bad_fraction", bad.fraction, step)
        self.interval_start, self.interval_step = time.time(), step
        if bad.too_many(cfg.data.max_bad_fraction):  # the same sums on every rank: all stop here
            sys.exit(f"too many bad samples at step {step}: {bad.describe()}; more than "
                     f"data.max_bad_fraction={cfg.data.max_bad_fraction} (fix or remove them, or raise it)")

def run_evaluation(cfg, recipe, model, tokenizer, device, writer, step: int) -> dict:
    """The recipe's evaluation on rank 0 (a JSON line in out_dir/eval.jsonl, TensorBoard scalars); others wait."""
    results = {}
    if distributed.is_main():  # (under FSDP the others hold no whole model)
        model.eval()
        results = recipe.evaluate(model, tokenizer, device, writer, step)
        results["step"] = step
        print(json.dumps(results), flush=True)
        with open(os.path.join(cfg.out_dir, "eval.jsonl"), "a") as f:
            f.write(json.dumps(results) + "\n")
        for name, value in ((name, value) for name, value in results.items() if isinstance(value, float)):
            writer.add_scalar(f"eval/{name}", value, step)
    distributed.barrier()
    return results


if __name__ == "__main__":
    main()
