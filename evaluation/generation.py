"""The caption and VQA evaluation loops that every image-conditioned text generator shares (BLIP's decoder,
evaluation/blip.py; LLaVA, evaluation/llava.py): the loaders, bad-image accounting and scoring, around a function
that turns a batch of images (and questions) into text.

caption: a caption for every unique image, scored against all its captions with BLEU-1..4 and CIDEr
(metrics/caption.py). vqa: the official VQA soft accuracy (metrics/vqa.py); a question with one answer (shapes)
counts it as ten identical human answers, normalised as predictions are. Rank mode's candidates are a list given
(a JSON list like BLIP's answer_list.json, or one per line), else the distinct answers of the data.

An unreadable image's caption is empty (scored, not skipped) and its questions' answers are empty (wrong); results
report `bad_images` and what they affect, and the evaluation stops with one line once those pass
data.max_bad_fraction (evaluation/contrastive.py `check_unreadable`).
"""
import json
import os
from collections import Counter
from typing import Callable

import torch

from crossmodal.data import caption_loader
from crossmodal.data.bad_samples import BadSampleCount
from crossmodal.data.vqa import VQADataset
from crossmodal.evaluation.contrastive import Progress, check_unreadable
from crossmodal.metrics import caption_scores, normalize_answer, vqa_score

VQA_MODES = ("rank", "generate")


def caption_images(describe: Callable[[torch.Tensor], list[str]], spec, image_size, batch_size=256, workers=0,
                   options=None, log_every=10) -> dict:
    """`describe(images (B, 3, H, W))` -> a caption per image, for every unique image of `spec`, scored against
    all its captions (BLEU-1..4, CIDEr, x100)."""
    loader, references = caption_loader(spec, image_size, batch_size, workers, options=options)
    captions, count = [], BadSampleCount()
    progress = Progress("captioned images", len(references), log_every)
    for batch in loader:
        texts = describe(batch["image"])
        for key, index, text, bad in zip(batch["key"], batch["index"].tolist(), texts, batch["bad"].tolist()):
            captions.append({"image": key, "caption": "" if bad else text, "references": references[index]})
        count.add_batch(batch)
        progress.update(len(texts))
    check_unreadable(count, count.bad, len(captions), "images", spec, options)
    scores = caption_scores({i: c["caption"] for i, c in enumerate(captions)},
                            {i: c["references"] for i, c in enumerate(captions)})
    return {**scores, "num_images": len(captions), "bad_images": count.bad, "captions": captions}


def check_vqa_mode(mode: str) -> None:
    if mode not in VQA_MODES:
        raise ValueError(f"--vqa-mode must be generate or rank; got '{mode}'")


def answer_questions(answer: Callable[[torch.Tensor, list[str]], list[str]], dataset, loader, spec, options=None,
                     mode: str = "rank", candidates: list[str] | None = None, prompt: str = "",
                     log_every: int = 10) -> dict:
    """VQA accuracy (x100) of `answer(images (B, 3, H, W), questions)` -> an answer per question, over a
    `data.question_loader`'s (dataset, loader) of `spec`; `mode`, `candidates` (rank mode) and `prompt` are
    reported with the results."""
    predictions, references, rows, count, bad_images = {}, {}, [], BadSampleCount(), set()
    progress = Progress("answered questions", len(dataset), log_every)
    for batch in loader:
        predicted = answer(batch["image"], batch["question"])
        for question_id, question, reply, truth, key, bad in zip(batch["question_id"], batch["question"], predicted,
                                                                 batch["answers"], batch["key"], batch["bad"]):
            if bad:  # the model saw a neighbour's image
                reply = ""
                bad_images.add(key)
            predictions[question_id] = reply
            rows.append({"question_id": question_id, "question": question, "answer": reply, "answers": truth})
            if truth is not None:
                references[question_id] = reference_answers(truth)
        count.add(int(batch["bad"].sum()), len(predicted), batch["bad_examples"])
        progress.update(len(predicted))
    check_unreadable(count, count.bad, len(rows), "questions", spec, options)
    results = {"accuracy": vqa_score(predictions, references)} if references else {}
    results.update(mode=mode, num_questions=len(rows), bad_images=len(bad_images), affected_questions=count.bad,
                   prompt=prompt)
    if mode == "rank":
        results["num_candidates"] = len(candidates)
    return {**results, "predictions": rows}


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
