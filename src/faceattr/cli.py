"""The `faceattr` command: a thin layer of argument parsing over the pipeline modules.

Errors a user can cause arrive as `FaceAttrError` and leave as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import faceattr
from faceattr.errors import FaceAttrError, first_line, listed, percent, plural, printable

# torch (and what imports it) loads inside `main`, where Ctrl-C during its second of loading is
# caught like any other: "interrupted", not a traceback.
if TYPE_CHECKING:
    import torch

    from faceattr.data import Dataset, ImageSet
    from faceattr.train import TrainConfig

log = logging.getLogger("faceattr")


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    """Progress lines on stderr (results go to stdout); warnings always show."""
    from faceattr import progress

    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    bars = sys.stderr.isatty() and not quiet
    progress.configure(bars)
    handler = progress.TqdmHandler(sys.stderr) if bars else logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = printable(record.getMessage())  # a file name with a newline stays one line
        return f"warning: {message}" if record.levelno >= logging.WARNING else message


def cache_dir(args: argparse.Namespace) -> str | None:
    """The decoded-image cache folder the options ask for; None for --no-cache."""
    from faceattr.cache import default_cache_dir

    return None if args.no_cache else str(args.cache or default_cache_dir())


def path(text: str) -> str:
    """A file or folder option's value: an empty one (`--out ""`) would be the current folder,
    where a run or an export would then land among whatever else is there."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path names no file or folder")
    return text


def processes(text: str) -> int:
    """--workers: a count of processes, or 0 for one per core (the default)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (one per core) or more, got {n}")
    return n


# --- commands ----------------------------------------------------------------------------------


def cmd_explore(args: argparse.Namespace) -> int:
    from faceattr.data import load_dataset

    # A wrong path fails before the heavy imports.
    return run_explore(load_dataset(args.data, need="any"), args)


def run_explore(data: Dataset, args: argparse.Namespace) -> int:
    """Shared by `faceattr explore` and the seed's `--mode=explore`."""
    from faceattr.explore import explore, format_summary

    summary = explore(data, args.out, args.workers, cache_dir(args))
    print(format_summary(summary))
    print(f"wrote {Path(args.out) / 'explore.json'} and its pictures")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from faceattr.data import load_dataset

    return run_train(load_dataset(args.data, need="train"), args)


def train_options() -> list[str]:
    """The TrainConfig fields `train` takes from the command line under the same names: all but
    those predict decides (--threshold, --no-tta) and the cache (--cache/--no-cache, see
    cache_dir)."""
    from dataclasses import fields

    from faceattr.train import TrainConfig

    return [f.name for f in fields(TrainConfig) if f.name not in ("threshold", "tta", "cache")]


def given_options(args: argparse.Namespace) -> dict:
    """The training options given on the command line: those not given are None (flags: False),
    so that the recipe's values show through."""
    given = {k: getattr(args, k) for k in train_options()}
    return {k: v for k, v in given.items() if v is not None and v is not False}


def train_config(args: argparse.Namespace, device: torch.device) -> TrainConfig:
    """The training options: those given on the command line over the device's default recipe."""
    from faceattr.train import config_for

    return config_for(device, {**given_options(args), "cache": cache_dir(args)})


def run_train(dataset: Dataset, args: argparse.Namespace) -> int:
    """Shared by `faceattr train` and the seed's `--mode=train`."""
    from faceattr import distributed
    from faceattr.run import format_run, train_run
    from faceattr.runtime import resolve_device

    ranks, device = distributed.from_environment(resolve_device(args.device))
    cfg = train_config(args, device)
    try:
        summary = train_run(
            dataset, cfg, args.out, device, args.resume, args.overwrite, ranks,
            given=given_options(args).keys(),
        )  # fmt: skip
    except RuntimeError as e:  # under torchrun: a collective failed, as another process stopped
        if ranks.world == 1 or not distributed.peer_stopped(e):  # its own: a bug's traceback
            raise
        raise FaceAttrError(
            f"another process of this torchrun job stopped, see its error ({first_line(e)})"
        ) from None
    finally:
        distributed.finish()
    if summary is None:  # a torchrun process other than rank 0: its folds are written
        return 0
    print(format_run(summary, args.out))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from faceattr.data import load_test_images

    given = [a for a in (args.run, args.model_dir, args.onnx) if a is not None]
    if len(given) != 1:
        raise FaceAttrError("give exactly one of --run RUN, --model-dir DIR or --onnx DIR")
    models_dir = args.onnx or args.model_dir or Path(args.run) / "models"
    return run_predict(load_test_images(args.data), models_dir, args, onnx=args.onnx is not None)


