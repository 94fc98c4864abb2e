import csv
import itertools
import json

import numpy as np
import pytest
import torch

from faceattr.checkpoints import load_fold_models
from faceattr.data import load_dataset
from faceattr.errors import FaceAttrError
from faceattr.metrics import best_threshold, error_rates
from faceattr.models import create_model
from faceattr.train import (
    TrainConfig,
    class_weights,
    lr_factor,
    train_fold,
    train_run,
    weighted_bce,
)


def test_class_weights_balance_the_classes():
    w = class_weights(torch.tensor([0, 1, 1, 1]))
    assert w.tolist() == pytest.approx([2.0, 2 / 3])
    assert (w[0] * 1).item() == pytest.approx((w[1] * 3).item())  # same total weight per class


def test_a_fold_learns_an_easy_rule_and_keeps_its_best_epoch():
    # Bright images are label 1, dark ones label 0: a few epochs must separate them.
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(96, generator=g) > 0.25).long()
    level = torch.where(labels.bool(), 200, 40).view(-1, 1, 1, 1)
    noise = torch.randint(0, 40, (96, 64, 64, 3), generator=g)
    images = (level + noise).to(torch.uint8)
    train_idx, val_idx = np.arange(64), np.arange(64, 96)
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=4, batch_size=16, lr=1e-3)
    result = train_fold(create_model("simple"), images, labels, train_idx, val_idx, cfg, fold=1)
    assert len(result.history) == 4
    best = min(result.history, key=lambda r: r["val_hter"])
    assert result.best_epoch == best["epoch"]
    assert best["val_hter"] <= 0.1
    assert result.val_scores.shape == (32,)
    assert (
        error_rates(labels[val_idx].numpy(), result.val_scores >= 0.5)["hter"] == best["val_hter"]
    )
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


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
    assert ensemble == {"threshold": summary["threshold"], "vote": "soft", "tta": True}
    folds = list(csv.DictReader((run / "folds.csv").open()))
    assert [int(r["fold"]) for r in folds] == [int(r["fold"]) - 1 for r in oof]


def test_same_seed_same_weights_on_cpu(dataset_dir, tmp_path):
    data = load_dataset(dataset_dir)
    cfg = TrainConfig(folds=2, epochs=1, batch_size=32)
    a = train_run(data, cfg, tmp_path / "a", torch.device("cpu"))
    b = train_run(data, cfg, tmp_path / "b", torch.device("cpu"))
    assert a["oof"] == b["oof"]
    for fold in (1, 2):
        name = f"models/fold_{fold}.safetensors"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "oof.csv").read_text() == (tmp_path / "b" / "oof.csv").read_text()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epochs": 0}, "--epochs must be at least 1"),
        ({"batch_size": 1}, "--batch-size"),
        ({"step": 0}, "--step"),
        ({"lr": 0.0}, "--lr and --gamma must be positive"),
    ],
)
def test_impossible_settings_are_rejected_before_any_work(change, message, dataset_dir, tmp_path):
    cfg = TrainConfig(**change)
    with pytest.raises(FaceAttrError, match=message):
        train_run(load_dataset(dataset_dir), cfg, tmp_path / "run", torch.device("cpu"))
    assert not (tmp_path / "run").exists()


def test_compiled_training_saves_plain_weights(dataset_dir, tmp_path):
    data = load_dataset(dataset_dir)
    cfg = TrainConfig(folds=2, epochs=1, batch_size=32, compile=True)
    summary = train_run(data, cfg, tmp_path / "run", torch.device("cpu"))
    assert summary["config"]["compile"] is True
    (model, *_) = load_fold_models(tmp_path / "run" / "models")  # no "_orig_mod." prefixes
    assert model.config["arch"] == "simple"


def test_learning_rate_schedules():
    cfg = TrainConfig(epochs=10, step=5, gamma=0.7)
    step = [lr_factor("step", i, 4, cfg) for i in range(40)]
    assert step[:20] == [1.0] * 20 and step[20:] == [0.7] * 20  # StepLR: x0.7 after 5 epochs
    cosine = [lr_factor("cosine", i, 4, cfg) for i in range(40)]
    assert cosine[:4] == [0.25, 0.5, 0.75, 1.0]  # one epoch of warm-up
    assert all(a >= b for a, b in itertools.pairwise(cosine[3:])) and cosine[-1] < 0.01
    onecycle = [lr_factor("onecycle", i, 4, cfg) for i in range(40)]
    assert max(onecycle) == onecycle[11] == 1.0 and onecycle[0] < 0.1 and onecycle[-1] < 0.01


def test_label_smoothing_pulls_targets_to_the_middle():
    logits, y, w = torch.tensor([8.0, -8.0]), torch.tensor([1, 0]), torch.ones(2)
    assert weighted_bce(logits, y, w) < 0.001
    assert weighted_bce(logits, y, w, smoothing=0.2) > 0.5  # confident answers now cost


@pytest.mark.parametrize(("optimizer", "schedule"), [("adamw", "cosine"), ("sgd", "onecycle")])
def test_other_recipes_train(optimizer, schedule, dataset_dir, tmp_path):
    cfg = TrainConfig(
        folds=2,
        epochs=2,
        batch_size=32,
        optimizer=optimizer,
        schedule=schedule,
        weight_decay=1e-4,
        label_smoothing=0.1,
    )
    summary = train_run(load_dataset(dataset_dir), cfg, tmp_path / "run", torch.device("cpu"))
    assert summary["status"] == "complete" and summary["config"]["optimizer"] == optimizer
    lrs = [
        float(line.split(",")[1])
        for line in (tmp_path / "run" / "fold_1" / "history.csv").read_text().splitlines()[1:]
    ]
    assert len(set(lrs)) == 2 and max(lrs) <= 1e-3  # the rate moves from epoch to epoch
