"""Clips as data: decoding video files with PyAV, uniform frame sampling, and the `video_csv` and `msrvtt` specs.

A clip becomes N frames sampled uniformly (TSN's segment sampling, Wang et al., 2016, as CLIP4Clip uses it): the
clip's n frames are cut into N equal segments, segment k spanning frames [k n / N, (k + 1) n / N), and one frame is
taken from each, floor((k + u_k) n / N). Evaluation takes each segment's middle (u_k = 0.5); training a random
offset u_k in [0, 1), drawn from (seed, epoch, index) so that a resumed run sees the same frames. With n < N a
frame repeats. For an odd n the middles are symmetric under time reversal (the reversed clip's frames are the
same set), which moving_shapes' val_order relies on; for an even n a middle can fall between two frames.

Decoding goes through PyAV (the optional `video` extra: its wheel carries FFmpeg's libraries, so no `ffmpeg`
program is needed), in the data workers. A clip is decoded from its start; only the sampled frames become
images. A missing, empty, truncated or corrupt file raises `BadSample`, which the loaders skip and count like a
bad image.

Specs (data/__init__.py registers them):
    video_csv:FILE        the `csv:` convention (data/csv_pairs.py reads it): a header, `filepath` and `caption`
                          columns (data.csv_image_key, data.csv_caption_key, data.csv_separator), paths relative to
                          data.image_root or the CSV's folder; rows naming one file are several captions of one clip
    msrvtt:FILE[#SPLIT]   MSR-VTT's train_val_videodata.json: `videos` (video_id, split) and `sentences`
                          (video_id, caption); clip `<video_id>.mp4` in data.image_root or the JSON's folder;
                          #SPLIT (e.g. #validate, #train+validate) keeps that split's videos
"""
import json
import os

import numpy as np
from PIL import Image

from crossmodal.config import BadInput
from crossmodal.data.bad_samples import BadSample, BadSampleCount, clean_caption
from crossmodal.data.csv_pairs import load_csv
from crossmodal.data.image_files import ImageFiles

DEFAULT_FRAMES = 8  # frames per item where no loader asked for a number (build_dataset, config checks)
NO_PYAV = "decoding video needs PyAV: pip install 'crossmodal[video]' (or pip install av)"


def require_av():
    """The `av` module, or BadInput naming the `video` extra."""
    try:
        import av
    except ImportError:
        raise BadInput(NO_PYAV) from None
    return av


def has_av() -> bool:
    try:
        require_av()
        return True
    except BadInput:
        return False


def sample_indices(count: int, frames: int, offsets: np.ndarray | None = None) -> list[int]:
    """Indices of `frames` frames sampled uniformly from a clip of `count`: one per equal segment, at
    floor((k + offsets[k]) * count / frames); offsets None: each segment's middle (0.5)."""
    if count <= 0 or frames <= 0:
        raise ValueError(f"cannot sample {frames} frames from a clip of {count}")
    offsets = np.full(frames, 0.5) if offsets is None else np.asarray(offsets, dtype=np.float64)
    positions = (np.arange(frames) + offsets) * count / frames
    return np.minimum(np.floor(positions).astype(np.int64), count - 1).tolist()


def training_offsets(seed: int, epoch: int, index: int, frames: int) -> np.ndarray:
    """A training sample's random offset inside each of its `frames` segments, from (seed, epoch, index) alone."""
    return np.random.default_rng([seed, epoch, index, 0x51DE0]).random(frames)


def _to_image(frame, short_side: int) -> Image.Image:
    """A decoded PyAV frame as PIL RGB; short_side > 0 scales it down (bicubic) so its shorter side is that."""
    width, height = frame.width, frame.height
    if short_side and min(width, height) > short_side:
        scale = short_side / min(width, height)
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
        return frame.to_image(width=width, height=height, interpolation="BICUBIC")
    return frame.to_image()


def _open(path: str, where: str):
    av = require_av()  # outside the try: a missing package is the user's to fix, not a bad sample
    try:
        container = av.open(path)
    except FileNotFoundError:
        raise BadSample(where, "missing file") from None
    except Exception as error:  # FFmpeg's errors for a file it cannot parse
        raise BadSample(where, f"cannot open video ({type(error).__name__}: {error})") from None
    if not container.streams.video:
        container.close()
        raise BadSample(where, "no video stream")
    return container


