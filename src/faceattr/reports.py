"""Pictures a run writes: class balance, sample images per class, training curves.

Plain matplotlib on the Agg backend (no display needed); every function takes data and a path and
writes one PNG.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from faceattr.outputs import atomic_path

CLASS_COLOURS = {0: "#d95f02", 1: "#1b9e77"}


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def class_balance(counts: dict[int, int], path: str | Path, title: str = "Class balance") -> Path:
    """Bar chart of images per class, each bar labelled with its count and share."""
    total = sum(counts.values())
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    classes = sorted(counts)
    bars = ax.bar(
        [str(c) for c in classes],
        [counts[c] for c in classes],
        color=[CLASS_COLOURS.get(c, "grey") for c in classes],
    )
    for bar, c in zip(bars, classes, strict=True):
        ax.annotate(
            f"{counts[c]:,}\n({100 * counts[c] / max(total, 1):.1f} %)",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=9,
        )
    ax.set_xlabel("label")
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.set_ylim(0, max(counts.values(), default=1) * 1.25)
    return _save(fig, path)


def sample_grid(
    images: np.ndarray, labels: np.ndarray, path: str | Path, per_class: int = 8, seed: int = 0
) -> Path:
    """A row of random sample images per class, so one sees what each label means."""
    rng = np.random.default_rng(seed)
    classes = sorted(set(int(c) for c in labels))
    fig, axes = plt.subplots(
        len(classes), per_class, figsize=(per_class * 1.1, len(classes) * 1.25), squeeze=False
    )
    for row, c in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        chosen = rng.choice(idx, size=min(per_class, len(idx)), replace=False)
        for col in range(per_class):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(chosen):
                ax.imshow(images[chosen[col]])
        axes[row, 0].set_title(f"label {c}", loc="left", fontsize=10)
    return _save(fig, path)


def training_curves(history: list[dict], path: str | Path, best_epoch: int | None = None) -> Path:
    """Loss and HTER per epoch for the training and validation folds, best epoch marked."""
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_hter) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], "o-", label="validation")
    ax_loss.set_title("weighted BCE loss")
    ax_hter.plot(epochs, [100 * r["train_hter"] for r in history], "o-", label="train")
    ax_hter.plot(epochs, [100 * r["val_hter"] for r in history], "o-", label="validation")
    ax_hter.set_title("HTER (%)")
    for ax in (ax_loss, ax_hter):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"best ({best_epoch})")
        ax.legend()
    return _save(fig, path)
