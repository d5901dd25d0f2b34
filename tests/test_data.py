import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from crossmodal.data import GlobalBatchSampler
from crossmodal.data.shapes import BACKGROUNDS, CLASSNAMES, COLORS, SHAPES, ShapesDataset
from crossmodal.data.templates import OPENAI_IMAGENET_TEMPLATES, SHAPES_TEMPLATES
from crossmodal.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from crossmodal.data.transforms import OPENAI_MEAN, OPENAI_STD, image_transform


def pixels(image: Image.Image) -> bytes:
    return image.tobytes()


# ---------------------------------------------------------------- shapes


def test_classes_and_heldout_set():
    ds = ShapesDataset("val")
    assert len(ds.classnames) == len(COLORS) * len(SHAPES) == 36
    assert sorted(ds.seen_classes + ds.heldout_classes) == list(range(36))
    heldout = [ds.classnames[c].split() for c in ds.heldout_classes]
    # one held-out pair per colour and per shape
    assert sorted(color for color, _ in heldout) == sorted(COLORS)
    assert sorted(shape for _, shape in heldout) == sorted(SHAPES)


def test_split_lengths_and_index_range():
    assert [len(ShapesDataset(split)) for split in ("train", "val", "heldout")] == [100_000, 2_000, 2_000]
    ds = ShapesDataset("val", length=5)
    assert len(ds) == 5 and ds.split == "val"
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(ValueError):
        ShapesDataset("test")


def test_items_are_deterministic_and_seeded():
    a, b = ShapesDataset("train", length=20), ShapesDataset("train", length=20)
    other_seed, other_split = ShapesDataset("train", length=20, seed=1), ShapesDataset("val", length=20)
    for i in (0, 7, 19):
        x, y = a[i], b[i]
        assert pixels(x["image"]) == pixels(y["image"])
        assert {k: v for k, v in x.items() if k != "image"} == {k: v for k, v in y.items() if k != "image"}
        assert a.describe(i) == b.describe(i)
    for other in (other_seed, other_split):
        assert any(pixels(a[i]["image"]) != pixels(other[i]["image"]) for i in range(5))
        assert [a[i]["caption"] for i in range(5)] != [other[i]["caption"] for i in range(5)]
    assert len({a[i]["key"] for i in range(20)} | {other_seed[0]["key"], other_split[0]["key"]}) == 22


@pytest.mark.parametrize("split", ["train", "val"])
def test_heldout_pairs_never_seen_in_train_or_val(split):
    ds = ShapesDataset(split, length=3000)
    heldout = {ds.classnames[c] for c in ds.heldout_classes}
    for i in range(len(ds)):
        assert not {obj.classname for obj in ds.describe(i).objects} & heldout
    for i in range(300):  # nor in the text
        item = ds[i]
        assert item["label"] in ds.seen_classes
        assert not any(name in item["caption"] or name in item["question"] for name in heldout)


def test_heldout_split_main_shape_is_heldout():
    ds = ShapesDataset("heldout", length=500)
    for i in range(len(ds)):
        item = ds[i]
        assert item["label"] in ds.heldout_classes
        assert all(CLASSNAMES.index(obj.classname) in ds.seen_classes for obj in ds.describe(i).objects[1:])


def test_main_shape_is_largest_and_visible():
    ds = ShapesDataset("train", length=400)
    counts = {1: 0, 2: 0, 3: 0}
    for i in range(len(ds)):
        objects = ds.describe(i).objects
        counts[len(objects)] += 1
        assert len({obj.shape for obj in objects}) == len(objects)
        assert all(objects[0].area > 1.3 * obj.area for obj in objects[1:])
        # Shapes are drawn without antialiasing: count each colour's visible pixels when colours differ.
        if len({obj.color for obj in objects}) == len(objects):
            image = np.asarray(ds[i]["image"]).reshape(-1, 3)
            visible = [(image == COLORS[obj.color]).all(axis=1).sum() for obj in objects]
            assert all(visible[0] > v > 0 for v in visible[1:]), (i, visible)
    assert min(counts.values()) > 50  # one, two and three shapes all occur


