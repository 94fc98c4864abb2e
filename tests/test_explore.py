import dataclasses
import json
import shutil

import numpy as np
import pytest

from conftest import with_stray_bytes
from faceattr.data import load_dataset
from faceattr.errors import FaceAttrError
from faceattr.explore import explore, format_summary, imbalance_verdict


def test_verdicts():
    assert imbalance_verdict({0: 50, 1: 50}).startswith("balanced")
    assert imbalance_verdict({0: 30, 1: 70}).startswith("imbalanced: class 0 is 30.0 %")
    strong = imbalance_verdict({0: 84, 1: 916})
    assert strong.startswith("strongly imbalanced: class 0 is 8.4 % of the images (1 : 10.9)")
    assert "HTER" in strong
    assert imbalance_verdict({0: 900, 1: 100}).startswith("strongly imbalanced: class 1")
    assert imbalance_verdict({0: 0, 1: 10}).startswith("only class 1")


def test_explore_writes_summary_and_pictures(dataset_dir, tmp_path):
    summary = explore(load_dataset(dataset_dir, need="any"), tmp_path / "ex")
    saved = json.loads((tmp_path / "ex" / "explore.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    n0, n1 = saved["class_counts"]["0"], saved["class_counts"]["1"]
    assert n0 + n1 == saved["n_train"] == 160 and 0 < n0 < n1
    assert saved["n_test"] == 40
    assert saved["train_audit"]["sizes"] == {"64x64": 160}
    for png in ("class_balance.png", "samples.png"):
        assert (tmp_path / "ex" / png).stat().st_size > 5_000
    text = format_summary(summary)
    assert "training images: 160" in text and "test images: 40" in text


def test_the_audit_counts_images_decoded_despite_damage(dataset_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(dataset_dir, data)
    first = sorted((data / "val_img").iterdir())[0]
    first.write_bytes(with_stray_bytes(first.read_bytes()))
    summary = explore(load_dataset(data, need="any"), tmp_path / "ex")
    assert list(summary["test_audit"]["damaged"]) == ["0"] and not summary["train_audit"]["damaged"]
    assert format_summary(summary).endswith("0 converted, 1 decoded despite damage")


def test_explore_refuses_before_decoding_what_it_would_stop_at(dataset_dir, tmp_path):
    """A --cache in the test images' folder had been found only once the training images were
    cached there (their .npy among the test images) and two pictures drawn; a folder in the
    place of explore.json only after every image was decoded."""

    data = tmp_path / "data"
    shutil.copytree(dataset_dir, data)
    before = sorted(p.name for p in (data / "val_img").iterdir())
    with pytest.raises(FaceAttrError, match=r"--cache .*val_img is inside the image folder"):
        explore(load_dataset(data, need="any"), tmp_path / "ex", cache=data / "val_img")
    assert sorted(p.name for p in (data / "val_img").iterdir()) == before
    assert not (tmp_path / "ex").exists()
    (tmp_path / "ex2" / "explore.json").mkdir(parents=True)
    with pytest.raises(FaceAttrError, match=r"explore.json: it exists and is not a regular file"):
        explore(load_dataset(data, need="any"), tmp_path / "ex2")
    assert [p.name for p in (tmp_path / "ex2").iterdir()] == ["explore.json"]


def test_verdict_boundaries():
    assert imbalance_verdict({0: 40, 1: 60}).startswith("balanced")  # 40 % is balanced
    assert imbalance_verdict({0: 20, 1: 80}).startswith("imbalanced")  # 20 %: not strongly
    assert imbalance_verdict({0: 19, 1: 81}).startswith("strongly imbalanced")


def test_explore_class_percent_has_two_decimals(dataset_dir, tmp_path, monkeypatch):
    import faceattr.explore

    for name in ("training_set", "image_audit"):  # the pictures are test_explore's
        monkeypatch.setattr(faceattr.explore.plots, name, lambda *a, **k: None)
    data = load_dataset(dataset_dir, need="any")
    labels = np.array([0] + [1] * (len(data.labels) - 1))  # 1 in 160: 0.62 %
    data = dataclasses.replace(data, labels=labels)
    summary = explore(data, tmp_path / "ex")
    assert summary["class_percent"] == {"0": 0.62, "1": 99.38}
