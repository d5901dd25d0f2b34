"""data/capfilt.py (BLIP's CapFilt) on BLIP-tiny runs with random weights: the pairs kept are exactly those whose ITM
match probability, computed here with `itm_logits`, passes the threshold; the synthetic captions are the seeded
nucleus samples of `generate`; the counts printed are those written; the output loads back as csv and wds and
train.py trains on it; several captions of one image share its synthetic caption; bad input fails naming it."""
import csv
import json
import os
import re
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from crossmodal import train
from crossmodal.data import build_dataset
from crossmodal.data import capfilt
from crossmodal.data.make_shards import main as make_shards_main
from crossmodal.data.tokenizer import BertTokenizer
from crossmodal.data.transforms import image_transform
from crossmodal.models import create_model
from crossmodal.recipes import model_from_config
from tests.test_eval_blip import blip_run, write_checkpoint  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SPEC = "shapes:val:6"


@pytest.fixture(scope="module")
def runs(blip_run, tmp_path_factory):  # noqa: F811
    """(captioner checkpoint, filter checkpoint, captioner, filter): two BLIP-tiny runs with different weights. The
    filter's ITM head is scaled up and centred on the shapes pairs so that its match probabilities spread over (0, 1)
    (a random head gives every pair about the same)."""
    captioner_path, cfg, captioner, tokenizer = blip_run
    torch.manual_seed(1)
    filter_model = model_from_config(cfg, tokenizer).eval()
    items, images = shapes_images()
    with torch.no_grad():
        states = filter_model.forward_multimodal(tokenizer([item["caption"] for item in items]),
                                                 filter_model.forward_image(images))[:, 0]  # (6, text_width)
        filter_model.itm_head.weight.mul_(50)
        filter_model.itm_head.bias.copy_(-filter_model.itm_head.weight @ states.mean(0))
    filter_path = write_checkpoint(tmp_path_factory.mktemp("filter") / "checkpoint.pt", cfg, filter_model, tokenizer)
    return captioner_path, filter_path, captioner, filter_model


def read_rows(out) -> list[dict]:
    with open(os.path.join(out, "pairs.csv"), newline="") as f:
        return list(csv.DictReader(f))


def run(runs, out, *extra) -> dict:  # noqa: F811
    return capfilt.main([SPEC, "--captioner", runs[0], "--filter", runs[1], "--out", str(out), "--batch-size", "4",
                         "--seed", "3", *map(str, extra)])


def shapes_images(spec: str = SPEC) -> tuple[list, torch.Tensor]:
    dataset = build_dataset(spec)
    items = [dataset[i] for i in range(len(dataset))]
    transform = image_transform(64, train=False)
    return items, torch.stack([transform(item["image"]) for item in items])


@torch.no_grad()
def test_exactly_the_pairs_above_the_threshold_are_kept(runs, tmp_path, capsys):
    _, _, captioner, filter_model = runs
    everything = run(runs, tmp_path / "all", "--threshold", 0)
    rows = read_rows(tmp_path / "all")
    items, images = shapes_images()
    assert everything["web_total"] == everything["synthetic_total"] == everything["images"] == 6

    # the synthetic captions are the seeded nucleus samples, batch after batch, with BLIP's settings
    generator = torch.Generator().manual_seed(3)
    expected = [caption.strip() for batch in images.split(4)
                for caption in captioner.generate(batch, num_beams=1, top_p=0.9, repetition_penalty=1.1,
                                                  generator=generator)]
    synthetic = {int(row["filepath"][7:16]): row["caption"] for row in rows if row["source"] == "synthetic"}
    assert synthetic == {i: caption for i, caption in enumerate(expected) if caption}
    assert [row["caption"] for row in rows if row["source"] == "web"] == [item["caption"] for item in items]

    # every pair's probability is the filter's softmax(itm_logits)[1] of that image and text
    probabilities = []
    for row in rows:
        index = int(row["filepath"][7:16])
        assert np.array_equal(np.array(Image.open(tmp_path / "all" / row["filepath"])), np.array(items[index]["image"]))
        logits = filter_model.itm_logits(images[index : index + 1], filter_model.tokenizer([row["caption"]]))
        probabilities.append(float(logits.softmax(-1)[0, 1]))
        assert float(row["itm"]) == pytest.approx(probabilities[-1], abs=1e-4)

    # a threshold in the widest gap of the middle half: exactly the pairs above it are kept, in the same order
    ordered = sorted(probabilities)
    quarter = len(ordered) // 4
    low, high = max(zip(ordered[quarter:-quarter], ordered[quarter + 1 : len(ordered) - quarter + 1]),
                    key=lambda pair: pair[1] - pair[0])
    assert high - low > 1e-4
    threshold = (low + high) / 2
    capsys.readouterr()
    some = run(runs, tmp_path / "some", "--threshold", threshold)
    kept = [row for row, probability in zip(rows, probabilities) if probability > threshold]
    assert 0 < len(kept) < len(rows)
    assert [(row["filepath"], row["caption"], row["source"]) for row in read_rows(tmp_path / "some")] == \
           [(row["filepath"], row["caption"], row["source"]) for row in kept]
    web = sum(row["source"] == "web" for row in kept)
    out = capsys.readouterr().out
    assert f"kept {web}/6 web captions and {len(kept) - web}/{6} synthetic captions of 6 images" in out
    assert some["web_kept"] == web and some["synthetic_kept"] == len(kept) - web and some["pairs"] == len(kept)
    summary = json.loads((tmp_path / "some" / "capfilt.json").read_text())
    assert summary["threshold"] == threshold and summary["pairs"] == len(kept) and summary["seed"] == 3
    assert summary["data"] == SPEC and summary["output"] == f"csv:{tmp_path / 'some' / 'pairs.csv'}"


