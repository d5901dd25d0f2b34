"""CapFilt (Li et al., 2022, BLIP section 3.3): bootstrap a cleaner caption dataset from noisy web pairs.

A captioner (a BLIP image-grounded decoder) writes one synthetic caption per image by nucleus sampling, and a
filter (a BLIP image-grounded encoder) keeps a pair, web caption or synthetic, only when its ITM head says the text
matches the image. Each web caption and the synthetic caption are judged separately.

    python -m crossmodal.data.capfilt csv:/data/web.csv --captioner CAP_RUN/checkpoint.pt --filter FILT_RUN/checkpoint.pt \
        --out /data/capfilt
    python -m crossmodal.data.capfilt wds:/data/cc3m/{00000..00331}.tar --format wds --out /data/cc3m_capfilt --device cuda \
        --captioner-model BLIP-base --captioner-pretrained model_base_caption_capfilt_large.pth \
        --filter-model BLIP-base --filter-pretrained model_base_retrieval_coco.pth --vocab vocab.txt

The input is any spec with captions (data/__init__.py: shapes, coco, csv, imagefolder, wds), read in order and
in batches, never whole. The output is a dataset train.py reads as `data.train`:
    --format csv   OUT/pairs.csv, columns filepath, caption, source (web | synthetic), itm (the filter's match
                   probability); images that exist as files are referenced by absolute path, the others (shapes,
                   wds records) are written to OUT/images/ (original bytes; PNG for generated images)
    --format wds   OUT/{00000..}.tar shards as data/make_shards.py writes them (image, `.txt` caption), plus a
                   `.json` member with source, itm and the source image's key
OUT/capfilt.json holds the counts and the settings. A dataset with several captions per image (COCO) gets one
synthetic caption per image, not per caption.

Settings as BLIP's: nucleus sampling with top_p 0.9 and repetition penalty 1.1 (BLIP_Decoder.generate's sampling
mode, which also keeps HuggingFace's top_k 50) after the prompt "a picture of ", which is not part of the caption;
a pair is kept when P(match) = softmax(ITM logits)[1] > 0.5, i.e. when the ITM head prefers "match", as the paper
says. Deliberate differences: max/min length 20/5 tokens with the prompt (BLIP's captioning evaluation; its
generate defaults to 30/10), sampling is seeded (--seed; the same seed, batch size and device give the same
captions), and an empty synthetic caption is not kept (the filter never sees it).
"""
import argparse
import csv
import io
import json
import os
import sys
import time
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, get_worker_info

from crossmodal.config import ConfigError, DataConfig, load_config
from crossmodal.data import _check_captions, _loader, build_dataset
from crossmodal.data.bad_samples import BadSample, clean_caption, open_image
from crossmodal.data.image_files import ImageFiles
from crossmodal.data.make_shards import ShardWriter
from crossmodal.data.transforms import image_transform
from crossmodal.data.webdataset import IMAGE_MEMBERS, WebDataset, check_record, shard_records
from crossmodal.models.blip import BLIP, BLIP_MODELS
from crossmodal import recipes

CSV_COLUMNS = ("filepath", "caption", "source", "itm")


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _prepared(key: str, path: str, data: bytes, extension: str, captions: list[str], image, transforms) -> dict:
    """An image with everything CapFilt needs: its bytes to write, its web captions and each model's input."""
    if extension not in IMAGE_MEMBERS:  # generated images, and formats a shard cannot hold
        data, extension = _png(image), "png"
    inputs = {size: transform(image) for size, transform in transforms.items()}  # size -> (3, size, size)
    return {"key": key, "path": path, "data": data, "extension": extension, "captions": captions, "inputs": inputs}