def test_labels_captions_and_questions_agree():
    ds = ShapesDataset("train", length=300)
    for i in range(len(ds)):
        item, objects = ds[i], ds.describe(i).objects
        assert 0 <= item["label"] < len(ds.classnames)
        assert ds.classnames[item["label"]] == objects[0].classname
        caption = item["caption"]
        assert objects[0].classname in caption
        # the main shape is named first
        others = [caption.find(obj.classname) for obj in objects[1:] if obj.classname in caption]
        assert all(caption.find(objects[0].classname) < position for position in others)
        assert item["question"].endswith("?") and item["answer"]
    answers = {ds[i]["answer"] for i in range(len(ds))}
    assert {"yes", "no", "one", "two"} <= answers and answers & set(COLORS) and answers & set(SHAPES)
    assert answers & set(BACKGROUNDS)


@pytest.mark.parametrize("image_size", [32, 96])
def test_images_are_rgb_of_requested_size(image_size):
    ds = ShapesDataset("val", image_size=image_size, length=4)
    for i in range(len(ds)):
        image = ds[i]["image"]
        assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (image_size, image_size)


# ---------------------------------------------------------------- templates


def test_templates():
    assert len(OPENAI_IMAGENET_TEMPLATES) == len(set(OPENAI_IMAGENET_TEMPLATES)) == 80
    for template in OPENAI_IMAGENET_TEMPLATES + SHAPES_TEMPLATES:
        assert template.count("{}") == 1
    assert "a large orange circle." in [t.format("orange circle") for t in SHAPES_TEMPLATES]


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    ds = ShapesDataset("train", length=3000)
    captions = [ds[i]["caption"] for i in range(len(ds))]
    path = train_sentencepiece(iter(captions), tmp_path_factory.mktemp("spm") / "shapes", vocab_size=1024)
    assert path.endswith("shapes.model")
    return path


def test_training_is_deterministic(model_path, tmp_path):
    captions = [ShapesDataset("train", length=3000)[i]["caption"] for i in range(3000)]
    again = train_sentencepiece(captions, tmp_path / "again.model")
    assert open(again, "rb").read() == open(model_path, "rb").read()


def test_tokenizer_layout(model_path):
    tokenizer = SentencePieceTokenizer(model_path, context_length=16)
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 2, 3)
    assert 4 < tokenizer.vocab_size <= 1024
    texts = ["a large red circle", "a photo of a purple star and a small blue hexagon on a black background.", ""]
    tokens = tokenizer(texts)
    assert tokens.shape == (3, 16) and tokens.dtype == torch.long
    for row in tokens.tolist():
        assert row[0] == tokenizer.bos_id
        end = row.index(tokenizer.eos_id)
        assert all(t not in (0, 2, 3) for t in row[1:end])  # pieces only between bos and eos
        assert all(t == tokenizer.pad_id for t in row[end + 1 :])
    assert tokens[2, :3].tolist() == [2, 3, 0]  # empty text
    assert (tokens[1] != 0).all() and tokens[1, -1] == tokenizer.eos_id  # truncated, eos kept
    assert tokenizer.decode(tokens[0]) == "a large red circle"
    assert torch.equal(tokenizer(["A Large RED Circle"]), tokenizer(["a large red circle"]))
    assert torch.equal(tokenizer("a red circle"), tokenizer(["a red circle"]))


def test_tokenizer_pickles_without_the_file(model_path, tmp_path):
    path = tmp_path / "copy.model"
    path.write_bytes(open(model_path, "rb").read())
    tokenizer = SentencePieceTokenizer(str(path), context_length=8)
    blob = pickle.dumps(tokenizer)
    path.unlink()
    restored = pickle.loads(blob)
    assert restored.context_length == 8 and restored.vocab_size == tokenizer.vocab_size
    texts = ["a tiny green cross in the top left", "two shapes"]
    assert torch.equal(restored(texts), tokenizer(texts))


# ---------------------------------------------------------------- transforms


