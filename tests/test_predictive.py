"""The CLIP paper's predictive baselines (models/predictive.py): the caption and bag-of-words losses against
independent per-token computations, their float64 gradients, the zero-shot scores against the losses, and a
run through train.py and eval.py."""
import json

import pytest
import torch
import torch.nn.functional as F

from crossmodal import eval as evaluation
from crossmodal import train
from crossmodal.config import load_config
from crossmodal.models import create_model
from crossmodal.models.predictive import TextPredictor
from tests.test_train import CONFIG, small_run, tokenizer_path  # noqa: F401 (a fixture)
from crossmodal import recipes

pytestmark = pytest.mark.usefixtures("one_thread")

PAD, BOS, EOS, VOCAB = 0, 2, 3, 40


def predictor(objective: str, dtype=torch.float32) -> TextPredictor:
    torch.manual_seed(0)
    clip = create_model("ViT-tiny", vocab_size=VOCAB, context_length=12, image_size=32)
    text = clip.text if objective == "caption" else None
    return TextPredictor(clip.visual, objective, VOCAB, PAD, BOS, EOS, text=text).to(dtype).eval()


def captions() -> torch.Tensor:
    """Four padded captions of different lengths, with a repeated word."""
    rows = [[BOS, 5, 6, 7, EOS], [BOS, 9, 9, 11, 12, 13, EOS], [BOS, 20, EOS], [BOS, 30, 31, 30, 32, 33, 34, EOS]]
    return torch.tensor([row + [PAD] * (10 - len(row)) for row in rows])


def test_caption_loss_is_next_token_cross_entropy_over_the_words():
    model = predictor("caption", torch.float64)
    images, tokens = torch.randn(4, 3, 32, 32, dtype=torch.float64), captions()
    loss = model(images, tokens)["caption"]
    features = model.visual(images)
    total, count = 0.0, 0
    for row, caption in enumerate(tokens):  # one prefix at a time: position t sees the image and tokens <= t only
        length = int((caption != PAD).sum())
        for t in range(length - 1):
            image = model.image_proj(features[row : row + 1])
            hidden = model.text.forward_features(caption[None, : t + 1], first=image)
            logits = hidden[0, -1] @ model.text.token_embedding.weight.T
            total -= F.log_softmax(logits, -1)[caption[t + 1]].item()
            count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-10)


def test_bag_of_words_loss_is_cross_entropy_against_normalised_word_counts():
    model = predictor("bow", torch.float64)
    images, tokens = torch.randn(4, 3, 32, 32, dtype=torch.float64), captions()
    loss = model(images, tokens)["bow"]
    log_probs = F.log_softmax(model.bow_head(model.visual(images)), -1)
    expected = 0.0
    for row, caption in enumerate(tokens):
        words = [int(t) for t in caption if int(t) not in (PAD, BOS, EOS)]
        expected -= sum(log_probs[row, w].item() for w in words) / len(words)  # "9 9" counts twice
    assert loss.item() == pytest.approx(expected / len(tokens), rel=1e-10)


@pytest.mark.parametrize("objective", ["caption", "bow"])
def test_gradients_match_finite_differences_in_float64(objective):
    model = predictor(objective, torch.float64)
    tokens = captions()[:2]
    features = torch.randn(2, model.visual.output_dim, dtype=torch.float64, requires_grad=True)
    model.visual = torch.nn.Identity()  # the loss's gradient in the image features
    model.visual.output_dim = features.shape[1]
    assert torch.autograd.gradcheck(lambda f: model(f, tokens)[objective], (features,))


@pytest.mark.parametrize("objective", ["caption", "bow"])
def test_zero_shot_score_is_minus_the_loss_of_one_pair(objective):
    model = predictor(objective, torch.float64)
    images, tokens = torch.randn(3, 3, 32, 32, dtype=torch.float64), captions()
    scores = model.log_likelihoods(model.visual(images), tokens, chunk=2)  # (3 images, 4 texts)
    for i in range(3):
        for t in range(4):
            loss = model(images[i : i + 1], tokens[t : t + 1])[objective]
            assert scores[i, t].item() == pytest.approx(-loss.item(), rel=1e-9)


def test_caption_and_bow_runs_train_and_evaluate_zero_shot(tmp_path, tokenizer_path):  # noqa: F811
    for objective in ("caption", "bow"):
        out = tmp_path / objective
        results = train.main(small_run(out, tokenizer_path, "--train.steps=3", f"--loss.name={objective}"))
        assert results["val/num_images"] == 64 and results["heldout/num_classes"] == 36
        assert "val/image_to_text_R@1" not in results  # no retrieval without embeddings to compare
        assert 0 <= results["val/top1"] <= 100
        checkpoint = out / "checkpoint.pt"
        again = evaluation.main(["--checkpoint", str(checkpoint), "--task", "zeroshot", "--data", "shapes:val:64",
                                 "--out", str(out / "zs.json")])
        assert again["top1"] == results["val/top1"]
        assert json.loads((out / "zs.json").read_text())["top1"] == results["val/top1"]
        with pytest.raises(SystemExit, match="cannot do --task retrieval; its tasks: zeroshot, linear_probe"):
            evaluation.main(["--checkpoint", str(checkpoint), "--task", "retrieval", "--data", "shapes:val:64"])
    caption = torch.load(tmp_path / "caption" / "checkpoint.pt", weights_only=True)["model"]
    assert "image_proj.weight" in caption and "logit_scale" not in caption
    bow = torch.load(tmp_path / "bow" / "checkpoint.pt", weights_only=True)["model"]
    assert "bow_head.weight" in bow and not any(name.startswith("text.") for name in bow)


def test_predictive_objectives_refuse_what_they_cannot_do():
    cfg = recipes.resolve(load_config(CONFIG, ["--loss.name=bow", "--train.strategy=fsdp", "--data.val=",
                                                     "--data.heldout="]))
    assert "loss.name=bow" in recipes.check_config(cfg) and "train.strategy=ddp" in recipes.check_config(cfg)
    cfg.train.strategy, cfg.model.name = "ddp", "BLIP-tiny"
    assert "model.name is 'BLIP-tiny'" in recipes.check_config(cfg)


@pytest.mark.parametrize("objective", ["caption", "bow"])
def test_every_parameter_gets_a_gradient(objective):  # what DDP without find_unused_parameters needs
    model = predictor(objective).train()
    model(torch.randn(2, 3, 32, 32), captions()[:2])[objective].backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
