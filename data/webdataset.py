"""`wds:PATTERN`: image-text pairs streamed from WebDataset tar shards (Breuel et al.'s `webdataset` layout).

A shard is a plain tar whose members are grouped by key: `KEY.jpg` (or .jpeg, .png, .webp) and `KEY.txt`
(the caption, UTF-8), consecutive. PATTERN is a shard path, a directory (every .tar in it), a glob
(`shards/*.tar`), or a brace pattern (`shards/{00000..00099}.tar`, `{a,b}`). Shards are read as
streams (tarfile mode "r|*"): nothing is extracted to disk and no index is needed.

Each epoch the shard list is shuffled with a generator seeded by (seed, epoch) and dealt out to the
`world_size x num_workers` readers: reader c = rank * num_workers + worker takes shards c, c + C,
c + 2C, ... of that order, so every sample is read exactly once per epoch over all ranks and workers.
A reader passes its samples through a shuffle buffer (seeded by (seed, epoch, reader)), decodes the
image only as it leaves the buffer, and starts over with the next epoch when its shards run out: a
training stream never ends, and readers whose shards hold fewer samples simply begin the next epoch
sooner. Deliberate differences from the `webdataset` package: no resampling with replacement, no
URL or pipe sources, and no dependency.

Bad samples: a record without an image or caption, an image that will not decode, an empty or
non-UTF-8 caption, and an unreadable (zero-byte, truncated, corrupt) shard are skipped and counted
(a broken shard counts once; the samples before the damage are still used). The count rides on the
next good sample (`bad`, `bad_examples`), as for the map-style datasets.

Resuming: `skip_batches` makes reader k skip the records of the micro-batches the interrupted run's
loader had taken from it (DataLoader takes batch i from worker i % num_workers). Records are skipped
without decoding, so a resumed run is exact unless images failed to decode before the interruption,
in which case it is off by that many samples.
"""
import glob
import os
import random
import re
import tarfile
from typing import Iterator

from torch.utils.data import IterableDataset, get_worker_info

from data.bad_samples import MAX_EXAMPLES, BadSample, clean_caption, open_image

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")  # member extensions read as the image, in this order
SHUFFLE_START = 100  # records in the shuffle buffer before it yields the first


def expand_braces(pattern: str) -> list[str]:
    """'s/{000..002}.tar' -> ['s/000.tar', 's/001.tar', 's/002.tar']; '{a,b}' -> both; nests left to right."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end():]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") else 0  # {00000..00099} keeps its zero padding
        options = [f"{i:0{width}d}" for i in range(int(first), int(last) + 1)]
    else:
        options = body.split(",")
    return [path for option in options for path in expand_braces(head + option + tail)]


def expand_shards(pattern: str) -> list[str]:
    """The shard paths a pattern names, in order; fails naming the pattern if any is missing or none match."""
    if os.path.isdir(pattern):
        shards = sorted(glob.glob(os.path.join(pattern, "*.tar")))
    elif any(char in pattern for char in "*?["):
        shards = sorted(glob.glob(pattern))
    else:
        shards = expand_braces(pattern)
    if not shards:
        raise FileNotFoundError(f"wds: no shards match '{pattern}'")
    missing = [shard for shard in shards if not os.path.isfile(shard)]
    if missing:
        raise FileNotFoundError(f"wds: {len(missing)} of the {len(shards)} shards of '{pattern}' do not exist: "
                                f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}")
    return shards


def shard_records(shard: str) -> Iterator[dict | BadSample]:
    """Stream one tar shard: {'__key__': key, 'jpg': bytes, 'txt': bytes, ...} per key, in file order.

    A damaged shard ends with one BadSample (records before the damage were already yielded); the
    record being read when it broke is dropped with it.
    """
    record: dict = {}
    try:
        with open(shard, "rb") as file, tarfile.open(fileobj=file, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                directory, name = os.path.split(member.name)
                stem, _, extension = name.partition(".")  # webdataset: the key ends at the first dot
                key = os.path.join(directory, stem)
                if record and record["__key__"] != key:
                    yield record
                    record = {}
                record.setdefault("__key__", key)
                record[extension.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        yield BadSample(shard, f"unreadable tar ({error})")
        return
    if record:
        yield record


def is_complete(record: dict) -> bool:
    return "txt" in record and any(extension in record for extension in IMAGE_MEMBERS)


def check_record(record: dict, where: str) -> str:
    """The image member's extension of a complete record; raises BadSample if the image or caption is missing."""
    extension = next((e for e in IMAGE_MEMBERS if e in record), None)
    if extension is None:
        raise BadSample(where, f"no image ({'/'.join(IMAGE_MEMBERS)}) in the record")
    if "txt" not in record:
        raise BadSample(where, "no caption (.txt) in the record")
    return extension


