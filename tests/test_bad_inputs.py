"""Hostile and broken input, every case through the real entry point (train.py, eval.py, search.py, ablate.py) as a
user runs it: a subprocess in its own session under a timeout (tests/bad_inputs.py), asserting what the user sees (a
one-line refusal and exit status 2, or a counted and listed skip), the files that must stay as they were, and that
nothing is left running. The cases and their outcomes are tabled in docs/bad_inputs.md (issue 32).

- checkpoints: a sharded folder whose `.metadata` or shard would run code, through all five ways a folder is read;
  an empty or cut-short checkpoint.pt; weights that do not fit the config's model; an out_dir that is a file;
  Ctrl-C during training, which saves a checkpoint the way SIGTERM does.
- configs: numbers out of range (nan and inf included), YAML that does not parse, ablation grids of the wrong
  type; a SIGKILLed ablate.py takes its train.py child with it.
- released folders: a config.json field this model cannot be is refused, naming it, before any weights are read.
- search: folder walks that see each file once and list what they leave out (symlink loops, FIFOs, dangling links),
  options refused before an index is touched, non-UTF-8 names shown escaped, damaged indexes; SIGTERM with workers.
- evaluation: few-shot on a whole split, unreadable images that affect many captions (stopped past
  data.max_bad_fraction, counted as misses below it), an empty class folder, --out left intact; data workers that
  end with a SIGKILLed parent.
"""
import dataclasses
import io
import json
import os
import pickle
import shutil
import signal
import textwrap

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from crossmodal import checkpointing, recipes, search, train
from crossmodal.data import build_dataset
from tests.bad_inputs import fingerprint, refused, run
from tests.test_data_formats import write_csv, write_images
from tests.test_gpt_neox_tokenizer import tokenizer_json  # noqa: F401  (fixture: a tiny GPT-NeoX-like tokenizer)
from tests.test_search import checkpoint, write_shapes  # noqa: F401  (module-scoped fixture)
from tests.test_train import CONFIG, small_run, tokenizer_path  # noqa: F401  (module-scoped fixture)


# ------------------------------------------ code in checkpoints, damaged checkpoints, weights that do not fit, Ctrl-C


class Payload:
    """What a crafted pickle carries: unpickling it runs `touch marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def run_file(tmp_path_factory, tokenizer_path):  # noqa: F811
    """A tiny run's checkpoint.pt (2 steps, no evaluation)."""
    out_dir = tmp_path_factory.mktemp("run")
    train.main(small_run(out_dir, tokenizer_path, "--train.steps=2", "--data.val=shapes:val:16", "--data.heldout="))
    return str(out_dir / "checkpoint.pt")


def folder_of(run_file: str, parent) -> str:
    """The run's weights as a sharded (DCP) folder `parent/checkpoint`, as an FSDP run writes it."""
    checkpoint = checkpointing.read(run_file)
    cfg, model, _ = recipes.load_run(run_file)
    optimizer = train.build_optimizer(model, cfg.train)
    meta = {key: value for key, value in checkpoint.items() if key not in ("model", "optimizer", "path")}
    os.makedirs(parent, exist_ok=True)
    checkpointing.save(str(parent), model, optimizer, meta, sharded=True)
    return os.path.join(parent, checkpointing.FOLDER)


def poison_metadata(folder: str, marker: str) -> None:
    """The folder's real metadata with a payload among its fields (DCP would unpickle it with pickle.load)."""
    with open(os.path.join(folder, ".metadata"), "rb") as f:
        metadata = pickle.load(f)  # written by this test: trusted
    metadata.planner_data = Payload(marker)
    with open(os.path.join(folder, ".metadata"), "wb") as f:
        pickle.dump(metadata, f)


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory, run_file):
    """(parent, folder, marker): `parent/checkpoint`, a sharded checkpoint whose .metadata would run `touch marker`."""
    parent = tmp_path_factory.mktemp("poisoned")
    folder = folder_of(run_file, parent)
    marker = str(parent.parent / "metadata_ran")
    poison_metadata(folder, marker)
    return str(parent), folder, marker


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("images")
    dataset = build_dataset("shapes:val:4")
    for i in range(len(dataset)):
        dataset[i]["image"].save(root / f"{i}.png")
    return str(root)


def assert_refused_unrun(result, folder: str, marker: str, before: dict) -> None:
    refused(result, os.path.join(folder, ".metadata"), "posix.system", "refused")
    assert not os.path.exists(marker), "the checkpoint's payload ran"
    assert fingerprint(folder) == before


