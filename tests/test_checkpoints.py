import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from faceattr.checkpoints import (
    check_digests,
    checked_settings,
    load_fold_models,
    load_training_state,
    save_fold_model,
    save_training_state,
)
from faceattr.errors import FaceAttrError
from faceattr.models import create_model


def test_a_damaged_training_state_is_no_state(tmp_path):
    """An interrupted fold whose state cannot be read trains afresh (None), never a traceback."""
    state = tmp_path / "checkpoint"
    save_training_state(state, {"w": torch.ones(2)}, {"epoch": 3})
    assert load_training_state(state)[1] == {"epoch": 3}
    for info in ("[]", '{"epoch": 4}', "\xff"):  # a list, another epoch's, not UTF-8 JSON
        state.with_suffix(".json").write_bytes(info.encode("latin-1"))
        assert load_training_state(state) is None
    save_file({"w": torch.ones(2)}, str(state.with_suffix(".safetensors")))  # no metadata
    state.with_suffix(".json").write_text('{"epoch": 3}')
    assert load_training_state(state) is None


def test_a_full_disk_under_a_model_is_one_line_naming_it(tmp_path, monkeypatch):
    """safetensors says a failed write with its own error, no OSError: it had been a traceback."""
    import safetensors

    import faceattr.checkpoints

    def full(*args, **kwargs):
        raise safetensors.SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(faceattr.checkpoints, "save_file", full)
    with pytest.raises(FaceAttrError, match=r"cannot write .*fold_1.safetensors: .*No space"):
        save_fold_model(tmp_path / "models", 1, create_model("simple"), {"arch": "simple"})
    with pytest.raises(FaceAttrError, match=r"cannot write .*checkpoint.safetensors: .*No space"):
        save_training_state(tmp_path / "checkpoint", {"w": torch.ones(2)}, {"epoch": 3})
    assert [p.name for p in tmp_path.rglob("*")] == ["models"]  # no temporary left


def test_roundtrip_gives_the_same_scores(tmp_path):
    torch.manual_seed(0)
    model = create_model("simple").eval()
    save_fold_model(tmp_path, 2, model, {"arch": "simple", "threshold": 0.5, "epoch": 3})
    assert json.loads((tmp_path / "fold_2.json").read_text())["epoch"] == 3
    (loaded,) = load_fold_models(tmp_path)
    x = torch.rand(4, 3, 64, 64)
    assert loaded.fold == 2 and loaded.config["arch"] == "simple"
    assert not loaded.model.training
    assert torch.equal(loaded.model(x), model(x))


def test_folds_come_back_in_numeric_order(tmp_path):
    for fold in (10, 2, 1):
        save_fold_model(tmp_path, fold, create_model("simple"), {"arch": "simple"})
    assert [m.fold for m in load_fold_models(tmp_path)] == [1, 2, 10]


def test_missing_or_broken_models_are_user_errors(tmp_path):
    with pytest.raises(FaceAttrError, match="does not exist"):
        load_fold_models(tmp_path / "nope")
    with pytest.raises(FaceAttrError, match=r"holds no fold_K\.safetensors model$"):
        load_fold_models(tmp_path)
    # A run folder given for its models/ (--model-dir RUN): what would read it.
    save_fold_model(tmp_path / "r" / "models", 1, create_model("simple"), {"arch": "simple"})
    with pytest.raises(FaceAttrError, match=r"but its models/ does: .* as --run .*r$"):
        load_fold_models(tmp_path / "r")
    # A run interrupted before its first fold had finished: had it a model folder or not, not
    # "does not exist", but what it is and what finishes it.
    (tmp_path / "run.json").write_text(json.dumps({"status": "running", "config": {"folds": 2}}))
    unfinished = r"has not finished \(0 of 2 fold models.*--resume finishes it"
    with pytest.raises(FaceAttrError, match=unfinished):
        load_fold_models(tmp_path / "models")  # not there yet
    (tmp_path / "models").mkdir()
    with pytest.raises(FaceAttrError, match=unfinished):
        load_fold_models(tmp_path / "models")  # there, empty
    (tmp_path / "run.json").unlink()
    save_fold_model(tmp_path, 1, create_model("simple"), {"arch": "simple"})
    (tmp_path / "fold_1.json").write_text(json.dumps({"arch": "resnet18"}))
    mismatch = r"cannot load .*fold_1.safetensors: its tensors are not those of the resnet18 model"
    with pytest.raises(FaceAttrError, match=mismatch):
        load_fold_models(tmp_path)
    (tmp_path / "fold_1.safetensors").write_bytes(b"garbage")
    (tmp_path / "fold_1.json").write_text(json.dumps({"arch": "simple"}))
    with pytest.raises(FaceAttrError, match="cannot load"):
        load_fold_models(tmp_path)


def test_a_fold_model_from_another_run_is_refused(trained_run, tmp_path):
    """Nothing had tied a fold model to its run: one copied in from another run (of the same
    model, or another) joined the ensemble at this run's threshold. ensemble.json keeps each
    fold model's sha256."""
    import shutil

    from faceattr.checkpoints import load_ensemble_settings

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    models = load_fold_models(run / "models")
    assert load_ensemble_settings(run / "models", models)["folds"] == [1, 2]
    torch.manual_seed(1)
    save_fold_model(run / "models", 2, create_model("simple"), models[1].config)  # another's
    with pytest.raises(FaceAttrError, match=r"fold_2.safetensors is not the model this run"):
        load_ensemble_settings(run / "models", load_fold_models(run / "models"))
    # ensemble.json without its list of folds: its digests still say which folds vote.
    settings = json.loads((run / "models" / "ensemble.json").read_text())
    del settings["folds"]
    (run / "models" / "ensemble.json").write_text(json.dumps(settings))
    (run / "models" / "fold_2.safetensors").unlink()
    (run / "models" / "fold_2.json").unlink()
    with pytest.raises(FaceAttrError, match=r"digests of folds \[1, 2\]: fold_2.safetensors is"):
        load_ensemble_settings(run / "models", load_fold_models(run / "models"))
    # A run from before the digests were kept: no check, as before.
    settings = json.loads((run / "models" / "ensemble.json").read_text())
    del settings["sha256"]
    (run / "models" / "ensemble.json").write_text(json.dumps(settings))
    load_ensemble_settings(run / "models", load_fold_models(run / "models"))


def test_a_threshold_of_0_is_one_a_run_can_choose():
    """best_threshold gives 0.0 for a model that separates nothing: ensemble.json may hold it."""
    checked = checked_settings({"threshold": 0, "tta": False}, Path("e.json"), [1], ".safetensors")
    assert checked["threshold"] == 0.0
    for bad in (-0.01, 1.01):
        with pytest.raises(FaceAttrError, match=r"threshold must be in \[0, 1\]"):
            checked_settings({"threshold": bad, "tta": False}, Path("e.json"), [1], ".x")


def test_a_fold_models_weights_gone_with_its_json_left_is_refused(tmp_path):
    """Without ensemble.json to list the folds, fold_2.json alone still says fold 2 is missing."""
    for fold in (1, 2):
        save_fold_model(tmp_path, fold, create_model("simple"), {"arch": "simple"})
    (tmp_path / "fold_2.safetensors").unlink()
    with pytest.raises(FaceAttrError, match=r"fold_2\.safetensors is missing"):
        load_fold_models(tmp_path)


def test_digests_keyed_by_other_than_fold_numbers_are_one_line():
    with pytest.raises(FaceAttrError, match="sha256 must map folds to digests"):
        check_digests(Path("m"), {1: "abc"}, ".safetensors", {"one": "abc"}, Path("e.json"))
