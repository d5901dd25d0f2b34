"""LoRA (models/lora.py, recipes/lora.py, finetune.strategy=lora): merged weights give the adapted forward (CLIP
ViT-B-32, BLIP-base, an LM), B = 0 starts at the base model exactly, a float64 gradient check against the formula,
rank 8 trains under 2% of ViT-B-32 and BLIP-base, a bf16 base trains fp32 adapters; train.py end to end from a
tiny CLIP run and a classification start: only adapters (and heads asked for) change, exact resume, the merged
checkpoint.pt that eval.py reads as a plain run, resuming it, and bad configs as one line with exit status 2."""
import copy
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from crossmodal import train
from crossmodal.config import Failure, load_config
from crossmodal.models import create_lm, create_model
from crossmodal.models.lora import (LoRALinear, add_lora, count_trainable, load_lora_state_dict, lora_state_dict,
                                    merge_lora, merge_state_dict)
from crossmodal.recipes import ClipRecipe, finetune
from crossmodal.recipes.lora import LoraRecipe
from tests.test_finetune import make_init_checkpoint
from tests.test_train import tokenizer_path  # noqa: F401  (module-scoped fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "clip", "tiny_shapes.yaml")
pytestmark = pytest.mark.usefixtures("one_thread")


def randomise_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """Nonzero B (training's job), so the merge has something to fold in."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_b.copy_(0.02 * torch.randn(module.lora_b.shape, generator=generator))


def adapted_and_merged(model: torch.nn.Module, **options) -> tuple[torch.nn.Module, torch.nn.Module]:
    add_lora(model, **options)
    randomise_adapters(model)
    model.eval()
    return model, merge_lora(copy.deepcopy(model))


# ---------------------------------------------------------------- the layer and the merge


def test_lora_linear_matches_the_formula_and_passes_gradcheck():
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 5).double()
    layer = LoRALinear(linear, rank=3, alpha=6.0).double()
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    expected = x @ linear.weight.T + linear.bias + 2.0 * (x @ layer.lora_a.T) @ layer.lora_b.T  # alpha / rank = 2
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)

    def forward(x, a, b):
        return torch.func.functional_call(layer, {"weight": layer.weight, "bias": layer.bias, "lora_a": a,
                                                  "lora_b": b}, (x,))

    a = layer.lora_a.detach().clone().requires_grad_(True)
    b = layer.lora_b.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(forward, (x, a, b))


def test_zero_b_starts_at_the_base_model_exactly():
    torch.manual_seed(0)
    model = create_lm("lm-tiny", vocab_size=100, context_length=16).eval()
    tokens = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        before = model(tokens)
        add_lora(model, rank=4)
        assert torch.equal(model(tokens), before)


@pytest.mark.parametrize("name", ["ViT-B-32"])
def test_merged_clip_equals_the_adapted_one(name):
    torch.manual_seed(0)
    adapted, merged = adapted_and_merged(create_model(name))
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    images, tokens = torch.randn(2, 3, 224, 224), torch.randint(1, 1000, (2, 77))
    with torch.no_grad():
        for encode, inputs in (("encode_image", images), ("encode_text", tokens)):
            expected = getattr(adapted, encode)(inputs)
            got = getattr(merged, encode)(inputs)
            assert (expected - got).abs().max() < 1e-5, encode
            assert (expected - getattr(create_model(name).eval(), encode)(inputs)).abs().max() > 1e-3  # B mattered


def test_merged_blip_equals_the_adapted_one():
    torch.manual_seed(0)
    adapted, merged = adapted_and_merged(create_model("BLIP-base"))
    images, tokens = torch.randn(1, 3, 224, 224), torch.tensor([[101, 2023, 2003, 1037, 3899, 102]])
    with torch.no_grad():
        expected, got = adapted.itm_logits(images, tokens), merged.itm_logits(images, tokens)
        assert (expected - got).abs().max() < 1e-5
        text_expected, text_got = adapted.encode_text(tokens), merged.encode_text(tokens)
        assert (text_expected - text_got).abs().max() < 1e-5


def test_merged_lm_equals_the_adapted_one_and_adapters_round_trip():
    torch.manual_seed(0)
    adapted, merged = adapted_and_merged(create_lm("lm-tiny", vocab_size=100, context_length=16), rank=8, alpha=32)
    tokens = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        assert (adapted(tokens) - merged(tokens)).abs().max() < 1e-5
    # a saved adapted state dict merges to the same weights without a model; adapters load into a fresh copy
    state = merge_state_dict(adapted.state_dict(), scale=32 / 8)
    assert state.keys() == merged.state_dict().keys()
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-6)
    torch.manual_seed(1)
    fresh = add_lora(create_lm("lm-tiny", vocab_size=100, context_length=16), rank=8, alpha=32)
    fresh.load_state_dict({k: v for k, v in adapted.state_dict().items() if "lora" not in k}, strict=False)
    load_lora_state_dict(fresh, lora_state_dict(adapted))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(tokens), adapted(tokens))
    with pytest.raises(ValueError, match="adapters do not fit"):
        load_lora_state_dict(add_lora(create_lm("lm-tiny", vocab_size=100, context_length=16), rank=4),
                             lora_state_dict(adapted))


def expected_adapter_count(model, rank: int) -> int:
    return sum(rank * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, LoRALinear))


def test_rank_8_trains_under_two_percent_of_vit_b_32_and_blip_base():
    vit = add_lora(create_model("ViT-B-32"), rank=8)
    trainable, total = count_trainable(vit)
    # 12 image blocks: qkv 768->2304 and proj 768->768; 12 text blocks: qkv 512->1536 and proj 512->512
    assert trainable == 12 * 8 * (768 + 2304 + 768 + 768) + 12 * 8 * (512 + 1536 + 512 + 512) == 737_280
    assert total == 151_277_313 + trainable and trainable / total < 0.005
    blip = add_lora(create_model("BLIP-base"), rank=8)
    trainable, total = count_trainable(blip)
    assert trainable == expected_adapter_count(blip, 8) and trainable / total < 0.02
    names = {name.rsplit(".", 1)[0] for name, p in blip.named_parameters() if p.requires_grad}
    assert any(name.endswith(".cross_attn.kv") for name in names) and not any("mlp" in name for name in names)
    # the gradient reaches the adapters only
    loss = blip.itm_logits(torch.randn(1, 3, 224, 224), torch.tensor([[101, 2023, 102]])).sum()
    loss.backward()
    with_grad = {name for name, p in blip.named_parameters() if p.grad is not None}
    assert with_grad and all(name.endswith(("lora_a", "lora_b")) for name in with_grad)


def test_bf16_base_with_fp32_adapters_trains_and_merges_to_fp32():
    torch.manual_seed(0)
    model = add_lora(create_lm("lm-tiny", vocab_size=100, context_length=16), rank=8,
                     base_dtype=torch.bfloat16, targets=["qkv", "proj", "fc1", "fc2"])
    layer = model.transformer.blocks[0].attn.qkv
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_a.dtype == layer.lora_b.dtype == torch.float32
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.randint(0, 100, (4, 16))
    losses = []
    for _ in range(10):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        assert layer.lora_b.grad.dtype == torch.float32
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    expected = layer.weight.float() + layer.delta().detach()
    merge_lora(model)
    assert model.transformer.blocks[0].attn.qkv.weight.dtype == torch.float32
    assert torch.equal(model.transformer.blocks[0].attn.qkv.weight.detach(), expected)


def test_a_shared_layer_stays_shared_adapted_and_merged():
    shared = torch.nn.Linear(4, 4)
    model = torch.nn.ModuleDict({"encoder": torch.nn.Sequential(shared), "decoder": torch.nn.Sequential(shared)})
    add_lora(model, targets=["*.0"])
    assert isinstance(model["encoder"][0], LoRALinear) and model["encoder"][0] is model["decoder"][0]
    merge_lora(model)
    assert type(model["encoder"][0]) is torch.nn.Linear and model["encoder"][0] is model["decoder"][0]


def test_targets_that_match_nothing_name_the_real_layers():
    with pytest.raises(ValueError, match=r"match no linear layer.*transformer\.blocks\.0\.attn\.qkv"):
        add_lora(create_lm("lm-tiny", vocab_size=100, context_length=16), targets=["q_proj"])


def test_blip_momentum_copies_get_the_online_adapters_and_do_not_train(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "cat",
                                                   "picture", "of", "the"]) + "\n")
    from crossmodal.data.tokenizer import BertTokenizer

    cfg = load_config(None, ["--model.name=BLIP-tiny", "--finetune.strategy=lora", "--model.pretrained=x",
                             "--blip.queue_size=0", "--data.image_size=64"])
    recipe = LoraRecipe(cfg)
    torch.manual_seed(0)
    model = recipe.build_model(BertTokenizer(str(tmp_path / "vocab.txt"), context_length=35), pretrained=False)
    recipe.prepare(model)
    online, copies = model.momentum_pairs(online=True), model.momentum_pairs(online=False)
    assert all(torch.equal(param, param_m) for param, param_m in zip(online, copies))
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all(name.endswith(("lora_a", "lora_b")) and "_m." not in name for name in trained)
    assert any(name.startswith("text_encoder_m.") and name.endswith("lora_a") for name, _ in model.named_parameters())


# ---------------------------------------------------------------- train.py


def run_args(out_dir, tokenizer, *extra) -> list[str]:
    return ["--config", CONFIG, f"--out_dir={out_dir}", f"--data.tokenizer_path={tokenizer}", "--data.workers=0",
            "--data.val=shapes:val:32", "--data.heldout=", "--train.batch_size=8", "--train.warmup_steps=1",
            "--train.log_every=1", *extra]


@pytest.fixture(scope="module")
def start_run(tokenizer_path, tmp_path_factory):  # noqa: F811
    """A tiny CLIP run (RN-tiny: LoRA adapts its attention pool and text tower) to start LoRA runs from."""
    out_dir = tmp_path_factory.mktemp("start")
    train.main(run_args(out_dir, tokenizer_path, "--train.steps=2"))
    return str(out_dir / "checkpoint.pt")


def lora_args(out_dir, tokenizer, start, *extra) -> list[str]:
    return run_args(out_dir, tokenizer, "--finetune.strategy=lora", f"--model.pretrained={start}",
                    "--finetune.lora_rank=4", "--train.lr=1e-2", *extra)


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_lora_run_changes_only_adapters_and_writes_merged_weights(tokenizer_path, start_run, tmp_path):  # noqa: F811
    train.main(lora_args(tmp_path, tokenizer_path, start_run, "--train.steps=3", "--finetune.lora_heads=logit_scale"))
    base, final, record = load(start_run)["model"], load(tmp_path / "checkpoint.pt"), load(tmp_path / "lora.pt")
    assert final["lora"]["merged"] and final["optimizer"]["state"] == {} and final["step"] == 3
    assert final["model"].keys() == base.keys()  # plain weights, BatchNorm statistics included
    adapters = record["adapters"]
    assert record["lora"]["rank"] == 4 and record["lora"]["alpha"] == 16.0 and record["step"] == 3
    adapted = {name.rsplit(".", 1)[0] for name in adapters}
    assert adapted == {name.rsplit(".", 1)[0] for name in base if name.endswith(("attnpool.q_proj.weight",
                       "attnpool.k_proj.weight", "attnpool.v_proj.weight", "attnpool.c_proj.weight",
                       "attn.qkv.weight", "attn.proj.weight"))}
    for name, value in base.items():
        layer = name.rsplit(".", 1)[0]
        if name == "logit_scale":  # a head asked for
            assert not torch.equal(final["model"][name], value)
        elif layer in adapted and name.endswith(".weight"):  # merged: W + (alpha / rank) B A
            delta = 16.0 / 4 * adapters[f"{layer}.lora_b"] @ adapters[f"{layer}.lora_a"]
            assert delta.abs().max() > 0
            torch.testing.assert_close(final["model"][name], value + delta, rtol=0, atol=1e-6)
        else:
            assert torch.equal(final["model"][name], value), name

    # eval.py reads the merged checkpoint as a plain CLIP run
    out = tmp_path / "zeroshot.json"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--checkpoint",
                           str(tmp_path / "checkpoint.pt"), "--task", "zeroshot", "--data", "shapes:val:16",
                           "--out", str(out), "--workers", "0"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["num_images"] == 16


def test_lora_resume_is_exact_and_a_merged_run_resumes_with_new_adapters(  # noqa: F811
        tokenizer_path, start_run, tmp_path, monkeypatch):
    # with adapter dropout: its masks come from the global RNG, which the checkpoint restores (the data loader keeps
    # its own generator, so starting its iterator on resume does not shift them)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train.main(lora_args(straight, tokenizer_path, start_run, "--train.steps=4", "--finetune.lora_dropout=0.1"))
    real_step, calls = ClipRecipe.train_step, []

    def step_then_sigterm(*args, **kwargs):
        losses = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return losses

    monkeypatch.setattr(ClipRecipe, "train_step", step_then_sigterm)
    with pytest.raises(SystemExit):
        train.main(lora_args(interrupted, tokenizer_path, start_run, "--train.steps=4", "--finetune.lora_dropout=0.1"))
    half = load(interrupted / "checkpoint.pt")
    assert half["step"] == 2 and "lora" not in half and any(k.endswith("lora_a") for k in half["model"])
    monkeypatch.setattr(ClipRecipe, "train_step", real_step)
    train.main(lora_args(interrupted, tokenizer_path, start_run, "--train.steps=4", "--finetune.lora_dropout=0.1",
                         "--resume"))
    last_evaluation = [json.loads((run / "eval.jsonl").read_text().splitlines()[-1]) for run in (straight, interrupted)]
    assert last_evaluation[0] == last_evaluation[1]
    for file in ("checkpoint.pt", "lora.pt"):
        a, b = load(straight / file), load(interrupted / file)
        for key in ("model", "adapters"):
            for name, value in a.get(key, {}).items():
                assert torch.equal(value, b[key][name]), (file, name)

    # the run is complete: --resume changes nothing; with more steps, new adapters train on the merged weights
    before = load(straight / "checkpoint.pt")
    stamp = os.path.getmtime(straight / "lora.pt")
    train.main(lora_args(straight, tokenizer_path, start_run, "--train.steps=4", "--resume"))
    assert os.path.getmtime(straight / "lora.pt") == stamp
    train.main(lora_args(straight, tokenizer_path, start_run, "--train.steps=6", "--resume"))
    after, record = load(straight / "checkpoint.pt"), load(straight / "lora.pt")
    assert after["step"] == 6 and record["step"] == 6 and after["lora"]["merged"]
    for name, value in before["model"].items():
        layer = name.rsplit(".", 1)[0]
        if f"{layer}.lora_a" in record["adapters"] and name.endswith(".weight"):
            delta = 16.0 / 4 * record["adapters"][f"{layer}.lora_b"] @ record["adapters"][f"{layer}.lora_a"]
            torch.testing.assert_close(after["model"][name], value + delta, rtol=0, atol=1e-6)
        else:
            assert torch.equal(after["model"][name], value), name


def test_classifier_lora_trains_adapters_and_head_with_wise_ft(  # noqa: F811
        tokenizer_path, tmp_path_factory, tmp_path):
    init = make_init_checkpoint("RN-tiny", tokenizer_path, tmp_path_factory)
    results = train.main(["--out_dir", str(tmp_path), "--finetune.strategy=lora", f"--finetune.init={init}",
                          "--data.workers=0", "--data.val=shapes:val:32", "--data.heldout=", "--train.batch_size=8",
                          "--train.steps=2", "--train.warmup_steps=1", "--train.lr=1e-2", "--train.log_every=1",
                          "--finetune.wise_alphas=0,1", "--wise_alpha=0.5", "--eval.batch_size=32"])
    start, final = load(init)["model"], load(tmp_path / "checkpoint.pt")["model"]
    adapters = load(tmp_path / "lora.pt")["adapters"]
    assert {name.rsplit(".", 2)[-2] for name in adapters} == {"q_proj", "k_proj", "v_proj", "c_proj"}
    assert all(name.startswith("clip.visual.attnpool.") for name in adapters)  # the image tower only
    for name, value in start.items():
        if name.startswith("visual.attnpool.") and name.endswith("_proj.weight"):
            assert not torch.equal(final[f"clip.{name}"], value), name
        else:  # BatchNorm statistics and the text tower too
            assert torch.equal(final[f"clip.{name}"], value), name
    # WiSE-FT on the merged weights: halfway between the zero-shot model and the merged best (= last) step
    _, _, zeroshot = finetune.build(load_config(str(tmp_path / "config.yaml")), "cpu")
    assert not torch.equal(final["head.weight"], zeroshot["head.weight"])
    assert results["wise_alpha"] == 0.5 and load(tmp_path / "best.pt")["step"] == 2
    wise = load(tmp_path / "wise.pt")["model"]
    assert wise.keys() == final.keys() == zeroshot.keys()
    for name, value in wise.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (zeroshot[name] + final[name]) / 2, rtol=0, atol=1e-6)
    # best.pt keeps the adapters (exact resume); eval.py's loading merges them
    from crossmodal.recipes import load_run

    assert any(name.endswith("lora_a") for name in load(tmp_path / "best.pt")["model"])
    load_run(str(tmp_path / "best.pt"))


FAMILY_RUNS = {  # model.name: (its run's settings, LoRA's extra settings, what else the run may change)
    "lm-tiny": (["--data.train=shapes_icl:train", "--data.val=shapes_icl:val:8"], [], ()),
    "Flamingo-tiny": (["--data.train=shapes_icl:train", "--data.val=shapes_icl:val:8"],
                      ["--finetune.lora_targets=lang_model.*", "--finetune.lora_heads=perceiver"], ("perceiver.",)),
    # BLIP: its momentum copies restart from the loaded online weights and follow them by EMA, the queue fills
    "BLIP-tiny": (["--blip.queue_size=16"], ["--finetune.lora_heads=itm_head"], ("itm_head.", "queue.", "_m.")),
}


@pytest.mark.parametrize("name", FAMILY_RUNS)
def test_any_family_trains_adapters_on_its_run_and_merges(name, tmp_path):
    """The LM, Flamingo (adapters on its language model, which the family itself keeps frozen) and BLIP: a LoRA run
    from a 1-step run changes the adapted layers (by exactly the merged update), the heads asked for and what the
    family itself moves, nothing else; its checkpoint loads as a plain run."""
    run, extra, moving = FAMILY_RUNS[name]
    common = ["--config", CONFIG, f"--model.name={name}", "--data.heldout=", "--data.workers=0",
              "--train.batch_size=4", "--train.warmup_steps=1", "--data.tokenizer_captions=500",
              "--data.vocab_size=256", "--data.val=shapes:val:8", *run]
    train.main([*common, f"--out_dir={tmp_path / 'start'}", "--train.steps=1"])
    train.main([*common, f"--out_dir={tmp_path / 'lora'}", "--train.steps=2", "--train.lr=1e-2",
                "--finetune.strategy=lora", f"--model.pretrained={tmp_path / 'start' / 'checkpoint.pt'}", *extra])
    base, final = load(tmp_path / "start" / "checkpoint.pt")["model"], load(tmp_path / "lora" / "checkpoint.pt")
    adapters = load(tmp_path / "lora" / "lora.pt")["adapters"]
    assert final["model"].keys() == base.keys() and adapters
    for key, value in base.items():
        layer = key.rsplit(".", 1)[0]
        if any(part in key for part in moving):
            continue
        if f"{layer}.lora_a" in adapters and key.endswith(".weight"):
            delta = 16.0 / 8 * adapters[f"{layer}.lora_b"] @ adapters[f"{layer}.lora_a"]
            assert delta.abs().max() > 0
            torch.testing.assert_close(final["model"][key], value + delta, rtol=0, atol=1e-6)
        else:
            assert torch.equal(final["model"][key], value), key
    if moving:  # the heads asked for trained
        assert any(not torch.equal(final["model"][k], v) for k, v in base.items() if k.startswith(moving[0]))
    from crossmodal.recipes import load_run

    load_run(str(tmp_path / "lora" / "checkpoint.pt"))


@pytest.mark.parametrize("extra, message", [
    (["--model.pretrained="], "finetune.strategy=lora adapts a trained model: give model.pretrained"),
    (["--finetune.lora_rank=0"], "finetune.lora_rank must be >= 1"),
    (["--finetune.lora_base_dtype=fp16"], "finetune.lora_base_dtype must be one of fp32, bf16"),
    (["--finetune.lora_targets=q_proj_typo"], "finetune.lora_targets='q_proj_typo': LoRA targets q_proj_typo match "
                                              "no linear layer"),
    (["--finetune.lora_heads=nothing"], "finetune.lora_heads: 'nothing' matches no parameter"),
    (["--train.strategy=fsdp"], "finetune.strategy=lora needs train.strategy=ddp"),
])
def test_bad_lora_configs_fail_in_one_line(tokenizer_path, start_run, tmp_path, capsys, extra, message):  # noqa: F811
    with pytest.raises(Failure):
        train.main(lora_args(tmp_path, tokenizer_path, start_run, "--train.steps=1", *extra))
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
