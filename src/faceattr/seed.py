"""The seed's interface, `python main.py --mode=explore|train|test ...`, on top of faceattr.

Every flag of the original script keeps its name; the defaults are faceattr's (train: the device's
recipe; test: the soft vote at the run's threshold), and the extra flags mirror `faceattr`'s.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from faceattr.cli import (
    Parser,
    add_common,
    add_predict_options,
    add_train_options,
    parse,
    path,
    run_command,
    run_explore,
    run_predict,
    run_train,
    train_options,
)
from faceattr.errors import FaceAttrError, listed

log = logging.getLogger("faceattr")
EXPLORE_OUT = "explore"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="main.py", description="The seed's commands: explore, train or test (predict).")
    p.add_argument(
        "--mode",
        choices=["explore", "train", "test"],
        required=True,
        help="test: predict --img_test_dir",
    )
    p.add_argument("--img_train_dir", type=path, help="folder of numbered training images")
    p.add_argument("--labels_txt", type=path, help="label file: line N is the label of image N")
    p.add_argument("--img_test_dir", type=path, help="folder of numbered test images")
    p.add_argument("--save_dir", type=path, default="run", help="train: run folder (default run/)")
    p.add_argument(
        "--model_dir", type=path, help="test: folder of fold models (default SAVE_DIR/models)"
    )
    p.add_argument("--output", type=path, default="label_val.txt", help="test: label file to write")
    p.add_argument(
        "--out", type=path, default=EXPLORE_OUT, help="explore: output folder (default explore/)"
    )
    add_predict_options(p)
    add_train_options(p)
    add_common(p)
    return p


# What each mode reads, beside -q/-v, --device and the image options every mode has.
PREDICT = ["vote", "threshold", "no_tta"]
USED = {
    "explore": ["img_train_dir", "labels_txt", "img_test_dir", "out"],
    "train": ["img_train_dir", "labels_txt", "save_dir", "out", "overwrite", "resume"],
    "test": ["img_test_dir", "save_dir", "model_dir", "output", "batch_size", *PREDICT],
}


def unused_flags(args: argparse.Namespace) -> list[str]:
    """The flags given that `args.mode` does nothing with, as the command line names them: the
    seed's commands share one parser, so a --epochs in a test command parses without a word."""
    used = {"mode", "quiet", "verbose", "device", "workers", "cache", "no_cache", *USED[args.mode]}
    if args.mode == "train":
        used |= set(train_options())
    parser = build_parser()
    return [
        a.option_strings[-1]
        for a in parser._actions
        if a.option_strings
        and a.dest not in used | {"help"}
        and getattr(args, a.dest, None) != a.default
    ]


def run(args: argparse.Namespace) -> int:
    from faceattr.data import dataset_from_paths, image_folder
    from faceattr.runfolder import unfinished_run

    if unused := unused_flags(args):
        log.warning("--mode=%s ignores %s, other modes' flags", args.mode, listed(unused))
    if args.mode == "explore":
        if not (args.img_train_dir or args.img_test_dir):
            raise FaceAttrError(
                "--mode=explore needs --img_train_dir and --labels_txt, or --img_test_dir"
            )
        return run_explore(
            dataset_from_paths(args.img_train_dir, args.labels_txt, args.img_test_dir), args
        )
    if args.mode == "train":
        if not (args.img_train_dir and args.labels_txt):
            raise FaceAttrError("--mode=train needs --img_train_dir and --labels_txt")
        if args.out != EXPLORE_OUT:  # faceattr train's flag for the run folder, not the seed's
            log.warning(
                "--out is --mode=explore's folder: the run goes to --save_dir=%s", args.save_dir
            )
        # As the seed did, training into an existing --save_dir replaces it, unless the run
        # there was interrupted: then it continues (--overwrite: it starts again). A --resume
        # given is faceattr's: it never replaces a run.
        args.out = args.save_dir
        if not args.resume:
            unfinished = unfinished_run(Path(args.save_dir))
            args.resume = unfinished and not args.overwrite
            args.overwrite = not args.resume
        try:
            return run_train(dataset_from_paths(args.img_train_dir, args.labels_txt, None), args)
        except FaceAttrError as e:  # train's messages name its run folder's flag: here it is
            raise FaceAttrError(re.sub(r"--out\b", "--save_dir", str(e))) from None
    if not args.img_test_dir:
        raise FaceAttrError("--mode=test needs --img_test_dir")
    # As the seed's test read its models from where its train wrote them, --save_dir's.
    models_dir = args.model_dir or Path(args.save_dir) / "models"
    return run_predict(image_folder(args.img_test_dir), models_dir, args)


def main(argv: list[str] | None = None) -> int:
    args = parse(build_parser, argv)
    return run_command(run, args)
