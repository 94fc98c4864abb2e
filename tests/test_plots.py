import numpy as np
import pytest
from PIL import Image

from faceattr import plots


def panels(path) -> int:
    """Panels drawn, as the PNG's metadata records; also checks the file is a real, sized PNG."""
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 100
        return int(im.info["Panels"])


@pytest.fixture(scope="module")
def scored():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 60 + [1] * 440)
    scores = np.clip(0.3 + 0.4 * labels + rng.normal(0, 0.2, 500), 0, 1)
    images = rng.integers(0, 255, (500, 64, 64, 3), dtype=np.uint8)
    return labels, scores, images


def test_class_balance(tmp_path):
    assert panels(plots.class_balance({0: 12, 1: 88}, tmp_path / "balance.png")) == 1


def test_sample_grid_has_one_row_per_class(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (30, 64, 64, 3), dtype=np.uint8)
    labels = np.array([0] * 5 + [1] * 25)
    assert panels(plots.sample_grid(images[5:], labels[5:], tmp_path / "one.png")) == 8
    assert panels(plots.sample_grid(images, labels, tmp_path / "two.png")) == 5 + 8


def test_image_audit(tmp_path):
    audits = {
        "train": {
            "sizes": {"64x64": 90, "80x80": 10},
            "modes": {"RGB": 99, "L": 1},
            "resized": 10,
            "converted": 1,
        },
        "test": {"sizes": {"64x64": 20}, "modes": {"RGB": 20}, "resized": 0, "converted": 0},
    }
    assert panels(plots.image_audit(audits, tmp_path / "audit.png")) == 2
    with Image.open(tmp_path / "audit.png") as im:  # its heading is recorded with the panels'
        assert im.info["Title"].startswith("Image audit")


def test_training_curves(tmp_path):
    history = [
        {
            "epoch": e,
            "lr": 1e-3 * 0.7 ** (e // 2),
            "train_loss": 1 / e,
            "val_loss": 1.2 / e,
            "train_hter": 0.3 / e,
            "val_hter": 0.35 / e,
        }
        for e in range(1, 6)
    ]
    path = plots.training_curves(history, tmp_path / "curves.png", best_epoch=5)
    assert panels(path) == 3  # loss, HTER, learning rate
    assert not list(tmp_path.glob(".*.tmp"))


def test_evaluation_pictures(scored, tmp_path):
    labels, scores, images = scored
    paths = plots.evaluation(
        labels, scores, 0.5, tmp_path / "ev", images, [f"{i}.jpg" for i in range(500)]
    )
    assert [p.name for p in paths] == [
        "roc_det.png",
        "threshold.png",
        "scores.png",
        "confusion.png",
        "worst_errors.png",
    ]
    assert [panels(p) for p in paths[:4]] == [2, 1, 1, 1]
    assert panels(paths[4]) == 16  # eight wrong images of each class
    without_images = plots.evaluation(labels, scores, 0.5, tmp_path / "ev2")
    assert len(without_images) == 4


def test_worst_errors_shows_only_errors(tmp_path):
    labels = np.array([0, 0, 1, 1, 1])
    scores = np.array([0.9, 0.1, 0.2, 0.8, 0.95])  # one error per class
    images = np.zeros((5, 64, 64, 3), dtype=np.uint8)
    assert panels(plots.worst_errors(images, labels, scores, 0.5, tmp_path / "w.png")) == 2


def test_prediction_pictures(tmp_path):
    rng = np.random.default_rng(1)
    scores = rng.random(300)
    labels = (scores >= 0.5).astype(int)
    labels[:7] = 0  # as a majority vote may differ from the soft one the histogram shows
    path = plots.prediction_scores(scores, 0.5, labels, "majority", tmp_path / "s.png")
    assert panels(path) == 1
    with Image.open(path) as im:  # the labels written are counted, not the scores under 0.5
        assert (
            im.info["Title"]
            == f"Test scores: {(labels == 0).sum()} of 300 predicted 0 (majority vote)"
        )
    votes = (rng.random((5, 300)) > 0.2).astype(int)
    assert panels(plots.model_agreement(votes, tmp_path / "a.png")) == 1
