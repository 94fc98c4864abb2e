"""Predict: every fold model scores the test images, the ensemble votes, the label file is written."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from faceattr import plots
from faceattr.cache import load_images
from faceattr.checkpoints import load_ensemble_settings, load_fold_models
from faceattr.data import LABEL_FILE, ImageSet
from faceattr.ensemble import ensemble_scores, inference_batch_size, vote
from faceattr.errors import FaceAttrError, percent, plural
from faceattr.export import OnnxEnsemble
from faceattr.metrics import scores_to_labels
from faceattr.models import for_inference
from faceattr.outputs import (
    check_writable,
    csv_text,
    within,
    write_json,
    write_together,
)
from faceattr.report import build_report
from faceattr.runfolder import beside_the_run, run_paths

log = logging.getLogger("faceattr")
TABLE = "predictions.csv"  # written beside the label file


def predict(
    images: ImageSet,
    models_dir: str | Path,
    output: str | Path,
    device: torch.device,
    rule: str | None = None,
    threshold: float | None = None,
    tta: bool | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    cache: str | Path | None = None,
    onnx: bool = False,
) -> dict:
    """Write `output` (one 0/1 per image, in numeric order) and predictions.csv beside it.

    The vote `rule`, the threshold and test-time augmentation come from the run's
    `models/ensemble.json` unless given. Both votes are computed, `rule` decides the label file;
    predictions.csv has, per image, each model's score (probability of label 1) and vote, both
    ensemble scores and labels, and the label written. Models are loaded before anything is
    decoded, so a wrong folder fails at once. With `onnx`, `models_dir` is a folder written by
    `faceattr export --onnx` and onnxruntime scores the images.
    """
    started = time.perf_counter()
    output = check_output(Path(output), images, Path(models_dir))
    if threshold is not None and not 0 <= threshold <= 1:  # NaN too
        raise FaceAttrError(f"--threshold must be in [0, 1], got {threshold}")
    if batch_size is not None and batch_size < 1:
        raise FaceAttrError(f"--batch-size must be at least 1, got {batch_size}")
    check_writable(output.parent)  # made when the labels are written: bad input leaves nothing
    run = Path(models_dir).parent
    own = Path(models_dir).resolve() == (run / "models").resolve()  # not models copied beside
    found = _run_json(run) if own else None  # a `train --overwrite` may put another run there
    ensemble = OnnxEnsemble(models_dir) if onnx else TorchEnsemble(models_dir, device)
    if own and _run_json(run) != found:  # some models of each run, or the threshold of the other
        raise FaceAttrError(f"{run} was replaced while its models were read; predict again")
    threshold = ensemble.settings["threshold"] if threshold is None else threshold
    tta = ensemble.settings["tta"] if tta is None else tta
    rule = ensemble.settings["vote"] if rule is None else rule
    loaded = load_images(images, cache, workers)
    t0 = time.perf_counter()
    batch_size = batch_size or inference_batch_size(torch.device("cpu") if onnx else device)
    scores = ensemble.scores(loaded.array, batch_size, tta)
    score_s = time.perf_counter() - t0
    soft_score, soft_label = vote(scores, "soft", threshold)
    share, majority_label = vote(scores, "majority", threshold)
    labels = soft_label if rule == "soft" else majority_label

    csv_path = output.with_name(TABLE)
    folds = ensemble.folds
    votes = scores_to_labels(scores, threshold)
    columns = {  # of predictions.csv, after the image's name: one value per image each
        **{f"score_{f}": scores[k] for k, f in enumerate(folds)},
        **{f"vote_{f}": votes[k] for k, f in enumerate(folds)},
        "soft_score": soft_score,
        "soft_label": soft_label,
        "majority_share": share,
        "majority_label": majority_label,
        "label": labels,
    }
    rows = [[name, *(c[i].item() for c in columns.values())] for i, name in enumerate(images.names)]
    labels_text, table = "".join(f"{v}\n" for v in labels), csv_text(["image", *columns], rows)
    write_together({output: labels_text, csv_path: table})  # both, then renamed
    summary = {
        "images": len(labels),
        "models": len(folds),
        "runtime": "onnxruntime" if onnx else "torch",
        "vote": rule,
        "threshold": threshold,
        "tta": tta,
        "predicted_0": int((labels == 0).sum()),
        "predicted_1": int((labels == 1).sum()),
        "majority_predicted_0": int((majority_label == 0).sum()),
        "soft_predicted_0": int((soft_label == 0).sum()),
        "votes_agree": float((soft_label == majority_label).mean()),
        "unanimous": float((votes.min(axis=0) == votes.max(axis=0)).mean()),
        "output": str(output),
        "table": str(csv_path),
        "timings": {
            "decode_s": loaded.seconds,
            "score_s": score_s,
            "total_s": time.perf_counter() - started,
        },
    }
    log.info(
        "scored %s with %s in %.1fs",
        plural(len(labels), "image"),
        plural(len(folds), "model"),
        score_s,
    )
    if not onnx and found is not None:  # a run folder: its report gains a section
        try:
            _add_to_report(run, found, summary, soft_score, labels, votes, threshold, rule)
        except (FaceAttrError, OSError) as e:
            # The labels are written: a read-only or damaged run folder only costs its report.
            log.warning("the run's report was not updated: %s", e)
    return summary


def _add_to_report(
    run: Path,
    found: bytes,
    summary: dict,
    scores: np.ndarray,
    labels: np.ndarray,
    votes: np.ndarray,
    threshold: float,
    rule: str,
) -> None:
    """The prediction's section of the run's report (its `summary`, and pictures of the
    ensemble's scores and labels and of each model's votes), if the run is still the one whose
    run.json was `found` when its models were read. No train can start there, nor replace the
    run, while it is written."""
    with beside_the_run(run) as free:
        if not free:
            log.warning("a train is writing %s: its report is left as it was", run)
        elif _run_json(run) != found:
            log.warning("%s was replaced while predicting: its report is left as it was", run)
        else:
            scores_png = run / "prediction" / "scores.png"
            plots.prediction_scores(scores, threshold, labels, rule, scores_png)
            plots.model_agreement(votes, run / "prediction" / "agreement.png")
            write_json(run / "prediction" / "prediction.json", summary)
            summary["report"] = str(build_report(run))


def _run_json(run: Path) -> bytes | None:
    """The run folder's run.json as it is now (None: not a run folder), to tell if it changed."""
    try:
        return (run / "run.json").read_bytes()
    except OSError:
        return None


