"""The run folder on disk: what a run writes there, the run found in it, its lock, and one run
replacing another.

`train --overwrite` trains the new run in OUT/.replacement/ and renames its files into place only
once it has finished, so until then (and if it fails or is interrupted) the old run is whole, and
`predict` uses it. The renames are safe from Ctrl-C, and a kill midway is finished by the next
`train` there.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from faceattr.errors import FaceAttrError
from faceattr.outputs import ensure_writable_dir

log = logging.getLogger("faceattr")

RUN_FOLDERS = ("models", "data", "evaluation", "prediction")  # and fold_K/
RUN_CONTENTS = ("run.json", "folds.csv", "oof.csv", "report.html", *RUN_FOLDERS)
REPLACEMENT = ".replacement"  # where --overwrite trains the run that replaces OUT's
ASIDE = ".replacing"  # where the old run's files go as they move out; then renamed...
REPLACED = ".replaced"  # ...this, once they all have: now the new run's files move in
READERS_WAIT = 10.0  # s a train waits for readers of the run (predict) to let go of its lock


def run_paths(out: Path, staging: bool = True) -> list[Path]:
    """What a run writes in `out`, there yet or not: RUN_CONTENTS, its fold_K/ folders (K as the
    run writes it: not fold_notes.txt, fold_0 or fold_01) and (with `staging`) the folders in
    which --overwrite trains a new run and puts the old one aside."""
    folds = [p for p in out.glob("fold_[1-9]*") if p.name[5:].isdecimal() and p.is_dir()]
    staged = (REPLACEMENT, ASIDE, REPLACED) if staging else ()
    return [*(out / name for name in (*RUN_CONTENTS, *staged)), *folds]


def fold_files(folder: Path, suffix: str) -> list[tuple[int, Path]]:
    """The `fold_K<suffix>` files of a folder with their fold numbers, in numeric order."""
    pattern = re.compile(rf"fold_(\d+){re.escape(suffix)}")
    return sorted(
        (int(m.group(1)), p)
        for p in folder.glob(f"fold_*{suffix}")
        if (m := pattern.fullmatch(p.name))
    )


def remains(out: Path) -> list[Path]:
    """The files of a run whose run.json is gone (deleted, or lost) that a new run in `out`
    would take for its own: its folds (a finished one is kept, a saved state resumed), its fold
    models and ensemble settings (predict votes them) and predict's section of its report."""
    folds = [p for p in run_paths(out, staging=False) if p.name.startswith("fold_")]
    models = [p for kind in (".safetensors", ".json") for _, p in fold_files(out / "models", kind)]
    extra = (out / "models" / "ensemble.json", out / "prediction" / "prediction.json")
    return [*folds, *models, *(p for p in extra if p.is_file())]


