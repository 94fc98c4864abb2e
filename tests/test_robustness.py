"""Bad input gets one clear line, a non-zero exit and no output; work is never lost."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from conftest import assert_user_error, here, read_lines, train_args, write_image


def small_layout(root, labels=(0, 1, 0, 1, 1, 1, 0, 1, 1, 1), n_test=3):
    for i in range(1, len(labels) + 1):
        write_image(root / "train_img" / f"{i:06d}.jpg", (i * 20, 90, 160))
    for i in range(1, n_test + 1):
        write_image(root / "val_img" / f"{i:06d}.jpg", (i * 30, 80, 10))
    (root / "label_train.txt").write_text("".join(f"{v}\n" for v in labels))
    return root


def train(data, out, *extra):
    """A small `train`, in this process: these tests are about what it says and leaves behind."""
    return here(
        "train",
        str(data),
        "--out",
        str(out),
        "--folds",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--arch",
        "simple",
        *extra,
    )


BAD_DATA = {
    "missing image folder": (lambda d: shutil.rmtree(d / "train_img"), "train_img"),
    "empty image folder": (
        lambda d: [p.unlink() for p in (d / "train_img").iterdir()],
        "has no images",
    ),
    "missing label file": (lambda d: (d / "label_train.txt").unlink(), "label_train.txt"),
    "empty label file": (lambda d: (d / "label_train.txt").write_text(""), "is empty"),
    "label not 0/1": (
        lambda d: (d / "label_train.txt").write_text("0\n1\n2\n" + "1\n" * 7),
        "line 3: expected 0 or 1 (one label a line), found '2'",
    ),
    "more labels than images": (
        lambda d: (d / "label_train.txt").write_text("0\n1\n" * 6),
        "has 12 labels but",
    ),
    "gap in numbering": (
        lambda d: (d / "train_img" / "000004.jpg").rename(d / "train_img" / "000011.jpg"),
        "4 is missing",
    ),
    "duplicate number": (
        lambda d: shutil.copy(d / "train_img" / "000002.jpg", d / "train_img" / "2.jpg"),
        "both have number 2",
    ),
    "image named by no number": (
        lambda d: shutil.copy(d / "train_img" / "000002.jpg", d / "train_img" / "face.jpg"),
        "face.jpg: image name is not a number",
    ),
    "corrupt jpeg": (
        lambda d: (d / "train_img" / "000005.jpg").write_bytes(b"\xff\xd8\xff garbage"),
        "000005.jpg: cannot decode image",
    ),
    "truncated jpeg": (
        lambda d: (d / "train_img" / "000006.jpg").write_bytes(
            (d / "train_img" / "000006.jpg").read_bytes()[:300]
        ),
        "000006.jpg: cannot decode image",
    ),
    "only one class": (
        lambda d: (d / "label_train.txt").write_text("1\n" * 10),
        "only class 1 is present",
    ),
    "fewer examples than folds": (
        lambda d: (d / "label_train.txt").write_text("0\n" + "1\n" * 9),
        "class 0 has 1 image, fewer than the 2 folds",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_training_data(case, tmp_path):
    data = small_layout(tmp_path / "data")
    spoil, message = BAD_DATA[case]
    spoil(data)
    result = train(data, tmp_path / "run")
    assert_user_error(result, message)
    assert not (tmp_path / "run").exists()


def test_count_mismatch_names_both_counts(tmp_path):
    data = small_layout(tmp_path / "data")
    (data / "label_train.txt").write_text("0\n1\n" * 4)
    assert_user_error(train(data, tmp_path / "run"), "has 8 labels but", "has 10 images")


def test_zip_without_the_expected_folders(tmp_path):
    archive = tmp_path / "wrong.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("photos/1.jpg", b"x")
        z.writestr("notes.txt", "hi")
    assert_user_error(train(archive, tmp_path / "run"), "expected train_img/")
    assert not (tmp_path / "run").exists()


def test_unwritable_output_locations(tmp_path, dataset_dir, trained_run):
    data = small_layout(tmp_path / "data")
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    assert_user_error(train(data, blocker / "run"), "cannot write to")
    assert_user_error(here("explore", str(data), "--out", str(blocker / "ex")), "cannot write to")
    output = str(blocker / "label_val.txt")
    result = here("predict", str(dataset_dir), "--run", str(trained_run), "--output", output)
    assert_user_error(result, "cannot write to")


def test_accepted_with_warnings(tmp_path):
    data = small_layout(tmp_path / "data")
    (data / "label_train.txt").write_text(
        "0\r\n1\r\n0\r\n1\r\n1\r\n1\r\n0\r\n1\r\n1\r\n1\r\n\r\n\r\n"
    )
    (data / "train_img" / "notes.txt").write_text("not an image")
    write_image(data / "train_img" / "000003.jpg", 120, mode="L")
    (data / "train_img" / "000004.jpg").unlink()
    write_image(data / "train_img" / "000004.png", (1, 2, 3, 255), size=(90, 70), mode="RGBA")
    (data / "train_img" / "000005.jpg").rename(data / "train_img" / "000005.jpeg")
    result = train(data, tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert "CRLF" in result.stderr and "notes.txt: not an image" in result.stderr
    assert "1 image resized to 64x64, 2 converted to RGB" in result.stderr
    assert "Traceback" not in result.stderr


def test_skip_bad_drops_the_image_with_a_warning(tmp_path):
    data = small_layout(tmp_path / "data", labels=(0, 1) * 8)
    (data / "train_img" / "000005.jpg").write_bytes(b"\xff\xd8\xff garbage")
    assert_user_error(train(data, tmp_path / "r1"), "000005.jpg", "--skip-bad")
    result = train(data, tmp_path / "run", "--skip-bad")
    assert result.returncode == 0, result.stderr
    assert "leaving out 1 image(s)" in result.stderr and "000005.jpg" in result.stderr
    assert "names all" not in result.stderr  # the warning did
    summary = json.loads((tmp_path / "run" / "run.json").read_text())
    assert summary["n_train"] == 15
    assert "000005.jpg" not in (tmp_path / "run" / "oof.csv").read_text()
    (data / "train_img" / "000002.jpg").write_bytes(b"junk")
    result = train(data, tmp_path / "run", "--skip-bad", "--overwrite")
    assert "leaving out 2 image(s)" in result.stderr and "(and 1 more)" in result.stderr
    assert "run.json's audit.bad names all 2 images left out, and why" in result.stderr
    bad = json.loads((tmp_path / "run" / "run.json").read_text())["audit"]["bad"]
    assert [why.split(":")[0].rsplit("/")[-1] for why in bad.values()] == [
        "000002.jpg",
        "000005.jpg",
    ]
    for i in (1, 3, 7, 9, 11, 13):  # all of class 0 but 000015.jpg: too few for the folds
        (data / "train_img" / f"{i:06d}.jpg").write_bytes(b"junk")
    result = train(data, tmp_path / "r3", "--skip-bad")
    assert_user_error(result, "--skip-bad left out 8 images that cannot be decoded, and then "
                      "class 0 has 1 image, fewer than the 2 folds")  # fmt: skip
    for image in (data / "train_img").iterdir():  # none left to train on: said so, in one line
        image.write_bytes(b"junk")
    result = train(data, tmp_path / "r2", "--skip-bad")
    assert_user_error(result, "--skip-bad: none of the 16 training images could be decoded")
    assert not (tmp_path / "r2").exists()


def test_a_test_image_that_cannot_be_decoded_stops_predict(tmp_path, trained_run):
    data = small_layout(tmp_path / "data")
    (data / "val_img" / "000002.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "label_val.txt"
    result = here("predict", str(data), "--run", str(trained_run), "--output", str(out))
    assert_user_error(result, "000002.jpg: cannot decode image")
    assert "--skip-bad" not in result.stderr  # train's option: every test image needs a label
    assert "leaving out" not in result.stderr  # decoded for the cache: no warning before the error
    assert not out.exists() and not (tmp_path / "predictions.csv").exists()


def test_non_finite_loss_stops_with_the_epoch_and_step(tmp_path, dataset_dir):
    result = train(dataset_dir, tmp_path / "run", "--lr", "1e30", "--batch-size", "16")
    assert_user_error(
        result, "loss became infinite or NaN at epoch 1, step 2", "--lr", "--overwrite"
    )
    # As it says: another --lr over the stopped run, which --resume would refuse.
    assert train(dataset_dir, tmp_path / "run", "--batch-size", "16", "--overwrite").returncode == 0
    # One step an epoch: the loss is still finite, the outputs after it are not.
    result = train(small_layout(tmp_path / "data"), tmp_path / "run2", "--lr", "1e30")
    assert_user_error(result, "outputs became infinite or NaN at epoch 1 (after step 1)")
    # Within float32, but Adam's first step divides it by 1 - beta1 = 0.1: beyond.
    result = train(dataset_dir, tmp_path / "run3", "--lr", "3e38", "--optimizer", "adam")
    assert_user_error(result, "fold 1: a setting overflowed float32 at epoch 1", "--lr")


def test_existing_run_is_not_replaced_by_accident(tmp_path, trained_run):
    data = small_layout(tmp_path / "data")
    shutil.copytree(trained_run, tmp_path / "run")
    before = (tmp_path / "run" / "run.json").read_text()
    assert_user_error(train(data, tmp_path / "run"), "holds a finished run", "--overwrite")
    assert (tmp_path / "run" / "run.json").read_text() == before
    (tmp_path / "run" / "fold_notes.txt").write_text("mine")  # the user's, beside the run
    for name in ("fold_analysis", "fold_0", "fold_01"):  # not named as a run's fold folders
        (tmp_path / "run" / name).mkdir()
    (tmp_path / "run" / "fold_7").write_text("mine")  # a run writes folders there
    assert train(data, tmp_path / "run", "--overwrite").returncode == 0
    mine = ("fold_notes.txt", "fold_analysis", "fold_0", "fold_01", "fold_7")
    assert all((tmp_path / "run" / name).exists() for name in mine)
    assert_user_error(train(data, tmp_path / "other", "--resume"), "holds no run to continue")


def test_a_run_folder_never_takes_the_datas_place(tmp_path, monkeypatch):
    data = small_layout(tmp_path / "data")
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    archive = shutil.make_archive(str(tmp_path / "models" / "faces"), "zip", tmp_path, "data")
    # The run's pictures go to OUT/data/ and --overwrite clears it: here that is the dataset.
    for source, extra, message in (
        (data, [], "would put the run's data/ where the data is"),
        (data, ["--overwrite"], "choose another --out"),
        (archive, [], "the run's models/ where the data is"),
    ):
        code, err = in_process(
            "train", str(source), "--out", str(tmp_path), "--folds", "2", "-q", *extra
        )
        assert code == 2 and len(err) == 1 and message in err[0], err
    # Nor a run or explore's pictures in an image folder, where they would join the images.
    # train's among the test images too, which it does not read (they had been let in).
    for command, option, folder in (
        ("train", "--out", "train_img"),
        ("train", "--out", "val_img/run"),
        ("train", "--cache", "val_img/cache"),
        ("explore", "--out", "val_img/pictures"),
    ):
        folds = ["--folds", "2"] if command == "train" else []
        code, err = in_process(command, str(data), option, str(data / folder), "-q", *folds)
        assert code == 2 and len(err) == 1 and "is inside the image folder" in err[0], err
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
    assert not (tmp_path / "run.json").exists()
    # The seed's way, the label file in a folder of its own: a run's data/ must not be that one.
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    shutil.copytree(data / "train_img", project / "imgs")
    shutil.copy(data / "label_train.txt", project / "data" / "label.txt")
    monkeypatch.chdir(project)
    result = here("--mode=train", "--img_train_dir=imgs", "--labels_txt=data/label.txt",
                  "--save_dir=.", "--arch=simple", "--folds=2", "--epochs=1", seed=True)  # fmt: skip
    assert_user_error(result, "would put the run's data/ where the data is")
    assert sorted(p.name for p in (project / "data").iterdir()) == ["label.txt"]
    result = train(data, data)  # beside the data, not in place of it: fine
    assert result.returncode == 0, result.stderr


def test_resume_refuses_data_that_changed_and_trains_its_own_settings(tmp_path):
    labels = (0, 1, 0, 1, 1, 1, 0, 1, 1, 1)
    data = small_layout(tmp_path / "data", labels)
    assert train(data, tmp_path / "run").returncode == 0
    run_json = tmp_path / "run" / "run.json"
    summary = json.loads(run_json.read_text())
    run_json.write_text(json.dumps({**summary, "status": "running"}))  # as if killed
    # Same count and balance, two labels swapped: the folds would split differently.
    (data / "label_train.txt").write_text("".join(f"{v}\n" for v in (1, 0, *labels[2:])))
    result = here("train", str(data), "--out", str(tmp_path / "run"), "--resume")
    assert_user_error(result, "--resume: the labels or images changed since", "--overwrite")
    assert json.loads(run_json.read_text())["status"] == "running"  # left as it was
    (data / "label_train.txt").write_text("".join(f"{v}\n" for v in labels))
    # Two images of one size swapped: the names and sizes agree, the pixels do not.
    first, second = data / "train_img" / "000001.jpg", data / "train_img" / "000002.jpg"
    a, b = first.read_bytes(), second.read_bytes()
    assert len(a) == len(b) and a != b
    first.write_bytes(b), second.write_bytes(a)
    result = here("train", str(data), "--out", str(tmp_path / "run"), "--resume")
    assert_user_error(result, "--resume: the images decode to other pixels than", "--overwrite")
    first.write_bytes(a), second.write_bytes(b)
    # One file grown by a byte its decoder ignores: told by its size alone, before decoding.
    first.write_bytes(a + b"\0")
    result = here("train", str(data), "--out", str(tmp_path / "run"), "--resume")
    assert_user_error(result, "--resume: the labels or images changed since", "--overwrite")
    first.write_bytes(a)
    # A run.json that counts other images than the data has (hand-edited, or another run's):
    run_json.write_text(json.dumps({**summary, "status": "running", "n_train": 9}))
    result = here("train", str(data), "--out", str(tmp_path / "run"), "--resume")
    assert_user_error(result, "--resume: ", "was trained on 9 images, this data has 10")
    run_json.write_text(json.dumps({**summary, "status": "running"}))
    # Same data, but a split that is not the run's (as another scikit-learn might shuffle):
    folds_csv = tmp_path / "run" / "folds.csv"
    saved = folds_csv.read_text()
    folds_csv.write_text(saved.replace(",1\n", ",x\n").replace(",2\n", ",1\n").replace(",x", ",2"))
    result = here("train", str(data), "--out", str(tmp_path / "run"), "--resume")
    assert_user_error(result, "--resume: this data splits into other folds than", "--overwrite")
    folds_csv.unlink()
    result = here("train", str(data), "--out", str(tmp_path / "run"), "--resume")
    assert_user_error(result, "--resume: ", "folds.csv is missing", "--overwrite")
    folds_csv.write_text(saved)
    # Options that differ from the run's are refused, not dropped; the run's own are fine.
    resume = ["train", str(data), "--out", str(tmp_path / "run"), "--resume"]
    result = here(*resume, "--arch", "simple", "--epochs", "3", "--lr", "0.1", "--compile")
    assert_user_error(result, "--resume continues", "not --epochs 3 (the run's: 1), --lr 0.1")
    assert "--compile on (the run's: off)" in result.stderr
    assert "--arch" not in result.stderr and "--overwrite starts it again" in result.stderr
    result = here(*resume, "--arch", "simple", "--epochs", "1", "--workers", "1")
    assert result.returncode == 0, result.stderr
    # Its own settings, not the device's default recipe:
    assert "training simple, 2 folds x 1 epoch on cpu" in result.stderr


def test_an_empty_path_is_refused_not_taken_for_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where `--out ""` had put a run's files among the user's
    for args in (
        ["train", "data", "--out", ""],
        ["train", "data", "--cache", ""],
        ["explore", ""],
        ["predict", "data", "--model-dir", ""],  # had been a TypeError's traceback
        ["export", "run", "--onnx", ""],
        ["predict", "data", "--run", "run", "--output", ""],
        ["evaluate", "--pred", "p.txt", "--truth", "t.txt", "--scores", ""],
    ):
        result = here(*args)
        assert result.returncode == 2 and "an empty path" in result.stderr, (args, result.stderr)
    result = here("--mode=train", "--img_train_dir=x", "--labels_txt=y", "--save_dir=", seed=True)
    assert result.returncode == 2 and "argument --save_dir: an empty path" in result.stderr
    assert not any(tmp_path.iterdir())


def test_a_usage_error_is_one_line_that_points_to_help():
    """argparse's default prints its usage block before the message: a screenful for `train`."""
    for args, seed, line in (
        (
            ["train", "data", "--epochs", "x"],
            False,
            "faceattr train: error: argument --epochs: invalid int value: 'x'"
            " (see faceattr train --help)",
        ),
        ([], False, "faceattr: error: the following arguments are required: COMMAND"),
        (  # told by the command's parser, pointing to its help: it had pointed to faceattr's
            ["predict", "data", "--bogus"],
            False,
            "faceattr predict: error: unrecognized arguments: --bogus (see faceattr predict --help)",
        ),
        (["--mode=foo"], True, "main.py: error: argument --mode: invalid choice: 'foo'"),
    ):
        result = here(*args, seed=seed)
        err = result.stderr.splitlines()
        assert result.returncode == 2 and len(err) == 1 and line in err[0], (args, err)
        assert err[0].endswith("--help)") and not result.stdout
    assert here("train", "--help").returncode == 0  # the usage is still there on request


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are a POSIX thing")
def test_a_label_file_that_is_not_a_file_is_named_as_such(tmp_path):
    """A named pipe there had been opened and read: the command waited for a writer forever."""
    pipe, folder = small_layout(tmp_path / "pipe"), small_layout(tmp_path / "folder")
    (pipe / "label_train.txt").unlink()
    os.mkfifo(pipe / "label_train.txt")
    (folder / "label_train.txt").unlink()
    (folder / "label_train.txt").mkdir()
    for data in (pipe, folder):
        labels = data / "label_train.txt"
        for args, seed in (
            (["explore", str(data), "--out", str(tmp_path / "ex")], False),
            (
                [
                    "--mode=explore",
                    f"--img_train_dir={data / 'train_img'}",
                    f"--labels_txt={labels}",
                ],
                True,
            ),
            (["evaluate", "--pred", str(labels), "--truth", str(labels)], False),
        ):
            result = here(*args, seed=seed)
            err = result.stderr.splitlines()
            assert result.returncode == 2 and err == [
                f"faceattr: error: label file {labels} is not a file"
            ]
    result = here("explore", str(tmp_path / "none"), "--out", str(tmp_path / "ex"))
    assert result.stderr.strip().endswith("does not exist")


