"""BLIP-base captioner speed against HuggingFace transformers' BLIP on the same random weights.

    python benchmarks/bench_blip.py [--batch 8] [--rounds 3] [--device cpu|cuda]

Two measurements, each run alternately for ours and HF `--rounds` times (median seconds shown):
- a captioning training step: image encoder + image-grounded decoder forward, LM loss with label smoothing 0.1
  (BLIP's), backward, on `--batch` images at 224 px and 20-token captions;
- beam-3 captioning as BLIP evaluates (prompt "a picture of ", max_length 20, min_length 5), also checking
  that both produce the same token ids.
HF's model is built from a BlipConfig with BLIP-base sizes; ours loads its weights through models/convert.py.
transformers is a test-only dependency (`pip install -e ".[dev]"`).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    import transformers

    from models import create_model

    torch.manual_seed(0)
    text = dict(num_attention_heads=12, layer_norm_eps=1e-12, label_smoothing=0.1, sep_token_id=102, pad_token_id=0)
    vision = dict(image_size=224, patch_size=16, layer_norm_eps=1e-6)
    hf = transformers.BlipForConditionalGeneration(transformers.BlipConfig(text_config=text, vision_config=vision))
    with torch.no_grad():  # HF's init leaves the ViT at ~0: random weights everywhere
        for tensor in hf.state_dict().values():
            if tensor.is_floating_point():
                tensor.normal_(0, 0.02)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = create_model("BLIP-base", pretrained=folder, text_drop=0.0)
    hf, ours = hf.to(args.device), ours.to(args.device)
    images = torch.randn(args.batch, 3, 224, 224, device=args.device)
    tokens = torch.randint(1000, 30000, (args.batch, 20), device=args.device)
    tokens[:, 0], tokens[:, -1] = 30522, 102  # [DEC] caption [SEP]
    prompt = torch.tensor([[101, 1037, 3861, 1997, 102]] * args.batch, device=args.device)  # [CLS] a picture of [SEP]

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def train_step(name: str) -> float:
        model = hf if name == "HF transformers" else ours
        model.train()
        model.zero_grad(set_to_none=True)
        if model is hf:
            loss = hf(pixel_values=images, input_ids=tokens, labels=tokens).loss
        else:
            logits = ours.decoder_logits(tokens, ours.forward_image(images))  # (B, T, vocab)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), label_smoothing=0.1)
        loss.backward()
        return loss.item()

    @torch.no_grad()
    def caption(name: str) -> list[list[int]]:
        if name == "HF transformers":
            ids = hf.eval().generate(pixel_values=images, input_ids=prompt.clone(), num_beams=3, max_length=20, min_length=5)
        else:
            ids = ours.eval().generate_ids(images, [30522, 1037, 3861, 1997], num_beams=3, max_length=20, min_length=5)
        return [row[: row.index(102, 4) + 1] if 102 in row[4:] else row for row in ids.tolist()]

    names, tasks = ("HF transformers", "ours"), {"train step": train_step, "beam-3 captions": caption}
    times = {(task, name): [] for task in tasks for name in names}
    outputs = {}
    for _ in range(args.rounds):
        for name in names:
            for task, run in tasks.items():
                sync()
                start = time.perf_counter()
                result = run(name)
                sync()
                times[task, name].append(time.perf_counter() - start)
                outputs[task, name] = result
    print(f"BLIP-base, batch {args.batch}, {args.device}, median of {args.rounds} rounds (torch {torch.__version__}, "
          f"transformers {transformers.__version__})")
    print("| task | HF transformers (s) | ours (s) | speed-up |")
    print("|---|---|---|---|")
    for task in ("train step", "beam-3 captions"):
        theirs, mine = statistics.median(times[task, names[0]]), statistics.median(times[task, names[1]])
        print(f"| {task} | {theirs:.3f} | {mine:.3f} | {theirs / mine:.2f}x |")
    print(f"same caption ids: {outputs['beam-3 captions', names[0]] == outputs['beam-3 captions', names[1]]}")


if __name__ == "__main__":
    main()
