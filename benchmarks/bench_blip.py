"""BLIP-base speed against HuggingFace transformers' BLIP on the same random weights, alternating in one run.

    python benchmarks/bench_blip.py [--batch 8] [--rounds 3] [--device cpu|cuda] [--precision fp32|bf16] [--profile]

Two measurements, each run alternately for HF and ours `--rounds` times (median seconds shown):
- a pretraining step (paper section 3.2, salesforce/BLIP `blip_pretrain.py`) on `--batch` images at 224 px and
  captions of 8..30 tokens padded to 30 as a fixed-length tokenizer gives them (ours cuts the columns after the
  batch's longest caption; HF computes them, as it would not with `padding="longest"`): ITC with momentum
  encoders (EMA 0.995, updated before their forward), momentum distillation (alpha 0.4) and a 57600-feature
  queue; ITM on the positives and one hard negative text per image and image per text (3B rows through the
  image-grounded encoder); LM with label smoothing 0.1 through the decoder that shares all but self-attention
  with the encoder; loss = sum; backward; one fused AdamW step (lr 1e-5, weight decay 0.05; train.py's) over every
  trained parameter. Momentum encoders and queue run on both sides.
- beam-3 captioning as BLIP evaluates (prompt "a picture of ", max_length 20, min_length 5): image encoder and
  decoding, `BlipForConditionalGeneration.generate` against ours `generate_ids` as users get it (on a CPU, the
  decoding steps' linear layers on the few-row kernel and the image tower's on oneDNN with weights reordered once,
  models/packed.py: ours' first round also makes those copies, which the median leaves out).

HF has no BLIP pretraining module, so its side is assembled from its parts the way salesforce/BLIP ties them:
`BlipForImageTextRetrieval` (vision_model, text_encoder, vision_proj, text_proj, itm_head) and
`BlipForConditionalGeneration`'s text_decoder, whose embeddings, cross-attention, feed-forward and their norms are
the encoder's modules (`tie_encoder_decoder_weights`, skip '/attention'); momentum copies of the two encoders
and projections are deep copies, a learnable `temp` 0.07 as BLIP's. The loss arithmetic (ITC targets, hard
negative sampling, ITM cross-entropy) is `losses/blip.py` on both sides, so the timing difference is the models;
HF's LM loss is its own (the decoder's label-smoothed cross-entropy). Ours is `create_model("BLIP-base")` loaded
from the same weights through `models/convert.py`, `BLIP.forward`. Both sides draw the hard negatives after
the same `torch.manual_seed`, so equal similarities give equal negatives.

Each side's FLOPs per task are counted once by FlopCounterMode (one extra run after the timed rounds) and printed
with TFLOP/s and share of this machine's matmul peak (benchmarks/flops.py) in the run's precision; captioning
is decoding, a few rows at a time, so its share is bound by memory, not the matmul peak.

Checked inside the run: the three losses agree (relative difference printed; the first step's weights are
equal, later ones have taken the same AdamW steps), and the beam-3 caption ids are equal.
`--precision bf16` runs both sides' forward passes (the step's losses, the captioning) under torch.autocast (bf16),
as bench_train.py does; weights, optimizer state and the queue stay fp32, and the losses then agree only to bf16's
precision. transformers is a test-only dependency (`pip install -e ".[dev]"`).
"""
import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

# Unlike the other benchmarks, this one keeps the repository root off sys.path: its kernels/ folder would shadow the
# `kernels` package that transformers 5.25 imports. It needs only the installed `crossmodal` and benchmarks/flops.py.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from flops import count_flops, matmul_peak, peak_line, rate  # noqa: E402

PAD, CLS, SEP, DEC, ENC = 0, 101, 102, 30522, 30523
HF_NAME = "HF transformers"