def test_a_file_name_with_a_newline_is_named_on_one_line(tmp_path):
    """Control characters in a name are written as escapes: one line, the terminal left as it was."""
    data = small_layout(tmp_path / "data")
    (data / "val_img" / "000002.jpg").rename(data / "val_img" / "00\n0002\x1b[31m.jpg")
    result = here("explore", str(data), "--out", str(tmp_path / "ex"), "--no-cache")
    assert result.stderr.splitlines() == [
        f"faceattr: error: {data / 'val_img'}/00\\n0002\\x1b[31m.jpg: image name is not a number"
    ]
    from faceattr.errors import printable

    assert printable("café\tmenu\u2028") == "café\\tmenu\\u2028"  # accents stay as they are


def test_a_negative_worker_count_is_refused(tmp_path):
    for command in ("train", "predict", "explore"):
        result = here(command, str(tmp_path), "--workers", "-3")
        assert result.returncode == 2, result.stderr
        assert "argument --workers: must be 0 (one per core) or more, got -3" in result.stderr


def test_a_file_where_a_run_folder_goes_is_refused_before_training(tmp_path):
    data = small_layout(tmp_path / "data")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "fold_2").write_text("mine")  # found only after training, it cost the run
    assert_user_error(train(data, tmp_path / "out"), "out/fold_2 is not a folder")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fold_2"]


