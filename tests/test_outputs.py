import errno
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from faceattr.errors import FaceAttrError
from faceattr.outputs import (
    atomic_path,
    check_writable,
    ensure_writable_dir,
    stale_temporaries,
    write_csv,
    write_json,
    write_text,
    write_together,
)


def test_an_interrupted_write_leaves_the_old_file_whole(tmp_path):
    target = tmp_path / "label_val.txt"
    write_text(target, "0\n1\n")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("1\n")  # half of the new content...
        raise KeyboardInterrupt  # ...then the user presses Ctrl-C
    assert target.read_text() == "0\n1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["label_val.txt"]  # no temporary left over


def test_a_new_file_appears_only_when_complete(tmp_path):
    target = tmp_path / "sub" / "run.json"
    with pytest.raises(RuntimeError), atomic_path(target):
        raise RuntimeError("crash")
    assert not target.exists()
    write_json(target, {"a": 1})
    assert target.read_text() == '{\n  "a": 1\n}\n'


def test_csv_format(tmp_path):
    write_csv(tmp_path / "t.csv", ["image", "score"], [["1.jpg", 0.25], ["2.jpg", 1]])
    assert (tmp_path / "t.csv").read_text() == "image,score\n1.jpg,0.25\n2.jpg,1\n"


def test_csv_scores_read_back_exactly(tmp_path):
    # A float32 probability just under 1, and two scores either side of a threshold of 0.4123455:
    # 6 significant digits made them "1", "0.412345" and "0.412346".
    scores = [float(np.float32(0.99999994)), 0.41234549999, 0.4123455, np.float64(1e-9)]
    scores.append(np.float32(0.3))  # not a float: written as the float64 it widens to
    write_csv(tmp_path / "t.csv", ["score"], [[s] for s in scores])
    read = [float(line) for line in (tmp_path / "t.csv").read_text().split()[1:]]
    assert read == scores and read[0] < 1


def test_check_writable(tmp_path):
    check_writable(tmp_path / "new" / "deeper")  # not there yet: its parent decides
    (tmp_path / "file").write_text("x")
    with pytest.raises(FaceAttrError, match="is not a folder"):
        check_writable(tmp_path / "file" / "run")
    with pytest.raises(FaceAttrError, match="file: it is not a folder"):
        ensure_writable_dir(tmp_path / "file")  # not "File exists"
    with (
        pytest.raises(FaceAttrError, match="file: it is not a folder"),
        atomic_path(tmp_path / "file" / "roc.png"),
    ):
        pass


def test_outputs_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_text(tmp_path / "label_val.txt", "1\n")
        # safetensors' save_file makes its file anew, readable by its owner only:
        weights = tmp_path / "fold_1.safetensors"
        with atomic_path(weights) as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(weights.stat().st_mode) == 0o644


def test_files_written_together_land_together(tmp_path, monkeypatch):
    labels, table = tmp_path / "label_val.txt", tmp_path / "predictions.csv"
    write_together({labels: "1\n", table: "x\n"})
    assert labels.read_text() == "1\n" and table.read_text() == "x\n"
    replace = os.replace

    def full_disk(src, dst):
        if Path(dst) == labels:  # renamed first: the one a user named
            raise OSError(28, "No space left on device")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(FaceAttrError, match=r"cannot write .*label_val.txt: No space left"):
        write_together({labels: "0\n", table: "y\n"})  # named: a write's OSError names none
    assert labels.read_text() == "1\n" and table.read_text() == "x\n"  # neither
    assert sorted(p.name for p in tmp_path.iterdir()) == ["label_val.txt", "predictions.csv"]
    monkeypatch.setattr(os, "replace", replace)
    # The disk full while the table is written (the first of the two, as it happens), or any
    # other: nothing is renamed before both are written.
    write = Path.write_text

    def full_on_the_table(self, text, **kwargs):
        if "predictions.csv" in self.name:
            raise OSError(28, "No space left on device")
        return write(self, text, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_on_the_table)
    with pytest.raises(FaceAttrError, match=r"cannot write .*predictions.csv: No space left"):
        write_together({labels: "0\n", table: "y\n"})
    assert labels.read_text() == "1\n" and table.read_text() == "x\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["label_val.txt", "predictions.csv"]
    # An OSError that names its file is not the target's: it goes on as it is.
    monkeypatch.setattr(Path, "write_text", write)
    with pytest.raises(FileNotFoundError), atomic_path(labels):
        (tmp_path / "no such input").read_text()


def test_a_write_that_fails_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    write_json(target, {"status": "complete"})

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_json(target, {"status": "running"})
    assert target.read_text() == '{\n  "status": "complete"\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_a_killed_writers_temporaries_are_told_from_a_running_ones(tmp_path):
    import subprocess
    import sys

    from faceattr.outputs import stale_temporaries

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    dead = tmp_path / "models" / f".fold_1.json.{ended.stdout.strip()}.0123abcd.tmp"
    alive = tmp_path / f".run.json.{os.getpid()}.0123abcd.tmp"  # this process writes it now
    for path in (dead, alive, tmp_path / ".notes.tmp", tmp_path / "x.12.ab.tmp"):
        path.parent.mkdir(exist_ok=True)
        path.write_text("")
    assert stale_temporaries(tmp_path) == [dead]


def test_a_full_disk_that_names_another_file_goes_on_as_it_is(tmp_path):
    with pytest.raises(OSError) as raised, atomic_path(tmp_path / "labels.txt"):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "cache.npy"))
    assert raised.value.filename == str(tmp_path / "cache.npy")
    assert not (tmp_path / "labels.txt").exists()


def test_csv_writes_a_float32_as_the_float64_it_widens_to(tmp_path):
    write_csv(tmp_path / "t.csv", ["score"], [[np.float32(0.3)]])
    text = (tmp_path / "t.csv").read_text()
    assert text == f"score\n{float(np.float32(0.3))!r}\n" and text != "score\n0.3\n"


def test_temporaries_of_other_dotted_names_are_left_alone(tmp_path):
    (tmp_path / ".my.notes.v2.tmp").write_text("")  # four parts, no pid among them
    assert stale_temporaries(tmp_path) == []


def test_another_users_writer_counts_as_running(tmp_path, monkeypatch):
    (tmp_path / ".run.json.1.0123abcd.tmp").write_text("")

    def not_yours(pid, sig):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "kill", not_yours)
    assert stale_temporaries(tmp_path) == []


def test_a_folder_without_write_permission_is_refused(tmp_path, monkeypatch):
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: not mode & os.W_OK and real(p, mode))
    with pytest.raises(FaceAttrError, match="permission denied"):
        check_writable(tmp_path / "run")


def test_json_takes_numpy_scalars_and_paths(tmp_path):
    write_json(tmp_path / "a.json", {"t": np.float32(0.5), "n": np.int64(3), "p": Path("x/y")})
    assert json.loads((tmp_path / "a.json").read_text()) == {"t": 0.5, "n": 3, "p": "x/y"}
