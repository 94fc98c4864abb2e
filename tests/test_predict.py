"""predict: every row of the label file and table belongs to its own image, in numeric order."""

import csv
import json

import numpy as np
import torch
from PIL import Image

from conftest import here, read_lines
from faceattr.checkpoints import load_fold_models
from faceattr.ensemble import ensemble_scores


def test_each_row_scores_its_own_image_in_numeric_order(trained_run, dataset_dir, tmp_path):
    # 12 unpadded names, where string order would put 10.png before 2.png, and the images in
    # another order than the dataset's; PNG, so that this test decodes the pixels predict does.
    folder = tmp_path / "test"
    folder.mkdir()
    for i, source in enumerate(sorted((dataset_dir / "val_img").iterdir())[12:0:-1], start=1):
        Image.open(source).convert("RGB").save(folder / f"{i}.png")
    out = tmp_path / "labels.txt"
    result = here("predict", str(folder), "--run", str(trained_run), "--output", str(out), "-q",
                  "--device", "cpu")  # fmt: skip  # float32, as scored below
    assert result.returncode == 0, result.stderr
    with (tmp_path / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == [f"{i}.png" for i in range(1, 13)]
    assert read_lines(out) == [r["label"] for r in rows]
    # Each image scored alone here, mirrored too as the run's ensemble.json says: its own row's.
    assert json.loads((trained_run / "models" / "ensemble.json").read_text())["tta"] is True
    models = [m.model for m in load_fold_models(trained_run / "models")]
    expected = [
        ensemble_scores(models, torch.from_numpy(np.array(Image.open(folder / r["image"]))[None]),
                        tta=True)[:, 0]
        for r in rows
    ]  # fmt: skip
    got = [[float(r["score_1"]), float(r["score_2"])] for r in rows]
    assert np.allclose(got, expected, atol=1e-5)
    assert len({round(s, 4) for s, _ in got}) > 6  # images that score alike would prove nothing
