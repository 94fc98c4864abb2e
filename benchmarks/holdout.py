"""A labelled hold-out split off the training images: does the out-of-fold estimate hold?

celeba64's test labels are withheld, so neither the out-of-fold HTER that `train` reports nor the
threshold it chooses on those scores can be checked against them. `recipes.py --holdout F` sets a
stratified share F of the labelled images aside as test images whose labels are known, trains each
recipe on the rest and predicts the hold-out with the commands a user runs; `holdout_metrics` then
scores what predict wrote. The hold-out is drawn with its own seed, apart from the folds' split.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from faceattr.data import load_dataset, read_labels
from faceattr.metrics import auc, best_threshold, error_rates, with_interval

TRUTH = "holdout_truth.txt"  # beside the split dataset, outside its layout


def split_off(data: str | Path, fraction: float, seed: int, dest: Path) -> Path:
    """Write `dest`/data: the training images less a stratified `fraction`, which become its
    val_img/ (renumbered 1..n in their order); their labels go to `dest`/holdout_truth.txt."""
    train, labels = load_dataset(data).require_train()
    keep, held = train_test_split(
        np.arange(len(labels)), test_size=fraction, stratify=labels, random_state=seed
    )
    root, paths = dest / "data", train.paths()
    for folder, chosen in (("train_img", np.sort(keep)), ("val_img", np.sort(held))):
        (root / folder).mkdir(parents=True)
        for number, i in enumerate(chosen, start=1):
            image = root / folder / f"{number:06d}{Path(train.names[i]).suffix}"
            image.write_bytes(train.source.read(paths[i]))
    (root / "label_train.txt").write_text("".join(f"{labels[i]}\n" for i in np.sort(keep)))
    (dest / TRUTH).write_text("".join(f"{labels[i]}\n" for i in np.sort(held)))
    return root


def holdout_metrics(predictions: Path, truth: Path) -> dict:
    """The hold-out HTER of what predict wrote (95 % interval), of the seed's majority vote, and at
    the threshold best on the hold-out itself (the most any threshold could give); its AUC."""
    y = read_labels(truth)
    rows = list(csv.DictReader(predictions.open()))
    written = np.array([int(r["label"]) for r in rows])
    majority = np.array([int(r["majority_label"]) for r in rows])
    soft = np.array([float(r["soft_score"]) for r in rows])
    rates = with_interval(y, written)
    _, best = best_threshold(y, soft)
    return {
        "holdout_n": len(y),
        "holdout_hter": rates["hter"],
        "holdout_hter_ci": rates["hter_ci"],
        "holdout_far": rates["far"],
        "holdout_frr": rates["frr"],
        "holdout_majority_hter": error_rates(y, majority)["hter"],
        "holdout_best_hter": best["hter"],
        "holdout_auc": auc(y, soft),
    }
