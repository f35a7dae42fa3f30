"""Binary classification metrics for the positive class, computed from labels and scores."""

from __future__ import annotations

import numpy as np


def _safe(num: float, den: float) -> float:
    """0/0 is reported as 0.0 (e.g. precision with no positive predictions), as scikit-learn's
    zero_division=0 does; the confusion matrix beside it shows why."""
    return float(num / den) if den else 0.0


def binary_metrics(y_true: np.ndarray, score: np.ndarray, threshold: float = 0.5) -> dict:
    """Precision, recall (sensitivity), specificity, F1, accuracy, balanced accuracy, ROC-AUC,
    PR-AUC and the confusion matrix. AUCs are None when only one class is present."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = np.asarray(y_true).astype(bool)
    pred = np.asarray(score) >= threshold
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    tn = int((~pred & ~y).sum())
    precision = _safe(tp, tp + fp)
    recall = _safe(tp, tp + fn)
    specificity = _safe(tn, tn + fp)
    both = 0 < y.sum() < len(y)
    return {
        "threshold": float(threshold), "n": int(len(y)), "positives": int(y.sum()),
        "precision": precision, "recall": recall, "specificity": specificity,
        "f1": _safe(2 * precision * recall, precision + recall),
        "accuracy": _safe(tp + tn, len(y)),
        "balanced_accuracy": (recall + specificity) / 2,
        "roc_auc": float(roc_auc_score(y, score)) if both else None,
        "pr_auc": float(average_precision_score(y, score)) if both else None,
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
    }
