"""Recipe search by cross-validation: train each recipe, tabulate its out-of-fold HTER.

    python benchmarks/recipes.py --data /tmp/data/celeba64                  # every recipe below
    python benchmarks/recipes.py --data D --only default r18-12-cosine      # some of them
    python benchmarks/recipes.py --data D --recipe "mine: --epochs 20 --lr 0.002"
    python benchmarks/recipes.py --data D --keep runs --deadline 400        # as the GPU script does
    python benchmarks/recipes.py --data D --only default --holdout 0.2 --name celeba64-holdout-cpu

Each recipe is a `faceattr train` then `faceattr predict` command pair, timed with the images
already decoded (training images only decide: the test labels stay withheld). One JSON line per
recipe is appended to benchmarks/results/<name>.jsonl (out-of-fold HTER with its 95 % interval, the
nested estimate, EER, AUC, epochs, train and predict time, device, the exact command), and
benchmarks/results/<name>.md is rewritten from all lines, the tool's default recipe marked. With
--keep, each recipe's run.json and predicted label_val.txt are kept in KEEP/<recipe>/. With
--holdout F, a stratified share F of the training images is set aside with its labels and predicted
as the test images (holdout.py): each row adds the HTER of the labels written there.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from holdout import TRUTH, holdout_metrics, split_off

# The throughput benchmark's own timed `train` + `predict`, with the images decoded beforehand.
from throughput import end_to_end, warm_cache

from faceattr.cli import Parser, run_script
from faceattr.errors import FaceAttrError
from faceattr.outputs import write_text

RESULTS = Path(__file__).resolve().parent / "results"

# --pretrained alone: the ImageNet weights an installed package ships (or a copy in torch's hub
# cache). "default" is each device's own: on a GPU EfficientNet-Lite0-s1 from ImageNet, 15 epochs.
RECIPES = {
    "default": "",
    # Should the default miss its time on a GPU (device.py's FIXES):
    "default-compiled": "--compile",
    "default-b256": "--batch-size 256 --lr 0.0015",  # half the steps; lr x sqrt(2), as for Adam
    "seed-cnn-15": "--arch simple --epochs 15",
    "r18-15": "--arch resnet18 --epochs 15",
    "r18-12": "--arch resnet18 --epochs 12",
    "r18-30": "--arch resnet18 --epochs 30",
    "lite0-imagenet-15": "--arch efficientnet_lite0 --pretrained --epochs 15 --optimizer adamw "
    "--schedule cosine --lr 0.001 --weight-decay 0.05",
    "lite0s1-imagenet-6": "--arch efficientnet_lite0_s1 --pretrained --epochs 6 --optimizer "
    "adamw --schedule cosine --lr 0.001 --weight-decay 0.05",
    "lite0s1-imagenet-25-ema-strong": "--arch efficientnet_lite0_s1 --pretrained --epochs 25 "
    "--optimizer adamw --schedule cosine --lr 0.001 --weight-decay 0.05 --ema 0.999 "
    "--augment strong",
    "r18-20-onecycle-ema": "--arch resnet18 --epochs 20 --optimizer adamw --schedule onecycle "
    "--lr 0.003 --weight-decay 0.05 --ema 0.999",
    "r18-20-onecycle-ema-strong": "--arch resnet18 --epochs 20 --optimizer adamw --schedule "
    "onecycle --lr 0.003 --weight-decay 0.05 --ema 0.999 --augment strong",
    "r18-20-onecycle-ema-mixup": "--arch resnet18 --epochs 20 --optimizer adamw --schedule "
    "onecycle --lr 0.003 --weight-decay 0.05 --ema 0.999 --mix mixup --mix-alpha 0.2",
    "r18-20-onecycle-ema-cutmix": "--arch resnet18 --epochs 20 --optimizer adamw --schedule "
    "onecycle --lr 0.003 --weight-decay 0.05 --ema 0.999 --mix cutmix --mix-alpha 1",
    "r34-20-onecycle-ema": "--arch resnet34 --epochs 20 --optimizer adamw --schedule onecycle "
    "--lr 0.003 --weight-decay 0.05 --ema 0.999",
    "r18-15-10folds": "--arch resnet18 --epochs 15 --folds 10",
    "r18-15-3folds": "--arch resnet18 --epochs 15 --folds 3",
    "r18-12-adamw-cosine": "--arch resnet18 --epochs 12 --optimizer adamw --schedule cosine "
    "--lr 0.002 --weight-decay 0.05",
    "r18-12-onecycle-smooth": "--arch resnet18 --epochs 12 --optimizer adamw --schedule onecycle "
    "--lr 0.003 --weight-decay 0.05 --label-smoothing 0.1",
    "r18-20-sgd-cosine": "--arch resnet18 --epochs 20 --optimizer sgd --schedule cosine --lr 0.1 "
    "--weight-decay 0.0005",
}


def chosen(only: list[str], extra: list[str]) -> dict[str, str]:
    """The listed recipes named in `only`, then those given as 'NAME: train options'."""
    recipes = {name: RECIPES[name] for name in only}
    for given in extra:
        name, colon, options = given.partition(":")
        if not (colon and name.strip()):  # else the whole text named the default recipe
            raise FaceAttrError(f"--recipe {given!r}: give it as 'NAME: train options'")
        recipes[name.strip()] = options.strip()
    return recipes


def run_recipe(
    name: str,
    args: str,
    data: str,
    device: str,
    work: Path,
    keep: Path | None = None,
    timeout: float | None = None,
) -> dict:
    """Train and predict one recipe, and summarise its run.json."""
    out = work / name
    options = shlex.split(args)
    timings = end_to_end(data, device, options, work / "cache", out, timeout)
    run = json.loads((out / "run" / "run.json").read_text())
    if keep is not None:
        (keep / name).mkdir(parents=True, exist_ok=True)
        for file in ("run/run.json", "label_val.txt"):
            shutil.copy(out / file, keep / name / Path(file).name)
    env = run["environment"]
    return {
        "recipe": name,
        "args": shlex.join(options) or "(defaults)",
        "oof_hter": run["oof"]["hter"],
        "oof_hter_ci": run["oof"]["hter_ci"],
        "nested_hter": run["oof_nested"]["hter"],
        "eer": run["eer"],
        "auc": run["auc"],
        "arch": run["config"]["arch"],
        "epochs": run["config"]["epochs"],
        "batch_size": run["config"]["batch_size"],
        "folds": run["config"]["folds"],
        "train_seconds": timings["train_seconds"],
        "predict_seconds": timings["predict_seconds"],
        "device": env.get("gpu", env["device"]),
        "torch": env["torch"],
        "command": shlex.join(["faceattr", "train", "DATA", *options]),
        **({"weights": Path(run["pretrained_file"]).name} if run.get("pretrained_file") else {}),
    }


def table_rows(table: Path) -> list[dict]:
    """The rows of `table` (a .jsonl this script appends to; none when it is not there).

    A line cut short (its writer killed) is no row.
    """
    rows = []
    for line in table.read_text().splitlines() if table.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "recipe" in row:
            rows.append(row)
    return rows


def markdown(rows: list[dict], title: str) -> str:
    """The results table, best out-of-fold HTER first; the default recipe in bold."""
    held = any("holdout_hter" in r for r in rows)
    lines = [
        f"# {title}: recipes by cross-validation",
        "",
        "Out-of-fold HTER on the training images (threshold chosen on the out-of-fold scores; "
        "nested: each fold's threshold chosen on the other folds), with its 95 % bootstrap "
        "interval. Written by `benchmarks/recipes.py`; every row is reproduced by its command, "
        "then `faceattr predict DATA --run RUN` (predict s: scoring the test images with "
        "the fold models), both with the images already decoded. In bold: the tool's default recipe "
        "on that device (no options).",
        *(["", HOLDOUT_NOTE] if held else []),
        "",
        "| recipe | OOF HTER | 95 % CI | nested | EER | AUC "
        + ("| hold-out HTER | 95 % CI | majority | best threshold | hold-out AUC " if held else "")
        + "| arch | epochs | train s | predict s | device | command |",
        "|---|---|---|---|---|---"
        + ("|---|---|---|---|---" if held else "")
        + "|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["oof_hter"]):
        name = f"**{r['recipe']}**" if r["args"] == "(defaults)" else r["recipe"]
        low, high = r["oof_hter_ci"]
        lines.append(
            f"| {name} | {100 * r['oof_hter']:.2f} % | {100 * low:.2f}–{100 * high:.2f} % "
            f"| {100 * r['nested_hter']:.2f} % | {100 * r['eer']:.2f} % | {r['auc']:.4f} "
            f"{holdout_cells(r) if held else ''}"
            f"| {r['arch']} | {r['epochs']} | {r['train_seconds']:.0f} "
            f"| {r.get('predict_seconds', float('nan')):.0f} | {r['device']} "
            f"| `{r['command']}` |"
        )
    return "\n".join(lines) + "\n"


HOLDOUT_NOTE = (
    "Hold-out: a stratified share of the labelled images, set aside before training and predicted "
    "as test images (`--holdout`); its HTER is that of the label file predict wrote (the "
    "run's threshold, soft vote), beside the seed's majority vote and the threshold best on the "
    "hold-out itself (the least any threshold could give)."
)


def holdout_cells(r: dict) -> str:
    if "holdout_hter" not in r:
        return "| | | | | "
    low, high = r["holdout_hter_ci"]
    return (
        f"| {100 * r['holdout_hter']:.2f} % | {100 * low:.2f}–{100 * high:.2f} % "
        f"| {100 * r['holdout_majority_hter']:.2f} % | {100 * r['holdout_best_hter']:.2f} % "
        f"| {r['holdout_auc']:.4f} "
    )


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="dataset folder or .zip")
    p.add_argument("--only", nargs="+", choices=sorted(RECIPES), help="run these recipes only")
    p.add_argument("--recipe", action="append", default=[], help="'NAME: train options'")
    p.add_argument("--device", default="auto")
    p.add_argument("--keep", type=Path, help="keep each recipe's run.json and label_val.txt here")
    p.add_argument(
        "--deadline", type=float, help="seconds: start no recipe after, stop a running one at it"
    )
    p.add_argument("--name", default="celeba64", help="results file name (default celeba64)")
    p.add_argument("--results", type=Path, default=RESULTS, help="results folder")
    p.add_argument(
        "--holdout",
        type=float,
        metavar="F",
        help="set a stratified share F of the training images aside, with its labels, as the "
        "test images, and report their HTER",
    )
    p.add_argument("--holdout-seed", type=int, default=12345, help="seed of the hold-out's draw")
    args = p.parse_args(argv)
    if args.holdout is not None and not 0 < args.holdout < 1:
        p.error(f"--holdout is a share of the training images, in (0, 1); got {args.holdout}")

    started = time.monotonic()
    recipes = chosen(args.only or ([] if args.recipe else list(RECIPES)), args.recipe)
    args.results.mkdir(parents=True, exist_ok=True)
    jsonl = args.results / f"{args.name}.jsonl"
    try:
        failed = search(args, recipes, jsonl, started)
    finally:  # the table holds every finished row, whatever stopped the rest
        if jsonl.exists():
            write_text(args.results / f"{args.name}.md", markdown(table_rows(jsonl), args.name))
    return 1 if failed else 0


def search(
    args: argparse.Namespace, recipes: dict[str, str], jsonl: Path, started: float
) -> list[str]:
    """Run `recipes` in order, appending each finished row to `jsonl`, until the deadline (which
    counts from `started`); return the names of those that failed."""
    failed: list[str] = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        data, held = args.data, work / "holdout"
        if args.holdout:
            data = str(split_off(args.data, args.holdout, args.holdout_seed, held))
        warm_cache(data, work / "cache")  # decoded once, before any clock starts
        for name, options in recipes.items():
            left = None if args.deadline is None else args.deadline - (time.monotonic() - started)
            if left is not None and left <= 0:
                print(f"deadline reached: {name} and the rest not run", file=sys.stderr)
                break
            try:
                row = run_recipe(name, options, data, args.device, work, args.keep, left)
            except subprocess.TimeoutExpired:
                print(f"deadline reached while {name} ran: stopped, not tabulated", file=sys.stderr)
                break
            except subprocess.CalledProcessError as e:  # its error is on stderr above
                print(f"{name} failed (exit {e.returncode}): not tabulated", file=sys.stderr)
                failed.append(name)
                continue  # one recipe's failure (a compiler missing, memory) is not the others'
            if args.holdout:
                row.update(holdout_metrics(work / name / "predictions.csv", held / TRUTH))
                row.update(holdout=args.holdout, holdout_seed=args.holdout_seed)
            print(json.dumps(row), flush=True)
            with jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
    return failed


if __name__ == "__main__":
    raise SystemExit(run_script(main))
