"""Training-step throughput and peak memory of this codebase's CLIP against open_clip's, same architecture,
batch and precision: one step = forward of both towers + CLIP loss + backward + AdamW step.

    python benchmarks/bench_train.py                                  # ViT-tiny (batch 128), ViT-B-32 (batch 16)
    python benchmarks/bench_train.py --text-lengths full                # every text fills the 77-token context
    python benchmarks/bench_train.py --settings ViT-B-32:256 --precision bf16 --device cuda

Each implementation lives in its own worker process, built once; the parent asks them in turn for a round of
`--steps` timed steps (after warm-up), `--rounds` times, ours and open_clip's alternating so that both see
the same machine load. Throughput is the median over rounds. Peak memory: on CUDA, max_memory_allocated;
on the CPU, the worker's peak resident set (VmHWM) minus its resident set after `import torch`, so it
counts weights, gradients, optimizer state and activations. Weights are random; open_clip is a test-only
dependency (`pip install -e ".[dev]"`).

Optimizers: each codebase's own, both AdamW: train.py's `build_optimizer` (fused, no decay on norms,
biases, embeddings, logit scale) and open_clip's default `torch.optim.AdamW` kernels.

FLOP/s and share of peak (benchmarks/flops.py): each side's step is counted once by FlopCounterMode
(matmuls, convolutions, attention; forward and backward), and divided by its median step time; the peak is
this machine's torch.mm rate in the step's precision (fp32, or bf16/fp16 under autocast).

Texts are caption-like by default (8-24 tokens of the context, then padding), as in CLIP training data.
This codebase's text tower skips the padding after the batch's longest text (exact, since attention is
causal; models/text.py), open_clip's runs all 77 positions; `--text-lengths full` removes that advantage.
"""
import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_loss import read_status_kib  # noqa: E402
from benchmarks.flops import count_flops, matmul_peak, peak_line  # noqa: E402

# Tiny preset as in models/__init__.py: the same numbers go into open_clip's config.
TINY = dict(embed_dim=128, image_size=64, patch_size=8, vision_layers=4, vision_width=128, vision_head_width=32,
            text_width=128, text_layers=3, text_heads=4, context_length=32, vocab_size=1024)


def build(impl: str, model_name: str):
    """(model, loss_fn(model_output) -> loss, image_size, context_length, vocab_size)."""
    import torch.nn.functional as F

    if impl == "ours":
        from crossmodal.losses import clip_loss
        from crossmodal.models import MODELS, create_model

        model = create_model(model_name)
        config = MODELS[model_name]

        def loss_fn(images, tokens):
            out = model(images, tokens)
            return clip_loss(out["image_features"], out["text_features"], out["logit_scale"])

        return model, loss_fn, config.image_size, config.context_length, config.vocab_size

    import open_clip
    from open_clip.loss import ClipLoss

    if model_name == "ViT-tiny":
        vision = open_clip.model.CLIPVisionCfg(layers=TINY["vision_layers"], width=TINY["vision_width"],
                                               head_width=TINY["vision_head_width"],
                                               patch_size=TINY["patch_size"], image_size=TINY["image_size"])
        text = open_clip.model.CLIPTextCfg(context_length=TINY["context_length"], vocab_size=TINY["vocab_size"],
                                           width=TINY["text_width"], heads=TINY["text_heads"],
                                           layers=TINY["text_layers"])
        model = open_clip.CLIP(TINY["embed_dim"], vision, text)
        image_size, context_length, vocab_size = TINY["image_size"], TINY["context_length"], TINY["vocab_size"]
    else:
        model = open_clip.create_model(model_name)
        image_size, context_length, vocab_size = model.visual.image_size[0], model.context_length, model.vocab_size
    criterion = ClipLoss()

    def loss_fn(images, tokens):
        image_features, text_features, logit_scale = model(images, tokens)
        return criterion(F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1), logit_scale)

    return model, loss_fn, image_size, context_length, vocab_size