def existing_run(out: Path, advice: str = "choose another --out") -> dict | None:
    """The run.json of a run already in `out`, if any; one that is no run's is an error."""
    try:
        found = json.loads((out / "run.json").read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as e:  # ValueError: JSON, or not UTF-8
        raise FaceAttrError(f"{out / 'run.json'} is unreadable ({e}); {advice}") from None
    if not (isinstance(found, dict) and isinstance(found.get("config"), dict)):
        raise FaceAttrError(f"{out / 'run.json'} is not a faceattr run's; {advice}")
    return found


def runs_in(out: Path, overwrite: bool) -> tuple[dict | None, dict | None]:
    """The run.json of the run in `out` and of an interrupted replacement of it. A replacement's
    that cannot be read is refused, but to --overwrite, which starts the replacement again."""
    try:
        pending = existing_run(out / REPLACEMENT, "--overwrite starts that run again")
    except FaceAttrError:
        if not overwrite:
            raise
        pending = None
    return existing_run(out), pending


def unfinished_run(out: Path) -> bool:
    """Whether `out` holds a run that --resume would continue: its own, or its replacement's. Not
    one whose run.json cannot be read (--overwrite starts it again), nor a finished replacement
    (a kill cut its renaming into place, which the next train finishes before anything else)."""
    return any(run is not None and run.get("status") != "complete" for run in runs_in(out, True))


def finished_run(run: Path, found: list[int]) -> dict | None:
    """The summary run.json holds of the finished run of 1..N folds in `run` (None: no such run,
    or a damaged one); an unfinished one, whose `found` fold models are not yet its ensemble, is
    refused, with what finishes it."""
    try:
        summary = json.loads((run / "run.json").read_text())
        status, folds = summary.get("status"), summary["config"]["folds"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # absent, or damaged:
        return None  # that costs predict the report, not the labels
    if not (isinstance(folds, int) and folds > 0):
        return None
    if status != "complete":
        said = f"{run} holds a run that has not finished ({len(found)} of {folds} fold models; "
        if _readable_run(run / REPLACEMENT):  # what --resume would continue instead
            raise FaceAttrError(
                f"{said}interrupted), and an interrupted --overwrite left the run to replace it "
                f"in {run / REPLACEMENT}: faceattr train DATA --out {run} --resume finishes that"
            )
        raise FaceAttrError(
            f"{said}training, or interrupted): faceattr train DATA --out {run} --resume finishes it"
        )
    return summary


def _readable_run(folder: Path) -> bool:
    try:
        return existing_run(folder) is not None
    except FaceAttrError:
        return False


def check_whole(run: Path) -> None:
    """Refuse a run that a killed `train --overwrite` left half replaced: some files of each."""
    if any((run / name).is_dir() for name in (ASIDE, REPLACED)):
        raise FaceAttrError(
            f"{run} is half replaced by another run (a train --overwrite was killed while it "
            f"moved that run in): faceattr train DATA --out {run} finishes that first"
        )


def where_to_train(
    out: Path, current: dict | None, pending: dict | None, resume: bool, overwrite: bool
) -> tuple[Path, dict | None]:
    """The folder this run trains in, and the run.json of the run it continues (`resume`), given
    those of the run in `out` (`current`) and of an interrupted replacement of it (`pending`).
    A new run that replaces another trains beside it, in OUT/.replacement/."""
    if resume:  # an interrupted replacement, if there is one, is the run to continue
        work, previous = (out / REPLACEMENT, pending) if pending else (out, current)
        if previous is None:
            raise FaceAttrError(f"--resume: {out} holds no run to continue")
        return work, previous
    if (current or pending) and not overwrite:
        finished = (current or {}).get("status") == "complete"
        state = "a finished run" if finished else "an unfinished run"
        if pending:  # an interrupted --overwrite: the old run is whole, and the new one half
            new = f"{state} and an unfinished one to replace it" if current else "an unfinished run"
            state = f"{new} in {REPLACEMENT}/ (an interrupted --overwrite)"
        elif finished:  # nothing to continue
            raise FaceAttrError(
                f"{out} holds a finished run: --overwrite replaces it, or choose another --out"
            )
        raise FaceAttrError(
            f"{out} holds {state}: --resume continues {'that one' if pending else 'it'}, "
            "--overwrite starts it again, or choose another --out"
        )
    return (out / REPLACEMENT if current else out), None


@contextmanager
def writing(
    out: Path, main: bool, found: tuple[dict | None, dict | None] | None, overwrite: bool
) -> Iterator[None]:
    """Make `out` and hold OUT/.lock while this run writes there (or in OUT/.replacement/): a
    second `train` into the same folder stops with one line instead of mixing its files with this
    one's. `found` is the run.json of each that the checks saw (None: none to compare), read as
    `runs_in(out, overwrite)` reads them; another process may have written one since. Rank 0
    locks (and makes the folder) for a torchrun job."""
    if not main:
        yield
        return
    ensure_writable_dir(out)
    if fcntl is None:  # not on Windows
        yield
        return
    with open(out / ".lock", "a") as lock:
        _lock_from_readers(lock, out)
        if found is not None and runs_in(out, overwrite) != found:
            raise FaceAttrError(
                f"another faceattr train wrote {out} meanwhile; choose another --out"
            )
        yield  # the lock goes with the file


def _lock_from_readers(lock, out: Path, patience: float = READERS_WAIT) -> None:
    """Take `lock` for writing: at once from no one, in a moment from readers (a predict writes
    its report section holding it shared, for under a second), never from another writer."""
    deadline = time.monotonic() + patience
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        try:  # taken shared: only readers hold it
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _locked(out) from None
        fcntl.flock(lock, fcntl.LOCK_UN)
        if time.monotonic() > deadline:
            raise FaceAttrError(
                f"{out} is being read by faceattr predict for over {patience:.0f} s; "
                "wait, or choose another --out"
            )
        time.sleep(0.05)


def _locked(out: Path) -> FaceAttrError:
    return FaceAttrError(
        f"{out} is being written by another faceattr train; wait, or choose another --out"
    )


def check_unlocked(out: Path) -> None:
    """Say so at once when another train holds OUT/.lock: what it wrote so far would otherwise
    read as an unfinished run, and the advice to --resume it would meet the lock after decoding."""
    if fcntl is None or not (out / ".lock").is_file():
        return
    with open(out / ".lock") as lock:  # read only: this creates nothing
        try:  # shared: probes (torchrun's ranks) do not block each other, a writer blocks them;
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)  # and NFS takes it read-only
        except BlockingIOError:
            raise _locked(out) from None


def put_in_place(new: Path, out: Path) -> None:
    """Replace the run in `out` by the finished one in `new` (OUT/.replacement/), leaving what
    else lives in `out` alone: renames, with Ctrl-C and SIGTERM held back until they are done.
    Where a kill stopped them is told by the folders, so the next train finishes the work
    (`finish_replacing`): the old run's files move to OUT/.replacing/, which is renamed
    OUT/.replaced/ once they all have; then the new run's move in, run.json last."""
    with _signals_held(f"the new run was put in place in {out}: it is, whole"):
        aside, old = out / ASIDE, out / REPLACED
        if not old.exists():
            aside.mkdir(exist_ok=True)
            for path in run_paths(out, staging=False):
                if path.exists():
                    path.rename(aside / path.name)
            aside.rename(old)
        for path in sorted(run_paths(new, staging=False), key=lambda p: p.name == "run.json"):
            if path.exists():
                path.rename(out / path.name)
        shutil.rmtree(new)
        shutil.rmtree(old)


def finish_replacing(out: Path) -> None:
    """Finish what a train killed while it replaced the run in `out` left: a finished
    replacement (its run.json still in OUT/.replacement/) is put in place; otherwise what is
    left of the old run goes, and a replacement that never wrote its run.json."""
    if not any((out / name).exists() for name in (REPLACEMENT, ASIDE, REPLACED)):
        return  # the usual case: nothing to lock, nor a folder to make
    with writing(out, True, None, True):
        try:
            pending = existing_run(out / REPLACEMENT)
        except FaceAttrError:  # unreadable: not finished, so never swapped; --overwrite clears it
            return
        if pending is not None and pending.get("status") == "complete":
            put_in_place(out / REPLACEMENT, out)
            log.warning("put in place the run that an interrupted --overwrite trained in %s", out)
            return
        for name in (ASIDE, REPLACED, *([REPLACEMENT] if pending is None else [])):
            shutil.rmtree(out / name, ignore_errors=True)


@contextmanager
def beside_the_run(out: Path) -> Iterator[bool]:
    """Hold OUT/.lock shared while a reader of the run writes beside it (predict's section of the
    report): True if no train is writing OUT, which then cannot start there, nor replace the
    run, until the block ends; False if one is."""
    if fcntl is None:
        yield True
        return
    with open(out / ".lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


@contextmanager
def _signals_held(what: str) -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back while the block runs, then act on them: what the block does
    (`what`, which a warning then names) is never left half done by them. (Python lets only the
    main thread set handlers.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    kept = {
        s: signal.signal(s, lambda n, _: held.append(n)) for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for s, handler in kept.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
    if held:
        log.warning("interrupted while %s", what)
        signal.raise_signal(held[0])
