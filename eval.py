"""Evaluate a CLIP model the way the CLIP paper reports it (Radford et al., 2021, sections 3.1 and 3.2).

A checkpoint that train.py wrote (it carries its config and tokenizer):
    python eval.py --checkpoint RUN/checkpoint.pt --task zeroshot --data shapes:val --out zs.json
    python eval.py --checkpoint RUN/checkpoint.pt --task retrieval --data coco:PATH/dataset_coco.json#test

Released weights (OpenAI's TorchScript .pt files or open_clip checkpoints; no network, no HuggingFace):
    python eval.py --model ViT-B-32-quickgelu --pretrained ViT-B-32.pt --task zeroshot \
        --data imagefolder:PATH/imagenet/val --classnames imagenet

zeroshot: a classifier built from prompt templates (each class embedding is the mean of its normalised
template embeddings, renormalised), logits = 100 * image . class; top-1 and top-5 accuracy. Templates and
class names are built-in sets (`imagenet`, `shapes`) or text files, one entry per line (data/templates.py).
retrieval: image-to-text and text-to-image recall at 1, 5 and 10 over the whole dataset. A query counts
as found at K if any of its true matches is among the K nearest (COCO-style, several captions an image).
Images go through the reference's evaluation preprocessing: bicubic resize of the shortest side to the
model's input size, centre crop, OpenAI mean and std (data/transforms.py).

Extra `--data.KEY=VALUE` arguments override the data config (e.g. `--data.image_root=/data/coco`).
"""
import argparse
import contextlib
import importlib.util
import json
import os
import sys

import torch
import torch.nn.functional as F

import probe
from config import Config, ConfigError, config_from_dict, load_config, parse_overrides
from data import build_dataset, eval_loader, retrieval_loader
from data.templates import load_classnames, load_templates
from data.tokenizer import ClipTokenizer, tokenizer_from_bytes
from models import MODELS, create_model, model_from_config

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


@torch.no_grad()
def zeroshot_classifier(model, tokenizer, classnames: list[str], templates: list[str], device) -> torch.Tensor:
    """(num_classes, D): per class, the renormalised mean of its normalised prompt embeddings."""
    weights = []
    for name in classnames:
        tokens = tokenizer([template.format(name) for template in templates]).to(device)
        embeddings = model.encode_text(tokens, normalize=True).float()  # (num_templates, D)
        weights.append(F.normalize(embeddings.mean(0), dim=-1))
    return torch.stack(weights)


