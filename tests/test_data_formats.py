"""Real-data formats (coco, csv, imagefolder, wds shards) built on the fly, broken samples of every kind,
the exactly-once split of shards over ranks and workers, make_shards round trips, and train.py on each."""
import io
import json
import os
import re
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from crossmodal import train
from crossmodal.data import (Collate, GlobalBatchSampler, ImageTextDataset, build_dataset, captions, eval_loader,
                  retrieval_loader, train_loader)
from crossmodal.data.bad_samples import MIN_BAD_TO_STOP, BadSample, BadSampleCount, too_many
from crossmodal.data.make_shards import main as make_shards_main
from crossmodal.data.transforms import OPENAI_STD, image_transform
from crossmodal.data.tokenizer import SentencePieceTokenizer
from crossmodal.data.webdataset import (WebDataset, decompressed, expand_braces, expand_shards, iter_tar_members,
                              shard_records)
from tests.multiprocess import run_on_processes
from tests.test_train import CONFIG, small_run, tokenizer_path  # noqa: F401  (module-scoped fixture)

COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]


def jpeg_bytes(i: int, size: int = 40, format: str = "JPEG") -> bytes:
    image = Image.new("RGB", (size, size + i % 3), (40 * (i % 6), 255 - 20 * (i % 12), 60))
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def caption(i: int) -> str:
    return f"a {COLORS[i % 6]} square number {i}"


def write_images(folder, count: int, prefix: str = "img") -> list[str]:
    os.makedirs(folder, exist_ok=True)
    names = []
    for i in range(count):
        name = f"{prefix}{i:03d}." + ("png" if i % 4 == 3 else "jpg")
        with open(os.path.join(folder, name), "wb") as f:
            f.write(jpeg_bytes(i, format="PNG" if name.endswith("png") else "JPEG"))
        names.append(name)
    return names


