"""What counts as a bad sample, how one is read safely, and the running count train.py keeps.

A bad sample is one that cannot become an (image, caption) pair: a missing, empty, truncated or
corrupt image file, an empty or undecodable caption, an unreadable tar shard, a malformed index row.
Loaders raise `BadSample` for it; the training loaders skip it, count it, and carry the count in the
batch (`bad`, `bad_examples`), so train.py can log it and stop when there are too many.

When to stop: `too_many(bad, seen, max_fraction)` is true once more than `max_fraction` of the samples
seen so far were bad AND at least `MIN_BAD_TO_STOP` were. The second condition keeps one stray broken
file in a small or young run (1 bad out of the first 20 samples is 5%) from stopping it; a dataset
that is really broken crosses both long before the first epoch ends. A fraction that is not a number
(`nan`) stops rather than switching the check off. Evaluation applies the same rule to the captions and
queries that unreadable images affect (`BadSampleCount.check`).
"""
import io
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from PIL import Image

from crossmodal.config import BadInput

MIN_BAD_TO_STOP = 10
MAX_EXAMPLES = 5  # example locations kept for messages


class BadSample(Exception):
    """One unusable sample; `where` names it (a path, `file.csv line 12`, `shard.tar:key`)."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


def open_image(source: str | bytes, where: str, draft_size: int = 0) -> Image.Image:
    """A fully decoded RGB image from a path or encoded bytes; raises BadSample if it cannot be read.

    draft_size > 0 lets JPEG decode at a reduced scale (1/2, 1/4 or 1/8, libjpeg's DCT scaling) as long
    as both sides stay >= draft_size; other formats ignore it. A reduced decode records the full size in
    `image.info["full_size"]`, where the training crop (data/transforms.py) draws its box.
    """
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        if draft_size:
            full_size = image.size
            image.draft("RGB", (draft_size, draft_size))
            if image.size != full_size:
                image.info["full_size"] = full_size
        image.load()  # decode now: a truncated file fails here, not later in a transform
        return image if image.mode == "RGB" else image.convert("RGB")
    except FileNotFoundError:
        raise BadSample(where, "missing file") from None
    except Exception as error:  # a corrupt file makes PIL raise almost anything (OSError, struct.error, ...)
        raise BadSample(where, f"cannot decode image ({type(error).__name__}: {error})") from None


def clean_caption(text: str | bytes, where: str) -> str:
    """The caption stripped of surrounding whitespace; raises BadSample if it is empty or not UTF-8."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise BadSample(where, "caption is not UTF-8") from None
    elif any("\udc80" <= char <= "\udcff" for char in text):  # bytes that were not UTF-8 (surrogateescape)
        raise BadSample(where, "caption is not UTF-8")
    text = text.strip()
    if not text:
        raise BadSample(where, "empty caption")
    return text


def too_many(bad: int, seen: int, max_fraction: float) -> bool:
    return bad >= MIN_BAD_TO_STOP and not bad <= max_fraction * seen  # (a nan fraction stops)


@dataclass
class BadSampleCount:
    """Bad samples among the samples seen (bad ones included), with the first few examples."""

    bad: int = 0
    seen: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, bad: int, seen: int, examples: list[str] = ()) -> None:
        self.bad, self.seen = self.bad + bad, self.seen + seen
        self.examples.extend(examples[: MAX_EXAMPLES - len(self.examples)])

    def add_batch(self, batch: dict) -> None:
        self.add(int(batch["bad"].sum()), int(batch["seen"].sum()), batch["bad_examples"])

    @property
    def fraction(self) -> float:
        return self.bad / max(self.seen, 1)

    def too_many(self, max_fraction: float) -> bool:
        return too_many(self.bad, self.seen, max_fraction)

    def check(self, max_fraction: float, where: str, what: str = "samples", state: str = "bad") -> None:
        """Raise BadInput naming `where` once too_many(max_fraction) (data.max_bad_fraction)."""
        if self.too_many(max_fraction):
            raise BadInput(f"{where}: {self.describe(what, state)}; more than data.max_bad_fraction={max_fraction} "
                           f"(fix or remove them, or raise it)")

    def summed_over_ranks(self) -> "BadSampleCount":
        """The count over all processes (a collective: every rank must call it); examples rank 0's first."""
        if not (dist.is_available() and dist.is_initialized()):
            return BadSampleCount(self.bad, self.seen, list(self.examples))
        counts = torch.tensor([self.bad, self.seen], dtype=torch.float64)
        dist.all_reduce(counts)
        total = BadSampleCount(int(counts[0]), int(counts[1]))
        if total.bad:  # only then are the examples worth a gather
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.examples)
            for examples in gathered:
                total.add(0, 0, examples)
        return total

    def describe(self, what: str = "samples", state: str = "bad") -> str:
        """'3 of 1,600 samples bad (0.19%), e.g. a.jpg: missing file; ...'."""
        text = f"{self.bad:,} of {self.seen:,} {what} {state} ({100 * self.fraction:.2f}%)"
        return text + (f", e.g. {'; '.join(self.examples)}" if self.examples else "")
