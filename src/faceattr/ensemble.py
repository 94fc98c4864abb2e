"""Scoring images with one model, and combining the fold models' scores into one decision."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from faceattr.metrics import scores_to_labels

VOTES = ("majority", "soft")


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 64, 64, 3) -> float (N, 3, 64, 64) in [0, 1], kept channels-last in memory."""
    return images.permute(0, 3, 1, 2).float().div_(255)


@torch.no_grad()
def model_scores(model: nn.Module, images: torch.Tensor, batch_size: int = 1024) -> np.ndarray:
    """Probability of label 1 for every image of a uint8 (N, 64, 64, 3) tensor.

    The images may sit on the host or on the model's device; batches go where the model is. The
    model is left in eval mode.
    """
    model.eval()
    device = next(model.parameters(), images).device
    out = []
    for start in range(0, len(images), batch_size):
        x = to_model_input(images[start : start + batch_size].to(device, non_blocking=True))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)
        out.append(torch.sigmoid(logits.float()).cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.empty(0)


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
