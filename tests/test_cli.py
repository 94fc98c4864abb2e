"""The commands end to end, as subprocesses, the way a user runs them.

A command's refusals, once one is seen from a real process, are checked in this one (`here`).
"""

import csv
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

from conftest import assert_user_error, cli, here, labels_of, read_lines, seed_main
from faceattr.models import weights_file


def test_explore(dataset_dir, tmp_path):
    result = cli("explore", str(dataset_dir), "--out", str(tmp_path / "ex"))
    assert result.returncode == 0, result.stderr
    assert "training images: 160" in result.stdout and "imbalanced" in result.stdout
    assert json.loads((tmp_path / "ex" / "explore.json").read_text())["n_test"] == 40


def test_train_prints_the_oof_hter(trained_run):
    summary = json.loads((trained_run / "run.json").read_text())
    assert summary["status"] == "complete" and summary["environment"]["device"] == "cpu"
    printed = (trained_run.parent / "train.out").read_text()
    oof, (low, high) = summary["oof"], summary["oof"]["hter_ci"]
    assert (
        f"out-of-fold HTER {100 * oof['hter']:.2f} % (95 % CI {100 * low:.2f} % to "
        f"{100 * high:.2f} %" in printed
    ), printed
    assert f"at threshold {summary['threshold']:.4f} over 160 images" in printed
    assert f"{100 * summary['oof_nested']['hter']:.2f} % with each fold's threshold" in printed


def test_predict_writes_one_label_per_test_image_and_the_table(trained_run, dataset_dir, tmp_path):
    out = tmp_path / "out" / "label_val.txt"
    result = cli(
        "predict",
        str(dataset_dir),
        "--run",
        str(trained_run),
        "--output",
        str(out),
        "--device",
        "cpu",
        "--vote",
        "majority",
    )
    assert result.returncode == 0, result.stderr
    settings = json.loads((trained_run / "models" / "ensemble.json").read_text())
    threshold = settings["threshold"]
    assert f"40 images, 2 models, majority vote at threshold {threshold:.4f}" in result.stdout
    lines = read_lines(out)
    assert len(lines) == 40 and set(lines) <= {"0", "1"}
    rows = list(csv.DictReader((out.parent / "predictions.csv").open()))
    assert list(rows[0]) == [
        "image",
        "score_1",
        "score_2",
        "vote_1",
        "vote_2",
        "soft_score",
        "soft_label",
        "majority_share",
        "majority_label",
        "label",
    ]
    assert [r["image"] for r in rows] == [f"{i:06d}.jpg" for i in range(1, 41)]
    assert [r["label"] for r in rows] == lines == [r["majority_label"] for r in rows]
    for r in rows:
        votes = [int(r["vote_1"]), int(r["vote_2"])]
        assert votes == [float(r["score_1"]) >= threshold, float(r["score_2"]) >= threshold]
        assert float(r["majority_share"]) == sum(votes) / 2
        if votes[0] == votes[1]:
            assert int(r["label"]) == votes[0]
        assert int(r["soft_label"]) == (float(r["soft_score"]) >= threshold)


