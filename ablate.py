"""Run an ablation grid with train.py (and eval.py) and write its tables: one command per ablation.

    python ablate.py configs/ablations/batch_loss.yaml              # run what is not finished, write tables
    python ablate.py configs/ablations/batch_loss.yaml --dry-run    # list the cells and their commands
    python ablate.py configs/ablations/local_loss.yaml --nproc 2 --runs-dir /tmp/runs --tables-dir /tmp/tables

An ablation file (configs/ablations/NAME.yaml) opens with a comment (what it measures, the command, the
estimated wall time, what the paper found) and holds:

    base: configs/clip/tiny_shapes.yaml     # the train.py config every cell starts from (required)
    overrides: {train.steps: 300}           # dotted train.py overrides for every cell
    axes: {loss.name: [clip, siglip], train.batch_size: [32, 128, 512]}   # the product of the axes,
    cells: [{model.name: ViT-tiny}, {model.name: RN-tiny, train.steps: 200}]   # a list of cells, or both:
                                            # then every point of the axes with every cell
    seeds: [0, 1, 2]                        # every cell runs once per seed, as `--seed=S` (a list of integers,
                                            # also for one seed: [5])
    processes: 1                            # processes per run, >= 1 (> 1: torchrun); `--nproc` overrides it,
                                            # a cell or axis key `processes` overrides both
    metrics: [val/top1, heldout/top1]       # table columns: keys of eval.jsonl's last line, or EVAL/KEY
    evals: [{name: ret, task: retrieval, data: shapes:heldout}]   # extra eval.py runs after training
    plot: {x: train.batch_size, y: val/top1, series: loss.name, xscale: log, xlabel: global batch}
    paper: what the paper found (opens the table)
    findings: what the runs show, written after looking at them (closes the table)

A cell is one set of overrides and one seed; it runs in RUNS_DIR/NAME/KEY=VALUE,...,seed=S/ (default
RUNS_DIR: runs/ablations), which keeps train.py's output, the logs (stdout.txt, stderr.txt) and the
cell's record (cell.json: command, metrics, wall time, commit). A cell is finished when its record says
so and its command is unchanged: finished cells are skipped, so a killed sweep continues where it stopped
(an interrupted cell starts again from scratch) and a finished one runs nothing. A cell that fails (its
command exits non-zero, or train.py stops before its last step) is recorded with the tail of its stderr,
marked in the table and, unless `--retry-failed`, not run again; the sweep goes on. SIGTERM or Ctrl-C
stops the running cell (train.py checkpoints and exits) and the sweep, recording nothing for that cell; a
runner killed outright (SIGKILL) takes its running train.py with it (the kernel sends it SIGTERM).

The file is checked before anything runs: a YAML syntax error (with its line), an unknown key, a value of the
wrong type, and every cell's train.py overrides (config.py's checks: keys, types, ranges) are one line and exit
status 2.

Outputs, rewritten after every cell, in TABLES_DIR (default docs/tables): NAME.md (paper, mean +- std over
seeds per cell, failures, every command, wall time, commit, findings), NAME.json (a list of cells:
overrides, seed, command, metrics = the last line of the run's eval.jsonl as train.py writes it, ...) and,
when matplotlib is installed and the file asks for one, NAME.png. Plot x values are numbers, or the
number after the last ':' of a string (`shapes:train:4000` -> 4000), else categories. plot.series is a key or a
list of keys: one line per combination of their values (`series: [model.name, model.vit_stem]`).

Commands are recorded as shell lines run from the repository root (`python train.py ...`, `torchrun
--standalone --nproc_per_node P train.py ...`); the runner starts `python` and `torchrun` as this
interpreter (`sys.executable`, `-m torch.distributed.run`).
"""
import argparse
import difflib
import functools
import itertools
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

import yaml

from crossmodal.config import RANGES, BadInput, ConfigError, fail, load_config, read_yaml
from crossmodal.files import end_with_parent, write_atomic

