"""What LoRA (models/lora.py) saves in a training step against full fine-tuning, same model, batch and machine:
trainable parameters (count and share), peak memory and median step time, each ratio against full measured in
the same run.

    python benchmarks/bench_lora.py                                   # ViT-B-32, BLIP-base, a 12 x 768 LM on the CPU
    python benchmarks/bench_lora.py --models vit --device cuda --precision bf16

One step = forward + loss + backward + train.py's fused AdamW step over what trains:
- ViT-B-32 (batch 8, 224 px): recipes/finetune.py's classifier (image tower + zero-shot-style head, 10 classes,
  cross-entropy) under full, linear, llrd (layer decay 0.75: full's cost, other learning rates) and lora;
- BLIP-base (batch 4, 224 px, captions of 8-30 tokens): BLIP's pretraining step (ITC with momentum encoders and
  the 57600 queue, ITM on hard negatives, LM), full against lora (adapters on the encoders' and decoder's
  attention projections; the momentum copies follow by EMA, as recipes/lora.py arranges);
- LM: models/lm.py's decoder at GPT-2 small's size (12 layers, width 768, 12 heads, vocabulary 32000; batch 4 x
  128 tokens), next-token loss, full against lora.
lora: rank 8, alpha 16, the default targets (every attention projection; the CLIP classifier's: the image
tower's); lora-bf16: the same with the frozen base stored in bf16 (finetune.lora_base_dtype=bf16). "of all" is
the share of every parameter the model holds, frozen ones included (CLIP's text tower, BLIP's momentum copies).

Each configuration runs in its own process, built and warmed up; a model's configurations are then timed in
`--rounds` rounds of `--steps` steps, taking turns so that all see the same load (the median round is shown; a
model's processes are alive together: BLIP-base's three need ~13 GiB on the CPU). Peak memory: on CUDA, torch.cuda.max_memory_allocated; on the CPU, the process's peak resident
set (VmHWM) minus its resident set after `import torch` (weights, gradients, optimizer state, activations and
the allocator's slack), as bench_train.py measures it. Weights are random: the figures are costs, not accuracy.
FLOP/s and share of peak (benchmarks/flops.py): each step's matmuls, convolutions and attention, forward and
backward, counted once by FlopCounterMode (LoRA skips the frozen weights' gradients, so its step does less work).
"""
import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_loss import read_status_kib  # noqa: E402

STRATEGIES = {"vit": ("full", "linear", "llrd", "lora", "lora-bf16"), "blip": ("full", "lora", "lora-bf16"),
              "lm": ("full", "lora", "lora-bf16")}
NAMES = {"vit": "ViT-B-32 classifier (batch 8)", "blip": "BLIP-base ITC+ITM+LM (batch 4)",
         "lm": "LM 12 x 768 (batch 4 x 128)"}
LM_SIZE = dict(vocab_size=32000, context_length=128, width=768, depth=12, num_heads=12)  # GPT-2 small's shape


def lora_options(strategy: str) -> dict:
    import torch

    return {"rank": 8, "alpha": 16.0, "base_dtype": torch.bfloat16 if strategy == "lora-bf16" else None}


def build_vit(strategy: str, device):
    """(model, trainable layers for build_optimizer, step inputs, loss function) for the CLIP classifier."""
    import torch
    import torch.nn.functional as F

    from crossmodal.config import Config
    from crossmodal.models import MODELS, create_model
    from crossmodal.models.lora import add_lora
    from crossmodal.recipes import finetune

    clip = create_model("ViT-B-32")
    classes = F.normalize(torch.randn(10, MODELS["ViT-B-32"].embed_dim), dim=-1)  # (C, D) as class embeddings
    model = finetune.ZeroShotClassifier(clip, classes)
    cfg = Config()
    cfg.finetune.strategy = "lora" if strategy.startswith("lora") else strategy
    if strategy.startswith("lora"):
        add_lora(model.clip.visual, **lora_options(strategy))
    layers = finetune.trainable_layers(model, cfg)
    images, labels = torch.randn(8, 3, 224, 224, device=device), torch.randint(0, 10, (8,), device=device)
    return model, layers, lambda m: F.cross_entropy(m(images), labels)


