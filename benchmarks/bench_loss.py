"""Forward + backward time and peak memory of the contrastive losses: naive (open_clip style) vs the fused ops.

    python3 benchmarks/bench_loss.py                      # InfoNCE, N = 1024 ... 32768, D = 512, CPU
    python3 benchmarks/bench_loss.py --sizes 8192 16384   # the two target cases
    python3 benchmarks/bench_loss.py --loss siglip        # the sigmoid (SigLIP) loss
    python3 benchmarks/bench_loss.py --device cuda        # the CUDA op; memory = peak CUDA allocation
    python3 benchmarks/bench_loss.py --device cuda --dtype bfloat16   # bf16 features; naive under autocast
    python3 benchmarks/bench_loss.py --device cuda --tf32             # fp32 matmuls on TF32 tensor cores

Naive InfoNCE: two logits matmuls (image @ text^T, text @ image^T) and two cross entropies, as open_clip's
ClipLoss with world size 1; naive sigmoid: one logits matmul plus the bias, the +-1 label matrix and
logsigmoid, as open_clip's SigLipLoss with world size 1 (both with --dtype bfloat16 under torch.autocast,
as in AMP training: bf16 matmuls, fp32 losses). Fused: kernels.contrastive_loss or kernels.siglip_loss
(backend="cpu" or "cuda") with the default block size (256 on the CPU, 4096 on a GPU) unless --block-size
is given; they compute their blocks with the same ATen matmuls (cuBLAS on a GPU) as the naive losses.
Each case runs in a fresh subprocess. FLOP/s and share of peak (benchmarks/flops.py) count each side's own
matmuls, 2 N^2 D FLOPs each: naive InfoNCE 6 (2 forward, 4 backward; FlopCounterMode agrees), naive sigmoid 3,
fused InfoNCE 4 per block (forward, recompute, 2 gradient products), fused sigmoid 3 (one pass); the peak is
this machine's matmul peak in the features' dtype. On the CPU its peak memory is the increase of the peak resident set (VmHWM, reset after
the inputs are built) over the resident set with the inputs in place, so it counts the loss's
activations and the feature gradients; on a GPU it is the peak CUDA allocation above the inputs.
Targets: on the 2-core CPU, at N = 16384 the fused peak is <= 5% of the naive one and at N = 8192 the
fused time is <= 1.3x the naive one; on a GPU, at N >= 16384 the fused time is <= 1.1x the naive one.
(The sigmoid op has a third fewer matmuls than the InfoNCE op: one pass yields loss and gradients.)
"""
import argparse
import json
import os
import subprocess
import sys
import time

NAIVE_PEAK_LOGITS = 6  # N x N fp32 buffers to budget for the naive loss (measured peak ~4.1, plus margin)
MATMULS = {("clip", "naive"): 6, ("clip", "fused"): 4, ("siglip", "naive"): 3, ("siglip", "fused"): 3}  # N x N x D each


def read_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def available_memory_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise KeyError("MemAvailable")


def gpu_memory_bytes() -> int:
    import torch

    return torch.cuda.get_device_properties(0).total_memory


def run_case(
    loss: str,
    method: str,
    n: int,
    dim: int,
    repeats: int,
    device: str = "cpu",
    dtype: str = "float32",
    block_size: int = 0,
    tf32: bool = False,
) -> dict:
    """Runs in the subprocess: one untimed-for-memory pass, then `repeats` timed passes."""
    import torch
    import torch.nn.functional as F

    from crossmodal import kernels

    torch.backends.cuda.matmul.allow_tf32 = tf32
    feature_dtype = getattr(torch, dtype)

    def naive_clip(image, text, logit_scale, _logit_bias) -> torch.Tensor:
        with torch.autocast(device, dtype=feature_dtype, enabled=feature_dtype != torch.float32):
            labels = torch.arange(len(image), device=image.device)
            logits_per_image = logit_scale * image @ text.T  # (N, N)
            logits_per_text = logit_scale * text @ image.T  # (N, N)
            return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2

    def naive_siglip(image, text, logit_scale, logit_bias) -> torch.Tensor:
        with torch.autocast(device, dtype=feature_dtype, enabled=feature_dtype != torch.float32):
            logits = logit_scale * image @ text.T + logit_bias  # (N, N)
            labels = 2 * torch.eye(len(image), device=image.device, dtype=logits.dtype) - 1  # (N, N)
            return -F.logsigmoid(labels * logits).sum() / len(image)

    def fused_clip(image, text, logit_scale, _logit_bias) -> torch.Tensor:
        return kernels.contrastive_loss(image, text, logit_scale, backend=device, block_size=block_size)

    def fused_siglip(image, text, logit_scale, logit_bias) -> torch.Tensor:
        return kernels.siglip_loss(image, text, logit_scale, logit_bias, backend=device, block_size=block_size)

    loss_fn = {("clip", "naive"): naive_clip, ("clip", "fused"): fused_clip,
               ("siglip", "naive"): naive_siglip, ("siglip", "fused"): fused_siglip}[loss, method]

    def inputs(n: int) -> list[torch.Tensor]:
        torch.manual_seed(0)
        image = F.normalize(torch.randn(n, dim, device=device), dim=-1).to(feature_dtype)
        text = F.normalize(torch.randn(n, dim, device=device), dim=-1).to(feature_dtype)
        scalars = (torch.tensor(100.0, device=device), torch.tensor(-10.0, device=device))
        return [t.requires_grad_() for t in (image, text, *scalars)]

    def step(features: list[torch.Tensor]) -> float:
        for t in features:
            t.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss_fn(*features).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    step(inputs(256))  # loads BLAS kernels, starts threads: one-time memory that is not the loss's
    features = inputs(n)
    if device == "cuda":  # peak of the caching allocator above what the inputs hold
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        first_time = step(features)
        peak_mib = (torch.cuda.max_memory_allocated() - baseline) / 2**20
        times = [step(features) for _ in range(repeats)] or [first_time]
        return {"time_s": min(times), "peak_mib": peak_mib, "threads": torch.get_num_threads()}
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current resident set
    baseline_kib = read_status_kib("VmRSS")
    first_time = step(features)
    peak_kib = read_status_kib("VmHWM") - baseline_kib
    times = [step(features) for _ in range(repeats)] or [first_time]
    return {"time_s": min(times), "peak_mib": peak_kib / 1024, "threads": torch.get_num_threads()}


