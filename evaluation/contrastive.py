"""Zero-shot classification and image-text retrieval, the way the CLIP paper reports them (Radford et al., 2021,
sections 3.1 and 3.2), for any model with `encode_image` and `encode_text` (CLIP, SigLIP, BLIP's ITC features).

zeroshot: a classifier built from prompt templates (each class embedding is the mean of its normalised template
embeddings, renormalised), logits = 100 * image . class; top-1 and top-5 accuracy. Templates and class names are
built-in sets (`imagenet`, `shapes`) or text files, one entry per line (data/templates.py).
retrieval: image-to-text and text-to-image recall at 1, 5 and 10 over the whole dataset. A query counts as found
at K if any of its true matches is among the K nearest (COCO-style, several captions an image). Images go through
the reference's evaluation preprocessing: bicubic resize of the shortest side to the model's input size, centre
crop, OpenAI mean and std (data/transforms.py).

Unreadable images (a missing or corrupt file; data/bad_samples.py) count as misses: the protocols score a fixed test
set (COCO's 5K Karpathy test images and their 25K captions, ImageNet's 50K validation images), so the denominators
stay the dataset's and a broken file can only lower a number, never raise it. In retrieval an unreadable image is
no candidate, and both its own query and the queries of its captions are misses; in zero-shot its image is a miss.
Results report `bad_images` and the items they affect (`affected_captions`, or the images for zero-shot), and the
evaluation stops with one line once those pass data.max_bad_fraction of the items (and at least 10 of them), the
rule training applies to its samples.

The objective ablation's predictive baselines (models/predictive.py) have no text embeddings: `zeroshot` scores
each class prompt by its log-likelihood per word under the image instead.
"""
import sys
import time

import torch
import torch.nn.functional as F

from crossmodal.config import BadInput, DataConfig
from crossmodal.data import build_dataset, eval_loader, retrieval_loader
from crossmodal.data.bad_samples import BadSampleCount
from crossmodal.data.templates import load_classnames, load_templates
from crossmodal.models.predictive import TextPredictor


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
def encode_marked(model, loader, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, BadSampleCount]:
    """Normalised image features (N, D) in fp32 on the CPU, the labels (N,) (-1 where there are none), which items'
    images were unreadable (N,) (the loader put a neighbour's image in their place), and their count with examples."""
    features, labels, unreadable, count = [], [], [], BadSampleCount()
    for batch in loader:
        features.append(model.encode_image(batch["image"].to(device), normalize=True).float().cpu())
        labels.append(batch["label"])
        unreadable.append(batch["bad"] > 0)
        count.add_batch(batch)
    return torch.cat(features), torch.cat(labels), torch.cat(unreadable), count