def worker(impl: str, model_name: str, batch: int, precision: str, device: str, warmup: int, text_lengths: str,
           conn) -> None:
    import torch

    torch.manual_seed(0)
    rss_after_import = read_status_kib("VmRSS")
    model, loss_fn, image_size, context_length, vocab_size = build(impl, model_name)
    model = model.to(device).train()
    if impl == "ours":  # each codebase's own training optimizer (open_clip's main.py: AdamW, default kernels)
        from crossmodal import train
        from crossmodal.config import TrainConfig

        optimizer = train.build_optimizer(model, TrainConfig(lr=1e-5))
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.2)
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    tokens = torch.randint(1, vocab_size - 2, (batch, context_length), device=device)
    if text_lengths == "full":
        lengths = torch.full((batch,), context_length, device=device)
    else:  # caption-like: 8-24 tokens with start and end (COCO captions average ~13 words)
        lengths = torch.randint(8, min(24, context_length) + 1, (batch,), device=device)
    positions = torch.arange(context_length, device=device)
    tokens[positions >= lengths[:, None]] = 0  # padding after ...
    tokens[torch.arange(batch), lengths - 1] = vocab_size - 1  # ... the end token, the largest id (CLIP's BPE)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    device_type = torch.device(device).type

    def step():
        with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(images, tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device_type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    params = sum(p.numel() for p in model.parameters())
    conn.send({"params": params, "flops": count_flops(step)})
    while (steps := conn.recv()) is not None:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device_type == "cuda":
            torch.cuda.synchronize()
        conn.send(time.perf_counter() - start)
    if device_type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = (read_status_kib("VmHWM") - rss_after_import) / 1024
    conn.send(peak)


def run_setting(model_name: str, batch: int, args) -> dict:
    context = mp.get_context("spawn")
    workers = {}
    for impl in ("ours", "open_clip"):
        parent, child = context.Pipe()
        process = context.Process(target=worker, args=(impl, model_name, batch, args.precision, args.device,
                                                       args.warmup, args.text_lengths, child))
        process.start()
        workers[impl] = (process, parent, parent.recv())  # built and warmed up: params and FLOPs of a step
    times = {impl: [] for impl in workers}
    for _ in range(args.rounds):
        for impl, (_, conn, _) in workers.items():
            conn.send(args.steps)
            times[impl].append(conn.recv())
    result = {}
    for impl, (process, conn, counts) in workers.items():
        conn.send(None)
        peak = conn.recv()
        process.join()
        step_s = statistics.median(times[impl]) / args.steps
        result[impl] = {"samples_per_s": batch / step_s, "peak_mib": peak, "params": counts["params"],
                        "flops": counts["flops"], "flop_per_s": counts["flops"] / step_s}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=["ViT-tiny:128", "ViT-B-32:16"],
                        help="MODEL:BATCH pairs (models: ViT-tiny or any open_clip-named paper preset)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--text-lengths", default="caption", choices=("caption", "full"),
                        help="caption: 8-24 tokens then padding; full: every text fills the context")
    args = parser.parse_args()

    import torch

    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
          f"precision {args.precision}, {args.text_lengths}-length texts, "
          f"median of {args.rounds} alternating rounds of {args.steps} steps")
    device_type = torch.device(args.device).type
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    peak = matmul_peak(device_type, dtype)
    print(peak_line(device_type, dtype))
    header = (f"| model | batch | params | GFLOP/step ours, open_clip | ours samples/s | open_clip samples/s | "
              f"speed ratio | ours TFLOP/s (peak) | open_clip TFLOP/s (peak) | ours peak MiB | open_clip peak MiB | "
              f"memory ratio |")
    rows = []
    for setting in args.settings:
        model_name, batch = setting.rsplit(":", 1)
        result = run_setting(model_name, int(batch), args)
        ours, theirs = result["ours"], result["open_clip"]
        if ours["params"] != theirs["params"]:
            print(f"warning: {model_name}: parameter counts differ ({ours['params']} vs {theirs['params']})")
        shares = [f"{r['flop_per_s'] / 1e12:.3f} ({100 * r['flop_per_s'] / peak:.0f}%)" for r in (ours, theirs)]
        rows.append(f"| {model_name} | {batch} | {ours['params'] / 1e6:.1f}M | "
                    f"{ours['flops'] / 1e9:.0f}, {theirs['flops'] / 1e9:.0f} | {ours['samples_per_s']:.1f} | "
                    f"{theirs['samples_per_s']:.1f} | {ours['samples_per_s'] / theirs['samples_per_s']:.2f}x | "
                    f"{shares[0]} | {shares[1]} | {ours['peak_mib']:.0f} | {theirs['peak_mib']:.0f} | "
                    f"{ours['peak_mib'] / theirs['peak_mib']:.2f}x |")
        print(rows[-1], flush=True)
    print()
    print(header)
    print("|" + "---|" * 12)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
