"""Collectives outside the losses: the GPU process group that also serves CPU tensors, every CPU-side
collective of train.py and data/ on 2 gloo processes, and synchronised BatchNorm against one process
holding the whole batch (float64, forward and backward)."""
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch import nn

from crossmodal import distributed
from crossmodal.data.bad_samples import BadSampleCount
from crossmodal.models.batchnorm import SyncBatchNorm2d, convert_sync_batchnorm
from tests.multiprocess import run_on_processes


def _init_as_for_a_gpu(monkeypatch) -> str:
    """distributed.init('cuda') with the GPU and the group creation mocked: NCCL cannot start without a GPU,
    so its place in the backend string is taken by gloo, which also takes CUDA-device collectives."""
    recorded = {}
    real_init = dist.init_process_group

    def init_process_group(backend, **kwargs):
        recorded["backend"] = backend
        store = tempfile.NamedTemporaryFile(delete=False).name
        real_init(backend.replace("nccl", "gloo"), init_method=f"file://{store}", rank=0, world_size=1)

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    device = distributed.init("auto")
    assert device == torch.device("cuda", 0)
    return recorded["backend"]


def test_gpu_group_reduces_cpu_tensors_next_to_cuda_ones(monkeypatch):
    backend = _init_as_for_a_gpu(monkeypatch)
    try:
        assert backend == "cpu:gloo,cuda:nccl"
        group = dist.group.WORLD
        assert type(group._get_backend(torch.device("cpu"))).__name__ == "ProcessGroupGloo"
        assert group._get_backend(torch.device("cuda")) is not None  # NCCL's slot (gloo stands in here)
        # the CPU-side collectives train.py runs every step or log interval
        assert distributed.any_rank(True) and not distributed.any_rank(False)
        count = BadSampleCount(3, 40, ["a.jpg: missing file"])
        total = count.summed_over_ranks()
        assert (total.bad, total.seen, total.examples) == (3, 40, ["a.jpg: missing file"])
        assert distributed.all_gather_object({"cpu": torch.ones(2)})[0]["cpu"].tolist() == [1.0, 1.0]
    finally:
        dist.destroy_process_group()


def test_a_cuda_only_group_cannot_reduce_cpu_tensors():
    # what the old NCCL-only group did to the SIGTERM flag and the bad-sample counts (why the test above matters)
    store = tempfile.NamedTemporaryFile(delete=False).name
    dist.init_process_group("cuda:gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            dist.all_reduce(torch.ones(1))
    finally:
        dist.destroy_process_group()


def _collectives(rank, world_size):
    count = BadSampleCount()
    count.add(rank + 1, 10 * (rank + 1), [f"rank{rank}.jpg: missing file"])
    total = count.summed_over_ranks()
    return {
        "stop_any": distributed.any_rank(rank == 1),
        "stop_none": distributed.any_rank(False),
        "bad": (total.bad, total.seen, total.examples),
        "gathered": distributed.all_gather_object({"rank": rank, "rng": torch.get_rng_state()[:4]}),
        "mean": distributed.all_reduce_mean(torch.tensor(float(rank))).item(),
        "broadcast": distributed.broadcast_object(f"from {rank}"),
    }


def test_cpu_collectives_on_two_processes():
    for rank, out in enumerate(run_on_processes(_collectives, 2)):
        assert out["stop_any"] is True and out["stop_none"] is False  # a SIGTERM on rank 1 stops rank 0 too
        assert out["bad"] == (3, 30, ["rank0.jpg: missing file", "rank1.jpg: missing file"])
        assert [g["rank"] for g in out["gathered"]] == [0, 1]
        assert out["mean"] == 0.5 and out["broadcast"] == "from 0"


def _batchnorm_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    with torch.no_grad():
        for module in net:
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return net.double()


def _inputs():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 6, 6, generator=generator, dtype=torch.float64) * 3 + 1
    target = torch.randn(8, 2, 4, 4, generator=generator, dtype=torch.float64)
    return x, target


def _loss(net, x, target):
    # a loss that couples samples (like the contrastive loss): each rank's output enters through the batch stats
    return ((net(x) - target) ** 2).mean()


def _sync_bn_step(rank, world_size):
    net = convert_sync_batchnorm(_batchnorm_net())
    x, target = _inputs()
    local = slice(rank * 4, (rank + 1) * 4)
    x_local = x[local].clone().requires_grad_(True)
    loss = _loss(net, x_local, target[local])
    loss.backward()
    grads = [p.grad.clone() for p in net.parameters()]
    for grad in grads:  # what DDP does: average the parameter gradients over processes
        dist.all_reduce(grad)
        grad /= world_size
    buffers = {name: b.clone() for name, b in net.named_buffers()}
    return {"out": net(x_local).detach(), "x_grad": x_local.grad, "grads": grads, "buffers": buffers}


def test_sync_batchnorm_equals_one_process_with_the_whole_batch():
    reference = _batchnorm_net()
    x, target = _inputs()
    x = x.clone().requires_grad_(True)
    loss = _loss(reference, x, target)
    loss.backward()
    buffers = {name: b.clone() for name, b in reference.named_buffers()}
    out = reference(x).detach()
    results = run_on_processes(_sync_bn_step, 2)
    for rank, result in enumerate(results):
        rows = slice(rank * 4, (rank + 1) * 4)
        torch.testing.assert_close(result["out"], out[rows], rtol=1e-10, atol=1e-10)
        # each rank's loss is the mean over its half: the gradient of their average is half the reference's sum
        torch.testing.assert_close(result["x_grad"], 2 * x.grad[rows], rtol=1e-10, atol=1e-12)
        for got, param in zip(result["grads"], reference.parameters()):
            torch.testing.assert_close(got, param.grad, rtol=1e-10, atol=1e-12)
        for name, buffer in buffers.items():
            torch.testing.assert_close(result["buffers"][name], buffer, rtol=1e-10, atol=1e-12)


def test_sync_batchnorm_is_plain_batchnorm_on_one_process_and_keeps_the_keys():
    plain = _batchnorm_net()
    synced = convert_sync_batchnorm(_batchnorm_net())
    assert isinstance(synced[1], SyncBatchNorm2d) and list(plain.state_dict()) == list(synced.state_dict())
    x, target = _inputs()
    torch.testing.assert_close(synced(x), plain(x))
    synced.eval(), plain.eval()
    torch.testing.assert_close(synced(x), plain(x))
