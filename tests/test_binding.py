"""The attribute-binding split (data/binding.py) and eval.py --task binding (evaluation/binding.py): the candidate
sets against the scenes they describe, and both scorers against hand computations on random CLIP and BLIP models."""
import dataclasses
import json
import re
from collections import Counter

import pytest
import torch

from crossmodal import eval as evaluation
from crossmodal import recipes
from crossmodal.config import Config
from crossmodal.data import build_dataset
from crossmodal.data.binding import KINDS, BindingDataset
from crossmodal.data.shapes import HELDOUT_CLASSNAMES, SEEN_CLASSES, CLASSNAMES
from crossmodal.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from crossmodal.data.transforms import image_transform
from crossmodal.evaluation.binding import summarise
from crossmodal.recipes import model_from_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_sets_exchange_the_words_of_the_scene():
    dataset = build_dataset("shapes:binding:300")
    assert isinstance(dataset, BindingDataset) and len(dataset) == 300 and len(BindingDataset()) == 1000
    objects = Counter()
    for index in range(len(dataset)):
        scene, _ = dataset.scene(index)
        objects[len(scene.objects)] += 1
        assert len({obj.color for obj in scene.objects}) == len({obj.shape for obj in scene.objects}) == len(scene.objects)
        assert all(obj.classname not in HELDOUT_CLASSNAMES for obj in scene.objects)
        sets = dict(dataset.candidate_sets(index))
        pairs = len(scene.objects) * (len(scene.objects) - 1) // 2
        assert [len(sets[kind]) for kind in ("colour", "shape", "size")] == [1 + pairs, 1 + pairs, len(scene.objects)]
        for kind, captions in sets.items():
            true, negatives = captions[0], captions[1:]
            assert len(set(captions)) == len(captions)
            for negative in negatives:  # the same words, two of them exchanged (position: the main one's moved)
                if kind == "position":  # "{main} {position}, with {others}." with another object's position
                    main, others = true.split(", with ")
                    assert negative.endswith(f", with {others}") and negative != true
                    assert negative.startswith(" ".join(main.split()[:4]) + " ")
                    continue
                words, other_words = re.findall(r"[a-z]+", true), re.findall(r"[a-z]+", negative)
                changed = [(a, b) for a, b in zip(words, other_words) if a != b]
                assert Counter(words) == Counter(other_words) and len(changed) == 2
                assert changed[0] == changed[1][::-1]
                for color in ("red", "green", "blue", "yellow", "purple", "orange"):  # every pair named is seen
                    for shape in ("circle", "square", "triangle", "star", "cross", "hexagon"):
                        if f"{color} {shape}" in negative:
                            assert f"{color} {shape}" not in HELDOUT_CLASSNAMES
        # the true caption names each object with its own colour and shape
        for obj in scene.objects:
            assert f"{obj.color} {obj.shape}" in sets["colour"][0]
        if "position" in sets:
            assert sets["position"][0].startswith(f"a {'large' if 'large' in sets['size'][0] else 'big'} "
                                                  f"{scene.objects[0].classname}")
        assert dataset[index]["caption"] == sets["colour"][0]
        assert dataset[index]["label"] == CLASSNAMES.index(scene.objects[0].classname)
    assert objects[2] > 100 and objects[3] > 100 and set(objects) == {2, 3}
    again = build_dataset("shapes:binding:300")
    assert again.candidate_sets(7) == dataset.candidate_sets(7)
    assert BindingDataset(seed=1).candidate_sets(7) != dataset.candidate_sets(7)
    assert len(SEEN_CLASSES) == 30


def test_summarise_by_hand():
    sets = [(0, "colour", ["t", "n"]), (0, "size", ["t", "n", "m"]), (1, "colour", ["t", "n"]),
            (2, "colour", ["t", "n"])]
    itc = torch.tensor([0.9, 0.1, 0.5, 0.6, 0.2, 0.3, 0.3, 0.8, 0.1])  # right, wrong, a tie (wrong), right
    results = summarise(sets, {"itc": itc}, torch.tensor([False, False, True]))  # image 2 unreadable: wrong
    assert results["itc_accuracy"] == 25.0 and results["itc_accuracy_colour"] == pytest.approx(100 / 3)
    assert results["itc_accuracy_size"] == 0.0
    assert results["chance"] == pytest.approx(100 * (1 / 2 + 1 / 3 + 1 / 2 + 1 / 2) / 4)
    assert results["chance_size"] == pytest.approx(100 / 3) and results["num_sets_colour"] == 3
    assert results["bad_images"] == 1 and results["examples"][1]["itc"] == [0.5, 0.6, 0.2]


