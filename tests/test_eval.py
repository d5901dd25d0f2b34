"""eval.py: recall and accuracy against hand-computed cases, the zero-shot classifier's construction,
the command line on a checkpoint that train.py wrote, and on released weights against open_clip's own
zero-shot pipeline."""
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from crossmodal import eval as evaluation
from crossmodal import train
from crossmodal.data import eval_loader, retrieval_loader
from crossmodal.data.templates import load_templates
from crossmodal.data.tokenizer import ClipTokenizer
from crossmodal.models import create_model
from tests.test_train import small_run, tokenizer_path  # noqa: F401  (module-scoped fixture)
from crossmodal import recipes
from crossmodal.evaluation import contrastive


def test_retrieval_metrics_by_hand():
    # 3 images, 4 captions; caption 3 also describes image 0 (COCO-style several captions per image)
    images = torch.eye(3)
    texts = torch.tensor([[0.1, 0.9, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    results = contrastive.retrieval_metrics(images, texts, torch.tensor([0, 1, 2, 0]), ks=(1, 2))
    # image 0: best caption is 3 (true) -> R@1; image 1: caption 1 first -> R@1; image 2: caption 2 -> R@1
    assert results["image_to_text_R@1"] == 100.0
    # caption 0 (true image 0) is closest to image 1: found at rank 2; the other three at rank 1
    assert results["text_to_image_R@1"] == 75.0 and results["text_to_image_R@2"] == 100.0


def test_accuracy_topk():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.7, 0.2]])
    results = contrastive.accuracy(logits, torch.tensor([0, 1, 2]), topk=(1, 2))
    assert abs(results["top1"] - 100 / 3) < 1e-4 and results["top2"] == 100.0


class _Encoder:
    def encode_text(self, tokens, normalize=False):
        features = tokens[:, :3].float()
        return F.normalize(features, dim=-1) if normalize else features