def run_predict(
    images: ImageSet, models_dir: str | Path, args: argparse.Namespace, onnx: bool = False
) -> int:
    """Shared by `faceattr predict` and the seed's `--mode=test`."""
    import torch

    from faceattr.predict import format_prediction, predict
    from faceattr.runtime import resolve_device

    if onnx and args.device not in ("auto", "cpu"):  # not resolved: no GPU is needed for it
        log.warning("--onnx runs on the CPU (onnxruntime's): --device %s does nothing", args.device)
    summary = predict(
        images,
        models_dir,
        args.output,
        torch.device("cpu") if onnx else resolve_device(args.device),
        rule=args.vote,
        threshold=args.threshold,
        tta=False if args.no_tta else None,
        batch_size=args.batch_size,
        workers=args.workers,
        cache=cache_dir(args),
        onnx=onnx,
    )
    print(format_prediction(summary))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from faceattr.evaluate import evaluate

    lonely = [f"--{o}" for o in ("plots", "images") if getattr(args, o) and not args.scores]
    if lonely:  # they would be left unused without a word
        raise FaceAttrError(
            f"{listed(lonely)}: there are plots only with --scores (the predictions.csv "
            "beside --pred); give it too"
        )
    # Given, not truthy: --workers 0 (one per core) is given too.
    given = {"workers": args.workers is not None, "cache": args.cache is not None,
             "no-cache": args.no_cache}  # fmt: skip
    decoding = [f"--{o}" for o, on in given.items() if on]
    if decoding and not args.images:
        raise FaceAttrError(
            f"{listed(decoding)}: only --images (the test images, for the worst errors) "
            "are decoded; give it too"
        )
    result = evaluate(
        args.pred, args.truth, args.scores, args.plots or "evaluation", args.images,
        cache_dir(args), args.workers,
    )  # fmt: skip
    print(json.dumps(result))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from faceattr.export import export_onnx

    paths = export_onnx(Path(args.run) / "models", args.onnx)
    print(f"wrote {plural(len(paths), 'ONNX model')} and ensemble.json to {args.onnx}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from faceattr.report import build_report

    print(f"wrote {build_report(args.run)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from faceattr.demo import run_demo
    from faceattr.runtime import resolve_device

    result = run_demo(args.out, resolve_device(args.device), args.n_train, args.n_test, args.epochs)
    test = result["test"]
    print(
        f"demo: out-of-fold HTER {percent(result['oof_hter'])}; test HTER {percent(test['hter'])} "
        f"(FAR {percent(test['far'])}, FRR {percent(test['frr'])}) on {test['n']} synthetic "
        f"test images; {result['seconds']:.0f}s; everything is in {result['out']}/"
    )
    return 0


# --- parser --------------------------------------------------------------------------------------


def add_train_options(p: argparse.ArgumentParser) -> None:
    from faceattr.augment import MIXES, POLICIES
    from faceattr.models import IMAGENET, MODELS
    from faceattr.train import OPTIMIZERS, SCHEDULES

    p.add_argument(
        "--arch",
        choices=sorted(MODELS),
        default=None,
        help="model (default: EfficientNet-Lite0 from ImageNet, efficientnet_lite0_s1 on a GPU, "
        "efficientnet_lite0 on a CPU; another model starts from the seed's settings, given "
        "below as 'seed', not the device's recipe)",
    )
    # No defaults here (None): TrainConfig and the device's recipe hold them (see train_config).
    p.add_argument("--folds", type=int, help="stratified folds = models (default 5)")
    p.add_argument(
        "--epochs", type=int, help="epochs per fold (default 6 on a CPU, 15 on a GPU; seed 15)"
    )
    p.add_argument("--lr", type=float, help="learning rate (default 0.001)")
    p.add_argument("--step", type=int, help="StepLR step in epochs (default 5)")
    p.add_argument("--gamma", type=float, help="StepLR factor (default 0.7)")
    p.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        help="adam as the seed; sgd: with Nesterov momentum (default adamw; seed adam)",
    )
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        help="step: StepLR as the seed; cosine: warm-up then cosine; onecycle (default cosine; "
        "seed step)",
    )
    p.add_argument("--weight-decay", type=float, help="(default 0.05; seed 0)")
    p.add_argument("--label-smoothing", type=float, help="pull targets towards 0.5 (default 0)")
    p.add_argument(
        "--augment",
        choices=sorted(POLICIES),
        help="light: shifts, rotations up to 5 degrees, mirror images (default); strong adds "
        "zoom, colour jitter and small erased patches",
    )
    p.add_argument("--mix", choices=MIXES, help="mixup or cutmix (default none)")
    p.add_argument(
        "--mix-alpha",
        type=float,
        help="mixing shares drawn from Beta(alpha, alpha), each image keeping the larger (default "
        "0.2)",
    )
    p.add_argument(
        "--ema",
        type=float,
        metavar="DECAY",
        help="validate and keep a moving average of the weights, updated every step with this "
        "decay (e.g. 0.999), after a short warm-up; 0: off (default)",
    )
    p.add_argument(
        "--batch-size", "--batch_size", dest="batch_size", type=int, help="(default 128)"
    )
    p.add_argument("--seed", type=int, help="seed for folds, weights and augmentation (default 0)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the unfinished run in the run folder (--out; main.py: --save_dir) where it "
        "stopped",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a run already in the run folder, once the new one has finished",
    )
    p.add_argument(
        "--save-every",
        type=float,
        metavar="SECONDS",
        help="save the running fold's state for --resume after an epoch once this long has "
        "passed since the last save (default 30); 0: after every epoch",
    )
    p.add_argument(
        "--ddp",
        action="store_true",
        help="under torchrun: train each fold data-parallel across all processes",
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave images that cannot be decoded out of training",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the training step (pays on a GPU)"
    )
    p.add_argument(
        "--pretrained",
        nargs="?",
        type=path,
        const=IMAGENET,
        default=None,
        metavar="FILE",
        help="start from ImageNet weights: alone, those an installed package ships "
        "(efficientnet_lite0: the default recipes start from them) or torch's hub cache holds "
        "(resnet18/34); a local .pth/.safetensors file; or none (from random weights)",
    )


