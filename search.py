"""Search a folder of images and videos by text, by an example image, or both, with a CLIP model.

    python search.py index --checkpoint RUN/checkpoint.pt --images DIR --index photos.pt
    python search.py index --model ViT-B-32-quickgelu --pretrained ViT-B-32.pt --images DIR --index photos.pt
    python search.py query --index photos.pt --text "a dog on a beach" --k 10 --out results.html
    python search.py query --index photos.pt --image example.jpg --text "at night" --image-weight 0.7 --out r.json

index: every image (data/image_files.py's extensions) and video (VIDEO_EXTENSIONS) under DIR, recursively,
is embedded by the image tower (the evaluation preprocessing of data/transforms.py, JPEGs decoded at
reduced scale); a video contributes one frame every --every seconds (or, with --scene, frames where the
picture changes, at most one every --every seconds). Files stream through a DataLoader in small units
(a list of images, or a 32-sample segment of one video), so memory does not grow with the folder.
Running it again on the same index embeds only new and changed files (size or modification time) and
drops removed ones; a changed model (its weights' hash) or video sampling re-embeds what it affects.
Unreadable files are skipped, printed, and kept in the index's `skipped` table (retried on every run), and so
are the entries the folder walk leaves out (files.walk: each real folder once, so a symlink loop indexes nothing
twice; FIFOs, sockets and devices, which would block a read; dangling and looping links).
Long runs save the index every SAVE_EVERY_ROWS new rows, so an interrupted run resumes where it stopped.

Videos are decoded by PyAV through data/video.py, the code that decodes training clips (the optional `video`
extra, whose wheel carries FFmpeg's libraries), when it imports; otherwise by the `ffmpeg` and `ffprobe` programs
when they are on PATH, where frames are sampled by ffmpeg's `select` filter and timed by its `showinfo` filter.
With neither, videos are skipped with that reason. PyAV's frames are selected here by the same rule as the
filter's expression (every --every seconds; with --scene, ffmpeg's scene score, min(mafd, |mafd - previous mafd|)
over 100 with mafd the mean absolute frame difference in percent, computed on the RGB frames as scaled). Segments are decoded
apart (seeking), so a scene change that falls exactly on a segment boundary is missed.

The index file is one torch.save dict, loaded with weights_only=True (so a crafted index runs no code) and written
atomically (files.write_atomic: a temporary file, then a rename):
    features    (N, D) float16, L2-normalised image features, one row per image or video frame
    times       (N,) float64, the frame's time in seconds, NaN for a still image
    paths       the N rows' absolute file paths joined by "\\0" (one string unpickles far faster than
                a million)
    file_paths, file_sizes, file_mtimes   every indexed file ("\\0"-joined), size in bytes, mtime in ns
    skipped     {path: reason} for files that could not be read
    source      how to load the model again ({"checkpoint": PATH} or {"model", "pretrained", "bpe"}),
    fingerprint, image_size, every, scene, root, format, version

query: the query is the normalised text embedding, the example image's embedding, or their normalised
weighted sum (--image-weight for the image's share). Scores are cosine similarities computed exactly
against every stored vector: a float16 matrix-vector product in chunks of CHUNK_ROWS rows (accumulated
in float32 by PyTorch's CPU kernel; ~0.1-0.3 s for 1,000,000 x 512 on 2 CPU cores, see
benchmarks/bench_search.py), the best k + RESCORE_EXTRA candidates rescored in float32. Results go to
--out as JSON ({"query", "text", "image", "image_weight", "results": [{"path", "score", "time"}]}) or
as a self-contained HTML page (thumbnails embedded as base64 JPEGs), written atomically. File names that are not
UTF-8 are shown escaped (files.shown) there and in what is printed; the index keeps them as they are on disk.

Bad input (a missing or corrupt file, a value out of range, a checkpoint that is refused) ends in one line on
stderr and exit status 2; SIGTERM or SIGINT stop the workers and end in one line and status 128 + the signal,
the index as last saved.
"""
import argparse
import base64
import hashlib
import html
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from crossmodal.config import BadInput, fail
from crossmodal.data import video
from crossmodal.data.bad_samples import BadSample, open_image
from crossmodal.data.image_files import IMAGE_EXTENSIONS
from crossmodal.data.transforms import image_transform
from crossmodal.files import end_with_parent, shown, walk, write_atomic
from crossmodal import checkpointing, recipes

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".wmv", ".flv")
FORMAT, VERSION = "crossmodal-search-index", 1
SEGMENT_SAMPLES = 32  # video frames per DataLoader unit at most (one per --every seconds)
SAVE_EVERY_ROWS = 20_000
CHUNK_ROWS = 1 << 20
RESCORE_EXTRA = 64
THUMBNAIL_SIZE = 160
MIN_EVERY = 0.001  # seconds; no video has frames closer than this, and smaller values only multiply the segments
NO_DECODER = ("no video decoder: pip install 'crossmodal[video]' (PyAV), or install ffmpeg (e.g. apt-get install "
              "ffmpeg) so that ffmpeg and ffprobe are on PATH")
