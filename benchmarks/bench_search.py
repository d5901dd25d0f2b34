"""How fast search.py answers a query over many stored vectors, and how fast it indexes a folder.

    python benchmarks/bench_search.py                              # 1,000,000 x 512 stored, 200 images
    python benchmarks/bench_search.py --rows 100000 300000 1000000 --dim 512 --images 0

Query: random L2-normalised float16 vectors as the index stores them; search.top_k (float16
matrix-vector product in chunks, the best k + 64 rescored in float32) for k = 10, the median of
--repeats runs after one warm-up, against a plain float32 product over the same vectors. Also the time
to load an index file of that size (torch.load with mmap, then the path list) and the top-10 agreement
with an exact float64 ranking. Index: search.build_index on a folder of --images random 256x256 JPEGs
with an untrained ViT-B-32 image tower (the real cost per image) or --model RN-tiny, --workers loader
processes, batch 64.

Exact search reads every stored vector once per query, so its time grows linearly with the rows
(~2 bytes x dim per row in float16). An approximate index (IVF, HNSW, product quantisation; e.g. FAISS)
is worth adding when the store no longer fits in memory or queries must answer in milliseconds:
around 10-50 million vectors of 512 dimensions on a machine like this one, well beyond a personal
photo library.

FLOP/s and share of the fp32 matmul peak (benchmarks/flops.py) on both sides: a query is 2 x rows x dim FLOPs, a
matrix-vector product that reads each stored number once, so it is bound by memory, not by arithmetic (its share
is small by nature; the bytes read per second say how close it runs to the memory's limit); indexing is the image
tower's forward, counted by FlopCounterMode on one image.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from crossmodal import search  # noqa: E402
from crossmodal.models import MODELS, create_model  # noqa: E402
from benchmarks.flops import count_flops, matmul_peak, peak_line, rate  # noqa: E402


def median_seconds(function, repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_query(rows: int, dim: int, repeats: int, k: int = 10) -> dict:
    generator = torch.Generator().manual_seed(0)
    features = torch.empty(rows, dim, dtype=torch.float16)
    for start in range(0, rows, 1 << 18):  # normalised in chunks: a float32 copy of 1e6 x 512 is 2 GB
        chunk = torch.randn(min(1 << 18, rows - start), dim, generator=generator)
        features[start:start + len(chunk)] = F.normalize(chunk, dim=-1).half()
    query = F.normalize(torch.randn(dim, generator=generator), dim=0)
    ours = median_seconds(lambda: search.top_k(features, query, k), repeats)
    as_float = features.float()
    plain = median_seconds(lambda: (as_float @ query).topk(k), repeats)
    as_float = None  # 2 GB at 1e6 x 512
    _, found = search.top_k(features, query, k)
    exact = torch.cat([chunk.double() @ query.double() for chunk in features.split(1 << 18)]).topk(k).indices
    agreement = len(set(found.tolist()) & set(exact.tolist())) / k

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "index.pt")
        index = {**search.empty_index(), "features": features, "times": torch.full((rows,), float("nan"),
                                                                                     dtype=torch.float64),
                 "paths": [f"/photos/{i // 1000:04d}/IMG_{i:07d}.jpg" for i in range(rows)]}
        save_index_seconds = time.perf_counter()
        search.save_index(index, path)
        save_index_seconds = time.perf_counter() - save_index_seconds
        load = median_seconds(lambda: search.load_index(path, mmap=True), 1)
        size = os.path.getsize(path)
    return {"rows": rows, "ours": ours, "plain": plain, "agreement": agreement, "load": load,
            "save": save_index_seconds, "megabytes": size / 2**20}


def write_images(folder: str, count: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        picture = Image.fromarray(coarse).resize((256, 256), Image.BICUBIC)
        sub = os.path.join(folder, f"{i % 10}")
        os.makedirs(sub, exist_ok=True)
        picture.save(os.path.join(sub, f"{i:05d}.jpg"), quality=90)


def bench_index(count: int, model_name: str, workers: int) -> dict:
    torch.manual_seed(0)
    model = create_model(model_name).eval()
    image_size = MODELS[model_name].image_size
    with tempfile.TemporaryDirectory() as folder:
        write_images(os.path.join(folder, "images"), count)
        path = os.path.join(folder, "index.pt")
        source = {"model": model_name, "pretrained": "", "bpe": None}  # untrained weights: nothing to load again
        start = time.perf_counter()
        search.build_index(model, image_size, os.path.join(folder, "images"), path, source,
                           workers=workers, log=lambda line: None)
        first = time.perf_counter() - start
        start = time.perf_counter()
        search.build_index(model, image_size, os.path.join(folder, "images"), path, source,
                           workers=workers, log=lambda line: None)
        again = time.perf_counter() - start
    with torch.no_grad():
        flops = count_flops(model.encode_image, torch.randn(1, 3, image_size, image_size))
    return {"images": count, "seconds": first, "per_second": count / first, "again": again,
            "image_size": image_size, "flops": flops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=200, help="images to index (0: skip that part)")
    parser.add_argument("--model", default="ViT-B-32", help="the image tower for the index benchmark")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    print(peak_line("cpu", torch.float32))
    peak = matmul_peak("cpu", torch.float32)

    print(f"\nquery (top-10 of N random normalised {args.dim}-d vectors; median of {args.repeats})")
    print("| stored vectors | search.top_k (fp16 + fp32 rescoring) | plain fp32 matmul + topk | top-10 = exact "
          "| index file | save | load (mmap) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for rows in args.rows:
        r = bench_query(rows, args.dim, args.repeats)
        flops = 2 * rows * args.dim
        print(f"| {rows:,} | {1000 * r['ours']:.0f} ms ({rate(flops, r['ours'], peak)}; "
              f"{rows * args.dim * 2 / r['ours'] / 1e9:.1f} GB/s) | {1000 * r['plain']:.0f} ms "
              f"({rate(flops, r['plain'], peak)}; {rows * args.dim * 4 / r['plain'] / 1e9:.1f} GB/s) "
              f"| {100 * r['agreement']:.0f}% | {r['megabytes']:.0f} MB | {r['save']:.1f} s | {r['load']:.2f} s |",
              flush=True)

    if args.images:
        r = bench_index(args.images, args.model, args.workers)
        print(f"\nindex ({args.model} image tower, untrained, {r['image_size']} px; 256x256 JPEGs; "
              f"{args.workers} loader workers, batch 64)")
        print("| images | first run | images/s | image tower, whole run (decoding included) | second run (nothing "
              "changed) |")
        print("|---:|---:|---:|---:|---:|")
        print(f"| {r['images']:,} | {r['seconds']:.1f} s | {r['per_second']:.1f} "
              f"| {r['flops'] / 1e9:.1f} GFLOP/image, {rate(r['flops'] * r['images'], r['seconds'], peak)} "
              f"| {r['again']:.2f} s |")


if __name__ == "__main__":
    main()
