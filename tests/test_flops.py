"""benchmarks/flops.py, which every compute benchmark's share of peak rests on: the FLOP count of a step and the
cached matmul peak (measured once per machine, keeping the highest sustained figure)."""
import importlib.util
import json
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


@pytest.fixture
def flops(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("flops", os.path.join(ROOT, "benchmarks", "flops.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("CROSSMODAL_CACHE", str(tmp_path))
    return module


def test_a_step_counts_its_matmuls_forward_and_backward(flops):
    a = torch.randn(8, 16, requires_grad=True)
    b = torch.randn(16, 4, requires_grad=True)
    assert flops.count_flops(torch.mm, a, b) == 2 * 8 * 16 * 4
    assert flops.count_flops(lambda: (a @ b).sum().backward()) == 3 * 2 * 8 * 16 * 4  # both gradients are matmuls


def test_the_peak_is_measured_once_and_the_highest_figure_kept(flops, tmp_path, monkeypatch):
    measured = iter([2.0e11, 1.5e11, 3.0e11])
    calls = []

    def fake_measure(device, dtype):
        calls.append((device, dtype))
        return next(measured)

    monkeypatch.setattr(flops, "measure_peak", fake_measure)
    assert flops.matmul_peak("cpu", torch.float32) == 2.0e11
    assert flops.matmul_peak("cpu", torch.float32) == 2.0e11 and len(calls) == 1  # cached
    assert flops.matmul_peak("cpu", torch.float32, remeasure=True) == 2.0e11  # a lower reading does not replace it
    assert flops.matmul_peak("cpu", torch.float32, remeasure=True) == 3.0e11
    cache = json.loads((tmp_path / "matmul_peaks.json").read_text())
    assert list(cache.values()) == [3.0e11] and "float32" in next(iter(cache)) and "threads" in next(iter(cache))
    (tmp_path / "matmul_peaks.json").write_text("{not json")  # a damaged cache is measured again, not trusted
    monkeypatch.setattr(flops, "measure_peak", lambda device, dtype: 1.0e11)
    assert flops.matmul_peak("cpu", torch.float32) == 1.0e11
    assert flops.rate(2.0e11, 2.0, 1.0e11) == "0.100 TFLOP/s, 100% of peak"


def test_a_real_measurement_is_a_plausible_rate(flops, monkeypatch):
    monkeypatch.setattr(flops, "SIZES", {"cpu": (256,)})
    peak = flops.measure_peak("cpu", torch.float32, repeats=3)
    assert 1e8 < peak < 1e14  # FLOP/s: between a slow core and a GPU
