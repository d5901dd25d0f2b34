"""Scaling out on CPU gloo processes: FSDP trains what one process trains (also with exact accumulation and
activation checkpointing), its checkpoint folder resumes on 1 and on 4 processes and survives a crash mid-save,
eval.py reads it, torchrun's restart after a SIGKILLed worker ends in the uninterrupted run's weights, and 2
"nodes" under c10d rendezvous equal 1 node of 2 processes. Tiny ViT, 16 samples a step, 4 steps."""
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch

from crossmodal import checkpointing, recipes
from crossmodal import train
from tests.test_train import ROOT, small_run, tokenizer_path  # noqa: F401  (module-scoped fixture)

COMMON = ["--train.lr=1e-3", "--model.name=ViT-tiny", "--data.heldout=", "--train.ckpt_every=2"]
TIMEOUT = 300


def torchrun(out_dir, tokenizer_path, *extra, launcher=("--standalone", "--nproc_per_node=2"),  # noqa: F811
             script="train.py", wait=True):
    command = [sys.executable, "-m", "torch.distributed.run", *launcher, os.path.join(ROOT, script),
               *small_run(out_dir, tokenizer_path, *COMMON, *extra)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    return finish(process) if wait else process


def finish(process) -> str:
    try:
        out = process.communicate(timeout=TIMEOUT)[0]
    except subprocess.TimeoutExpired:  # e.g. a restarted group that never forms: stop torchrun and its workers
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"torchrun did not end within {TIMEOUT} s:\n{process.communicate()[0][-3000:]}")
    assert process.returncode == 0, out[-3000:]
    return out


def weights(path) -> dict:
    """A run's model weights, from its checkpoint file or folder, loaded as eval.py does (one process)."""
    from crossmodal import eval as evaluation

    return recipes.load_run(checkpointing.find(str(path)))[1].state_dict()


def assert_same(got: dict, expected: dict, what: str, rtol=1e-4, atol=1e-5) -> None:
    assert got.keys() == expected.keys()
    for name, weight in expected.items():
        torch.testing.assert_close(got[name], weight, rtol=rtol, atol=atol, msg=f"{what}: {name}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_path):  # noqa: F811
    """One process (plain DDP strategy, a file) and FSDP on 2 processes (a folder), 4 steps each."""
    root = tmp_path_factory.mktemp("runs")
    train.main(small_run(root / "one", tokenizer_path, *COMMON, "--train.steps=4"))
    torchrun(root / "fsdp", tokenizer_path, "--train.steps=4", "--train.strategy=fsdp")
    return root


def test_fsdp_on_two_processes_trains_what_one_process_trains(runs):
    assert os.path.isfile(runs / "fsdp" / "checkpoint" / "meta.pt")
    assert not os.path.exists(runs / "fsdp" / "checkpoint.pt")
    assert_same(weights(runs / "fsdp"), weights(runs / "one"), "FSDP on 2 processes")


def test_fsdp_with_exact_accumulation_and_activation_checkpointing(runs, tokenizer_path):  # noqa: F811
    torchrun(runs / "accum", tokenizer_path, "--train.steps=4", "--train.strategy=fsdp", "--train.accum_steps=2",
             "--model.grad_checkpointing=true")
    assert_same(weights(runs / "accum"), weights(runs / "one"), "FSDP, 2 processes x 2 micro-batches")


def test_fsdp_bf16_with_cpu_offload_trains(runs, tokenizer_path):  # noqa: F811
    out = torchrun(runs / "bf16", tokenizer_path, "--train.steps=2", "--train.strategy=fsdp",
                   "--train.precision=bf16", "--train.fsdp_cpu_offload=true")
    assert len([line for line in out.splitlines() if line.startswith("step ")]) == 2
    trained = weights(runs / "bf16")
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in trained.values())  # fp32 master weights


def test_a_folder_saved_on_two_processes_resumes_on_one_and_on_four(runs, tokenizer_path):  # noqa: F811
    # warmup_steps=2: the first 2 steps' learning rates do not depend on train.steps, so 2 steps then 2 more = 4
    torchrun(runs / "half", tokenizer_path, "--train.steps=2", "--train.strategy=fsdp")
    for name in ("on_one", "on_four", "on_ddp"):
        shutil.copytree(runs / "half", runs / name)
    train.main(["--resume", f"--out_dir={runs / 'on_one'}", "--train.steps=4", "--data.workers=0"])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                          "train.py", "--resume", f"--out_dir={runs / 'on_four'}", "--train.steps=4", "--data.workers=0"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0 and "resumed from step 2" in out.stdout, out.stderr[-3000:]
    # DDP on 2 processes reads the folder too (and then writes its own checkpoint.pt, the newer, found first)
    out = torchrun(runs / "on_ddp", tokenizer_path, "--resume", f"--out_dir={runs / 'on_ddp'}", "--train.steps=4",
                   "--train.strategy=ddp")
    assert "resumed from step 2" in out and checkpointing.find(str(runs / "on_ddp")).endswith("checkpoint.pt")
    for name in ("on_one", "on_four", "on_ddp"):
        assert_same(weights(runs / name), weights(runs / "fsdp"), f"resumed {name}")