def build_hf(transformers, torch):
    """HF's BLIP parts with BLIP-base sizes and random weights, tied as BLIP's pretraining model."""
    text = dict(num_attention_heads=12, layer_norm_eps=1e-12, label_smoothing=0.1, sep_token_id=SEP, pad_token_id=PAD,
                bos_token_id=DEC, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    vision = dict(image_size=224, patch_size=16, layer_norm_eps=1e-6, attention_dropout=0.0)
    config = transformers.BlipConfig(text_config=text, vision_config=vision)
    retrieval = transformers.BlipForImageTextRetrieval(config)
    captioner = transformers.BlipForConditionalGeneration(config)
    with torch.no_grad():  # HF's init leaves the ViT at ~0: random weights everywhere
        for module in (retrieval, captioner):
            for tensor in module.state_dict().values():
                if tensor.is_floating_point():
                    tensor.normal_(0, 0.02)
    captioner.vision_model = retrieval.vision_model
    decoder, encoder = captioner.text_decoder.bert, retrieval.text_encoder
    decoder.embeddings = encoder.embeddings
    for mine, theirs in zip(decoder.encoder.layer, encoder.encoder.layer):
        mine.crossattention, mine.intermediate, mine.output = theirs.crossattention, theirs.intermediate, theirs.output
    captioner.text_decoder.cls.predictions.decoder.weight = encoder.embeddings.word_embeddings.weight
    return config, retrieval, captioner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="bf16: autocast on both sides")
    parser.add_argument("--profile", action="store_true", help="after the rounds, profile one more of each and print "
                        "the operators by self time")
    parser.add_argument("--tasks", default="train,caption", help="comma-separated: train, caption")
    args = parser.parse_args()

    import torch
    import transformers

    from crossmodal.losses.blip import (FeatureQueue, diagonal_positives, itc_loss, itm_loss, lm_labels, momentum_update,
                             sample_hard_negatives)
    from crossmodal.models import create_model

    torch.manual_seed(0)
    config, retrieval, captioner = build_hf(transformers, torch)
    with tempfile.TemporaryDirectory() as folder:
        decoder = {key: value for key, value in captioner.state_dict().items() if key.startswith("text_decoder.")}
        weights = {**retrieval.state_dict(), **decoder}
        torch.save({key: value.clone() for key, value in weights.items()}, os.path.join(folder, "pytorch_model.bin"))
        config.to_json_file(os.path.join(folder, "config.json"))
        ours = create_model("BLIP-base", pretrained=folder, text_drop=0.0, momentum_encoders=True)
    device = torch.device(args.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    retrieval, captioner, ours = retrieval.to(device), captioner.to(device), ours.to(device)

    # HF's training state: momentum copies, the queue (ours' starting one) and the temperature.
    hf_online = [retrieval.vision_model, retrieval.text_encoder, retrieval.vision_proj, retrieval.text_proj]
    hf_momentum = [copy.deepcopy(module).requires_grad_(False) for module in hf_online]
    hf_queue = copy.deepcopy(ours.queue)
    hf_temp = torch.nn.Parameter(torch.tensor(0.07, device=device))

    def trained(*modules):
        params = {id(p): p for m in modules for p in m.parameters() if p.requires_grad}
        return list(params.values())

    hf_params = trained(retrieval, captioner, torch.nn.ParameterList([hf_temp]))
    our_params = trained(ours)
    # fused, as train.py's build_optimizer: the same optimizer on both sides, so the difference is the models
    optimizers = {HF_NAME: torch.optim.AdamW(hf_params, lr=1e-5, weight_decay=0.05, fused=True),
                  "ours": torch.optim.AdamW(our_params, lr=1e-5, weight_decay=0.05, fused=True)}

    batch = args.batch
    images = torch.randn(batch, 3, 224, 224, device=device)
    lengths = torch.randint(8, 31, (batch,))
    tokens = torch.full((batch, 30), PAD, dtype=torch.long)
    for row, length in enumerate(lengths.tolist()):  # [CLS] caption [SEP] [PAD]...
        words = torch.randint(1000, 30000, (length - 2,))
        tokens[row, :length] = torch.cat([torch.tensor([CLS]), words, torch.tensor([SEP])])
    tokens = tokens.to(device)
    prompt = torch.tensor([[CLS, 1037, 3861, 1997, SEP]] * batch, device=device)  # [CLS] a picture of [SEP]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def hf_losses(alpha: float = 0.4) -> dict:
        with torch.no_grad():
            hf_temp.clamp_(0.001, 0.5)
        vision_model, text_encoder, vision_proj, text_proj = hf_online
        mask = (tokens != PAD).long()
        image_embeds = vision_model(pixel_values=images).last_hidden_state  # (B, 197, 768)
        image_feat = torch.nn.functional.normalize(vision_proj(image_embeds[:, 0]), dim=-1)
        text_embeds = text_encoder(input_ids=tokens, attention_mask=mask).last_hidden_state  # (B, T, 768)
        text_feat = torch.nn.functional.normalize(text_proj(text_embeds[:, 0]), dim=-1)
        with torch.no_grad():
            momentum_update([p for m in hf_online for p in m.parameters()],
                            [p for m in hf_momentum for p in m.parameters()])
            image_feat_m = torch.nn.functional.normalize(
                hf_momentum[2](hf_momentum[0](pixel_values=images).last_hidden_state[:, 0]), dim=-1)
            text_feat_m = torch.nn.functional.normalize(
                hf_momentum[3](hf_momentum[1](input_ids=tokens, attention_mask=mask).last_hidden_state[:, 0]), dim=-1)
        loss_itc = itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, hf_queue.image_queue, hf_queue.text_queue,
                            hf_temp, alpha, offset=0)
        hf_queue.enqueue(image_feat_m, text_feat_m)
        with torch.no_grad():
            sim_i2t, sim_t2i = image_feat @ text_feat_m.T / hf_temp, text_feat @ image_feat_m.T / hf_temp  # (B, B)
        neg_text, neg_image = sample_hard_negatives(sim_i2t, sim_t2i, diagonal_positives(batch, batch, device=device))
        itm_ids = torch.cat([tokens, tokens, tokens[neg_text]])  # (3B, T)
        itm_ids[:, 0] = ENC
        itm_images = torch.cat([image_embeds, image_embeds[neg_image], image_embeds])  # (3B, 197, 768)
        image_mask = torch.ones(itm_images.shape[:2], dtype=torch.long, device=device)
        itm_states = text_encoder(input_ids=itm_ids, attention_mask=(itm_ids != PAD).long(),
                                  encoder_hidden_states=itm_images, encoder_attention_mask=image_mask)
        logits = retrieval.itm_head(itm_states.last_hidden_state[:, 0])  # (3B, 2)
        decoder_ids = tokens.clone()
        decoder_ids[:, 0] = DEC
        loss_lm = captioner.text_decoder(input_ids=decoder_ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                                         labels=lm_labels(tokens, PAD), reduction="mean").loss
        return {"itc": loss_itc, "itm": itm_loss(logits[:batch], logits[batch:]), "lm": loss_lm}

    def train_step(name: str, seed: int) -> dict:
        retrieval.train(), captioner.train(), ours.train()
        optimizer = optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(seed)  # the hard negatives
        with autocast:
            losses = hf_losses() if name == HF_NAME else ours(images, tokens, alpha=0.4)
        sum(losses.values()).backward()
        optimizer.step()
        return {key: value.item() for key, value in losses.items()}

    @torch.no_grad()
    @autocast
    def caption(name: str, seed: int) -> list:
        if name == HF_NAME:
            ids = captioner.eval().generate(pixel_values=images, input_ids=prompt.clone(), num_beams=3, max_length=20,
                                            min_length=5)
        else:
            ids = ours.eval().generate_ids(images, [DEC, 1037, 3861, 1997], num_beams=3, max_length=20, min_length=5)
        return [row[: row.index(SEP, 4) + 1] if SEP in row[4:] else row for row in ids.tolist()]

    names = (HF_NAME, "ours")
    tasks = {"train step": train_step, "beam-3 captions": caption}
    tasks = {task: run for task, run in tasks.items() if task.split()[0].replace("beam-3", "caption") in args.tasks}
    times = {(task, name): [] for task in tasks for name in names}
    outputs = {(task, name): [] for task in tasks for name in names}
    for round_ in range(args.rounds):
        for name in names:
            for task, run in tasks.items():
                sync()
                start = time.perf_counter()
                result = run(name, seed=round_)
                sync()
                times[task, name].append(time.perf_counter() - start)
                outputs[task, name].append(result)
    precision = ", bf16 autocast" if args.precision == "bf16" else ""
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    device_type = torch.device(args.device).type
    peak = matmul_peak(device_type, dtype)
    flops = {(task, name): count_flops(run, name, seed=args.rounds) for task, run in tasks.items() for name in names}
    unseen = [task for task in tasks if flops[task, "ours"] < 0.5 * flops[task, HF_NAME]]
    for task in unseen:  # ours' decoding runs the few-row kernel and oneDNN copies, which the counter cannot see
        flops[task, "ours"] = flops[task, HF_NAME]  # the same caption ids out: the same work
    print(f"BLIP-base, batch {batch}, {args.device}{precision} ({torch.get_num_threads()} threads), "
          f"median of {args.rounds} rounds (torch {torch.__version__}, transformers {transformers.__version__})")
    print(peak_line(device_type, dtype))
    print(f"| task | {HF_NAME} (s) | ours (s) | speed-up | {HF_NAME} GFLOP, TFLOP/s, share | "
          f"ours GFLOP, TFLOP/s, share |")
    print("|---|---|---|---|---|---|")
    for task in tasks:
        theirs, mine = statistics.median(times[task, names[0]]), statistics.median(times[task, names[1]])
        work = [f"{flops[task, name] / 1e9:.0f}, {rate(flops[task, name], seconds, peak)}"
                for name, seconds in zip(names, (theirs, mine))]
        print(f"| {task} | {theirs:.3f} | {mine:.3f} | {theirs / mine:.2f}x | {work[0]} | {work[1]} |")
    if unseen:
        print(f"ours' FLOPs for {', '.join(unseen)}: the count of {HF_NAME} (FlopCounterMode cannot see the few-row "
              f"kernel and oneDNN calls of models/packed.py; the outputs are the same)")
    if "train step" in tasks:
        for round_, (theirs, mine) in enumerate(zip(outputs["train step", HF_NAME], outputs["train step", "ours"])):
            difference = {key: abs(theirs[key] - mine[key]) / abs(theirs[key]) for key in theirs}
            print(f"step {round_} losses ours {json.dumps({k: round(v, 6) for k, v in mine.items()})}, "
                  f"relative difference to HF {', '.join(f'{k} {v:.1e}' for k, v in difference.items())}")
    if "beam-3 captions" in tasks:
        same = [a == b for a, b in zip(outputs["beam-3 captions", HF_NAME], outputs["beam-3 captions", "ours"])]
        print(f"same caption ids in every round: {all(same)} {same}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for task, run in tasks.items():
            for name in names:
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    run(name, seed=args.rounds)
                print(f"\n{task}, {name}: operators by self CPU time")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
