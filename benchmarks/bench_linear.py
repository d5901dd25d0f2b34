"""GB/s of weights read by a linear layer at a decoding step's few rows, on a CPU: the few-row kernel
(kernels/csrc/few_row_linear.cpp) against oneDNN on reordered weights and MKL's `F.linear`, alternating in one run.

    python benchmarks/bench_linear.py [--rows 1 6 8 16 24 32 48] [--repeats 5]

The weights are BLIP-base's decoder as one step reads them (random values): 12 blocks of self-attention qkv and
projection, cross-attention query and projection, MLP (the cross-attention keys/values are computed once per
caption, not per step), then the 30,524-word output layer: 490 MB, far beyond any cache. Each cell is the median of
`--repeats` passes over all of them; the last column is a plain sum over the same weights, what the memory gives.
`kernels.linear.MAX_ROWS` is where the kernel stops being the faster (models/packed.py routes by it).
Each side's cell also gives its share of the fp32 matmul peak (benchmarks/flops.py; 2 x rows FLOPs per weight):
at a few rows the work is bound by reading the weights, so the share stays small however good the kernel is, and
GB/s against the plain sum is the measure of how close it runs to the limit.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from crossmodal import kernels  # noqa: E402
from benchmarks.flops import matmul_peak, peak_line  # noqa: E402

WIDTH, MLP, VOCAB, DEPTH = 768, 3072, 30524, 12


def step_weights() -> list[torch.Tensor]:
    block = [(3 * WIDTH, WIDTH), (WIDTH, WIDTH), (WIDTH, WIDTH), (WIDTH, WIDTH), (MLP, WIDTH), (WIDTH, MLP)]
    return [torch.randn(*shape) for _ in range(DEPTH) for shape in block] + [torch.randn(VOCAB, WIDTH)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 6, 8, 16, 24, 32, 48])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not kernels.few_row_linear_available():
        sys.exit("bench_linear: the few-row kernel is not built or this CPU has no AVX2/FMA")
    torch.manual_seed(0)
    weights = step_weights()
    gigabytes = sum(w.numel() for w in weights) * 4 / 1e9

    def rate(products) -> float:
        products()  # warm
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            products()
            seconds.append(time.perf_counter() - start)
        return gigabytes / statistics.median(seconds)

    print(f"{gigabytes:.3f} GB of weights per step, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(peak_line("cpu", torch.float32))
    peak = matmul_peak("cpu", torch.float32)
    weight_count = sum(w.numel() for w in weights)
    print("| rows | few-row kernel (GB/s) | oneDNN, reordered (GB/s) | MKL F.linear (GB/s) | kernel / oneDNN "
          "| kernel / MKL | sum (GB/s) |")
    print("|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for rows in args.rows:
            inputs = [torch.randn(rows, w.shape[1]) for w in weights]
            copies = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in weights]
            ours = rate(lambda: [kernels.few_row_linear(x, w) for x, w in zip(inputs, weights)])
            onednn = rate(
                lambda: [torch.ops.mkldnn._linear_pointwise(x, c, None, "none", [], "") for x, c in zip(inputs, copies)]
            )
            mkl = rate(lambda: [F.linear(x, w) for x, w in zip(inputs, weights)])
            plain = rate(lambda: [w.sum() for w in weights])
            ratios = f"{ours / onednn:.2f}x | {ours / mkl:.2f}x"

            def cell(gb_per_s: float) -> str:  # GB/s, and the FLOP/s that reading rate gives at these rows
                flops = 2 * rows * weight_count * gb_per_s / gigabytes
                return f"{gb_per_s:.1f} ({flops / 1e12:.3f} TFLOP/s, {100 * flops / peak:.0f}% of peak)"

            print(f"| {rows} | {cell(ours)} | {cell(onednn)} | {cell(mkl)} | {ratios} | {plain:.1f} |")


if __name__ == "__main__":
    main()
