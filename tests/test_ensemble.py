import time

import numpy as np
import pytest
import torch

from faceattr.ensemble import (
    batches_side_by_side,
    decision_rule,
    ensemble_scores,
    model_scores,
    to_model_input,
    vote,
)
from faceattr.metrics import best_threshold, error_rates, scores_to_labels


def test_majority_vote_counts_models():
    scores = np.array([[0.9, 0.2, 0.6], [0.8, 0.4, 0.1], [0.1, 0.3, 0.4]])
    share, labels = vote(scores, "majority")
    assert share.tolist() == pytest.approx([2 / 3, 0, 1 / 3])
    assert labels.tolist() == [1, 0, 0]


def test_majority_tie_goes_to_the_mean_probability():
    scores = np.array([[0.9, 0.6], [0.2, 0.01]])
    _, labels = vote(scores, "majority")
    assert labels.tolist() == [1, 0]  # means 0.55 and 0.305
    # At the run's tuned threshold, votes and tie alike: 0.305 reaches 0.3; 0.6 and 0.35 are
    # both votes for 1 there, where at 0.5 they would be a tie.
    share, labels = vote(np.array([[0.9, 0.6, 0.6], [0.2, 0.01, 0.35]]), "majority", 0.3)
    assert share.tolist() == [0.5, 0.5, 1.0] and labels.tolist() == [1, 1, 1]


def test_soft_vote_averages_probabilities():
    scores = np.array([[0.9, 0.45], [0.3, 0.45], [0.3, 0.7]])
    mean, labels = vote(scores, "soft")
    assert mean.tolist() == pytest.approx([0.5, 1.6 / 3])
    assert labels.tolist() == [1, 1]
    assert vote(scores, "soft", threshold=0.55)[1].tolist() == [0, 0]


def test_majority_and_soft_can_disagree():
    scores = np.array([[0.51], [0.51], [0.0]])
    assert vote(scores, "majority")[1].tolist() == [1]
    assert vote(scores, "soft")[1].tolist() == [0]


def test_unknown_rule():
    with pytest.raises(ValueError):
        vote(np.zeros((1, 1)), "median")


def test_model_scores_are_probabilities_in_image_order():
    class Brightness(torch.nn.Module):
        def forward(self, x):
            return (x.mean(dim=(1, 2, 3)) - 0.5) * 20

    images = torch.stack([torch.full((64, 64, 3), v, dtype=torch.uint8) for v in (0, 128, 255)])
    scores = model_scores(Brightness(), images, batch_size=2)
    assert scores.shape == (3,)
    assert scores[0] < 0.01 and abs(scores[1] - 0.5) < 0.05 and scores[2] > 0.99


