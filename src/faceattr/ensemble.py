"""Scoring images with one model, and combining the fold models' scores into one decision."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from faceattr import progress
from faceattr.metrics import (
    auc,
    best_threshold,
    bootstrap_hter,
    equal_error_rate,
    error_rates,
    scores_to_labels,
)
from faceattr.runtime import autocast

VOTES = ("majority", "soft")


def inference_batch_size(device: torch.device) -> int:
    """Images per forward pass when scoring.

    Large on a GPU, to keep it busy; small on a CPU, where a batch's activations must stay in the
    caches: 64 scores the simple CNN 2.3x faster than 512 on two cores (5.2k vs 2.2k img/s).
    """
    return 4096 if device.type == "cuda" else 64


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 64, 64, 3) -> float (N, 3, 64, 64) in [0, 1], kept channels-last in memory."""
    return images.permute(0, 3, 1, 2).float().div_(255)


@torch.no_grad()
def ensemble_scores(
    models: list[nn.Module],
    images: torch.Tensor,
    batch_size: int | None = None,
    tta: bool = False,
) -> np.ndarray:
    """Probability of label 1 from every model for every image: shape (models, images).

    `images` is a uint8 (N, 64, 64, 3) tensor on the host or on the models' device; each batch is
    moved and converted once for all models. With `tta` each image is also scored mirrored
    left-right and the two probabilities averaged: faces are symmetric enough that a model should
    agree with itself, and averaging removes part of its noise. Models are left in eval mode.
    """
    for model in models:
        model.eval()
    device = next(models[0].parameters(), images).device
    batch_size = batch_size or inference_batch_size(device)
    out: list[list[torch.Tensor]] = [[] for _ in models]
    shown = progress.bar(len(images) * len(models), f"scoring with {len(models)} model(s)")
    for start in range(0, len(images), batch_size):
        x = to_model_input(images[start : start + batch_size].to(device, non_blocking=True))
        mirrored = x.flip(-1) if tta else None
        with autocast(device):
            for model, scores in zip(models, out, strict=True):
                p = torch.sigmoid(model(x).float())
                if mirrored is not None:
                    p = (p + torch.sigmoid(model(mirrored).float())) / 2
                scores.append(p.cpu())
                shown.update(len(p))
    shown.close()
    if not len(images):
        return np.empty((len(models), 0))
    return torch.stack([torch.cat(s) for s in out]).numpy().astype(np.float64)


def model_scores(
    model: nn.Module, images: torch.Tensor, batch_size: int | None = None, tta: bool = False
) -> np.ndarray:
    """Probability of label 1 from one model for every image (see `ensemble_scores`)."""
    return ensemble_scores([model], images, batch_size, tta)[0]


def vote(
    scores: np.ndarray, rule: str = "majority", threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Combine scores of shape (models, images) into (ensemble score, 0/1 label) per image.

    - majority (the seed's rule): each model votes at `threshold`; the ensemble score is the share
      of votes for label 1 and the label is the majority's. A tie, possible with an even number of
      models, goes to the mean probability.
    - soft: the ensemble score is the mean probability, the label is that at `threshold`.
    """
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    mean = scores.mean(axis=0)
    if rule == "soft":
        return mean, scores_to_labels(mean, threshold)
    if rule != "majority":
        raise ValueError(f"unknown vote {rule!r}; choose from {VOTES}")
    share = scores_to_labels(scores, threshold).mean(axis=0)
    labels = np.where(share == 0.5, scores_to_labels(mean, threshold), share > 0.5).astype(np.int64)
    return share, labels


def with_interval(labels: np.ndarray, predictions: np.ndarray) -> dict:
    """Error rates plus a 95 % bootstrap interval for the HTER."""
    rates = error_rates(labels, predictions)
    rates["hter_ci"] = list(bootstrap_hter(labels, predictions))
    return rates


def decision_rule(labels: np.ndarray, oof: np.ndarray, fold_of: np.ndarray) -> dict:
    """The ensemble's threshold, chosen on out-of-fold scores, and what it is worth.

    - threshold: the one with the lowest HTER on all out-of-fold scores (`best_threshold`);
    - oof: error rates there, with a 95 % bootstrap interval; slightly optimistic, since the
      threshold was fitted on the same scores;
    - oof_nested: each fold judged at a threshold chosen on the other folds only, so no image
      helps choose the threshold it is judged at. It still measures single fold models: the
      ensemble applies the threshold to the mean of their scores, which spreads less (how well
      the threshold carries over is what benchmarks/recipes.py --holdout measures);
    - oof_at_0.5: the untuned rule, for comparison; eer and auc: threshold-free quality.

    All of them lean a little optimistic all the same: each fold's epoch was the best on those
    validation images (see train_fold).
    """
    threshold, _ = best_threshold(labels, oof)
    nested = np.empty_like(labels)
    for k in np.unique(fold_of):
        inside = fold_of == k
        t_k, _ = best_threshold(labels[~inside], oof[~inside])
        nested[inside] = scores_to_labels(oof[inside], t_k)
    return {
        "threshold": threshold,
        "oof": with_interval(labels, scores_to_labels(oof, threshold)),
        "oof_nested": with_interval(labels, nested),
        "oof_at_0.5": with_interval(labels, scores_to_labels(oof, 0.5)),
        "eer": equal_error_rate(labels, oof),
        "auc": auc(labels, oof),
    }
