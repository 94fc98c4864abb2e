"""The demo: a synthetic dataset, then explore -> train -> predict -> evaluate, on any machine."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from faceattr.data import load_dataset, read_labels
from faceattr.errors import FaceAttrError
from faceattr.explore import explore
from faceattr.metrics import error_rates
from faceattr.outputs import write_text
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
    if n_train < MIN_TRAIN or n_test < 1 or epochs < 1:
        raise FaceAttrError(
            f"the demo needs --n-train {MIN_TRAIN} or more (3 folds of both classes), --n-test and "
            f"--epochs 1 or more; got {n_train}, {n_test} and {epochs}"
        )
    out = Path(out)
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
