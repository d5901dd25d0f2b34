"""`shapes`: the built-in procedural dataset of coloured shapes with captions, labels and questions.

Needs no files: every item is a pure function of (seed, split, index), so any process can generate
any sample; an item (64x64 image, caption, question) takes ~50 us on one CPU core.

Each image shows one to three shapes on a plain background. The first (main) shape is the largest
(48-65% of the image side against 15-27% for the others, enough to stay the largest by area whatever
the two outlines); the others are placed where they overlap it least. Shapes in one image are all
different, so "the circle" always names one object.

Classes are the 36 (colour, shape) pairs; `label` is the class of the main shape. Six pairs, one per
colour and one per shape (the diagonal of the colour x shape square shifted by one, so that the
textbook "red circle" stays in training), are held out: they never appear in `train` or `val`
images, captions or questions. The `heldout` split draws its main shape from them (its other shapes
are seen pairs), so zero-shot accuracy on `heldout` measures compositional generalisation.
"""
import math
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (245, 205, 30),
    "purple": (150, 60, 200),
    "orange": (250, 135, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon")
BACKGROUNDS = {"white": (255, 255, 255), "grey": (190, 190, 190), "black": (20, 20, 20)}

CLASSNAMES = [f"{color} {shape}" for color in COLORS for shape in SHAPES]  # index = color * 6 + shape
HELDOUT_CLASSNAMES = [f"{color} {SHAPES[(i + 1) % len(SHAPES)]}" for i, color in enumerate(COLORS)]
HELDOUT_CLASSES = [CLASSNAMES.index(name) for name in HELDOUT_CLASSNAMES]
SEEN_CLASSES = [c for c in range(len(CLASSNAMES)) if c not in HELDOUT_CLASSES]

SPLITS = ("train", "val", "heldout")  # position = split id in the random seed
DEFAULT_LENGTHS = {"train": 100_000, "val": 2_000, "heldout": 2_000}

MAIN_SIZE = (0.48, 0.65)  # side of the shape's bounding square, as a fraction of the image side
DISTRACTOR_SIZE = (0.15, 0.27)
SMALL_SIZE = 0.21  # distractors below this are "tiny", above "small"
MAX_ANGLE = 15.0  # degrees of random rotation
PLACEMENT_TRIES = 16  # candidate positions per distractor; the least overlapping one wins


def _regular_polygon(corners: int, radius: float, phase: float) -> list[tuple[float, float]]:
    angles = [phase + 2 * math.pi * k / corners for k in range(corners)]
    return [(radius * math.cos(a), radius * math.sin(a)) for a in angles]


def _star(points: int = 5, outer: float = 0.5, inner: float = 0.25) -> list[tuple[float, float]]:
    angles = [-math.pi / 2 + math.pi * k / points for k in range(2 * points)]
    radii = [(outer, inner)[k % 2] for k in range(2 * points)]
    return [(r * math.cos(a), r * math.sin(a)) for r, a in zip(radii, angles)]


def _cross(half_width: float = 0.18) -> list[tuple[float, float]]:
    a, b = half_width, 0.5
    return [
        (-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)
    ]


# Outlines centred on 0 in units of the shape's size; the circle is drawn as an ellipse. Fat star and
# cross keep every shape's area within a factor 2.2 of the others, so size alone decides the largest.
OUTLINES = {
    "square": _regular_polygon(4, 0.42 * math.sqrt(2), math.pi / 4),
    "triangle": [(0.0, -0.55), (0.5, 0.38), (-0.5, 0.38)],
    "star": _star(),
    "cross": _cross(),
    "hexagon": _regular_polygon(6, 0.5, 0.0),
}


def _polygon_area(points: list[tuple[float, float]]) -> float:
    return 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1])))


SHAPE_AREA = {"circle": math.pi / 4, **{shape: _polygon_area(points) for shape, points in OUTLINES.items()}}

POSITION_PHRASES = {
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right",
}
NUMBER_WORDS = ("zero", "one", "two", "three")

# Fields: all (every object, main first), main / others (with article and optional size word),
# main_name ("red circle"), position (of the main shape), background, count ("two shapes").
CAPTION_TEMPLATES = (
    "{all}",
    "a photo of {all}.",
    "a picture of {all} on a {background} background.",
    "{all} on a {background} background",
    "there is {main} {position}.",
    "{main} {position}",
    "an image with {count}: {all}.",
    "a simple drawing of {all}.",
    "a {background} image showing {all}.",
    "a photo of the {main_name} {position}.",
)
MULTI_OBJECT_TEMPLATES = (
    "{main} next to {others}.",
    "the largest shape is the {main_name}, next to {others}.",
    "{main} {position}, with {others}.",
)


