"""Attribute binding (`eval.py --task binding --data shapes:binding`): for each candidate set of data/binding.py
(an image's true caption and the same words bound the other way round), whether the true caption scores highest.

ITC scores a caption by the cosine of the pooled image and text features (CLIP, SigLIP, BLIP's ITC); ITM (BLIP)
by the image-grounded text encoder's match probability, softmax(itm_head)[match], as BLIP's ITM scores a pair.
A set counts as right only when its true caption scores strictly above every negative. Accuracy is the share of
sets right, in percent, over all sets and per kind (colour, shape, size, position); chance is the mean over those
sets of 1 / (captions in the set). An unreadable image's sets count as wrong (evaluation/contrastive.py's rule).
"""
import torch

from crossmodal.data import eval_loader
from crossmodal.data.binding import KINDS, BindingDataset
from crossmodal.evaluation.contrastive import Progress, check_unreadable, encode_texts
from crossmodal.data.bad_samples import BadSampleCount

EXAMPLES = 8  # sets written out with their scores


@torch.no_grad()
def binding(model, tokenizer, spec: str, image_size: int, device, batch_size: int = 256, workers: int = 0,
            options=None, log_every: int = 10) -> dict:
    """`itc_accuracy`, `itm_accuracy` (models with an ITM head), `chance` and their values per kind (`*_colour`,
    ...), with the counts and the first EXAMPLES sets scored."""
    base, loader = eval_loader(spec, image_size, tokenizer, batch_size, workers, options=options)
    if not isinstance(base, BindingDataset):
        raise ValueError(f"--task binding needs candidate sets: --data shapes:binding[:N]; got '{spec}'")
    itm = getattr(model, "itm_head", None) is not None
    image_features, image_tokens, unreadable, count = [], [], [], BadSampleCount()
    for batch in loader:
        if itm:  # BLIP: the tokens once, for both scorers
            tokens = model.forward_image(batch["image"].to(device))
            image_tokens.append(tokens.cpu())
            features = model.part("vision_proj")(tokens[:, 0])
            image_features.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu())
        else:
            image_features.append(model.encode_image(batch["image"].to(device), normalize=True).float().cpu())
        unreadable.append(batch["bad"] > 0)
        count.add_batch(batch)
    image_features, unreadable = torch.cat(image_features), torch.cat(unreadable)
    sets = [(image, kind, captions) for image in range(len(base)) for kind, captions in base.candidate_sets(image)]
    affected = sum(int(unreadable[image]) for image, _, _ in sets)
    check_unreadable(count, affected, len(sets), "candidate sets", spec, options, fate="count as wrong")

    texts = [caption for _, _, captions in sets for caption in captions]
    owner = torch.tensor([image for image, _, captions in sets for _ in captions])  # each caption's image
    text_tokens = tokenizer(texts)
    scores = {"itc": (encode_texts(model, text_tokens, device, batch_size) * image_features[owner]).sum(-1)}
    if itm:
        scores["itm"] = match_probabilities(model, text_tokens, torch.cat(image_tokens), owner, device, batch_size,
                                            log_every)
    return summarise(sets, scores, unreadable)


def match_probabilities(model, text_tokens: torch.Tensor, image_tokens: torch.Tensor, owner: torch.Tensor, device,
                        batch_size: int = 256, log_every: int = 10) -> torch.Tensor:
    """softmax(ITM logits)[match] of each caption with its image: (num_texts,)."""
    progress = Progress("ITM-scored captions", len(owner), log_every)
    probabilities = []
    for start in range(0, len(owner), batch_size):
        tokens = text_tokens[start : start + batch_size]
        tokens = tokens[:, : int((tokens != model.pad_id).sum(1).max())]  # padding only trails
        states = model.forward_multimodal(tokens.to(device), image_tokens[owner[start : start + batch_size]].to(device))
        probabilities.append(model.part("itm_head")(states[:, 0]).float().softmax(-1)[:, 1].cpu())
        progress.update(len(tokens))
    return torch.cat(probabilities)


def summarise(sets: list[tuple[int, str, list[str]]], scores: dict[str, torch.Tensor],
              unreadable: torch.Tensor) -> dict:
    """Accuracy (%) per scorer overall and per kind, chance, counts and examples; scores[name] (num_texts,) in the
    order of the sets' captions."""
    results, right, offset = {}, {name: [] for name in scores}, 0
    for image, _, captions in sets:
        for name, values in scores.items():
            chunk = values[offset : offset + len(captions)]
            right[name].append(not unreadable[image] and bool(chunk[0] > chunk[1:].max()))
        offset += len(captions)
    kinds = [kind for kind in KINDS if any(k == kind for _, k, _ in sets)]
    for suffix, members in [("", range(len(sets)))] + [(f"_{kind}", [i for i, s in enumerate(sets) if s[1] == kind])
                                                       for kind in kinds]:
        for name in scores:
            results[f"{name}_accuracy{suffix}"] = 100.0 * sum(right[name][i] for i in members) / len(members)
        results[f"chance{suffix}"] = 100.0 * sum(1 / len(sets[i][2]) for i in members) / len(members)
        results[f"num_sets{suffix}"] = len(members)
    results.update(num_images=len(unreadable), bad_images=int(unreadable.sum()))
    examples, offset = [], 0
    for image, kind, captions in sets[:EXAMPLES]:
        examples.append({"image": image, "kind": kind, "captions": captions,
                         **{name: [round(v, 4) for v in values[offset : offset + len(captions)].tolist()]
                            for name, values in scores.items()}})
        offset += len(captions)
    return {**results, "examples": examples}
