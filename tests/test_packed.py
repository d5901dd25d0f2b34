"""models/packed.py: oneDNN's matmul on reordered weights gives F.linear's products up to float32 rounding, runs only
where it may (a CPU, float32, no gradient, no autocast, the weights it was given) and follows a weight that changes."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.packed import LinearPacking, linear_weights, onednn_available

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN: packing changes nothing")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 48, bias=False))


def test_products_equal_float64_linear_to_float32_rounding():
    model, packing = mlp(), LinearPacking()
    embedding = torch.randn(30, 48)  # a tied output layer calls F.linear with an embedding's weight
    for rows in (1, 6, 200):  # a decoding step's few rows, a ViT's hundreds
        x = torch.randn(rows, 3, 48)  # leading dimensions are kept
        reference = copy.deepcopy(model).double()
        expected = F.linear(reference(x.double()), embedding.double())
        with torch.no_grad(), packing(linear_weights(model) + [embedding]):
            got = F.linear(model(x), embedding)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert len(packing.copies) == 3  # both layers and the embedding ran on their copies


def test_runs_only_where_it_may():
    model, packing = mlp(), LinearPacking()
    x = torch.randn(4, 48)
    with packing(linear_weights(model)):
        loss = model(x).square().sum()  # with gradient: F.linear itself, and backward works
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(x).dtype == torch.bfloat16  # autocast's own arithmetic
    loss.backward()
    assert model[0].weight.grad is not None and not packing.copies
    with torch.no_grad(), packing(model[2].parameters()):  # only the weights given
        model(x)
    assert list(packing.copies) == [id(model[2].weight)]


def test_a_changed_weight_is_copied_again():
    model, packing = mlp(), LinearPacking()
    x = torch.randn(4, 48)
    with torch.no_grad(), packing(linear_weights(model)):
        model(x)
        model[0].weight.add_(0.5)  # an optimizer step or load_state_dict: in place, the version moves
        got = model(x)
        expected = F.linear(F.gelu(x @ model[0].weight.T + model[0].bias), model[2].weight)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_copies_do_not_travel_with_a_copied_or_pickled_model():
    model, packing = mlp(), LinearPacking()
    with torch.no_grad(), packing(linear_weights(model)):
        model(torch.randn(2, 48))
    assert copy.deepcopy(packing).copies == {} and pickle.loads(pickle.dumps(packing)).copies == {}