@dataclass(frozen=True)
class ShapeObject:
    color: str
    shape: str
    size: float  # side of the bounding square, fraction of the image side
    center: tuple[float, float]  # (x, y), fractions of the image side, y downwards
    angle: float  # degrees

    @property
    def classname(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def area(self) -> float:
        """Drawn area as a fraction of the image (before any overlap)."""
        return self.size**2 * SHAPE_AREA[self.shape]

    @property
    def position(self) -> str:
        x, y = self.center
        vertical = "top" if y < 0.4 else "bottom" if y > 0.6 else ""
        horizontal = "left" if x < 0.4 else "right" if x > 0.6 else ""
        return f"{vertical} {horizontal}".strip() or "center"


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[ShapeObject, ...]  # main shape first, drawn first


def render(scene: Scene, image_size: int) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        size = obj.size * image_size
        cx, cy = obj.center[0] * image_size, obj.center[1] * image_size
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2), fill=fill)
            continue
        cos, sin = math.cos(math.radians(obj.angle)), math.sin(math.radians(obj.angle))
        points = [(x * cos - y * sin, x * sin + y * cos) for x, y in OUTLINES[obj.shape]]  # rotated
        draw.polygon([(cx + size * x, cy + size * y) for x, y in points], fill=fill)
    return image


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _split_class(index: int) -> tuple[str, str]:
    return tuple(CLASSNAMES[index].split(" "))


def _sample_scene(rng: np.random.Generator, main_classes: list[int], num_objects: int = 0,
                  fits: Callable[[int, list[ShapeObject]], bool] | None = None) -> Scene:
    """A scene of `num_objects` shapes (0: one to three at random); `fits(class, objects)` further limits the classes
    of the shapes after the main one (data/binding.py)."""
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    if not num_objects:
        u = rng.random()
        num_objects = 1 if u < 0.4 else 2 if u < 0.75 else 3

    color, shape = _split_class(main_classes[rng.integers(len(main_classes))])
    size = float(rng.uniform(*MAIN_SIZE))
    center = rng.uniform(size / 2, 1 - size / 2, size=2)
    angle = float(rng.uniform(-MAX_ANGLE, MAX_ANGLE))
    objects = [ShapeObject(color, shape, size, (float(center[0]), float(center[1])), angle)]

    for _ in range(num_objects - 1):
        used = {obj.shape for obj in objects}
        choices = [c for c in SEEN_CLASSES if _split_class(c)[1] not in used and (fits is None or fits(c, objects))]
        if not choices:
            break
        color, shape = _split_class(choices[rng.integers(len(choices))])
        size = float(rng.uniform(*DISTRACTOR_SIZE))
        candidates = rng.uniform(size / 2, 1 - size / 2, size=(PLACEMENT_TRIES, 2))
        # Overlap cost: bounding-box intersection as a fraction of the smaller box, summed over placed shapes.
        cost = np.zeros(PLACEMENT_TRIES)
        for obj in objects:
            reach = (size + obj.size) / 2
            overlap = np.clip(reach - np.abs(candidates - np.array(obj.center)), 0, min(size, obj.size))
            cost += overlap.prod(axis=1) / min(size, obj.size) ** 2
        x, y = candidates[int(np.argmin(cost))]
        angle = float(rng.uniform(-MAX_ANGLE, MAX_ANGLE))
        objects.append(ShapeObject(color, shape, size, (float(x), float(y)), angle))
    return Scene(background, tuple(objects))


def _caption(scene: Scene, rng: np.random.Generator) -> str:
    phrases = []
    for k, obj in enumerate(scene.objects):
        words = [obj.color, obj.shape]
        if rng.random() < 0.5:  # size word
            if k == 0:
                words.insert(0, ("large", "big")[rng.integers(2)])
            else:
                words.insert(0, "small" if obj.size > SMALL_SIZE else "tiny")
        phrases.append(_with_article(" ".join(words)))
    templates = CAPTION_TEMPLATES + (MULTI_OBJECT_TEMPLATES if len(phrases) > 1 else ())
    main = scene.objects[0]
    count = len(phrases)
    return templates[rng.integers(len(templates))].format(
        all=_join(phrases),
        main=phrases[0],
        others=_join(phrases[1:]) if count > 1 else "",
        main_name=main.classname,
        position=POSITION_PHRASES[main.position],
        background=scene.background,
        count=f"{NUMBER_WORDS[count]} shape" + ("s" if count > 1 else ""),
    )


