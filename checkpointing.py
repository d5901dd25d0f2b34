"""train.py's checkpoints: written atomically, read back by any strategy on any number of processes.

One set of contents (model, optimizer, scaler, step, config, rng, tokenizer), two formats:
- `out_dir/checkpoint.pt` (train.strategy=ddp, and every run before FSDP): one file, written by rank 0 from
  the unwrapped model to `checkpoint.pt.tmp` and renamed over the old one.
- `out_dir/checkpoint/` (train.strategy=fsdp): a torch.distributed.checkpoint (DCP) folder. Every rank writes
  its own shards of the model and optimizer state (no process ever holds the whole model) and rank 0 adds
  `meta.pt`, the rest. It is written as `checkpoint.tmp/` and swapped in by two renames (checkpoint ->
  checkpoint.old, checkpoint.tmp -> checkpoint): a crash at any moment leaves a complete `checkpoint/` or
  `checkpoint.old/`, and `find` takes whichever is there.
DCP reshards on loading: a folder written by 2 FSDP processes loads into 1 plain process, 4 FSDP processes or
a DDP run, and eval.py reads it on one process without a process group. The optimizer state is saved flattened
(one entry per parameter name), so it does not depend on how each strategy groups the parameters. A file
loads into a plain or DDP model; an FSDP run resumes from a folder only (resume a file with train.strategy=ddp).
"""
import os
import pickle
import shutil
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from crossmodal import distributed

FILE, FOLDER = "checkpoint.pt", "checkpoint"
OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
# DCP warns on every single-process save and load (eval.py, a 1-process resume) that it assumes one process: it does
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def find(out_dir: str) -> str:
    """out_dir's newest complete checkpoint (a folder, a folder stranded mid-swap, or a file); the file's path when
    there is none."""
    candidates = [os.path.join(out_dir, FOLDER), os.path.join(out_dir, FOLDER + ".old")]
    folders = [path for path in candidates if os.path.isfile(os.path.join(path, "meta.pt"))][:1]
    file = os.path.join(out_dir, FILE)
    found = folders + ([file] if os.path.isfile(file) else [])
    if not found:
        return file
    return max(found, key=lambda path: os.path.getmtime(os.path.join(path, "meta.pt") if os.path.isdir(path) else path))


def exists(path: str) -> bool:
    return os.path.isfile(path) or os.path.isfile(os.path.join(path, "meta.pt"))


def read(path: str) -> dict:
    """A file's whole dict; a folder's meta.pt (all but model and optimizer) and its path under "folder"."""
    if os.path.isdir(path):
        return {**torch.load(os.path.join(path, "meta.pt"), map_location="cpu", weights_only=True), "folder": path}
    return torch.load(path, map_location="cpu", weights_only=True)


_RUNS: dict = {}  # (path, modification time, size) -> what read_run found there


def read_run(path: str) -> dict | None:
    """The dict of a train.py checkpoint file (model, config, and a run's tokenizer, ...), or None when `path` is not
    one (released weights, a folder, nothing). Memory-mapped and read once per process, however many parts of a run
    ask (its tokenizer, its config's checks, its weights)."""
    if not (os.path.isfile(path) and path.endswith(".pt")):
        return None
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_mtime_ns, stat.st_size)
    if key not in _RUNS:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, pickle.UnpicklingError):  # OpenAI's TorchScript archives, other formats
            checkpoint = None
        is_run = isinstance(checkpoint, dict) and {"model", "config"} <= set(checkpoint)
        _RUNS[key] = checkpoint if is_run else None
    return _RUNS[key]


def rng_state(device: torch.device) -> dict:
    """This process's RNG states (CPU, and CUDA on a GPU), which a checkpoint keeps per rank."""
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


def save(out_dir: str, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict, sharded: bool,
         name: str = FOLDER) -> None:
    """Every process calls this. sharded: a DCP folder, each rank its shards; else rank 0 writes one file.
    name: `checkpoint` (the run's, what --resume finds) or another, e.g. finetune.py's `best`."""
    if not sharded:
        if distributed.is_main():
            tmp = os.path.join(out_dir, f"{name}.pt.tmp")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), **meta}, tmp)
            os.replace(tmp, os.path.join(out_dir, f"{name}.pt"))
        return
    final, tmp, old = (os.path.join(out_dir, name + suffix) for suffix in ("", ".tmp", ".old"))
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)  # a save that crashed
        if os.path.isdir(old) and os.path.isdir(final):  # a swap that crashed after its second rename
            shutil.rmtree(old)
    distributed.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer, options=OPTIONS)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp,
             no_dist=not distributed.is_initialized())
    if distributed.is_main():
        torch.save(meta, os.path.join(tmp, "meta.pt"))  # last: a folder with meta.pt is complete
        if os.path.isdir(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()


def load(checkpoint: dict, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Model (and optimizer) state from what `read` returned, into a plain, DDP-unwrapped or FSDP model."""
    if "folder" not in checkpoint:
        model.load_state_dict(checkpoint["model"])
        if optimizer is not None:
            optimizer.load_state_dict(checkpoint["optimizer"])
        return
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=checkpoint["folder"], no_dist=not distributed.is_initialized())
        set_model_state_dict(model, state["model"])
        return
    model_state, optimizer_state = get_state_dict(model, optimizer, options=OPTIONS)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=checkpoint["folder"], no_dist=not distributed.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=OPTIONS)
