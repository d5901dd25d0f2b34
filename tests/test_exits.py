"""Every way out of train.py ends the process by itself while data workers are running: the normal end, an
exception, SIGTERM, a non-finite loss, too many bad samples, and an exception on one of 2 processes. Each
run is a subprocess with workers > 0 under a timeout, so a hang fails the test instead of freezing it.

The hang these guard against: data workers ignore SIGTERM (so a preemption still checkpoints), and a loader
iterator that outlived train.main was only stopped at interpreter exit, where multiprocessing SIGTERMs its
daemonic children and then joins them forever."""
import csv
import os
import signal
import subprocess
import sys

import pytest
import torch

from crossmodal.data import build_dataset
from tests.test_train import CONFIG, ROOT, small_run, tokenizer_path  # noqa: F401  (module-scoped fixture)

TIMEOUT = 240  # seconds; a few training steps take well under a minute even on a loaded 2-core machine


def run(command: list[str], timeout: int = TIMEOUT, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True, **kwargs)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"did not end within {timeout} s (hung):\n{out[-2000:]}\n{err[-2000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def train_command(out_dir, tokenizer_path, *extra) -> list[str]:  # noqa: F811
    args = small_run(out_dir, tokenizer_path, "--train.steps=3", *extra)
    args = [arg for arg in args if arg != "--data.workers=0"]
    return [sys.executable, "train.py", *args, "--data.workers=2"]


def patched(patch: str) -> list[str]:
    """python -c: apply `patch` to the train module, then run train.main on the remaining arguments."""
    return [sys.executable, "-c", f"import sys, torch\nfrom crossmodal import train\n{patch}\ntrain.main(sys.argv[1:])"]


@pytest.fixture(scope="module")
def bad_rows_csv(tmp_path_factory) -> str:
    """205 rows: 200 good images and a missing file, a truncated PNG, a text file, an empty caption, non-UTF-8."""
    root = tmp_path_factory.mktemp("bad_rows")
    dataset = build_dataset("shapes:val:200")
    rows = []
    for i in range(200):
        item = dataset[i]
        item["image"].save(root / f"{i}.png")
        rows.append((f"{i}.png", item["caption"]))
    (root / "truncated.png").write_bytes((root / "0.png").read_bytes()[:60])
    (root / "text.png").write_text("not an image")
    rows += [("missing.png", "a red circle"), ("truncated.png", "a blue square"), ("text.png", "a star"),
             ("1.png", "")]
    with open(root / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "caption"])
        writer.writerows(rows)
    with open(root / "pairs.csv", "ab") as f:
        f.write(b"2.png,\xff\xfe not utf-8\n")
    return str(root / "pairs.csv")


def test_bad_rows_run_ends_by_itself(tmp_path, tokenizer_path, bad_rows_csv):  # noqa: F811
    spec = f"csv:{bad_rows_csv}"
    result = run(train_command(tmp_path, tokenizer_path, f"--data.train={spec}", f"--data.val={spec}",
                               "--data.heldout=", "--train.steps=5"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "left out 2 of 205 index rows" in result.stdout and "val/image_to_text_R@1" in result.stdout
    assert "unreadable image (captions count as misses)" in result.stderr


def test_exception_in_the_final_evaluation_ends_the_process(tmp_path, tokenizer_path):  # noqa: F811
    patch = "def fail(*args, **kwargs):\n    raise RuntimeError('evaluation broke')\ntrain.run_evaluation = fail"
    result = run(patched(patch) + train_command(tmp_path, tokenizer_path)[2:])
    assert result.returncode != 0 and "RuntimeError: evaluation broke" in result.stderr


def test_exception_on_one_of_two_processes_ends_both(tmp_path, tokenizer_path):  # noqa: F811
    script = tmp_path / "failing_rank0.py"
    script.write_text(
        "import sys\nfrom crossmodal import distributed, train\n"
        "real = train.run_evaluation\n"
        "def fail_on_rank0(*args, **kwargs):\n"
        "    if distributed.rank() == 0:\n"
        "        raise RuntimeError('evaluation broke on rank 0')\n"
        "    return real(*args, **kwargs)\n"
        "train.run_evaluation = fail_on_rank0\n"
        "train.main(sys.argv[1:])\n"
    )
    args = train_command(tmp_path / "run", tokenizer_path)[2:]
    result = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                  *args])
    assert result.returncode != 0 and "evaluation broke on rank 0" in result.stderr


def test_sigterm_checkpoints_and_ends(tmp_path, tokenizer_path):  # noqa: F811
    command = train_command(tmp_path, tokenizer_path, "--train.steps=400")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        for line in process.stdout:  # wait for the first step, then signal the whole group as a scheduler does
            if line.startswith("step 1/400"):
                os.killpg(process.pid, signal.SIGTERM)
                break
        out = process.communicate(timeout=TIMEOUT)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("did not end within the timeout after SIGTERM")
    assert process.returncode == 0, out[-2000:]
    assert "SIGTERM: saved checkpoint at step" in out
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] >= 1


def test_non_finite_loss_ends_the_process(tmp_path, tokenizer_path):  # noqa: F811
    patch = ("from crossmodal.recipes import ClipRecipe\n"
             "ClipRecipe.loss = lambda *args: torch.tensor(float('nan'), requires_grad=True)")
    result = run(patched(patch) + train_command(tmp_path, tokenizer_path)[2:])
    assert result.returncode != 0 and "non-finite loss nan at step 0" in result.stderr


def test_too_many_bad_samples_ends_the_process(tmp_path, tokenizer_path):  # noqa: F811
    rows = [(f"missing{i}.png", f"caption {i}") for i in range(60)]
    dataset = build_dataset("shapes:val:4")
    for i in range(4):
        dataset[i]["image"].save(tmp_path / f"{i}.png")
        rows.append((f"{i}.png", dataset[i]["caption"]))
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        csv.writer(f).writerows([("filepath", "caption"), *rows])
    result = run(train_command(tmp_path / "run", tokenizer_path, f"--data.train=csv:{tmp_path / 'pairs.csv'}",
                               "--train.steps=20"))
    assert result.returncode != 0 and "too many bad samples at step" in result.stderr


def test_a_live_worker_iterator_does_not_hold_up_interpreter_exit(tmp_path):
    # the safety net behind train.py's explicit shutdown: an error escapes while a multi-worker loader is mid-epoch
    script = (
        "from crossmodal.data import eval_loader\n"
        "from crossmodal.data.tokenizer import SentencePieceTokenizer\n"
        "_, loader = eval_loader('shapes:val:256', 64, lambda texts: None, batch_size=8, workers=2)\n"
        "batches = iter(loader)\n"
        "next(batches)\n"
        "raise RuntimeError('stopped mid-epoch')\n"
    )
    result = run([sys.executable, "-c", script], timeout=120)  # a hang fails here
    assert result.returncode != 0 and "stopped mid-epoch" in result.stderr


def test_unreadable_evaluation_set_fails_at_start_up(tmp_path, tokenizer_path):  # noqa: F811
    annotations = {"images": [{"id": i, "file_name": f"gone{i}.jpg"} for i in range(20)],
                   "annotations": [{"image_id": i, "id": i, "caption": f"caption {i}"} for i in range(20)]}
    import json

    (tmp_path / "captions.json").write_text(json.dumps(annotations))
    result = run(train_command(tmp_path / "run", tokenizer_path, f"--data.val=coco:{tmp_path / 'captions.json'}"))
    assert result.returncode != 0
    assert "data.val: 16 of its first 16 samples cannot be read" in result.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoint.pt")  # failed before training