def test_a_filter_that_accepts_only_the_web_captions(runs, tmp_path, monkeypatch):
    """An ITM head patched to say "match" exactly for the tokens of a web caption: the synthetic ones all go."""
    _, _, captioner, filter_model = runs
    items, _ = shapes_images()
    web = {tuple(row.tolist()) for row in filter_model.tokenizer([item["caption"] for item in items])}

    def multimodal(tokens, image_tokens):  # (P, L) -> states (P, L, width) whose [ENC] state says web or not
        states = torch.zeros(*tokens.shape, filter_model.itm_head.in_features)
        states[:, 0, 0] = torch.tensor([1.0 if tuple(row.tolist()) in web else -1.0 for row in tokens])
        return states

    monkeypatch.setattr(filter_model, "forward_multimodal", multimodal)
    head = torch.nn.Linear(filter_model.itm_head.in_features, 2, bias=False)
    torch.nn.init.zeros_(head.weight)
    head.weight.data[1, 0] = 10.0
    monkeypatch.setattr(filter_model, "itm_head", head)
    results = capfilt.capfilt(SPEC, captioner, filter_model, str(tmp_path / "web"), batch_size=4, log_every=0)
    assert [row["caption"] for row in read_rows(tmp_path / "web")] == [item["caption"] for item in items]
    assert {row["source"] for row in read_rows(tmp_path / "web")} == {"web"}
    assert (results["web_kept"], results["web_total"], results["synthetic_kept"]) == (6, 6, 0)

    # another seed samples other captions (all kept by a head that always says "match")
    torch.nn.init.zeros_(head.weight)
    head.bias = torch.nn.Parameter(torch.tensor([0.0, 10.0]))
    synthetic = {}
    for seed in (0, 1):
        capfilt.capfilt(SPEC, captioner, filter_model, str(tmp_path / f"seed{seed}"), batch_size=4, seed=seed,
                        log_every=0)
        rows = read_rows(tmp_path / f"seed{seed}")
        synthetic[seed] = [row["caption"] for row in rows if row["source"] == "synthetic"]
    assert synthetic[0] != synthetic[1]