def add_predict_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--vote",
        choices=["soft", "majority"],
        help="soft: mean probability; majority: the fold models' votes (the seed's rule); "
        "default: the run's (soft)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="decision threshold (default: the one train chose on out-of-fold scores)",
    )
    p.add_argument("--no-tta", action="store_true", help="do not also score mirrored images")


def add_common(p: argparse.ArgumentParser, device: bool = True, images: bool = True) -> None:
    """The options every command shares: -q/-v, and those of the device and image decoding
    where the command has them."""
    if device:
        p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    if images:
        p.add_argument(
            "--workers",
            type=processes,
            default=None,
            help="image-decoding processes (0: one per core)",
        )
        p.add_argument(
            "--cache",
            type=path,
            default=None,
            help="folder for decoded-image caches (default $FACEATTR_CACHE, else "
            "$XDG_CACHE_HOME/faceattr, else ~/.cache/faceattr)",
        )
        p.add_argument("--no-cache", action="store_true", help="decode images in memory every time")
    talk = p.add_mutually_exclusive_group()  # -q -v would be -q, the -v lost without a word
    talk.add_argument(
        "-q", "--quiet", action="store_true", help="only warnings, errors and results"
    )
    talk.add_argument("-v", "--verbose", action="store_true", help="more detail")


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other error a user can cause: the
    usage block it prints by default buries the message, and `--help` shows it on request."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {printable(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="faceattr",
        description="Learn a binary face attribute from 64x64 photos; predict it with low HTER.",
    )
    parser.add_argument("--version", action="version", version=f"faceattr {faceattr.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = sub.choices  # name -> its parser: for the errors parse() reports

    p = sub.add_parser("explore", help="counts, class balance, image audit, pictures")
    p.add_argument("data", type=path, help="dataset folder or .zip")
    p.add_argument("--out", type=path, default="explore", help="output folder (default explore/)")
    add_common(p, device=False)
    p.set_defaults(func=cmd_explore)

    p = sub.add_parser("train", help="train one model per stratified fold")
    p.add_argument("data", type=path, help="dataset folder or .zip")
    p.add_argument("--out", type=path, default="run", help="run folder (default run/)")
    add_train_options(p)
    add_common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="score test images with every fold model and vote")
    p.add_argument(
        "data",
        type=path,
        help="dataset folder or .zip with val_img/, or numbered images (folder or .zip)",
    )
    p.add_argument("--run", type=path, help="run folder written by train")
    p.add_argument(
        "--model-dir", "--model_dir", dest="model_dir", type=path, help="a run's models/ folder"
    )
    p.add_argument(
        "--onnx", type=path, help="a folder written by `faceattr export --onnx` (onnxruntime)"
    )
    p.add_argument(
        "--output", type=path, default="label_val.txt", help="label file (default ./label_val.txt)"
    )
    add_predict_options(p)
    p.add_argument(
        "--batch-size",
        "--batch_size",
        dest="batch_size",
        type=int,
        default=None,
        help="images per inference batch (default 4096 on a GPU, 32 on a CPU)",
    )
    add_common(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="HTER of a label file against the truth")
    p.add_argument("--pred", type=path, required=True, help="predicted label file")
    p.add_argument("--truth", type=path, required=True, help="true label file")
    p.add_argument(
        "--scores", type=path, help="the predictions.csv beside --pred: adds AUC, EER and plots"
    )
    p.add_argument(
        "--plots", type=path, help="folder for the plots (with --scores; default: evaluation)"
    )
    p.add_argument(
        "--images", type=path, help="the test images (dataset or folder): adds the worst errors"
    )
    add_common(p, device=False)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="write the fold models as ONNX files")
    p.add_argument("run", type=path, help="run folder written by train")
    p.add_argument("--onnx", type=path, required=True, help="output folder")
    add_common(p, device=False, images=False)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="(re)build RUN/report.html")
    p.add_argument("run", type=path, help="run folder written by train")
    add_common(p, device=False, images=False)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="synthetic data -> explore -> train -> predict -> evaluate")
    p.add_argument(
        "--out", type=path, default="faceattr-demo", help="output folder (default faceattr-demo/)"
    )
    p.add_argument(
        "--n-train", type=int, default=2000, help="synthetic training faces (default 2000)"
    )
    p.add_argument(
        "--n-test",
        type=int,
        default=500,
        help="synthetic test faces, labels withheld (default 500)",
    )
    p.add_argument(
        "--epochs", type=int, default=6, help="epochs per fold of the 3-fold simple CNN (default 6)"
    )
    add_common(p, images=False)  # its images, made afresh each time, are decoded in memory
    p.set_defaults(func=cmd_demo)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised where the work is, so that it unwinds as from Ctrl-C: temporary files go."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; a user's error becomes one line on stderr and exit code 2."""
    import torch

    setup_logging(args.quiet, args.verbose)
    handles = threading.current_thread() is threading.main_thread()  # Python's rule for signals
    before = signal.signal(signal.SIGTERM, _terminate) if handles else None
    try:
        return func(args)
    except Terminated:
        print("faceattr: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except FaceAttrError as e:
        return _error(str(e))
    except KeyboardInterrupt:
        print("faceattr: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `faceattr ... | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # the system refused: a name too long, a full disk, a lost mount...
        where = f"{e.filename}: " if e.filename else ""
        return _error(f"{where}{e.strerror or e}")
    except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError from torch 2.5 on
        size = getattr(args, "batch_size", None)
        hint = f" (it is {size})" if size else ""
        return _error(f"out of GPU memory; try a smaller --batch-size{hint}")
    finally:
        if handles:
            signal.signal(signal.SIGTERM, before)


def _error(message: str) -> int:
    """Say a user's error in one line (control characters in a file name as escapes), exit 2."""
    print(f"faceattr: error: {printable(message)}", file=sys.stderr)
    return 2


def run_script(main: Callable[[], int]) -> int:
    """A benchmark script's `main` as a command: SIGTERM unwinds it (its child processes and
    temporary folders go, its tables are written), a user's error is one line. Warnings only:
    its results are the lines it prints."""
    return run_command(lambda args: main(), argparse.Namespace(quiet=True, verbose=False))


def parse(
    parser: Callable[[], argparse.ArgumentParser], argv: list[str] | None
) -> argparse.Namespace:
    """The parsed command line, or exit 130 if Ctrl-C comes while the parser imports torch."""
    try:
        built = parser()
        args, unknown = built.parse_known_args(argv)
        if unknown:  # the command's parser says so, pointing to its own --help
            command = getattr(built, "commands", {}).get(getattr(args, "command", None), built)
            command.error(f"unrecognized arguments: {' '.join(unknown)}")
        return args
    except KeyboardInterrupt:
        print("faceattr: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def main(argv: list[str] | None = None) -> int:
    args = parse(build_parser, _talk_after_command(sys.argv[1:] if argv is None else argv))
    return run_command(args.func, args)


def _talk_after_command(argv: list[str]) -> list[str]:
    """`faceattr -q explore DATA` as `faceattr explore -q DATA`: every command takes -q and -v,
    and they read as well before it."""
    lead = 0
    while lead < len(argv) and argv[lead] in ("-q", "--quiet", "-v", "--verbose"):
        lead += 1
    return [*argv[lead : lead + 1], *argv[:lead], *argv[lead + 1 :]]