@torch.no_grad()
def encode_images(model, loader, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Normalised image features (N, D) in fp32 on the CPU, the labels (N,) (-1 where there are none), and how
    many unreadable images the loader replaced by their neighbours (each is warned about)."""
    features, labels, bad = [], [], 0
    for batch in loader:
        features.append(model.encode_image(batch["image"].to(device), normalize=True).float().cpu())
        labels.append(batch["label"])
        bad += int(batch["bad"].sum())
        for example in batch["bad_examples"]:
            print(f"warning: unreadable image replaced by the next one, the metrics count that one twice: {example}",
                  file=sys.stderr)
    return torch.cat(features), torch.cat(labels), bad


@torch.no_grad()
def encode_texts(model, tokens: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    chunks = [model.encode_text(chunk.to(device), normalize=True).float().cpu() for chunk in tokens.split(batch_size)]
    return torch.cat(chunks)


def accuracy(logits: torch.Tensor, labels: torch.Tensor, topk=(1, 5)) -> dict:
    top = logits.topk(min(max(topk), logits.shape[-1]), dim=-1).indices  # (N, max k)
    hits = top == labels[:, None]
    return {f"top{k}": 100.0 * hits[:, :k].any(-1).float().mean().item() for k in topk}


def retrieval_metrics(image_features, text_features, text_to_image: torch.Tensor, ks=(1, 5, 10)) -> dict:
    """Recall@K both ways; text_to_image[t] is the index of the image caption t describes."""
    similarity = image_features @ text_features.T  # (num_images, num_texts)
    matches = text_to_image[None, :] == torch.arange(len(image_features))[:, None]  # (num_images, num_texts)
    results = {}
    for direction, scores, truth in (("image_to_text", similarity, matches), ("text_to_image", similarity.T, matches.T)):
        ranked = scores.argsort(dim=-1, descending=True)
        found = truth.gather(1, ranked)  # (queries, candidates) True where a true match sits
        first = found.float().argmax(-1)  # rank of the best-placed true match
        for k in ks:
            results[f"{direction}_R@{k}"] = 100.0 * (first < k).float().mean().item()
    return results


def zeroshot(model, tokenizer, spec, image_size, device, templates="shapes", batch_size=256, classnames=None,
             workers=0, options=None) -> dict:
    """Zero-shot top-1/top-5 on a classification dataset; `templates`/`classnames`: a built-in name or a file."""
    dataset, loader = eval_loader(spec, image_size, tokenizer, batch_size, workers, options=options)
    names = list(dataset.classnames)
    if classnames:
        names = load_classnames(classnames)
        if len(names) != len(dataset.classnames):
            raise ValueError(f"classnames '{classnames}' has {len(names)} names but {spec} has "
                             f"{len(dataset.classnames)} classes")
    classifier = zeroshot_classifier(model, tokenizer, names, load_templates(templates), device).float().cpu()
    image_features, labels, bad = encode_images(model, loader, device)
    results = accuracy(100.0 * image_features @ classifier.T, labels)
    results.update(num_classes=len(names), chance=100.0 / len(names), num_images=len(image_features), bad_images=bad)
    return results


def retrieval(model, tokenizer, spec, image_size, device, batch_size=256, workers=0, options=None) -> dict:
    image_loader, text_tokens, text_to_image = retrieval_loader(
        spec, image_size, tokenizer, batch_size, workers, options=options)
    image_features, _, bad = encode_images(model, image_loader, device)
    text_features = encode_texts(model, text_tokens, device, batch_size)
    results = retrieval_metrics(image_features, text_features, text_to_image)
    results.update(num_images=len(image_features), num_texts=len(text_features), bad_images=bad)
    return results


def evaluate_all(cfg, model, tokenizer, device) -> dict:
    """What train.py reports: retrieval on data.val, zero-shot on data.val when it has classes (shapes,
    imagefolder), zero-shot on data.heldout."""
    args = (model, tokenizer)
    size, batch, options = cfg.data.image_size, cfg.eval.batch_size, cfg.data
    results = {}
    if hasattr(build_dataset(cfg.data.val, size, cfg.seed, options), "classnames"):
        for name, value in zeroshot(*args, cfg.data.val, size, device, cfg.eval.templates, batch,
                                    options=options).items():
            results[f"val/{name}"] = value
    for name, value in retrieval(*args, cfg.data.val, size, device, batch, options=options).items():
        results[f"val/{name}"] = value
    if cfg.data.heldout:
        for name, value in zeroshot(*args, cfg.data.heldout, size, device, cfg.eval.templates, batch,
                                    options=options).items():
            results[f"heldout/{name}"] = value
    return results


def load_checkpoint(path: str, device="cpu"):
    """(config, model, tokenizer) from a train.py checkpoint; needs no other file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--checkpoint: no file at '{path}'")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    cfg = config_from_dict(checkpoint["config"])
    tokenizer = tokenizer_from_bytes(cfg.data.tokenizer, checkpoint["tokenizer"], cfg.data.context_length)
    model = model_from_config(cfg, tokenizer)
    model.load_state_dict(checkpoint["model"])
    return cfg, model.to(device).eval(), tokenizer


def find_bpe(bpe: str | None, pretrained: str | None) -> str:
    """--bpe, else the vocabulary file next to the weights, else the copy an installed open_clip ships."""
    if bpe:
        if not os.path.isfile(bpe):
            raise FileNotFoundError(f"--bpe: no CLIP BPE vocabulary at '{bpe}'")
        return bpe
    candidates = [os.path.join(os.path.dirname(os.path.abspath(pretrained)), BPE_FILE)] if pretrained else []
    spec = importlib.util.find_spec("open_clip")  # located, not imported
    if spec and spec.submodule_search_locations:
        candidates += [os.path.join(location, BPE_FILE) for location in spec.submodule_search_locations]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"no CLIP BPE vocabulary found (looked for {BPE_FILE} at {candidates or 'nothing'}); "
                            f"pass --bpe PATH/{BPE_FILE} (it ships with openai/CLIP and open_clip)")


def load_pretrained(name: str, pretrained: str, bpe: str | None, device="cpu"):
    """(config, model, tokenizer) for a preset with released weights and the CLIP BPE tokenizer."""
    if name not in MODELS:
        create_model(name)  # raises, naming the closest presets
    preset = MODELS[name]
    cfg = Config()
    cfg.data.image_size, cfg.data.context_length = preset.image_size, preset.context_length
    cfg.data.tokenizer, cfg.eval.templates = "clip", "imagenet"
    tokenizer = ClipTokenizer(find_bpe(bpe, pretrained), context_length=preset.context_length)
    model = create_model(name, pretrained=pretrained)
    return cfg, model.to(device).eval(), tokenizer


