"""Bad configuration values and ablation grids through the real entry points (train.py, ablate.py): each is one
line on stderr and exit status 2 before any work (no out_dir, no tables), and a SIGKILLed ablate.py leaves no
train.py running. Merged into tests/test_bad_inputs.py."""
import os
import signal

import pytest
import yaml

from tests.bad_inputs import refused, run
from tests.test_train import CONFIG, tokenizer_path  # noqa: F401 (the fixture)


def train(tmp_path, *overrides: str, config: str = CONFIG):
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
    refused(train(tmp_path, *override.split()), "config error: ", *texts)
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("text, texts", [
    ("train:\n  lr: [1e-3, 2e-3\n", ("not valid YAML at line 3, column 1", "(while parsing a flow sequence at line 2")),
    ("- model.name: ViT-tiny\n", ("expected a mapping of config keys at the top level, got list",)),
    ("train: 5\n", ("config key 'train'", "is a section: expected a mapping of its keys, got int 5")),
])
def test_train_refuses_a_broken_config_file(tmp_path, text, texts):
    config = tmp_path / "broken.yaml"
    config.write_text(text)
    refused(train(tmp_path, config=str(config)), "config error: ", str(config), *texts)
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
                    signal_after=(8, signal.SIGKILL))
    assert result.returncode == -signal.SIGKILL
    cell = tmp_path / "runs" / "grid" / "seed=0"
    assert (cell / "stderr.txt").exists()  # the child was started
    assert not (cell / "cell.json").exists()
