"""A small synthetic dataset in the exercise's layout, for the demo and the tests.

Cartoon faces (skin-toned ovals with eyes, brows, mouth and hair on a varied background) in JPEG;
the minority class, label 0 like the exercise's, wears a drawn occluder: glasses or a hat. Sizes,
colours and positions vary so that the task is learnable but not trivial.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from faceattr.outputs import write_text

SIZE = 64


def draw_face(rng: np.random.Generator, occluded: bool) -> Image.Image:
    """One 64x64 face; `occluded` adds glasses or a hat."""
    bg = rng.integers(40, 220, size=3)
    im = Image.new("RGB", (SIZE, SIZE), tuple(int(v) for v in bg))
    d = ImageDraw.Draw(im)
    cx, cy = 32 + rng.integers(-4, 5), 34 + rng.integers(-4, 5)
    w, h = rng.integers(15, 21), rng.integers(20, 26)
    skin = np.array([rng.integers(150, 250), rng.integers(110, 200), rng.integers(80, 170)])
    hair = tuple(int(v) for v in rng.integers(10, 120, size=3))
    d.ellipse([cx - w - 1, cy - h - 4, cx + w + 1, cy + 2], fill=hair)  # hair behind the face
    d.ellipse([cx - w, cy - h, cx + w, cy + h], fill=tuple(int(v) for v in skin))
    eye_y, eye_dx = cy - h // 4, w // 2
    for side in (-1, 1):
        ex = cx + side * eye_dx
        d.ellipse([ex - 2, eye_y - 2, ex + 2, eye_y + 2], fill=(30, 30, 30))
        d.line([ex - 4, eye_y - 6, ex + 4, eye_y - 6 + rng.integers(-1, 2)], fill=hair, width=2)
    d.line([cx, eye_y + 2, cx - 2, cy + h // 4], fill=tuple(int(v) for v in skin * 0.8), width=1)
    mouth_y = cy + h // 2
    d.arc([cx - 7, mouth_y - 4, cx + 7, mouth_y + 3], 10, 170, fill=(150, 40, 50), width=2)
    if occluded:
        colour = tuple(int(v) for v in rng.integers(0, 90, size=3))
        if rng.random() < 0.6:  # glasses
            r = int(rng.integers(4, 7))
            for side in (-1, 1):
                ex = cx + side * eye_dx
                d.ellipse([ex - r, eye_y - r, ex + r, eye_y + r], outline=colour, width=2)
            d.line([cx - eye_dx + r, eye_y, cx + eye_dx - r, eye_y], fill=colour, width=2)
        else:  # hat
            brim = cy - h + int(rng.integers(2, 8))
            d.rectangle([cx - w - 4, brim - 3, cx + w + 4, brim], fill=colour)
            d.rectangle([cx - w + 3, brim - 14, cx + w - 3, brim - 3], fill=colour)
    pixels = np.asarray(im, dtype=np.float32) + rng.normal(0, 6, (SIZE, SIZE, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def make_dataset(
    out: str | Path,
    n_train: int = 600,
    n_test: int = 200,
    minority: float = 0.12,
    seed: int = 0,
) -> np.ndarray:
    """Write train_img/, label_train.txt and val_img/ under `out`; return the test labels.

    Label 0 (occluded) has a share of `minority`, and a part of 2 images or more holds both; the
    test labels are withheld from `out`, as in the exercise, and returned for scoring.
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    labels = {}
    for part, n in (("train_img", n_train), ("val_img", n_test)):
        folder = out / part
        folder.mkdir(parents=True, exist_ok=True)
        y = (rng.random(n) >= minority).astype(np.int64)
        if n >= 2 and len(set(y.tolist())) < 2:  # a small part drew one class: HTER needs both
            y[0] = 1 - y[0]
        for i, label in enumerate(y, start=1):
            draw_face(rng, occluded=label == 0).save(folder / f"{i:06d}.jpg", quality=90)
        labels[part] = y
    write_text(out / "label_train.txt", "".join(f"{v}\n" for v in labels["train_img"]))
    return labels["val_img"]
