"""Datasets named by spec strings, and the loaders that feed train.py and eval.py.

Spec strings (config keys `data.train`, `data.val`, `data.heldout`, and `eval.py --data`):
    shapes:SPLIT[:LENGTH]     the built-in procedural dataset (splits train, val, heldout, binding), needs no
                              files; LENGTH overrides the split's default number of samples; the split
                              binding holds attribute-binding candidate sets (data/binding.py)
    coco:PATH[#SPLIT]         COCO captions JSON, or a Karpathy split file with its split (data/coco.py)
    csv:PATH                  one image path and caption per row (data/csv_pairs.py)
    imagefolder:PATH          one folder of images per class, for zero-shot classification (data/imagefolder.py)
    wds:PATTERN               WebDataset tar shards, streamed; training only (data/webdataset.py)
    vqa:QUESTIONS[#ANNOTATIONS]  VQAv2 questions (and answers) over COCO images; evaluation only (data/vqa.py)
    shapes_icl:SPLIT[:LENGTH], interleaved:PATH.jsonl, interleaved_wds:PATTERN
                              interleaved image-text sequences for Flamingo and its LM (data/interleaved.py)
    moving_shapes:SPLIT[:LENGTH]  the built-in procedural clips (splits train, val, heldout, val_order: pairs of a
                              clip and its time reversal), needs no files (data/moving_shapes.py)
    video_csv:PATH            one video path and caption per row, the csv convention (data/video.py)
    msrvtt:PATH[#SPLIT]       MSR-VTT's JSON (videos, sentences), clips <video_id>.mp4 (data/video.py)

Video specs (VIDEO, is_video_spec): items carry `frames` (a list of PIL images) instead of `image`; train_loader
(with frames=N) and video_retrieval_loader give batches whose `image` is (B, N, 3, H, W), N frames sampled uniformly
from each clip (random offsets in training, each segment's middle in evaluation; data/video.py), every frame of a
clip through the same crop.

Determinism (map-style specs, all but wds): the global batch at step s is a fixed slice of a per-epoch
permutation seeded by (seed, epoch), and each sample's augmentation is seeded by (seed, epoch, index).
How the batch is cut into processes and accumulation steps changes nothing but floating-point summation
order, so runs on 1 and on 8 processes are comparable, and a resumed run sees exactly the samples it
would have seen. A wds stream is deterministic for a given number of processes and workers (see
data/webdataset.py), not across them.

Bad samples (data/bad_samples.py): a map-style item that cannot be read is replaced by the next index
that can (so every batch keeps its size, which the gathered contrastive loss and the sampler need), a
stream skips it; either way it is counted in the batch's `bad`, `seen` and `bad_examples`, for train.py.
"""
import atexit
import dataclasses
import difflib
import signal
import weakref
import zlib
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from crossmodal.config import BadInput, DataConfig
from crossmodal.data.binding import BindingDataset
from crossmodal.data.bad_samples import MAX_EXAMPLES, BadSample, BadSampleCount, clean_caption
from crossmodal.data.coco import load_coco
from crossmodal.data.csv_pairs import load_csv
from crossmodal.data.image_files import ImageFiles
from crossmodal.data.imagefolder import ImageFolder
from crossmodal.data.interleaved import InterleavedCollate, InterleavedDocuments, InterleavedShards, shapes_icl
from crossmodal.data import moving_shapes
from crossmodal.data.moving_shapes import MovingShapesDataset
from crossmodal.data.shapes import ShapesDataset
from crossmodal.data.transforms import image_transform
from crossmodal.data.video import ClipFiles, load_msrvtt, load_video_csv, training_offsets
from crossmodal.data.vqa import VQA_PROMPT, VQADataset, load_vqa, question_answer_rows, text_ids
from crossmodal.data.webdataset import WebDataset, check_record, expand_shards, shard_records
from crossmodal.files import end_with_parent

MAX_CONSECUTIVE_BAD = 100  # a map-style item gives up (and the run stops) after this many unreadable neighbours


def _draft_size(options: DataConfig, image_size: int) -> int:
    return image_size if options.jpeg_draft else 0


def _shapes(argument: str, image_size: int, seed: int, options: DataConfig) -> Dataset:
    split, _, length = argument.partition(":")
    split = split or "train"
    if split not in ("train", "val", "heldout", "binding"):
        raise ValueError(f"shapes dataset has splits train, val, heldout, binding; got '{split}'")
    if length and not length.isdigit():
        raise ValueError(f"shapes:{argument}: the length after the split must be a number of samples")
    if split == "binding":
        return BindingDataset(image_size=image_size, length=int(length) if length else None, seed=seed)
    return ShapesDataset(split=split, image_size=image_size, length=int(length) if length else None, seed=seed)


def _coco(argument: str, image_size: int, seed: int, options: DataConfig) -> ImageFiles:
    return load_coco(argument, options.image_root, _draft_size(options, image_size))


