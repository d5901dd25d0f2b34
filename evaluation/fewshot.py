"""Few-shot in-context evaluation of a Flamingo (eval.py --task fewshot_vqa | fewshot_caption), OpenFlamingo's
protocol (`open_flamingo/eval/evaluate.py`, Alayrac et al. 2022 section 3):

- each query gets k demonstrations from a pool of at most `pool_size` training-side examples (OpenFlamingo: 2048
  of the train split), never the query itself: drawn at random per (seed, query), or RICES, the k most similar by
  the frozen vision encoder's image embedding (cosine), ordered so the most similar is last. The pool: for
  shapes_icl, the train split's images; for a spec that names one split only (coco, vqa, csv, shapes, ...), that
  spec's examples other than the queries, and where the queries take the whole spec, the spec itself with each
  query left out of its own pool (so a whole split evaluates however large; `--num-queries` keeps the two apart);
- prompts `<image> Output: {caption}<|endofchunk|>` and `<image> Question: {q} Short answer: {a}<|endofchunk|>`
  (data/interleaved.py: a space after `<image>` for sentencepiece), the query's answer left open, after bos;
  `prompts="open_flamingo"` (released OpenFlamingo weights) writes OpenFlamingo's exact strings instead:
  `<image>Output:{caption}<|endofchunk|>` and `<image>Question:{q} Short answer:{a}<|endofchunk|>`, a newline after
  each demonstration (open_flamingo 2.0.1 `eval/evaluate.py`), no bos, and cuts answers as its `coco_metric.py`
  and `vqa_metric.py` do;
- 0 shots = two demonstrations with their images removed (OpenFlamingo's `compute_effective_num_shots`);
- beam search (3 beams, length_penalty 0) with the media encoded once and the prompt's keys/values cached,
  stopping at `<|endofchunk|>`; at most 5 new tokens for VQA, 20 for captions;
- VQA accuracy (the VQAv2 soft accuracy with ten answers, exact match with one) and CIDEr (metrics/caption.py),
  as mean and standard deviation over seeds.

Video specs (moving_shapes with its questions, video_csv and msrvtt with their captions) are answered over clips:
each query and demonstration is `frames` frames sampled at evaluation's fixed positions, one `<image>` each, which
the Flamingo's resampler turns into as many tokens as an image (with its time embeddings, if it has them); RICES
compares clips by the mean of their frames' embeddings.

`shapes_icl:SPLIT[:N]` queries are the first N shapes images of the split, each to be named by its colour in its
own episode's made-up words (query i: episode i), with the captioning prompt its episodes train on
(`<image> Output: dax`) and scored as VQA accuracy; every demonstration of query i is answered in episode i's
words, so only the demonstrations reveal the answer (those from the train split answered in episode i's words too).

An unreadable image (coco, vqa, csv: a missing or corrupt file) makes a miss of every query whose prompt holds it,
its own or a demonstration's (RICES never picks one); results report `affected_queries` (each run's, and the most
of any run), and the evaluation stops with one line once a run's pass data.max_bad_fraction of the queries, the
rule training applies.
"""
import re
import statistics
from typing import Optional

import numpy as np
import torch

from crossmodal.config import BadInput, DataConfig
from crossmodal.data import build_dataset, has_questions, map_style_dataset
from crossmodal.data.bad_samples import BadSample, BadSampleCount
from crossmodal.data.image_files import ImageFiles
from crossmodal.data.interleaved import (CAPTION_CUE, END_OF_CHUNK, MEDIA, InterleavedCollate, ShapesICL, caption_prompt,
                              vqa_prompt)
from crossmodal.data.moving_shapes import MovingShapesDataset
from crossmodal.data.transforms import image_transform
from crossmodal.data.video import ClipFiles
from crossmodal.metrics.caption import caption_scores
from crossmodal.metrics.vqa import normalize_answer, vqa_accuracy

TASKS = ("fewshot_vqa", "fewshot_caption")
PROMPTS = ("ours", "open_flamingo")  # see the module docstring


