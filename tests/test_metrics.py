import math

import numpy as np
import pytest

from faceattr.metrics import error_rates, hter, scores_to_labels


def test_hand_computed_case():
    # 4 images of class 0, one predicted 1 -> FAR 1/4; 6 of class 1, three predicted 0 -> FRR 1/2.
    labels = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    preds = [0, 0, 0, 1, 1, 1, 1, 0, 0, 0]
    r = error_rates(labels, preds)
    assert r["far"] == pytest.approx(0.25)
    assert r["frr"] == pytest.approx(0.5)
    assert r["hter"] == pytest.approx(0.375)
    assert (r["n"], r["n0"], r["n1"], r["false_accepts"], r["false_rejects"]) == (10, 4, 6, 1, 3)


def test_perfect_and_inverted():
    y = np.array([0, 1, 1, 0, 1])
    assert hter(y, y) == 0.0
    assert hter(y, 1 - y) == 1.0


def test_majority_answer_scores_half_whatever_the_imbalance():
    y = np.array([0] * 5 + [1] * 95)
    assert hter(y, np.ones_like(y)) == pytest.approx(0.5)
    assert hter(y, np.zeros_like(y)) == pytest.approx(0.5)


def test_missing_class_gives_nan():
    r = error_rates([1, 1, 1], [1, 0, 1])
    assert math.isnan(r["far"]) and math.isnan(r["hter"])
    assert r["frr"] == pytest.approx(1 / 3)


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError):
        error_rates([0, 1], [0])


def test_scores_to_labels_threshold_is_inclusive():
    assert scores_to_labels(np.array([0.2, 0.5, 0.7]), 0.5).tolist() == [0, 1, 1]