def test_eval_reads_the_folder(runs, tmp_path):
    import json

    from crossmodal import eval as evaluation

    for run in ("fsdp/checkpoint", "one/checkpoint.pt"):  # a folder or a file, the same command
        evaluation.main(["--checkpoint", str(runs / run), "--task", "zeroshot", "--data", "shapes:val:32",
                         "--out", str(tmp_path / "zeroshot.json")])
        results = json.loads((tmp_path / "zeroshot.json").read_text())
        assert results["checkpoint"] == str(runs / run) and results["num_images"] == 32


def test_a_crash_mid_save_leaves_the_previous_checkpoint(tmp_path, tokenizer_path, monkeypatch):  # noqa: F811
    run = small_run(tmp_path, tokenizer_path, *COMMON, "--train.strategy=fsdp")  # one process: a folder all the same
    train.main([*run, "--train.steps=2"])
    real_save = checkpointing.dcp.save

    def save_then_crash(state, checkpoint_id, **kwargs):
        real_save(state, checkpoint_id=checkpoint_id, **kwargs)  # the shards are written, meta.pt and the swap not
        raise OSError("disk full")

    monkeypatch.setattr(checkpointing.dcp, "save", save_then_crash)
    with pytest.raises(OSError, match="disk full"):
        train.main(["--resume", f"--out_dir={tmp_path}", "--train.steps=4", "--data.workers=0"])
    assert os.path.isdir(tmp_path / "checkpoint.tmp")
    assert checkpointing.find(str(tmp_path)) == str(tmp_path / "checkpoint")
    assert checkpointing.read(str(tmp_path / "checkpoint"))["step"] == 2
    # a crash between the swap's two renames: only checkpoint.old is complete, and it is found
    os.rename(tmp_path / "checkpoint", tmp_path / "checkpoint.old")
    assert checkpointing.find(str(tmp_path)) == str(tmp_path / "checkpoint.old")
    monkeypatch.setattr(checkpointing.dcp, "save", real_save)
    train.main(["--resume", f"--out_dir={tmp_path}", "--train.steps=4", "--data.workers=0"])
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("checkpoint")) == ["checkpoint"]
    assert checkpointing.read(str(tmp_path / "checkpoint"))["step"] == 4


KILL_RANK1 = """import os, signal, sys
from crossmodal import distributed, train
from crossmodal.recipes import ClipRecipe
real_step, steps = ClipRecipe.train_step, []
def step_then_die(*args, **kwargs):
    losses = real_step(*args, **kwargs)
    steps.append(1)
    if len(steps) == 3 and distributed.rank() == 1 and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        os.kill(os.getpid(), signal.SIGKILL)  # mid-run, after the checkpoint of step 2
    return losses
ClipRecipe.train_step = step_then_die
train.main(sys.argv[1:])
"""


def test_torchrun_restarts_a_killed_worker_and_the_run_ends_as_if_uninterrupted(runs, tokenizer_path, tmp_path):  # noqa: F811
    script = tmp_path / "kill_rank1.py"
    script.write_text(KILL_RANK1)
    out = torchrun(runs / "restarted", tokenizer_path, "--train.steps=4", "--train.strategy=fsdp", "--data.workers=2",
                   "--resume", "auto", launcher=("--standalone", "--nproc_per_node=2", "--max-restarts=1"),
                   script=str(script))
    assert "no checkpoint at" in out and "resumed from step 2" in out and "exitcode: -9" in out
    assert_same(weights(runs / "restarted"), weights(runs / "fsdp"), "restarted", rtol=1e-6, atol=1e-7)


def test_two_nodes_of_one_process_equal_one_node_of_two(runs, tokenizer_path):  # noqa: F811
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = ("--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                "--rdzv_id=test_two_nodes")
    nodes = [torchrun(runs / "nodes", tokenizer_path, "--train.steps=4", "--train.strategy=fsdp", launcher=launcher,
                      wait=False) for _ in range(2)]
    for node in nodes:
        finish(node)
    assert_same(weights(runs / "nodes"), weights(runs / "fsdp"), "2 nodes", rtol=1e-6, atol=1e-7)


def test_fsdp_refuses_blip_fp16_and_a_file_checkpoint(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; the check comes before the process group
    with pytest.raises(SystemExit, match="is one file, which FSDP does not load; resume it with --train.strategy=ddp"):
        train.main(["--resume", f"--out_dir={runs / 'one'}", "--train.strategy=fsdp"])
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(SystemExit, match="train.strategy=fsdp shards CLIP-family models"):
        train.main(["--out_dir", str(tmp_path), "--model.name=BLIP-tiny", "--train.strategy=fsdp", "--data.val=",
                    "--data.heldout=", "--data.tokenizer=sentencepiece"])
    with pytest.raises(SystemExit, match="train.strategy must be one of ddp, fsdp"):
        train.main(["--out_dir", str(tmp_path), "--train.strategy=zero3"])
