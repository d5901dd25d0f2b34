"""Evaluate a CLIP model the way the CLIP paper reports it (Radford et al., 2021, sections 3.1 and 3.2), and a
BLIP model the way the BLIP paper does (Li et al., 2022, section 5; salesforce/BLIP's evaluation code).

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

The objective ablation's predictive baselines (train.py --loss.name=caption|bow; tasks: zeroshot, linear_probe)
score each class prompt by its log-likelihood per word under the image instead (models/predictive.py).

BLIP checkpoints (tasks: retrieval, caption, vqa, and zeroshot/linear_probe through the ITC features):
    python eval.py --checkpoint RUN/checkpoint.pt --task caption --data coco:PATH/dataset_coco.json#test \
        --num-beams 3 --max-length 20 --min-length 5 --prompt "a picture of "
    python eval.py --model BLIP-base --pretrained model_base.pth --vocab vocab.txt --task retrieval --data ...
    python eval.py --checkpoint RUN/checkpoint.pt --task vqa --data vqa:QUESTIONS.json#ANNOTATIONS.json
retrieval (BLIP): ITC similarities for all pairs, then each query's top --k-test candidates re-ranked by ITM with
score = ITM positive logit + ITC similarity, the others at -100 (BLIP's `evaluation`); recalls of both, keys
`itc_*` and `itm_*`. caption: beam search from the prompt for every unique image, scored against all its captions
with BLEU-1..4 and CIDEr (metrics/caption.py). vqa: this codebase's choice, not BLIP's VQA model (a separate
answer decoder over the question states, fine-tuned on VQA): the captioning decoder, conditioned on the image,
continues the prompt "question: {q} answer:"; `--vqa-mode generate` beam-searches the answer, `rank` (BLIP's
default mode) scores each candidate answer by the sum of its tokens' log-probabilities (and [SEP]) after the
prompt and takes the best, after keeping the --answer-k best by first-token probability as BLIP does. Candidates:
--answers FILE (a JSON list like BLIP's answer_list.json, or one per line), else the distinct answers of the data.
Accuracy is the official VQA soft accuracy (metrics/vqa.py); a question with one answer (shapes) counts it as ten
identical human answers, normalised as predictions are: exact match after normalisation.

Released OpenFlamingo weights (few-shot tasks; three local files, see README "Flamingo"; fewshot.py writes
OpenFlamingo's own prompt strings for them):
    python eval.py --model OpenFlamingo-3B-vitl-mpt1b --pretrained checkpoint.pt --vision ViT-L-14.pt \
        --lm mpt-1b-redpajama-200b --task fewshot_caption --data coco:PATH/dataset_coco.json#test --shots 0 4 8 \
        --batch-size 8 --precision bf16 --device cuda

Extra `--data.KEY=VALUE` arguments override the data config (e.g. `--data.image_root=/data/coco`).
"""
import argparse
import contextlib
import importlib.util
import json
import os
import sys
import time
from collections import Counter
from typing import Callable

import torch
import torch.nn.functional as F

import checkpointing
import fewshot
import probe
from config import Config, ConfigError, config_from_dict, load_config, parse_overrides
from data import build_dataset, caption_loader, eval_loader, has_questions, question_loader, retrieval_loader
from data.templates import load_classnames, load_templates
from data.tokenizer import BertTokenizer, ClipTokenizer, GPTNeoXTokenizer, tokenizer_from_bytes
from data.vqa import VQA_PROMPT, VQADataset, text_ids
from metrics import caption_scores, normalize_answer, vqa_score
from models import BLIP_MODELS, BLIP_TEXT_LENGTH, FLAMINGO_MODELS, MODELS, create_model, generation, model_from_config
from models.blip import BLIP
from models.predictive import TextPredictor

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
    return ranking_recalls(similarity, similarity.T, text_to_image, ks)


def ranking_recalls(image_to_text: torch.Tensor, text_to_image_scores: torch.Tensor, text_to_image: torch.Tensor,
                    ks=(1, 5, 10)) -> dict:
    """Recall@K of two score matrices, (num_images, num_texts) and (num_texts, num_images); ties keep index order."""
    matches = text_to_image[None, :] == torch.arange(len(image_to_text))[:, None]  # (num_images, num_texts)
    results = {}
    for direction, scores, truth in (("image_to_text", image_to_text, matches),
                                     ("text_to_image", text_to_image_scores, matches.T)):
        ranked = scores.argsort(dim=-1, descending=True, stable=True)
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
    if isinstance(model, TextPredictor):  # no text embeddings: each class's prompts scored under each image
        scores, labels, bad = prompt_likelihoods(model, tokenizer, loader, names, load_templates(templates), device)
    else:
        classifier = zeroshot_classifier(model, tokenizer, names, load_templates(templates), device).float().cpu()
        image_features, labels, bad = encode_images(model, loader, device)
        scores = 100.0 * image_features @ classifier.T
    results = accuracy(scores, labels)
    results.update(num_classes=len(names), chance=100.0 / len(names), num_images=len(labels), bad_images=bad)
    return results


