"""Clips as data: uniform frame sampling against a hand computation, PyAV decoding of mp4 files written here with
known grey levels per frame, the video_csv and msrvtt specs, bad clips skipped and counted, moving_shapes (determinism,
held-out pairs, val_order reversals) and the loader contract the video recipe relies on."""
import json
import sys

import numpy as np
import pytest
import torch

from crossmodal.config import BadInput, Config, DataConfig
from crossmodal.data import (VIDEO, VideoTextDataset, build_dataset, captions, is_video_spec, map_style_dataset,
                             skipped_rows, train_loader, unreadable_start, video_retrieval_loader)
from crossmodal.data.bad_samples import BadSample, BadSampleCount
from crossmodal.data.moving_shapes import (GROUPS, HELDOUT_PAIRS, MovingShapesDataset, caption, render_clip,
                                           reverse)
from crossmodal.data.transforms import image_transform
from crossmodal.data.video import read_clip, require_av, sample_indices, training_offsets

av = pytest.importorskip("av")

LEVELS = 16  # frame i of a test clip is grey i * LEVELS


def write_clip(path, count=12, size=32, codec="mpeg4", options=None):
    """An mp4 of `count` frames, frame i a uniform grey of level i * LEVELS."""
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=10)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(count):
            picture = np.full((size, size, 3), i * LEVELS, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode())
    return str(path)


def frame_numbers(frames) -> list[int]:
    """Which frame of a write_clip clip each decoded PIL frame is (the codec is lossy by a few levels)."""
    return [round(float(np.asarray(frame, dtype=np.float64).mean()) / LEVELS) for frame in frames]


def tokenizer(texts):
    return torch.arange(len(texts) * 6).reshape(len(texts), 6)


def test_uniform_sampling_matches_a_hand_computation():
    # 10 frames in 4 segments of 2.5: middles 1.25, 3.75, 6.25, 8.75
    assert sample_indices(10, 4) == [1, 3, 6, 8]
    # offsets 0, 0.99, 0.5, 0.2 -> 0, 4.975, 6.25, 8.0
    assert sample_indices(10, 4, np.array([0.0, 0.99, 0.5, 0.2])) == [0, 4, 6, 8]
    # fewer frames than asked: 3 frames in 5 segments of 0.6: 0.3, 0.9, 1.5, 2.1, 2.7
    assert sample_indices(3, 5) == [0, 0, 1, 2, 2]
    assert sample_indices(7, 1) == [3]
    # any offset stays inside its segment and the clip
    offsets = np.random.default_rng(0).random((100, 6))
    for row in offsets:
        indices = sample_indices(13, 6, row)
        assert all(k * 13 / 6 - 1 < i < (k + 1) * 13 / 6 and 0 <= i < 13 for k, i in enumerate(indices))
    # an odd clip: the middles of the reversed clip are the same frames (moving_shapes' val_order relies on it)
    for count in (9, 11, 13, 15):
        for frames in range(1, 17):
            picked = sample_indices(count, frames)
            assert sorted(count - 1 - i for i in picked) == sorted(picked), (count, frames)
    assert sorted(15 - i for i in sample_indices(16, 8)) != sorted(sample_indices(16, 8))  # why clips are odd


def test_decoding_picks_the_sampled_frames(tmp_path):
    path = write_clip(tmp_path / "grey.mp4")
    assert frame_numbers(read_clip(path, 4)) == [1, 4, 7, 10]  # (k + 0.5) * 3
    offsets = training_offsets(seed=0, epoch=0, index=5, frames=4)
    assert frame_numbers(read_clip(path, 4, offsets)) == sample_indices(12, 4, offsets)
    assert np.array_equal(offsets, training_offsets(0, 0, 5, 4))  # from (seed, epoch, index) alone
    assert not np.array_equal(offsets, training_offsets(0, 1, 5, 4))
    frames = read_clip(path, 3)
    assert all(frame.mode == "RGB" and frame.size == (32, 32) for frame in frames)
    assert read_clip(path, 3, short_side=16)[0].size == (16, 16)
    # a file cut short after its index (moov first): sampled again over the frames that do decode
    whole = write_clip(tmp_path / "indexed.mp4", options={"movflags": "faststart"})
    data = open(whole, "rb").read()
    (tmp_path / "cut.mp4").write_bytes(data[: int(len(data) * 0.9)])
    decodable = sum(1 for _ in av.open(str(tmp_path / "cut.mp4")).decode(video=0))
    assert av.open(str(tmp_path / "cut.mp4")).streams.video[0].frames == 12 and 0 < decodable < 12
    assert len(read_clip(str(tmp_path / "cut.mp4"), 4)) == 4
    # a container without a frame count (Matroska): every frame decoded, then sampled
    mkv = write_clip(tmp_path / "grey.mkv")
    assert av.open(mkv).streams.video[0].frames == 0
    assert frame_numbers(read_clip(mkv, 4)) == [1, 4, 7, 10]


