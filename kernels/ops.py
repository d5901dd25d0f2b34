"""Python side of the fused contrastive losses: loads `kernels._C`, registers the fake (meta) kernels
and autograd of the `crossmodal::` ops, and picks a backend.

The sigmoid loss (`siglip_loss`, SigLIP: Zhai et al. 2023) is one pass over the same blocks
(kernels/csrc/siglip_loss.cpp): each entry's gradient depends on that entry alone, so the forward
returns the gradients for an upstream gradient of 1 along with the loss (three matmuls per block in
all) and its backward only scales them. Extra memory: a block of logits, the fp32 feature gradients
and O(N) row sums.

The loss is the symmetric InfoNCE of CLIP (Radford et al. 2021) computed in blocks as in Inf-CL
(Cheng et al. 2024, arXiv 2410.17243): the forward keeps only per-row and per-column log-sum-exps,
the backward recomputes each block. Each block of logits is one ATen matmul (cuBLAS on a GPU, so
tensor cores for bf16/fp16 and for TF32 when torch allows it) followed by a custom epilogue; the
gradient products are matmuls too (as in Liger-Kernel's fused linear cross entropy). Extra memory is
one block of logits (block_size^2 fp32, plus block_size^2 bf16/fp16 for G with such features), fp32
gradient accumulators (N x D) and O(N) LSEs.
Differences from Inf-CL: one pass yields both directions' LSEs (Inf-CL runs the one-directional loss
twice), the logit-scale gradient is exact per rank (no all-reduce inside the op), any feature
dimension works, bf16/fp16 features go to cuBLAS as they are, and the positive pair's terms use
log1p/expm1, so confident pairs keep accurate gradients.

Backends: "torch" (kernels.reference, also the fallback), "cpu" and "cuda" (the extension), "auto"
(the extension on the features' device when built, else "torch" with a one-time warning).
"""
import warnings

import torch

from . import reference

try:
    from . import _C  # noqa: F401  (its static initialisers register torch.ops.crossmodal.*)

    _EXTENSION_ERROR: Exception | None = None
except (ImportError, OSError) as error:
    _EXTENSION_ERROR = error


def _extension_backends() -> tuple[str, ...]:
    if _EXTENSION_ERROR is not None:
        return ()
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("crossmodal::contrastive_loss_forward", "CUDA")
    return ("cpu", "cuda") if has_cuda_kernel and torch.cuda.is_available() else ("cpu",)


_BACKENDS = ("torch",) + _extension_backends()  # fixed at import, so torch.compile sees constants
_warned_fallback = False


def available_backends() -> list[str]:
    """Backends usable in this process, e.g. ["torch", "cpu"] or ["torch", "cpu", "cuda"]."""
    return list(_BACKENDS)


def _select_backend(backend: str, features: torch.Tensor) -> str:
    global _warned_fallback
    if backend not in ("auto", "torch", "cpu", "cuda"):
        raise ValueError(f"unknown backend {backend!r}; choose from 'auto', 'torch', 'cpu', 'cuda'")
    device = features.device.type
    if backend == "auto":
        # The CUDA kernel accumulates in fp32, so float64 (gradcheck) on a GPU goes to the reference.
        if device in _BACKENDS and not (device == "cuda" and features.dtype == torch.float64):
            return device
        if _EXTENSION_ERROR is not None and not _warned_fallback:
            _warned_fallback = True
            warnings.warn(f"kernels._C is unavailable ({_EXTENSION_ERROR}); using the pure-PyTorch contrastive loss")
        return "torch"
    if backend != "torch":
        if backend not in _BACKENDS:
            raise RuntimeError(f"backend {backend!r} is unavailable here; available: {_BACKENDS}")
        if device != backend:
            raise ValueError(f"backend {backend!r} got features on {features.device}")
    return backend