def format_prediction(summary: dict) -> str:
    """The prediction's result as the lines `predict` prints."""
    lines = [
        f"{summary['images']:,} images, {plural(summary['models'], 'model')}, "
        f"{summary['vote']} vote at threshold {summary['threshold']:.4f}"
        f"{' with mirrored copies' if summary['tta'] else ''}:"
        f" {summary['predicted_0']:,} x 0, {summary['predicted_1']:,} x 1",
        f"  soft vote {summary['soft_predicted_0']:,} x 0, majority vote "
        f"{summary['majority_predicted_0']:,} x 0: they agree on {percent(summary['votes_agree'])}"
        f"; the models are unanimous on {percent(summary['unanimous'])}",
        f"wrote {summary['output']} and {summary['table']}",
    ]
    if "report" in summary:
        lines.append(f"report: {summary['report']}")
    return "\n".join(lines)


def check_output(output: Path, images: ImageSet, models_dir: Path) -> Path:
    """The label file's path, if it can be one: a file name, not a folder, not the table's, and
    none of the command's inputs or the layout's: the test images' folder or zip, the training
    images and labels beside them, the models and what train wrote beside them."""
    if output.name in ("", ".", ".."):
        raise FaceAttrError("--output does not name a file")
    if output.is_dir():
        raise FaceAttrError(f"--output {output} is a folder; name the label file to write")
    if output.exists() and not output.is_file():  # /dev/null, a pipe: renaming would replace it
        raise FaceAttrError(f"--output {output} is not a regular file")
    if output.name == TABLE:
        raise FaceAttrError(f"--output {output}: {TABLE} is the table written beside the labels")
    folder = images.source.local(images.folder)
    labels = [folder.parent / LABEL_FILE, images.source.local("") / LABEL_FILE]
    inputs = [*images.layout_folders(), models_dir, *labels]
    run = models_dir.parent
    if (run / "run.json").exists():  # what train wrote there; a label file may join them
        inputs += run_paths(run)
    for where in inputs:
        if within(output, where):
            raise FaceAttrError(
                f"--output {output} would overwrite or join an input: {where.resolve()}"
            )
        if within(output.with_name(TABLE), where):  # a zip of test images named so, say
            raise FaceAttrError(
                f"--output {output}: the {TABLE} written beside it would overwrite an input: "
                f"{where.resolve()}"
            )
    return output


class TorchEnsemble:
    """A run's fold models, ready for inference on `device`."""

    def __init__(self, models_dir: str | Path, device: torch.device):
        models = load_fold_models(models_dir)
        self.settings = load_ensemble_settings(models_dir, models)
        self.folds = [m.fold for m in models]
        self.nets = [for_inference(m.model, device) for m in models]
        self.device = device

    def scores(self, images: np.ndarray, batch_size: int, tta: bool) -> np.ndarray:
        x = torch.from_numpy(images)
        if self.device.type == "cuda":
            x = x.to(self.device)
        return ensemble_scores(self.nets, x, batch_size, tta)