def _decode(container, where: str, count: int | None, frames: int, offsets, short_side: int) -> tuple[int, dict]:
    """(frames decoded, {index: picture}) from an open container (closed here) for the sampled indices of a clip
    assumed to have `count` frames; count None (unknown): every frame kept, as a PyAV frame, to sample once known."""
    wanted = None if count is None else set(sample_indices(count, frames, offsets))
    kept, decoded = {}, 0
    try:
        for decoded, frame in enumerate(container.decode(container.streams.video[0]), start=1):
            if wanted is None:
                kept[decoded - 1] = frame
            elif decoded - 1 in wanted:
                kept[decoded - 1] = _to_image(frame, short_side)
                if decoded - 1 == max(wanted):
                    break
    except Exception as error:  # a truncated or corrupt stream: FFmpeg's InvalidDataError and its kin
        raise BadSample(where, f"cannot decode video ({type(error).__name__}: {error})") from None
    finally:
        container.close()
    if not decoded:
        raise BadSample(where, "no frames decoded")
    return decoded, kept


def read_clip(path: str, frames: int, offsets: np.ndarray | None = None, where: str | None = None,
              short_side: int = 0) -> list[Image.Image]:
    """`frames` PIL RGB frames sampled uniformly from the video at `path` (see sample_indices); raises BadSample.

    short_side > 0 scales larger frames down to it while converting (training's counterpart of data.jpeg_draft)."""
    where = where or path
    container = _open(path, where)
    count = container.streams.video[0].frames or None  # from the container's index; 0 where it keeps none (webm)
    decoded, kept = _decode(container, where, count, frames, offsets, short_side)
    if count is None:  # every frame was kept: now the count is known
        return [_to_image(kept[i], short_side) for i in sample_indices(decoded, frames, offsets)]
    indices = sample_indices(count, frames, offsets)
    if all(i in kept for i in indices):
        return [kept[i] for i in indices]
    # the index promised more frames than the stream holds (a file cut short): sample again over what it holds
    decoded, kept = _decode(_open(path, where), where, decoded, frames, offsets, short_side)
    return [kept[i] for i in sample_indices(decoded, frames, offsets)]


def video_duration(path: str, where: str | None = None) -> float:
    """Seconds of the first video stream (the container's duration where the stream has none); raises BadSample."""
    where = where or path
    container = _open(path, where)
    try:
        stream = container.streams.video[0]
        if stream.duration is not None and stream.time_base is not None:
            return float(stream.duration * stream.time_base)
        if container.duration is not None:
            return container.duration / 1_000_000  # AV_TIME_BASE
        raise BadSample(where, "cannot read video (no duration)")
    finally:
        container.close()


def timed_frames(path: str, start: float = 0.0, length: float = float("inf"), short_side: int = 0,
                 where: str | None = None):
    """(seconds from the video's start, PIL RGB frame) for every frame in [start, start + length), in order;
    raises BadSample. Seeks to the key frame before `start` and decodes from there (search.py's segments)."""
    where = where or path
    container = _open(path, where)
    try:
        stream = container.streams.video[0]
        origin = float((stream.start_time or 0) * stream.time_base) if stream.time_base else 0.0
        if start > 0:
            container.seek(int((start + origin) / stream.time_base), stream=stream, backward=True)
        for frame in container.decode(stream):
            if frame.time is None:
                continue
            seconds = frame.time - origin
            if seconds < start - 1e-6:
                continue
            if seconds >= start + length - 1e-6:
                break
            yield seconds, _to_image(frame, short_side)
    except BadSample:
        raise
    except Exception as error:
        raise BadSample(where, f"cannot decode video ({type(error).__name__}: {error})") from None
    finally:
        container.close()