def _prepare(logit_scale: torch.Tensor | float, *features: torch.Tensor) -> tuple[torch.Tensor, ...]:
    dtype = features[0].dtype
    for f in features[1:]:
        dtype = torch.promote_types(dtype, f.dtype)
    logit_scale = torch.as_tensor(logit_scale, device=features[0].device)
    return (logit_scale,) + tuple(f.to(dtype) for f in features)


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    backend: str = "auto",
    block_size: int = 0,
) -> torch.Tensor:
    """Symmetric InfoNCE of one batch: (CE(S) + CE(S^T)) / 2 with S = logit_scale * image @ text^T.

    image_features, text_features: (N, D), normally L2-normalised; logit_scale: the multiplier tau
    (already exp'd and clamped), a 0-dim tensor that receives a gradient. Returns a 0-dim float32
    loss (float64 for float64 features); gradients come back in the features' dtype.
    block_size: rows and columns of S per matmul block of the extension (0: 256 on the CPU, 4096 on
    a GPU); it bounds the scratch memory to block_size^2 logits. Ignored by the "torch" backend.
    """
    if _select_backend(backend, image_features) == "torch":
        return reference.contrastive_loss(image_features, text_features, logit_scale)
    logit_scale, image_features, text_features = _prepare(logit_scale, image_features, text_features)
    loss, _, _ = torch.ops.crossmodal.contrastive_loss_forward(image_features, text_features, logit_scale, block_size)
    return loss


def contrastive_loss_local(
    image_local: torch.Tensor,
    text_local: torch.Tensor,
    image_all: torch.Tensor,
    text_all: torch.Tensor,
    logit_scale: torch.Tensor | float,
    offset: int,
    backend: str = "auto",
    block_size: int = 0,
) -> torch.Tensor:
    """One rank's distributed loss, open_clip's local-loss mode:
    0.5 * (CE(scale * image_local @ text_all^T, labels) + CE(scale * text_local @ image_all^T, labels)),
    labels = offset + arange(b), each a mean over the b local rows.

    *_local: (b, D) this rank's features; *_all: (N, D) all ranks' features gathered with gradient
    (rows offset ... offset + b - 1 are this rank's). Gradients flow to all four feature tensors and
    to logit_scale; the all-gather's backward routes the gathered ones home. Averaging the ranks'
    parameter gradients (as DDP does) then gives exactly the full-batch contrastive_loss gradients.
    block_size: as in contrastive_loss.
    """
    if _select_backend(backend, image_local) == "torch":
        return reference.contrastive_loss_local(image_local, text_local, image_all, text_all, logit_scale, offset)
    logit_scale, image_local, text_local, image_all, text_all = _prepare(
        logit_scale, image_local, text_local, image_all, text_all
    )
    loss, _, _ = torch.ops.crossmodal.contrastive_loss_local_forward(
        image_local, text_local, image_all, text_all, logit_scale, offset, block_size
    )
    return loss


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    backend: str = "auto",
    block_size: int = 0,
) -> torch.Tensor:
    """Sigmoid loss of one batch: -(1/N) sum_ij log sigmoid(z_ij (t x_i.y_j + b)), z = +1 on the diagonal.

    image_features, text_features: (N, D), normally L2-normalised; logit_scale t (already exp'd) and
    logit_bias b: 0-dim tensors that receive gradients. The same value and gradients as
    `losses.contrastive.siglip_loss` on one process. Returns a 0-dim float32 loss (float64 for float64
    features). block_size: as in contrastive_loss.
    """
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(f"image and text batches differ: {image_features.shape[0]} vs {text_features.shape[0]}")
    return siglip_loss_local(image_features, text_features, logit_scale, logit_bias, 0, backend, block_size)


def siglip_loss_local(
    image_local: torch.Tensor,
    text_all: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    offset: int,
    backend: str = "auto",
    block_size: int = 0,
) -> torch.Tensor:
    """One rank's sigmoid loss: its b images against all N gathered texts, image i's positive at text
    offset + i, a mean over the b local images (big_vision's normalisation). Gradients flow to both feature
    tensors (the all-gather's backward routes text_all's home), logit_scale and logit_bias; DDP's average
    over ranks then equals the full-batch gradient. One all-gather instead of big_vision's ring of
    permutes: the same result, and the op still never holds more than a block of the b x N logits.
    """
    if _select_backend(backend, image_local) == "torch":
        return reference.siglip_loss_local(image_local, text_all, logit_scale, logit_bias, offset)
    logit_scale, image_local, text_all = _prepare(logit_scale, image_local, text_all)
    logit_bias = torch.as_tensor(logit_bias, device=image_local.device)
    inputs = (image_local, text_all, logit_scale, logit_bias)
    with_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    loss, *_ = torch.ops.crossmodal.siglip_loss_forward(*inputs, offset, block_size, with_grad)
    return loss


def _accumulation_dtype(features: torch.Tensor) -> torch.dtype:
    return torch.promote_types(features.dtype, torch.float32)


