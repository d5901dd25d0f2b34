"""Linear probes on frozen image features, the CLIP paper's protocol (Radford et al., 2021, appendix A.3).

    results = linear_probe(model, tokenizer, "shapes:train:5000", None, image_size=64, device="cpu",
                           test_spec="shapes:val", shots=(1, 2, 4, 8, 16), seeds=(0, 1, 2))

Features: contrastive.encode_marked over data.eval_loader (evaluation preprocessing, L2-normalised, computed
once per split; every fit below reuses them).

Classifier: L2-regularised multinomial logistic regression with a bias, minimising
    J(W, b) = sum_i cross_entropy(W x_i + b, y_i) + (lambda / 2) ||W||^2     (b not penalised)
(computed as J / n, the same minimiser on a scale that does not grow with n)
with torch's L-BFGS (strong Wolfe line search) in float64, from W = 0 or a warm start, until the largest
gradient entry is below GRAD_TOLERANCE (1e-8) or MAX_ITER iterations (W is optimised as
W / sqrt(max(lambda / n, 1)), which keeps strongly regularised problems well conditioned). The tests find
coefficients and probabilities within 1e-5 and 1e-6 of sklearn's at tol=1e-12. This is scikit-learn's
LogisticRegression(C, solver="lbfgs") (multinomial for 3+ classes) with C = 1 / lambda: sklearn
minimises C * sum_i loss_i + ||W||^2 / 2, the same function times C; so lambda is on the scale of the
paper's sweep, whose released example uses sklearn with C = 0.316. The bias is reported centred
(mean 0 over classes), which changes no probability.

Regularisation: lambda is chosen by validation accuracy with the paper's parametric binary search over
10^-6 ... 10^6: fit at lambda = 10^-6, 10^-4, ..., 10^6, then repeatedly halve the step around the best
value (ties go to the stronger regularisation) until it is 1/8 of a decade, the resolution of the
paper's 96 logarithmically spaced steps; 15 fits instead of 96, each warm-started from the nearest
fitted lambda. The final classifier is refitted with that lambda on the training and validation
features together (as the paper does before reporting on the test split).

Splits: lambda is chosen on `val_spec`; without one, on HOLDOUT (20%) of each class's training images,
drawn with seeds[0]. Results are reported on `test_spec`, or on `val_spec` when there is no test spec (then
val_spec is never used to choose lambda, which comes from the held-out part of train).

k-shot probes: for each k in `shots` and each seed, exactly k training images of every class (drawn
by a generator seeded with the seed; classes without training images are left out), lambda chosen as
above on the validation features, no refit (the validation images would add shots); mean and standard
deviation (ddof 0) over seeds.

Unreadable images (a missing or corrupt file) are left out of every split: a feature that cannot be computed can
neither train the classifier nor be scored by it. Each split is checked against data.max_bad_fraction (one line
and a stop past it, as in training); `bad_images` counts them over all splits.

Metrics, all in percent: top-1 accuracy, macro F1 (the mean of per-class F1 over the classes present
in the labels or the predictions, as sklearn.metrics.f1_score(average="macro")), per-class precision
and recall (0 for a class never predicted / never present, sklearn's zero_division=0), and the
confusion matrix (rows: true class, columns: predicted; counts), with a PNG of it when matplotlib
(the `plots` extra) is installed and `plot_path` is given.
"""

import math

import torch
import torch.nn.functional as F

from crossmodal.data import eval_loader
from crossmodal.evaluation.contrastive import check_unreadable, encode_marked

