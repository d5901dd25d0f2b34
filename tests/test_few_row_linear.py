"""The few-row linear op (kernels/csrc/few_row_linear.cpp) against F.linear evaluated in float64, its reference."""
import pytest
import torch
import torch.nn.functional as F

from crossmodal import kernels
from crossmodal.kernels import linear

pytestmark = pytest.mark.skipif(not kernels.few_row_linear_available(), reason="needs the extension on an AVX2 CPU")


def assert_matches_float64_linear(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias=None) -> None:
    """Within float32 rounding of sums of K products."""
    expected = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * weight.shape[1] ** 0.5)


# rows: one, odd (a tile of 2 rows plus one), a decoding step's 6, MAX_ROWS; K and N: multiples of the 8-float
# vector and the 4-row tile, and not (scalar tails)
@pytest.mark.parametrize("rows", [1, 5, 6, linear.MAX_ROWS])
@pytest.mark.parametrize("k, n", [(768, 2304), (37, 13), (8, 4), (3, 1), (1, 130)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_float64_linear(rows, k, n, with_bias):
    generator = torch.Generator().manual_seed(rows * 1000 + k + n)
    x = torch.randn(rows, k, generator=generator)
    weight, bias = torch.randn(n, k, generator=generator), torch.randn(n, generator=generator) if with_bias else None
    assert_matches_float64_linear(kernels.few_row_linear(x, weight, bias), x, weight, bias)


def test_leading_dimensions_and_non_contiguous_input():
    x = torch.randn(2, 3, 1, 64)  # (batch, beams, tokens, K)
    weight = torch.randn(40, 96)[:, :64]  # a view with a row stride of 96
    x_t = torch.randn(64, 6).T  # non-contiguous rows
    assert_matches_float64_linear(kernels.few_row_linear(x, weight), x, weight)
    assert_matches_float64_linear(kernels.few_row_linear(x_t, weight), x_t, weight)
    assert kernels.few_row_linear(torch.randn(0, 64), weight).shape == (0, 40)
    bias = torch.randn(40)
    assert torch.equal(kernels.few_row_linear(torch.randn(3, 0), torch.randn(40, 0), bias), bias.expand(3, 40))


def test_falls_back_to_f_linear_where_the_op_does_not_run():
    x, weight = torch.randn(4, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    assert torch.equal(kernels.few_row_linear(x, weight), F.linear(x, weight))  # float64: F.linear itself
    weight = torch.randn(3, 8, requires_grad=True)
    kernels.few_row_linear(torch.randn(4, 8), weight).sum().backward()  # a gradient: F.linear, which has one
    assert weight.grad is not None


def test_rejects_what_it_cannot_multiply():
    with pytest.raises(RuntimeError, match="input \\(..., K\\) and weight \\(N, K\\)"):
        torch.ops.crossmodal.few_row_linear(torch.randn(2, 8), torch.randn(3, 9), None)
    with pytest.raises(RuntimeError, match="bias of N = 3"):
        torch.ops.crossmodal.few_row_linear(torch.randn(2, 8), torch.randn(3, 8), torch.randn(4))
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.crossmodal.few_row_linear(torch.randn(2, 8).double(), torch.randn(3, 8).double(), None)


def test_opcheck():
    args = (torch.randn(6, 1, 32), torch.randn(20, 32), torch.randn(20))
    torch.library.opcheck(torch.ops.crossmodal.few_row_linear, args)
