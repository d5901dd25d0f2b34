"""`vqa:QUESTIONS[#ANNOTATIONS]`: VQAv2 (Goyal et al., 2017) in its official JSON layout, over COCO images.

- QUESTIONS, e.g. `v2_OpenEnded_mscoco_val2014_questions.json`: {"data_subtype": "val2014", "questions":
  [{"image_id", "question", "question_id"}, ...]}.
- ANNOTATIONS, e.g. `v2_mscoco_val2014_annotations.json`: {"annotations": [{"question_id", "image_id",
  "answers": [{"answer"}, ...] (ten), "multiple_choice_answer"}, ...]}. Leave it out for test-dev/test,
  which have none: items then carry no answers.

Images are `COCO_{data_subtype}_{image_id:012d}.jpg` (COCO 2014 naming, e.g. COCO_val2014_000000000042.jpg)
under `data.image_root`, or under its `{data_subtype}/` folder when that exists (the layout COCO's zips
unpack to); an empty image_root means the questions file's folder. The subtype comes from the file's
"data_subtype", or else from its name (`..._train2014_questions.json`).

Items: dict(image=PIL RGB, question, answers=[ten strings], answer=multiple_choice_answer, question_id, key=
image path). As in data/coco.py, rows that cannot be used (a question without text or image id, an
annotation without answers, a question with no annotation when ANNOTATIONS is given) are left out and
counted in `skipped_rows`; an image that cannot be read raises BadSample when its item is asked for.
"""
import json
import os
import re

import torch
from torch.utils.data import Dataset

from crossmodal.data.bad_samples import BadSample, BadSampleCount, clean_caption, open_image
from crossmodal.data.image_files import resolve

_SUBTYPE_IN_NAME = re.compile(r"(train|val|test-dev|test)(\d{4})")

# This codebase's VQA prompt for BLIP's captioning decoder (BLIP itself fine-tunes a separate answer decoder):
# eval.py ranks or generates the answer after it, and training with blip.qa_fraction teaches it.
VQA_PROMPT = "question: {} answer:"


def text_ids(tokenizer, texts: list[str], eos_id: int) -> list[list[int]]:
    """The pieces of each text without the start token and eos, in one tokenizer call (a long text is cut)."""
    rows = tokenizer(texts).tolist()
    return [row[1 : row.index(eos_id)] if eos_id in row else row[1:] for row in rows]


def question_answer_rows(tokenizer, questions: list[str], answers: list[str], length: int):
    """Decoder rows `[start] question: q answer: a [eos]` padded to `length`, and each row's prompt length
    (the start token and the prompt: the positions the LM loss skips). A row too long for `length` keeps its
    question and as much of the answer as fits, eos last. Returns ((B, length) long, (B,) long)."""
    eos, pad = tokenizer.eos_id, tokenizer.pad_id
    prompts = text_ids(tokenizer, [VQA_PROMPT.format(q) for q in questions], eos)
    replies = text_ids(tokenizer, answers, eos)
    start = int(tokenizer([""])[0, 0])  # the tokenizer's first token (BLIP's model swaps in [DEC])
    rows = torch.full((len(questions), length), pad, dtype=torch.long)
    prompt_lengths = torch.zeros(len(questions), dtype=torch.long)
    for i, (prompt, reply) in enumerate(zip(prompts, replies)):
        row = ([start, *prompt] + reply)[: length - 1] + [eos]
        rows[i, : len(row)] = torch.tensor(row)
        prompt_lengths[i] = min(1 + len(prompt), length - 1)
    return rows, prompt_lengths


def _read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"vqa: no {what} file at '{path}'")
    with open(path, encoding="utf-8") as f:
        try:
            tree = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"vqa: '{path}' is not valid JSON ({error})") from None
    if not isinstance(tree, dict):
        raise ValueError(f"vqa: '{path}' is not a VQA {what} file (a JSON object)")
    return tree


def _subtype(tree: dict, path: str) -> str:
    """'train2014' from the questions file's data_subtype or its name; test-dev questions use test2015 images."""
    subtype = tree.get("data_subtype")
    if not isinstance(subtype, str):
        match = _SUBTYPE_IN_NAME.search(os.path.basename(path))
        if not match:
            raise ValueError(f"vqa: '{path}' has no 'data_subtype' and its name does not say the COCO split "
                             f"(e.g. ..._val2014_questions.json)")
        subtype = match.group(0)
    return "test2015" if subtype == "test-dev2015" else subtype


def _answers(entry, where: str) -> tuple[list[str], str]:
    if not isinstance(entry, dict) or not isinstance(entry.get("answers"), list) or not entry["answers"]:
        raise BadSample(where, "needs a non-empty 'answers' list")
    answers = [answer.get("answer") if isinstance(answer, dict) else None for answer in entry["answers"]]
    if not all(isinstance(answer, str) for answer in answers):
        raise BadSample(where, "every answer needs an 'answer' string")
    best = entry.get("multiple_choice_answer")
    return answers, best if isinstance(best, str) else max(answers, key=answers.count)


