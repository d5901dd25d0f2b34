"""Memory per process of DDP against FSDP (train.strategy=ddp|fsdp), on W gloo processes (CPU) or W GPUs.

    python benchmarks/bench_scale.py                                    # ViT-B-16, ViT-L-14: model state, 2 processes
    python benchmarks/bench_scale.py --step --models ViT-tiny ViT-B-16 --batch 4    # plus a measured training step
    torchrun --nproc_per_node 8 benchmarks/bench_scale.py --device cuda --step      # on GPUs (one torchrun, no spawn)

Model state (always): each process builds the model on the meta device (no memory), applies the strategy as
train.py does (DDP keeps the whole model; FSDP is parallel.shard), and counts the bytes it would hold: its
parameters (FSDP: its shards; the unsharded scalars whole), their fp32 gradients, AdamW's two moments and step
counts. DDP's gradient buckets (a second copy of the gradients, by default) are shown apart, not in the ratio.
--step: real weights, `--steps` training steps of train.py's contrastive step on random images and texts
(`--batch` per process), then the peak: on CUDA max_memory_allocated, on the CPU the process's peak resident set
(VmHWM) minus its resident set before building the model (weights, gradients, optimizer state, activations,
allocator slack); the median step time; and each process's FLOPs per step (benchmarks/flops.py's FlopCounterMode
count of one forward and backward), its achieved FLOP/s and their share of the matmul peak at the process's thread
count (with 2 processes on 2 cores: a 1-thread peak, measured once and cached). A ViT-L-14 step needs ~9 GB a
process under DDP.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.flops import count_flops, matmul_peak, rate  # noqa: E402

GIB = 2**30


def model_state_bytes(model) -> dict[str, int]:
    """Bytes this process holds for the model: parameters, gradients, AdamW state (two moments and a step)."""
    from torch.distributed.tensor import DTensor

    counts = {"params": 0, "grads": 0, "adamw": 0, "ddp_buckets": 0}
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        size = local.numel() * local.element_size()
        counts["params"] += size
        if p.requires_grad:
            counts["grads"] += local.numel() * 4
            counts["adamw"] += 2 * local.numel() * 4 + 4
            counts["ddp_buckets"] += 0 if isinstance(p, DTensor) else local.numel() * 4
    return counts


def build(name: str, device):
    from crossmodal.config import load_config
    from crossmodal.recipes import model_from_config

    class Tokenizer:  # what model_from_config reads: the preset's vocabulary and context
        vocab_size, context_length, pad_id = 49408, 77, 0

    cfg = load_config(None, [f"--model.name={name}"])
    model = model_from_config(cfg, Tokenizer())
    return model.to(device) if device.type != "meta" else model


def state_row(name: str, strategy: str) -> dict:
    from crossmodal import parallel

    with torch.device("meta"):
        model = build(name, torch.device("meta"))
    if strategy == "fsdp":
        parallel.shard(model, torch.device("cpu"))  # the shards stay on the meta device
    counts = model_state_bytes(model)
    if strategy == "fsdp":
        counts["ddp_buckets"] = 0
    return counts


def step_row(name: str, strategy: str, batch: int, steps: int, device, precision: str) -> dict:
    from crossmodal import parallel
    from crossmodal.losses import clip_loss
    from crossmodal.config import load_config
    from crossmodal.recipes import recipe_for
    from crossmodal.train import build_optimizer
    from torch.nn.parallel import DistributedDataParallel

    def peak_rss() -> int:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["VmHWM"].split()[0]) * 1024, int(fields["VmRSS"].split()[0]) * 1024

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = peak_rss()[1]
    torch.manual_seed(0)
    cfg = load_config(None, [f"--model.name={name}", f"--train.strategy={strategy}", f"--train.precision={precision}"])
    model = parallel.prepare(build(name, torch.device("cpu")), cfg.train, device)
    optimizer = build_optimizer(model, cfg.train)
    wrapped = DistributedDataParallel(model) if strategy == "ddp" else model
    image_size, context_length = recipe_for(cfg).inputs()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def forward_backward(images, tokens) -> None:
        with autocast:
            out = wrapped(images, tokens)
            loss = clip_loss(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()

    times = []
    for _ in range(steps):
        images = torch.randn(batch, 3, image_size, image_size, device=device)
        tokens = torch.randint(1, 49407, (batch, 20), device=device)
        start = time.perf_counter()
        forward_backward(images, tokens)
        parallel.average_replicated_gradients(model)
        parallel.clip_grad_norm_(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else peak_rss()[0] - before
    flops = count_flops(forward_backward, images, tokens)  # after the timed steps: the counter slows what it counts
    optimizer.zero_grad(set_to_none=True)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return {"peak": peak, "step_s": statistics.median(times[1:] if len(times) > 1 else times), "flops": flops,
            "matmul_peak": matmul_peak(device.type, dtype)}


def run(rank: int, world_size: int, args, port: int) -> list[dict]:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    from crossmodal import distributed

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world_size))
    device = distributed.init(args.device)
    rows = []
    for name in args.models:
        for strategy in ("ddp", "fsdp"):
            row = {"model": name, "strategy": strategy, **state_row(name, strategy)}
            if args.step:
                row.update(step_row(name, strategy, args.batch, args.steps, device, args.precision))
            rows.append(distributed.all_gather_object(row))  # every rank's figures
    distributed.cleanup()
    return rows


def print_table(rows: list[list[dict]], world_size: int, step: bool) -> None:
    print("| model | strategy | params | grads | AdamW | model state / process | ratio | DDP buckets |"
          + (" peak memory / process | ratio | step time | FLOP/s per process, share of its peak |" if step else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|---|---|---|" if step else ""))
    for i in range(0, len(rows), 2):
        ddp = max(rows[i], key=lambda r: r["params"])
        for per_rank in rows[i : i + 2]:
            row = max(per_rank, key=lambda r: r["params"] + r["grads"] + r["adamw"])  # the fullest process
            state = row["params"] + row["grads"] + row["adamw"]
            ddp_state = ddp["params"] + ddp["grads"] + ddp["adamw"]
            line = (f"| {row['model']} | {row['strategy']} | {row['params'] / GIB:.2f} GiB "
                    f"| {row['grads'] / GIB:.2f} GiB "
                    f"| {row['adamw'] / GIB:.2f} GiB | {state / GIB:.2f} GiB | {state / ddp_state:.2f} "
                    f"| {row['ddp_buckets'] / GIB:.2f} GiB |")
            if step:
                peak = max(r["peak"] for r in per_rank)
                ddp_peak = max(r["peak"] for r in rows[i])
                slowest = max(per_rank, key=lambda r: r["step_s"])
                line += (f" {peak / GIB:.2f} GiB | {peak / ddp_peak:.2f} | {slowest['step_s']:.2f} s "
                         f"| {rate(slowest['flops'], slowest['step_s'], slowest['matmul_peak'])} |")
            print(line)
    print(f"({world_size} processes; ratio: to DDP's, the largest process of each; FLOP/s: the slowest process's)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["ViT-B-16", "ViT-L-14"])
    parser.add_argument("--processes", type=int, default=2, help="gloo processes to spawn (not under torchrun)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--step", action="store_true", help="also measure a training step's peak memory and time")
    parser.add_argument("--batch", type=int, default=2, help="--step: samples per process")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    args = parser.parse_args()
    if "RANK" in os.environ:  # under torchrun
        rows = run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, int(os.environ["MASTER_PORT"]))
        if int(os.environ["RANK"]) == 0:
            print_table(rows, int(os.environ["WORLD_SIZE"]), args.step)
        return
    from tests.multiprocess import _free_port
    import torch.multiprocessing as mp

    with mp.get_context("spawn").Pool(args.processes) as pool:
        port = _free_port()
        results = pool.starmap(run, [(rank, args.processes, args, port) for rank in range(args.processes)])
    print_table(results[0], args.processes, args.step)


if __name__ == "__main__":
    main()