class ClipFiles(ImageFiles):
    """Video files with their captions: ImageFiles' index (image_paths are the unique clips, image_of[i] the clip of
    caption i, texts, skipped_rows), whose items carry `frames` (list of PIL RGB) instead of `image`.

    `frames` frames per item at the evaluation positions; `item(index, frames, offsets)` samples others."""

    def __init__(self, index: ImageFiles, frames: int = DEFAULT_FRAMES, short_side: int = 0):
        require_av()  # here, at start-up, rather than once per clip in every data worker
        super().__init__(index.source, index.image_paths, index.image_of, index.texts, index.labels,
                         index.row_numbers, index.skipped_rows)
        self.frames, self.short_side = frames, short_side

    def clip(self, clip_index: int, frames: int | None = None, offsets: np.ndarray | None = None,
             where: str | None = None) -> list[Image.Image]:
        """Unique clip `clip_index`'s sampled frames; raises BadSample."""
        path = self.image_paths[clip_index]
        return read_clip(path, frames or self.frames, offsets, where or path, self.short_side)

    def image(self, image_index: int, where: str | None = None):
        raise TypeError(f"{self.source} holds video clips: read them with clip(), not image()")

    def item(self, index: int, frames: int | None = None, offsets: np.ndarray | None = None) -> dict:
        return {"frames": self.clip(self.image_of[index], frames, offsets, self.where(index)),
                "caption": self.texts[index], "key": self.image_paths[self.image_of[index]]}

    def __getitem__(self, index: int) -> dict:
        return self.item(index)


def load_video_csv(path: str, image_key: str = "filepath", caption_key: str = "caption", separator: str = "",
                   image_root: str = "", short_side: int = 0) -> ClipFiles:
    return ClipFiles(load_csv(path, image_key, caption_key, separator, image_root), short_side=short_side)


def load_msrvtt(argument: str, video_root: str = "", short_side: int = 0) -> ClipFiles:
    """`FILE[#SPLIT]` of MSR-VTT's JSON layout; sentences and videos that cannot be used are skipped and counted."""
    path, _, split = argument.partition("#")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"msrvtt: no file at '{path}'")
    with open(path, encoding="utf-8") as f:
        try:
            tree = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"msrvtt: '{path}' is not valid JSON ({error})") from None
    if not (isinstance(tree, dict) and isinstance(tree.get("videos"), list) and isinstance(tree.get("sentences"), list)):
        raise ValueError(f"msrvtt: '{path}' needs a 'videos' and a 'sentences' list (MSR-VTT's train_val_videodata.json)")
    present = sorted({v["split"] for v in tree["videos"] if isinstance(v, dict) and isinstance(v.get("split"), str)})
    wanted = set(split.split("+")) if split else None
    if wanted and not wanted & set(present):
        raise ValueError(f"msrvtt: '{path}' has no split '{split}' (splits: {', '.join(present) or 'none'})")
    root = video_root or os.path.dirname(path)
    skipped = BadSampleCount()
    video_index, paths = {}, []
    for k, video in enumerate(tree["videos"]):
        if wanted and not (isinstance(video, dict) and video.get("split") in wanted):
            continue
        skipped.add(0, 1)
        if not isinstance(video, dict) or not isinstance(video.get("video_id"), str) or not video["video_id"]:
            skipped.add(1, 0, [f"{path} videos[{k}]: needs a 'video_id'"])
            continue
        video_index[video["video_id"]] = len(paths)
        paths.append(os.path.join(root, f"{video['video_id']}.mp4"))
    other_splits = {v["video_id"] for v in tree["videos"]
                    if isinstance(v, dict) and isinstance(v.get("video_id"), str)} - set(video_index)
    image_of, texts = [], []
    for k, sentence in enumerate(tree["sentences"]):
        video_id = sentence.get("video_id") if isinstance(sentence, dict) else None
        if wanted and isinstance(video_id, str) and video_id in other_splits:  # another split's sentence
            continue
        where = f"{path} sentences[{k}]"
        skipped.add(0, 1)
        try:
            if not isinstance(sentence, dict) or not isinstance(video_id, str):
                raise BadSample(where, "needs 'video_id' and 'caption'")
            if video_id not in video_index:
                raise BadSample(where, f"video_id {video_id!r} is not in 'videos'")
            caption = sentence.get("caption")
            if not isinstance(caption, str):
                raise BadSample(where, f"caption is {type(caption).__name__}, not text")
            texts.append(clean_caption(caption, where))
            image_of.append(video_index[video_id])
        except BadSample as error:
            skipped.add(1, 0, [str(error)])
    captioned = sorted(set(image_of))  # retrieval needs a true match for every clip
    if len(captioned) < len(paths):
        renumber = {old: new for new, old in enumerate(captioned)}
        skipped.add(len(paths) - len(captioned), 0,
                    [f"{p}: video without a caption" for i, p in enumerate(paths) if i not in renumber])
        paths, image_of = [paths[i] for i in captioned], [renumber[i] for i in image_of]
    return ClipFiles(ImageFiles(path, paths, image_of, texts, skipped_rows=skipped), short_side=short_side)
