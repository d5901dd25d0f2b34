"""How close a step runs to the machine's limit: its FLOPs, achieved FLOP/s and share of the matmul peak.

    python benchmarks/flops.py              # measure this machine's fp32 and bf16 matmul peaks (and cache them)
    python benchmarks/flops.py --device cuda

The peak is the best rate of large square matmuls (torch.mm, the op every step here is made of) in the given
dtype: a rate this machine demonstrably reaches, not a datasheet figure. It is measured once per machine (CPU or
GPU name, thread count, torch version) and cached in $CROSSMODAL_CACHE/matmul_peaks.json (default
~/.cache/crossmodal); measure it on a quiet machine, and again with this script after a change of load or
settings. A step's FLOPs are counted by torch.utils.flop_counter.FlopCounterMode on one run of it (matmuls,
convolutions and attention, forward and backward: what the model must compute, so both sides of a benchmark
are held to the same work).
"""
import argparse
import json
import os
import platform
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

SIZES = {"cpu": (1024, 2048, 3072), "cuda": (4096, 8192)}


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


def measure_peak(device: str, dtype: torch.dtype, repeats: int = 3) -> float:
    """The best FLOP/s of torch.mm on square matrices of a few large sizes."""
    best = 0.0
    for n in SIZES[device]:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        torch.mm(a, b)  # warm-up: threads, kernels, workspaces
        _synchronize(device)
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            _synchronize(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
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
    if remeasure or not isinstance(cache.get(key), (int, float)):
        cache[key] = measure_peak(device, dtype)
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
