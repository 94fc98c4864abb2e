import numpy as np
import pytest

from faceattr.errors import FaceAttrError
from faceattr.folds import load_folds, make_folds, save_folds


def test_folds_are_stratified_disjoint_and_cover_everything():
    labels = np.array([0] * 20 + [1] * 180)
    fold = make_folds(labels, 5, seed=0)
    assert sorted(set(fold.tolist())) == [0, 1, 2, 3, 4]
    for k in range(5):
        assert (labels[fold == k] == 0).sum() == 4
        assert (fold == k).sum() == 40


def test_folds_depend_on_seed_only():
    labels = np.array([0, 1] * 50)
    assert np.array_equal(make_folds(labels, 3, 7), make_folds(labels, 3, 7))
    assert not np.array_equal(make_folds(labels, 3, 7), make_folds(labels, 3, 8))


@pytest.mark.parametrize(
    ("labels", "k", "message"),
    [
        ([1] * 10, 2, "only class 1"),
        ([], 2, "no labelled images"),
        ([0, 0] + [1] * 10, 5, "class 0 has 2 images, fewer than the 5 folds; use --folds 2"),
        ([0] + [1] * 10, 2, "class 0 has 1 image, fewer than the 2 folds; at least 2 of each"),
        ([0, 1] * 10, 1, "at least 2"),
    ],
)
def test_impossible_splits_are_user_errors(labels, k, message):
    with pytest.raises(FaceAttrError, match=message):
        make_folds(np.array(labels), k, 0)


def test_save_and_load_roundtrip(tmp_path):
    labels = np.array([0, 1] * 10)
    fold = make_folds(labels, 4, 0)
    save_folds(tmp_path / "folds.csv", [f"{i:06d}.jpg" for i in range(1, 21)], labels, fold)
    assert np.array_equal(load_folds(tmp_path / "folds.csv"), fold)
    text = (tmp_path / "folds.csv").read_text()
    assert text.startswith("image,label,fold\n000001.jpg,0,")
    counted = [int(line.rsplit(",", 1)[1]) for line in text.splitlines()[1:]]
    assert sorted(set(counted)) == [1, 2, 3, 4]  # from 1, as oof.csv and fold_K/
    # An earlier run's, counted from 0, reads as the same folds:
    rows = [line.rsplit(",", 1) for line in text.splitlines()[1:]]
    old = "image,label,fold\n" + "".join(f"{a},{int(f) - 1}\n" for a, f in rows)
    (tmp_path / "old.csv").write_text(old)
    assert np.array_equal(load_folds(tmp_path / "old.csv"), fold)


def test_as_many_of_the_rarer_class_as_folds_is_enough():
    fold = make_folds(np.array([0, 0] + [1] * 10), 2, 0)
    assert sorted(fold[:2].tolist()) == [0, 1]  # one of each image of class 0 per fold