def _csv(argument: str, image_size: int, seed: int, options: DataConfig) -> ImageFiles:
    return load_csv(argument, options.csv_image_key, options.csv_caption_key, options.csv_separator,
                    options.image_root, _draft_size(options, image_size))


def _imagefolder(argument: str, image_size: int, seed: int, options: DataConfig) -> ImageFolder:
    return ImageFolder(argument, _draft_size(options, image_size))


def _wds(argument: str, image_size: int, seed: int, options: DataConfig) -> WebDataset:
    """One in-order pass (train_loader builds the shuffled, endless, per-rank stream itself)."""
    return WebDataset(expand_shards(argument), seed=seed, shuffle=False, epochs=1,
                      draft_size=_draft_size(options, image_size))


def _vqa(argument: str, image_size: int, seed: int, options: DataConfig) -> VQADataset:
    return load_vqa(argument, options.image_root, _draft_size(options, image_size))


def _shapes_icl(argument: str, image_size: int, seed: int, options: DataConfig):
    return shapes_icl(argument, image_size, seed)


def _interleaved(argument: str, image_size: int, seed: int, options: DataConfig) -> InterleavedDocuments:
    return InterleavedDocuments(argument, options.image_root)


def _interleaved_wds(argument: str, image_size: int, seed: int, options: DataConfig) -> InterleavedShards:
    return InterleavedShards(argument, epochs=1)


def _moving_shapes(argument: str, image_size: int, seed: int, options: DataConfig) -> MovingShapesDataset:
    split, _, length = argument.partition(":")
    if length and not length.isdigit():
        raise ValueError(f"moving_shapes:{argument}: the length after the split must be a number of clips")
    return MovingShapesDataset(split or "train", image_size, int(length) if length else None, seed)


def _video_csv(argument: str, image_size: int, seed: int, options: DataConfig) -> ClipFiles:
    return load_video_csv(argument, options.csv_image_key, options.csv_caption_key, options.csv_separator,
                          options.image_root, _draft_size(options, image_size))


def _msrvtt(argument: str, image_size: int, seed: int, options: DataConfig) -> ClipFiles:
    return load_msrvtt(argument, options.image_root, _draft_size(options, image_size))


DATASETS = {"shapes": _shapes, "coco": _coco, "csv": _csv, "imagefolder": _imagefolder, "wds": _wds, "vqa": _vqa,
            "shapes_icl": _shapes_icl, "interleaved": _interleaved, "interleaved_wds": _interleaved_wds,
            "moving_shapes": _moving_shapes, "video_csv": _video_csv, "msrvtt": _msrvtt}
INTERLEAVED = ("shapes_icl", "interleaved", "interleaved_wds")  # sequences of images and text (Flamingo, LMs)
QUESTION_ONLY = ("vqa",)  # specs without captions: neither training nor caption/retrieval evaluation
VIDEO = ("moving_shapes", "video_csv", "msrvtt")  # clips: items carry `frames`, batches (B, frames, 3, H, W)


def is_video_spec(spec: str) -> bool:
    """Whether a spec names clips (VIDEO) rather than images."""
    return spec.partition(":")[0] in VIDEO


def _check_images(spec: str, what: str, instead: str) -> None:
    if is_video_spec(spec):
        raise ValueError(f"{what} '{spec}' holds video clips, not images; {instead}")


def _check_captions(spec: str, what: str) -> None:
    if spec.partition(":")[0] in QUESTION_ONLY:
        raise ValueError(f"{what} '{spec}': vqa specs hold questions and answers, not captions: they serve "
                         f"eval.py --task vqa and decoder finetuning on questions alone")


