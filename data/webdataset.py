"""`wds:PATTERN`: image-text pairs streamed from WebDataset tar shards (Breuel et al.'s `webdataset` layout).

A shard is a plain tar whose members are grouped by key: `KEY.jpg` (or .jpeg, .png, .webp) and `KEY.txt`
(the caption, UTF-8), consecutive. PATTERN is a shard path, a directory (every .tar in it), a glob
(`shards/*.tar`), or a brace pattern (`shards/{00000..00099}.tar`, `{a,b}`). Shards are read as
streams: nothing is extracted to disk and no index is needed.

The tar reader (`iter_tar_members`) is our own, not `tarfile`, whose header parsing cost ~55 us a
member (two members a sample). It reads POSIX ustar, GNU (long names, base-256 sizes) and pax
(`path`, `size`) archives, gzip/bzip2/xz compressed ones too (as tarfile's "r|*" did), verifies every
header checksum, and yields regular files only. Deliberate differences from tarfile: a bad checksum,
or a file that ends inside a header, is damage wherever it is (tarfile took it for the end of the
archive after the first member, silently dropping the rest of the shard), and so are malformed pax
records; pax global headers ('g') are ignored; GNU sparse members are refused.

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
import bz2
import glob
import gzip
import io
import lzma
import os
import random
import re
import zlib
from typing import BinaryIO, Callable, Iterator

from torch.utils.data import IterableDataset, get_worker_info

from crossmodal.data.bad_samples import MAX_EXAMPLES, BadSample, clean_caption, open_image

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")  # member extensions read as the image, in this order
SHUFFLE_START = 100  # records in the shuffle buffer before it yields the first
BLOCK = 512  # tar headers, and each member's data padded up, fill 512-byte blocks
ZERO_BLOCK = bytes(BLOCK)
CHUNK = 1 << 20  # read size of the shard file, and of a big member's data
REGULAR_TYPES = (b"0", b"\0", b"7")  # '7' (contiguous file) is a regular file to every reader, tarfile included
NEXT_MEMBER_TYPES = (b"L", b"K", b"x")  # GNU long name, GNU long link name, pax header: describe the next member
NO_DATA_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, fifos: no data (as tarfile)


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


class TarFormatError(ValueError):
    """The bytes are not a well-formed tar archive: a bad header or checksum, or the file ends inside a member.

    `member` names the member whose data was cut or is refused (its header was read); None when the damage is in
    a header or in the data of an 'L', 'K', 'x' or 'g' header.
    """

    def __init__(self, message: str, member: str | None = None):
        super().__init__(message)
        self.member = member


def tar_number(field: bytes) -> int:
    """A numeric header field: octal digits ended by NUL or space, or GNU's base-256 form (first byte 0x80)."""
    if field[0] == 0x80:
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip(b" ")
    if digits.strip(b"01234567"):  # anything but octal digits (0xff, negative base-256, included)
        raise TarFormatError(f"invalid number field {field!r}")
    return int(digits, 8) if digits else 0  # an empty field is 0, as for tarfile


def tar_text(field: bytes) -> str:
    # tarfile's decoding on a UTF-8 system: bytes that are not UTF-8 survive as surrogates
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def header_checksum(header: bytes) -> int:
    """The ustar checksum: the header's byte sum with the checksum field (148:156) counted as 8 spaces."""
    # zlib.adler32's low 16 bits are 1 + the byte sum mod 65521: exact for 256 bytes (at most 65280), and 4x faster
    # than sum(header)
    byte_sum = (zlib.adler32(header[:256]) & 0xFFFF) + (zlib.adler32(header[256:]) & 0xFFFF) - 2
    return byte_sum - sum(header[148:156]) + 8 * ord(" ")


def read_data(read: Callable[[int], bytes], size: int, offset: int, member: str | None = None) -> bytes:
    """A member's `size` bytes and its padding to the next block; raises TarFormatError if the file ends first."""
    if size <= CHUNK:
        data = read(size)
    else:  # in chunks: a corrupt huge size then fails at the end of the file instead of allocating that size
        chunks, left = [], size
        while left and (chunk := read(min(left, CHUNK))):
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
    padding = -size % BLOCK
    if len(data) < size or len(read(padding)) < padding:
        where = f"'{member}'" if member is not None else "an extended header's data"
        raise TarFormatError(f"unexpected end of data in {where} at byte {offset}", member)
    return data


def pax_records(data: bytes, offset: int) -> dict[bytes, bytes]:
    """{key: value} of a pax extended header's data: records 'LENGTH KEY=VALUE\\n', LENGTH counting the record."""
    records, position = {}, 0
    while position < len(data):
        space = data.find(b" ", position)
        if space <= position or not data[position:space].isdigit():
            raise TarFormatError(f"malformed pax header at byte {offset}")
        end = position + int(data[position:space])
        key, equals, value = data[space + 1:end - 1].partition(b"=")
        if end <= space or end > len(data) or data[end - 1] != ord("\n") or not equals:
            raise TarFormatError(f"malformed pax header at byte {offset}")
        records[key] = value
        position = end
    if any(key.startswith(b"GNU.sparse.") for key in records):
        raise TarFormatError(f"GNU sparse member at byte {offset}: not supported")
    return records