class GroupedImages(Dataset):
    """A map-style dataset's distinct images in order, each with all its captions (COCO's five go to one image).

    Items: see `_prepared`, or {"bad": message} for an image that cannot be read."""

    def __init__(self, dataset: Dataset, transforms: dict):
        self.dataset, self.transforms = dataset, transforms
        if isinstance(dataset, ImageFiles):
            self.captions = [[] for _ in dataset.image_paths]
            for text, image in zip(dataset.texts, dataset.image_of):
                self.captions[image].append(text)

    def __len__(self) -> int:
        return len(self.captions) if isinstance(self.dataset, ImageFiles) else len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        try:
            if not isinstance(self.dataset, ImageFiles):  # images without files (shapes): one caption each
                item = self.dataset[index]
                return _prepared(item["key"], "", b"", "", [item["caption"]], item["image"], self.transforms)
            path = self.dataset.image_paths[index]
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as error:
                raise BadSample(path, "missing file" if isinstance(error, FileNotFoundError) else str(error))
            image = open_image(data, path)
            extension = os.path.splitext(path)[1].lstrip(".").lower()
            return _prepared(path, path, data, extension, self.captions[index], image, self.transforms)
        except BadSample as error:
            return {"bad": str(error)}


class ShardImages(IterableDataset):
    """WebDataset shards' records in order, one image and caption each; DataLoader worker w of W reads shards
    w, w + W, ... Items as GroupedImages'."""

    def __init__(self, shards: list[str], transforms: dict):
        self.shards, self.transforms = shards, transforms

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        for shard in self.shards[worker_id::num_workers]:
            for record in shard_records(shard):
                try:
                    if isinstance(record, BadSample):
                        raise record
                    where = f"{shard}:{record['__key__']}"
                    extension = check_record(record, where)
                    caption = clean_caption(record["txt"], where)
                    image = open_image(record[extension], where)
                    yield _prepared(where, "", record[extension], extension, [caption], image, self.transforms)
                except BadSample as error:
                    yield {"bad": str(error)}


def _collate(items: list[dict]) -> dict:
    good = [item for item in items if "bad" not in item]
    inputs = {size: torch.stack([item["inputs"][size] for item in good]) for size in good[0]["inputs"]} if good else {}
    return {"items": good, "inputs": inputs, "bad": [item["bad"] for item in items if "bad" in item]}


def image_loader(spec: str, transforms: dict, image_size: int, batch_size: int, workers: int, limit: int | None,
                 options: DataConfig) -> tuple[DataLoader, int | None]:
    """(in-order batches of the spec's distinct images, how many images that is; None for a stream)."""
    _check_captions(spec, "capfilt of")
    dataset = build_dataset(spec, image_size, options=options)
    if isinstance(dataset, WebDataset):
        images, total = ShardImages(dataset.shards, transforms), limit
    else:
        images = GroupedImages(dataset, transforms)
        if limit is not None and limit < len(images):
            images = Subset(images, range(limit))
        total = len(images)
    loader = _loader(images, _collate, workers, batch_size=batch_size)  # workers shut down with the run
    return loader, total


@torch.no_grad()
def match_probabilities(model: BLIP, images: torch.Tensor, texts: list[str], image_of: list[int],
                        batch_size: int) -> torch.Tensor:
    """P(match) (P,) of the pairs (images[image_of[p]], texts[p]) by the ITM head: softmax(itm_logits)[:, 1], with
    each image through the ViT once (as eval.py's ITM re-ranking)."""
    image_tokens = model.forward_image(images)  # (B, 1 + HW, vision_width)
    probabilities = []
    for start in range(0, len(texts), batch_size):
        tokens = model.tokenizer(texts[start : start + batch_size]).to(images.device)  # (P', L)
        owners = torch.tensor(image_of[start : start + batch_size], device=images.device)
        states = model.forward_multimodal(tokens, image_tokens[owners])  # (P', L, text_width)
        logits = model.part("itm_head")(states[:, 0]).float()  # (P', 2)
        probabilities.append(logits.softmax(dim=-1)[:, 1].cpu())
    return torch.cat(probabilities) if probabilities else torch.zeros(0)


