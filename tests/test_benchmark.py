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
