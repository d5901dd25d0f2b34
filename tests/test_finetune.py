"""finetune.py through train.py: each strategy trains exactly its parameters (the rest bit-identical, BatchNorm
statistics included), llrd's per-layer learning rates, gradual unfreezing's schedule, the head starts as the
zero-shot classifier, WiSE-FT's endpoints, early stopping keeps the best checkpoint. Tiny models, a few steps."""
import dataclasses
import json
import os

import pytest
import torch

from crossmodal import eval as evaluation
from crossmodal.recipes import finetune
from crossmodal import train
from crossmodal.config import ConfigError, load_config
from crossmodal.data.tokenizer import SentencePieceTokenizer
from crossmodal.recipes import model_from_config
from tests.test_train import tokenizer_path  # noqa: F401  (module-scoped fixture)
from crossmodal import recipes
from crossmodal.evaluation import contrastive
from crossmodal.data import eval_loader
from crossmodal.data.templates import load_templates


@pytest.fixture(scope="module")
def init_checkpoints(tokenizer_path, tmp_path_factory):  # noqa: F811
    """A path to a train.py-style checkpoint of a randomly initialised tiny CLIP (what finetune.init points at),
    per preset: ViT-tiny, and RN-tiny where BatchNorm statistics matter (they must not move when frozen)."""
    return {name: make_init_checkpoint(name, tokenizer_path, tmp_path_factory) for name in ("ViT-tiny", "RN-tiny")}


@pytest.fixture
def init_checkpoint(init_checkpoints):
    return init_checkpoints["ViT-tiny"]


def make_init_checkpoint(name, tokenizer_path, tmp_path_factory) -> str:  # noqa: F811
    cfg = recipes.resolve(load_config(None, [f"--model.name={name}", f"--data.tokenizer_path={tokenizer_path}"]))
    tokenizer = SentencePieceTokenizer(tokenizer_path, context_length=cfg.data.context_length)
    torch.manual_seed(0)
    model = model_from_config(cfg, tokenizer)
    path = str(tmp_path_factory.mktemp("init") / "checkpoint.pt")
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(cfg), "step": 0,
                "tokenizer": tokenizer.model_bytes()}, path)
    return path


def finetune_args(out_dir, init, strategy, *extra) -> list[str]:
    return [f"--out_dir={out_dir}", f"--finetune.strategy={strategy}", f"--finetune.init={init}",
            "--data.workers=0", "--data.val=shapes:val:32", "--data.heldout=", "--train.batch_size=8",
            "--train.steps=2", "--train.warmup_steps=1", "--train.lr=1e-3", "--train.log_every=1",
            "--finetune.wise_alphas=1", "--eval.batch_size=32", *extra]


def weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def initial_weights(init) -> dict:
    """The init checkpoint's CLIP state under the classifier's names (`clip.*`)."""
    return {f"clip.{name}": value for name, value in weights(init).items()}


TRAINED = {  # what each strategy may change: parameter-name prefixes (buffers of trained modules too)
    "linear": ("head.",),
    "full": ("clip.visual.", "head."),
    "llrd": ("clip.visual.", "head."),
    "lit": ("text.", "logit_scale"),
}


@pytest.mark.parametrize("model_name, strategy", [("ViT-tiny", strategy) for strategy in TRAINED]
                         + [("RN-tiny", "linear")])
def test_each_strategy_trains_exactly_its_parameters(model_name, strategy, init_checkpoints, tmp_path):
    init_checkpoint = init_checkpoints[model_name]
    train.main(finetune_args(tmp_path, init_checkpoint, strategy))
    before, after = start_weights(tmp_path, init_checkpoint, strategy), weights(tmp_path / "checkpoint.pt")
    assert set(after) == set(before)
    parameters = {name for name, _ in build_like(tmp_path).named_parameters()}
    for name, value in after.items():
        trained = name.startswith(TRAINED[strategy])
        if not trained:
            assert torch.equal(value, before[name]), f"{strategy} changed frozen {name}"
        elif name in parameters:
            assert not torch.equal(value, before[name]), f"{strategy} did not train {name}"
    # eval.py reads a fine-tuned checkpoint's CLIP part
    _, clip, _ = recipes.load_run(str(tmp_path / "checkpoint.pt"))
    prefix = "" if strategy == "lit" else "clip."
    for name, value in clip.state_dict().items():
        assert torch.equal(value, after[prefix + name])


def build_like(out_dir):
    """The run's model as finetune.build makes it (from its saved config)."""
    cfg = load_config(os.path.join(out_dir, "config.yaml"))
    return finetune.build(cfg, "cpu")[1]