ROOT = os.path.dirname(os.path.abspath(__file__))
SPEC_KEYS = ("base", "overrides", "axes", "cells", "seeds", "processes", "metrics", "evals", "plot", "paper",
             "findings")
PLOT_KEYS = ("x", "y", "series", "xscale", "xlabel", "ylabel")
XSCALES = ("linear", "log", "symlog", "logit")  # matplotlib's
DEFAULT_METRICS = ["val/top1", "heldout/top1"]
RECORD = "cell.json"


class SpecError(BadInput):
    """An ablation file that cannot be run (unknown key, bad value), named with its path."""


def _check_keys(tree: dict, allowed: tuple, where: str) -> None:
    for key in tree:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=2, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(allowed)}"
            raise SpecError(f"{where}: unknown key '{key}'{hint}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_processes(value, where: str) -> None:
    if not _is_int(value) or value < 1:
        raise SpecError(f"{where} (processes per run) must be an integer >= 1; got {value!r}")


def _check_strings(value, where: str, single: bool = False) -> None:
    """A non-empty list of strings (or, with `single`, also one string)."""
    if single and isinstance(value, str):
        return
    if not isinstance(value, list) or not value or not all(isinstance(item, str) for item in value):
        raise SpecError(f"{where} must be a{' string or a' if single else ''} non-empty list of strings; "
                        f"got {value!r}")


def load_spec(path: str) -> dict:
    """Read and check an ablation file; returns it with defaults filled in and `name` set."""
    spec = read_yaml(path) or {}
    if not isinstance(spec, dict):
        raise SpecError(f"{path}: expected a mapping at the top level, got {type(spec).__name__}")
    _check_keys(spec, SPEC_KEYS, path)
    if not isinstance(spec.get("base"), str) or not spec["base"]:
        raise SpecError(f"{path}: 'base' (the train.py config the cells start from) is required")
    if not os.path.isfile(os.path.join(ROOT, spec["base"])):
        raise SpecError(f"{path}: base: no file at '{spec['base']}'")
    for key in ("overrides", "axes", "plot"):
        if not isinstance(spec.get(key, {}), dict):
            raise SpecError(f"{path}: '{key}' must be a mapping")
    for key, values in spec.get("axes", {}).items():
        if not isinstance(values, list) or not values:
            raise SpecError(f"{path}: axis '{key}' must be a non-empty list of values")
        for value in values if key == "processes" else ():
            _check_processes(value, f"{path}: axis 'processes'")
    cells = spec.get("cells", [{}])
    if not isinstance(cells, list) or not all(isinstance(cell, dict) for cell in cells):
        raise SpecError(f"{path}: 'cells' must be a list of mappings of overrides")
    for i, cell in enumerate(cells):
        if "processes" in cell:
            _check_processes(cell["processes"], f"{path}: cells[{i}].processes")
    seeds = spec.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(_is_int(seed) and seed in RANGES["seed"] for seed in seeds):
        raise SpecError(f"{path}: seeds must be a non-empty list of integers {RANGES['seed']}, e.g. [0, 1, 2] (one "
                        f"run of every cell per seed; five seeds: [0, 1, 2, 3, 4]); got {seeds!r}")
    _check_processes(spec.get("processes", 1), f"{path}: processes")
    _check_strings(spec.get("metrics", DEFAULT_METRICS), f"{path}: metrics")
    plot = spec.get("plot", {})
    _check_keys(plot, PLOT_KEYS, f"{path}: plot")
    if plot and not isinstance(plot.get("x"), str):
        raise SpecError(f"{path}: plot needs 'x', the key its x axis shows (e.g. train.batch_size)")
    for key in ("y", "xscale", "xlabel", "ylabel"):
        if not isinstance(plot.get(key, ""), str):
            raise SpecError(f"{path}: plot.{key} must be a string; got {plot[key]!r}")
    if "series" in plot:
        _check_strings(plot["series"], f"{path}: plot.series", single=True)
    if plot.get("xscale", "linear") not in XSCALES:
        raise SpecError(f"{path}: plot.xscale must be one of {', '.join(XSCALES)}; got {plot['xscale']!r}")
    evals = spec.get("evals", [])
    if not isinstance(evals, list):
        raise SpecError(f"{path}: 'evals' must be a list of mappings (name, task, data, args)")
    for i, entry in enumerate(evals):
        if not isinstance(entry, dict) or not {"name", "task"} <= set(entry):
            raise SpecError(f"{path}: evals[{i}] needs at least 'name' and 'task' (and usually 'data')")
        _check_keys(entry, ("name", "task", "data", "args"), f"{path}: evals[{i}]")
        for key in ("name", "task", "data"):
            if not isinstance(entry.get(key, ""), str):
                raise SpecError(f"{path}: evals[{i}].{key} must be a string; got {entry[key]!r}")
        if not isinstance(entry.get("args", []), list):
            raise SpecError(f"{path}: evals[{i}].args must be a list of eval.py arguments; got {entry['args']!r}")
    spec.setdefault("overrides", {})
    spec.setdefault("seeds", [0])
    spec.setdefault("processes", 1)
    spec.setdefault("metrics", list(DEFAULT_METRICS))
    spec.setdefault("evals", [])
    spec["name"] = os.path.splitext(os.path.basename(path))[0]
    spec["path"] = path
    return spec


def _arg(value) -> str:
    """A YAML value as train.py's command line reads it back (config.py parses values as YAML scalars)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _slug(overrides: dict, seed: int) -> str:
    parts = [f"{key}={_arg(value)}" for key, value in overrides.items()] + [f"seed={seed}"]
    return re.sub(r"[^A-Za-z0-9._=,+-]", "-", ",".join(parts))


def expand_cells(spec: dict, runs_dir: str, nproc: int | None = None) -> list[dict]:
    """Every (overrides, seed) of the grid, with its run folder and command line."""
    axes = spec.get("axes", {})
    points = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    grid = [{**point, **cell} for point in points for cell in spec.get("cells", [{}])]
    base = spec["base"]
    cells, seen = [], set()
    for own in grid:
        own = dict(own)  # the cell's own keys, which name it; `processes` among them if the cell sets it
        processes = int(own.get("processes", nproc or spec["processes"]))
        overrides = {**spec["overrides"], **{k: v for k, v in own.items() if k != "processes"}}
        for seed in spec["seeds"]:
            run_dir = os.path.join(runs_dir, spec["name"], _slug(own, seed))
            if run_dir in seen:
                raise SpecError(f"{spec['path']}: two cells share the run folder '{run_dir}'")
            seen.add(run_dir)
            launcher = ["python"] if processes == 1 else ["torchrun", "--standalone", "--nproc_per_node",
                                                           str(processes)]
            train = [*launcher, "train.py", "--config", base, f"--out_dir={run_dir}", f"--seed={seed}"]
            steps = [train + [f"--{key}={_arg(value)}" for key, value in overrides.items()]]
            for entry in spec["evals"]:
                steps.append(["python", "eval.py", "--checkpoint", os.path.join(run_dir, "checkpoint.pt"),
                              "--task", entry["task"], *(["--data", entry["data"]] if "data" in entry else []),
                              *[str(a) for a in entry.get("args", [])],
                              "--out", os.path.join(run_dir, f"eval_{entry['name']}.json")])
            cells.append({"overrides": own, "seed": seed, "processes": processes, "run_dir": run_dir,
                          "steps": steps, "eval_names": [entry["name"] for entry in spec["evals"]],
                          "command": " && ".join(shlex.join(step) for step in steps)})
    return cells


def _executable(argv: list[str]) -> list[str]:
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    if argv[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    return argv


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def read_record(cell: dict) -> dict | None:
    path = os.path.join(cell["run_dir"], RECORD)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, value) -> None:
    write_atomic(path, json.dumps(value, indent=2) + "\n")


def _tail(path: str, lines: int = 15) -> str:
    if not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:]).strip()


def _final_metrics(run_dir: str) -> tuple[dict | None, str | None]:
    """The last line of eval.jsonl if it is the last step's evaluation, else why not."""
    path = os.path.join(run_dir, "eval.jsonl")
    if not os.path.exists(path):
        return None, "train.py wrote no eval.jsonl"
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    if not lines:
        return None, "eval.jsonl is empty"
    metrics = json.loads(lines[-1])
    if not os.path.exists(os.path.join(run_dir, "config.yaml")):
        return None, "train.py wrote no config.yaml"
    with open(os.path.join(run_dir, "config.yaml")) as f:
        steps = yaml.safe_load(f)["train"]["steps"]
    if metrics.get("step") != steps:
        return None, f"the last evaluation is at step {metrics.get('step')}, not at train.steps={steps}"
    return metrics, None


class Stopped(Exception):
    """The runner was asked to stop (SIGTERM, Ctrl-C): the running cell is not recorded."""


def run_cell(cell: dict, stop: dict) -> dict:
    """Run a cell's commands from scratch in its run folder; returns its record (also written there)."""
    if os.path.exists(cell["run_dir"]):
        shutil.rmtree(cell["run_dir"])  # an interrupted or stale run: start clean
    os.makedirs(cell["run_dir"])
    record = {"overrides": cell["overrides"], "seed": cell["seed"], "processes": cell["processes"],
              "command": cell["command"], "run_dir": cell["run_dir"], "commit": git_commit(),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "status": "ok"}
    start = time.time()
    stdout_path, stderr_path = (os.path.join(cell["run_dir"], name) for name in ("stdout.txt", "stderr.txt"))
    for i, argv in enumerate(cell["steps"]):
        if stop["requested"]:
            raise Stopped()
        with open(stdout_path, "a") as out, open(stderr_path, "a") as err:
            # end_with_parent: a SIGKILLed sweep still stops its run (SIGTERM: train.py checkpoints and exits),
            # which would otherwise go on beside the cell's rerun in the same folder
            stop["child"] = subprocess.Popen(_executable(argv), cwd=ROOT, stdout=out, stderr=err,
                                             preexec_fn=functools.partial(end_with_parent, parent=os.getpid()))
            returncode = stop["child"].wait()
            stop["child"] = None
        if stop["requested"]:
            raise Stopped()
        if returncode != 0:
            record.update(status="failed", error=f"`{argv[0]} {argv[1]}` exited with {returncode}: "
                                                 f"{_tail(stderr_path) or '(no stderr)'}")
            break
        if i == 0:
            record["metrics"], problem = _final_metrics(cell["run_dir"])
            if problem:
                record.update(status="failed", error=f"{problem}; stderr: {_tail(stderr_path) or '(empty)'}")
                break
        else:
            with open(argv[argv.index("--out") + 1]) as f:
                record.setdefault("evals", {})[cell["eval_names"][i - 1]] = json.load(f)
    record["wall_s"] = round(time.time() - start, 1)
    _write_json(os.path.join(cell["run_dir"], RECORD), record)
    return record


def metric_value(record: dict, name: str):
    """`val/top1` from the train metrics, `EVAL/KEY` from a named eval.py run."""
    if name in (record.get("metrics") or {}):
        return record["metrics"][name]
    head, _, key = name.partition("/")
    return (record.get("evals") or {}).get(head, {}).get(key)


def _label(overrides: dict) -> str:
    return " ".join(f"{k}={_arg(v)}" for k, v in overrides.items()) or "(base)"


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _groups(cells: list[dict], records: dict) -> list[tuple[dict, list[dict], list[dict]]]:
    """Cells grouped over seeds: (overrides, all cells, their records so far)."""
    groups = {}
    for cell in cells:
        key = json.dumps(cell["overrides"], sort_keys=True)
        group = groups.setdefault(key, (cell["overrides"], [], []))
        group[1].append(cell)
        if records.get(cell["run_dir"]):
            group[2].append(records[cell["run_dir"]])
    return list(groups.values())


def write_tables(spec: dict, cells: list[dict], records: dict, tables_dir: str) -> list[str]:
    os.makedirs(tables_dir, exist_ok=True)
    name, metrics = spec["name"], spec["metrics"]
    done = [records[c["run_dir"]] for c in cells if records.get(c["run_dir"])]
    entries = [{**{k: r[k] for k in ("overrides", "seed", "processes", "command", "status")},
                "metrics": r.get("metrics"), **({"evals": r["evals"]} if "evals" in r else {}),
                **({"error": r["error"]} if "error" in r else {}),
                "wall_s": r["wall_s"], "commit": r["commit"], "run_dir": r["run_dir"]} for r in done]
    json_path = os.path.join(tables_dir, f"{name}.json")
    _write_json(json_path, entries)

    keys = list(dict.fromkeys(k for c in cells for k in c["overrides"]))
    commits = sorted({r["commit"] for r in done}) or [git_commit()]
    total = sum(r["wall_s"] for r in done)
    lines = [f"# Ablation: {name}", "", f"**Paper.** {' '.join(str(spec.get('paper') or 'not given').split())}", "",
             f"Measured here: `python ablate.py {spec['path']}` ({len(done)} of {len(cells)} runs recorded, "
             f"{sum(r['status'] == 'ok' for r in done)} ok). Base config `{spec['base']}` with "
             + (", ".join(f"`--{k}={_arg(v)}`" for k, v in spec["overrides"].items()) or "no overrides")
             + f" for every cell; seeds {', '.join(map(str, spec['seeds']))}. Commit {', '.join(commits)}; "
             f"{done[0]['machine'] if done else 'no runs yet'}; wall time {total / 60:.1f} min in all "
             "(the sum of the runs' times).", "",
             "Mean ± sample standard deviation over the seeds that finished.", "",
             "| " + " | ".join([*keys, "runs ok", *metrics, "wall s"]) + " |",
             "|" + "---|" * (len(keys) + len(metrics) + 2)]
    for overrides, group_cells, group_records in _groups(cells, records):
        ok = [r for r in group_records if r["status"] == "ok"]
        failed = len(group_records) - len(ok)
        runs = f"{len(ok)}/{len(group_cells)}" + (f" ({failed} failed)" if failed else "")
        values = [_mean_std([v for r in ok if (v := metric_value(r, m)) is not None]) for m in metrics]
        wall = f"{statistics.mean(r['wall_s'] for r in ok):.0f}" if ok else "-"
        lines.append("| " + " | ".join([*(_arg(overrides.get(k, "")) for k in keys), runs, *values, wall]) + " |")
    failures = [r for r in done if r["status"] != "ok"]
    if failures:
        lines += ["", "Failed runs:", ""]
        for r in failures:
            lines += [f"- {_label(r['overrides'])} seed={r['seed']} (`{r['run_dir']}/stderr.txt`):", "  ```",
                      *("  " + line for line in r["error"].strip().splitlines()[-6:]), "  ```"]
    png = os.path.join(tables_dir, f"{name}.png")
    if spec.get("plot") and plot(spec, cells, records, png):
        lines += ["", f"![{name}]({name}.png)"]
    lines += ["", "Commands (from the repository root; wall time of each run):", "", "```"]
    for cell in cells:
        record = records.get(cell["run_dir"])
        lines.append(f"# {record['status']}, {record['wall_s']:.0f} s" if record else "# not run yet")
        lines.append(cell["command"])
    lines += ["```", "", f"**Findings.** {' '.join(str(spec.get('findings') or 'not yet written').split())}", ""]
    md_path = os.path.join(tables_dir, f"{name}.md")
    write_atomic(md_path, "\n".join(lines))
    return [md_path, json_path] + ([png] if os.path.exists(png) and spec.get("plot") else [])


def _plot_x(value):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    match = re.search(r":(\d+(?:\.\d+)?)$", str(value))
    return float(match.group(1)) if match else None


def plot_lines(spec: dict, cells: list[dict], records: dict) -> dict[str, list]:
    """{label: [(x value, [plot.y of each seed that finished]), ...]}: one line per combination of the values of
    plot.series (a key or a list of keys; a key a cell does not set is left out of its label)."""
    options = spec["plot"]
    x_key, y_key, series = options["x"], options.get("y", spec["metrics"][0]), options.get("series")
    series_keys = [series] if isinstance(series, str) else list(series or [])
    lines = {}
    for overrides, _, group_records in _groups(cells, records):
        values = [v for r in group_records if r["status"] == "ok" and (v := metric_value(r, y_key)) is not None]
        if values:
            label = ", ".join(f"{key}={_arg(overrides[key])}" for key in series_keys if key in overrides)
            lines.setdefault(label, []).append((overrides.get(x_key), values))
    return lines


def plot(spec: dict, cells: list[dict], records: dict, path: str) -> bool:
    """Mean and std over seeds of plot.y against plot.x, one line per plot.series; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    options = spec["plot"]
    x_key, y_key = options["x"], options.get("y", spec["metrics"][0])
    lines = plot_lines(spec, cells, records)
    if not lines:
        return False
    categories = list(dict.fromkeys(_arg(x) for points in lines.values() for x, _ in points))
    numeric = all(_plot_x(x) is not None for points in lines.values() for x, _ in points)
    figure, axes = plt.subplots(figsize=(5, 3.5))
    for label, points in lines.items():
        points.sort(key=lambda p: _plot_x(p[0]) if numeric else categories.index(_arg(p[0])))
        xs = [_plot_x(x) if numeric else categories.index(_arg(x)) for x, _ in points]
        means = [statistics.mean(v) for _, v in points]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in points]
        axes.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label or None)
    if not numeric:
        axes.set_xticks(range(len(categories)), categories)
    elif options.get("xscale"):
        axes.set_xscale(options["xscale"])
        ticks = sorted({_plot_x(x) for points in lines.values() for x, _ in points})
        axes.set_xticks(ticks, [f"{tick:g}" for tick in ticks])  # the measured values, not 3x10^1, 4x10^1, ...
        axes.minorticks_off()
    axes.set_xlabel(options.get("xlabel", x_key))
    axes.set_ylabel(options.get("ylabel", y_key))
    axes.set_title(f"{spec['name']} (mean ± std over seeds)")
    if any(lines):
        axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    write_atomic(path, lambda f: figure.savefig(f, format="png", dpi=120), binary=True)
    plt.close(figure)
    return True


def _config_problem(spec: dict, cell: dict) -> str | None:
    """What config.py says about a cell's overrides (unknown keys, wrong types, numbers out of range), without running
    anything."""
    train_argv = cell["steps"][0]
    overrides = train_argv[train_argv.index("train.py") + 3:]
    try:
        load_config(os.path.join(ROOT, spec["base"]), overrides)
    except ConfigError as error:
        return str(error)
    return None


def _from_root(path: str) -> str:
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", help="an ablation file, configs/ablations/NAME.yaml")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and their commands; run nothing")
    parser.add_argument("--nproc", type=int, help="processes per run (overrides the file's `processes`)")
    parser.add_argument("--runs-dir", default="runs/ablations", help="run folders go in RUNS_DIR/NAME/")
    parser.add_argument("--tables-dir", default="docs/tables", help="where NAME.md, NAME.json, NAME.png go")
    parser.add_argument("--max-cells", type=int, help="run at most this many cells, then write the tables")
    parser.add_argument("--retry-failed", action="store_true", help="run recorded failures again")
    args = parser.parse_args(argv)
    # commands run from the repository root; paths inside it are written relative to it
    spec_path, runs_dir, tables_dir = (_from_root(p) for p in (args.spec, args.runs_dir, args.tables_dir))
    os.chdir(ROOT)
    for option, value, minimum in (("--nproc", args.nproc, 1), ("--max-cells", args.max_cells, 0)):
        if value is not None and value < minimum:
            fail(f"ablate.py: {option} must be >= {minimum}; got {value}")
    try:
        spec = load_spec(spec_path)
        cells = expand_cells(spec, runs_dir, args.nproc)
    except BadInput as error:
        fail(f"ablation file error: {error}")

    records, stale = {}, 0
    for cell in cells:
        record = read_record(cell)
        if record and record["command"] == cell["command"]:
            records[cell["run_dir"]] = record
        stale += bool(record) and record["command"] != cell["command"]
    if args.dry_run:
        print(f"{spec['name']}: {len(cells)} cells ({len(records)} recorded)")
        for i, cell in enumerate(cells, 1):
            record = records.get(cell["run_dir"])
            state = f"recorded ({record['status']})" if record else "to run"
            problem = _config_problem(spec, cell)
            print(f"[{i}/{len(cells)}] {_label(cell['overrides'])} seed={cell['seed']}: {state}"
                  + (f"; will fail: {problem}" if problem else ""))
            print(f"  {cell['command']}")
        return 0
    for cell in cells:  # a typo or a value out of range in one cell fails now, not hours into the sweep
        problem = _config_problem(spec, cell)
        if problem:
            fail(f"ablation file error: {spec_path}: {_label(cell['overrides'])} seed={cell['seed']}: {problem} "
                 f"(--dry-run lists every cell)")

    stop = {"requested": False, "child": None}

    def request_stop(signum, frame):
        stop["requested"] = True
        if stop["child"] is not None and stop["child"].poll() is None:
            stop["child"].send_signal(signal.SIGTERM)  # train.py checkpoints and exits; torchrun passes it on

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    todo = [c for c in cells if c["run_dir"] not in records
            or (args.retry_failed and records[c["run_dir"]]["status"] != "ok")]
    later = todo[args.max_cells:] if args.max_cells is not None else []
    todo = todo[:len(todo) - len(later)]
    print(f"{spec['name']}: {len(cells)} cells, {len(records)} recorded, {len(todo)} to run"
          + (f", {len(later)} left for later (--max-cells)" if later else "")
          + (f"; {stale} recorded with another command (they run again)" if stale else ""), flush=True)
    ran, started = 0, time.time()
    for cell in todo:
        if stop["requested"]:
            break
        times = [r["wall_s"] for r in records.values() if r["status"] == "ok"]
        per_cell = statistics.mean(times) if times else None
        eta = f"{per_cell:.0f} s a cell, ETA {per_cell * (len(todo) - ran) / 60:.1f} min" if per_cell else "ETA -"
        failed = sum(r["status"] != "ok" for r in records.values())
        print(f"[{len(records)} recorded ({failed} failed), 1 running, {len(todo) - ran - 1} left; {eta}] "
              f"{_label(cell['overrides'])} seed={cell['seed']}", flush=True)
        records.pop(cell["run_dir"], None)
        try:
            record = run_cell(cell, stop)
        except Stopped:
            print(f"stopped during {_label(cell['overrides'])} seed={cell['seed']} (not recorded); run the same "
                  f"command again to continue", flush=True)
            write_tables(spec, cells, records, tables_dir)
            return 1
        records[cell["run_dir"]] = record
        ran += 1
        summary = ", ".join(f"{m} {v:.2f}" for m in spec["metrics"] if (v := metric_value(record, m)) is not None)
        outcome = f"ok: {summary}" if record["status"] == "ok" else "FAILED: " + record["error"].splitlines()[-1]
        print(f"  {outcome} ({record['wall_s']:.0f} s)", flush=True)
        write_tables(spec, cells, records, tables_dir)
    paths = write_tables(spec, cells, records, tables_dir)
    if stop["requested"]:
        print("stopped between cells; run the same command again to continue", flush=True)
        return 1
    failed = [r for r in records.values() if r["status"] != "ok"]
    print(f"{len(records)}/{len(cells)} cells recorded ({len(failed)} failed"
          + ("; --retry-failed runs them again" if failed else "") + f"), {ran} run now in "
          f"{(time.time() - started) / 60:.1f} min; wrote {', '.join(paths)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