def test_zeroshot_classifier_is_renormalised_mean_of_normalised_prompts():
    def tokenizer(texts):
        return torch.tensor([[1.0, 0.0, 0.0] if "x" in t else [0.0, 3.0, 4.0] for t in texts])

    weights = contrastive.zeroshot_classifier(_Encoder(), tokenizer, ["x", "y"], ["{}", "a {} z"], "cpu")
    assert torch.allclose(weights.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(weights[1], torch.tensor([0.0, 0.6, 0.8]))


@torch.no_grad()
def zeroshot_top1_by_hand(model, tokenizer, spec, image_size, templates, classnames=None) -> float:
    """Zero-shot top-1 written out: class embedding = normalised mean of normalised prompt embeddings, argmax of
    image . class per image."""
    dataset, loader = eval_loader(spec, image_size, tokenizer, batch_size=7)
    names = classnames or dataset.classnames
    classes = []
    for name in names:
        prompts = model.encode_text(tokenizer([t.format(name) for t in templates]))
        classes.append(F.normalize(F.normalize(prompts, dim=-1).mean(0), dim=0))
    correct = total = 0
    for batch in loader:
        for image, label in zip(batch["image"], batch["label"]):
            feature = F.normalize(model.encode_image(image[None]), dim=-1)[0]
            correct += int(max(range(len(classes)), key=lambda c: float(feature @ classes[c])) == int(label))
            total += 1
    return 100.0 * correct / total


@torch.no_grad()
def text_to_image_r1_by_hand(model, tokenizer, spec, image_size) -> float:
    loader, tokens, text_to_image = retrieval_loader(spec, image_size, tokenizer, batch_size=3)
    images = torch.cat([F.normalize(model.encode_image(batch["image"]), dim=-1) for batch in loader])
    texts = F.normalize(model.encode_text(tokens), dim=-1)
    hits = [int((images @ text).argmax()) == int(truth) for text, truth in zip(texts, text_to_image)]
    return 100.0 * sum(hits) / len(hits)


def test_command_line_writes_the_paper_metrics(tmp_path, tokenizer_path):  # noqa: F811
    train.main(small_run(tmp_path / "run", tokenizer_path, "--train.steps=2"))
    checkpoint = str(tmp_path / "run" / "checkpoint.pt")
    out = tmp_path / "zeroshot.json"
    evaluation.main(["--checkpoint", checkpoint, "--task", "zeroshot", "--data", "shapes:val:50", "--out", str(out)])
    results = json.loads(out.read_text())
    cfg, model, tokenizer = recipes.load_run(checkpoint)
    expected = zeroshot_top1_by_hand(model, tokenizer, "shapes:val:50", 64, load_templates("shapes"))
    assert results["top1"] == pytest.approx(expected) and results["top1"] <= results["top5"]
    assert results["num_classes"] == 36 and results["num_images"] == 50
    out = tmp_path / "retrieval.json"
    evaluation.main(["--checkpoint", checkpoint, "--task", "retrieval", "--data", "shapes:val:50", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["text_to_image_R@1"] == pytest.approx(text_to_image_r1_by_hand(model, tokenizer, "shapes:val:50", 64))
    for direction in ("image_to_text", "text_to_image"):
        assert results[f"{direction}_R@1"] <= results[f"{direction}_R@5"] <= results[f"{direction}_R@10"]



def test_command_line_on_coco_retrieval_and_imagefolder_zeroshot(tmp_path, tokenizer_path):  # noqa: F811
    from tests.test_data_formats import karpathy, write_images

    train.main(small_run(tmp_path / "run", tokenizer_path, "--train.steps=1"))
    checkpoint = str(tmp_path / "run" / "checkpoint.pt")
    spec = f"coco:{karpathy(tmp_path / 'coco')}#test"  # 4 test images, 21 captions
    out = tmp_path / "retrieval.json"
    results = evaluation.main(["--checkpoint", checkpoint, "--task", "retrieval", "--data", spec, "--out", str(out)])
    assert results["num_images"] == 4 and results["num_texts"] == 21 and results["bad_images"] == 0
    _, model, tokenizer = recipes.load_run(checkpoint)
    assert results["text_to_image_R@1"] == pytest.approx(text_to_image_r1_by_hand(model, tokenizer, spec, 64))
    assert json.loads(out.read_text())["data"] == spec

    for folder in ("red_square", "blue_circle", "green_star"):
        write_images(tmp_path / "classes" / folder, 3, prefix=folder)
    (tmp_path / "templates.txt").write_text("a photo of a {}.\n")
    results = evaluation.main(["--checkpoint", checkpoint, "--task", "zeroshot", "--data",
                               f"imagefolder:{tmp_path / 'classes'}", "--templates", str(tmp_path / "templates.txt")])
    assert results["num_classes"] == 3 and results["num_images"] == 9
    expected = zeroshot_top1_by_hand(model, tokenizer, f"imagefolder:{tmp_path / 'classes'}", 64,
                                     ["a photo of a {}."], ["red square", "blue circle", "green star"])
    assert results["top1"] == pytest.approx(expected)
    with pytest.raises(SystemExit, match="has 2 names but imagefolder"):
        (tmp_path / "two.txt").write_text("red\nblue\n")
        evaluation.main(["--checkpoint", checkpoint, "--task", "zeroshot", "--data",
                         f"imagefolder:{tmp_path / 'classes'}", "--classnames", str(tmp_path / "two.txt")])

# Released weights: the whole zero-shot pipeline against open_clip's (test-only peer), random weights.
try:
    import open_clip
except ImportError:
    open_clip = None
needs_open_clip = pytest.mark.skipif(open_clip is None, reason="open_clip (the dev extra) is the reference")


@pytest.fixture(scope="module")
def released_weights(tmp_path_factory):
    """open_clip's ViT-B-32-quickgelu with fp16-representable random weights, and its checkpoint (fp16)."""
    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-32-quickgelu").half().float().eval()
    path = tmp_path_factory.mktemp("weights") / "open_clip_model.pt"
    torch.save({"state_dict": {key: value.half() for key, value in reference.state_dict().items()}}, path)
    yield reference, str(path)
    path.unlink()


def write_imagefolder(root, classes=("golden_retriever", "tabby_cat", "castle"), per_class=2):
    generator = torch.Generator().manual_seed(0)
    for c, folder in enumerate(classes):
        (root / folder).mkdir(parents=True)
        for i in range(per_class):
            size = (200 + 37 * i, 260 - 20 * c)  # not square: the shortest side is resized, then cropped
            pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
            image = Image.fromarray(pixels.numpy())
            (image.convert("L") if i == 1 else image).save(root / folder / f"{i}.png")
    return root


@needs_open_clip
def test_zeroshot_classifier_equals_open_clips(released_weights):
    reference, path = released_weights
    model = create_model("ViT-B-32-quickgelu", pretrained=path).eval()
    tokenizer = ClipTokenizer(open_clip.tokenizer.default_bpe())
    names, templates = ["golden retriever", "tabby cat!", "château"], load_templates("imagenet")[:5]
    ours = contrastive.zeroshot_classifier(model, tokenizer, names, templates, "cpu")  # (classes, D)
    with torch.no_grad():
        theirs = open_clip.build_zero_shot_classifier(
            reference, open_clip.get_tokenizer("ViT-B-32-quickgelu"), names, templates)  # (D, classes)
    torch.testing.assert_close(ours, theirs.T, atol=1e-5, rtol=0)


@needs_open_clip
def test_released_weights_command_line_matches_open_clip(released_weights, tmp_path):
    reference, path = released_weights
    root = write_imagefolder(tmp_path / "val")
    (tmp_path / "classes.txt").write_text("# my names\ngolden retriever\ntabby cat\ncastle\n")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\na drawing of the {}.\n")
    out = tmp_path / "zeroshot.json"
    results = evaluation.main([
        "--model", "ViT-B-32-quickgelu", "--pretrained", path, "--task", "zeroshot", "--data", f"imagefolder:{root}",
        "--classnames", str(tmp_path / "classes.txt"), "--templates", str(tmp_path / "templates.txt"),
        "--batch-size", "4", "--out", str(out)])  # --bpe: found in the installed open_clip

    # open_clip's own protocol on the same files: its preprocessing, tokenizer and classifier
    preprocess = open_clip.image_transform(224, is_train=False)
    files = sorted(root.glob("*/*.png"))
    labels = torch.tensor([["castle", "golden_retriever", "tabby_cat"].index(f.parent.name) for f in files])
    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(f)) for f in files])
        image_features = F.normalize(reference.encode_image(images), dim=-1)
        classifier = open_clip.build_zero_shot_classifier(
            reference, open_clip.get_tokenizer("ViT-B-32-quickgelu"), ["castle", "golden retriever", "tabby cat"],
            ["a photo of a {}.", "a drawing of the {}."])
    logits = 100.0 * image_features @ classifier
    assert results["num_classes"] == 3 and results["num_images"] == 6
    assert results["top1"] == pytest.approx(100.0 * (logits.argmax(-1) == labels).float().mean().item())
    assert json.loads(out.read_text())["model"] == "ViT-B-32-quickgelu"

    # the image features eval.py computes equal open_clip's (same preprocessing, same weights)
    model = create_model("ViT-B-32-quickgelu", pretrained=path).eval()
    dataset, loader = eval_loader(f"imagefolder:{root}", 224, ClipTokenizer(open_clip.tokenizer.default_bpe()), 8)
    ours, _, bad = contrastive.encode_images(model, loader, "cpu")
    assert bad == 0
    torch.testing.assert_close(ours, image_features, atol=1e-5, rtol=0)


