"""predict: every row of the label file and table belongs to its own image, in numeric order."""

import csv
import json

import numpy as np
import pytest
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


def test_a_run_replaced_while_predicting_keeps_its_own_report(
    trained_run, dataset_dir, tmp_path, monkeypatch, caplog
):
    """predict uses the run in place while `train --overwrite` trains its replacement; the
    replacement may land meanwhile. Its report must not gain the old models' prediction, nor may
    the label file come from some models of each (or one run's threshold and the other's)."""
    import shutil

    import pytest

    import faceattr.predict
    from faceattr.data import load_dataset
    from faceattr.errors import FaceAttrError

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.rmtree(run / "prediction", ignore_errors=True)
    data, cpu = load_dataset(dataset_dir, need="any"), torch.device("cpu")
    loading, decoding = faceattr.predict.TorchEnsemble, faceattr.predict.load_images

    def replaced_after(step):
        def then_replaced(*args, **kwargs):
            result = step(*args, **kwargs)
            summary = json.loads((run / "run.json").read_text())
            summary["replaced"] = summary.get("replaced", 0) + 1  # another run's
            (run / "run.json").write_text(json.dumps(summary))
            return result

        return then_replaced

    monkeypatch.setattr(faceattr.predict, "load_images", replaced_after(decoding))
    with caplog.at_level("WARNING", logger="faceattr"):
        summary = faceattr.predict.predict(data.test, run / "models", tmp_path / "l.txt", cpu)
    assert len(read_lines(tmp_path / "l.txt")) == summary["images"] == 40
    assert "was replaced while predicting: its report is left as it was" in caplog.text
    assert not (run / "prediction").exists() and "report" not in summary
    monkeypatch.setattr(faceattr.predict, "load_images", decoding)
    # A train writing there (one that may replace the run any moment) waits for no report.
    import fcntl

    caplog.clear()
    with open(run / ".lock", "a") as held, caplog.at_level("WARNING", logger="faceattr"):
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        summary = faceattr.predict.predict(data.test, run / "models", tmp_path / "l.txt", cpu)
    assert f"a train is writing {run}: its report is left as it was" in caplog.text
    assert not (run / "prediction").exists() and "report" not in summary
    summary = faceattr.predict.predict(data.test, run / "models", tmp_path / "l.txt", cpu)
    assert (run / "prediction" / "prediction.json").exists() and "report" in summary
    monkeypatch.setattr(faceattr.predict, "TorchEnsemble", replaced_after(loading))
    with pytest.raises(FaceAttrError, match="was replaced while its models were read"):
        faceattr.predict.predict(data.test, run / "models", tmp_path / "l2.txt", cpu)
    assert not (tmp_path / "l2.txt").exists()


def test_models_beside_a_run_leave_its_report_alone(trained_run, dataset_dir, tmp_path):
    """--model-dir RUN/other (another run's models copied there): they are not the run's, and
    its report had gained their prediction, at their threshold, as the run's own."""
    import shutil

    import faceattr.predict
    from faceattr.data import load_dataset

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.rmtree(run / "prediction", ignore_errors=True)
    shutil.copytree(run / "models", run / "models_other")
    data, cpu = load_dataset(dataset_dir, need="any"), torch.device("cpu")
    summary = faceattr.predict.predict(data.test, run / "models_other", tmp_path / "l.txt", cpu)
    assert not (run / "prediction").exists() and "report" not in summary
    summary = faceattr.predict.predict(data.test, run / "models", tmp_path / "l.txt", cpu)
    assert (run / "prediction" / "prediction.json").exists() and "report" in summary


# Per image, by index mod 5, the three models' scores: majority and soft disagree on A and B.
A, B, C, D = (0.6, 0.6, 0.0), (0.4, 0.4, 1.0), (0.9, 0.9, 0.9), (0.1, 0.1, 0.1)
PATTERN = [A, B, C, D, A]  # majority 1 0 1 0 1, soft 0 1 1 0 0


@pytest.fixture
def three_models(monkeypatch):
    import faceattr.predict

    class ThreeModels:
        def __init__(self, models_dir, device):
            self.settings = {"threshold": 0.5, "tta": False, "vote": "majority"}
            self.folds = [1, 2, 3]

        def scores(self, images, batch_size, tta):
            return np.array([PATTERN[i % 5] for i in range(len(images))]).T

    monkeypatch.setattr(faceattr.predict, "TorchEnsemble", ThreeModels)


def test_predict_writes_the_chosen_votes_labels_and_counts_both(
    three_models, dataset_dir, tmp_path
):
    """Two fold models' votes always agree (a tie is the soft vote's): three tell the label
    file's rule and the summary's counts of each vote apart."""
    from faceattr.data import load_dataset
    from faceattr.predict import predict

    test, cpu = load_dataset(dataset_dir, need="any").test, torch.device("cpu")
    out = tmp_path / "labels.txt"
    summary = predict(test, tmp_path / "models_x", out, cpu)  # the settings' vote: majority
    assert read_lines(out) == [str(x) for x in [1, 0, 1, 0, 1] * 8]
    assert (summary["majority_predicted_0"], summary["soft_predicted_0"]) == (16, 24)
    assert summary["votes_agree"] == summary["unanimous"] == pytest.approx(0.4)
    summary = predict(test, tmp_path / "models_x", out, cpu, rule="soft")
    assert read_lines(out) == [str(x) for x in [0, 1, 1, 0, 0] * 8]
    assert (summary["majority_predicted_0"], summary["soft_predicted_0"]) == (16, 24)
    assert summary["votes_agree"] == summary["unanimous"] == pytest.approx(0.4)
    summary = predict(test, tmp_path / "models_x", out, cpu, rule="soft", threshold=0.0)
    assert summary["predicted_1"] == 40  # 0 is a threshold too: everything accepted
