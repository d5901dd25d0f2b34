"""The few distributed helpers the scripts need, built on torchrun's environment variables.

`torchrun --nproc_per_node N train.py ...` sets RANK, LOCAL_RANK and WORLD_SIZE; a plain `python
train.py` runs as a single process with no process group. On CPU the group is gloo; on GPU it has both
backends, `cpu:gloo,cuda:nccl`: CUDA tensors (features, gradients, the logged loss) go through NCCL and
the CPU-side bookkeeping (the stop flag, bad-sample counts, RNG states) through gloo, since NCCL has no
CPU backend.

Under torchrun with `--max-restarts`, a failed worker makes torchrun start the whole group again. Its agent
keeps one TCP store for all rounds (the store at MASTER_ADDR:MASTER_PORT that every worker joins), and this
torch build no longer gives each round its own key prefix there: a new round's gloo group read the dead
round's addresses ("Gloo connectFullMesh failed ... Connection refused"; with
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, a fresh store each round, it restarted fine). `init` puts each round under
its own prefix, `attempt_<TORCHELASTIC_RESTART_COUNT>/`, as PyTorch's env:// rendezvous once did itself.
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
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=30)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart is None:
            dist.init_process_group(backend, timeout=timeout)
        else:  # torchrun: this round's own keys in the store that outlives rounds (see above)
            store, rank, size = next(dist.rendezvous("env://", timeout=timeout))
            store = dist.PrefixStore(f"attempt_{restart}/", store)
            dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
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


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (a CPU tensor: gloo even next to NCCL)."""
    if not is_initialized():
        return flag
    value = torch.tensor(float(flag))
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] with one process."""
    if not is_initialized():
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


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
