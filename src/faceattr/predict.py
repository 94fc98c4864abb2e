"""Predict: every fold model scores the test images, the ensemble votes, the label file is written."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from faceattr.cache import load_images
from faceattr.checkpoints import load_fold_models
from faceattr.data import ImageSet
from faceattr.ensemble import model_scores, vote
from faceattr.outputs import ensure_writable_dir, write_csv, write_text

log = logging.getLogger("faceattr")


def predict(
    images: ImageSet,
    models_dir: str | Path,
    output: str | Path,
    device: torch.device,
    rule: str = "majority",
    batch_size: int = 1024,
    workers: int | None = None,
    cache: str | Path | None = None,
) -> dict:
    """Write `output` (one 0/1 per image, in numeric order) and predictions.csv beside it.

    predictions.csv has, per image, each model's score (probability of label 1) and vote, then the
    ensemble's score and label. Models are loaded before anything is decoded, so a wrong model
    folder fails at once.
    """
    started = time.perf_counter()
    output = Path(output)
    ensure_writable_dir(output.parent)
    models = load_fold_models(models_dir)
    threshold = float(models[0].config.get("threshold", 0.5))
    loaded = load_images(images, cache, workers)
    x = torch.from_numpy(loaded.array)
    if device.type == "cuda":
        x = x.to(device)
    t0 = time.perf_counter()
    scores = np.stack([model_scores(_ready(m.model, device), x, batch_size) for m in models])
    score_s = time.perf_counter() - t0
    ensemble_score, labels = vote(scores, rule, threshold)

    csv_path = output.with_name("predictions.csv")
    folds = [m.fold for m in models]
    header = [
        "image",
        *(f"score_{f}" for f in folds),
        *(f"vote_{f}" for f in folds),
        "ensemble_score",
        "label",
    ]
    votes = (scores >= threshold).astype(int)
    rows = [
        [
            name,
            *map(float, scores[:, i]),
            *map(int, votes[:, i]),
            float(ensemble_score[i]),
            int(labels[i]),
        ]
        for i, name in enumerate(images.names)
    ]
    write_csv(csv_path, header, rows)
    write_text(output, "".join(f"{v}\n" for v in labels))
    summary = {
        "images": len(labels),
        "models": len(models),
        "vote": rule,
        "threshold": threshold,
        "predicted_0": int((labels == 0).sum()),
        "predicted_1": int((labels == 1).sum()),
        "unanimous": float((votes.min(axis=0) == votes.max(axis=0)).mean()),
        "output": str(output),
        "table": str(csv_path),
        "timings": {
            "decode_s": loaded.seconds,
            "score_s": score_s,
            "total_s": time.perf_counter() - started,
        },
    }
    log.info("scored %d images with %d models in %.1fs", len(labels), len(models), score_s)
    return summary


def _ready(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """On the device, channels-last like the input batches (1.6x faster on a CPU than mixed)."""
    return model.to(device).to(memory_format=torch.channels_last)
