"""Explore a dataset before training: counts, class balance, an imbalance verdict, an image audit."""

from __future__ import annotations

from pathlib import Path

from faceattr import plots
from faceattr.cache import load_images
from faceattr.data import Dataset
from faceattr.outputs import check_replaceable, ensure_writable_dir, refuse_inside, write_json

OUTPUTS = ("explore.json", "class_balance.png", "samples.png", "audit.png")


def imbalance_verdict(counts: dict[int, int]) -> str:
    """One sentence on how imbalanced the classes are and what follows for training and scoring."""
    total = sum(counts.values())
    minority = min(counts, key=lambda c: (counts[c], c))
    majority = 1 - minority
    share = counts[minority] / total if total else 0.0
    if counts[minority] == 0:
        return f"only class {majority} is present: a classifier cannot be trained"
    ratio = counts[majority] / counts[minority]
    head = f"class {minority} is {100 * share:.1f} % of the images (1 : {ratio:.1f})"
    if share >= 0.4:
        return f"balanced: {head}"
    kind = "strongly imbalanced" if share < 0.2 else "imbalanced"
    return (
        f"{kind}: {head}; accuracy would reward always answering {majority}, "
        "so training weights the classes equally and results are judged by HTER"
    )


def explore(
    dataset: Dataset, out: str | Path, workers: int | None = None, cache: str | Path | None = None
) -> dict:
    """Write explore.json, class_balance.png, samples.png and audit.png to `out`; return the summary.

    Images are decoded through the same cache as `train` and `predict`, which then find them.
    """
    refuse_inside(out, dataset.image_folders(), "--out")
    if cache is not None:  # every part's folder, before the first part is decoded and drawn
        refuse_inside(cache, dataset.image_folders(), "--cache")
    out = ensure_writable_dir(out)
    for name in OUTPUTS:  # a folder in the way is found now, not after decoding every image
        check_replaceable(out / name)
    summary: dict = {"data": dataset.where}
    audits: dict[str, dict] = {}  # audit.png's parts
    if dataset.train is not None and dataset.labels is not None:
        labels = dataset.labels
        counts = {c: int((labels == c).sum()) for c in (0, 1)}
        # Broken images are reported here, not fatal: finding them is what explore is for.
        loaded = load_images(dataset.train, cache, workers, labels.tobytes(), skip_bad=True)
        images, audits["train"] = loaded.array, loaded.audit.to_dict()
        summary.update(
            n_train=len(labels),
            class_counts={str(c): n for c, n in counts.items()},
            class_percent={str(c): round(100 * n / len(labels), 2) for c, n in counts.items()},
            imbalance=imbalance_verdict(counts),
            train_audit=audits["train"],
        )
        plots.training_set(images, labels, out)
    if dataset.test is not None:
        audits["test"] = load_images(dataset.test, cache, workers, skip_bad=True).audit.to_dict()
        summary.update(n_test=len(dataset.test), test_audit=audits["test"])
    plots.image_audit(audits, out / "audit.png")
    write_json(out / "explore.json", summary)
    return summary


def format_summary(summary: dict) -> str:
    """The explore summary as a few lines for the terminal."""
    lines = []
    if "n_train" in summary:
        lines.append(f"training images: {summary['n_train']:,}")
        for c in ("0", "1"):
            n, pct = summary["class_counts"][c], summary["class_percent"][c]
            lines.append(f"  label {c}: {n:,} ({pct:.1f} %)")
        lines.append(summary["imbalance"])
        lines.append(_audit_line(summary["train_audit"]))
    if "n_test" in summary:
        lines.append(f"test images: {summary['n_test']:,}")
        lines.append(_audit_line(summary["test_audit"]))
    return "\n".join(lines)


def _audit_line(audit: dict) -> str:
    sizes = ", ".join(f"{s} x{n:,}" for s, n in list(audit["sizes"].items())[:3])
    modes = ", ".join(f"{m} x{n:,}" for m, n in audit["modes"].items())
    damaged = len(audit["damaged"])
    return (
        f"  sizes: {sizes}; modes: {modes}; "
        f"{audit['resized']} resized, {audit['converted']} converted"
        + (f", {damaged} decoded despite damage" if damaged else "")
    )