class CsvOutput:
    """OUT/pairs.csv (under a temporary name until closed) and OUT/images/ for images that had no file."""

    def __init__(self, out_dir: str):
        self.out_dir, self.path = out_dir, os.path.join(out_dir, "pairs.csv")
        os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
        self.file = open(self.path + ".tmp", "w", newline="", encoding="utf-8")
        self.writer = csv.writer(self.file)
        self.writer.writerow(CSV_COLUMNS)
        self.spec = f"csv:{self.path}"

    def write(self, index: int, image: dict, pairs: list[tuple[str, str, float]]) -> None:
        if image["path"]:
            filepath = os.path.abspath(image["path"])
        else:
            filepath = f"images/{index:09d}.{image['extension']}"  # relative: the CSV's folder is the root
            with open(os.path.join(self.out_dir, filepath), "wb") as f:
                f.write(image["data"])
        for caption, source, probability in pairs:
            self.writer.writerow([filepath, caption, source, f"{probability:.4f}"])

    def close(self) -> None:
        self.file.close()
        os.replace(self.path + ".tmp", self.path)


class ShardOutput:
    """OUT/{00000..}.tar: one sample per kept pair (the image repeated for each of its kept captions)."""

    def __init__(self, out_dir: str, shard_size: int):
        self.shards, self.count, self.out_dir = ShardWriter(out_dir, shard_size), 0, out_dir

    def write(self, index: int, image: dict, pairs: list[tuple[str, str, float]]) -> None:
        for caption, source, probability in pairs:
            about = {"source": source, "itm": round(probability, 4), "image": image["key"]}
            self.shards.write(f"{self.count:09d}", {image["extension"]: image["data"], "txt": caption.encode("utf-8"),
                                                    "json": json.dumps(about).encode("utf-8")})
            self.count += 1

    def close(self) -> None:
        self.shards.close()

    @property
    def spec(self) -> str:
        return f"wds:{os.path.join(self.out_dir, f'{{00000..{max(len(self.shards.shards), 1) - 1:05d}}}.tar')}"


class Counts:
    """Kept / judged per kind of caption, images read and unreadable, and a progress line with images/s and ETA."""

    def __init__(self, total: int | None):
        self.total, self.start = total, time.time()
        self.images = self.bad = self.pairs = self.written_images = 0
        self.kept = {"web": 0, "synthetic": 0}
        self.judged = {"web": 0, "synthetic": 0}

    def kept_line(self) -> str:
        return ", ".join(f"{kind} {self.kept[kind]}/{self.judged[kind]}" for kind in self.kept)

    def progress_line(self) -> str:
        seconds = max(time.time() - self.start, 1e-9)
        rate = (self.images + self.bad) / seconds
        done = f"{self.images + self.bad}/{self.total}" if self.total else f"{self.images + self.bad}"
        eta = f", ETA {(self.total - self.images - self.bad) / max(rate, 1e-9) / 60:.1f} min" if self.total else ""
        return f"capfilt: {done} images, {rate:.1f} images/s{eta}; kept {self.kept_line()}"

    def summary(self) -> dict:
        seconds = time.time() - self.start
        return {"images": self.images, "bad_images": self.bad, "web_kept": self.kept["web"],
                "web_total": self.judged["web"], "synthetic_kept": self.kept["synthetic"],
                "synthetic_total": self.judged["synthetic"], "pairs": self.pairs,
                "images_written": self.written_images, "seconds": round(seconds, 2),
                "images_per_second": round((self.images + self.bad) / max(seconds, 1e-9), 2)}


def load_model(checkpoint: str | None, name: str | None, pretrained: str | None, vocab: str | None, device: str,
               role: str) -> BLIP:
    """A BLIP from a train.py checkpoint or from released weights (as eval.py loads them)."""
    if bool(checkpoint) == bool(name) or bool(name) != bool(pretrained):
        raise ValueError(f"give either --{role} RUN/checkpoint.pt or --{role}-model NAME with --{role}-pretrained FILE")
    if checkpoint:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"--{role}: no file at '{checkpoint}'")
        _, model, _ = recipes.load_run(checkpoint, device)
    else:
        if name not in BLIP_MODELS:
            raise ValueError(f"--{role}-model {name} is not a BLIP preset; CapFilt's {role} is one of "
                             f"{', '.join(BLIP_MODELS)}")
        _, model, _ = recipes.load_released(name, pretrained, device, vocab=vocab)
    source = checkpoint or pretrained
    if not isinstance(model, BLIP):
        raise ValueError(f"--{role} {source} is a CLIP run; CapFilt's {role} is a BLIP model")
    needs = {"captioner": ("text_decoder",), "filter": ("text_encoder", "itm_head")}[role]
    missing = [part for part in needs if getattr(model, part) is None]
    if missing:
        raise ValueError(f"--{role} {source} has no {', '.join(missing)}, which the {role} needs (released task "
                         f"checkpoints hold only their task's parts)")
    return model