def test_transforms_shape_and_normalisation():
    image = Image.new("RGB", (80, 60), (255, 0, 128))
    for train in (True, False):
        x = image_transform(32, train=train)(image)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)
        torch.testing.assert_close(x.mean(dim=(1, 2)), expected, atol=1e-3, rtol=0)
    gray = image_transform(32, train=False)(Image.new("L", (32, 32), 200))
    assert gray.shape == (3, 32, 32)


def test_train_transform_follows_torch_seed():
    image = ShapesDataset("val", image_size=64, length=1)[0]["image"]
    transform = image_transform(64, train=True)
    torch.manual_seed(0)
    a = transform(image)
    torch.manual_seed(0)
    b = transform(image)
    torch.manual_seed(1)
    c = transform(image)
    assert torch.equal(a, b) and not torch.equal(a, c)
    evaluation = image_transform(64, train=False)
    assert torch.equal(evaluation(image), evaluation(image))


def test_global_batch_is_the_same_for_any_process_count_and_accumulation():
    size, batch, steps = 50, 12, 10  # 120 samples: 2.4 epochs, batches straddle epoch boundaries
    one = list(GlobalBatchSampler(size, batch, steps, seed=3))
    for world_size, accum_steps in ((2, 1), (3, 2), (4, 3)):
        per_rank = [
            list(GlobalBatchSampler(size, batch, steps, rank, world_size, accum_steps, seed=3))
            for rank in range(world_size)
        ]
        for step in range(steps):
            micro = slice(step * accum_steps, (step + 1) * accum_steps)
            merged = [key for rank in per_rank for part in rank[micro] for key in part]
            assert merged == one[step]  # same samples in the same order, cut differently
    epochs = {}
    for batch_keys in one:
        for epoch, index in batch_keys:
            epochs.setdefault(epoch, []).append(index)
    assert sorted(epochs[0]) == list(range(size)) and sorted(epochs[1]) == list(range(size))
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    resumed = list(GlobalBatchSampler(size, batch, steps, seed=3, start_step=4))
    assert resumed == one[4:]


def test_global_batch_must_divide():
    with pytest.raises(ValueError, match="batch_size=10 must divide evenly into 3 processes x 1"):
        GlobalBatchSampler(100, 10, 5, rank=0, world_size=3)


# ---------------------------------------------------------------- imagefolder, bad-sample rule


def test_imagefolder_leaves_out_empty_class_folders_links_and_fifos(tmp_path):
    import os

    from crossmodal.data.imagefolder import ImageFolder

    for folder in ("b_cat", "d_dog"):
        os.makedirs(tmp_path / folder / "nested")
        Image.new("RGB", (8, 8)).save(tmp_path / folder / "nested" / "0.png")
    (tmp_path / "a_empty").mkdir()
    (tmp_path / "c_only_text").mkdir()
    (tmp_path / "c_only_text" / "notes.txt").write_text("no image")
    os.mkfifo(tmp_path / "d_dog" / "pipe.png")  # a read would block forever
    os.symlink(tmp_path / "d_dog", tmp_path / "d_dog" / "nested" / "loop")
    dataset = ImageFolder(str(tmp_path))
    assert dataset.classnames == ["b cat", "d dog"] and dataset.labels == [0, 1]
    assert dataset.empty_folders == ["a_empty", "c_only_text"] and dataset.folder_positions == [1, 3]
    left_out = "\n".join(dataset.left_out())
    assert "a_empty: an empty class folder" in left_out and "pipe.png: a FIFO" in left_out and "loop" in left_out


def test_a_nan_max_bad_fraction_stops():
    from crossmodal.config import BadInput
    from crossmodal.data.bad_samples import BadSampleCount, too_many

    assert too_many(10, 100, float("nan")) and not too_many(10, 100, 0.5)
    with pytest.raises(BadInput, match="x.csv: 30 of 40 captions with an unreadable image .75.00%.*max_bad_fraction"):
        BadSampleCount(30, 40).check(0.01, "x.csv", "captions", "with an unreadable image")
    BadSampleCount(30, 40).check(0.8, "x.csv")
