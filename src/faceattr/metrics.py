"""FAR, FRR and HTER: the exercise's metric, defined once.

Labels are 0/1 and a model's score is the probability of label 1. Borrowing the vocabulary of
biometric verification, predicting 1 "accepts" an image:

- FAR (false acceptance rate) = share of label-0 images predicted 1,
- FRR (false rejection rate) = share of label-1 images predicted 0,
- HTER (half total error rate) = (FAR + FRR) / 2, the mean of the two per-class error rates.

HTER weighs both classes equally whatever their sizes, which is why it suits imbalanced data: a
model that always answers the majority class scores 50 %, not 91 %.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix


def error_rates(labels: np.ndarray, predictions: np.ndarray) -> dict[str, float | int]:
    """FAR, FRR, HTER and the confusion counts of 0/1 `predictions` against 0/1 `labels`.

    A class absent from `labels` has an undefined error rate (NaN), and so has the HTER.
    """
    labels = np.asarray(labels).astype(int).ravel()
    predictions = np.asarray(predictions).astype(int).ravel()
    if labels.shape != predictions.shape:
        raise ValueError(f"{labels.size} labels but {predictions.size} predictions")
    (tn, fp), (fn, tp) = confusion_matrix(labels, predictions, labels=[0, 1])
    n0, n1 = tn + fp, fn + tp
    far = fp / n0 if n0 else float("nan")
    frr = fn / n1 if n1 else float("nan")
    return {
        "hter": (far + frr) / 2,
        "far": far,
        "frr": frr,
        "n": int(n0 + n1),
        "n0": int(n0),
        "n1": int(n1),
        "false_accepts": int(fp),
        "false_rejects": int(fn),
    }


def hter(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Half total error rate: the mean of the two per-class error rates."""
    return float(error_rates(labels, predictions)["hter"])


def scores_to_labels(scores: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """0/1 decisions: 1 where the score (probability of label 1) reaches the threshold."""
    return (np.asarray(scores) >= threshold).astype(np.int64)
