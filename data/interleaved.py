"""Interleaved image-text sequences for Flamingo (and their text for its language model).

Spec strings (data.train, and eval.py --data for the few-shot tasks):
    shapes_icl:SPLIT[:LENGTH]   episodes of 2-9 `shapes` images, each followed by its text (below)
    interleaved:PATH.jsonl      documents, one JSON object a line, OBELICS-style: {"texts": [...], "images": [...]},
                                two lists of one length where each position holds a text or an image path (relative
                                paths start from the file's folder or data.image_root), in reading order
    interleaved_wds:PATTERN     WebDataset shards of such documents: KEY.json with the lists, whose image entries
                                name members of the same key (KEY.0.png -> "0.png"); streamed, training only

A document becomes `text <image>text<|endofchunk|><image>text<|endofchunk|>` as OpenFlamingo writes MMC4: every
image after the first closes the previous chunk, and the last chunk is closed at the end. A `shapes_icl` episode
writes each pair in OpenFlamingo's few-shot prompts (`<image>Output: {caption}<|endofchunk|>`,
`<image>Question: {q} Short answer: {a}<|endofchunk|>`), with one deliberate difference: a space after `<image>`,
so that sentencepiece splits the next word as it does inside text. Episode kinds:
- `words` (80%, 5-9 pairs): each image is named (`<image> Output: dax`) by its main shape's colour in a made-up
  language drawn for the episode (a mapping of the six colours to six of WORDS); only the earlier pairs of the
  episode reveal it. The naming uses the captioning prompt, not the VQA prompt with "what colour?": a two-layer
  LM learns the rule when the colour stands two tokens before the answer, and only copies an earlier answer at
  random when it stands eight before (docs/results.md, "Flamingo on shapes");
- `vqa` (10%) and `caption` (10%), 2-9 pairs: the shapes questions and captions.
`text_only` (a language model's training text) replaces each `<image>` by the main shape's colour word: the
language model learns the episodes' in-context rule from text, and Flamingo learns to put images in its place.

Sequences are tokenized as bos, text, eos (cut at the context length) and padded on the right; a batch holds the
images its token rows still contain, padded with zero images to the longest row (never attended to).
"""
import json
import os
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from crossmodal.data.bad_samples import BadSample, open_image
from crossmodal.data.shapes import COLORS, DEFAULT_LENGTHS, SPLITS, ShapesDataset, _caption, _question, _sample_scene, render
from crossmodal.data.transforms import image_transform
from crossmodal.data.webdataset import expand_shards, shard_records

MEDIA, END_OF_CHUNK = "<image>", "<|endofchunk|>"
WORDS = ("dax", "wug", "blick", "fep", "toma", "zup", "kiki", "bouba", "glorp", "mib", "rast", "yoff",
         "lorp", "snib", "vask", "tupa", "nerk", "pim", "quoz", "drel", "mog", "teb", "sorn", "gavo")
EPISODE_KINDS = ("words", "vqa", "caption")
EPISODE_WEIGHTS = (0.8, 0.1, 0.1)
WORDS_QUESTION = "what colour?"  # what the words task asks, for prompts that need a question
CAPTION_CUE = "Output:"  # OpenFlamingo's captioning prompt, which the words task uses: the answer follows it
MAX_PAIRS = 9  # a query after 8 demonstrations
MIN_PAIRS = {"words": 5, "vqa": 2, "caption": 2}  # words: at least 5, so most episodes repeat a colour


def caption_prompt(caption: str = "") -> str:
    return f"{MEDIA} {CAPTION_CUE} {caption}"


def vqa_prompt(question: str, answer: str = "") -> str:
    return f"{MEDIA} Question: {question} Short answer: {answer}"