def break_images(folder, names: list[str]) -> dict[str, str]:
    """Damage three images (truncated, corrupt, zero-byte) and forget one: {name: what was done}."""
    damage = {names[2]: "truncated", names[6]: "corrupt", names[10]: "zero-byte", names[14]: "missing"}
    for name, kind in damage.items():
        path = os.path.join(folder, name)
        data = open(path, "rb").read()
        if kind == "missing":
            os.remove(path)
            continue
        with open(path, "wb") as f:
            f.write({"truncated": data[: len(data) // 2], "corrupt": b"\x00garbage" * 50, "zero-byte": b""}[kind])
    return damage


def write_csv(path, rows: list[str], header: str = "filepath,caption") -> str:
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("\n".join([header, *rows]) + "\n")
    return str(path)


@pytest.fixture
def csv_dataset(tmp_path):
    """20 pairs (4 damaged images) plus 3 malformed rows; returns (path, damaged names)."""
    names = write_images(tmp_path / "images", 20)
    rows = [f"images/{name},{caption(i)}" for i, name in enumerate(names)]
    rows.insert(5, "images/img005.jpg,too,many,columns")  # line 7
    rows.insert(9, "images/img008.jpg,   ")  # line 11: empty caption
    rows.append("images/img001.jpg")  # line 24: too few columns
    damaged = break_images(tmp_path / "images", names)
    return write_csv(tmp_path / "pairs.csv", rows), damaged


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path) -> SentencePieceTokenizer:  # noqa: F811
    return SentencePieceTokenizer(tokenizer_path, context_length=16)


def write_shards(folder, sizes: list[int]) -> list[str]:
    """Shards of good samples, `sizes[s]` in shard s; keys are sample numbers over all shards."""
    os.makedirs(folder, exist_ok=True)
    paths, i = [], 0
    for s, size in enumerate(sizes):
        path = os.path.join(folder, f"{s:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for _ in range(size):
                add_member(tar, f"{i:06d}.jpg", jpeg_bytes(i))
                add_member(tar, f"{i:06d}.txt", caption(i).encode())
                i += 1
        paths.append(path)
    return paths


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def keys_of(dataset) -> list[str]:
    return [item["key"].rsplit(":", 1)[1] for item in dataset]


# ---------------------------------------------------------------- csv


def test_csv_leaves_out_malformed_rows_with_their_line_numbers(csv_dataset):
    path, _ = csv_dataset
    dataset = build_dataset(f"csv:{path}")
    assert len(dataset) == 20 and len(dataset.image_paths) == 20
    assert dataset.texts[0] == caption(0) and dataset.image_of == list(range(20))
    skipped = dataset.skipped_rows
    assert (skipped.bad, skipped.seen) == (3, 23)
    assert [re.search(r"line (\d+)", e).group(1) for e in skipped.examples] == ["7", "11", "24"]
    assert "4 columns, the header has 2" in skipped.examples[0] and "empty caption" in skipped.examples[1]
    assert dataset.where(5) == f"{path} line 8 ({os.path.dirname(path)}/images/img005.jpg)"


def test_csv_columns_separator_image_root_and_shared_images(tmp_path):
    names = write_images(tmp_path / "elsewhere", 3)
    rows = [f"{caption(i)}\t{name}\t{i}" for i, name in enumerate(names)] + [f"another caption\t{names[0]}\t9"]
    path = write_csv(tmp_path / "pairs.tsv", rows, header="text\timage\tscore")
    options = train.load_config(None, ["--data.csv_image_key=image", "--data.csv_caption_key=text",
                                       f"--data.image_root={tmp_path / 'elsewhere'}"]).data
    dataset = build_dataset(f"csv:{path}", options=options)  # tab sniffed from the header
    assert len(dataset) == 4 and dataset.image_of == [0, 1, 2, 0] and dataset[3]["caption"] == "another caption"
    assert dataset[1]["image"].size == (40, 41)
    with pytest.raises(ValueError, match=r"has no column 'filepath' \(data.csv_image_key\); its columns: text, image"):
        build_dataset(f"csv:{path}")
    bad_bytes = tmp_path / "latin1.csv"
    bad_bytes.write_bytes(b"filepath,caption\nimg000.jpg,caf\xe9\nimg001.jpg,ok\n")
    dataset = build_dataset(f"csv:{bad_bytes}")
    assert dataset.texts == ["ok"] and "line 2" in dataset.skipped_rows.examples[0]
    assert "not UTF-8" in dataset.skipped_rows.examples[0]


# ---------------------------------------------------------------- coco


def coco_captions(tmp_path, count: int = 6) -> str:
    names = write_images(tmp_path / "train2017", count)
    tree = {
        "images": [{"id": 100 + i, "file_name": f"train2017/{name}"} for i, name in enumerate(names)]
        + [{"id": 999}],  # no file_name
        "annotations": [{"image_id": 100 + i % count, "caption": caption(i)} for i in range(2 * count)]
        + [{"image_id": 12345, "caption": "unknown image"}, {"image_id": 100, "caption": ""}, {"caption": "x"}],
    }
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(tree))
    return str(path)


def karpathy(tmp_path) -> str:
    names = write_images(tmp_path / "val2014", 10)
    splits = ["train", "train", "restval", "val", "test", "test", "test", "train", "restval", "test"]
    images = [
        {"filepath": "val2014", "filename": name, "split": split,
         "sentences": [{"raw": f"{caption(i)} take {k}"} for k in range(5 if i != 5 else 6)]}
        for i, (name, split) in enumerate(zip(names, splits))
    ]
    images.append({"split": "test", "sentences": []})  # no filename
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return str(path)


def test_coco_captions_format(tmp_path):
    path = coco_captions(tmp_path)
    dataset = build_dataset(f"coco:{path}")
    assert len(dataset) == 12 and len(dataset.image_paths) == 6
    assert dataset.image_of[:7] == [0, 1, 2, 3, 4, 5, 0] and dataset[6]["caption"] == caption(6)
    assert dataset[0]["key"] == os.path.join(str(tmp_path), "train2017", "img000.jpg")
    assert dataset.skipped_rows.bad == 4  # the image without a file name and 3 annotations
    assert any("image_id 12345 is not in 'images'" in e for e in dataset.skipped_rows.examples)
    assert list(captions(f"coco:{path}", limit=3)) == [caption(i) for i in range(3)]


def test_karpathy_splits_and_retrieval_mapping(tmp_path, tokenizer):
    path = karpathy(tmp_path)
    test = build_dataset(f"coco:{path}#test")
    assert len(test.image_paths) == 4 and len(test) == 21  # image 5 has six captions
    assert build_dataset(f"coco:{path}#train+restval").image_paths[2].endswith(os.path.join("val2014", "img002.jpg"))
    with pytest.raises(ValueError, match=r"name a split.*splits: restval, test, train, val"):
        build_dataset(f"coco:{path}")
    with pytest.raises(ValueError, match=r"has no split 'tset'"):
        build_dataset(f"coco:{path}#tset")

    images, tokens, text_to_image = retrieval_loader(f"coco:{path}#test", 32, tokenizer, batch_size=3)
    assert tokens.shape == (21, 16) and tokens.dtype == torch.long
    assert text_to_image.tolist() == [0] * 5 + [1] * 6 + [2] * 5 + [3] * 5
    batches = list(images)
    assert [len(b["image"]) for b in batches] == [3, 1] and batches[0]["image"].shape[1:] == (3, 32, 32)
    assert batches[1]["key"] == [test.image_paths[3]] and sum(b["bad"].sum() for b in batches) == 0
    os.remove(test.image_paths[1])  # an unreadable image is replaced by the next one and counted
    batches = list(retrieval_loader(f"coco:{path}#test", 32, tokenizer, batch_size=4)[0])
    assert batches[0]["key"][1] == test.image_paths[1] and batches[0]["bad"].tolist() == [0, 1, 0, 0]
    # shapes: one caption per image, the identity mapping
    images, tokens, text_to_image = retrieval_loader("shapes:val:5", 32, tokenizer, batch_size=4)
    assert text_to_image.tolist() == list(range(5)) and len(tokens) == 5


# ---------------------------------------------------------------- imagefolder


def test_imagefolder_classes_labels_and_errors(tmp_path, tokenizer):
    for folder in ("tabby_cat", "dog", "empty_class"):
        os.makedirs(tmp_path / "root" / folder)
    write_images(tmp_path / "root" / "tabby_cat" / "nested", 2, prefix="c")
    write_images(tmp_path / "root" / "dog", 3, prefix="d")
    (tmp_path / "root" / "dog" / "notes.txt").write_text("not an image")
    dataset = build_dataset(f"imagefolder:{tmp_path / 'root'}")
    assert dataset.folders == ["dog", "tabby_cat"] and dataset.empty_folders == ["empty_class"]
    assert dataset.classnames == ["dog", "tabby cat"]
    assert [dataset[i]["label"] for i in range(len(dataset))] == [0, 0, 0, 1, 1]
    assert dataset[4]["caption"] == "tabby cat"

    base, loader = eval_loader(f"imagefolder:{tmp_path / 'root'}", 32, tokenizer)
    batch = next(iter(loader))
    assert base.classnames == dataset.classnames and batch["label"].tolist() == [0, 0, 0, 1, 1]
    assert batch["tokens"].shape == (5, 16)
    os.makedirs(tmp_path / "nothing" / "a")
    with pytest.raises(ValueError, match=f"no images under '{re.escape(str(tmp_path / 'nothing'))}'"):
        build_dataset(f"imagefolder:{tmp_path / 'nothing'}")


def test_captions_come_without_decoding_images(tmp_path):
    shapes = build_dataset("shapes:train:4", seed=2)
    assert list(captions("shapes:train:4", seed=2)) == [shapes[i]["caption"] for i in range(4)]
    path = write_csv(tmp_path / "pairs.csv", [f"gone{i}.jpg,{caption(i)}" for i in range(5)])  # no image exists
    assert list(captions(f"csv:{path}", limit=3)) == [caption(i) for i in range(3)]


def test_jpeg_draft_decodes_at_a_reduced_scale_that_still_covers_the_input_size(tmp_path):
    Image.new("RGB", (256, 200), (200, 30, 30)).save(tmp_path / "big.jpg")
    path = write_csv(tmp_path / "pairs.csv", ["big.jpg,a red picture"])
    options = train.load_config(None, []).data
    assert options.jpeg_draft  # the default, for training
    assert build_dataset(f"csv:{path}", image_size=48, options=options)[0]["image"].size == (256, 200)  # not training
    image = build_dataset(f"csv:{path}", image_size=48, options=options, train=True)[0]["image"]
    assert image.size == (64, 50) and image.info["full_size"] == (256, 200)  # 1/4 scale
    options = train.load_config(None, ["--data.jpeg_draft=false"]).data
    assert build_dataset(f"csv:{path}", image_size=48, options=options, train=True)[0]["image"].size == (256, 200)


def photo_jpegs(folder, count: int, seed: int = 0) -> list[str]:
    """JPEGs of COCO's and web images' sizes: smooth colour fields plus noise (compress like photos)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    names = []
    for i, (width, height) in zip(range(count), [(640, 480), (480, 640), (1024, 768), (500, 375)] * count):
        coarse = Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)).resize((width, height),
                                                                                              Image.BICUBIC)
        noisy = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, size=(height, width, 3))
        names.append(f"photo{i}.jpg")
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(os.path.join(folder, names[-1]), quality=90)
    return names


@pytest.mark.parametrize("kind", ["csv", "coco", "imagefolder", "wds"])
def test_training_decodes_jpegs_small_with_the_same_crops(tmp_path, tokenizer, kind):
    """data.jpeg_draft (the default) changes how much of a JPEG is decoded, not what a training sample shows:
    the crop is drawn on the full size, so the batch equals a full decode's within resampling differences
    (mean under 1.5/255, no pixel off by more than 12/255: docs/results.md, "Data loading")."""
    names = photo_jpegs(tmp_path / "images" / "photos", 4)
    rows = [f"images/photos/{name},{caption(i)}" for i, name in enumerate(names)]
    spec = "csv:" + write_csv(tmp_path / "pairs.csv", rows)
    if kind == "coco":
        tree = {"images": [{"id": i, "file_name": f"images/photos/{n}"} for i, n in enumerate(names)],
                "annotations": [{"image_id": i, "caption": caption(i)} for i in range(len(names))]}
        (tmp_path / "captions.json").write_text(json.dumps(tree))
        spec = f"coco:{tmp_path / 'captions.json'}"
    elif kind == "imagefolder":
        spec = f"imagefolder:{tmp_path / 'images'}"
    elif kind == "wds":
        make_shards_main([spec, "--out", str(tmp_path / "shards"), "--shard-size", "4"])
        spec = f"wds:{tmp_path / 'shards'}"

    def first_batch(draft: bool) -> dict:
        cfg = train.load_config(None, [f"--data.train={spec}", "--data.image_size=112", "--data.workers=0",
                                       "--train.batch_size=4", "--train.steps=1", f"--data.jpeg_draft={draft}"])
        return next(iter(train_loader(cfg, tokenizer, rank=0, world_size=1)))

    drafted, full = first_batch(True), first_batch(False)
    assert drafted["key"] == full["key"]
    difference = (drafted["image"] - full["image"]) * torch.tensor(OPENAI_STD).view(3, 1, 1)  # in [0, 1] units
    assert 0 < difference.abs().mean() < 1.5 / 255 and difference.abs().max() < 12 / 255


# ---------------------------------------------------------------- bad samples in map-style datasets


def test_bad_images_are_replaced_by_the_next_index_and_counted(csv_dataset, tokenizer):
    path, damaged = csv_dataset
    base = build_dataset(f"csv:{path}")
    dataset = ImageTextDataset(base, image_transform(32, train=True))
    item = dataset[(0, 2)]  # img002 is truncated: img003 fills the slot, the caption follows the image
    assert item["bad"] == 1 and "img002.jpg" in item["bad_examples"][0] and "line 4" in item["bad_examples"][0]
    assert item["key"].endswith("img003.png") and item["image"].shape == (3, 32, 32)
    assert "missing file" in dataset[(0, 14)]["bad_examples"][0]
    sampler = GlobalBatchSampler(len(dataset), batch_size=4, steps=5, seed=1)  # exactly one epoch
    batches = list(DataLoader(dataset, batch_sampler=sampler, collate_fn=Collate(tokenizer)))
    assert all(len(b["image"]) == len(b["tokens"]) == 4 for b in batches)
    count = BadSampleCount()
    for batch in batches:
        count.add_batch(batch)
    assert (count.bad, count.seen) == (len(damaged), 20)  # each bad sample counted once per epoch
    reasons = " ".join(e for b in batches for e in b["bad_examples"])
    assert {"cannot decode image", "missing file"} <= set(re.findall(r"cannot decode image|missing file", reasons))


def test_stop_rule_needs_a_fraction_and_a_minimum_count():
    assert not too_many(1, 17, 0.01)  # one stray bad sample in a young run
    assert not too_many(MIN_BAD_TO_STOP, 100 * MIN_BAD_TO_STOP, 0.01)
    assert too_many(MIN_BAD_TO_STOP, 10 * MIN_BAD_TO_STOP, 0.01)


def _count_on_rank(rank, world_size):
    count = BadSampleCount()
    count.add(rank + 1, 10 * (rank + 1), [f"rank{rank}.jpg: missing file"])
    return count.summed_over_ranks()


def test_bad_counts_are_summed_over_ranks():
    results = run_on_processes(_count_on_rank, 2)
    for total in results:
        assert (total.bad, total.seen) == (3, 30)
        assert total.examples == ["rank0.jpg: missing file", "rank1.jpg: missing file"]


# ---------------------------------------------------------------- webdataset shards


def test_brace_glob_and_directory_patterns(tmp_path):
    shards = write_shards(tmp_path / "s", [1, 1, 1])
    assert expand_braces("x{1..3}") == ["x1", "x2", "x3"] and expand_braces("{a,b}{08..10}")[-1] == "b10"
    pattern = str(tmp_path / "s" / "{00000..00002}.tar")
    assert expand_shards(pattern) == shards == expand_shards(str(tmp_path / "s" / "*.tar"))
    assert expand_shards(str(tmp_path / "s")) == shards
    assert expand_shards(shards[1]) == [shards[1]]


def key_only(item: dict) -> str:
    return item["key"]


def test_every_sample_is_read_once_per_epoch_over_ranks_and_workers(tmp_path):
    shards = write_shards(tmp_path, [5, 3, 8, 1, 6, 4, 7])  # uneven: 34 samples in 7 shards
    everything = {f"{i:06d}" for i in range(34)}
    stream = WebDataset(shards, seed=3, shuffle_buffer=4)
    orders = []
    for epoch in range(2):
        records = [record for reader in range(4) for record in stream.records(epoch, reader, 4)]
        keys = [record["__key__"].rsplit(":", 1)[1] for record in records]
        assert sorted(keys) == sorted(everything)  # 2 ranks x 2 workers = 4 readers: no sample twice or missed
        orders.append(keys)
    assert orders[0] != orders[1]  # shard order and buffer reshuffled each epoch
    assert [stream.reader_shards(0, r, 4) for r in range(4)] == [stream.reader_shards(0, r, 4) for r in range(4)]

    read = []
    for rank in range(2):  # real DataLoader workers; ranks one after the other
        dataset = WebDataset(shards, rank=rank, world_size=2, seed=3, shuffle_buffer=4, epochs=1)
        loader = DataLoader(dataset, batch_size=None, num_workers=2, collate_fn=key_only)
        read += [key.rsplit(":", 1)[1] for key in loader]
    assert len(read) == 34 and set(read) == everything


def test_broken_shards_and_records_are_skipped_and_counted(tmp_path):
    shards = write_shards(tmp_path, [4, 4])
    with tarfile.open(tmp_path / "00002.tar", "w") as tar:
        add_member(tar, "a.jpg", jpeg_bytes(1))  # no caption
        add_member(tar, "b.txt", b"no image")  # no image
        add_member(tar, "c.jpg", jpeg_bytes(2)[:100])  # truncated image
        add_member(tar, "c.txt", b"truncated")
        add_member(tar, "d.png", jpeg_bytes(3, format="PNG"))
        add_member(tar, "d.txt", b"  ")  # empty caption
        add_member(tar, "e.webp", jpeg_bytes(4, format="WEBP"))
        add_member(tar, "e.txt", b"\xff\xfe not utf-8")
        add_member(tar, "f.jpeg", jpeg_bytes(5))
        add_member(tar, "f.txt", "a good one".encode())
    open(tmp_path / "00003.tar", "wb").close()  # zero bytes
    with tarfile.open(shards[1]) as tar:
        cut = tar.getmembers()[4].offset_data + 50  # inside the third sample's image
    with open(tmp_path / "00004.tar", "wb") as f:
        f.write(open(shards[1], "rb").read()[:cut])
    items = list(WebDataset(expand_shards(str(tmp_path / "{00000..00004}.tar")), shuffle=False, epochs=1))
    keys = [item["key"].rsplit(":", 1)[1] for item in items]
    assert keys == [f"{i:06d}" for i in range(8)] + ["f", "000004", "000005"]  # the cut shard's first two
    examples = [e for item in items for e in item["bad_examples"]]
    assert sum(item["bad"] for item in items) == 7 - 1  # the cut shard's error comes after its last sample
    for expected in ("no caption", "no image", "cannot decode image", "empty caption", "not UTF-8", "empty file"):
        assert any(expected in e for e in examples), expected


def tarfile_members(path) -> list[tuple[str, bytes]]:
    """The reference: (name, data) of each regular file, as tarfile's stream mode (the old reader) gives them."""
    with tarfile.open(path, "r|*") as tar:
        return [(member.name, tar.extractfile(member).read()) for member in tar if member.isfile()]


def our_members(path) -> list[tuple[str, bytes]]:
    with open(path, "rb") as file, decompressed(file) as stream:
        return list(iter_tar_members(stream))


def set_header_fields(path, offset: int, fields: dict[int, bytes], signed: bool = False) -> None:
    """Overwrite byte ranges {start: bytes} of the header at `offset` and write its checksum again."""
    data = bytearray(open(path, "rb").read())
    header = data[offset:offset + 512]
    for start, value in {**fields, 148: b" " * 8}.items():
        header[start:start + len(value)] = value
    checksum = sum(b - 256 if signed and b >= 128 else b for b in header)
    header[148:155] = b"%06o\0" % (checksum & 0o777777 if checksum >= 0 else 0o777777)
    if signed and checksum < 0:
        raise ValueError("a negative signed checksum cannot be written in octal")
    data[offset:offset + 512] = header
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("format, compression", [
    (tarfile.GNU_FORMAT, ""), (tarfile.USTAR_FORMAT, ""), (tarfile.PAX_FORMAT, ""),
    (tarfile.PAX_FORMAT, "gz"), (tarfile.GNU_FORMAT, "bz2"), (tarfile.USTAR_FORMAT, "xz"),
], ids=["gnu", "ustar", "pax", "pax-gz", "gnu-bz2", "ustar-xz"])
def test_tar_reader_matches_tarfile(tmp_path, format, compression):
    long_path = "d" * 60 + "/" + "e" * 60 + ".jpg"  # 125 characters: ustar's prefix/name split
    names = [long_path, "ünïcödé/图像.jpg", "a" * 150 + ".txt"]  # the last needs a GNU long name or a pax path
    path = tmp_path / f"shard.tar{'.' + compression if compression else ''}"
    with tarfile.open(path, f"w:{compression}", format=format, pax_headers={"comment": "a global header"}) as tar:
        add_member(tar, "000000.jpg", jpeg_bytes(0))
        directory = tarfile.TarInfo("some/dir")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for name in names[: 2 if format == tarfile.USTAR_FORMAT else 3]:
            add_member(tar, name, name.encode())
        for size in (0, 1, 511, 512, 513, 3 * 2**20 + 7):  # empty, block edges, and bigger than a read chunk
            add_member(tar, f"some/dir/size{size}.bin", bytes(range(256)) * (size // 256) + b"x" * (size % 256))
        link = tarfile.TarInfo("link.jpg")  # a long link target: a GNU 'K' header or a pax linkpath
        link.type, link.linkname = tarfile.SYMTYPE, "000000.jpg" if format == tarfile.USTAR_FORMAT else "l" * 150
        tar.addfile(link)
        if format == tarfile.PAX_FORMAT:  # the size in a pax record; the header's size field says 0
            info = tarfile.TarInfo("pax_size.txt")
            info.size, info.pax_headers = 5, {"size": "5"}
            tar.addfile(info, io.BytesIO(b"hello"))
    expected = tarfile_members(path)
    pax_size_members = 1 if format == tarfile.PAX_FORMAT else 0
    assert len(expected) == 1 + (2 if format == tarfile.USTAR_FORMAT else 3) + 6 + pax_size_members
    assert our_members(path) == expected
    keys = [record["__key__"] for record in shard_records(str(path))]
    assert keys[:2] == ["000000", "d" * 60 + "/" + "e" * 60] and "some/dir/size512" in keys


def test_tar_reader_reads_what_older_tars_wrote_as_tarfile_does(tmp_path):
    path = tmp_path / "gnu.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        add_member(tar, "a.txt", b"x" * 1000)
        add_member(tar, "é.txt", b"accented")  # bytes >= 128 in the header: the signed sum differs
        for name, kind, data in (("olddir/", tarfile.AREGTYPE, b""), ("contiguous.txt", tarfile.CONTTYPE, b"data")):
            info = tarfile.TarInfo(name)  # a V7 directory: type '\0' and a trailing slash; '7' is a regular file
            info.type, info.size = kind, len(data)
            tar.addfile(info, io.BytesIO(data))
    offsets = [member.offset for member in tarfile.open(path).getmembers()]
    set_header_fields(path, offsets[0], {124: b"\x80" + (1000).to_bytes(11, "big")})  # GNU base-256 size
    set_header_fields(path, offsets[1], {}, signed=True)  # as old Sun tars summed
    expected = [("a.txt", b"x" * 1000), ("é.txt", b"accented"), ("contiguous.txt", b"data")]
    assert our_members(path) == tarfile_members(path) == expected


def damaged_shard(tmp_path, kind: str) -> tuple[str, list[str], str]:
    """A 3-sample shard damaged in one way: (path, keys of the records still read, the error's words)."""
    path = write_shards(tmp_path, [3])[0]  # members: 000000.jpg, 000000.txt, 000001.jpg, ...
    members = tarfile.open(path).getmembers()
    data = open(path, "rb").read()
    cuts = {"cut in a header": (members[2].offset + 100, "truncated header"),
            "cut in data": (members[2].offset_data + 50, "unexpected end of data"),
            "cut in padding": (members[3].offset_data + members[3].size + 10, "unexpected end of data"),
            "zero-byte": (0, "empty file")}
    if kind in cuts:
        cut, message = cuts[kind]
        open(path, "wb").write(data[:cut])
        return path, ["000000"] if cut else [], message
    if kind == "bad checksum":
        corrupt = bytearray(data)
        corrupt[members[2].offset + 3] ^= 1  # the third member's name: 000001.jpg -> 000101.jpg
        open(path, "wb").write(bytes(corrupt))
        return path, ["000000"], "bad checksum"
    if kind == "sparse member":
        set_header_fields(path, members[2].offset, {156: b"S"})
        return path, ["000000"], "GNU sparse member"
    if kind == "invalid size field":
        set_header_fields(path, members[2].offset, {124: b"0000000001x\0"})
        return path, ["000000"], "invalid number field"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT if kind == "cut after a long-name header" else None) as tar:
        add_member(tar, "000000.txt", b"fine")
        info = tarfile.TarInfo("000001.txt" if kind != "cut after a long-name header" else "n" * 120 + ".txt")
        info.size = 4
        info.pax_headers = {"huge pax size": {"size": str(10**15)},  # a petabyte: must fail at the end of the file
                            "non-numeric pax size": {"size": "12x"},
                            "malformed pax header": {"path": "ü.txt"}}.get(kind, {})
        tar.addfile(info, io.BytesIO(b"tiny"))
    data = open(path, "rb").read()
    if kind == "malformed pax header":
        data = re.sub(rb"(\d+) path=", lambda match: b"%d path=" % (int(match[1]) + 1), data, count=1)  # too long
    elif kind == "cut after a long-name header":
        data = data[: tarfile.open(path).getmembers()[1].offset_data - 512]  # the 'L' header and its data only
    open(path, "wb").write(data)
    messages = {"huge pax size": "unexpected end of data", "non-numeric pax size": "invalid pax size",
                "malformed pax header": "malformed pax header", "cut after a long-name header": "the archive ends"}
    return path, ["000000"], messages[kind]


@pytest.mark.parametrize("kind", ["bad checksum", "cut in a header", "cut in data", "cut in padding", "zero-byte",
                                  "sparse member", "invalid size field", "huge pax size", "non-numeric pax size",
                                  "malformed pax header", "cut after a long-name header"])
def test_a_damaged_shard_ends_with_one_bad_sample_after_the_records_before_the_damage(tmp_path, kind):
    path, keys, message = damaged_shard(tmp_path, kind)
    records = list(shard_records(path))
    assert [record["__key__"] for record in records[:-1]] == keys  # the record being read when it broke is dropped
    bad = records[-1]
    assert isinstance(bad, BadSample) and bad.where == path and message in bad.reason, bad


def test_a_shard_cut_between_members_or_empty_ends_cleanly_as_with_tarfile(tmp_path):
    path = write_shards(tmp_path, [3])[0]
    members = tarfile.open(path).getmembers()
    data = open(path, "rb").read()
    open(path, "wb").write(data[: members[4].offset])  # no end-of-archive blocks: nothing shows the cut
    assert [record["__key__"] for record in shard_records(path)] == ["000000", "000001"]
    open(path, "wb").write(bytes(1024))  # only the end-of-archive blocks
    assert our_members(path) == tarfile_members(path) == [] and list(shard_records(path)) == []


@pytest.mark.parametrize("damage", ["cut", "unknown method"])
def test_a_damaged_compressed_shard_ends_with_one_bad_sample(tmp_path, damage):
    with tarfile.open(tmp_path / "shard.tar.gz", "w:gz") as tar:
        for i in range(20):
            add_member(tar, f"{i:06d}.txt", os.urandom(2000))  # incompressible: the damage lands mid-stream
    data = bytearray(open(tmp_path / "shard.tar.gz", "rb").read())
    if damage == "cut":
        data = data[: len(data) // 2]
    else:
        data[2] = 0  # the gzip header's compression method: 8 (deflate) is the only one
    open(tmp_path / "shard.tar.gz", "wb").write(bytes(data))
    records = list(shard_records(str(tmp_path / "shard.tar.gz")))
    assert [record["__key__"] for record in records[:-1]] == [f"{i:06d}" for i in range(len(records) - 1)]
    assert isinstance(records[-1], BadSample) and "unreadable tar" in records[-1].reason


def _loader_keys(cfg, tokenizer, start_step, steps) -> list[list[str]]:
    loader = iter(train_loader(cfg, tokenizer, rank=0, world_size=1, start_step=start_step))
    return [[k.rsplit(":", 1)[1] for k in next(loader)["key"]] for _ in range(steps)]


@pytest.mark.parametrize("workers", [0, 2])
def test_wds_stream_is_endless_and_resumes_where_it_stopped(tmp_path, tokenizer, workers):
    write_shards(tmp_path, [5, 7, 4])
    with pytest.raises(ValueError, match="wds shards are a training format"):
        eval_loader(f"wds:{tmp_path}", 32, tokenizer)
    cfg = train.load_config(None, [f"--data.train=wds:{tmp_path}", f"--data.workers={workers}", "--data.image_size=32",
                                   "--train.batch_size=6", "--data.shuffle_buffer=3", "--train.accum_steps=2"])
    straight = _loader_keys(cfg, tokenizer, 0, 12)  # 6 steps x 2 micro-batches of 3: 36 samples, > 2 epochs
    assert all(len(keys) == 3 for keys in straight)
    assert _loader_keys(cfg, tokenizer, 3, 6) == straight[6:]
    if workers == 0:  # one reader: the first 16 samples are the first epoch
        epoch = [key for keys in straight for key in keys][:16]
        assert sorted(epoch) == [f"{i:06d}" for i in range(16)]


# ---------------------------------------------------------------- make_shards


def test_make_shards_round_trip_from_csv(csv_dataset, capsys):
    path, damaged = csv_dataset
    out = os.path.join(os.path.dirname(path), "shards")
    shards = make_shards_main([f"csv:{path}", "--out", out, "--shard-size", "6"])
    printed = capsys.readouterr().out
    assert "left out 4 of 20 samples bad" in printed and f"wds:{out}/{{00000..00002}}.tar" in printed
    assert len(shards) == 3 and not any(name.endswith(".tmp") for name in os.listdir(out))
    source = build_dataset(f"csv:{path}")
    good = [i for i in range(len(source)) if os.path.basename(source.image_paths[source.image_of[i]]) not in damaged]
    stream = WebDataset(expand_shards(f"{out}/{{00000..00002}}.tar"), shuffle=False, epochs=1)
    items = list(stream)
    assert keys_of(items) == [f"{i:09d}" for i in good]
    assert [item["caption"] for item in items] == [source.texts[i] for i in good]
    with tarfile.open(shards[0]) as tar:  # the original bytes, not re-encoded
        member = tar.getmember(f"{good[1]:09d}.jpg")
        assert tar.extractfile(member).read() == open(source.image_paths[good[1]], "rb").read()
    assert list(captions(f"wds:{out}")) == [source.texts[i] for i in good]


def test_make_shards_from_generated_images(tmp_path):
    shards = make_shards_main(["shapes:val:5", "--out", str(tmp_path), "--shard-size", "10", "--data.image_size=32"])
    items = list(WebDataset(shards, shuffle=False, epochs=1))
    source = build_dataset("shapes:val:5", image_size=32)
    assert [item["caption"] for item in items] == [source[i]["caption"] for i in range(5)]
    assert items[0]["image"].tobytes() == source[0]["image"].tobytes()  # PNG: lossless


# ---------------------------------------------------------------- start-up errors


@pytest.mark.parametrize("spec, content, message", [
    ("coco:nope.json", None, "coco: no file at '{}'"),
    ("coco:bad.json", "{not json", "coco: '{}' is not valid JSON"),
    ("csv:nope.csv", None, "csv: no file at '{}'"),
    ("csv:header.csv", "filepath,caption\n", "csv: '{}' has no rows below its header"),
    ("csv:empty.csv", "", "csv: '{}' has no column 'filepath' (data.csv_image_key); its columns: none"),
    ("wds:*.tar", None, "wds: no shards match '{}'"),
    ("wds:{00000..00001}.tar", "shard", "do not exist: {}"),  # only 00000.tar is there
    ("imagefolder:nope", None, "imagefolder: no folder at '{}'"),
])
def test_a_spec_that_points_at_nothing_fails_naming_the_path(tmp_path, spec, content, message):
    kind, _, name = spec.partition(":")
    path = str(tmp_path / name)
    if content == "shard":
        write_shards(tmp_path, [1])
        path = str(tmp_path / "00001.tar")
    elif content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises((FileNotFoundError, ValueError), match=re.escape(message.format(path))):
        build_dataset(f"{kind}:{tmp_path / name}")
    with pytest.raises(SystemExit, match=r"data\.train: " + re.escape(kind)):
        train.main(["--config", CONFIG, f"--out_dir={tmp_path / 'run'}", f"--data.train={kind}:{tmp_path / name}"])
    assert not os.path.exists(tmp_path / "run")


# ---------------------------------------------------------------- train.py on every format


@pytest.fixture(scope="module")
def val_folder(tmp_path_factory) -> str:
    """Two classes of four images: keeps the end-of-training evaluation quick (2 classes to prompt, not 36)."""
    root = tmp_path_factory.mktemp("val")
    for folder in ("red_square", "blue_square"):
        write_images(root / folder, 4, prefix=folder)
    return str(root)


def tiny_run(out_dir, tokenizer_path, spec, val_folder, *extra) -> list[str]:  # noqa: F811
    return small_run(out_dir, tokenizer_path, f"--data.train={spec}", "--model.name=ViT-tiny", "--data.image_size=32",
                     "--train.batch_size=8", "--train.steps=3", f"--data.val=imagefolder:{val_folder}",
                     "--data.heldout=", *extra)


@pytest.mark.parametrize("kind", ["csv", "coco", "karpathy", "imagefolder", "wds"])
def test_train_a_few_steps_from_each_format(tmp_path, tokenizer_path, val_folder, kind, capsys):  # noqa: F811
    if kind in ("csv", "wds"):
        names = write_images(tmp_path / "images", 24)
        damaged = break_images(tmp_path / "images", names)
        rows = [f"images/{name},{caption(i)}" for i, name in enumerate(names)] + ["images/x.jpg"]
        spec = "csv:" + write_csv(tmp_path / "pairs.csv", rows)
        expected_bad = len(damaged)
        if kind == "wds":
            make_shards_main([spec, "--out", str(tmp_path / "shards"), "--shard-size", "5"])
            with tarfile.open(tmp_path / "shards" / "00004.tar", "w") as tar:  # a record without caption
                add_member(tar, "lonely.jpg", jpeg_bytes(0))
            spec, expected_bad = f"wds:{tmp_path / 'shards' / '{00000..00004}.tar'}", 1
    elif kind == "coco":
        spec, expected_bad = "coco:" + coco_captions(tmp_path), 0
    elif kind == "karpathy":
        spec, expected_bad = f"coco:{karpathy(tmp_path)}#train+restval", 0
    else:
        for folder in ("red_square", "blue_square"):
            write_images(tmp_path / "classes" / folder, 6, prefix=folder)
        spec, expected_bad = f"imagefolder:{tmp_path / 'classes'}", 0
    extra = ["--data.max_bad_fraction=0.5", "--data.workers=1"] + (["--train.steps=6"] if kind == "wds" else [])
    results = train.main(tiny_run(tmp_path / "run", tokenizer_path, spec, val_folder, *extra))
    out = capsys.readouterr().out
    assert len(re.findall(r"^step \d+/\d+ loss [\d.]+", out, re.M)) == (6 if kind == "wds" else 3)
    assert results["val/num_classes"] == 2 and "val/image_to_text_R@1" in results
    if kind == "csv":
        assert "data.train: left out 1 of 25 index rows bad" in out and "line 26" in out
    counts = [int(n) for n in re.findall(r" bad (\d+)/\d+ ", out)]
    if kind == "csv":
        assert counts[-1] == expected_bad  # 3 steps x 8 = one epoch: each damaged image once
    elif expected_bad:
        assert counts[-1] >= expected_bad  # 6 steps x 8 = more than two epochs of 20 good samples
    else:
        assert not counts
    assert ("bad sample skipped: " in out) == bool(expected_bad)


def test_tokenizer_is_trained_on_the_csv_captions(tmp_path, csv_dataset, val_folder):
    path, _ = csv_dataset
    train.main(tiny_run(tmp_path / "run", "", f"csv:{path}", val_folder, "--data.vocab_size=64", "--train.steps=1",
                        "--data.max_bad_fraction=1.0", "--data.workers=0"))
    tokenizer = SentencePieceTokenizer(str(tmp_path / "run" / "tokenizer.model"))
    assert tokenizer.decode(tokenizer("a purple square number 12")[0]) == "a purple square number 12"


def test_run_stops_when_the_bad_fraction_passes_the_limit(tmp_path, tokenizer_path, val_folder):  # noqa: F811
    names = write_images(tmp_path / "images", 24)
    rows = [f"images/{name},{caption(i)}" for i, name in enumerate(names)]
    rows += [f"images/missing{i}.jpg,{caption(i)}" for i in range(24)]  # half the pairs have no image
    spec = "csv:" + write_csv(tmp_path / "pairs.csv", rows)
    message = r"too many bad samples at step \d+: \d+ of \d+ samples bad .*missing\d+\.jpg\): missing file"
    with pytest.raises(SystemExit, match=message + r".*data\.max_bad_fraction=0\.2"):
        train.main(tiny_run(tmp_path / "run", tokenizer_path, spec, val_folder, "--train.steps=20",
                            "--data.max_bad_fraction=0.2", "--data.workers=0"))
    # the same data under a looser limit trains to the end
    train.main(tiny_run(tmp_path / "ok", tokenizer_path, spec, val_folder, "--data.max_bad_fraction=0.9",
                        "--data.workers=0"))


def test_train_loader_shards_every_dataset_kind_by_global_rank(tmp_path, tokenizer):
    # train.py passes the global rank (dist.get_rank(), not LOCAL_RANK), so on 2 nodes x 2 processes each of the 4
    # takes its own quarter of every global batch: map-style kinds the 1-process batch cut in 4, wds 4 disjoint streams
    names = write_images(tmp_path / "images", 16)
    specs = {"shapes": "shapes:train:64", "coco": f"coco:{coco_captions(tmp_path / 'coco', 8)}",
             "csv": "csv:" + write_csv(tmp_path / "pairs.csv", [f"images/{n},{caption(i)}" for i, n in enumerate(names)])}
    write_shards(tmp_path / "shards", [4, 4, 4, 4])
    specs["wds"] = f"wds:{tmp_path / 'shards'}"

    def keys(spec, rank, world_size) -> list[list[str]]:
        cfg = train.load_config(None, [f"--data.train={spec}", "--data.workers=0", "--data.image_size=32",
                                       "--train.batch_size=8", "--train.steps=2", "--data.shuffle_buffer=2"])
        return [batch["key"] for batch, _ in zip(train_loader(cfg, tokenizer, rank, world_size), range(2))]

    for kind, spec in specs.items():
        ranks = [keys(spec, rank, 4) for rank in range(4)]
        for step in range(2):
            parts = [ranks[rank][step] for rank in range(4)]
            assert all(len(part) == 2 for part in parts), kind
            if kind == "wds":  # a stream depends on the number of readers: disjoint, not the 1-process batch
                everything = [key for part in parts for key in part]
                assert len(set(everything)) == len(everything), kind
            else:
                assert [key for part in parts for key in part] == keys(spec, 0, 1)[step], kind