SPACING_SLACK = 1e-6  # seconds: frame times are rounded, and 1.3 - 0.3 must count as 1 second apart


# ---------------------------------------------------------------------------------------------- video


def video_decoder() -> str:
    """"pyav" when PyAV imports, "ffmpeg" when both programs are on PATH, "" when videos cannot be decoded."""
    if video.has_av():
        return "pyav"
    return "ffmpeg" if shutil.which("ffmpeg") is not None and shutil.which("ffprobe") is not None else ""


def video_duration(path: str) -> float:
    """Seconds; raises BadSample."""
    return video.video_duration(path) if video_decoder() == "pyav" else ffprobe_duration(path)


def scene_score(previous: np.ndarray | None, current: np.ndarray, previous_mafd: float) -> tuple[float, float]:
    """(ffmpeg select's scene score of `current` after `previous`, 0-1; this frame's mafd): frames are uint8 arrays
    of one shape; the first frame (no previous) scores 0."""
    if previous is None or previous.shape != current.shape:
        return 0.0, 0.0
    mafd = float(np.abs(current.astype(np.int16) - previous).mean()) * 100 / 256  # percent, as ffmpeg's 8-bit one
    return min(max(min(mafd, abs(mafd - previous_mafd)) / 100, 0.0), 1.0), mafd


def pyav_frames(path: str, start: float, length: float, every: float, scene: float | None,
                short_side: int) -> list[tuple[float, Image.Image]]:
    """video_frames through PyAV, each frame kept by the rule of ffmpeg's select expression in ffmpeg_frames."""
    kept, last_kept, previous, previous_mafd = [], None, None, 0.0
    for number, (seconds, frame) in enumerate(video.timed_frames(path, start, length, short_side)):
        spaced = last_kept is None or seconds - last_kept >= every - SPACING_SLACK
        if scene is not None:
            pixels = np.asarray(frame)
            score, previous_mafd = scene_score(previous, pixels, previous_mafd)
            previous = pixels
            keep = (spaced and score > scene) or (start == 0 and number == 0)  # and the video's first frame
        else:
            keep = spaced
        if keep:
            kept.append((seconds, frame))
            last_kept = seconds
    return kept


def ffprobe_duration(path: str) -> float:
    result = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                             "stream=codec_type:format=duration", "-of", "json", path],
                            capture_output=True, text=True, preexec_fn=end_with_parent)
    try:
        info = json.loads(result.stdout)
        if result.returncode or not info.get("streams"):
            raise ValueError
        return float(info["format"]["duration"])
    except (ValueError, KeyError, TypeError):
        message = result.stderr.strip().splitlines()[-1:] or ["no video stream or no duration"]
        raise BadSample(path, f"cannot read video ({message[0]})") from None


def read_ppm_stream(data: bytes) -> list[Image.Image]:
    """The frames of ffmpeg's `-f image2pipe -c:v ppm` output: back-to-back binary PPMs."""
    frames, position = [], 0
    header = re.compile(rb"P6\s+(\d+)\s+(\d+)\s+255\s")
    while position < len(data):
        match = header.match(data, position)
        if match is None:
            raise ValueError(f"not a PPM frame at byte {position}")
        width, height = int(match[1]), int(match[2])
        end = match.end() + width * height * 3
        frames.append(Image.frombytes("RGB", (width, height), data[match.end():end]))
        position = end
    return frames


def run_ffmpeg(path: str, input_args: list[str], filters: str,
               max_frames: int | None = None) -> list[tuple[float, Image.Image]]:
    """(time in seconds from the seek point, frame) for each frame the filter chain lets through."""
    # -vsync vfr: pass the selected frames on as they are (the pipe muxer would otherwise repeat frames to
    # a constant rate); spelled the old way, which ffmpeg 4 to 7 all accept
    command = ["ffmpeg", "-hide_banner", "-nostats", "-loglevel", "info", "-nostdin", *input_args, "-i", path,
               "-an", "-sn", "-vf", f"{filters},showinfo", "-vsync", "vfr", "-f", "image2pipe", "-c:v", "ppm"]
    if max_frames:
        command += ["-frames:v", str(max_frames)]
    result = subprocess.run([*command, "-"], capture_output=True, preexec_fn=end_with_parent)
    log = result.stderr.decode("utf-8", "replace")
    if result.returncode:
        reason = [line for line in log.splitlines() if line.strip()][-1:] or [f"exit status {result.returncode}"]
        raise BadSample(path, f"ffmpeg cannot decode it ({reason[0].strip()})")
    times = [float(t) for t in re.findall(r"\[Parsed_showinfo[^\]]*\].*?pts_time:\s*(-?[\d.eE+-]+)", log)]
    frames = read_ppm_stream(result.stdout)
    if max_frames:
        times = times[:max_frames]  # the filters may run ahead of the frame limit
    if len(times) != len(frames):
        raise BadSample(path, f"ffmpeg gave {len(frames)} frames but timed {len(times)}")
    return list(zip(times, frames))