@torch.no_grad()
def encode_images(model, loader, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """encode_marked's features and labels, and how many images were unreadable (each is warned about; its slot
    holds a neighbour's features)."""
    features, labels, unreadable, count = encode_marked(model, loader, device)
    for example in count.examples:
        print(f"warning: unreadable image replaced by the next one: {example}", file=sys.stderr)
    return features, labels, count.bad


def check_unreadable(count: BadSampleCount, affected: int, total: int, what: str, spec: str,
                     options: DataConfig | None, fate: str = "count as misses") -> None:
    """Warn about the unreadable images and stop (BadInput) once the `affected` of `total` items (`what`) pass
    data.max_bad_fraction."""
    for example in count.examples:
        print(f"warning: {spec}: unreadable image ({what} {fate}): {example}", file=sys.stderr)
    max_fraction = (options or DataConfig()).max_bad_fraction
    BadSampleCount(affected, total, list(count.examples)).check(max_fraction, spec, what, "with an unreadable image")


@torch.no_grad()
def encode_texts(model, tokens: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    chunks = [model.encode_text(chunk.to(device), normalize=True).float().cpu() for chunk in tokens.split(batch_size)]
    return torch.cat(chunks)


def accuracy(logits: torch.Tensor, labels: torch.Tensor, topk=(1, 5)) -> dict:
    top = logits.topk(min(max(topk), logits.shape[-1]), dim=-1).indices  # (N, max k)
    hits = top == labels[:, None]
    return {f"top{k}": 100.0 * hits[:, :k].any(-1).float().mean().item() for k in topk}


def retrieval_metrics(image_features, text_features, text_to_image: torch.Tensor, ks=(1, 5, 10),
                      unreadable: torch.Tensor | None = None) -> dict:
    """Recall@K both ways; text_to_image[t] is the index of the image caption t describes; unreadable (num_images,):
    images that are no candidate and whose queries are misses."""
    similarity = image_features @ text_features.T  # (num_images, num_texts)
    return ranking_recalls(similarity, similarity.T, text_to_image, ks, unreadable)


def ranking_recalls(image_to_text: torch.Tensor, text_to_image_scores: torch.Tensor, text_to_image: torch.Tensor,
                    ks=(1, 5, 10), unreadable: torch.Tensor | None = None) -> dict:
    """Recall@K of two score matrices, (num_images, num_texts) and (num_texts, num_images); ties keep index order.
    unreadable (num_images,) bool: those images are ranked last as candidates, and their own queries and their
    captions' queries are misses (module docstring)."""
    matches = text_to_image[None, :] == torch.arange(len(image_to_text))[:, None]  # (num_images, num_texts)
    if unreadable is None:
        unreadable = torch.zeros(len(image_to_text), dtype=torch.bool)
    text_to_image_scores = text_to_image_scores.masked_fill(unreadable[None, :], float("-inf"))
    results = {}
    for direction, scores, truth, missed in (("image_to_text", image_to_text, matches, unreadable),
                                             ("text_to_image", text_to_image_scores, matches.T,
                                              unreadable[text_to_image])):
        ranked = scores.argsort(dim=-1, descending=True, stable=True)
        found = truth.gather(1, ranked)  # (queries, candidates) True where a true match sits
        first = found.float().argmax(-1)  # rank of the best-placed true match
        first = first.masked_fill(missed, max(scores.shape[-1], *ks))  # a missed query is found at no K
        for k in ks:
            results[f"{direction}_R@{k}"] = 100.0 * (first < k).float().mean().item()
    return results


def zeroshot(model, tokenizer, spec, image_size, device, templates="shapes", batch_size=256, classnames=None,
             workers=0, options=None) -> dict:
    """Zero-shot top-1/top-5 on a classification dataset; `templates`/`classnames`: a built-in name or a file
    (names for every class folder of an imagefolder, empty ones included, are matched to the classes it keeps)."""
    dataset, loader = eval_loader(spec, image_size, tokenizer, batch_size, workers, options=options)
    if not hasattr(dataset, "classnames"):
        raise BadInput(f"{spec}: zero-shot classification needs a dataset with classes (shapes, imagefolder)")
    names = list(dataset.classnames)
    left_out = dataset.left_out() if hasattr(dataset, "left_out") else []
    for line in left_out:
        print(f"warning: {spec}: left out {line}", file=sys.stderr)
    if classnames:
        given = load_classnames(classnames)
        positions = getattr(dataset, "folder_positions", range(len(names)))
        if len(given) == len(names):
            names = given
        elif len(given) == len(positions) + len(getattr(dataset, "empty_folders", [])):
            names = [given[position] for position in positions]  # the empty folders' names left out
        else:
            raise ValueError(f"classnames '{classnames}' has {len(given)} names but {spec} has "
                             f"{len(dataset.classnames)} classes")
    if isinstance(model, TextPredictor):  # no text embeddings: each class's prompts scored under each image
        scores, labels, unreadable, count = prompt_likelihoods(model, tokenizer, loader, names,
                                                               load_templates(templates), device)
    else:
        classifier = zeroshot_classifier(model, tokenizer, names, load_templates(templates), device).float().cpu()
        image_features, labels, unreadable, count = encode_marked(model, loader, device)
        scores = 100.0 * image_features @ classifier.T
    check_unreadable(count, int(unreadable.sum()), len(labels), "images", spec, options)
    results = accuracy(scores, labels.masked_fill(unreadable, -1))  # (an unreadable image is a miss)
    results.update(num_classes=len(names), chance=100.0 / len(names), num_images=len(labels),
                   bad_images=int(unreadable.sum()))
    if left_out:
        results.update(empty_class_folders=len(getattr(dataset, "empty_folders", [])), left_out=left_out)
    return results


@torch.no_grad()
def prompt_likelihoods(model: TextPredictor, tokenizer, loader, classnames: list[str], templates: list[str],
                       device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, BadSampleCount]:
    """Zero-shot scores of a predictive baseline, (N, num_classes): per image and class, the mean over templates of
    the prompt's log-likelihood per word (models/predictive.py); the labels (N,), which images were unreadable (N,)
    and their count."""
    prompts = tokenizer([template.format(name) for name in classnames for template in templates]).to(device)
    scores, labels, unreadable, count = [], [], [], BadSampleCount()
    for batch in loader:
        features = model.encode_image(batch["image"].to(device))
        likelihoods = model.log_likelihoods(features, prompts).float().cpu()  # (B, classes x templates)
        scores.append(likelihoods.view(len(features), len(classnames), len(templates)).mean(-1))
        labels.append(batch["label"])
        unreadable.append(batch["bad"] > 0)
        count.add_batch(batch)
    return torch.cat(scores), torch.cat(labels), torch.cat(unreadable), count


def retrieval(model, tokenizer, spec, image_size, device, batch_size=256, workers=0, options=None) -> dict:
    """Recall@1/5/10 both ways; an unreadable image's queries and its captions' are misses (module docstring)."""
    image_loader, text_tokens, text_to_image = retrieval_loader(
        spec, image_size, tokenizer, batch_size, workers, options=options)
    image_features, _, unreadable, count = encode_marked(model, image_loader, device)
    affected = int(unreadable[text_to_image].sum())
    check_unreadable(count, affected, len(text_to_image), "captions", spec, options)
    text_features = encode_texts(model, text_tokens, device, batch_size)
    results = retrieval_metrics(image_features, text_features, text_to_image, unreadable=unreadable)
    results.update(num_images=len(image_features), num_texts=len(text_features), bad_images=int(unreadable.sum()),
                   affected_captions=affected)
    return results


class Progress:
    """A line every `every` batches: items done, items/s and the time left (long evaluations)."""

    def __init__(self, what: str, total: int, every: int = 10):
        self.what, self.total, self.every = what, total, every
        self.done = self.batches = 0
        self.start = time.time()

    def update(self, count: int) -> None:
        self.done += count
        self.batches += 1
        if self.every and self.batches % self.every == 0 and self.done < self.total:
            rate = self.done / max(time.time() - self.start, 1e-9)
            print(f"{self.what}: {self.done}/{self.total}, {rate:.1f}/s, ETA {(self.total - self.done) / rate / 60:.1f} "
                  f"min", flush=True)


# ---------------------------------------------------------------- BLIP

def evaluate_run(cfg, model, tokenizer, device) -> dict:
    """What train.py reports for a contrastive run: retrieval on data.val, zero-shot on data.val when it has
    classes (shapes, imagefolder), zero-shot on data.heldout."""
    args = (model, tokenizer)
    size, batch, options = cfg.data.image_size, cfg.eval.batch_size, cfg.data
    results = {}
    if hasattr(build_dataset(cfg.data.val, size, cfg.seed, options), "classnames"):
        for name, value in zeroshot(*args, cfg.data.val, size, device, cfg.eval.templates, batch,
                                    options=options).items():
            results[f"val/{name}"] = value
    if not isinstance(model, TextPredictor):  # (a predictive baseline would score every caption under every image)
        for name, value in retrieval(*args, cfg.data.val, size, device, batch, options=options).items():
            results[f"val/{name}"] = value
    if cfg.data.heldout:
        for name, value in zeroshot(*args, cfg.data.heldout, size, device, cfg.eval.templates, batch,
                                    options=options).items():
            results[f"heldout/{name}"] = value
    return results
