"""The fused op's distributed form on 2 gloo processes: the same loss and gradients as the pure-PyTorch
distributed loss (losses.contrastive.clip_loss, local rows against gathered columns), and, after DDP's
averaging over ranks, as the full batch in one process."""
import pytest
import torch
import torch.nn.functional as F

from crossmodal import kernels
from crossmodal.kernels import reference
from crossmodal.losses.contrastive import all_gather_with_grad, clip_loss
from tests.multiprocess import run_on_processes

WORLD_SIZE = 2
N, D = 600, 33  # 300 local rows per rank: several CPU blocks (256) per rank, a ragged last one
BLOCK = 64  # "op_blocks": the op with 64-row blocks, as a GPU runs its 4096-row ones (ragged: 300 = 4 x 64 + 44)
LOGIT_SCALE = 30.0


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
