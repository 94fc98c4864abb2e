import numpy as np
from PIL import Image

from faceattr import reports


def png_size(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_class_balance(tmp_path):
    path = reports.class_balance({0: 12, 1: 88}, tmp_path / "balance.png")
    w, h = png_size(path)
    assert w > 200 and h > 200


def test_sample_grid_has_one_row_per_class(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (30, 64, 64, 3), dtype=np.uint8)
    labels = np.array([0] * 5 + [1] * 25)
    one = png_size(reports.sample_grid(images[5:], labels[5:], tmp_path / "one.png"))
    two = png_size(reports.sample_grid(images, labels, tmp_path / "two.png"))
    assert two[1] > 1.6 * one[1]  # two rows of pictures are about twice as tall as one


def test_training_curves(tmp_path):
    history = [
        {
            "epoch": e,
            "train_loss": 1 / e,
            "val_loss": 1.2 / e,
            "train_hter": 0.3 / e,
            "val_hter": 0.35 / e,
        }
        for e in range(1, 6)
    ]
    path = reports.training_curves(history, tmp_path / "curves.png", best_epoch=5)
    w, h = png_size(path)
    assert w > 2 * h  # two panels side by side
    assert not list(tmp_path.glob(".*.tmp"))
