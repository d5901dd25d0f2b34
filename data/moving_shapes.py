"""`moving_shapes`: the built-in procedural clip dataset, `shapes` (data/shapes.py) set in motion.

Needs no files: every clip is a pure function of (seed, split, index); drawing one takes well under 2 ms on a CPU
core (data/shapes.py's render, once per frame). A clip is 9, 11, 13 or 15 frames (odd, so that evaluation's
uniform sampling picks the same frames from a clip and its time reversal, see data/video.py) of one to three
shapes of shapes' colours and outlines, all different shapes, on a plain background. Up to two of them each do
one thing, the first in the first half of the clip and the second in the second half:

    moves left / right / up / down    over its half (the whole clip for a single event)
    turns COLOUR                      changes colour at one frame
    appears / disappears              is absent before / after one frame

Captions name what happens in order, e.g. "a red circle moves left, then a blue square appears"; a clip where
nothing happens says what stays still. Every event's time reversal is another event (left <-> right,
up <-> down, turns blue from red <-> turns red from blue, appears <-> disappears), so a caption of a clip with
events is false of the reversed clip, whose frames are the same set: neither a single frame nor the frame average
can answer it. Vocabulary and captions stay small (28 words, at most 12 a caption) for a CPU demo.

Splits (position = split id in the random seed):
    train, val   clips without the held-out (shape, event) pairs below, 15% still, 45% one event, 40% two
    heldout      clips with at least one held-out pair (compositional generalisation over time)
    val_order    pairs: item 2i is a val-like clip with at least one event, item 2i + 1 exactly its frames
                 reversed with the reversed clip's caption; the frame mean of a pair is identical, so mean
                 pooling can at best find the pair and guess within it (50% text-to-video R@1)
Items carry a question and its answer about the clip (which way, what colour, appear or disappear, which shape
changes first), as shapes' items do.
"""
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from crossmodal.data.shapes import BACKGROUNDS, COLORS, NUMBER_WORDS, SHAPES, MAX_ANGLE, Scene, ShapeObject, render
from crossmodal.data.shapes import _join, _with_article
from crossmodal.data.video import sample_indices

SPLITS = ("train", "val", "heldout", "val_order")
DEFAULT_LENGTHS = {"train": 20_000, "val": 1_000, "heldout": 500, "val_order": 500}
FRAME_COUNTS = (9, 11, 13, 15)
SIZE = (0.22, 0.32)  # side of a shape's bounding square, fraction of the image side
DISTANCE = (0.3, 0.45)  # how far a shape moves, fraction of the image side

MOVES = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
VERBS = (*MOVES, "turns", "appears", "disappears")
REVERSED = {"left": "right", "right": "left", "up": "down", "down": "up", "turns": "turns",
            "appears": "disappears", "disappears": "appears"}
GROUPS = {"left": "horizontal", "right": "horizontal", "up": "vertical", "down": "vertical", "turns": "colour",
          "appears": "presence", "disappears": "presence"}  # each closed under reversal
# One event group held out per shape (each group for one or two shapes), never in train, val or val_order;
# "a red circle moves left" stays in training.
HELDOUT_PAIRS = {("circle", "vertical"), ("square", "presence"), ("triangle", "colour"), ("star", "horizontal"),
                 ("cross", "colour"), ("hexagon", "vertical")}
TWO_EVENT_TEMPLATES = ("{0}, then {1}", "first {0}, then {1}", "{0} and then {1}")


@dataclass(frozen=True)
class Actor:
    color: str  # at the clip's start
    shape: str
    size: float
    start: tuple[float, float]  # centre at the clip's start, fractions of the image side, y downwards
    angle: float


@dataclass(frozen=True)
class Event:
    actor: int  # index into Clip.actors
    verb: str  # one of VERBS
    first: int  # frames: a move runs from `first` to `last`; any other event happens at frame `first`
    last: int
    distance: float = 0.0  # a move's length
    color: str = ""  # turns: the new colour


@dataclass(frozen=True)
class Clip:
    background: str
    actors: tuple[Actor, ...]
    events: tuple[Event, ...]  # in time order, at most one per actor
    length: int  # frames
    template: int = 0  # which of TWO_EVENT_TEMPLATES


