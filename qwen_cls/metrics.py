"""Classification metrics from scikit-learn, plus the invalid-output rate of free generation."""

from __future__ import annotations

from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score


def classification_metrics(y_true: list[str], y_pred: list[str], labels: list[str] | None = None) -> dict:
    """accuracy, macro_f1, per-class report and confusion matrix (rows = truth, columns = prediction).

    ``labels`` fixes the class order; by default the sorted union of truths and predictions.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} truths but {len(y_pred)} predictions")
    if not y_true:
        raise ValueError("no rows to score")
    labels = labels or sorted(set(y_true) | set(y_pred))
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