def test_a_run_json_that_is_not_a_runs_is_one_line(tmp_path):
    data = small_layout(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    for text in (b'["x"]', b'{"status": "complete"}', b"\xff\xfe{"):
        (out / "run.json").write_bytes(text)
        for extra in ([], ["--resume"], ["--overwrite"]):
            assert_user_error(train(data, out, *extra), "run.json is")
    result = here("--mode=train", f"--img_train_dir={data / 'train_img'}",
                  f"--labels_txt={data / 'label_train.txt'}", f"--save_dir={out}",
                  "--arch=simple", "--folds=2", "--epochs=1", seed=True)  # fmt: skip
    assert_user_error(result, "run.json is")
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]
    # A later faceattr's run, with an option this one does not know, is not resumed half-read.
    (out / "run.json").unlink()  # not a run's, so not replaced even with --overwrite
    assert train(data, out).returncode == 0
    summary = json.loads((out / "run.json").read_text())
    summary["config"]["dropout"] = 0.5
    (out / "run.json").write_text(json.dumps({**summary, "status": "running"}))
    assert_user_error(train(data, out, "--resume"), "options this faceattr does not know: dropout")
    # Nor one whose settings were edited into what no option can give.
    del summary["config"]["dropout"]
    for key, value, message in (
        ("epochs", "40", "--epochs must be an integer, got '40'"),
        ("folds", None, "--folds must be an integer, got None"),
        ("lr", "fast", "--lr must be a number, got 'fast'"),
        ("pretrained", 3, "--pretrained must be a string or null, got 3"),
        ("tta", 1, "--tta must be true or false, got 1"),
        ("gamma", -1, "--gamma must be positive, got -1"),
    ):
        config = {**summary["config"], key: value}
        (out / "run.json").write_text(
            json.dumps({**summary, "status": "running", "config": config})
        )
        result = here("train", str(data), "--out", str(out), "--resume", "-q")
        assert_user_error(result, f"--resume: {out / 'run.json'} holds a setting that", message)
    result = here("train", str(data), "--out", str(out), "--resume", "--save-every", "-1")
    assert_user_error(result, "--save-every must be at least 0")  # the user's, not run.json's
    assert "run.json" not in result.stderr


