"""LLaVA (models/llava.py) against transformers' LlavaForConditionalGeneration on the same random weights and
inputs, in one run: a training step and greedy generation with the key/value cache.

    python benchmarks/bench_llava.py [--device cpu|cuda] [--config tiny|small] [--steps N] [--rounds N]
    python benchmarks/bench_llava.py --device cuda --config small      # fp32 and bf16 autocast

The HF model is built from `--config` with random weights (every one perturbed, so that a misplaced key would
show), saved with `save_pretrained`, and ours loaded from that folder with `create_model("llava", pretrained=...)`,
as tests/test_llava.py does. Configs (batch 4):
- `tiny`: the test's size: a 3-block CLIP tower width 32 at 16 px patch 4 (16 image tokens), a 2-block LLaMA width
  64 with 4 heads / 2 key-value heads, vocabulary 101; prompts of 37 tokens, 8 of them the answer;
- `small`: a 4-block tower width 256 at 112 px patch 14 (64 image tokens), a 4-block LLaMA width 512 (SwiGLU
  1376, LLaMA-7B's ratio) with 8 heads / 2 key-value heads, vocabulary 32064 (llava-1.5's: image token 32000, pad
  32001); prompts of 126 tokens, 33 of them the answer.
A row is `<s>`, 4 text tokens, the image tokens, a question, then the answer and `</s>` (random ids, no padding).

Measured, each side taking turns so that both see the same machine load (median shown):
- a training step: forward, next-token cross-entropy on the answer tokens only (HF: `labels=` to its forward, its
  own loss; ours: `losses.lm_loss` on `lm_labels` with the prompt masked), backward, a fused AdamW step (lr 1e-5,
  train.py's kernel, plain on both sides) over every parameter; one untimed warm-up step each, then `--steps`
  timed. Both sides take the same steps from the same weights, so their losses agree at every step (the largest
  relative difference is printed);
- greedy generation of 32 new tokens (`min_new_tokens` 32 on both sides, so `</s>` cannot end a row early) after
  the prompt without its answer, with the key/value cache: tokens/s = 4 x 32 / the whole call (image tower and
  prompt prefill included); one untimed warm-up call each, then `--rounds` timed. Whether both sides generate the
  same tokens in every round is printed.
`--precisions`: fp32 (default on the CPU) and bf16, where bf16 runs the forward passes (training's and
generation's) under torch.autocast with the weights and optimizer state fp32 (default on CUDA: both, one after the
other); in bf16 the losses agree only to bf16's precision and greedy tokens may part once two logits round alike.

Each side's step and generation call are counted once more under FlopCounterMode (after the timings) and printed
with TFLOP/s and share of this machine's matmul peak in the precision (benchmarks/flops.py); generation is
decoding, 4 rows at a time, so its share is bound by memory, not the matmul peak. Peak memory (CUDA only): the
side's weights and optimizer state plus the most its step (or generation) allocated above what was allocated
before it, i.e. what it would peak at alone, though both models are resident. Attention is SDPA on both sides
(transformers' default implementation). transformers is a test-only dependency (`pip install -e ".[dev]"`).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

# As bench_blip.py: the repository root stays off sys.path (its kernels/ folder would shadow the `kernels` package
# that transformers 5.25 imports); this needs only the installed `crossmodal` and benchmarks/flops.py.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from flops import count_flops, matmul_peak, peak_line, rate  # noqa: E402

HF_NAME = "HF transformers"
BATCH, NEW_TOKENS, BOS, EOS = 4, 32, 1, 2
CONFIGS = {  # vision: CLIPVisionConfig, text: LlamaConfig, the rest LlavaConfig's, and the prompt's layout
    "tiny": dict(
        vision=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=16,
                    patch_size=4, hidden_act="quick_gelu", layer_norm_eps=1e-5),
        text=dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, pad_token_id=0),
        image_token_index=100, question=8, answer=7, steps=10,
    ),
    "small": dict(
        vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                    image_size=112, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5),
        text=dict(vocab_size=32064, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, pad_token_id=32001),
        image_token_index=32000, question=24, answer=32, steps=4,
    ),
}  # fmt: skip


def build_hf(transformers, torch, size: dict):
    """A random LlavaForConditionalGeneration of `size`, every weight perturbed (norms start at 1 and 0)."""
    torch.manual_seed(0)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**size["vision"]),
        text_config=transformers.LlamaConfig(**size["text"], bos_token_id=BOS, eos_token_id=EOS),
        image_token_index=size["image_token_index"],
    )  # fmt: skip
    model = transformers.LlavaForConditionalGeneration(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model


def make_batch(torch, size: dict, features: int, device):
    """(images (B, 3, H, W), ids (B, T), prompt_length P): `<s>`, 4 text tokens, the image tokens, the question;
    then the answer and `</s>`, the tokens the loss is on."""
    generator = torch.Generator().manual_seed(1)
    image, image_size = size["image_token_index"], size["vision"]["image_size"]

    def words(count: int):
        return torch.randint(3, image, (BATCH, count), generator=generator)

    prompt = torch.cat([torch.full((BATCH, 1), BOS), words(4), torch.full((BATCH, features), image),
                        words(size["question"])], dim=1)  # (B, P)
    ids = torch.cat([prompt, words(size["answer"]), torch.full((BATCH, 1), EOS)], dim=1)  # (B, T)
    images = torch.randn(BATCH, 3, image_size, image_size, generator=generator)
    return images.to(device), ids.to(device), prompt.shape[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--config", default="tiny", choices=CONFIGS)
    parser.add_argument("--steps", type=int, help="timed training steps per side (default: tiny 10, small 4)")
    parser.add_argument("--rounds", type=int, default=3, help="timed generation calls per side")
    parser.add_argument("--precisions", help="comma-separated: fp32, bf16 (default: fp32 on cpu, fp32,bf16 on cuda)")
    args = parser.parse_args()
    size = CONFIGS[args.config]
    steps = args.steps or size["steps"]
    precisions = (args.precisions or ("fp32,bf16" if args.device == "cuda" else "fp32")).split(",")
    if not set(precisions) <= {"fp32", "bf16"} or steps < 1 or args.rounds < 1:
        parser.error(f"--precisions {','.join(precisions)}: fp32 and/or bf16; --steps and --rounds at least 1")

    import torch
    import transformers

    from crossmodal.losses import lm_labels, lm_loss
    from crossmodal.models import create_model

    transformers.logging.set_verbosity_error()  # generate's notes on its generation config
    transformers.logging.disable_progress_bar()  # save_pretrained's
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_llava.py: --device cuda, but torch.cuda.is_available() is False")
    hf = build_hf(transformers, torch, size)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = create_model("llava", pretrained=folder)
    models = {HF_NAME: hf.to(device), "ours": ours.to(device)}
    names = tuple(models)
    pad = size["text"]["pad_token_id"]
    images, ids, prompt_length = make_batch(torch, size, ours.features_per_image, device)
    labels = lm_labels(ids, pad, prompt_length=prompt_length)  # (B, T): -100 on the prompt
    prompt = ids[:, :prompt_length]  # (B, P)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def state_bytes(name: str, optimizer) -> int:
        """The side's weights and optimizer state, in bytes."""
        tensors = list(models[name].parameters())
        if optimizer is not None:
            tensors += [value for state in optimizer.state.values() for value in state.values()
                        if isinstance(value, torch.Tensor)]
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors)

    def measured(name: str, run, optimizer=None):
        """(seconds, peak MiB or None, run's result) of one call of `run`."""
        sync()
        if device.type == "cuda":
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = run()
        sync()
        seconds = time.perf_counter() - start
        peak = None
        if device.type == "cuda":
            peak = (torch.cuda.max_memory_allocated() - before + state_bytes(name, optimizer)) / 2**20
        return seconds, peak, result

    rows = {}  # (task, name) -> (seconds or tokens/s, peak MiB, GFLOP, rate)
    notes = []
    for precision in precisions:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        peak_flops = matmul_peak(device.type, dtype)

        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

        # The same optimizer on both sides (fused, as train.py's build_optimizer), fresh for each precision; the
        # models go on from the weights the previous precision's steps left, equal on both sides.
        optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=True)
                      for name, model in models.items()}

        def train_step(name: str) -> float:
            model, optimizer = models[name].train(), optimizers[name]
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                if name == HF_NAME:
                    loss = model(pixel_values=images, input_ids=ids, labels=labels).loss
                else:
                    loss = lm_loss(model(images, ids), labels, label_smoothing=0.0)
            loss.backward()
            optimizer.step()
            return loss.item()

        @torch.no_grad()
        def greedy(name: str) -> torch.Tensor:
            model = models[name].eval()
            with autocast():
                if name == HF_NAME:
                    out = model.generate(pixel_values=images, input_ids=prompt, do_sample=False, num_beams=1,
                                         max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, eos_token_id=EOS,
                                         pad_token_id=pad, use_cache=True)
                    return out[:, prompt_length:]  # (B, 32)
                return model.generate(images, prompt, max_new_tokens=NEW_TOKENS,
                                      min_length=prompt_length + NEW_TOKENS, use_cache=True)  # (B, 32)

        train, generation = f"train step, {precision}", f"greedy {BATCH} x {NEW_TOKENS} tokens, {precision}"
        for name in names:  # warm-up: kernels, allocator, the optimizer's state
            train_step(name)
        times, peaks, losses = ({name: [] for name in names} for _ in range(3))
        for _ in range(steps):
            for name in names:
                seconds, peak, loss = measured(name, lambda: train_step(name), optimizers[name])
                times[name].append(seconds), peaks[name].append(peak), losses[name].append(loss)
        for name in names:
            rows[train, name] = [statistics.median(times[name]), max(peaks[name]) if device.type == "cuda" else None]
        difference = max(abs(a - b) / abs(a) for a, b in zip(losses[HF_NAME], losses["ours"]))
        notes.append(f"{train}: losses HF {losses[HF_NAME][0]:.5f} .. {losses[HF_NAME][-1]:.5f}, ours "
                     f"{losses['ours'][0]:.5f} .. {losses['ours'][-1]:.5f}; largest relative difference at one "
                     f"step {difference:.1e}")

        for name in names:
            greedy(name)
        times, peaks, tokens = ({name: [] for name in names} for _ in range(3))
        for _ in range(args.rounds):
            for name in names:
                seconds, peak, new = measured(name, lambda: greedy(name))
                times[name].append(seconds), peaks[name].append(peak), tokens[name].append(new)
        for name in names:
            rows[generation, name] = [BATCH * NEW_TOKENS / statistics.median(times[name]),
                                      max(peaks[name]) if device.type == "cuda" else None]
        same = [torch.equal(a, b) for a, b in zip(tokens[HF_NAME], tokens["ours"])]
        note = f"{generation}: same tokens on both sides in every round: {all(same)} {same}"
        theirs, mine = tokens[HF_NAME][-1], tokens["ours"][-1]
        if not all(same) and theirs.shape == mine.shape:  # where each row parts, in the last round
            differs = (theirs != mine).int()  # (B, 32)
            first = [int(row.argmax()) if row.any() else None for row in differs]
            note += f"; last round: {int((differs == 0).sum())} of {differs.numel()} equal, rows part at {first}"
        elif not all(same):
            note += f"; shapes HF {tuple(theirs.shape)}, ours {tuple(mine.shape)}"
        notes.append(note)

        for name in names:  # one more of each, counted (the weights move on equally on both sides)
            rows[train, name] += [count_flops(train_step, name)]
            rows[generation, name] += [count_flops(greedy, name)]
        for task, per_second in ((train, False), (generation, True)):
            for name in names:
                value, _, flops = rows[task, name]
                seconds = BATCH * NEW_TOKENS / value if per_second else value
                rows[task, name].append(rate(flops, seconds, peak_flops))
        notes.append(peak_line(device.type, dtype))

    total = sum(parameter.numel() for parameter in ours.parameters())
    threads = f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name()
    print(f"LLaVA {args.config} ({total / 1e6:.1f}M parameters), batch {BATCH}, {args.device} ({threads}), "
          f"median of {steps} steps / {args.rounds} generations per side (torch {torch.__version__}, "
          f"transformers {transformers.__version__})")
    memory = " | HF peak MiB | ours peak MiB" if device.type == "cuda" else ""
    for unit, kind in (("ms", "train"), ("tokens/s", "greedy")):
        print()
        print(f"| {kind} | HF {unit} | ours {unit} | ours/HF{memory} | HF GFLOP, TFLOP/s, share of peak | "
              f"ours GFLOP, TFLOP/s, share of peak |")
        print("|---" * (8 if memory else 6) + "|")
        for task in dict.fromkeys(task for task, _ in rows):
            if not task.startswith(kind):
                continue
            (theirs, theirs_peak, theirs_flops, theirs_rate), (mine, my_peak, my_flops, my_rate) = (
                rows[task, name] for name in names)
            scale = 1000 if kind == "train" else 1
            peaks = f" | {theirs_peak:.0f} | {my_peak:.0f}" if memory else ""
            print(f"| {task} | {scale * theirs:.1f} | {scale * mine:.1f} | {mine / theirs:.2f}{peaks} | "
                  f"{theirs_flops / 1e9:.2f}, {theirs_rate} | {my_flops / 1e9:.2f}, {my_rate} |")
    print()
    print("\n".join(notes))


if __name__ == "__main__":
    main()
