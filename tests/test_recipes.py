"""The family contract (recipes/): a family defined outside the repository registers itself and trains and
evaluates through train.py's and eval.py's entry points unchanged; a task a family does not have is one line."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crossmodal import eval as evaluation
from crossmodal import recipes, train
from crossmodal.data import eval_loader
from crossmodal.recipes import Recipe, mean_step
from tests.test_train import ROOT, tokenizer_path  # noqa: F401  (module-scoped fixture)


class PixelClassifier(nn.Module):
    """A toy model: average-pooled pixels -> a linear classifier over shapes' 36 classes."""

    def __init__(self, num_classes: int = 36, grid: int = 4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.head = nn.Linear(3 * grid * grid, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(images).flatten(1))  # (B, num_classes)


class ToyRecipe(Recipe):
    """The whole of a family's recipe for a classifier: nothing in train.py or eval.py knows of it."""

    tasks = ("toy_accuracy",)

    def inputs(self) -> tuple[int, int]:
        return 32, 16

    def build_model(self, tokenizer, pretrained: bool = True) -> nn.Module:
        return PixelClassifier()

    def train_step(self, model, micro_batches, step, device, autocast, scaler) -> dict:
        def losses(batch):
            return {"ce": F.cross_entropy(model(batch["image"].to(device)), batch["label"].to(device))}

        return mean_step(model, micro_batches, losses, autocast, scaler)

    def evaluate(self, model, tokenizer, device, writer=None, step: int = 0) -> dict:
        return {f"val/{name}": value for name, value in self.accuracy(model, tokenizer, self.cfg.data.val).items()}

    @torch.no_grad()
    def accuracy(self, model, tokenizer, spec: str, device="cpu") -> dict:
        _, loader = eval_loader(spec, self.cfg.data.image_size, tokenizer, 64, options=self.cfg.data)
        hits = total = 0
        for batch in loader:
            hits += int((model(batch["image"].to(device)).argmax(-1).cpu() == batch["label"]).sum())
            total += len(batch["label"])
        return {"top1": 100.0 * hits / total, "num_images": total}

    def run_task(self, task: str, model, tokenizer, spec: str, args) -> dict:
        return self.accuracy(model, tokenizer, spec, args.device)


@pytest.fixture
def toy_family():
    recipes.register(ToyRecipe, ["toy-pixels"])  # the family's one registry line
    yield
    del recipes.PRESETS["toy-pixels"], recipes.FAMILIES["ToyRecipe"]


def test_a_family_added_from_outside_trains_and_evaluates(tmp_path, tokenizer_path, toy_family):  # noqa: F811
    out = tmp_path / "toy"
    results = train.main(["--model.name=toy-pixels", f"--out_dir={out}", "--train.steps=3", "--train.batch_size=8",
                          "--train.warmup_steps=1", "--train.log_every=1", "--data.workers=0",
                          f"--data.tokenizer_path={tokenizer_path}", "--data.val=shapes:val:16", "--data.heldout="])
    assert set(results) == {"val/top1", "val/num_images", "step"} and results["step"] == 3
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 3 and saved["config"]["model"]["name"] == "toy-pixels"
    evaluated = evaluation.main(["--checkpoint", str(out / "checkpoint.pt"), "--task", "toy_accuracy",
                                 "--data", "shapes:val:16", "--out", str(tmp_path / "toy.json")])
    assert evaluated["top1"] == results["val/top1"]  # the same weights, the same number
    assert json.loads((tmp_path / "toy.json").read_text())["task"] == "toy_accuracy"
    with pytest.raises(SystemExit, match="cannot do --task zeroshot; its tasks: toy_accuracy") as stop:
        evaluation.main(["--checkpoint", str(out / "checkpoint.pt"), "--task", "zeroshot"])
    assert stop.value.code == 2


def test_a_language_model_asked_for_zeroshot_is_one_line_and_exit_2(tmp_path, tokenizer_path):  # noqa: F811
    cfg = recipes.resolve(train.load_config(None, ["--model.name=lm-tiny", "--data.train=shapes_icl:train",
                                                   f"--data.tokenizer_path={tokenizer_path}"]))
    recipe = recipes.recipe_for(cfg)
    tokenizer = recipe.build_tokenizer(str(tmp_path))
    model = recipe.build_model(tokenizer)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "config": __import__("dataclasses").asdict(cfg), "step": 0,
                "tokenizer": tokenizer.model_bytes()}, path)
    result = subprocess.run([sys.executable, "eval.py", "--checkpoint", str(path), "--task", "zeroshot",
                             "--data", "shapes:val:8"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "cannot do --task zeroshot; its tasks: words_rule" in result.stderr


def test_every_preset_has_one_family_and_every_family_names_its_tasks():
    assert recipes.PRESETS and all(issubclass(recipe, Recipe) for recipe in recipes.PRESETS.values())
    assert recipes.PRESETS["ViT-B-32"].__name__ == "ClipRecipe" and recipes.PRESETS["BLIP-base"].__name__ == "BlipRecipe"
    for recipe in recipes.FAMILIES.values():
        assert recipe.tasks, recipe


def test_the_scripts_load_from_elsewhere_by_path(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "words_rule" in result.stdout
