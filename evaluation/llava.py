"""LLaVA's evaluation: caption and vqa through the loops BLIP's use (evaluation/generation.py), in the
conversation template LLaVA trains on (data/conversation.py), so the JSON keys are BLIP's.

vqa: the question is the user's turn. Mode `rank` (the mode of the BLIP demo's figure) scores each candidate
answer by the sum of its tokens' log-probabilities and the end token's after "ASSISTANT:" and takes the best;
with more than `answer_k` candidates only the `answer_k` most likely first tokens are scored in full, as BLIP's
rank mode does. Mode `generate` decodes the reply (greedy, or beam search with num_beams > 1).
caption: the reply to the run's description instruction (llava.prompt), decoded the same way.
"""
import torch

from crossmodal.data import question_loader
from crossmodal.data.conversation import TEMPLATE, prompt_ids, reply_ids
from crossmodal.evaluation.generation import answer_questions, caption_images, check_vqa_mode, dataset_answers
from crossmodal.models.llava import LLaVA


def left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of several lengths as one batch for generation: (B, P) ids left-padded, and the (B, P) mask of real
    tokens."""
    width = max(map(len, rows))
    tokens = torch.tensor([[pad_id] * (width - len(row)) + row for row in rows], dtype=torch.long)
    mask = torch.tensor([[False] * (width - len(row)) + [True] * len(row) for row in rows])
    return tokens, mask


@torch.no_grad()
def reply(model: LLaVA, tokenizer, images: torch.Tensor, instructions: list[str], max_new_tokens: int = 20,
          num_beams: int = 1) -> list[str]:
    """The model's reply to each image (B, 3, H, W) with its instruction, decoded."""
    rows = [prompt_ids(tokenizer, text, model.features_per_image, model.image_token_id) for text in instructions]
    device = images.device
    tokens, mask = left_padded(rows, tokenizer.pad_id)
    new = model.generate(images, tokens.to(device), max_new_tokens=max_new_tokens, num_beams=num_beams,
                         padding_mask=mask.to(device), eos_id=tokenizer.eos_id)
    return [tokenizer.decode(row).strip() for row in new.tolist()]


@torch.no_grad()
def answer_log_likelihoods(model: LLaVA, features: torch.Tensor, prompts: list[list[int]],
                           pairs: list[tuple[int, list[int]]], batch_size: int = 1024) -> torch.Tensor:
    """Sum of the log-probabilities of each pair's reply ids (the end token included) after its question's prompt.

    features (B, F, width): each question's projected image features; prompts: B lists of ids ending in
    "ASSISTANT:"; pairs: (question index, reply ids). Returns (len(pairs),)."""
    scores, pad = [], model.pad_id if model.pad_id is not None else 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        rows = [prompts[q] + ids for q, ids in chunk]
        length = max(map(len, rows))
        tokens = torch.tensor([row + [pad] * (length - len(row)) for row in rows], device=features.device)
        index = torch.tensor([q for q, _ in chunk], device=features.device)
        logits = model(None, tokens, features=features[index]).float()  # (P, T, vocab)
        log_probs = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]  # (P, T - 1)
        position = torch.arange(1, length, device=tokens.device)  # the position each log-prob predicts
        first = torch.tensor([len(prompts[q]) for q, _ in chunk], device=tokens.device)[:, None]
        last = first + torch.tensor([len(ids) for _, ids in chunk], device=tokens.device)[:, None]
        scores.append((log_probs * ((position >= first) & (position < last))).sum(-1).cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


@torch.no_grad()
def rank_answers(model: LLaVA, features: torch.Tensor, prompts: list[list[int]], candidates: list[list[int]],
                 answer_k: int = 128, batch_size: int = 1024) -> list[int]:
    """The index of each question's most likely candidate reply (see the module docstring)."""
    if len(candidates) > answer_k:
        tokens, mask = left_padded(prompts, model.pad_id if model.pad_id is not None else 0)
        tokens, mask = tokens.to(features.device), mask.to(features.device)
        logits = model(None, tokens, padding_mask=mask, features=features)[:, -1].float()  # (B, vocab)
        first_ids = torch.tensor([ids[0] for ids in candidates], device=features.device)
        shortlist = logits.log_softmax(-1)[:, first_ids].topk(answer_k, dim=1).indices.tolist()  # (B, answer_k)
    else:
        shortlist = [list(range(len(candidates)))] * len(prompts)
    pairs = [(q, candidates[c]) for q, row in enumerate(shortlist) for c in row]
    scores = answer_log_likelihoods(model, features, prompts, pairs, batch_size)
    best, offset = [], 0
    for row in shortlist:
        best.append(row[int(scores[offset : offset + len(row)].argmax())])
        offset += len(row)
    return best


@torch.no_grad()
def vqa(model: LLaVA, tokenizer, spec, image_size, device, batch_size=256, workers=0, options=None, mode="rank",
        answers: list[str] | None = None, answer_k: int = 128, num_beams: int = 1, max_new_tokens: int = 10,
        log_every: int = 10) -> dict:
    """VQA accuracy (x100) of LLaVA's replies to the questions of `spec` (see the module docstring)."""
    check_vqa_mode(mode)
    dataset, loader = question_loader(spec, image_size, batch_size, workers, options=options)
    candidates = (answers or dataset_answers(dataset)) if mode == "rank" else None
    candidate_ids = [reply_ids(tokenizer, text) for text in candidates] if mode == "rank" else None

    def answer(images: torch.Tensor, questions: list[str]) -> list[str]:
        images = images.to(device)
        if mode == "generate":
            return reply(model, tokenizer, images, questions, max_new_tokens, num_beams)
        features = model.image_features(images)  # (B, F, width)
        prompts = [prompt_ids(tokenizer, q, model.features_per_image, model.image_token_id) for q in questions]
        return [candidates[i] for i in rank_answers(model, features, prompts, candidate_ids, answer_k)]

    return answer_questions(answer, dataset, loader, spec, options, mode, candidates, TEMPLATE, log_every)


@torch.no_grad()
def caption(model: LLaVA, tokenizer, spec, image_size, device, instruction: str, batch_size=256, workers=0,
            options=None, num_beams=1, max_new_tokens=30, log_every=10) -> dict:
    """LLaVA's reply to `instruction` for every unique image of `spec`, scored as BLIP's captions are."""
    def describe(images: torch.Tensor) -> list[str]:
        return reply(model, tokenizer, images.to(device), [instruction] * len(images), max_new_tokens, num_beams)

    return caption_images(describe, spec, image_size, batch_size, workers, options, log_every)
