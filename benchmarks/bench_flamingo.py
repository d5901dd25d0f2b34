"""Flamingo's trainable part (Perceiver resampler + gated cross-attention) against OpenFlamingo's modules at the
same sizes and weights: one training step (resample the visual tokens, run the gated blocks over interleaved
text, a loss on the text, backward), alternately for ours and OpenFlamingo's `--rounds` times (median shown).

    python benchmarks/bench_flamingo.py [--preset 3b|small] [--batch 4] [--rounds 5] [--device cpu|cuda]
    python benchmarks/bench_flamingo.py --preset 3b --batch 8 --device cuda --precision bf16

Sizes: `3b` is OpenFlamingo-3B (vision width 1024, 256 patch tokens per image, resampler depth 6 with 64 latents,
LM width 2048, 8x64 heads; here 3 images and 4 gated blocks of its 24); `small` a CPU-sized version (width 256,
64 tokens, 2 blocks). The text is 64 tokens per image, images at positions 0, 64, 128. `--precision bf16` runs both
sides' forward and loss under torch.autocast (bf16), as bench_train.py does; the weights stay fp32.
Each side's step is counted once by FlopCounterMode and printed with its TFLOP/s and share of this machine's matmul
peak (benchmarks/flops.py) in the step's precision.
OpenFlamingo is a test-only peer: pip install --no-deps open-flamingo==2.0.1 einops-exts.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.flops import count_flops, matmul_peak, peak_line, rate  # noqa: E402

PRESETS = {
    "3b": dict(vis_dim=1024, tokens=256, depth=6, latents=64, lang_dim=2048, blocks=4, images=3),
    "small": dict(vis_dim=256, tokens=64, depth=2, latents=16, lang_dim=256, blocks=2, images=3),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=PRESETS)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="bf16: autocast on both sides")
    args = parser.parse_args()

    import torch
    from open_flamingo.src import helpers

    from crossmodal.models.convert import open_flamingo_to_ours
    from crossmodal.models.flamingo import GatedCrossAttentionBlock, PerceiverResampler

    size = PRESETS[args.preset]
    torch.manual_seed(0)
    device = torch.device(args.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def build(resampler_cls, block_cls):
        resampler = resampler_cls(dim=size["vis_dim"], depth=size["depth"], num_latents=size["latents"])
        blocks = torch.nn.ModuleList(block_cls(dim=size["lang_dim"], dim_visual=size["vis_dim"])
                                     for _ in range(size["blocks"]))
        return resampler, blocks

    theirs = build(helpers.PerceiverResampler, helpers.GatedCrossAttentionBlock)
    with torch.no_grad():
        for block in theirs[1]:
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(0.5)
    ours = build(PerceiverResampler, GatedCrossAttentionBlock)
    ours[0].load_state_dict(open_flamingo_to_ours(theirs[0].state_dict()))
    for mine, reference in zip(ours[1], theirs[1]):
        mine.load_state_dict(open_flamingo_to_ours(reference.state_dict()))
    for part in (*ours, *theirs):
        part.to(device)

    length = 64 * size["images"]
    visual = torch.randn(args.batch, size["images"], 1, size["tokens"], size["vis_dim"], device=device)
    text = torch.randn(args.batch, length, size["lang_dim"], device=device)
    media_locations = torch.zeros(args.batch, length, dtype=torch.bool, device=device)
    media_locations[:, ::64] = True

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(resampler, blocks) -> float:
        sync()
        start = time.perf_counter()
        with autocast:
            media = resampler(visual)  # (B, T_media, latents, vis_dim)
            x = text
            for block in blocks:  # the same call for both
                x = block(x, media, media_locations=media_locations)
            loss = x.square().mean()
        loss.backward()
        for module in (resampler, blocks):
            module.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start

    with torch.no_grad():  # same numbers first
        a = ours[1][0](text, ours[0](visual), media_locations=media_locations)
        b = theirs[1][0](text, theirs[0](visual), media_locations=media_locations)
        print(f"max abs difference of the first block's output: {(a - b).abs().max().item():.2e}")
    step(*ours), step(*theirs)  # warm-up
    times = {"ours": [], "open_flamingo": []}
    for _ in range(args.rounds):
        times["ours"].append(step(*ours))
        times["open_flamingo"].append(step(*theirs))
    ours_s, theirs_s = statistics.median(times["ours"]), statistics.median(times["open_flamingo"])
    precision = ", bf16 autocast" if args.precision == "bf16" else ""
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = matmul_peak(device.type, dtype)
    ours_flops, theirs_flops = count_flops(step, *ours), count_flops(step, *theirs)
    print(peak_line(device.type, dtype))
    print(f"{args.preset} batch {args.batch} on {device}{precision}: ours {ours_s * 1000:.1f} ms "
          f"({ours_flops / 1e9:.1f} GFLOP, {rate(ours_flops, ours_s, peak)}), OpenFlamingo {theirs_s * 1000:.1f} ms "
          f"({theirs_flops / 1e9:.1f} GFLOP, {rate(theirs_flops, theirs_s, peak)}) per training step; "
          f"speed-up {theirs_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
