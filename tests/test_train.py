"""train.py end to end on the tiny config: the loss falls, resume is exact, 1 and 2 processes (and
gradient accumulation) train the same weights, and a config typo fails before anything runs."""
import json
import os
import pickle
import re
import signal
import subprocess
import sys

import pytest
import torch

from crossmodal import checkpointing, train
from crossmodal import recipes
from crossmodal.recipes import ClipRecipe

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "clip", "tiny_shapes.yaml")


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    from crossmodal.data import build_dataset
    from crossmodal.data.tokenizer import train_sentencepiece

    path = str(tmp_path_factory.mktemp("tokenizer") / "shapes.model")
    dataset = build_dataset("shapes:train:2000")
    train_sentencepiece((dataset[i]["caption"] for i in range(len(dataset))), path, vocab_size=256)
    return path


def small_run(out_dir, tokenizer_path, *extra) -> list[str]:
    return [
        "--config", CONFIG, f"--out_dir={out_dir}", f"--data.tokenizer_path={tokenizer_path}",
        "--data.workers=0", "--data.val=shapes:val:64", "--data.heldout=shapes:heldout:64",
        "--train.batch_size=16", "--train.warmup_steps=2", "--train.log_every=1", *extra,
    ]


def final_weights(out_dir) -> dict:
    return torch.load(os.path.join(out_dir, "checkpoint.pt"), weights_only=True)["model"]


def test_twenty_steps_lower_the_loss(tmp_path, tokenizer_path, capsys):
    results = train.main(small_run(tmp_path, tokenizer_path, "--train.steps=20", "--train.batch_size=32"))
    losses = [float(x) for x in re.findall(r"^step \d+/20 loss ([\d.]+)", capsys.readouterr().out, re.M)]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    logged = json.loads((tmp_path / "eval.jsonl").read_text().splitlines()[-1])
    assert logged == results and results["step"] == 20
    assert results["val/num_images"] == 64 and results["heldout/num_images"] == 64 and results["val/num_classes"] == 36
    assert os.path.exists(tmp_path / "config.yaml") and os.path.exists(tmp_path / "tb")


# drop path: random masks from the global RNG, which the checkpoint restores; the data loader must not draw from it
@pytest.mark.parametrize("model", [[], ["--model.name=ViT-tiny", "--model.drop_path=0.2"]], ids=["rn", "vit-drop-path"])
def test_resume_after_sigterm_is_exact(tmp_path, tokenizer_path, monkeypatch, model):
    straight = tmp_path / "straight"
    train.main(small_run(straight, tokenizer_path, "--train.steps=6", *model))

    interrupted = tmp_path / "interrupted"
    real_step, calls = ClipRecipe.train_step, []

    def step_then_sigterm(*args, **kwargs):
        loss = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler asks for a checkpoint after this step
        return loss

    monkeypatch.setattr(ClipRecipe, "train_step", step_then_sigterm)
    with pytest.raises(SystemExit) as stop:
        train.main(small_run(interrupted, tokenizer_path, "--train.steps=6", *model))
    assert stop.value.code == 0
    assert torch.load(os.path.join(interrupted, "checkpoint.pt"), weights_only=True)["step"] == 3
    monkeypatch.setattr(ClipRecipe, "train_step", real_step)
    train.main(small_run(interrupted, tokenizer_path, "--train.steps=6", *model, "--resume"))

    for name, weight in final_weights(straight).items():
        assert torch.equal(weight, final_weights(interrupted)[name]), name


