"""train.py's checkpoints: written atomically, read back by any strategy on any number of processes.

One set of contents (model, optimizer, scaler, step, config, rng, tokenizer), two formats:
- `out_dir/checkpoint.pt` (train.strategy=ddp, and every run before FSDP): one file, written by rank 0 from
  the unwrapped model to a temporary file and renamed over the old one (files.write_atomic).
- `out_dir/checkpoint/` (train.strategy=fsdp): a torch.distributed.checkpoint (DCP) folder. Every rank writes
  its own shards of the model and optimizer state (no process ever holds the whole model) and rank 0 adds
  `meta.pt`, the rest. It is written as `checkpoint.tmp/` and swapped in by two renames (checkpoint ->
  checkpoint.old, checkpoint.tmp -> checkpoint): a crash at any moment leaves a complete `checkpoint/` or
  `checkpoint.old/`, and `find` takes whichever is there.
DCP reshards on loading: a folder written by 2 FSDP processes loads into 1 plain process, 4 FSDP processes or
a DDP run, and eval.py reads it on one process without a process group. The optimizer state is saved flattened
(one entry per parameter name), so it does not depend on how each strategy groups the parameters. A file
loads into a plain or DDP model; an FSDP run resumes from a folder only (resume a file with train.strategy=ddp).

Nothing a checkpoint holds runs code. Files are read with torch.load's weights_only. DCP would unpickle a folder's
`.metadata` with plain pickle.load and its non-tensor values (the optimizer's settings) with torch.load's full
unpickler: here the metadata goes through `MetadataUnpickler` (DCP's own metadata classes and nothing else) and the
values through weights_only (`MetadataReader`, `WeightsOnlyPlanner`). A file or folder that is empty, cut short,
missing a shard or not a train.py checkpoint, and weights that do not fit the model, are a BadInput naming it.
"""
import io
import os
import pickle
import shutil
import warnings
import zipfile

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from crossmodal import distributed, files
from crossmodal.config import BadInput

FILE, FOLDER = "checkpoint.pt", "checkpoint"
RUN_KEYS = ("model", "config", "tokenizer")  # in every checkpoint train.py writes (a folder's model: in its shards)
RESUME_KEYS = ("optimizer", "scaler", "step", "rng")  # and what a run resumes from (not in WiSE-FT's wise.pt)
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


