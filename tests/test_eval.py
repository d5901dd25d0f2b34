"""eval.py: recall and accuracy against hand-computed cases, the zero-shot classifier's construction,
and the command line on a checkpoint that train.py wrote."""
import json

import torch
import torch.nn.functional as F

import eval as evaluation
import train
from tests.test_train import small_run, tokenizer_path  # noqa: F401  (module-scoped fixture)


def test_retrieval_metrics_by_hand():
    # 3 images, 4 captions; caption 3 also describes image 0 (COCO-style several captions per image)
    images = torch.eye(3)
    texts = torch.tensor([[0.1, 0.9, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    results = evaluation.retrieval_metrics(images, texts, torch.tensor([0, 1, 2, 0]), ks=(1, 2))
    # image 0: best caption is 3 (true) -> R@1; image 1: caption 1 first -> R@1; image 2: caption 2 -> R@1
    assert results["image_to_text_R@1"] == 100.0
    # caption 0 (true image 0) is closest to image 1: found at rank 2; the other three at rank 1
    assert results["text_to_image_R@1"] == 75.0 and results["text_to_image_R@2"] == 100.0


def test_accuracy_topk():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.7, 0.2]])
    results = evaluation.accuracy(logits, torch.tensor([0, 1, 2]), topk=(1, 2))
    assert abs(results["top1"] - 100 / 3) < 1e-4 and results["top2"] == 100.0


class _Encoder:
    def encode_text(self, tokens, normalize=False):
        features = tokens[:, :3].float()
        return F.normalize(features, dim=-1) if normalize else features


def test_zeroshot_classifier_is_renormalised_mean_of_normalised_prompts():
    def tokenizer(texts):
        return torch.tensor([[1.0, 0.0, 0.0] if "x" in t else [0.0, 3.0, 4.0] for t in texts])

    weights = evaluation.zeroshot_classifier(_Encoder(), tokenizer, ["x", "y"], ["{}", "a {} z"], "cpu")
    assert torch.allclose(weights.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(weights[1], torch.tensor([0.0, 0.6, 0.8]))


def test_command_line_writes_the_paper_metrics(tmp_path, tokenizer_path):  # noqa: F811
    train.main(small_run(tmp_path / "run", tokenizer_path, "--train.steps=2"))
    checkpoint = str(tmp_path / "run" / "checkpoint.pt")
    out = tmp_path / "zeroshot.json"
    evaluation.main(["--checkpoint", checkpoint, "--task", "zeroshot", "--data", "shapes:val:50", "--out", str(out)])
    results = json.loads(out.read_text())
    assert {"top1", "top5"} <= set(results) and results["num_classes"] == 36
    out = tmp_path / "retrieval.json"
    evaluation.main(["--checkpoint", checkpoint, "--task", "retrieval", "--data", "shapes:val:50", "--out", str(out)])
    results = json.loads(out.read_text())
    for direction in ("image_to_text", "text_to_image"):
        assert all(f"{direction}_R@{k}" in results for k in (1, 5, 10))