def test_one_process_two_processes_and_accumulation_agree(tmp_path, tokenizer_path):
    # ViT: BatchNorm (the demo's ResNet) normalises per process and per micro-batch, so it cannot agree
    common = ["--train.steps=4", "--train.lr=1e-3", "--model.name=ViT-tiny"]
    train.main(small_run(tmp_path / "one", tokenizer_path, *common))
    train.main(small_run(tmp_path / "accum", tokenizer_path, *common, "--train.accum_steps=2"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         os.path.join(ROOT, "train.py"), *small_run(tmp_path / "two", tokenizer_path, *common)],
        check=True, cwd=ROOT, env=env, capture_output=True,
    )
    one, accum, two = (final_weights(tmp_path / name) for name in ("one", "accum", "two"))
    for name, weight in one.items():
        torch.testing.assert_close(two[name], weight, rtol=1e-4, atol=1e-5, msg=f"2 processes: {name}")
        torch.testing.assert_close(accum[name], weight, rtol=1e-4, atol=1e-5, msg=f"accumulation: {name}")


def test_config_typo_fails_before_anything_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "--config", CONFIG, f"--out_dir={tmp_path / 'run'}", "--train.lrr=1e-3"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode != 0
    assert "unknown config key 'train.lrr'" in result.stderr and "train.lr" in result.stderr
    assert not os.path.exists(tmp_path / "run")


def test_bad_values_fail_before_training(tmp_path):
    with pytest.raises(SystemExit, match=r"train\.precision must be one of fp32, bf16, fp16; got 'fp8'"):
        train.main(["--config", CONFIG, f"--out_dir={tmp_path}", "--train.precision=fp8"])
    with pytest.raises(SystemExit, match=r"loss\.impl must be one of torch, fused; got 'triton'"):
        train.main(["--config", CONFIG, f"--out_dir={tmp_path}", "--loss.name=siglip", "--loss.impl=triton"])
    assert not os.listdir(tmp_path)


def test_bad_dataset_spec_fails_before_training(tmp_path):
    with pytest.raises(SystemExit, match=r"data\.val: unknown dataset 'shape'.*did you mean 'shapes'"):
        train.main(["--config", CONFIG, f"--out_dir={tmp_path}", "--data.val=shape:val"])
    with pytest.raises(SystemExit, match=r"data\.train: shapes dataset has splits train, val, heldout, binding; got 'tran'"):
        train.main(["--config", CONFIG, f"--out_dir={tmp_path}", "--data.train=shapes:tran"])
    with pytest.raises(SystemExit, match=r"data\.train: vqa specs hold questions and answers, not captions; CLIP cannot"):
        train.main(["--config", CONFIG, f"--out_dir={tmp_path}", "--data.train=vqa:questions.json"])


@pytest.mark.parametrize("extra", [["--loss.name=siglip"], ["--train.precision=bf16"], ["--model.name=ViT-tiny", "--model.grad_checkpointing=true"], ["--loss.impl=fused", "--train.precision=bf16"], ["--loss.name=siglip", "--loss.impl=fused"]])
def test_variants_train(tmp_path, tokenizer_path, extra, capsys):
    train.main(small_run(tmp_path, tokenizer_path, "--train.steps=3", *extra))
    losses = re.findall(r"^step \d+/3 loss ([\d.]+)", capsys.readouterr().out, re.M)
    assert len(losses) == 3