GRAD_TOLERANCE = 1e-8
MAX_ITER = 1000
HOLDOUT = 0.2
STEPS_PER_DECADE = 8
LOG_RANGE = (-6, 6)  # decades


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, num_classes: int, lam: float,
                 init: tuple[torch.Tensor, torch.Tensor] | None = None, max_iter: int = MAX_ITER,
                 tolerance: float = GRAD_TOLERANCE) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (C, D), b (C,)) minimising the summed cross-entropy + lam / 2 * ||W||^2, in float64."""
    x = features.double()
    dim = x.shape[1]
    # W = scale * V: the same minimiser, but with lambda up to 1e6 the penalty's curvature on W would be
    # ~1e6 times the bias's, and L-BFGS would crawl on the bias; in V both are O(1)
    penalty = lam / len(labels)  # of J / n
    scale = 1.0 / math.sqrt(max(penalty, 1.0))
    params = torch.zeros(num_classes * (dim + 1), dtype=torch.float64, device=x.device)
    if init is not None:
        params[: num_classes * dim] = init[0].reshape(-1).to(params) / scale
        params[num_classes * dim:] = init[1].to(params)
    params.requires_grad_(True)
    optimizer = torch.optim.LBFGS([params], lr=1.0, max_iter=max_iter, tolerance_grad=tolerance,
                                  tolerance_change=1e-14, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        weight = scale * params[: num_classes * dim].view(num_classes, dim)
        logits = x @ weight.T + params[num_classes * dim:]  # (N, C)
        loss = F.cross_entropy(logits, labels) + 0.5 * penalty * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    weight = scale * params.detach()[: num_classes * dim].view(num_classes, dim)
    bias = params.detach()[num_classes * dim:].clone()
    return weight, bias - bias.mean()


def predict(weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """(N, C) class probabilities."""
    return torch.softmax(features.to(weight) @ weight.T + bias, dim=-1)


def choose_lambda(train: tuple, val: tuple, num_classes: int) -> tuple[float, dict[float, float]]:
    """The lambda with the best validation top-1 (parametric binary search, see the module docstring),
    and every lambda tried with its accuracy."""
    (train_x, train_y), (val_x, val_y) = train, val
    low, high = (decade * STEPS_PER_DECADE for decade in LOG_RANGE)  # lambda = 10 ** (k / STEPS_PER_DECADE)
    accuracy, solutions = {}, {}

    def evaluate(k):
        nearest = min(solutions, key=lambda j: abs(j - k)) if solutions else None
        solution = fit_logistic(train_x, train_y, num_classes, 10 ** (k / STEPS_PER_DECADE),
                                init=solutions.get(nearest))
        solutions[k] = solution
        accuracy[k] = (predict(*solution, val_x).argmax(-1) == val_y).double().mean().item() * 100

    step = 2 * STEPS_PER_DECADE
    for k in range(high, low - 1, -step):  # strongest first: each fit warm-starts the next, weaker one
        evaluate(k)
    while step > 1:
        step //= 2
        best = max(accuracy, key=lambda k: (accuracy[k], k))
        for k in (best - step, best + step):
            if low <= k <= high and k not in accuracy:
                evaluate(k)
    best = max(accuracy, key=lambda k: (accuracy[k], k))
    return 10 ** (best / STEPS_PER_DECADE), {10 ** (k / STEPS_PER_DECADE): accuracy[k] for k in sorted(accuracy)}


def sample_shots(labels: torch.Tensor, shots: int, seed: int) -> torch.Tensor:
    """Indices of exactly `shots` examples of every class that has training images (a class without any,
    like shapes' held-out combinations, cannot be learned from any k), drawn with a generator seeded by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().squeeze(1)
        if len(members) < shots:
            raise ValueError(f"class {c} has {len(members)} training images, fewer than {shots} shots")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    return torch.cat(chosen).sort().values


def holdout_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held-out) indices: `fraction` of each class's examples held out (at least one of a class
    with two or more, none of a class with one)."""
    generator = torch.Generator().manual_seed(seed)
    kept, held = [], []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        count = min(max(1, round(fraction * len(members))), len(members) - 1)
        held.append(members[:count]), kept.append(members[count:])
    return torch.cat(kept).sort().values, torch.cat(held).sort().values


def classification_report(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """top1, macro_f1, per-class precision and recall (percent), confusion matrix (rows true, columns predicted)."""
    confusion = torch.bincount(labels * num_classes + predictions, minlength=num_classes ** 2)
    confusion = confusion.view(num_classes, num_classes)
    hits, predicted, actual = confusion.diag().double(), confusion.sum(0).double(), confusion.sum(1).double()
    precision = torch.where(predicted > 0, hits / predicted.clamp(min=1), 0.0)
    recall = torch.where(actual > 0, hits / actual.clamp(min=1), 0.0)
    f1 = torch.where(predicted + actual > 0, 2 * hits / (predicted + actual).clamp(min=1), 0.0)
    present = (predicted + actual) > 0
    return {"top1": 100 * hits.sum().item() / len(labels), "macro_f1": 100 * f1[present].mean().item(),
            "precision": (100 * precision).tolist(), "recall": (100 * recall).tolist(),
            "confusion_matrix": confusion.tolist()}


def plot_confusion(confusion: list[list[int]], classnames: list[str], path: str) -> bool:
    """A PNG of the row-normalised confusion matrix; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    counts = torch.tensor(confusion, dtype=torch.float64)
    rates = counts / counts.sum(1, keepdim=True).clamp(min=1)
    size = max(4.0, 0.25 * len(classnames) + 2)
    figure, axes = plt.subplots(figsize=(size + 1, size))
    image = axes.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(classnames))
    axes.set_xticks(ticks, classnames, rotation=90, fontsize=7)
    axes.set_yticks(ticks, classnames, fontsize=7)
    axes.set_xlabel("predicted"), axes.set_ylabel("true")
    figure.colorbar(image, ax=axes, label="fraction of the true class")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def probe_features(train: tuple, val: tuple, test: tuple, num_classes: int, shots=None, seeds=(0, 1, 2),
                   refit_on_val: bool = True) -> dict:
    """The probe on features already computed: each argument is (features (N, D), labels (N,))."""
    lam, sweep = choose_lambda(train, val, num_classes)
    final_x, final_y = train
    if refit_on_val:
        final_x, final_y = torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]])
    weight, bias = fit_logistic(final_x, final_y, num_classes, lam)
    results = classification_report(predict(weight, bias, test[0]).argmax(-1), test[1], num_classes)
    results.update(**{"lambda": lam, "sklearn_C": 1 / lam, "sweep": sweep,
                      "num_train": len(final_y), "num_val": len(val[1]), "num_test": len(test[1])})
    if shots:
        results["shots"] = {}
        for k in shots:
            runs = []
            for seed in seeds:
                chosen = sample_shots(train[1].cpu(), k, seed).to(train[1].device)
                subset = (train[0][chosen], train[1][chosen])
                lam_k, _ = choose_lambda(subset, val, num_classes)
                report = classification_report(predict(*fit_logistic(*subset, num_classes, lam_k), test[0]).argmax(-1),
                                               test[1], num_classes)
                runs.append({"seed": seed, "lambda": lam_k, "top1": report["top1"], "macro_f1": report["macro_f1"]})
            summary = {}
            for metric in ("top1", "macro_f1"):
                values = torch.tensor([run[metric] for run in runs], dtype=torch.float64)
                summary[f"{metric}_mean"] = values.mean().item()
                summary[f"{metric}_std"] = values.std(correction=0).item()
            results["shots"][str(k)] = {**summary, "runs": runs}
    return results


