"""The run folder: the lock, where a run trains, and one run replacing another whole."""

import json
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch

from faceattr.checkpoints import load_fold_models
from faceattr.data import load_dataset
from faceattr.errors import FaceAttrError
from faceattr.run import train_run
from faceattr.runfolder import (
    ASIDE,
    REPLACEMENT,
    check_unlocked,
    finish_replacing,
    finished_run,
    put_in_place,
    remains,
    run_paths,
    runs_in,
    unfinished_run,
    where_to_train,
    writing,
)
from faceattr.train import TrainConfig


def test_two_trains_never_write_one_folder_at_once(dataset_dir, tmp_path):
    import fcntl

    cfg = TrainConfig(arch="simple", folds=2, epochs=1, batch_size=32)
    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "a") as held:  # as a train running there holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(FaceAttrError, match="being written by another faceattr train"):
            train_run(load_dataset(dataset_dir), cfg, run, torch.device("cpu"))
    assert [p.name for p in run.iterdir()] == [".lock"]  # nothing else written
    # Once the other has written its run.json, this one is not told to --resume it.
    (run / "run.json").write_text('{"status": "running", "config": {}}')
    with open(run / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for resume in (False, True):
            with pytest.raises(FaceAttrError, match="being written by another faceattr train"):
                train_run(load_dataset(dataset_dir), cfg, run, torch.device("cpu"), resume)
    (run / "run.json").unlink()
    # Another process probing the lock (a torchrun rank's check) is no writer: it holds it shared.
    with open(run / ".lock") as probe:
        fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
        check_unlocked(run)
    # A run.json that appeared after this run's checks saw none: another train got there first.
    (run / "run.json").write_text('{"status": "running", "config": {}}')
    with (
        pytest.raises(FaceAttrError, match=r"wrote .* meanwhile"),
        writing(run, True, (None, None), False),
    ):
        pass
    with writing(
        run, True, ({"status": "running", "config": {}}, None), False
    ):  # as the checks saw
        pass


def test_where_a_run_trains_follows_the_folders_runs_and_the_options(tmp_path):

    out, new = tmp_path, tmp_path / ".replacement"
    done, running = {"status": "complete"}, {"status": "running"}
    for current, pending, resume, overwrite, expected in (
        (None, None, False, False, (out, None)),
        (None, None, False, True, (out, None)),  # nothing to keep: in place
        (done, None, False, True, (new, None)),  # beside the run it replaces
        (running, None, False, True, (new, None)),
        (done, running, False, True, (new, None)),  # the interrupted replacement starts again
        (done, None, True, False, (out, done)),
        (running, None, True, False, (out, running)),
        (done, running, True, False, (new, running)),  # --resume continues the replacement
        (None, running, True, False, (new, running)),
    ):
        assert where_to_train(out, current, pending, resume, overwrite) == expected
    for current, pending, resume, message in (
        (None, None, True, "holds no run to continue"),
        (done, None, False, "holds a finished run: --overwrite replaces it, or choose another"),
        (running, None, False, "holds an unfinished run: --resume continues it"),
        (done, running, False, "a finished run and an unfinished one to replace it in .repl"),
        (running, running, False, "holds an unfinished run and an unfinished one to replace it"),
        (None, running, False, "holds an unfinished run in .replacement/ (an interrupted --ov"),
    ):
        with pytest.raises(FaceAttrError, match=re.escape(message)):
            where_to_train(out, current, pending, resume, False)


def fake_runs(out: Path) -> None:
    """A finished run in `out` (with a file of the user's beside it) and a finished replacement."""
    for folder, which, files in (
        (out, "old", ["oof.csv", "models/a", "fold_1/x", "fold_2/x", "data/p"]),
        (out / ".replacement", "new", ["folds.csv", "models/b", "fold_1/y", "fold_2/z"]),
    ):
        for name in files:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(which)
        summary = {"status": "complete", "config": {"folds": 2}, "which": which}
        (folder / "run.json").write_text(json.dumps(summary))
    (out / "notes.txt").write_text("mine")


REPLACED = {"run.json", "folds.csv", "models/b", "fold_1/y", "fold_2/z", "notes.txt"}


def files_in(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != ".lock"}


def test_a_replacement_killed_while_it_moves_in_is_finished_by_the_next_train(
    tmp_path, monkeypatch
):
    """Each rename or removal of the swap, in turn, is where a kill (SIGKILL, power) stops it:
    the next train, which calls finish_replacing first, puts the new run in place whole."""

    class Killed(BaseException):
        pass

    def killed_at(step: int, done: list, real):
        def op(*args, **kwargs):
            done.append(op)
            if len(done) == step:
                raise Killed
            return real(*args, **kwargs)

        return op

    rename, rmtree = Path.rename, shutil.rmtree
    step = halves = 0
    while True:
        step += 1
        out = tmp_path / f"run{step}"
        fake_runs(out)
        done = []  # the renames and removals so far, counted together
        monkeypatch.setattr(Path, "rename", killed_at(step, done, rename))
        monkeypatch.setattr(shutil, "rmtree", killed_at(step, done, rmtree))
        try:
            put_in_place(out / ".replacement", out)
        except Killed:
            pass
        else:  # the step was past the last one
            assert files_in(out) == REPLACED
            break
        finally:
            monkeypatch.setattr(Path, "rename", rename)
            monkeypatch.setattr(shutil, "rmtree", rmtree)
        if any((out / n).exists() for n in (".replacing", ".replaced")):  # some of each run
            with pytest.raises(FaceAttrError, match="is half replaced by another run"):
                load_fold_models(out / "models")  # what predict and export load first
            halves += 1
        finish_replacing(out)
        assert files_in(out) == REPLACED, step
        assert json.loads((out / "run.json").read_text())["which"] == "new"
        assert {p.name for p in out.iterdir()} >= {"models", "fold_1", "fold_2"}
        assert not any((out / n).exists() for n in (".replacement", ".replacing", ".replaced"))
    assert step > 10 and halves > 5  # every rename and removal was tried


def test_ctrl_c_while_a_replacement_moves_in_waits_for_it(tmp_path, monkeypatch, caplog):

    fake_runs(tmp_path)
    rename, calls = Path.rename, []

    def pressed(self, target):
        calls.append(target)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)  # as Ctrl-C, midway
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", pressed)
    with pytest.raises(KeyboardInterrupt), caplog.at_level("WARNING", logger="faceattr"):
        put_in_place(tmp_path / ".replacement", tmp_path)
    assert "interrupted while the new run was put in place in" in caplog.text
    assert caplog.text.rstrip().endswith("it is, whole")  # not to be trained again
    assert len(calls) > 3 and files_in(tmp_path) == REPLACED  # all done, then interrupted
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_train_first_finishes_a_replacement_and_reads_a_damaged_one_as_asked(
    tmp_path, dataset_dir, monkeypatch
):

    fake_runs(tmp_path / "run")
    assert not unfinished_run(tmp_path / "run")  # the seed's train replaces it, as any finished
    (tmp_path / "run" / ".replaced").mkdir()  # as if killed once the old run's files were aside
    for name in ("run.json", "oof.csv", "models", "fold_1", "fold_2", "data"):
        (tmp_path / "run" / name).rename(tmp_path / "run" / ".replaced" / name)
    cfg, cpu = TrainConfig(arch="simple", folds=2, epochs=1), torch.device("cpu")
    with pytest.raises(FaceAttrError, match="holds a finished run: --overwrite replaces it"):
        train_run(load_dataset(dataset_dir), cfg, tmp_path / "run", cpu)  # the new one, in place
    assert files_in(tmp_path / "run") == REPLACED
    # A replacement's run.json that cannot be read is refused, but by --overwrite, which clears it.
    (tmp_path / "run" / ".replacement").mkdir()
    (tmp_path / "run" / ".replacement" / "run.json").write_text("{")
    with pytest.raises(FaceAttrError, match=r"replacement/run.json is unreadable .*--overwrite"):
        runs_in(tmp_path / "run", overwrite=False)
    assert runs_in(tmp_path / "run", overwrite=True)[1] is None