def start_weights(out_dir, init, strategy) -> dict:
    """A run's weights at step 0: the init checkpoint's CLIP (and the zero-shot head the run built)."""
    if strategy == "lit":
        return weights(init)
    head = {name: value for name, value in build_like(out_dir).state_dict().items() if name.startswith("head.")}
    return {**initial_weights(init), **head}


def test_lit_leaves_the_image_tower_bit_identical(init_checkpoints, tmp_path):
    init_checkpoint = init_checkpoints["RN-tiny"]  # BatchNorm: its statistics must not move either
    train.main(finetune_args(tmp_path, init_checkpoint, "lit", "--train.steps=3"))
    before, after = weights(init_checkpoint), weights(tmp_path / "checkpoint.pt")
    visual = [name for name in before if name.startswith("visual.")]
    assert all(torch.equal(before[name], after[name]) for name in visual)  # BatchNorm buffers too (RN-tiny)
    assert any(not torch.equal(before[name], after[name]) for name in before if name.startswith("text."))


def test_head_starts_as_the_zero_shot_classifier(init_checkpoint, tmp_path):
    cfg = finetune.resolve(load_config(None, finetune_args(tmp_path, init_checkpoint, "full")[:3]))
    cfg = recipes.resolve(cfg)
    cfg.data.val = "shapes:val:64"
    tokenizer, model, _ = finetune.build(cfg, "cpu")
    model.eval()
    finetuned = finetune.classify(cfg, model, tokenizer, cfg.data.val, "cpu")
    zeroshot = contrastive.zeroshot(model.clip, tokenizer, cfg.data.val, cfg.data.image_size, "cpu", cfg.eval.templates)
    assert finetuned["top1"] == zeroshot["top1"] and finetuned["top5"] == zeroshot["top5"]
    # the same predictions image by image, not just the same count
    dataset, loader = eval_loader(cfg.data.val, cfg.data.image_size, tokenizer, 64)
    features, _, _ = contrastive.encode_images(model.clip, loader, "cpu")
    classifier = contrastive.zeroshot_classifier(model.clip, tokenizer, dataset.classnames,
                                                load_templates(cfg.eval.templates), "cpu")
    with torch.no_grad():
        assert torch.equal(model.head(features).argmax(-1), (features @ classifier.T).argmax(-1))


def test_llrd_learning_rates_decay_from_the_top(init_checkpoint, tmp_path):
    decay = 0.5
    train.main(finetune_args(tmp_path, init_checkpoint, "llrd", f"--finetune.layer_decay={decay}",
                             "--train.steps=1"))
    model = build_like(tmp_path)
    groups = finetune.layer_groups(model)
    depth = len(groups) - 1
    assert groups[-1][0][0] == "head.weight" and groups[0][0][0].startswith("clip.visual.")
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    assert len(saved) == 2 * len(groups)  # per layer: weights with decay, the rest without
    for layer in range(depth + 1):
        for group in saved[2 * layer: 2 * layer + 2]:  # step 0 after 1 warmup step: the schedule's lr is train.lr
            assert group["lr"] == pytest.approx(1e-3 * decay ** (depth - layer), rel=1e-12)
            assert group["lr_scale"] == decay ** (depth - layer)
        assert sum(len(group["params"]) for group in saved[2 * layer: 2 * layer + 2]) == len(groups[layer])


