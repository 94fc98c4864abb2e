"""Evaluate a label file against the truth: HTER with its interval and, given predict's table of
scores, AUC, EER and the evaluation pictures."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np

from faceattr import plots
from faceattr.data import ImageSet, holds_images, load_test_images, read_labels
from faceattr.errors import FaceAttrError, plural
from faceattr.metrics import auc, equal_error_rate, scores_to_labels, with_interval
from faceattr.outputs import refuse_inside

log = logging.getLogger("faceattr")


def evaluate(
    pred: str | Path,
    truth: str | Path,
    scores: str | Path | None = None,
    out: str | Path = "evaluation",
    images: str | Path | None = None,
    cache: str | Path | None = None,
    workers: int | None = None,
) -> dict:
    """Error rates of `pred` against `truth`; with `scores` (the predictions.csv beside `pred`)
    also AUC and EER, and the evaluation pictures in `out` (the worst errors too, from `images`)."""
    predicted, labels = read_labels(pred), read_labels(truth)
    if len(set(labels.tolist())) < 2:
        raise FaceAttrError(
            f"{truth} holds label {labels[0]} only: HTER weighs both classes, so it needs both"
        )
    if len(predicted) != len(labels):
        raise FaceAttrError(
            f"{pred} has {len(predicted)} lines but {truth} has {len(labels)}; they must agree"
        )
    if os.path.samefile(pred, truth):  # read_labels found both: they exist
        log.warning("--pred and --truth are the same file, %s: an HTER of 0 says nothing", pred)
    result = with_interval(labels, predicted)
    if scores is None:
        return result
    soft, threshold, written = read_scores(scores, len(labels))
    if mismatch := int((predicted != written).sum()):
        raise FaceAttrError(
            f"{pred} is not the label file predict wrote with {scores}: they differ on "
            f"{mismatch} of {plural(len(labels), 'image')}; give both from the same predict"
        )
    differ = int((predicted != scores_to_labels(soft, threshold)).sum())
    if differ:  # predict --vote majority: the plots are the soft vote's
        log.warning(
            "%s differs from the soft vote of %s on %d image(s): the plots show the soft "
            "vote; the metrics printed and the confusion matrix are %s's",
            *(pred, scores, differ, pred),
        )
    result.update(auc=auc(labels, soft), eer=equal_error_rate(labels, soft))
    test_images = load_test_images(images) if images is not None else None
    _check_plots(Path(out), test_images)
    array = None
    if test_images is not None:
        from faceattr.cache import load_images

        array = load_images(test_images, cache, workers).array
        if len(array) != len(labels):
            raise FaceAttrError(
                f"{images} has {plural(len(array), 'image')}, the truth {len(labels)}"
            )
    plots.evaluation(labels, soft, threshold, out, array, predictions=predicted)
    return result


def _check_plots(out: Path, test_images: ImageSet | None) -> None:
    """Refuse a --plots folder among the `test_images`' layout, in a run (its evaluation/ holds
    train's out-of-fold pictures, which its report shows) or one holding images (the pictures
    would join them)."""
    if test_images is not None:
        refuse_inside(out, test_images.layout_folders(), "--plots")
    run = next((p for p in (out, *out.absolute().parents) if (p / "run.json").is_file()), None)
    if run is not None:
        raise FaceAttrError(
            f"--plots {out} is inside the run {run}, whose pictures are train's out-of-fold "
            "ones (its report shows them); choose a folder outside it"
        )
    if holds_images(out):
        raise FaceAttrError(f"--plots {out} holds images, which the pictures would join; "
                            "choose another --plots")  # fmt: skip


def read_scores(path: str | Path, n: int) -> tuple[np.ndarray, float, np.ndarray]:
    """The ensemble scores of a predictions.csv, the threshold its soft labels imply, and the
    labels predict wrote to the label file beside it (soft or majority vote)."""
    if not Path(path).is_file():  # a named pipe would wait for a writer forever
        state = "is not a file" if Path(path).exists() else "does not exist"
        raise FaceAttrError(f"--scores {path} {state}")
    try:
        with open(path) as f:
            rows = list(csv.DictReader(f))
        scores = np.array([float(r["soft_score"]) for r in rows])
        labels = np.array([int(r["soft_label"]) for r in rows])
        written = np.array([int(r["label"]) for r in rows])
    except (OSError, KeyError, ValueError, TypeError, csv.Error) as e:  # TypeError: a row cut short
        raise FaceAttrError(f"{path} is not a predictions.csv written by predict ({e})") from None
    if len(scores) != n:
        raise FaceAttrError(f"{path} has {len(scores)} rows but the truth has {n} labels")
    if not ((scores >= 0) & (scores <= 1)).all():  # NaN too
        raise FaceAttrError(f"{path}: soft_score must be probabilities in [0, 1]")
    above = scores[labels == 1]
    return scores, float(above.min()) if len(above) else 1.0, written