def check_settings(out: str, threshold: float, top_p: float, batch_size: int, limit: int | None) -> None:
    """Raise ValueError, naming the option, for settings that cannot work (before any model is loaded)."""
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"--threshold must be in [0, 1) (a match probability), got {threshold}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
    if batch_size < 1 or (limit is not None and limit < 1):
        raise ValueError(f"--batch-size and --limit must be at least 1, got {batch_size} and {limit}")
    existing = [name for name in ("pairs.csv", "00000.tar") if os.path.exists(os.path.join(out, name))]
    if existing:
        raise ValueError(f"--out {out} already holds a dataset ({existing[0]}); choose another folder")


def capfilt(spec: str, captioner: BLIP, filter_model: BLIP, out: str, output_format: str = "csv",
            threshold: float = 0.5, top_p: float = 0.9, repetition_penalty: float = 1.1, max_length: int = 20,
            min_length: int = 5, prompt: str = "a picture of ", seed: int = 0, batch_size: int = 64,
            workers: int = 0, limit: int | None = None, shard_size: int = 10000, device: str = "cpu",
            log_every: int = 10, options: DataConfig | None = None) -> dict:
    """Write the bootstrapped dataset to `out`; returns the counts (see Counts.summary) and `output`, its spec."""
    check_settings(out, threshold, top_p, batch_size, limit)
    options = options or DataConfig()
    sizes = (captioner.visual_encoder.image_size, filter_model.visual_encoder.image_size)
    transforms = {size: image_transform(size, train=False) for size in sizes}
    loader, total = image_loader(spec, transforms, options.image_size or max(sizes), batch_size, workers, limit,
                                 options)
    writer = CsvOutput(out) if output_format == "csv" else ShardOutput(out, shard_size)
    generator = torch.Generator(device=device).manual_seed(seed)
    counts = Counts(total)
    for step, batch in enumerate(loader, 1):
        counts.bad += len(batch["bad"])
        for message in batch["bad"]:
            print(f"capfilt: left out an unreadable image: {message}", file=sys.stderr)
        images = batch["items"]
        if limit is not None and total is None:  # a stream: stop after `limit` images
            images = images[: max(limit - counts.images - counts.bad, 0)]
        if images:
            captioner_images = batch["inputs"][sizes[0]][: len(images)].to(device)
            synthetic = captioner.generate(captioner_images, prompt=prompt, num_beams=1, max_length=max_length,
                                           min_length=min_length, top_p=top_p, repetition_penalty=repetition_penalty,
                                           generator=generator)
            texts, image_of, kinds = [], [], []
            for i, (image, caption) in enumerate(zip(images, synthetic)):
                for text, kind in [*((web, "web") for web in image["captions"]), (caption.strip(), "synthetic")]:
                    counts.judged[kind] += 1
                    if text:  # an empty synthetic caption is not a pair
                        texts.append(text)
                        image_of.append(i)
                        kinds.append(kind)
            filter_images = batch["inputs"][sizes[1]][: len(images)].to(device)
            probabilities = match_probabilities(filter_model, filter_images, texts, image_of, batch_size).tolist()
            kept = [[] for _ in images]
            for text, i, kind, probability in zip(texts, image_of, kinds, probabilities):
                if probability > threshold:
                    kept[i].append((text, kind, probability))
                    counts.kept[kind] += 1
            for image, pairs in zip(images, kept):
                if pairs:
                    writer.write(counts.images, image, pairs)
                    counts.pairs += len(pairs)
                    counts.written_images += 1
                counts.images += 1
        if log_every and step % log_every == 0:
            print(counts.progress_line(), flush=True)
        if limit is not None and counts.images + counts.bad >= limit:
            break
    writer.close()
    if counts.images == 0:
        raise ValueError(f"no readable image in {spec}" + (f" ({counts.bad} unreadable)" if counts.bad else ""))
    return {**counts.summary(), "output": writer.spec}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", help="dataset spec to bootstrap, e.g. csv:/data/web.csv (data/__init__.py)")
    parser.add_argument("--out", required=True, help="folder the new dataset is written to")
    parser.add_argument("--format", default="csv", choices=("csv", "wds"), help="pairs.csv or tar shards")
    for role, what in (("captioner", "writes the synthetic captions"), ("filter", "judges every pair by ITM")):
        parser.add_argument(f"--{role}", help=f"the train.py checkpoint.pt of the BLIP model that {what}")
        parser.add_argument(f"--{role}-model", help="or a BLIP preset (e.g. BLIP-base) for released weights")
        parser.add_argument(f"--{role}-pretrained", help=f"with --{role}-model: salesforce .pth or HuggingFace weights")
    parser.add_argument("--vocab", help="with released weights: BERT's vocab.txt (default: next to the weights)")
    parser.add_argument("--threshold", type=float, default=0.5, help="keep a pair when its ITM P(match) is above this")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling of the synthetic captions")
    parser.add_argument("--repetition-penalty", type=float, default=1.1)
    parser.add_argument("--max-length", type=int, default=20, help="caption tokens, prompt included")
    parser.add_argument("--min-length", type=int, default=5, help="caption tokens, prompt included")
    parser.add_argument("--prompt", default="a picture of ", help="the captioner's prompt, not part of the caption")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampling")
    parser.add_argument("--limit", type=int, help="only the first N images of the input")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader processes reading and decoding images")
    parser.add_argument("--shard-size", type=int, default=10000, help="--format wds: samples per shard")
    parser.add_argument("--log-every", type=int, default=10, help="progress line every N batches (0: none)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="autocast dtype")
    parser.add_argument("--device", default="cpu")
    args, overrides = parser.parse_known_args(argv)
    if any(not arg.startswith("--data.") for arg in overrides if arg.startswith("--")):
        parser.error(f"unrecognised arguments: {' '.join(overrides)} (only --data.KEY=VALUE overrides are passed on)")
    try:
        options = load_config(None, overrides).data
        check_settings(args.out, args.threshold, args.top_p, args.batch_size, args.limit)
        captioner = load_model(args.captioner, args.captioner_model, args.captioner_pretrained, args.vocab,
                               args.device, "captioner")
        filter_model = load_model(args.filter, args.filter_model, args.filter_pretrained, args.vocab, args.device,
                                  "filter")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
        with torch.autocast(torch.device(args.device).type, dtype, enabled=dtype is not None):
            results = capfilt(args.spec, captioner, filter_model, args.out, args.format, args.threshold, args.top_p,
                              args.repetition_penalty, args.max_length, args.min_length, args.prompt, args.seed,
                              args.batch_size, args.workers, args.limit, args.shard_size, args.device,
                              args.log_every, options)
    except (FileNotFoundError, ConfigError, ValueError) as error:  # bad input: say what, not a traceback
        sys.exit(f"capfilt: {error}")
    names = ("captioner", "captioner_model", "captioner_pretrained", "filter", "filter_model", "filter_pretrained",
             "threshold", "top_p", "repetition_penalty", "max_length", "min_length", "prompt", "seed", "limit",
             "batch_size", "format")
    settings = {"data": args.spec, **{name: getattr(args, name) for name in names}}
    with open(os.path.join(args.out, "capfilt.json"), "w") as f:
        json.dump({**settings, **results}, f, indent=2)
    web, synthetic = (f"{results[f'{kind}_kept']}/{results[f'{kind}_total']}" for kind in ("web", "synthetic"))
    print(f"kept {web} web captions and {synthetic} synthetic captions of {results['images']} images"
          + (f" ({results['bad_images']} unreadable images left out)" if results["bad_images"] else "")
          + f"; {results['images_per_second']:.1f} images/s")
    if results["pairs"]:
        print(f"wrote {results['pairs']} pairs of {results['images_written']} images; train with "
              f"'--data.train={results['output']}'")
    else:
        print(f"no pair passed the filter (--threshold {args.threshold}): nothing to train on", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