def write_checkpoint(path, cfg, model, tokenizer) -> str:
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(cfg), "tokenizer": tokenizer.model_bytes(),
                "step": 0}, path)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("binding_tokenizer")
    dataset = build_dataset("shapes:train:300")
    texts = [dataset[i]["caption"] for i in range(len(dataset))] + ["with next to"]
    return SentencePieceTokenizer(train_sentencepiece(texts, folder / "spm", 256, blip_tokens=True),
                                  context_length=32)


def by_hand(model, tokenizer, spec: str) -> tuple[float, float | None]:
    """Accuracy of ITC (and ITM) over the sets, from encode_image/encode_text and itm_logits pair by pair."""
    dataset, transform = build_dataset(spec, 64), image_transform(64, train=False)
    right = {"itc": [], "itm": []}
    for index in range(len(dataset)):
        image = transform(dataset[index]["image"])[None]
        for _, captions in dataset.candidate_sets(index):
            tokens = tokenizer(captions)
            itc = (model.encode_text(tokens, normalize=True) @ model.encode_image(image, normalize=True).T)[:, 0]
            right["itc"].append(bool(itc[0] > itc[1:].max()))
            if hasattr(model, "itm_logits"):
                itm = model.itm_logits(image.expand(len(captions), -1, -1, -1), tokens).softmax(-1)[:, 1]
                right["itm"].append(bool(itm[0] > itm[1:].max()))
    return tuple(100 * sum(r) / len(r) if r else None for r in right.values())


@pytest.mark.parametrize("family", ["clip", "blip"])
def test_command_line_against_hand_scores(family, tokenizer, tmp_path):
    cfg = Config()
    cfg.model.name = "BLIP-tiny" if family == "blip" else "RN-tiny"
    cfg.data.image_size, cfg.data.context_length = 64, 32
    torch.manual_seed(0)
    model = model_from_config(cfg, tokenizer)
    checkpoint = write_checkpoint(tmp_path / "checkpoint.pt", cfg, model, tokenizer)
    out = tmp_path / "binding.json"
    spec = "shapes:binding:12"
    evaluation.main(["--checkpoint", checkpoint, "--task", "binding", "--data", spec, "--batch-size", "5",
                     "--out", str(out)])
    results = json.loads(out.read_text())
    _, model, tokenizer = recipes.load_run(checkpoint)
    with torch.no_grad():
        itc, itm = by_hand(model.eval(), tokenizer, spec)
    assert results["itc_accuracy"] == pytest.approx(itc)
    assert ("itm_accuracy" in results) == (family == "blip")
    if family == "blip":
        assert results["itm_accuracy"] == pytest.approx(itm)
    assert 30 < results["chance"] < 50 and results["num_images"] == 12
    assert sum(results[f"num_sets_{kind}"] for kind in KINDS if f"num_sets_{kind}" in results) == results["num_sets"]


def test_binding_needs_candidate_sets(tokenizer, tmp_path, capsys):
    cfg = Config()
    cfg.model.name, cfg.data.image_size, cfg.data.context_length = "RN-tiny", 64, 32
    model = model_from_config(cfg, tokenizer)
    checkpoint = write_checkpoint(tmp_path / "checkpoint.pt", cfg, model, tokenizer)
    with pytest.raises(SystemExit) as exit:
        evaluation.main(["--checkpoint", checkpoint, "--task", "binding", "--data", "shapes:val:8"])
    assert exit.value.code == 2
    assert "--task binding needs candidate sets: --data shapes:binding[:N]; got 'shapes:val:8'" in capsys.readouterr().err