@torch.no_grad()
def prompt_likelihoods(model: TextPredictor, tokenizer, loader, classnames: list[str], templates: list[str],
                       device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Zero-shot scores of a predictive baseline, (N, num_classes): per image and class, the mean over templates of
    the prompt's log-likelihood per word (models/predictive.py); the labels (N,) and the unreadable image count."""
    prompts = tokenizer([template.format(name) for name in classnames for template in templates]).to(device)
    scores, labels, bad = [], [], 0
    for batch in loader:
        features = model.encode_image(batch["image"].to(device))
        likelihoods = model.log_likelihoods(features, prompts).float().cpu()  # (B, classes x templates)
        scores.append(likelihoods.view(len(features), len(classnames), len(templates)).mean(-1))
        labels.append(batch["label"])
        bad += int(batch["bad"].sum())
    return torch.cat(scores), torch.cat(labels), bad


def retrieval(model, tokenizer, spec, image_size, device, batch_size=256, workers=0, options=None) -> dict:
    image_loader, text_tokens, text_to_image = retrieval_loader(
        spec, image_size, tokenizer, batch_size, workers, options=options)
    image_features, _, bad = encode_images(model, image_loader, device)
    text_features = encode_texts(model, text_tokens, device, batch_size)
    results = retrieval_metrics(image_features, text_features, text_to_image)
    results.update(num_images=len(image_features), num_texts=len(text_features), bad_images=bad)
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


def rerank_scores(similarity: torch.Tensor, itm_positive: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  k_test: int = 256, batch_size: int = 256, log_every: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP's retrieval scores (salesforce/BLIP `train_retrieval.py::evaluation`): for each query (an image, then a
    text) its top `k_test` candidates by ITC similarity get ITM positive logit + ITC similarity, all others -100.

    similarity (num_images, num_texts); itm_positive(image_index, text_index) -> the ITM match logits (P,) of P
    pairs. Returns the image-to-text (num_images, num_texts) and text-to-image (num_texts, num_images) scores."""
    results = []
    for direction, sim in (("image-to-text", similarity), ("text-to-image", similarity.T)):
        k = min(k_test, sim.shape[1])
        top_sim, top_index = sim.topk(k, dim=1)  # (queries, k)
        queries = torch.arange(sim.shape[0]).repeat_interleave(k)  # (queries * k,)
        candidates = top_index.reshape(-1)
        pairs = (queries, candidates) if direction == "image-to-text" else (candidates, queries)  # (image, text)
        progress = Progress(f"ITM re-ranking {direction} pairs", len(queries), log_every)
        logits = []
        for start in range(0, len(queries), batch_size):
            logits.append(itm_positive(pairs[0][start : start + batch_size], pairs[1][start : start + batch_size]))
            progress.update(len(logits[-1]))
        scores = torch.full_like(sim, -100.0)
        scores.scatter_(1, top_index, torch.cat(logits).float().view(-1, k) + top_sim)
        results.append(scores)
    return results[0], results[1]


@torch.no_grad()
def blip_retrieval(model: BLIP, tokenizer, spec, image_size, device, batch_size=256, workers=0, options=None,
                   k_test: int = 256, log_every: int = 10) -> dict:
    """ITC recalls (`itc_*`) and ITM re-ranked ones (`itm_*`). The image tokens of the whole set stay on the CPU
    for ITM, as BLIP keeps them (5K COCO images at 384 px with ViT-B: ~9 GB in fp32)."""
    image_loader, text_tokens, text_to_image = retrieval_loader(
        spec, image_size, tokenizer, batch_size, workers, options=options)
    image_tokens, image_features, bad = [], [], 0
    for batch in image_loader:
        tokens = model.forward_image(batch["image"].to(device))  # (B, 1 + HW, vision_width)
        image_tokens.append(tokens.cpu())
        image_features.append(F.normalize(model.part("vision_proj")(tokens[:, 0]).float(), dim=-1).cpu())
        bad += int(batch["bad"].sum())
    image_tokens, image_features = torch.cat(image_tokens), torch.cat(image_features)
    text_features = encode_texts(model, text_tokens, device, batch_size)

    def itm_positive(image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
        tokens = text_tokens[text_index]
        tokens = tokens[:, : int((tokens != model.pad_id).sum(1).max())]  # padding only trails: cut what all share
        states = model.forward_multimodal(tokens.to(device), image_tokens[image_index].to(device))
        return model.part("itm_head")(states[:, 0])[:, 1].float().cpu()  # (P,) the "match" logit

    similarity = image_features @ text_features.T  # (num_images, num_texts), cosine: BLIP uses no temperature here
    results = {f"itc_{name}": value for name, value in retrieval_metrics(image_features, text_features,
                                                                         text_to_image).items()}
    image_to_text, text_to_image_scores = rerank_scores(similarity, itm_positive, k_test, batch_size, log_every)
    results.update({f"itm_{name}": value for name, value in ranking_recalls(image_to_text, text_to_image_scores,
                                                                            text_to_image).items()})
    results.update(k_test=min(k_test, len(text_features), len(image_features)), num_images=len(image_features),
                   num_texts=len(text_features), bad_images=bad)
    return results


@torch.no_grad()
def caption(model: BLIP, spec, image_size, device, batch_size=256, workers=0, options=None, num_beams=3,
            max_length=20, min_length=5, prompt="a picture of ", log_every=10) -> dict:
    """A caption for every unique image, scored against all its captions (BLEU-1..4, CIDEr, x100)."""
    loader, references = caption_loader(spec, image_size, batch_size, workers, options=options)
    captions, bad = [], 0
    progress = Progress("captioned images", len(references), log_every)
    for batch in loader:
        texts = model.generate(batch["image"].to(device), prompt=prompt, num_beams=num_beams, max_length=max_length,
                               min_length=min_length)
        for key, index, text in zip(batch["key"], batch["index"].tolist(), texts):
            captions.append({"image": key, "caption": text, "references": references[index]})
        bad += int(batch["bad"].sum())
        progress.update(len(texts))
    scores = caption_scores({i: c["caption"] for i, c in enumerate(captions)},
                            {i: c["references"] for i, c in enumerate(captions)})
    return {**scores, "num_images": len(captions), "bad_images": bad, "captions": captions}


def vqa_prompts(model: BLIP, tokenizer, questions: list[str]) -> list[list[int]]:
    """Decoder prompts `[DEC] question: q answer:` (ids, no eos), one per question."""
    return [[model.dec_id, *ids] for ids in text_ids(tokenizer, [VQA_PROMPT.format(q) for q in questions], model.eos_id)]


def answer_log_likelihoods(model: BLIP, image_tokens: torch.Tensor, prompts: list[list[int]],
                           pairs: list[tuple[int, list[int]]], batch_size: int = 256) -> torch.Tensor:
    """Sum of the log-probabilities of each pair's answer ids (its eos included) after its question's prompt.

    image_tokens (B, S, vision_width) and prompts (B lists of ids, [DEC] first) per question; pairs: (question
    index, answer ids). Returns (len(pairs),)."""
    max_positions = model.part("text_decoder").embed.pos_embed.shape[0]
    scores = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        rows = [prompts[q] + answer for q, answer in chunk]
        length = max(map(len, rows))
        if length > max_positions:
            raise ValueError(f"a question and answer of {length} tokens exceed the decoder's {max_positions} positions")
        tokens = torch.tensor([row + [model.pad_id] * (length - len(row)) for row in rows], device=image_tokens.device)
        index = torch.tensor([q for q, _ in chunk], device=image_tokens.device)
        logits = model.decoder_logits(tokens, image_tokens[index]).float()  # (P, T, vocab)
        log_probs = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]  # (P, T - 1): next tokens
        position = torch.arange(1, length, device=tokens.device)  # the position each log-prob predicts
        first = torch.tensor([len(prompts[q]) for q, _ in chunk], device=tokens.device)[:, None]
        last = first + torch.tensor([len(answer) for _, answer in chunk], device=tokens.device)[:, None]
        scores.append((log_probs * ((position >= first) & (position < last))).sum(-1).cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


@torch.no_grad()
def rank_answers(model: BLIP, image_tokens: torch.Tensor, prompts: list[list[int]], candidates: list[list[int]],
                 answer_k: int = 128, batch_size: int = 256) -> list[int]:
    """The index of each question's best candidate answer by log-likelihood; with more than `answer_k` candidates
    only the `answer_k` most likely first tokens are scored in full (BLIP's `rank_answer`, k_test=128)."""
    if len(candidates) > answer_k:
        length = max(map(len, prompts))
        tokens = torch.tensor([p + [model.pad_id] * (length - len(p)) for p in prompts], device=image_tokens.device)
        logits = model.decoder_logits(tokens, image_tokens).float()  # (B, T, vocab)
        last = torch.tensor([len(p) - 1 for p in prompts], device=tokens.device)
        first_token = logits[torch.arange(len(prompts)), last].log_softmax(-1)  # (B, vocab)
        first_ids = torch.tensor([answer[0] for answer in candidates], device=tokens.device)
        shortlist = first_token[:, first_ids].topk(answer_k, dim=1).indices.tolist()  # (B, answer_k)
    else:
        shortlist = [list(range(len(candidates)))] * len(prompts)
    pairs = [(q, candidates[c]) for q, row in enumerate(shortlist) for c in row]
    scores = answer_log_likelihoods(model, image_tokens, prompts, pairs, batch_size)
    best, offset = [], 0
    for row in shortlist:
        best.append(row[int(scores[offset : offset + len(row)].argmax())])
        offset += len(row)
    return best


@torch.no_grad()
def generate_answers(model: BLIP, image_tokens: torch.Tensor, prompts: list[list[int]], tokenizer, num_beams=3,
                     max_answer_length=10, min_answer_length=1) -> list[str]:
    """Beam-searched answers after each question's prompt (questions of one prompt length share a search)."""
    answers = [""] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    for length, members in by_length.items():
        index = torch.tensor(members, device=image_tokens.device)
        with model.packed_linears():
            ids = generation.generate(
                model.decode, torch.tensor([prompts[i] for i in members], device=image_tokens.device),
                image_tokens[index], num_layers=model.part("text_decoder").transformer.depth, eos_id=model.eos_id,
                pad_id=model.pad_id,
                max_length=length + max_answer_length, min_length=length + min_answer_length, num_beams=num_beams,
            )  # fmt: skip
        for i, row in zip(members, ids[:, length:].tolist()):
            row = row[: row.index(model.eos_id)] if model.eos_id in row else row
            answers[i] = tokenizer.decode([token for token in row if token != model.pad_id])
    return answers


def load_answer_list(path: str) -> list[str]:
    """--answers: a JSON list of answers (BLIP's answer_list.json) or a text file with one answer a line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--answers: no answer list at '{path}'")
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            answers = json.load(f)
            if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
                raise ValueError(f"--answers: '{path}' is not a JSON list of strings")
        else:
            answers = [line.strip() for line in f if line.strip()]
    if not answers:
        raise ValueError(f"--answers: '{path}' holds no answers")
    return answers


def dataset_answers(dataset) -> list[str]:
    """The distinct answers of a dataset, most frequent first: shapes' answers, vqa's multiple_choice_answer."""
    if isinstance(dataset, VQADataset):
        if dataset.best_answers is None:
            raise ValueError(f"{dataset.source}: no annotations to take candidate answers from; pass --answers FILE")
        counts = Counter(dataset.best_answers)
    else:
        counts = Counter(dataset[i]["answer"] for i in range(len(dataset)))
    return [answer for answer, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]


def reference_answers(answers: list[str]) -> list[str]:
    """A single answer (shapes) stands for ten identical human answers, normalised as a prediction is."""
    return [normalize_answer(answers[0])] * 10 if len(answers) == 1 else answers


@torch.no_grad()
def vqa(model: BLIP, tokenizer, spec, image_size, device, batch_size=256, workers=0, options=None, mode="rank",
        answers: list[str] | None = None, answer_k: int = 128, num_beams: int = 3, log_every: int = 10) -> dict:
    """VQA accuracy (x100) of answers generated or ranked after "question: {q} answer:" (see the module docstring)."""
    if mode not in ("generate", "rank"):
        raise ValueError(f"--vqa-mode must be generate or rank; got '{mode}'")
    dataset, loader = question_loader(spec, image_size, batch_size, workers, options=options)
    candidates = candidate_ids = None
    if mode == "rank":
        candidates = answers or dataset_answers(dataset)
        candidate_ids = [ids + [model.eos_id] for ids in text_ids(tokenizer, candidates, model.eos_id)]
    predictions, references, rows, bad = {}, {}, [], 0
    progress = Progress("answered questions", len(dataset), log_every)
    for batch in loader:
        image_tokens = model.forward_image(batch["image"].to(device))  # (B, 1 + HW, vision_width)
        prompts = vqa_prompts(model, tokenizer, batch["question"])
        if mode == "rank":
            predicted = [candidates[i] for i in rank_answers(model, image_tokens, prompts, candidate_ids, answer_k,
                                                              batch_size)]
        else:
            predicted = generate_answers(model, image_tokens, prompts, tokenizer, num_beams)
        for question_id, question, answer, truth in zip(batch["question_id"], batch["question"], predicted,
                                                        batch["answers"]):
            predictions[question_id] = answer
            rows.append({"question_id": question_id, "question": question, "answer": answer, "answers": truth})
            if truth is not None:
                references[question_id] = reference_answers(truth)
        bad += int(batch["bad"].sum())
        progress.update(len(predicted))
    results = {"accuracy": vqa_score(predictions, references)} if references else {}
    results.update(mode=mode, num_questions=len(rows), bad_images=bad, prompt=VQA_PROMPT)
    if mode == "rank":
        results["num_candidates"] = len(candidates)
    return {**results, "predictions": rows}


TASKS = {"CLIP": ("zeroshot", "retrieval", "linear_probe"), "TextPredictor": ("zeroshot", "linear_probe"),
         "BLIP": ("retrieval", "caption", "vqa", "zeroshot", "linear_probe"), "Flamingo": fewshot.TASKS}
TASK_PARTS = {"retrieval": ("text_encoder", "text_proj", "vision_proj", "itm_head"), "caption": ("text_decoder",),
              "vqa": ("text_decoder",), "zeroshot": ("text_encoder", "text_proj", "vision_proj"),
              "linear_probe": ("vision_proj",)}


def check_task(model, task: str) -> None:
    """Fail, saying why, for a task the model's family or the checkpoint's parts cannot do."""
    family = ("BLIP" if isinstance(model, BLIP) else "Flamingo" if hasattr(model, "perceiver") else
              "TextPredictor" if isinstance(model, TextPredictor) else "CLIP")
    if task not in TASKS[family]:
        other = [name for name, tasks in TASKS.items() if task in tasks]
        why = "it has no text decoder" if task in ("caption", "vqa") else f"it does {', '.join(TASKS[family])}"
        raise ValueError(f"a {family} checkpoint cannot do --task {task}: {why}; "
                         f"{' and '.join(other) or 'no'} checkpoints can")
    if family == "BLIP":
        missing = [part for part in TASK_PARTS[task] if getattr(model, part) is None]
        if missing:
            raise ValueError(f"this BLIP checkpoint cannot do --task {task}: it has no {', '.join(missing)} "
                             f"(released task checkpoints hold only their task's parts)")


def evaluate_all(cfg, model, tokenizer, device) -> dict:
    """What train.py reports: retrieval on data.val, zero-shot on data.val when it has classes (shapes,
    imagefolder), zero-shot on data.heldout. A BLIP run: see evaluate_blip."""
    if isinstance(model, BLIP):
        return evaluate_blip(cfg, model, tokenizer, device)
    if not hasattr(model, "visual"):  # a language model or a Flamingo
        return fewshot.evaluate_run(cfg, model, tokenizer, device)
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


TRAINING_K_TEST = 16  # ITM re-ranks this many candidates per query in train.py's evaluations (see evaluate_blip)


def evaluate_blip(cfg, model: BLIP, tokenizer, device) -> dict:
    """What train.py reports for a BLIP run, on data.val: zero-shot through the ITC features when it has classes,
    ITC and ITM-re-ranked retrieval and caption scores when it has captions, VQA accuracy (rank mode, the data's
    own answers as candidates) when it has questions (shapes, vqa); zero-shot on data.heldout. ITM re-ranks the
    top TRAINING_K_TEST candidates, not BLIP's 256: each costs two image-grounded text passes per image (2,000
    shapes images at 256: ~1M passes, an hour on a CPU); R@1/5/10 only look at the top 10. eval.py --k-test gives
    the paper's setting."""
    size, batch, options, val = cfg.data.image_size, cfg.eval.batch_size, cfg.data, cfg.data.val
    dataset = build_dataset(val, size, cfg.seed, options)
    results = {}
    if hasattr(dataset, "classnames"):
        for name, value in zeroshot(model, tokenizer, val, size, device, cfg.eval.templates, batch,
                                    options=options).items():
            results[f"val/{name}"] = value
    if not isinstance(dataset, VQADataset):  # everything else has captions
        for name, value in blip_retrieval(model, tokenizer, val, size, device, batch, options=options,
                                          k_test=TRAINING_K_TEST, log_every=0).items():
            results[f"val/{name}"] = value
        scores = caption(model, val, size, device, batch, options=options, log_every=0)
        results.update({f"val/{name}": scores[name] for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr")})
    if has_questions(dataset) and (not isinstance(dataset, VQADataset) or dataset.answers is not None):
        answered = vqa(model, tokenizer, val, size, device, batch, options=options, mode="rank", log_every=0)
        results["val/vqa_accuracy"], results["val/vqa_num_questions"] = answered["accuracy"], answered["num_questions"]
    if cfg.data.heldout:
        for name, value in zeroshot(model, tokenizer, cfg.data.heldout, size, device, cfg.eval.templates, batch,
                                    options=options).items():
            results[f"heldout/{name}"] = value
    return results


@torch.no_grad()
def blip_examples(cfg, model: BLIP, tokenizer, device, count: int = 8, columns: int = 4, tile: int = 192):
    """What TensorBoard shows of a BLIP run beside its scalars: the first `count` data.val images, each with its
    beam-searched caption and, when the data has questions, its question with the generated and the true answer.
    Returns (picture (H, W, 3) uint8, the same as a markdown table)."""
    import numpy as np
    from PIL import Image, ImageDraw

    from data.bad_samples import BadSample
    from data.transforms import image_transform

    dataset = build_dataset(cfg.data.val, cfg.data.image_size, cfg.seed, cfg.data)
    items = []
    for index in range(min(len(dataset), 4 * count)):  # unreadable images are left out
        with contextlib.suppress(BadSample):
            items.append(dataset[index])
        if len(items) == count:
            break
    transform = image_transform(cfg.data.image_size, train=False)
    images = torch.stack([transform(item["image"]) for item in items]).to(device)
    lines = [[f"caption: {text}"] for text in model.generate(images)]
    if items and "question" in items[0]:
        prompts = vqa_prompts(model, tokenizer, [item["question"] for item in items])
        answers = generate_answers(model, model.forward_image(images), prompts, tokenizer)
        for row, item, answer in zip(lines, items, answers):
            row += [f"Q: {item['question']}", f"A: {answer} (true: {item['answer']})"]
    wrapped = ["\n".join(part for line in row for part in _wrap(line, (tile - 8) // 6)) for row in lines]
    text_height = 14 * max(text.count("\n") + 1 for text in wrapped) + 8  # PIL's default font: 11 px + spacing
    rows = -(-len(items) // columns)
    picture = Image.new("RGB", (columns * tile, rows * (tile + text_height)), "white")
    draw = ImageDraw.Draw(picture)
    for i, (item, text) in enumerate(zip(items, wrapped)):
        left, top = (i % columns) * tile, (i // columns) * (tile + text_height)
        picture.paste(item["image"].convert("RGB").resize((tile - 8, tile - 8)), (left + 4, top + 4))
        draw.multiline_text((left + 4, top + tile), text, fill="black", spacing=3)
    table = "| image | " + " | ".join(["caption", "question", "answer (true)"][: 1 + 2 * (len(lines[0]) > 1)]) + " |\n"
    table += "|---" * (1 + len(lines[0])) + "|\n"
    for i, row in enumerate(lines):
        table += f"| {i} | " + " | ".join(line.split(": ", 1)[1] for line in row) + " |\n"
    return np.asarray(picture), table


def _wrap(text: str, width: int) -> list[str]:
    """Greedy word wrap at `width` characters."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line] if line else lines


def load_checkpoint(path: str, device="cpu"):
    """(config, model, tokenizer) from a train.py checkpoint, a file or an FSDP run's folder (whatever number of
    processes wrote it); needs no other file."""
    if not checkpointing.exists(path):
        raise FileNotFoundError(f"--checkpoint: no file at '{path}', nor a checkpoint folder")
    checkpoint = checkpointing.read(path)
    cfg = config_from_dict(checkpoint["config"])
    tokenizer = tokenizer_from_bytes(cfg.data.tokenizer, checkpoint["tokenizer"], cfg.data.context_length)
    model = model_from_config(cfg, tokenizer, pretrained=False)  # the checkpoint's weights replace them
    if "head.weight" in checkpoint.get("model", {}):  # a fine-tuned classifier (finetune.py): its CLIP, without the head
        checkpoint = {**checkpoint, "model": {name[len("clip."):]: value for name, value in checkpoint["model"].items()
                                              if name.startswith("clip.")}}
    checkpointing.load(checkpoint, model)
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


def find_vocab(vocab: str | None, pretrained: str) -> str:
    """--vocab, else the vocab.txt of a HuggingFace folder or next to a weights file."""
    if vocab:
        if not os.path.isfile(vocab):
            raise FileNotFoundError(f"--vocab: no BERT vocabulary at '{vocab}'")
        return vocab
    folder = pretrained if os.path.isdir(pretrained) else os.path.dirname(os.path.abspath(pretrained))
    candidate = os.path.join(folder, "vocab.txt")
    if os.path.isfile(candidate):
        return candidate
    raise FileNotFoundError(f"no BERT vocabulary found (looked for {candidate}); pass --vocab PATH/vocab.txt "
                            f"(bert-base-uncased's, which BLIP uses)")


def load_pretrained_blip(name: str, pretrained: str, vocab: str | None, device="cpu"):
    """(config, model, tokenizer) for a BLIP preset with released weights and BERT's WordPiece (+ [DEC], [ENC])."""
    tokenizer = BertTokenizer(find_vocab(vocab, pretrained), context_length=BLIP_TEXT_LENGTH)
    model = create_model(name, pretrained=pretrained, tokenizer=tokenizer)
    cfg = Config()
    cfg.model.name = name
    cfg.data.image_size, cfg.data.context_length = model.visual_encoder.image_size, BLIP_TEXT_LENGTH
    cfg.data.tokenizer, cfg.eval.templates = "bert", "imagenet"
    return cfg, model.to(device).eval(), tokenizer


def load_pretrained_flamingo(name: str, pretrained: str, vision: str | None, lm: str | None, device="cpu"):
    """(config, model, tokenizer) for a Flamingo preset with released OpenFlamingo weights: checkpoint.pt, the CLIP
    file and the LM folder, whose tokenizer.json gives GPT-NeoX's tokenizer with OpenFlamingo's tokens."""
    if not lm or not vision:
        raise ValueError(f"--model {name} needs --lm (the language model's folder, with tokenizer.json) and --vision "
                         f"(the CLIP checkpoint) besides --pretrained (OpenFlamingo's checkpoint.pt)")
    tokenizer_path = os.path.join(lm, "tokenizer.json")
    if not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(f"--lm: no tokenizer.json in '{lm}' (GPT-NeoX-20B's, which "
                                f"anas-awadalla/mpt-1b-redpajama-200b holds)")
    tokenizer = GPTNeoXTokenizer(tokenizer_path)
    model = create_model(name, pretrained=pretrained, vision=vision, lm=lm, tokenizer=tokenizer)
    cfg = Config()
    cfg.model.name = name
    cfg.data.image_size, cfg.data.context_length = model.vision_encoder.image_size, tokenizer.context_length
    return cfg, model.to(device).eval(), tokenizer


def load_pretrained(name: str, pretrained: str, bpe: str | None, device="cpu", vocab: str | None = None,
                    vision: str | None = None, lm: str | None = None):
    """(config, model, tokenizer) for a preset with released weights and the CLIP BPE tokenizer (BLIP: BERT's;
    Flamingo: GPT-NeoX's)."""
    if name in BLIP_MODELS:
        return load_pretrained_blip(name, pretrained, vocab, device)
    if name in FLAMINGO_MODELS:
        return load_pretrained_flamingo(name, pretrained, vision, lm, device)
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
    parser.add_argument("--checkpoint", help="a train.py checkpoint: RUN/checkpoint.pt, or an FSDP run's folder "
                                             "RUN/checkpoint")
    parser.add_argument("--model", help="a preset for released weights, e.g. ViT-B-32-quickgelu, BLIP-base, "
                                        "OpenFlamingo-3B-vitl-mpt1b")
    parser.add_argument("--pretrained", help="with --model: an OpenAI .pt file or an open_clip checkpoint (BLIP: "
                                             "salesforce's .pth or a HF folder; Flamingo: OpenFlamingo's "
                                             "checkpoint.pt)")
    parser.add_argument("--bpe", help=f"with --model: the CLIP vocabulary {BPE_FILE} "
                                      "(default: next to --pretrained, else open_clip's copy when installed)")
    parser.add_argument("--vocab", help="with a BLIP --model: BERT's vocab.txt (default: the one in or next to "
                                        "--pretrained)")
    parser.add_argument("--vision", help="with a Flamingo --model: the CLIP checkpoint of its vision tower "
                                         "(OpenAI's ViT-L-14.pt or open_clip's)")
    parser.add_argument("--lm", help="with a Flamingo --model: the language model's HuggingFace folder (config.json, "
                                     "weights, tokenizer.json), e.g. mpt-1b-redpajama-200b")
    parser.add_argument("--task", required=True,
                        choices=("zeroshot", "retrieval", "linear_probe", "caption", "vqa", *fewshot.TASKS),
                        help="CLIP: zeroshot, retrieval, linear_probe; BLIP: also caption and vqa; Flamingo: "
                             "fewshot_vqa, fewshot_caption (fewshot.py)")
    parser.add_argument("--data", help="dataset spec (default: the run's data.val); linear_probe: the training split")
    parser.add_argument("--val", help="linear_probe: the split that chooses the L2 strength (default: 20%% of --data)")
    parser.add_argument("--test", help="linear_probe: the split reported on (default: --val)")
    parser.add_argument("--shots", type=int, nargs="*", default=None,
                        help="linear_probe: also k-shot probes with k images per class, e.g. --shots 1 2 4 8 16")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="linear_probe and fewshot_*: k-shot draws (a number N for fewshot_*: seeds 0..N-1)")
    parser.add_argument("--rices", action="store_true", help="fewshot_*: similar demonstrations, not random ones")
    parser.add_argument("--num-queries", type=int, help="fewshot_*: evaluate this many queries (default: all)")
    parser.add_argument("--templates", help="zero-shot prompts: imagenet, shapes, or a file with one per line")
    parser.add_argument("--classnames", help="zero-shot class names: imagenet, or a file with one per line "
                                             "in class-index order (default: the dataset's own)")
    parser.add_argument("--k-test", type=int, default=256,
                        help="BLIP retrieval: candidates per query re-ranked by ITM (BLIP: 256 COCO, 128 Flickr)")
    parser.add_argument("--num-beams", type=int, default=3, help="caption and vqa generate: beam width")
    parser.add_argument("--max-length", type=int, default=20, help="caption: tokens, prompt included")
    parser.add_argument("--min-length", type=int, default=5, help="caption: tokens, prompt included")
    parser.add_argument("--prompt", default="a picture of ", help="caption: the decoder's prompt, stripped from output")
    parser.add_argument("--vqa-mode", default="rank", choices=("rank", "generate"),
                        help="vqa: rank candidate answers by likelihood (BLIP's default) or generate them")
    parser.add_argument("--answers", help="vqa rank: candidate answers, a JSON list or one a line "
                                          "(default: the distinct answers of --data)")
    parser.add_argument("--answer-k", type=int, default=128,
                        help="vqa rank: candidates kept by first-token probability before full scoring (BLIP: 128)")
    parser.add_argument("--log-every", type=int, default=10, help="progress line every N batches (0: none)")
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
            cfg, model, tokenizer = load_pretrained(args.model, args.pretrained, args.bpe, args.device, args.vocab,
                                                    args.vision, args.lm)
        check_task(model, args.task)
        answers = load_answer_list(args.answers) if args.answers else None
        data_cfg = load_config(None, overrides).data
        for key, _ in parse_overrides(overrides):  # only the keys the user named; the rest keep the run's
            setattr(cfg.data, key[len("data."):], getattr(data_cfg, key[len("data."):]))
        spec = args.data or cfg.data.val
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
        autocast = torch.autocast(torch.device(args.device).type, dtype) if dtype else contextlib.nullcontext()
        size, blip = cfg.data.image_size, isinstance(model, BLIP)
        loading = dict(batch_size=args.batch_size, workers=args.workers, options=cfg.data)
        with autocast:
            if args.task in fewshot.TASKS:
                seeds = list(range(args.seeds[0])) if len(args.seeds) == 1 else args.seeds  # --seeds 3: 0, 1, 2
                results = fewshot.evaluate(model, tokenizer, spec, args.task, size, args.device, args.shots or [0, 4, 8],
                                           seeds, args.rices, cfg.data, args.batch_size, args.num_beams,
                                           num_queries=args.num_queries,
                                           prompts="open_flamingo" if args.model in FLAMINGO_MODELS else "ours")
            elif args.task == "caption":
                results = caption(model, spec, size, args.device, **loading, num_beams=args.num_beams,
                                  max_length=args.max_length, min_length=args.min_length, prompt=args.prompt,
                                  log_every=args.log_every)
            elif args.task == "vqa":
                results = vqa(model, tokenizer, spec, size, args.device, **loading, mode=args.vqa_mode,
                              answers=answers, answer_k=args.answer_k, num_beams=args.num_beams,
                              log_every=args.log_every)
            elif args.task == "retrieval" and blip:
                results = blip_retrieval(model, tokenizer, spec, size, args.device, **loading, k_test=args.k_test,
                                         log_every=args.log_every)
            elif args.task == "linear_probe":
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
    table = probe.scalar_metrics(results) if args.task == "linear_probe" else {
        name: value for name, value in results.items() if not isinstance(value, (list, dict))}
    print_table(f"{args.task} on {spec} ({', '.join(f'{k} {v}' for k, v in source.items())})", table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"task": args.task, "data": spec, **source, **results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
