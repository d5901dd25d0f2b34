"""Datasets named by spec strings, and the loader that feeds train.py the same global batch whatever
the number of processes.

Spec strings (config keys `data.train`, `data.val`, and `eval.py --data`):
    shapes:SPLIT[:LENGTH]   the built-in procedural dataset (splits train, val, heldout), needs no
                            files; LENGTH overrides the split's default number of samples

Determinism: the global batch at step s is a fixed slice of a per-epoch permutation seeded by
(seed, epoch), and each sample's augmentation is seeded by (seed, epoch, index). How the batch is cut
into processes and accumulation steps changes nothing but floating-point summation order, so runs on
1 and on 8 processes are comparable, and a resumed run sees exactly the samples it would have seen.
"""
import difflib
import signal

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data.shapes import ShapesDataset
from data.transforms import image_transform


def _shapes(argument: str, image_size: int, seed: int) -> Dataset:
    split, _, length = argument.partition(":")
    split = split or "train"
    if split not in ("train", "val", "heldout"):
        raise ValueError(f"shapes dataset has splits train, val, heldout; got '{split}'")
    if length and not length.isdigit():
        raise ValueError(f"shapes:{argument}: the length after the split must be a number of samples")
    return ShapesDataset(split=split, image_size=image_size, length=int(length) if length else None, seed=seed)


DATASETS = {"shapes": _shapes}


def build_dataset(spec: str, image_size: int = 64, seed: int = 0) -> Dataset:
    """'shapes:val' -> a dataset whose items are dicts with at least `image` (PIL) and `caption`."""
    kind, _, argument = spec.partition(":")
    if kind not in DATASETS:
        close = difflib.get_close_matches(kind, DATASETS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ValueError(f"unknown dataset '{kind}' in spec '{spec}'; {hint}known: {', '.join(DATASETS)}")
    return DATASETS[kind](argument, image_size, seed)


class ImageTextDataset(Dataset):
    """Decode, augment and tokenize one sample; indexed by (epoch, index) so augmentation is reproducible."""

    def __init__(self, base: Dataset, transform, tokenizer, seed: int = 0):
        self.base, self.transform, self.tokenizer, self.seed = base, transform, tokenizer, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        item = self.base[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, epoch, index)) % 2**63)
            image = self.transform(item["image"])
        return {
            "image": image,
            "tokens": self.tokenizer([item["caption"]])[0],
            "label": item.get("label", -1),
            "index": index,
        }


class GlobalBatchSampler(Sampler):
    """Yields this process's micro-batches of (epoch, index) keys, step after step, from `start_step`.

    Global batch s = positions [s*B, (s+1)*B) of the endless sequence perm_0, perm_1, ... (one random
    permutation of the dataset per epoch). Process r takes the r-th of W equal slices and cuts it into
    `accum_steps` micro-batches.
    """

    def __init__(self, dataset_size, batch_size, steps, rank=0, world_size=1, accum_steps=1, seed=0, start_step=0):
        if batch_size % (world_size * accum_steps):
            raise ValueError(
                f"train.batch_size={batch_size} must divide evenly into {world_size} processes "
                f"x {accum_steps} accumulation steps"
            )
        self.size, self.batch_size, self.steps = dataset_size, batch_size, steps
        self.rank, self.world_size, self.accum_steps = rank, world_size, accum_steps
        self.seed, self.start_step = seed, start_step
        self._perm_epoch, self._perm = None, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.size, generator=generator), epoch
        return self._perm

    def global_batch(self, step: int) -> list[tuple[int, int]]:
        keys = []
        for position in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, offset = divmod(position, self.size)
            keys.append((epoch, int(self._permutation(epoch)[offset])))
        return keys

    def __iter__(self):
        local = self.batch_size // self.world_size
        micro = local // self.accum_steps
        for step in range(self.start_step, self.steps):
            mine = self.global_batch(step)[self.rank * local : (self.rank + 1) * local]
            for i in range(self.accum_steps):
                yield mine[i * micro : (i + 1) * micro]

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.accum_steps


def _ignore_sigterm(worker_id: int) -> None:
    # A scheduler's SIGTERM (preemption, `scancel`) often reaches the whole process group. The training
    # process answers it by finishing its step and writing a checkpoint, which needs its data workers
    # alive until then; they are shut down with the loader.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def collate(items: list[dict]) -> dict:
    return {
        "image": torch.stack([item["image"] for item in items]),
        "tokens": torch.stack([item["tokens"] for item in items]),
        "label": torch.tensor([item["label"] for item in items]),
        "index": torch.tensor([item["index"] for item in items]),
    }


def train_loader(cfg, tokenizer, rank: int, world_size: int, start_step: int = 0) -> DataLoader:
    base = build_dataset(cfg.data.train, cfg.data.image_size, cfg.seed)
    dataset = ImageTextDataset(base, image_transform(cfg.data.image_size, train=True), tokenizer, cfg.seed)
    sampler = GlobalBatchSampler(
        len(dataset), cfg.train.batch_size, cfg.train.steps, rank, world_size,
        cfg.train.accum_steps, cfg.seed, start_step,
    )
    return DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.data.workers, collate_fn=collate,
        worker_init_fn=_ignore_sigterm,
        persistent_workers=False, prefetch_factor=4 if cfg.data.workers else None,
    )


def eval_loader(spec: str, image_size: int, tokenizer, batch_size: int = 256, workers: int = 0, seed: int = 0):
    """In-order, unaugmented batches of a whole dataset (for zero-shot and retrieval evaluation)."""
    base = build_dataset(spec, image_size, seed)
    dataset = ImageTextDataset(base, image_transform(image_size, train=False), tokenizer, seed)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    return base, loader