@pytest.mark.parametrize("content", [b"", b"not a video at all", "truncated"])
def test_unreadable_clips_raise_bad_sample(tmp_path, content):
    path = tmp_path / "bad.mp4"
    if content == "truncated":
        whole = open(write_clip(tmp_path / "whole.mp4"), "rb").read()
        content = whole[: len(whole) // 2]
    path.write_bytes(content)
    with pytest.raises(BadSample, match="bad.mp4"):
        read_clip(str(path), 4)
    with pytest.raises(BadSample, match="missing file"):
        read_clip(str(tmp_path / "absent.mp4"), 4)


def test_without_pyav_one_line_names_the_video_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # import av now fails
    with pytest.raises(BadInput, match=r"crossmodal\[video\]"):
        require_av()


def write_csv(folder, rows, name="clips.csv"):
    path = folder / name
    path.write_text("filepath,caption\n" + "".join(f"{a},{b}\n" for a, b in rows))
    return str(path)


def test_video_csv_groups_captions_by_clip(tmp_path):
    (tmp_path / "clips").mkdir()
    write_clip(tmp_path / "clips" / "a.mp4", count=12)
    write_clip(tmp_path / "clips" / "b.mp4", count=9)
    spec = "video_csv:" + write_csv(tmp_path, [("clips/a.mp4", "grey fades in"), ("clips/b.mp4", "a short fade"),
                                                ("clips/a.mp4", "it gets brighter"), ("", "no path")])
    assert is_video_spec(spec) and not is_video_spec("csv:x.csv") and VIDEO == ("moving_shapes", "video_csv", "msrvtt")
    dataset = build_dataset(spec)
    assert len(dataset) == 3 and dataset.image_of == [0, 1, 0] and dataset.skipped_rows.bad == 1
    item = dataset[2]
    assert item["caption"] == "it gets brighter" and frame_numbers(item["frames"]) == sample_indices(12, 8)
    assert list(captions(spec)) == ["grey fades in", "a short fade", "it gets brighter"]
    assert unreadable_start(map_style_dataset(spec, 32, 0, None)) == []
    loader, tokens, text_to_video = video_retrieval_loader(spec, 32, 4, tokenizer, batch_size=8)
    assert tokens.shape == (3, 6) and text_to_video.tolist() == [0, 1, 0] and text_to_video.dtype == torch.long
    (batch,) = list(loader)
    assert batch["image"].shape == (2, 4, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["index"].tolist() == [0, 1] and batch["bad"].tolist() == [0, 0]
    # evaluation's pixels: each frame through the evaluation transform
    transform = image_transform(32, train=False)
    expected = torch.stack([transform(frame) for frame in read_clip(str(tmp_path / "clips" / "b.mp4"), 4)])
    assert torch.equal(batch["image"][1], expected)


def test_msrvtt_json_splits_and_malformed_rows(tmp_path):
    for name in ("video0", "video1", "video2"):
        write_clip(tmp_path / f"{name}.mp4", count=10)
    tree = {"videos": [{"video_id": "video0", "split": "train"}, {"video_id": "video1", "split": "validate"},
                       {"video_id": "video2", "split": "validate"}, {"split": "validate"}],
            "sentences": [{"video_id": "video0", "caption": "a train caption"},
                          {"video_id": "video1", "caption": "a man is talking", "sen_id": 1},
                          {"video_id": "video2", "caption": "a dog runs"},
                          {"video_id": "video1", "caption": "someone speaks"},
                          {"video_id": "video1", "caption": 7}, {"video_id": "video9", "caption": "unknown"},
                          "not a dict"]}
    path = tmp_path / "train_val_videodata.json"
    path.write_text(json.dumps(tree))
    dataset = build_dataset(f"msrvtt:{path}#validate")
    assert dataset.texts == ["a man is talking", "a dog runs", "someone speaks"] and dataset.image_of == [0, 1, 0]
    assert [p.rsplit("/", 1)[1] for p in dataset.image_paths] == ["video1.mp4", "video2.mp4"]
    # counted: the video without an id, the numeric caption, the unknown video, the row that is not a dict
    assert dataset.skipped_rows.bad == 4 and "caption is int" in " ".join(dataset.skipped_rows.examples)
    assert len(build_dataset(f"msrvtt:{path}")) == 4  # every split
    with pytest.raises(ValueError, match="no split 'test'"):
        build_dataset(f"msrvtt:{path}#test")
    loader, tokens, text_to_video = video_retrieval_loader(f"msrvtt:{path}#validate", 32, 2, tokenizer)
    assert next(iter(loader))["image"].shape == (2, 2, 3, 32, 32) and text_to_video.tolist() == [0, 1, 0]


def video_config(spec, batch_size=4, steps=2, image_size=32):
    cfg = Config()
    cfg.data.train, cfg.data.image_size, cfg.data.workers = spec, image_size, 0
    cfg.train.batch_size, cfg.train.steps = batch_size, steps
    return cfg


def test_a_corrupt_clip_is_skipped_and_counted_in_training(tmp_path):
    for name in ("a", "b", "c"):
        write_clip(tmp_path / f"{name}.mp4", count=9)
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 but nothing else")
    spec = "video_csv:" + write_csv(tmp_path, [("a.mp4", "one"), ("broken.mp4", "two"), ("b.mp4", "three"),
                                                ("c.mp4", "four")])
    count, keys = BadSampleCount(), []
    loader = train_loader(video_config(spec, batch_size=4, steps=3), tokenizer, 0, 1, frames=3)
    for batch in loader:
        assert batch["image"].shape == (4, 3, 3, 32, 32) and batch["tokens"].shape == (4, 6)
        count.add_batch(batch)
        keys += batch["key"]
    # 3 epochs of 4 clips: the broken one each time, replaced by its readable neighbour (the batch keeps its size)
    assert (count.bad, count.seen) == (3, 12) and count.fraction == 0.25
    assert "broken.mp4" in count.examples[0] and not any(key.endswith("broken.mp4") for key in keys)
    assert skipped_rows(loader).bad == 0  # every row of the CSV was usable
    assert not count.too_many(0.01)  # fewer than MIN_BAD_TO_STOP so far: one stray file does not stop a young run
    for batch in train_loader(video_config(spec, batch_size=4, steps=10), tokenizer, 0, 1, frames=3, start_step=3):
        count.add_batch(batch)
    assert (count.bad, count.seen) == (10, 40)  # a quarter of the clips, and now ten of them: train.py stops
    with pytest.raises(BadInput, match=r"10 of 40 samples bad \(25.00%\), e.g. .*broken.mp4"):
        count.check(0.01, "data.train")


def test_training_sampling_is_random_per_epoch_and_fixed_in_evaluation(tmp_path):
    write_clip(tmp_path / "a.mp4", count=16)
    spec = "video_csv:" + write_csv(tmp_path, [("a.mp4", "grey")])
    base = build_dataset(spec, 32)
    identity = lambda picture: torch.from_numpy(np.asarray(picture, dtype=np.float32)).permute(2, 0, 1)

    def frames_of(train, epoch):
        sample = VideoTextDataset(base, identity, seed=3, frames=4, train=train)[(epoch, 0)]
        return [round(float(frame.mean()) / LEVELS) for frame in sample["image"]]

    assert frames_of(False, 0) == frames_of(False, 7) == [2, 6, 10, 14]
    epochs = [frames_of(True, epoch) for epoch in range(6)]
    assert epochs[0] == frames_of(True, 0)  # deterministic
    assert epochs == [sample_indices(16, 4, training_offsets(3, epoch, 0, 4)) for epoch in range(6)]
    assert len({tuple(frames) for frames in epochs}) > 1


def test_training_crops_every_frame_of_a_clip_alike():
    class Still(torch.utils.data.Dataset):  # four copies of one noisy picture
        def __len__(self):
            return 2

        def item(self, index, frames, offsets):
            rng = np.random.default_rng(index)
            from PIL import Image
            picture = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
            return {"frames": [picture] * frames, "caption": "noise", "key": str(index)}

    dataset = VideoTextDataset(Still(), image_transform(32, train=True), seed=0, frames=4, train=True)
    clips = [dataset[(epoch, 0)]["image"] for epoch in range(3)]
    assert all(torch.equal(clip[0], clip[k]) for clip in clips for k in range(4))
    assert not torch.equal(clips[0][0], clips[1][0])  # a new crop each epoch


def test_moving_shapes_is_deterministic_and_fast():
    a, b = MovingShapesDataset("train", 64, 50, seed=0), MovingShapesDataset("train", 64, 50, seed=0)
    for index in (0, 17, 49):
        x, y = a[index], b[index]
        assert x["caption"] == y["caption"] and x["question"] == y["question"] and x["answer"] == y["answer"]
        assert 8 <= len(x["frames"]) <= 16 and x["frames"][0].size == (64, 64)
        assert all(np.array_equal(np.asarray(p), np.asarray(q)) for p, q in zip(x["frames"], y["frames"]))
    other = MovingShapesDataset("train", 64, 50, seed=1)
    assert [a.texts(i)["caption"] for i in range(20)] != [other.texts(i)["caption"] for i in range(20)]
    captions_ = [a.texts(i)["caption"] for i in range(50)]
    assert max(len(text.split()) for text in captions_) <= 12
    # sampled frames are the matching frames of the whole clip
    whole, picked = a[3]["frames"], a.item(3, 4)["frames"]
    indices = sample_indices(len(whole), 4)
    assert all(np.array_equal(np.asarray(whole[i]), np.asarray(p)) for i, p in zip(indices, picked))
    import time
    start = time.perf_counter()
    for index in range(50):
        a[index]
    assert (time.perf_counter() - start) / 50 < 0.01  # ~1 ms on one core; loose for a busy machine


def test_moving_shapes_splits_hold_out_their_pairs():
    def pairs(clip):
        return {(clip.actors[event.actor].shape, GROUPS[event.verb]) for event in clip.events}

    train, heldout = MovingShapesDataset("train", length=2000), MovingShapesDataset("heldout")
    train_pairs = set().union(*(pairs(train.describe(i)) for i in range(len(train))))
    assert not train_pairs & HELDOUT_PAIRS and len(train_pairs) == 6 * 4 - len(HELDOUT_PAIRS)
    assert all(pairs(heldout.describe(i)) & HELDOUT_PAIRS for i in range(len(heldout)))
    events = [len(train.describe(i).events) for i in range(len(train))]
    assert 0.1 < events.count(0) / 2000 < 0.2 and events.count(2) / 2000 > 0.3  # order-dependent clips in plenty
    val_captions = {MovingShapesDataset("val").texts(i)["caption"] for i in range(200)}
    assert len(val_captions) > 150  # not a handful of repeated sentences
    with pytest.raises(ValueError, match="splits train, val, heldout, val_order"):
        build_dataset("moving_shapes:test")
    with pytest.raises(ValueError, match="pairs .* must be even"):
        build_dataset("moving_shapes:val_order:7")


def test_val_order_pairs_are_exact_reversals_with_other_captions():
    dataset = MovingShapesDataset("val_order", 64, length=40)
    assert len(MovingShapesDataset("val_order")) == 500
    for index in range(0, 40, 2):
        first, second = dataset[index], dataset[index + 1]
        assert len(first["frames"]) == len(second["frames"]) and len(first["frames"]) % 2 == 1
        assert all(np.array_equal(np.asarray(p), np.asarray(q)) for p, q in zip(first["frames"], second["frames"][::-1]))
        assert first["caption"] != second["caption"] and first["question"] == second["question"]
        assert dataset.describe(index).events  # something happens in every val_order clip
        # the reversed description draws the reversed frames: the caption is true of them
        redrawn = render_clip(reverse(dataset.describe(index)), 64)
        assert all(np.array_equal(np.asarray(p), np.asarray(q)) for p, q in zip(redrawn, second["frames"]))
    # evaluation sampling: the frame mean of a pair is identical, so mean pooling cannot tell them apart
    transform = image_transform(64, train=False)
    clips = VideoTextDataset(dataset, transform, frames=8)
    for index in range(0, 10, 2):
        assert torch.allclose(clips[index]["image"].mean(0), clips[index + 1]["image"].mean(0), atol=1e-6)
        assert not torch.equal(clips[index]["image"], clips[index + 1]["image"])


def test_loader_contract_on_moving_shapes():
    cfg = video_config("moving_shapes:train:64", batch_size=8, steps=2, image_size=64)
    batches = list(train_loader(cfg, tokenizer, 0, 1, frames=6))
    assert len(batches) == 2
    for batch in batches:
        assert batch["image"].shape == (8, 6, 3, 64, 64) and batch["image"].dtype == torch.float32
        assert batch["tokens"].shape == (8, 6) and len(batch["caption"]) == 8 and len(batch["key"]) == 8
        assert batch["index"].shape == (8,) and batch["bad"].sum() == 0 and batch["seen"].sum() == 8
        assert batch["bad_examples"] == []
    again = list(train_loader(cfg, tokenizer, 0, 1, frames=6, start_step=1))
    assert torch.equal(again[0]["image"], batches[1]["image"])  # a resumed run sees the same clips and frames
    with pytest.raises(ValueError, match="video spec"):
        train_loader(cfg, tokenizer, 0, 1)
    with pytest.raises(ValueError, match="video specs only"):
        train_loader(video_config("shapes:train:16"), tokenizer, 0, 1, frames=4)
    loader, tokens, text_to_video = video_retrieval_loader("moving_shapes:val_order:6", 64, 8, tokenizer, batch_size=4)
    batches = list(loader)
    assert [b["image"].shape for b in batches] == [(4, 8, 3, 64, 64), (2, 8, 3, 64, 64)]
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(6))
    assert tokens.shape == (6, 6) and text_to_video.tolist() == list(range(6))
    with pytest.raises(ValueError, match="not a video spec"):
        video_retrieval_loader("shapes:val:4", 64, 8, tokenizer)
    texts = list(captions("moving_shapes:val:4", questions=True))
    assert len(texts) == 8 and texts[1].startswith("question: ")


def test_reversed_clips_are_the_sampled_frames_reversed_with_the_reversed_caption():
    base = MovingShapesDataset("train", 64, length=40)
    identity = lambda picture: torch.from_numpy(np.asarray(picture, dtype=np.float32)).permute(2, 0, 1)
    reversing = VideoTextDataset(base, identity, seed=3, frames=4, train=True, reverse=True)
    plain = VideoTextDataset(base, identity, seed=3, frames=4, train=True)
    moving = [i for i in range(40) if base.describe(i).events]
    still = [i for i in range(40) if not base.describe(i).events]
    assert moving and still
    for epoch, index in [(0, moving[0]), (1, moving[0]), (0, moving[1]), (2, moving[2])]:
        sample = reversing[(epoch, index)]
        clip = base.describe(index)
        assert torch.equal(sample["image"], plain[(epoch, index)]["image"])  # the forward clip is unchanged
        assert torch.equal(sample["reversed_image"], sample["image"].flip(0))  # exactly its frames, reversed
        assert sample["reversed_caption"] == caption(reverse(clip)) != sample["caption"]
        # against the reversed clip drawn from its description: frame t of the reversal is frame L - 1 - t
        picked = sample_indices(clip.length, 4, training_offsets(3, epoch, index, 4))
        redrawn = render_clip(reverse(clip), 64, [clip.length - 1 - i for i in reversed(picked)])
        assert torch.equal(sample["reversed_image"], torch.stack([identity(frame) for frame in redrawn]))
    # a still clip is its own reversal: its slot holds the next moving clip's reversal, at that clip's offsets
    index = still[0]
    source = next(i for i in range(index + 1, 40) if base.describe(i).events)
    sample, other = reversing[(0, index)], plain[(0, source)]
    assert torch.equal(sample["reversed_image"], other["image"].flip(0))
    assert sample["reversed_caption"] == caption(reverse(base.describe(source))) != caption(base.describe(source))
    assert sample["caption"].endswith("still") and sample["reversed_caption"] != sample["caption"]
    # one crop for a clip and its reversal under the training transform
    cropped = VideoTextDataset(base, image_transform(64, train=True), seed=3, frames=4, train=True, reverse=True)
    sample = cropped[(1, moving[0])]
    assert torch.equal(sample["reversed_image"], sample["image"].flip(0))


def test_the_loader_gives_reversed_rows_on_moving_shapes_only(tmp_path):
    cfg = video_config("moving_shapes:train:64", batch_size=8, steps=2, image_size=64)
    for batch, plain in zip(train_loader(cfg, tokenizer, 0, 1, frames=4, reverse=True),
                            train_loader(cfg, tokenizer, 0, 1, frames=4)):
        assert batch["reversed_image"].shape == batch["image"].shape == (8, 4, 3, 64, 64)
        assert batch["reversed_tokens"].shape == (8, 6) and torch.equal(batch["image"], plain["image"])
        assert "reversed_image" not in plain
    write_clip(tmp_path / "a.mp4", count=9)
    spec = "video_csv:" + write_csv(tmp_path, [("a.mp4", "grey")])
    with pytest.raises(ValueError, match="no time-reversed captions"):
        train_loader(video_config(spec), tokenizer, 0, 1, frames=4, reverse=True)