def video_frames(path: str, start: float, length: float, every: float, scene: float | None,
                 short_side: int) -> list[tuple[float, Image.Image]]:
    """(time in seconds, frame) sampled from [start, start + length) of a video; raises BadSample.

    Every --every seconds from the segment's first frame; with `scene`, only frames whose scene score
    (ffmpeg's, 0-1) exceeds it, at most one every --every seconds, and the video's first frame.
    """
    if video_decoder() == "pyav":
        return pyav_frames(path, start, length, every, scene, short_side)
    return ffmpeg_frames(path, start, length, every, scene, short_side)


def ffmpeg_frames(path: str, start: float, length: float, every: float, scene: float | None,
                  short_side: int) -> list[tuple[float, Image.Image]]:
    """video_frames through the ffmpeg program: its select filter picks the frames."""
    spaced = f"(isnan(prev_selected_t)+gte(t-prev_selected_t,{every}))"
    if scene is None:
        select = spaced
    else:
        select = f"gt(scene,{scene})*{spaced}" + ("+eq(n,0)" if start == 0 else "")
    scale = (f"scale=w='if(lt(iw,ih),min(iw,{short_side}),-2)':h='if(lt(iw,ih),-2,min(ih,{short_side}))'"
             f":flags=bicubic")
    frames = run_ffmpeg(path, ["-ss", f"{start:.6f}", "-t", f"{length:.6f}"], f"select='{select}',{scale}")
    return [(start + t, frame) for t, frame in frames]


def video_frame_at(path: str, seconds: float) -> Image.Image:
    """One frame (for a thumbnail); raises BadSample."""
    if video_decoder() == "pyav":
        frames = video.timed_frames(path, seconds)
        frame = next(frames, None)
        frames.close()  # the container with it
        if frame is None:
            raise BadSample(path, f"no frame at {seconds:.2f} s")
        return frame[1]
    frames = run_ffmpeg(path, ["-ss", f"{seconds:.6f}"], "null", max_frames=1)
    if not frames:
        raise BadSample(path, f"no frame at {seconds:.2f} s")
    return frames[0][1]


# ---------------------------------------------------------------------------------------------- files


def scan(root: str) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """({absolute path: (size in bytes, mtime in ns)} of the images and videos under root, recursively, each real
    file once; {path: reason} of the entries left out: dangling, looping or repeated links, FIFOs, sockets, devices)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--images: no folder at '{shown(root)}'")
    paths, left_out = walk(root, IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)
    files = {}
    for path in paths:
        try:
            info = os.stat(path)
        except OSError as error:  # gone since the walk
            left_out.append((path, f"unreadable ({error.strerror})"))
            continue
        files[path] = (info.st_size, info.st_mtime_ns)
    return files, dict(left_out)


def is_video(path: str) -> bool:
    return path.lower().endswith(VIDEO_EXTENSIONS)


class Units(Dataset):
    """Work units: ("images", [paths]) or ("video", path, start, length). An item is a dict of the
    unit's preprocessed pictures (K, 3, S, S), their paths and times (NaN for images), and the
    (path, reason) of what could not be read."""

    def __init__(self, units: list[tuple], image_size: int, every: float, scene: float | None):
        self.units, self.image_size, self.every, self.scene = units, image_size, every, scene
        self.transform = image_transform(image_size, train=False)

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, index: int) -> dict:
        unit = self.units[index]
        pictures, paths, times, skipped = [], [], [], []
        if unit[0] == "images":
            for path in unit[1]:
                try:
                    pictures.append(self.transform(open_image(path, path, self.image_size)))
                    paths.append(path)
                    times.append(math.nan)
                except BadSample as error:
                    skipped.append((path, error.reason))
        else:
            _, path, start, length = unit
            try:
                for seconds, frame in video_frames(path, start, length, self.every, self.scene, self.image_size):
                    pictures.append(self.transform(frame))
                    paths.append(path)
                    times.append(seconds)
            except BadSample as error:
                skipped.append((path, error.reason))
        size = self.image_size
        return {"pictures": torch.stack(pictures) if pictures else torch.empty(0, 3, size, size),
                "paths": paths, "times": times, "skipped": skipped}


def start_worker(worker_id: int) -> None:
    """A DataLoader worker's first act: it ends with search.py, however search.py ends."""
    end_with_parent()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler, inherited through fork
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: search.py stops the workers


