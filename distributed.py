"""The few distributed helpers the scripts need, built on torchrun's environment variables.

`torchrun --nproc_per_node N train.py ...` sets RANK, LOCAL_RANK and WORLD_SIZE; a plain `python
train.py` runs as a single process with no process group. gloo on CPU, nccl on GPU.
"""
import datetime
import os

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def init(device_type: str = "auto") -> torch.device:
    """Join the process group torchrun describes (if any) and return this process's device."""
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(device_type, local_rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return device


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Average a tensor over processes (a copy; for logging and metrics, not for gradients)."""
    value = value.detach().clone()
    if is_initialized():
        dist.all_reduce(value)
        value /= world_size()
    return value


def broadcast_object(obj):
    """Send a picklable object from rank 0 to every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()
