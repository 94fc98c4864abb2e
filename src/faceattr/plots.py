"""Every picture faceattr draws: data, training, evaluation on scored images, prediction.

Plain matplotlib on the Agg backend (no display needed). Each function takes data and a path,
writes one PNG atomically and returns its path; the PNG's metadata says how many panels it has.
scikit-learn and scipy are imported by the curves that need them, as in metrics.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from faceattr.metrics import error_rates, rates_at, scores_to_labels
from faceattr.outputs import atomic_path

CLASS_COLOURS = {0: "#d95f02", 1: "#1b9e77"}
LABEL_NAMES = {0: "label 0", 1: "label 1"}


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    panels = sum(ax.get_visible() and ax.has_data() for ax in fig.axes) or len(fig.axes)
    heading = getattr(fig, "_suptitle", None)  # fig.get_suptitle() from matplotlib 3.8 on
    suptitle = heading.get_text() if heading is not None else ""
    texts = [suptitle, *(ax.get_title(loc) for ax in fig.axes for loc in ("left", "center"))]
    titles = " | ".join(t for t in texts if t)  # what the picture says
    meta = {"Panels": str(panels), "Title": titles}
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight", metadata=meta)
    plt.close(fig)
    return path


# --- data ----------------------------------------------------------------------------------------


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
        len(classes), per_class, squeeze=False, figsize=(per_class * 1.1, len(classes) * 1.25)
    )
    for row, c in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        chosen = np.sort(rng.choice(idx, size=min(per_class, len(idx)), replace=False))
        for col in range(per_class):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(chosen):
                ax.imshow(images[chosen[col]])
        axes[row, 0].set_title(LABEL_NAMES.get(c, str(c)), loc="left", fontsize=10)
    return _save(fig, path)


def training_set(images: np.ndarray, labels: np.ndarray, out: Path) -> list[Path]:
    """The training set's pictures in the folder `out`, as explore and train both draw them (the
    report shows train's): class_balance.png and samples.png."""
    counts = {c: int((labels == c).sum()) for c in (0, 1)}
    return [
        class_balance(counts, out / "class_balance.png"),
        sample_grid(images, labels, out / "samples.png"),
    ]


def image_audit(audits: dict[str, dict], path: str | Path) -> Path:
    """Original image sizes and colour modes per image set (train, test), before conversion."""
    fig, (ax_size, ax_mode) = plt.subplots(1, 2, figsize=(10, 3.4))
    width = 0.8 / max(len(audits), 1)
    for ax, key, title in ((ax_size, "sizes", "original size"), (ax_mode, "modes", "colour mode")):
        names = sorted(
            {n for a in audits.values() for n in a[key]},
            key=lambda n: -sum(a[key].get(n, 0) for a in audits.values()),
        )[:8]
        for i, (part, audit) in enumerate(audits.items()):
            x = np.arange(len(names)) + i * width
            ax.bar(x, [audit[key].get(n, 0) for n in names], width, label=part)
        ax.set_xticks(np.arange(len(names)) + width * (len(audits) - 1) / 2, names)
        ax.set_ylabel("images")
        ax.set_title(title)
        ax.legend()
    converted = ", ".join(
        f"{p}: {a['resized']} resized, {a['converted']} converted" for p, a in audits.items()
    )
    fig.suptitle(f"Image audit ({converted})", fontsize=10)
    return _save(fig, path)


# --- training ------------------------------------------------------------------------------------


def training_curves(history: list[dict], path: str | Path, best_epoch: int | None = None) -> Path:
    """Loss, HTER and learning rate per epoch (training and validation fold), best epoch marked."""
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_hter, ax_lr) = plt.subplots(1, 3, figsize=(14, 3.6))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], "o-", label="validation")
    ax_loss.set_title("weighted BCE loss")
    ax_hter.plot(epochs, [100 * r["train_hter"] for r in history], "o-", label="train")
    ax_hter.plot(epochs, [100 * r["val_hter"] for r in history], "o-", label="validation")
    ax_hter.set_title("HTER (%)")
    ax_lr.plot(epochs, [r["lr"] for r in history], "o-", color="grey", label="learning rate")
    ax_lr.set_title("learning rate")
    for ax in (ax_loss, ax_hter, ax_lr):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"best ({best_epoch})")
        ax.legend()
    return _save(fig, path)