def test_out_of_gpu_memory_is_one_line(capsys):
    import argparse

    import torch

    from faceattr.cli import run_command

    def boom(args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    args = argparse.Namespace(quiet=True, verbose=False, batch_size=512)
    assert run_command(boom, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["faceattr: error: out of GPU memory; try a smaller --batch-size (it is 512)"]


def test_resume_after_sigkill_gives_the_uninterrupted_result(dataset_dir, tmp_path):
    # The default recipe's optimiser and schedule (AdamW, cosine) on the simple CNN, whose
    # dropout draws from the generators too, 3 epochs: fold 2 saves its state after epochs 1
    # and 2, and is killed in the second or third.
    args = ["--arch", "simple", "--optimizer", "adamw", "--schedule", "cosine"]
    args += ["--weight-decay", "0.05", "--folds", "2", "--epochs", "3", "--batch-size", "16"]
    args += ["--device", "cpu"]
    args += ["--save-every", "0"]  # its epochs take under a second
    reference = tmp_path / "reference"
    result = here("train", str(dataset_dir), "--out", str(reference), *args)
    assert result.returncode == 0, result.stderr

    run = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "faceattr",
        "train",
        str(dataset_dir),
        "--out",
        str(run),
        *args,
        "-q",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = run / "fold_2" / "checkpoint.json"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert checkpoint.exists(), "training ended before fold 2 saved a checkpoint"
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    assert not (run / "models" / "fold_2.safetensors").exists()
    # What the killed process was writing when it died, under a name of its own:
    stale = run / "fold_2" / f".checkpoint.json.{process.pid}.0123abcd.tmp"
    stale.write_text("{")

    result = here("train", str(dataset_dir), "--out", str(run), "--resume")
    assert result.returncode == 0, result.stderr
    assert not stale.exists()
    assert "fold 1/2: finished before, kept" in result.stderr
    assert "fold 2: resuming after epoch" in result.stderr
    for fold in (1, 2):
        name = f"models/fold_{fold}.safetensors"
        assert (run / name).read_bytes() == (reference / name).read_bytes()
    assert (run / "oof.csv").read_text() == (reference / "oof.csv").read_text()
    assert not checkpoint.exists()
    assert json.loads((run / "run.json").read_text())["resumed"] == 1


def test_sigterm_unwinds_like_ctrl_c_and_the_run_resumes(dataset_dir, tmp_path):
    run = tmp_path / "run"
    options = ("--epochs", "4", "--save-every", "0")
    command = [sys.executable, "-m", "faceattr", *train_args(dataset_dir, run, *options)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "fold_1" / "checkpoint.json").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    process.terminate()  # SIGTERM, as a scheduler or `kill` sends
    stderr = process.communicate(timeout=60)[1]
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "faceattr: terminated" and "Traceback" not in stderr
    assert not list(run.rglob("*.tmp")) and not list(run.rglob(".*.tmp"))  # none half-written
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    result = here("train", str(dataset_dir), "--out", str(run), "--resume")
    assert result.returncode == 0 and "fold 1: resuming after epoch" in result.stderr


def test_seed_train_continues_an_interrupted_save_dir(dataset_dir, tmp_path, monkeypatch):
    train_dir, labels = dataset_dir / "train_img", dataset_dir / "label_train.txt"
    seed_args = [
        f"--img_train_dir={train_dir}",
        f"--labels_txt={labels}",
        "--epochs=2",
        "--save_dir=RUN",
        "--folds=2",
        "--batch_size=32",
        "--arch=simple",
    ]
    monkeypatch.chdir(tmp_path)  # --save_dir=RUN is relative, as the seed's commands were
    assert here("--mode=train", *seed_args, seed=True).returncode == 0
    summary = json.loads((tmp_path / "RUN" / "run.json").read_text())
    summary["status"] = "running"  # as if it had been killed after its last fold
    (tmp_path / "RUN" / "run.json").write_text(json.dumps(summary))
    result = here("--mode=train", *seed_args, seed=True)
    assert result.returncode == 0, result.stderr
    assert "finished before, kept" in result.stderr
    result = here("--mode=train", *seed_args, seed=True)  # finished: trained afresh
    assert result.returncode == 0 and "finished before" not in result.stderr
    assert len(read_lines(tmp_path / "RUN" / "folds.csv")) == 161
    # --resume given is faceattr's: a finished run is kept, never trained again.
    result = here("--mode=train", *seed_args, "--resume", seed=True)
    assert result.returncode == 0 and result.stderr.count("finished before, kept") == 2
    result = here("--mode=train", *seed_args, "--resume", "--overwrite", seed=True)
    assert result.returncode == 2 and "give one" in result.stderr.strip().splitlines()[-1]


def in_process(*args: str) -> tuple[int, list[str]]:
    """`faceattr ARGS` run here (see `here`): its exit code and stderr's lines."""
    result = here(*args)
    return result.returncode, result.stderr.strip().splitlines()


def predict(data, run, *options: str) -> tuple[int, list[str]]:
    return in_process("predict", str(data), "--run", str(run), "-q", *options)


def test_predict_refuses_impossible_options_before_writing(tmp_path, dataset_dir, trained_run):
    (tmp_path / "folder").mkdir()
    labels = str(tmp_path / "labels.txt")
    cases = {
        "is a folder; name the label file": ["--output", str(tmp_path / "folder")],
        "--output does not name a file": ["--output", str(tmp_path / "..")],
        "predictions.csv is the table written": ["--output", str(tmp_path / "predictions.csv")],
        "--threshold must be in [0, 1], got nan": ["--output", labels, "--threshold", "nan"],
        "--threshold must be in [0, 1], got 2.0": ["--output", labels, "--threshold", "2"],
        "--batch-size must be at least 1, got -5": ["--output", labels, "--batch-size", "-5"],
    }
    for message, options in cases.items():
        code, err = predict(dataset_dir, trained_run, *options)
        assert code == 2 and len(err) == 1 and message in err[0], err
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]


def test_predict_never_writes_over_its_inputs(tmp_path, trained_run):
    data, run = small_layout(tmp_path / "data"), tmp_path / "run"
    shutil.copytree(trained_run, run)
    os.mkfifo(tmp_path / "pipe")
    inputs = [data / "label_train.txt", data / "val_img" / "000001.jpg", data / "val_img" / "new.txt",
              data / "train_img" / "000001.jpg", data / "train_img" / "new.txt",
              run / "run.json", run / "models" / "labels.txt", run / "fold_1" / "labels.txt"]  # fmt: skip
    before = {p: p.read_bytes() for p in [*data.rglob("*.*"), *run.rglob("*.*")]}
    for output in inputs:
        code, err = predict(data, run, "--output", str(output))
        assert code == 2 and len(err) == 1 and "would overwrite or join an input" in err[0], err
    code, err = predict(data, run, "--output", str(tmp_path / "pipe"))
    assert code == 2 and "is not a regular file" in err[0]
    # The table beside the label file: over a zip of the test images that is named like it.
    (tmp_path / "zipped").mkdir()
    shutil.make_archive(str(tmp_path / "zipped" / "data"), "zip", data)
    zipped = (tmp_path / "zipped" / "data.zip").rename(tmp_path / "zipped" / "predictions.csv")
    code, err = predict(zipped, run, "--output", str(tmp_path / "zipped" / "labels.txt"))
    assert code == 2 and "predictions.csv written beside it would overwrite an input" in err[0]
    assert [p.name for p in zipped.parent.iterdir()] == ["predictions.csv"]
    assert {p: p.read_bytes() for p in [*data.rglob("*.*"), *run.rglob("*.*")]} == before
    # Beside the data, or in the run folder beside what train wrote: fine.
    for output in (data / "label_val.txt", run / "label_val.txt"):
        assert predict(data, run, "--output", str(output))[0] == 0
        assert len(read_lines(output)) == 3


def test_what_the_system_refuses_is_one_line(tmp_path, dataset_dir, trained_run):
    too_long = str(tmp_path / ("x" * 300 + ".txt"))  # a name over the file system's 255 bytes
    code, err = predict(dataset_dir, trained_run, "--output", too_long)
    assert code == 2 and len(err) == 1 and "File name too long" in err[0], err
    # 240 characters: long, but a name; its temporary file's must be too. Label file and table
    # are written together (the table had been written before the label file failed).
    long_name = tmp_path / "long" / ("L" * 240 + ".txt")
    code, err = predict(dataset_dir, trained_run, "--output", str(long_name))
    assert code == 0 and len(read_lines(long_name)) == 40, err
    assert sorted(p.name for p in long_name.parent.iterdir()) == [long_name.name, "predictions.csv"]


DAMAGED_RUNS = {
    "ensemble.json": [
        ('{"threshold": "abc"}', "threshold must be a number, got 'abc'"),
        ('{"threshold": null}', "threshold must be a number, got None"),
        ("[1, 2]", "does not hold the ensemble's settings"),
        (b"\xff\xfe{", "ensemble.json: 'utf-8' codec can't decode"),  # not UTF-8
        ('{"tta": "no"}', "tta must be true or false, got 'no'"),
        ('{"vote": "sofft"}', "vote must be one of majority, soft, got 'sofft'"),
        ('{"threshold": 1.5}', "threshold must be in [0, 1], got 1.5"),
        ('{"sha256": ["abc"]}', "sha256 must map folds to digests, got ['abc']"),
    ],
    "fold_1.json": [
        ("[1]", "fold_1.json does not hold a fold's settings"),
        ('{"arch": ["simple"]}', "fold_1.json: unknown model ['simple']"),  # the file named
        (b'{"arch": "\xe9"}', "cannot read"),  # Latin-1, not UTF-8
    ],
}


def test_a_damaged_run_is_one_line_and_writes_nothing(tmp_path, dataset_dir, trained_run):
    labels, run = tmp_path / "labels.txt", tmp_path / "run"

    def damaged(name: str, text: str | bytes | None) -> Path:
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(trained_run, run)
        if text is None:
            (run / "models" / name).unlink()
        else:
            (run / "models" / name).write_bytes(text if isinstance(text, bytes) else text.encode())
        return run

    def older_run() -> None:
        """The run as one from before train chose a threshold and wrote ensemble.json."""
        damaged("ensemble.json", None)
        summary = json.loads((run / "run.json").read_text())
        del summary["threshold"]
        (run / "run.json").write_text(json.dumps(summary))

    for name, cases in DAMAGED_RUNS.items():
        for text, message in cases:
            code, err = predict(dataset_dir, damaged(name, text), "--output", str(labels))
            assert code == 2 and len(err) == 1 and message in err[0], (text, err)
    # A finished run that lost its ensemble.json (and with it the models' sha256): its run.json
    # holds the threshold train chose, so the file was there. It had voted at 0.5 with a warning.
    damaged("ensemble.json", None)
    code, err = predict(dataset_dir, run, "--output", str(labels))
    assert code == 2 and len(err) == 1 and "ensemble.json is missing (its threshold" in err[0], err
    assert err[0].endswith(f"faceattr train DATA --out {run} --resume writes it again"), err
    older_run()  # an older run: it votes at its folds' own threshold
    (run / "models" / "fold_1.json").write_text('{"arch": "simple", "threshold": "x"}')
    code, err = predict(dataset_dir, run, "--output", str(labels))
    assert code == 2 and "fold_1.json: threshold must be a number, got 'x'" in err[0]
    # One model short, the ensemble would not be the one its threshold was chosen for.
    code, err = predict(dataset_dir, damaged("fold_2.safetensors", None), "--output", str(labels))
    assert code == 2 and "fold_2.safetensors is missing" in err[0]
    (run / "models" / "fold_2.json").unlink()  # both of its files gone: the ensemble lists it
    code, err = predict(dataset_dir, run, "--output", str(labels))
    assert code == 2 and "lists folds [1, 2]: fold_2.safetensors is missing" in err[0], err
    # An older run, whose ensemble.json did not list them: its run.json says how many there are.
    older_run()
    for name in ("fold_2.safetensors", "fold_2.json"):
        (run / "models" / name).unlink()
    code, err = predict(dataset_dir, run, "--output", str(labels))
    assert code == 2 and "run.json trained folds [1, 2]: fold_2.safetensors is missing" in err[0]
    # A run still training, or interrupted: its folds so far are not the ensemble it will choose
    # a threshold for, and neither predict nor export takes them at 0.5.
    summary = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**summary, "status": "running"}))
    unfinished = f"{run} holds a run that has not finished (1 of 2 fold models"
    code, err = predict(dataset_dir, run, "--output", str(labels))
    assert code == 2 and len(err) == 1 and unfinished in err[0] and "--resume" in err[0], err
    code, err = in_process("export", str(run), "--onnx", str(tmp_path / "onnx"))
    assert code == 2 and unfinished in err[0] and not (tmp_path / "onnx").exists(), err
    # Beside an interrupted replacement, --resume finishes that one: said so.
    (run / ".replacement").mkdir()
    (run / ".replacement" / "run.json").write_text(json.dumps(summary))
    code, err = predict(dataset_dir, run, "--output", str(labels))
    assert code == 2 and len(err) == 1 and unfinished in err[0], err
    assert "an interrupted --overwrite left the run to replace it" in err[0]
    assert err[0].endswith("--resume finishes that"), err
    (run / ".replacement" / "run.json").write_text("{")  # unreadable: --resume would refuse it
    code, err = predict(dataset_dir, run, "--output", str(labels))
    assert code == 2 and err[0].endswith("--resume finishes it"), err
    shutil.rmtree(run / ".replacement")
    assert not labels.exists() and not (tmp_path / "predictions.csv").exists()
    # A hand-assembled folder of fold models, no run around it, votes with those it holds.
    shutil.copytree(run / "models", tmp_path / "models")
    assembled = tmp_path / "assembled" / "labels.txt"
    code, err = in_process("predict", str(dataset_dir), "--model-dir", str(tmp_path / "models"),
                           "-q", "--output", str(assembled))  # fmt: skip
    assert code == 0 and assembled.exists(), err
    assert len(err) == 1 and "holds no ensemble.json" in err[0] and "at threshold" in err[0], err
    assert not labels.exists() and not (tmp_path / "predictions.csv").exists()
    # Its run.json lost, a run with a fold half-trained is still seen to be unfinished.
    (run / "run.json").unlink()
    (run / "fold_2" / "checkpoint.json").write_text("{}")
    code, err = predict(dataset_dir, run, "--output", str(labels))
    assert code == 2 and "has not finished (a fold's checkpoint is there)" in err[0], err
    # Fold models copied to another folder of a finished run: theirs, not the run's models/.
    damaged("ensemble.json", None)
    (run / "models_copy").mkdir()
    for fold_file in (run / "models").glob("fold_*"):
        shutil.copy(fold_file, run / "models_copy")
    code, err = in_process("predict", str(dataset_dir), "--model-dir", str(run / "models_copy"),
                           "-q", "--output", str(assembled))  # fmt: skip
    assert code == 0 and len(err) == 1 and "holds no ensemble.json" in err[0], err


