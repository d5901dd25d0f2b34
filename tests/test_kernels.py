"""The fused contrastive loss (kernels/) against its pure-PyTorch reference evaluated in float64."""
import pytest
import torch
import torch.nn.functional as F

from crossmodal import kernels
from crossmodal.kernels import ops, reference

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
UPSTREAM = 1.7  # backward is run from UPSTREAM * loss, so the upstream gradient is not always 1


def features(
    n: int, dim: int, seed: int = 0, noise: float = 2.0, near_duplicates: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised (image, text) pairs, each text its image plus `noise` times a Gaussian."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(n, dim, generator=generator)
    text = image + noise * torch.randn(n, dim, generator=generator)
    if near_duplicates:  # repeated pairs, as duplicate captions: row 3k+1 is row 3k to 1e-4, row 3k+2 exactly
        for features in (image, text):
            copies = len(features[1::3])
            features[1::3] = features[0::3][:copies] + 1e-4 * torch.randn(copies, dim, generator=generator)
            features[2::3] = features[0::3][: len(features[2::3])]
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


def loss_and_grads(loss_fn, *inputs: torch.Tensor) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    loss = loss_fn(*leaves)
    (UPSTREAM * loss).backward()
    return [loss.detach()] + [leaf.grad for leaf in leaves]


def float64_reference(loss_fn, *inputs: torch.Tensor) -> list[torch.Tensor]:
    return loss_and_grads(loss_fn, *(t.double() for t in inputs))


def assert_close_relative(actual: list[torch.Tensor], expected: list[torch.Tensor], rtol: float) -> None:
    """Loss within rtol * max(|loss|, 1); each gradient within rtol * its largest entry."""
    loss, *grads = actual
    expected_loss, *expected_grads = expected
    assert abs(loss.double() - expected_loss).item() <= rtol * max(abs(expected_loss.item()), 1.0)
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.shape == expected_grad.shape
        error = (grad.double() - expected_grad).abs().max().item()
        assert error <= rtol * max(expected_grad.abs().max().item(), 1e-12), (error, expected_grad.abs().max().item())


def local_inputs(n: int, ranks: int, rank: int, dim: int, seed: int = 0) -> tuple[list[torch.Tensor], int]:
    image_all, text_all = features(n, dim, seed)
    b = n // ranks
    rows = slice(rank * b, (rank + 1) * b)
    return [image_all[rows], text_all[rows], image_all, text_all], rank * b


def test_extension_is_built():
    assert kernels.available_backends()[:2] == ["torch", "cpu"]


@pytest.mark.parametrize("logit_scale", [1.0, 100.0])
@pytest.mark.parametrize("n, dim", [(1, 3), (7, 5), (300, 37), (513, 100)])  # the CPU tile is 256
def test_matches_float64_reference(n, dim, logit_scale):
    image, text = features(n, dim)
    scale = torch.tensor(logit_scale)
    fused = loss_and_grads(lambda i, t, s: kernels.contrastive_loss(i, t, s, backend="cpu"), image, text, scale)
    assert_close_relative(fused, float64_reference(reference.contrastive_loss, image, text, scale), rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_features(dtype):
    image, text = (f.to(dtype) for f in features(300, 37))
    scale = torch.tensor(100.0)
    fused = loss_and_grads(lambda i, t, s: kernels.contrastive_loss(i, t, s, backend="cpu"), image, text, scale)
    assert fused[0].dtype == torch.float32 and fused[1].dtype == dtype
    expected = float64_reference(reference.contrastive_loss, image, text, scale)  # same rounded inputs
    assert_close_relative(fused[:1], expected[:1], rtol=1e-5)  # fp32 accumulation throughout
    assert_close_relative(fused, expected, rtol=1e-2)  # gradients rounded to the features' dtype


@pytest.mark.parametrize("local_form", [False, True])
def test_inside_autocast_region(local_form):
    """train.py calls the op under torch.autocast(bf16): its tile matmuls must stay fp32 there."""
    image, text = (f.to(torch.bfloat16) for f in features(300, 37))
    scale = torch.tensor(30.0)
    if local_form:
        def fused_fn(i, t, s):
            return kernels.contrastive_loss_local(i[:150], t[:150], i, t, s, 0, backend="cpu")

        def reference_fn(i, t, s):
            return reference.contrastive_loss_local(i[:150], t[:150], i, t, s, 0)
    else:
        def fused_fn(i, t, s):
            return kernels.contrastive_loss(i, t, s, backend="cpu")

        reference_fn = reference.contrastive_loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = loss_and_grads(fused_fn, image, text, scale)
    assert_close_relative(fused, float64_reference(reference_fn, image, text, scale), rtol=1e-2)
    assert_close_relative(fused[:1], float64_reference(reference_fn, image, text, scale)[:1], rtol=1e-5)


def test_confident_pairs():
    # Loss ~1e-7: the positive dominates every row and column. A float32 log_softmax loses the
    # gradients here (~1e-2 relative error); the op keeps them via expm1/log1p around the positive.
    image, text = features(600, 256)
    scale = torch.tensor(100.0)
    fused = loss_and_grads(lambda i, t, s: kernels.contrastive_loss(i, t, s, backend="cpu"), image, text, scale)
    expected = float64_reference(reference.contrastive_loss, image, text, scale)
    assert expected[0] < 1e-6
    assert abs(fused[0].double() - expected[0]) <= 1e-5 * expected[0]  # relative to the tiny loss itself
    # Gradients ~1e-6 here: fp32 rounding of the ~100-sized logits sets their floor. 3e-5, not 1e-5: a
    # 16-thread AVX-512 machine (torch 2.11) measured 1.2e-5, this 2-core one below 1e-5.
    assert_close_relative(fused, expected, rtol=3e-5)


@pytest.mark.parametrize("logit_scale", [1.0, 100.0])
def test_near_duplicate_features(logit_scale):
    image, text = features(300, 64, near_duplicates=True)
    scale = torch.tensor(logit_scale)
    fused = loss_and_grads(lambda i, t, s: kernels.contrastive_loss(i, t, s, backend="cpu"), image, text, scale)
    assert_close_relative(fused, float64_reference(reference.contrastive_loss, image, text, scale), rtol=1e-5)


def test_exact_ties():
    # Every logit equal: each row's log-sum-exp is logit + log(N), built from tile maxima that tie.
    n = 300
    image = text = F.normalize(torch.ones(n, 8), dim=-1)
    loss, image_grad, text_grad, _ = loss_and_grads(
        lambda i, t, s: kernels.contrastive_loss(i, t, s, backend="cpu"), image, text, torch.tensor(100.0)
    )
    assert torch.allclose(loss, torch.tensor(n).log(), rtol=1e-6)
    assert image_grad.abs().max() < 1e-6 and text_grad.abs().max() < 1e-6  # equal features, sum_j G_ij = 0


def test_non_contiguous_features():
    image, text = features(300, 74)
    image, text = image[:, ::2], text.T.contiguous().T[:, 1::2]  # strided and transposed views
    scale = torch.tensor(30.0)
    fused = loss_and_grads(lambda i, t, s: kernels.contrastive_loss(i, t, s, backend="cpu"), image, text, scale)
    assert_close_relative(fused, float64_reference(reference.contrastive_loss, image, text, scale), rtol=1e-5)


@pytest.mark.parametrize("n, ranks, rank", [(450, 3, 1), (600, 2, 1), (20, 4, 0)])
def test_local_form_matches_float64_reference(n, ranks, rank):
    inputs, offset = local_inputs(n, ranks, rank, dim=33)
    scale = torch.tensor(100.0)
    fused = loss_and_grads(
        lambda *x: kernels.contrastive_loss_local(*x[:4], x[4], offset, backend="cpu"), *inputs, scale
    )
    expected = float64_reference(lambda *x: reference.contrastive_loss_local(*x[:4], x[4], offset), *inputs, scale)
    assert_close_relative(fused, expected, rtol=1e-5)


def test_local_form_with_one_rank_is_the_full_loss():
    image, text = features(300, 20)
    scale = torch.tensor(50.0)
    full = loss_and_grads(lambda i, t, s: kernels.contrastive_loss(i, t, s, backend="cpu"), image, text, scale)
    local = loss_and_grads(
        lambda i, t, s: kernels.contrastive_loss_local(i, t, i, t, s, 0, backend="cpu"), image, text, scale
    )
    assert_close_relative(local, full, rtol=1e-5)


def test_gradcheck_float64():
    image, text = features(6, 4)
    scale = torch.tensor(7.0, dtype=torch.float64)
    inputs = tuple(t.double().requires_grad_() for t in (image, text, scale))
    assert torch.autograd.gradcheck(lambda i, t, s: kernels.contrastive_loss(i, t, s, backend="cpu"), inputs)


def test_gradcheck_float64_local_form():
    inputs, offset = local_inputs(6, 2, 1, dim=4)
    inputs = tuple(t.double().requires_grad_() for t in (*inputs, torch.tensor(7.0)))
    assert torch.autograd.gradcheck(lambda *x: kernels.contrastive_loss_local(*x[:4], x[4], offset, backend="cpu"), inputs)


def op_samples(device: str = "cpu") -> list[tuple]:
    image, text = (f.to(device) for f in features(20, 9))
    scale = torch.tensor(10.0, device=device)
    (local_image, local_text, image_all, text_all), offset = local_inputs(20, 2, 1, dim=9)
    local = [t.to(device) for t in (local_image, local_text, image_all, text_all)]
    crossmodal_ops = torch.ops.crossmodal
    _, lse_image, lse_text = crossmodal_ops.contrastive_loss_forward(image, text, scale)
    _, local_lse_image, local_lse_text = crossmodal_ops.contrastive_loss_local_forward(*local, scale, offset)
    grad = torch.tensor(1.3, device=device)
    with_grad = [t.clone().requires_grad_() for t in (image, text, scale)]
    local_with_grad = [t.clone().requires_grad_() for t in (*local, scale)]
    block = 7  # explicit block sizes (not dividing 20 or 10) besides the default
    return [
        (crossmodal_ops.contrastive_loss_forward.default, (image, text, scale)),
        (crossmodal_ops.contrastive_loss_forward.default, tuple(with_grad)),
        (crossmodal_ops.contrastive_loss_forward.default, (*with_grad, block)),
        (crossmodal_ops.contrastive_loss_backward.default, (grad, image, text, scale, lse_image, lse_text)),
        (crossmodal_ops.contrastive_loss_backward.default, (grad, image, text, scale, lse_image, lse_text, block)),
        (crossmodal_ops.contrastive_loss_local_forward.default, (*local, scale, offset)),
        (crossmodal_ops.contrastive_loss_local_forward.default, (*local_with_grad, offset)),
        (crossmodal_ops.contrastive_loss_local_forward.default, (*local_with_grad, offset, block)),
        (
            crossmodal_ops.contrastive_loss_local_backward.default,
            (grad, *local, scale, offset, local_lse_image, local_lse_text),
        ),
        (
            crossmodal_ops.contrastive_loss_local_backward.default,
            (grad, *local, scale, offset, local_lse_image, local_lse_text, block),
        ),
    ]


def test_opcheck():
    for op, args in op_samples():
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    image, text = features(300, 16)
    scale = torch.tensor(20.0)

    def loss_fn(image, text, logit_scale):
        return kernels.contrastive_loss(image, text, logit_scale, backend="cpu")

    compiled = loss_and_grads(torch.compile(loss_fn, fullgraph=True), image, text, scale)
    assert_close_relative(compiled, loss_and_grads(loss_fn, image, text, scale), rtol=1e-6)


def test_deterministic():
    image, text = features(600, 32)
    scale = torch.tensor(100.0)
    run = lambda: loss_and_grads(lambda i, t, s: kernels.contrastive_loss(i, t, s, backend="cpu"), image, text, scale)
    for first, second in zip(run(), run()):
        assert torch.equal(first, second)


def test_backend_selection(monkeypatch):
    image, text = features(10, 4)
    scale = torch.tensor(10.0)
    with pytest.raises(ValueError, match="unknown backend"):
        kernels.contrastive_loss(image, text, scale, backend="triton")
    if "cuda" not in kernels.available_backends():
        with pytest.raises(RuntimeError, match="unavailable"):
            kernels.contrastive_loss(image, text, scale, backend="cuda")
    expected = reference.contrastive_loss(image, text, scale)
    assert torch.equal(kernels.contrastive_loss(image, text, scale, backend="torch"), expected)

    # Without the extension, "auto" falls back to the reference with one warning.
    monkeypatch.setattr(ops, "_EXTENSION_ERROR", ImportError("not built"))
    monkeypatch.setattr(ops, "_BACKENDS", ("torch",))
    monkeypatch.setattr(ops, "_warned_fallback", False)
    with pytest.warns(UserWarning, match="not built"):
        assert torch.equal(kernels.contrastive_loss(image, text, scale), expected)
    with pytest.raises(RuntimeError, match="unavailable"):
        kernels.contrastive_loss(image, text, scale, backend="cpu")


# ---- Block sizes: the matmul blocks a GPU runs (4096 there), with the CPU epilogues ----


@pytest.mark.parametrize(
    "n, block_size", [(300, 7), (300, 100), (300, 299), (300, 300), (300, 1000), (50, 1), (1, 4)]
)  # blocks that do not divide N, one block larger than N, single-row blocks, N = 1
def test_block_sizes_float64_parity(n, block_size):
    image, text = (f.double() for f in features(n, 37))
    scale = torch.tensor(30.0, dtype=torch.float64)
    fused = loss_and_grads(
        lambda i, t, s: kernels.contrastive_loss(i, t, s, backend="cpu", block_size=block_size), image, text, scale
    )
    assert_close_relative(fused, loss_and_grads(reference.contrastive_loss, image, text, scale), rtol=1e-10)


@pytest.mark.parametrize("block_size", [64, 1000])  # 150 local rows, 450 columns: ragged blocks; one block
def test_block_sizes_local_form_float64_parity(block_size):
    inputs, offset = local_inputs(450, 3, 1, dim=33)
    inputs = [t.double() for t in inputs]
    scale = torch.tensor(100.0, dtype=torch.float64)
    fused = loss_and_grads(
        lambda *x: kernels.contrastive_loss_local(*x[:4], x[4], offset, backend="cpu", block_size=block_size),
        *inputs,
        scale,
    )
    expected = loss_and_grads(lambda *x: reference.contrastive_loss_local(*x[:4], x[4], offset), *inputs, scale)
    assert_close_relative(fused, expected, rtol=1e-10)


@pytest.mark.parametrize("block_size", [100, 4096])  # 4096: the CUDA default, one block here
def test_block_sizes_float32(block_size):
    image, text = features(513, 100, near_duplicates=True)
    scale = torch.tensor(100.0)
    fused = loss_and_grads(
        lambda i, t, s: kernels.contrastive_loss(i, t, s, backend="cpu", block_size=block_size), image, text, scale
    )
    assert_close_relative(fused, float64_reference(reference.contrastive_loss, image, text, scale), rtol=1e-5)


def test_gradcheck_float64_blocks():
    image, text = features(10, 4)
    scale = torch.tensor(7.0, dtype=torch.float64)
    inputs = tuple(t.double().requires_grad_() for t in (image, text, scale))
    assert torch.autograd.gradcheck(
        lambda i, t, s: kernels.contrastive_loss(i, t, s, backend="cpu", block_size=4), inputs
    )
    local, offset = local_inputs(10, 2, 1, dim=4)
    local = tuple(t.double().requires_grad_() for t in (*local, torch.tensor(7.0)))
    assert torch.autograd.gradcheck(
        lambda *x: kernels.contrastive_loss_local(*x[:4], x[4], offset, backend="cpu", block_size=3), local
    )


def test_negative_block_size_is_rejected():
    image, text = features(10, 4)
    with pytest.raises(RuntimeError, match="block must be >= 0"):
        kernels.contrastive_loss(image, text, torch.tensor(10.0), backend="cpu", block_size=-1)


# ---- CUDA (run only where a GPU is visible) ----


@requires_cuda
def test_cuda_backend_available():
    assert "cuda" in kernels.available_backends()


@requires_cuda
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize("logit_scale", [1.0, 100.0])
@pytest.mark.parametrize("n, dim", [(1, 3), (130, 37), (300, 100)])  # one 4096 block; smaller blocks below
def test_cuda_matches_float64_reference(n, dim, logit_scale, dtype, rtol):
    image, text = (f.to("cuda", dtype) for f in features(n, dim))
    scale = torch.tensor(logit_scale, device="cuda")
    fused = loss_and_grads(lambda i, t, s: kernels.contrastive_loss(i, t, s, backend="cuda"), image, text, scale)
    expected = float64_reference(reference.contrastive_loss, image, text, scale)
    assert_close_relative(fused[:1], expected[:1], rtol=1e-5)
    assert_close_relative(fused, expected, rtol=rtol)


@requires_cuda
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize("block_size", [64, 100, 1000])  # ragged blocks (300 = 4 x 64 + 44); one block
def test_cuda_block_sizes(block_size, dtype, rtol):
    image, text = (f.to("cuda", dtype) for f in features(300, 100, near_duplicates=True))
    scale = torch.tensor(100.0, device="cuda")
    fused = loss_and_grads(
        lambda i, t, s: kernels.contrastive_loss(i, t, s, backend="cuda", block_size=block_size), image, text, scale
    )
    expected = float64_reference(reference.contrastive_loss, image, text, scale)
    assert_close_relative(fused[:1], expected[:1], rtol=1e-5)
    assert_close_relative(fused, expected, rtol=rtol)

    inputs, offset = local_inputs(450, 3, 1, dim=33)
    inputs = [t.to("cuda", dtype) for t in inputs]
    fused = loss_and_grads(
        lambda *x: kernels.contrastive_loss_local(*x[:4], x[4], offset, backend="cuda", block_size=block_size),
        *inputs,
        scale,
    )
    expected = float64_reference(lambda *x: reference.contrastive_loss_local(*x[:4], x[4], offset), *inputs, scale)
    assert_close_relative(fused, expected, rtol=rtol)


@requires_cuda
def test_cuda_scratch_is_one_block():
    n, dim, block_size = 8192, 64, 1024
    image, text = (f.cuda().requires_grad_() for f in features(n, dim))
    scale = torch.tensor(30.0, device="cuda", requires_grad=True)
    loss_fn = lambda i, t, s: kernels.contrastive_loss(i, t, s, backend="cuda", block_size=block_size)  # noqa: E731
    loss_fn(image[:2000], text[:2000], scale).backward()  # cuBLAS workspaces are not the loss's memory
    image.grad = text.grad = scale.grad = None
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss_fn(image, text, scale).backward()
    peak = torch.cuda.max_memory_allocated() - baseline
    # one fp32 block of logits (4 MiB), the fp32 gradients and a temporary of their size (6 MiB),
    # while a single N x N fp32 matrix would be 256 MiB
    assert peak <= 2 * 4 * block_size**2 + 4 * (4 * n * dim), peak / 2**20


@requires_cuda
def test_cuda_near_duplicates_and_local_form():
    image, text = (f.cuda() for f in features(300, 64, near_duplicates=True))
    scale = torch.tensor(100.0, device="cuda")
    fused = loss_and_grads(lambda i, t, s: kernels.contrastive_loss(i, t, s, backend="cuda"), image, text, scale)
    assert_close_relative(fused, float64_reference(reference.contrastive_loss, image, text, scale), rtol=1e-5)

    inputs, offset = local_inputs(450, 3, 1, dim=33)
    inputs = [t.cuda() for t in inputs]
    fused = loss_and_grads(
        lambda *x: kernels.contrastive_loss_local(*x[:4], x[4], offset, backend="cuda"), *inputs, scale
    )
    expected = float64_reference(lambda *x: reference.contrastive_loss_local(*x[:4], x[4], offset), *inputs, scale)
    assert_close_relative(fused, expected, rtol=1e-5)


@requires_cuda
def test_cuda_opcheck_and_compile():
    for op, args in op_samples("cuda"):
        torch.library.opcheck(op, args)
    image, text = (f.cuda() for f in features(300, 16))
    scale = torch.tensor(20.0, device="cuda")

    def loss_fn(image, text, logit_scale):
        return kernels.contrastive_loss(image, text, logit_scale, backend="cuda")

    compiled = loss_and_grads(torch.compile(loss_fn, fullgraph=True), image, text, scale)
    assert_close_relative(compiled, loss_and_grads(loss_fn, image, text, scale), rtol=1e-6)


@requires_cuda
def test_cuda_float64_auto_uses_reference():
    image, text = (f.cuda().double() for f in features(20, 8))
    scale = torch.tensor(10.0, device="cuda", dtype=torch.float64)
    assert torch.equal(kernels.contrastive_loss(image, text, scale), reference.contrastive_loss(image, text, scale))
