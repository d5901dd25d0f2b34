"""Fixtures shared by test modules, and the import path the tests run with.

The tests import the library as the installed package `crossmodal` and each other as `tests.*`. The repository
root itself is taken off sys.path (`python -m pytest` puts it there): on it, the folders `kernels/`, `data/`, ...
would shadow installed packages of those names, such as the `kernels` that transformers 5.25+ imports. A folder
holding only a link named `tests` stands in for it, for this process and the processes it starts.
"""
import os
import sys
import tempfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def _import_path_without_the_root() -> None:
    link_root = tempfile.mkdtemp(prefix="crossmodal-tests-")
    os.symlink(os.path.join(ROOT, "tests"), os.path.join(link_root, "tests"))
    sys.path[:] = [link_root] + [path for path in sys.path if os.path.abspath(path or os.curdir) != ROOT]
    os.environ["PYTHONPATH"] = os.pathsep.join([link_root, *filter(None, [os.environ.get("PYTHONPATH")])])


_import_path_without_the_root()


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of many tiny ops: on a shared 2-core machine a second thread only waits.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
