"""The throughput benchmark runs end to end on a CPU with small sizes."""

import json
import subprocess
import sys

from conftest import ROOT


def test_benchmark_writes_every_measure(dataset_dir, tmp_path):
    results = tmp_path / "throughput-cpu.jsonl"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--data", str(dataset_dir),
        "--device", "cpu", "--arch", "simple", "--steps", "2", "--epochs", "2", "--batch-size",
        "32", "--no-compile", "--e2e-args", "--folds 2 --epochs 1 --batch-size 32",
        "--results", str(results),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert [json.loads(line) for line in result.stdout.splitlines()] == lines
    by_measure = {line["measure"]: line for line in lines}
    assert set(by_measure) == {
        "decode",
        "ceiling",
        "faceattr",
        "baseline",
        "end_to_end",
        "inference",
    }
    runtimes = {line["runtime"] for line in lines if line["measure"] == "inference"}
    assert runtimes == {"torch", "onnxruntime"}
    for line in lines:
        assert line["device"] == "cpu" and line["torch"] and line["batch_size"] == 32
    for measure in ("decode", "ceiling", "faceattr", "baseline", "inference"):
        assert by_measure[measure]["img_per_s"] > 0
    for measure in ("ceiling", "faceattr", "baseline"):
        assert by_measure[measure]["arch"] == "simple"
    e2e = by_measure["end_to_end"]
    assert e2e["seconds"] == e2e["train_seconds"] + e2e["predict_seconds"] > 0
    assert e2e["train_args"] == "--folds 2 --epochs 1 --batch-size 32"


def test_recipe_search_tabulates_each_recipe(dataset_dir, tmp_path):
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "recipes.py"),
        "--data",
        str(dataset_dir),
        "--recipe",
        "tiny: --arch simple --folds 2 --epochs 1 --batch-size 32",
        "--name",
        "synthetic",
        "--results",
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    (row,) = [json.loads(line) for line in (tmp_path / "synthetic.jsonl").read_text().splitlines()]
    assert row["recipe"] == "tiny" and row["epochs"] == 1 and row["folds"] == 2
    low, high = row["oof_hter_ci"]
    assert low <= row["oof_hter"] <= high and row["train_seconds"] > 0
    assert row["command"].startswith("faceattr train ") and "--epochs 1" in row["command"]
    table = (tmp_path / "synthetic.md").read_text()
    assert "| tiny |" in table and row["command"] in table


def test_recipe_table_marks_the_default():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from recipes import markdown

    base = {
        "oof_hter_ci": [0.01, 0.03],
        "nested_hter": 0.02,
        "eer": 0.02,
        "auc": 0.99,
        "arch": "resnet18",
        "epochs": 12,
        "train_seconds": 70.0,
        "device": "NVIDIA H200",
        "command": "faceattr train D",
    }
    rows = [
        {**base, "recipe": "other", "args": "--lr 1", "oof_hter": 0.03},
        {**base, "recipe": "default", "args": "(defaults)", "oof_hter": 0.02},
    ]
    table = markdown(rows, "celeba64").splitlines()
    assert table[-2].startswith("| **default (default)** | 2.00 %")  # best first
    assert table[-1].startswith("| other | 3.00 %")