def test_gradual_unfreezes_one_group_every_n_steps(init_checkpoint, tmp_path):
    cfg = finetune.resolve(load_config(None, finetune_args(tmp_path, init_checkpoint, "gradual")[:3]
                                       + ["--finetune.unfreeze_every=3"]))
    cfg = recipes.resolve(cfg)
    _, model, _ = finetune.build(cfg, "cpu")
    finetune.trainable_layers(model, cfg)
    groups = finetune.layer_groups(model)
    for step in range(3 * len(groups) + 2):
        finetune.train_mode(model, cfg, step)
        unfrozen = min(len(groups), 1 + step // 3)
        for index, group in enumerate(reversed(groups)):
            assert all(param.requires_grad == (index < unfrozen) for _, param in group), (step, index)
        assert not any(param.requires_grad for param in model.clip.text.parameters()) and not model.clip.text.training
        visual = model.clip.visual  # the lowest block (ViT) or stage (ResNet) is in eval mode until it trains
        bottom = visual.transformer.blocks[0] if hasattr(visual, "transformer") else visual.layer1
        assert bottom.training == (unfrozen >= len(groups) - 1)

    # through train.py: after 4 steps with one group every 2, the head and the top group changed, nothing else
    train.main(finetune_args(tmp_path, init_checkpoint, "gradual", "--finetune.unfreeze_every=2", "--train.steps=4"))
    before, after = start_weights(tmp_path, init_checkpoint, "gradual"), weights(tmp_path / "checkpoint.pt")
    top = {name for name, _ in groups[-1] + groups[-2]}
    for name, value in after.items():
        assert torch.equal(value, before[name]) != (name in top), name


def test_wise_ft_endpoints_are_the_two_models():
    torch.manual_seed(0)
    zeroshot = {"w": torch.randn(5, 3), "bn.num_batches_tracked": torch.tensor(0)}
    finetuned = {"w": torch.randn(5, 3), "bn.num_batches_tracked": torch.tensor(7)}
    assert torch.equal(finetune.wise_ft(zeroshot, finetuned, 0.0)["w"], zeroshot["w"])
    assert torch.equal(finetune.wise_ft(zeroshot, finetuned, 1.0)["w"], finetuned["w"])
    torch.testing.assert_close(finetune.wise_ft(zeroshot, finetuned, 0.25)["w"],
                               0.75 * zeroshot["w"] + 0.25 * finetuned["w"])
    assert finetune.wise_ft(zeroshot, finetuned, 0.0)["bn.num_batches_tracked"] == 7


def test_early_stopping_keeps_the_best_checkpoint_and_wise_ends(init_checkpoint, tmp_path, monkeypatch):
    real_evaluate, scripted, seen = finetune.evaluate, iter([50.0, 70.0, 60.0, 65.0]), {}

    def scripted_evaluate(cfg, model, tokenizer, device):  # val top-1 50, 70, 60, 65 at steps 1-4
        results = real_evaluate(cfg, model, tokenizer, device)
        if len(seen) < 4:  # the evaluations during training; then finish's WiSE-FT ones, unscripted
            step = len(seen) + 1
            seen[step] = {name: value.clone() for name, value in model.state_dict().items()}
            results["val/top1"] = next(scripted)
        return results

    monkeypatch.setattr(finetune, "evaluate", scripted_evaluate)
    results = train.main(finetune_args(tmp_path, init_checkpoint, "full", "--train.steps=10", "--train.eval_every=1",
                                       "--finetune.patience=2", "--finetune.wise_alphas=0,1",
                                       "--wise_alpha=0.5"))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 4  # stopped: 2 evaluations after 2
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["step"] == 2 and results["best_step"] == 2
    assert json.loads((tmp_path / "best.json").read_text()) == {"step": 2, "val/top1": 70.0}
    for name, value in seen[2].items():
        assert torch.equal(best["model"][name], value), name
    # WiSE-FT: alpha 0 is the zero-shot model, alpha 1 the best checkpoint's, 0.5 the run's result (wise.pt)
    table = {row["alpha"]: row for row in json.loads((tmp_path / "wise.json").read_text())["alphas"]}
    cfg = load_config(os.path.join(tmp_path, "config.yaml"))
    tokenizer, model, zeroshot = finetune.build(cfg, "cpu")
    model.eval()
    assert table[0.0]["val/top1"] == real_evaluate(cfg, model, tokenizer, "cpu")["val/top1"]
    model.load_state_dict(best["model"])
    assert table[1.0]["val/top1"] == real_evaluate(cfg, model, tokenizer, "cpu")["val/top1"]
    mixed = weights(tmp_path / "wise.pt")
    for name, value in mixed.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (zeroshot[name] + best["model"][name]) / 2)
    assert results["wise_alpha"] == 0.5


def test_finetune_config_typos_and_values_fail_loudly(init_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match=r"finetune\.stratgy.*finetune\.strategy"):
        load_config(None, ["--finetune.stratgy=full"])
    cfg = recipes.resolve(finetune.resolve(load_config(None, finetune_args(tmp_path, init_checkpoint,
                                                                                 "gradul")[:3])))
    assert "did you mean 'gradual'" in finetune.check_config(cfg)
    cfg.finetune.strategy, cfg.finetune.wise_alphas = "full", "0,2"
    assert "wise_alphas" in finetune.check_config(cfg)
    cfg.finetune.wise_alphas, cfg.finetune.pretrained = "0,1", "weights.pt"
    assert "exactly one" in finetune.check_config(cfg)
    cfg.finetune.pretrained = ""
    assert "gradual runs on one process" in finetune.check_config(
        dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, strategy="gradual")), world_size=2)
