"""Evaluate a trained checkpoint the way the CLIP paper reports it.

    python eval.py --checkpoint RUN/checkpoint.pt --task zeroshot --data shapes:val --out zs.json
    python eval.py --checkpoint RUN/checkpoint.pt --task retrieval --data shapes:val --out ret.json

zeroshot: a classifier built from prompt templates (each class embedding is the mean of its normalised
template embeddings, renormalised), logits = 100 * image . class; top-1 and top-5 accuracy.
retrieval: image-to-text and text-to-image recall at 1, 5 and 10 over the whole dataset. A query counts
as found at K if any of its true matches is among the K nearest (COCO-style, several captions an image).
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F

from config import config_from_dict
from data import eval_loader
from data.templates import OPENAI_IMAGENET_TEMPLATES, SHAPES_TEMPLATES
from data.tokenizer import SentencePieceTokenizer

TEMPLATES = {"shapes": SHAPES_TEMPLATES, "imagenet": OPENAI_IMAGENET_TEMPLATES}


@torch.no_grad()
def zeroshot_classifier(model, tokenizer, classnames: list[str], templates: list[str], device) -> torch.Tensor:
    """(num_classes, D): per class, the renormalised mean of its normalised prompt embeddings."""
    weights = []
    for name in classnames:
        tokens = tokenizer([template.format(name) for template in templates]).to(device)
        embeddings = model.encode_text(tokens, normalize=True)  # (num_templates, D)
        weights.append(F.normalize(embeddings.mean(0), dim=-1))
    return torch.stack(weights)


@torch.no_grad()
def encode_dataset(model, loader, device) -> dict:
    images, texts, labels = [], [], []
    for batch in loader:
        images.append(model.encode_image(batch["image"].to(device), normalize=True).float().cpu())
        texts.append(model.encode_text(batch["tokens"].to(device), normalize=True).float().cpu())
        labels.append(batch["label"])
    return {"image": torch.cat(images), "text": torch.cat(texts), "label": torch.cat(labels)}


def accuracy(logits: torch.Tensor, labels: torch.Tensor, topk=(1, 5)) -> dict:
    top = logits.topk(max(topk), dim=-1).indices  # (N, max k)
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


def zeroshot(model, tokenizer, spec, image_size, device, templates="shapes", batch_size=256) -> dict:
    dataset, loader = eval_loader(spec, image_size, tokenizer, batch_size)
    classifier = zeroshot_classifier(model, tokenizer, dataset.classnames, TEMPLATES[templates], device).float().cpu()
    encoded = encode_dataset(model, loader, device)
    results = accuracy(100.0 * encoded["image"] @ classifier.T, encoded["label"])
    results.update(num_classes=len(dataset.classnames), chance=100.0 / len(dataset.classnames), num_images=len(dataset))
    return results


def retrieval(model, tokenizer, spec, image_size, device, batch_size=256) -> dict:
    dataset, loader = eval_loader(spec, image_size, tokenizer, batch_size)
    encoded = encode_dataset(model, loader, device)
    results = retrieval_metrics(encoded["image"], encoded["text"], torch.arange(len(dataset)))
    results.update(num_images=len(dataset), num_texts=len(dataset))
    return results


def evaluate_all(cfg, model, tokenizer, device) -> dict:
    """What train.py reports: zero-shot and retrieval on data.val, zero-shot on data.heldout."""
    args = (model, tokenizer)
    results = {}
    for name, value in zeroshot(*args, cfg.data.val, cfg.data.image_size, device, cfg.eval.templates,
                                cfg.eval.batch_size).items():
        results[f"val/{name}"] = value
    for name, value in retrieval(*args, cfg.data.val, cfg.data.image_size, device, cfg.eval.batch_size).items():
        results[f"val/{name}"] = value
    if cfg.data.heldout:
        for name, value in zeroshot(*args, cfg.data.heldout, cfg.data.image_size, device, cfg.eval.templates,
                                    cfg.eval.batch_size).items():
            results[f"heldout/{name}"] = value
    return results


def load_checkpoint(path: str, device="cpu"):
    """(config, model, tokenizer) from a train.py checkpoint; needs no other file."""
    import train

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    cfg = config_from_dict(checkpoint["config"])
    tokenizer = SentencePieceTokenizer.from_bytes(checkpoint["tokenizer"], context_length=cfg.data.context_length)
    model = train.build_model(cfg, tokenizer)
    model.load_state_dict(checkpoint["model"])
    return cfg, model.to(device).eval(), tokenizer


def print_table(title: str, results: dict) -> None:
    print(title)
    width = max(len(name) for name in results)
    for name, value in results.items():
        print(f"  {name:<{width}}  {value:8.2f}" if isinstance(value, float) else f"  {name:<{width}}  {value:>8}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a train.py checkpoint.pt")
    parser.add_argument("--task", required=True, choices=("zeroshot", "retrieval"))
    parser.add_argument("--data", help="dataset spec (default: the run's data.val)")
    parser.add_argument("--templates", default=None, choices=sorted(TEMPLATES), help="zero-shot prompt set")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", help="write the results to this JSON file")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    try:
        cfg, model, tokenizer = load_checkpoint(args.checkpoint, args.device)
    except FileNotFoundError:
        sys.exit(f"--checkpoint: no file at '{args.checkpoint}'")
    spec = args.data or cfg.data.val
    if args.task == "zeroshot":
        results = zeroshot(model, tokenizer, spec, cfg.data.image_size, args.device,
                           args.templates or cfg.eval.templates, args.batch_size)
    else:
        results = retrieval(model, tokenizer, spec, cfg.data.image_size, args.device, args.batch_size)
    print_table(f"{args.task} on {spec} ({args.checkpoint})", results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"task": args.task, "data": spec, "checkpoint": args.checkpoint, **results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