def test_a_damaged_run_json_costs_the_report_not_the_labels(tmp_path, dataset_dir, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "run.json").write_text("[]")
    labels = tmp_path / "labels.txt"
    code, err = in_process("predict", str(dataset_dir), "--run", str(run), "--output", str(labels))
    assert code == 0 and len(read_lines(labels)) == 40
    assert any("report was not updated" in line for line in err)
    for text in ("[]", '{"status": "complete"}'):
        (run / "run.json").write_text(text)
        code, err = in_process("report", str(run))
        assert code == 2 and len(err) == 1 and "lacks what a report needs" in err[0], err
    (run / "run.json").write_bytes(b'{"status": "compl\xe9te"}')  # Latin-1, not UTF-8
    code, err = in_process("report", str(run))
    assert code == 2 and len(err) == 1 and "is not a faceattr run folder" in err[0], err
    code, err = in_process("predict", str(dataset_dir), "--run", str(run), "--output", str(labels))
    assert code == 0 and any("report was not updated" in line for line in err), err
    # A run folder predict cannot write into (read-only, or in its way a file) costs the same.
    shutil.rmtree(run / "prediction", ignore_errors=True)
    (run / "prediction").write_text("in the way")
    labels.unlink()
    code, err = in_process("predict", str(dataset_dir), "--run", str(run), "--output", str(labels))
    assert code == 0 and len(read_lines(labels)) == 40, err
    assert any("report was not updated" in line for line in err), err


