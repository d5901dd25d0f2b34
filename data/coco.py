"""`coco:PATH[#SPLIT]`: COCO captions (Chen et al., 2015) in either of its two common JSON layouts.

- The official captions file (`captions_train2017.json`): `images` (`id`, `file_name`) and
  `annotations` (`image_id`, `caption`), one annotation per caption.
- Karpathy & Fei-Fei's split file (`dataset_coco.json`, also `dataset_flickr30k.json`), the one
  retrieval results are reported on: `images`, each with `split` (train, val, test, restval),
  `filename`, an optional `filepath` and `sentences` ([{`raw`}, ...]). `#SPLIT` picks the split;
  `#train+restval` joins several (the usual 113k-image COCO training set).

Image paths are relative to `data.image_root`, or to the JSON's folder when that is "". Entries that
cannot be used (no file name, a caption that is not a non-empty string, an annotation for an unknown
image) are left out and counted in `skipped_rows`; so are images left without a caption.
"""
import json
import os

from crossmodal.data.bad_samples import BadSample, BadSampleCount, clean_caption
from crossmodal.data.image_files import ImageFiles, resolve


def _caption(value, where: str) -> str:
    if not isinstance(value, str):
        raise BadSample(where, f"caption is {type(value).__name__}, not text")
    return clean_caption(value, where)


Index = tuple[list[str], list[int], list[str]]  # unique image paths, image of each caption, captions


def _captions_format(tree: dict, path: str, root: str, skipped: BadSampleCount) -> Index:
    image_index, paths = {}, []
    for k, entry in enumerate(tree.get("images") or []):
        skipped.add(0, 1)
        usable = isinstance(entry, dict) and isinstance(entry.get("id"), (int, str))
        if not usable or not isinstance(entry.get("file_name"), str):
            skipped.add(1, 0, [f"{path} images[{k}]: needs 'id' and 'file_name'"])
            continue
        image_index[entry["id"]] = len(paths)
        paths.append(resolve(entry["file_name"], root))
    image_of, texts = [], []
    for k, entry in enumerate(tree["annotations"]):
        skipped.add(0, 1)
        where = f"{path} annotations[{k}]"
        try:
            if not isinstance(entry, dict) or "image_id" not in entry or "caption" not in entry:
                raise BadSample(where, "needs 'image_id' and 'caption'")
            if not isinstance(entry["image_id"], (int, str)) or entry["image_id"] not in image_index:
                raise BadSample(where, f"image_id {entry['image_id']!r} is not in 'images'")
            texts.append(_caption(entry["caption"], where))
            image_of.append(image_index[entry["image_id"]])
        except BadSample as error:
            skipped.add(1, 0, [str(error)])
    return paths, image_of, texts


def _karpathy_format(tree: dict, path: str, root: str, split: str, skipped: BadSampleCount) -> Index:
    present = sorted({entry["split"] for entry in tree["images"]
                      if isinstance(entry, dict) and isinstance(entry.get("split"), str)})
    if not split:
        raise ValueError(f"coco: '{path}' is a Karpathy split file; name a split, e.g. coco:{path}#test "
                         f"(splits: {', '.join(present)})")
    wanted = set(split.split("+"))
    if not wanted & set(present):
        raise ValueError(f"coco: '{path}' has no split '{split}' (splits: {', '.join(present)})")
    paths, image_of, texts = [], [], []
    for k, entry in enumerate(tree["images"]):
        if not isinstance(entry, dict) or entry.get("split") not in wanted:
            continue
        skipped.add(0, 1)
        where = f"{path} images[{k}]"
        if not isinstance(entry.get("filename"), str) or not isinstance(entry.get("sentences"), list):
            skipped.add(1, 0, [f"{where}: needs 'filename' and a 'sentences' list"])
            continue
        paths.append(resolve(os.path.join(entry.get("filepath") or "", entry["filename"]), root))
        for s, sentence in enumerate(entry["sentences"]):
            skipped.add(0, 1)
            try:
                texts.append(_caption(sentence.get("raw") if isinstance(sentence, dict) else None,
                                      f"{where}.sentences[{s}]"))
                image_of.append(len(paths) - 1)
            except BadSample as error:
                skipped.add(1, 0, [str(error)])
    return paths, image_of, texts


def _drop_uncaptioned(paths: list[str], image_of: list[int], skipped: BadSampleCount) -> tuple[list[str], list[int]]:
    """Keep images with at least one caption (retrieval needs a true match for every image)."""
    captioned = sorted(set(image_of))
    if len(captioned) == len(paths):
        return paths, image_of
    renumber = {old: new for new, old in enumerate(captioned)}
    uncaptioned = [p for i, p in enumerate(paths) if i not in renumber]
    skipped.add(len(uncaptioned), 0, [f"{p}: image without a caption" for p in uncaptioned])
    return [paths[i] for i in captioned], [renumber[i] for i in image_of]


def load_coco(argument: str, image_root: str = "", draft_size: int = 0) -> ImageFiles:
    path, _, split = argument.partition("#")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"coco: no file at '{path}'")
    with open(path, encoding="utf-8") as f:
        try:
            tree = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"coco: '{path}' is not valid JSON ({error})") from None
    root = image_root or os.path.dirname(path)
    skipped = BadSampleCount()
    if isinstance(tree, dict) and isinstance(tree.get("annotations"), list):
        if split:
            raise ValueError(f"coco: '{path}' is a COCO captions file, which has no splits; drop '#{split}'")
        paths, image_of, texts = _captions_format(tree, path, root, skipped)
    elif isinstance(tree, dict) and isinstance(tree.get("images"), list):
        paths, image_of, texts = _karpathy_format(tree, path, root, split, skipped)
    else:
        raise ValueError(f"coco: '{path}' has neither 'annotations' (COCO captions) nor an 'images' list "
                         f"(Karpathy split)")
    paths, image_of = _drop_uncaptioned(paths, image_of, skipped)
    return ImageFiles(path, paths, image_of, texts, skipped_rows=skipped, draft_size=draft_size)
