"""How train.py spreads the model over processes: `train.strategy=ddp` or `fsdp`.

`ddp` (DistributedDataParallel) replicates the model: every process holds all parameters, their gradients and
the optimizer state, and gradients are all-reduced. `fsdp` shards it with FSDP2 (`fully_shard`; Zhao et al.,
"PyTorch FSDP", VLDB 2023): each of W processes holds 1/W of every parameter, gradient and optimizer state, and
gathers a unit's parameters just before the unit runs (and again for its backward), so a process's memory for
model state falls from 16 bytes a parameter (fp32 weights, gradients, AdamW's two moments) to 16 / W.

FSDP units: every transformer `Block` (models/layers.py, so every family built on the shared blocks), every
tower (a child of the model that holds blocks), then the model itself for what is left (stems, norms,
projections). Scalar parameters (CLIP's logit_scale and logit_bias) cannot be sharded: they stay whole on
every process, and `average_replicated_gradients` averages their gradients as DDP would.
Mixed precision with train.precision=bf16: parameters are gathered and used in bf16, gradients are reduced in
fp32 into fp32 shards (the master weights); autocast still decides per op, as it does without FSDP.
`train.fsdp_cpu_offload` keeps the shards, their gradients and the optimizer step in CPU memory.

Not sharded, refused by train.check_config: BLIP (its momentum encoders are parameters without gradient that
`forward` updates by EMA from the online ones, outside any unit's gather, next to a feature queue) and fp16
(its grad scaler). On one process there is nothing to shard: `fsdp` trains the plain model.
"""
import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from crossmodal import distributed
from crossmodal.models.layers import Block


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def shard(model: nn.Module, device: torch.device, precision: str = "fp32", cpu_offload: bool = False) -> nn.Module:
    """FSDP2 over all processes (the same module object, its parameters now DTensor shards on `device`)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    options = {"mesh": init_device_mesh(device.type, (distributed.world_size(),))}
    if precision == "bf16":
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module, **options)
    for child in model.children():
        if any(isinstance(module, Block) for module in child.modules()):
            fully_shard(child, **options)
    scalars = {p for p in model.parameters() if p.ndim == 0}
    fully_shard(model, ignored_params=scalars, **options)
    for p in scalars:  # fully_shard moves only what it shards (a meta-device model stays on meta)
        p.data = p.data if p.is_meta else p.data.to(device)
    return model


def prepare(model: nn.Module, train_cfg, device: torch.device) -> nn.Module:
    """The model on `device`, sharded when train.strategy=fsdp runs on several processes (before the optimizer is
    built: it must see the shards)."""
    if train_cfg.strategy == "fsdp" and distributed.world_size() > 1:
        return shard(model, device, train_cfg.precision, train_cfg.fsdp_cpu_offload)
    return model.to(device)


def gradient_sync(model: nn.Module, enabled: bool):
    """A context in which backward reduces gradients over processes (enabled) or only accumulates them locally:
    DDP's no_sync, FSDP's set_requires_gradient_sync."""
    if isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDP module
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def average_replicated_gradients(model: nn.Module) -> None:
    """Under FSDP: average the gradients of the unsharded (scalar) parameters over processes, as DDP does for
    all; FSDP reduces only its shards. No-op otherwise."""
    if not is_sharded(model):
        return
    for p in model.parameters():
        if not isinstance(p, DTensor) and p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= distributed.world_size()


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_, also for a mix of sharded and replicated gradients (FSDP); returns the
    total norm over all processes (a plain tensor)."""
    parameters = [p for p in model.parameters() if p.grad is not None]
    if not is_sharded(model):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in parameters]
    sharded = sum(g.float().square().sum() for p, g in zip(parameters, grads) if isinstance(p.grad, DTensor))
    dist.all_reduce(sharded)  # the shards' squares, summed over processes
    total = (sharded + sum(g.float().square().sum() for p, g in zip(parameters, grads)
                           if not isinstance(p.grad, DTensor))).sqrt()
    coefficient = (max_norm / (total + 1e-6)).clamp(max=1.0)  # torch's formula
    for g in grads:
        g.mul_(coefficient.to(g.device, g.dtype))
    return total


def unsharded(model: nn.Module, build, device: torch.device) -> nn.Module | None:
    """The whole model for rank 0's evaluation: `model` itself unless it is sharded; then (a collective) a plain
    copy built by `build()` on rank 0 from the gathered weights, and None elsewhere."""
    if not is_sharded(model):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not distributed.is_main():
        return None
    with torch.random.fork_rng(devices=[]):  # building draws initial weights: keep the training RNG stream
        copy = build()
    copy.load_state_dict(state)
    return copy.to(device)
