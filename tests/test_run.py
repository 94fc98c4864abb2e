"""The training run: the run folder it writes, its checks, determinism and recipes."""

import csv
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_user_error, cli, train_args
from faceattr import run as run_module
from faceattr.checkpoints import load_fold_models, weights_digest
from faceattr.data import load_dataset
from faceattr.errors import FaceAttrError
from faceattr.metrics import best_threshold, error_rates
from faceattr.models import create_model
from faceattr.predict import predict
from faceattr.run import train_run
from faceattr.train import HISTORY_COLUMNS, FoldResult, TrainConfig


def test_train_run_writes_the_whole_run(trained_run, dataset_dir):
    run = trained_run
    summary = json.loads((run / "run.json").read_text())
    assert summary["status"] == "complete"
    assert summary["config"]["folds"] == 2 and summary["config"]["arch"] == "simple"
    assert {"torch", "python", "device"} <= summary["environment"].keys()
    assert len(summary["folds"]) == 2 and 0 <= summary["oof"]["hter"] <= 1
    assert summary["timings"]["total_s"] > 0
    for fold in (1, 2):
        assert (run / "models" / f"fold_{fold}.safetensors").stat().st_size > 1_000_000
        config = json.loads((run / "models" / f"fold_{fold}.json").read_text())
        assert config["arch"] == "simple" and config["epoch"] in (1, 2)
        rows = list(csv.DictReader((run / f"fold_{fold}" / "history.csv").open()))
        assert [int(r["epoch"]) for r in rows] == [1, 2]
        assert {"train_loss", "val_far", "val_frr", "val_hter", "lr"} <= rows[0].keys()
        assert (run / f"fold_{fold}" / "curves.png").stat().st_size > 5_000
    oof = list(csv.DictReader((run / "oof.csv").open()))
    labels = load_dataset(dataset_dir).labels
    assert len(oof) == len(labels)
    assert [int(r["label"]) for r in oof] == labels.tolist()
    assert all(0 <= float(r["score"]) <= 1 for r in oof)
    preds = np.array([int(r["prediction"]) for r in oof])
    assert error_rates(labels, preds)["hter"] == summary["oof"]["hter"]
    scores = np.array([float(r["score"]) for r in oof])
    assert summary["oof"]["hter"] == best_threshold(labels, scores)[1]["hter"]
    low, high = summary["oof"]["hter_ci"]
    assert low <= summary["oof"]["hter"] <= high
    assert summary["oof_nested"]["hter"] >= summary["oof"]["hter"]  # tuned on other folds only
    assert summary["oof_at_0.5"]["hter"] >= summary["oof"]["hter"]
    assert 0 <= summary["eer"] <= 1 and 0 <= summary["auc"] <= 1
    ensemble = json.loads((run / "models" / "ensemble.json").read_text())
    assert ensemble == {
        "threshold": summary["threshold"],
        "vote": "soft",
        "tta": True,
        "folds": [1, 2],
        "sha256": {
            str(k): weights_digest((run / "models" / f"fold_{k}.safetensors").read_bytes())
            for k in (1, 2)
        },
    }
    folds = list(csv.DictReader((run / "folds.csv").open()))
    assert [int(r["fold"]) for r in folds] == [int(r["fold"]) for r in oof]  # both from 1


