"""Write WebDataset tar shards (the `wds:` spec) from any other dataset spec.

    python -m crossmodal.data.make_shards csv:/data/pairs.csv --out /data/shards --shard-size 10000
    python -m crossmodal.data.make_shards coco:/data/coco/annotations/captions_train2017.json --out /data/coco_shards \
        --data.image_root=/data/coco/train2017

Sample i becomes `{i:09d}.EXT` and `{i:09d}.txt` (its caption) in shard `{i // shard_size:05d}.tar`. The
image is the original file's bytes, not re-encoded, when the dataset reads files in a format shards
can hold (jpg, jpeg, png, webp); other images (generated ones such as `shapes`, bmp, gif, tiff) are
written as PNG. Every image is decoded once to check it; unreadable samples are left out and counted.
Each shard is written under a temporary name and renamed when complete. Extra `--data.KEY=VALUE`
arguments set the data config (image_root, csv_* keys, image_size for generated datasets).

A dataset with several captions per image (COCO) stores the image once per caption.
"""
import argparse
import io
import os
import sys
import tarfile
from typing import Iterator

from crossmodal.config import ConfigError, load_config
from crossmodal.data import build_dataset
from crossmodal.data.bad_samples import BadSample, BadSampleCount, open_image
from crossmodal.data.image_files import ImageFiles
from crossmodal.data.webdataset import IMAGE_MEMBERS, WebDataset


def encoded_samples(dataset) -> Iterator[tuple[bytes, str, str] | BadSample]:
    """(image bytes, extension, caption) per sample in order, or the BadSample that replaced it."""
    for index in range(len(dataset)):
        try:
            if isinstance(dataset, ImageFiles):
                path, where = dataset.image_paths[dataset.image_of[index]], dataset.where(index)
                extension = os.path.splitext(path)[1].lstrip(".").lower()
                try:
                    with open(path, "rb") as f:
                        data = f.read()
                except OSError as error:
                    raise BadSample(where, "missing file" if isinstance(error, FileNotFoundError) else str(error))
                image = open_image(data, where)  # raises BadSample if it does not decode
                caption = dataset.texts[index]
            else:
                item = dataset[index]
                image, caption, extension = item["image"], item["caption"], ""
            if extension not in IMAGE_MEMBERS:
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                data, extension = buffer.getvalue(), "png"
            yield data, extension, caption
        except BadSample as error:
            yield error


class ShardWriter:
    """Numbered tar shards of `shard_size` samples each; a shard appears under its name only when complete."""

    def __init__(self, out_dir: str, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.shard_size = out_dir, shard_size
        self.shards, self.count, self._tar, self._path = [], 0, None, None

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if self.count % self.shard_size == 0:
            self._finish_shard()
            self._path = os.path.join(self.out_dir, f"{len(self.shards):05d}.tar")
            self._tar = tarfile.open(self._path + ".tmp", "w", format=tarfile.USTAR_FORMAT)
            self.shards.append(self._path)
        for extension, data in members.items():
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed metadata: identical bytes every run
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def _finish_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            os.replace(self._path + ".tmp", self._path)
            self._tar = None

    def close(self) -> None:
        self._finish_shard()


def make_shards(spec: str, out_dir: str, shard_size: int, options=None) -> tuple[list[str], BadSampleCount]:
    """Write the shards; returns their paths and the count of samples left out."""
    image_size = (options.image_size if options is not None else 0) or 64  # 0: the tiny presets' 64
    dataset = build_dataset(spec, image_size, options=options)
    if isinstance(dataset, WebDataset):
        raise ValueError(f"{spec}: already shards (to re-shard, list the shards in a csv first)")
    writer, bad = ShardWriter(out_dir, shard_size), BadSampleCount()
    for index, sample in enumerate(encoded_samples(dataset)):
        if isinstance(sample, BadSample):
            bad.add(1, 1, [str(sample)])
            continue
        data, extension, caption = sample
        writer.write(f"{index:09d}", {extension: data, "txt": caption.encode("utf-8")})
        bad.add(0, 1)
    writer.close()
    return writer.shards, bad


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", help="dataset spec to read, e.g. csv:/data/pairs.csv")
    parser.add_argument("--out", required=True, help="folder the shards are written to")
    parser.add_argument("--shard-size", type=int, default=10000, help="samples per shard")
    args, overrides = parser.parse_known_args(argv)
    try:
        options = load_config(None, overrides).data
        shards, bad = make_shards(args.spec, args.out, args.shard_size, options)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        sys.exit(f"make_shards: {error}")
    if bad.bad:
        print(f"left out {bad.describe()}")
    if not shards:
        sys.exit(f"make_shards: no readable sample in {args.spec}; no shard written")
    pattern = os.path.join(args.out, f"{{00000..{len(shards) - 1:05d}}}.tar")
    print(f"wrote {bad.seen - bad.bad} samples in {len(shards)} shards; train with '--data.train=wds:{pattern}'")
    return shards


if __name__ == "__main__":
    main()