def build_blip(strategy: str, device):
    import torch

    from crossmodal.models import create_model
    from crossmodal.models.lora import add_lora
    from crossmodal.recipes.lora import copy_momentum_adapters

    model = create_model("BLIP-base", text_drop=0.0, momentum_encoders=True)
    if strategy.startswith("lora"):
        add_lora(model, **lora_options(strategy))
        copy_momentum_adapters(model)
        for param in model.momentum_pairs(online=False):  # EMA copies, never trained by gradient
            param.requires_grad_(False)
    cls, sep, pad = 101, 102, 0  # BERT's ids
    lengths = torch.randint(8, 31, (4,))
    tokens = torch.full((4, 30), pad, dtype=torch.long)
    for row, length in enumerate(lengths.tolist()):  # [CLS] caption [SEP] [PAD]...
        tokens[row, :length] = torch.cat([torch.tensor([cls]), torch.randint(1000, 30000, (length - 2,)),
                                          torch.tensor([sep])])
    images, tokens = torch.randn(4, 3, 224, 224, device=device), tokens.to(device)
    return model, None, lambda m: sum(m(images, tokens, alpha=0.4).values())


def build_lm(strategy: str, device):
    import torch

    from crossmodal.losses import lm_labels, lm_loss
    from crossmodal.models.lm import DecoderLM
    from crossmodal.models.lora import add_lora

    model = DecoderLM(**LM_SIZE)
    if strategy.startswith("lora"):
        add_lora(model, **lora_options(strategy))
    tokens = torch.randint(3, LM_SIZE["vocab_size"], (4, 128), device=device)
    labels = lm_labels(tokens, 0)
    return model, None, lambda m: lm_loss(m(tokens), labels, label_smoothing=0.0)


BUILDERS = {"vit": build_vit, "blip": build_blip, "lm": build_lm}


def worker(model_key: str, strategy: str, precision: str, device: str, warmup: int, conn) -> None:
    import torch

    from crossmodal import train
    from crossmodal.config import TrainConfig
    from benchmarks.flops import count_flops, matmul_peak
    from crossmodal.models.lora import count_trainable

    torch.manual_seed(0)
    rss_after_import = read_status_kib("VmRSS")
    model, layers, loss_fn = BUILDERS[model_key](strategy, torch.device(device))
    model = model.to(device).train()
    optimizer = train.build_optimizer(model, TrainConfig(lr=1e-5), layers)
    dtype = {"bf16": torch.bfloat16}.get(precision)
    device_type = torch.device(device).type

    def step():
        with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    trainable, total = count_trainable(model)
    flops = count_flops(step)
    conn.send({"trainable": trainable, "total": total, "flops": flops,
               "matmul_peak": matmul_peak(device_type, dtype or torch.float32)})
    while (steps := conn.recv()) is not None:
        if device_type == "cuda":
            torch.cuda.synchronize()
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


def measure(model_key: str, args) -> dict:
    """Every strategy of one model in its own process, built and warmed up, then `--rounds` rounds of `--steps`
    steps each, the strategies taking turns (so that all see the same machine load)."""
    context = mp.get_context("spawn")
    workers = {}
    for strategy in STRATEGIES[model_key]:
        parent, child = context.Pipe()
        process = context.Process(target=worker, args=(model_key, strategy, args.precision, args.device, args.warmup,
                                                       child))
        process.start()
        workers[strategy] = (process, parent, parent.recv())
    times = {strategy: [] for strategy in workers}
    for _ in range(args.rounds):
        for strategy, (_, conn, _) in workers.items():
            conn.send(args.steps)
            times[strategy].append(conn.recv() / args.steps)
    results = {}
    for strategy, (process, conn, counts) in workers.items():
        conn.send(None)
        results[strategy] = {**counts, "peak_mib": conn.recv(), "step_s": statistics.median(times[strategy])}
        process.join()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vit,blip,lm", help="comma-separated: vit, blip, lm")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="bf16: the step under autocast")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the strategies taking turns (median shown)")
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()

    import torch

    from benchmarks.flops import rate

    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, precision "
          f"{args.precision}, median of {args.rounds} alternating rounds of {args.steps} steps after {args.warmup} "
          f"warm-up, each configuration in its own process", flush=True)
    rows = []
    for model_key in args.models.split(","):
        results = measure(model_key, args)
        full = results["full"]
        for strategy, result in results.items():
            rows.append(f"| {NAMES[model_key]} | {strategy} | {result['trainable'] / 1e6:.2f}M | "
                        f"{100 * result['trainable'] / result['total']:.2f}% | {result['peak_mib']:.0f} | "
                        f"{result['peak_mib'] / full['peak_mib']:.2f}x | {1000 * result['step_s']:.0f} | "
                        f"{result['step_s'] / full['step_s']:.2f}x | {result['flops'] / 1e9:.1f} | "
                        f"{rate(result['flops'], result['step_s'], result['matmul_peak'])} |")
            print(rows[-1], flush=True)
    print()
    print("| model, step | strategy | trainable | of all | peak MiB | vs full | step ms | vs full | GFLOP/step "
          "| FLOP/s, share of peak |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