class FewShotData:
    """Queries and a demonstration pool (module docstring): `example(index, episode)` -> dict(image (3, H, W),
    question, answers, captions) of query `index`, `demonstration(index, episode)` the same of pool entry `index`;
    `episode` only matters for shapes_icl (whose words answer the questions). `pool_position[index]`: where a query
    sits in the pool when the pool is drawn from the queries' own spec (it is then left out of its own draws).
    frames: a video spec's frames per clip (its examples' `image` is then (frames, 3, H, W))."""

    def __init__(self, spec: str, image_size: int, seed: int = 0, options=None, pool_size: int = 2048,
                 num_queries: Optional[int] = None, frames: int = 0):
        self.spec, self.frames = spec, frames
        self.base = map_style_dataset(spec, image_size, seed, options)
        if isinstance(self.base, (MovingShapesDataset, ClipFiles)) and frames <= 0:
            raise ValueError(f"{spec} holds clips: few-shot prompts over it need frames > 0 per clip; got {frames}")
        self.transform = image_transform(image_size, train=False)
        base = self.base
        if isinstance(base, ShapesICL):
            count = min(len(base), len(base.shapes), num_queries or len(base))
            self.queries = list(range(count))
            self.pool_source = base if base.split == "train" else ShapesICL("train", image_size, seed=base.seed)
            order = list(range(len(self.pool_source.shapes)))
        else:
            total = len(base.image_paths) if isinstance(base, ImageFiles) else len(base)
            count = min(num_queries or total, total)
            order = [int(i) for i in np.random.default_rng(seed).permutation(total)]
            self.queries = sorted(order[:count])
            self.pool_source = base
        if self.pool_source is base:  # the other examples first; the queries themselves only when there are none
            chosen = set(self.queries)
            order = [i for i in order if i not in chosen] + [i for i in order if i in chosen]
        self.pool = order[:pool_size]
        self.pool_position = {index: position for position, index in enumerate(self.pool)} \
            if self.pool_source is base else {}
        if isinstance(base, ImageFiles):  # references: every caption of an image
            self.references = [[] for _ in base.image_paths]
            for text, image in zip(base.texts, base.image_of):
                self.references[image].append(text)

    def example(self, index: int, episode: int) -> dict:
        """Query `index`; raises BadSample for an unreadable image."""
        return self._example(self.base, index, episode)

    def demonstration(self, index: int, episode: int) -> dict:
        """Pool entry `index` (of pool_source), answered in query `episode`'s words; raises BadSample."""
        return self._example(self.pool_source, index, episode)

    def _example(self, source, index: int, episode: int) -> dict:
        if isinstance(source, ShapesICL):
            item = source.example(index, episode, words=self.base.words(episode))
            item["captions"] = [item["caption"]]
        elif isinstance(source, ClipFiles):  # (an ImageFiles of clips)
            item = {"frames": source.clip(index, self.frames), "captions": self.references[index], "question": None,
                    "answers": None}
        elif isinstance(source, ImageFiles):
            item = {"image": source.image(index), "captions": self.references[index], "question": None,
                    "answers": None}
        else:
            raw = source.item(index, self.frames) if isinstance(source, MovingShapesDataset) else source[index]
            item = {"question": raw.get("question"), "captions": [raw.get("caption")],
                    "answers": raw.get("answers", [raw["answer"]] if "answer" in raw else None),
                    **{key: raw[key] for key in ("image", "frames") if key in raw}}
        if "frames" in item:  # a clip: (frames, 3, H, W)
            return {**item, "image": torch.stack([self.transform(frame) for frame in item.pop("frames")])}
        return {**item, "image": self.transform(item["image"])}