def out_dir_problem(out_dir: str) -> str | None:
    """Why a run cannot write to `out_dir` (a file there, or above it), or None; checked before any work."""
    existing = os.path.abspath(out_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if os.path.isdir(existing):
        return None
    if existing == os.path.abspath(out_dir):
        return f"out_dir '{files.shown(out_dir)}' is a file, not a folder"
    return f"out_dir '{files.shown(out_dir)}' is inside '{files.shown(existing)}', which is a file, not a folder"


def read(path: str, resuming: bool = False) -> dict:
    """A train.py checkpoint file's whole dict; or a folder's meta.pt (all but model and optimizer) with its path
    under "folder", once its shards are checked to be all there. "path": where it was read from. A file or folder
    that is damaged or not a train.py checkpoint (`resuming`: one a run can continue from) is a BadInput."""
    folder = os.path.isdir(path)
    if folder:
        checkpoint = load_file(os.path.join(path, "meta.pt"), "checkpoint file")
        check_folder(path)
    else:
        checkpoint = load_file(path)
    needed = [key for key in RUN_KEYS + RESUME_KEYS * resuming if not (folder and key in ("model", "optimizer"))]
    problem = not_a_run(checkpoint, needed)
    if problem:
        raise BadInput(f"'{files.shown(path)}' is not a checkpoint train.py wrote{' to resume from' * resuming} "
                       f"({problem})")
    return {**checkpoint, **({"folder": path} if folder else {}), "path": path}


def not_a_run(checkpoint, needed: list[str]) -> str | None:
    """What makes `checkpoint` (what a file held) other than a train.py checkpoint with the keys `needed`, or None."""
    if not isinstance(checkpoint, dict):
        return f"it holds a {type(checkpoint).__name__}, not a dict"
    missing = [key for key in needed if key not in checkpoint]
    if missing:
        return f"it has no {', '.join(missing)}"
    wrong = [key for key in ("config", "model") if key in checkpoint and not isinstance(checkpoint[key], dict)]
    return f"its {' and '.join(wrong)} is not a dict" if wrong else None


def load_file(path: str, what: str = "checkpoint"):
    """torch.load with weights_only (nothing in the file can run code). A file that is empty, cut short, holds
    objects weights_only refuses or cannot be read is a BadInput naming it; `what`: what the message calls it."""
    problem = damage(path)
    if problem:
        raise BadInput(f"{what} '{files.shown(path)}' {problem}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # whatever torch.load makes of a file that is not one it wrote
        raise BadInput(f"{what} '{files.shown(path)}' {unloadable(error)}") from None


def damage(path: str) -> str | None:
    """What makes a file unreadable before torch.load tries, or None: none there, no bytes, or a zip archive
    (torch.save's format) without the directory at its end, i.e. cut short (a copy or a save that did not finish)."""
    if not os.path.isfile(path):
        return "is missing" if not os.path.exists(path) else "is not a file"
    if os.path.getsize(path) == 0:
        return "is empty (0 bytes)"
    with open(path, "rb") as f:
        starts_like_zip = f.read(4) == b"PK\x03\x04"
    if starts_like_zip and not zipfile.is_zipfile(path):
        return (f"is cut short ({os.path.getsize(path)} bytes, a zip archive without its end: a copy or a save that "
                f"did not finish)")
    return None


def unloadable(error: Exception) -> str:
    """What torch.load's `error` says about a file: a global weights_only refused (an object that could run code),
    or why it cannot be read (not a file torch.save wrote, damaged, ...)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line]
    if isinstance(error, pickle.UnpicklingError) and named:
        return f"holds Python objects that could run code, which loading refuses ({named[0]})"
    operand = [line for line in lines if line.startswith("Unsupported operand")]  # weights_only on a non-pickle
    if operand:
        return f"is not a file torch.save wrote ({operand[0]})"
    return f"cannot be read by torch.load ({first_line(error)})"


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


_RUNS: dict = {}  # (path, modification time, size) -> what read_run found there


def read_run(path: str) -> dict | None:
    """The dict of a train.py checkpoint file (model, config, and a run's tokenizer, ...), or None when `path` is not
    one (released weights, a folder, nothing); an empty or cut-short file is a BadInput. Memory-mapped and read once
    per process, however many parts of a run ask (its tokenizer, its config's checks, its weights)."""
    if not (os.path.isfile(path) and path.endswith(".pt")):
        return None
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_mtime_ns, stat.st_size)
    if key not in _RUNS:
        problem = damage(path)
        if problem:
            raise BadInput(f"'{files.shown(path)}' {problem}")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, pickle.UnpicklingError):  # OpenAI's TorchScript archives, other formats
            checkpoint = None
        is_run = isinstance(checkpoint, dict) and {"model", "config"} <= set(checkpoint)
        _RUNS[key] = checkpoint if is_run else None
    return _RUNS[key]


# ---------------------------------------------------------------- a DCP folder, read without running its pickles

# What DCP (torch 2.14) pickles into a folder's `.metadata`: these classes, torch.Size, dtypes, a layout by name, the
# path it was saved to. DCP itself reads the file with pickle.load, which would run anything named there.
METADATA_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.filesystem", "_StoragePrefix"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib._local", "PosixPath"),
}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP `.metadata` admitting only METADATA_GLOBALS and torch dtypes (as weights_only does for files);
    anything else is refused, unrun, with a BadInput naming the file and the global."""

    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                   torch.dtype)):
            return super().find_class(module, name)
        raise BadInput(f"checkpoint metadata '{files.shown(self.path)}' names {module}.{name}, which is not part of a "
                       f"checkpoint's metadata: refused, since unpickling it could run code")


def read_metadata(path: str) -> Metadata:
    """A DCP folder's `.metadata`, through MetadataUnpickler; a BadInput for a missing, damaged or refused one."""
    try:
        with open(path, "rb") as f:
            metadata = MetadataUnpickler(f, path).load()
    except BadInput:
        raise
    except FileNotFoundError:
        raise BadInput(f"checkpoint folder '{files.shown(os.path.dirname(path))}' has no .metadata (the index of its "
                       f"shards): it is not a complete checkpoint") from None
    except Exception as error:  # cut short, not a pickle, a refused opcode, a class given the wrong state
        raise BadInput(f"checkpoint metadata '{files.shown(path)}' cannot be read ({first_line(error)})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict) or \
            not isinstance(metadata.storage_data, dict):
        raise BadInput(f"checkpoint metadata '{files.shown(path)}' is not DCP's metadata of a checkpoint")
    return metadata


def check_folder(folder: str) -> Metadata:
    """The metadata of a DCP folder whose shard files are all there and long enough for what it says they hold."""
    metadata, sizes = read_metadata(os.path.join(folder, ".metadata")), {}
    for info in metadata.storage_data.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(info, _StorageInfo) or not isinstance(name, str) or os.path.basename(name) != name or \
                name in ("", ".", "..") or not isinstance(info.offset, int) or not isinstance(info.length, int):
            raise BadInput(f"checkpoint metadata '{files.shown(os.path.join(folder, '.metadata'))}' names a shard "
                           f"that is not a file of its folder: {info!r}")
        if name not in sizes:
            file = os.path.join(folder, name)
            if not os.path.isfile(file):
                raise BadInput(f"checkpoint folder '{files.shown(folder)}' is missing {files.shown(name)}, one of "
                               f"its shards")
            sizes[name] = os.path.getsize(file)
        if info.offset < 0 or info.length < 0 or info.offset + info.length > sizes[name]:
            raise BadInput(f"checkpoint shard '{files.shown(os.path.join(folder, name))}' is cut short "
                           f"({sizes[name]} bytes; its metadata needs {info.offset + info.length})")
    return metadata


class MetadataReader(FileSystemReader):
    """DCP's reader of a folder, with its `.metadata` read by read_metadata instead of pickle.load."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_metadata(os.fspath(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class WeightsOnlyPlanner(DefaultLoadPlanner):
    """DCP's load planner with the values that are not tensors (the optimizer's settings) read by torch.load's
    weights_only, where DCP's own planner unpickles them with nothing refused."""

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        name = read_item.dest_index.fqn
        try:
            loaded = torch.load(value, map_location="cpu", weights_only=True)
        except Exception as error:  # raised in DCP's reading, which dcp_load turns into one message
            raise BadInput(f"checkpoint folder '{files.shown(self.folder)}': its value {name} {unloadable(error)}") \
                from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[name], loaded)
        else:
            self.state_dict[name] = loaded