def test_predict_imports_none_of_what_only_training_and_decoding_use():
    # torchvision (~2 s with the torch._dynamo it imports), scikit-learn and scipy (~1.5 s):
    # a predict on cached images of a model that is no ResNet uses none of them.
    code = (
        "import sys, faceattr.cli, faceattr.predict; "
        "print(sorted(m for m in ('torchvision', 'sklearn', 'scipy') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result


def test_predict_soft_vote_from_a_zip_and_from_a_bare_folder(trained_run, dataset_dir, tmp_path):
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted((dataset_dir / "val_img").iterdir()):
            z.write(p, f"top/val_img/{p.name}")
    soft = tmp_path / "soft.txt"
    result = cli(
        "predict", str(archive), "--model-dir", str(trained_run / "models"), "--output", str(soft)
    )
    assert result.returncode == 0, result.stderr
    assert "soft vote at threshold" in result.stdout and "mirrored" in result.stdout
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    for r in rows:
        mean = (float(r["score_1"]) + float(r["score_2"])) / 2
        assert abs(float(r["soft_score"]) - mean) < 1e-5
        assert r["label"] == r["soft_label"]
    bare = tmp_path / "bare.txt"
    result = here(
        "predict", str(dataset_dir / "val_img"), "--run", str(trained_run), "--output", str(bare)
    )
    assert result.returncode == 0, result.stderr
    assert read_lines(bare) == read_lines(soft)
    plain = tmp_path / "plain" / "label_val.txt"
    result = here(
        "predict",
        str(dataset_dir),
        "--run",
        str(trained_run),
        "--output",
        str(plain),
        "--threshold",
        "0.5",
        "--no-tta",
    )
    assert result.returncode == 0, result.stderr
    assert "threshold 0.5000:" in result.stdout
    untta = list(csv.DictReader((plain.parent / "predictions.csv").open()))
    assert any(a["score_1"] != b["score_1"] for a, b in zip(rows, untta, strict=True))


def test_predict_follows_the_runs_vote_unless_told(trained_run, dataset_dir, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for f in (trained_run / "models").iterdir():
        (models / f.name).write_bytes(f.read_bytes())
    settings = json.loads((models / "ensemble.json").read_text())
    (models / "ensemble.json").write_text(json.dumps({**settings, "vote": "majority"}))
    for given, rule in (((), "majority"), (("--vote", "soft"), "soft")):
        out = tmp_path / rule / "label_val.txt"
        args = ("predict", str(dataset_dir), "--model-dir", str(models), "--output", str(out))
        result = here(*args, *given)
        assert result.returncode == 0, result.stderr
        assert f"{rule} vote at threshold" in result.stdout
        rows = list(csv.DictReader((out.parent / "predictions.csv").open()))
        assert [r["label"] for r in rows] == [r[f"{rule}_label"] for r in rows]


def test_evaluate(dataset_dir, tmp_path):
    truth = dataset_dir.parent / "truth_val.txt"
    pred = tmp_path / "pred.txt"
    flipped = 1 - labels_of(truth)
    pred.write_text("".join(f"{v}\n" for v in flipped))
    result = cli("evaluate", "--pred", str(pred), "--truth", str(truth))
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["hter"] == 1.0 and metrics["n"] == 40 and metrics["hter_ci"] == [1.0, 1.0]
    pred.write_text("".join(f"{v}\n" for v in [1 - flipped[0], *flipped[1:]]))
    low, high = json.loads(here("evaluate", "--pred", str(pred), "--truth", str(truth)).stdout)[
        "hter_ci"
    ]
    assert low < 1.0 and high == 1.0
    # The truth given as its own prediction, by a link too: an HTER of 0, but a warning.
    (tmp_path / "link.txt").symlink_to(truth)
    for same in (truth, tmp_path / "link.txt"):
        result = here("evaluate", "--pred", str(same), "--truth", str(truth))
        assert result.returncode == 0 and json.loads(result.stdout)["hter"] == 0.0
        assert "--pred and --truth are the same file" in result.stderr
    assert "same file" not in here("evaluate", "--pred", str(pred), "--truth", str(truth)).stderr
    pred.write_text("1\n0\n")
    assert_user_error(
        here("evaluate", "--pred", str(pred), "--truth", str(truth)), "has 2 lines but", "has 40"
    )
    # --plots or --images without --scores: nothing to draw, which had gone without a word.
    for given in (["--plots", str(tmp_path / "ev")], ["--images", str(dataset_dir)]):
        result = here("evaluate", "--pred", str(pred), "--truth", str(truth), *given)
        assert_user_error(result, f"{given[0]}: there are plots only with --scores")
    assert not (tmp_path / "ev").exists()
    # The decoding options without --images: nothing to decode.
    given = ["--workers", "1", "--cache", str(tmp_path / "c"), "--no-cache"]
    result = here("evaluate", "--pred", str(pred), "--truth", str(truth), *given)
    assert_user_error(result, "--workers, --cache and --no-cache: only --images")
    for workers in ("2", "0"):  # 0: one per core, given all the same
        result = here("evaluate", "--pred", str(pred), "--truth", str(truth), "--workers", workers)
        assert_user_error(
            result, "--workers: only --images (the test images, for the worst errors)"
        )
    # --scores that is no file: a named pipe had waited for a writer forever.
    os.mkfifo(tmp_path / "fifo")
    pred.write_text("".join(f"{v}\n" for v in flipped))
    for scores, said in ((tmp_path / "fifo", "is not a file"), (tmp_path / "no", "does not exist")):
        result = here(
            "evaluate", "--pred", str(pred), "--truth", str(truth), "--scores", str(scores)
        )
        assert_user_error(result, f"--scores {scores} {said}")


def test_evaluate_a_labelled_test_set_with_pictures(trained_run, dataset_dir, tmp_path):
    out = tmp_path / "label_val.txt"
    result = here("predict", str(dataset_dir), "--run", str(trained_run), "--output", str(out))
    assert result.returncode == 0, result.stderr
    truth = dataset_dir.parent / "truth_val.txt"
    evaluate = ["evaluate", "--pred", str(out), "--truth", str(truth)]
    evaluate += ["--scores", str(tmp_path / "predictions.csv"), "--images", str(dataset_dir)]
    for folder in ("val_img", "train_img"):  # a picture in train_img/ would join its images
        result = here(*evaluate, "--plots", str(dataset_dir / folder))
        assert_user_error(result, "--plots", "is inside the image folder")
    result = cli(
        "evaluate",
        "--pred",
        str(out),
        "--truth",
        str(truth),
        "--scores",
        str(tmp_path / "predictions.csv"),
        "--plots",
        str(tmp_path / "ev"),
        "--images",
        str(dataset_dir),
        *("--no-cache", "--workers", "1", "-q"),  # it decodes, as explore does
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert {"hter", "hter_ci", "auc", "eer"} <= metrics.keys()
    names = sorted(p.name for p in (tmp_path / "ev").iterdir())
    assert names == [
        "confusion.png",
        "roc_det.png",
        "scores.png",
        "threshold.png",
        "worst_errors.png",
    ]
    assert "differs from the soft vote" not in result.stderr
    # A label file that is not the one predict wrote with the table: refused.
    other = tmp_path / "other.txt"
    lines = read_lines(out)
    other.write_text("".join(f"{v}\n" for v in [1 - int(lines[0]), *map(int, lines[1:])]))
    table = str(tmp_path / "predictions.csv")
    result = here("evaluate", "--pred", str(other), "--truth", str(truth), "--scores", table,
                  "--plots", str(tmp_path / "ev2"))  # fmt: skip
    assert_user_error(result, "is not the label file predict wrote with", "differ on 1 of 40")
    assert not (tmp_path / "ev2").exists()


def test_user_errors_are_one_line_and_leave_no_output(dataset_dir, trained_run, tmp_path):
    assert_user_error(cli("explore", str(tmp_path / "missing")), "does not exist")
    assert_user_error(
        here("train", str(tmp_path / "missing"), "--out", str(tmp_path / "r")), "does not exist"
    )
    assert not (tmp_path / "r").exists()
    out = tmp_path / "label_val.txt"
    assert_user_error(
        here("predict", str(dataset_dir), "--run", str(tmp_path / "norun"), "--output", str(out)),
        "does not exist",
    )
    assert_user_error(here("predict", str(dataset_dir), "--output", str(out)), "--run")
    assert not out.exists()
    deep = tmp_path / "new" / "sub" / "label_val.txt"  # its folders are made only to be written
    assert_user_error(
        here("predict", str(dataset_dir), "--run", str(tmp_path / "norun"), "--output", str(deep)),
        "does not exist",
    )
    assert not (tmp_path / "new").exists()
    result = here("train", str(dataset_dir), "--out", str(tmp_path / "r"), "--folds", "500")
    assert_user_error(result, "fewer than the 500 folds")
    assert len(result.stderr.splitlines()) == 1  # not after "training ...", as it had been
    # The folds are checked before --out, whose check looks at every fold's folder in turn.
    (tmp_path / "r2").mkdir()
    (tmp_path / "r2" / "fold_1").write_text("a file where a fold's folder goes")
    result = here("train", str(dataset_dir), "--out", str(tmp_path / "r2"), "--folds", "500")
    assert_user_error(result, "fewer than the 500 folds")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_asking_for_cuda_without_a_gpu(dataset_dir, tmp_path):
    result = here("train", str(dataset_dir), "--device", "cuda", "--out", str(tmp_path / "r"))
    assert_user_error(result, "no CUDA GPU")
    assert not (tmp_path / "r").exists()


def test_seed_commands_end_to_end(dataset_dir, tmp_path, monkeypatch):
    train_dir, labels = dataset_dir / "train_img", dataset_dir / "label_train.txt"
    test_dir = dataset_dir / "val_img"
    # Run where the seed's relative folders land; `python main.py` itself runs for train.
    monkeypatch.chdir(tmp_path)
    result = here(
        "--mode=explore",
        f"--img_train_dir={train_dir}",
        f"--labels_txt={labels}",
        f"--img_test_dir={test_dir}",
        seed=True,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "explore" / "explore.json").exists() and "label 0:" in result.stdout
    assert "wrote explore/explore.json and its pictures" in result.stdout
    result = seed_main(
        "--mode=train",
        f"--img_train_dir={train_dir}",
        f"--labels_txt={labels}",
        "--epochs=1",
        "--lr=0.001",
        "--step=5",
        "--gamma=0.7",
        "--save_dir=RUN",
        "--folds=2",
        "--out=elsewhere",  # faceattr train's run folder flag, not the seed's: a warning
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "out-of-fold HTER" in result.stdout
    assert "warning: --step and --gamma shape the step schedule only" in result.stderr
    assert "warning: --out is --mode=explore's folder: the run goes to --save_dir=RUN" in (
        result.stderr
    )
    assert not (tmp_path / "elsewhere").exists()
    run = json.loads((tmp_path / "RUN" / "run.json").read_text())  # the CPU's default recipe
    assert (run["config"]["arch"], run["config"]["lr"]) == ("efficientnet_lite0", 0.001)
    assert run["pretrained_file"] == str(weights_file("efficientnet_lite0", "imagenet"))
    result = here("--mode=test", f"--img_test_dir={test_dir}", "--model_dir=RUN/models", seed=True)
    assert result.returncode == 0, result.stderr
    assert len(read_lines(tmp_path / "label_val.txt")) == 40
    assert (tmp_path / "predictions.csv").exists()
    assert_user_error(here("--mode=test", "--model_dir=RUN/models", seed=True), "--img_test_dir")
    # --save_dir names the models as train's does; the training flags copied along, a warning.
    given = ["--save_dir=RUN", "--output=again.txt", "--epochs=15", "--lr=0.001"]
    result = here("--mode=test", f"--img_test_dir={test_dir}", *given, seed=True)
    assert result.returncode == 0, result.stderr
    assert read_lines(tmp_path / "again.txt") == read_lines(tmp_path / "label_val.txt")
    assert "--mode=test ignores --epochs and --lr, other modes' flags" in result.stderr
    result = here("--mode=test", f"--img_test_dir={test_dir}", "--batch_size=0", seed=True)
    assert_user_error(result, "--batch-size must be at least 1, got 0")


def test_demo_runs_the_whole_pipeline(tmp_path):
    result = cli(
        "demo",
        "--out",
        str(tmp_path / "demo"),
        "--n-train",
        "240",
        "--n-test",
        "60",
        "--epochs",
        "2",
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr
    assert "test HTER" in result.stdout
    assert len(read_lines(tmp_path / "demo" / "label_val.txt")) == 60
    assert (tmp_path / "demo" / "run" / "run.json").exists()
    assert (tmp_path / "demo" / "explore" / "samples.png").exists()
    # Again in its own folder, smaller: its data is made afresh, not mixed with the last one's.
    result = here("demo", "--out", str(tmp_path / "demo"), "--n-train", "60", "--n-test", "20",
                 "--epochs", "1", "--device", "cpu")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "demo" / "data" / "train_img").iterdir())) == 60
    assert len(read_lines(tmp_path / "demo" / "label_val.txt")) == 20
    # No option that it would leave unused: --cache and --workers had been taken and ignored.
    for unused in (["--cache", str(tmp_path / "c")], ["--workers", "1"], ["--no-cache"]):
        result = here("demo", *unused)
        assert result.returncode == 2 and f"unrecognized arguments: {unused[0]}" in result.stderr


def test_pretrained_alone_means_the_installed_imagenet_weights():
    from faceattr.cli import build_parser

    def parse(*words):
        return build_parser().parse_args(["train", "data.zip", *words])

    assert parse().pretrained is None
    assert parse("--pretrained").pretrained == "imagenet"
    assert parse("--pretrained", "--epochs", "3").pretrained == "imagenet"
    assert parse("--pretrained", "w.safetensors").pretrained == "w.safetensors"
    args = parse("--arch", "efficientnet_lite0", "--ema", "0.999", "--augment", "strong")
    assert (args.arch, args.ema, args.augment) == ("efficientnet_lite0", 0.999, "strong")
    args = parse("--mix", "cutmix", "--mix-alpha", "1")
    assert (args.mix, args.mix_alpha) == ("cutmix", 1.0)


def test_the_options_lists_match_what_they_list():
    """Every training option is one of train's; predict's --vote lists the votes by name, not
    importing torch to read them: kept in step here."""
    from faceattr.cli import build_parser, train_options
    from faceattr.ensemble import VOTES

    args = build_parser().parse_args(["train", "d"])
    assert {"arch", "epochs", "save_every"} <= set(train_options())
    assert all(hasattr(args, name) for name in train_options())  # a field without its option
    predict = build_parser()._subparsers._group_actions[0].choices["predict"]
    (vote,) = [a for a in predict._actions if a.dest == "vote"]
    assert set(vote.choices) == set(VOTES)


def test_train_options_given_override_the_devices_recipe_and_only_they():
    from faceattr.cli import build_parser, train_config

    def config(*words):
        return train_config(build_parser().parse_args(["train", "d", *words]), torch.device("cpu"))

    assert config().epochs == 6 and config().pretrained == "imagenet"
    assert config("--epochs", "2", "--ema", "0").epochs == 2  # given, even when 0 or the default
    cfg = config("--arch", "simple", "--no-cache", "--compile")
    assert (cfg.arch, cfg.epochs, cfg.pretrained, cfg.cache, cfg.compile) == (
        "simple", 15, None, None, True,
    )  # fmt: skip
    assert config("--pretrained", "none").pretrained is None


def test_quiet_and_verbose_go_before_or_after_the_command_but_not_together(dataset_dir, tmp_path):
    result = here("-q", "explore", str(dataset_dir), "--out", str(tmp_path / "ex"), "--no-cache")
    assert result.returncode == 0, result.stderr
    assert "decoded" not in result.stderr and "label 0:" in result.stdout  # quiet, as after it
    for argv in (["explore", str(dataset_dir), "-q", "-v"], ["-v", "explore", "-q", "x"]):
        result = here(*argv)
        assert result.returncode == 2 and "not allowed with argument" in result.stderr
