"""Throughput of faceattr against the compute ceiling and a typical per-image DataLoader pipeline.

One JSON line per measurement on stdout, and the same lines appended to
benchmarks/results/throughput-<device>.jsonl (device: e.g. h200, cpu):

  ceiling     train-step images/s of the model on random data already on the device (eager, compiled)
  faceattr    training images/s over whole epochs of faceattr's loop on a real dataset, augmentation
              included
  baseline    the same model fed by a DataLoader that opens and decodes each JPEG with PIL and
              applies torchvision's per-image transforms, num_workers = cores
  decode      images/s of the decoded-image cache build
  end_to_end  wall time of `faceattr train` + `faceattr predict` as a user runs them, data cached
  inference   (on a CPU) scoring images/s of one model with PyTorch and with onnxruntime

    python benchmarks/throughput.py --data ../shared/data/celeba64.zip            # everything
    python benchmarks/throughput.py --data D --measures ceiling --arch resnet18    # one part

On a CPU use small sizes (--steps, --epochs, --limit, --e2e-args); the test suite does.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from faceattr.batches import DeviceImages
from faceattr.cache import load_images
from faceattr.checkpoints import save_fold_model
from faceattr.cli import Parser, run_script
from faceattr.data import ImageSet, ZipSource, load_dataset
from faceattr.ensemble import ensemble_scores, inference_batch_size
from faceattr.export import OnnxEnsemble, export_onnx
from faceattr.models import MODELS, create_model, for_inference
from faceattr.outputs import write_json
from faceattr.runtime import cpu_cores, cpu_name, resolve_device
from faceattr.train import (
    TrainConfig,
    class_weights,
    compile_model,
    images_per_epoch,
    train_fold,
    train_step,
)

RESULTS = Path(__file__).resolve().parent / "results"
INFERENCE_BATCH = inference_batch_size(torch.device("cpu"))  # as `faceattr predict` scores
MEASURES = ("ceiling", "faceattr", "baseline", "decode", "end_to_end", "inference")


def device_name(device: torch.device) -> str:
    """A short name for the results file: 'cpu', or the GPU model (see `gpu_model`)."""
    return gpu_model(torch.cuda.get_device_name(device)) if device.type == "cuda" else "cpu"


def gpu_model(name: str) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA A100-SXM4-80GB' -> 'a100', 'NVIDIA GeForce RTX 3090 Ti' ->
    'rtx3090ti', 'AMD Instinct MI300X' -> 'mi300x': the model, without vendor, brand or memory."""
    brands = ("nvidia", "geforce", "tesla", "quadro", "amd", "instinct", "radeon")
    words = [w for w in name.lower().split() if w not in brands]
    if len(words) > 1 and words[0] in ("rtx", "gtx", "titan"):  # a family: and its number
        words = [words[0] + words[1], *words[2:]]
        if len(words) > 1 and words[1] in ("ti", "super"):
            words = [words[0] + words[1], *words[2:]]
    return words[0].split("-")[0] if words else "cuda"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def subset(images: ImageSet, labels: np.ndarray, limit: int | None) -> tuple[ImageSet, np.ndarray]:
    """The first `limit` images, for small runs."""
    if not limit or limit >= len(images):
        return images, labels
    return ImageSet(images.source, images.folder, images.names[:limit]), labels[:limit]


# --- 1. ceiling: the model alone ---------------------------------------------------------------


def timed_steps(
    step: Callable[[], object], batch: int, steps: int, min_seconds: float, device: torch.device
) -> dict:
    """Images/s of `step` (one batch) run `steps` times, and again as often as it takes to fill
    `min_seconds`: 50 steps of the simple CNN are a tenth of a second on a GPU, too short a
    window for one figure (a pause for garbage collection would move it by a tenth)."""
    sync(device)
    start, done = time.perf_counter(), 0
    while done == 0 or time.perf_counter() - start < min_seconds:
        for _ in range(steps):
            step()
        done += steps
        sync(device)
    seconds = time.perf_counter() - start
    return {"img_per_s": batch * done / seconds, "steps": done, "seconds": seconds}


def ceiling(
    arch: str, device: torch.device, batch: int, steps: int, compiled: bool, min_seconds: float
) -> dict:
    """Train-step images/s on random data already on the device: no loader, no augmentation."""
    torch.manual_seed(0)
    model = create_model(arch).to(device).to(memory_format=torch.channels_last).train()
    step_model = compile_model(model) if compiled else model  # as train compiles it
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(batch, 3, 64, 64, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,), device=device)
    weights = class_weights(y)

    def step() -> None:
        train_step(step_model, optimizer, x, y, weights)

    for _ in range(3):  # warm-up, and compilation when asked
        step()
    return timed_steps(step, batch, steps, min_seconds, device)