def test_eval_refuses_a_poisoned_folder(poisoned):
    _, folder, marker = poisoned
    before = fingerprint(folder)
    result = run(["eval.py", "--checkpoint", folder, "--task", "zeroshot", "--data", "shapes:val:8"])
    assert_refused_unrun(result, folder, marker, before)


def test_train_refuses_to_resume_a_poisoned_folder(poisoned, tmp_path):
    _, folder, marker = poisoned
    before = fingerprint(folder)
    result = run(["train.py", "--resume", folder, f"--out_dir={tmp_path / 'run'}"])
    assert_refused_unrun(result, folder, marker, before)
    assert not os.path.exists(tmp_path / "run")


def test_train_refuses_to_resume_a_poisoned_folder_in_out_dir(poisoned):
    parent, folder, marker = poisoned
    before = fingerprint(parent)
    result = run(["train.py", "--resume", f"--out_dir={parent}"])
    assert_refused_unrun(result, folder, marker, before)
    assert fingerprint(parent) == before


def test_search_index_refuses_a_poisoned_folder(poisoned, images, tmp_path):
    _, folder, marker = poisoned
    before = fingerprint(folder)
    index = tmp_path / "photos.pt"
    result = run(["search.py", "index", "--checkpoint", folder, "--images", images, "--index", str(index)])
    assert_refused_unrun(result, folder, marker, before)
    assert not os.path.exists(index)


def test_search_query_refuses_an_index_whose_source_is_a_poisoned_folder(poisoned, run_file, images, tmp_path):
    _, folder, marker = poisoned
    index = tmp_path / "photos.pt"
    built = run(["search.py", "index", "--checkpoint", run_file, "--images", images, "--index", str(index)])
    assert built.returncode == 0, built.stderr[-3000:]
    stored = torch.load(index, weights_only=True)
    torch.save({**stored, "source": {"checkpoint": folder}}, index)
    before, index_before = fingerprint(folder), fingerprint(str(index))
    result = run(["search.py", "query", "--index", str(index), "--text", "a red circle", "--k", "2"])
    assert_refused_unrun(result, folder, marker, before)
    assert fingerprint(str(index)) == index_before


def test_train_refuses_a_shard_value_that_would_run_code(run_file, tmp_path):
    # DCP reads a folder's non-tensor values (the optimizer's settings) with torch.load(weights_only=False)
    folder = folder_of(run_file, tmp_path / "run")
    marker = str(tmp_path / "value_ran")
    with open(os.path.join(folder, ".metadata"), "rb") as f:
        metadata = pickle.load(f)  # written by this test: trusted
    index = next(index for index in metadata.storage_data if index.fqn.endswith(".lr"))
    info = metadata.storage_data[index]
    shard = os.path.join(folder, info.relative_path)
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)  # as DCP writes a value
    payload = buffer.getvalue()
    info.offset, info.length = os.path.getsize(shard), len(payload)
    with open(shard, "ab") as f:
        f.write(payload)
    with open(os.path.join(folder, ".metadata"), "wb") as f:
        pickle.dump(metadata, f)
    before = fingerprint(str(tmp_path / "run"))
    result = run(["train.py", "--resume", folder, f"--out_dir={tmp_path / 'run'}"])
    refused(result, folder, index.fqn, "posix.system")
    assert not os.path.exists(marker), "the checkpoint's payload ran"
    assert fingerprint(str(tmp_path / "run")) == before


def test_a_folder_missing_a_shard_is_refused(run_file, tmp_path):
    folder = folder_of(run_file, tmp_path / "run")
    shard = next(name for name in os.listdir(folder) if name.endswith(".distcp"))
    os.remove(os.path.join(folder, shard))
    result = run(["eval.py", "--checkpoint", folder, "--task", "zeroshot", "--data", "shapes:val:8"])
    refused(result, folder, shard, "missing")