def test_same_seed_same_weights_and_labels_on_cpu(dataset_dir, tmp_path):
    data = load_dataset(dataset_dir, need="any")
    cfg = TrainConfig(folds=2, epochs=1, batch_size=32)
    cpu = torch.device("cpu")
    a = train_run(data, cfg, tmp_path / "a", cpu)
    b = train_run(data, cfg, tmp_path / "b", cpu)
    assert a["oof"] == b["oof"]
    for name in ("folds.csv", "oof.csv", "models/fold_1.safetensors", "models/fold_2.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    for run in ("a", "b"):
        predict(data.test, tmp_path / run / "models", tmp_path / run / "label_val.txt", cpu)
    labels = [(tmp_path / run / "label_val.txt").read_text() for run in ("a", "b")]
    assert labels[0] == labels[1] and len(labels[0].split()) == len(data.test)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epochs": 0}, "--epochs must be at least 1"),
        ({"batch_size": 1}, "--batch-size"),
        ({"step": 0}, "--step"),
        ({"lr": 0.0}, "--lr must be positive, got 0.0"),
        ({"mix_alpha": 0.0}, "--mix-alpha must be positive"),
        ({"ema": 1.0}, "--ema must be in"),
        ({"augment": "heavy"}, "--augment 'heavy'"),
        ({"mix": "blend"}, "--mix 'blend'"),
        ({"arch": "resnet18", "pretrained": "/no/such/weights.pth"}, "does not exist"),
    ],
)
def test_impossible_settings_are_rejected_before_any_work(change, message, dataset_dir, tmp_path):
    cfg = TrainConfig(**change)
    with pytest.raises(FaceAttrError, match=message):
        train_run(load_dataset(dataset_dir), cfg, tmp_path / "run", torch.device("cpu"))
    assert not (tmp_path / "run").exists()


def test_a_mixing_share_without_mixing_is_refused(dataset_dir, tmp_path):
    """--mix-alpha without --mix shapes nothing: it had been accepted without a word."""
    data, cpu = load_dataset(dataset_dir), torch.device("cpu")
    with pytest.raises(FaceAttrError, match=r"--mix-alpha 0.5 shapes the blends of --mix"):
        train_run(data, TrainConfig(mix_alpha=0.5), tmp_path / "run", cpu, given={"mix_alpha"})
    assert not (tmp_path / "run").exists()
    with pytest.raises(FaceAttrError, match="fewer than the 1000 folds"):  # a later check's
        cfg = TrainConfig(mix="mixup", mix_alpha=0.5, folds=1000)
        train_run(data, cfg, tmp_path / "run", cpu, given={"mix_alpha", "mix"})


def test_ddp_outside_torchrun_is_said_to_do_nothing(dataset_dir, tmp_path, caplog):
    cfg = TrainConfig(ddp=True, folds=1000)  # refused after the warning: nothing is trained
    with pytest.raises(FaceAttrError, match="fewer than the 1000 folds"):
        train_run(load_dataset(dataset_dir), cfg, tmp_path / "run", torch.device("cpu"))
    assert "this one runs alone, outside torchrun: it trains as without --ddp" in caplog.text


def test_compiled_training_saves_plain_weights(dataset_dir, tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    # Dynamo and AOTAutograd as --compile runs them, without inductor's C++ code generation:
    # that is torch's own, and costs about 50 s of two cores here. What is faceattr's is
    # the wrapping, one graph for both folds, and weights saved without the wrapper's prefix.
    compile_, compiled = torch.compile, []

    def compile_without_inductor(net):
        compiled.append(net)
        return compile_(net, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_without_inductor)
    torch._dynamo.reset()
    counters.clear()
    data = load_dataset(dataset_dir)
    cfg = TrainConfig(folds=2, epochs=1, batch_size=32, compile=True)
    summary = train_run(data, cfg, tmp_path / "run", torch.device("cpu"))
    assert summary["config"]["compile"] is True and len(compiled) == 2  # a model per fold
    assert counters["stats"]["unique_graphs"] == 1  # the second fold's model reuses the first's
    (model, *_) = load_fold_models(tmp_path / "run" / "models")  # no "_orig_mod." prefixes
    assert model.config["arch"] == "simple"


def test_compile_without_a_compiler_is_one_line(dataset_dir, tmp_path, monkeypatch):
    data, cfg = load_dataset(dataset_dir), TrainConfig(folds=2, epochs=1, compile=True)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no g++ there, nor anything
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(FaceAttrError, match=r"--compile needs a C\+\+ compiler \(g\+\+ or"):
        train_run(data, cfg, tmp_path / "run", torch.device("cpu"))
    assert not (tmp_path / "run").exists()  # refused before anything was written
    monkeypatch.undo()

    # A compiler there but failing (a missing header, a broken toolchain): one line too.
    def failing(graph, example_inputs):
        raise OSError("fatal error: Python.h: No such file or directory")

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda net: compile_(net, backend=failing))
    torch._dynamo.reset()
    with pytest.raises(FaceAttrError, match=r"--compile failed \(OSError: fatal error: Python.h"):
        train_run(data, cfg, tmp_path / "run", torch.device("cpu"))