def test_command_line_names_the_problem(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluation.main(["--task", "zeroshot"])
    assert "give either --checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--bpe: no CLIP BPE vocabulary at 'nowhere.txt.gz'"):
        evaluation.main(["--model", "ViT-B-32-quickgelu", "--pretrained", "nowhere.pt", "--bpe", "nowhere.txt.gz",
                         "--task", "zeroshot"])
    with pytest.raises(SystemExit, match="did you mean 'imagenet'"):
        evaluation.main(["--model", "ViT-B-32-quickgelu", "--pretrained", "nowhere.pt", "--task", "zeroshot",
                         "--classnames", "imagenett"])
    with pytest.raises(SystemExit, match="--checkpoint: no file at 'nowhere.pt'"):
        evaluation.main(["--checkpoint", "nowhere.pt", "--task", "zeroshot"])


@needs_open_clip
@pytest.mark.parametrize("mode", ["RGB", "L", "P", "CMYK", "RGBA"])
def test_eval_preprocessing_equals_open_clips(mode):
    from crossmodal.data.transforms import image_transform

    pixels = torch.randint(0, 256, (300, 241, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    image = Image.fromarray(pixels.numpy()).convert(mode)
    ours = image_transform(224, train=False)(image)
    assert torch.equal(ours, open_clip.image_transform(224, is_train=False)(image))


def test_linear_probe_command_line(tmp_path, tokenizer_path, monkeypatch):  # noqa: F811
    import functools

    from crossmodal.evaluation import probe

    # the command line around the probe, not the solver's convergence (tests/test_probe.py checks that)
    monkeypatch.setattr(probe, "fit_logistic", functools.partial(probe.fit_logistic, max_iter=30))
    train.main(small_run(tmp_path / "run", tokenizer_path, "--train.steps=2"))
    checkpoint, out = str(tmp_path / "run" / "checkpoint.pt"), tmp_path / "probe.json"
    # the probe itself is tested against scikit-learn in tests/test_probe.py; here the command line around it
    results = evaluation.main(["--checkpoint", checkpoint, "--task", "linear_probe", "--data", "shapes:train:144",
                               "--val", "shapes:val:72", "--shots", "1", "--seeds", "3", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["top1"] == results["top1"] and written["num_classes"] == 36 and written["num_test"] == 72
    assert len(written["confusion_matrix"]) == 36 and sum(map(sum, written["confusion_matrix"])) == 72
    assert [run["seed"] for run in written["shots"]["1"]["runs"]] == [3]
    with pytest.raises(SystemExit, match="needs --data"):
        evaluation.main(["--checkpoint", checkpoint, "--task", "linear_probe", "--data", "shapes:train:36"])


def test_unreadable_images_are_misses_and_never_candidates():
    images = torch.eye(3)
    texts = torch.eye(3)[[0, 1, 2, 2]]  # captions 2 and 3 describe image 2
    text_to_image = torch.tensor([0, 1, 2, 2])
    whole = contrastive.retrieval_metrics(images, texts, text_to_image, ks=(1,))
    assert whole == {"image_to_text_R@1": 100.0, "text_to_image_R@1": 100.0}
    unreadable = torch.tensor([False, False, True])
    broken = contrastive.retrieval_metrics(images, texts, text_to_image, ks=(1, 3), unreadable=unreadable)
    assert broken["image_to_text_R@1"] == pytest.approx(200 / 3) and broken["text_to_image_R@3"] == 50.0
    # a caption of image 0 that looks most like the unreadable image 2 still finds image 0 first
    similar = contrastive.retrieval_metrics(images, torch.tensor([[0.5, 0.0, 1.0]]), torch.tensor([0]), ks=(1,),
                                            unreadable=unreadable)
    assert similar["text_to_image_R@1"] == 100.0


def test_fewshot_pool_is_the_train_side_and_never_the_query():
    from crossmodal.evaluation.fewshot import FewShotData, demonstrations

    whole = FewShotData("shapes_icl:val", 32, num_queries=None, pool_size=64)
    assert len(whole.queries) == 2000 and whole.pool_source.split == "train" and not whole.pool_position
    words = whole.base.words(5)
    demo = whole.demonstration(whole.pool[0], episode=5)
    assert demo["answers"][0] in words.values()  # a train image named in the query's episode's words
    same = FewShotData("shapes:val:6", 32)  # the queries take the whole spec: each is left out of its own pool
    assert sorted(same.pool) == same.queries == list(range(6))
    for position, query in enumerate(same.queries):
        for seed in range(5):
            assert query not in demonstrations(same, position, 5, seed, None)
        similarity = torch.zeros(6, 6).fill_diagonal_(1.0)  # RICES would pick the query itself first
        assert query not in demonstrations(same, position, 2, 0, similarity)
    apart = FewShotData("shapes:val:6", 32, num_queries=2)
    assert not set(apart.pool[:4]) & set(apart.queries)  # the other examples come first
