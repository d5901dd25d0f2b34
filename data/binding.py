"""`shapes:binding`: can a model tell which attribute belongs to which object?

The attribute-binding probes of ARO (Yuksekgonul et al., ICLR 2023) and Winoground ask a model to pick an image's
caption over the same words bound the other way round ("a red circle and a blue square" against "a blue circle
and a red square"). A dot product of two pooled vectors largely cannot tell them apart; a cross-attention scorer
(BLIP's ITM) can. This split poses that question on the `shapes` world.

Every image shows two or three shapes of distinct colours and shapes, the first the largest; every pair the
captions below can form is a seen (colour, shape) pair, so a caption is never given away by a held-out pair. Each
image has candidate sets, each its true caption first and negatives that use exactly the same words:
- `colour`: the colours of two objects exchanged ("a large blue circle and a small red square");
- `shape`: the shapes of two objects exchanged ("a large red square and a small blue circle");
- `size`: the size words of the largest object and another exchanged ("a small red circle and a large blue
  square");
- `position`: "{largest} {its position}, with {the others}." against the largest shape placed where another one is
  ("a large red circle on the right, with a small blue square." when the square is the one on the right); only
  where the two positions have different names.
With three objects each kind has one negative per pair it exchanges (the position and size kinds: the largest
shape with each other). Captions are built from the training captions' own templates and words. Everything is a
pure function of (seed, index), like the other shapes splits.
"""
import itertools

import numpy as np
import torch

from crossmodal.data.shapes import (CLASSNAMES, HELDOUT_CLASSNAMES, POSITION_PHRASES, SEEN_CLASSES, SMALL_SIZE, SPLITS,
                                    Scene, ShapeObject, _join, _sample_scene, _split_class, _with_article, exchange,
                                    render)

KINDS = ("colour", "shape", "size", "position")
DEFAULT_LENGTH = 1_000
SPLIT_ID = len(SPLITS)  # the random seed's split slot, after the shapes splits
TEMPLATES = ("{all}", "a photo of {all}.", "a picture of {all} on a {background} background.",
             "a simple drawing of {all}.", "an image with {count}: {all}.", "{main} next to {others}.")
POSITION_TEMPLATE = "{main} {position}, with {others}."
NUMBER_WORDS = {2: "two shapes", 3: "three shapes"}


def _seen(color: str, shape: str) -> bool:
    return f"{color} {shape}" not in HELDOUT_CLASSNAMES


def _fits(candidate: int, objects: list[ShapeObject]) -> bool:
    """A new object of class `candidate` has a colour no other has, and exchanging its colour (equally: its shape)
    with any of `objects` gives seen pairs."""
    color, shape = _split_class(candidate)
    return all(color != obj.color and _seen(color, obj.shape) and _seen(obj.color, shape) for obj in objects)


class BindingDataset(torch.utils.data.Dataset):
    """Items: dict(image=PIL RGB, caption (the true caption of the first set), sets=[(kind, [true, negatives...])],
    label (class of the largest shape), key)."""

    def __init__(self, image_size: int = 64, length: int | None = None, seed: int = 0):
        self.image_size, self.seed = image_size, seed
        self.length = DEFAULT_LENGTH if length is None else length

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> tuple[Scene, np.random.Generator]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for shapes:binding of length {self.length}")
        rng = np.random.default_rng([self.seed, SPLIT_ID, index])
        scene = _sample_scene(rng, SEEN_CLASSES, num_objects=2 + int(rng.integers(2)), fits=_fits)
        return scene, rng

    def candidate_sets(self, index: int) -> list[tuple[str, list[str]]]:
        """[(kind, [true caption, negatives...])] of image `index`, in KINDS order (see the module docstring)."""
        scene, rng = self.scene(index)
        return candidate_sets(scene, rng)

    def __getitem__(self, index: int) -> dict:
        scene, rng = self.scene(index)
        sets = candidate_sets(scene, rng)
        return {"image": render(scene, self.image_size), "caption": sets[0][1][0], "sets": sets,
                "label": CLASSNAMES.index(scene.objects[0].classname), "key": f"shapes/binding/{self.seed}/{index}"}


def candidate_sets(scene: Scene, rng: np.random.Generator) -> list[tuple[str, list[str]]]:
    objects = scene.objects
    sizes = [("large", "big")[rng.integers(2)]] + ["small" if obj.size > SMALL_SIZE else "tiny" for obj in objects[1:]]
    phrases = [_with_article(f"{size} {obj.color} {obj.shape}") for size, obj in zip(sizes, objects)]
    fields = dict(all=_join(phrases), main=phrases[0], others=_join(phrases[1:]), background=scene.background,
                  count=NUMBER_WORDS[len(objects)], position=POSITION_PHRASES[objects[0].position])
    true = TEMPLATES[rng.integers(len(TEMPLATES))].format(**fields)
    pairs = list(itertools.combinations(range(len(objects)), 2))
    sets = [("colour", [true] + [exchange(true, scene, "colour", a, b) for a, b in pairs]),
            ("shape", [true] + [exchange(true, scene, "shape", a, b) for a, b in pairs]),
            ("size", [true] + [exchange(true, scene, "size", 0, b) for b in range(1, len(objects))])]
    placed = POSITION_TEMPLATE.format(**fields)
    moved = [exchange(placed, scene, "position", 0, b) for b in range(1, len(objects))]
    moved = list(dict.fromkeys(text for text in moved if text))  # two objects may share a position's name
    if moved:
        sets.append(("position", [placed] + moved))
    return sets