def _register() -> None:
    @torch.library.register_fake("crossmodal::contrastive_loss_forward")
    def _(image, text, logit_scale, block=0):
        dtype = _accumulation_dtype(image)  # each LSE as (2, N): [max; log_sum]
        return image.new_empty((), dtype=dtype), image.new_empty(2, image.shape[0], dtype=dtype), text.new_empty(
            2, text.shape[0], dtype=dtype
        )

    @torch.library.register_fake("crossmodal::contrastive_loss_backward")
    def _(grad, image, text, logit_scale, lse_image, lse_text, block=0):
        return torch.empty_like(image), torch.empty_like(text), torch.empty_like(logit_scale)

    @torch.library.register_fake("crossmodal::contrastive_loss_local_forward")
    def _(image_local, text_local, image_all, text_all, logit_scale, offset, block=0):
        dtype = _accumulation_dtype(image_local)
        b = image_local.shape[0]
        return image_local.new_empty((), dtype=dtype), image_local.new_empty(2, b, dtype=dtype), text_local.new_empty(
            2, b, dtype=dtype
        )

    @torch.library.register_fake("crossmodal::contrastive_loss_local_backward")
    def _(grad, image_local, text_local, image_all, text_all, logit_scale, offset, lse_image, lse_text, block=0):
        return tuple(torch.empty_like(t) for t in (image_local, text_local, image_all, text_all, logit_scale))

    # The backward gets the forward's block size: its recomputed logits must round as the forward's.
    def setup_context(ctx, inputs, output):
        *features_and_scale, block = inputs
        _, lse_image, lse_text = output
        ctx.mark_non_differentiable(lse_image, lse_text)
        ctx.save_for_backward(*features_and_scale, lse_image, lse_text)
        ctx.block = block

    def backward(ctx, grad, _grad_lse_image, _grad_lse_text):
        grads = torch.ops.crossmodal.contrastive_loss_backward(grad, *ctx.saved_tensors, ctx.block)
        return (*grads, None)  # no gradient for block

    torch.library.register_autograd("crossmodal::contrastive_loss_forward", backward, setup_context=setup_context)

    def setup_context_local(ctx, inputs, output):
        *features_and_scale, offset, block = inputs
        _, lse_image, lse_text = output
        ctx.mark_non_differentiable(lse_image, lse_text)
        ctx.save_for_backward(*features_and_scale, lse_image, lse_text)
        ctx.offset, ctx.block = offset, block

    def backward_local(ctx, grad, _grad_lse_image, _grad_lse_text):
        image_local, text_local, image_all, text_all, logit_scale, lse_image, lse_text = ctx.saved_tensors
        grads = torch.ops.crossmodal.contrastive_loss_local_backward(
            grad, image_local, text_local, image_all, text_all, logit_scale, ctx.offset, lse_image, lse_text, ctx.block
        )
        return (*grads, None, None)  # no gradient for offset and block

    torch.library.register_autograd(
        "crossmodal::contrastive_loss_local_forward", backward_local, setup_context=setup_context_local
    )


    @torch.library.register_fake("crossmodal::siglip_loss_forward")
    def _(image, text, logit_scale, logit_bias, offset=0, block=0, with_grad=True):
        dtype = _accumulation_dtype(image)
        if not with_grad:
            return (image.new_empty((), dtype=dtype),) + tuple(image.new_empty(0, dtype=dtype) for _ in range(4))
        return (image.new_empty((), dtype=dtype), image.new_empty(image.shape, dtype=dtype),
                text.new_empty(text.shape, dtype=dtype), image.new_empty((), dtype=dtype),
                image.new_empty((), dtype=dtype))

    # The forward's gradients are for an upstream gradient of 1; the backward scales them by g.
    def setup_context_siglip(ctx, inputs, output):
        image, text, logit_scale, logit_bias, _offset, _block, with_grad = inputs
        _, *grads = output
        ctx.mark_non_differentiable(*grads)
        ctx.save_for_backward(*grads)
        ctx.with_grad = with_grad
        ctx.like = [(t.dtype, t.shape) for t in (image, text, logit_scale, logit_bias)]

    def backward_siglip(ctx, grad, *_grad_of_grads):
        if not ctx.with_grad:
            raise RuntimeError("siglip_loss_forward ran with with_grad=False: call it with gradients enabled")
        grads = tuple((grad * g).to(dtype).reshape(shape) for g, (dtype, shape) in zip(ctx.saved_tensors, ctx.like))
        return (*grads, None, None, None)  # no gradient for offset, block and with_grad

    torch.library.register_autograd(
        "crossmodal::siglip_loss_forward", backward_siglip, setup_context=setup_context_siglip
    )


if _EXTENSION_ERROR is None:
    _register()
