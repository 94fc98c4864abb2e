"""Scoring images with one model, and combining the fold models' scores into one decision."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from faceattr import progress
from faceattr.metrics import (
    auc,
    best_threshold,
    equal_error_rate,
    scores_to_labels,
    with_interval,
)
from faceattr.runtime import autocast

VOTES = ("majority", "soft")


def inference_batch_size(device: torch.device) -> int:
    """Images per forward pass when scoring.

    Large on a GPU, to keep it busy; small on a CPU, where a batch's activations must stay in the
    caches: 64 scored the simple CNN 2.3x faster than 512 on two cores. With a batch per thread
    (`batches_side_by_side`), 32 scores EfficientNet-Lite0 1.2-1.4x faster than 64 there, and the
    simple CNN as fast.
    """
    return 4096 if device.type == "cuda" else 32


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 64, 64, 3) -> float (N, 3, 64, 64) in [0, 1], kept channels-last in memory."""
    return images.permute(0, 3, 1, 2).float().div_(255)


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

    def score(start: int) -> list[torch.Tensor]:
        """One batch's scores from every model (no_grad and autocast hold per thread)."""
        x = to_model_input(images[start : start + batch_size].to(device, non_blocking=True))
        mirrored = x.flip(-1) if tta else None
        scores = []
        with torch.no_grad(), autocast(device):
            for model in models:
                p = torch.sigmoid(model(x).float())
                if mirrored is not None:
                    p = (p + torch.sigmoid(model(mirrored).float())) / 2
                scores.append(p.cpu())
        return scores

    out: list[list[torch.Tensor]] = []
    shown = progress.bar(len(images) * len(models), f"scoring with {len(models)} model(s)")
    with batches_side_by_side(device) as map_in_order:
        for scores in map_in_order(score, range(0, len(images), batch_size)):
            out.append(scores)
            shown.update(len(scores[0]) * len(models))
    shown.close()
    if not len(images):
        return np.empty((len(models), 0))
    return torch.stack([torch.cat(s) for s in zip(*out, strict=True)]).numpy().astype(np.float64)


@contextmanager
def batches_side_by_side(device: torch.device) -> Iterator[Callable]:
    """A `map` that gives results in order: on a CPU with T threads, it works on T batches at
    once, each on one thread.

    One op on a 64-image batch splits poorly across threads: small layers (the simple CNN's) and
    depthwise ones (EfficientNet's) spend much of it waiting on each other. Batches side by side
    score celeba64's test images 1.2x (the simple CNN) and 1.35x (EfficientNet-Lite0) faster on
    two cores, to the same values: each batch is still computed alone, by one thread. On a
    Ctrl-C only the batches already running are finished.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield map
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="faceattr-score")
    torch.set_num_threads(1)  # for every thread: each op runs in the one that calls it
    try:
        yield pool.map
    finally:
        pool.shutdown(cancel_futures=True)
        torch.set_num_threads(threads)


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