# --- 2. faceattr: the real training loop -------------------------------------------------------


def faceattr_loop(
    array: np.ndarray,
    labels: np.ndarray,
    arch: str,
    device: torch.device,
    batch: int,
    epochs: int,
    compiled: bool,
) -> dict:
    """Training images/s of faceattr's own loop (augmentation included) over whole epochs, and
    with each epoch's validation (a fifth of the images, scored mirrored too) counted in.

    The first epoch is left out when there are more (it holds compilation and warm-up).
    """
    torch.manual_seed(0)
    images = DeviceImages(array, device)
    labels_t = torch.from_numpy(labels).to(device)
    n = len(labels)
    val_idx = np.arange(0, n, 5)
    train_idx = np.setdiff1d(np.arange(n), val_idx)
    cfg = TrainConfig(arch=arch, epochs=epochs, batch_size=batch, compile=compiled)
    model = create_model(arch).to(device).to(memory_format=torch.channels_last)
    result = train_fold(model, images, labels_t, train_idx, val_idx, cfg, fold=1)
    timed = result.history[1:] or result.history
    trained = images_per_epoch(len(train_idx), batch, compiled) * len(timed)
    return {
        "img_per_s": trained / sum(r["train_seconds"] for r in timed),
        "img_per_s_with_validation": trained / sum(r["seconds"] for r in timed),
        "timed_epochs": len(timed),
    }


# --- 3. baseline: a per-image DataLoader, as typical solutions do ---------------------------------


class PILFaces(Dataset):
    """Opens and decodes each JPEG with PIL, then torchvision's per-image transforms."""

    def __init__(self, files: list[Path], labels: np.ndarray):
        self.files, self.labels = files, labels
        self.transform = T.Compose(
            [
                T.RandomAffine(degrees=5, translate=(4 / 64, 4 / 64)),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
            ]
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.files[i]) as im:
            return self.transform(im.convert("RGB")), int(self.labels[i])


def extract(images: ImageSet, folder: Path) -> list[Path]:
    """The images as files on disk, as a typical solution reads them (a zip is unpacked first)."""
    if isinstance(images.source, ZipSource):
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for rel, name in zip(images.paths(), images.names, strict=True):
            (folder / name).write_bytes(images.source.read(rel))
            files.append(folder / name)
        return files
    return [Path(images.source.path) / rel for rel in images.paths()]


QUEUED = 2  # batches each DataLoader worker queues by default (its prefetch_factor)
SHM_MARGIN = 1.5  # over the queued batches: those being handed over and pinned


