"""Stratified K-fold split, saved in the run so that it can be reproduced and audited."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from faceattr.errors import FaceAttrError, plural
from faceattr.outputs import write_csv


def make_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The fold (0..k-1) of every image: each fold keeps the class balance of the whole set."""
    labels = np.asarray(labels)
    if k < 2:
        raise FaceAttrError(f"--folds must be at least 2, got {k}")
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) == 0:
        raise FaceAttrError("there are no labelled images to split into folds")
    if len(classes) < 2:
        raise FaceAttrError(f"only class {classes[0]} is present in the labels; need both 0 and 1")
    if counts.min() < k:
        rare, n = classes[counts.argmin()], int(counts.min())
        hint = f"use --folds {n}" if n >= 2 else "at least 2 of each class are needed"
        raise FaceAttrError(
            f"class {rare} has {plural(n, 'image')}, fewer than the {k} folds; {hint}"
        )
    from sklearn.model_selection import StratifiedKFold  # here: see faceattr.metrics

    fold = np.empty(len(labels), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for f, (_, val_idx) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        fold[val_idx] = f
    return fold


def save_folds(path: str | Path, names: list[str], labels: np.ndarray, fold: np.ndarray) -> None:
    """folds.csv: image, label, fold, one row per training image; folds count from 1, as in
    oof.csv, fold_K/ and models/fold_K.*."""
    rows = [[n, int(y), int(f) + 1] for n, y, f in zip(names, labels, fold, strict=True)]
    write_csv(path, ["image", "label", "fold"], rows)


def load_folds(path: str | Path) -> np.ndarray:
    """The folds (0..k-1, as `make_folds` gives them) of a folds.csv written by `save_folds`.

    Earlier runs counted them from 0 there: every fold holds images, so a file whose smallest
    fold is 0 is one of those, and still resumes.
    """
    lines = Path(path).read_text().splitlines()[1:]
    folds = np.array([int(line.rsplit(",", 1)[1]) for line in lines], dtype=np.int64)
    return folds if len(folds) and folds.min() == 0 else folds - 1