def test_inductors_own_compiler_failing_is_one_line(dataset_dir, tmp_path):
    """Inductor's InductorError (torch 2.7 on), a subclass of BackendCompilerFailed that a test
    of the class's name had missed: a traceback and exit 1, not the one line."""
    env = {**os.environ, "CXX": "/bin/false"}  # found, but it compiles nothing
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")  # no kernel cached from before
    result = cli(*train_args(dataset_dir, tmp_path / "run", "--compile"), env=env)
    assert_user_error(result, "--compile failed (", "; train without --compile")


@pytest.mark.parametrize(
    "recipe",
    [
        {"optimizer": "adamw", "schedule": "cosine", "label_smoothing": 0.1},
        {
            "optimizer": "sgd",
            "schedule": "onecycle",
            "augment": "strong",
            "ema": 0.9,
            "mix": "cutmix",
        },
        {"arch": "efficientnet_lite0", "pretrained": "imagenet", "schedule": "cosine"},
    ],
)
def test_other_recipes_train(recipe, dataset_dir, tmp_path):
    cfg = TrainConfig(folds=2, epochs=2, batch_size=32, weight_decay=1e-4, **recipe)
    summary = train_run(load_dataset(dataset_dir), cfg, tmp_path / "run", torch.device("cpu"))
    assert summary["status"] == "complete"
    assert {k: summary["config"][k] for k in recipe} == recipe
    lrs = [
        float(line.split(",")[1])
        for line in (tmp_path / "run" / "fold_1" / "history.csv").read_text().splitlines()[1:]
    ]
    assert len(set(lrs)) == 2 and max(lrs) <= 1e-3  # the rate moves from epoch to epoch
    (model, *_) = load_fold_models(tmp_path / "run" / "models")
    assert model.config["arch"] == cfg.arch


def test_a_fold_whose_result_cannot_be_read_trains_again(tmp_path):
    from faceattr.run import _finished_fold

    (tmp_path / "fold_1").mkdir()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "fold_1.safetensors").touch()
    result = tmp_path / "fold_1" / "result.json"
    result.write_text(json.dumps({"summary": {"best_epoch": 2}, "val_scores": [0.5, 0.25]}))
    assert _finished_fold(tmp_path, 1)["val_scores"].tolist() == [0.5, 0.25]
    for text in (b"[]", b'{"summary": {}}', b"{", b'{"\xff": 1}'):  # a list, cut short, Latin-1
        result.write_bytes(text)
        assert _finished_fold(tmp_path, 1) is None, text