class WebDataset(IterableDataset):
    """Items: dict(image=PIL RGB, caption, key='shard:key', epoch, bad, bad_examples).

    epochs=None streams forever (training); an int stops after that many passes. shuffle=False reads
    shards and records in order (evaluation, `captions`).
    """

    def __init__(
        self,
        shards: list[str],
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        shuffle: bool = True,
        epochs: int | None = None,
        skip_batches: int = 0,
        batch_size: int = 1,
        draft_size: int = 0,
    ):
        if len(shards) < world_size:
            raise ValueError(f"wds: {len(shards)} shards cannot feed {world_size} processes (each needs at least "
                             f"one); write smaller shards (python -m data.make_shards --shard-size)")
        self.shards, self.rank, self.world_size, self.seed = shards, rank, world_size, seed
        self.shuffle_buffer, self.shuffle, self.epochs = shuffle_buffer, shuffle, epochs
        self.skip_batches, self.batch_size, self.draft_size = skip_batches, batch_size, draft_size

    def reader_shards(self, epoch: int, reader: int, readers: int) -> list[str]:
        """The shards reader `reader` of `readers` reads in `epoch`."""
        order = list(self.shards)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order[reader::readers]

    def records(self, epoch: int, reader: int, readers: int) -> Iterator[dict | BadSample]:
        """One epoch of one reader's undecoded records (after the shuffle buffer) and the bad ones."""
        rng = random.Random((self.seed * 1_000_003 + epoch) * 65_537 + reader)
        buffer, reads = [], 0
        for shard in self.reader_shards(epoch, reader, readers):
            for record in shard_records(shard):
                if isinstance(record, BadSample):
                    yield record
                    continue
                record["__key__"] = f"{shard}:{record['__key__']}"
                if not self.shuffle or self.shuffle_buffer <= 1:
                    yield record
                    continue
                buffer.append(record)
                reads += 1
                # Start yielding once SHUFFLE_START records are in, one per two reads until the buffer is
                # full (as webdataset's `initial`): the first batch need not wait for a full buffer.
                if len(buffer) >= self.shuffle_buffer or (len(buffer) >= SHUFFLE_START and reads % 2 == 0):
                    i = rng.randrange(len(buffer))
                    buffer[i], buffer[-1] = buffer[-1], buffer[i]  # swap to the end and pop: O(1)
                    yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def decode(self, record: dict) -> dict:
        """Record -> item; raises BadSample."""
        where = record["__key__"]
        extension = check_record(record, where)
        return {
            "caption": clean_caption(record["txt"], where),
            "image": open_image(record[extension], where, self.draft_size),
            "key": where,
        }

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        reader, readers = self.rank * num_workers + worker_id, self.world_size * num_workers
        # DataLoader takes micro-batch i from worker i % num_workers: this worker produced these before
        to_skip = len(range(worker_id, self.skip_batches, num_workers)) * self.batch_size
        bad, examples = 0, []
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            good = 0
            for record in self.records(epoch, reader, readers):
                if to_skip:  # the interrupted run used (and counted) these; only complete records filled a slot
                    if not isinstance(record, BadSample) and is_complete(record):
                        to_skip, good = to_skip - 1, good + 1
                    continue
                try:
                    if isinstance(record, BadSample):
                        raise record
                    item = self.decode(record)
                except BadSample as error:
                    bad += 1
                    examples = (examples + [str(error)])[:MAX_EXAMPLES]
                    continue
                good += 1
                yield {**item, "epoch": epoch, "bad": bad, "bad_examples": examples}
                bad, examples = 0, []
            if good == 0 and self.epochs is None:
                shards = self.reader_shards(epoch, reader, readers)
                # an endless stream would otherwise spin here forever
                raise RuntimeError(f"wds: reader {reader} (rank {self.rank}, worker {worker_id}) got no usable sample "
                                   f"from its shards {', '.join(shards[:3])}{', ...' if len(shards) > 3 else ''} "
                                   f"in epoch {epoch}; errors: {'; '.join(examples) or 'none'}")
            epoch += 1