@pytest.fixture
def two_threads():
    """A CPU of two threads, as CI's, whatever this machine has; restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_a_cpu_scores_batches_side_by_side_to_the_same_values(two_threads):
    """Each batch runs on one thread, without autograd, and the scores come back in image order
    equal to those of one batch at a time in one thread; the threads are the process's again
    afterwards."""
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            seen.append((torch.get_num_threads(), torch.is_grad_enabled()))
            return self.conv(x).mean(dim=(1, 2, 3)) * 50

    torch.manual_seed(0)
    models = [Recorder(), Recorder()]
    images = torch.randint(0, 256, (37, 64, 64, 3), dtype=torch.uint8)
    scores = ensemble_scores(models, images, batch_size=4, tta=True)
    assert set(seen) == {(1, False)} and len(seen) == 10 * 2 * 2  # batches, models, mirrored
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)  # one batch at a time, in this thread
    alone = ensemble_scores(models, images, batch_size=4, tta=True)
    np.testing.assert_array_equal(scores, alone)


def test_batches_side_by_side_stop_with_the_caller(two_threads):
    """An error in a batch reaches the caller; a Ctrl-C there leaves the batches not yet started
    undone (only those running finish), and the threads are restored either way."""
    with pytest.raises(ZeroDivisionError), batches_side_by_side(torch.device("cpu")) as mapped:
        list(mapped(lambda i: 1 / (i - 3), range(8)))
    assert torch.get_num_threads() == 2
    ran = []

    def slow(i):
        time.sleep(0.2)
        ran.append(i)

    with pytest.raises(KeyboardInterrupt), batches_side_by_side(torch.device("cpu")) as mapped:
        for _ in mapped(slow, range(100)):
            raise KeyboardInterrupt
    # Those running when it came, and one each of the two threads may have started since.
    assert 1 <= len(ran) <= 4 and torch.get_num_threads() == 2


def test_model_input_layout():
    x = to_model_input(torch.full((2, 64, 64, 3), 255, dtype=torch.uint8))
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32 and torch.all(x == 1)


def test_tta_averages_the_image_and_its_mirror():
    class LeftHalf(torch.nn.Module):
        """Logit = mean brightness of the left half minus that of the right half, times 10."""

        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(10.0))

        def forward(self, x):
            w = x.shape[-1] // 2
            return self.scale * (x[..., :w].mean(dim=(1, 2, 3)) - x[..., w:].mean(dim=(1, 2, 3)))

    images = torch.zeros(2, 64, 64, 3, dtype=torch.uint8)
    images[0, :, :32] = 255  # bright on the left
    images[1, :, 32:] = 255  # bright on the right
    plain = model_scores(LeftHalf(), images)
    assert plain[0] > 0.99 and plain[1] < 0.01
    mirrored = model_scores(LeftHalf(), images, tta=True)
    assert mirrored == pytest.approx([0.5, 0.5])  # each image and its mirror cancel out


def test_decision_rule_reports_tuned_nested_and_untuned_errors():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 100 + [1] * 900)
    scores = np.clip(0.35 + 0.3 * labels + rng.normal(0, 0.15, 1000), 0, 1)  # best cut near 0.5
    fold_of = np.arange(1000) % 5
    d = decision_rule(labels, scores, fold_of)
    assert 0.35 < d["threshold"] < 0.65
    assert d["oof"]["hter"] == best_threshold(labels, scores)[1]["hter"]
    # Nested, by hand: each fold at the threshold best on the other four; never the same as
    # tuning on all (a threshold that had seen its fold would give oof's HTER here).
    nested = np.empty(1000, dtype=int)
    for k in range(5):
        t_k, _ = best_threshold(labels[fold_of != k], scores[fold_of != k])
        nested[fold_of == k] = scores[fold_of == k] >= t_k
    assert d["oof_nested"]["hter"] == error_rates(labels, nested)["hter"] > d["oof"]["hter"]
    assert d["oof_at_0.5"]["hter"] >= d["oof"]["hter"]
    for key in ("oof", "oof_nested", "oof_at_0.5"):
        low, high = d[key]["hter_ci"]
        assert low <= d[key]["hter"] <= high
    assert d["eer"] == pytest.approx(d["oof"]["hter"], abs=0.03)
    assert 0.9 < d["auc"] < 1


def test_the_untuned_rule_is_judged_at_0_5_not_at_the_tuned_threshold():
    """oof_at_0.5 is the untuned rule's error, at 0.5, not the tuned threshold's again."""
    labels = np.array([0, 0, 0, 1, 1, 1])
    oof = np.array([0.05, 0.1, 0.15, 0.2, 0.25, 0.3])  # all below 0.5; separable at ~0.175
    rule = decision_rule(labels, oof, np.array([0, 1, 0, 1, 0, 1]))
    assert rule["oof"]["hter"] == 0 and rule["threshold"] < 0.5
    at_half = error_rates(labels, scores_to_labels(oof, 0.5))
    assert rule["oof_at_0.5"]["hter"] == at_half["hter"] == 0.5


def test_vote_takes_one_models_scores_as_one_row():
    share, labels = vote(np.array([0.2, 0.7, 0.5]), "majority")
    assert share.tolist() == [0, 1, 1] and labels.tolist() == [0, 1, 1]
    mean, labels = vote(np.array([0.2, 0.7]), "soft", 0.6)
    assert mean.tolist() == [0.2, 0.7] and labels.tolist() == [0, 1]


def test_scoring_puts_models_in_eval_mode():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(3 * 64 * 64, 1),
        torch.nn.Flatten(0),
    )  # fmt: skip
    net.train()
    images = torch.randint(0, 256, (8, 64, 64, 3), dtype=torch.uint8)
    first = model_scores(net, images)
    assert not net.training
    np.testing.assert_array_equal(first, model_scores(net, images))  # no dropout: repeatable


def test_no_images_give_an_empty_row_per_model():
    class Half(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(len(x))

    scores = ensemble_scores([Half(), Half()], torch.zeros((0, 64, 64, 3), dtype=torch.uint8))
    assert scores.shape == (2, 0)
