"""The fused sigmoid (SigLIP) loss (kernels/csrc/siglip_loss.*) against its pure-PyTorch reference in float64."""
import pytest
import torch

from crossmodal import kernels
from crossmodal.kernels import reference
from crossmodal.losses import siglip_loss
from tests.test_kernels import assert_close_relative, features, float64_reference, loss_and_grads, requires_cuda

SCALE, BIAS = 10.0, -10.0  # SigLIP's initial logit scale and bias


def scalars(scale: float = SCALE, bias: float = BIAS, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(scale, device=device), torch.tensor(bias, device=device)


def fused(backend: str = "cpu", block_size: int = 0):
    return lambda i, t, s, b: kernels.siglip_loss(i, t, s, b, backend=backend, block_size=block_size)


def fused_local(offset: int, backend: str = "cpu", block_size: int = 0):
    return lambda i, t, s, b: kernels.siglip_loss_local(i, t, s, b, offset, backend=backend, block_size=block_size)


def reference_local(offset: int):
    return lambda i, t, s, b: reference.siglip_loss_local(i, t, s, b, offset)


@pytest.mark.parametrize("scale, bias", [(SCALE, BIAS), (1.0, 0.0), (100.0, -5.0)])
@pytest.mark.parametrize("n, dim", [(1, 3), (7, 5), (300, 37), (513, 100)])  # the CPU block is 256
def test_matches_float64_reference(n, dim, scale, bias):
    image, text = features(n, dim)
    inputs = (image, text, *scalars(scale, bias))
    assert_close_relative(loss_and_grads(fused(), *inputs), float64_reference(reference.siglip_loss, *inputs), 1e-5)


def test_same_as_the_training_loss_on_one_process():
    """The interface's promise: the value and gradients of losses.contrastive.siglip_loss (one process)."""
    image, text = features(300, 37)
    inputs = (image, text, *scalars())
    assert_close_relative(loss_and_grads(fused(), *inputs), loss_and_grads(siglip_loss, *inputs), 1e-5)
    torch_impl = lambda i, t, s, b: siglip_loss(i, t, s, b, impl="torch")  # noqa: E731
    fused_impl = lambda i, t, s, b: siglip_loss(i, t, s, b, impl="fused")  # noqa: E731
    assert_close_relative(loss_and_grads(fused_impl, *inputs), loss_and_grads(torch_impl, *inputs), 1e-5)


@pytest.mark.parametrize("n, ranks, rank", [(600, 2, 0), (600, 2, 1), (450, 3, 2), (4, 4, 3)])
def test_local_form_matches_float64_reference(n, ranks, rank):
    image_all, text_all = features(n, 33)
    b = n // ranks
    inputs = (image_all[rank * b : (rank + 1) * b], text_all, *scalars())
    expected = float64_reference(reference_local(rank * b), *inputs)
    assert_close_relative(loss_and_grads(fused_local(rank * b), *inputs), expected, 1e-5)
    blocks = loss_and_grads(fused_local(rank * b, block_size=64), *inputs)  # a GPU's blocks, smaller
    assert_close_relative(blocks, expected, 1e-5)


@pytest.mark.parametrize("block_size", [0, 3])
def test_gradcheck_float64(block_size):
    image, text = features(7, 4)
    inputs = tuple(t.double().requires_grad_() for t in (image, text, *scalars(3.0, -2.0)))
    assert torch.autograd.gradcheck(fused(block_size=block_size), inputs)
    local = tuple(t.double().requires_grad_() for t in (image[2:5], text, *scalars(3.0, -2.0)))
    assert torch.autograd.gradcheck(fused_local(2, block_size=block_size), local)


def test_softplus_and_sigmoid_over_the_whole_range():
    """One image against 20,001 texts whose logits sweep [-100, 100]: every term's log1p and sigmoid,
    the vectorised float32 ones included, within 1e-6 of float64 (the loss here is a sum of them)."""
    logits = torch.linspace(-100.0, 100.0, 20_001, dtype=torch.float64)
    image = torch.ones(1, 1)
    text = logits.float().unsqueeze(1)  # S_0j = 1 * text_j + 0
    for offset in (0, 10_000, 20_000):  # the positive at a small, zero and large logit
        inputs = (image, text, *scalars(1.0, 0.0))
        actual = loss_and_grads(fused_local(offset), *inputs)
        expected = float64_reference(reference_local(offset), *inputs)
        assert_close_relative(actual, expected, 1e-6)
        per_entry = actual[2].double().squeeze(1) - expected[2].squeeze(1)  # dL/dtext_j = +-sigmoid(+-S_0j)
        assert per_entry.abs().max() <= 1e-6 * torch.maximum(expected[2].abs().squeeze(1), torch.tensor(1e-30)).max()


def test_confident_pairs():
    # Every logit far on its right side (positives ~ +50, negatives below -25): a loss of ~1e-12, made of
    # terms that a float32 log(1 + x) computed as log of 1 + x would round to 0; the op keeps them.
    image, text = features(300, 512, noise=0.05)
    inputs = (image, text, *scalars(100.0, -50.0))
    expected = float64_reference(reference.siglip_loss, *inputs)
    assert expected[0] < 1e-6
    actual = loss_and_grads(fused(), *inputs)
    assert abs(actual[0].double() - expected[0]) <= 1e-5 * expected[0]
    assert_close_relative(actual, expected, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_features(dtype):
    image, text = (f.to(dtype) for f in features(300, 37))
    inputs = (image, text, *scalars())
    actual = loss_and_grads(fused(), *inputs)
    assert actual[0].dtype == torch.float32 and actual[1].dtype == dtype and actual[3].dtype == torch.float32
    expected = float64_reference(reference.siglip_loss, *inputs)  # the same rounded inputs
    assert_close_relative(actual[:1], expected[:1], 1e-5)  # fp32 accumulation throughout
    assert_close_relative(actual, expected, 1e-2)  # gradients rounded to the features' dtype


def test_inside_autocast_region():
    """train.py calls the loss under torch.autocast(bf16): the block matmuls must stay fp32 there."""
    image, text = (f.to(torch.bfloat16) for f in features(300, 37))
    inputs = (image, text, *scalars())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = loss_and_grads(fused(), *inputs)
    assert_close_relative(actual[:1], float64_reference(reference.siglip_loss, *inputs)[:1], 1e-5)


def test_without_gradients():
    image, text = features(300, 37)
    scale, bias = scalars()
    with torch.no_grad():
        loss = kernels.siglip_loss(image, text, scale, bias, backend="cpu")
    expected = reference.siglip_loss(image.double(), text.double(), scale.double(), bias.double())
    assert abs(loss.double() - expected) <= 1e-5 * expected
    out = torch.ops.crossmodal.siglip_loss_forward(image, text, scale, bias, 0, 0, False)
    assert torch.equal(out[0], loss) and all(t.numel() == 0 for t in out[1:])


def test_deterministic():
    image, text = features(600, 32)
    run = lambda: loss_and_grads(fused(), image, text, *scalars())  # noqa: E731
    for first, second in zip(run(), run()):
        assert torch.equal(first, second)


def test_opcheck_and_compile():
    image, text = features(20, 9)
    scale, bias = scalars()
    with_grad = [t.clone().requires_grad_() for t in (image, text, scale, bias)]
    op = torch.ops.crossmodal.siglip_loss_forward.default
    for args in [(image, text, scale, bias), (*with_grad, 0, 7, True), (image[5:10], text, scale, bias, 5, 0, False)]:
        torch.library.opcheck(op, args)
    compiled = loss_and_grads(torch.compile(fused(), fullgraph=True), image, text, scale, bias)
    assert_close_relative(compiled, loss_and_grads(fused(), image, text, scale, bias), 1e-6)


def test_errors_name_the_problem():
    image, text = features(10, 4)
    scale, bias = scalars()
    with pytest.raises(ValueError, match="batches differ: 10 vs 9"):
        kernels.siglip_loss(image, text[:9], scale, bias, backend="cpu")
    with pytest.raises(RuntimeError, match="offset 8 puts the 4 image rows' positives outside the 10 texts"):
        kernels.siglip_loss_local(image[:4], text, scale, bias, 8, backend="cpu")
    with pytest.raises(RuntimeError, match="logit_bias must hold one value"):
        kernels.siglip_loss(image, text, scale, torch.zeros(2), backend="cpu")
    with pytest.raises(RuntimeError, match="block must be >= 0"):
        kernels.siglip_loss(image, text, scale, bias, backend="cpu", block_size=-1)
    expected = reference.siglip_loss(image, text, scale, bias)
    assert torch.equal(kernels.siglip_loss(image, text, scale, bias, backend="torch"), expected)


# ---- CUDA (run only where a GPU is visible) ----


@requires_cuda
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize("block_size", [0, 64, 100])  # one 4096 block; ragged blocks (300 = 4 x 64 + 44)
def test_cuda_matches_float64_reference(block_size, dtype, rtol):
    image, text = (f.to("cuda", dtype) for f in features(300, 100, near_duplicates=True))
    inputs = (image, text, *scalars(device="cuda"))
    actual = loss_and_grads(fused("cuda", block_size), *inputs)
    expected = float64_reference(reference.siglip_loss, *inputs)
    assert_close_relative(actual[:1], expected[:1], 1e-5)
    assert_close_relative(actual, expected, rtol)
    image_all, text_all = (f.to("cuda", dtype) for f in features(450, 33))
    local = (image_all[150:300], text_all, *scalars(device="cuda"))
    actual = loss_and_grads(fused_local(150, "cuda", block_size), *local)
    assert_close_relative(actual, float64_reference(reference_local(150), *local), rtol)


@requires_cuda
def test_cuda_scratch_is_one_block():
    n, dim, block_size = 8192, 64, 1024
    image, text = (f.cuda().requires_grad_() for f in features(n, dim))
    scale, bias = (t.requires_grad_() for t in scalars(device="cuda"))
    loss_fn = fused("cuda", block_size)
    loss_fn(image[:2000], text[:2000], scale, bias).backward()  # cuBLAS workspaces are not the loss's memory
    image.grad = text.grad = scale.grad = bias.grad = None
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss_fn(image, text, scale, bias).backward()
    peak = torch.cuda.max_memory_allocated() - baseline
    # one fp32 block of logits (4 MiB), the fp32 gradients and a temporary of their size, while a single
    # N x N fp32 matrix would be 256 MiB
    assert peak <= 2 * 4 * block_size**2 + 4 * (4 * n * dim), peak / 2**20


@requires_cuda
def test_cuda_opcheck_and_compile():
    image, text = (f.cuda() for f in features(20, 9))
    scale, bias = scalars(device="cuda")
    op = torch.ops.crossmodal.siglip_loss_forward.default
    torch.library.opcheck(op, (image, text, scale, bias))
    torch.library.opcheck(op, tuple(t.clone().requires_grad_() for t in (image, text, scale, bias)))
    compiled = loss_and_grads(torch.compile(fused("cuda"), fullgraph=True), image, text, scale, bias)
    assert_close_relative(compiled, loss_and_grads(fused("cuda"), image, text, scale, bias), 1e-6)
