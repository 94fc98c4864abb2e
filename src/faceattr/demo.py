"""The demo: a synthetic dataset, then explore -> train -> predict -> evaluate, on any machine."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch

from faceattr.data import load_dataset, read_labels
from faceattr.errors import FaceAttrError
from faceattr.explore import explore
from faceattr.metrics import error_rates
from faceattr.outputs import ensure_writable_dir, write_text
from faceattr.predict import predict
from faceattr.run import train_run
from faceattr.synthetic import make_dataset
from faceattr.train import TrainConfig

log = logging.getLogger("faceattr")

MIN_TRAIN = 50  # 12 % of them wear glasses or a hat: enough for 3 folds of both classes


def run_demo(
    out: str | Path, device: torch.device, n_train: int = 2000, n_test: int = 500, epochs: int = 6
) -> dict:
    """Run the whole pipeline on a fresh synthetic dataset under `out`; return the test metrics."""
    if n_train < MIN_TRAIN or n_test < 2 or epochs < 1:
        raise FaceAttrError(
            f"the demo needs --n-train {MIN_TRAIN} or more (3 folds of both classes), --n-test 2 "
            f"or more (both classes) and --epochs 1 or more; got {n_train}, {n_test} and {epochs}"
        )
    out = Path(out)
    _claim(out)
    started = time.perf_counter()
    log.info("making a synthetic dataset of %d training and %d test faces", n_train, n_test)
    truth = make_dataset(out / "data", n_train=n_train, n_test=n_test, seed=0)
    write_text(out / "truth_val.txt", "".join(f"{v}\n" for v in truth))
    dataset = load_dataset(out / "data", need="any")
    explore(dataset, out / "explore")
    cfg = TrainConfig(arch="simple", folds=3, epochs=epochs, step=3, batch_size=64)
    train = train_run(dataset, cfg, out / "run", device, overwrite=True)
    pred = predict(dataset.require_test(), out / "run" / "models", out / "label_val.txt", device)
    metrics = error_rates(truth, read_labels(out / "label_val.txt"))
    return {
        "oof_hter": train["oof"]["hter"],
        "test": metrics,
        "predicted_0": pred["predicted_0"],
        "seconds": time.perf_counter() - started,
        "out": str(out),
    }


MARK = ".faceattr-demo"  # in a folder the demo made: it may replace what it wrote there


def _claim(out: Path) -> None:
    """Make `out` the demo's, or refuse it: an existing folder it did not make may hold a
    dataset or a run of the user's, which the demo's data/ and run/ would write over."""
    if out.exists() and not out.is_dir():
        raise FaceAttrError(f"--out {out} is a file; choose a new or empty folder")
    if out.exists() and not (out / MARK).exists() and any(out.iterdir()):
        raise FaceAttrError(
            f"--out {out} already holds files the demo did not make; choose a new or empty folder"
        )
    ensure_writable_dir(out)
    write_text(out / MARK, "made by faceattr demo: it replaces data/, run/ and the rest here\n")
    data = out / "data"  # made afresh: a smaller dataset than last time's
    if data.is_symlink() or data.is_file():  # not into a link's target
        data.unlink()
    elif data.exists():
        shutil.rmtree(data)
