"""models/packed.py: inside `LinearPacking`, the given modules' products equal F.linear's up to float32 rounding
(few rows on the few-row kernel, many on oneDNN's reordered weights), run only where they may (a CPU, float32, no
gradient, no autocast, the modules given), follow a weight that changes, and leave the modules as they were."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crossmodal.kernels.linear import MAX_ROWS, few_row_linear_available
from crossmodal.models.packed import LinearPacking, linear_modules, onednn_available

pytestmark = pytest.mark.skipif(
    not (onednn_available() and few_row_linear_available()), reason="needs oneDNN and the few-row kernel"
)


class TiedHead(nn.Module):
    """A module that calls F.linear itself, as a tied output layer does."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(48, 48)

    def forward(self, x: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        return F.linear(F.gelu(self.dense(x)), embedding_weight)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 48, bias=False))


@pytest.mark.parametrize("rows", [1, 6, MAX_ROWS + 1, 200])  # decoding steps (few-row kernel), a ViT's (oneDNN)
def test_products_equal_float64_linear_to_float32_rounding(rows):
    model, head, packing = mlp(), TiedHead(), LinearPacking()
    embedding = torch.randn(30, 48)
    x = torch.randn(rows, 1, 48)  # leading dimensions are kept
    reference_model, reference_head = copy.deepcopy(model).double(), copy.deepcopy(head).double()
    expected = reference_head(reference_model(x.double()), embedding.double())
    with torch.no_grad(), packing(linear_modules(model, head) + [head]):
        got = head(model(x), embedding)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    # oneDNN copies only for calls of more than MAX_ROWS rows: both layers, the head's dense and the embedding
    assert len(packing.copies) == (4 if rows > MAX_ROWS else 0)


def test_runs_only_where_it_may_and_leaves_the_modules_as_they_were():
    model, packing = mlp(), LinearPacking()
    x = torch.randn(4 * MAX_ROWS, 48)
    with packing(linear_modules(model)):
        loss = model(x).square().sum()  # with gradient: F.linear itself, and backward works
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(x).dtype == torch.bfloat16  # autocast's own arithmetic
    loss.backward()
    assert model[0].weight.grad is not None and not packing.copies
    with torch.no_grad(), packing([model[2]]):  # only the modules given
        model(x)
    assert list(packing.copies) == [id(model[2].weight)]
    assert all("forward" not in vars(module) for module in model.modules())  # the class's forward again


def test_nested_blocks_leave_the_outer_one_serving():
    model, packing = mlp(), LinearPacking()
    layers = linear_modules(model)
    with torch.no_grad(), packing(layers):
        served = [vars(layer)["forward"] for layer in layers]
        with packing(layers):  # e.g. generate_ids called inside packed_linears()
            model(torch.randn(2, 48))
        assert [vars(layer).get("forward") for layer in layers] == served
    assert all("forward" not in vars(layer) for layer in layers)


def test_a_changed_weight_is_copied_again():
    model, packing = mlp(), LinearPacking()
    x = torch.randn(4 * MAX_ROWS, 48)
    with torch.no_grad(), packing(linear_modules(model)):
        model(x)
        model[0].weight.add_(0.5)  # an optimizer step or load_state_dict: in place, the version moves
        got = model(x)
        expected = F.linear(F.gelu(x @ model[0].weight.T + model[0].bias), model[2].weight)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_copies_do_not_travel_with_a_copied_or_pickled_model():
    model, packing = mlp(), LinearPacking()
    with torch.no_grad(), packing(linear_modules(model)):
        model(torch.randn(4 * MAX_ROWS, 48))
    assert packing.copies
    assert copy.deepcopy(packing).copies == {} and pickle.loads(pickle.dumps(packing)).copies == {}