def build_dataset(spec: str, image_size: int = 64, seed: int = 0, options: DataConfig | None = None,
                  train: bool = False) -> Dataset:
    """'shapes:val' -> a dataset whose items are dicts with at least `image` (PIL) and `caption`.

    options: the data config (image_root, csv_* keys, ...); None for the defaults. train: a training dataset,
    whose JPEGs decode at a reduced scale under data.jpeg_draft; any other decodes at full size, so evaluation
    sees the reference preprocessing's pixels. Fails with FileNotFoundError or ValueError, naming the path,
    when the spec points at nothing usable.
    """
    options = options or DataConfig()
    if not train and options.jpeg_draft:
        options = dataclasses.replace(options, jpeg_draft=False)
    kind, _, argument = spec.partition(":")
    if kind not in DATASETS:
        close = difflib.get_close_matches(kind, DATASETS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ValueError(f"unknown dataset '{kind}' in spec '{spec}'; {hint}known: {', '.join(DATASETS)}")
    return DATASETS[kind](argument, image_size, seed, options)


def captions(spec: str, limit: int | None = None, options: DataConfig | None = None, seed: int = 0,
             questions: bool = False) -> Iterator[str]:
    """The dataset's captions in order, without decoding any image (to train a tokenizer on); with `questions`,
    each item's "question: q answer: a" after its caption where the items have them (shapes)."""
    _check_captions(spec, "captions of")
    base = build_dataset(spec, seed=seed, options=options)
    if spec.partition(":")[0] in INTERLEAVED:  # their text as a language model reads it
        texts = (base.text_only(i) for i in range(len(base))) if hasattr(base, "text_only") else (
            item["text_only"] for item in (base if isinstance(base, IterableDataset) else map(base.__getitem__, range(len(base)))))
    elif isinstance(base, WebDataset):
        texts = _stream_captions(base.shards)
    elif isinstance(base, ImageFiles):  # video_csv and msrvtt too
        texts = iter(base.texts)
    elif isinstance(base, MovingShapesDataset):  # its texts without drawing a frame
        texts = (text for i in range(len(base)) for item in [base.texts(i)]
                 for text in ((item["caption"], f"{VQA_PROMPT.format(item['question'])} {item['answer']}")
                              if questions else (item["caption"],)))
    elif questions and has_questions(base):
        texts = (text for i in range(len(base)) for item in [base[i]]
                 for text in (item["caption"], f"{VQA_PROMPT.format(item['question'])} {item['answer']}"))
    else:
        texts = (base[i]["caption"] for i in range(len(base)))
    for count, text in enumerate(texts):
        if limit is not None and count >= limit:
            return
        yield text


def _stream_captions(shards: list[str]) -> Iterator[str]:
    for shard in shards:
        for record in shard_records(shard):
            try:
                if isinstance(record, BadSample):
                    raise record
                check_record(record, record["__key__"])
                yield clean_caption(record["txt"], record["__key__"])
            except BadSample:
                continue  # training skips it too


def _augment(item: dict, transform, seed: int, epoch: int, index: int) -> dict:
    """The item's image through `transform`, or a clip's frames, each through the same draws (so the same crop),
    stacked (frames, 3, H, W)."""
    state = hash((seed, epoch, index)) % 2**63
    with torch.random.fork_rng(devices=[]):
        # the CPU generator only: torch.manual_seed also seeds every accelerator backend, ~0.5 ms a call
        pictures = []
        for picture in item["frames"] if "frames" in item else [item["image"]]:
            torch.default_generator.manual_seed(state)  # each frame of a clip the same draws: the same crop
            pictures.append(transform(picture))
        image = torch.stack(pictures) if "frames" in item else pictures[0]  # (frames, 3, H, W) or (3, H, W)
    texts = {name: item[name] for name in ("caption", "question", "answer") if name in item}  # vqa: no caption
    return {"image": image, "label": item.get("label", -1), "key": item.get("key", ""), **texts}


def _read_or_next(read, index: int, size: int) -> tuple[dict, dict]:
    """read(index), or if that is a BadSample, read(index + k) for the first k that is not.

    Returns the item and its bad-sample fields: only index's own failure counts (a neighbour that also
    fails is counted when its own index comes up), so an epoch counts each bad sample once.
    """
    try:
        return read(index), {"bad": 0, "bad_examples": [], "seen": 1}
    except BadSample as error:
        first = error
    for step in range(1, min(MAX_CONSECUTIVE_BAD, size)):
        try:
            return read((index + step) % size), {"bad": 1, "bad_examples": [str(first)], "seen": 1}
        except BadSample:
            continue
    raise BadInput(f"index {index} and the {min(MAX_CONSECUTIVE_BAD, size) - 1} after it cannot be read, e.g. "
                   f"{first}")


class ImageTextDataset(Dataset):
    """Decode and augment one sample (Collate tokenizes); indexed by (epoch, index) so augmentation is reproducible.
    negatives: each sample also gets its base's `negative_caption` (shapes: attributes exchanged between objects)."""

    def __init__(self, base: Dataset, transform, seed: int = 0, negatives: bool = False):
        self.base, self.transform, self.seed, self.negatives = base, transform, seed, negatives

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        item, bad_fields = _read_or_next(self.base.__getitem__, index, len(self.base))
        sample = _augment(item, self.transform, self.seed, epoch, index)
        if self.negatives:
            sample["negative_caption"] = self.base.negative_caption(index)
        return {**sample, "index": index, **bad_fields}


class VideoTextDataset(ImageTextDataset):
    """ImageTextDataset for clips: `frames` frames sampled uniformly from each (data/video.py), at offsets drawn from
    (seed, epoch, index) when `train`, at each segment's middle otherwise; the same crop for all of a clip's frames.
    The training transform never flips (data/transforms.py), so "moves left" stays true.

    reverse (moving_shapes only, video.reverse_negatives): each item also carries `reversed_image`, exactly its
    sampled frames in reverse order under the same crop, and `reversed_caption`, the caption of the reversed clip
    (data/moving_shapes.py's `reverse`). A still clip is its own reversal, and a second copy of its pair in the batch
    would be a duplicate positive; its reversed slot instead holds the reversal of the next clip with events (index
    i + 1, i + 2, ..., at that clip's own training offsets), so every process still has two rows a clip."""

    def __init__(self, base: Dataset, transform, seed: int = 0, frames: int = 8, train: bool = False,
                 reverse: bool = False):
        super().__init__(base, transform, seed)
        if reverse and not isinstance(base, MovingShapesDataset):
            raise ValueError("reversed clips (video.reverse_negatives) need moving_shapes clips, whose time reversal "
                             "has a known caption")
        self.frames, self.train, self.reverse = frames, train, reverse

    def __getitem__(self, key) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)

        def read(i: int) -> dict:
            offsets = training_offsets(self.seed, epoch, i, self.frames) if self.train else None
            return self.base.item(i, self.frames, offsets)

        item, bad_fields = _read_or_next(read, index, len(self.base))
        if not self.reverse:
            return {**_augment(item, self.transform, self.seed, epoch, index), "index": index, **bad_fields}
        source = self._reversible(index)
        other = item if source == index else read(source)
        # both clips' frames through the same draws (_augment): the reversed clip gets exactly the same crop
        sample = _augment({**item, "frames": item["frames"] + other["frames"][::-1]}, self.transform, self.seed,
                          epoch, index)
        image = sample.pop("image")  # (2 * frames, 3, H, W)
        return {**sample, "image": image[: self.frames], "reversed_image": image[self.frames :],
                "reversed_caption": moving_shapes.caption(moving_shapes.reverse(self.base.describe(source))),
                "index": index, **bad_fields}

    def _reversible(self, index: int) -> int:
        """index, or for a still clip (its own reversal) the next clip with events."""
        for step in range(len(self.base)):
            if self.base.describe((index + step) % len(self.base)).events:
                return (index + step) % len(self.base)
        raise ValueError(f"moving_shapes:{self.base.split} of {len(self.base)} clips has no clip with events to "
                         f"reverse (video.reverse_negatives)")