class ShapesICL(Dataset):
    """`shapes_icl:SPLIT`: item i is episode i (dict images (PIL list), text, text_only, key); `example` gives one
    image with its question and answer under any episode's words, for few-shot evaluation."""

    def __init__(self, split: str = "train", image_size: int = 64, length: int | None = None, seed: int = 0):
        self.shapes = ShapesDataset(split, image_size, seed=seed)
        self.split, self.seed, self.image_size = split, seed, image_size
        self.length = DEFAULT_LENGTHS[split] if length is None else length

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int, purpose: int) -> np.random.Generator:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for shapes_icl:{self.split} of length {self.length}")
        return np.random.default_rng([self.seed, SPLITS.index(self.split), index, purpose])

    def words(self, episode: int) -> dict[str, str]:
        """The made-up colour names of an episode: colour -> word, six distinct words of WORDS."""
        chosen = self._rng(episode, 1).choice(len(WORDS), size=len(COLORS), replace=False)
        return {color: WORDS[k] for color, k in zip(COLORS, chosen)}

    def _describe(self, shape_index: int):
        rng = self.shapes._rng(shape_index)  # the same draws as ShapesDataset.__getitem__, without drawing
        scene = _sample_scene(rng, self.shapes._main_classes)
        caption = _caption(scene, rng)
        question, answer = _question(scene, rng)
        return scene, caption, question, answer

    def _episode(self, index: int) -> tuple[str, list[int]]:
        rng = self._rng(index, 0)
        kind = EPISODE_KINDS[rng.choice(len(EPISODE_KINDS), p=EPISODE_WEIGHTS)]
        shape_indices = rng.integers(len(self.shapes), size=int(rng.integers(MIN_PAIRS[kind], MAX_PAIRS + 1)))
        return kind, [int(i) for i in shape_indices]

    def _pairs(self, index: int) -> tuple[list, list[str], list[str]]:
        kind, shape_indices = self._episode(index)
        words = self.words(index)
        scenes, texts, colors = [], [], []
        for shape_index in shape_indices:
            scene, caption, question, answer = self._describe(shape_index)
            color = scene.objects[0].color
            if kind == "words":
                text = caption_prompt(words[color])
            else:
                text = caption_prompt(caption) if kind == "caption" else vqa_prompt(question, answer)
            scenes.append(scene)
            texts.append(text + END_OF_CHUNK)
            colors.append(color)
        return scenes, texts, colors

    def kind(self, index: int) -> str:
        """Episode `index`'s kind, one of EPISODE_KINDS."""
        return self._episode(index)[0]

    def colors(self, index: int) -> list[str]:
        """The main shape's colour of each image of episode `index`, in order."""
        return self._pairs(index)[2]

    def text_only(self, index: int) -> str:
        """The episode for a language model: each `<image>` replaced by the main shape's colour."""
        _, texts, colors = self._pairs(index)
        return _text_only(texts, colors)

    def __getitem__(self, index: int) -> dict:
        scenes, texts, colors = self._pairs(index)
        return {"images": [render(scene, self.image_size) for scene in scenes], "text": "".join(texts),
                "text_only": _text_only(texts, colors), "key": f"shapes_icl/{self.split}/{self.seed}/{index}"}

    def example(self, shape_index: int, episode: int, words: dict[str, str] | None = None) -> dict:
        """Shapes image `shape_index` (of the whole split) named in episode's words (or `words`, another split's
        episode's: few-shot demonstrations from the train split); `prompt`: the words episodes' prompt
        (captioning), which few-shot VQA uses for these examples."""
        scene, caption, _, _ = self._describe(shape_index)
        words = words or self.words(episode)
        return {"image": render(scene, self.image_size), "question": WORDS_QUESTION, "caption": caption,
                "answers": [words[scene.objects[0].color]], "prompt": "caption"}


def _text_only(texts: list[str], colors: list[str]) -> str:
    """Pair texts with each `<image>` replaced by its colour word, after a space: sentencepiece then writes every
    colour as the same word piece (`▁red`), also right after an `<|endofchunk|>`, where a bare `red` would be
    another piece than the first pair's."""
    return "".join(text.replace(MEDIA, f" {color}", 1) for text, color in zip(texts, colors))


def document_text(texts: list, has_image: list[bool]) -> str:
    """OBELICS-style parallel lists -> `text<image>text<|endofchunk|>...` (OpenFlamingo's MMC4 layout)."""
    parts, images = [], 0
    for text, image in zip(texts, has_image):
        if image:
            parts.append((END_OF_CHUNK if images else "") + MEDIA)
            images += 1
        elif text:
            parts.append(text)
    return "".join(parts) + (END_OF_CHUNK if images else "")


def _check_document(document, where: str) -> tuple[list, list]:
    if not isinstance(document, dict) or not isinstance(document.get("texts"), list) \
            or not isinstance(document.get("images"), list) or len(document["texts"]) != len(document["images"]):
        raise BadSample(where, 'expected {"texts": [...], "images": [...]}, two lists of one length')
    return document["texts"], document["images"]


class InterleavedDocuments(Dataset):
    """`interleaved:PATH.jsonl`: items dict images (PIL list), text, text_only, key."""

    def __init__(self, path: str, image_root: str = ""):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"interleaved: no JSONL file at '{path}'")
        self.path, self.root = path, image_root or os.path.dirname(os.path.abspath(path))
        with open(path) as f:
            self.lines = [line for line in f if line.strip()]
        if not self.lines:
            raise ValueError(f"interleaved: '{path}' holds no documents")

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, index: int) -> dict:
        where = f"{self.path} line {index + 1}"
        try:
            texts, images = _check_document(json.loads(self.lines[index]), where)
        except json.JSONDecodeError as error:
            raise BadSample(where, f"not JSON ({error})") from None
        paths = [os.path.join(self.root, image) for image in images if image]
        text = document_text(texts, [bool(image) for image in images])
        return {"images": [open_image(path, where) for path in paths], "text": text,
                "text_only": text.replace(MEDIA, "").replace(END_OF_CHUNK, " "), "key": f"{self.path}:{index}"}