def _question(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    objects = scene.objects
    obj = objects[rng.integers(len(objects))]
    kind = rng.integers(6)
    if kind == 0:
        return f"what colour is the {obj.shape}?", obj.color
    if kind == 1:
        if sum(other.color == obj.color for other in objects) == 1:
            return f"what shape is the {obj.color} object?", obj.shape
        return "what shape is the largest object?", objects[0].shape
    if kind == 2:
        return "how many shapes are there?", NUMBER_WORDS[len(objects)]
    if kind == 3:
        present = {o.classname for o in objects}
        if rng.random() < 0.5:
            return f"is there {_with_article(obj.classname)}?", "yes"
        absent = [CLASSNAMES[c] for c in SEEN_CLASSES if CLASSNAMES[c] not in present]
        return f"is there {_with_article(absent[rng.integers(len(absent))])}?", "no"
    if kind == 4:
        return f"where is the {obj.classname}?", obj.position
    return "what colour is the background?", scene.background


SIZE_WORDS = ("large", "big", "small", "tiny")
EXCHANGES = ("colour", "shape", "size", "position")  # what exchange() swaps between two objects of a caption


def _size_word(obj: ShapeObject, k: int) -> str:
    return "large" if k == 0 else "small" if obj.size > SMALL_SIZE else "tiny"


def exchange(caption: str, scene: Scene, kind: str, a: int, b: int) -> str | None:
    """`caption` of `scene` with an attribute of objects a and b exchanged (the same words bound the other way
    round), or None where that says nothing false or is not in the caption:
    colour / shape: object a (named in the caption) takes b's colour / shape and b, where named, a's; a and b must
    differ in colour, since shapes in one scene are all different;
    size: the size words of a and b exchanged, one of them the largest object (0) and a named with its size word;
    position: the largest object (a = 0) said to be at b's position, where the caption says its position and b's
    has another name."""
    objects = scene.objects
    first, second = objects[a], objects[b]
    if kind == "position":
        here, there = POSITION_PHRASES[first.position], POSITION_PHRASES[second.position]
        if a != 0 or here == there or here not in caption:
            return None
        return caption.replace(here, there)
    if kind in ("colour", "shape") and first.color == second.color or kind == "size" and 0 not in (a, b):
        return None
    pattern = r"\b(?:(an?) )?(?:(large|big|small|tiny) )?({}) ({})\b"  # the article too: "an orange" -> "a red"
    spans = {}  # object -> (match of its phrase)
    for k in (a, b):
        match = re.search(pattern.format(objects[k].color, objects[k].shape), caption)
        if match:
            spans[k] = match
    if a not in spans or kind == "size" and not spans[a].group(2):
        return None
    words = {k: [spans[k].group(2) if k in spans and spans[k].group(2) else _size_word(objects[k], k),
                 objects[k].color, objects[k].shape] for k in (a, b)}
    slot = {"size": 0, "colour": 1, "shape": 2}[kind]
    words[a][slot], words[b][slot] = words[b][slot], words[a][slot]
    out, end = [], 0
    for k, match in sorted(spans.items(), key=lambda item: item[1].start()):
        phrase = " ".join(filter(None, [words[k][0] if match.group(2) else None, *words[k][1:]]))
        out += [caption[end : match.start()], _with_article(phrase) if match.group(1) else phrase]
        end = match.end()
    return "".join(out) + caption[end:]


def binding_negative(scene: Scene, caption: str, rng: np.random.Generator) -> str:
    """One of the exchanges (see exchange()) of the caption's objects, drawn uniformly; "" where there is none
    (a one-object scene). Training's attribute-swapped hard negatives (NegCLIP, ARO)."""
    options = [(kind, a, b) for kind in EXCHANGES for a in range(len(scene.objects))
               for b in range(len(scene.objects)) if a != b]
    texts = [text for text in (exchange(caption, scene, *option) for option in options) if text and text != caption]
    return texts[rng.integers(len(texts))] if texts else ""


class ShapesDataset(torch.utils.data.Dataset):
    """Items: dict(image=PIL RGB, caption, label (class of the main shape), question, answer, key)."""

    def __init__(self, split: str = "train", image_size: int = 64, length: int | None = None, seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"shapes dataset has splits {', '.join(SPLITS)}; got '{split}'")
        self.split, self.image_size, self.seed = split, image_size, seed
        self.length = DEFAULT_LENGTHS[split] if length is None else length
        self.classnames = list(CLASSNAMES)
        self.seen_classes = list(SEEN_CLASSES)
        self.heldout_classes = list(HELDOUT_CLASSES)
        self._main_classes = self.heldout_classes if split == "heldout" else self.seen_classes

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for shapes:{self.split} of length {self.length}")
        return np.random.default_rng([self.seed, SPLITS.index(self.split), index])

    def describe(self, index: int) -> Scene:
        """The objects of image `index` (main first) without drawing it."""
        return _sample_scene(self._rng(index), self._main_classes)

    def negative_caption(self, index: int) -> str:
        """Item `index`'s caption with two of its objects' attributes exchanged (binding_negative; "" for one
        object), drawn from its own stream so that the items stay what they are without it."""
        rng = self._rng(index)
        scene = _sample_scene(rng, self._main_classes)
        caption = _caption(scene, rng)
        return binding_negative(scene, caption, np.random.default_rng([self.seed, SPLITS.index(self.split), index, 1]))

    def __getitem__(self, index: int) -> dict:
        rng = self._rng(index)
        scene = _sample_scene(rng, self._main_classes)
        caption = _caption(scene, rng)
        question, answer = _question(scene, rng)
        return {
            "image": render(scene, self.image_size),
            "caption": caption,
            "label": CLASSNAMES.index(scene.objects[0].classname),
            "question": question,
            "answer": answer,
            "key": f"shapes/{self.split}/{self.seed}/{index}",
        }
