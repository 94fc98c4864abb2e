"""Screen recipes on one fold before spending five folds on them.

    python benchmarks/screen.py --data data/celeba64 --only default seed-cnn-15
    python benchmarks/screen.py --data D --recipe "mixup: --arch simple --mix mixup" --fold 2

Trains fold K (default 1) of the split `faceattr train` makes with the recipe's options: the same
model, seeded alike, as fold K of that run. Reports its validation HTER at the threshold that is
best on those same validation images (a little optimistic: use it to rank recipes, and quote
`recipes.py`'s out-of-fold figure), its AUC, the best epoch, the validation HTER of every epoch
and the training time. One JSON line per recipe is printed and appended to
benchmarks/results/screen-<device>.jsonl. Recipes are `recipes.py`'s, or given with --recipe.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from recipes import RECIPES, chosen
from throughput import device_name

from faceattr.batches import DeviceImages
from faceattr.cache import default_cache_dir, load_images
from faceattr.cli import Parser, build_parser, run_script, train_config
from faceattr.data import load_dataset
from faceattr.errors import FaceAttrError
from faceattr.folds import make_folds
from faceattr.metrics import auc, best_threshold
from faceattr.run import fold_model
from faceattr.runtime import describe, resolve_device
from faceattr.train import train_fold

RESULTS = Path(__file__).resolve().parent / "results"


def screen(
    name: str,
    options: str,
    images: DeviceImages,
    labels: np.ndarray,
    fold: int,
) -> dict:
    """Train fold `fold` with the recipe's `faceattr train` options; summarise its validation."""
    device = images.device
    parsed = build_parser().parse_args(["train", "DATA", *shlex.split(options)])
    cfg = train_config(parsed, device)
    cfg.check()
    if not 1 <= fold <= cfg.folds:
        raise FaceAttrError(f"--fold must be between 1 and {cfg.folds}, got {fold}")
    fold_of = make_folds(labels, cfg.folds, cfg.seed)
    train_idx, val_idx = np.flatnonzero(fold_of != fold - 1), np.flatnonzero(fold_of == fold - 1)
    labels_t = torch.from_numpy(labels).to(device)
    model = fold_model(cfg, fold, device)
    result = train_fold(model, images, labels_t, train_idx, val_idx, cfg, fold)
    threshold, rates = best_threshold(labels[val_idx], result.val_scores)
    env = describe(device)
    return {
        "recipe": name,
        "args": options or "(defaults)",
        "fold": fold,
        "val_hter": rates["hter"],
        "threshold": threshold,
        "auc": auc(labels[val_idx], result.val_scores),
        "best_epoch": result.best_epoch,
        "epochs": cfg.epochs,
        "val_hter_by_epoch": [round(row["val_hter"], 4) for row in result.history],
        "train_seconds": result.seconds,
        "arch": cfg.arch,
        "device": env.get("gpu", env["device"]),
        "torch": env["torch"],
        "command": shlex.join(
            ["python", "benchmarks/screen.py", "--data", "DATA", "--fold", str(fold),
             *(["--only", name] if RECIPES.get(name) == options else
               ["--recipe", f"{name}: {options}"])]
        ),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="dataset folder or .zip")
    p.add_argument("--only", nargs="+", choices=sorted(RECIPES), default=[], help="recipes")
    p.add_argument("--recipe", action="append", default=[], help="'NAME: train options'")
    p.add_argument("--fold", type=int, default=1, help="which fold to train (default 1)")
    p.add_argument("--device", default="auto")
    p.add_argument("--results", type=Path, default=RESULTS, help="results folder")
    args = p.parse_args(argv)

    recipes = chosen(args.only, args.recipe)
    if not recipes:
        p.error("give --only or --recipe")
    device = resolve_device(args.device)
    dataset = load_dataset(args.data, need="train")
    train_images, labels = dataset.require_train()
    loaded = load_images(train_images, default_cache_dir(), extra=labels.tobytes())
    images = DeviceImages(loaded.array, device)
    args.results.mkdir(parents=True, exist_ok=True)
    jsonl = args.results / f"screen-{device_name(device)}.jsonl"
    for name, options in recipes.items():
        try:
            row = screen(name, options, images, labels, args.fold)
        except FaceAttrError as e:
            sys.exit(f"error: {name}: {e}")
        print(json.dumps(row), flush=True)
        with jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script(main))