def linear_probe(model, tokenizer, train_spec: str, val_spec: str | None, image_size: int, device="cpu",
                 options=None, test_spec: str | None = None, shots=None, seeds=(0, 1, 2), batch_size: int = 256,
                 workers: int = 0, plot_path: str | None = None) -> dict:
    """The CLIP linear probe of `model`'s image features (module docstring); returns the metrics as a dict.

    train_spec, val_spec, test_spec: dataset specs with class labels (shapes, imagefolder). lambda is
    chosen on val_spec (or a held-out part of train when it is None); the report is on test_spec, or on
    val_spec when test_spec is None.
    """
    if val_spec is None and test_spec is None:
        raise ValueError("linear_probe needs a split to report on: give val_spec or test_spec")

    def features(spec):
        dataset, loader = eval_loader(spec, image_size, tokenizer, batch_size, workers, options=options)
        x, y, unreadable, count = encode_marked(model, loader, device)
        if len(y) and y.min() < 0:
            raise ValueError(f"{spec} has no class labels; a linear probe needs a classification dataset")
        check_unreadable(count, count.bad, len(y), "images", spec, options, fate="left out")
        readable = ~unreadable  # (their slots hold a neighbour's features)
        return dataset, x[readable].to(device), y[readable].to(device), count.bad

    dataset, train_x, train_y, bad = features(train_spec)
    classnames = list(getattr(dataset, "classnames", [str(c) for c in range(int(train_y.max()) + 1)]))
    num_classes = len(classnames)
    selection = None
    if test_spec is not None and val_spec is not None:
        _, val_x, val_y, bad_val = features(val_spec)
        _, test_x, test_y, bad_test = features(test_spec)
        selection, bad = f"lambda chosen on {val_spec}", bad + bad_val + bad_test
    else:
        _, test_x, test_y, bad_test = features(test_spec or val_spec)
        kept, held = holdout_split(train_y.cpu(), HOLDOUT, seeds[0])
        val_x, val_y, train_x, train_y = train_x[held], train_y[held], train_x[kept], train_y[kept]
        selection, bad = f"lambda chosen on {HOLDOUT:.0%} of {train_spec} held out (seed {seeds[0]})", bad + bad_test
    for name, labels in (("val", val_y), ("test", test_y)):
        if len(labels) and labels.max() >= num_classes:
            raise ValueError(f"the {name} split has class {int(labels.max())}; {train_spec} has {num_classes} classes")
    results = probe_features((train_x, train_y), (val_x, val_y), (test_x, test_y), num_classes, shots, seeds)
    results.update(num_classes=num_classes, classnames=classnames, selection=selection, bad_images=bad,
                   train=train_spec, val=val_spec, test=test_spec or val_spec)
    if plot_path:
        results["confusion_png"] = plot_path if plot_confusion(results["confusion_matrix"], classnames,
                                                               plot_path) else None
    return results


def scalar_metrics(results: dict) -> dict:
    """The lines of a results table: the scalars (and short texts) of any evaluation's results, and each k-shot
    summary's mean and std (a probe's `{k}-shot top1` and `macro_f1`, a few-shot evaluation's `{k}-shot accuracy`)."""
    table = {key: value for key, value in results.items()
             if isinstance(value, (int, float, str)) and not isinstance(value, bool)}
    for k, summary in results.get("shots", {}).items():
        for metric in ("top1_", "macro_f1_", ""):  # "": few-shot's one metric, named by results["metric"]
            if f"{metric}mean" in summary:
                name = f"{k}-shot {metric.rstrip('_') or results.get('metric', 'score')}"
                table[name], table[f"{name} std"] = summary[f"{metric}mean"], summary[f"{metric}std"]
    return table