class ImageTextStream(IterableDataset):
    """ImageTextDataset for a WebDataset stream; augmentation seeded by (seed, epoch, sample key)."""

    def __init__(self, stream: WebDataset, transform, seed: int = 0):
        self.stream, self.transform, self.seed = stream, transform, seed

    def __iter__(self) -> Iterator[dict]:
        for item in self.stream:
            index = zlib.crc32(item["key"].encode())  # str hashes differ between processes; crc32 does not
            sample = _augment(item, self.transform, self.seed, item["epoch"], index)
            # a stream skips bad samples, so this item stands for itself and the bad ones before it
            yield {**sample, "index": -1, "bad": item["bad"], "bad_examples": item["bad_examples"],
                   "seen": 1 + item["bad"]}


def micro_batch_size(batch_size: int, world_size: int, accum_steps: int) -> int:
    if batch_size % (world_size * accum_steps):
        raise ValueError(
            f"train.batch_size={batch_size} must divide evenly into {world_size} processes "
            f"x {accum_steps} accumulation steps"
        )
    return batch_size // (world_size * accum_steps)


class GlobalBatchSampler(Sampler):
    """Yields this process's micro-batches of (epoch, index) keys, step after step, from `start_step`.

    Global batch s = positions [s*B, (s+1)*B) of the endless sequence perm_0, perm_1, ... (one random
    permutation of the dataset per epoch). Process r takes the r-th of W equal slices and cuts it into
    `accum_steps` micro-batches.
    """

    def __init__(self, dataset_size, batch_size, steps, rank=0, world_size=1, accum_steps=1, seed=0, start_step=0):
        micro_batch_size(batch_size, world_size, accum_steps)
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


def _init_worker(worker_id: int) -> None:
    # A worker that ignores SIGTERM (below) would outlive a parent killed by SIGKILL (the OOM killer, `kill -9`)
    # and keep its memory and files: the kernel sends it SIGKILL when the parent dies.
    end_with_parent(signal.SIGKILL)
    # A scheduler's SIGTERM (preemption, `scancel`) often reaches the whole process group, as Ctrl-C's SIGINT
    # does. The training process answers either by finishing its step and writing a checkpoint, which needs
    # its data workers alive until then; they are shut down with the loader (see `shutdown_workers`).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# Worker processes are stopped when their loader iterator is garbage-collected. An iterator caught in
# a reference cycle, or kept alive by a traceback, lives until interpreter exit, where multiprocessing
# terminates daemonic children with SIGTERM (which the workers ignore, see above) and then joins them
# forever. So every multi-worker iterator is tracked here, and `shutdown_workers` stops them
# explicitly: train.py calls it on every way out, and it runs at exit before multiprocessing's hook.
_worker_iterators: "weakref.WeakSet" = weakref.WeakSet()


