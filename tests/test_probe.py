"""probe.py: the L-BFGS solver against scikit-learn's LogisticRegression (test-only peer) and a known
limit, the lambda search's grid, k-shot sampling, the metrics against sklearn.metrics, and the whole
probe on a checkpoint that train.py wrote."""
import pytest
import torch

from crossmodal.evaluation import probe
from crossmodal import train
from tests.test_train import small_run, tokenizer_path  # noqa: F401  (module-scoped fixture)

sklearn = pytest.importorskip("sklearn")
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score  # noqa: E402
from crossmodal import recipes


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def logistic_data(n=300, dim=8, classes=4, seed=0):
    """Features and labels drawn from a known multinomial logistic model."""
    generator = torch.Generator().manual_seed(seed)
    true_weight = 2 * torch.randn(classes, dim, generator=generator, dtype=torch.float64)
    x = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(x @ true_weight.T, -1), 1, generator=generator).squeeze(1)
    return x, y


@pytest.mark.parametrize("lam", [0.3, 30.0])
def test_solver_matches_sklearn(lam):
    x, y = logistic_data()
    weight, bias = probe.fit_logistic(x, y, 4, lam)
    # sklearn minimises C * sum(loss) + ||W||^2 / 2: the same function as ours, divided by C = 1 / lambda
    reference = LogisticRegression(C=1 / lam, tol=1e-12, max_iter=100_000).fit(x.numpy(), y.numpy())
    torch.testing.assert_close(weight, torch.tensor(reference.coef_), atol=1e-5, rtol=0)
    intercept = torch.tensor(reference.intercept_)
    torch.testing.assert_close(bias, intercept - intercept.mean(), atol=1e-5, rtol=0)
    torch.testing.assert_close(probe.predict(weight, bias, x), torch.tensor(reference.predict_proba(x.numpy())),
                               atol=1e-6, rtol=0)


def test_strong_regularisation_leaves_the_class_priors():
    x, y = logistic_data()
    weight, bias = probe.fit_logistic(x, y, 4, 1e9)
    assert weight.abs().max() < 1e-5
    log_priors = torch.bincount(y, minlength=4).double().log()
    torch.testing.assert_close(bias, log_priors - log_priors.mean(), atol=1e-5, rtol=0)


def test_lambda_search_is_the_papers_binary_search():
    x, y = logistic_data(n=400)
    lam, sweep = probe.choose_lambda((x[:300], y[:300]), (x[300:], y[300:]), 4)
    exponents = sorted(round(8 * torch.tensor(value).log10().item()) for value in sweep)
    assert len(sweep) <= 7 + 2 * 4 and all(-48 <= e <= 48 for e in exponents)
    assert set(range(-48, 49, 16)) <= set(exponents)  # the coarse grid, every 2 decades
    best = round(8 * torch.tensor(lam).log10().item())
    assert sweep[lam] == max(sweep.values())
    assert best - 1 in exponents or best + 1 in exponents  # refined around the best down to 1/8 decade


def test_k_shot_sampling_takes_exactly_k_per_class_and_is_seeded():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 7)[torch.randperm(22, generator=torch.Generator().manual_seed(0))]
    chosen = probe.sample_shots(labels, 4, seed=1)
    assert torch.bincount(labels[chosen], minlength=3).tolist() == [4, 4, 4] and len(set(chosen.tolist())) == 12
    assert torch.equal(chosen, probe.sample_shots(labels, 4, seed=1))
    assert not torch.equal(chosen, probe.sample_shots(labels, 4, seed=2))
    with pytest.raises(ValueError, match="class 1 has 5 training images, fewer than 8 shots"):
        probe.sample_shots(labels, 8, seed=0)
    kept, held = probe.holdout_split(labels, 0.2, seed=0)
    assert sorted(kept.tolist() + held.tolist()) == list(range(22))
    assert torch.bincount(labels[held], minlength=3).tolist() == [2, 1, 1]


def test_metrics_match_sklearn():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (200,), generator=generator)  # class 5 never occurs
    predictions = torch.where(torch.rand(200, generator=generator) < 0.6, labels,
                              torch.randint(0, 6, (200,), generator=generator))
    predictions[predictions == 3] = 4  # class 3 is never predicted
    report = probe.classification_report(predictions, labels, 6)
    y, p, every = labels.numpy(), predictions.numpy(), list(range(6))
    assert report["top1"] == pytest.approx(100 * (p == y).mean())
    assert report["macro_f1"] == pytest.approx(100 * f1_score(y, p, average="macro", zero_division=0))
    precision = precision_score(y, p, labels=every, average=None, zero_division=0)
    assert report["precision"] == pytest.approx(100 * precision)
    assert report["recall"] == pytest.approx(100 * recall_score(y, p, labels=every, average=None, zero_division=0))
    assert report["confusion_matrix"] == confusion_matrix(y, p, labels=every).tolist()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_path):  # noqa: F811
    out = tmp_path_factory.mktemp("run")
    train.main(small_run(out, tokenizer_path, "--train.steps=3", "--data.val=shapes:val:16", "--data.heldout="))
    return str(out / "checkpoint.pt")


def test_probe_on_a_trained_checkpoint(checkpoint, tmp_path):
    from crossmodal import eval as evaluation

    cfg, model, tokenizer = recipes.load_run(checkpoint)
    plot = str(tmp_path / "confusion.png")
    results = probe.linear_probe(model, tokenizer, "shapes:train:360", None, cfg.data.image_size,
                                 test_spec="shapes:val:120", shots=(2,), seeds=(0, 1), batch_size=128,
                                 plot_path=plot)
    assert {"top1", "macro_f1", "precision", "recall", "confusion_matrix", "lambda", "sweep", "shots"} <= set(results)
    assert results["num_classes"] == 36 and len(results["precision"]) == 36 and results["num_test"] == 120
    assert sum(map(sum, results["confusion_matrix"])) == 120 and results["num_train"] == 360
    assert 0 <= results["top1"] <= 100 and 1e-6 <= results["lambda"] <= 1e6
    two_shot = results["shots"]["2"]
    assert [run["seed"] for run in two_shot["runs"]] == [0, 1] and 0 <= two_shot["top1_mean"] <= 100
    assert two_shot["top1_std"] == pytest.approx(abs(two_shot["runs"][0]["top1"] - two_shot["runs"][1]["top1"]) / 2)
    table = probe.scalar_metrics(results)
    assert {"top1", "macro_f1", "2-shot top1", "2-shot top1 std"} <= set(table)
    try:
        import matplotlib  # noqa: F401
        assert results["confusion_png"] == plot and open(plot, "rb").read(4) == b"\x89PNG"
    except ImportError:
        assert results["confusion_png"] is None