def linear_probe_task(args, model, tokenizer, spec: str, cfg) -> dict:
    """eval.py --task linear_probe: probe.py's CLIP-paper probe; a confusion-matrix PNG beside --out."""
    plot_path = os.path.splitext(args.out)[0] + "_confusion.png" if args.out else None
    if not args.data or (args.val is None and args.test is None):
        raise ValueError("--task linear_probe needs --data (the training split) and --val or --test (labelled splits)")
    return probe.linear_probe(model, tokenizer, spec, args.val, cfg.data.image_size, args.device, cfg.data,
                              test_spec=args.test, shots=args.shots, seeds=tuple(args.seeds),
                              batch_size=args.batch_size, workers=args.workers, plot_path=plot_path)


def print_table(title: str, results: dict) -> None:
    print(title)
    width = max(len(name) for name in results)
    for name, value in results.items():
        print(f"  {name:<{width}}  {value:8.2f}" if isinstance(value, float) else f"  {name:<{width}}  {value:>8}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a train.py checkpoint.pt")
    parser.add_argument("--model", help="a preset (models.MODELS) for released weights, e.g. ViT-B-32-quickgelu")
    parser.add_argument("--pretrained", help="with --model: an OpenAI .pt file or an open_clip checkpoint")
    parser.add_argument("--bpe", help=f"with --model: the CLIP vocabulary {BPE_FILE} "
                                      "(default: next to --pretrained, else open_clip's copy when installed)")
    parser.add_argument("--task", required=True, choices=("zeroshot", "retrieval", "linear_probe"))
    parser.add_argument("--data", help="dataset spec (default: the run's data.val); linear_probe: the training split")
    parser.add_argument("--val", help="linear_probe: the split that chooses the L2 strength (default: 20%% of --data)")
    parser.add_argument("--test", help="linear_probe: the split reported on (default: --val)")
    parser.add_argument("--shots", type=int, nargs="*", default=None,
                        help="linear_probe: also k-shot probes with k images per class, e.g. --shots 1 2 4 8 16")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="linear_probe: k-shot draws")
    parser.add_argument("--templates", help="zero-shot prompts: imagenet, shapes, or a file with one per line")
    parser.add_argument("--classnames", help="zero-shot class names: imagenet, or a file with one per line "
                                             "in class-index order (default: the dataset's own)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                        help="autocast dtype for the towers (fp16 needs a GPU)")
    parser.add_argument("--out", help="write the results to this JSON file")
    parser.add_argument("--device", default="cpu")
    args, overrides = parser.parse_known_args(argv)
    if bool(args.checkpoint) == bool(args.model) or bool(args.model) != bool(args.pretrained):
        parser.error("give either --checkpoint (a train.py run) or --model with --pretrained (released weights)")
    if any(not arg.startswith("--data.") for arg in overrides if arg.startswith("--")):
        parser.error(f"unrecognised arguments: {' '.join(overrides)} (only --data.KEY=VALUE overrides are passed on)")

    try:
        for name, load in ((args.classnames, load_classnames), (args.templates, load_templates)):
            if name:
                load(name)  # a typo fails before the model loads
        if args.checkpoint:
            cfg, model, tokenizer = load_checkpoint(args.checkpoint, args.device)
        else:
            cfg, model, tokenizer = load_pretrained(args.model, args.pretrained, args.bpe, args.device)
        data_cfg = load_config(None, overrides).data
        for key, _ in parse_overrides(overrides):  # only the keys the user named; the rest keep the run's
            setattr(cfg.data, key[len("data."):], getattr(data_cfg, key[len("data."):]))
        spec = args.data or cfg.data.val
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
        autocast = torch.autocast(torch.device(args.device).type, dtype) if dtype else contextlib.nullcontext()
        with autocast:
            if args.task == "linear_probe":
                results = linear_probe_task(args, model, tokenizer, spec, cfg)
            elif args.task == "zeroshot":
                results = zeroshot(model, tokenizer, spec, cfg.data.image_size, args.device,
                                   args.templates or cfg.eval.templates, args.batch_size, args.classnames,
                                   args.workers, cfg.data)
            else:
                results = retrieval(model, tokenizer, spec, cfg.data.image_size, args.device, args.batch_size,
                                    args.workers, cfg.data)
    except (FileNotFoundError, ConfigError, ValueError) as error:  # bad input: say what, not a traceback
        sys.exit(f"eval.py: {error}")
    source = {"checkpoint": args.checkpoint} if args.checkpoint else {"model": args.model,
                                                                      "pretrained": args.pretrained}
    table = probe.scalar_metrics(results) if args.task == "linear_probe" else results
    print_table(f"{args.task} on {spec} ({', '.join(f'{k} {v}' for k, v in source.items())})", table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"task": args.task, "data": spec, **source, **results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
