"""Classification metrics for both heads, computed with scikit-learn.

UAR (unweighted average recall, macro recall) is the headline figure for emotion:
corpora are imbalanced and UAR does not reward predicting the majority class.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], class_names: Sequence[str]) -> dict:
    """Metrics over the classes that occur in ``y_true`` (the evaluated label set).

    ``y_true`` / ``y_pred`` index into ``class_names``. Returns a JSON-able dict with
    ``accuracy``, ``uar``, ``weighted_f1``, ``per_class_recall``, ``confusion`` (rows =
    true class, columns = predicted, in the order of ``labels``), ``labels`` and ``n``.
    """
    # Imported here: scikit-learn costs over a second at start-up, and a device's ClientApp
    # starts a fresh process for every message, most of which never evaluate.
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score

    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has shape {y_true.shape} but y_pred has {y_pred.shape}")
    if y_true.size == 0:
        raise ValueError("no examples to evaluate")
    present = sorted(set(y_true.tolist()))
    # Columns also include classes that were predicted but never occur, so no prediction is hidden.
    columns = sorted(set(present) | set(y_pred.tolist()))
    recalls = recall_score(y_true, y_pred, labels=present, average=None, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "uar": float(np.mean(recalls)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=present, average="weighted", zero_division=0)),
        "per_class_recall": {class_names[c]: float(r) for c, r in zip(present, recalls)},
        "confusion": confusion_matrix(y_true, y_pred, labels=columns).tolist(),
        "labels": [class_names[c] for c in columns],
        "n": int(y_true.size),
    }