class InterleavedShards(IterableDataset):
    """`interleaved_wds:PATTERN`: this process's shards (every world_size-th), cycled in order without end."""

    def __init__(self, pattern: str, rank: int = 0, world_size: int = 1, epochs: int | None = None):
        self.shards = expand_shards(pattern)
        self.rank, self.world_size, self.epochs = rank, world_size, epochs
        if len(self.shards) < world_size:
            raise ValueError(f"interleaved_wds: {len(self.shards)} shards for {world_size} processes")

    def __iter__(self) -> Iterator[dict]:
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            for shard in self.shards[self.rank :: self.world_size]:
                for record in shard_records(shard):
                    if isinstance(record, BadSample) or "json" not in record:
                        continue
                    where = f"{shard}:{record['__key__']}"
                    try:
                        texts, images = _check_document(json.loads(record["json"]), where)
                        pictures = [open_image(_member(record, image, where), where) for image in images if image]
                    except (BadSample, json.JSONDecodeError):
                        continue  # a stream skips what it cannot read
                    text = document_text(texts, [bool(image) for image in images])
                    yield {"images": pictures, "text": text, "key": where,
                           "text_only": text.replace(MEDIA, "").replace(END_OF_CHUNK, " ")}
            epoch += 1


def _member(record: dict, name: str, where: str) -> bytes:
    if name.lower() not in record:
        raise BadSample(where, f"no member '{name}'")
    return record[name.lower()]


class InterleavedCollate:
    """Items -> {"tokens" (B, L), "images" (B, T_media, 3, H, W), "key"}; `text_only`: tokens of the items'
    text_only, no images (a language model's batch)."""

    def __init__(self, tokenizer, image_size: int, context_length: int, text_only: bool = False):
        self.tokenizer, self.image_size = tokenizer, image_size
        self.transform = image_transform(image_size, train=False)  # no augmentation: the vision encoder is frozen
        self.context_length, self.text_only = context_length, text_only
        self._ordinary = None  # the token ids induction rows draw from (induction_row)

    def __call__(self, items: list[dict]) -> dict:
        tokenizer = self.tokenizer
        rows, prompt_lengths = [], []
        for item in items:
            if "induction_seed" in item:
                ids, prompt_length = self.induction_row(item["induction_seed"])
            else:
                text = tokenizer.encode(item["text_only" if self.text_only else "text"])[: self.context_length - 2]
                ids, prompt_length = [tokenizer.bos_id, *text, tokenizer.eos_id], 0
            rows.append(ids)
            prompt_lengths.append(prompt_length)
        tokens = torch.full((len(rows), self.context_length), tokenizer.pad_id, dtype=torch.long)
        for row, ids in zip(tokens, rows):
            row[: len(ids)] = torch.tensor(ids)
        batch = {"tokens": tokens, "key": [item["key"] for item in items],
                 "bad": torch.tensor([item.get("bad", 0) for item in items]),
                 "seen": torch.tensor([item.get("seen", 1) for item in items]),
                 "bad_examples": [example for item in items for example in item.get("bad_examples", [])][:10]}
        if any(prompt_lengths):
            batch["prompt_lengths"] = torch.tensor(prompt_lengths)
        if self.text_only:
            return batch
        kept = (tokens == tokenizer.media_id).sum(dim=1).tolist()  # images whose <image> survived the cut
        images = torch.zeros(len(items), max(1, *kept), 3, self.image_size, self.image_size)
        for b, (item, count) in enumerate(zip(items, kept)):
            for t, image in enumerate(item["images"][:count]):
                images[b, t] = self.transform(image)
        batch["images"] = images
        return batch

    def induction_row(self, seed: int) -> tuple[list[int], int]:
        """A synthetic induction row (`lm.induction_fraction`): bos, a string of 10-40 ordinary tokens drawn
        uniformly, the same string again. Only an induction head (Olsson et al. 2022: find the earlier occurrence
        of the current token, copy the one after it) predicts the repeat, and nothing predicts the first string,
        so the loss starts at the repeat's second token: the row's prompt length."""
        tokenizer, rng = self.tokenizer, np.random.default_rng(seed)
        if self._ordinary is None:  # once per collate: a scan of the whole vocabulary
            special = {getattr(tokenizer, name, None) for name in ("pad_id", "bos_id", "eos_id", "unk_id", "media_id",
                                                                      "eoc_id", "dec_id", "enc_id")}
            self._ordinary = [i for i in range(tokenizer.vocab_size) if i not in special]
        ordinary = self._ordinary
        length = int(rng.integers(10, min(40, (self.context_length - 1) // 2) + 1))
        string = [ordinary[k] for k in rng.integers(len(ordinary), size=length)]
        return [tokenizer.bos_id, *string, *string], length + 2


def shapes_icl(argument: str, image_size: int, seed: int) -> ShapesICL:
    split, _, length = argument.partition(":")
    split = split or "train"
    if split not in SPLITS:
        raise ValueError(f"shapes_icl has splits {', '.join(SPLITS)}; got '{split}'")
    if length and not length.isdigit():
        raise ValueError(f"shapes_icl:{argument}: the length after the split must be a number of episodes")
    return ShapesICL(split, image_size, int(length) if length else None, seed)
