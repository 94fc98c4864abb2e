"""FAR, FRR and HTER: the exercise's metric, defined once.

Labels are 0/1 and a model's score is the probability of label 1. Borrowing the vocabulary of
biometric verification, predicting 1 "accepts" an image:

- FAR (false acceptance rate) = share of label-0 images predicted 1,
- FRR (false rejection rate) = share of label-1 images predicted 0,
- HTER (half total error rate) = (FAR + FRR) / 2, the mean of the two per-class error rates.

HTER weighs both classes equally whatever their sizes, which is why it suits imbalanced data: a
model that always answers the majority class scores 50 %, not 91 %.

scikit-learn is imported where it is used: it adds a second and a half to every command, and
`predict` needs none of it.
"""

from __future__ import annotations

import numpy as np


def error_rates(labels: np.ndarray, predictions: np.ndarray) -> dict[str, float | int]:
    """FAR, FRR, HTER and the confusion counts of 0/1 `predictions` against 0/1 `labels`.

    A class absent from `labels` has an undefined error rate (NaN), and so has the HTER.
    """
    labels = np.asarray(labels).astype(int).ravel()
    predictions = np.asarray(predictions).astype(int).ravel()
    if labels.shape != predictions.shape:
        raise ValueError(f"{labels.size} labels but {predictions.size} predictions")
    from sklearn.metrics import confusion_matrix

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


def rates_at(
    labels: np.ndarray, scores: np.ndarray, cuts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """FAR and FRR at every threshold of `cuts` at once, by `scores_to_labels`' rule: FAR(t) is
    the share of class 0 with a score >= t, FRR(t) that of class 1 below it (NaN for a class
    absent, as in `error_rates`)."""
    labels, scores = np.asarray(labels).ravel(), np.asarray(scores, dtype=np.float64).ravel()
    below = [  # of each class, the share scored below each cut
        np.searchsorted(s, cuts, side="left") / len(s) if len(s) else np.full(len(cuts), np.nan)
        for s in (np.sort(scores[labels == 0]), np.sort(scores[labels == 1]))
    ]
    return 1 - below[0], below[1]


def best_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, dict]:
    """The decision threshold with the lowest HTER on (out-of-fold) scores, and its error rates.

    Every distinct score is a candidate cut: the threshold is put halfway between two neighbouring
    distinct scores (below the lowest, above the highest at the ends), so small shifts of the
    scores do not flip decisions. Ties in HTER go to the most balanced FAR and FRR, then to the
    lower threshold. The cuts stay within [0, 1], where a probability's threshold belongs: a
    model that separates nothing (all scores 0.0, say) accepts everything at 0, not at -1e-6,
    which predict would refuse.
    """
    labels = np.asarray(labels).astype(int).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n0, n1 = int((labels == 0).sum()), int((labels == 1).sum())
    if n0 == 0 or n1 == 0:
        raise ValueError("both classes are needed to choose a threshold")
    values = np.unique(scores)
    cuts = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-6]])
    cuts = np.clip(cuts, 0.0, 1.0)
    far, frr = rates_at(labels, scores, cuts)
    hter_ = (far + frr) / 2
    order = np.lexsort((cuts, np.abs(far - frr), np.round(hter_, 12)))
    best = order[0]
    return float(cuts[best]), error_rates(labels, scores_to_labels(scores, cuts[best]))


def equal_error_rate(labels: np.ndarray, scores: np.ndarray) -> float:
    """The error rate where FAR equals FRR on the ROC curve (linearly interpolated)."""
    from sklearn.metrics import roc_curve

    far, tpr, _ = roc_curve(labels, scores)
    frr = 1 - tpr
    i = int(np.argmax(frr <= far))  # first point where FRR has dropped to FAR or below
    if i == 0:
        return float(far[0])
    # Intersect the segment between points i-1 and i with the diagonal FAR = FRR.
    d0, d1 = frr[i - 1] - far[i - 1], frr[i] - far[i]
    w = d0 / (d0 - d1) if d0 != d1 else 0.0
    return float(far[i - 1] + w * (far[i] - far[i - 1]))


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the chance that a label-1 image outscores a label-0 image."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def bootstrap_hter(
    labels: np.ndarray, predictions: np.ndarray, n: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """A percentile bootstrap confidence interval for the HTER.

    Each class is resampled on its own (stratified), as HTER conditions on the class: every
    resample then has both classes in their original numbers. Resampling m right-or-wrong answers
    of which k are wrong draws the error count from Binomial(m, k/m), so that is what is drawn.
    """
    labels = np.asarray(labels).astype(int).ravel()
    wrong = np.asarray(predictions).astype(int).ravel() != labels
    rng = np.random.default_rng(seed)
    rates = []
    for c in (0, 1):
        errors = wrong[labels == c]
        if len(errors) == 0:
            return float("nan"), float("nan")
        rates.append(rng.binomial(len(errors), errors.mean(), size=n) / len(errors))
    hters = (rates[0] + rates[1]) / 2
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(hters, [tail, 100 - tail])
    return float(low), float(high)


def with_interval(labels: np.ndarray, predictions: np.ndarray) -> dict:
    """Error rates plus a 95 % bootstrap interval for the HTER."""
    rates = error_rates(labels, predictions)
    rates["hter_ci"] = list(bootstrap_hter(labels, predictions))
    return rates