def test_a_weights_file_torch_cannot_read_is_one_line(tmp_path, dataset_dir):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint" * 10)
    options = ["--arch", "resnet18", "--pretrained", str(garbage), "-q"]
    code, err = in_process("train", str(dataset_dir), "--out", str(tmp_path / "run"), *options)
    assert code == 2 and len(err) == 1 and "cannot read pretrained weights" in err[0], err
    assert not (tmp_path / "run").exists()


def test_ctrl_c_while_torch_loads_is_one_line(capsys):
    from faceattr.cli import parse

    def loading_torch():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        parse(loading_torch, ["train", "data"])
    assert e.value.code == 130 and capsys.readouterr().err == "faceattr: interrupted\n"
    # ...and the command's module loads without torch, so that is where torch loads.
    code = "import sys, faceattr.cli, faceattr.seed; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
        == "False\n"
    )


def test_demo_sizes_it_cannot_split_are_refused_before_writing(tmp_path):
    for options in (["--n-train", "5"], ["--n-train", "-5"], ["--n-test", "0"], ["--n-test", "1"]):
        code, err = in_process("demo", "--out", str(tmp_path / "demo"), *options)
        assert code == 2 and len(err) == 1 and "the demo needs --n-train 50 or more" in err[0]
    assert not (tmp_path / "demo").exists()
    # A folder it did not make may hold the user's data or run: the demo writes nothing there.
    mine = small_layout(tmp_path / "mine" / "data")
    before = sorted(p.relative_to(mine) for p in mine.rglob("*"))
    code, err = in_process("demo", "--out", str(tmp_path / "mine"), "--n-train", "60")
    assert code == 2 and len(err) == 1 and "already holds files the demo did not make" in err[0]
    assert sorted(p.relative_to(mine) for p in mine.rglob("*")) == before
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["data"]
    (tmp_path / "notes.txt").write_text("mine")
    code, err = in_process("demo", "--out", str(tmp_path / "notes.txt"), "--n-train", "60")
    assert (
        code == 2
        and "notes.txt is a file" in err[0]
        and (tmp_path / "notes.txt").read_text() == "mine"
    )


