"""How close a step runs to the machine's limit: its FLOPs, achieved FLOP/s and share of the matmul peak.

    python benchmarks/flops.py              # measure this machine's fp32 and bf16 matmul peaks (and cache them)
    python benchmarks/flops.py --device cuda

The peak is the sustained rate of large square matmuls (torch.mm, the op every step here is made of) in the given
dtype: a rate this machine demonstrably reaches, not a datasheet figure. It is measured once per machine (CPU or
GPU name, thread count, torch version) and cached in $CROSSMODAL_CACHE/matmul_peaks.json (default
~/.cache/crossmodal); running this script measures again and keeps the higher figure. On a virtual machine
the sustained rate moves with the neighbours' load (this 2-core VM read 0.22-0.30 TFLOP/s fp32 within minutes):
measure a few times on a quiet machine, and read shares of peak within that spread.
A step's FLOPs are counted by torch.utils.flop_counter.FlopCounterMode on one run of it (matmuls, convolutions
and attention, forward and backward: what each side computes; a side that skips work, as padding, counts less).
"""
import argparse
import json
import os
import platform
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

SIZES = {"cpu": (2048, 3072, 4096), "cuda": (4096, 8192)}


def _machine(device: str) -> str:
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or "cpu"
        try:
            with open("/proc/cpuinfo") as cpuinfo:
                name = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return f"{name} | {torch.get_num_threads()} threads | torch {torch.__version__}"


def _dtype_name(device: str, dtype: torch.dtype) -> str:
    tf32 = device == "cuda" and dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return str(dtype).removeprefix("torch.") + (" (TF32 allowed)" if tf32 else "")


def _cache_path() -> str:
    root = os.environ.get("CROSSMODAL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "crossmodal")
    return os.path.join(root, "matmul_peaks.json")


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_peak(device: str, dtype: torch.dtype, repeats: int = 5) -> float:
    """The FLOP/s of torch.mm on square matrices: the median of `repeats` runs at each of a few large sizes, the
    best size's. The median, not the best run: on a shared or virtual machine single runs burst well above what
    a step of many matmuls can sustain (one run of 1024^3 read 371 GFLOP/s here, its median 227)."""
    best = 0.0
    for n in SIZES[device]:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        torch.mm(a, b)  # warm-up: threads, kernels, workspaces
        _synchronize(device)
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            _synchronize(device)
            rates.append(2 * n**3 / (time.perf_counter() - start))
        best = max(best, sorted(rates)[len(rates) // 2])
    return best


def matmul_peak(device: str = "cpu", dtype: torch.dtype = torch.float32, remeasure: bool = False) -> float:
    """This machine's matmul peak in FLOP/s for `dtype`, from the cache or measured (and cached) now."""
    key = f"{_machine(device)} | {_dtype_name(device, dtype)}"
    path = _cache_path()
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    known = cache.get(key) if isinstance(cache.get(key), (int, float)) else 0.0
    if remeasure or not known:  # keeps the highest sustained rate measured: what this machine can do
        cache[key] = max(known, measure_peak(device, dtype))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "w") as f:
            json.dump(cache, f, indent=1)
        os.replace(temporary, path)
    return float(cache[key])


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs of one call of fn(*args, **kwargs) (forward and, if fn runs it, backward)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def rate(flops: float, seconds: float, peak: float) -> str:
    """'1.23 TFLOP/s, 71% of peak' for `flops` done in `seconds` against `peak` FLOP/s."""
    achieved = flops / seconds
    return f"{achieved / 1e12:.3f} TFLOP/s, {100 * achieved / peak:.0f}% of peak"


def peak_line(device: str, dtype: torch.dtype) -> str:
    """One line naming the peak a benchmark's shares refer to."""
    return (f"peak: {matmul_peak(device, dtype) / 1e12:.3f} TFLOP/s ({_dtype_name(device, dtype)} torch.mm, "
            f"{_machine(device)}; benchmarks/flops.py)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    for dtype in (torch.float32, torch.bfloat16):
        matmul_peak(args.device, dtype, remeasure=True)
        print(peak_line(args.device, dtype))


if __name__ == "__main__":
    main()