def test_overwrite_keeps_the_old_run_until_the_new_one_has_finished(
    trained_run, dataset_dir, tmp_path, monkeypatch, caplog
):
    """--overwrite had cleared the old run before training: a failure or Ctrl-C then left
    neither. The new run trains in OUT/.replacement/ and takes the old one's place at the end."""
    import shutil

    import faceattr.run
    from faceattr.runfolder import unfinished_run

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "fold_notes.txt").write_text("mine")  # the user's, beside the run
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    cfg = TrainConfig(arch="simple", folds=2, epochs=1, batch_size=32, seed=7)
    data, cpu = load_dataset(dataset_dir, need="any"), torch.device("cpu")
    trained = faceattr.run.train_fold

    def interrupted(model, images, labels, train_idx, val_idx, cfg, fold, *rest):
        if fold == 2:
            raise KeyboardInterrupt  # Ctrl-C in the new run's second fold
        return trained(model, images, labels, train_idx, val_idx, cfg, fold, *rest)

    monkeypatch.setattr(faceattr.run, "train_fold", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_run(data, cfg, run, cpu, overwrite=True)
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert {k: v for k, v in after.items() if k.parts[0] != ".replacement"} == before
    assert (run / ".replacement" / "fold_1" / "result.json").is_file()
    predict(data.test, run / "models", tmp_path / "label_val.txt", cpu)  # the old run is usable
    assert len((tmp_path / "label_val.txt").read_text().split()) == 40
    assert unfinished_run(run)  # what the seed's train command continues by itself
    with pytest.raises(FaceAttrError, match="a finished run and an unfinished one to replace it"):
        train_run(data, cfg, run, cpu)

    monkeypatch.setattr(faceattr.run, "train_fold", trained)
    with caplog.at_level("INFO", logger="faceattr"):
        summary = train_run(data, cfg, run, cpu, resume=True)
    assert "fold 1/2: finished before, kept" in caplog.text  # the replacement's, continued
    assert "replaced the run in" in caplog.text
    assert summary["config"]["seed"] == 7 and summary["resumed"] == 1
    assert json.loads((run / "run.json").read_text()) == json.loads(json.dumps(summary))
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == [".lock"]
    assert (run / "fold_notes.txt").read_text() == "mine" and not unfinished_run(run)
    assert (run / "models" / "fold_2.safetensors").read_bytes() != before[
        Path("models/fold_2.safetensors")
    ]
    report = (run / "report.html").read_text()
    assert str(run.resolve()) in report and ".replacement" not in report
    # An interrupted replacement is started again by --overwrite, not continued.
    (run / ".replacement" / "fold_1").mkdir(parents=True)
    (run / ".replacement" / "run.json").write_text(json.dumps({**summary, "status": "running"}))
    caplog.clear()
    with caplog.at_level("INFO", logger="faceattr"):
        train_run(data, cfg, run, cpu, overwrite=True)
    assert "finished before" not in caplog.text and not (run / ".replacement").exists()


def test_a_finished_run_resumed_stays_finished_if_cut_short(trained_run, dataset_dir, tmp_path):
    """--resume on a finished run finishes it again; it had first marked it "running", so a kill
    in between left a whole run that predict refused as unfinished."""
    import shutil

    import faceattr.run
    from faceattr.runfolder import unfinished_run

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = (run / "run.json").read_bytes()
    data, cpu = load_dataset(dataset_dir, need="any"), torch.device("cpu")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # once every fold is kept, before the run is finished again

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(faceattr.run, "decision_rule", killed)
        with pytest.raises(KeyboardInterrupt):
            train_run(data, TrainConfig(), run, cpu, resume=True)
    assert (run / "run.json").read_bytes() == before and not unfinished_run(run)
    predict(data.test, run / "models", tmp_path / "label_val.txt", cpu)
    summary = train_run(data, TrainConfig(), run, cpu, resume=True)
    assert summary["status"] == "complete" and summary["resumed"] == 1
    assert json.loads((run / "run.json").read_text()) == json.loads(json.dumps(summary))
    # Its time is this invocation's, as the report says: not a whole run's, next to fold times
    # that count every invocation that trained them.
    assert "<td>whole run</td>" in (trained_run / "report.html").read_text()
    assert "<td>its last invocation (resumed 1 time)</td>" in (run / "report.html").read_text()


def test_what_a_run_left_without_its_run_json_is_no_part_of_a_new_run(
    trained_run, dataset_dir, tmp_path, caplog
):
    """A folder whose run.json is gone read as empty: a new run there kept the old finished folds
    (another seed's, another model's), resumed a saved state, and predict voted a fold model
    beyond its folds. Now that is refused, and --overwrite clears it."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "run.json").unlink()
    for name in ("fold_3.safetensors", "fold_3.json"):  # as a 3-fold run had left
        shutil.copy(run / "models" / name.replace("3", "2"), run / "models" / name)
    (run / "fold_3").mkdir()
    (run / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    cfg = TrainConfig(arch="simple", folds=2, epochs=1, batch_size=32, seed=7)
    data, cpu = load_dataset(dataset_dir, need="any"), torch.device("cpu")
    left = r"holds what a run left without its run.json \(fold_.*, .*, .* \(and \d+ more\)\), which"
    with pytest.raises(FaceAttrError, match=left):
        train_run(data, cfg, run, cpu)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    with caplog.at_level("INFO", logger="faceattr"):
        summary = train_run(data, cfg, run, cpu, overwrite=True)
    assert "finished before" not in caplog.text and summary["config"]["seed"] == 7
    assert [m.fold for m in load_fold_models(run / "models")] == [1, 2]
    assert not (run / "fold_3").exists() and (run / "notes.txt").read_text() == "mine"
    assert (run / "models" / "fold_1.safetensors").read_bytes() != before[
        run / "models" / "fold_1.safetensors"
    ]


def test_a_cache_among_the_test_images_is_refused_before_training(dataset_dir, tmp_path):
    """Only the training images' own folder had been checked: their cache entry then joined the
    test images, which every later command warned of."""
    cfg = TrainConfig(arch="simple", folds=2, epochs=1, cache=str(dataset_dir / "val_img"))
    data = load_dataset(dataset_dir, need="any")
    with pytest.raises(FaceAttrError, match=r"--cache .*val_img is inside the image folder"):
        train_run(data, cfg, tmp_path / "run", torch.device("cpu"))
    assert not (tmp_path / "run").exists()
    assert all(p.suffix == ".jpg" for p in (dataset_dir / "val_img").iterdir())


def test_a_saved_fold_is_its_best_epochs_weights_and_figures(tmp_path):
    """The fold model on disk holds result.state (the best epoch's), not the model's last
    weights, and fold_K.json the best epoch's figures, not the last epoch's."""
    torch.manual_seed(0)
    model, best = create_model("simple"), create_model("simple")
    history = [
        {c: float(i) for c in HISTORY_COLUMNS} | {"epoch": i + 1, "val_hter": h}
        for i, h in enumerate((0.1, 0.3))
    ]
    result = FoldResult(1, best.state_dict(), np.array([0.2, 0.8]), history, 1.0)
    run_module._save_fold(tmp_path, 1, model, result, TrainConfig())
    saved = load_file(str(tmp_path / "models" / "fold_1.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in best.state_dict().items())
    config = json.loads((tmp_path / "models" / "fold_1.json").read_text())
    assert (config["epoch"], config["val_hter"]) == (1, 0.1)
    summary = json.loads((tmp_path / "fold_1" / "result.json").read_text())["summary"]
    assert (summary["best_epoch"], summary["val_hter"]) == (1, 0.1)


def test_a_run_without_tta_records_so_and_oof_keeps_each_folds_image_order(dataset_dir, tmp_path):
    data, cpu = load_dataset(dataset_dir, need="any"), torch.device("cpu")
    cfg = TrainConfig(folds=2, epochs=1, batch_size=32, tta=False)
    train_run(data, cfg, tmp_path / "run", cpu)
    run = tmp_path / "run"
    assert json.loads((run / "models" / "ensemble.json").read_text())["tta"] is False
    rows = list(csv.DictReader((run / "oof.csv").open()))
    for fold in (1, 2):
        scores = json.loads((run / f"fold_{fold}" / "result.json").read_text())["val_scores"]
        oof = [float(r["score"]) for r in rows if int(r["fold"]) == fold]
        assert oof == pytest.approx(scores, abs=0, rel=1e-12)


def test_resume_takes_how_the_work_runs_from_the_options_given(tmp_path):
    saved = asdict(TrainConfig(epochs=3))
    asked = TrainConfig(workers=3, save_every=0.0, cache=str(tmp_path / "cache"))
    resumed = run_module._resumed_config(asked, saved, ["workers", "save_every", "cache"], tmp_path)
    assert (resumed.workers, resumed.save_every, resumed.cache) == (3, 0.0, str(tmp_path / "cache"))
    assert resumed.epochs == 3


def test_each_fold_starts_from_its_own_initial_weights():
    cfg, cpu = TrainConfig(arch="simple"), torch.device("cpu")
    one, two, again = (run_module.fold_model(cfg, f, cpu).state_dict() for f in (1, 2, 2))
    assert not torch.equal(one["net.features.0.weight"], two["net.features.0.weight"])
    assert all(torch.equal(v, again[k]) for k, v in two.items())


def test_a_fold_result_without_its_model_is_not_finished(tmp_path):
    (tmp_path / "fold_1").mkdir()
    (tmp_path / "fold_1" / "result.json").write_text(
        json.dumps({"summary": {"best_epoch": 1}, "val_scores": [0.5]})
    )
    assert run_module._finished_fold(tmp_path, 1) is None  # killed between the two writes
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "fold_1.safetensors").touch()
    assert run_module._finished_fold(tmp_path, 1) is not None
