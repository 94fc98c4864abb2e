"""ONNX export: the files, and onnxruntime scores equal to PyTorch's on real image files."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import assert_user_error, cli, here, read_lines
from faceattr.checkpoints import save_fold_model
from faceattr.data import load_dataset
from faceattr.decode import decode_images
from faceattr.ensemble import ensemble_scores
from faceattr.export import OnnxEnsemble, export_onnx
from faceattr.models import MODELS, create_model


# resnet34 is resnet18's builder with more blocks: exporting it too would add 17 s, not coverage.
@pytest.mark.parametrize("arch", sorted(set(MODELS) - {"resnet34"}))
def test_onnx_scores_equal_pytorch_scores(arch, dataset_dir, tmp_path):
    torch.manual_seed(0)
    models = []
    for fold in (1, 2):
        model = create_model(arch)
        model.train()(torch.rand(8, 3, 64, 64))  # BatchNorm statistics away from the identity
        save_fold_model(tmp_path / "models", fold, model.eval(), {"arch": arch})
        models.append(model)
    paths = export_onnx(tmp_path / "models", tmp_path / "onnx")
    assert [p.name for p in paths] == ["fold_1.onnx", "fold_2.onnx"]
    images, _ = decode_images(load_dataset(dataset_dir, need="test").test)
    images = images[:12]  # batches of 8 and 4: ResNet18 at 64x64 costs a second per 20 images
    expected = ensemble_scores(models, torch.from_numpy(images), tta=True)
    got = OnnxEnsemble(tmp_path / "onnx").scores(images, batch_size=8, tta=True)
    assert got.shape == expected.shape == (2, 12)
    assert np.abs(got - expected).max() < 1e-4


def test_export_and_predict_with_onnxruntime(trained_run, dataset_dir, tmp_path):
    result = cli("export", str(trained_run), "--onnx", str(tmp_path / "onnx"), "-v")
    assert result.returncode == 0 and "wrote 2 ONNX models" in result.stdout, result.stderr
    settings = json.loads((tmp_path / "onnx" / "ensemble.json").read_text())
    run_settings = json.loads((trained_run / "models" / "ensemble.json").read_text())
    assert settings["threshold"] == run_settings["threshold"] and settings["folds"] == [1, 2]
    assert settings["vote"] == run_settings["vote"] == "soft"
    assert settings["preprocessing"]["layout"] == "NCHW"

    torch_out, onnx_out = tmp_path / "torch" / "label_val.txt", tmp_path / "ort" / "label_val.txt"
    result = here(
        "predict", str(dataset_dir), "--run", str(trained_run), "--output", str(torch_out)
    )
    assert result.returncode == 0, result.stderr
    # On the CPU whatever --device says: no GPU needed, and one named is said to do nothing.
    result = here("predict", str(dataset_dir), "--onnx", str(tmp_path / "onnx"), "--output",
                  str(onnx_out), "--device", "cuda")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "--onnx runs on the CPU (onnxruntime's): --device cuda does nothing" in result.stderr
    assert read_lines(onnx_out) == read_lines(torch_out)
    rows = [
        list(csv.DictReader((p.parent / "predictions.csv").open())) for p in (torch_out, onnx_out)
    ]
    for a, b in zip(*rows, strict=True):
        for column in ("score_1", "score_2", "soft_score"):
            assert abs(float(a[column]) - float(b[column])) < 1e-4


def test_onnx_user_errors(dataset_dir, trained_run, tmp_path):
    assert_user_error(
        here("predict", str(dataset_dir), "--onnx", str(tmp_path)), "not a faceattr ONNX export"
    )
    assert_user_error(
        here("predict", str(dataset_dir), "--onnx", str(tmp_path), "--run", str(trained_run)),
        "exactly one of",
    )


def test_an_export_missing_a_fold_or_edited_by_hand_is_refused(trained_run, tmp_path):
    from faceattr.errors import FaceAttrError
    from faceattr.export import OnnxEnsemble, export_onnx

    export_onnx(trained_run / "models", tmp_path / "onnx")
    assert OnnxEnsemble(tmp_path / "onnx").folds == [1, 2]
    saved = (tmp_path / "onnx" / "fold_2.onnx").read_bytes()
    shutil.copy(tmp_path / "onnx" / "fold_1.onnx", tmp_path / "onnx" / "fold_2.onnx")
    with pytest.raises(FaceAttrError, match=r"fold_2\.onnx is not the model this export wrote"):
        OnnxEnsemble(tmp_path / "onnx")  # another model, though it loads and scores
    (tmp_path / "onnx" / "fold_2.onnx").write_bytes(saved)
    assert OnnxEnsemble(tmp_path / "onnx").folds == [1, 2]
    (tmp_path / "onnx" / "fold_2.onnx").unlink()
    with pytest.raises(FaceAttrError, match=r"lists folds \[1, 2\]: fold_2\.onnx is missing"):
        OnnxEnsemble(tmp_path / "onnx")
    (tmp_path / "onnx" / "ensemble.json").write_text('{"folds": [1], "threshold": -1, "tta": true}')
    with pytest.raises(FaceAttrError, match=r"threshold must be in \[0, 1\], got -1"):
        OnnxEnsemble(tmp_path / "onnx")
    (tmp_path / "onnx" / "ensemble.json").write_bytes(b'{"folds": [1], "\xff": 1}')
    with pytest.raises(FaceAttrError, match=r"is not a faceattr ONNX export .*utf-8"):
        OnnxEnsemble(tmp_path / "onnx")
    (tmp_path / "onnx" / "ensemble.json").write_text(
        '{"folds": [1], "threshold": 0.5, "tta": true}'
    )
    onnx_1 = tmp_path / "onnx" / "fold_1.onnx"
    onnx_1.write_bytes(onnx_1.read_bytes()[:500])  # cut short
    with pytest.raises(FaceAttrError, match=r"cannot load .*fold_1\.onnx"):
        OnnxEnsemble(tmp_path / "onnx")
    (tmp_path / "onnx" / "fold_3.onnx").write_bytes(b"")  # another export's
    with pytest.raises(FaceAttrError, match=r"holds fold_3\.onnx from another export"):
        export_onnx(trained_run / "models", tmp_path / "onnx")


def test_an_interrupted_export_leaves_the_earlier_one_whole(trained_run, tmp_path, monkeypatch):
    from faceattr.errors import FaceAttrError
    from faceattr.export import OnnxEnsemble, export_onnx

    export_onnx(trained_run / "models", tmp_path / "onnx")  # an earlier export of the same folds
    before = {p.name: p.read_bytes() for p in (tmp_path / "onnx").iterdir()}
    calls = []

    def interrupted(*args, **kwargs):  # Ctrl-C while the second fold exports
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(trained_run / "models", tmp_path / "onnx")
    # Every model is written before any replaces the earlier one: that export is left whole.
    assert {p.name: p.read_bytes() for p in (tmp_path / "onnx").iterdir()} == before
    assert OnnxEnsemble(tmp_path / "onnx").folds == [1, 2]
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    with pytest.raises(FaceAttrError, match="is the run's models folder"):
        export_onnx(run / "models", run / "models")
    # Another run's models folder, or the run itself: its ensemble.json had been replaced, and
    # predict then voted that run's models at this one's threshold.
    ensemble = (run / "models" / "ensemble.json").read_bytes()
    for other in (run / "models", run):
        with pytest.raises(FaceAttrError, match="holds a run or its models"):
            export_onnx(trained_run / "models", other)
    assert (run / "models" / "ensemble.json").read_bytes() == ensemble
    assert not list(run.rglob("*.onnx"))
    export_onnx(run / "models", run / "models" / "onnx")  # inside it: its files are apart
    assert (
        json.loads((run / "models" / "ensemble.json").read_text())["threshold"]
        == json.loads((trained_run / "models" / "ensemble.json").read_text())["threshold"]
    )
    assert (trained_run / "models" / "ensemble.json").exists()