def test_a_train_waits_for_a_predict_writing_beside_the_run(tmp_path):
    """predict holds the lock shared while it writes its report section: a train starting then
    had been told another train was writing the folder. It waits for the reader, not a writer."""
    import fcntl
    import threading
    import time

    from faceattr.runfolder import _lock_from_readers

    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "a") as held, open(run / ".lock", "a") as mine:
        fcntl.flock(held, fcntl.LOCK_SH)  # as predict's beside_the_run holds it
        threading.Timer(0.5, fcntl.flock, (held, fcntl.LOCK_UN)).start()
        started = time.monotonic()
        with writing(run, True, None, False):
            assert time.monotonic() - started >= 0.4
        fcntl.flock(held, fcntl.LOCK_SH)
        with pytest.raises(FaceAttrError, match="being read by faceattr predict for over"):
            _lock_from_readers(mine, run, patience=0.2)
        fcntl.flock(held, fcntl.LOCK_UN)
        fcntl.flock(held, fcntl.LOCK_EX)  # a writer: no waiting
        started = time.monotonic()
        with pytest.raises(FaceAttrError, match="being written by another faceattr train"):
            _lock_from_readers(mine, run)
        assert time.monotonic() - started < 1


def test_what_a_run_left_includes_predicts_report_section(tmp_path):
    """predict's report section is part of what a run left: a run whose run.json is gone
    would otherwise pass it to the next run in that folder as its own."""
    (tmp_path / "prediction").mkdir()
    (tmp_path / "prediction" / "prediction.json").write_text("{}")
    assert remains(tmp_path) == [tmp_path / "prediction" / "prediction.json"]


def test_run_paths_take_only_fold_k_folders(tmp_path):
    for name in ("fold_1", "fold_12", "fold_1_old", "fold_2.bak"):
        (tmp_path / name).mkdir()
    folds = sorted(p.name for p in run_paths(tmp_path) if p.name.startswith("fold_"))
    assert folds == ["fold_1", "fold_12"]


def test_a_run_json_with_no_folds_is_no_finished_run(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"status": "complete", "config": {"folds": 0}}))
    assert finished_run(tmp_path, []) is None
    (tmp_path / "run.json").write_text(json.dumps({"status": "complete", "config": {"folds": 2}}))
    assert finished_run(tmp_path, [1, 2])["config"]["folds"] == 2


def test_an_unfinished_replacement_is_kept_for_resume_when_the_old_run_is_tidied(tmp_path):
    (tmp_path / REPLACEMENT).mkdir()
    (tmp_path / REPLACEMENT / "run.json").write_text(
        json.dumps({"status": "running", "config": {"folds": 2}})
    )
    (tmp_path / ASIDE).mkdir()
    finish_replacing(tmp_path)
    assert (tmp_path / REPLACEMENT / "run.json").is_file()  # --resume continues it
    assert not (tmp_path / ASIDE).exists()


def test_what_a_run_left_includes_a_fold_models_json_alone(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "fold_1.json").write_text("{}")
    assert remains(tmp_path) == [tmp_path / "models" / "fold_1.json"]