def test_a_small_synthetic_part_holds_both_classes(tmp_path):
    from faceattr.synthetic import make_dataset

    for n in range(2, 8):  # at 12 %, a few faces often draw no glasses or hat at all
        truth = make_dataset(tmp_path / str(n), n_train=n, n_test=n, seed=n)
        assert set(truth.tolist()) == {0, 1}
        assert set(read_lines(tmp_path / str(n) / "label_train.txt")) == {"0", "1"}


def test_evaluate_needs_both_classes_and_probabilities(tmp_path):
    (tmp_path / "pred.txt").write_text("0\n1\n1\n")
    (tmp_path / "one_class.txt").write_text("1\n1\n1\n")
    (tmp_path / "truth.txt").write_text("0\n1\n1\n")
    rows = ["image,soft_score,soft_label,label", "1,0.1,0,0", "2,nan,1,1", "3,0.9,1,1"]
    (tmp_path / "predictions.csv").write_text("\n".join(rows) + "\n")
    pred = ["evaluate", "--pred", str(tmp_path / "pred.txt")]
    code, err = in_process(*pred, "--truth", str(tmp_path / "one_class.txt"))
    assert code == 2 and "holds label 1 only: HTER weighs both classes" in err[0]
    scores = ["--scores", str(tmp_path / "predictions.csv"), "--plots", str(tmp_path / "plots")]
    code, err = in_process(*pred, "--truth", str(tmp_path / "truth.txt"), *scores)
    assert code == 2 and "soft_score must be probabilities in [0, 1]" in err[0]
    assert not (tmp_path / "plots").exists()