def frame_scene(clip: Clip, t: int) -> Scene:
    """The shapes visible at frame t, where and in which colour."""
    objects = []
    for k, actor in enumerate(clip.actors):
        (x, y), color, visible = actor.start, actor.color, True
        for event in clip.events:
            if event.actor != k:
                continue
            if event.verb in MOVES:
                progress = min(max((t - event.first) / (event.last - event.first), 0.0), 1.0)
                dx, dy = MOVES[event.verb]
                x, y = x + dx * event.distance * progress, y + dy * event.distance * progress
            elif event.verb == "turns":
                color = event.color if t >= event.first else color
            else:
                visible = (t >= event.first) == (event.verb == "appears")
        if visible:
            objects.append(ShapeObject(color, actor.shape, actor.size, (x, y), actor.angle))
    return Scene(clip.background, tuple(objects))


def render_clip(clip: Clip, image_size: int, indices: list[int] | None = None) -> list[Image.Image]:
    """Frames `indices` (all by default) of the clip, PIL RGB."""
    return [render(frame_scene(clip, t), image_size) for t in (range(clip.length) if indices is None else indices)]


def reverse(clip: Clip) -> Clip:
    """The clip played backwards: frame t of the result is frame length - 1 - t of `clip`."""
    last = clip.length - 1
    actors, events = list(clip.actors), []
    for event in reversed(clip.events):
        actor = actors[event.actor]
        if event.verb in MOVES:
            dx, dy = MOVES[event.verb]
            end = (actor.start[0] + dx * event.distance, actor.start[1] + dy * event.distance)
            actors[event.actor] = replace(actor, start=end)
            events.append(replace(event, verb=REVERSED[event.verb], first=last - event.last, last=last - event.first))
        elif event.verb == "turns":  # new colour from frame f on -> the new colour until frame length - f
            actors[event.actor] = replace(actor, color=event.color)
            events.append(replace(event, color=actor.color, first=clip.length - event.first,
                                  last=clip.length - event.first))
        else:  # visible from f on <-> visible before length - f
            events.append(replace(event, verb=REVERSED[event.verb], first=clip.length - event.first,
                                  last=clip.length - event.first))
    return replace(clip, actors=tuple(actors), events=tuple(events))


def _name(actor: Actor) -> str:
    return _with_article(f"{actor.color} {actor.shape}")


def event_phrase(clip: Clip, event: Event) -> str:
    actor = clip.actors[event.actor]
    if event.verb in MOVES:
        return f"{_name(actor)} moves {event.verb}"
    if event.verb == "turns":
        return f"{_name(actor)} turns {event.color}"
    return f"{_name(actor)} {event.verb}"


def caption(clip: Clip) -> str:
    if not clip.events:
        names = [_name(actor) for actor in clip.actors]
        return f"{_join(names)} {'stays' if len(names) == 1 else 'stay'} still"
    phrases = [event_phrase(clip, event) for event in clip.events]
    return phrases[0] if len(phrases) == 1 else TWO_EVENT_TEMPLATES[clip.template].format(*phrases)


def questions(clip: Clip) -> list[tuple[str, str]]:
    """Every question the clip answers, with its one-word answer: one per event, which shape changes first (two
    events), or for a still clip how many shapes there are and each one's colour."""
    options = []
    for event in clip.events:
        shape = clip.actors[event.actor].shape
        if event.verb in MOVES:
            options.append((f"which way does the {shape} move?", event.verb))
        elif event.verb == "turns":
            options.append((f"what colour does the {shape} turn?", event.color))
        else:
            options.append((f"does the {shape} appear or disappear?", event.verb.removesuffix("s")))
    if len(clip.events) == 2:
        options.append(("which shape changes first?", clip.actors[clip.events[0].actor].shape))
    if not options:
        options = [("how many shapes are there?", NUMBER_WORDS[len(clip.actors)]),
                   *((f"what colour is the {actor.shape}?", actor.color) for actor in clip.actors)]
    return options


def _event(rng: np.random.Generator, actor: int, verb: str, first: int, last: int, color: str) -> Event:
    """An event of the frames [first, last]: a move spans them, anything else happens inside."""
    if verb in MOVES:
        return Event(actor, verb, first, last, distance=float(rng.uniform(*DISTANCE)))
    at = int(rng.integers(first + 1, last + 1))  # at least one frame before it shows the old state
    if verb == "turns":
        return Event(actor, verb, at, at, color=[c for c in COLORS if c != color][rng.integers(len(COLORS) - 1)])
    return Event(actor, verb, at, at)


def _start(rng: np.random.Generator, size: float, events: list[Event]) -> tuple[float, float]:
    """A start position from which every move of the shape stays inside the image."""
    low, high = np.full(2, size / 2), np.full(2, 1 - size / 2)
    for event in events:
        if event.verb in MOVES:
            step = np.array(MOVES[event.verb]) * event.distance
            low, high = np.maximum(low, low - step), np.minimum(high, high - step)
    x, y = rng.uniform(low, high)
    return float(x), float(y)