def dcp_load(state: dict, folder: str) -> None:
    """dcp.load of `state` from `folder` through MetadataReader and WeightsOnlyPlanner; what fails is a BadInput."""
    try:
        dcp.load(state, storage_reader=MetadataReader(folder), planner=WeightsOnlyPlanner(folder),
                 no_dist=not distributed.is_initialized())
    except CheckpointException as error:  # DCP gathers every rank's exception into one
        failures = [failure for failure, _ in error.failures.values()]
        known = [failure for failure in failures if isinstance(failure, BadInput)]
        if known:
            raise known[0] from None
        raise BadInput(f"checkpoint folder '{files.shown(folder)}' cannot be loaded ({first_line(failures[0])})") \
            from None


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
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **meta}
            files.write_atomic(os.path.join(out_dir, f"{name}.pt"), lambda f: torch.save(state, f), binary=True)
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
    if distributed.is_main():  # meta.pt last (and whole): a folder with meta.pt is complete
        files.write_atomic(os.path.join(tmp, "meta.pt"), lambda f: torch.save(meta, f), binary=True)
        if os.path.isdir(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()


def load(checkpoint: dict, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Model (and optimizer) state from what `read` returned, into a plain, DDP-unwrapped or FSDP model. Weights that
    do not fit the model, or an optimizer state that does not fit the optimizer, are a BadInput naming the
    checkpoint."""
    source = files.shown(checkpoint.get("path", "checkpoint"))
    if "folder" not in checkpoint:
        check_fit(source, model.state_dict(), checkpoint["model"])
        model.load_state_dict(checkpoint["model"])
        if optimizer is not None:
            try:
                optimizer.load_state_dict(checkpoint["optimizer"])
            except (ValueError, KeyError, TypeError) as error:
                raise BadInput(f"checkpoint '{source}': its optimizer state does not fit this run's optimizer "
                               f"({first_line(error)})") from None
        return
    metadata = read_metadata(os.path.join(checkpoint["folder"], ".metadata"))
    saved = {name[len("model."):]: value.size if isinstance(value, TensorStorageMetadata) else None
             for name, value in metadata.state_dict_metadata.items() if name.startswith("model.")}
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
        check_fit(source, state["model"], saved)
        dcp_load(state, checkpoint["folder"])
        set_model_state_dict(model, state["model"])
        return
    model_state, optimizer_state = get_state_dict(model, optimizer, options=OPTIONS)
    check_fit(source, model_state, saved)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp_load(state, checkpoint["folder"])
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=OPTIONS)


def check_fit(source: str, expected: dict, saved: dict) -> None:
    """A BadInput naming `source` and the first few mismatched names when the saved weights (name -> tensor or shape)
    are not those of the model's state dict `expected` (under FSDP, DTensors of the whole shape)."""
    def shape(value) -> tuple | str:
        if isinstance(value, torch.Tensor):
            return tuple(value.shape)
        return tuple(value) if isinstance(value, (tuple, list)) else "not a tensor"

    missing = [name for name in expected if name not in saved]
    unexpected = [name for name in saved if name not in expected]
    shapes = [f"{name} {shape(saved[name])} (the model's {shape(expected[name])})" for name in expected
              if name in saved and shape(saved[name]) != shape(expected[name])]
    parts = [f"{label} {', '.join(names[:3])}{f' and {len(names) - 3} more' if len(names) > 3 else ''}"
             for label, names in (("missing", missing), ("unexpected", unexpected), ("other shapes:", shapes)) if names]
    if parts:
        raise BadInput(f"checkpoint '{source}' does not fit the model its config builds: {'; '.join(parts)} (was it "
                       f"written by another model.name or model settings?)")


def resume(checkpoint: dict, model: nn.Module, optimizer: torch.optim.Optimizer, scaler, device: torch.device) -> int:
    """A run's state from what `read` returned: model, optimizer, grad scaler, this rank's RNG; its step."""
    source, step = files.shown(checkpoint["path"]), checkpoint["step"]
    if not isinstance(step, int) or step < 0:
        raise BadInput(f"checkpoint '{source}': its step is {step!r}, not a count of steps")
    load(checkpoint, model, optimizer)
    try:
        scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"][distributed.rank() % len(checkpoint["rng"])], device)
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError, ZeroDivisionError) as error:
        raise BadInput(f"checkpoint '{source}': its grad scaler or RNG state cannot be restored "
                       f"({first_line(error)})") from None
    if distributed.is_main():
        print(f"resumed from step {step}", flush=True)
    return step