def test_output_loads_back_and_trains(blip_run, runs, tmp_path, capsys):  # noqa: F811
    run(runs, tmp_path / "csv")  # BLIP's threshold, 0.5
    run(runs, tmp_path / "wds", "--format", "wds", "--shard-size", 4)
    rows = read_rows(tmp_path / "csv")
    assert 4 < len(rows) < 12 and {row["source"] for row in rows} == {"web", "synthetic"}
    dataset = build_dataset(f"csv:{tmp_path / 'csv' / 'pairs.csv'}")
    assert [dataset[i]["caption"] for i in range(len(dataset))] == [row["caption"] for row in rows]
    shards = build_dataset(f"wds:{tmp_path / 'wds'}")
    assert len(shards.shards) == -(-len(rows) // 4)
    records = list(shards)
    assert [record["caption"] for record in records] == [row["caption"] for row in rows]
    for record, row, item in zip(records, rows, (dataset[i] for i in range(len(dataset)))):
        assert np.array_equal(np.array(record["image"]), np.array(item["image"]))
    with tarfile.open(shards.shards[0]) as tar:
        about = json.loads(tar.extractfile("000000000.json").read())
    assert about["source"] == rows[0]["source"] and about["itm"] == pytest.approx(float(rows[0]["itm"]), abs=1e-4)

    tokenizer_path = tmp_path / "spm.model"
    tokenizer_path.write_bytes(blip_run[3].model_bytes())
    for spec in (f"csv:{tmp_path / 'csv' / 'pairs.csv'}", f"wds:{tmp_path / 'wds'}"):
        train.main([f"--out_dir={tmp_path / spec[:3]}_run", "--model.name=BLIP-tiny", "--blip.queue_size=8",
                    f"--data.train={spec}", f"--data.tokenizer_path={tokenizer_path}", "--data.workers=0",
                    "--data.val=shapes:val:4", "--data.heldout=", "--data.image_size=64", "--data.context_length=32",
                    "--train.batch_size=4", "--train.steps=2", "--train.log_every=1", "--train.warmup_steps=1"])
        assert len(re.findall(r"^step \d+/2 loss [\d.]+ itc", capsys.readouterr().out, re.M)) == 2


def test_captions_sharing_an_image_unreadable_images_and_limit(runs, tmp_path, capsys):
    items, _ = shapes_images("shapes:train:3")
    (tmp_path / "images").mkdir()
    for i, item in enumerate(items):
        item["image"].save(tmp_path / "images" / f"{i}.png")
    rows = ["filepath,caption", "images/0.png,first", "images/1.png,second", "images/0.png,first again",
            "images/missing.png,lost", "images/2.png,third"]
    (tmp_path / "web.csv").write_text("\n".join(rows) + "\n")
    spec = f"csv:{tmp_path / 'web.csv'}"
    arguments = ["--captioner", runs[0], "--filter", runs[1], "--threshold", 0, "--batch-size", 2, "--log-every", 1]
    results = capfilt.main([spec, "--out", str(tmp_path / "out"), *map(str, arguments)])
    captured = capsys.readouterr()
    assert "left out an unreadable image" in captured.err and "missing.png: missing file" in captured.err
    # image 0 has two web captions and one synthetic one; the files are referenced where they are
    assert (results["web_total"], results["synthetic_total"], results["images"], results["bad_images"]) == (4, 3, 3, 1)
    written = read_rows(tmp_path / "out")
    assert [(row["filepath"], row["source"]) for row in written[:3]] == \
           [(str(tmp_path / "images" / "0.png"), kind) for kind in ("web", "web", "synthetic")]
    assert not os.listdir(tmp_path / "out" / "images")
    assert re.search(r"capfilt: 2/4 images, [\d.]+ images/s, ETA [\d.]+ min; kept web 3/3, synthetic 2/2", captured.out)

    # the same images streamed from shards, stopped after 2 of them
    make_shards_main([spec, "--out", str(tmp_path / "shards"), "--shard-size", "2"])
    results = capfilt.main([f"wds:{tmp_path / 'shards'}", "--out", str(tmp_path / "from_shards"), "--limit", "2",
                            *map(str, arguments)])
    assert (results["images"], results["web_total"], results["synthetic_total"]) == (2, 2, 2)
    assert [row["caption"] for row in read_rows(tmp_path / "from_shards") if row["source"] == "web"] == \
           ["first", "second"]
    assert sorted(os.listdir(tmp_path / "from_shards" / "images")) == ["000000000.png", "000000001.png"]


def test_released_weights_and_bad_input(runs, tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "picture", "of", "red", "blue", "circle", "square"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(0)
    model = create_model("BLIP-tiny", tokenizer=BertTokenizer(tmp_path / "vocab.txt"))
    torch.save({"model": model.state_dict()}, tmp_path / "model.pth")
    released = ["--captioner-model", "BLIP-tiny", "--captioner-pretrained", str(tmp_path / "model.pth"),
                "--vocab", str(tmp_path / "vocab.txt")]
    results = capfilt.main(["shapes:val:2", "--out", str(tmp_path / "out"), *released, "--filter", runs[1],
                            "--threshold", "0"])
    assert results["synthetic_total"] == 2
    retrieval_only = {key: value for key, value in model.state_dict().items()
                      if not key.startswith(("text_decoder.", "lm_head."))}
    torch.save({"model": retrieval_only}, tmp_path / "retrieval.pth")
    clip = create_model("ViT-tiny")
    torch.save({"model": clip.state_dict()}, tmp_path / "clip.pth")

    good = ["shapes:val:2", "--captioner", runs[0], "--filter", runs[1]]
    for arguments, message in [
        ([*good, "--out", str(tmp_path / "out")], r"already holds a dataset \(pairs\.csv\)"),
        ([*good, "--threshold", "1.5"], r"--threshold must be in \[0, 1\)"),
        ([*good, "--limit", "0"], "--limit must be at least 1"),
        (["shapes:val:2", "--captioner", runs[0]], "give either --filter RUN/checkpoint.pt or --filter-model"),
        (["shapes:val:2", "--captioner", str(tmp_path / "nope.pt"), "--filter", runs[1]],
         "--captioner: no file at '.*nope.pt'"),
        (["shapes:val:2", "--captioner-model", "BLIP-tiny", "--captioner-pretrained", str(tmp_path / "retrieval.pth"),
          "--vocab", str(tmp_path / "vocab.txt"), "--filter", runs[1]], "retrieval.pth has no text_decoder"),
        (["shapes:val:2", "--captioner", runs[0], "--filter-model", "ViT-tiny", "--filter-pretrained",
          str(tmp_path / "clip.pth")], "ViT-tiny is not a BLIP preset"),
        (["vqa:questions.json", "--captioner", runs[0], "--filter", runs[1]], "vqa specs hold questions"),
        (["shapse:val", "--captioner", runs[0], "--filter", runs[1]], "did you mean 'shapes'"),
    ]:
        with pytest.raises(SystemExit, match=f"^capfilt: .*{message}"):
            capfilt.main([*arguments, *(["--out", str(tmp_path / "new")] if "--out" not in arguments else [])])
