"""Images/s through the training input pipeline: our wds stream against torchvision's ImageFolder.

    python benchmarks/bench_data.py                                   # 2000 JPEGs of photo sizes, image_size 224
    python benchmarks/bench_data.py --num-images 4000 --image-size 64
    python benchmarks/bench_data.py --source-sizes 256x256            # thumbnails: nothing to decode smaller

Both pipelines read the same JPEG files (q90, written once to a temporary folder; by default in turn
640x480 and 480x640 as COCO's, 500x375, 800x600, 1024x768 and 1024x1024 as web images), decode them with
PIL and crop them with the same training transform (RGB, RandomResizedCrop, tensor, normalise), into
batches of --batch-size with 1 and 2 DataLoader workers. Ours is train.py's path as configured by default
(data.train_loader on wds shards written by data.make_shards, i.e. the original JPEG bytes): it also reads
the tar stream, checks the caption, seeds each sample's augmentation and tokenizes the caption, and
decodes each JPEG at the smallest DCT scale (1/2, 1/4, 1/8) still >= image_size with the crop drawn on
the full size (data.jpeg_draft; the same regions, pixels within resampling differences: tests and
docs/results.md). The baseline is torchvision.datasets.ImageFolder + DataLoader(shuffle=True), decoding
at full size. A third column is ours with data.jpeg_draft=false (full decode, the baseline's pixels).
Time runs from creating the loader's iterator to the last batch (worker start-up included, the same for
both); each cell is the best of --repeats passes over all images, after one untimed pass that warms the
page cache.

The machine's limit for this work is the JPEG decoder: the least any pipeline must do is decode each file at the
smallest DCT scale still >= image_size (PIL's draft) and convert it to RGB. That rate, measured in this process
over the same files (best of --repeats), times the workers (at most the CPUs), is the limit each side's share is
given against: the rest of its time goes to full-size decoding, cropping, resampling, tensors, collation and
inter-process transfer.
"""
import argparse
import csv
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORDS = ("red", "green", "blue", "large", "small", "circle", "square", "photo", "of", "a", "dog", "cat", "on", "the")


def write_images(root: str, count: int, sizes: list[tuple[int, int]], classes: int = 10) -> tuple[str, int]:
    """JPEGs in ImageFolder layout plus a CSV listing them with captions; returns (csv path, bytes written)."""
    rng = np.random.default_rng(0)
    total = 0
    with open(os.path.join(root, "pairs.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "caption"])
        for i in range(count):
            width, height = sizes[i % len(sizes)]
            folder = os.path.join(root, "images", f"class{i % classes}")
            os.makedirs(folder, exist_ok=True)
            # smooth colour fields plus noise: compresses like a photo, not like a flat colour or pure noise
            coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
            image = np.clip(image + rng.integers(-12, 13, size=image.shape), 0, 255).astype(np.uint8)
            path = os.path.join(folder, f"{i:06d}.jpg")
            Image.fromarray(image).save(path, quality=90)
            total += os.path.getsize(path)
            writer.writerow([os.path.relpath(path, root), " ".join(rng.choice(WORDS, size=8))])
    return os.path.join(root, "pairs.csv"), total


def images_per_second(loader, num_images: int) -> float:
    """Images delivered per second by one pass of at least num_images (whole batches)."""
    start, seen = time.perf_counter(), 0
    for batch in loader:
        seen += len(batch["image"] if isinstance(batch, dict) else batch[0])
        if seen >= num_images:
            break
    return seen / (time.perf_counter() - start)


def decode_rate(paths: list[str], image_size: int, repeats: int) -> float:
    """Images/s of the least work a loader must do: open, draft to the smallest scale >= image_size, RGB."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for path in paths:
            with Image.open(path) as image:
                image.draft("RGB", (image_size, image_size))
                image.convert("RGB")
        best = max(best, len(paths) / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--source-sizes", nargs="+", default=["640x480", "480x640", "500x375", "800x600", "1024x768",
                                                              "1024x1024"], help="WxH of the generated JPEGs, in turn")
    parser.add_argument("--image-size", type=int, default=224, help="training input size (data.image_size)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from crossmodal.config import load_config
    from crossmodal.data import train_loader
    from crossmodal.data.make_shards import make_shards
    from crossmodal.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
    from crossmodal.data.transforms import image_transform

    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        sizes = [tuple(int(side) for side in size.split("x")) for size in args.source_sizes]
        csv_path, total_bytes = write_images(root, args.num_images, sizes)
        shards, _ = make_shards(f"csv:{csv_path}", os.path.join(root, "shards"), args.shard_size)
        tokenizer = SentencePieceTokenizer(
            train_sentencepiece([" ".join(WORDS)] * 10, os.path.join(root, "tokenizer"), vocab_size=64))
        print(f"wrote {args.num_images} JPEGs ({total_bytes / args.num_images / 1024:.1f} KiB each) and "
              f"{len(shards)} shards in {time.perf_counter() - start:.1f} s")

        transform = image_transform(args.image_size, train=True)
        baseline_dataset = ImageFolder(os.path.join(root, "images"), transform=transform)
        pattern = os.path.join(root, "shards", f"{{00000..{len(shards) - 1:05d}}}.tar")

        def baseline(workers: int):
            return iter(DataLoader(baseline_dataset, batch_size=args.batch_size, shuffle=True, num_workers=workers,
                                   prefetch_factor=4))

        def ours(workers: int, draft: bool):
            cfg = load_config(None, [f"--data.train=wds:{pattern}", f"--data.workers={workers}",
                                     f"--data.image_size={args.image_size}", f"--train.batch_size={args.batch_size}",
                                     f"--data.jpeg_draft={str(draft).lower()}"])
            return iter(train_loader(cfg, tokenizer, rank=0, world_size=1))

        images_per_second(baseline(1), args.num_images)  # warm the page cache for both
        decode = decode_rate([path for path, _ in baseline_dataset.samples], args.image_size, args.repeats)
        row = "{:>7} {:>13} {:>12} {:>6} {:>15} {:>6} {:>13} {:>23}"
        print(f"\nimages/s, image_size {args.image_size}, batch {args.batch_size}, best of {args.repeats} passes, "
              f"torch {torch.__version__}, {os.cpu_count()} CPUs; decode limit {decode:.0f} images/s a process "
              f"(draft decode to >= {args.image_size} px and RGB, nothing else)")
        print(row.format("workers", "ImageFolder", "wds (ours)", "ratio", "ours, no draft", "ratio", "decode limit",
                         "share: ImageFolder/ours"))
        for workers in args.workers:
            best = {"baseline": 0.0, "draft": 0.0, "plain": 0.0}
            for _ in range(args.repeats):  # interleaved, so a busy moment on a shared machine hits all three
                for name in best:  # a loader's workers start with its iterator: make each only when it runs
                    loader = baseline(workers) if name == "baseline" else ours(workers, draft=name == "draft")
                    best[name] = max(best[name], images_per_second(loader, args.num_images))
                    del loader  # stops its workers before the next one starts
            reference = best["baseline"]
            limit = decode * min(workers, os.cpu_count() or 1)
            shares = f"{100 * reference / limit:.0f}% / {100 * best['draft'] / limit:.0f}%"
            print(row.format(workers, f"{reference:.0f}", f"{best['draft']:.0f}", f"{best['draft'] / reference:.2f}",
                             f"{best['plain']:.0f}", f"{best['plain'] / reference:.2f}", f"{limit:.0f}", shares),
                  flush=True)


if __name__ == "__main__":
    main()