def test_non_finite_loss_stops_with_a_message(tmp_path, tokenizer_path, monkeypatch):
    monkeypatch.setattr(ClipRecipe, "loss", lambda *args: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(SystemExit, match="non-finite loss nan at step 0"):
        train.main(small_run(tmp_path, tokenizer_path, "--train.steps=3"))


def test_clip_tokenizer_run_and_its_checkpoint(tmp_path, capsys):
    open_clip = pytest.importorskip("open_clip")
    from crossmodal import eval as evaluation

    bpe = open_clip.tokenizer.default_bpe()
    train.main(small_run(tmp_path, bpe, "--data.tokenizer=clip", "--data.context_length=24", "--train.steps=2"))
    checkpoint = str(tmp_path / "checkpoint.pt")
    cfg, model, tokenizer = recipes.load_run(checkpoint)  # the vocabulary travels in the checkpoint
    assert model.text.token_embedding.num_embeddings == 49408 and model.text.context_length == 24
    assert tokenizer("a red circle!")[0, :6].tolist() == open_clip.tokenize(["a red circle!"])[0, :6].tolist()
    with pytest.raises(SystemExit, match="data.tokenizer=clip needs data.tokenizer_path"):
        train.main(small_run(tmp_path / "other", "", "--data.tokenizer=clip"))
    with pytest.raises(SystemExit, match="data.tokenizer must be one of sentencepiece, clip"):
        train.main(small_run(tmp_path / "other", "", "--data.tokenizer=bpe"))


def test_resume_with_an_override_keeps_the_runs_config(tmp_path, tokenizer_path, capsys):
    # a run with non-default values, then `--resume --train.steps=N` as a user trains longer
    run = small_run(tmp_path, tokenizer_path, "--train.steps=2", "--train.lr=7e-4", "--model.name=ViT-tiny")
    train.main(run)
    capsys.readouterr()
    (tmp_path / "tokenizer.model").write_bytes(b"not a tokenizer: the checkpoint's own bytes must be used")
    train.main(["--resume", f"--out_dir={tmp_path}", "--train.steps=3", "--data.workers=0"])
    out = capsys.readouterr().out
    assert "changed: train.steps 2 -> 3" in out and "resumed from step 2" in out
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 3
    saved = checkpoint["config"]
    assert saved["train"]["lr"] == 7e-4 and saved["model"]["name"] == "ViT-tiny"  # not the defaults
    assert saved["data"]["val"] == "shapes:val:64" and saved["train"]["steps"] == 3


def test_resume_auto_starts_fresh_then_resumes(tmp_path, tokenizer_path, capsys):
    run = small_run(tmp_path, tokenizer_path, "--train.steps=2", "--model.name=ViT-tiny", "--resume", "auto")
    train.main(run)
    assert "no checkpoint at" in capsys.readouterr().out
    train.main([*run[:-2], "--train.steps=3", "--resume", "auto"])
    assert "resumed from step 2" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--resume: no checkpoint at"):
        train.main(["--resume", f"--out_dir={tmp_path / 'nothing'}"])


def test_checkpoint_rng_states_old_and_new_format():
    cpu = torch.get_rng_state()
    checkpointing.set_rng_state(cpu, torch.device("cpu"))  # checkpoints before CUDA states were saved held bare tensors
    state = checkpointing.rng_state(torch.device("cpu"))
    assert set(state) == {"cpu"} and torch.equal(state["cpu"], cpu)
    expected = torch.rand(3)
    checkpointing.set_rng_state(state, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)


class Payload:
    """What a crafted pickle carries: unpickling it calls `function(*arguments)`."""

    def __init__(self, function, *arguments):
        self.function, self.arguments = function, arguments

    def __reduce__(self):
        return self.function, self.arguments


def sharded(tmp_path) -> tuple[torch.nn.Module, torch.optim.Optimizer, str]:
    """A small model and optimizer after one step, saved as a DCP folder by checkpointing.save."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    checkpointing.save(str(tmp_path), model, optimizer, {"step": 1, "config": {}}, sharded=True)
    return model, optimizer, str(tmp_path / "checkpoint")


def test_a_sharded_checkpoint_loads_through_the_restricted_metadata_reader(tmp_path):
    model, optimizer, folder = sharded(tmp_path)
    assert isinstance(checkpointing.check_folder(folder), checkpointing.Metadata)
    again = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    again_optimizer = torch.optim.AdamW(again.parameters(), lr=5.0)
    checkpointing.load({"folder": folder, "path": folder}, again, again_optimizer)
    for name, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name
    assert again_optimizer.param_groups[0]["lr"] == 1e-3  # a non-tensor value, read with weights_only
    saved, loaded = optimizer.state_dict()["state"][0], again_optimizer.state_dict()["state"][0]
    assert torch.equal(loaded["exp_avg"], saved["exp_avg"])


@pytest.mark.parametrize("payload, refused", [
    (lambda marker: Payload(os.system, f"touch {marker}"), "posix.system"),
    (lambda marker: Payload(exec, f"open({str(marker)!r}, 'w').close()"), "builtins.exec"),
    (lambda marker: Payload(open, str(marker), "w"), "io.open"),
    (lambda marker: Payload(torch.load, str(marker)), "torch.serialization.load"),
])
def test_metadata_that_would_run_code_is_refused_unrun(tmp_path, payload, refused):
    _, _, folder = sharded(tmp_path)
    marker = tmp_path / "ran"
    with open(os.path.join(folder, ".metadata"), "rb") as f:
        metadata = pickle.load(f)  # written by this test: trusted
    metadata.planner_data = payload(marker)  # inside a real metadata object: every global is checked, not the top
    with open(os.path.join(folder, ".metadata"), "wb") as f:
        pickle.dump(metadata, f)
    for attempt in (lambda: checkpointing.read_metadata(os.path.join(folder, ".metadata")),
                    lambda: checkpointing.load({"folder": folder, "path": folder}, torch.nn.Linear(4, 3))):
        with pytest.raises(checkpointing.BadInput, match=f"'{re.escape(folder)}/.metadata' names {refused}"):
            attempt()
    assert not marker.exists()


def test_damaged_files_and_folders_are_refused_naming_them(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"model": {}, "config": {}, "tokenizer": "t"}, good)
    data = good.read_bytes()
    cases = {"empty.pt": (b"", "is empty"), "cut.pt": (data[:len(data) // 2], "is cut short"),
             "text.pt": (b"not a checkpoint\n", "is not a file torch.save wrote"),
             "evil.pt": (None, "holds Python objects that could run code.* GLOBAL posix.system")}
    torch.save(Payload(os.system, "true"), tmp_path / "evil.pt")
    for name, (content, message) in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(checkpointing.BadInput, match=f"'{re.escape(str(tmp_path / name))}' {message}"):
            checkpointing.read(str(tmp_path / name))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(checkpointing.BadInput, match="not a checkpoint train.py wrote .it holds a list"):
        checkpointing.read(str(tmp_path / "list.pt"))
    with pytest.raises(checkpointing.BadInput, match="to resume from .it has no optimizer, scaler, step, rng"):
        checkpointing.read(str(good), resuming=True)
    _, _, folder = sharded(tmp_path / "run")
    os.remove(os.path.join(folder, ".metadata"))
    with pytest.raises(checkpointing.BadInput, match="has no .metadata"):
        checkpointing.check_folder(folder)
    assert checkpointing.out_dir_problem(str(good)).endswith("is a file, not a folder")
    assert "which is a file" in checkpointing.out_dir_problem(str(good / "run"))
    assert checkpointing.out_dir_problem(str(tmp_path / "new" / "run")) is None


def test_weights_that_do_not_fit_name_the_first_mismatches():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    weights = {"0.weight": torch.zeros(3, 5), "0.bias": torch.zeros(3), "2.weight": torch.zeros(2, 3)}
    with pytest.raises(checkpointing.BadInput, match=r"checkpoint 'run.pt' does not fit the model its config builds: "
                       r"missing 1.weight, 1.bias; unexpected 2.weight; other shapes: 0.weight \(3, 5\) "
                       r"\(the model's \(3, 4\)\)"):
        checkpointing.load({"model": weights, "path": "run.pt"}, model)


def test_a_preset_brings_its_input_size_and_context_length():
    from crossmodal.config import load_config

    cfg = recipes.resolve(load_config(None, ["--model.name=ViT-B-32"]))
    assert (cfg.data.image_size, cfg.data.context_length) == (224, 77)
    cfg = recipes.resolve(load_config(CONFIG, ["--model.name=ViT-B-32"]))  # the demo YAML sets 64 and 32
    assert (cfg.data.image_size, cfg.data.context_length) == (64, 32)

    class Tokenizer:
        vocab_size, context_length, pad_id = 1024, 77, 0

    cfg = recipes.resolve(load_config(None, ["--model.name=ViT-B-32"]))
    with torch.device("meta"):
        model = recipes.model_from_config(cfg, Tokenizer())
    assert model.visual.image_size == 224 and model.text.context_length == 77


@pytest.mark.parametrize("override, message", [
    ("--train.log_every=0", r"train\.log_every must be >= 1; got 0"),
    ("--train.ckpt_every=0", r"train\.ckpt_every must be >= 1; got 0"),
    ("--train.accum_steps=0", r"train\.accum_steps must be >= 1; got 0"),
    ("--train.batch_size=130", r"train\.batch_size=130 must divide evenly into 1 processes x 4 accumulation steps"),
    ("--model.name=ViT-B32", r"model\.name: unknown model 'ViT-B32'; closest presets: ViT-B-32"),
    ("--train.lr=0", r"train\.lr must be > 0"),
    ("--model.vit_stem=convs", r"model\.vit_stem must be one of patch, conv; got 'convs'"),
    ("--model.name=RN-tiny --model.vit_stem=conv", r"model\.vit_stem=conv needs a ViT image tower"),
    ("--lm.induction_fraction=0.3", r"lm\.induction_fraction must lie in \[0, 1\) and is for language models"),
    ("--model.name=lm-tiny --data.train=shapes_icl:train --lm.induction_fraction=1",
     r"lm\.induction_fraction must lie in \[0, 1\).*got 1\.0"),
    ("--model.name=BLIP-tiny --blip.momentum=1.5", r"blip\.momentum must lie in \[0, 1\]; got 1\.5"),
    ("--model.name=BLIP-tiny --blip.queue_size=1000",
     r"blip\.queue_size must be 0 \(no queue\), a multiple of the global batch train\.batch_size=\d+.*got 1000"),
    ("--model.name=Flamingo-tiny --model.pretrained=configs",
     r"model\.pretrained 'configs': a Flamingo run starts from another run's checkpoint\.pt"),
])
def test_bad_numbers_fail_before_anything_runs(tmp_path, override, message):
    extra = ["--train.accum_steps=4"] if "batch_size" in override else []
    with pytest.raises(SystemExit, match=message):
        train.main(["--config", CONFIG, f"--out_dir={tmp_path}", *override.split(), *extra])
    assert not os.listdir(tmp_path)


def test_batch_size_must_divide_over_processes(monkeypatch):
    from crossmodal.config import load_config

    cfg = recipes.resolve(load_config(CONFIG, ["--train.batch_size=6", "--data.val=", "--data.heldout="]))
    assert recipes.check_config(cfg, world_size=2) is None
    assert "into 4 processes x 1 accumulation steps" in recipes.check_config(cfg, world_size=4)


def test_logit_scale_is_clamped_after_the_step_and_logged_as_used(tmp_path, tokenizer_path, capsys):
    import math

    run = small_run(tmp_path, tokenizer_path, "--train.steps=2", "--model.name=ViT-tiny", "--train.lr=0.5",
                    "--train.warmup_steps=1")
    real_build = ClipRecipe.build_model

    def build_with_a_large_scale(self, tokenizer, **options):
        model = real_build(self, tokenizer, **options)
        with torch.no_grad():
            model.logit_scale.fill_(math.log(150.0))  # above the clamp: the first step must still use it
        return model

    ClipRecipe.build_model = build_with_a_large_scale
    try:
        train.main(run)
    finally:
        ClipRecipe.build_model = real_build
    scales = [float(s) for s in re.findall(r"^step \d+/2 .* scale ([\d.]+)", capsys.readouterr().out, re.M)]
    assert scales[0] == pytest.approx(150.0, abs=0.05) and scales[1] <= 100.0 + 1e-3
    assert final_weights(tmp_path)["logit_scale"].item() <= math.log(100) + 1e-6


def test_sync_batchnorm_makes_the_resnet_world_size_invariant(tmp_path, tokenizer_path):
    # RN-tiny's BatchNorm normalises per process unless model.sync_bn: then 1 and 2 processes agree
    common = ["--train.steps=3", "--train.lr=1e-3", "--model.name=RN-tiny", "--model.sync_bn=true"]
    train.main(small_run(tmp_path / "one", tokenizer_path, *common))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         os.path.join(ROOT, "train.py"), *small_run(tmp_path / "two", tokenizer_path, *common)],
        check=True, cwd=ROOT, env=env, capture_output=True,
    )
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    # Adam turns fp32 summation-order noise in near-zero gradients (zero-initialised BatchNorm gammas) into
    # differences of a few 1e-5 after 3 steps; per-process BatchNorm leaves the weights 2.4e-2 apart.
    for name, weight in one.items():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(two[name], weight), name
            continue
        torch.testing.assert_close(two[name], weight, rtol=1e-3, atol=1e-4, msg=f"2 processes: {name}")


def test_fixed_temperature_stays_and_learned_one_moves(tmp_path, tokenizer_path):
    import math

    common = ["--train.steps=2", "--model.name=ViT-tiny", "--model.init_temperature=0.2"]
    train.main(small_run(tmp_path / "fixed", tokenizer_path, *common, "--train.learn_temperature=false"))
    train.main(small_run(tmp_path / "learned", tokenizer_path, *common))
    fixed, learned = final_weights(tmp_path / "fixed"), final_weights(tmp_path / "learned")
    assert fixed["logit_scale"].item() == pytest.approx(math.log(5.0), abs=1e-6)
    assert abs(learned["logit_scale"].item() - math.log(5.0)) > 1e-5


def test_stop_signal_handlers_are_restored_after_a_run(tmp_path, tokenizer_path):
    # a library user's (or pytest's) process must still die on SIGTERM and Ctrl-C after train.main returns
    before = [signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)]
    train.main(small_run(tmp_path, tokenizer_path, "--train.steps=1", "--model.name=ViT-tiny", "--data.heldout="))
    assert [signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)] == before


def test_blip_trains_through_the_same_loop(tmp_path, capsys):
    # BLIP-tiny with a sentencepiece tokenizer trained here with [DEC] and [ENC]: three named losses, logged
    run = ["--config", CONFIG, f"--out_dir={tmp_path}", "--model.name=BLIP-tiny", "--data.workers=0",
           "--data.val=shapes:val:32", "--data.heldout=", "--train.batch_size=16", "--train.steps=3",
           "--train.log_every=1", "--train.warmup_steps=1", "--data.tokenizer_captions=2000", "--data.vocab_size=256",
           "--blip.queue_size=64"]
    train.main(run)
    out = capsys.readouterr().out
    lines = re.findall(r"^step \d+/3 loss ([\d.]+) itc ([\d.]+) itm ([\d.]+) lm ([\d.]+)", out, re.M)
    assert len(lines) == 3
    for total, *parts in lines:
        assert float(total) == pytest.approx(sum(map(float, parts)), abs=2e-4)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["config"]["blip"]["alpha_steps"] == 2 * 100_000 // 16  # two epochs of shapes:train
    assert any(key.startswith("queue.") for key in checkpoint["model"])  # momentum state travels for resume
    # TensorBoard shows validation images with their captions and answers, not only the scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    (picture,) = events.Images("val/examples")
    assert picture.width == 4 * 192 and picture.height > 2 * 192
    (text,) = [tag for tag in events.Tags()["tensors"] if tag.startswith("val/examples")]
    table = events.Tensors(text)[0].tensor_proto.string_val[0].decode()
    assert table.startswith("| image | caption | question | answer (true) |") and table.count("\n") == 2 + 8
    with pytest.raises(SystemExit, match="train.accum_steps must be 1 for BLIP"):
        train.main([*run, "--train.accum_steps=2"])