def test_exchange_on_training_captions_by_hand():
    from crossmodal.data.shapes import Scene, ShapeObject, exchange

    circle = ShapeObject("red", "circle", 0.6, (0.3, 0.5), 0.0)  # the largest, on the left
    square = ShapeObject("blue", "square", 0.25, (0.8, 0.5), 0.0)  # small, on the right
    star = ShapeObject("red", "star", 0.18, (0.5, 0.1), 0.0)  # tiny, at the top, the circle's colour
    scene = Scene("white", (circle, square, star))
    caption = "a large red circle on the left, with a small blue square and a red star."
    assert exchange(caption, scene, "colour", 0, 1) == "a large blue circle on the left, with a small red square and a red star."
    assert exchange(caption, scene, "shape", 1, 0) == "a large red square on the left, with a small blue circle and a red star."
    assert exchange(caption, scene, "size", 0, 1) == "a small red circle on the left, with a large blue square and a red star."
    assert exchange(caption, scene, "position", 0, 1) == "a large red circle on the right, with a small blue square and a red star."
    assert exchange(caption, scene, "colour", 0, 2) is None  # the same colour: nothing false
    assert exchange(caption, scene, "size", 1, 2) is None  # small against tiny: not the largest
    assert exchange(caption, scene, "position", 1, 0) is None  # only the largest object's position is said
    assert exchange(caption, scene, "size", 2, 0) is None  # the star has no size word here
    # an object the caption does not name still lends its attribute to one it does
    assert exchange("there is a red circle on the left.", scene, "colour", 0, 1) == "there is a blue circle on the left."
    assert exchange("a photo of the red circle on the left.", scene, "shape", 0, 1) == "a photo of the red square on the left."
    assert exchange("a photo of the red circle on the left.", scene, "shape", 0, 2) is None  # a red star is there
    assert exchange("a blue square", scene, "colour", 0, 1) is None  # the circle is not named
    # the article follows the word that now comes first, so that no negative gives itself away by its grammar
    orange = Scene("white", (ShapeObject("orange", "circle", 0.6, (0.3, 0.5), 0.0), square))
    assert exchange("an orange circle and a blue square.", orange, "colour", 0, 1) == "a blue circle and an orange square."
    assert exchange("the orange circle and a blue square.", orange, "colour", 1, 0) == "the blue circle and an orange square."
    assert exchange("an orange circle and a small blue square.", orange, "colour", 0, 1) == "a blue circle and a small orange square."


def test_training_negatives_are_false_and_drawn_from_their_own_stream():
    dataset = build_dataset("shapes:train:400")
    plain = [dataset[i]["caption"] for i in range(400)]
    negatives = [dataset.negative_caption(i) for i in range(400)]
    assert [dataset[i]["caption"] for i in range(400)] == plain  # items are unchanged by drawing negatives
    for index, (caption, negative) in enumerate(zip(plain, negatives)):
        objects = dataset.describe(index).objects
        if len(objects) == 1 or not negative:  # (several objects of one colour may leave no exchange that is false)
            assert negative == "" and (len(objects) == 1 or len({obj.color for obj in objects}) < len(objects))
            continue
        assert negative != caption
        named = {f"{obj.color} {obj.shape}" for obj in objects}
        said = {f"{c} {s}" for c, s in re.findall(r"(red|green|blue|yellow|purple|orange) (circle|square|triangle|star|"
                                                   r"cross|hexagon)", negative)}
        changed_pairs = said - named  # a colour or shape exchange names a pair the scene does not have
        assert changed_pairs or re.findall(r"[a-z]+", negative) != re.findall(r"[a-z]+", caption)
    assert sum(bool(n) for n in negatives) > 200 and negatives == [dataset.negative_caption(i) for i in range(400)]


def test_collate_carries_the_negatives(tokenizer):
    from crossmodal.data import Collate, ImageTextDataset
    from crossmodal.data.transforms import image_transform as transform_for

    base = build_dataset("shapes:train:8")
    items = [ImageTextDataset(base, transform_for(64, train=False), negatives=True)[i] for i in range(8)]
    batch = Collate(tokenizer)(items)
    assert batch["has_negative"].tolist() == [bool(base.negative_caption(i)) for i in range(8)]
    assert torch.equal(batch["negative_tokens"], tokenizer([base.negative_caption(i) for i in range(8)]))
    assert "negative_tokens" not in Collate(tokenizer)([ImageTextDataset(base, transform_for(64, train=False))[0]])
