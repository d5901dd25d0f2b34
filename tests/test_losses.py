"""The distributed losses (local rows against gathered columns) give the gradients of one process that
holds the whole batch; the pure-PyTorch losses match an independent float64 implementation."""
import math

import pytest
import torch
import torch.nn.functional as F

from crossmodal.losses import clip_loss, siglip_loss
from tests.multiprocess import run_on_processes

N, D = 12, 16


def make_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(N, D, generator=generator, dtype=torch.float64), dim=-1)
    texts = F.normalize(torch.randn(N, D, generator=generator, dtype=torch.float64), dim=-1)
    return images, texts, torch.tensor(math.log(10.0), dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)


def naive_clip(images, texts, scale):
    """Written from the paper's pseudocode with explicit sums (no cross_entropy)."""
    logits = scale * images @ texts.T
    n = len(images)
    row = sum(torch.logsumexp(logits[i], 0) - logits[i, i] for i in range(n)) / n
    col = sum(torch.logsumexp(logits[:, j], 0) - logits[j, j] for j in range(n)) / n
    return (row + col) / 2


def naive_siglip(images, texts, scale, bias):
    n = len(images)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total = total - torch.log(torch.sigmoid(z * (scale * images[i] @ texts[j] + bias)))
    return total / n


def loss_and_grads(name, images, texts, log_scale, bias):
    images, texts = images.clone().requires_grad_(), texts.clone().requires_grad_()
    log_scale, bias = log_scale.clone().requires_grad_(), bias.clone().requires_grad_()
    if name == "clip":
        loss = clip_loss(images, texts, log_scale.exp())
    else:
        loss = siglip_loss(images, texts, log_scale.exp(), bias)
    loss.backward()
    return loss.detach(), images.grad, texts.grad, log_scale.grad, bias.grad


def test_clip_loss_matches_naive():
    images, texts, log_scale, _ = make_inputs()
    loss, grad_images, grad_texts, grad_scale, _ = loss_and_grads("clip", images, texts, log_scale, torch.tensor(0.0))
    images_, texts_, log_scale_ = (t.clone().requires_grad_() for t in (images, texts, log_scale))
    expected = naive_clip(images_, texts_, log_scale_.exp())
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(grad_images, images_.grad)
    torch.testing.assert_close(grad_texts, texts_.grad)
    torch.testing.assert_close(grad_scale, log_scale_.grad)


def test_siglip_loss_matches_naive():
    images, texts, log_scale, bias = make_inputs()
    loss, grad_images, grad_texts, grad_scale, grad_bias = loss_and_grads("siglip", images, texts, log_scale, bias)
    tensors = [t.clone().requires_grad_() for t in (images, texts, log_scale, bias)]
    expected = naive_siglip(tensors[0], tensors[1], tensors[2].exp(), tensors[3])
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    for got, want in zip((grad_images, grad_texts, grad_scale, grad_bias), tensors):
        torch.testing.assert_close(got, want.grad)


def _distributed_loss(rank, world_size, name):
    images, texts, log_scale, bias = make_inputs()
    local = slice(rank * N // world_size, (rank + 1) * N // world_size)
    return loss_and_grads(name, images[local], texts[local], log_scale, bias)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_distributed_loss_equals_single_process(name):
    """2 gloo processes, DDP-style averaging, reproduce the loss and every gradient of the full batch."""
    world_size = 2
    images, texts, log_scale, bias = make_inputs()
    loss, grad_images, grad_texts, grad_scale, grad_bias = loss_and_grads(name, images, texts, log_scale, bias)
    per_rank = run_on_processes(_distributed_loss, world_size, name)
    # DDP averages parameter gradients over ranks: the features' gradients reach parameters divided by W.
    torch.testing.assert_close(sum(r[0] for r in per_rank) / world_size, loss)
    torch.testing.assert_close(torch.cat([r[1] for r in per_rank]) / world_size, grad_images)
    torch.testing.assert_close(torch.cat([r[2] for r in per_rank]) / world_size, grad_texts)
    torch.testing.assert_close(sum(r[3] for r in per_rank) / world_size, grad_scale)
    if name == "siglip":
        torch.testing.assert_close(sum(r[4] for r in per_rank) / world_size, grad_bias)