# --- evaluation on scored, labelled images -------------------------------------------------------


def roc_det(labels: np.ndarray, scores: np.ndarray, threshold: float, path: str | Path) -> Path:
    """ROC and DET curves, the operating point at `threshold` marked on both."""
    from scipy.stats import norm
    from sklearn.metrics import det_curve, roc_curve

    point = error_rates(labels, scores_to_labels(scores, threshold))
    fig, (ax_roc, ax_det) = plt.subplots(1, 2, figsize=(10, 4.2))
    far, tpr, _ = roc_curve(labels, scores)
    ax_roc.plot(far, tpr, color="C0")
    ax_roc.plot([0, 1], [0, 1], ":", color="grey")
    ax_roc.plot(
        point["far"],
        1 - point["frr"],
        "o",
        color="C3",
        label=f"threshold {threshold:.3f}: HTER {100 * point['hter']:.2f} %",
    )
    ax_roc.set_xlabel("FAR (label 0 accepted as 1)")
    ax_roc.set_ylabel("1 - FRR (label 1 accepted)")
    ax_roc.set_title("ROC")
    ax_roc.legend(loc="lower right")
    det_far, det_frr, _ = det_curve(labels, scores)
    clip = 1e-4  # the normal-deviate scale has no room for 0 or 1
    ax_det.plot(
        norm.ppf(np.clip(det_far, clip, 1 - clip)), norm.ppf(np.clip(det_frr, clip, 1 - clip))
    )
    ax_det.plot(
        norm.ppf(np.clip(point["far"], clip, 1 - clip)),
        norm.ppf(np.clip(point["frr"], clip, 1 - clip)),
        "o",
        color="C3",
    )
    ticks = np.array([0.001, 0.01, 0.05, 0.2, 0.5])
    for set_ticks in (ax_det.set_xticks, ax_det.set_yticks):
        set_ticks(norm.ppf(ticks), [f"{100 * t:g} %" for t in ticks])
    ax_det.set_xlabel("FAR")
    ax_det.set_ylabel("FRR")
    ax_det.set_title("DET (normal deviate scale)")
    for ax in (ax_roc, ax_det):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def threshold_sweep(
    labels: np.ndarray, scores: np.ndarray, threshold: float, path: str | Path
) -> Path:
    """FAR, FRR and HTER as the threshold moves, the chosen one marked."""
    cuts = np.linspace(0, 1, 201)
    far, frr = rates_at(labels, scores, cuts)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(cuts, 100 * far, label="FAR")
    ax.plot(cuts, 100 * frr, label="FRR")
    ax.plot(cuts, 100 * (far + frr) / 2, label="HTER", lw=2, color="black")
    ax.axvline(threshold, color="C3", ls="--", label=f"chosen {threshold:.3f}")
    ax.set_ylim(0, 60)
    ax.set_xlabel("threshold on the score (probability of label 1)")
    ax.set_ylabel("%")
    ax.set_title("Error rates against the threshold")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def score_histograms(
    labels: np.ndarray, scores: np.ndarray, threshold: float, path: str | Path
) -> Path:
    """Score distribution of each class (each normalised to its own size), threshold marked."""
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, 1, 51)
    for c in (0, 1):
        ax.hist(
            scores[np.asarray(labels) == c],
            bins=bins,
            density=True,
            alpha=0.55,
            color=CLASS_COLOURS[c],
            label=f"{LABEL_NAMES[c]} ({(labels == c).sum():,})",
        )
    ax.axvline(threshold, color="C3", ls="--", label=f"threshold {threshold:.3f}")
    ax.set_yscale("log")
    ax.set_xlabel("score (probability of label 1)")
    ax.set_ylabel("density (log)")
    ax.set_title("Scores per class")
    ax.legend()
    return _save(fig, path)


def confusion(labels: np.ndarray, predictions: np.ndarray, path: str | Path) -> Path:
    """The 2x2 confusion matrix with counts and each row's share."""
    rates = error_rates(labels, predictions)
    matrix = np.array(
        [
            [rates["n0"] - rates["false_accepts"], rates["false_accepts"]],
            [rates["false_rejects"], rates["n1"] - rates["false_rejects"]],
        ]
    )
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (i, j), n in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            f"{n:,}\n{100 * shares[i, j]:.1f} %",
            ha="center",
            va="center",
            color="white" if shares[i, j] > 0.5 else "black",
        )
    ax.set_xticks([0, 1], ["predicted 0", "predicted 1"])
    ax.set_yticks([0, 1], ["true 0", "true 1"])
    ax.set_title(f"Confusion (HTER {100 * rates['hter']:.2f} %)")
    return _save(fig, path)


