"""Run a function on W gloo processes (CPU) and collect what each returns: for distributed tests."""
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, result_dir, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.save(fn(rank, world_size, *args), os.path.join(result_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_on_processes(fn, world_size: int, *args) -> list:
    """fn(rank, world_size, *args) on each of world_size processes; returns the list of results by rank.

    fn must be importable (defined at module level of a test file).
    """
    with tempfile.TemporaryDirectory() as result_dir:
        mp.spawn(_worker, args=(world_size, _free_port(), result_dir, fn, args), nprocs=world_size, join=True)
        return [torch.load(os.path.join(result_dir, f"{r}.pt"), weights_only=False) for r in range(world_size)]