def measure(method: str, n: int, repeats: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", method, "--loss", args.loss, "--sizes", str(n)]
    command += ["--dim", str(args.dim)]
    command += ["--repeats", str(repeats), "--device", args.device, "--dtype", args.dtype]
    command += ["--block-size", str(args.block_size)] + (["--tf32"] if args.tf32 else [])
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loss", default="clip", choices=("clip", "siglip"), help="InfoNCE or the sigmoid loss")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, help="timed passes after the first (default 3, 1 for N >= 8192)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: the CUDA op and GPU memory")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="feature dtype")
    parser.add_argument("--block-size", type=int, default=0, help="the fused op's block edge (0: its default)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 in fp32 CUDA matmuls (both losses)")
    parser.add_argument("--worker", choices=["naive", "fused"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        result = run_case(args.loss, args.worker, args.sizes[0], args.dim, args.repeats, args.device, args.dtype,
                          args.block_size, args.tf32)
        print(json.dumps(result))
        return

    import torch

    from flops import matmul_peak, peak_line

    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    dtype = getattr(torch, args.dtype)
    peak = matmul_peak(args.device, dtype)

    def share(method: str, n: int, seconds: float) -> tuple[str, str]:
        achieved = MATMULS[args.loss, method] * 2 * n * n * args.dim / seconds
        return f"{achieved / 1e12:.3f}", f"{100 * achieved / peak:.0f}%"

    row = "{:>6} {:>9} {:>9} {:>10} {:>9} {:>7} {:>9} {:>7} {:>10} {:>10} {:>9}"
    memory = "peak RSS increase" if args.device == "cpu" else "peak CUDA allocation above the inputs"
    precision = args.dtype + (", TF32 allowed" if args.tf32 else "")
    block = f"block {args.block_size}" if args.block_size else "default block"
    print(f"{args.loss} loss, D = {args.dim}, {precision}, {args.device}, fused with its {block}, forward + backward; "
          f"time = best of the timed passes; MiB = {memory}; TFLOP/s and share of peak from each side's matmuls")
    print(peak_line(args.device, dtype))
    print(row.format("N", "naive s", "fused s", "time ratio", "naive TF/s", "naive %", "fused TF/s", "fused %",
                     "naive MiB", "fused MiB", "mem ratio"))
    notes = []
    for n in args.sizes:
        repeats = args.repeats if args.repeats is not None else (3 if n < 8192 else 1)
        fused = measure("fused", n, repeats, args)
        fused_cells = f"{fused['time_s']:.3f}", f"{fused['peak_mib']:.1f}"
        naive_bytes = NAIVE_PEAK_LOGITS * n * n * 4
        available = available_memory_bytes() if args.device == "cpu" else gpu_memory_bytes()
        if naive_bytes > 0.8 * available:
            notes.append(f"N = {n}: naive skipped, it would need ~{naive_bytes / 2**30:.0f} GiB "
                         f"(> 80% of the {available / 2**30:.0f} GiB available)")
            print(row.format(n, "skipped", fused_cells[0], "-", "-", "-", *share("fused", n, fused["time_s"]), "-",
                             fused_cells[1], "-"), flush=True)
            continue
        naive = measure("naive", n, repeats, args)
        time_ratio, memory_ratio = fused["time_s"] / naive["time_s"], fused["peak_mib"] / naive["peak_mib"]
        print(row.format(n, f"{naive['time_s']:.3f}", fused_cells[0], f"{time_ratio:.2f}",
                         *share("naive", n, naive["time_s"]), *share("fused", n, fused["time_s"]),
                         f"{naive['peak_mib']:.1f}", fused_cells[1], f"{memory_ratio:.3f}"), flush=True)
    print(f"threads: {fused['threads']}")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