@pytest.mark.parametrize("damage", ["empty", "cut short"])
def test_a_damaged_checkpoint_file_is_refused(run_file, tmp_path, damage):
    path = tmp_path / "checkpoint.pt"
    data = open(run_file, "rb").read()
    path.write_bytes(b"" if damage == "empty" else data[:len(data) // 2])
    before = fingerprint(str(tmp_path))
    result = run(["train.py", "--resume", str(path), f"--out_dir={tmp_path}"])
    refused(result, str(path), damage)
    result = run(["eval.py", "--checkpoint", str(path), "--task", "zeroshot", "--data", "shapes:val:8"])
    refused(result, str(path), damage)
    assert fingerprint(str(tmp_path)) == before


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    result = run(["eval.py", "--checkpoint", str(path), "--task", "zeroshot", "--data", "shapes:val:8"])
    refused(result, str(path), "not a checkpoint train.py wrote", "model")


def test_out_dir_that_is_a_file_is_refused_before_work(tmp_path, tokenizer_path):  # noqa: F811
    out_dir = tmp_path / "results.txt"
    out_dir.write_text("an earlier result\n")
    before = fingerprint(str(tmp_path))
    result = run(["train.py", *small_run(out_dir, tokenizer_path, "--train.steps=1")])
    refused(result, "out_dir", str(out_dir), "is a file")
    assert "step" not in result.stdout and fingerprint(str(tmp_path)) == before


def test_weights_that_do_not_fit_the_model_are_refused(run_file, tmp_path):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    path = out_dir / "checkpoint.pt"
    path.write_bytes(open(run_file, "rb").read())
    before = fingerprint(str(out_dir))
    result = run(["train.py", "--resume", str(path), "--model.name=ViT-tiny", f"--out_dir={out_dir}"])
    refused(result, str(path), "does not fit the model", "missing", "unexpected")
    assert fingerprint(str(out_dir)) == before
    # a checkpoint whose config names another model than its weights are
    checkpoint = torch.load(run_file, weights_only=True)
    checkpoint["config"]["model"]["name"] = "ViT-tiny"
    torch.save(checkpoint, path)
    result = run(["eval.py", "--checkpoint", str(path), "--task", "zeroshot", "--data", "shapes:val:8"])
    refused(result, str(path), "does not fit the model")


@pytest.mark.parametrize("workers, group", [(0, False), (2, True)])
def test_ctrl_c_saves_a_checkpoint_and_resume_continues(tmp_path, tokenizer_path, workers, group):  # noqa: F811
    args = small_run(tmp_path, tokenizer_path, "--train.steps=400", "--train.ckpt_every=1000",
                     "--data.val=shapes:val:16", "--data.heldout=", f"--data.workers={workers}")
    # once the first step is logged; to the whole group with `group`, as Ctrl-C in a terminal does
    result = run(["train.py", *args], signal_after=("step 1/", signal.SIGINT), signal_group=group)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr, result.stderr[-3000:]
    assert "SIGINT: saved checkpoint at step" in result.stdout
    step = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"]
    assert 1 <= step < 400
    resumed = run(["train.py", "--resume", f"--out_dir={tmp_path}", f"--train.steps={step + 1}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {step}" in resumed.stdout
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == step + 1


# ---------------------------------------------------------------- configuration values, YAML files and ablation grids


def run_train(tmp_path, *overrides: str, config: str = CONFIG):
    return run(["train.py", "--config", config, f"--out_dir={tmp_path / 'run'}", *overrides])


@pytest.mark.parametrize("override, texts", [
    ("--data.max_bad_fraction=nan", ("data.max_bad_fraction must be a finite number in [0, 1]; got nan",)),
    ("--train.grad_clip=nan", ("train.grad_clip must be a finite number >= 0; got nan",)),
    ("--train.lr=nan", ("train.lr must be a finite number > 0; got nan",)),
    ("--train.lr=inf", ("train.lr must be a finite number > 0; got inf",)),
    ("--train.lr=-1e-3", ("train.lr must be > 0; got -0.001",)),
    ("--model.name=ViT-tiny --data.image_size=65",
     ("data.image_size=65 does not suit model.name=ViT-tiny", "multiples of 8 (the patch size); e.g. 64")),
])
def test_train_refuses_a_number_out_of_range(tmp_path, override, texts):
    refused(run_train(tmp_path, *override.split()), "config error: ", *texts)
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("text, texts", [
    ("train:\n  lr: [1e-3, 2e-3\n", ("not valid YAML at line 3, column 1", "(while parsing a flow sequence at line 2")),
    ("- model.name: ViT-tiny\n", ("expected a mapping of config keys at the top level, got list",)),
    ("train: 5\n", ("config key 'train'", "is a section: expected a mapping of its keys, got int 5")),
])
def test_train_refuses_a_broken_config_file(tmp_path, text, texts):
    config = tmp_path / "broken.yaml"
    config.write_text(text)
    refused(run_train(tmp_path, config=str(config)), "config error: ", str(config), *texts)
    assert not os.path.exists(tmp_path / "run")


def ablate(tmp_path, grid: str, *extra: str, **options):
    spec = tmp_path / "grid.yaml"
    spec.write_text(f"base: {CONFIG}\n{grid}")
    return run(["ablate.py", str(spec), "--runs-dir", str(tmp_path / "runs"), "--tables-dir", str(tmp_path / "tables"),
                *extra], **options)


@pytest.mark.parametrize("grid, texts", [
    ("seeds: 5\n", ("seeds must be a non-empty list of integers", "five seeds: [0, 1, 2, 3, 4]); got 5")),
    ('seeds: "ab"\n', ("seeds must be a non-empty list of integers", "got 'ab'")),
    ("processes: x\n", ("processes (processes per run) must be an integer >= 1; got 'x'",)),
    ("processes: 0\n", ("processes (processes per run) must be an integer >= 1; got 0",)),
    ("cells: [{processes: 1.5}]\n", ("cells[0].processes (processes per run) must be an integer >= 1; got 1.5",)),
    ("axes: {train.lr: [1e-3, .nan]}\n", ("train.lr=nan seed=0: train.lr must be a finite number > 0; got nan",)),
    ("seeds: [0, 1\n", ("grid.yaml: not valid YAML at line 3, column 1", "(while parsing a flow sequence at line 2")),
])
def test_ablate_refuses_a_bad_grid_before_running_anything(tmp_path, grid, texts):
    refused(ablate(tmp_path, grid), "ablation file error: ", *texts)
    assert not os.path.exists(tmp_path / "runs") and not os.path.exists(tmp_path / "tables")


def test_ablate_refuses_nproc_zero(tmp_path):
    refused(ablate(tmp_path, "seeds: [0]\n", "--nproc", "0"), "ablate.py: --nproc must be >= 1; got 0")


def test_sigkilled_ablate_takes_its_train_run_with_it(tmp_path, tokenizer_path):  # noqa: F811
    """SIGKILL reaches ablate.py alone (as the OOM killer's would); its train.py child, started with the
    parent-death signal, gets SIGTERM and ends: run() fails the test if anything is left in the session."""
    overrides = {"data.tokenizer_path": tokenizer_path, "data.workers": 0, "data.val": "shapes:val:16",
                 "data.heldout": "", "train.batch_size": 8, "train.steps": 100000, "train.warmup_steps": 1}
    result = ablate(tmp_path, yaml.safe_dump({"overrides": overrides, "seeds": [0]}),
                    signal_after=("1 running", signal.SIGKILL, 2))
    assert result.returncode == -signal.SIGKILL
    cell = tmp_path / "runs" / "grid" / "seed=0"
    assert (cell / "stderr.txt").exists()  # the child was started
    assert not (cell / "cell.json").exists()


# ----------------------------------------------------- released-weight folders whose config.json this model cannot be


transformers = pytest.importorskip("transformers")  # writes the config.json files as transformers does


def blip_folder(folder, section: str, field: str, value) -> str:
    """A HuggingFace BLIP folder (config.json, vocab.txt, a stand-in weights file) with one field changed."""
    config = transformers.BlipConfig().to_dict()
    config[section][field] = value
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"]) + "\n")
    (folder / "model.safetensors").write_bytes(b"never read")
    return str(folder)


@pytest.mark.parametrize("section, field, value", [
    ("text_config", "hidden_act", "relu"),  # an activation this model does not compute
    ("vision_config", "num_channels", 1),
    ("text_config", "position_embedding_type", "relative_key"),  # unknown: refused, not ignored
])  # fmt: skip
def test_blip_folder_this_model_cannot_be(tmp_path, section, field, value):
    folder = blip_folder(tmp_path / "blip", section, field, value)
    before = fingerprint(folder)
    result = run(["eval.py", "--model", "BLIP-base", "--pretrained", folder, "--task", "retrieval", "--data",
                  "shapes:val:4"])
    refused(result, "config.json", section, f"{field}={value!r}")
    assert fingerprint(folder) == before


def mpt_folder(folder, tokenizer_file=None, **changes) -> str:
    """A MosaicGPT folder's config.json (mpt-1b-redpajama-200b's fields) with `changes`, and a stand-in weights file."""
    config = {
        "model_type": "mosaic_gpt", "d_model": 128, "n_heads": 4, "n_layers": 2, "mlp_ratio": 4, "max_seq_len": 128,
        "vocab_size": 576, "alibi": True, "alibi_bias_max": 8, "attn_qk_ln": False, "attn_clip_qkv": None,
        "softmax_scale": None, "logit_scale": None, "no_bias": True, "prefix_lm": False, **changes,
    }  # fmt: skip
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "pytorch_model.bin").write_bytes(b"never read")
    if tokenizer_file:
        (folder / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    return str(folder)


def test_open_flamingo_language_model_this_model_cannot_be(tmp_path, tokenizer_json):  # noqa: F811
    lm = mpt_folder(tmp_path / "mpt", tokenizer_json, attn_clip_qkv=6.0)  # an MPT option not implemented
    for name in ("checkpoint.pt", "clip.pt"):  # never read: the language model's config is refused first
        (tmp_path / name).write_bytes(b"never read")
    before = fingerprint(str(tmp_path))
    result = run(["eval.py", "--model", "Flamingo-tiny", "--pretrained", str(tmp_path / "checkpoint.pt"), "--vision",
                  str(tmp_path / "clip.pt"), "--lm", lm, "--task", "fewshot_vqa", "--data", "shapes_icl:val:4"])
    refused(result, "config.json", "attn_clip_qkv=6.0", "no QKV clipping only")
    assert fingerprint(str(tmp_path)) == before


def test_training_from_a_folder_the_preset_cannot_rebuild(tmp_path):
    """lm-tiny named, a folder of 8 heads given: the run would resume and evaluate as lm-tiny's 4 heads."""
    folder = mpt_folder(tmp_path / "mpt", n_heads=8)
    before = fingerprint(folder)
    result = run(["train.py", "--config", "configs/lm/tiny_shapes.yaml", f"--out_dir={tmp_path / 'run'}",
                  f"--model.pretrained={folder}", "--train.steps=1"])
    refused(result, "model.pretrained", "n_heads=8 (the preset's 4)")
    assert fingerprint(folder) == before and not (tmp_path / "run").exists()


# ---------------------------------------------------------- search.py: folder walks, options, indexes, names, workers


STRICT_UTF8 = {"PYTHONIOENCODING": "utf-8:strict"}  # printing an unescaped non-UTF-8 name would raise


def index_command(checkpoint, folder, index, *extra) -> list[str]:  # noqa: F811
    return ["search.py", "index", "--checkpoint", checkpoint, "--images", str(folder), "--index", str(index), *extra]


def indexed_paths(index) -> list[str]:
    return search.load_index(str(index))["paths"]


@pytest.fixture(scope="module")
def built(tmp_path_factory, checkpoint):  # noqa: F811
    """(folder of 4 pictures, its index): copy the index to change it."""
    folder = tmp_path_factory.mktemp("built") / "pictures"
    write_shapes(folder, 4)
    index = folder.parent / "index.pt"
    search.main(["index", "--checkpoint", checkpoint, "--images", str(folder), "--index", str(index)])
    return folder, index


def test_a_symlink_loop_is_walked_once(tmp_path, checkpoint):  # noqa: F811
    folder, index = tmp_path / "pictures", tmp_path / "index.pt"
    write_shapes(folder, 3)
    os.symlink(".", folder / "loop")  # pictures/loop/loop/loop/... is pictures again
    os.symlink("..", folder / "sub" / "up")
    result = run(index_command(checkpoint, folder, index))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(indexed_paths(index)) == sorted(str(path) for path in folder.rglob("*.png"))  # 3, each once
    for link in ("loop", "sub/up"):
        assert f"{folder / link}: a link to a folder already walked" in result.stdout


def test_a_fifo_is_skipped_and_listed_without_a_hang(tmp_path, checkpoint):  # noqa: F811
    folder, index = tmp_path / "pictures", tmp_path / "index.pt"
    write_shapes(folder, 2)
    os.mkfifo(folder / "pipe.png")  # nothing ever writes to it: reading it would block forever
    result = run(index_command(checkpoint, folder, index), timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{folder / 'pipe.png'}: a FIFO" in result.stdout
    assert len(indexed_paths(index)) == 2
    assert search.load_index(str(index))["skipped"] == {str(folder / "pipe.png"): "a FIFO"}


def test_dangling_and_looping_links_are_listed(tmp_path, checkpoint):  # noqa: F811
    folder, index = tmp_path / "pictures", tmp_path / "index.pt"
    write_shapes(folder, 2)
    os.symlink("nowhere.png", folder / "gone.png")
    os.symlink("self.jpg", folder / "self.jpg")
    result = run(index_command(checkpoint, folder, index))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{folder / 'gone.png'}: a dangling link" in result.stdout
    assert f"{folder / 'self.jpg'}: a looping link" in result.stdout
    assert "2 skipped" in result.stdout and len(indexed_paths(index)) == 2


@pytest.mark.parametrize("option, value", [("--batch-size", "-1"), ("--batch-size", "0"), ("--workers", "-1"),
                                           ("--every", "nan"), ("--every", "0"), ("--scene", "inf")])
def test_a_bad_index_option_is_refused_before_the_index_is_touched(tmp_path, built, checkpoint, option,
                                                                   value):  # noqa: F811
    folder, index = built[0], tmp_path / "index.pt"
    shutil.copy(built[1], index)
    before = fingerprint(str(index))
    result = run(index_command(checkpoint, folder, index, f"{option}={value}"), timeout=60)
    refused(result, option, value)
    assert fingerprint(str(index)) == before


@pytest.mark.parametrize("option, value", [("--k", "-1"), ("--k", "0"), ("--image-weight", "nan")])
def test_a_bad_query_option_is_refused_and_the_page_kept(tmp_path, built, option, value):
    page = tmp_path / "results.html"
    page.write_text("the previous page")
    result = run(["search.py", "query", "--index", str(built[1]), "--text", "a red circle", "--image",
                  str(built[0] / "0.png"), f"{option}={value}", "--out", str(page)], timeout=60)
    refused(result, option, value)
    assert page.read_text() == "the previous page"


def test_a_non_utf8_file_name_is_shown_escaped_and_still_found(tmp_path, checkpoint):  # noqa: F811
    folder, index = tmp_path / "pictures", tmp_path / "index.pt"
    write_shapes(folder, 2)
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not UTF-8, kept by Python as a lone surrogate
    shutil.copy(folder / "0.png", folder / name)
    result = run(index_command(checkpoint, folder, index), env=STRICT_UTF8)
    assert result.returncode == 0, result.stderr[-3000:]
    assert str(folder / name) in indexed_paths(index)  # stored as on disk: the file can be opened again

    page, report = tmp_path / "results.html", tmp_path / "results.json"
    page.write_text("the previous page")
    query = ["search.py", "query", "--index", str(index), "--image", str(folder / name), "--k", "3"]
    result = run([*query, "--out", str(page)], env=STRICT_UTF8)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "caf\\xe9.png" in result.stdout
    html = page.read_text(encoding="utf-8")
    assert "caf\\xe9.png" in html and html.count('src="data:image/jpeg;base64,') == 3  # its thumbnail was read
    result = run([*query, "--out", str(report)], env=STRICT_UTF8)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "caf\\\\xe9.png" in report.read_text(encoding="utf-8")  # JSON escapes the backslash

    before = fingerprint(str(page))
    refused(run([*query, "--k", "-1", "--out", str(page)], env=STRICT_UTF8), "--k")
    assert fingerprint(str(page)) == before


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def broken_indexes(folder, built_index, marker) -> dict:
    """{what: path} of files that are no intact index."""
    data = built_index.read_bytes()
    stored = torch.load(built_index, weights_only=True)
    files = {"empty": b"", "text": b"a text file, not an index\n", "truncated": data[: len(data) // 2]}
    paths = {}
    for what, content in files.items():
        paths[what] = folder / f"{what}.pt"
        paths[what].write_bytes(content)
    for what, content in {"tensor": torch.zeros(3), "other format": {**stored, "format": "something else"},
                          "rows that disagree": {**stored, "times": stored["times"][:1]},
                          "a bad source": {**stored, "source": {"checkpoint": 3}}}.items():
        paths[what] = folder / f"{what.replace(' ', '_')}.pt"
        torch.save(content, paths[what])
    paths["code"] = folder / "code.pt"
    with open(paths["code"], "wb") as f:
        pickle.dump({"format": search.FORMAT, "payload": RunsCode(marker)}, f)
    return paths


def test_an_index_that_is_not_intact_is_refused_in_one_line(tmp_path, built, checkpoint):  # noqa: F811
    marker = tmp_path / "ran"
    for what, path in broken_indexes(tmp_path, built[1], marker).items():
        before = fingerprint(str(path))
        result = run(["search.py", "query", "--index", str(path), "--text", "a red circle"], timeout=60)
        refused(result, "--index", str(path), "not a")
        if what in ("truncated", "code"):  # and before any work when indexing over it
            refused(run(index_command(checkpoint, built[0], path), timeout=60), str(path), "not a")
        assert fingerprint(str(path)) == before, what
    assert not marker.exists()


def poisoned_checkpoints(folder, checkpoint, marker) -> dict:  # noqa: F811
    """{what: path} of checkpoints a user might download: cut short, or a sharded folder whose `.metadata` pickle
    would run a command if unpickled."""
    data = open(checkpoint, "rb").read()
    truncated = folder / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    sharded = folder / "run" / "checkpoint"
    sharded.mkdir(parents=True)
    contents = torch.load(checkpoint, weights_only=True)
    meta = {key: value for key, value in contents.items() if key not in ("model", "optimizer")}
    torch.save(meta, sharded / "meta.pt")
    with open(sharded / ".metadata", "wb") as f:
        pickle.dump(RunsCode(marker), f)
    return {"truncated": truncated, "sharded": sharded}


def test_a_checkpoint_that_would_run_code_or_is_cut_short_is_refused(tmp_path, built, checkpoint):  # noqa: F811
    marker = tmp_path / "ran"
    for what, path in poisoned_checkpoints(tmp_path, checkpoint, marker).items():
        index = tmp_path / f"{what}.index.pt"
        refused(run(index_command(str(path), built[0], index), timeout=60), str(path))
        assert not index.exists() and not marker.exists(), what
        # an index whose source names it: `query` loads the model through the same checks
        stored = torch.load(built[1], weights_only=True)
        torch.save({**stored, "source": {"checkpoint": str(path)}}, index)
        refused(run(["search.py", "query", "--index", str(index), "--text", "a red circle"], timeout=60), str(path))
        assert not marker.exists(), what


def write_slow_pictures(folder, count):
    """`count` different 4000x4000 PNGs (~0.2 MB each, ~0.6 s each to decode and resize)."""
    folder.mkdir(parents=True)
    pixels = np.zeros((4000, 4000, 3), np.uint8)
    pixels[:, :, 0] = np.arange(4000)[None, :] % 256
    Image.fromarray(pixels).save(folder / "slow_0.png", compress_level=1)
    for i in range(1, count):
        shutil.copy(folder / "slow_0.png", folder / f"slow_{i}.png")  # copies, not links: each is its own file


def test_sigterm_with_workers_leaves_nothing_running_and_the_index_intact(tmp_path, built, checkpoint):  # noqa: F811
    folder, index = tmp_path / "pictures", tmp_path / "index.pt"
    shutil.copytree(built[0], folder)
    search.main(["index", "--checkpoint", checkpoint, "--images", str(folder), "--index", str(index)])
    write_slow_pictures(folder / "slow", 200)  # ~60 s of work for 2 workers
    before = fingerprint(str(index))
    # 3 s after the walk: the workers are decoding (~60 s of it); run() fails the test if a worker is left
    result = run(index_command(checkpoint, folder, index, "--workers", "2", "--batch-size", "1"),
                 signal_after=("to embed", signal.SIGTERM, 3))
    assert "200 to embed" in result.stdout and "embedded" not in result.stdout, result.stdout  # stopped mid-way
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"search.py: stopped by SIGTERM; {index} is as last saved"
    assert result.stopped_in < 20, f"{result.stopped_in:.1f} s from SIGTERM to exit"
    assert fingerprint(str(index)) == before


# -------------------------------------------------- evaluation: whole splits, bad images, empty classes, data workers


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory, tokenizer_path) -> str:  # noqa: F811
    folder = tmp_path_factory.mktemp("clip")
    train.main(small_run(folder, tokenizer_path, "--train.steps=1"))
    return str(folder / "checkpoint.pt")


@pytest.fixture(scope="module")
def flamingo_checkpoint(tmp_path_factory) -> str:
    """A random Flamingo-tiny (32 px) saved as train.py saves a run."""
    from crossmodal.config import load_config
    from crossmodal.data import build_dataset
    from crossmodal.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
    from crossmodal.recipes import recipe_for

    folder = tmp_path_factory.mktemp("flamingo")
    texts = [build_dataset("shapes_icl:train:300").text_only(i) for i in range(300)]
    tokenizer = SentencePieceTokenizer(train_sentencepiece(texts, folder / "tok", 400, flamingo_tokens=True),
                                       context_length=96)
    cfg = load_config(None, ["--model.name=Flamingo-tiny", "--data.image_size=32", "--data.context_length=96",
                             "--data.tokenizer=sentencepiece", "--data.train=shapes_icl:train"])
    torch.manual_seed(0)
    model = recipe_for(cfg).build_model(tokenizer, pretrained=False)
    path = folder / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(cfg),
                "tokenizer": tokenizer.model_bytes()}, path)
    return str(path)


def test_fewshot_on_a_whole_split(flamingo_checkpoint):
    # shapes_icl:val has as many episodes as images: the pool used to be the images after the queries, none here.
    # The demonstrations now come from the train split; --num-queries keeps the run to seconds.
    result = run(["eval.py", "--checkpoint", flamingo_checkpoint, "--task", "fewshot_vqa", "--data", "shapes_icl:val",
                  "--shots", "0", "2", "--seeds", "1", "--num-queries", "8", "--batch-size", "8"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "0-shot accuracy" in result.stdout and "2-shot accuracy" in result.stdout
    assert "pool_size                2048" in result.stdout


def test_fewshot_on_a_split_too_small_for_its_shots(flamingo_checkpoint):
    result = run(["eval.py", "--checkpoint", flamingo_checkpoint, "--task", "fewshot_vqa", "--data", "shapes:val:3",
                  "--shots", "4", "--seeds", "1"])
    refused(result, "shapes:val:3", "4 demonstrations per query", "holds 2 examples besides the query")


def unreadable_retrieval_set(folder, unreadable_captions: int = 30, total: int = 40) -> str:
    """A csv of `total` captions, `unreadable_captions` of them of one image that cannot be decoded."""
    names = write_images(folder / "images", total - unreadable_captions)
    (folder / "images" / "broken.jpg").write_bytes(b"not an image")
    rows = [f"images/broken.jpg,a broken picture number {i}" for i in range(unreadable_captions)]
    rows += [f"images/{name},a picture number {i}" for i, name in enumerate(names)]
    return "csv:" + write_csv(folder / "pairs.csv", rows)


def test_retrieval_stops_past_max_bad_fraction(tmp_path, clip_checkpoint):
    spec = unreadable_retrieval_set(tmp_path)
    out = tmp_path / "retrieval.json"
    out.write_text('{"previous": "results"}')
    before = fingerprint(str(out))
    result = run(["eval.py", "--checkpoint", clip_checkpoint, "--task", "retrieval", "--data", spec, "--out", str(out)])
    refused(result, spec, "30 of 40 captions with an unreadable image", "data.max_bad_fraction=0.01")
    assert fingerprint(str(out)) == before  # the previous results intact


def test_retrieval_below_max_bad_fraction_counts_the_affected_captions_as_misses(tmp_path, clip_checkpoint):
    spec = unreadable_retrieval_set(tmp_path)
    out = tmp_path / "retrieval.json"
    result = run(["eval.py", "--checkpoint", clip_checkpoint, "--task", "retrieval", "--data", spec, "--out", str(out),
                  "--data.max_bad_fraction=0.8"])
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert (results["bad_images"], results["affected_captions"], results["num_texts"]) == (1, 30, 40)
    assert results["text_to_image_R@10"] <= 25.0  # the 30 captions of the unreadable image are misses
    assert results["image_to_text_R@10"] <= 100.0 * 10 / 11 + 1e-4  # and its own query
    assert "broken.jpg" in result.stderr


def test_an_empty_class_folder_is_not_a_class(tmp_path, clip_checkpoint):
    for folder in ("red_square", "blue_circle"):
        write_images(tmp_path / "classes" / folder, 2, prefix=folder)
    (tmp_path / "classes" / "green_star").mkdir()
    out = tmp_path / "zeroshot.json"
    result = run(["eval.py", "--checkpoint", clip_checkpoint, "--task", "zeroshot", "--data",
                  f"imagefolder:{tmp_path / 'classes'}", "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert (results["num_classes"], results["num_images"], results["empty_class_folders"]) == (2, 4, 1)
    assert results["chance"] == 50.0 and "green_star" in result.stderr


def test_out_left_intact_by_a_bad_value(tmp_path, clip_checkpoint):
    out = tmp_path / "results.json"
    out.write_text('{"previous": "results"}')
    before = fingerprint(str(out))
    result = run(["eval.py", "--checkpoint", clip_checkpoint, "--task", "retrieval", "--data", "shapes:val:8",
                  "--out", str(out), "--batch-size", "0"])
    refused(result, "--batch-size must be at least 1")
    assert fingerprint(str(out)) == before


def test_a_sigkilled_parent_leaves_no_data_worker(tmp_path):
    pids = tmp_path / "workers"
    script = textwrap.dedent(f"""
        import os, time
        from torch.utils.data import Dataset
        from crossmodal.data import _loader

        class Slow(Dataset):
            def __len__(self):
                return 10_000

            def __getitem__(self, index):
                with open({str(pids)!r}, "a") as f:
                    f.write(f"{{os.getpid()}}\\n")
                time.sleep(600)  # busy in a read (a stalled network file system): torch's own check that the
                return index     # parent lives runs only between items

        batches = iter(_loader(Slow(), None, 2, batch_size=1))
        while not os.path.exists({str(pids)!r}) or len(open({str(pids)!r}).read().split()) < 2:
            time.sleep(0.05)
        print("workers busy", flush=True)
        next(batches)
    """)
    result = run(["-c", script], signal_after=("workers busy", signal.SIGKILL))  # run fails if a worker is left
    assert result.returncode == -signal.SIGKILL
    assert pids.exists(), "the workers had not started when the parent was killed"
    assert len(set(pids.read_text().split())) == 2  # both workers had started (and run saw none of them left)