def sample_clip(rng: np.random.Generator, events: int | None = None, heldout: bool = False) -> Clip:
    """A clip of one to three shapes and `events` events (None: 0, 1 or 2 at 15/45/40%), with (heldout) at least one
    or (otherwise) none of the HELDOUT_PAIRS."""
    length = int(FRAME_COUNTS[rng.integers(len(FRAME_COUNTS))])
    if events is None:
        u = rng.random()
        events = 0 if u < 0.15 else 1 if u < 0.6 else 2
    events = max(events, 1) if heldout else events  # a still clip holds no pair
    count = int(rng.integers(max(events, 1), 4))
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:count]]
    colors = [list(COLORS)[i] for i in rng.integers(len(COLORS), size=count)]
    while True:  # rejection: a few tries at most (heldout: about one event in six is a held-out pair)
        verbs = [VERBS[i] for i in rng.integers(len(VERBS), size=events)]
        pairs = [(shapes[k], GROUPS[verb]) in HELDOUT_PAIRS for k, verb in enumerate(verbs)]
        if (any(pairs) if heldout else not any(pairs)):
            break
    middle = length // 2
    windows = [(0, length - 1)] if events == 1 else [(0, middle - 1), (middle + 1, length - 1)]
    # the event shapes are the first `events` shapes; their order in time is drawn too
    order = rng.permutation(events)
    event_list = [_event(rng, int(k), verbs[k], *windows[slot], colors[k]) for slot, k in enumerate(order)]
    actors = []
    for k in range(count):
        size = float(rng.uniform(*SIZE))
        start = _start(rng, size, [event for event in event_list if event.actor == k])
        actors.append(Actor(colors[k], shapes[k], size, start, float(rng.uniform(-MAX_ANGLE, MAX_ANGLE))))
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    template = int(rng.integers(len(TWO_EVENT_TEMPLATES)))
    return Clip(background, tuple(actors), tuple(event_list), length, template)


class MovingShapesDataset(torch.utils.data.Dataset):
    """Items: dict(frames=list of PIL RGB (every frame of the clip), caption, question, answer, label=-1, key).

    `item(index, frames, offsets)` draws only the frames that uniform sampling picks (data/video.py)."""

    def __init__(self, split: str = "train", image_size: int = 64, length: int | None = None, seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"moving_shapes dataset has splits {', '.join(SPLITS)}; got '{split}'")
        self.split, self.image_size, self.seed = split, image_size, seed
        self.length = DEFAULT_LENGTHS[split] if length is None else length
        if split == "val_order" and self.length % 2:
            raise ValueError(f"moving_shapes:val_order holds pairs (a clip and its reversal): its length must be "
                             f"even, got {self.length}")

    def __len__(self) -> int:
        return self.length

    def describe(self, index: int) -> Clip:
        """Clip `index` (what happens in it), without drawing it."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for moving_shapes:{self.split} of length {self.length}")
        if self.split == "val_order":
            pair = np.random.default_rng([self.seed, SPLITS.index(self.split), index // 2])
            clip = sample_clip(pair, events=1 + int(pair.integers(2)))
            return reverse(clip) if index % 2 else clip
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        return sample_clip(rng, heldout=self.split == "heldout")

    def texts(self, index: int) -> dict:
        """Caption, question and answer of clip `index`, without drawing it. val_order asks both clips of a pair
        the same question, so only the answer changes."""
        clip = self.describe(index)
        first = index - index % 2 if self.split == "val_order" else index
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), first, 1])
        options = questions(self.describe(first) if first != index else clip)
        asked = options[rng.integers(len(options))][0]
        return {"caption": caption(clip), "question": asked, "answer": dict(questions(clip))[asked]}

    def item(self, index: int, frames: int = 0, offsets: np.ndarray | None = None) -> dict:
        """Clip `index` with `frames` frames sampled uniformly (data/video.py's sample_indices), all with 0."""
        clip = self.describe(index)
        picked = sample_indices(clip.length, frames, offsets) if frames else None
        if self.split == "val_order" and index % 2:  # exactly the first clip's frames, reversed
            reversed_frames = self.item(index - 1)["frames"][::-1]
            drawn = reversed_frames if picked is None else [reversed_frames[i] for i in picked]
        else:
            drawn = render_clip(clip, self.image_size, picked)
        return {"frames": drawn, **self.texts(index), "label": -1, "key": f"moving_shapes/{self.split}/{self.seed}/{index}"}

    def __getitem__(self, index: int) -> dict:
        return self.item(index)
