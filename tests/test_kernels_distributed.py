"""The fused ops' distributed forms on 2 gloo processes: the same loss and gradients as the pure-PyTorch
distributed losses (losses.contrastive.clip_loss and siglip_loss, local rows against gathered columns), and,
after DDP's averaging over ranks, as the full batch in one process."""
import pytest
import torch
import torch.nn.functional as F

from crossmodal import kernels
from crossmodal.kernels import reference
from crossmodal.losses.contrastive import all_gather_with_grad, clip_loss, siglip_loss
from tests.multiprocess import run_on_processes

WORLD_SIZE = 2
N, D = 600, 33  # 300 local rows per rank: several CPU blocks (256) per rank, a ragged last one
BLOCK = 64  # "op_blocks": the op with 64-row blocks, as a GPU runs its 4096-row ones (ragged: 300 = 4 x 64 + 44)
LOGIT_SCALE = 30.0
LOGIT_BIAS = -10.0  # the sigmoid loss's


def make_inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(N, D, generator=generator, dtype=torch.float64)
    text = image + 2.0 * torch.randn(N, D, generator=generator, dtype=torch.float64)
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    return image.to(dtype), text.to(dtype), torch.tensor(LOGIT_SCALE, dtype=dtype)


def loss_and_grads(impl: str, image_local, text_local, logit_scale, offset: int) -> list[torch.Tensor]:
    image_local, text_local = image_local.clone().requires_grad_(), text_local.clone().requires_grad_()
    logit_scale = logit_scale.clone().requires_grad_()
    if impl in ("op", "op_blocks"):  # the op itself, gathering as the caller must
        image_all, text_all = all_gather_with_grad(image_local), all_gather_with_grad(text_local)
        loss = kernels.contrastive_loss_local(
            image_local, text_local, image_all, text_all, logit_scale, offset, backend="cpu",
            block_size=BLOCK if impl == "op_blocks" else 0,
        )
    else:  # "torch" (pure PyTorch) or "fused" (the loss module calling the op)
        loss = clip_loss(image_local, text_local, logit_scale, impl=impl)
    loss.backward()
    return [loss.detach(), image_local.grad, text_local.grad, logit_scale.grad]


def _rank_results(rank: int, world_size: int, dtype: torch.dtype) -> dict[str, list[torch.Tensor]]:
    image, text, logit_scale = make_inputs(dtype)
    b = N // world_size
    rows = slice(rank * b, (rank + 1) * b)
    return {
        impl: loss_and_grads(impl, image[rows], text[rows], logit_scale, rank * b)
        for impl in ("torch", "op", "op_blocks", "fused")
    }


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_distributed_form_matches_torch_and_full_batch(dtype, rtol):
    per_rank = run_on_processes(_rank_results, WORLD_SIZE, dtype)

    def assert_close(actual, expected):
        error = (actual.double() - expected.double()).abs().max().item()
        assert error <= rtol * expected.double().abs().max().item(), error

    # Rank by rank, the op's loss and gradients equal the pure-PyTorch distributed loss's.
    for results in per_rank:
        for impl in ("op", "op_blocks", "fused"):
            for actual, expected in zip(results[impl], results["torch"]):
                assert_close(actual, expected)

    # Averaged over ranks (DDP), they are the full batch's, computed in float64 in one process.
    image, text, logit_scale = (t.double().requires_grad_() for t in make_inputs(dtype))
    full_loss = reference.contrastive_loss(image, text, logit_scale)
    full_loss.backward()
    losses, image_grads, text_grads, scale_grads = (
        [results["op"][k] for results in per_rank] for k in range(4)
    )
    assert_close(sum(losses) / WORLD_SIZE, full_loss.detach())
    assert_close(torch.cat(image_grads) / WORLD_SIZE, image.grad)
    assert_close(torch.cat(text_grads) / WORLD_SIZE, text.grad)
    assert_close(sum(scale_grads) / WORLD_SIZE, logit_scale.grad)


def siglip_loss_and_grads(impl: str, image_local, text_local, logit_scale, offset: int) -> list[torch.Tensor]:
    leaves = [t.clone().requires_grad_() for t in (image_local, text_local, logit_scale)]
    logit_bias = torch.tensor(LOGIT_BIAS, dtype=logit_scale.dtype, requires_grad=True)
    if impl == "op_blocks":  # the op itself with 64-row blocks, gathering as the caller must
        text_all = all_gather_with_grad(leaves[1])
        loss = kernels.siglip_loss_local(leaves[0], text_all, leaves[2], logit_bias, offset, backend="cpu",
                                         block_size=BLOCK)
    else:  # "torch" (pure PyTorch) or "fused" (the loss module calling the op)
        loss = siglip_loss(*leaves, logit_bias, impl=impl)
    loss.backward()
    return [loss.detach()] + [leaf.grad for leaf in leaves] + [logit_bias.grad]


def _siglip_rank_results(rank: int, world_size: int, dtype: torch.dtype) -> dict:
    image, text, logit_scale = make_inputs(dtype)
    b = N // world_size
    rows = slice(rank * b, (rank + 1) * b)
    results = {impl: siglip_loss_and_grads(impl, image[rows], text[rows], logit_scale, rank * b)
               for impl in ("torch", "op_blocks", "fused")}
    if dtype == torch.float64:  # this rank's op against finite differences (small: gradcheck is O(inputs))
        inputs = (image[:6][rank * 3 : rank * 3 + 3, :5], text[:6, :5], logit_scale, torch.tensor(LOGIT_BIAS))
        inputs = tuple(t.double().clone().requires_grad_() for t in inputs)
        results["gradcheck"] = torch.autograd.gradcheck(
            lambda i, t, s, bias: kernels.siglip_loss_local(i, t, s, bias, rank * 3, backend="cpu", block_size=2),
            inputs,
        )
    return results


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_distributed_siglip_matches_torch_and_full_batch(dtype, rtol):
    per_rank = run_on_processes(_siglip_rank_results, WORLD_SIZE, dtype)

    def assert_close(actual, expected):
        error = (actual.double() - expected.double()).abs().max().item()
        assert error <= rtol * expected.double().abs().max().item(), error

    for results in per_rank:
        assert results.get("gradcheck", True)
        for impl in ("op_blocks", "fused"):
            for actual, expected in zip(results[impl], results["torch"]):
                assert_close(actual, expected)

    # Averaged over ranks (DDP), they are the full batch's in one process, computed in float64.
    image, text, logit_scale = (t.double().requires_grad_() for t in make_inputs(dtype))
    logit_bias = torch.tensor(LOGIT_BIAS, dtype=torch.float64, requires_grad=True)
    full_loss = reference.siglip_loss(image, text, logit_scale, logit_bias)
    full_loss.backward()
    losses, image_grads, text_grads, scale_grads, bias_grads = ([r["fused"][k] for r in per_rank] for k in range(5))
    assert_close(sum(losses) / WORLD_SIZE, full_loss.detach())
    assert_close(torch.cat(image_grads) / WORLD_SIZE, image.grad)
    assert_close(torch.cat(text_grads) / WORLD_SIZE, text.grad)
    assert_close(sum(scale_grads) / WORLD_SIZE, logit_scale.grad)
    assert_close(sum(bias_grads) / WORLD_SIZE, logit_bias.grad)