def iter_tar_members(fileobj: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file of an uncompressed tar stream, in order; raises TarFormatError on damage.

    Directories, links and other types are skipped; GNU long names ('L') and pax `path`/`size` records ('x')
    apply to the next member; pax global headers ('g') are ignored. The archive ends at the first zero block
    (the first of the two that close it) or at the end of the file between members. A zero-byte file, a bad
    checksum, a file that ends inside a header or a member's data, or a malformed header raise.
    """
    read = fileobj.read
    offset = 0  # of the current header, for messages
    pending = False  # an 'L', 'K' or 'x' header still waits for its member
    long_name = pax_path = pax_size = None
    while True:
        header = read(BLOCK)
        if len(header) < BLOCK or header == ZERO_BLOCK:
            if 0 < len(header) < BLOCK:
                raise TarFormatError(f"truncated header at byte {offset}")
            if not header and offset == 0:
                raise TarFormatError("empty file")  # tarfile's words: the message about a zero-byte shard stays
            if pending:
                raise TarFormatError(f"the archive ends at byte {offset} before the member its last header names")
            return
        checksum, stored = header_checksum(header), tar_number(header[148:156])
        # old Sun and GNU tars summed signed bytes; tarfile accepts both sums
        if checksum != stored and checksum - 256 * sum(b >= 128 for b in header[:148] + header[156:]) != stored:
            raise TarFormatError(f"bad checksum at byte {offset}")
        typeflag, size = header[156:157], tar_number(header[124:136])
        if typeflag in NEXT_MEMBER_TYPES or typeflag == b"g":
            data = read_data(read, size, offset)
            if typeflag == b"L":
                long_name = tar_text(data)
            elif typeflag == b"x":
                records = pax_records(data, offset)
                pax_path = records[b"path"].decode("utf-8", "surrogateescape") if records.get(b"path") else pax_path
                if records.get(b"size"):
                    if not records[b"size"].isdigit():
                        raise TarFormatError(f"invalid pax size {records[b'size']!r} at byte {offset}")
                    pax_size = int(records[b"size"])
            pending = pending or typeflag != b"g"
            offset += BLOCK + size + -size % BLOCK
            continue
        name = pax_path or long_name or tar_text(header[:100])
        if not (pax_path or long_name) and header[257:263] == b"ustar\0" and header[345]:
            name = tar_text(header[345:500]) + "/" + name  # POSIX ustar splits a long name into prefix/name
        size = size if pax_size is None else pax_size
        if typeflag == b"S":
            raise TarFormatError(f"GNU sparse member '{name}' at byte {offset}: not supported", name)
        if typeflag in NO_DATA_TYPES:
            size = 0
        data = read_data(read, size, offset, name)
        if typeflag in REGULAR_TYPES and not (typeflag == b"\0" and name.endswith("/")):  # old tars: '/' = directory
            yield name, data
        offset += BLOCK + size + -size % BLOCK
        pending, long_name, pax_path, pax_size = False, None, None, None


def decompressed(file: io.BufferedReader) -> BinaryIO:
    """The tar stream in a shard file; gzip, bzip2 and xz shards (tarfile's "r|*" read them) are told by their start."""
    start = file.peek(6)[:6]
    if start.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=file, mode="rb")
    if start.startswith(b"BZh"):
        return bz2.BZ2File(file)
    if start.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(file)
    return file


def split_member_name(name: str) -> tuple[str, str]:
    """'dir/abc.seg.jpg' -> ('dir/abc', 'seg.jpg'): as for webdataset, the key ends at the file name's first dot."""
    file_name = name.rpartition("/")[2]
    stem, _, extension = file_name.partition(".")
    return name[: len(name) - len(file_name) + len(stem)], extension


def shard_records(shard: str) -> Iterator[dict | BadSample]:
    """Stream one tar shard: {'__key__': key, 'jpg': bytes, 'txt': bytes, ...} per key, in file order.

    A damaged shard ends with one BadSample, after the records read before the damage; the record whose
    member's data was being read when it broke is dropped with it.
    """
    record: dict = {}
    try:
        # big buffered reads: a header then costs a slice of the buffer, not a system call
        with open(shard, "rb", buffering=CHUNK) as file, decompressed(file) as stream:
            for member, data in iter_tar_members(stream):
                key, extension = split_member_name(member)
                if record and record["__key__"] != key:
                    yield record
                    record = {}
                record.setdefault("__key__", key)
                record[extension.lower()] = data
    except (TarFormatError, OSError, EOFError, zlib.error, lzma.LZMAError) as error:  # the last 3: compressed shards
        broken = getattr(error, "member", None)
        # damage in a header or in another key's data: the pending record was read before it (as tarfile, which read
        # a header before its data, yielded it)
        if record and (broken is None or split_member_name(broken)[0] != record["__key__"]):
            yield record
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
                             f"one); write smaller shards (python -m crossmodal.data.make_shards --shard-size)")
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
