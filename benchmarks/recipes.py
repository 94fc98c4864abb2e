"""Recipe search by cross-validation: train each recipe, tabulate its out-of-fold HTER.

    python benchmarks/recipes.py --data /tmp/data/celeba64                  # every recipe below
    python benchmarks/recipes.py --data D --only default r18-12-cosine      # some of them
    python benchmarks/recipes.py --data D --recipe "mine: --epochs 20 --lr 0.002"

Each recipe is a `faceattr train` command (training images only: the test labels stay withheld).
One JSON line per recipe is appended to benchmarks/results/<name>.jsonl (out-of-fold HTER with its
95 % interval, the nested estimate, EER, AUC, epochs, train time, device, the exact command), and
benchmarks/results/<name>.md is rewritten from all lines, the tool's default recipe marked.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

RECIPES = {
    "default": "",
    "seed-cnn-15": "--arch simple --epochs 15",
    "r18-12": "--arch resnet18 --epochs 12",
    "r18-30": "--arch resnet18 --epochs 30",
    "r18-12-adamw-cosine": "--arch resnet18 --epochs 12 --optimizer adamw --schedule cosine "
    "--lr 0.002 --weight-decay 0.05",
    "r18-12-onecycle-smooth": "--arch resnet18 --epochs 12 --optimizer adamw --schedule onecycle "
    "--lr 0.003 --weight-decay 0.05 --label-smoothing 0.1",
    "r18-20-sgd-cosine": "--arch resnet18 --epochs 20 --optimizer sgd --schedule cosine --lr 0.1 "
    "--weight-decay 0.0005",
}


def run_recipe(name: str, args: str, data: str, work: Path) -> dict:
    """Train one recipe and summarise its run.json."""
    out = work / name
    command = ["faceattr", "train", data, "--out", str(out), "--overwrite", *shlex.split(args)]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", *command, "-q"], check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    run = json.loads((out / "run.json").read_text())
    env = run["environment"]
    return {
        "recipe": name,
        "args": args or "(defaults)",
        "oof_hter": run["oof"]["hter"],
        "oof_hter_ci": run["oof"]["hter_ci"],
        "nested_hter": run["oof_nested"]["hter"],
        "eer": run["eer"],
        "auc": run["auc"],
        "arch": run["config"]["arch"],
        "epochs": run["config"]["epochs"],
        "folds": run["config"]["folds"],
        "train_seconds": seconds,
        "device": env.get("gpu", env["device"]),
        "torch": env["torch"],
        "command": shlex.join(command),
    }


def markdown(rows: list[dict], title: str) -> str:
    """The results table, best out-of-fold HTER first; the default recipe in bold."""
    lines = [
        f"# {title}: recipes by cross-validation",
        "",
        "Out-of-fold HTER on the training images (threshold chosen on the out-of-fold scores; "
        "nested: each fold's threshold chosen on the other folds), with its 95 % bootstrap "
        "interval. Written by `benchmarks/recipes.py`; every row is reproduced by its command.",
        "",
        "| recipe | OOF HTER | 95 % CI | nested | EER | AUC | arch | epochs | train s | device "
        "| command |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["oof_hter"]):
        name = f"**{r['recipe']} (default)**" if r["args"] == "(defaults)" else r["recipe"]
        low, high = r["oof_hter_ci"]
        lines.append(
            f"| {name} | {100 * r['oof_hter']:.2f} % | {100 * low:.2f}–{100 * high:.2f} % "
            f"| {100 * r['nested_hter']:.2f} % | {100 * r['eer']:.2f} % | {r['auc']:.4f} "
            f"| {r['arch']} | {r['epochs']} | {r['train_seconds']:.0f} | {r['device']} "
            f"| `{r['command']}` |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="dataset folder or .zip")
    p.add_argument("--only", nargs="+", choices=sorted(RECIPES), help="run these recipes only")
    p.add_argument("--recipe", action="append", default=[], help="'NAME: train options'")
    p.add_argument("--name", default="celeba64", help="results file name (default celeba64)")
    p.add_argument("--results", type=Path, default=RESULTS, help="results folder")
    args = p.parse_args(argv)

    recipes = {k: RECIPES[k] for k in (args.only or ([] if args.recipe else RECIPES))}
    for extra in args.recipe:
        name, _, options = extra.partition(":")
        recipes[name.strip()] = options.strip()
    args.results.mkdir(parents=True, exist_ok=True)
    jsonl = args.results / f"{args.name}.jsonl"
    with tempfile.TemporaryDirectory() as work:
        for name, options in recipes.items():
            row = run_recipe(name, options, args.data, Path(work))
            print(json.dumps(row), flush=True)
            with jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    (args.results / f"{args.name}.md").write_text(markdown(rows, args.name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
