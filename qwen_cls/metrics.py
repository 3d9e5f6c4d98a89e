"""Classification metrics from scikit-learn, the invalid-output rate of free generation, and calibration
(expected calibration error, reliability bins) and accuracy vs coverage for abstention (numpy).

Taught in: 03, 04, 05
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score


def classification_metrics(y_true: list[str], y_pred: list[str], labels: list[str] | None = None) -> dict:
    """accuracy, macro_f1, per-class report and confusion matrix (rows = truth, columns = prediction).

    ``labels`` fixes the class order; by default the sorted union of truths and predictions. A prediction
    ``None`` (no answer: a classifier that knows none of the row's candidates) counts as wrong and falls in no
    class's column of the confusion matrix.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} truths but {len(y_pred)} predictions")
    if not y_true:
        raise ValueError("no rows to score")
    labels = labels or sorted(set(y_true) | {p for p in y_pred if p is not None})
    if any(p is None for p in y_pred):
        no_answer = "<no answer>"
        while no_answer in labels or no_answer in y_true:
            no_answer += "_"
        y_pred = [no_answer if p is None else p for p in y_pred]
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "n_test": len(y_true),
        "labels": labels,
        "per_class": classification_report(y_true, y_pred, labels=labels, output_dict=True, zero_division=0),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def invalid_rate(generated: list[str], candidates: list[list[str]]) -> float:
    """Share of generated answers that are not exactly one of the row's candidate labels."""
    if len(generated) != len(candidates):
        raise ValueError(f"{len(generated)} answers but {len(candidates)} candidate lists")
    if not generated:
        return 0.0
    return sum(g.strip() not in c for g, c in zip(generated, candidates)) / len(generated)


def chance_accuracy(candidates: list[list[str]]) -> float:
    """Expected accuracy of guessing uniformly among each row's candidates: the mean of ``1 / len(c)``."""
    if not candidates:
        raise ValueError("no rows to score")
    return sum(1 / len(c) for c in candidates) / len(candidates)


def reliability_bins(confidences, correct, n_bins: int = 10) -> list[dict]:
    """Equal-width confidence bins ``((k-1)/n, k/n]`` (the first also takes 0): per bin its edges, ``count``,
    mean ``confidence`` and ``accuracy`` (``None`` for both when the bin is empty)."""
    conf = np.asarray(confidences, dtype=float)
    hit = np.asarray(correct, dtype=float)
    if conf.shape != hit.shape:
        raise ValueError(f"{conf.size} confidences but {hit.size} correctness flags")
    if conf.size and (conf.min() < 0 or conf.max() > 1):
        raise ValueError("confidences must lie in [0, 1]")
    # np.round: 0.3 * 10 is 3.0000000000000004 in floats, and 0.3 belongs to the bin (0.2, 0.3]
    index = np.clip(np.ceil(np.round(conf * n_bins, 9)).astype(int) - 1, 0, n_bins - 1)
    bins = []
    for k in range(n_bins):
        members = index == k
        count = int(members.sum())
        bins.append({"low": k / n_bins, "high": (k + 1) / n_bins, "count": count,
                     "confidence": float(conf[members].mean()) if count else None,
                     "accuracy": float(hit[members].mean()) if count else None})
    return bins


def expected_calibration_error(confidences, correct, n_bins: int = 10) -> float:
    """ECE: ``sum over bins of (rows in bin / rows) * |accuracy in bin - mean confidence in bin|``.

    ``confidences``: the probability of each row's prediction; ``correct``: whether it was right. 0 means that
    among rows predicted with confidence p, a share p was right, for every p (see :func:`reliability_bins`).
    """
    bins = reliability_bins(confidences, correct, n_bins)
    total = sum(b["count"] for b in bins)
    if not total:
        raise ValueError("no rows to score")
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]))


def accuracy_coverage(confidences, correct, thresholds) -> list[dict]:
    """Abstention: for each threshold, the rows answered (confidence >= threshold) as ``coverage`` (their share)
    and their ``accuracy`` (``None`` when no row is answered)."""
    conf = np.asarray(confidences, dtype=float)
    hit = np.asarray(correct, dtype=float)
    if conf.shape != hit.shape or not conf.size:
        raise ValueError(f"{conf.size} confidences and {hit.size} correctness flags: need the same, at least one")
    curve = []
    for t in thresholds:
        kept = conf >= t
        n = int(kept.sum())
        curve.append({"threshold": float(t), "coverage": n / conf.size, "answered": n,
                      "accuracy": float(hit[kept].mean()) if n else None})
    return curve


def choose_min_confidence(curve: list[dict], target: float) -> dict:
    """The point of an :func:`accuracy_coverage` curve (computed on validation rows) with the lowest threshold whose
    answered rows reach ``target`` accuracy: the most rows answered at that accuracy. No point reaches it: the
    highest threshold that still answers a row (its accuracy is the best the curve offers)."""
    answered = [point for point in curve if point["answered"]]
    if not answered:
        raise ValueError("no threshold of the curve answers a row")
    reaching = [point for point in answered if point["accuracy"] >= target]
    return min(reaching, key=lambda p: p["threshold"]) if reaching else max(answered, key=lambda p: p["threshold"])