def worst_errors(
    images: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    path: str | Path,
    per_class: int = 8,
    names: list[str] | None = None,
) -> Path:
    """The most confidently wrong images of each class, with their scores."""
    labels = np.asarray(labels)
    rows = []
    for c in (0, 1):
        wrong = np.flatnonzero((labels == c) & (scores_to_labels(scores, threshold) != c))
        # Label 0 wrongly accepted with the highest scores, label 1 rejected with the lowest.
        order = wrong[np.argsort(-scores[wrong] if c == 0 else scores[wrong])]
        rows.append(order[:per_class])
    fig, axes = plt.subplots(2, per_class, figsize=(per_class * 1.2, 3.3), squeeze=False)
    for r, (c, chosen) in enumerate(zip((0, 1), rows, strict=True)):
        for col in range(per_class):
            ax = axes[r, col]
            ax.axis("off")
            if col < len(chosen):
                i = chosen[col]
                ax.imshow(images[i])
                caption = f"{scores[i]:.2f}" + (f"\n{names[i]}" if names else "")
                ax.set_title(caption, fontsize=7)
        axes[r, 0].text(
            -0.15,
            0.5,
            f"true {c}",
            transform=axes[r, 0].transAxes,
            rotation=90,
            ha="right",
            va="center",
        )
    fig.suptitle("Most confidently wrong (score = probability of label 1)", fontsize=10)
    return _save(fig, path)


# --- prediction on unlabelled images -------------------------------------------------------------


def prediction_scores(
    scores: np.ndarray, threshold: float, labels: np.ndarray, vote: str, path: str | Path
) -> Path:
    """Histogram of the ensemble's (soft) scores on the test images, threshold marked; the title
    counts the `labels` written, by the `vote` that wrote them."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(scores, bins=np.linspace(0, 1, 51), color="C0")
    ax.axvline(threshold, color="C3", ls="--", label=f"threshold {threshold:.3f}")
    ax.set_yscale("log")
    ax.set_xlabel("ensemble score (mean probability of label 1)")
    ax.set_ylabel("images (log)")
    predicted0 = int((np.asarray(labels) == 0).sum())
    ax.set_title(f"Test scores: {predicted0:,} of {len(scores):,} predicted 0 ({vote} vote)")
    ax.legend()
    return _save(fig, path)


def model_agreement(votes: np.ndarray, path: str | Path) -> Path:
    """How many fold models voted 1 for each test image; both ends are unanimous."""
    n_models = votes.shape[0]
    counts = np.bincount(votes.sum(axis=0), minlength=n_models + 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    colours = ["C2" if k in (0, n_models) else "C1" for k in range(n_models + 1)]
    ax.bar(np.arange(n_models + 1), counts, color=colours)
    ax.set_yscale("log")
    ax.set_xlabel(f"models voting 1 (of {n_models})")
    ax.set_ylabel("images (log)")
    unanimous = (counts[0] + counts[-1]) / max(counts.sum(), 1)
    ax.set_title(f"Fold models agree unanimously on {100 * unanimous:.1f} % of images")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, path)


def evaluation(
    labels: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    out: str | Path,
    images: np.ndarray | None = None,
    names: list[str] | None = None,
    predictions: np.ndarray | None = None,
) -> list[Path]:
    """All evaluation pictures of scored, labelled images into the folder `out`; the confusion
    matrix is that of `predictions` (default: the scores at `threshold`)."""
    out = Path(out)
    labels, scores = np.asarray(labels), np.asarray(scores)
    paths = [
        roc_det(labels, scores, threshold, out / "roc_det.png"),
        threshold_sweep(labels, scores, threshold, out / "threshold.png"),
        score_histograms(labels, scores, threshold, out / "scores.png"),
        confusion(
            labels,
            scores_to_labels(scores, threshold) if predictions is None else predictions,
            out / "confusion.png",
        ),
    ]
    if images is not None:
        paths.append(
            worst_errors(images, labels, scores, threshold, out / "worst_errors.png", names=names)
        )
    return paths