@torch.no_grad()
def image_features(model, data: FewShotData, indices: list[int], device, pool: bool = False,
                   batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) normalised image embeddings of the frozen vision encoder (RICES' similarity) of queries or (`pool`)
    pool entries, and which of them could be read (N,) (the others' rows are 0)."""
    read = data.demonstration if pool else data.example
    features, readable = [], []
    for start in range(0, len(indices), batch_size):
        images = []
        for index in indices[start : start + batch_size]:
            try:
                images.append(read(index, 0)["image"])
                readable.append(True)
            except BadSample:
                readable.append(False)
        if images:
            batch = torch.stack(images).to(device)  # (N, 3, H, W), or clips (N, frames, 3, H, W)
            embeddings = model.vision_encoder(batch.flatten(0, batch.dim() - 4)).float()  # (N * frames, D)
            embeddings = embeddings.view(len(images), -1, embeddings.shape[-1]).mean(1)  # a clip: its frames' mean
            features.append(torch.nn.functional.normalize(embeddings, dim=-1).cpu())
    readable = torch.tensor(readable, dtype=torch.bool)
    rows = torch.zeros(len(indices), features[0].shape[-1] if features else 1)
    if features:
        rows[readable] = torch.cat(features)
    return rows, readable


def demonstrations(data: FewShotData, query_position: int, shots: int, seed: int,
                   similarity: Optional[torch.Tensor]) -> list[int]:
    """Pool indices of a query's demonstrations (0 shots: 2, shown without images), never the query itself;
    RICES: most similar last."""
    count = shots if shots else 2
    own = data.pool_position.get(data.queries[query_position])  # the query's place in the pool, if it has one
    available = len(data.pool) - (own is not None)
    if available < count:
        raise BadInput(f"{data.spec}: {count} demonstrations per query, but its pool holds {available} examples "
                       f"besides the query; use fewer --shots or a larger split")
    if similarity is not None and shots:
        scores = similarity[query_position].clone()
        if own is not None:
            scores[own] = float("-inf")
        best = scores.topk(count).indices.tolist()  # most similar first
        return [data.pool[i] for i in reversed(best)]
    rng = np.random.default_rng([seed, query_position])
    drawn = rng.choice(available, size=count, replace=False)
    return [data.pool[int(i) + (own is not None and i >= own)] for i in drawn]  # skipping the query's own place


def pair_text(task: str, example: dict, answer: Optional[str], prompts: str = "ours") -> str:
    """One demonstration (with its answer and <|endofchunk|>) or the query (answer left open)."""
    asked = task == "fewshot_vqa" and example.get("prompt") != "caption"  # shapes_icl's words: named as captions
    if prompts == "open_flamingo":
        if asked:
            prompt = f"{MEDIA}Question:{example['question']} Short answer:{answer or ''}"
        else:
            prompt = f"{MEDIA}Output:{(answer or '').strip()}"
        return prompt + END_OF_CHUNK + "\n" if answer is not None else prompt
    if asked:
        prompt = vqa_prompt(example["question"], answer or "")
    else:
        prompt = caption_prompt(answer or "")
    return prompt + END_OF_CHUNK if answer is not None else prompt.rstrip()


def build_prompt(task: str, data: FewShotData, query: int, demos: list[int], shots: int, rng,
                 prompts: str = "ours") -> tuple[str, list]:
    """(text, images) of one query's prompt."""
    texts, images = [], []
    for index in demos:
        demo = data.demonstration(index, episode=query)
        answers = demo["answers"] if task == "fewshot_vqa" else demo["captions"]
        text = pair_text(task, demo, answers[int(rng.integers(len(answers)))], prompts)
        if shots:
            images.append(demo["image"])
        else:  # zero-shot: text-only demonstrations
            text = text.replace(MEDIA + (" " if prompts == "ours" else ""), "", 1)
        texts.append(text)
    target = data.example(query, episode=query)
    texts.append(pair_text(task, target, None, prompts))
    images.append(target["image"])
    return "".join(texts), images


def answer_text(task: str, text: str, prompts: str = "ours") -> str:
    """A generated continuation -> the answer or caption: up to where the model starts the next pair."""
    if prompts == "open_flamingo":  # open_flamingo/eval: vqa_metric.py, coco_metric.py
        if task == "fewshot_vqa":
            return re.split(", ", re.split("Question|Answer|Short", text, maxsplit=1)[0], maxsplit=1)[0].strip()
        return text.split("Output", 1)[0].replace('"', "").strip()
    return text.split("question:")[0].strip()


def answer_accuracy(prediction: str, answers: list[str]) -> float:
    """VQAv2's soft accuracy with ten human answers; exact match (after its normalisation) with fewer."""
    if len(answers) >= 10:
        return vqa_accuracy(prediction, answers)
    return float(normalize_answer(prediction) in {normalize_answer(answer) for answer in answers})


@torch.no_grad()
def evaluate_shots(model, tokenizer, data: FewShotData, task: str, shots: int, seed: int, device,
                   similarity: Optional[torch.Tensor] = None, batch_size: int = 32, num_beams: int = 3,
                   prompts: str = "ours") -> tuple[float, BadSampleCount]:
    """One (shots, seed) run over all queries: VQA accuracy (%) or CIDEr, and the queries whose prompt held an
    unreadable image (each a miss: no answer, an empty caption)."""
    max_new_tokens = 5 if task == "fewshot_vqa" else 20
    predictions, truths, affected = {}, {}, BadSampleCount(seen=len(data.queries))
    for start in range(0, len(data.queries), batch_size):
        prompt_ids, images, answered = [], [], []
        for position in range(start, min(start + batch_size, len(data.queries))):
            query = data.queries[position]
            rng = np.random.default_rng([seed, query, 1])
            try:
                text, pictures = build_prompt(task, data, query, demonstrations(data, position, shots, seed,
                                                                                similarity), shots, rng, prompts)
                target = data.example(query, episode=query)
            except BadSample as error:
                affected.add(1, 0, [str(error)])
                if task == "fewshot_caption" and hasattr(data, "references"):  # (known without the image)
                    predictions[query], truths[query] = "", data.references[query]
                continue
            start_ids = [tokenizer.bos_id] if prompts == "ours" else []  # OpenFlamingo's tokenizer adds no bos
            prompt_ids.append([*start_ids, *tokenizer.encode(text)])
            images.append(torch.stack(pictures))
            answered.append(query)
            truths[query] = target["answers"] if task == "fewshot_vqa" else target["captions"]
        if not answered:
            continue
        length = max(map(len, prompt_ids))
        if length + max_new_tokens > model.lang_model.context_length:
            raise ValueError(f"{shots}-shot prompts reach {length} tokens, + {max_new_tokens} to generate: more "
                             f"than the language model's {model.lang_model.context_length}; use fewer --shots")
        tokens = torch.tensor([[tokenizer.pad_id] * (length - len(p)) + p for p in prompt_ids])  # padded on the left
        new = model.generate(torch.stack(images).to(device), tokens.to(device), max_new_tokens=max_new_tokens,
                             num_beams=num_beams, length_penalty=0.0)
        for query, row in zip(answered, new.tolist()):
            row = row[: row.index(model.eoc_token_id)] if model.eoc_token_id in row else row
            text = tokenizer.decode([i for i in row if i != tokenizer.pad_id])
            predictions[query] = answer_text(task, text, prompts)
    if task == "fewshot_vqa":  # the affected queries score 0 over all queries
        score = 100 * sum(answer_accuracy(predictions[q], truths[q]) for q in predictions) / len(data.queries)
    else:
        score = caption_scores(predictions, truths)["CIDEr"]
    return score, affected


def evaluate(model, tokenizer, spec: str, task: str, image_size: int, device, shots=(0, 4, 8), seeds=(0, 1, 2),
             rices: bool = False, options=None, batch_size: int = 32, num_beams: int = 3, pool_size: int = 2048,
             num_queries: Optional[int] = None, log=print, prompts: str = "ours", frames: int = 0) -> dict:
    """{"shots": {"0": {"mean", "std", "runs", "affected_queries"}, ...}, "metric", "num_queries", "pool_size",
    "demonstrations", "prompts", "affected_queries" (the most of any run)} (see module doc; prompts: one of
    PROMPTS; frames: a video spec's frames per clip). Stops (BadInput) once a run's affected queries pass
    data.max_bad_fraction."""
    if task not in TASKS:
        raise ValueError(f"few-shot tasks: {', '.join(TASKS)}; got {task!r}")
    if prompts not in PROMPTS:
        raise ValueError(f"few-shot prompts: {', '.join(PROMPTS)}; got {prompts!r}")
    if not hasattr(model, "perceiver"):
        raise ValueError(f"--task {task} needs a Flamingo checkpoint")
    if not seeds or not shots:
        raise BadInput(f"few-shot evaluation needs at least one seed and one shot count; got seeds {list(seeds)}, "
                       f"shots {list(shots)}")
    data = FewShotData(spec, image_size, 0, options, pool_size, num_queries, frames)
    if task == "fewshot_vqa" and not (has_questions(data.base) or isinstance(data.base, (ShapesICL,
                                                                                         MovingShapesDataset))):
        raise ValueError(f"{spec}: fewshot_vqa needs questions (shapes, shapes_icl, moving_shapes, vqa with "
                         f"annotations)")
    max_fraction = (options or DataConfig()).max_bad_fraction
    similarity = None
    if rices:
        query_features, _ = image_features(model, data, data.queries, device)
        pool_features, readable = image_features(model, data, data.pool, device, pool=True)
        similarity = (query_features @ pool_features.T).masked_fill(~readable, float("-inf"))  # (queries, pool)
    results, most_affected = {}, 0
    for count in shots:
        runs, affected = [], []
        for seed in (seeds if not rices else seeds[:1]):  # RICES is deterministic
            score, unreadable = evaluate_shots(model, tokenizer, data, task, count, seed, device, similarity,
                                               batch_size, num_beams, prompts)
            unreadable.check(max_fraction, f"{spec} ({count} shots, seed {seed})", "queries",
                             "with an unreadable image in their prompt")
            runs.append(score)
            affected.append(unreadable.bad)
        results[str(count)] = {"mean": statistics.fmean(runs), "std": statistics.pstdev(runs) if len(runs) > 1 else 0.0,
                               "runs": runs, "affected_queries": affected}
        most_affected = max(most_affected, *affected)
        if log:
            log(f"{task} {count} shots: {results[str(count)]['mean']:.2f} +- {results[str(count)]['std']:.2f} "
                f"({', '.join(f'{run:.2f}' for run in runs)})" +
                (f", queries with an unreadable image: {', '.join(map(str, affected))}" if any(affected) else ""))
    return {"metric": "accuracy" if task == "fewshot_vqa" else "CIDEr", "num_queries": len(data.queries),
            "pool_size": len(data.pool), "demonstrations": "rices" if rices else "random", "prompts": prompts,
            "affected_queries": most_affected, "shots": results}


@torch.no_grad()
def words_rule_accuracy(model, tokenizer, spec: str, device, episodes: int = 300, batch_size: int = 64,
                        image_size: int = 64) -> dict:
    """Whether a model reads shapes_icl's in-context rule: over the `words` episodes among the first `episodes` of a
    shapes_icl spec, the percentage of answers whose first token it predicts (teacher-forced, greedy):
    `words_seen_accuracy` for answers whose colour an earlier pair of the episode showed (the context reveals the
    word), `words_unseen_accuracy` for first occurrences (it cannot: 1 in 24 at chance, 0 for a model that copies).

    Two numbers say whether a seen-colour answer was read or guessed: `words_copy_rate`, the share of seen-colour
    answers predicted as one of the episode's earlier answers, and `words_copy_chance`, the seen accuracy of a model
    that copies one of the earlier distinct answers at random (ignoring the colours). A model reads the rule only
    where words_seen_accuracy is well above words_copy_chance.

    A language model (stage 1 of the Flamingo demo) reads the text it trains on (each image replaced by its colour
    word); a Flamingo reads the interleaved episodes with their images, and again with each episode given the
    images of the previous episode in its batch (`*_shuffled`; a batch of one episode has no other to borrow from):
    if the two agree, the Flamingo does not use its images.
    A Flamingo can only learn in context what its frozen language model does here."""
    data = build_dataset(spec)
    if not isinstance(data, ShapesICL):
        raise ValueError(f"words_rule_accuracy needs a shapes_icl spec; got {spec!r}")
    flamingo = hasattr(model, "perceiver")
    chosen = [i for i in range(min(episodes, len(data))) if data.kind(i) == "words"]
    marker = tokenizer.encode(CAPTION_CUE)  # shapes_icl names its words as captions
    runs = ("", "_shuffled") if flamingo else ("",)
    hits = {run: {"seen": [0, 0], "unseen": [0, 0], "copied": [0, 0]} for run in runs}
    chance = []
    for start in range(0, len(chosen), batch_size):
        indices = chosen[start : start + batch_size]
        if flamingo:
            batch = InterleavedCollate(tokenizer, image_size, tokenizer.context_length)([data[i] for i in indices])
            tokens, images = batch["tokens"].to(device), batch["images"].to(device)
            predicted = {run: model.logits(tokens, model.encode_media(media)).argmax(-1).cpu()
                         for run, media in (("", images), ("_shuffled", images.roll(1, dims=0)))}
        else:
            tokens = tokenizer([data.text_only(i) for i in indices])
            predicted = {"": model(tokens.to(device)).argmax(-1).cpu()}  # (B, T): the next token at every position
        for b, (row, index) in enumerate(zip(tokens.tolist(), indices)):
            ends = [p + len(marker) - 1 for p in range(len(row)) if row[p : p + len(marker)] == marker]
            answers = [(end, color) for end, color in zip(ends, data.colors(index))  # one answer per pair, in order
                       if end + 1 < len(row) and row[end + 1] != tokenizer.pad_id]  # not cut by the context length
            for run in runs:
                guesses, seen, earlier = predicted[run][b].tolist(), set(), set()
                for end, color in answers:
                    bucket = hits[run]["seen" if color in seen else "unseen"]
                    bucket[0] += int(guesses[end] == row[end + 1])
                    bucket[1] += 1
                    if color in seen:
                        hits[run]["copied"][0] += int(guesses[end] in earlier)
                        hits[run]["copied"][1] += 1
                        if not run:
                            chance.append(1 / len(seen))  # the earlier distinct answers: one per distinct colour
                    seen.add(color)
                    earlier.add(row[end + 1])
    names = {"seen": "seen_accuracy", "unseen": "unseen_accuracy", "copied": "copy_rate"}
    scores = {f"words_{names[name]}{run}": 100.0 * right / max(count, 1)
              for run, counts in hits.items() for name, (right, count) in counts.items()}
    scores["words_copy_chance"] = 100.0 * sum(chance) / max(len(chance), 1)
    return scores


def evaluate_run(cfg, model, tokenizer, device, fewshot: bool = True) -> dict:
    """What train.py reports at the end of a run on shapes_icl: `words_rule_accuracy` on data.val (for a language
    model, what the Flamingo built on it can learn; for a Flamingo, whether it uses its images) and a Flamingo's
    few-shot VQA on data.val (0 and 4 shots, one seed)."""
    if not cfg.data.val:
        return {}
    scores = {}
    if cfg.data.val.startswith("shapes_icl:"):
        accuracies = words_rule_accuracy(model, tokenizer, cfg.data.val, device, image_size=cfg.data.image_size)
        scores.update({f"val/{name}": value for name, value in accuracies.items()})
    if fewshot:  # a Flamingo (a language model reads no images)
        few = evaluate(model, tokenizer, cfg.data.val, "fewshot_vqa", cfg.data.image_size, device, shots=(0, 4),
                           seeds=(0,), options=cfg.data, log=None)
        scores.update({f"val/fewshot_vqa_{shots}": value["mean"] for shots, value in few["shots"].items()})
    return scores