class _TrackedLoader(DataLoader):
    def _get_iterator(self):
        iterator = super()._get_iterator()
        if self.num_workers > 0:
            _worker_iterators.add(iterator)
        return iterator


def shutdown_workers() -> None:
    """Stop the worker processes of every live multi-worker loader iterator (idempotent)."""
    for iterator in list(_worker_iterators):
        iterator._shutdown_workers()  # asks each worker to exit (a None index) and joins it
    _worker_iterators.clear()


# atexit runs its handlers last-registered first: this one runs before multiprocessing's (registered when
# torch imported multiprocessing), so no worker is left for it to terminate and join.
atexit.register(shutdown_workers)


class Collate:
    """Items -> batch. Captions are tokenized here, one call per batch: a sentencepiece call costs
    ~0.3 ms however short its list, 15 times the per-caption cost in a batch of 64.

    Decoder rows, when a recipe asks for them (BLIP's): with qa_fraction > 0 and items that carry a question and
    answer (shapes, vqa), or with a prompt, the batch also gets
    `decoder_tokens`, each row the prompt and caption or, for a fixed share of the images (chosen by a hash of the
    key, so any world size and a resumed run choose the same; all of them at qa_fraction 1), "question: q answer:
    a", with `prompt_lengths` telling the LM loss where the text to learn starts."""

    def __init__(self, tokenizer=None, qa_fraction: float = 0.0, prompt: str = ""):
        self.tokenizer, self.qa_fraction, self.prompt = tokenizer, qa_fraction, prompt

    def __call__(self, items: list[dict]) -> dict:
        batch = {
            "image": torch.stack([item["image"] for item in items]),
            "label": torch.tensor([item["label"] for item in items]),
            "index": torch.tensor([item["index"] for item in items]),
            "key": [item["key"] for item in items],
            # bad-sample accounting: unreadable samples behind each slot, and all samples each slot stands for
            "bad": torch.tensor([item["bad"] for item in items]),
            "seen": torch.tensor([item["seen"] for item in items]),
            "bad_examples": [example for item in items for example in item["bad_examples"]][:MAX_EXAMPLES],
        }
        if "caption" in items[0]:
            batch["caption"] = [item["caption"] for item in items]
            batch["tokens"] = self.tokenizer(batch["caption"])
        if "reversed_caption" in items[0]:  # clips reversed in time (VideoTextDataset's reverse)
            batch["reversed_image"] = torch.stack([item["reversed_image"] for item in items])
            batch["reversed_tokens"] = self.tokenizer([item["reversed_caption"] for item in items])
        if "question" in items[0]:  # a family that builds its own rows from them (LLaVA's conversations)
            batch["question"] = [item["question"] for item in items]
            batch["answer"] = [item.get("answer", "") for item in items]
        if "negative_caption" in items[0]:  # "" where a sample has none
            batch["negative_tokens"] = self.tokenizer([item["negative_caption"] for item in items])
            batch["has_negative"] = torch.tensor([bool(item["negative_caption"]) for item in items])
        if self.prompt or (self.qa_fraction > 0 and "question" in items[0]):
            batch.update(self.decoder_rows(items, batch.get("tokens")))
        return batch

    def decoder_rows(self, items: list[dict], tokens: torch.Tensor | None) -> dict:
        size = len(items)
        if self.prompt and tokens is not None:
            decoder_tokens = self.tokenizer([self.prompt + item["caption"] for item in items])
            (prompt,) = text_ids(self.tokenizer, [self.prompt], self.tokenizer.eos_id)
            prompt_lengths = torch.full((size,), 1 + len(prompt), dtype=torch.long)  # the start token and prompt
        else:
            decoder_tokens = self.tokenizer([""] * size) if tokens is None else tokens.clone()
            prompt_lengths = torch.zeros(size, dtype=torch.long)
        chosen = torch.tensor([self.qa_fraction >= 1 or "caption" not in item or
                               zlib.crc32(f"qa/{item['key']}".encode()) % 10_000 < self.qa_fraction * 10_000
                               for item in items]) if "question" in items[0] else torch.zeros(size, dtype=torch.bool)
        if chosen.any():
            picked = [item for item, use in zip(items, chosen) if use]
            rows, lengths = question_answer_rows(self.tokenizer, [item["question"] for item in picked],
                                                 [item["answer"] for item in picked], decoder_tokens.shape[1])
            decoder_tokens[chosen], prompt_lengths[chosen] = rows, lengths
        return {"decoder_tokens": decoder_tokens, "prompt_lengths": prompt_lengths}


