"""Shared fixtures: small synthetic datasets in the exercise's layout, and a trained tiny run."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from faceattr.synthetic import make_dataset

ROOT = Path(__file__).resolve().parents[1]
CELEBA_ZIP = ROOT.parent / "shared" / "data" / "celeba64.zip"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory) -> Path:
    """Every test and the commands it runs share one throw-away decoded-image cache."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["FACEATTR_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory) -> Path:
    """160 training and 40 test synthetic faces; the test labels are in truth_val.txt beside it."""
    root = tmp_path_factory.mktemp("synthetic")
    truth = make_dataset(root / "data", n_train=160, n_test=40, minority=0.2, seed=1)
    (root / "truth_val.txt").write_text("".join(f"{v}\n" for v in truth))
    return root / "data"


@pytest.fixture(scope="session")
def trained_run(dataset_dir, tmp_path_factory) -> Path:
    """A 2-fold, 2-epoch run of the simple CNN on the synthetic dataset; what train printed is
    in train.out beside it."""
    run = tmp_path_factory.mktemp("run") / "run"
    result = cli(*train_args(dataset_dir, run))
    assert result.returncode == 0, result.stderr
    (run.parent / "train.out").write_text(result.stdout)
    return run


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    """`train` arguments for a small, quick run: the simple CNN, 2 folds of 2 epochs on the CPU."""
    return [
        "train",
        str(data),
        "--out",
        str(out),
        "--arch",
        "simple",
        "--folds",
        "2",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--device",
        "cpu",
        *extra,
    ]


def cli(
    *args: str, cwd: Path | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m faceattr ARGS` as a user would."""
    return run_python("-m", "faceattr", *args, cwd=cwd, env=env)


def here(*args: str, seed: bool = False) -> subprocess.CompletedProcess:
    """`faceattr ARGS` (with `seed`: the seed's `main.py ARGS`) run in this process.

    For tests of what a command says and writes: no interpreter to start and no torch to import,
    about 3 s less than `cli` on two cores. What only a real process shows (its start, signals,
    the exit status the shell sees) stays with `cli`.
    """
    from faceattr import cli as faceattr_cli
    from faceattr import seed as faceattr_seed

    main = faceattr_seed.main if seed else faceattr_cli.main
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(["faceattr", *args], code, out.getvalue(), err.getvalue())


def seed_main(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the seed's `python main.py ARGS`."""
    return run_python(str(ROOT / "main.py"), *args, cwd=cwd)


def torchrun(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `torchrun --standalone --nproc_per_node=2 -m faceattr ARGS` (gloo on a CPU)."""
    return run_python(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "faceattr",
        *args,
        env=env,
    )


def run_python(*args: str, cwd: Path | None = None, env: dict | None = None):
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 2, one line on stderr naming what is wrong, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("faceattr: error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def labels_of(path: Path) -> np.ndarray:
    return np.array([int(v) for v in read_lines(path)])


def write_image(path: Path, colour, size=(64, 64), mode="RGB", fmt=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, format=fmt)


def with_stray_bytes(raw: bytes, n: int = 3) -> bytes:
    """The JPEG with `n` junk bytes before its scan: libjpeg decodes it, and says so on stderr."""
    scan = raw.index(b"\xff\xda")
    return raw[:scan] + b"\x00" * n + raw[scan:]
