"""Fixtures shared by test modules."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of many tiny ops: on a shared 2-core machine a second thread only waits.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