def _loader(dataset: Dataset, collate, workers: int, **kwargs) -> DataLoader:
    """A tracked DataLoader (its workers ignore SIGTERM, are shut down with the run and killed with their parent)
    collating with `collate`.

    Its own generator: each iterator draws a base seed for its workers, from the global RNG when the loader has none.
    A resumed run restores the global RNG of its checkpoint and then starts a new iterator; that draw would shift
    every later dropout and drop-path mask away from the uninterrupted run's. Augmentation does not use the base
    seed (it is keyed by seed, epoch and index), so the samples do not depend on it."""
    return _TrackedLoader(dataset, num_workers=workers, collate_fn=collate, worker_init_fn=_init_worker,
                          prefetch_factor=4 if workers else None, generator=torch.Generator().manual_seed(0),
                          **kwargs)


class InterleavedItems(Dataset):
    """Items of an interleaved map-style dataset by (epoch, index) key; text_only: only the text (no images drawn)."""

    def __init__(self, base: Dataset, text_only: bool = False, induction_fraction: float = 0.0, seed: int = 0):
        self.base, self.text_only = base, text_only
        self.induction_fraction, self.seed = induction_fraction, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        if self.induction_fraction:  # by (seed, epoch, index) alone: the same rows for any number of processes
            rng = np.random.default_rng([self.seed, epoch, index, 0x1D])
            if rng.random() < self.induction_fraction:
                return {"induction_seed": int(rng.integers(2**31)), "key": str(index)}
        if self.text_only and hasattr(self.base, "text_only"):
            return {"text_only": self.base.text_only(index), "key": str(index)}
        item, bad_fields = _read_or_next(self.base.__getitem__, index, len(self.base))
        return {**item, **bad_fields}


def interleaved_loader(cfg, tokenizer, rank: int, world_size: int, start_step: int = 0, text_only: bool = False,
                       induction_fraction: float = 0.0) -> DataLoader:
    """train_loader for interleaved specs: batches of tokens (B, L) and images (B, T_media, 3, H, W)."""
    data, train = cfg.data, cfg.train
    micro = micro_batch_size(train.batch_size, world_size, train.accum_steps)
    collate = InterleavedCollate(tokenizer, data.image_size, data.context_length, text_only)
    kind, _, argument = data.train.partition(":")
    if kind == "interleaved_wds":
        stream = InterleavedShards(argument, rank, world_size)
        return _loader(stream, collate, min(data.workers, 1), batch_size=micro)
    dataset = InterleavedItems(build_dataset(data.train, data.image_size, cfg.seed, data), text_only,
                               induction_fraction, cfg.seed)
    sampler = GlobalBatchSampler(len(dataset), train.batch_size, train.steps, rank, world_size,
                                 train.accum_steps, cfg.seed, start_step)
    return _loader(dataset, collate, data.workers, batch_sampler=sampler)


