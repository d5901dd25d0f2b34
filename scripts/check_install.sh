#!/usr/bin/env bash
# Install check on a fresh machine (about 1.5-3 minutes, most of it pip): the repository installs as the one package
# `crossmodal` next to transformers 5.25+, whose dependency `kernels` has the name of our `kernels/` folder, and Dask's
# `distributed`, which has the name of our `distributed.py`.
#
#   bash scripts/check_install.sh        # PYTHON=python3.11 to choose the interpreter
#
# A temporary venv gets torch, transformers and distributed, then the repository editable with --no-build-isolation
# (the C++ op is skipped: CROSSMODAL_NO_EXTENSION=1). From outside the repository the check asserts that `kernels`,
# `distributed` and `transformers` come from the venv's site-packages, that `crossmodal` imports, and that the
# installed distribution names no top-level module but `crossmodal` (its files, top_level.txt and the editable
# finder's MAPPING). Under the old setup.py (16 top-level names, legacy setuptools backend) the install itself failed:
# `ModuleNotFoundError: No module named 'kernels._internals'`.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
transformers_version=${TRANSFORMERS_VERSION:-5.25.0}
distributed_version=${DISTRIBUTED_VERSION:-2026.8.0}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s)

"$python" -m venv "$tmp/venv"
pip=("$tmp/venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" torch==2.14.1 torchvision==0.29.1 ninja "setuptools>=64"
"${pip[@]}" "transformers==$transformers_version" "distributed==$distributed_version"
CROSSMODAL_NO_EXTENSION=1 "${pip[@]}" --no-build-isolation -e "$repo"

cd "$tmp"
env -u PYTHONPATH REPO="$repo" "$tmp/venv/bin/python" - <<'PY'
import importlib
import importlib.metadata as metadata
import os
import sysconfig

repo = os.path.realpath(os.environ["REPO"])
site = {os.path.realpath(sysconfig.get_path(key)) for key in ("purelib", "platlib")}


def inside(path, folder):
    return os.path.commonpath([os.path.realpath(path), folder]) == folder


for name in ("kernels", "distributed", "transformers"):
    module = importlib.import_module(name)
    assert not inside(module.__file__, repo), f"`{name}` resolves to the repository: {module.__file__}"
    assert any(inside(module.__file__, folder) for folder in site), f"`{name}` is not from site-packages: {module.__file__}"

import crossmodal  # noqa: E402
from crossmodal.models import create_model  # noqa: E402, F401

assert inside(crossmodal.__file__, repo), f"editable `crossmodal` should be the repository: {crossmodal.__file__}"

distribution = metadata.distribution("crossmodal")
top_level = set((distribution.read_text("top_level.txt") or "").split())
mapping = {}
for file in distribution.files or []:
    parts = file.parts
    if parts[0].endswith(".dist-info") or parts[0] in ("__pycache__", "..") or file.suffix == ".pth":
        continue
    if parts[0].startswith("__editable__") and parts[0].endswith("_finder.py"):
        mapping.update(importlib.import_module(parts[0][: -len(".py")]).MAPPING)
        continue
    top_level.add(parts[0].split(".")[0])  # a module file `name.py` / `name.cpython-*.so`, or a package folder
top_level |= set(mapping)
assert sorted(top_level) == ["crossmodal"], f"the distribution installs top-level names {sorted(top_level)}"
assert os.path.realpath(mapping.get("crossmodal", repo)) == repo, f"editable finder maps {mapping}"

versions = {name: metadata.version(name) for name in ("torch", "transformers", "kernels", "distributed", "crossmodal")}
print(" ".join(f"{name} {version}" for name, version in versions.items()), "ok")
PY
echo "check_install: $(( $(date +%s) - start )) s"