def plan_units(paths: list[str], batch_size: int, every: float, skipped: dict[str, str]) -> list[tuple]:
    """Images in runs of batch_size; each video cut into segments of SEGMENT_SAMPLES * every seconds.
    Videos that cannot be planned (no decoder, no duration) go to `skipped`."""
    images = [path for path in paths if not is_video(path)]
    units = [("images", images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    decoder = video_decoder()
    for path in (path for path in paths if is_video(path)):
        if not decoder:
            skipped[path] = NO_DECODER
            continue
        try:
            duration = video_duration(path)
        except BadSample as error:
            skipped[path] = error.reason
            continue
        length = SEGMENT_SAMPLES * every
        units += [("video", path, start * length, length) for start in range(max(1, math.ceil(duration / length)))]
    return units


# ---------------------------------------------------------------------------------------------- index


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha1 of the weights: an index built by other weights must be re-embedded."""
    digest = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def empty_index() -> dict:
    """No rows yet; the model and sampling fields are set by build_index (None: unknown, so everything is embedded)."""
    return {"format": FORMAT, "version": VERSION, "features": torch.empty(0, 0, dtype=torch.float16),
            "times": torch.empty(0, dtype=torch.float64), "paths": [], "files": {}, "skipped": {}, "source": None,
            "fingerprint": None, "image_size": None, "root": None, "every": None, "scene": None}


def source_problem(source) -> str | None:
    """What is wrong with an index's `source` (how to load its model), or None."""
    if source is None or (isinstance(source, dict) and set(source) == {"checkpoint"}
                          and isinstance(source["checkpoint"], str)):
        return None
    if (isinstance(source, dict) and set(source) == {"model", "pretrained", "bpe"}
            and isinstance(source["model"], str) and isinstance(source["pretrained"], str)
            and isinstance(source["bpe"], (str, type(None)))):
        return None
    return "its source is neither {'checkpoint': PATH} nor {'model', 'pretrained', 'bpe'}"


def stored_problem(stored) -> str | None:
    """What makes a loaded file not an intact index (of this version), or None."""
    if not isinstance(stored, dict):
        return f"it holds a {type(stored).__name__}, not a dict"
    if stored.get("format") != FORMAT:
        return f"its format is {stored.get('format')!r}, not {FORMAT!r}"
    if stored.get("version") != VERSION:
        return f"it is of version {stored.get('version')!r}"
    kinds = {"features": torch.Tensor, "times": torch.Tensor, "paths": str, "file_paths": str,
             "file_sizes": torch.Tensor, "file_mtimes": torch.Tensor, "skipped": dict, "source": (dict, type(None)),
             "fingerprint": (str, type(None)), "image_size": (int, type(None)), "root": (str, type(None)),
             "every": (float, type(None)), "scene": (float, type(None))}
    for key, kind in kinds.items():
        if not isinstance(stored.get(key), kind):
            return f"'{key}' is missing or a {type(stored.get(key)).__name__}"
    features, times = stored["features"], stored["times"]
    if features.dim() != 2 or not features.is_floating_point() or times.dim() != 1:
        return f"'features' is {tuple(features.shape)} {features.dtype}, 'times' {tuple(times.shape)}"
    rows = {len(features), len(times), stored["paths"].count("\0") + 1 if stored["paths"] else 0}
    files = {stored["file_paths"].count("\0") + 1 if stored["file_paths"] else 0, stored["file_sizes"].numel(),
             stored["file_mtimes"].numel()}
    if len(rows) > 1 or len(files) > 1:
        return f"its parts disagree on the number of rows ({sorted(rows)}) or files ({sorted(files)})"
    return source_problem(stored["source"])


def load_index(path: str, mmap: bool = False) -> dict:
    """The index with `paths` as a list and `files` as {path: (size, mtime_ns)}. Loading runs no code
    (weights_only); a file that is not an intact index raises BadInput."""
    if os.path.isdir(path):
        raise BadInput(f"--index: '{shown(path)}' is a folder, not an index file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--index: no index at '{shown(path)}' (build one with `search.py index`)")
    # save_index writes torch.save's zip archive: anything else (empty, cut short, text, a plain pickle) is refused
    # before torch.load, whose errors for such files are internal ones
    problem = checkpointing.damage(path) or (None if zipfile.is_zipfile(path) else "is not a torch.save archive")
    if problem:
        raise BadInput(f"--index: '{shown(path)}' is not a search index: it {problem}")
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # whatever torch.load makes of an archive it did not write
        reason = checkpointing.unloadable(error)
        raise BadInput(f"--index: '{shown(path)}' is not a search index: it {reason}") from None
    problem = stored_problem(stored)
    if problem:
        raise BadInput(f"--index: '{shown(path)}' is not a search index of version {VERSION} (made by search.py "
                       f"index): {problem}")
    split = lambda text: text.split("\0") if text else []  # noqa: E731
    files = dict(zip(split(stored.pop("file_paths")), zip(stored.pop("file_sizes").tolist(),
                                                         stored.pop("file_mtimes").tolist())))
    return {**stored, "paths": split(stored["paths"]), "files": files}


def save_index(index: dict, path: str) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    files = index["files"]
    stored = {**index, "paths": "\0".join(index["paths"]), "file_paths": "\0".join(files),
              "file_sizes": torch.tensor([size for size, _ in files.values()], dtype=torch.int64),
              "file_mtimes": torch.tensor([mtime for _, mtime in files.values()], dtype=torch.int64)}
    del stored["files"]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, lambda f: torch.save(stored, f), binary=True)


def keep_rows(index: dict, keep: torch.Tensor) -> dict:
    rows = keep.nonzero().squeeze(1).tolist()
    return {**index, "features": index["features"][keep], "times": index["times"][keep],
            "paths": [index["paths"][i] for i in rows]}


def build_index(model, image_size: int, root: str, index_path: str, source: dict, every: float = 2.0,
                scene: float | None = None, batch_size: int = 64, workers: int = 0, device="cpu",
                log=print) -> dict:
    """Create or update the index of `root` at index_path; returns counts and the skipped files."""
    fingerprint = model_fingerprint(model)
    sampling = {"every": float(every), "scene": None if scene is None else float(scene)}
    on_disk, left_out = scan(root)
    index = load_index(index_path) if os.path.exists(index_path) else None
    if index is not None and index["fingerprint"] != fingerprint:
        log(f"{shown(index_path)}: built with other model weights; embedding everything again")
        index = None
    index = index or empty_index()
    redo_videos = bool(index["files"]) and any(index.get(key) != value for key, value in sampling.items())
    if redo_videos:
        log(f"{shown(index_path)}: video sampling changed to {sampling}; embedding the videos again")

    todo = [path for path, signature in on_disk.items()
            if index["files"].get(path) != signature or (redo_videos and is_video(path))]
    gone = {path for path in index["files"] if path not in on_disk}.union(todo)
    index = keep_rows(index, torch.tensor([path not in gone for path in index["paths"]], dtype=torch.bool))
    index["files"] = {path: signature for path, signature in index["files"].items() if path not in gone}
    removed = sum(path not in on_disk for path in gone)
    index.update(source=source, fingerprint=fingerprint, image_size=image_size, root=os.path.abspath(root),
                 skipped={}, **sampling)
    log(f"{len(on_disk):,} files under {shown(root)}: {len(on_disk) - len(todo):,} unchanged, {len(todo):,} to "
        f"embed, {removed:,} removed" + (f", {len(left_out):,} left out by the walk" if left_out else ""))

    skipped = index["skipped"]
    for path, reason in left_out.items():
        skipped[path] = reason
        log(shown(f"skipped {path}: {reason}"))
    units = plan_units(todo, batch_size, every, skipped)
    segments_left = {}
    for unit in units:
        if unit[0] == "video":
            segments_left[unit[1]] = segments_left.get(unit[1], 0) + 1
    loader = DataLoader(Units(units, image_size, every, scene), batch_size=None, num_workers=workers,
                        prefetch_factor=2 if workers else None, worker_init_fn=start_worker if workers else None)
    new_features, new_times, new_paths, pending = [], [], [], {}
    rows_since_save, embedded_rows, start = 0, 0, time.perf_counter()

    def commit(features, times, paths):
        new_features.append(features), new_times.append(times), new_paths.extend(paths)
        for path in dict.fromkeys(paths):
            index["files"][path] = on_disk[path]

    def merged() -> dict:
        features = [part for part in (index["features"], *new_features) if len(part)]
        return {**index, "features": torch.cat(features) if features else index["features"],
                "times": torch.cat([index["times"], *new_times]), "paths": index["paths"] + new_paths}

    batches = iter(loader)
    try:
        with torch.no_grad():
            for number, item in enumerate(batches):
                for path, reason in item["skipped"]:
                    skipped[path] = reason
                    log(shown(f"skipped {path}: {reason}"))
                features = torch.cat([model.encode_image(chunk.to(device), normalize=True).float().cpu()
                                      for chunk in item["pictures"].split(batch_size)]) if item["paths"] else None
                times = torch.tensor(item["times"], dtype=torch.float64)
                if units[number][0] == "images":
                    if features is not None:
                        commit(features.half(), times, item["paths"])
                else:  # a video counts once all its segments are in, and not at all if one fails
                    path = units[number][1]
                    parts = pending.setdefault(path, [])
                    if features is not None:
                        parts.append((features.half(), times))
                    segments_left[path] -= 1
                    if segments_left[path] == 0:
                        pending.pop(path)
                        if path not in skipped and parts:
                            commit(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                                   [path] * sum(len(p[1]) for p in parts))
                        elif path not in skipped:
                            skipped[path] = "no frames decoded"
                rows = len(item["paths"])
                embedded_rows, rows_since_save = embedded_rows + rows, rows_since_save + rows
                if rows_since_save >= SAVE_EVERY_ROWS:
                    index = merged()
                    new_features, new_times, new_paths, rows_since_save = [], [], [], 0
                    save_index(index, index_path)
                    log(f"embedded {embedded_rows:,} pictures ({embedded_rows / (time.perf_counter() - start):.1f}/s),"
                        f" saved")
    finally:  # every way out (an error, SIGTERM): the workers stop now, not when the traceback is freed
        if workers:
            batches._shutdown_workers()
    index = merged()
    save_index(index, index_path)
    seconds = time.perf_counter() - start
    log(f"embedded {embedded_rows:,} pictures from {len(todo) - len([p for p in todo if p in skipped]):,} files in "
        f"{seconds:.1f} s; the index holds {len(index['paths']):,} pictures of {len(index['files']):,} files"
        + (f"; {len(skipped):,} skipped:" if skipped else ""))
    for path, reason in skipped.items():
        log(shown(f"  {path}: {reason}"))
    return {"files": len(index["files"]), "rows": len(index["paths"]), "embedded_rows": embedded_rows,
            "embedded_files": len(todo) - len([p for p in todo if p in skipped]), "removed_files": removed,
            "unchanged_files": len(on_disk) - len(todo), "skipped": dict(skipped)}


# ---------------------------------------------------------------------------------------------- query


@torch.no_grad()
def query_vector(model, tokenizer, image_size: int, text: str | None = None, image: str | None = None,
                 image_weight: float = 0.5, device="cpu") -> torch.Tensor:
    """(D,) the normalised query: text, image, or normalise(image_weight * image + (1 - image_weight) * text)."""
    if text is None and image is None:
        raise ValueError("give --text, --image, or both")
    parts = []
    if text is not None:
        parts.append((1.0 - image_weight if image is not None else 1.0,
                      model.encode_text(tokenizer([text]).to(device), normalize=True).float().cpu()[0]))
    if image is not None:
        picture = image_transform(image_size, train=False)(open_image(image, image, image_size))
        parts.append((image_weight if text is not None else 1.0,
                      model.encode_image(picture[None].to(device), normalize=True).float().cpu()[0]))
    return F.normalize(sum(weight * vector for weight, vector in parts), dim=0)


def top_k(features: torch.Tensor, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, row indices) of the k stored vectors most similar to `query`, best first; exact cosine.

    A float16 product over CHUNK_ROWS rows at a time picks k + RESCORE_EXTRA candidates, which are
    rescored in float32 (the fp16 scores are rounded to ~1e-3 relative; the extra candidates cover ties).
    """
    k = min(k, len(features))
    if k == 0:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    wanted = min(k + RESCORE_EXTRA, len(features))
    query_low = query.to(features.dtype)
    best_scores, best_rows = [], []
    for offset in range(0, len(features), CHUNK_ROWS):
        scores = features[offset:offset + CHUNK_ROWS] @ query_low  # (chunk,)
        found = scores.topk(min(wanted, len(scores)))
        best_scores.append(found.values.float()), best_rows.append(found.indices + offset)
    candidates = torch.cat(best_rows)
    candidates = candidates[torch.cat(best_scores).topk(min(wanted, len(candidates))).indices]
    exact = features[candidates].float() @ query.float()
    order = exact.topk(k).indices
    return exact[order], candidates[order]


def search(index: dict, query: torch.Tensor, k: int) -> list[dict]:
    scores, rows = top_k(index["features"], query, k)
    return [{"path": index["paths"][row], "score": round(score, 6),
             "time": None if math.isnan(index["times"][row].item()) else round(index["times"][row].item(), 3)}
            for score, row in zip(scores.tolist(), rows.tolist())]


def thumbnail(path: str, seconds: float | None) -> str | None:
    """A small JPEG as a data URI, or None when the file cannot be read any more."""
    if not os.path.isfile(path):  # gone, or now a FIFO or a device, whose read would block
        return None
    try:
        picture = open_image(path, path) if seconds is None else video_frame_at(path, seconds)
    except BadSample:
        return None
    picture.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def shown_report(report: dict) -> dict:
    """The report as it is shown (JSON, HTML): file names that are not UTF-8 escaped."""
    return {**{key: shown(value) if isinstance(value, str) else value for key, value in report.items()},
            "results": [{**result, "path": shown(result["path"])} for result in report["results"]]}


def write_html(report: dict, path: str) -> None:
    """The results page, written atomically; `report` holds the paths as stored (the thumbnails read them)."""
    title = " + ".join(f"{name} '{shown(report[name])}'" for name in ("text", "image") if report[name] is not None)
    cells = []
    for rank, result in enumerate(report["results"], 1):
        uri = thumbnail(result["path"], result["time"])
        picture = (f'<img src="{uri}" alt="result {rank}">' if uri else '<div class="missing">no preview</div>')
        when = "" if result["time"] is None else f" at {result['time']:.1f} s"
        cells.append(f'<figure>{picture}<figcaption><b>{rank}.</b> {result["score"]:.4f}{when}<br>'
                     f'{html.escape(shown(result["path"]))}</figcaption></figure>')
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>search: {html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 16px; background: #fafafa; }}
.results {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; width: {THUMBNAIL_SIZE + 16}px; padding: 8px; background: white; border: 1px solid #ddd; }}
img {{ display: block; width: {THUMBNAIL_SIZE}px; height: {THUMBNAIL_SIZE}px; object-fit: contain; }}
.missing {{ height: {THUMBNAIL_SIZE}px; color: #999; text-align: center; line-height: {THUMBNAIL_SIZE}px; }}
figcaption {{ font-size: 12px; word-break: break-all; margin-top: 6px; }}
</style></head>
<body><h1>{html.escape(title)}</h1>
<p>{len(report["results"])} results, cosine similarity, best first.</p>
<div class="results">
{chr(10).join(cells)}
</div></body></html>
"""
    write_atomic(path, page)


# ---------------------------------------------------------------------------------------------- command line


def load_model(source: dict, device: str):
    if "checkpoint" in source:
        cfg, model, tokenizer = recipes.load_run(source["checkpoint"], device)
    else:
        cfg, model, tokenizer = recipes.load_released(source["model"], source["pretrained"], device,
                                                         bpe=source["bpe"])
    return model, tokenizer, cfg.data.image_size


def model_source(args, parser) -> dict | None:
    if args.checkpoint and args.model:
        parser.error("give --checkpoint (a train.py run) or --model with --pretrained (released weights), not both")
    if bool(args.model) != bool(args.pretrained):
        parser.error("--model needs --pretrained (and --pretrained needs --model)")
    if args.checkpoint:
        return {"checkpoint": os.path.abspath(args.checkpoint)}
    if args.model:
        bpe = os.path.abspath(args.bpe) if args.bpe else None
        return {"model": args.model, "pretrained": os.path.abspath(args.pretrained), "bpe": bpe}
    return None


class Stopped(BaseException):
    """SIGTERM or SIGINT, raised in the main process so the loader's workers are shut down on the way out; a
    BaseException, as KeyboardInterrupt is, so that no `except Exception` takes it for an error."""


def raise_stopped(signum: int, frame) -> None:
    raise Stopped(signum)


def check_options(args) -> None:
    """Every value in range before any work: a bad one ends here, an existing index untouched."""
    def need(ok: bool, option: str, value, rule: str) -> None:
        if not ok:
            fail(f"search.py: {option} must be {rule}, got {value}")

    if args.command == "index":
        need(MIN_EVERY <= args.every < math.inf, "--every", args.every, f"a number of seconds >= {MIN_EVERY}")
        need(args.scene is None or 0 <= args.scene <= 1, "--scene", args.scene, "a scene score between 0 and 1")
        need(args.batch_size >= 1, "--batch-size", args.batch_size, ">= 1")
        need(args.workers >= 0, "--workers", args.workers, ">= 0")
        if not os.path.isdir(args.images):
            fail(f"search.py: --images: no folder at '{shown(args.images)}'")
    else:
        need(0 <= args.image_weight <= 1, "--image-weight", args.image_weight, "between 0 and 1")  # NaN fails
        need(args.k >= 1, "--k", args.k, ">= 1")
        if args.image is not None and not os.path.isfile(args.image):  # a FIFO would block the read
            fail(f"search.py: --image: no file at '{shown(args.image)}'")
        if args.out and (not args.out.endswith((".json", ".html")) or os.path.isdir(args.out)):
            fail(f"search.py: --out must name a .json or .html file, got '{shown(args.out)}'")
        if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
            fail(f"search.py: --out: no folder for '{shown(args.out)}'")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        fail(f"search.py: --device: '{args.device}' is not a device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"search.py: --device {args.device}: no CUDA device here")


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    index_parser = commands.add_parser("index", help="embed a folder of images and videos (or update its index)")
    query_parser = commands.add_parser("query", help="the best matches for a text and/or an example image")
    for sub in (index_parser, query_parser):
        sub.add_argument("--index", required=True, help="the index file")
        sub.add_argument("--checkpoint", help="a train.py checkpoint.pt (query: default the index's model)")
        sub.add_argument("--model", help="a preset for released weights, e.g. ViT-B-32-quickgelu")
        sub.add_argument("--pretrained", help="with --model: an OpenAI .pt file or an open_clip checkpoint")
        sub.add_argument("--bpe", help="with --model: CLIP's bpe_simple_vocab_16e6.txt.gz")
        sub.add_argument("--device", default="cpu")
    index_parser.add_argument("--images", required=True, help="the folder to index, recursively")
    index_parser.add_argument("--every", type=float, default=2.0, help="seconds between sampled video frames")
    index_parser.add_argument("--scene", type=float, help="sample video frames at scene changes whose ffmpeg "
                                                          "scene score exceeds this (0-1, e.g. 0.3) instead")
    index_parser.add_argument("--batch-size", type=int, default=64)
    index_parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    query_parser.add_argument("--text")
    query_parser.add_argument("--image", help="an example image")
    query_parser.add_argument("--image-weight", type=float, default=0.5,
                              help="the example image's share when both --text and --image are given")
    query_parser.add_argument("--k", type=int, default=10)
    query_parser.add_argument("--out", help="results.json or results.html")
    args = parser.parse_args(argv)
    source = model_source(args, parser)
    if args.command == "query" and args.text is None and args.image is None:
        parser.error("give --text, --image, or both")
    check_options(args)

    handlers = {number: signal.signal(number, raise_stopped) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        return index_or_query(args, source)
    except (BadInput, ValueError, OSError, BadSample) as error:  # BadInput: a library's known problem with input
        fail(shown(f"search.py: {error}"))
    except Stopped as stop:
        number = stop.args[0]
        saved = f"; {shown(args.index)} is as last saved" if args.command == "index" else ""
        print(f"search.py: stopped by {signal.Signals(number).name}{saved}", file=sys.stderr, flush=True)
        sys.exit(128 + number)
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)


def index_or_query(args, source: dict | None) -> dict:
    """The command, once its options are checked: the index summary, or the query's report."""
    if args.command == "index":
        existing = load_index(args.index, mmap=True) if os.path.exists(args.index) else None  # refused before work
        if source is None:
            if existing is None:
                raise BadInput(f"--index: no index at '{shown(args.index)}' yet; a new index needs --checkpoint, "
                               f"or --model with --pretrained")
            if existing["source"] is None:
                raise BadInput(f"--index: {shown(args.index)} names no model; give --checkpoint or --model")
            source = existing["source"]
        model, _, image_size = load_model(source, args.device)
        return build_index(model, image_size, args.images, args.index, source, args.every, args.scene,
                           args.batch_size, args.workers, args.device)
    index = load_index(args.index, mmap=True)
    if source is None and index["source"] is None:
        raise BadInput(f"--index: {shown(args.index)} names no model; give --checkpoint or --model")
    model, tokenizer, image_size = load_model(source or index["source"], args.device)
    start = time.perf_counter()
    query = query_vector(model, tokenizer, image_size, args.text, args.image, args.image_weight, args.device)
    if (image_size != index["image_size"] or (len(index["paths"]) and index["features"].shape[1] != len(query))
            or (source and model_fingerprint(model) != index["fingerprint"])):
        raise BadInput(f"{shown(args.index)} was built with other model weights; query with those, or re-index")
    results = search(index, query, args.k)
    seconds = time.perf_counter() - start
    report = {"query": args.text if args.text is not None else args.image, "text": args.text, "image": args.image,
              "image_weight": args.image_weight if args.text is not None and args.image is not None else None,
              "results": results}
    print(f"{len(results)} best of {len(index['paths']):,} pictures ({seconds * 1000:.0f} ms):")
    for rank, result in enumerate(results, 1):
        when = "" if result["time"] is None else f" at {result['time']:.1f} s"
        print(f"  {rank:>3}. {result['score']:.4f}  {shown(result['path'])}{when}")
    if args.out and args.out.endswith(".json"):
        write_atomic(args.out, json.dumps(shown_report(report), indent=2))
    elif args.out:
        write_html(report, args.out)
    return report


if __name__ == "__main__":
    main()
