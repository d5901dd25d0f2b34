"""BLIP's evaluation (Li et al., ICML 2022, section 5; salesforce/BLIP's evaluation code).

retrieval: ITC similarities for all pairs, then each query's top `k_test` candidates re-ranked by ITM with
score = ITM positive logit + ITC similarity, the others at -100 (BLIP's `evaluation`); recalls of both, keys
`itc_*` and `itm_*`. caption: beam search from the prompt for every unique image, scored against all its captions
with BLEU-1..4 and CIDEr (metrics/caption.py). vqa: this codebase's choice, not BLIP's VQA model (a separate
answer decoder over the question states, fine-tuned on VQA): the captioning decoder, conditioned on the image,
continues the prompt "question: {q} answer:"; mode `generate` beam-searches the answer, `rank` (BLIP's default
mode) scores each candidate answer by the sum of its tokens' log-probabilities (and [SEP]) after the prompt and
takes the best, after keeping the `answer_k` best by first-token probability as BLIP does. Candidates: a list
given (a JSON list like BLIP's answer_list.json, or one per line), else the distinct answers of the data.
Accuracy is the official VQA soft accuracy (metrics/vqa.py); a question with one answer (shapes) counts it as ten
identical human answers, normalised as predictions are: exact match after normalisation.

Unreadable images count as misses, as in evaluation/contrastive.py: in retrieval they are no candidate and their
queries fail; an unreadable image's caption is empty (scored, not skipped) and its questions' answers are empty
(wrong). Results report `bad_images` and what they affect (`affected_captions`, `affected_questions`), and the
evaluation stops with one line once those pass data.max_bad_fraction.
"""
import contextlib
from typing import Callable

import torch
import torch.nn.functional as F

from crossmodal.data import build_dataset, has_questions, question_loader, retrieval_loader
from crossmodal.data.vqa import VQA_PROMPT, VQADataset, text_ids
from crossmodal.data.bad_samples import BadSampleCount
from crossmodal.evaluation.contrastive import (Progress, check_unreadable, encode_texts, ranking_recalls,
                                               retrieval_metrics, zeroshot)
from crossmodal.evaluation.generation import (answer_questions, caption_images, check_vqa_mode,  # noqa: F401
                                              dataset_answers, load_answer_list, reference_answers)
from crossmodal.models import generation
from crossmodal.models.blip import BLIP


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
    image_tokens, image_features, unreadable, count = [], [], [], BadSampleCount()
    for batch in image_loader:
        tokens = model.forward_image(batch["image"].to(device))  # (B, 1 + HW, vision_width)
        image_tokens.append(tokens.cpu())
        image_features.append(F.normalize(model.part("vision_proj")(tokens[:, 0]).float(), dim=-1).cpu())
        unreadable.append(batch["bad"] > 0)
        count.add_batch(batch)
    image_tokens, image_features, unreadable = torch.cat(image_tokens), torch.cat(image_features), torch.cat(unreadable)
    affected = int(unreadable[text_to_image].sum())
    check_unreadable(count, affected, len(text_to_image), "captions", spec, options)
    text_features = encode_texts(model, text_tokens, device, batch_size)

    def itm_positive(image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
        tokens = text_tokens[text_index]
        tokens = tokens[:, : int((tokens != model.pad_id).sum(1).max())]  # padding only trails: cut what all share
        states = model.forward_multimodal(tokens.to(device), image_tokens[image_index].to(device))
        return model.part("itm_head")(states[:, 0])[:, 1].float().cpu()  # (P,) the "match" logit

    similarity = image_features @ text_features.T  # (num_images, num_texts), cosine: BLIP uses no temperature here
    results = {f"itc_{name}": value for name, value in retrieval_metrics(image_features, text_features,
                                                                         text_to_image, unreadable=unreadable).items()}
    image_to_text, text_to_image_scores = rerank_scores(similarity, itm_positive, k_test, batch_size, log_every)
    itm = ranking_recalls(image_to_text, text_to_image_scores, text_to_image, unreadable=unreadable)
    results.update({f"itm_{name}": value for name, value in itm.items()})
    results.update(k_test=min(k_test, len(text_features), len(image_features)), num_images=len(image_features),
                   num_texts=len(text_features), bad_images=int(unreadable.sum()), affected_captions=affected)
    return results


@torch.no_grad()
def caption(model: BLIP, spec, image_size, device, batch_size=256, workers=0, options=None, num_beams=3,
            max_length=20, min_length=5, prompt="a picture of ", log_every=10) -> dict:
    """A caption for every unique image, scored against all its captions (BLEU-1..4, CIDEr, x100); an unreadable
    image's caption is empty."""
    def describe(images: torch.Tensor) -> list[str]:
        return model.generate(images.to(device), prompt=prompt, num_beams=num_beams, max_length=max_length,
                              min_length=min_length)

    return caption_images(describe, spec, image_size, batch_size, workers, options, log_every)


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


@torch.no_grad()
def vqa(model: BLIP, tokenizer, spec, image_size, device, batch_size=256, workers=0, options=None, mode="rank",
        answers: list[str] | None = None, answer_k: int = 128, num_beams: int = 3, log_every: int = 10) -> dict:
    """VQA accuracy (x100) of answers generated or ranked after "question: {q} answer:" (see the module docstring)."""
    check_vqa_mode(mode)
    dataset, loader = question_loader(spec, image_size, batch_size, workers, options=options)
    candidates = candidate_ids = None
    if mode == "rank":
        candidates = answers or dataset_answers(dataset)
        candidate_ids = [ids + [model.eos_id] for ids in text_ids(tokenizer, candidates, model.eos_id)]

    def answer(images: torch.Tensor, questions: list[str]) -> list[str]:
        image_tokens = model.forward_image(images.to(device))  # (B, 1 + HW, vision_width)
        prompts = vqa_prompts(model, tokenizer, questions)
        if mode == "rank":
            return [candidates[i] for i in rank_answers(model, image_tokens, prompts, candidate_ids, answer_k,
                                                        batch_size)]
        return generate_answers(model, image_tokens, prompts, tokenizer, num_beams)

    return answer_questions(answer, dataset, loader, spec, options, mode, candidates, VQA_PROMPT, log_every)



TRAINING_K_TEST = 16  # ITM re-ranks this many candidates per query in train.py's evaluations (see evaluate_run)


def evaluate_run(cfg, model: BLIP, tokenizer, device) -> dict:
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

    from crossmodal.data.bad_samples import BadSample
    from crossmodal.data.transforms import image_transform

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
