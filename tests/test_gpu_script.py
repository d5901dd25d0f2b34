"""benchmarks/gpu.sh, the GPU figures script, without a GPU: it says in one line that it needs one and exits with
status 2, writing nothing; and what it runs there exists here: each benchmark script with the options and choices
it passes, and each train.py override as a config key."""
import os
import re
import shlex
import subprocess
import sys

from crossmodal.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu.sh")


def commands(program: str) -> list[list[str]]:
    """The words after each `program` in gpu.sh (a command continued over lines read as one)."""
    with open(SCRIPT) as f:
        text = re.sub(r"\s*\\\n\s*", " ", f.read())
    found = []
    for line in text.splitlines():
        if line.lstrip().startswith("#") or program not in line:
            continue
        words = shlex.split(line.split(program, 1)[1], comments=True)
        found.append(words)
    return found


def test_syntax():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_without_a_gpu_it_says_so_in_one_line_and_writes_nothing():
    docs = os.path.join(ROOT, "docs")
    before = sorted(os.listdir(docs))
    gpu_md = os.path.join(docs, "gpu.md")
    content = open(gpu_md, "rb").read() if os.path.exists(gpu_md) else None
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a machine that has one
    result = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env=env, timeout=60)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 2, output
    assert len(output.splitlines()) == 1, output
    assert "needs a CUDA GPU" in output and "Traceback" not in output
    assert sorted(os.listdir(docs)) == before  # no docs/gpu.md, no temporary file left beside it
    if content is not None:
        assert open(gpu_md, "rb").read() == content


def usage_options(script: str) -> dict[str, set[str] | None]:
    """--option -> its choices (None: any value), read from the usage line of `python SCRIPT --help`."""
    result = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    usage = " ".join(result.stdout.split("\n\n", 1)[0].split())
    return {option: set(choices.split(",")) if choices else None
            for option, choices in re.findall(r"\[(--[\w-]+)(?: \{([^}]*)\})?", usage)}


def test_every_benchmark_and_option_it_names_exists():
    invocations = commands("python3 benchmarks/")
    scripts = {words[0] for words in invocations}
    assert {"bench_loss.py", "bench_train.py", "bench_blip.py", "bench_flamingo.py"} <= scripts
    options = {script: usage_options(os.path.join("benchmarks", script)) for script in scripts}
    for script, *args in invocations:
        for i, arg in enumerate(args):
            if not arg.startswith("--"):
                continue
            assert arg in options[script], f"benchmarks/{script} has no {arg}"
            choices = options[script][arg]
            if choices is not None:
                assert args[i + 1] in choices, f"benchmarks/{script} {arg}: {args[i + 1]} is not one of {choices}"


def test_every_train_override_is_a_config_key(tmp_path):
    runs = [[word.replace("$runs", str(tmp_path)) for word in words] for words in commands(" train.py --config ")]
    configs = {words[0] for words in runs}
    assert configs == {f"configs/{family}/tiny_shapes.yaml" for family in ("clip", "blip", "lm", "flamingo")}
    for config, *overrides in runs:  # the four demo configs and the FSDP run, each on the GPU
        assert "--device=cuda" in overrides, overrides
        load_config(os.path.join(ROOT, config), overrides)  # an unknown key or a wrong type raises ConfigError
    assert len(runs) == 5