class VQADataset(Dataset):
    """One item per question; image_paths are the unique images, image_of[i] the image of question i."""

    def __init__(self, source: str, image_paths: list[str], image_of: list[int], questions: list[str],
                 question_ids: list, answers: list[list[str]] | None, best_answers: list[str] | None,
                 skipped_rows: BadSampleCount, draft_size: int = 0):
        if not questions:
            raise ValueError(f"{source}: no usable questions"
                             + (f" ({skipped_rows.describe('rows')})" if skipped_rows.bad else ""))
        self.source, self.image_paths, self.image_of, self.questions = source, image_paths, image_of, questions
        self.question_ids, self.answers, self.best_answers = question_ids, answers, best_answers
        self.skipped_rows, self.draft_size = skipped_rows, draft_size

    def __len__(self) -> int:
        return len(self.questions)

    def where(self, index: int) -> str:
        return f"{self.source} question {self.question_ids[index]} ({self.image_paths[self.image_of[index]]})"

    def image(self, image_index: int, where: str | None = None):
        """Unique image `image_index`, decoded; raises BadSample."""
        path = self.image_paths[image_index]
        return open_image(path, where or path, self.draft_size)

    def question_item(self, index: int) -> dict:
        """Item `index` without its image (question, question_id, key[, answers, answer]): what evaluation scores
        when the image cannot be read."""
        item = {"question": self.questions[index], "question_id": self.question_ids[index],
                "key": self.image_paths[self.image_of[index]]}
        if self.answers is not None:
            item["answers"], item["answer"] = self.answers[index], self.best_answers[index]
        return item

    def __getitem__(self, index: int) -> dict:
        return {"image": self.image(self.image_of[index], self.where(index)), **self.question_item(index)}


def load_vqa(argument: str, image_root: str = "", draft_size: int = 0) -> VQADataset:
    """`QUESTIONS_JSON[#ANNOTATIONS_JSON]` -> VQADataset (see the module docstring)."""
    questions_path, _, annotations_path = argument.partition("#")
    tree = _read_json(questions_path, "questions")
    if not isinstance(tree.get("questions"), list):
        raise ValueError(f"vqa: '{questions_path}' has no 'questions' list (is it the annotations file? "
                         f"the spec is vqa:QUESTIONS#ANNOTATIONS)")
    subtype = _subtype(tree, questions_path)
    root = image_root or os.path.dirname(questions_path)
    if os.path.isdir(os.path.join(root, subtype)):
        root = os.path.join(root, subtype)
    skipped = BadSampleCount()
    by_question = None
    if annotations_path:
        annotations = _read_json(annotations_path, "annotations").get("annotations")
        if not isinstance(annotations, list):
            raise ValueError(f"vqa: '{annotations_path}' has no 'annotations' list")
        by_question = {}
        for k, entry in enumerate(annotations):
            where = f"{annotations_path} annotations[{k}]"
            try:
                if not isinstance(entry, dict) or "question_id" not in entry:
                    raise BadSample(where, "needs 'question_id'")
                by_question[entry["question_id"]] = _answers(entry, where)
            except BadSample as error:
                skipped.add(1, 1, [str(error)])
    image_index, paths, image_of, questions, question_ids, answers, best = {}, [], [], [], [], [], []
    for k, entry in enumerate(tree["questions"]):
        skipped.add(0, 1)
        where = f"{questions_path} questions[{k}]"
        try:
            if not isinstance(entry, dict) or not isinstance(entry.get("image_id"), int) or "question_id" not in entry:
                raise BadSample(where, "needs an integer 'image_id' and a 'question_id'")
            if not isinstance(entry.get("question"), str):
                raise BadSample(where, "needs a 'question' string")
            question = clean_caption(entry["question"], where)
            if by_question is not None:
                if entry["question_id"] not in by_question:
                    raise BadSample(where, f"question_id {entry['question_id']!r} has no usable annotation")
                question_answers, best_answer = by_question[entry["question_id"]]
                answers.append(question_answers)
                best.append(best_answer)
        except BadSample as error:
            skipped.add(1, 0, [str(error)])
            continue
        image_id = entry["image_id"]
        if image_id not in image_index:
            image_index[image_id] = len(paths)
            paths.append(resolve(f"COCO_{subtype}_{image_id:012d}.jpg", root))
        image_of.append(image_index[image_id])
        questions.append(question)
        question_ids.append(entry["question_id"])
    return VQADataset(argument, paths, image_of, questions, question_ids, answers if by_question is not None else None,
                      best if by_question is not None else None, skipped, draft_size)