def loader_settings(workers: int, batch_bytes: int, shm_free: int | None) -> tuple[int, int]:
    """(workers, batches queued per worker) whose batches fit in `shm_free` bytes of shared
    memory, through which each worker hands its batches over (None: no /dev/shm to go by).

    A container's /dev/shm is often 64 MB, and 16 workers queueing 2 batches of 512 float images
    each need 0.8 GB: their first batches would end in a bus error. The fewest changes first:
    one batch queued per worker, then fewer workers (one at least)."""
    if shm_free is None or workers == 0:
        return workers, QUEUED
    for queued in (QUEUED, 1):
        if workers * queued * batch_bytes * SHM_MARGIN <= shm_free:
            return workers, queued
    return max(1, int(shm_free // (batch_bytes * SHM_MARGIN))), 1


def baseline(
    files: list[Path],
    labels: np.ndarray,
    arch: str,
    device: torch.device,
    batch: int,
    steps: int,
    workers: int,
    min_seconds: float,
) -> dict:
    """Train-step images/s of the same model fed by a PIL DataLoader, and the loader's settings
    (fewer workers than asked where shared memory is short, see `loader_settings`)."""
    torch.manual_seed(0)
    shm = Path("/dev/shm")
    shm_free = shutil.disk_usage(shm).free if shm.is_dir() else None
    asked = workers
    workers, queued = loader_settings(workers, batch * 3 * 64 * 64 * 4, shm_free)  # float32
    if (workers, queued) != (asked, QUEUED):
        held = f"{workers} workers queueing {queued}, not {asked} queueing {QUEUED}"
        print(f"baseline: {shm_free / 2**20:.0f} MB of /dev/shm holds {held}", file=sys.stderr)
    loader = DataLoader(
        PILFaces(files, labels),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=queued if workers else None,
    )
    model = create_model(arch).to(device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    weights = class_weights(torch.from_numpy(labels)).to(device)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:  # epoch after epoch, as training goes on
            yield from loader

    feed = batches()

    def step() -> None:
        x, y = next(feed)
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        train_step(model, optimizer, x, y.to(device, non_blocking=True), weights)

    # The workers start together and queue up to `queued` batches each: the clock starts once
    # those are used up, at the pace the workers keep, not the one their head start gave.
    for _ in range(max(3, queued * workers)):
        step()
    settings = {"num_workers": workers, "prefetch_factor": queued}
    return {**timed_steps(step, batch, steps, min_seconds, device), **settings}


# --- 5. end to end: the commands ----------------------------------------------------------------


def warm_cache(data: str, cache: Path) -> None:
    """Decode the dataset's images into `cache` keyed as `faceattr train` and `predict` key them,
    so that `end_to_end` times the commands with the data cached, not a first decode."""
    dataset = load_dataset(data, need="any")
    if dataset.train is not None:
        load_images(dataset.train, cache, extra=dataset.labels.tobytes())
    if dataset.test is not None:
        load_images(dataset.test, cache)


def end_to_end(
    data: str, device: str, extra: list[str], cache: Path, work: Path, timeout: float | None = None
) -> dict:
    """Wall time of `faceattr train` then `faceattr predict`, run as a user runs them.

    The run is left in work/run and the labels in work/label_val.txt; `timeout` bounds both
    commands together (subprocess.TimeoutExpired when it passes). The model and epochs trained
    come with the times: the defaults depend on the device.
    """
    base = [sys.executable, "-m", "faceattr"]
    common = ["--device", device, "--cache", str(cache), "-q"]
    deadline = None if timeout is None else time.monotonic() + timeout
    timings = {}
    for name, args in (
        ("train_seconds", ["train", data, "--out", str(work / "run"), *extra]),
        (
            "predict_seconds",
            ["predict", data, "--run", str(work / "run"), "--output", str(work / "label_val.txt")],
        ),
    ):
        left = None if deadline is None else max(1.0, deadline - time.monotonic())
        start = time.perf_counter()
        subprocess.run([*base, *args, *common], check=True, stdout=subprocess.DEVNULL, timeout=left)
        timings[name] = time.perf_counter() - start
    timings["seconds"] = timings["train_seconds"] + timings["predict_seconds"]
    config = json.loads((work / "run" / "run.json").read_text())["config"]
    return {**timings, **{k: config[k] for k in ("arch", "epochs", "batch_size")}}


# --- 6. inference on a CPU: PyTorch and onnxruntime ----------------------------------------------


def inference(arch: str, runtime: str, batch: int, n: int, work: Path) -> float:
    """Images/s of one model scoring uint8 images on the CPU, as `faceattr predict` runs it."""
    torch.manual_seed(0)
    model = create_model(arch).eval()
    images = np.random.default_rng(0).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
    if runtime == "torch":
        nets = [for_inference(model, torch.device("cpu"))]

        def score(x: np.ndarray) -> None:
            ensemble_scores(nets, torch.from_numpy(x), batch)
    else:
        save_fold_model(work / arch / "models", 1, model, {"arch": arch})
        ensemble_json = {"threshold": 0.5, "vote": "soft", "tta": False, "folds": [1]}
        write_json(work / arch / "models" / "ensemble.json", ensemble_json)  # as train writes it
        ensemble = OnnxEnsemble(export_onnx(work / arch / "models", work / arch / "onnx")[0].parent)

        def score(x: np.ndarray) -> None:
            ensemble.scores(x, batch)

    score(images[:batch])  # warm-up
    start = time.perf_counter()
    score(images)
    return n / (time.perf_counter() - start)


# --- driver ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="dataset folder or .zip (e.g. celeba64.zip)")
    p.add_argument("--device", default="auto")
    p.add_argument("--arch", nargs="+", default=["simple", "resnet18"], choices=sorted(MODELS))
    p.add_argument("--measures", nargs="+", default=list(MEASURES), choices=MEASURES)
    p.add_argument("--batch-size", type=int, default=None, help="default 512 on a GPU, 128 on CPU")
    p.add_argument("--steps", type=int, default=50, help="timed train steps (ceiling, baseline)")
    p.add_argument(
        "--min-seconds", type=float, default=2.0, help="repeat the steps until this long (2)"
    )
    p.add_argument("--epochs", type=int, default=3, help="epochs of the faceattr loop")
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="use only the first N training images (but end_to_end, which trains on --data whole)",
    )
    compiling = p.add_mutually_exclusive_group()
    compiling.add_argument(
        "--no-compile", action="store_true", help="skip the compiled measurements"
    )
    compiling.add_argument(
        "--compiled-only", action="store_true", help="ceiling and faceattr compiled only, no eager"
    )
    p.add_argument(
        "--e2e-args", default="", help="extra `faceattr train` options, e.g. '--epochs 1'"
    )
    p.add_argument("--results", type=Path, default=None, help="results file (default: per device)")
    p.add_argument("--deadline", type=float, help="seconds: start no measurement after this many")
    args = p.parse_args(argv)
    for option in ("steps", "epochs", "limit", "batch_size"):
        value = getattr(args, option)
        if value is not None and value < 1:  # --steps 0 timed nothing, for ever
            p.error(f"--{option.replace('_', '-')} must be at least 1, got {value}")
    started = time.monotonic()  # the deadline counts from here, not from the first measurement

    device = resolve_device(args.device)
    name = device_name(device)
    batch = args.batch_size or (512 if device.type == "cuda" else 128)
    results = args.results or RESULTS / f"throughput-{name}.jsonl"
    results.parent.mkdir(parents=True, exist_ok=True)
    workers = cpu_cores()
    common = {
        "device": name,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "batch_size": batch,
        "cpu_cores": workers,
        "cpu": cpu_name(),
    }

    def emit(record: dict) -> None:
        # The record's own settings win (end_to_end's batch size is its run's), its fields first.
        line = json.dumps({**record, **{k: v for k, v in common.items() if k not in record}})
        print(line, flush=True)
        with results.open("a") as f:
            f.write(line + "\n")

    dataset = load_dataset(args.data, need="any")
    images, labels = subset(*dataset.require_train(), args.limit)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        loaded = load_images(images, tmp / "cache", extra=labels.tobytes())
        if "decode" in args.measures:
            emit(
                {
                    "measure": "decode",
                    "img_per_s": loaded.images_per_s,
                    "images": len(images),
                    "workers": workers,
                }
            )
        files = extract(images, tmp / "files") if "baseline" in args.measures else []
        array = np.asarray(loaded.array)
        # (record, how to measure it), the eager ones first: the compiled ones are slow to
        # build and the likeliest to fail (on a machine without a C compiler, say).
        jobs: list[tuple[dict, Callable[[], float | dict]]] = []

        def add(record: dict, measure: Callable, *measure_args: object) -> None:
            jobs.append((record, partial(measure, *measure_args)))

        def training(compiled: bool) -> None:
            for arch in args.arch:
                settings = {"arch": arch, "compiled": compiled}
                if "ceiling" in args.measures:
                    record = {"measure": "ceiling", **settings, "steps": args.steps}
                    add(record, ceiling, arch, device, batch, args.steps, compiled,
                        args.min_seconds)  # fmt: skip
                if "faceattr" in args.measures:
                    record = {"measure": "faceattr", **settings, "epochs": args.epochs}
                    record["images"] = len(images)
                    add(record, faceattr_loop, array, labels, arch, device, batch, args.epochs,
                        compiled)  # fmt: skip
                if "baseline" in args.measures and not compiled:
                    record = {"measure": "baseline", **settings, "steps": args.steps}
                    record["num_workers"] = workers
                    add(record, baseline, files, labels, arch, device, batch, args.steps, workers,
                        args.min_seconds)  # fmt: skip

        if not args.compiled_only:
            training(compiled=False)
        if "inference" in args.measures and device.type == "cpu":
            for arch in args.arch:
                n = 4096 if arch == "simple" else 256
                for runtime in ("torch", "onnxruntime"):
                    record = {"measure": "inference", "arch": arch, "runtime": runtime, "images": n}
                    record["inference_batch_size"] = INFERENCE_BATCH
                    record["threads"] = torch.get_num_threads()
                    add(record, inference, arch, runtime, INFERENCE_BATCH, n, tmp / "inference")
        if "end_to_end" in args.measures:
            extra = args.e2e_args.split()
            record = {"measure": "end_to_end", "train_args": " ".join(extra) or "defaults"}

            def commands() -> dict:
                warm_cache(args.data, tmp / "cache")  # timed with the data cached, as users run
                return end_to_end(args.data, args.device, extra, tmp / "cache", tmp)

            add(record, commands)
        if not args.no_compile:
            training(compiled=True)
        failed = 0
        for record, measure in jobs:
            what = f"{record['measure']} {record.get('arch', '')}".strip()
            if args.deadline is not None and time.monotonic() - started > args.deadline:
                print(f"deadline reached: {what} and the rest not measured", file=sys.stderr)
                break
            try:
                result = measure()
            except Exception as e:  # one failure (a compiler missing, memory) is not the others'
                print(f"{what} failed: {e!r}", file=sys.stderr)
                emit({**record, "error": repr(e)[:500]})
                failed += 1
                continue
            emit({**record, **(result if isinstance(result, dict) else {"img_per_s": result})})
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(run_script(main))
