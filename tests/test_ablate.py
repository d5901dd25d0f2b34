"""ablate.py: the dry run lists a config's cells and commands; a real sweep on a tiny grid writes its tables,
continues after being stopped without re-running a finished cell, records a failing cell and goes on, and
a cell's recorded command reproduces its metrics exactly."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import yaml

from tests.test_train import CONFIG, ROOT, tokenizer_path  # noqa: F401 (the fixture)


def ablate(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "ablate.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, **kwargs)


def test_dry_run_lists_the_cells_and_their_commands(tmp_path):
    result = ablate("configs/ablations/temperature.yaml", "--dry-run", "--runs-dir", tmp_path / "runs",
                    "--tables-dir", tmp_path / "tables")
    assert result.returncode == 0, result.stderr
    commands = [line.strip() for line in result.stdout.splitlines() if line.startswith("  ")]
    assert len(commands) == 15  # 5 temperature settings x 3 seeds
    for seed in (0, 1, 2):
        assert sum(f"--seed={seed}" in command for command in commands) == 5
    assert all(c.startswith("torchrun --standalone --nproc_per_node 2 train.py --config configs/clip/tiny_shapes.yaml")
               and f"--out_dir={tmp_path / 'runs' / 'temperature'}" in c for c in commands)
    assert sum("--train.learn_temperature=false" in c for c in commands) == 12
    assert "will fail" not in result.stdout  # every override is a valid config key
    assert "temperature: 15 cells (0 recorded)" in result.stdout
    assert not os.path.exists(tmp_path / "runs") and not os.path.exists(tmp_path / "tables")


def test_sweep_stops_continues_records_failures_and_reproduces(tmp_path, tokenizer_path):  # noqa: F811
    spec_path, runs, tables = tmp_path / "tiny.yaml", tmp_path / "runs", tmp_path / "tables"
    spec = {
        "base": CONFIG,
        "overrides": {"data.tokenizer_path": tokenizer_path, "data.workers": 0, "data.val": "shapes:val:32",
                      "data.heldout": "shapes:heldout:32", "train.batch_size": 8, "train.steps": 3,
                      "train.warmup_steps": 1, "train.log_every": 1, "model.name": "ViT-tiny"},
        "cells": [{"loss.name": "clip"}, {"loss.name": "siglip"}, {"train.precision": "fp8"}],
        "seeds": [0],
        "metrics": ["val/top1", "heldout/top1", "ret/image_to_text_R@1"],
        "evals": [{"name": "ret", "task": "retrieval", "data": "shapes:heldout:32"}],
        "plot": {"x": "loss.name", "y": "val/top1"},
        "paper": "the paper says this",
    }
    spec_path.write_text(yaml.safe_dump(spec))
    args = [spec_path, "--runs-dir", runs, "--tables-dir", tables]
    first_record = runs / "tiny" / "loss.name=clip,seed=0" / "cell.json"

    # stop the sweep (SIGTERM, as a scheduler would) once the first cell is recorded and the second started
    sweep = subprocess.Popen([sys.executable, "ablate.py", *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    second_started = runs / "tiny" / "loss.name=siglip,seed=0" / "stdout.txt"
    while not (first_record.exists() and second_started.exists()) and sweep.poll() is None:
        time.sleep(0.05)
    sweep.send_signal(signal.SIGTERM)
    output = sweep.communicate(timeout=300)[0]
    assert sweep.returncode == 1, output
    assert "stopped during loss.name=siglip seed=0 (not recorded)" in output
    first_mtime = os.path.getmtime(first_record)
    entries = json.loads((tables / "tiny.json").read_text())
    assert [e["overrides"] for e in entries] == [{"loss.name": "clip"}]

    # start it again: the finished cell is skipped, the rest run, the failing cell is recorded
    result = ablate(*args, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 cells, 1 recorded, 2 to run" in result.stdout
    assert "FAILED: `python train.py` exited with 2: config error: train.precision must be one of" in result.stdout
    assert os.path.getmtime(first_record) == first_mtime
    entries = json.loads((tables / "tiny.json").read_text())
    assert [e["status"] for e in entries] == ["ok", "ok", "failed"]
    assert "train.precision must be one of fp32, bf16, fp16; got 'fp8'" in entries[2]["error"]
    for entry in entries:
        assert f"--out_dir={runs / 'tiny'}" in entry["command"] and "--seed=0" in entry["command"]
    assert entries[0]["metrics"]["step"] == 3 and "val/top1" in entries[0]["metrics"]
    assert "image_to_text_R@1" in entries[0]["evals"]["ret"]
    table = (tables / "tiny.md").read_text()
    assert table.splitlines()[2] == "**Paper.** the paper says this"
    assert "| siglip |  | 1/1 |" in table and "|  | fp8 | 0/1 (1 failed) | - | - | - | - |" in table
    assert table.rstrip().endswith("**Findings.** not yet written")
    assert all(entry["command"] in table for entry in entries)
    assert (tables / "tiny.png").exists() == (importlib.util.find_spec("matplotlib") is not None)

    # a finished sweep runs nothing
    result = ablate(*args, timeout=120)
    assert "3 cells, 3 recorded, 0 to run" in result.stdout
    assert os.path.getmtime(first_record) == first_mtime

    # the recorded command, run by hand into another folder, reproduces the metrics exactly
    again = tmp_path / "again"
    command = entries[0]["command"].replace(entries[0]["run_dir"], str(again))
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    subprocess.run(command, shell=True, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    with open(again / "eval.jsonl") as f:
        assert json.loads(f.readlines()[-1]) == entries[0]["metrics"]
    with open(again / "eval_ret.json") as f:
        assert json.load(f)["image_to_text_R@1"] == entries[0]["evals"]["ret"]["image_to_text_R@1"]


def test_plot_lines_follow_one_or_several_series_keys():
    from crossmodal import ablate

    cells = [{"overrides": overrides, "run_dir": f"run{i}"} for i, overrides in enumerate([
        {"model.name": "RN-tiny", "train.steps": 600},
        {"model.name": "ViT-tiny", "train.steps": 300},
        {"model.name": "ViT-tiny", "train.steps": 600},
        {"model.name": "ViT-tiny", "model.vit_stem": "conv", "train.steps": 600},
    ])]
    records = {f"run{i}": {"status": "ok", "metrics": {"val/top1": float(i)}} for i in range(4)}
    spec = {"metrics": ["val/top1"], "plot": {"x": "train.steps", "series": ["model.name", "model.vit_stem"]}}
    assert ablate.plot_lines(spec, cells, records) == {
        "model.name=RN-tiny": [(600, [0.0])],
        "model.name=ViT-tiny": [(300, [1.0]), (600, [2.0])],
        "model.name=ViT-tiny, model.vit_stem=conv": [(600, [3.0])],
    }
    spec["plot"]["series"] = "model.name"  # one key: the conv cell joins the ViT-tiny line
    assert [len(points) for points in ablate.plot_lines(spec, cells, records).values()] == [1, 3]


def test_grid_fields_of_the_wrong_type_are_refused_naming_the_key(tmp_path):
    import pytest

    from crossmodal import ablate
    from crossmodal.config import BadInput

    for grid, message in [
        ("seeds: 5", r"seeds must be a non-empty list of integers .*got 5"),
        ("seeds: []", r"seeds must be a non-empty list"),
        ("seeds: [0, true]", r"seeds must be .*got \[0, True\]"),
        ("seeds: [-1]", r"seeds must be a non-empty list of integers in \[0, 4294967295\]"),
        ("processes: true", r"processes \(processes per run\) must be an integer >= 1; got True"),
        ("axes: {processes: [1, 0]}", r"axis 'processes' \(processes per run\) must be an integer >= 1; got 0"),
        ("metrics: val/top1", r"metrics must be a non-empty list of strings; got 'val/top1'"),
        ("evals: {name: ret}", r"'evals' must be a list of mappings"),
        ("evals: [{name: ret, task: retrieval, args: --k-test 8}]", r"evals\[0\]\.args must be a list"),
        ("plot: {y: val/top1}", r"plot needs 'x'"),
        ("plot: {x: train.steps, series: [1, 2]}", r"plot\.series must be a string or a non-empty list of strings"),
        ("plot: {x: train.steps, xscale: logarithmic}", r"plot\.xscale must be one of linear, log, symlog, logit"),
        ("base: configs/clip/nothing.yaml", r"base: no file at 'configs/clip/nothing\.yaml'"),
    ]:
        path = tmp_path / "grid.yaml"
        path.write_text(f"base: {CONFIG}\n{grid}\n" if not grid.startswith("base:") else grid + "\n")
        with pytest.raises(BadInput, match=message):
            ablate.load_spec(str(path))
