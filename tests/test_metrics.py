import math

import numpy as np
import pytest

from faceattr.metrics import (
    auc,
    best_threshold,
    bootstrap_hter,
    equal_error_rate,
    error_rates,
    hter,
    rates_at,
    scores_to_labels,
)


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


def brute_force_min_hter(labels, scores):
    """Every threshold that matters, tried one by one."""
    values = sorted(set(scores))
    candidates = [values[0] - 1, *values, values[-1] + 1]
    return min(hter(labels, scores_to_labels(np.array(scores), t)) for t in candidates)


def test_rates_at_every_cut_are_those_of_the_labels_it_gives():
    rng = np.random.default_rng(3)
    labels, scores = rng.integers(0, 2, 200), rng.random(200).round(2)  # ties: 100 values
    cuts = np.array([0.0, 0.25, scores[7], 0.5, 1.0, 1.1])
    far, frr = rates_at(labels, scores, cuts)
    for t, a, r in zip(cuts, far, frr, strict=True):
        rates = error_rates(labels, scores_to_labels(scores, t))
        assert (a, r) == pytest.approx((rates["far"], rates["frr"]))
    far, frr = rates_at(np.ones(3), np.array([0.2, 0.5, 0.9]), np.array([0, 0.2, 0.3, 0.5, 0.95]))
    assert np.isnan(far).all() and frr.tolist() == pytest.approx([0, 0, 1 / 3, 1 / 3, 1])


def test_best_threshold_finds_the_exact_minimum():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
    scores = np.array([0.1, 0.4, 0.7, 0.3, 0.5, 0.6, 0.8, 0.85, 0.9, 0.95])
    threshold, rates = best_threshold(labels, scores)
    # Cutting between 0.7 and 0.8: FAR 0, FRR 3/7 -> 0.214; between 0.4 and 0.5: FAR 1/3, FRR 1/7.
    assert rates["hter"] == pytest.approx(min(3 / 14, (1 / 3 + 1 / 7) / 2))
    assert rates["hter"] == pytest.approx(brute_force_min_hter(labels, scores))
    assert 0.4 < threshold < 0.5 or 0.7 < threshold < 0.8
    assert hter(labels, scores_to_labels(scores, threshold)) == rates["hter"]


def test_best_threshold_on_random_scores_matches_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(20):
        labels = (rng.random(60) > 0.2).astype(int)
        labels[:2] = [0, 1]
        scores = np.round(rng.random(60) * 0.5 + 0.4 * labels, 2)  # rounded: many tied scores
        threshold, rates = best_threshold(labels, scores)
        assert rates["hter"] == pytest.approx(brute_force_min_hter(labels, scores))
        assert hter(labels, scores_to_labels(scores, threshold)) == rates["hter"]


def test_best_threshold_ties_go_to_balanced_errors_then_lower_threshold():
    # Perfectly separable: every cut between 0.3 and 0.7 has HTER 0 -> one cut, the lowest.
    labels = np.array([0, 0, 1, 1])
    threshold, rates = best_threshold(labels, np.array([0.1, 0.3, 0.7, 0.9]))
    assert rates["hter"] == 0 and threshold == pytest.approx(0.5)
    # Two cuts of HTER 0.25, equally unbalanced: 0.15 (FAR 0.5, FRR 0) and 0.35 (FAR 0, FRR 0.5):
    # the lower wins.
    labels = np.array([0, 1, 0, 1])
    threshold, rates = best_threshold(labels, np.array([0.1, 0.2, 0.3, 0.4]))
    assert (rates["far"], rates["frr"]) == (0.5, 0) and threshold == pytest.approx(0.15)
    # Two cuts with HTER 0.25: (FAR 0.5, FRR 0) and (FAR 0.25, FRR 0.25): the balanced one wins.
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.6, 0.8, 0.5, 0.7, 0.9, 0.95])
    threshold, rates = best_threshold(labels, scores)
    assert rates["hter"] == pytest.approx(0.25)
    assert rates["far"] == rates["frr"] == pytest.approx(0.25)


@pytest.mark.parametrize("score", [0.0, 1e-7, 0.3, 1.0])
def test_a_model_that_separates_nothing_accepts_everything_at_a_threshold_in_0_1(score):
    labels = np.array([0] * 9 + [1] * 3)
    for scores in (np.full(12, score), np.array([1.0] * 9 + [score] * 3)):  # same, or inverted
        threshold, rates = best_threshold(labels, scores)
        assert 0 <= threshold <= 1 and rates["hter"] == 0.5
        assert hter(labels, scores_to_labels(scores, threshold)) == 0.5
    # One score for all: everything is accepted (FAR 1, FRR 0), at 0 for a score of 0.
    threshold, rates = best_threshold(labels, np.full(12, score))
    assert (rates["far"], rates["frr"]) == (1, 0) and threshold <= score


def test_equal_error_rate_and_auc():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    perfect = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9])
    assert equal_error_rate(labels, perfect) == 0.0 and auc(labels, perfect) == 1.0
    one_swap = np.array([0.1, 0.2, 0.3, 0.65, 0.6, 0.7, 0.8, 0.9])
    assert equal_error_rate(labels, one_swap) == pytest.approx(0.25)
    assert auc(labels, one_swap) == pytest.approx(15 / 16)


def test_bootstrap_interval_brackets_the_estimate_and_narrows_with_data():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 200 + [1] * 1800)
    predictions = np.where(rng.random(2000) < np.where(labels == 0, 0.1, 0.05), 1 - labels, labels)
    estimate = hter(labels, predictions)
    low, high = bootstrap_hter(labels, predictions)
    assert low < estimate < high and high - low < 0.06
    small_low, small_high = bootstrap_hter(labels[::10], predictions[::10])
    assert small_high - small_low > high - low
    assert bootstrap_hter(labels, predictions) == (low, high)  # seeded: repeatable
    # Its width is the binomial one: 2 x 1.96 standard errors at 95 %, 2 x 0.674 at 50 %.
    far, frr = predictions[:200].mean(), 1 - predictions[200:].mean()
    se = np.sqrt(far * (1 - far) / 200 + frr * (1 - frr) / 1800) / 2
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.15)
    half_low, half_high = bootstrap_hter(labels, predictions, level=0.5)
    assert half_high - half_low == pytest.approx(2 * 0.674 * se, rel=0.15)
    assert bootstrap_hter(labels, labels) == (0.0, 0.0)


def test_accepting_everything_puts_the_threshold_below_the_lowest_score():
    """The cut that accepts everything lies below the lowest score, so a test score a hair
    under it is still accepted."""
    threshold, rates = best_threshold(np.array([0, 1, 1]), np.full(3, 0.5))
    assert (rates["far"], rates["frr"]) == (1, 0) and threshold < 0.5


def test_bootstrap_of_a_single_class_is_nan():
    """With one class absent, the interval is undefined (NaN), not numpy's error."""
    low, high = bootstrap_hter(np.array([1, 1, 1]), np.array([1, 0, 1]))
    assert np.isnan(low) and np.isnan(high)


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0]])
def test_best_threshold_needs_both_classes(labels):
    with pytest.raises(ValueError, match="both classes"):
        best_threshold(np.array(labels), np.linspace(0.1, 0.9, len(labels)))