def train_loader(cfg, tokenizer, rank: int, world_size: int, start_step: int = 0, text_only: bool = False,
                 qa_fraction: float = 0.0, prompt: str = "", induction_fraction: float = 0.0,
                 negatives: bool = False, frames: int = 0, reverse: bool = False) -> DataLoader:
    """This process's micro-batches (image, tokens, label, key, bad, bad_examples), from `start_step` on.

    text_only (interleaved specs): the text alone, for a language model; induction_fraction: that share of rows
    synthetic induction rows (InterleavedItems). qa_fraction and prompt: decoder rows for a family whose recipe asks
    for them (see Collate), on every spec kind, streams included. negatives: each sample's `negative_caption` as
    `negative_tokens` and `has_negative` (shapes specs: data/shapes.py's binding_negative). frames: video specs
    (VIDEO) only, and needed there: each clip's number of frames, batches' `image` (B, frames, 3, H, W). reverse
    (moving_shapes): each clip reversed in time as `reversed_image` with `reversed_tokens` (VideoTextDataset).

    Map-style specs go through GlobalBatchSampler and stop after train.steps; a wds stream never ends.
    With wds, each process uses at most as many workers as it has shards (the others would idle).
    """
    if cfg.data.train.partition(":")[0] in INTERLEAVED:
        return interleaved_loader(cfg, tokenizer, rank, world_size, start_step, text_only, induction_fraction)
    data, train = cfg.data, cfg.train
    transform = image_transform(data.image_size, train=True)
    micro = micro_batch_size(train.batch_size, world_size, train.accum_steps)
    if qa_fraction < 1:  # training on questions alone (qa_fraction 1) needs no captions
        _check_captions(data.train, "data.train")
    kind, _, argument = data.train.partition(":")
    if kind == "wds":
        shards = expand_shards(argument)
        stream = WebDataset(shards, rank, world_size, cfg.seed, data.shuffle_buffer,
                            skip_batches=start_step * train.accum_steps, batch_size=micro,
                            draft_size=_draft_size(data, data.image_size))
        workers = min(data.workers, len(shards) // world_size)
        collate = Collate(tokenizer, qa_fraction, prompt)
        return _loader(ImageTextStream(stream, transform, cfg.seed), collate, workers, batch_size=micro)
    if is_video_spec(data.train) != (frames > 0):
        raise ValueError(f"data.train '{data.train}' is a video spec: train on it with a number of frames per clip "
                         f"(a video recipe, video.frames)" if frames <= 0 else
                         f"data.train '{data.train}' holds images: frames={frames} applies to video specs only "
                         f"({', '.join(VIDEO)})")
    base = build_dataset(data.train, data.image_size, cfg.seed, data, train=True)
    if reverse and not isinstance(base, MovingShapesDataset):
        raise ValueError(f"data.train: '{data.train}' has no time-reversed captions (moving_shapes specs do)")
    if negatives and not hasattr(base, "negative_caption"):
        raise ValueError(f"data.train: '{data.train}' has no attribute-swapped negative captions (shapes specs do)")
    if frames:
        dataset = VideoTextDataset(base, transform, cfg.seed, frames, train=True, reverse=reverse)
    else:
        dataset = ImageTextDataset(base, transform, cfg.seed, negatives)
    sampler = GlobalBatchSampler(len(dataset), train.batch_size, train.steps, rank, world_size,
                                 train.accum_steps, cfg.seed, start_step)
    collate = Collate(tokenizer, qa_fraction, prompt)
    return _loader(dataset, collate, data.workers, batch_sampler=sampler)


def skipped_rows(loader: DataLoader) -> BadSampleCount:
    """Index rows train_loader's dataset left out when it was built (malformed CSV or JSON rows), if any."""
    base = getattr(loader.dataset, "base", None)  # a wds stream has no index
    return base.skipped_rows if isinstance(base, ImageFiles) else BadSampleCount()


def unreadable_start(dataset: Dataset, count: int = 16) -> list[str]:
    """The first `count` items' read failures (messages; empty when all could be read)."""
    failures = []
    for index in range(min(count, len(dataset))):
        try:
            dataset[index]
        except BadSample as error:
            failures.append(str(error))
    return failures


def map_style_dataset(spec: str, image_size: int, seed: int, options: DataConfig | None) -> Dataset:
    base = build_dataset(spec, image_size, seed, options)
    if isinstance(base, WebDataset):
        raise ValueError(f"{spec}: wds shards are a training format; evaluate on a coco, csv, imagefolder or "
                         f"shapes spec")
    return base


def eval_loader(spec: str, image_size: int, tokenizer, batch_size: int = 256, workers: int = 0, seed: int = 0,
                options: DataConfig | None = None) -> tuple[Dataset, DataLoader]:
    """In-order, unaugmented batches of a whole dataset (for zero-shot and retrieval evaluation)."""
    _check_images(spec, "eval_loader:", "evaluate it with video_retrieval_loader")
    base = map_style_dataset(spec, image_size, seed, options)
    dataset = ImageTextDataset(base, image_transform(image_size, train=False), seed)
    return base, _loader(dataset, Collate(tokenizer), workers, batch_size=batch_size)


class UniqueImages(Dataset):
    """The distinct images of a dataset, in order; an unreadable one is replaced by the next (and counted)."""

    def __init__(self, base: ImageFiles, transform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base.image_paths)

    def __getitem__(self, index: int) -> dict:
        image, bad_fields = _read_or_next(self.base.image, index, len(self))
        return {"image": self.transform(image), "label": -1, "index": index, "key": self.base.image_paths[index],
                **bad_fields}


def _unique_images(spec: str, image_size: int, seed: int, options: DataConfig | None):
    """(dataset of the unique images in order, all captions, text_to_image): captions that share an image file
    (COCO's five per image, repeated CSV paths) map to one image; datasets without files (shapes) have one
    caption per image."""
    _check_captions(spec, "captions of")
    _check_images(spec, "retrieval over", "evaluate it with video_retrieval_loader (eval.py --task video_retrieval)")
    base = map_style_dataset(spec, image_size, seed, options)
    transform = image_transform(image_size, train=False)
    if isinstance(base, ImageFiles):
        return UniqueImages(base, transform), list(base.texts), list(base.image_of)
    texts = [base[i]["caption"] for i in range(len(base))]
    return ImageTextDataset(base, transform, seed), texts, list(range(len(base)))


def retrieval_loader(spec: str, image_size: int, tokenizer, batch_size: int = 256, workers: int = 0, seed: int = 0,
                     options: DataConfig | None = None) -> tuple[DataLoader, torch.Tensor, torch.Tensor]:
    """(loader over the unique images in order, text tokens (T, L), text_to_image (T,)); see _unique_images."""
    images, texts, text_to_image = _unique_images(spec, image_size, seed, options)
    loader = _loader(images, Collate(tokenizer), workers, batch_size=batch_size)
    return loader, tokenizer(texts), torch.tensor(text_to_image, dtype=torch.long)


class UniqueClips(Dataset):
    """The distinct clips of a video_csv or msrvtt dataset, in order, `frames` frames each at evaluation sampling; an
    unreadable one is replaced by the next (and counted)."""

    def __init__(self, base: ClipFiles, transform, frames: int):
        self.base, self.transform, self.frames = base, transform, frames

    def __len__(self) -> int:
        return len(self.base.image_paths)

    def __getitem__(self, index: int) -> dict:
        clip, bad_fields = _read_or_next(lambda i: self.base.clip(i, self.frames), index, len(self))
        return {"image": torch.stack([self.transform(frame) for frame in clip]), "label": -1, "index": index,
                "key": self.base.image_paths[index], **bad_fields}


def video_retrieval_loader(spec: str, image_size: int, frames: int, tokenizer, batch_size: int = 256,
                           workers: int = 0, seed: int = 0, options: DataConfig | None = None
                           ) -> tuple[DataLoader, torch.Tensor, torch.Tensor]:
    """(loader over the unique clips in order, batches' `image` (B, frames, 3, H, W); text tokens (T, L) of every
    caption; text_to_video (T,), the clip of each caption). Clips of several captions (video_csv rows naming one
    file, MSR-VTT's twenty sentences) appear once; moving_shapes has one caption per clip."""
    if not is_video_spec(spec):
        raise ValueError(f"video retrieval over '{spec}': not a video spec ({', '.join(VIDEO)})")
    if frames <= 0:
        raise ValueError(f"video retrieval over '{spec}' needs frames > 0 per clip, got {frames}")
    base = map_style_dataset(spec, image_size, seed, options)
    transform = image_transform(image_size, train=False)
    if isinstance(base, ClipFiles):
        clips, texts, text_to_video = UniqueClips(base, transform, frames), list(base.texts), list(base.image_of)
    else:
        clips = VideoTextDataset(base, transform, seed, frames, train=False)
        texts, text_to_video = [base.texts(i)["caption"] for i in range(len(base))], list(range(len(base)))
    loader = _loader(clips, Collate(tokenizer), workers, batch_size=batch_size)
    return loader, tokenizer(texts), torch.tensor(text_to_video, dtype=torch.long)


def caption_loader(spec: str, image_size: int, batch_size: int = 256, workers: int = 0, seed: int = 0,
                   options: DataConfig | None = None) -> tuple[DataLoader, list[list[str]]]:
    """(loader over the unique images in order, references): references[i] are all captions of image i (a batch's
    `index`), the ground truth of captioning."""
    images, texts, text_to_image = _unique_images(spec, image_size, seed, options)
    references = [[] for _ in range(len(images))]
    for text, image in zip(texts, text_to_image):
        references[image].append(text)
    return _loader(images, Collate(_no_tokens), workers, batch_size=batch_size), references


def _no_tokens(texts: list[str]) -> None:  # Collate's tokenizer where the captions are not needed as tokens
    return None


def has_questions(dataset: Dataset) -> bool:
    """Whether a dataset's items carry a question and its answer(s): shapes and vqa."""
    return isinstance(dataset, (ShapesDataset, VQADataset))


class Questions(Dataset):
    """Unaugmented items (image, question, answers, question_id) of shapes or vqa; one answer is a list of one."""

    def __init__(self, base: Dataset, transform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        item, bad_fields = _read_or_next(self.base.__getitem__, index, len(self.base))
        if bad_fields["bad"]:  # a neighbour's item: only its image stands in
            item = {**self.base.question_item(index), "image": item["image"]}
        answers = item.get("answers", [item["answer"]] if "answer" in item else None)
        return {"image": self.transform(item["image"]), "question": item["question"], "answers": answers,
                "question_id": item.get("question_id", index), "key": item["key"], "index": index, **bad_fields}


def _collate_questions(items: list[dict]) -> dict:
    batch = {key: [item[key] for item in items] for key in ("question", "answers", "question_id", "key")}
    batch["image"] = torch.stack([item["image"] for item in items])
    batch["bad"] = torch.tensor([item["bad"] for item in items])
    batch["bad_examples"] = [example for item in items for example in item["bad_examples"]][:MAX_EXAMPLES]
    return batch


def question_loader(spec: str, image_size: int, batch_size: int = 256, workers: int = 0, seed: int = 0,
                    options: DataConfig | None = None) -> tuple[Dataset, DataLoader]:
    """(dataset, in-order batches of image, question, answers (None without annotations), question_id, key) of a
    shapes or vqa spec, for VQA evaluation."""
    _check_images(spec, "VQA over", "its questions are not evaluated over clips yet")
    base = map_style_dataset(spec, image_size, seed, options)
    if not has_questions(base):
        raise ValueError(f"{spec}: no questions; VQA evaluation needs a shapes or vqa:QUESTIONS#ANNOTATIONS spec")
    loader = _loader(Questions(base, image_transform(image_size, train=False)), _collate_questions, workers,
                     batch_size=batch_size)
    return base, loader
